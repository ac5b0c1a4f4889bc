"""The coordinator: fan one query out to every node actor of its span at once, then merge.

Matches go from the node actors into the merge as object references; only small answers are
fetched into this process and merged inline, where a task's scheduling would cost more than it
saves (``merge_inline_max``).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import ray

from actors import registry
from actors.merge_tasks import merge_inline, merge_refs
from actors.placement import RayNode, RayNodesView, unplaceable_reason
from actors.registry import NodeHandle
from serve_app.plan import QueryPlan
from spanner.merge import MergedMatch, MergeSpec
from spanner.nodespec import ActorTuning, NodeSpec
from spanner.outcome import NodeOutcome, OutcomeStatus
from spanner.schemas import FailureStrategy

# The answers are ready when they are fetched; the bound only keeps a lost object from holding a thread.
FETCH_TIMEOUT_S = 60.0


@dataclass(slots=True)
class SpanResult:
    status: str  # success | partial | failed
    total: int
    matches: list[MergedMatch]
    outcomes: list[NodeOutcome]
    elapsed_ms: float
    reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Coordinator:
    def __init__(
        self, namespace: str, tuning: ActorTuning, grace_s: float, inline_max: int, partitions: int
    ) -> None:
        self._namespace = namespace
        self._tuning = tuning
        self._grace_s = grace_s
        self._inline_max = inline_max
        self._partitions = partitions
        self._handles: dict[str, NodeHandle] = {}
        self.ray_nodes = RayNodesView()

    async def nodes(self) -> list[RayNode]:
        """The Ray nodes (re-read from the GCS in a thread at most once a second)."""
        if self.ray_nodes.fresh():
            return self.ray_nodes.nodes()
        return await asyncio.to_thread(self.ray_nodes.nodes)

    async def unplaceable(self, spec: NodeSpec) -> str | None:
        """Why the node's actor cannot run now (its placement matches no alive Ray node), or None."""
        if not spec.placement:
            return None
        nodes = await self.nodes()
        return unplaceable_reason(spec.placement, nodes)

    # -- actor handles --------------------------------------------------------------------------------
    async def handle(self, spec: NodeSpec, fresh: bool = False) -> NodeHandle:
        """The node's actor: cached, else found by name, else created (a replica may start before it)."""
        if not fresh and spec.name in self._handles:
            return self._handles[spec.name]
        found = await asyncio.to_thread(registry.lookup, spec.name, self._namespace)
        if found is None:
            found = await asyncio.to_thread(registry.ensure, spec, self._tuning, self._namespace)
        self._handles[spec.name] = found
        return found

    def forget(self, node: str) -> None:
        self._handles.pop(node, None)

    # -- one spanning query ---------------------------------------------------------------------------
    async def run(self, plan: QueryPlan) -> SpanResult:
        started = time.monotonic()
        tasks: dict[asyncio.Future[Any], NodeSpec] = {
            asyncio.ensure_future(self._call(spec, plan)): spec for spec in plan.nodes
        }
        results: dict[str, tuple[NodeOutcome, Any]] = {}
        try:
            reason = await self._gather(plan, tasks, results, started)
        except asyncio.CancelledError:
            # The caller went away (an HTTP client disconnected, a DICOM client sent C-CANCEL):
            # cancel every node's call, so each actor sends C-CANCEL to its archive.
            for task in tasks:
                task.cancel()
            raise
        outcomes = [results[spec.name][0] for spec in plan.nodes]
        ok = sum(o.status is OutcomeStatus.OK for o in outcomes)
        status, why = _status(plan, outcomes, ok)
        reason = reason or why
        total, page = 0, list[MergedMatch]()
        if not (status == "failed" and plan.failure_strategy is FailureStrategy.FAIL_FAST):
            total, page = await self._merge(plan, results)
        return SpanResult(
            status, total, page, outcomes, round((time.monotonic() - started) * 1000, 2), reason
        )

    async def _gather(
        self,
        plan: QueryPlan,
        tasks: dict[asyncio.Future[Any], NodeSpec],
        results: dict[str, tuple[NodeOutcome, Any]],
        started: float,
    ) -> str | None:
        """Wait for the outcomes; stop early when the failure strategy is already decided."""
        deadline = started + plan.timeout_s + self._grace_s
        pending = set(tasks)
        failed = 0
        reason: str | None = None
        while pending:
            done, pending = await asyncio.wait(
                pending, timeout=max(0.0, deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                break
            for task in done:
                outcome, ref = task.result()
                results[outcome.node] = (outcome, ref)
                if outcome.status is not OutcomeStatus.OK:
                    failed += 1
                    if plan.failure_strategy is FailureStrategy.FAIL_FAST and reason is None:
                        reason = f"fail_fast: node {outcome.node} answered {outcome.status.value}"
            impossible = (
                plan.failure_strategy is FailureStrategy.MINIMUM and len(tasks) - failed < plan.minimum_nodes
            )
            if impossible and reason is None:
                reason = f"minimum: fewer than {plan.minimum_nodes} nodes can still answer ok"
            if reason is not None:
                break
        for task in pending:
            task.cancel()
            spec = tasks[task]
            if reason is not None:
                results[spec.name] = (
                    NodeOutcome(spec.name, OutcomeStatus.CANCELLED, error=f"cancelled ({reason})"),
                    None,
                )
            else:
                results[spec.name] = (
                    NodeOutcome(
                        spec.name,
                        OutcomeStatus.TIMEOUT,
                        incomplete=True,
                        error=(f"the node actor did not answer within {plan.timeout_s + self._grace_s:g} s"),
                    ),
                    None,
                )
        if pending:
            await asyncio.wait(pending, timeout=1.0)
        return reason

    async def _call(self, spec: NodeSpec, plan: QueryPlan) -> tuple[NodeOutcome, Any]:
        """One node's outcome and the reference to its matches; never raises but for cancellation."""
        try:
            why = await self.unplaceable(spec)
            if why is not None:  # Ray would hold the call until the deadline: say why at once instead
                return NodeOutcome(spec.name, OutcomeStatus.UNPLACEABLE, error=why), None
            return await self._attempts(spec, plan)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # e.g. the actor could not be created: this node fails, the query goes on
            error = f"node actor could not be reached: {type(exc).__name__}: {exc}"
            return NodeOutcome(spec.name, OutcomeStatus.FAILED, error=error), None

    async def _attempts(self, spec: NodeSpec, plan: QueryPlan) -> tuple[NodeOutcome, Any]:
        """A dead or stale actor handle is looked up again once."""
        timeout = plan.node_timeout(spec)
        started = time.monotonic()
        for attempt in (1, 2):
            handle = await self.handle(spec, fresh=attempt == 2)
            remaining = max(0.001, timeout - (time.monotonic() - started))
            refs: tuple[Any, Any] = handle.find.remote(plan.query, remaining)
            out_ref, matches_ref = refs
            try:
                outcome: NodeOutcome = await out_ref
                return outcome, matches_ref
            except asyncio.CancelledError:
                ray.cancel(out_ref)
                raise
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
                self.forget(spec.name)
                if attempt == 2:
                    return NodeOutcome(
                        spec.name, OutcomeStatus.FAILED, error=f"node actor unavailable: {exc}"
                    ), None
        raise AssertionError("unreachable")

    async def _merge(
        self, plan: QueryPlan, results: dict[str, tuple[NodeOutcome, Any]]
    ) -> tuple[int, list[MergedMatch]]:
        by_name = {spec.name: spec for spec in plan.nodes}
        holders = [
            (name, outcome, ref)
            for name, (outcome, ref) in results.items()
            if ref is not None and outcome.matches > 0
        ]
        holders.sort(key=lambda item: (by_name[item[0]].priority, item[0]))
        meta = [(name, by_name[name].priority) for name, _, _ in holders]
        refs = [ref for _, _, ref in holders]
        spec = MergeSpec(plan.query.level, plan.dedup, plan.offset, plan.limit)
        if sum(outcome.matches for _, outcome, _ in holders) <= self._inline_max:
            # Each answer's task has finished (its outcome came): one ray.get in a thread collects
            # them all, where sixteen awaits would wake this event loop sixteen times from Ray's thread.
            lists: list[Any] = await asyncio.to_thread(ray.get, refs, timeout=FETCH_TIMEOUT_S) if refs else []
            if len(lists) <= 1 or sum(map(len, lists)) < 500:
                return merge_inline(spec, meta, lists)
            # Off the event loop: the replica keeps serving other requests while it merges.
            return await asyncio.to_thread(merge_inline, spec, meta, lists)
        total, page = await merge_refs(spec, meta, refs, partitions=self._partitions)
        return total, page


def _status(plan: QueryPlan, outcomes: list[NodeOutcome], ok: int) -> tuple[str, str | None]:
    if ok == len(outcomes):
        return "success", None
    if plan.failure_strategy is FailureStrategy.FAIL_FAST:
        return "failed", "fail_fast: not every node answered ok"
    if plan.failure_strategy is FailureStrategy.MINIMUM:
        if ok < plan.minimum_nodes:
            return "failed", f"minimum: {ok} of the {plan.minimum_nodes} nodes required answered ok"
        return "partial", None
    if ok == 0:
        return "failed", "no node answered ok"
    return "partial", None
