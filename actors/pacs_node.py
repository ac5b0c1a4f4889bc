"""PacsNode: the Ray actor that owns every conversation with one PACS.

It never raises into its caller: every call ends in a NodeOutcome, which crosses the Ray boundary as a
value where an exception would lose the node's partial answer. It throttles
(at most ``max_associations`` operations in flight, at most ``max_queries_per_s`` starts), keeps
the deadline it is given, and stops dialling a PACS that keeps refusing (circuit breaker).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import ray

from actors.circuit import CircuitBreaker, CircuitState, Decision
from actors.dimse import FIND_MODELS, MOVE_MODELS, EncodedQueries, marked
from actors.metrics import NodeMetrics
from actors.operations import CANCELLED, EchoOperation, FindOperation, LeaseOperation, MoveOperation
from actors.pool import AssociationPool
from actors.throttle import RateLimiter
from spanner import hops
from spanner.dicom_constants import Status
from spanner.errors import AssociationRejected, NodeUnreachable
from spanner.logs import configure_logging
from spanner.nodespec import ActorTuning, NodeSpec
from spanner.outcome import DicomJson, NodeOutcome, OutcomeStatus
from spanner.packed import Packed, pack
from spanner.query import MoveQuery, NodeQuery, information_model_for

LOG = logging.getLogger(__name__)
PACK_ON_LOOP_MAX = 1000  # matches packed on the actor's event loop; more go to a thread


class _Operation(Protocol):
    finished: asyncio.Event

    async def run(self) -> None: ...
    def cancel(self) -> None: ...
    def abort_if_running(self) -> None: ...


class PacsNodeImpl:
    """The actor's body, kept free of Ray so it can be read and reasoned about on its own."""

    def __init__(self, spec: NodeSpec, tuning: ActorTuning) -> None:
        self.spec = spec
        self.tuning = tuning
        self._pool = AssociationPool(spec, tuning.pool_idle_s)
        self._limiter = RateLimiter(spec.max_queries_per_s)
        self._circuit = CircuitBreaker(tuning.circuit_failures, tuning.circuit_cooldown_s)
        self._slots: asyncio.Semaphore | None = None
        self._msg_ids = itertools.count(1)
        self._identifiers = EncodedQueries()
        self._stopping: set[asyncio.Task[None]] = set()
        self._ends: dict[int, float] = {}  # in-flight operation -> when it is expected to end at the latest
        self._waiting = 0  # queries waiting for a slot
        self._leases: dict[str, tuple[LeaseOperation, asyncio.Future[bool]]] = {}
        self._typical_s: float | None = None  # moving average of how long an operation holds its slot
        self.in_flight = 0
        self.outcomes: Counter[str] = Counter()
        self.metrics = NodeMetrics(spec.name)

    # -- public calls ---------------------------------------------------------------------------------
    async def find(self, query: NodeQuery, timeout_s: float) -> tuple[NodeOutcome, list[DicomJson]]:
        started = time.monotonic()
        try:
            outcome, matches = await self._find(query, started + timeout_s)
        except _Throttled:
            outcome, matches = _throttled(self.spec), []
        outcome.elapsed_ms = round((time.monotonic() - started) * 1000, 2)
        outcome.matches = len(matches)
        self.outcomes[outcome.status.value] += 1
        self.metrics.query_finished(outcome.status.value, outcome.elapsed_ms)
        self._publish()
        if LOG.isEnabledFor(logging.DEBUG):  # the extra dict is built only when the line is written
            LOG.debug(
                "C-FIND finished: %s, %d matches",
                outcome.status.value,
                outcome.matches,
                extra={"event": "node.find", "node": self.spec.name, "elapsed_ms": outcome.elapsed_ms},
            )
        return outcome, matches

    async def echo(self, timeout_s: float) -> NodeOutcome:
        started = time.monotonic()
        deadline = started + timeout_s
        refused = await self._admit(deadline, probe_allowed=False)
        if refused is not None:
            return refused
        op = EchoOperation(self._pool)
        try:
            finished = await self._run(op, deadline)
            outcome = self._echo_outcome(op, finished)
        except _Throttled:
            outcome = _throttled(self.spec)
        outcome.elapsed_ms = round((time.monotonic() - started) * 1000, 2)
        if outcome.status is OutcomeStatus.THROTTLED:
            self.metrics.throttled()
        self._publish()
        return outcome

    async def lease(self, timeout_s: float) -> tuple[NodeOutcome | None, str]:
        """One of the node's slots for a proxied retrieval run by the store actor, admitted like a query
        (circuit breaker, rate limit, association limit): (None, lease ID) once granted, else (the outcome
        that refuses it, ""). It is held until ``release`` or for ``timeout_s`` at most. IDs are unique
        across restarts of the actor, so a late release never frees another retrieval's slot."""
        deadline = time.monotonic() + timeout_s
        try:
            refused = await self._admit(deadline, probe_allowed=True)
        except _Throttled:
            refused = _throttled(self.spec)
        if refused is not None:
            return refused, ""
        op = LeaseOperation()
        lease_id = uuid.uuid4().hex
        runner = asyncio.ensure_future(self._run(op, deadline))
        granted = asyncio.ensure_future(op.granted.wait())
        try:
            await asyncio.wait({runner, granted}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the caller left: a slot taken meanwhile goes back at once
            granted.cancel()
            op.release()
            raise
        if not granted.done():
            granted.cancel()
            try:
                runner.result()
            except _Throttled:
                return _throttled(self.spec), ""
            return NodeOutcome(self.spec.name, OutcomeStatus.TIMEOUT, error="no slot before the deadline"), ""
        self._leases[lease_id] = (op, runner)
        runner.add_done_callback(lambda _: self._leases.pop(lease_id, None))
        return None, lease_id

    async def release(self, lease_id: str) -> None:
        """Give a lease's slot back (harmless when it already ended); returns once the slot is free."""
        held = self._leases.pop(lease_id, None)
        if held is not None:
            op, runner = held
            op.release()
            with contextlib.suppress(Exception):
                await runner

    async def move(self, query: MoveQuery, timeout_s: float) -> AsyncIterator[dict[str, Any]]:
        """C-MOVE to ``query.destination``: progress events as they come, then one result event."""
        started = time.monotonic()
        deadline = started + timeout_s
        result: dict[str, Any] = {"event": "result", "node": self.spec.name}
        model = information_model_for(query.level, self.spec.query_models)
        try:
            refused = (
                None
                if model is not None
                else NodeOutcome(
                    self.spec.name,
                    OutcomeStatus.FAILED,
                    error=(f"node supports no information model for a {query.level} C-MOVE"),
                )
            )
            refused = refused or await self._admit(deadline, probe_allowed=True)
        except _Throttled:
            refused = _throttled(self.spec)
        if refused is not None or model is None:
            assert refused is not None
            yield result | refused.to_json() | {"completed": 0, "failed": 0, "warning": 0, "failed_uids": []}
            return
        progress: asyncio.Queue[dict[str, int]] = asyncio.Queue()
        op = MoveOperation(
            self._pool,
            query.identifier(),
            MOVE_MODELS[model],
            query.destination,
            next(self._msg_ids) % 65535 + 1,
            dimse_timeout_s=min(self.spec.dimse_timeout_s, timeout_s + self.tuning.cancel_grace_s + 1.0),
            on_progress=progress.put_nowait,
            for_spanner=marked(query.identifier, hops.extended(query.hops, self.tuning.instance_id)),
        )
        runner = asyncio.ensure_future(self._run(op, deadline))
        try:
            while not runner.done() or not progress.empty():
                waiter = asyncio.ensure_future(progress.get())
                done, _ = await asyncio.wait({waiter, runner}, return_when=asyncio.FIRST_COMPLETED)
                if waiter in done:
                    yield {"event": "progress", "node": self.spec.name, **waiter.result()}
                else:
                    waiter.cancel()
            finished = runner.result()
        except _Throttled:
            yield (
                result
                | _throttled(self.spec).to_json()
                | {"completed": 0, "failed": 0, "warning": 0, "failed_uids": []}
            )
            return
        finally:
            if not runner.done():  # the caller went away: stop the archive too
                runner.cancel()
        outcome = self._move_outcome(op, finished)
        outcome.elapsed_ms = round((time.monotonic() - started) * 1000, 2)
        self.outcomes[f"move_{outcome.status.value}"] += 1
        self.metrics.outcome(f"move_{outcome.status.value}")
        self._publish()
        yield result | outcome.to_json() | {**op.counts, "failed_uids": op.failed_uids}

    def _move_outcome(self, op: MoveOperation, finished: bool) -> NodeOutcome:
        name = self.spec.name
        if op.error is not None:
            self._note_connection(op.error)
            return NodeOutcome(name, OutcomeStatus(op.error.status), error=op.error.message)
        cut = self._cut_short(op, finished, "C-MOVE")
        if cut is not None:
            return cut
        status = op.final_status or 0
        comment = f": {op.error_comment}" if op.error_comment else ""
        if hops.is_loop_refusal(status, op.error_comment):
            return _loop(name, status, op.error_comment)
        if status == Status.SUCCESS:
            return NodeOutcome(name, OutcomeStatus.OK, dimse_status=0)
        if status == Status.SUBOPERATIONS_FAILED:  # the archive did its part, with losses
            return NodeOutcome(
                name,
                OutcomeStatus.OK,
                dimse_status=status,
                incomplete=True,
                error=f"C-MOVE completed with failures (0xB000){comment}",
            )
        if status == CANCELLED:
            return NodeOutcome(
                name,
                OutcomeStatus.CANCELLED,
                dimse_status=status,
                incomplete=True,
                error="the PACS reports the move cancelled",
            )
        return NodeOutcome(
            name,
            OutcomeStatus.FAILED,
            dimse_status=status,
            incomplete=True,
            error=f"C-MOVE failed with status 0x{status:04X}{comment}",
        )

    def stats(self) -> dict[str, Any]:
        self._publish()
        return {
            "node": self.spec.name,
            "in_flight": self.in_flight,
            "pool_idle": self._pool.idle,
            "pool_in_use": self._pool.in_use,
            "associations_opened": self._pool.opened,
            "circuit": self._circuit.state.value,
            "outcomes": dict(self.outcomes),
        }

    async def close(self) -> None:
        if self._stopping:
            await asyncio.wait(list(self._stopping), timeout=self.tuning.cancel_grace_s + 1)
        await self._pool.close_all()

    # -- the query ------------------------------------------------------------------------------------
    async def _find(self, query: NodeQuery, deadline: float) -> tuple[NodeOutcome, list[DicomJson]]:
        name = self.spec.name
        model = information_model_for(query.level, self.spec.query_models)
        if model is None:
            return NodeOutcome(
                name,
                OutcomeStatus.FAILED,
                error=(
                    f"node supports {', '.join(self.spec.query_models)}, "
                    f"none of which allows {query.level} level"
                ),
            ), []
        refused = await self._admit(deadline, probe_allowed=True)
        if refused is not None:
            return refused, []
        remaining = deadline - time.monotonic()
        build = functools.partial(query.identifier, dict(self.spec.additional_filters))
        op = FindOperation(
            self._pool,
            self._identifiers.get((query.level, tuple(sorted(query.filters.items())), query.return_keys),
                                  build),
            FIND_MODELS[model],
            next(self._msg_ids) % 65535 + 1,
            dimse_timeout_s=min(self.spec.dimse_timeout_s, remaining + self.tuning.cancel_grace_s + 1.0),
            for_spanner=marked(build, hops.extended(query.hops, self.tuning.instance_id)),
        )
        finished = await self._run(op, deadline)
        return self._find_outcome(op, finished), list(op.matches)

    def _find_outcome(self, op: FindOperation, finished: bool) -> NodeOutcome:
        name = self.spec.name
        if op.error is not None:
            self._note_connection(op.error)
            return NodeOutcome(
                name,
                OutcomeStatus(op.error.status),
                error=op.error.message,
                dimse_status=op.error.dimse_status,
            )
        cut = self._cut_short(op, finished, "C-FIND")
        if cut is not None:
            return cut
        status = op.final_status
        if status == Status.SUCCESS:
            return NodeOutcome(name, OutcomeStatus.OK, dimse_status=0)
        if status == CANCELLED:
            return NodeOutcome(
                name,
                OutcomeStatus.CANCELLED,
                incomplete=True,
                dimse_status=status,
                error="the PACS reports the query cancelled",
            )
        if hops.is_loop_refusal(status, op.error_comment):
            return _loop(name, status, op.error_comment)
        comment = f": {op.error_comment}" if op.error_comment else ""
        return NodeOutcome(
            name,
            OutcomeStatus.FAILED,
            incomplete=True,
            dimse_status=status,
            error=f"C-FIND failed with status 0x{status or 0:04X}{comment}",
        )

    def _echo_outcome(self, op: EchoOperation, finished: bool) -> NodeOutcome:
        name = self.spec.name
        if op.error is not None:
            self._note_connection(op.error)
            return NodeOutcome(name, OutcomeStatus(op.error.status), error=op.error.message)
        if not finished:
            return NodeOutcome(name, OutcomeStatus.TIMEOUT, error="no C-ECHO response before the deadline")
        if op.status == Status.SUCCESS:
            self._circuit_success()
            return NodeOutcome(name, OutcomeStatus.OK, dimse_status=0)
        if op.status is None:
            return NodeOutcome(
                name, OutcomeStatus.ABORTED, error="the association ended before the C-ECHO response"
            )
        return NodeOutcome(
            name, OutcomeStatus.FAILED, dimse_status=op.status, error=f"C-ECHO answered 0x{op.status:04X}"
        )

    def _cut_short(
        self, op: FindOperation | MoveOperation, finished: bool, command: str
    ) -> NodeOutcome | None:
        """The outcome of an operation that ended without its final response, else None.

        A node that answered on an association is alive, whatever it answered; one that never sent its
        A-ASSOCIATE-AC before the deadline counts against the circuit like a refusal, so that a node which
        accepts TCP and then hangs stops holding every query to its deadline."""
        if op.associated:
            self._circuit_success()
        elif not finished:
            self._circuit_failure()
        if not finished:
            return NodeOutcome(self.spec.name, OutcomeStatus.TIMEOUT, incomplete=True,
                               error=_unfinished(op, command))
        if op.aborted:
            return NodeOutcome(self.spec.name, OutcomeStatus.ABORTED, incomplete=True,
                               error=f"the association was aborted before the final {command} response")
        return None

    def _note_connection(self, error: Exception) -> None:
        if isinstance(error, NodeUnreachable | AssociationRejected):
            self._circuit_failure()

    # -- circuit transitions and gauges ---------------------------------------------------------------
    def _circuit_success(self) -> None:
        was_open = self._circuit.state is not CircuitState.CLOSED
        self._circuit.record_success()
        if was_open:
            LOG.info(
                "circuit closed: the node answers again",
                extra={"event": "node.circuit_closed", "node": self.spec.name},
            )
            self._publish()

    def _circuit_failure(self) -> None:
        was_closed = self._circuit.state is CircuitState.CLOSED
        self._circuit.record_failure()
        if was_closed and self._circuit.state is not CircuitState.CLOSED:
            LOG.warning(
                "circuit opened after %d consecutive connection failures; next probe in %.1f s",
                self._circuit.consecutive_failures,
                self._circuit.retry_in_s(),
                extra={"event": "node.circuit_opened", "node": self.spec.name},
            )
            self._publish()

    def _publish(self) -> None:
        """Set the gauges from the actor's state; metrics must never break a query."""
        try:
            self.metrics.state(
                pool_open=self._pool.idle + self._pool.in_use,
                in_flight=self.in_flight,
                circuit_open=self._circuit.state is not CircuitState.CLOSED,
            )
        except Exception:  # pragma: no cover - a metrics agent hiccup is no reason to fail a query
            LOG.debug("metrics update failed", exc_info=True)

    # -- admission: circuit, rate, slots ------------------------------------------------------------------
    async def _admit(self, deadline: float, probe_allowed: bool) -> NodeOutcome | None:
        """None when the caller may go ahead holding no slot yet; else the outcome that refuses it."""
        name = self.spec.name
        decision = self._circuit.decide()
        if decision is Decision.PROBE and probe_allowed:
            probe = EchoOperation(self._pool)
            finished = await self._run(probe, deadline)
            if self._echo_outcome(probe, finished).status is not OutcomeStatus.OK:
                self._circuit_failure()
                decision = Decision.REJECT
        elif decision is Decision.PROBE:
            decision = Decision.PROCEED  # an explicit echo is itself the probe
        if decision is Decision.REJECT:
            return NodeOutcome(
                name,
                OutcomeStatus.CIRCUIT_OPEN,
                error=(
                    f"circuit open after {self._circuit.consecutive_failures} consecutive connection "
                    "failures; "
                    f"next probe in {self._circuit.retry_in_s():.1f} s"
                ),
            )
        wait = self._limiter.reserve(deadline)
        if wait is None:
            return NodeOutcome(
                name,
                OutcomeStatus.THROTTLED,
                error=(
                    f"rate limit of {self.spec.max_queries_per_s:g} queries/s leaves no start "
                    "before the deadline"
                ),
            )
        if wait > 0:
            await asyncio.sleep(wait)
        return None

    def _slots_sem(self) -> asyncio.Semaphore:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.spec.max_associations)
        return self._slots

    async def _run(self, op: _Operation, deadline: float) -> bool:
        """Run ``op`` as a task holding a slot; True when it finished before ``deadline``.

        When every slot is busy and none is expected to free before ``deadline`` (each running operation
        ends by its own deadline plus the cancel grace, or sooner by the node's typical time), the query
        is refused at once rather than at its deadline.
        """
        slots = self._slots_sem()
        if not slots.locked():
            await slots.acquire()  # a free slot: taken at once
        else:
            ends = sorted(self._ends.values())
            if ends and ends[min(self._waiting, len(ends) - 1)] > deadline:
                raise _Throttled(self.spec)
            self._waiting += 1
            try:
                await asyncio.wait_for(slots.acquire(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise _Throttled(self.spec) from None
            finally:
                self._waiting -= 1
        started = time.monotonic()
        latest = deadline + self.tuning.cancel_grace_s
        key = id(op)
        # A lease lasts a whole retrieval: it is expected to hold its slot to the end, and it says nothing
        # of how long a query takes, so it stays out of the typical hold time.
        lease = isinstance(op, LeaseOperation)
        typical = self._typical_s
        self._ends[key] = latest if typical is None or lease else min(latest, started + typical)
        self.in_flight += 1
        self._publish()
        task = asyncio.get_running_loop().create_task(op.run())

        def finish(_: asyncio.Task[None]) -> None:
            self.in_flight -= 1
            self._ends.pop(key, None)
            held = time.monotonic() - started
            if not lease:
                self._typical_s = held if self._typical_s is None else 0.8 * self._typical_s + 0.2 * held
            slots.release()

        task.add_done_callback(finish)
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await asyncio.shield(task)
            return True
        except TimeoutError:
            self._stop(op, task)
            return False
        except asyncio.CancelledError:
            self._stop(op, task)
            raise

    def _stop(self, op: _Operation, task: asyncio.Task[None]) -> None:
        """C-CANCEL now; abort after the grace period if the peer keeps going."""
        grace = self.tuning.cancel_grace_s
        stopper = asyncio.get_running_loop().create_task(_cancel_then_abort(op, task, grace))
        self._stopping.add(stopper)
        stopper.add_done_callback(self._stopping.discard)


def _unfinished(op: FindOperation | MoveOperation, command: str) -> str:
    """What a deadline interrupted: the association (nothing to cancel) or the command (C-CANCEL now,
    abort after the grace period if the node ignores it)."""
    if not op.associated:
        return ("no association before the deadline: the node sent no A-ASSOCIATE-AC in time "
                "(or did not accept the connection); nothing to cancel")
    return (f"no final {command} response before the deadline; C-CANCEL sent "
            "(the association is aborted if the node ignores it)")


class _Throttled(Exception):
    def __init__(self, spec: NodeSpec) -> None:
        super().__init__(spec)
        self.spec = spec


async def _cancel_then_abort(op: _Operation, task: asyncio.Task[None], grace_s: float) -> None:
    op.cancel()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(task), grace_s)
    if not task.done():
        op.abort_if_running()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), grace_s)


def _loop(name: str, status: int | None, comment: str | None) -> NodeOutcome:
    return NodeOutcome(
        name,
        OutcomeStatus.LOOP,
        dimse_status=status,
        error=f"the node is a dicom-spanner this query already passed, so it was not asked again ({comment})",
    )


def _throttled(spec: NodeSpec) -> NodeOutcome:
    return NodeOutcome(
        spec.name,
        OutcomeStatus.THROTTLED,
        error=(f"all {spec.max_associations} associations stayed busy until the deadline"),
    )


# enable_task_events=False: Ray records no task event (state API, dashboard task list, ray.timeline) for
# calls to a node actor, in the actor nor in its caller -- as Serve does for its own actors. Each call
# costs less CPU on both sides; the node's own metrics and log lines say what it did.
# max_restarts=-1: a node actor whose Ray node dies comes back on another one (actors.placement chooses
# where); max_task_retries=0: a C-FIND lost with its actor is not run again by Ray with its original
# timeout, past the query's deadline -- the coordinator retries once itself, with what is left of it.
@ray.remote(  # type: ignore[call-overload]
    num_cpus=0, max_restarts=-1, max_task_retries=0, max_concurrency=1000, enable_task_events=False
)
class PacsNode:
    """Ray actor wrapper: one per enabled node, detached and named (see actors.registry)."""

    def __init__(self, spec: NodeSpec, tuning: ActorTuning) -> None:
        configure_logging(f"node:{spec.name}", tuning)
        self._impl = PacsNodeImpl(spec, tuning)

    @ray.method(num_returns=2)
    async def find(self, query: NodeQuery, timeout_s: float) -> tuple[NodeOutcome, Packed]:
        """The outcome, and the matches packed here, where they arrived (see spanner.packed)."""

        async def find_and_pack() -> tuple[NodeOutcome, Packed]:
            outcome, matches = await self._impl.find(query, timeout_s)
            if len(matches) < PACK_ON_LOOP_MAX:
                return outcome, pack(query.level, matches)
            # About 15 us per match: a large answer is packed off the loop, which serves other calls.
            return outcome, await asyncio.to_thread(pack, query.level, matches)

        result: tuple[NodeOutcome, Packed] = await _guard(
            self._impl.spec, find_and_pack, pack(query.level, [])
        )
        return result

    async def echo(self, timeout_s: float = 5.0) -> NodeOutcome:
        result: NodeOutcome = await _guard(self._impl.spec, lambda: self._impl.echo(timeout_s), None)
        return result

    @ray.method(num_returns="streaming")
    async def move(self, query: MoveQuery, timeout_s: float) -> AsyncIterator[dict[str, Any]]:
        try:
            async for event in self._impl.move(query, timeout_s):
                yield event
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the boundary: report, never raise into the coordinator
            yield {
                "event": "result",
                "node": self._impl.spec.name,
                "status": "failed",
                "error": f"{type(exc).__name__}: {exc}",
                "completed": 0,
                "failed": 0,
                "warning": 0,
                "failed_uids": [],
                "dimse_status": None,
            }

    async def lease(self, timeout_s: float) -> tuple[NodeOutcome | None, str]:
        """A slot for a proxied retrieval (see PacsNodeImpl.lease)."""
        result: tuple[NodeOutcome | None, str] = await _guard(
            self._impl.spec, lambda: self._impl.lease(timeout_s), "")
        return result

    async def release(self, lease_id: str) -> None:
        await self._impl.release(lease_id)

    async def spec(self) -> NodeSpec:
        return self._impl.spec

    async def stats(self) -> dict[str, Any]:
        """The node's counters, and where on the Ray cluster this actor runs."""
        where = ray.get_runtime_context()
        return self._impl.stats() | {"ray_node_id": where.get_node_id(), "pid": os.getpid()}

    async def close(self) -> None:
        await self._impl.close()


async def _guard(spec: NodeSpec, call: Callable[[], Any], empty: Any) -> Any:
    """The never-raise rule: anything unexpected becomes a ``failed`` outcome that says what broke."""
    try:
        return await call()
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # the boundary: report, never raise into the coordinator
        outcome = NodeOutcome(spec.name, OutcomeStatus.FAILED, error=f"{type(exc).__name__}: {exc}")
    return outcome if empty is None else (outcome, empty)
