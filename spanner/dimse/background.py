"""An asyncio loop on its own thread, for synchronous owners of acceptors and requestors (start, stop).

    runner = LoopThread("scp").start()
    port = runner.run(acceptor.start("127.0.0.1", 0))
    ...
    runner.run(acceptor.close())
    runner.stop()
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    def __init__(self, name: str) -> None:
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._loop is not None

    @property
    def cpu_s(self) -> float:
        """CPU time the loop's thread has used (0 when not running): what serving costs, per process."""
        thread = self._thread
        if thread is None or thread.ident is None:
            return 0.0
        return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))

    def start(self) -> LoopThread:
        if self._loop is None:
            loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=loop.run_forever, name=self.name, daemon=True)
            self._thread.start()
            self._loop = loop
        return self

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = 10.0) -> T:
        """Run ``coro`` on the loop and wait for its result (raises what it raises)."""
        if self._loop is None:
            coro.close()
            raise RuntimeError(f"loop thread {self.name} is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(5)
            if thread.is_alive():  # a callback still blocks the loop: closing a running loop raises
                return
        loop.close()
