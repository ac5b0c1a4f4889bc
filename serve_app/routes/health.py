"""/health (the process answers) and /ready (database reachable, node actors alive, the Ray cluster)."""

from __future__ import annotations

import asyncio
from typing import Any

import ray
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from serve_app.deps import ServicesDep
from serve_app.services import Services
from spanner.nodespec import NodeSpec

router = APIRouter(tags=["health"])


@router.get("/health")
def health() -> dict[str, str]:
    return {"status": "up"}


async def _events(s: Services) -> dict[str, Any]:
    counts = await asyncio.to_thread(s.repo.outbox_counts)
    try:
        assert s.relay is not None
        pending = asyncio.wrap_future(s.relay.status.remote().future())
        status: dict[str, Any] = await asyncio.wait_for(pending, 5)
        relay = "connected" if status["connected"] else "broker unavailable"
    except (ray.exceptions.RayError, TimeoutError):
        relay = "unavailable"
    return {"relay": relay, "pending": counts["pending"]}


async def _actor_stats(s: Services, spec: NodeSpec) -> dict[str, Any]:
    """The node actor's stats; a handle this replica cached for an actor that another replica has since
    replaced (after a node change) is looked up again once, as queries do."""
    for attempt in (1, 2):
        handle = await s.coordinator.handle(spec, fresh=attempt == 2)
        try:
            pending = asyncio.wrap_future(handle.stats.remote().future())
            stats: dict[str, Any] = await asyncio.wait_for(pending, 5)
            return stats
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            s.coordinator.forget(spec.name)
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


@router.get("/ready")
async def ready(s: ServicesDep) -> JSONResponse:
    problems: list[str] = []
    try:
        await asyncio.to_thread(s.repo.ping)
        nodes = await asyncio.to_thread(s.repo.list_nodes)
    except Exception as exc:  # readiness reports, it does not raise
        return JSONResponse({"status": "not ready", "problems": [f"database: {exc}"]}, status_code=503)
    actors: dict[str, str] = {}
    where: dict[str, dict[str, Any]] = {}
    unplaceable: dict[str, str] = {}
    ray_nodes = await s.coordinator.nodes()
    for node in (n for n in nodes if n.enabled):
        spec = s.spec_for(node)
        why = await s.coordinator.unplaceable(spec)
        if why is not None:  # the cluster lacks a site, not this replica: reported, not unready
            actors[node.name] = "unplaceable"
            unplaceable[node.name] = why
            continue
        try:
            stats = await _actor_stats(s, spec)
            actors[node.name] = f"alive (circuit {stats['circuit']})"
            ip = next((n.ip for n in ray_nodes if n.node_id == stats["ray_node_id"]), None)
            where[node.name] = {"ray_node_id": stats["ray_node_id"], "ip": ip, "pid": stats["pid"]}
        except (ray.exceptions.RayError, TimeoutError) as exc:
            actors[node.name] = "unavailable"
            problems.append(f"node actor {node.name}: {type(exc).__name__}")
    alive = [n for n in ray_nodes if n.alive]
    body = {
        "status": "ready" if not problems else "not ready",
        "database": "ok",
        "actors": actors,
        "ray": {
            "nodes_alive": len(alive),
            "nodes": [n.to_json() for n in alive],
            "actors": where,
            "unplaceable": unplaceable,
        },
        "problems": problems,
    }
    if s.relay is not None:  # a broker outage is not unreadiness: the outbox keeps the events
        body["events"] = await _events(s)
    return JSONResponse(body, status_code=200 if not problems else 503)
