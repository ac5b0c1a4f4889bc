"""WADO-RS (PS3.18 10.4) under /dicomweb (span ``all``) and /dicomweb/spans/{span}: retrieval of studies,
series and instances, their metadata, frames and bulk data; the rules live in serve_app.usecases.wado.

Multipart answers stream: each part leaves as its instance arrives in the spool. A retrieval cut short
(an archive gone mid-study) still ends its multipart properly, after one last part of type
``application/json`` that says what is missing and why; every part before it is whole. Metadata is
collected before it is sent (DICOM JSON without bulk data is small), so a partial one is a 200 with a
``Warning`` header naming what failed. Rendered and thumbnail resources are answered 501.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from actors.wado_stream import Done, InstanceHead
from serve_app.auth import Principal, require_query
from serve_app.deps import ServicesDep
from serve_app.routes.dicomweb import root_of, span_of
from serve_app.usecases import wado as usecase
from serve_app.usecases.wado import Resource, Target
from spanner import wado
from spanner.dicom_constants import MEDIA_DICOM, MEDIA_DICOM_JSON, MEDIA_MULTIPART, MEDIA_OCTET_STREAM

_ERROR = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "multipart/related parts, or application/dicom+json for metadata",
          "content": {MEDIA_MULTIPART: {}, MEDIA_DICOM_JSON: {}}},
    400: {"description": "A malformed UID, frame list or tag; a frame beyond the instance's", **_ERROR},
    401: {"description": "No API key, or an unknown or revoked one (authentication on)", **_ERROR},
    403: {"description": "The key's role does not allow this", **_ERROR},
    404: {"description": "No archive of the span holds it, or the span does not exist", **_ERROR},
    406: {"description": "The Accept header asks for nothing this front sends", **_ERROR},
    501: {"description": "Rendered and thumbnail resources; frames it cannot cut", **_ERROR},
    502: {"description": "Every archive asked failed to send what was found (their reasons)", **_ERROR},
    503: {"description": "The database is unavailable", **_ERROR},
}
router = APIRouter(tags=["dicomweb"], dependencies=[Depends(require_query)], responses=RESPONSES)
STATUS = {"bad_request": 400, "not_found": 404, "not_acceptable": 406, "not_implemented": 501,
          "upstream": 502}
STUDY = "/studies/{study}"
SERIES = STUDY + "/series/{series}"
INSTANCE = SERIES + "/instances/{sop}"


def error(exc: wado.WadoError) -> JSONResponse:
    return JSONResponse({"detail": exc.message}, status_code=STATUS.get(exc.kind, 400))


async def _open(request: Request, s: ServicesDep, principal: Principal, t: Target, resource: Resource,
                frames: tuple[int, ...] = (), bulk_tag: int | None = None) -> usecase.Stream:
    client = request.client.host if request.client else None
    return await usecase.open_stream(
        s, t, resource, accept=request.headers.get("accept"), base_url=root_of(request),
        audit=usecase.audit_for(principal.name, client), requester=client or "unknown", frames=frames,
        bulk_tag=bulk_tag)


async def multipart(stream: usecase.Stream, part_type: str) -> Response:
    mark = wado.boundary()

    async def body() -> AsyncIterator[bytes]:
        started = False
        async with contextlib.aclosing(stream.items()) as items:
            async for item in items:
                if isinstance(item, InstanceHead):
                    if started:
                        yield b"\r\n"
                    yield wado.part_head(mark, item.content_type)
                    started = True
                elif isinstance(item, bytes):
                    yield item
        if stream.done is None:
            return  # cut short without an end: the missing close-delimiter says so
        if started:
            yield b"\r\n"
        if not stream.done.complete:
            yield wado.part_head(mark, "application/json")
            yield json.dumps({"partial": True, "delivered": stream.done.delivered,
                              "missing": list(stream.done.missing),
                              "detail": usecase.describe(stream.done)}).encode() + b"\r\n"
        yield wado.closing(mark)

    media = f'{MEDIA_MULTIPART}; type="{part_type}"; boundary={mark}'
    if stream.first and isinstance(stream.first[-1], Done):
        # The whole answer came in the first pull (at most about 1 MiB: frames, a small instance, a
        # warm series of small ones): one plain response, which Serve relays faster than a stream.
        return Response(b"".join([chunk async for chunk in body()]), media_type=media)
    return ClosingStreamingResponse(body(), media_type=media)


class ClosingStreamingResponse(StreamingResponse):
    """Closes its body at once when the answer ends, also when the client went away: Starlette leaves
    a cancelled body generator to the garbage collector, and only its closing cancels the archives'
    C-MOVEs and frees the store actor's session."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            body = self.body_iterator
            if isinstance(body, AsyncGenerator):
                await body.aclose()


async def _retrieve(request: Request, s: ServicesDep, principal: Principal, study: str,
                    series: str | None = None, sop: str | None = None) -> Response:
    try:
        t = usecase.target(span_of(request), study, series, sop)
        stream = await _open(request, s, principal, t, Resource.INSTANCES)
    except wado.WadoError as exc:
        return error(exc)
    return await multipart(stream, MEDIA_DICOM)


async def _metadata(request: Request, s: ServicesDep, principal: Principal, study: str,
                    series: str | None = None, sop: str | None = None) -> Response:
    try:
        t = usecase.target(span_of(request), study, series, sop)
        stream = await _open(request, s, principal, t, Resource.METADATA)
    except wado.WadoError as exc:
        return error(exc)
    async with contextlib.aclosing(stream.items()) as items:
        texts = [item async for item in items if isinstance(item, str)]
    headers = {}
    if stream.done is not None and not stream.done.complete:
        headers["Warning"] = f'299 dicom-spanner "{usecase.describe(stream.done)[:500]}"'
    body = ("[" + ",".join(texts) + "]").encode()
    return Response(body, media_type=MEDIA_DICOM_JSON, headers=headers)


@router.get(STUDY, response_class=Response)
async def retrieve_study(study: str, request: Request, s: ServicesDep,
                         principal: Principal = Depends(require_query)) -> Response:
    return await _retrieve(request, s, principal, study)


@router.get(SERIES, response_class=Response)
async def retrieve_series(study: str, series: str, request: Request, s: ServicesDep,
                          principal: Principal = Depends(require_query)) -> Response:
    return await _retrieve(request, s, principal, study, series)


@router.get(INSTANCE, response_class=Response)
async def retrieve_instance(study: str, series: str, sop: str, request: Request, s: ServicesDep,
                            principal: Principal = Depends(require_query)) -> Response:
    return await _retrieve(request, s, principal, study, series, sop)


@router.get(STUDY + "/metadata", response_class=Response)
async def study_metadata(study: str, request: Request, s: ServicesDep,
                         principal: Principal = Depends(require_query)) -> Response:
    return await _metadata(request, s, principal, study)


@router.get(SERIES + "/metadata", response_class=Response)
async def series_metadata(study: str, series: str, request: Request, s: ServicesDep,
                          principal: Principal = Depends(require_query)) -> Response:
    return await _metadata(request, s, principal, study, series)


@router.get(INSTANCE + "/metadata", response_class=Response)
async def instance_metadata(study: str, series: str, sop: str, request: Request, s: ServicesDep,
                            principal: Principal = Depends(require_query)) -> Response:
    return await _metadata(request, s, principal, study, series, sop)


@router.get(INSTANCE + "/frames/{frames}", response_class=Response)
async def retrieve_frames(study: str, series: str, sop: str, frames: str, request: Request, s: ServicesDep,
                          principal: Principal = Depends(require_query)) -> Response:
    try:
        t = usecase.target(span_of(request), study, series, sop)
        stream = await _open(request, s, principal, t, Resource.FRAMES, frames=usecase.frame_numbers(frames))
    except wado.WadoError as exc:
        return error(exc)
    return await multipart(stream, MEDIA_OCTET_STREAM)


@router.get(INSTANCE + "/bulkdata/{tag}", response_class=Response)
async def retrieve_bulkdata(study: str, series: str, sop: str, tag: str, request: Request, s: ServicesDep,
                            principal: Principal = Depends(require_query)) -> Response:
    try:
        t = usecase.target(span_of(request), study, series, sop)
        stream = await _open(request, s, principal, t, Resource.BULK, bulk_tag=wado.tag_of(tag))
    except wado.WadoError as exc:
        return error(exc)
    return await multipart(stream, MEDIA_OCTET_STREAM)


NOT_RENDERED = ("rendered and thumbnail resources are not supported by this front; retrieve frames "
                "(/frames/{list}) and render them in the viewer")


@router.get(STUDY + "/rendered", include_in_schema=False)
@router.get(STUDY + "/thumbnail", include_in_schema=False)
@router.get(SERIES + "/rendered", include_in_schema=False)
@router.get(SERIES + "/thumbnail", include_in_schema=False)
@router.get(INSTANCE + "/rendered", include_in_schema=False)
@router.get(INSTANCE + "/thumbnail", include_in_schema=False)
@router.get(INSTANCE + "/frames/{frames}/rendered", include_in_schema=False)
@router.get(INSTANCE + "/frames/{frames}/thumbnail", include_in_schema=False)
async def not_rendered() -> JSONResponse:
    """501 Not Implemented: the standard status for a resource the origin server does not support. Left
    out of the OpenAPI document: these resources are not offered, only answered."""
    return JSONResponse({"detail": NOT_RENDERED}, status_code=501)
