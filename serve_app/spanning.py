"""One spanning query, whichever door it came through (HTTP, or an AMQP request): plan, cache, fan-out,
merge, record with its events, and the one INFO line. Returns the answer and its HTTP-style status."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from typing import Any

from serve_app.api_models import QueryIn
from serve_app.metrics import record_span_query
from serve_app.plan import QueryPlan
from serve_app.services import PreparedQuery, Services
from spanner.logs import query_log_fields
from spanner.storage import Audit

LOG = logging.getLogger(__name__)


async def run_query(
    s: Services, body: QueryIn, audit: Audit, requester: str, *, read_cache: bool = True, store: bool = True
) -> tuple[dict[str, Any], int]:
    """The answer (as POST /api/v1/queries returns it) and 200, or 502 when it failed under its strategy.
    Spanner errors (unknown span, bad value) propagate for the caller's door to translate. ``audit``
    says who asked; the PatientID asked about is added here, once the filters are normalised."""
    started = time.monotonic()
    s.admission.precheck(body.span, body.timeout_s)  # or Overloaded (503) before any database work
    prepared = await asyncio.to_thread(s.prepare_query, body, read_cache=read_cache)
    plan = prepared.plan
    audit = dataclasses.replace(audit, patient_id=plan.query.filters.get("PatientID") or None)
    if prepared.lookup.answer is not None:
        return await _answer_hit(s, plan, prepared.lookup.answer, requester, audit, started)

    # Admission (serve_app/admission.py) holds a slot from the fan-out until the record is written, so
    # its measure of how long a query takes includes the database; or it raises Overloaded (503).
    async with s.admission.slot(plan.timeout_s, started, plan.span) as remaining_s:
        return await _answer_miss(s, prepared, audit, requester, remaining_s, store)


async def _answer_miss(
    s: Services, prepared: PreparedQuery, audit: Audit, requester: str, remaining_s: float, store: bool
) -> tuple[dict[str, Any], int]:
    """Ask the archives with what is left of the deadline, record, store in the cache, answer."""
    plan = prepared.plan
    result = await s.coordinator.run(dataclasses.replace(plan, timeout_s=remaining_s))
    query_id = uuid.uuid4().hex
    outcomes = [o.to_json() for o in result.outcomes]
    answer = {
        "query_id": query_id,
        "status": result.status,
        "level": plan.query.level.value,
        "span": plan.span,
        "total": result.total,
        "matches": result.matches,
        "nodes": outcomes,
        "elapsed_ms": result.elapsed_ms,
        "reason": result.reason,
        "cache": "miss",
    }
    store_key = prepared.lookup.key if store else None

    def record_and_store() -> None:
        s.repo.record_query(
            query_id=query_id,
            span=plan.span,
            level=plan.query.level.value,
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
        s.janitor.purge_if_due()

    await asyncio.to_thread(record_and_store)
    s.nudge_events()
    _completed(query_id, plan, result.status, result.total, result.elapsed_ms, "miss")
    return answer, 502 if result.status == "failed" else 200


async def _answer_hit(
    s: Services, plan: QueryPlan, cached: dict[str, Any], requester: str, audit: Audit, started: float
) -> tuple[dict[str, Any], int]:
    """A cached answer under a fresh query_id, recorded like any query with the hit's own elapsed time."""
    query_id = uuid.uuid4().hex
    elapsed_ms = round((time.monotonic() - started) * 1000, 2)
    answer = {"query_id": query_id, **cached, "elapsed_ms": elapsed_ms, "cache": "hit"}
    await asyncio.to_thread(
        s.repo.record_query,
        query_id=query_id,
        span=plan.span,
        level=plan.query.level.value,
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
    s.nudge_events()
    _completed(query_id, plan, str(answer.get("status")), int(answer.get("total", 0)), elapsed_ms, "hit")
    return answer, 502 if answer.get("status") == "failed" else 200


def _completed(
    query_id: str, plan: QueryPlan, status: str, total: int, elapsed_ms: float, cache: str
) -> None:
    """One INFO line and the span metrics per spanning query; filters stay out (they hold patient data)."""
    fields = query_log_fields(
        query_id=query_id,
        span=plan.span,
        level=plan.query.level.value,
        status=status,
        total=total,
        elapsed_ms=elapsed_ms,
        cache=cache,
    )
    LOG.info("query %s on span %s: %s, %d matches", query_id, plan.span, status, total, extra=fields)
    record_span_query(plan.span, status, elapsed_ms, cache)
