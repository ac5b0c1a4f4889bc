"""/api/v1/queries: run a spanning C-FIND, and read back what was asked before."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from serve_app.api_models import QueryIn, QueryOut
from serve_app.routes import services
from serve_app.services import Services
from spanner.schemas import QueryRecordOut

router = APIRouter(prefix="/api/v1/queries", tags=["queries"])

FAILED_RESPONSE: dict[int | str, dict[str, Any]] = {
    502: {"model": QueryOut, "description": "The query failed under its failure strategy"}
}


@router.post("", response_model=QueryOut, responses=FAILED_RESPONSE)
async def run_query(body: QueryIn, request: Request, s: Services = Depends(services)) -> JSONResponse:
    plan = await asyncio.to_thread(s.plan, body)
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
    }
    requester = request.client.host if request.client else "unknown"
    await asyncio.to_thread(
        s.repo.record_query,
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
    )
    return JSONResponse(answer, status_code=502 if result.status == "failed" else 200)


@router.get("", response_model=list[QueryRecordOut])
def list_queries(
    limit: int = Query(50, ge=1, le=1000), offset: int = Query(0, ge=0), s: Services = Depends(services)
) -> list[QueryRecordOut]:
    return s.repo.list_queries(limit=min(limit, s.settings.query_history), offset=offset)


@router.get("/{query_id}", response_model=QueryRecordOut)
def get_query(query_id: str, s: Services = Depends(services)) -> QueryRecordOut:
    return s.repo.get_query(query_id)
