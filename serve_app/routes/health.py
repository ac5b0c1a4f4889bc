"""/health (the process answers) and /ready (database reachable, node actors alive)."""

from __future__ import annotations

import asyncio
from typing import Any

import ray
from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from serve_app.routes import services
from serve_app.services import Services

router = APIRouter(tags=["health"])


@router.get("/health")
def health() -> dict[str, str]:
    return {"status": "up"}


@router.get("/ready")
async def ready(s: Services = Depends(services)) -> JSONResponse:
    problems: list[str] = []
    try:
        await asyncio.to_thread(s.repo.ping)
        nodes = await asyncio.to_thread(s.repo.list_nodes)
    except Exception as exc:  # readiness reports, it does not raise
        return JSONResponse({"status": "not ready", "problems": [f"database: {exc}"]}, status_code=503)
    actors: dict[str, str] = {}
    for node in (n for n in nodes if n.enabled):
        try:
            handle = await s.coordinator.handle(s.spec_for(node))
            pending = asyncio.wrap_future(handle.stats.remote().future())
            stats: dict[str, Any] = await asyncio.wait_for(pending, 5)
            actors[node.name] = f"alive (circuit {stats['circuit']})"
        except (ray.exceptions.RayError, TimeoutError) as exc:
            actors[node.name] = "unavailable"
            problems.append(f"node actor {node.name}: {type(exc).__name__}")
    body = {
        "status": "ready" if not problems else "not ready",
        "database": "ok",
        "actors": actors,
        "problems": problems,
    }
    return JSONResponse(body, status_code=200 if not problems else 503)
