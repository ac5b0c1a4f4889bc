"""C-GET at the DICOM front: the spanner's retrieval engine sends each instance to the front's own storage
listener, and the front C-STOREs it back on the requester's association as it arrives.

    requester ──C-GET──▶ front ──POST /api/v1/retrievals {deliver_to: front listener}──▶ API
                           ▲                                                         │ store actor:
                           └──────────── C-STORE (called AE = this C-GET's token) ◀──┘ archives → spool

- ``GetListener``: one engine acceptor per front, on an ephemeral port of the front's address. Each C-GET
  opens an ``Inbox`` under a fresh random called AE title; an association to any other title is rejected,
  so instances of one C-GET never reach another. An instance is written to a temporary folder as it arrives
  (never whole in memory); the listener's C-STORE handler hands it to the C-GET and answers the store actor
  only once the requester has answered its own C-STORE, so at most one instance per C-GET is on disk and the
  store actor's pace follows the requester's. The file is deleted when the handler returns.
- ``relay``: the C-GET itself: the retrieval's NDJSON stream (progress, result) and the instances arrive on
  one queue; every instance relayed yields a pending response with the counts. The expected instances are
  asked for at the same time (an IMAGE level query through the API), for the Remaining count and the UIDs of
  instances that never arrived. A C-CANCEL closes the retrieval's HTTP request (the API C-CANCELs the
  archives), refuses what still comes, and ends with Cancel and the counts so far.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scp import translate
from scp.client import SpannerClient
from scp.errors import Abandoned, ApiFailed, ScpError
from spanner.dicom_constants import Status
from spanner.dimse.acceptor import Acceptor, AcceptorConfig, Handlers, MoveResult, Request
from spanner.dimse.errors import DimseError, NoAcceptedContext
from spanner.dimse.pdu import AssociateReject, AssociateRequest, RejectReason, RejectResult, RejectSource
from spanner.dimse.store import (
    STORAGE_CLASSES,
    STORE_TRANSFER_SYNTAXES,
    NotPart10,
    StoreRequest,
    TransferSyntaxNotAccepted,
    read_part10,
)

LOG = logging.getLogger(__name__)
TOKEN_PREFIX = "GET"
WARNING_STATUSES = frozenset({0x0001, 0xB000, 0xB006, 0xB007})  # C-STORE warnings (PS3.4 B.2.3)
_REJECT_UNKNOWN = AssociateReject(RejectResult.PERMANENT, RejectSource.SERVICE_USER,
                                  RejectReason.CALLED_AE_NOT_RECOGNIZED)
_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})


@dataclass(eq=False)
class Inbox:
    """One C-GET's share of the listener: its called AE title and the queue its instances arrive on."""

    ae_title: str
    queue: asyncio.Queue[Arrival | Event] = field(default_factory=asyncio.Queue)
    closed: bool = False


@dataclass(frozen=True, slots=True)
class Arrival:
    """An instance on disk at the listener; ``answer`` takes the C-STORE status for the store actor."""

    request: StoreRequest
    answer: asyncio.Future[int]


@dataclass(frozen=True, slots=True)
class Event:
    """A line of the retrieval's NDJSON stream, or the error that ended it."""

    line: Mapping[str, Any] | None
    error: ScpError | None = None


class GetListener:
    """The front's storage listener for C-GET; ``start`` before use, ``close`` after."""

    def __init__(self, ae_title: str, host: str, max_bytes: int, artim_s: float) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="spanner-front-get-"))
        self.host = "127.0.0.1" if host in _WILDCARD_HOSTS else host
        self._inboxes: dict[str, Inbox] = {}
        config = AcceptorConfig(ae_title, STORAGE_CLASSES, STORE_TRANSFER_SYNTAXES,
                                prefer_proposed_order=True, store_dir=str(self.folder),
                                store_max_bytes=max_bytes, artim_s=artim_s)
        self._acceptor = Acceptor(config, Handlers(store=self._store, admit=self._admit))
        self._bind = host

    @property
    def port(self) -> int:
        return self._acceptor.port

    async def start(self) -> int:
        return await self._acceptor.start(self._bind, 0)

    async def close(self) -> None:
        for inbox in self._inboxes.values():
            inbox.closed = True
        await self._acceptor.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    @contextlib.asynccontextmanager
    async def inbox(self) -> AsyncIterator[Inbox]:
        """A fresh inbox for one C-GET, closed (what still arrives is refused) when the block ends."""
        token = TOKEN_PREFIX + secrets.token_hex(6).upper()  # 15 characters: fits an AE title
        inbox = self._inboxes[token] = Inbox(token)
        try:
            yield inbox
        finally:
            inbox.closed = True
            self._inboxes.pop(token, None)
            while not inbox.queue.empty():  # an instance that came after the end: refuse it
                item = inbox.queue.get_nowait()
                if isinstance(item, Arrival) and not item.answer.done():
                    item.answer.set_result(Status.OUT_OF_RESOURCES)

    async def _admit(self, request: AssociateRequest, peer: str) -> AssociateReject | Inbox:
        inbox = self._inboxes.get(request.called_ae.strip())
        return _REJECT_UNKNOWN if inbox is None else inbox

    async def _store(self, request: StoreRequest) -> int:
        inbox = request.state
        if not isinstance(inbox, Inbox) or inbox.closed:
            return Status.OUT_OF_RESOURCES  # the C-GET has ended (cancelled, or its requester left)
        answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        inbox.queue.put_nowait(Arrival(request, answer))
        return await answer  # the file stays until the requester has taken it


@dataclass(slots=True)
class Counts:
    completed: int = 0
    warning: int = 0
    failed: set[str] = field(default_factory=set)  # SOP Instance UIDs
    refused_by_requester: int = 0  # no context, or the requester's association could not take it
    done: set[str] = field(default_factory=set)  # completed or warning
    archive_failed: int = 0  # failures reported by the retrieval without a UID the front saw
    expected: frozenset[str] | None = None
    expected_total: int = 0

    @property
    def failed_count(self) -> int:
        return max(len(self.failed), self.archive_failed)

    def remaining(self) -> int:
        if self.expected is not None:
            return len(self.expected - self.done - self.failed)
        return max(0, self.expected_total - len(self.done) - len(self.failed))

    def pending(self) -> MoveResult:
        return MoveResult(translate.PENDING, min(self.remaining(), 0xFFFF), self.completed, self.failed_count,
                          self.warning)


async def _relay_one(request: Request, arrival: Arrival, counts: Counts) -> None:
    """C-STORE one arrived instance to the requester; the answer to the store actor follows its outcome."""
    uid = arrival.request.sop_instance_uid

    def answer(status: int) -> None:
        # The store actor's association may have ended meanwhile (its C-STORE handler cancelled).
        if not arrival.answer.done():
            arrival.answer.set_result(status)

    try:
        instance = read_part10(arrival.request.path)
        status = await request.store(instance)
    except (NoAcceptedContext, TransferSyntaxNotAccepted) as exc:
        LOG.info("C-GET %s: %s", request.calling_ae, exc.message)
        counts.failed.add(uid)
        counts.refused_by_requester += 1
        no_class = isinstance(exc, NoAcceptedContext)
        answer(Status.SOP_CLASS_NOT_SUPPORTED if no_class else Status.UNABLE_TO_PROCESS)
        return
    except (NotPart10, FileNotFoundError) as exc:  # gone with a store association that ended: this one only
        counts.failed.add(uid)
        answer(Status.UNABLE_TO_PROCESS)
        LOG.warning("C-GET %s: instance %s: %s", request.calling_ae, uid, exc)
        return
    except BaseException:
        # The requester's association broke (or the C-GET is being cancelled): the store actor hears
        # out of resources; the error ends the C-GET.
        answer(Status.OUT_OF_RESOURCES)
        raise
    answer(status)
    if status == Status.SUCCESS:
        counts.completed += 1
        counts.done.add(uid)
    elif status in WARNING_STATUSES:
        counts.warning += 1
        counts.done.add(uid)
    else:
        counts.failed.add(uid)


async def _pump(client: SpannerClient, body: dict[str, Any], headers: dict[str, str], inbox: Inbox) -> None:
    """The retrieval's events onto the C-GET's queue, then its end (or the error that ended it)."""
    events = client.retrieve(body, headers)
    try:
        async for line in events:
            inbox.queue.put_nowait(Event(line))
        inbox.queue.put_nowait(Event(None, ApiFailed("the retrieval ended without a result")))
    except ScpError as exc:
        inbox.queue.put_nowait(Event(None, exc))
    finally:
        await events.aclose()


async def _expected(client: SpannerClient, query: dict[str, Any], headers: dict[str, str],
                    counts: Counts) -> None:
    """The instances the C-GET should deliver, for Remaining and the UIDs that never came (best effort)."""
    try:
        answer = await client.query(query, {**headers, "Cache-Control": "no-cache"})
    except ScpError as exc:
        LOG.info("C-GET: the expected instances could not be listed: %s", exc)
        return
    uids = {str(v) for m in answer["matches"]
            for v in (m.get("dataset", {}).get("00080018", {}).get("Value") or ())}
    counts.expected_total = int(answer.get("total") or len(uids))
    if len(uids) >= counts.expected_total:
        counts.expected = frozenset(uids)


def expected_query(body: Mapping[str, Any], limit: int) -> dict[str, Any]:
    """An IMAGE level query for the SOP Instance UIDs a retrieval body names."""
    uids: Mapping[str, Any] = body["uids"]
    return {"level": "IMAGE", "span": body["span"], "filters": dict(uids), "return_keys": ["SOPInstanceUID"],
            "limit": limit}


def final(counts: Counts, result: Mapping[str, Any], implicit: bool) -> MoveResult:
    """The C-GET's final response from the retrieval's result line and what the front relayed."""
    counts.failed.update(str(uid) for uid in result.get("failed_sop_instance_uids") or ())
    counts.archive_failed = max(counts.archive_failed, int(result.get("failed") or 0))
    if counts.expected is not None:
        counts.failed |= counts.expected - counts.done  # never arrived (the archive lost it)
    delivered = counts.completed + counts.warning
    failed = counts.failed_count
    clean = result.get("dimse_status") == Status.SUCCESS
    if failed == 0 and counts.warning == 0 and clean:
        return MoveResult(translate.SUCCESS, None, counts.completed, 0, 0)
    if failed or counts.warning or delivered:
        # (delivered, nothing known to have failed, and yet the retrieval not clean: an archive's part
        # ended badly without naming what it did not send; that is still no success)
        code = Status.SUBOPERATIONS_OUT_OF_RESOURCES if delivered == 0 else translate.MOVE_SUBOPS_WARNING
        why = str(result.get("error") or "") or None
        if counts.refused_by_requester and delivered == 0:
            why = "the requester accepted no storage context for the instances"
        return MoveResult(code, None, counts.completed, failed, counts.warning,
                          translate.failed_list(sorted(counts.failed), implicit),
                          translate.comment(why) if why and code != translate.MOVE_SUBOPS_WARNING else None)
    return translate.move_final(result, implicit)  # nothing to send: the retrieval's own failure


async def relay(request: Request, client: SpannerClient, listener: GetListener, body: dict[str, Any],
                headers: dict[str, str], query_limit: int) -> AsyncIterator[MoveResult]:
    """Run one C-GET: pending responses as instances are relayed, then the final response."""
    counts = Counts()
    async with listener.inbox() as inbox:
        body = {**body, "deliver_to": {"ae_title": inbox.ae_title, "host": listener.host,
                                       "port": listener.port}}
        pump = asyncio.create_task(_pump(client, body, headers, inbox))
        expect = asyncio.create_task(_expected(client, expected_query(body, query_limit), headers, counts))
        try:
            while True:
                item = await _next(inbox, request.cancelled)
                if isinstance(item, Arrival):
                    await _relay_one(request, item, counts)
                    if not expect.done():  # the first pending response has a Remaining count to give
                        await _settle(expect)
                    if request.cancelled.is_set():
                        raise Abandoned("the DICOM client cancelled the C-GET")
                    yield counts.pending()
                    continue
                if item.error is not None:
                    LOG.info("C-GET %s failed: %s", request.calling_ae, item.error)
                    yield _failure(item.error, counts)
                    return
                assert item.line is not None
                if item.line.get("event") == "progress":
                    counts.archive_failed = max(counts.archive_failed, int(item.line.get("failed") or 0))
                elif item.line.get("event") == "result":
                    await _settle(expect)
                    yield final(counts, item.line, request.implicit)
                    return
        except Abandoned:
            inbox.closed = True
            yield MoveResult(translate.CANCEL, counts.remaining(), counts.completed, counts.failed_count,
                             counts.warning, translate.failed_list(sorted(counts.failed), request.implicit))
        except DimseError as exc:  # the requester's association broke: nothing more can be answered
            LOG.info("C-GET %s: the requester's association ended: %s", request.calling_ae, exc.message)
            raise
        finally:
            inbox.closed = True
            for task in (pump, expect):
                task.cancel()
            await asyncio.gather(pump, expect, return_exceptions=True)


async def _next(inbox: Inbox, cancelled: asyncio.Event) -> Arrival | Event:
    """The next arrival or event; Abandoned once the requester has sent C-CANCEL."""
    if cancelled.is_set():
        raise Abandoned("the DICOM client cancelled the C-GET")
    got = asyncio.ensure_future(inbox.queue.get())
    waiter = asyncio.ensure_future(cancelled.wait())
    try:
        await asyncio.wait({got, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if got.done():
        item = got.result()
        if cancelled.is_set() and isinstance(item, Arrival):
            item.answer.set_result(Status.OUT_OF_RESOURCES)
            raise Abandoned("the DICOM client cancelled the C-GET")
        return item
    got.cancel()
    raise Abandoned("the DICOM client cancelled the C-GET")


async def _settle(expect: asyncio.Task[None]) -> None:
    """Let the expected-instances query finish (it is usually long done), but never wait on it long."""
    with contextlib.suppress(TimeoutError, asyncio.CancelledError):
        await asyncio.wait_for(asyncio.shield(expect), 2.0)


def _failure(exc: ScpError, counts: Counts) -> MoveResult:
    code, note = translate.failure(exc)
    return MoveResult(code, None, counts.completed, counts.failed_count, counts.warning, None, note)
