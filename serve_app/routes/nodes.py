"""/api/v1/nodes: the PACS the spanner queries. A change reconfigures or stops the node's actor and
drops the cached answers that involved the node (spanner.cache: its generation changes)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Query, Response

from serve_app.api_models import EchoOut
from serve_app.auth import require_admin, require_query
from serve_app.routes import services
from serve_app.services import Services
from spanner.errors import NotFound
from spanner.schemas import NodeIn, NodeOut, NodePatch, NodePut

router = APIRouter(prefix="/api/v1/nodes", tags=["nodes"], dependencies=[Depends(require_query)])
ADMIN = [Depends(require_admin)]


@router.get("", response_model=list[NodeOut])
def list_nodes(s: Services = Depends(services)) -> list[NodeOut]:
    return s.repo.list_nodes()


@router.post("", response_model=NodeOut, status_code=201, dependencies=ADMIN)
def create_node(body: NodeIn, s: Services = Depends(services)) -> NodeOut:
    node = s.repo.create_node(body)
    s.cache.invalidate_node(node.name)  # a node of that name may have existed, with other answers
    s.sync_actor(node.name)
    return node


@router.get("/{name}", response_model=NodeOut)
def get_node(name: str, s: Services = Depends(services)) -> NodeOut:
    return s.repo.get_node(name)


@router.put("/{name}", response_model=NodeOut, dependencies=ADMIN)
def replace_node(name: str, body: NodePut, s: Services = Depends(services)) -> NodeOut:
    node = s.repo.replace_node(name, body)
    s.cache.invalidate_node(name)
    s.sync_actor(name)
    return node


@router.patch("/{name}", response_model=NodeOut, dependencies=ADMIN)
def patch_node(name: str, body: NodePatch, s: Services = Depends(services)) -> NodeOut:
    node = s.repo.patch_node(name, body)
    s.cache.invalidate_node(name)
    s.sync_actor(name)
    return node


@router.delete("/{name}", status_code=204, dependencies=ADMIN)
def delete_node(name: str, s: Services = Depends(services)) -> Response:
    s.repo.delete_node(name)
    s.cache.invalidate_node(name)
    s.sync_actor(name)
    return Response(status_code=204)


@router.post("/{name}/echo", response_model=EchoOut, dependencies=ADMIN)
async def echo_node(
    name: str, timeout_s: float = Query(5.0, gt=0, le=60), s: Services = Depends(services)
) -> EchoOut:
    """A C-ECHO through the node's actor (its pool, throttle and circuit breaker)."""
    node = await asyncio.to_thread(s.repo.get_node, name)
    if not node.enabled:
        raise NotFound(f"node {name!r} is disabled; enable it with PATCH /api/v1/nodes/{name}")
    handle = await s.coordinator.handle(s.spec_for(node))
    outcome = await handle.echo.remote(timeout_s)
    return EchoOut(
        node=name,
        status=outcome.status.value,
        elapsed_ms=outcome.elapsed_ms,
        dimse_status=outcome.dimse_status,
        error=outcome.error,
    )
