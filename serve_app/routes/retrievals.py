"""/api/v1/retrievals: C-MOVE through the spanner, streaming progress as NDJSON, recorded like queries."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from serve_app.api_models import RetrievalIn
from serve_app.auth import Principal, audit_of, require_query
from serve_app.routes import services
from serve_app.services import Services
from spanner.errors import InvalidQuery
from spanner.query import Level, normalise_value
from spanner.schemas import RetrievalRecordOut

router = APIRouter(prefix="/api/v1/retrievals", tags=["retrievals"], dependencies=[Depends(require_query)])

NEEDED = {Level.STUDY: "StudyInstanceUID", Level.SERIES: "SeriesInstanceUID", Level.IMAGE: "SOPInstanceUID"}
ALLOWED = {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientID"}
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


def _uids(body: RetrievalIn) -> dict[str, list[str]]:
    if body.level is Level.PATIENT:
        raise InvalidQuery("level: retrieval works at STUDY, SERIES or IMAGE level")
    unknown = sorted(set(body.uids) - ALLOWED)
    if unknown:
        raise InvalidQuery(
            f"uids: {', '.join(unknown)} cannot identify what to move; use {', '.join(sorted(ALLOWED))}"
        )
    needed = NEEDED[body.level]
    if not body.uids.get(needed):
        raise InvalidQuery(f"uids: a {body.level} retrieval needs {needed}")
    out: dict[str, list[str]] = {}
    for key, raw in body.uids.items():
        values = [raw] if isinstance(raw, str) else list(raw)
        for value in values:
            if key != "PatientID":
                normalise_value(key, value)  # a UID, no wildcards
        out[key] = values
    return out


@router.post("", responses=STREAM_DOC)
async def retrieve(
    body: RetrievalIn,
    request: Request,
    s: Services = Depends(services),
    principal: Principal = Depends(require_query),
) -> StreamingResponse:
    uids = _uids(body)
    patient_ids = uids.get("PatientID") or []
    audit = audit_of(request, principal, patient_ids[0] if patient_ids else None)
    destination = body.destination_ae
    nodes = await asyncio.to_thread(s.span_specs, body.span, None)
    timeout = body.timeout_s or s.settings.retrieve_timeout_s
    requester = request.client.host if request.client else "unknown"
    events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    async def work() -> None:
        started = time.monotonic()
        retrieval_id = uuid.uuid4().hex
        try:
            result = await s.retriever.retrieve(nodes, body.level, uids, destination, timeout, events.put)
            summaries = [p.summary() for p in result.parts]
            final = {
                "event": "result",
                "retrieval_id": retrieval_id,
                "status": result.status,
                "dimse_status": result.dimse_status,
                **result.counts,
                "remaining": 0,
                "failed_sop_instance_uids": result.failed_uids,
                "error": result.error,
                "parts": summaries,
            }
            await asyncio.to_thread(
                s.repo.record_retrieval,
                retrieval_id=retrieval_id,
                span=body.span,
                level=body.level.value,
                uids=uids,
                destination_ae=destination,
                requester=requester,
                status=result.status,
                dimse_status=result.dimse_status,
                completed=result.counts["completed"],
                failed=result.counts["failed"],
                warning=result.counts["warning"],
                parts=summaries,
                elapsed_ms=round((time.monotonic() - started) * 1000, 2),
                error=result.error,
                audit=audit,
                emit=s.events_enabled,
            )
            s.nudge_events()
            await asyncio.to_thread(s.janitor.purge_if_due)
            await events.put(final)
        finally:
            await events.put(None)

    async def stream() -> AsyncIterator[bytes]:
        task = asyncio.ensure_future(work())
        try:
            while (event := await events.get()) is not None:
                yield (json.dumps(event) + "\n").encode()
            await task
        finally:
            if not task.done():  # the client went away: cancel the moves, and so the archives' C-MOVEs
                task.cancel()

    return StreamingResponse(stream(), media_type="application/x-ndjson")


@router.get("", response_model=list[RetrievalRecordOut])
def list_retrievals(
    limit: int = Query(50, ge=1, le=1000), offset: int = Query(0, ge=0), s: Services = Depends(services)
) -> list[RetrievalRecordOut]:
    return s.repo.list_retrievals(limit=limit, offset=offset)


@router.get("/{retrieval_id}", response_model=RetrievalRecordOut)
def get_retrieval(retrieval_id: str, s: Services = Depends(services)) -> RetrievalRecordOut:
    return s.repo.get_retrieval(retrieval_id)
