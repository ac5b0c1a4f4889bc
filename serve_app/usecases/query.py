"""One spanning query, whichever door it came through (HTTP, or an AMQP request): plan, cache, fan-out,
merge, the one INFO line, and the record with its events, which the door hands to the record writer
(serve_app.records) once the answer has gone."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from serve_app.api_models import QueryIn
from serve_app.metrics import record_span_query
from serve_app.plan import QueryPlan
from serve_app.records import Job
from serve_app.services import Services
from serve_app.timing import note, phase
from spanner.cache import NO_LOOKUP, Lookup, QueryIdentity
from spanner.errors import InvalidQuery
from spanner.logs import query_log_fields
from spanner.nodespec import NodeSpec
from spanner.query import NodeQuery, normalise_filters, normalise_return_keys
from spanner.schemas import ALL_SPAN, FailureStrategy, NodeOut, SpanOut
from spanner.storage import Audit

LOG = logging.getLogger(__name__)


# -- planning -------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PreparedQuery:
    plan: QueryPlan
    cache_ttl_s: int
    lookup: Lookup


def cache_identity(plan: QueryPlan) -> QueryIdentity:
    return QueryIdentity(
        span=plan.span,
        nodes=tuple(dataclasses.asdict(spec) for spec in plan.nodes),
        level=plan.query.level,
        filters=plan.query.filters,
        return_keys=plan.query.return_keys,
        dedup=plan.dedup,
        limit=plan.limit,
        offset=plan.offset,
        failure_strategy=plan.failure_strategy,
        minimum_nodes=plan.minimum_nodes,
    )


def span_specs(s: Services, span: str, only: list[str] | None) -> list[NodeSpec]:
    """The enabled nodes of ``span`` (narrowed to ``only``), best priority first; 404/422 otherwise."""
    return _specs(s, span, s.repo.span_nodes(span), only)  # NotFound for an unknown span


def _specs(s: Services, span: str, members: list[NodeOut], only: list[str] | None) -> list[NodeSpec]:
    if only is not None:
        names = {n.name for n in members}
        unknown = sorted(set(only) - names)
        if unknown:
            raise InvalidQuery(
                f"nodes {', '.join(unknown)} are not enabled nodes of span {span!r}; "
                f"it has: {', '.join(sorted(names)) or 'none'}"
            )
        members = [n for n in members if n.name in set(only)]
    if not members:
        hint = "add one with POST /api/v1/nodes" if span == ALL_SPAN else "enable or add its nodes"
        raise InvalidQuery(f"span {span!r} has no enabled node to query; {hint}")
    return [s.spec_for(n) for n in members]


def plan_query(
    s: Services, q: QueryIn, read: tuple[SpanOut, list[NodeOut]], *, cap_limit: bool = False
) -> tuple[QueryPlan, SpanOut]:
    """The query resolved against its span's policies and limits, given its span and enabled nodes as
    read (``Repository.span_for_query``).

    A limit above the span's ``max_results`` is refused, or with ``cap_limit`` lowered to it (DICOMweb:
    a server may answer fewer matches than asked, and says so)."""
    span, enabled = read
    members = _specs(s, q.span, enabled, q.nodes)
    timeout = q.timeout_s if q.timeout_s is not None else span.timeout_s
    if timeout > s.settings.max_timeout_s:
        raise InvalidQuery(f"timeout_s {timeout:g} is above the limit of {s.settings.max_timeout_s:g} s")
    strategy = q.failure_strategy or span.failure_strategy
    minimum = q.minimum_nodes or span.minimum_nodes or 1
    if strategy is FailureStrategy.MINIMUM and minimum > len(members):
        raise InvalidQuery(f"minimum_nodes {minimum} is more than the {len(members)} node(s) queried")
    limit = q.limit if q.limit is not None else span.max_results
    if limit > span.max_results and cap_limit:
        limit = span.max_results
    if limit > span.max_results:
        raise InvalidQuery(
            f"limit {limit} is above span {q.span!r}'s max_results of {span.max_results}; page with offset"
        )
    query = NodeQuery(q.level, normalise_filters(q.filters), normalise_return_keys(q.return_keys))
    plan = QueryPlan(
        query=query,
        span=q.span,
        nodes=tuple(members),
        timeout_s=timeout,
        failure_strategy=strategy,
        minimum_nodes=minimum,
        dedup=q.dedup or span.dedup,
        limit=limit,
        offset=q.offset,
    )
    return plan, span


async def prepare_query(
    s: Services, q: QueryIn, arrived: float, *, read_cache: bool = True, cap_limit: bool = False
) -> PreparedQuery:
    """The plan and, when the span caches, the cache key and any cached answer (a thread hop then)."""
    read = await s.span_reads.get(q.span, arrived)  # NotFound for an unknown span
    plan, span = plan_query(s, q, read, cap_limit=cap_limit)
    if span.cache_ttl_s <= 0:
        return PreparedQuery(plan, 0, NO_LOOKUP)
    lookup = await asyncio.to_thread(s.cache.lookup, cache_identity(plan), read=read_cache)
    return PreparedQuery(plan, span.cache_ttl_s, lookup)


# -- running --------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Answer:
    body: dict[str, Any]
    """As POST /api/v1/queries returns it."""
    status: int
    """200, or 502 when the query failed under its failure strategy."""
    record: Job
    """Writes the query's record (with its events) and stores a fresh answer in the cache: give it to
    ``Services.records`` once the answer has gone (a blocking call, run by the writer's thread)."""


async def run_query(
    s: Services, body: QueryIn, audit: Audit, requester: str, *, read_cache: bool = True, store: bool = True,
    hops: tuple[str, ...] = (), arrived: float | None = None, cap_limit: bool = False,
) -> Answer:
    """Spanner errors (unknown span, bad value) propagate for the caller's door to translate. ``audit``
    says who asked; the PatientID asked about is added here, once the filters are normalised. ``hops``:
    the dicom-spanner deployments the query already passed (loop protection, spanner.hops); an answer
    to such a query is not stored in the cache, since whether a node is a loop depends on the chain. The
    deadline counts from ``arrived`` (monotonic clock: when the door received the request), else from now.
    ``cap_limit``: a limit above the span's max_results is lowered to it instead of refused."""
    started = time.monotonic() if arrived is None else arrived
    note("accept", time.monotonic() - started)  # the body read and the key checked
    s.admission.precheck(body.span, body.timeout_s)  # or Overloaded (503) before any database work
    with phase("plan"):
        prepared = await prepare_query(s, body, started, read_cache=read_cache, cap_limit=cap_limit)
    plan = dataclasses.replace(prepared.plan, query=dataclasses.replace(prepared.plan.query, hops=hops))
    audit = dataclasses.replace(audit, patient_id=plan.query.filters.get("PatientID") or None)
    if prepared.lookup.answer is not None:
        return _answer_hit(s, plan, prepared.lookup.answer, requester, audit, started)

    asked = time.monotonic()
    reserve_s = s.coordinator.reserve_s(plan.timeout_s)
    async with s.admission.slot(plan.timeout_s, started, plan.span, reserve_s) as remaining_s:  # or 503
        note("admit", time.monotonic() - asked)
        result = await s.coordinator.run(dataclasses.replace(plan, timeout_s=remaining_s), reserve_s)
    query_id = uuid.uuid4().hex
    outcomes = [o.to_json() for o in result.outcomes]
    answer = {
        "query_id": query_id,
        "status": result.status,
        "level": plan.query.level,
        "span": plan.span,
        "total": result.total,
        "matches": result.matches,
        "nodes": outcomes,
        "elapsed_ms": result.elapsed_ms,
        "reason": result.reason,
        "cache": "miss",
    }
    store_key = prepared.lookup.key if store and not hops else None
    answered_at = datetime.now(UTC)

    def record_and_store() -> None:
        s.repo.record_query(
            created_at=answered_at,
            query_id=query_id,
            span=plan.span,
            level=plan.query.level,
            filters=plan.query.filters,
            requester=requester,
            status=result.status,
            total=result.total,
            outcomes=outcomes,
            elapsed_ms=result.elapsed_ms,
            error=result.reason,
            cache="miss",
            audit=audit,
            emit=s.events_enabled,
        )
        s.cache.store(store_key, answer, prepared.cache_ttl_s)

    _completed(query_id, plan, result.status, result.total, result.elapsed_ms, "miss")
    return Answer(answer, 502 if result.status == "failed" else 200, record_and_store)


def _answer_hit(
    s: Services, plan: QueryPlan, cached: dict[str, Any], requester: str, audit: Audit, started: float
) -> Answer:
    """A cached answer under a fresh query_id, recorded like any query with the hit's own elapsed time."""
    query_id = uuid.uuid4().hex
    elapsed_ms = round((time.monotonic() - started) * 1000, 2)
    answer = {"query_id": query_id, **cached, "elapsed_ms": elapsed_ms, "cache": "hit"}
    record = functools.partial(
        s.repo.record_query,
        created_at=datetime.now(UTC),
        query_id=query_id,
        span=plan.span,
        level=plan.query.level,
        filters=plan.query.filters,
        requester=requester,
        status=str(answer.get("status")),
        total=int(answer.get("total", 0)),
        outcomes=list(answer.get("nodes", [])),
        elapsed_ms=elapsed_ms,
        error=answer.get("reason"),
        cache="hit",
        audit=audit,
        emit=s.events_enabled,
    )
    _completed(query_id, plan, str(answer.get("status")), int(answer.get("total", 0)), elapsed_ms, "hit")
    return Answer(answer, 502 if answer.get("status") == "failed" else 200, record)


def _completed(
    query_id: str, plan: QueryPlan, status: str, total: int, elapsed_ms: float, cache: str
) -> None:
    """One INFO line and the span metrics per spanning query; filters stay out (they hold patient data)."""
    fields = query_log_fields(
        query_id=query_id,
        span=plan.span,
        level=plan.query.level,
        status=status,
        total=total,
        elapsed_ms=elapsed_ms,
        cache=cache,
    )
    LOG.info("query %s on span %s: %s, %d matches", query_id, plan.span, status, total, extra=fields)
    record_span_query(plan.span, status, elapsed_ms, cache)
