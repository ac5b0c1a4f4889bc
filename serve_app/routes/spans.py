"""/api/v1/spans: named sets of nodes with the policies of a spanning query."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response

from serve_app.auth import require_admin, require_query
from serve_app.deps import ServicesDep
from spanner.schemas import SpanIn, SpanOut, SpanPatch, SpanPut

router = APIRouter(prefix="/api/v1/spans", tags=["spans"], dependencies=[Depends(require_query)])
ADMIN = [Depends(require_admin)]


@router.get("", response_model=list[SpanOut])
def list_spans(s: ServicesDep) -> list[SpanOut]:
    return s.repo.list_spans()


@router.post("", response_model=SpanOut, status_code=201, dependencies=ADMIN)
def create_span(body: SpanIn, s: ServicesDep) -> SpanOut:
    return s.repo.create_span(body)


@router.get("/{name}", response_model=SpanOut)
def get_span(name: str, s: ServicesDep) -> SpanOut:
    return s.repo.get_span(name)


@router.put("/{name}", response_model=SpanOut, dependencies=ADMIN)
def replace_span(name: str, body: SpanPut, s: ServicesDep) -> SpanOut:
    return s.repo.replace_span(name, body)


@router.patch("/{name}", response_model=SpanOut, dependencies=ADMIN)
def patch_span(name: str, body: SpanPatch, s: ServicesDep) -> SpanOut:
    return s.repo.patch_span(name, body)


@router.delete("/{name}", status_code=204, dependencies=ADMIN)
def delete_span(name: str, s: ServicesDep) -> Response:
    s.repo.delete_span(name)
    return Response(status_code=204)
