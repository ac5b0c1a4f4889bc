"""Ray metrics of the ingress, per span: query latency, queries by status, cache hits and misses.

Created on first use inside the replica (never at import time), once per process. Every call swallows
its own errors: a metrics agent that is away must not fail a query.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from ray.util import metrics

LOG = logging.getLogger(__name__)
LATENCY_BOUNDARIES_MS = [5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0]


@dataclass(frozen=True, slots=True)
class _SpanMetricSet:
    latency: metrics.Histogram
    queries: metrics.Counter
    cache: metrics.Counter


_lock = threading.Lock()
_set: _SpanMetricSet | None = None


def _metric_set() -> _SpanMetricSet:
    global _set
    with _lock:
        if _set is None:
            _set = _SpanMetricSet(
                latency=metrics.Histogram(
                    "spanner_span_query_latency_ms",
                    "Spanning C-FIND time as the ingress measured it, cache hits included (ms)",
                    boundaries=LATENCY_BOUNDARIES_MS,
                    tag_keys=("span",),
                ),
                queries=metrics.Counter(
                    "spanner_span_queries_total",
                    "Spanning queries by overall status (ok, partial, failed, ...)",
                    tag_keys=("span", "status"),
                ),
                cache=metrics.Counter(
                    "spanner_span_cache_total",
                    "Query-cache lookups by result (hit or miss)",
                    tag_keys=("span", "result"),
                ),
            )
        return _set


def record_span_query(span: str, status: str, elapsed_ms: float, cache: str) -> None:
    """One finished spanning query: latency, status and whether the cache answered it."""
    try:
        m = _metric_set()
        m.latency.observe(elapsed_ms, {"span": span})
        m.queries.inc(1, {"span": span, "status": status})
        m.cache.inc(1, {"span": span, "result": cache})
    except Exception:  # pragma: no cover - see the module docstring
        LOG.debug("span metrics update failed", exc_info=True)
