"""/api/v1/destinations: where the spanner itself may send retrieved instances (rules:
serve_app.usecases.destinations)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response

from serve_app.auth import Principal, require_admin, require_query
from serve_app.deps import ServicesDep
from serve_app.usecases import destinations
from spanner.schemas import DestinationIn, DestinationOut, DestinationPatch, DestinationPut

router = APIRouter(prefix="/api/v1/destinations", tags=["destinations"],
                   dependencies=[Depends(require_query)])
AdminDep = Annotated[Principal, Depends(require_admin)]


@router.get("", response_model=list[DestinationOut])
def list_destinations(s: ServicesDep) -> list[DestinationOut]:
    return s.repo.list_destinations()


@router.post("", response_model=DestinationOut, status_code=201)
async def create_destination(body: DestinationIn, s: ServicesDep, admin: AdminDep) -> DestinationOut:
    return await destinations.create(s, body, admin)


@router.get("/{name}", response_model=DestinationOut)
def get_destination(name: str, s: ServicesDep) -> DestinationOut:
    return s.repo.get_destination(name)


@router.put("/{name}", response_model=DestinationOut)
async def replace_destination(name: str, body: DestinationPut, s: ServicesDep,
                              admin: AdminDep) -> DestinationOut:
    return await destinations.replace(s, name, body, admin)


@router.patch("/{name}", response_model=DestinationOut)
async def patch_destination(name: str, body: DestinationPatch, s: ServicesDep,
                            admin: AdminDep) -> DestinationOut:
    return await destinations.patch(s, name, body, admin)


@router.delete("/{name}", status_code=204)
async def delete_destination(name: str, s: ServicesDep, admin: AdminDep) -> Response:
    await destinations.delete(s, name, admin)
    return Response(status_code=204)
