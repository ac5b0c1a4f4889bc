"""/api/v1/nodes: the PACS the spanner queries (the rules of a change: serve_app.usecases.nodes)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Response

from serve_app.api_models import EchoOut
from serve_app.auth import require_admin, require_query
from serve_app.deps import ServicesDep
from serve_app.usecases import nodes
from spanner.schemas import NodeIn, NodeOut, NodePatch, NodePut

router = APIRouter(prefix="/api/v1/nodes", tags=["nodes"], dependencies=[Depends(require_query)])
ADMIN = [Depends(require_admin)]


@router.get("", response_model=list[NodeOut])
def list_nodes(s: ServicesDep) -> list[NodeOut]:
    return s.repo.list_nodes()


@router.post("", response_model=NodeOut, status_code=201, dependencies=ADMIN)
def create_node(body: NodeIn, s: ServicesDep) -> NodeOut:
    return nodes.create_node(s, body)


@router.get("/{name}", response_model=NodeOut)
def get_node(name: str, s: ServicesDep) -> NodeOut:
    return s.repo.get_node(name)


@router.put("/{name}", response_model=NodeOut, dependencies=ADMIN)
def replace_node(name: str, body: NodePut, s: ServicesDep) -> NodeOut:
    return nodes.replace_node(s, name, body)


@router.patch("/{name}", response_model=NodeOut, dependencies=ADMIN)
def patch_node(name: str, body: NodePatch, s: ServicesDep) -> NodeOut:
    return nodes.patch_node(s, name, body)


@router.delete("/{name}", status_code=204, dependencies=ADMIN)
def delete_node(name: str, s: ServicesDep) -> Response:
    nodes.delete_node(s, name)
    return Response(status_code=204)


@router.post("/{name}/echo", response_model=EchoOut, dependencies=ADMIN)
async def echo_node(name: str, s: ServicesDep, timeout_s: float = Query(5.0, gt=0, le=60)) -> EchoOut:
    """A C-ECHO through the node's actor (its pool, throttle and circuit breaker)."""
    outcome = await nodes.echo_node(s, name, timeout_s)
    return EchoOut(
        node=name,
        status=outcome.status.value,
        elapsed_ms=outcome.elapsed_ms,
        dimse_status=outcome.dimse_status,
        error=outcome.error,
    )
