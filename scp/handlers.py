"""Thin pynetdicom event handlers: each turns an event into a call on the API and yields statuses.

What a status means is decided in scp.translate; how the API is reached in scp.client. A handler
waits in short polls so that a C-CANCEL, or a peer that aborted, abandons the HTTP request at once.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.association import Association

from scp import translate
from scp.client import SpannerClient
from scp.errors import Abandoned, ApiFailed, InvalidIdentifier, ScpError, SpansUnavailable
from scp.spans import SpanDirectory, SpanInfo

LOG = logging.getLogger(__name__)

Response = tuple[int | Dataset, Dataset | None]

# A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4
REJECT_CALLED_AE = (0x01, 0x01, 0x07)  # permanent, service-user, called AE title not recognised
REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # permanent, service-user, calling AE title not recognised
REJECT_NO_SPANS = (0x02, 0x03, 0x02)  # transient, service-provider (presentation), local limit exceeded


@dataclass
class Front:
    """What the handlers share: the span table, the API client, and each association's span."""

    spans: SpanDirectory
    client: SpannerClient
    _spans_of: weakref.WeakKeyDictionary[Association, SpanInfo] = field(
        default_factory=weakref.WeakKeyDictionary
    )
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def bind(self, assoc: Association, span: SpanInfo) -> None:
        with self._lock:
            self._spans_of[assoc] = span

    def span_of(self, assoc: Association) -> SpanInfo:
        with self._lock:
            span = self._spans_of.get(assoc)
        if span is None:
            raise ApiFailed("no span is bound to this association")
        return span


class StopWatch:
    """True once the peer cancelled or left; ``event.is_cancelled`` is true only once, so remember it."""

    def __init__(self, event: evt.Event) -> None:
        self._event = event
        self._seen = False

    def __call__(self) -> bool:
        if not self._seen:
            assoc = self._event.assoc
            self._seen = bool(self._event.is_cancelled) or assoc.is_aborted or not assoc.is_established
        return self._seen


SEND_BACKLOG = 8
"""Pending responses queued for sending at most. pynetdicom's reactor reads the socket only when it has
nothing left to send, so an unbounded backlog would leave a C-CANCEL unread until every match is out
(measured: 1,400 to 2,100 of 3,000 matches went after the cancel)."""


def _backlog_drained(assoc: Association, limit: int = SEND_BACKLOG) -> bool:
    """Wait until the reactor has at most ``limit`` messages to send; False if the association ended."""
    outgoing = assoc.dul.to_provider_queue
    while outgoing.qsize() > limit:
        if not assoc.is_established:
            return False
        time.sleep(0.0005)
    return True


def on_conn_open(event: evt.Event) -> None:
    """Turn Nagle off: without TCP_NODELAY each DIMSE message stalls about 40 ms (shared/GUIDE.md)."""
    sock = event.assoc.dul.socket
    if sock is not None and sock.socket is not None:
        sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def on_conn_close(event: evt.Event) -> None:
    """Free the slot of a connection that closed before its A-ASSOCIATE-RQ arrived.

    pynetdicom's acceptor otherwise waits the whole ACSE timeout for a request that cannot come
    any more, and each such half-open connection counts against maximum_associations. A None in
    the DUL's queue is what its own timeout produces, so the association ends the same way at once.
    """
    assoc = event.assoc
    if assoc.is_acceptor and assoc.requestor.primitive is None:
        queue: Any = assoc.dul.to_user_queue  # typed for primitives; its own timeout puts a None too
        queue.put(None)


def _reject(assoc: Association, reason: tuple[int, int, int]) -> None:
    assoc.acse.send_reject(*reason)
    assoc.kill()


def on_requested(event: evt.Event, front: Front) -> None:
    """The called AE title selects the span; its allowed_calling_aets select the callers."""
    request = event.assoc.requestor.primitive
    assert request is not None  # EVT_REQUESTED fires once the A-ASSOCIATE-RQ is in
    called, calling = str(request.called_ae_title).strip(), str(request.calling_ae_title).strip()
    try:
        span = front.spans.lookup(called)
    except SpansUnavailable as exc:
        LOG.warning("association %s -> %s rejected (transient): %s", calling, called, exc)
        _reject(event.assoc, REJECT_NO_SPANS)
        return
    if span is None:
        LOG.info("association %s -> %s rejected: no span has that AE title", calling, called)
        _reject(event.assoc, REJECT_CALLED_AE)
        return
    if not span.allows(calling):
        LOG.info("association %s -> %s rejected: caller not allowed on span %s", calling, called, span.name)
        _reject(event.assoc, REJECT_CALLING_AE)
        return
    front.bind(event.assoc, span)


def on_echo(event: evt.Event) -> int:
    return translate.SUCCESS


def origin(event: evt.Event) -> dict[str, str]:
    """Who is asking, for the API's audit trail: the calling AE title and its address."""
    requestor = event.assoc.requestor
    return {"X-Spanner-Calling-AE": str(requestor.ae_title).strip(), "X-Spanner-Peer": str(requestor.address)}


def _identifier(event: evt.Event) -> Dataset:
    try:
        identifier: Dataset = event.identifier
    except Exception as exc:  # bytes pydicom cannot decode
        raise InvalidIdentifier(f"cannot decode the identifier: {exc}") from exc
    return identifier


def on_find(event: evt.Event, front: Front) -> Iterator[Response]:
    """POST /api/v1/queries, then one pending response per merged match, then the final status."""
    stop = StopWatch(event)
    try:
        span = front.span_of(event.assoc)
        model = translate.MODELS[str(event.request.AffectedSOPClassUID)]
        request = translate.find_request(_identifier(event), model, span)
        answer = front.client.query(request.body, origin(event)).wait(stop)
        for match in answer["matches"]:
            if stop() or not _backlog_drained(event.assoc):
                raise Abandoned("C-CANCEL during the pending responses")
            yield translate.PENDING, translate.match_dataset(match, request, span)
    except Abandoned:
        yield translate.CANCEL, None
        return
    except ScpError as exc:
        LOG.info("C-FIND failed: %s", exc)
        yield translate.failure(exc), None
        return
    code, note = translate.find_final(answer)
    if note:
        LOG.warning("C-FIND on span %s (query %s): %s", span.name, answer.get("query_id"), note)
    yield code, None


def on_move(event: evt.Event, front: Front) -> Iterator[Response]:
    """POST /api/v1/retrievals and relay its progress lines as pending responses, then the result."""
    stop = StopWatch(event)
    progress: dict[str, object] | None = None
    try:
        span = front.span_of(event.assoc)
        model = translate.MODELS[str(event.request.AffectedSOPClassUID)]
        body = translate.move_request(_identifier(event), model, span, event.move_destination or "")
    except ScpError as exc:
        yield translate.move_failure(exc, None)
        return
    stream = front.client.retrieve(body, origin(event))
    try:
        while True:
            item = stream.next(stop)
            if item is None:
                raise ApiFailed("the retrieval ended without a result")
            if item.get("event") == "progress":
                progress = item
                yield translate.move_pending(item), None
            elif item.get("event") == "result":
                final = translate.move_final(item)
                code = final[0].Status
                if code != translate.SUCCESS:
                    LOG.info("C-MOVE %s: 0x%04X %s", item.get("retrieval_id"), code, item.get("error"))
                yield final
                return
    except Abandoned:
        yield translate.move_cancelled(progress)
    except ScpError as exc:
        LOG.info("C-MOVE failed: %s", exc)
        yield translate.move_failure(exc, progress)
    finally:
        stream.close()
