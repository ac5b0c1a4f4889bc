"""The coordinator: fan one query out to every node actor of its span at once, then merge.

Matches go from the node actors into the merge as object references; only small answers are
fetched into this process and merged inline, where a task's scheduling would cost more than it
saves (``merge_inline_max``).

The answer starts by the query's deadline, not after it: of the time the query has, a reserve
(``node_grace_s``, at most ``RESERVE_SHARE`` of it) is kept back. The node actors are given the rest, so
each answers (``timeout``, ``throttled``) a reserve before the deadline; the coordinator stops waiting for
an actor half a reserve before it (an actor whose process is stopped or starved is ``timeout`` then),
and the other half is left for fetching, merging and the response. Before, the reserve was added after
the deadline, and under load the answer came that much later.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import ray

from actors import registry
from actors.merge_tasks import merge_inline, merge_refs
from actors.placement import RayNode, RayNodesView, unplaceable_reason
from actors.registry import NodeHandle
from serve_app.plan import QueryPlan
from serve_app.timing import phase
from spanner.merge import MergedMatch, MergeSpec
from spanner.nodespec import ActorTuning, NodeSpec
from spanner.outcome import NodeOutcome, OutcomeStatus
from spanner.schemas import FailureStrategy

# The answers are ready when they are fetched; the bound only keeps a lost object from holding a thread.
FETCH_TIMEOUT_S = 60.0
CANCEL_WAIT_S = 0.05
RESERVE_SHARE = 1 / 3
"""The reserve for the way back is at most this share of the query's time, so a short deadline still
leaves the archives most of it."""


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
        self._finding: dict[str, asyncio.Future[NodeHandle]] = {}
        # Fetching small answers has threads of its own: in the event loop's default pool it would queue
        # behind database reads (planning, keys, records) exactly when the replica is busiest.
        self._fetcher = ThreadPoolExecutor(max_workers=2, thread_name_prefix="merge-fetch")
        self.ray_nodes = RayNodesView()

    def reserve_s(self, timeout_s: float) -> float:
        """What of a query's ``timeout_s`` is kept back for the answers' way back, merge and response."""
        return min(self._grace_s, timeout_s * RESERVE_SHARE)

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
        """The node's actor: cached, else found by name, else created (a replica may start before it).

        One look-up per node at a time, whatever the number of queries asking: when a node actor dies
        under load, every running query finds it gone at once, and as many threads looking it up and
        racing to create it (each retrying while another's actor holds the name) would take the
        event loop's thread pool and much of the interpreter lock from everything else."""
        if not fresh and spec.name in self._handles:
            return self._handles[spec.name]
        finding = self._finding.get(spec.name)
        if finding is None:
            finding = asyncio.ensure_future(self._find(spec))
            self._finding[spec.name] = finding
            finding.add_done_callback(functools.partial(self._found, spec.name))
        return await asyncio.shield(finding)

    async def _find(self, spec: NodeSpec) -> NodeHandle:
        found = await asyncio.to_thread(registry.lookup, spec.name, self._namespace)
        if found is None:
            found = await asyncio.to_thread(registry.ensure, spec, self._tuning, self._namespace)
        self._handles[spec.name] = found
        return found

    def _found(self, node: str, finding: asyncio.Future[NodeHandle]) -> None:
        if self._finding.get(node) is finding:
            del self._finding[node]
        if not finding.cancelled():
            finding.exception()  # retrieved here: a failure reaches the queries that asked, not the log

    def forget(self, node: str, stale: NodeHandle | None = None) -> None:
        """Drop the cached handle (only if it is still ``stale``, when given: another query may have
        found the node's new actor meanwhile)."""
        if stale is None or self._handles.get(node) is stale:
            self._handles.pop(node, None)

    # -- one spanning query ---------------------------------------------------------------------------
    async def run(self, plan: QueryPlan, reserve_s: float | None = None) -> SpanResult:
        """Answer within ``plan.timeout_s`` from now (merge included). ``reserve_s``: the reserve when the
        query's time has partly gone already (waiting for a slot): the reserve of its whole deadline,
        since the way back takes no less for the wait (default: ``reserve_s(plan.timeout_s)``)."""
        started = time.monotonic()
        reserve = self.reserve_s(plan.timeout_s) if reserve_s is None else min(reserve_s, plan.timeout_s)
        asked = dataclasses.replace(plan, timeout_s=plan.timeout_s - reserve)  # what the node actors get
        tasks: dict[asyncio.Future[Any], NodeSpec] = {
            asyncio.ensure_future(self._call(spec, asked)): spec for spec in plan.nodes
        }
        results: dict[str, tuple[NodeOutcome, Any]] = {}
        try:
            with phase("nodes"):
                reason = await self._gather(plan, tasks, results, started + plan.timeout_s - reserve / 2)
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
            with phase("merge"):
                total, page = await self._merge(plan, results)
        return SpanResult(
            status, total, page, outcomes, round((time.monotonic() - started) * 1000, 2), reason
        )

    async def _gather(
        self,
        plan: QueryPlan,
        tasks: dict[asyncio.Future[Any], NodeSpec],
        results: dict[str, tuple[NodeOutcome, Any]],
        deadline: float,
    ) -> str | None:
        """Wait for the outcomes until ``deadline``; stop early when the failure strategy is decided."""
        waited_s = deadline - time.monotonic()
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
                        error=f"the node actor did not answer within {waited_s:.2f} s",
                    ),
                    None,
                )
        if pending:  # a cancelled call ends at its next step (ray.cancel of its task): not worth the deadline
            await asyncio.wait(pending, timeout=CANCEL_WAIT_S)
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
            handle = await self.handle(spec)
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
                self.forget(spec.name, stale=handle)
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
            fetch = functools.partial(ray.get, refs, timeout=FETCH_TIMEOUT_S)
            loop = asyncio.get_running_loop()
            lists: list[Any] = await loop.run_in_executor(self._fetcher, fetch) if refs else []
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
