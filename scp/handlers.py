"""Thin handlers of the front's acceptor: each turns a request into a call on the API and yields statuses.

What a status means is decided in scp.translate; how the API is reached in scp.client. While a handler
waits for the API it also waits for the request's C-CANCEL: whichever comes first wins, and a
cancelled HTTP request is closed at once (Serve then cancels the spanning query behind it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from pydicom.dataset import Dataset

from scp import get, translate
from scp.client import SpannerClient
from scp.encode import decode
from scp.errors import (
    FRONT_KEY_HINT,
    Abandoned,
    ApiFailed,
    ApiRejected,
    InvalidIdentifier,
    KeyRefused,
    LoopDetected,
    ScpError,
    SpansUnavailable,
    UnsupportedRequest,
)
from scp.spans import SpanDirectory, SpanInfo
from spanner import hops
from spanner.dicom_constants import Status
from spanner.dimse.acceptor import LOCAL_LIMIT_EXCEEDED, FindResult, MoveResult, Request
from spanner.dimse.pdu import AssociateReject, AssociateRequest, RejectReason, RejectResult, RejectSource

LOG = logging.getLogger(__name__)
T = TypeVar("T")

PENDING_BURST = 32
PENDING_PER_S = 20_000.0
PACE_STEP_S = 0.001
"""C-FIND pending responses go out in a first burst, then at most this many per second. DIMSE has no
flow control: socket buffers on both ends hold a thousand or more small responses, so an unpaced stream
would have sent most of a large answer before the client's C-CANCEL arrives. Paced, a C-CANCEL sent after
the first response stops the stream within the burst plus a few milliseconds' worth; 1,000 matches take
at least 48 ms to send."""

REJECT_CALLED_AE = AssociateReject(RejectResult.PERMANENT, RejectSource.SERVICE_USER,
                                   RejectReason.CALLED_AE_NOT_RECOGNIZED)
REJECT_CALLING_AE = AssociateReject(RejectResult.PERMANENT, RejectSource.SERVICE_USER,
                                    RejectReason.CALLING_AE_NOT_RECOGNIZED)
# The API cannot be asked for the span table right now: try again later.
REJECT_NO_SPANS = AssociateReject(RejectResult.TRANSIENT, RejectSource.SERVICE_PROVIDER_PRESENTATION,
                                  LOCAL_LIMIT_EXCEEDED)
# The API refuses the front's own key: the front's configuration, not the caller, is at fault.
REJECT_KEY_REFUSED = AssociateReject(RejectResult.TRANSIENT, RejectSource.SERVICE_USER,
                                     RejectReason.NO_REASON)


async def first_or_cancel(work: Awaitable[T], cancelled: asyncio.Event) -> T:
    """``work``'s result, or Abandoned (``work`` cancelled, its HTTP connection closed) on C-CANCEL."""
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(cancelled.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise Abandoned("the DICOM client cancelled; the HTTP request was closed")
    finally:
        waiter.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


class Pacer:
    """A token bucket: ``burst`` at once, then ``per_s``; sleeping also lets the loop read a C-CANCEL."""

    def __init__(self, burst: int, per_s: float) -> None:
        self._burst, self._per_s = burst, per_s
        self._sent = 0
        self._started = 0.0

    async def next(self) -> None:
        loop = asyncio.get_running_loop()
        if self._sent == 0:
            self._started = loop.time()
        self._sent += 1
        ahead = (self._sent - self._burst) / self._per_s - (loop.time() - self._started)
        if ahead > PACE_STEP_S:  # sleep in steps, so that responses leave in batches, not one by one
            await asyncio.sleep(ahead)


def origin(request: Request) -> dict[str, str]:
    """Who is asking, for the API's audit trail: the calling AE title and its address."""
    return {"X-Spanner-Calling-AE": request.calling_ae.strip(), "X-Spanner-Peer": request.peer}


@dataclass(frozen=True, slots=True)
class Admission:
    """What an accepted association's requests share: its span, and whether the caller is a dicom-spanner
    (then its identifiers may carry the hop chain of loop protection, spanner.hops)."""

    span: SpanInfo
    from_spanner: bool = False


@dataclass(frozen=True, slots=True)
class Front:
    """What the handlers share: the span table, the API client and this deployment's instance ID."""

    spans: SpanDirectory
    client: SpannerClient
    instance_id: str = ""
    listener: get.GetListener | None = None  # where the retrieval engine delivers a C-GET's instances

    async def admit(self, request: AssociateRequest, peer: str) -> AssociateReject | Admission:
        """The called AE title selects the span; its allowed_calling_aets select the callers."""
        called, calling = request.called_ae.strip(), request.calling_ae.strip()
        try:
            span = await self.spans.lookup(called)
        except KeyRefused as exc:
            LOG.error("association %s -> %s from %s rejected: %s", calling, called, peer, exc)
            return REJECT_KEY_REFUSED
        except SpansUnavailable as exc:
            LOG.warning("association %s -> %s rejected (transient): %s", calling, called, exc)
            return REJECT_NO_SPANS
        if span is None:
            LOG.info("association %s -> %s rejected: no span has that AE title", calling, called)
            return REJECT_CALLED_AE
        if not span.allows(calling):
            LOG.info("association %s -> %s rejected: caller not allowed on span %s", calling, called,
                     span.name)
            return REJECT_CALLING_AE
        return Admission(span, hops.is_spanner(request.user.implementation_class_uid))

    def _forwarded(self, request: Request, admission: Admission, identifier: Dataset) -> dict[str, str]:
        """The headers for the API; raises LoopDetected when the query already passed this deployment."""
        headers = origin(request)
        if not admission.from_spanner:
            return headers
        chain = hops.read_hops(identifier)
        if hops.is_loop(chain, self.instance_id):
            LOG.warning("request from %s refused: its hop chain %s already holds this deployment (%s)",
                        request.calling_ae, " > ".join(chain), self.instance_id)
            raise LoopDetected(hops.loop_comment(self.instance_id))
        if chain:
            headers[hops.HOPS_HEADER] = hops.header_value(chain)
        return headers

    async def echo(self, request: Request) -> int:
        return translate.SUCCESS

    async def find(self, request: Request) -> AsyncIterator[FindResult]:
        """POST /api/v1/queries, then one pending response per merged match, then the final status."""
        try:
            admission = _admission(request)
            span = admission.span
            model = translate.MODELS[request.sop_class]
            identifier = _identifier(request)
            query = translate.find_request(identifier, model, span)
            headers = self._forwarded(request, admission, identifier)
            answer = await first_or_cancel(self.client.query(query.body, headers), request.cancelled)
            encoder = translate.AnswerEncoder(query, span, request.implicit)
            pace = Pacer(PENDING_BURST, PENDING_PER_S)
            for match in answer["matches"]:
                await pace.next()
                yield FindResult(translate.PENDING, encoder.encode(match))
        except Abandoned:
            yield FindResult(translate.CANCEL)
            return
        except ScpError as exc:
            _log_failure("C-FIND", exc)
            failed, why = translate.failure(exc)
            yield FindResult(failed, comment=why)
            return
        code, note = translate.find_final(answer)
        if note:
            LOG.warning("C-FIND on span %s (query %s): %s", span.name, answer.get("query_id"), note)
        yield FindResult(code)

    async def move(self, request: Request) -> AsyncIterator[MoveResult]:
        """POST /api/v1/retrievals and relay its progress lines as pending responses, then the result."""
        progress: dict[str, Any] | None = None
        try:
            admission = _admission(request)
            model = translate.MODELS[request.sop_class]
            identifier = _identifier(request)
            body = translate.move_request(identifier, model, admission.span, request.move_destination)
            headers = self._forwarded(request, admission, identifier)
        except ScpError as exc:
            _log_failure("C-MOVE", exc)
            yield translate.move_failure(exc, None)
            return
        events = self.client.retrieve(body, headers)
        try:
            while True:
                item = await first_or_cancel(anext(events, None), request.cancelled)
                if item is None:
                    raise ApiFailed("the retrieval ended without a result")
                if item.get("event") == "progress":
                    progress = item
                    yield translate.move_pending(item)
                elif item.get("event") == "result":
                    final = translate.move_final(item, request.implicit)
                    if final.status != translate.SUCCESS:
                        LOG.info("C-MOVE %s: 0x%04X %s", item.get("retrieval_id"), final.status,
                                 item.get("error"))
                    yield final
                    return
        except Abandoned:
            yield translate.move_cancelled(progress, request.implicit)
        except ScpError as exc:
            _log_failure("C-MOVE", exc)
            yield translate.move_failure(exc, progress)
        finally:
            await events.aclose()


    async def get(self, request: Request) -> AsyncIterator[MoveResult]:
        """C-GET: a proxy retrieval delivered to the front's listener, each instance C-STOREd back to the
        requester as it arrives (scp.get)."""
        try:
            admission = _admission(request)
            model = translate.MODELS[request.sop_class]
            identifier = _identifier(request)
            body = translate.move_request(identifier, model, admission.span, request.calling_ae, "C-GET")
            headers = self._forwarded(request, admission, identifier)
            if self.listener is None:
                raise UnsupportedRequest("this front has no storage listener for C-GET")
        except ScpError as exc:
            _log_failure("C-GET", exc)
            yield translate.move_failure(exc, None)
            return
        if request.suboperations is None or not request.suboperations.storage_classes:
            # Nothing could be sent back: the archives are not asked at all.
            yield MoveResult(Status.SUBOPERATIONS_OUT_OF_RESOURCES, None, comment=translate.comment(
                "the requester accepted no storage context (propose them with the SCP role)"))
            return
        async for result in get.relay(request, self.client, self.listener, body, headers,
                                      admission.span.max_results):
            yield result


def _admission(request: Request) -> Admission:
    if not isinstance(request.state, Admission):
        raise ApiFailed("no span is bound to this association")
    return request.state


def _identifier(request: Request) -> Dataset:
    try:
        return decode(request.identifier or b"", request.implicit)
    except Exception as exc:  # bytes pydicom cannot decode
        raise InvalidIdentifier(f"cannot decode the identifier: {exc}") from exc


def _log_failure(what: str, exc: ScpError) -> None:
    if isinstance(exc, ApiRejected) and exc.http_status in (401, 403):
        LOG.error("%s failed: the API refused the DICOM front's API key (HTTP %d): %s; %s",
                  what, exc.http_status, exc, FRONT_KEY_HINT)
    else:
        LOG.info("%s failed: %s", what, exc)
