"""Rate limit on query starts: a query that cannot start before its deadline is refused at once."""

from __future__ import annotations

import time


class RateLimiter:
    """Spaces query starts at least ``1 / rate`` seconds apart; ``None`` means no limit."""

    def __init__(self, rate_per_s: float | None) -> None:
        self.interval = 1.0 / rate_per_s if rate_per_s else 0.0
        self._next = 0.0

    def reserve(self, deadline: float, now: float | None = None) -> float | None:
        """Seconds to wait before starting, or None when the start would fall after ``deadline``."""
        if not self.interval:
            return 0.0
        now = time.monotonic() if now is None else now
        start = max(now, self._next)
        if start > deadline:
            return None
        self._next = start + self.interval
        return start - now
