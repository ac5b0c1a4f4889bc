"""Event-driven waits for pynetdicom's DUL threads: they sleep on their socket instead of polling it.

Each pynetdicom association has a DUL thread that, when it finds nothing to do, sleeps
``_run_loop_delay`` (1 ms) and looks again: about 3.6% of a core for every association waiting on a slow
archive (measured: 8 C-FINDs waiting 1 s cost 29% of a core), and up to a millisecond added to every
message it could have read at once. ``install()`` replaces that sleep, process-wide, by a ``select`` on
the association's socket and on a wake-up pipe that ``send_pdu``, ``kill_dul`` and ``stop_dul`` write to,
so the thread wakes the moment data arrives or something is to be done, and costs nothing in between,
whatever ``_run_loop_delay`` says. The wait is still bounded (``MAX_WAIT_S``) so that pynetdicom's
timers (ARTIM, the network timeout), which no event announces, are looked at within that time.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
import weakref
from typing import Any

MAX_WAIT_S = 0.2
_installed = threading.Lock()
_done = False


class _EventClock:
    """Stands in for ``time`` in pynetdicom.dul; only the DUL thread's own idle sleep changes."""

    def sleep(self, seconds: float) -> None:
        dul = threading.current_thread()
        wake = getattr(dul, "_spanner_wake", None)
        sock = getattr(getattr(dul, "socket", None), "socket", None)
        if wake is None or sock is None or seconds <= 0:
            time.sleep(seconds)
            return
        try:
            ready, _, _ = select.select([sock, wake[0]], [], [], MAX_WAIT_S)
        except (OSError, ValueError):  # the socket closed meanwhile: let the reactor find out
            return
        if wake[0] in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(wake[0], 4096)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def _wake(dul: Any) -> None:
    wake = getattr(dul, "_spanner_wake", None)
    if wake is not None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(wake[1], b"\0")


def _pipe_for(dul: Any) -> None:
    read, write = os.pipe()
    os.set_blocking(read, False)
    os.set_blocking(write, False)
    dul._spanner_wake = (read, write)
    weakref.finalize(dul, _close, read, write)


def _close(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def install() -> None:
    """Make every DUL thread of this process wait on its socket (idempotent)."""
    global _done
    with _installed:
        if _done:
            return
        import pynetdicom.dul as dul_module

        provider = dul_module.DULServiceProvider
        original_init = provider.__init__
        original_send = provider.send_pdu
        original_kill = provider.kill_dul
        original_stop = provider.stop_dul

        def init(self: Any, *args: Any, **kwargs: Any) -> None:
            original_init(self, *args, **kwargs)
            _pipe_for(self)

        def send_pdu(self: Any, primitive: Any) -> None:
            original_send(self, primitive)
            _wake(self)

        def kill_dul(self: Any) -> None:
            original_kill(self)
            _wake(self)

        def stop_dul(self: Any) -> bool:
            if self.state_machine.current_state == "Sta1":
                self._kill_thread = True  # what the original does first, set here so the wake finds it
                _wake(self)
            return bool(original_stop(self))

        provider.__init__ = init  # type: ignore[method-assign]
        provider.send_pdu = send_pdu  # type: ignore[method-assign]
        provider.kill_dul = kill_dul  # type: ignore[method-assign]
        provider.stop_dul = stop_dul  # type: ignore[method-assign]
        dul_module.time = _EventClock()  # type: ignore[attr-defined,assignment]
        _done = True
