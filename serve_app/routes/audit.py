"""/api/v1/audit (admin): every query and retrieval, newest first, with who asked, from where, about whom."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Literal

from fastapi import APIRouter, Depends, Query

from serve_app.auth import require_admin
from serve_app.deps import ServicesDep
from spanner.errors import InvalidQuery
from spanner.schemas import AuditEntryOut

router = APIRouter(prefix="/api/v1/audit", tags=["audit"], dependencies=[Depends(require_admin)])


@router.get("", response_model=list[AuditEntryOut])
async def list_audit(
    s: ServicesDep,
    since: datetime | None = Query(None, description="ISO 8601; entries at or after this"),
    until: datetime | None = Query(None, description="ISO 8601; entries before this"),
    requester: str | None = Query(None, description="Principal: a key's name, ae:<CALLING_AE> or anonymous"),
    patient_id: str | None = Query(None, description="Exact PatientID asked about"),
    status: str | None = Query(None, description="e.g. success, partial, failed"),
    kind: Literal["query", "retrieval"] | None = Query(None),
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0),
) -> list[AuditEntryOut]:
    for name, moment in (("since", since), ("until", until)):
        if moment is not None and moment.tzinfo is None:
            raise InvalidQuery(f"{name}: give a time zone, e.g. 2026-01-02T03:04:05Z")
    await s.records.settled()  # this replica's query records are written after the answers
    return await asyncio.to_thread(s.repo.list_audit, since=since, until=until, principal=requester,
                                   patient_id=patient_id, status=status, kind=kind, limit=limit,
                                   offset=offset)
