"""A pool of open associations to one PACS: set-up costs ~7.5 ms and release ~20 ms, so reuse pays."""

from __future__ import annotations

import threading
import time

from pynetdicom import AE
from pynetdicom.association import Association

from actors.dimse import open_association
from spanner.nodespec import NodeSpec


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
        with self._lock:
            while self._idle:
                assoc, _ = self._idle.pop()
                if assoc.is_established:
                    self.in_use += 1
                    return assoc, True
        assoc = open_association(self._ae, self._spec)
        with self._lock:
            self.opened += 1
            self.in_use += 1
        return assoc, False

    def give_back(self, assoc: Association, reusable: bool) -> None:
        """Keep a clean association for the next query; release or drop anything else."""
        with self._lock:
            self.in_use -= 1
            if reusable and self._spec.reuse_associations and assoc.is_established:
                self._idle.append((assoc, time.monotonic()))
                return
        close(assoc)

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


def close(assoc: Association) -> None:
    """Release politely when possible; a broken association is aborted so its threads end."""
    try:
        if assoc.is_established:
            assoc.release()
        else:
            assoc.abort()
    except Exception:  # pragma: no cover - closing must never raise into a query
        pass
