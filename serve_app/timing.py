"""When a request reached the replica's app: the start of a query's deadline, and ``Server-Timing``.

``Server-Timing`` says where a request's time went inside the replica: ``app`` (arrival to the answer
starting), ``loop`` (how long the replica's event loop took to get round to a callback queued at
arrival: its backlog, which every request of that moment waits through) and the phases the code
marks with ``phase`` (``plan``, ``admit``, ``nodes``, ``merge``). A client on the same clock tells the
time before the app from the time after it with ``received``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

ARRIVED = "arrived"
"""``request.state.arrived``: when the request reached this replica's app (monotonic clock)."""

_PHASES: ContextVar[list[tuple[str, float]] | None] = ContextVar("server_timing_phases", default=None)


def note(name: str, seconds: float) -> None:
    """Add ``name`` with ``seconds`` to the current request's ``Server-Timing`` (nothing outside one)."""
    phases = _PHASES.get()
    if phases is not None:
        phases.append((name, seconds))


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Time the body as ``name`` in the current request's ``Server-Timing`` (nothing outside a request:
    an AMQP request or a test calling a use case directly)."""
    phases = _PHASES.get()
    if phases is None:
        yield
        return
    began = time.monotonic()
    try:
        yield
    finally:
        phases.append((name, time.monotonic() - began))


class ServerTiming:
    """Adds ``Server-Timing: app;dur=<ms>, loop;dur=<ms>, <phase>;dur=<ms>..., received;desc="<epoch s>"``:
    the time from the request reaching this replica's app to its answer starting, the event loop's
    backlog at arrival, the marked phases, and the wall-clock moment the request reached the app."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began, received = time.monotonic(), time.time()
        backlog: list[float] = []
        asyncio.get_running_loop().call_soon(lambda: backlog.append(time.monotonic() - began))
        # A query's deadline counts from here (request.state.arrived), not from after authentication and
        # parsing, which take longest exactly when the replica is busiest. A new state dict per request:
        # the one in the scope may be shared.
        scope = {**scope, "state": {**scope.get("state", {}), ARRIVED: began}}
        phases: list[tuple[str, float]] = []
        token = _PHASES.set(phases)

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                dur_ms = (time.monotonic() - began) * 1000
                metrics = [f"app;dur={dur_ms:.1f}"]
                if backlog:
                    metrics.append(f"loop;dur={backlog[0] * 1000:.1f}")
                metrics += [f"{name};dur={seconds * 1000:.1f}" for name, seconds in phases]
                metrics.append(f'received;desc="{received:.3f}"')
                headers = [*message.get("headers", []), (b"server-timing", ", ".join(metrics).encode())]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            _PHASES.reset(token)


def arrived(request: Request) -> float | None:
    """When ``request`` reached the app (monotonic clock); None outside ServerTiming (tests' bare apps)."""
    value = request.scope.get("state", {}).get(ARRIVED)
    return float(value) if value is not None else None
