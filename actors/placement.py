"""Where node actors run on a Ray cluster: spread over the Ray nodes, or on the nodes a node's
``placement`` names (Ray node labels, given at ``ray start --labels site=east``).

Ray keeps an actor whose label selector no alive Ray node matches pending, without an error, until such
a node joins. A call to it would wait for its whole deadline, so the spanner asks first: the Ray nodes
alive and their labels (``ray.nodes()``, read at most once a second per process) say whether a placement
can be met at all, and a node whose placement cannot be met answers ``unplaceable`` at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import ray

NODE_ACTOR_CPUS = 0.001
"""The CPU a node actor asks for. Ray's SPREAD strategy puts actors that ask for nothing all on one Ray
node (measured: 5 of 6 on one of three nodes); a token request makes it spread them evenly, and 64 actors
still reserve less than a tenth of a CPU."""

RAY_LABEL_PREFIX = "ray.io/"  # labels Ray sets itself (ray.io/node-id ...), left out of reports
NODES_TTL_S = 1.0


@dataclass(frozen=True, slots=True)
class RayNode:
    """One Ray node as the GCS sees it."""

    node_id: str
    ip: str
    alive: bool
    labels: dict[str, str] = field(default_factory=dict)

    def offers(self, placement: Iterable[tuple[str, str]]) -> bool:
        return self.alive and all(self.labels.get(key) == value for key, value in placement)

    def to_json(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "ip": self.ip, "alive": self.alive, "labels": dict(self.labels)}


def ray_nodes() -> list[RayNode]:
    """Every Ray node the cluster knows of (dead ones stay listed for a while), user labels only."""
    found = []
    for info in ray.nodes():  # type: ignore[no-untyped-call]
        labels = {
            k: str(v) for k, v in (info.get("Labels") or {}).items() if not k.startswith(RAY_LABEL_PREFIX)
        }
        address = str(info.get("NodeManagerAddress", ""))
        found.append(RayNode(str(info["NodeID"]), address, bool(info.get("Alive")), labels))
    return found


def actor_options(placement: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    """Ray options that spread node actors over the Ray nodes, on the nodes ``placement`` allows.

    Ray restarts an actor with the same options, so a restarted actor lands on another Ray node that
    offers the same labels."""
    options: dict[str, Any] = {"num_cpus": NODE_ACTOR_CPUS, "scheduling_strategy": "SPREAD"}
    if placement:
        options["label_selector"] = dict(placement)
    return options


def describe(placement: Iterable[tuple[str, str]]) -> str:
    return ",".join(f"{key}={value}" for key, value in placement)


def unplaceable_reason(placement: tuple[tuple[str, str], ...], nodes: list[RayNode]) -> str | None:
    """Why no Ray node can run an actor with ``placement`` now, or None when one can."""
    if not placement or any(node.offers(placement) for node in nodes):
        return None
    offered = sorted({describe(sorted(n.labels.items())) or "(no labels)" for n in nodes if n.alive})
    return (
        f"no alive Ray node has the labels {describe(placement)} (alive Ray nodes offer: "
        f"{'; '.join(offered) or 'none'}); start one with `ray start --labels {describe(placement)}` "
        f"or change the node's placement"
    )


class RayNodesView:
    """The Ray nodes, re-read at most every ``ttl_s`` seconds (a GCS round trip each time)."""

    def __init__(self, ttl_s: float = NODES_TTL_S, read: Callable[[], list[RayNode]] = ray_nodes) -> None:
        self._ttl_s = ttl_s
        self._read = read
        self._lock = threading.Lock()
        self._nodes: list[RayNode] = []
        self._at: float | None = None

    def nodes(self) -> list[RayNode]:
        """Blocking (call from a thread on an event loop when stale)."""
        with self._lock:
            if self._at is None or time.monotonic() - self._at >= self._ttl_s:
                self._nodes = self._read()
                self._at = time.monotonic()
            return self._nodes

    def fresh(self) -> bool:
        return self._at is not None and time.monotonic() - self._at < self._ttl_s

    def unplaceable(self, placement: tuple[tuple[str, str], ...]) -> str | None:
        return unplaceable_reason(placement, self.nodes()) if placement else None
