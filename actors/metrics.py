"""Ray metrics of a node actor: latency, outcomes, pool, in-flight operations, circuit, throttling.

The metric objects are created on first use inside the actor's process (never at import time), so
importing this module in the driver, a test or the SCP registers nothing. Ray exports them through its
metrics agent (Prometheus format); the Ray dashboard's Metrics tab shows them too.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from ray.util import metrics

GAUGE_REFRESH_S = 5.0
LATENCY_BOUNDARIES_MS = [5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0]


@dataclass(frozen=True, slots=True)
class _NodeMetricSet:
    latency: metrics.Histogram
    outcomes: metrics.Counter
    throttled: metrics.Counter
    pool_open: metrics.Gauge
    in_flight: metrics.Gauge
    circuit_open: metrics.Gauge


_lock = threading.Lock()
_set: _NodeMetricSet | None = None


def _metric_set() -> _NodeMetricSet:
    """One set per process: Ray refuses nothing, but two objects of one name would double-register."""
    global _set
    with _lock:
        if _set is None:
            node = ("node",)
            _set = _NodeMetricSet(
                latency=metrics.Histogram(
                    "spanner_node_query_latency_ms",
                    "C-FIND time of one node, admission to final response (ms)",
                    boundaries=LATENCY_BOUNDARIES_MS,
                    tag_keys=node,
                ),
                outcomes=metrics.Counter(
                    "spanner_node_outcomes_total",
                    "Finished operations of one node by outcome status (move_* for C-MOVE)",
                    tag_keys=("node", "status"),
                ),
                throttled=metrics.Counter(
                    "spanner_node_throttled_total",
                    "Operations refused by the node's rate limit or association slots",
                    tag_keys=node,
                ),
                pool_open=metrics.Gauge(
                    "spanner_node_pool_open", "Open associations of the node's pool", tag_keys=node
                ),
                in_flight=metrics.Gauge(
                    "spanner_node_in_flight", "DIMSE operations running against the node", tag_keys=node
                ),
                circuit_open=metrics.Gauge(
                    "spanner_node_circuit_open", "1 while the node's circuit is not closed", tag_keys=node
                ),
            )
        return _set


class NodeMetrics:
    """The metrics of one node, bound to its name; created by the actor, cheap to call.

    A Ray metric call costs tens of microseconds (tag validation, then the core worker), so a gauge is
    set only when its value changes and each status's tags are built once.
    """

    def __init__(self, node: str) -> None:
        self.node = node
        self._tags = {"node": node}
        self._status_tags: dict[str, dict[str, str]] = {}
        self._gauges: tuple[int, int, int] | None = None  # pool_open, in_flight, circuit_open as last set
        self._gauges_at = 0.0  # when all three were last set
        self._m: _NodeMetricSet | None = None

    @property
    def _metrics(self) -> _NodeMetricSet:
        if self._m is None:
            self._m = _metric_set()
        return self._m

    def query_finished(self, status: str, elapsed_ms: float) -> None:
        """A C-FIND ended: its latency and its outcome."""
        self._metrics.latency.observe(elapsed_ms, self._tags)
        self.outcome(status)

    def outcome(self, status: str) -> None:
        tags = self._status_tags.get(status)
        if tags is None:
            tags = self._status_tags[status] = {"node": self.node, "status": status}
        self._metrics.outcomes.inc(1, tags)
        if status.removeprefix("move_") == "throttled":
            self.throttled()

    def throttled(self) -> None:
        self._metrics.throttled.inc(1, self._tags)

    def state(self, *, pool_open: int, in_flight: int, circuit_open: bool) -> None:
        """The gauges, given whenever the actor's state may have changed; those that did are set, and
        all of them again every GAUGE_REFRESH_S: Ray 2.60's metrics agent drops a gauge two report
        intervals after it was last set (measured: a gauge set once never reached a scrape)."""
        now = (pool_open, in_flight, 1 if circuit_open else 0)
        at = time.monotonic()
        if at - self._gauges_at >= GAUGE_REFRESH_S:
            self._gauges, self._gauges_at = None, at
        last = self._gauges
        if now == last:
            return
        m = self._metrics
        if last is None or now[0] != last[0]:
            m.pool_open.set(now[0], self._tags)
        if last is None or now[1] != last[1]:
            m.in_flight.set(now[1], self._tags)
        if last is None or now[2] != last[2]:
            m.circuit_open.set(now[2], self._tags)
        self._gauges = now
