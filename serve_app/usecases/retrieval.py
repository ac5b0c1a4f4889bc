"""One retrieval (C-MOVE through the spanner): check what identifies the objects, find who holds them,
move part by part while reporting progress, then record it with its event.

The moves themselves live in serve_app.retrieval (the Retriever); this module holds the request's
rules and its life cycle, so the HTTP route only streams what it yields.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from actors import store_service
from serve_app.api_models import RetrievalIn, RetrievalMode
from serve_app.errors import Forbidden
from serve_app.services import Services
from serve_app.usecases.query import span_specs
from spanner.errors import InvalidQuery
from spanner.nodespec import NodeSpec
from spanner.proxy_move import Peer
from spanner.query import Level, normalise_value
from spanner.storage import Audit

LOG = logging.getLogger(__name__)
NEEDED = {Level.STUDY: "StudyInstanceUID", Level.SERIES: "SeriesInstanceUID", Level.IMAGE: "SOPInstanceUID"}
ALLOWED = {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientID"}


def checked_uids(body: RetrievalIn) -> dict[str, list[str]]:
    """The unique keys of what to move, each a list; 422 for a level or key that cannot say what."""
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


def patient_of(uids: dict[str, list[str]]) -> str | None:
    """The PatientID the retrieval names, for the audit trail."""
    patient_ids = uids.get("PatientID") or []
    return patient_ids[0] if patient_ids else None


@dataclass(frozen=True, slots=True)
class Retrieval:
    """A retrieval checked and resolved against its span, ready to run."""

    span: str
    level: Level
    uids: dict[str, list[str]]
    destination_ae: str
    timeout_s: float
    nodes: list[NodeSpec]
    requester: str
    audit: Audit
    hops: tuple[str, ...] = ()  # the dicom-spanner deployments it already passed (spanner.hops)
    mode: RetrievalMode = RetrievalMode.DIRECT
    destination: Peer | None = None  # proxy mode: where the spanner sends


def front_destination(body: RetrievalIn, front: bool, requester: str) -> Peer:
    """The DICOM front's own storage listener of a C-GET (``deliver_to``): proxy mode only, asked by a
    dicom_front key (``front``), and on the address the request comes from, so that no key can make the
    spanner send anywhere else."""
    assert body.deliver_to is not None
    if not front:
        raise Forbidden("deliver_to: only the DICOM front (a key of role 'dicom_front') may name where the "
                        "spanner delivers; use destination_ae with a known destination")
    if body.mode is RetrievalMode.DIRECT:
        raise InvalidQuery("deliver_to: works in proxy mode only; leave mode out")
    if body.deliver_to.host != requester:
        raise Forbidden(f"deliver_to: host {body.deliver_to.host!r} is not the address this request comes "
                        f"from ({requester}); the DICOM front may only have instances delivered to itself")
    to = body.deliver_to
    return Peer(to.ae_title, to.host, to.port)


async def destination_of(s: Services, body: RetrievalIn, audit: Audit, front: bool = False,
                         requester: str = "") -> tuple[RetrievalMode, Peer | None]:
    """The mode and, for proxy, the destination; 422 for proxy to an AE the spanner does not know, 403 for a
    DICOM caller the destination does not allow."""
    if body.deliver_to is not None:
        return RetrievalMode.PROXY, front_destination(body, front, requester)
    known = await asyncio.to_thread(s.repo.get_destination_by_ae, body.destination_ae)
    mode = body.mode or (RetrievalMode.PROXY if known is not None else RetrievalMode.DIRECT)
    if mode is RetrievalMode.DIRECT:
        return mode, None
    if known is None:
        raise InvalidQuery(f"destination_ae: {body.destination_ae!r} is not a known destination; add it with "
                           "POST /api/v1/destinations, or ask for mode 'direct' if every holding archive "
                           "knows it")
    caller = audit.asserted_ae
    if caller is not None and known.allowed_calling_aets and caller not in known.allowed_calling_aets:
        raise Forbidden(f"calling AE {caller!r} may not send to destination {known.name!r} "
                        f"({known.ae_title}); it allows {', '.join(known.allowed_calling_aets)}")
    return mode, Peer(known.ae_title, known.host, known.port)


async def prepare(
    s: Services, body: RetrievalIn, uids: dict[str, list[str]], audit: Audit, requester: str,
    hops: tuple[str, ...] = (), front: bool = False,
) -> Retrieval:
    """Errors (unknown span, no enabled node) are raised here, before any progress is streamed.
    ``front``: the request comes from the DICOM front (a dicom_front key, or anyone with auth off)."""
    nodes = await asyncio.to_thread(span_specs, s, body.span, None)
    mode, destination = await destination_of(s, body, audit, front, requester)
    return Retrieval(
        span=body.span,
        level=body.level,
        uids=uids,
        destination_ae=body.destination_ae,
        timeout_s=body.timeout_s or s.settings.retrieve_timeout_s,
        nodes=nodes,
        requester=requester,
        audit=audit,
        hops=hops,
        mode=mode,
        destination=destination,
    )


async def run(s: Services, r: Retrieval) -> AsyncGenerator[dict[str, Any], None]:
    """Progress events, then one result event. Closing the iterator early (the client went away)
    cancels the moves, and so the archives' C-MOVEs."""
    events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    task = asyncio.ensure_future(_work(s, r, events))
    try:
        while (event := await events.get()) is not None:
            yield event
        await task
    finally:
        if not task.done():
            task.cancel()


async def _work(s: Services, r: Retrieval, events: asyncio.Queue[dict[str, Any] | None]) -> None:
    started = time.monotonic()
    retrieval_id = uuid.uuid4().hex
    progress: dict[str, Any] = {"completed": 0, "failed": 0, "warning": 0}

    async def emit(event: dict[str, Any]) -> None:
        if event.get("event") == "progress":
            progress.update((k, event[k]) for k in ("completed", "failed", "warning") if k in event)
        await events.put(event)

    try:
        try:
            if r.destination is not None:
                store = await asyncio.to_thread(store_service.get, s.settings)
                result = await s.retriever.retrieve_proxy(r.nodes, r.level, r.uids, r.destination, store,
                                                          r.timeout_s, emit)
            else:
                result = await s.retriever.retrieve(r.nodes, r.level, r.uids, r.destination_ae, r.timeout_s,
                                                    emit, r.hops)
        except BaseException as exc:
            # C-MOVEs may already have moved patient data: the audit trail gets its record anyway,
            # written even while this task is being cancelled.
            cancelled = isinstance(exc, asyncio.CancelledError)
            reason = ("cancelled: the client went away or the service is stopping" if cancelled
                      else f"{type(exc).__name__}: {exc}")
            try:
                await asyncio.shield(asyncio.to_thread(
                    s.repo.record_retrieval, retrieval_id=retrieval_id, span=r.span, level=r.level,
                    uids=r.uids, destination_ae=r.destination_ae, requester=r.requester,
                    status="cancelled" if cancelled else "failed", dimse_status=None, parts=[],
                    elapsed_ms=round((time.monotonic() - started) * 1000, 2), error=reason[:1000],
                    audit=r.audit, emit=s.events_enabled, **progress,
                ))
                s.nudge_events()
            except Exception:
                LOG.exception("the record of retrieval %s (%s) could not be written", retrieval_id, reason)
            raise
        summaries = [p.summary() for p in result.parts]
        final = {
            "event": "result",
            "retrieval_id": retrieval_id,
            "mode": r.mode.value,
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
            span=r.span,
            level=r.level,
            uids=r.uids,
            destination_ae=r.destination_ae,
            requester=r.requester,
            status=result.status,
            dimse_status=result.dimse_status,
            completed=result.counts["completed"],
            failed=result.counts["failed"],
            warning=result.counts["warning"],
            parts=summaries,
            elapsed_ms=round((time.monotonic() - started) * 1000, 2),
            error=result.error,
            audit=r.audit,
            emit=s.events_enabled,
        )
        s.nudge_events()
        await asyncio.to_thread(s.janitor.purge_if_due)
        await events.put(final)
    finally:
        await events.put(None)
