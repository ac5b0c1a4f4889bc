"""Changing a node: the database write, then the cache generation of its answers, then its actor.

The order matters: a query that starts after the change must neither read an answer the old node
gave (the cache generation changes) nor run on the old actor (it is reconfigured or stopped).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from serve_app.services import Services
from spanner.errors import NotFound
from spanner.outcome import NodeOutcome
from spanner.schemas import NodeIn, NodeOut, NodePatch, NodePut

T = TypeVar("T")


def _changed(s: Services, name: str, write: Callable[[], T]) -> T:
    result = write()
    s.cache.invalidate_node(name)  # a node of that name may have existed before, with other answers
    s.sync_actor(name)
    return result


def create_node(s: Services, body: NodeIn) -> NodeOut:
    return _changed(s, body.name, lambda: s.repo.create_node(body))


def replace_node(s: Services, name: str, body: NodePut) -> NodeOut:
    return _changed(s, name, lambda: s.repo.replace_node(name, body))


def patch_node(s: Services, name: str, body: NodePatch) -> NodeOut:
    return _changed(s, name, lambda: s.repo.patch_node(name, body))


def delete_node(s: Services, name: str) -> None:
    _changed(s, name, lambda: s.repo.delete_node(name))


async def echo_node(s: Services, name: str, timeout_s: float) -> NodeOutcome:
    """A C-ECHO through the node's actor (its pool, throttle and circuit breaker)."""
    node = await asyncio.to_thread(s.repo.get_node, name)
    if not node.enabled:
        raise NotFound(f"node {name!r} is disabled; enable it with PATCH /api/v1/nodes/{name}")
    handle = await s.coordinator.handle(s.spec_for(node))
    outcome: NodeOutcome = await handle.echo.remote(timeout_s)
    return outcome
