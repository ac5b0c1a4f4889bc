"""/api/v1/queries: run a spanning C-FIND (answered from the query cache when it can), read back the record.

``Cache-Control: no-cache`` on the request skips the lookup (the fresh answer is still stored);
``no-store`` keeps the fresh answer out of the cache.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from serve_app.api_models import QueryIn, QueryOut
from serve_app.auth import Principal, audit_of, require_query
from serve_app.metrics import record_span_query
from serve_app.plan import QueryPlan
from serve_app.routes import services
from serve_app.services import Services
from spanner.logs import query_log_fields
from spanner.schemas import QueryRecordOut
from spanner.storage import Audit

LOG = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1/queries", tags=["queries"], dependencies=[Depends(require_query)])

FAILED_RESPONSE: dict[int | str, dict[str, Any]] = {
    502: {"model": QueryOut, "description": "The query failed under its failure strategy"}
}


def cache_directives(header: str | None) -> set[str]:
    """The directive names of a Cache-Control header, lower-case (``no-cache``, ``no-store``, ...)."""
    return {part.split("=", 1)[0].strip().lower() for part in (header or "").split(",") if part.strip()}


@router.post("", response_model=QueryOut, responses=FAILED_RESPONSE)
async def run_query(
    body: QueryIn,
    request: Request,
    s: Services = Depends(services),
    principal: Principal = Depends(require_query),
) -> JSONResponse:
    started = time.monotonic()
    directives = cache_directives(request.headers.get("cache-control"))
    prepared = await asyncio.to_thread(s.prepare_query, body, read_cache="no-cache" not in directives)
    plan = prepared.plan
    requester = request.client.host if request.client else "unknown"
    audit = audit_of(request, principal, plan.query.filters.get("PatientID") or None)
    if prepared.lookup.answer is not None:
        return await _answer_hit(s, plan, prepared.lookup.answer, requester, audit, started)

    result = await s.coordinator.run(plan)
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
    store_key = None if "no-store" in directives else prepared.lookup.key

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
        )
        s.cache.store(store_key, answer, prepared.cache_ttl_s)
        s.janitor.purge_if_due()

    await asyncio.to_thread(record_and_store)
    _completed(query_id, plan, result.status, result.total, result.elapsed_ms, "miss")
    return JSONResponse(answer, status_code=502 if result.status == "failed" else 200)


async def _answer_hit(
    s: Services, plan: QueryPlan, cached: dict[str, Any], requester: str, audit: Audit, started: float
) -> JSONResponse:
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
    )
    _completed(query_id, plan, str(answer.get("status")), int(answer.get("total", 0)), elapsed_ms, "hit")
    return JSONResponse(answer, status_code=502 if answer.get("status") == "failed" else 200)


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


@router.get("", response_model=list[QueryRecordOut])
def list_queries(
    limit: int = Query(50, ge=1, le=1000), offset: int = Query(0, ge=0), s: Services = Depends(services)
) -> list[QueryRecordOut]:
    return s.repo.list_queries(limit=min(limit, s.settings.query_history), offset=offset)


@router.get("/{query_id}", response_model=QueryRecordOut)
def get_query(query_id: str, s: Services = Depends(services)) -> QueryRecordOut:
    return s.repo.get_query(query_id)
