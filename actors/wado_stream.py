"""The HTTP sink of the retrieval engine, inside the store actor: WADO-RS sessions that move the holders'
instances into the spool (spanner.proxy_move.collect) and hand each one on, in chunks, as it arrives.

The ingress replica may run in another process or host than the store actor, so it never reads the spool
itself: it opens a session (``open``), then pulls items (``pull``) until a ``Done``, and closes it
(``close``; also when its client went away, which cancels the archives' C-MOVEs). A session's producer
runs ahead of the pulls by at most QUEUE_ITEMS items of at most CHUNK_BYTES each, so memory stays
bounded per session whatever the study's size; a session nobody pulls for IDLE_S is closed.

Items, in order:
- ``InstanceHead`` then the instance's bytes (``bytes`` chunks) for an instance retrieval, a frame, a bulk
  value; for metadata one ``str`` (the instance's DICOM JSON) per instance;
- ``Refusal`` instead of any data when a single instance cannot be served as asked (no such frame,
  an Accept it cannot satisfy);
- ``Done`` last: how many were delivered, the instances that never came and why.

The spool doubles as the cache: a session that delivered everything records which instances make up
the study, series or instance (``_Index``); while they all stay in the spool, the next request for it is
served from there without asking any archive (not even the look-up C-FIND), metadata included (the
metadata of each spooled instance is kept as JSON text beside it).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from actors.dimse import GET_MODELS, MOVE_MODELS, encoder
from spanner import wado
from spanner.dicom_constants import EXPLICIT_VR_LE, MEDIA_DICOM, Status
from spanner.dimse.association import Identifier
from spanner.dimse.store import convertible
from spanner.nodespec import RetrieveMethod
from spanner.proxy_move import Fallback, HolderPart, InstanceEvent, PartEvent, Peer, collect
from spanner.query import InformationModel, Level, MoveQuery
from spanner.spool import SpoolEntry
from spanner.store_scp import StorageScp

LOG = logging.getLogger(__name__)
QUEUE_ITEMS = 8
"""Items a session's producer may run ahead of the ingress's pulls."""
PULL_BYTES = 1 << 20
"""A pull returns items until about this many bytes (one round trip carries several small parts)."""
IDLE_S = 60.0
"""A session not pulled for this long is closed (its ingress died without closing it)."""


class WadoKind(enum.StrEnum):
    INSTANCES = "instances"
    METADATA = "metadata"
    FRAMES = "frames"
    BULK = "bulk"


@dataclass(frozen=True, slots=True)
class WadoPart:
    """One holder's share as the ingress planned it: the instances it holds and who else holds them."""

    node: str
    archive: Peer
    calling_ae: str
    level: Level
    keys: tuple[tuple[str, str], ...]
    model: InformationModel
    dimse_timeout_s: float
    expected: frozenset[str]
    # The other holders in priority order: node, archive, retrieve method, the spanner's AE title toward it.
    fallbacks: tuple[tuple[str, Peer, RetrieveMethod, str], ...] = ()
    method: RetrieveMethod = RetrieveMethod.C_MOVE


@dataclass(frozen=True, slots=True)
class WadoRequest:
    kind: WadoKind
    study: str
    series: str | None = None
    sop: str | None = None
    parts: tuple[WadoPart, ...] = ()  # empty: only from the spool, when it holds everything
    members: tuple[tuple[str, str], ...] = ()  # (series, SOP instance) of every instance the plan found
    deadline_s: float = 300.0
    frames: tuple[int, ...] = ()
    transfer_syntaxes: tuple[str, ...] = (wado.ANY_SYNTAX,)  # acceptable, best first; "*": as stored
    bulk_tag: int | None = None
    base_url: str = ""


@dataclass(frozen=True, slots=True)
class InstanceHead:
    sop_instance_uid: str
    series_instance_uid: str
    content_type: str  # with its transfer-syntax parameter
    size: int


@dataclass(frozen=True, slots=True)
class Refusal:
    kind: str  # as wado.WadoError.kind
    message: str


@dataclass(frozen=True, slots=True)
class Done:
    delivered: int
    missing: tuple[str, ...] = ()  # SOP Instance UIDs expected and never handed on
    failures: tuple[tuple[str, str], ...] = ()  # (node, what went wrong)
    from_spool: bool = False

    @property
    def complete(self) -> bool:
        return not self.missing and not self.failures


Item = InstanceHead | bytes | str | Refusal | Done


@dataclass
class _Index:
    """Which instances make up what was delivered whole: study -> series -> SOP Instance UIDs."""

    series: dict[str, dict[str, set[str]]] = field(default_factory=dict)
    whole_studies: set[str] = field(default_factory=set)
    series_of: dict[str, tuple[str, str]] = field(default_factory=dict)  # SOP -> (study, series)

    def record(self, request: WadoRequest) -> None:
        study = self.series.setdefault(request.study, {})
        for series, sop in request.members:
            study.setdefault(series, set()).add(sop)
            self.series_of[sop] = (request.study, series)
        if request.series is None and request.sop is None:
            self.whole_studies.add(request.study)

    def members(self, request: WadoRequest) -> list[tuple[str, str]] | None:
        """(series, SOP) of what the request names, when known whole; else None."""
        if request.sop is not None:
            where = self.series_of.get(request.sop)
            if where is None or where[0] != request.study or \
                    (request.series is not None and where[1] != request.series):
                return None
            return [(where[1], request.sop)]
        known = self.series.get(request.study, {})
        if request.series is not None:
            sops = known.get(request.series)
            return None if sops is None else [(request.series, s) for s in sorted(sops)]
        if request.study not in self.whole_studies:
            return None
        return [(series, sop) for series in sorted(known) for sop in sorted(known[series])]


def _identifier(level: Level, keys: tuple[tuple[str, str], ...], store_ae: str) -> Identifier:
    return encoder(MoveQuery(level, keys, store_ae).identifier())


class WadoSessions:
    """The WADO-RS sessions of one store actor, over its storage SCP and spool."""

    def __init__(self, scp: StorageScp) -> None:
        self._scp = scp
        self._index = _Index()
        self._metadata: dict[str, tuple[SpoolEntry, str]] = {}  # SOP -> (the entry it describes, JSON)
        self._frames: dict[str, tuple[SpoolEntry, wado.FrameTable]] = {}  # SOP -> (entry, frame table)
        self._sessions: dict[str, _Session] = {}
        self._ids = itertools.count(1)
        self._reaper: asyncio.Task[None] | None = None

    # -- the calls of the ingress ---------------------------------------------------------------------
    def open(self, request: WadoRequest, store_ae: str) -> str | None:
        """A session id; None when ``request`` has no parts and the spool does not hold it all."""
        members = list(request.members)
        if not request.parts:
            cached = self._index.members(request)
            if cached is None or any(self._scp.spool.get(sop) is None for _, sop in cached):
                return None
            members = cached
        session_id = f"wado-{next(self._ids)}"
        producer = self._produce(request, members, store_ae)
        self._sessions[session_id] = _Session(producer)
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._reap())
        return session_id

    async def pull(self, session_id: str) -> list[Item]:
        session = self._sessions.get(session_id)
        if session is None:
            return [Done(0, failures=(("spanner", "the session is gone (idle too long or closed)"),))]
        items = await session.pull()
        if items and isinstance(items[-1], Done | Refusal):
            await self.close(session_id)
        return items

    async def close(self, session_id: str) -> None:
        session = self._sessions.pop(session_id, None)
        if session is not None:
            await session.close()

    def stats(self) -> dict[str, int]:
        return {"sessions": len(self._sessions), "expectations": self._scp.active,
                "spooled": len(self._scp.spool), "refused": self._scp.refused}

    async def _reap(self) -> None:
        while self._sessions:
            await asyncio.sleep(IDLE_S / 4)
            now = time.monotonic()
            for session_id, session in list(self._sessions.items()):
                if now - session.pulled > IDLE_S:
                    LOG.warning("WADO-RS session %s not pulled for %.0f s: closed", session_id, IDLE_S)
                    await self.close(session_id)

    # -- producing --------------------------------------------------------------------------------------
    async def _produce(self, request: WadoRequest, members: list[tuple[str, str]], store_ae: str
                       ) -> AsyncGenerator[Item, None]:
        series_of = dict((sop, series) for series, sop in members)
        delivered = 0
        failures: list[tuple[str, str]] = []
        missing: set[str] = set()
        arrivals = self._arrivals(request, members, store_ae)
        try:
            async for item in arrivals:
                if isinstance(item, PartEvent):
                    if item.failover_to is None:  # else the fallback's own PartEvent tells
                        missing |= item.not_received
                        why = _failure(item)
                        if why is not None:
                            failures.append((item.node, why))
                    continue
                if isinstance(item, InstanceEvent):
                    failures.append((item.node, f"{item.sop_instance_uid}: {item.reason}"))
                    missing.add(item.sop_instance_uid)
                    continue
                series = series_of.get(item.sop_instance_uid, request.series or "")
                delivered += 1
                async for piece in self._serve(request, item, series):
                    if isinstance(piece, Refusal):
                        if request.sop is not None:  # the one instance asked for: the answer is the refusal
                            yield piece
                            return
                        delivered -= 1  # one of many: left out and said in the end
                        failures.append(("spanner", piece.message))
                        missing.add(item.sop_instance_uid)
                        break
                    yield piece
        finally:
            await arrivals.aclose()
        done = Done(delivered, tuple(sorted(missing)), tuple(failures), from_spool=not request.parts)
        if request.parts and done.complete and delivered == len(members):
            self._index.record(request)
        if request.sop is not None and delivered == 0 and done.complete:
            yield Refusal("not_found", f"instance {request.sop} did not come from any holder")
            return
        yield done

    async def _arrivals(self, request: WadoRequest, members: list[tuple[str, str]], store_ae: str
                        ) -> AsyncGenerator[SpoolEntry | InstanceEvent | PartEvent, None]:
        if not request.parts:
            for _, sop in members:
                entry = self._scp.spool.get(sop)
                if entry is None:  # evicted since open(): said as missing, like an archive that failed
                    yield PartEvent("spool", None, {}, f"{sop} left the spool", frozenset({sop}))
                    continue
                with self._scp.spool.holding(entry):
                    yield entry
            return
        holders = [self._holder(part, store_ae, request) for part in request.parts]
        events = collect(self._scp, holders, calling_ae=request.parts[0].calling_ae,
                         dimse_timeout_s=max(p.dimse_timeout_s for p in request.parts),
                         deadline_s=request.deadline_s)
        try:
            async for event in events:
                yield event
        finally:
            await events.aclose()

    def _holder(self, part: WadoPart, store_ae: str, request: WadoRequest) -> HolderPart:
        base = dict(part.keys)

        def retry(missing: frozenset[str]) -> Identifier:
            keys = {"StudyInstanceUID": request.study, "SOPInstanceUID": "\\".join(sorted(missing))}
            if "SeriesInstanceUID" in base:
                keys["SeriesInstanceUID"] = base["SeriesInstanceUID"]
            return _identifier(Level.IMAGE, tuple(sorted(keys.items())), store_ae)

        def model(method: RetrieveMethod) -> str:
            return (GET_MODELS if method is RetrieveMethod.C_GET else MOVE_MODELS)[part.model]

        return HolderPart(part.node, part.archive, _identifier(part.level, part.keys, store_ae),
                          part.expected, model=model(part.method), method=part.method,
                          fallbacks=tuple(Fallback(node, peer, model(method), method, calling_ae)
                                          for node, peer, method, calling_ae in part.fallbacks),
                          retry=retry, calling_ae=part.calling_ae)

    async def _serve(self, request: WadoRequest, entry: SpoolEntry, series: str) -> AsyncIterator[Item]:
        instance = entry.instance
        if request.kind is WadoKind.METADATA:
            yield self._metadata_of(entry, request.study, series).replace(wado.BASE_PLACEHOLDER,
                                                                           request.base_url)
            return
        if request.kind is WadoKind.INSTANCES:
            wanted = request.transfer_syntaxes
            if wado.ANY_SYNTAX not in wanted and instance.transfer_syntax not in wanted:
                if EXPLICIT_VR_LE not in wanted:
                    yield Refusal("not_acceptable", f"instance {entry.sop_instance_uid} is stored in "
                                  f"{instance.transfer_syntax}; this front sends it as stored or in Explicit "
                                  f"VR Little Endian, not {', '.join(wanted)}")
                    return
                try:  # decoded off the event loop: the store actor serves every retrieval
                    data = await asyncio.to_thread(wado.uncompressed_part10, instance)
                except wado.WadoError as exc:
                    yield Refusal(exc.kind, exc.message)
                    return
                yield InstanceHead(entry.sop_instance_uid, series,
                                   f"{MEDIA_DICOM}; transfer-syntax={EXPLICIT_VR_LE}", len(data))
                yield data
                return
            yield InstanceHead(entry.sop_instance_uid, series,
                               f"{MEDIA_DICOM}; transfer-syntax={instance.transfer_syntax}", instance.size)
            for chunk in wado.read_file(instance):
                yield chunk
            return
        try:
            if request.kind is WadoKind.FRAMES:
                syntax, decode = frame_syntax(instance.transfer_syntax, request.transfer_syntaxes)
                if decode:  # numbers checked against the frame table first (400 beyond it)
                    wado.frame_ranges(self._frames_of(entry), request.frames, entry.sop_instance_uid)
            pieces = [] if request.kind is WadoKind.FRAMES and decode else list(self._ranges(request, entry))
        except wado.WadoError as exc:
            yield Refusal(exc.kind, exc.message)
            return
        if request.kind is WadoKind.FRAMES and decode:
            for number in request.frames:
                try:
                    data = await asyncio.to_thread(wado.decoded_frame, instance, number)
                except wado.WadoError as exc:
                    yield Refusal(exc.kind, exc.message)
                    return
                yield InstanceHead(entry.sop_instance_uid, series,
                                   f"application/octet-stream; transfer-syntax={syntax}", len(data))
                yield data
            return
        for content_type, ranges in pieces:
            yield InstanceHead(entry.sop_instance_uid, series, content_type, sum(n for _, n in ranges))
            for chunk in wado.read_ranges(instance.path, ranges):
                yield chunk

    def _ranges(self, request: WadoRequest, entry: SpoolEntry) -> Iterator[tuple[str, tuple[tuple[int, int],
                                                                                          ...]]]:
        instance = entry.instance
        if request.kind is WadoKind.BULK:
            assert request.bulk_tag is not None
            yield "application/octet-stream", wado.bulk_ranges(instance, request.bulk_tag)
            return
        syntax, _ = frame_syntax(instance.transfer_syntax, request.transfer_syntaxes)
        for ranges in wado.frame_ranges(self._frames_of(entry), request.frames, entry.sop_instance_uid):
            yield f"application/octet-stream; transfer-syntax={syntax}", ranges

    def _frames_of(self, entry: SpoolEntry) -> wado.FrameTable:
        """The instance's frame table, kept beside its spool entry like its metadata."""
        cached = self._frames.get(entry.sop_instance_uid)
        if cached is not None and cached[0] is entry:
            return cached[1]
        table = wado.frame_table(entry.instance)
        self._frames[entry.sop_instance_uid] = (entry, table)
        self._prune(self._frames)
        return table

    def _prune(self, kept: dict[str, tuple[SpoolEntry, Any]]) -> None:
        """Forget what describes instances that left the spool, once there is more of it than spooled."""
        if len(kept) > 2 * len(self._scp.spool) + 64:
            for sop in [s for s, (e, _) in kept.items() if self._scp.spool.get(s) is not e]:
                del kept[sop]

    def _metadata_of(self, entry: SpoolEntry, study: str, series: str) -> str:
        cached = self._metadata.get(entry.sop_instance_uid)
        if cached is not None and cached[0] is entry:
            return cached[1]
        text = wado.metadata_json(entry.instance, study, series)
        self._metadata[entry.sop_instance_uid] = (entry, text)
        self._prune(self._metadata)
        return text


def _failure(event: PartEvent) -> str | None:
    """What went wrong with a holder's C-MOVE, or None when it ended well and sent what was expected."""
    if event.error is not None:
        return event.error
    if event.status not in (Status.SUCCESS, None) or event.not_received:
        status = "no final status" if event.status is None else f"final status 0x{event.status:04X}"
        return f"C-MOVE ended with {status}; {len(event.not_received)} instance(s) not received"
    return None


def frame_syntax(stored: str, acceptable: tuple[str, ...]) -> tuple[str, bool]:
    """The transfer syntax frames of an instance stored in ``stored`` go out in, and whether they must be
    decoded for it; a WadoError (406) when no acceptable one can be given.

    Uncompressed frames are the same bytes in Explicit and Implicit VR Little Endian, and go out labelled
    Explicit VR Little Endian (the default of application/octet-stream, PS3.18 8.7.3.5.2); compressed
    frames go out as stored for ``*`` or their own syntax, and decoded (pydicom, pylibjpeg) for Explicit VR
    Little Endian, in the client's order of preference.
    """
    for wanted in acceptable:
        if wanted == wado.ANY_SYNTAX:
            return (EXPLICIT_VR_LE if stored in wado.UNCOMPRESSED else stored), False
        if wanted == stored or (wanted == EXPLICIT_VR_LE and stored in wado.UNCOMPRESSED):
            return wanted, False
        if wanted == EXPLICIT_VR_LE and convertible(stored):
            return EXPLICIT_VR_LE, True
    raise wado.WadoError("not_acceptable", f"the frames are stored in {stored}; this front gives them as "
                         f"stored or decoded to Explicit VR Little Endian, not {', '.join(acceptable)} (ask "
                         "for transfer-syntax=* or the stored one)")


class _Session:
    """A producer task feeding a bounded queue, pulled by the ingress."""

    def __init__(self, producer: AsyncGenerator[Item, None]) -> None:
        self._queue: asyncio.Queue[Item | BaseException] = asyncio.Queue(QUEUE_ITEMS)
        self._producer = producer
        self._task = asyncio.create_task(self._run())
        self.pulled = time.monotonic()

    async def _run(self) -> None:
        try:
            async for item in self._producer:
                await self._queue.put(item)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the ingress gets it as the session's end, not a hang
            LOG.exception("WADO-RS session failed")
            await self._queue.put(Done(0, failures=(("spanner", f"{type(exc).__name__}: {exc}"),)))
        finally:
            with contextlib.suppress(RuntimeError):
                await self._producer.aclose()

    async def pull(self) -> list[Item]:
        self.pulled = time.monotonic()
        first = await self._queue.get()
        assert not isinstance(first, BaseException)
        items: list[Item] = [first]
        size = len(first) if isinstance(first, bytes | str) else 0
        idle = 0
        while size < PULL_BYTES and not isinstance(items[-1], Done | Refusal):
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                # The producer may be a step from its next item (the end, read from a file already open):
                # let it run a few times before answering, which saves the ingress a round trip.
                idle += 1
                if idle > 3:
                    break
                await asyncio.sleep(0)
                continue
            assert not isinstance(item, BaseException)
            items.append(item)
            size += len(item) if isinstance(item, bytes | str) else 0
        self.pulled = time.monotonic()
        return items

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
