"""/api/v1/retrievals: C-MOVE through the spanner, streaming progress as NDJSON, recorded like queries
(the rules: serve_app.usecases.retrieval)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from serve_app.api_models import RetrievalIn
from serve_app.auth import Principal, audit_of, hops_of, require_query
from serve_app.deps import ServicesDep
from serve_app.usecases import retrieval
from spanner.schemas import ApiRole, RetrievalRecordOut

router = APIRouter(prefix="/api/v1/retrievals", tags=["retrievals"], dependencies=[Depends(require_query)])

STREAM_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"application/x-ndjson": {}},
        "description": (
            "One JSON object per line: progress events "
            "{event: 'progress', remaining, completed, failed, warning}, "
            "then one {event: 'result', retrieval_id, status, dimse_status, completed, failed, warning, "
            "failed_sop_instance_uids, error}"
        ),
    }
}


@router.post("", responses=STREAM_DOC)
async def retrieve(
    body: RetrievalIn, request: Request, s: ServicesDep, principal: Principal = Depends(require_query)
) -> StreamingResponse:
    uids = retrieval.checked_uids(body)
    audit = audit_of(request, principal, retrieval.patient_of(uids))
    requester = request.client.host if request.client else "unknown"
    front = not principal.authenticated or principal.role is ApiRole.DICOM_FRONT
    prepared = await retrieval.prepare(s, body, uids, audit, requester, hops_of(request, principal), front)

    async def lines() -> AsyncIterator[bytes]:
        events = retrieval.run(s, prepared)
        try:
            async for event in events:
                yield (json.dumps(event) + "\n").encode()
        finally:
            await events.aclose()  # the client went away: cancel the moves

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@router.get("", response_model=list[RetrievalRecordOut])
def list_retrievals(
    s: ServicesDep, limit: int = Query(50, ge=1, le=1000), offset: int = Query(0, ge=0)
) -> list[RetrievalRecordOut]:
    return s.repo.list_retrievals(limit=limit, offset=offset)


@router.get("/{retrieval_id}", response_model=RetrievalRecordOut)
def get_retrieval(retrieval_id: str, s: ServicesDep) -> RetrievalRecordOut:
    return s.repo.get_retrieval(retrieval_id)
