"""WADO-RS (PS3.18 10.4) over the retrieval engine: the rules of a request, from its UIDs and Accept header
to the stream of items the store actor hands on, and its record in the audit trail.

- The UIDs are checked first (400 for a malformed one); the Accept header is negotiated before anything
  is fetched (406 for what this front never gives).
- The store actor is asked first whether its spool holds everything the request names (a study, series or
  instance delivered whole before and still there): then no archive is asked, not even the look-up.
- Otherwise one spanning IMAGE-level look-up over the span finds every instance and its holders
  (serve_app.retrieval); the instances are grouped per series and first holder, each group a part of
  the retrieval with the other holders as fallbacks (per instance, in priority order). No instance found:
  404.
- The first items are awaited before the answer starts, so that a single instance that cannot be served
  as asked (no such frame, a syntax it is not stored in) is still an HTTP error; from then on the items
  flow as they come, and a retrieval cut short (an archive gone mid-study) ends with what went wrong.
- Closing the stream early (the client went away) closes the store actor's session, which cancels the
  archives' C-MOVEs (C-CANCEL). Every request is recorded as a retrieval with channel ``dicomweb``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import functools
import logging
import re
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from ray.exceptions import RayActorError

from actors.wado_stream import Done, Item, Refusal, WadoKind, WadoPart, WadoRequest
from serve_app.services import Services
from serve_app.usecases.query import span_specs
from spanner import wado
from spanner.dicom_constants import (
    EXPLICIT_VR_LE,
    MEDIA_DICOM,
    MEDIA_DICOM_JSON,
    MEDIA_MULTIPART,
    MEDIA_OCTET_STREAM,
)
from spanner.nodespec import NodeSpec
from spanner.proxy_move import Peer
from spanner.query import Level, information_model_for
from spanner.schemas import Channel
from spanner.storage import Audit

LOG = logging.getLogger(__name__)
CHANNEL = Channel.DICOMWEB
DESTINATION = "WADO-RS"  # the destination_ae of its retrieval records
UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
MAX_FRAMES = 10_000


class Resource(enum.StrEnum):
    """What a WADO-RS URL names (PS3.18 10.4.1.1)."""

    INSTANCES = "instances"  # a study, series or instance as application/dicom parts
    METADATA = "metadata"
    FRAMES = "frames"
    BULK = "bulkdata"


@dataclass(frozen=True, slots=True)
class Target:
    span: str
    study: str
    series: str | None = None
    sop: str | None = None

    @property
    def level(self) -> Level:
        return Level.IMAGE if self.sop else Level.SERIES if self.series else Level.STUDY


def check_uid(name: str, value: str) -> str:
    """``value`` when it is a UID (PS3.5 9.1: digits and dots, at most 64, no leading zeros), else 400."""
    if len(value) > 64 or not UID.match(value):
        raise wado.WadoError("bad_request", f"{name} {value[:80]!r} is not a UID (digits and dots, at most "
                             "64 characters, no leading zeros)")
    return value


def target(span: str, study: str, series: str | None = None, sop: str | None = None) -> Target:
    return Target(span, check_uid("StudyInstanceUID", study),
                  None if series is None else check_uid("SeriesInstanceUID", series),
                  None if sop is None else check_uid("SOPInstanceUID", sop))


def frame_numbers(text: str) -> tuple[int, ...]:
    """A frame list (``1,3,5``): positive integers; 400 otherwise (PS3.18 10.4.1.1.2)."""
    numbers: list[int] = []
    for piece in text.split(","):
        piece = piece.strip()
        if not piece.isdigit() or int(piece) < 1:
            raise wado.WadoError("bad_request", f"frame list {text[:80]!r}: {piece[:20]!r} is not a frame "
                                 "number (positive integers, comma separated, the first frame is 1)")
        numbers.append(int(piece))
    if len(numbers) > MAX_FRAMES:
        raise wado.WadoError("bad_request", f"frame list: at most {MAX_FRAMES} frames per request")
    return tuple(numbers)


# -- Accept --------------------------------------------------------------------------------------------
def negotiate(resource: Resource, accept: str | None) -> tuple[str, ...]:
    """The transfer syntaxes acceptable to the client for ``resource``, best first ("*": as stored);
    406 (``not_acceptable``) when it accepts nothing this front sends."""
    if resource is Resource.METADATA:
        ranges = wado.parse_accept(accept or MEDIA_DICOM_JSON)
        takes = (MEDIA_DICOM_JSON, "application/json", "application/*", "*/*")
        if any(r.media_type in takes for r in ranges):
            return (wado.ANY_SYNTAX,)
        raise wado.WadoError("not_acceptable",
                             f"metadata is sent as {MEDIA_DICOM_JSON}; Accept was {accept!r}")
    part_type = MEDIA_DICOM if resource is Resource.INSTANCES else MEDIA_OCTET_STREAM
    # PS3.18 8.7.3.5.2: without a transfer-syntax parameter, application/octet-stream means Explicit VR
    # Little Endian; application/dicom is sent as stored here (nothing is transcoded).
    default = wado.ANY_SYNTAX if resource is Resource.INSTANCES else EXPLICIT_VR_LE
    syntaxes: list[str] = []
    for r in wado.parse_accept(accept or f'{MEDIA_MULTIPART}; type="{part_type}"'):
        inner = r.params.get("type", part_type).lower()
        if r.media_type in (MEDIA_MULTIPART, "multipart/*", "*/*") and inner in (part_type, "*/*") \
                and r.quality > 0:
            syntaxes.append(r.params.get("transfer-syntax", default))
    if not syntaxes:
        raise wado.WadoError("not_acceptable", f"this resource is sent as {MEDIA_MULTIPART}; "
                             f"type=\"{part_type}\"; Accept was {accept!r}")
    return tuple(dict.fromkeys(syntaxes))


# -- planning ------------------------------------------------------------------------------------------
def parts_of(study: str, found: list[tuple[str, str, list[NodeSpec]]], whole_series: bool = True
             ) -> tuple[WadoPart, ...]:
    """One part per series and first holder: SERIES level when that holder gives the whole series, else
    IMAGE level with the instances' UIDs; the holders every instance of the part shares are its fallbacks.
    ``whole_series`` False: ``found`` lists only the instances asked for (one instance's resources), so
    every part is IMAGE level: a SERIES-level move would bring, and serve, the rest of the series."""
    of_series: dict[str, set[str]] = {}
    groups: dict[tuple[str, str], list[tuple[str, list[NodeSpec]]]] = {}
    for series, sop, holders in found:
        of_series.setdefault(series, set()).add(sop)
        groups.setdefault((series, holders[0].name), []).append((sop, holders))
    parts: list[WadoPart] = []
    for (series, _), members in groups.items():
        first = members[0][1][0]
        sops = frozenset(sop for sop, _ in members)
        others = [h for h in members[0][1][1:] if all(h.name in {x.name for x in hs} for _, hs in members)]
        level = Level.SERIES if whole_series and sops == of_series[series] else Level.IMAGE
        model = information_model_for(level, first.query_models)
        if model is None:  # a node that only speaks a model without this level: its fallbacks may
            continue
        keys = {"StudyInstanceUID": study, "SeriesInstanceUID": series}
        if level is Level.IMAGE:
            keys["SOPInstanceUID"] = "\\".join(sorted(sops))
        parts.append(WadoPart(first.name, Peer(first.ae_title, first.host, first.port),
                              first.calling_ae_title, level, tuple(sorted(keys.items())), model,
                              first.dimse_timeout_s, sops,
                              tuple((h.name, Peer(h.ae_title, h.host, h.port), h.retrieve_method,
                                     h.calling_ae_title) for h in others),
                              first.retrieve_method))
    return tuple(parts)


# -- the stream ----------------------------------------------------------------------------------------
@dataclass
class Stream:
    """An open WADO-RS session of the store actor: the first items, then ``items()`` until its Done."""

    store: Any
    session: str
    first: list[Item]
    s: Services
    target: Target
    resource: Resource
    audit: Audit
    requester: str
    started: float = field(default_factory=time.monotonic)
    done: Done | None = None
    delivered: int = 0

    async def items(self) -> AsyncGenerator[Item, None]:
        """Every item of the session; closing early closes the session (C-CANCEL to the archives)."""
        status = "cancelled"
        try:
            batch = self.first
            while True:
                for item in batch:
                    if isinstance(item, Done):
                        self.done = item
                        status = "success" if item.complete else "warning" if item.delivered else "failed"
                        return
                    if isinstance(item, Refusal):  # only after other items: one of many left out
                        status = "failed"
                        return
                    yield item
                batch = await self.store.wado_pull.remote(self.session)
        finally:
            await asyncio.shield(self._finish(status))

    async def _finish(self, status: str) -> None:
        if status == "cancelled":
            with contextlib.suppress(Exception):
                await self.store.wado_close.remote(self.session)
        # Written by the replica's record writer after the answer has gone, like a query's record.
        await self.s.records.hand_over(functools.partial(self._record, status))

    def _record(self, status: str) -> None:
        done = self.done
        error = None
        if done is not None and not done.complete:
            error = describe(done)[:1000]
        elif status == "cancelled":
            error = "cancelled: the client went away"
        uids = {"StudyInstanceUID": self.target.study}
        if self.target.series:
            uids["SeriesInstanceUID"] = self.target.series
        if self.target.sop:
            uids["SOPInstanceUID"] = self.target.sop
        self.s.repo.record_retrieval(
            retrieval_id=uuid.uuid4().hex, span=self.target.span, level=self.target.level, uids=uids,
            destination_ae=DESTINATION, requester=self.requester, status=status, dimse_status=None,
            completed=done.delivered if done else 0, failed=len(done.missing) if done else 0, warning=0,
            parts=[{"resource": self.resource.value, "from_spool": bool(done and done.from_spool)}],
            elapsed_ms=round((time.monotonic() - self.started) * 1000, 2), error=error, audit=self.audit,
            emit=self.s.events_enabled)


def describe(done: Done) -> str:
    """What a partial retrieval lacks and why, in one line."""
    why = "; ".join(f"{node}: {error}" for node, error in done.failures[:5]) or "no holder sent them"
    return f"{len(done.missing)} instance(s) missing ({why})"


async def open_stream(s: Services, t: Target, resource: Resource, *, accept: str | None, base_url: str,
                      audit: Audit, requester: str, frames: tuple[int, ...] = (),
                      bulk_tag: int | None = None) -> Stream:
    """Negotiate, plan (or find it all in the spool), open the store actor's session and await its first
    items; WadoError for a request that cannot be served at all."""
    syntaxes = negotiate(resource, accept)
    known = s.store_if_known()
    store: Any = known if known is not None else await asyncio.to_thread(s.store)
    kind = {Resource.INSTANCES: WadoKind.INSTANCES, Resource.METADATA: WadoKind.METADATA,
            Resource.FRAMES: WadoKind.FRAMES, Resource.BULK: WadoKind.BULK}[resource]
    request = WadoRequest(kind, t.study, t.series, t.sop, deadline_s=s.settings.retrieve_timeout_s,
                          frames=frames, transfer_syntaxes=syntaxes, bulk_tag=bulk_tag, base_url=base_url)

    async def from_spool() -> tuple[str, list[Item]] | None:
        nonlocal store
        try:
            opened: tuple[str, list[Item]] | None = await store.wado_open.remote(request)
        except RayActorError:  # the store actor was restarted since this replica looked it up
            store = await asyncio.to_thread(s.store, True)
            opened = await store.wado_open.remote(request)
        return opened

    # The span's nodes (NotFound for an unknown span) and the spool's answer at once: a warm request
    # then waits for the slower of the two, not for both.
    spooled = asyncio.ensure_future(from_spool())
    try:
        nodes = await asyncio.to_thread(span_specs, s, t.span, None)
    except BaseException:
        opened = await spooled
        if opened is not None:
            await store.wado_close.remote(opened[0])
        raise
    opened = await spooled
    if opened is None:
        deadline = time.monotonic() + s.settings.retrieve_timeout_s
        keys = {"StudyInstanceUID": t.study}
        if t.series:
            keys["SeriesInstanceUID"] = t.series
        if t.sop:
            keys["SOPInstanceUID"] = t.sop
        found = await s.retriever.plan_instances(nodes, keys, deadline)
        if not found:
            what = f"instance {t.sop}" if t.sop else f"series {t.series}" if t.series else f"study {t.study}"
            raise wado.WadoError("not_found",
                                 f"{what} is held by no archive of span {t.span!r} that answered")
        parts = parts_of(t.study, found, whole_series=t.sop is None)
        members = tuple((se, sop) for se, sop, _ in found)
        request = dataclasses.replace(request, parts=parts, members=members)
        opened = await store.wado_open.remote(request)
        assert opened is not None
    session, first = opened
    if first and isinstance(first[0], Refusal):
        raise wado.WadoError(first[0].kind, first[0].message)
    stream = Stream(store, session, first, s, t, resource, audit, requester)
    if first and isinstance(first[0], Done) and not first[0].delivered and not first[0].complete:
        # Nothing came at all: no answer to stream, but the archives' failure (502), with their reasons;
        # C-MOVEs were asked for, so it is recorded.
        stream.done = first[0]
        await stream._finish("failed")
        raise wado.WadoError("upstream", f"no archive sent {t.level.value.lower()} "
                             f"{t.sop or t.series or t.study}: {describe(first[0])}")
    return stream


def audit_for(principal: str, client: str | None) -> Audit:
    return Audit(principal=principal, channel=CHANNEL, client=client)
