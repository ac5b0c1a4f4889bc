"""AE title -> span, from GET /api/v1/spans with a short TTL so span changes arrive without a restart.

The table is read at association time, inside the peer's ACSE timeout: a refresh that fails raises
SpansUnavailable (the association is then rejected as transient) instead of serving a stale table
whose policies may no longer hold; KeyRefused when the API refuses the front's own API key.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from scp.errors import FRONT_KEY_HINT, ApiError, ApiRejected, KeyRefused, SpansUnavailable

LOG = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SpanInfo:
    """What the front needs of a span: its name for the API and its DICOM-facing policy."""

    name: str
    ae_title: str
    allowed_calling_aets: tuple[str, ...] = ()
    max_results: int = 1000

    def allows(self, calling_ae_title: str) -> bool:
        """An empty list allows any caller."""
        return not self.allowed_calling_aets or calling_ae_title.strip() in self.allowed_calling_aets

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> SpanInfo:
        return cls(
            name=str(raw["name"]),
            ae_title=str(raw["ae_title"]).strip(),
            allowed_calling_aets=tuple(str(a).strip() for a in raw.get("allowed_calling_aets") or ()),
            max_results=int(raw.get("max_results") or 1000),
        )


class SpanDirectory:
    """The span table keyed by AE title, refreshed at most every ``ttl_s`` seconds."""

    def __init__(
        self,
        fetch: Callable[[], Awaitable[Iterable[Mapping[str, Any]]]],
        ttl_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._ttl_s = ttl_s
        self._clock = clock
        self._lock = asyncio.Lock()
        self._by_ae: dict[str, SpanInfo] = {}
        self._fetched_at: float | None = None

    async def lookup(self, called_ae_title: str) -> SpanInfo | None:
        """The span served under ``called_ae_title``, or None; raises SpansUnavailable."""
        return (await self._table()).get(called_ae_title.strip())

    def invalidate(self) -> None:
        self._fetched_at = None

    async def _table(self) -> dict[str, SpanInfo]:
        if self._fetched_at is not None and self._clock() - self._fetched_at < self._ttl_s:
            return self._by_ae
        async with self._lock:  # one refresh at a time; the others wait for it rather than all asking
            now = self._clock()
            if self._fetched_at is not None and now - self._fetched_at < self._ttl_s:
                return self._by_ae
            try:
                spans = [SpanInfo.from_json(raw) for raw in await self._fetch()]
            except ApiRejected as exc:
                if exc.http_status in (401, 403):
                    raise KeyRefused(f"the API refused the DICOM front's API key (HTTP {exc.http_status}: "
                                     f"{exc}); {FRONT_KEY_HINT}") from exc
                raise SpansUnavailable(f"cannot read the span table: {exc}") from exc
            except ApiError as exc:
                raise SpansUnavailable(f"cannot read the span table: {exc}") from exc
            except (KeyError, TypeError, ValueError) as exc:
                raise SpansUnavailable(f"the span table is not readable: {exc!r}") from exc
            self._by_ae = {span.ae_title: span for span in spans}
            self._fetched_at = now
            return self._by_ae
