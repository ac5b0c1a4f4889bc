"""A pool of open associations to one PACS: set-up costs ~5-7 ms and release ~20 ms, so reuse pays.

Associations are the engine's (``spanner.dimse``): each has a reader task on the actor's event loop that
notices a peer's A-ABORT or closed connection the moment it happens, also while the association idles
here, so a dead one is never handed out and nothing polls. An idle association is released by a timer
of its own ``idle_s`` after it was given back. Releases run as background tasks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from actors.dimse import Association, open_association
from spanner.nodespec import NodeSpec

Opener = Callable[[NodeSpec], Awaitable[Association]]


class AssociationPool:
    """Idle associations kept for reuse; callers bound how many are in use at once (the actor's slots)."""

    def __init__(self, spec: NodeSpec, idle_s: float, opener: Opener = open_association) -> None:
        self.spec = spec
        self._idle_s = idle_s
        self._opener = opener
        self._idle: list[tuple[Association, asyncio.TimerHandle]] = []
        self._closing: set[asyncio.Task[None]] = set()
        self.in_use = 0
        self.opened = 0

    @property
    def idle(self) -> int:
        return len(self._idle)

    async def acquire(self) -> tuple[Association, bool]:
        """An established association and whether it was reused."""
        while self._idle:
            assoc, expiry = self._idle.pop()
            expiry.cancel()
            if assoc.is_open:
                self.in_use += 1
                return assoc, True
            self._close(assoc, polite=False)
        assoc = await self._opener(self.spec)
        self.opened += 1
        self.in_use += 1
        return assoc, False

    def give_back(self, assoc: Association, reusable: bool, polite: bool = True) -> None:
        """Keep a clean association for the next query; release or drop anything else (``polite``
        False: the caller saw it aborted or broken, so it is aborted, not released: a release would
        wait the ACSE timeout for an answer that cannot come)."""
        self.in_use -= 1
        if reusable and self.spec.reuse_associations and assoc.is_open:
            expiry = asyncio.get_running_loop().call_later(self._idle_s, self._expire, assoc)
            self._idle.append((assoc, expiry))
            return
        self._close(assoc, polite)

    def _expire(self, assoc: Association) -> None:
        """``idle_s`` passed since ``assoc`` was given back unused: release it."""
        self._idle = [(a, expiry) for a, expiry in self._idle if a is not assoc]
        self._close(assoc)

    async def close_all(self) -> None:
        idle, self._idle = self._idle, []
        for assoc, expiry in idle:
            expiry.cancel()
            self._close(assoc)
        if self._closing:
            await asyncio.wait(list(self._closing), timeout=self.spec.connect_timeout_s + 1)

    def _close(self, assoc: Association, polite: bool = True) -> None:
        if not (polite and assoc.is_open):
            assoc.abort()
        task = asyncio.get_running_loop().create_task(assoc.release() if assoc.is_open else assoc.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
