"""Finding, creating, replacing and stopping the named, detached node actors.

Actors are named ``node:<name>`` in the spanner's namespace, so any Serve replica (or a restarted
one) finds them again, and the Ray dashboard lists them by that name. A changed node gets a new actor
rather than a mutated one: Ray restarts a dead actor with its original constructor arguments (and
scheduling options, actors.placement), so those must always be the current spec.

An actor whose placement no alive Ray node offers is created all the same (Ray starts it once such a
node joins), but nothing waits for it to run.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import ray

from actors.pacs_node import PacsNode
from actors.placement import actor_options, ray_nodes, unplaceable_reason
from spanner.nodespec import ActorTuning, NodeSpec

# Ray's ActorHandle typing does not reach remote methods; a named alias keeps signatures readable.
NodeHandle = Any


def actor_name(node: str) -> str:
    return f"node:{node}"


def lookup(node: str, namespace: str) -> NodeHandle | None:
    try:
        return ray.get_actor(actor_name(node), namespace=namespace)
    except ValueError:
        return None


def placeable(spec: NodeSpec) -> bool:
    return unplaceable_reason(spec.placement, ray_nodes() if spec.placement else []) is None


def _create(spec: NodeSpec, tuning: ActorTuning, namespace: str, wait_s: float = 10.0) -> NodeHandle:
    """Create the actor, waiting out a name that a just-killed actor still holds."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            handle: NodeHandle = PacsNode.options(  # type: ignore[attr-defined]
                name=actor_name(spec.name),
                namespace=namespace,
                lifetime="detached",
                **actor_options(spec.placement),
            ).remote(spec, tuning)
            break
        except ValueError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    # Wait until it runs: a node is only "created" once its actor can answer within its first deadline.
    # An actor no Ray node can take would hold this up for good; its queries answer `unplaceable`.
    if placeable(spec):
        ray.get(handle.spec.remote(), timeout=60)
    return handle


def ensure(spec: NodeSpec, tuning: ActorTuning, namespace: str) -> NodeHandle:
    """The actor for ``spec``: reused when its spec is current, else replaced."""
    handle = lookup(spec.name, namespace)
    if handle is not None:
        current: NodeSpec | None = None
        if placeable(spec):  # a pending actor answers nothing: it is replaced, which costs nothing
            with contextlib.suppress(ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                current = ray.get(handle.spec.remote(), timeout=30)
        if current == spec:
            return handle
        if current is None:
            ray.kill(handle, no_restart=True)
            _wait_gone(spec.name, namespace)
        else:
            stop(spec.name, namespace)
    return _create(spec, tuning, namespace)


def _wait_gone(node: str, namespace: str) -> None:
    deadline = time.monotonic() + 10
    while lookup(node, namespace) is not None and time.monotonic() < deadline:
        time.sleep(0.05)


def stop(node: str, namespace: str) -> bool:
    """Release the actor's associations and end it for good; False when there was none."""
    handle = lookup(node, namespace)
    if handle is None:
        return False
    end_actor(handle, lambda: lookup(node, namespace) is None, close_timeout_s=5)
    return True


def end_actor(handle: Any, gone: Callable[[], bool], close_timeout_s: float) -> None:
    """Let a named actor close what it holds, kill it for good, and wait until its name is free."""
    with contextlib.suppress(ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        ray.get(handle.close.remote(), timeout=close_timeout_s)
    ray.kill(handle, no_restart=True)
    deadline = time.monotonic() + 10
    while not gone() and time.monotonic() < deadline:
        time.sleep(0.05)


def live_nodes(namespace: str) -> list[str]:
    """Names of the node actors alive in ``namespace``."""
    from ray.util.state import list_actors

    prefix = actor_name("")
    found: list[Any] = list_actors(filters=[("state", "=", "ALIVE")], limit=10000)
    return sorted(
        a.name[len(prefix) :]
        for a in found
        if a.name and a.name.startswith(prefix) and getattr(a, "ray_namespace", namespace) == namespace
    )
