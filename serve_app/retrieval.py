"""Retrieval: find which archives hold the objects, then have each holder's actor C-MOVE its part.

In proxy mode (``retrieve_proxy``) each part's holder C-MOVEs to the spanner's own storage SCP (the
store actor, actors.store_service), which forwards every instance to the destination as it arrives;
a part counts as completed only the instances the destination took.

A study split across archives is moved part by part (one SERIES-level C-MOVE per series, from the
archive that holds it); a study one archive holds whole goes in one STUDY-level C-MOVE. When a holder
fails, the next holder of the same objects (by node priority) is tried.

Finding the holders asks for many UIDs at once: a list of UIDs is one spanning C-FIND (UID list matching,
PS3.4 C.2.2.2.2) per batch of ``LOOKUP_BATCH``, a few batches at a time, and the whole retrieval, the
look-ups included, keeps one deadline.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from actors.store_service import ProxyPart, StoreHandle
from serve_app.coordinator import Coordinator
from serve_app.plan import QueryPlan
from spanner.dicom_constants import (
    PATIENT_ID,
    SERIES_INSTANCE_UID,
    SOP_INSTANCE_UID,
    STUDY_INSTANCE_UID,
    Status,
)
from spanner.nodespec import NodeSpec
from spanner.outcome import OutcomeStatus
from spanner.proxy_move import InstanceEvent, PartEvent, Peer
from spanner.query import Level, MoveQuery, NodeQuery, information_model_for
from spanner.schemas import Dedup, FailureStrategy

# C-MOVE final statuses (PS3.4 C.4.2.1.5)
SUCCESS = Status.SUCCESS
WARNING_FAILURES = Status.SUBOPERATIONS_FAILED
DESTINATION_UNKNOWN = Status.MOVE_DESTINATION_UNKNOWN
UNABLE = Status.UNABLE_TO_PROCESS
# DICOM JSON keys (tag as 8 hex digits) of what a holder's match is read for
TAG = {
    "StudyInstanceUID": f"{STUDY_INSTANCE_UID:08X}",
    "SeriesInstanceUID": f"{SERIES_INSTANCE_UID:08X}",
    "SOPInstanceUID": f"{SOP_INSTANCE_UID:08X}",
    "PatientID": f"{PATIENT_ID:08X}",
}
LOG = logging.getLogger(__name__)
Emit = Callable[[dict[str, Any]], Awaitable[None]]
LOOKUP_BATCH = 100
"""UIDs per look-up C-FIND: one identifier stays a few kilobytes, which every archive accepts."""
LOOKUP_CONCURRENCY = 4
"""Look-up batches in flight at once: the node actors' association pools bound the rest anyway."""
PROGRESS_INTERVAL_S = 0.1
"""Proxy mode: at most one progress line per this many seconds, and one at the end of each part."""


@dataclass(frozen=True, slots=True)
class Instance:
    """One instance of a part (proxy mode): its series and the nodes that hold it."""

    series: str
    holders: frozenset[str]


@dataclass(slots=True)
class Part:
    """One C-MOVE to run: its level and unique keys, and the nodes that hold it, best first."""

    level: Level
    keys: dict[str, str]
    holders: list[NodeSpec]
    counts: dict[str, int] = field(
        default_factory=lambda: {"remaining": 0, "completed": 0, "failed": 0, "warning": 0}
    )
    failed_uids: list[str] = field(default_factory=list)
    tried: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False
    series: tuple[str, ...] = ()  # a STUDY-level part: the series it covers
    instances: dict[str, Instance] = field(default_factory=dict)  # proxy mode: SOP Instance UID -> where

    def summary(self) -> dict[str, Any]:
        return {
            "level": self.level.value,
            "keys": self.keys,
            "holders": [h.name for h in self.holders],
            "done": self.done,
            **self.counts,
            "tried": self.tried,
        }


@dataclass(slots=True)
class RetrievalResult:
    status: str
    dimse_status: int
    counts: dict[str, int]
    failed_uids: list[str]
    parts: list[Part]
    error: str | None


def _value(match: dict[str, Any], keyword: str) -> str | None:
    element = match["dataset"].get(TAG[keyword])
    values = element.get("Value") if element else None
    return str(values[0]) if values else None


class Retriever:
    def __init__(self, coordinator: Coordinator, lookup_timeout_s: float) -> None:
        self._coordinator = coordinator
        self._lookup_timeout_s = lookup_timeout_s

    # -- who holds what -------------------------------------------------------------------------------
    async def _lookup(
        self, nodes: list[NodeSpec], level: Level, filters: dict[str, str], deadline: float,
        hops: tuple[str, ...] = (),
    ) -> list[dict[str, Any]]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return []
        plan = QueryPlan(
            query=NodeQuery(level, filters, hops=hops),
            span="",
            nodes=tuple(nodes),
            timeout_s=min(self._lookup_timeout_s, remaining),
            failure_strategy=FailureStrategy.BEST_EFFORT,
            minimum_nodes=1,
            dedup=Dedup.MERGE_ALL,
            limit=100_000,
            offset=0,
        )
        result = await self._coordinator.run(plan)
        return result.matches  # type: ignore[return-value]

    async def _lookup_batched(self, nodes: list[NodeSpec], level: Level, key: str, uids: list[str],
                              narrow: dict[str, str], deadline: float, hops: tuple[str, ...] = ()
                              ) -> list[dict[str, Any]]:
        """Matches of ``key`` in ``uids`` (with the ``narrow`` filters), LOOKUP_BATCH UIDs per C-FIND."""
        unique = list(dict.fromkeys(uids))
        batches = [unique[i:i + LOOKUP_BATCH] for i in range(0, len(unique), LOOKUP_BATCH)]
        gate = asyncio.Semaphore(LOOKUP_CONCURRENCY)

        async def one(batch: list[str]) -> list[dict[str, Any]]:
            async with gate:
                return await self._lookup(nodes, level, {key: "\\".join(batch), **narrow}, deadline, hops)

        answers = await asyncio.gather(*(one(batch) for batch in batches))
        return [match for answer in answers for match in answer]

    async def plan(self, nodes: list[NodeSpec], level: Level, uids: dict[str, list[str]],
                   deadline: float | None = None, hops: tuple[str, ...] = ()) -> list[Part]:
        """The parts to move; the look-ups end by ``deadline`` (monotonic; default: the look-up timeout).
        ``hops``: the dicom-spanner deployments the retrieval already passed (spanner.hops)."""
        by_name = {n.name: n for n in nodes}
        if deadline is None:
            deadline = time.monotonic() + self._lookup_timeout_s
        if level is Level.STUDY:
            # Always the whole span: a holder list remembered from an earlier answer may have gone
            # stale, and a missed holder would silently leave part of a split study behind.
            studies = uids["StudyInstanceUID"]
            series = await self._lookup_batched(nodes, Level.SERIES, "StudyInstanceUID", studies, {},
                                                deadline, hops)
            of_study: dict[str, list[dict[str, Any]]] = {}
            for match in series:
                of_study.setdefault(_value(match, "StudyInstanceUID") or "", []).append(match)
            parts: list[Part] = []
            for study in dict.fromkeys(studies):
                parts.extend(self._study_parts(study, of_study.get(study, []), by_name))
            return parts
        if level is Level.SERIES:
            narrow = {"StudyInstanceUID": uids["StudyInstanceUID"][0]} if uids.get("StudyInstanceUID") else {}
            matches = await self._lookup_batched(nodes, Level.SERIES, "SeriesInstanceUID",
                                                 uids["SeriesInstanceUID"], narrow, deadline, hops)
            return [
                Part(
                    Level.SERIES,
                    {
                        "StudyInstanceUID": _value(m, "StudyInstanceUID") or "",
                        "SeriesInstanceUID": _value(m, "SeriesInstanceUID") or "",
                    },
                    [by_name[n] for n in m["nodes"]],
                )
                for m in matches
            ]
        narrow = {key: uids[key][0] for key in ("StudyInstanceUID", "SeriesInstanceUID") if uids.get(key)}
        matches = await self._lookup_batched(nodes, Level.IMAGE, "SOPInstanceUID", uids["SOPInstanceUID"],
                                             narrow, deadline, hops)
        groups: dict[tuple[str, str, tuple[str, ...]], list[str]] = {}
        for m in matches:
            group = (
                _value(m, "StudyInstanceUID") or "",
                _value(m, "SeriesInstanceUID") or "",
                tuple(m["nodes"]),
            )
            groups.setdefault(group, []).append(_value(m, "SOPInstanceUID") or "")
        return [
            Part(
                Level.IMAGE,
                {"StudyInstanceUID": study, "SeriesInstanceUID": series, "SOPInstanceUID": "\\".join(sops)},
                [by_name[n] for n in holders],
            )
            for (study, series, holders), sops in groups.items()
        ]

    async def plan_instances(self, nodes: list[NodeSpec], keys: dict[str, str], deadline: float
                             ) -> list[tuple[str, str, list[NodeSpec]]]:
        """(series, SOP instance, holders best first) of every instance under ``keys`` (the study, and
        maybe the series and the instance): one spanning IMAGE-level look-up over the whole span, so a
        study split across archives is found whole and each instance knows every holder."""
        by_name = {n.name: n for n in nodes}
        filters = {"SeriesInstanceUID": "", "SOPInstanceUID": "", **keys}
        found: list[tuple[str, str, list[NodeSpec]]] = []
        for m in await self._lookup(nodes, Level.IMAGE, filters, deadline):
            holders = sorted((by_name[n] for n in m["nodes"] if n in by_name),
                             key=lambda n: (n.priority, n.name))
            series, sop = _value(m, "SeriesInstanceUID"), _value(m, "SOPInstanceUID")
            if series and sop and holders:
                found.append((series, sop, holders))
        return found

    @staticmethod
    def _study_parts(study: str, series: list[dict[str, Any]], by_name: dict[str, NodeSpec]) -> list[Part]:
        """One STUDY-level part when some node holds every series, else one part per series."""
        if not series:
            return []
        holders_of = {(_value(m, "SeriesInstanceUID") or ""): list(m["nodes"]) for m in series}
        whole = [n for n in series[0]["nodes"] if all(n in h for h in holders_of.values())]
        whole.sort(key=lambda n: (by_name[n].priority, n))
        if whole:
            return [Part(Level.STUDY, {"StudyInstanceUID": study}, [by_name[n] for n in whole],
                         series=tuple(sorted(holders_of)))]
        return [
            Part(
                Level.SERIES,
                {"StudyInstanceUID": study, "SeriesInstanceUID": uid},
                [by_name[n] for n in holders],
            )
            for uid, holders in sorted(holders_of.items())
        ]

    # -- moving ---------------------------------------------------------------------------------------
    async def retrieve(self, nodes: list[NodeSpec], level: Level, uids: dict[str, list[str]],
                       destination: str, timeout_s: float, emit: Emit, hops: tuple[str, ...] = ()
                       ) -> RetrievalResult:
        """Find the holders and move, the whole within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        parts = await self.plan(nodes, level, uids, deadline, hops)
        return await self._run(parts, destination, deadline, emit, hops)

    async def _run(self, parts: list[Part], destination: str, deadline: float, emit: Emit,
                   hops: tuple[str, ...] = ()) -> RetrievalResult:
        async def report() -> None:
            await emit({"event": "progress", **_totals(parts)})

        await asyncio.gather(*(self._move_part(p, destination, deadline, report, hops) for p in parts))
        return _result(parts)

    async def _move_part(
        self, part: Part, destination: str, deadline: float, report: Callable[[], Awaitable[None]],
        hops: tuple[str, ...] = (),
    ) -> None:
        keys = tuple(sorted(part.keys.items()))
        for spec in part.holders:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                part.tried.append(
                    {"node": spec.name, "status": "timeout", "error": "retrieval deadline passed"}
                )
                return
            handle = await self._coordinator.handle(spec)
            stream = handle.move.options(num_returns="streaming").remote(
                MoveQuery(part.level, keys, destination, hops), remaining
            )
            final: dict[str, Any] = {}
            try:
                async for ref in stream:
                    event: dict[str, Any] = await ref
                    if event["event"] == "progress":
                        part.counts = {k: int(event[k]) for k in part.counts}
                        await report()
                    else:
                        final = event
            except asyncio.CancelledError:
                import ray

                ray.cancel(stream)
                raise
            part.tried.append(
                {
                    k: final.get(k)
                    for k in ("node", "status", "dimse_status", "error", "completed", "failed", "warning")
                }
            )
            if final.get("status") == "ok":
                part.counts = {k: int(final.get(k) or 0) for k in part.counts} | {"remaining": 0}
                part.failed_uids = list(final.get("failed_uids") or [])
                part.done = True
                await report()
                return
            part.counts = dict.fromkeys(part.counts, 0)  # the next holder starts the part afresh

    # -- proxy mode -----------------------------------------------------------------------------------
    async def retrieve_proxy(self, nodes: list[NodeSpec], level: Level, uids: dict[str, list[str]],
                             destination: Peer, store: StoreHandle, timeout_s: float,
                             emit: Emit) -> RetrievalResult:
        """Find the holders and the instances of each part, then have the store actor fetch and forward
        each part, within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        parts = await self.plan(nodes, level, uids, deadline)
        # The instances are needed only once a first holder has ended: listing them while it already
        # sends keeps the look-up off the way to the first instance.
        listing = asyncio.ensure_future(self._list_instances(parts, deadline))

        last = [0.0]

        async def report(final: bool = False) -> None:
            # A progress line per instance costs the ingress, Serve's proxy and the DICOM front about
            # 3 ms of CPU each; a few per second say as much to a person or a C-MOVE client.
            now = time.monotonic()
            if final or now - last[0] >= PROGRESS_INTERVAL_S:
                last[0] = now
                await emit({"event": "progress", **_totals(parts)})

        try:
            await asyncio.gather(*(self._proxy_part(p, destination, store, deadline, report, listing)
                                   for p in parts))
        finally:
            listing.cancel()
        return _result(parts)

    async def _list_instances(self, parts: list[Part], deadline: float) -> None:
        """Fill ``Part.instances``: one IMAGE-level look-up per series, over the part's holders only.

        Knowing a part's instances is what lets a holder that fails midway be replaced for just what it
        did not send, and what names the instances that never came. A look-up that finds nothing leaves
        the part as it was (moved whole, replaced only when nothing of it arrived)."""
        gate = asyncio.Semaphore(LOOKUP_CONCURRENCY)

        async def one(part: Part, study: str, series: str) -> None:
            async with gate:
                keys = {"StudyInstanceUID": study, "SeriesInstanceUID": series}
                try:
                    matches = await self._lookup(part.holders, Level.IMAGE, keys, deadline)
                except Exception:  # the part is then moved as without its list, never failed for it
                    LOG.warning("listing the instances of series %s failed", series, exc_info=True)
                    return
            for m in matches:
                sop = _value(m, "SOPInstanceUID")
                if sop:
                    part.instances[sop] = Instance(series, frozenset(m["nodes"]))

        jobs: list[Awaitable[None]] = []
        for part in parts:
            study = part.keys["StudyInstanceUID"]
            if part.level is Level.IMAGE:
                holders = frozenset(h.name for h in part.holders)
                part.instances = {sop: Instance(part.keys["SeriesInstanceUID"], holders)
                                  for sop in part.keys["SOPInstanceUID"].split("\\")}
                continue
            series = part.series if part.level is Level.STUDY else (part.keys["SeriesInstanceUID"],)
            jobs.extend(one(part, study, uid) for uid in series)
        await asyncio.gather(*jobs)

    async def _proxy_part(self, part: Part, destination: Peer, store: StoreHandle, deadline: float,
                          report: Callable[[bool], Awaitable[None]], listing: asyncio.Future[None]) -> None:
        """The part from its first holder; what did not arrive, from the next holders that have it, at
        IMAGE level (a holder killed midway is replaced for the rest only). Instances the destination
        refused are not asked again: it would refuse them again. Without the part's instances (the
        look-up found none) the next holder is asked only when nothing of the part arrived."""
        got = _Delivery()

        async def publish(final: bool = False) -> None:
            part.counts = {"remaining": 0, "completed": len(got.delivered),
                           "failed": len(got.refused) + got.archive_failed, "warning": 0}
            await report(final)

        whole: list[Move] = [(part.level, tuple(sorted(part.keys.items())))]
        for index, spec in enumerate(part.holders):
            if index == 0 or (not part.instances and not got.delivered):
                moves = whole
            elif part.instances:
                await asyncio.shield(listing)  # every series listed before the rest is asked for
                moves = _retry_moves(part, spec.name, got.delivered | set(got.refused))
            else:
                break  # what the destination took stays; asking another holder would send it again
            leased = await self._lease(spec, deadline)
            if isinstance(leased, dict):
                part.tried.append(leased)
                continue
            node, lease = leased
            try:
                for level, keys in moves:
                    if not await self._proxy_move(part, spec, level, keys, destination, store, deadline, got,
                                                  publish):
                        break
            finally:
                node.release.remote(lease)
            await asyncio.shield(listing)  # shared by every part: one part leaving must not cancel it
            missing = set(part.instances) - got.delivered - set(got.refused)
            ok = bool(part.tried) and part.tried[-1]["status"] == "ok"
            if (part.instances and not missing) or (not part.instances and (ok or got.delivered)):
                break
            if deadline <= time.monotonic():
                break
        await asyncio.shield(listing)  # what no holder sent is named from the whole list
        missing_uids = sorted(set(part.instances) - got.delivered - set(got.refused))
        if missing_uids:
            ends = ", ".join(f"{t['node']}: {t.get('error') or _status_text(t.get('dimse_status'))}"
                             for t in part.tried)
            part.tried.append({"node": None, "status": "failed", "error": f"{len(missing_uids)} instance(s) "
                               f"did not arrive from any holder ({ends}), e.g. {missing_uids[0]}"})
        part.failed_uids = [*got.refused, *missing_uids]
        got.archive_failed += len(missing_uids)
        ok = bool(part.tried) and part.tried[-1]["status"] == "ok"
        # A part none of whose instances reached the destination is not done: its reason (the
        # destination's refusal) then becomes the retrieval's error.
        part.done = not missing_uids and (bool(got.delivered) or (ok and not got.refused))
        await publish(True)

    async def _lease(self, spec: NodeSpec, deadline: float) -> tuple[Any, str] | dict[str, Any]:
        """One of the node actor's slots for its moves (admitted like a query: circuit breaker, rate limit,
        association limit), held while the store actor fetches; else the ``tried`` entry saying why not.

        Bounded by the deadline: an actor that cannot start (no Ray node offers its placement) or does not
        answer ends the wait. A lease granted after its caller left is given back when it arrives."""
        import ray

        why = await self._coordinator.unplaceable(spec)
        if why is not None:
            return {"node": spec.name, "status": OutcomeStatus.UNPLACEABLE.value, "error": why}
        remaining = max(0.0, deadline - time.monotonic())
        node = await self._coordinator.handle(spec)
        granted = asyncio.wrap_future(node.lease.remote(remaining).future())
        try:
            refused, lease = await asyncio.wait_for(asyncio.shield(granted), remaining)
        except TimeoutError:
            granted.add_done_callback(functools.partial(_release_late, node))
            return {"node": spec.name, "status": OutcomeStatus.TIMEOUT.value,
                    "error": "the node's actor gave no slot before the retrieval's deadline"}
        except asyncio.CancelledError:
            granted.add_done_callback(functools.partial(_release_late, node))
            raise
        except ray.exceptions.RayError as exc:  # the actor died or its handle is stale: next holder
            self._coordinator.forget(spec.name, stale=node)
            return {"node": spec.name, "status": OutcomeStatus.FAILED.value,
                    "error": f"the node's actor is unavailable: {type(exc).__name__}"}
        if refused is not None:
            return {"node": spec.name, "status": refused.status.value, "error": refused.error}
        return node, lease

    async def _proxy_move(self, part: Part, spec: NodeSpec, level: Level, keys: tuple[tuple[str, str], ...],
                          destination: Peer, store: StoreHandle, deadline: float, got: _Delivery,
                          publish: Callable[[bool], Awaitable[None]]) -> bool:
        """One C-MOVE of the part from ``spec`` through the store actor; False when no other may follow
        from this holder (deadline passed, no information model)."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            part.tried.append({"node": spec.name, "status": "timeout", "error": "retrieval deadline passed"})
            return False
        model = information_model_for(level, spec.query_models)
        if model is None:
            part.tried.append({"node": spec.name, "status": "failed",
                               "error": f"node supports no information model for a {level} C-MOVE"})
            return False
        proxied = ProxyPart(spec.name, Peer(spec.ae_title, spec.host, spec.port), spec.calling_ae_title,
                            level, keys, model, spec.dimse_timeout_s, spec.retrieve_method)
        stream = store.move.options(num_returns="streaming").remote(proxied, destination, remaining)
        delivered_before, refused_before = len(got.delivered), len(got.refused)
        end: PartEvent | None = None
        try:
            async for ref in stream:
                event: InstanceEvent | PartEvent = await ref
                if isinstance(event, PartEvent):
                    end = event
                    continue
                if event.forwarded:
                    got.delivered.add(event.sop_instance_uid)
                    got.refused.pop(event.sop_instance_uid, None)
                else:
                    got.refused[event.sop_instance_uid] = event.reason
                await publish(False)
        except asyncio.CancelledError:
            import ray

            ray.cancel(stream)
            raise
        if not part.instances and end is not None:
            got.archive_failed += int(end.counts.get("failed", 0))
        ok = end is not None and end.error is None and end.status in (SUCCESS, WARNING_FAILURES)
        error = end.error if end is not None else "the store actor ended without a result"
        refusals = list(got.refused.values())[refused_before:]
        if error is None and refusals:  # the reason first: a DICOM ErrorComment keeps 64 characters
            error = f"{refusals[0]} ({len(refusals)} instance(s) not delivered to {destination.ae_title})"
        part.tried.append({"node": spec.name, "status": "ok" if ok else "failed",
                           "dimse_status": end.status if end is not None else None, "error": error,
                           "completed": len(got.delivered) - delivered_before,
                           "failed": len(refusals), "warning": 0,
                           "from_spool": end is not None and end.from_spool})
        return True


Move = tuple[Level, tuple[tuple[str, str], ...]]
"""One C-MOVE of a part: its level and unique keys."""


@dataclass(slots=True)
class _Delivery:
    """What one part's moves have brought so far."""

    delivered: set[str] = field(default_factory=set)  # SOP Instance UIDs the destination took
    refused: dict[str, str | None] = field(default_factory=dict)  # UID -> why it was not taken
    archive_failed: int = 0  # sub-operations an archive failed, when the part's instances are not known


def _retry_moves(part: Part, node: str, settled: set[str]) -> list[Move]:
    """IMAGE-level C-MOVEs (one per series) for the part's instances ``node`` holds that are not settled."""
    by_series: dict[str, list[str]] = {}
    for sop, instance in sorted(part.instances.items()):
        if sop not in settled and node in instance.holders:
            by_series.setdefault(instance.series, []).append(sop)
    study = part.keys["StudyInstanceUID"]
    return [(Level.IMAGE, (("SOPInstanceUID", "\\".join(sops)), ("SeriesInstanceUID", series),
                           ("StudyInstanceUID", study)))
            for series, sops in by_series.items()]


def _status_text(status: int | None) -> str:
    return "no final C-MOVE response" if status is None else f"C-MOVE status 0x{status:04X}"


def _release_late(node: Any, granted: asyncio.Future[tuple[Any, str]]) -> None:
    """A lease that arrived after its caller stopped waiting goes straight back."""
    if granted.cancelled() or granted.exception() is not None:
        return
    refused, lease = granted.result()
    if refused is None:
        node.release.remote(lease)


def _totals(parts: list[Part]) -> dict[str, int]:
    return {k: sum(p.counts[k] for p in parts) for k in ("remaining", "completed", "failed", "warning")}


def _result(parts: list[Part]) -> RetrievalResult:
    counts = _totals(parts)
    failed_uids = [uid for p in parts for uid in p.failed_uids]
    if not parts:
        return RetrievalResult(
            "failed", UNABLE, counts, [], parts, "no node of the span holds the requested objects"
        )
    undone = [p for p in parts if not p.done]
    if not undone and counts["failed"] == 0 and counts["warning"] == 0:
        return RetrievalResult("success", SUCCESS, counts, failed_uids, parts, None)
    errors = [t.get("error") or t.get("status") for p in undone for t in p.tried]
    reason = "; ".join(str(e) for e in errors[-3:]) or None
    if counts["completed"] > 0 or (not undone and counts["warning"] > 0):
        return RetrievalResult("warning", WARNING_FAILURES, counts, failed_uids, parts, reason)
    statuses = [t.get("dimse_status") for p in undone for t in p.tried]
    if statuses and all(s == DESTINATION_UNKNOWN for s in statuses):
        return RetrievalResult(
            "failed",
            DESTINATION_UNKNOWN,
            counts,
            failed_uids,
            parts,
            "no holder knows the move destination; add it to the archive's known AEs",
        )
    return RetrievalResult("failed", UNABLE, counts, failed_uids, parts, reason)
