"""Circuit breaker: stop dialling a PACS that keeps refusing connections, then probe it once."""

from __future__ import annotations

import time
from enum import StrEnum


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Decision(StrEnum):
    PROCEED = "proceed"
    PROBE = "probe"  # the caller must run one C-ECHO and report its result
    REJECT = "reject"


class CircuitBreaker:
    """Opens after ``failures`` consecutive connection failures; after ``cooldown_s`` one probe decides."""

    def __init__(self, failures: int, cooldown_s: float) -> None:
        self.threshold = failures
        self.cooldown_s = cooldown_s
        self.state = CircuitState.CLOSED
        self.consecutive_failures = 0
        self.opened_at = 0.0

    def decide(self, now: float | None = None) -> Decision:
        now = time.monotonic() if now is None else now
        if self.state is CircuitState.CLOSED:
            return Decision.PROCEED
        if self.state is CircuitState.OPEN and now - self.opened_at >= self.cooldown_s:
            self.state = CircuitState.HALF_OPEN  # exactly one caller gets to probe
            return Decision.PROBE
        return Decision.REJECT

    def record_success(self) -> None:
        self.state = CircuitState.CLOSED
        self.consecutive_failures = 0

    def record_failure(self, now: float | None = None) -> None:
        self.consecutive_failures += 1
        if self.state is CircuitState.HALF_OPEN or self.consecutive_failures >= self.threshold:
            self.state = CircuitState.OPEN
            self.opened_at = time.monotonic() if now is None else now

    def retry_in_s(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        return max(0.0, self.cooldown_s - (now - self.opened_at))
