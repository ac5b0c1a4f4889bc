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
Emit = Callable[[dict[str, Any]], Awaitable[None]]
LOOKUP_BATCH = 100
"""UIDs per look-up C-FIND: one identifier stays a few kilobytes, which every archive accepts."""
LOOKUP_CONCURRENCY = 4
"""Look-up batches in flight at once: the node actors' association pools bound the rest anyway."""


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
            return [Part(Level.STUDY, {"StudyInstanceUID": study}, [by_name[n] for n in whole])]
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
        """Find the holders, then have the store actor fetch and forward each part, within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        parts = await self.plan(nodes, level, uids, deadline)

        async def report() -> None:
            await emit({"event": "progress", **_totals(parts)})

        await asyncio.gather(*(self._proxy_part(p, destination, store, deadline, report) for p in parts))
        return _result(parts)

    async def _proxy_part(self, part: Part, destination: Peer, store: StoreHandle, deadline: float,
                          report: Callable[[], Awaitable[None]]) -> None:
        keys = tuple(sorted(part.keys.items()))
        for spec in part.holders:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                part.tried.append({"node": spec.name, "status": "timeout",
                                   "error": "retrieval deadline passed"})
                return
            model = information_model_for(part.level, spec.query_models)
            if model is None:
                part.tried.append({"node": spec.name, "status": "failed",
                                   "error": f"node supports no information model for a {part.level} C-MOVE"})
                continue
            proxied = ProxyPart(spec.name, Peer(spec.ae_title, spec.host, spec.port), spec.calling_ae_title,
                                part.level, keys, model, spec.dimse_timeout_s)
            stream = store.move.options(num_returns="streaming").remote(proxied, destination, remaining)
            forwarded = 0
            failed: dict[str, str | None] = {}
            end: PartEvent | None = None
            try:
                async for ref in stream:
                    event: InstanceEvent | PartEvent = await ref
                    if isinstance(event, PartEvent):
                        end = event
                        continue
                    if event.forwarded:
                        forwarded += 1
                    else:
                        failed[event.sop_instance_uid] = event.reason
                    part.counts = {"remaining": 0, "completed": forwarded, "failed": len(failed),
                                   "warning": 0}
                    await report()
            except asyncio.CancelledError:
                import ray

                ray.cancel(stream)
                raise
            archive_failed = int(end.counts.get("failed", 0)) if end is not None else 0
            ok = end is not None and end.error is None and end.status in (SUCCESS, WARNING_FAILURES)
            error = end.error if end is not None else "the store actor ended without a result"
            if error is None and failed:
                error = f"{len(failed)} instance(s) not taken by {destination.ae_title}, e.g. " \
                        f"{next(iter(failed.values()))}"
            part.tried.append({"node": spec.name, "status": "ok" if ok else "failed",
                               "dimse_status": end.status if end is not None else None, "error": error,
                               "completed": forwarded, "failed": len(failed) + archive_failed, "warning": 0})
            if ok or forwarded:
                # What the destination took stays counted; asking another holder would send it again.
                part.counts = {"remaining": 0, "completed": forwarded, "failed": len(failed) + archive_failed,
                               "warning": 0}
                part.failed_uids = list(failed)
                # A part none of whose instances reached the destination is not done: its reason (the
                # destination's refusal) then becomes the retrieval's error.
                part.done = ok and (forwarded > 0 or not failed)
                await report()
                return
            part.counts = dict.fromkeys(part.counts, 0)  # the next holder starts the part afresh


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
