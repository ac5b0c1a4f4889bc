"""The replica's cache of API key lookups (the key rules themselves live in serve_app.auth).

Each replica keeps what it looked up (found or not) for ``ttl_s`` seconds, so a query pays no database
round trip for its key; a revoked key therefore keeps working for at most that long on a replica that
had just seen it.
"""

from __future__ import annotations

import asyncio
import threading
import time

from serve_app.shared_reads import SharedReads
from spanner.schemas import CLOSING_ROLES, ApiKeyOut
from spanner.storage import Repository

CACHE_MAX_ENTRIES = 10_000  # wrong keys are cached too; a flood of them must not grow memory unbounded


class KeyCache:
    """Key lookups by hash, kept ``ttl_s`` seconds per replica (misses too)."""

    def __init__(self, repo: Repository, ttl_s: float) -> None:
        self._repo = repo
        self._ttl_s = ttl_s
        self._entries: dict[str, tuple[float, ApiKeyOut | None]] = {}
        self._closing: tuple[float, bool] = (0.0, False)
        self._lock = threading.Lock()
        self._reads = SharedReads(self.lookup)

    def cached(self, key_hash: str) -> tuple[bool, ApiKeyOut | None]:
        with self._lock:
            entry = self._entries.get(key_hash)
        if entry is None or entry[0] <= time.monotonic():
            return False, None
        return True, entry[1]

    async def find(self, key_hash: str, arrived: float | None = None) -> ApiKeyOut | None:
        """The key from the cache, else from the database: one read per key at a time, shared by the
        requests presenting it that arrived (monotonic clock; default now) before the read began."""
        hit, found = self.cached(key_hash)
        if hit:
            return found
        return await self._reads.get(key_hash, arrived)

    def lookup(self, key_hash: str) -> ApiKeyOut | None:
        """From the database (call in a thread), then cached."""
        found = self._repo.active_api_key(key_hash)
        with self._lock:
            if len(self._entries) >= CACHE_MAX_ENTRIES:
                self._entries.clear()
            self._entries[key_hash] = (time.monotonic() + self._ttl_s, found)
        return found

    async def closing_keys_exist(self) -> bool:
        """Whether an active admin or query key exists, looked up at most once per ``ttl_s``."""
        with self._lock:
            expires, exist = self._closing
        if expires > time.monotonic():
            return exist
        exist = await asyncio.to_thread(self._repo.count_active_api_keys, CLOSING_ROLES) > 0
        with self._lock:
            self._closing = (time.monotonic() + self._ttl_s, exist)
        return exist
