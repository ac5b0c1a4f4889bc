"""/api/v1/queries: run a spanning C-FIND (answered from the query cache when it can), read back the record
(the rules: serve_app.usecases.query).

``Cache-Control: no-cache`` on the request skips the lookup (the fresh answer is still stored);
``no-store`` keeps the fresh answer out of the cache.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from serve_app.api_models import QueryIn, QueryOut
from serve_app.auth import Principal, audit_of, hops_of, require_query
from serve_app.deps import ServicesDep
from serve_app.timing import arrived
from serve_app.usecases import query
from spanner.schemas import QueryRecordOut

router = APIRouter(prefix="/api/v1/queries", tags=["queries"], dependencies=[Depends(require_query)])

FAILED_RESPONSE: dict[int | str, dict[str, Any]] = {
    502: {"model": QueryOut, "description": "The query failed under its failure strategy"}
}


def cache_directives(header: str | None) -> set[str]:
    """The directive names of a Cache-Control header, lower-case (``no-cache``, ``no-store``, ...)."""
    return {part.split("=", 1)[0].strip().lower() for part in (header or "").split(",") if part.strip()}


@router.post("", response_model=QueryOut, responses=FAILED_RESPONSE)
async def run_query(
    body: QueryIn, request: Request, s: ServicesDep, principal: Principal = Depends(require_query)
) -> JSONResponse:
    directives = cache_directives(request.headers.get("cache-control"))
    requester = request.client.host if request.client else "unknown"
    answer = await query.run_query(
        s, body, audit_of(request, principal, None), requester,
        read_cache="no-cache" not in directives, store="no-store" not in directives,
        hops=hops_of(request, principal), arrived=arrived(request),
    )
    s.records.reserve()
    return RecordedResponse(answer.body, answer.status, functools.partial(s.records.hand_over, answer.record))


class RecordedResponse(JSONResponse):
    """Hands the query's record to the writer once the answer is sent (or failed to be sent: a client
    that went away does not take the record with it), so writing does not compete with sending."""

    def __init__(self, content: Any, status_code: int, hand_over: Callable[[], Awaitable[None]]) -> None:
        super().__init__(content, status_code=status_code)
        self._hand_over = hand_over

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._hand_over()


@router.get("", response_model=list[QueryRecordOut])
async def list_queries(
    s: ServicesDep, limit: int = Query(50, ge=1, le=1000), offset: int = Query(0, ge=0)
) -> list[QueryRecordOut]:
    await s.records.settled()  # this replica's answers are recorded after they have gone
    return await asyncio.to_thread(s.repo.list_queries, limit=min(limit, s.settings.query_history),
                                   offset=offset)


@router.get("/{query_id}", response_model=QueryRecordOut)
async def get_query(query_id: str, s: ServicesDep) -> QueryRecordOut:
    await s.records.settled()
    return await asyncio.to_thread(s.repo.get_query, query_id)
