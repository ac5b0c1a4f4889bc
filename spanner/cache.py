"""The query cache: a spanning query's answer, kept for its span's ``cache_ttl_s`` (0: not at all).

Key: ``<cache_prefix>q:<sha256 of canonical JSON>`` (sorted keys, no spaces) of what decides the answer:
the span, every queried node in query order (its whole spec and its generation, below), the level, the
normalised filters (spanner.query.normalise_filters: keywords for tags, '*' as ''), the return keys
that change the identifier (sorted; level defaults and filtered keys dropped), dedup, limit, offset,
failure strategy and minimum. The prefix keeps deployments sharing one Redis apart. The deadline is
left out on purpose: only success answers are kept, a success means every node answered in full, and
another deadline would have given the same answer.

Invalidation: each node has a generation token that is part of the key; changing or deleting the node
replaces the token, so the entries that involved it are never read again and age out with their TTL.
Chosen over a Redis set of keys per node because one write invalidates however many entries there are,
because an answer computed while the node changed is stored under the generation read before it ran
(with a set of keys, a store racing the invalidation would survive it), and because both backends share
the logic. The node's spec is in the key as well, so a change that bypassed the API (a config file
applied at start-up, another replica's in-process cache, a bump lost while Redis was down) still misses.

Backends: Redis with REDIS_URL (shared by all replicas); otherwise an in-process LRU bounded in entries
and bytes (per replica). Redis errors never leave this module: while Redis fails, every call is a miss,
one warning is logged per outage, and Redis is not tried again for ``cache_retry_s``. Nothing connects
before the first query.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from spanner.errors import ConfigError
from spanner.query import DEFAULT_RETURN_KEYS, IDENTITY_KEYS, Level
from spanner.settings import Settings

log = logging.getLogger("spanner.cache")

T = TypeVar("T")

CACHE_FORMAT = 1
"""Part of every key: bump it when the stored answer changes shape, and older entries are ignored."""
NO_GENERATION = "0"
MIN_MATCH_BYTES = 64
"""No match takes fewer bytes of JSON (its identity key alone is longer)."""
_PER_REQUEST = frozenset({"query_id", "cache"})  # never stored: a hit gets its own


@dataclass(frozen=True, slots=True)
class QueryIdentity:
    """What decides a spanning query's answer, in plain values (see the module docstring)."""

    span: str
    nodes: tuple[Mapping[str, Any], ...]
    """Each queried node's spec as plain values, ``name`` included, in query order."""
    level: str
    filters: Mapping[str, str]
    """Normalised by spanner.query.normalise_filters."""
    return_keys: tuple[str, ...]
    dedup: str
    limit: int
    offset: int
    failure_strategy: str
    minimum_nodes: int

    @property
    def node_names(self) -> list[str]:
        return [str(spec["name"]) for spec in self.nodes]

    def material(self, generations: Sequence[str]) -> dict[str, Any]:
        """The canonical content of the key; ``generations`` in the order of ``nodes``."""
        level = Level(self.level)
        implied = {*DEFAULT_RETURN_KEYS[level], *IDENTITY_KEYS[level], *self.filters}
        return {
            "format": CACHE_FORMAT,
            "span": self.span,
            "nodes": [{"spec": dict(spec), "generation": gen} for spec, gen in zip(self.nodes, generations,
                                                                                      strict=True)],
            "level": level.value,
            "filters": dict(self.filters),
            "return_keys": sorted(set(self.return_keys) - implied),  # the rest add nothing to the identifier
            "dedup": self.dedup,
            "limit": self.limit,
            "offset": self.offset,
            "failure_strategy": self.failure_strategy,
            "minimum_nodes": self.minimum_nodes if self.failure_strategy == "minimum" else None,
        }


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def cache_key(prefix: str, identity: QueryIdentity, generations: Sequence[str]) -> str:
    digest = hashlib.sha256(canonical_json(identity.material(generations)).encode()).hexdigest()
    return f"{prefix}q:{digest}"


@dataclass(frozen=True, slots=True)
class Lookup:
    key: str | None
    """Where a fresh answer goes; None when it is not to be stored (cache off or unavailable)."""
    answer: dict[str, Any] | None = None
    """The stored answer on a hit (without query_id and cache)."""


NO_LOOKUP = Lookup(None, None)


class QueryCache(ABC):
    """Lookup and store of answers, and per-node invalidation; the backends supply five primitives."""

    def __init__(self, prefix: str, max_bytes: int) -> None:
        self.prefix = prefix
        self.max_bytes = max_bytes

    def lookup(self, identity: QueryIdentity, *, read: bool = True) -> Lookup:
        """The key of this query now and, unless ``read`` is False (Cache-Control: no-cache), its answer."""
        generations = self._generations(identity.node_names)
        if generations is None:
            return NO_LOOKUP
        key = cache_key(self.prefix, identity, generations)
        if not read:
            return Lookup(key)
        data = self._get(key)
        if data is None:
            return Lookup(key)
        try:
            answer = json.loads(data)
        except ValueError:  # a damaged entry is a miss; the fresh answer overwrites it
            return Lookup(key)
        return Lookup(key, answer if isinstance(answer, dict) else None)

    def store(self, key: str | None, answer: Mapping[str, Any], ttl_s: float) -> bool:
        """Keep ``answer`` under ``key`` for ``ttl_s`` seconds; False when it is not kept.

        Only ``success`` answers are kept. A partial or failed answer shows a passing fault (an archive
        timed out, refused, was overloaded): served again it would stretch one outage over the TTL, and
        the client that retries to get the full answer would keep getting the broken one. Answers over
        ``max_bytes`` of JSON are not kept either: they would crowd out many small ones, and re-asking
        costs the archives little compared to holding them.
        """
        if key is None or ttl_s <= 0 or answer.get("status") != "success":
            return False
        if len(answer.get("matches") or ()) * MIN_MATCH_BYTES > self.max_bytes:
            return False  # surely too big: spare serialising it
        try:
            data = json.dumps({k: v for k, v in answer.items() if k not in _PER_REQUEST},
                              separators=(",", ":"), ensure_ascii=False).encode()
        except (TypeError, ValueError):
            log.exception("answer could not be cached: not plain JSON")
            return False
        if len(data) > self.max_bytes:
            return False
        return self._set(key, data, max(1, round(ttl_s)))

    def invalidate_node(self, name: str) -> None:
        """After node ``name`` changed or went: entries that involved it are not read again."""
        self._bump(name, uuid.uuid4().hex[:16])

    def close(self) -> None:  # noqa: B027  (nothing to release by default)
        """Release connections, if any."""

    @abstractmethod
    def _generations(self, names: Sequence[str]) -> list[str] | None:
        """Each node's generation token; None when the cache cannot answer."""

    @abstractmethod
    def _get(self, key: str) -> bytes | None: ...

    @abstractmethod
    def _set(self, key: str, data: bytes, ttl_s: int) -> bool: ...

    @abstractmethod
    def _bump(self, name: str, token: str) -> None: ...


class MemoryCache(QueryCache):
    """In-process LRU with a TTL per entry, bounded in entries and in bytes; safe across threads."""

    def __init__(self, prefix: str, max_bytes: int, max_entries: int, max_total_bytes: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(prefix, max_bytes)
        self.max_entries = max_entries
        self.max_total_bytes = max_total_bytes
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._bytes = 0
        self._gens: dict[str, str] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def total_bytes(self) -> int:
        return self._bytes

    def _generations(self, names: Sequence[str]) -> list[str]:
        with self._lock:
            return [self._gens.get(name, NO_GENERATION) for name in names]

    def _get(self, key: str) -> bytes | None:
        with self._lock:
            item = self._entries.get(key)
            if item is None:
                return None
            expires, data = item
            if self._clock() >= expires:
                self._drop(key)
                return None
            self._entries.move_to_end(key)
            return data

    def _set(self, key: str, data: bytes, ttl_s: int) -> bool:
        if self.max_entries == 0 or len(data) > self.max_total_bytes:
            return False
        with self._lock:
            if key in self._entries:
                self._drop(key)
            self._entries[key] = (self._clock() + ttl_s, data)
            self._bytes += len(data)
            while len(self._entries) > self.max_entries or self._bytes > self.max_total_bytes:
                self._drop(next(iter(self._entries)))  # least recently used first
        return True

    def _drop(self, key: str) -> None:
        _, data = self._entries.pop(key)
        self._bytes -= len(data)

    def _bump(self, name: str, token: str) -> None:
        with self._lock:
            self._gens[name] = token


class RedisCache(QueryCache):
    """Redis through redis-py, with short timeouts and no retries: a slow cache must not slow queries."""

    def __init__(self, url: str, prefix: str, max_bytes: int, timeout_s: float = 0.2, retry_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(prefix, max_bytes)
        self.where = _redacted(url)
        self.retry_s = retry_s
        self._clock = clock
        self._client = redis.Redis.from_url(  # connects on first use
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0),
        )
        self._lock = threading.Lock()
        self._down = False
        self._retry_at = 0.0

    @property
    def available(self) -> bool:
        """False during an outage (until a call succeeds again)."""
        return not self._down

    def _gen_key(self, name: str) -> str:
        return f"{self.prefix}gen:{name}"

    def _generations(self, names: Sequence[str]) -> list[str] | None:
        if not names:
            return []

        def mget(client: redis.Redis) -> list[str]:
            values = client.mget([self._gen_key(name) for name in names])
            return [value.decode() if isinstance(value, bytes) else NO_GENERATION for value in values]

        return self._guarded(mget, None)

    def _get(self, key: str) -> bytes | None:
        def get(client: redis.Redis) -> bytes | None:
            value = client.get(key)
            return value if isinstance(value, bytes) else None

        return self._guarded(get, None)

    def _set(self, key: str, data: bytes, ttl_s: int) -> bool:
        return self._guarded(lambda client: bool(client.set(key, data, ex=ttl_s)), False)

    def _bump(self, name: str, token: str) -> None:
        # No TTL: one small key per node name; a random token (not a counter) never repeats an old one.
        self._guarded(lambda client: client.set(self._gen_key(name), token), None)

    def close(self) -> None:
        self._client.close()

    def _guarded(self, call: Callable[[redis.Redis], T], fallback: T) -> T:
        """``call`` on Redis, or ``fallback`` when Redis fails or is resting after a failure."""
        with self._lock:
            if self._down and self._clock() < self._retry_at:
                return fallback
        try:
            result = call(self._client)
        except (RedisError, OSError) as exc:
            self._failed(exc)
            return fallback
        if self._down:
            with self._lock:
                recovered, self._down = self._down, False
            if recovered:
                log.info("query cache back: Redis at %s answers again", self.where)
        return result

    def _failed(self, exc: BaseException) -> None:
        with self._lock:
            first, self._down = not self._down, True
            self._retry_at = self._clock() + self.retry_s
        if first:
            log.warning("query cache unavailable (Redis at %s: %s: %s); queries go to the archives until it "
                        "is back", self.where, type(exc).__name__, exc)
        with contextlib.suppress(RedisError, OSError):  # pooled connections are likely dead: start afresh
            self._client.connection_pool.disconnect(inuse_connections=False)


def _redacted(url: str) -> str:
    """The URL without user and password, for messages."""
    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparsable URL>"
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path}"


def make_cache(settings: Settings) -> QueryCache:
    """Redis when REDIS_URL is set, else the in-process LRU; a malformed URL is a ConfigError."""
    if not settings.redis_url:
        return MemoryCache(settings.cache_prefix, settings.cache_max_bytes, settings.cache_memory_entries,
                           settings.cache_memory_bytes)
    try:
        return RedisCache(settings.redis_url, settings.cache_prefix, settings.cache_max_bytes,
                          timeout_s=settings.cache_timeout_s, retry_s=settings.cache_retry_s)
    except ValueError as exc:
        raise ConfigError(f"REDIS_URL {_redacted(settings.redis_url)!r} is not usable: {exc}") from exc
