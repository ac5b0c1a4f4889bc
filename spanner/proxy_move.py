"""Proxy C-MOVE: the holders C-MOVE to the spanner's storage SCP (or, with ``RetrieveMethod.C_GET``, send
back by C-GET on the spanner's own association); each instance is forwarded to the destination by C-STORE as
soon as it is in the spool, so the destination never has to be known to an archive.

    async for event in proxy_move(scp, parts, Peer("VIEWER", "10.0.0.5", 104), calling_ae="SPANNER"):
        ...  # InstanceEvent per instance (forwarded or failed), PartEvent per holder when its C-MOVE ends

- ``parts``: one ``HolderPart`` per archive (a split study has several), each with the identifier of its
  C-MOVE and, where known, the SOP Instance UIDs it should send (the store SCP's fallback match uses them).
- All parts run at once; their instances are forwarded one at a time over one association to the
  destination, opened at the first instance. An instance whose SOP class or transfer syntax the open
  association has no context for makes the forwarder release it and open one proposing every combination
  seen so far. An association that breaks fails the instance being sent; the next one opens a new one.
- An instance is reported ``forwarded`` only after the destination answered its C-STORE with success or a
  warning; every other outcome is ``failed`` with the reason (the destination's status, a transfer syntax
  neither side can bridge, the spool full, the archive's own failed sub-operations).
- Failover: a part that ends with expected UIDs not received (archive down, C-MOVE failed or cut off) and
  has ``fallbacks`` asks the next holder for just those (``retry`` builds that identifier, e.g. IMAGE
  level with the study and series UIDs); its PartEvent names the node in ``failover_to``.
- Forwarded instances stay in the spool (a cache, bounded by its size and TTL); each is held while sent.
  A part whose expected UIDs are all in the spool, from the same node, is served from there without a
  C-MOVE (``PartEvent.from_spool``); ``Spool.drop_node`` forgets a node's instances when it changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace

from spanner.dicom_constants import EXPLICIT_VR_LE, IMPLICIT_VR_LE, STUDY_ROOT_MOVE, Status
from spanner.dimse.association import Association, Identifier, Response, connect
from spanner.dimse.errors import DimseError, NoAcceptedContext
from spanner.dimse.store import (
    StoreRequest,
    TransferSyntaxNotAccepted,
    get,
    get_contexts,
    receive_stores,
    storage_contexts,
    store,
)
from spanner.nodespec import RetrieveMethod
from spanner.spool import Spool, SpoolEntry
from spanner.store_scp import Expectation, StorageScp

LOG = logging.getLogger(__name__)
WARNING_STATUSES = frozenset({0x0001, 0xB000, 0xB007, 0xB006})  # C-STORE warnings (PS3.4 B.2.3)


@dataclass(frozen=True, slots=True)
class Peer:
    ae_title: str
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class Fallback:
    """Another holder of a part's instances, asked for what the part's own holder did not send."""

    node: str
    archive: Peer
    model: str = STUDY_ROOT_MOVE
    method: RetrieveMethod = RetrieveMethod.C_MOVE
    calling_ae: str | None = None  # the spanner's AE title toward this archive; None: collect()'s


@dataclass(frozen=True, slots=True)
class HolderPart:
    node: str
    archive: Peer
    identifier: Identifier
    expected: frozenset[str] = frozenset()
    model: str = STUDY_ROOT_MOVE  # the C-MOVE or, with RetrieveMethod.C_GET, the C-GET SOP class
    method: RetrieveMethod = RetrieveMethod.C_MOVE
    fallbacks: tuple[Fallback, ...] = ()  # in priority order
    retry: Callable[[frozenset[str]], Identifier] | None = None  # an identifier for just these SOP UIDs
    cache_key: str | None = None  # names the part in the spool's manifests (its level and keys)
    calling_ae: str | None = None  # the spanner's AE title toward this archive; None: collect()'s


@dataclass(frozen=True, slots=True)
class InstanceEvent:
    sop_instance_uid: str
    node: str
    forwarded: bool
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class PartEvent:
    """A holder's C-MOVE ended: its final status and counts, or the error that ended it."""

    node: str
    status: int | None
    counts: dict[str, int]
    error: str | None = None
    not_received: frozenset[str] = frozenset()  # expected UIDs that never arrived
    failover_to: str | None = None  # the node now asked for ``not_received``
    from_spool: bool = False  # every expected instance was in the spool: the archive was not asked


@dataclass
class _Forwarder:
    destination: Peer
    calling_ae: str
    dimse_timeout_s: float
    assoc: Association | None = None
    proposed: set[tuple[str, str]] = field(default_factory=set)
    msg_id: int = 0

    async def forward(self, entry: SpoolEntry) -> str | None:
        """None when the destination took the instance, else the reason it did not."""
        instance = entry.instance
        key = (instance.sop_class_uid, instance.transfer_syntax)
        try:
            if self.assoc is None or not self.assoc.is_open or key not in self.proposed:
                await self.close()
                self.proposed.add(key)
                self.assoc = await connect(self.destination.host, self.destination.port,
                                           calling_ae=self.calling_ae, called_ae=self.destination.ae_title,
                                           contexts=storage_contexts(sorted(self.proposed)),
                                           dimse_timeout_s=self.dimse_timeout_s)
            self.msg_id = self.msg_id % 0xFFFF + 1
            status = await store(self.assoc, instance, self.msg_id)
        except (NoAcceptedContext, TransferSyntaxNotAccepted) as exc:
            return exc.message
        except FileNotFoundError:  # evicted while it waited in the queue; store() had sent nothing yet
            return f"{instance.sop_instance_uid} left the spool before it was forwarded (spool too small)"
        except DimseError as exc:
            if self.assoc is not None:
                self.assoc.abort()
            return f"{self.destination.ae_title}: {exc.message}"
        if status == Status.SUCCESS or status in WARNING_STATUSES:
            return None
        return f"{self.destination.ae_title} answered C-STORE with status 0x{status:04X}"

    async def close(self) -> None:
        if self.assoc is not None:
            assoc, self.assoc = self.assoc, None
            with contextlib.suppress(DimseError, OSError):
                await assoc.release()


def _cached(spool: Spool, part: HolderPart) -> list[SpoolEntry] | None:
    """The part's instances when every expected one is in the spool from the same node, else None.

    A part that lists no UIDs is served from the spool when an earlier retrieval of the same part (its
    ``cache_key``) from the same node arrived whole and every instance of it is still there."""
    if not part.expected:
        return None if part.cache_key is None else spool.recall(part.cache_key, part.node)
    entries = [spool.get(uid) for uid in sorted(part.expected)]
    found = [e for e in entries if e is not None and e.node == part.node]
    return found if len(found) == len(entries) else None


async def _finish(part: HolderPart, expectation: Expectation, assoc: Association,
                  responses: AsyncIterator[Response]) -> PartEvent:
    """A C-MOVE's or C-GET's responses to the final one, then its PartEvent; the association ends here."""
    try:
        final = None
        async for response in responses:
            final = response
        assert final is not None
    except DimseError as exc:
        assoc.abort()
        await assoc.close()
        return PartEvent(part.node, None, {}, exc.message)
    except asyncio.CancelledError:  # the consumer left: stop the archive's sub-operations
        assoc.cancel(expectation.message_id, part.model)
        assoc.abort()
        await assoc.close()
        raise
    await assoc.release()
    return PartEvent(part.node, final.status, final.suboperations(), final.comment)


async def _move(part: HolderPart, expectation: Expectation, store_ae: str, calling_ae: str,
                dimse_timeout_s: float) -> PartEvent:
    try:
        assoc = await connect(part.archive.host, part.archive.port, calling_ae=calling_ae,
                              called_ae=part.archive.ae_title,
                              contexts=[(part.model, (EXPLICIT_VR_LE, IMPLICIT_VR_LE))],
                              dimse_timeout_s=dimse_timeout_s)
    except DimseError as exc:
        return PartEvent(part.node, None, {}, exc.message)
    return await _finish(part, expectation, assoc,
                         assoc.move(part.model, part.identifier, store_ae, expectation.message_id))


async def _get(part: HolderPart, expectation: Expectation, scp: StorageScp, calling_ae: str,
               dimse_timeout_s: float) -> PartEvent:
    """The part's instances by C-GET: the archive C-STOREs them back on this association, into the spool."""
    contexts, roles = get_contexts(part.model)
    try:
        assoc = await connect(part.archive.host, part.archive.port, calling_ae=calling_ae,
                              called_ae=part.archive.ae_title, contexts=contexts, roles=roles,
                              dimse_timeout_s=dimse_timeout_s)
    except DimseError as exc:
        return PartEvent(part.node, None, {}, exc.message)
    receive_stores(assoc, scp.spool.incoming, scp.max_instance_bytes)

    async def on_store(request: StoreRequest) -> int:
        return scp.take(expectation, request)

    return await _finish(part, expectation, assoc,
                         get(assoc, part.model, part.identifier, expectation.message_id, on_store))


async def collect(scp: StorageScp, parts: Sequence[HolderPart], *, calling_ae: str,
                 dimse_timeout_s: float = 30.0, deadline_s: float | None = None
                 ) -> AsyncGenerator[SpoolEntry | InstanceEvent | PartEvent, None]:
    """Run every part's C-MOVE to ``scp``; each instance as soon as it is in the spool, held (never evicted)
    until the consumer asks for the next event; InstanceEvents only for instances the spool refused; one
    PartEvent per holder, after that holder's instances.

    The sink is the consumer's: proxy_move forwards each entry by C-STORE, the DICOMweb front streams it
    over HTTP. ``deadline_s``: when it passes, the parts still running are cancelled (C-CANCEL, then
    A-ABORT) and each ends with a PartEvent saying so. Closing the iterator early cancels the same way.
    """
    # One queue for both: a C-MOVE's instances all arrive before its final response, so a part's
    # end is always behind its last instance.
    queue: asyncio.Queue[SpoolEntry | tuple[Expectation, PartEvent]] = asyncio.Queue()
    started: list[tuple[HolderPart, Expectation]] = []
    tasks: list[asyncio.Task[None]] = []

    async def run(part: HolderPart, expectation: Expectation) -> None:
        cached = _cached(scp.spool, part)
        ae = part.calling_ae or calling_ae  # each archive knows the spanner by the AE title its node names
        try:
            if cached is None and part.method is RetrieveMethod.C_GET:
                event = await _get(part, expectation, scp, ae, dimse_timeout_s)
            elif cached is None:
                event = await _move(part, expectation, scp.ae_title, ae, dimse_timeout_s)
            else:
                for entry in cached:
                    expectation.received.add(entry.sop_instance_uid)
                    queue.put_nowait(entry)
                counts = {"remaining": 0, "completed": len(cached), "failed": 0, "warning": 0}
                event = PartEvent(part.node, Status.SUCCESS, counts, from_spool=True)
        except Exception as exc:  # anything else still ends the part, rather than leave it to the deadline
            LOG.warning("the retrieval part from %s failed", part.node, exc_info=True)
            event = PartEvent(part.node, None, {}, f"{type(exc).__name__}: {exc}")
        # From now on this part takes no instance: one still on its way (an archive that died with
        # C-STOREs in flight) is refused and asked of the fallback, never reported after the part's end.
        scp.forget(expectation)
        queue.put_nowait((expectation, event))

    def start(part: HolderPart) -> None:
        expectation = scp.expect(part.archive.ae_title, part.node, part.expected, queue.put_nowait)
        started.append((part, expectation))
        tasks.append(asyncio.create_task(run(part, expectation)))

    for part in parts:
        start(part)
    running = len(tasks)
    ended: set[int] = set()  # indexes (in ``started``) of the parts whose end was reported
    deadline = None if deadline_s is None else asyncio.get_running_loop().time() + deadline_s
    try:
        while running:
            try:
                async with asyncio.timeout_at(deadline):
                    item = await queue.get()
            except TimeoutError:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                for index, (part, _) in enumerate(started):
                    if index not in ended:
                        yield PartEvent(part.node, None, {}, f"the retrieval's deadline of {deadline_s:g} s "
                                        f"passed; the C-MOVE was cancelled")
                return
            if isinstance(item, SpoolEntry):
                with scp.spool.holding(item):
                    yield item
                continue
            expectation, event = item
            running -= 1
            index = next(i for i, (_, e) in enumerate(started) if e is expectation)
            ended.add(index)
            part = started[index][0]
            scp.forget(expectation)
            for uid, why in expectation.failures.items():
                yield InstanceEvent(uid, expectation.node, False, why)
            # Failures of the spool would fail again elsewhere; what never came is asked of the next holder.
            missing = frozenset(expectation.expected - expectation.received - set(expectation.failures))
            whole = (event.status == Status.SUCCESS and event.error is None and not missing
                     and not expectation.failures and not event.counts.get("failed"))
            if whole and part.cache_key is not None and not event.from_spool and expectation.received:
                scp.spool.remember(part.cache_key, part.node, expectation.received)
            failover = None
            if missing and part.fallbacks and part.retry is not None:
                fallback = part.fallbacks[0]
                failover = fallback.node
                # A fallback sends only what was missing: it must not be remembered as the whole part.
                start(replace(part, node=fallback.node, archive=fallback.archive, model=fallback.model,
                              method=fallback.method, identifier=part.retry(missing), expected=missing,
                              fallbacks=part.fallbacks[1:], cache_key=None, calling_ae=fallback.calling_ae))
                running += 1
            yield replace(event, not_received=missing, failover_to=failover)
    finally:
        for task in tasks:
            task.cancel()
        for _, expectation in started:
            scp.forget(expectation)


async def proxy_move(scp: StorageScp, parts: Sequence[HolderPart], destination: Peer, *, calling_ae: str,
                     dimse_timeout_s: float = 30.0, deadline_s: float | None = None
                     ) -> AsyncIterator[InstanceEvent | PartEvent]:
    """Run every part's C-MOVE to ``scp`` and forward what arrives; events as they happen.

    ``deadline_s``: when it passes, the parts still running are cancelled (C-CANCEL, then A-ABORT) and
    each ends with a PartEvent saying so; the instance being forwarded at that moment still completes.
    """
    forwarder = _Forwarder(destination, calling_ae, dimse_timeout_s)
    events = collect(scp, parts, calling_ae=calling_ae, dimse_timeout_s=dimse_timeout_s,
                     deadline_s=deadline_s)
    try:
        async for item in events:
            if isinstance(item, SpoolEntry):
                reason = await forwarder.forward(item)  # held by collect() until the next event is asked
                yield InstanceEvent(item.sop_instance_uid, item.node, reason is None, reason)
            else:
                yield item
    finally:
        await events.aclose()
        await forwarder.close()
