"""A pool of open associations to one PACS: set-up costs ~7.5 ms and release ~20 ms, so reuse pays."""

from __future__ import annotations

import threading
import time

from pynetdicom import AE
from pynetdicom.association import Association

from actors.dimse import open_association
from spanner.nodespec import NodeSpec

# pynetdicom polls each association from two threads every millisecond, about 2.4% of a core per thread.
# An idle pooled association is parked: its reactor paused, and its DUL polling slowed where the DUL does
# not wait on its socket already (spanner.reactor, which build_ae installs, makes the delay moot), so a
# node with a full pool costs next to nothing between queries.
IDLE_POLL_S = 0.05
ACTIVE_POLL_S = 0.001
ESTABLISHED = "Sta6"  # DUL state: association established, ready for data transfer
SETTLE_TIMEOUT_S = 0.1
"""pynetdicom's send_c_*() pause the association's reactor by clearing a checkpoint and waiting for its
``_is_paused`` flag, which the reactor sets just *before* it waits on that checkpoint: if it has just
passed the checkpoint, the flag is stale, the request goes out, and the reactor takes the first response
off the queue as if it were a request. A fast archive on a reused association then loses a match (seen:
2 queries in 400 against a simulator answering at once). So the pool keeps the reactor paused itself,
from the moment it parks an association or opens one, and hands it out only once the reactor thread is
really waiting at the cleared checkpoint."""


def _park(assoc: Association) -> None:
    assoc._reactor_checkpoint.clear()
    assoc.dul._run_loop_delay = IDLE_POLL_S


def _reactor_waiting(assoc: Association) -> bool:
    """True while the reactor thread blocks in the checkpoint's wait() (it is then one of the waiters
    of the Event's condition; CPython's threading keeps them in ``_waiters``)."""
    condition = getattr(assoc._reactor_checkpoint, "_cond", None)
    return bool(getattr(condition, "_waiters", None))


def _settle(assoc: Association) -> None:
    """Clear the checkpoint and wait until the reactor sits at it (at most SETTLE_TIMEOUT_S)."""
    assoc._reactor_checkpoint.clear()
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while not _reactor_waiting(assoc) and assoc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.0001)


def _unpark(assoc: Association) -> bool:
    """Ready a parked association for use; False when it died while parked (the paused reactor could
    not say). The reactor stays paused: pynetdicom's send_c_*() resume it when they end."""
    dul = assoc.dul
    alive = assoc.is_established and dul.is_alive() and dul.state_machine.current_state == ESTABLISHED
    dul._run_loop_delay = ACTIVE_POLL_S
    _settle(assoc)
    return bool(alive)


class AssociationPool:
    """Idle associations kept for reuse; callers bound how many are in use at once (the actor's slots)."""

    def __init__(self, ae: AE, spec: NodeSpec, idle_s: float) -> None:
        self._ae = ae
        self._spec = spec
        self._idle_s = idle_s
        self._idle: list[tuple[Association, float]] = []
        self._lock = threading.Lock()
        self.in_use = 0
        self.opened = 0

    @property
    def idle(self) -> int:
        return len(self._idle)

    def acquire(self) -> tuple[Association, bool]:
        """An established association and whether it was reused (a reused one may have died quietly)."""
        stale: list[Association] = []
        try:
            return self._take(stale)
        finally:
            for assoc in stale:
                close(assoc, polite=False)

    def _take(self, stale: list[Association]) -> tuple[Association, bool]:
        with self._lock:
            while self._idle:
                assoc, _ = self._idle.pop()
                if _unpark(assoc):
                    self.in_use += 1
                    return assoc, True
                stale.append(assoc)
        assoc = open_association(self._ae, self._spec)
        _settle(assoc)
        with self._lock:
            self.opened += 1
            self.in_use += 1
        return assoc, False

    def give_back(self, assoc: Association, reusable: bool, polite: bool = True) -> None:
        """Keep a clean association for the next query; release or drop anything else (``polite``
        False: the caller saw it aborted or dead, so it is not released)."""
        with self._lock:
            self.in_use -= 1
            if reusable and self._spec.reuse_associations and assoc.is_established:
                _park(assoc)
                self._idle.append((assoc, time.monotonic()))
                return
        close(assoc, polite)

    def reap(self, now: float | None = None) -> int:
        """Release associations idle longer than ``idle_s``; returns how many."""
        now = time.monotonic() if now is None else now
        with self._lock:
            stale = [a for a, since in self._idle if now - since >= self._idle_s]
            self._idle = [(a, since) for a, since in self._idle if now - since < self._idle_s]
        for assoc in stale:
            close(assoc)
        return len(stale)

    def close_all(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for assoc, _ in idle:
            close(assoc)


def close(assoc: Association, polite: bool = True) -> None:
    """Release politely when possible; a broken association is aborted so its threads end.

    A release waits up to the ACSE timeout for the peer's answer. On an association the peer has
    aborted or closed, no answer can come: while the query's thread waited there, its node answered
    ``timeout`` instead of ``aborted`` (5 queries in 25 against an archive that aborts). The pool's
    paused reactor never marks such an association ended, so its DUL is asked instead.
    """
    try:
        dul = assoc.dul
        intact = dul.is_alive() and dul.state_machine.current_state == ESTABLISHED and not assoc.is_aborted
        if polite and intact and assoc.is_established:
            assoc.release()
        else:
            assoc.abort()
    except Exception:  # pragma: no cover - closing must never raise into a query
        pass
