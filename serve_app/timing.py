"""When a request reached the replica's app: the start of a query's deadline, and ``Server-Timing``."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

ARRIVED = "arrived"
"""``request.state.arrived``: when the request reached this replica's app (monotonic clock)."""


class ServerTiming:
    """Adds ``Server-Timing: app;dur=<ms>, received;desc="<epoch s>"``: the time from the request reaching
    this replica's app to its answer starting, and the wall-clock moment it reached the app. What a client
    waits beyond ``dur`` lies before the app (Serve's proxy, the replica's queue and event loop) or on the
    way back; a client on the same clock tells the two apart with ``received``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began, received = time.monotonic(), time.time()
        # A query's deadline counts from here (request.state.arrived), not from after authentication and
        # parsing, which take longest exactly when the replica is busiest. A new state dict per request:
        # the one in the scope may be shared.
        scope = {**scope, "state": {**scope.get("state", {}), ARRIVED: began}}

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                dur_ms = (time.monotonic() - began) * 1000
                headers = list(message.get("headers", []))
                timing = f'app;dur={dur_ms:.1f}, received;desc="{received:.3f}"'
                headers.append((b"server-timing", timing.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, timed_send)


def arrived(request: Request) -> float | None:
    """When ``request`` reached the app (monotonic clock); None outside ServerTiming (tests' bare apps)."""
    value = request.scope.get("state", {}).get(ARRIVED)
    return float(value) if value is not None else None
