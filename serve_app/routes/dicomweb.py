"""The DICOMweb front: /dicomweb serves span ``all``, /dicomweb/spans/{span} any span (``mount``).

Routes translate HTTP only: QIDO-RS search parameters go to serve_app.usecases.qido, which runs them
as a spanning query. API keys as on /api (role ``query``); the audit records channel ``dicomweb``.
Errors: a bad parameter is 400 and names it, an Accept this front cannot satisfy is 406, a span
unknown is 404, a search failed under its span's failure strategy is 502; every error body is
``{"detail": ...}``. The routes stay out of the OpenAPI document: DICOMweb is specified by PS3.18.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from serve_app.auth import Principal, audit_of, require_query
from serve_app.deps import ServicesDep
from serve_app.routes.queries import RecordedResponse, cache_directives
from serve_app.timing import arrived
from serve_app.usecases import qido
from spanner.errors import InvalidQuery
from spanner.query import Level
from spanner.schemas import ALL_SPAN, Channel

PREFIX = "/dicomweb"
SPAN_PREFIX = PREFIX + "/spans/{span}"
JSON_TYPES = frozenset({qido.JSON_MEDIA_TYPE, "application/json"})

router = APIRouter(tags=["dicomweb"], dependencies=[Depends(require_query)], include_in_schema=False)


def mount(app: FastAPI, dicomweb_router: APIRouter) -> None:
    """Serve ``dicomweb_router`` for span ``all`` under /dicomweb and for any span under
    /dicomweb/spans/{span} (routes read the span with ``span_of``)."""
    app.include_router(dicomweb_router, prefix=PREFIX)
    app.include_router(dicomweb_router, prefix=SPAN_PREFIX)


def span_of(request: Request) -> str:
    """The span a DICOMweb request is for: from the path under /dicomweb/spans/{span}, else ``all``."""
    return str(request.path_params.get("span", ALL_SPAN))


def root_of(request: Request) -> str:
    """This front's URL for the request's span (what RetrieveURLs and BulkDataURIs start with)."""
    base = str(request.base_url).rstrip("/")
    span = request.path_params.get("span")
    return base + (PREFIX if span is None else SPAN_PREFIX.replace("{span}", str(span)))


def accepts(request: Request, offered: Iterable[str]) -> bool:
    """Whether the request's Accept allows one of ``offered`` (no Accept allows anything)."""
    header = request.headers.get("accept", "").strip()
    if not header:
        return True
    offered = {media.lower() for media in offered}
    for item in header.split(","):
        media, *params = (part.strip().lower() for part in item.split(";"))
        if _quality(params) <= 0:
            continue
        if media == "*/*" or media in offered:
            return True
        if media.endswith("/*") and any(o.startswith(media[:-1]) for o in offered):
            return True
    return False


def _quality(params: list[str]) -> float:
    for param in params:
        name, _, value = param.partition("=")
        if name.strip() == "q":
            try:
                return float(value.strip())
            except ValueError:
                return 0.0
    return 1.0


def not_acceptable(offered: Iterable[str]) -> JSONResponse:
    return JSONResponse({"detail": "this resource answers " + " or ".join(sorted(offered)) +
                         "; send an Accept header that allows it"}, status_code=406)


def bad_request(exc: InvalidQuery) -> JSONResponse:
    return JSONResponse({"detail": exc.message}, status_code=400)


def warning_agent(request: Request) -> str:
    return request.url.netloc or "dicom-spanner"


class DicomJsonResponse(RecordedResponse):
    """A QIDO-RS answer (application/dicom+json) whose query record is written once it has gone."""

    media_type = qido.JSON_MEDIA_TYPE


async def _search(
    request: Request, s: ServicesDep, principal: Principal, level: Level, study: str | None = None,
    series: str | None = None,
) -> Response:
    if not accepts(request, JSON_TYPES):
        return not_acceptable(JSON_TYPES)
    directives = cache_directives(request.headers.get("cache-control"))
    requester = request.client.host if request.client else "unknown"
    try:
        search = qido.parse(level, list(request.query_params.multi_items()), study, series)
        answer = await qido.search(
            s, span_of(request), search, audit_of(request, principal, None, Channel.DICOMWEB), requester,
            root_of(request), read_cache="no-cache" not in directives, store="no-store" not in directives,
            arrived=arrived(request),
        )
    except InvalidQuery as exc:  # a parameter, or the span cannot take the search (no node, timeout)
        return bad_request(exc)
    s.records.reserve()
    response: Response = DicomJsonResponse(
        answer.body, answer.status, functools.partial(s.records.hand_over, answer.record))
    if answer.status != 200:
        response.headers["content-type"] = "application/json"
    agent = warning_agent(request)
    for text in answer.warnings:
        response.headers.append("Warning", qido.warning_header(agent, text))
    return response


@router.get("/studies")
async def search_studies(request: Request, s: ServicesDep,
                         principal: Principal = Depends(require_query)) -> Response:
    return await _search(request, s, principal, Level.STUDY)


@router.get("/series")
async def search_series(request: Request, s: ServicesDep,
                        principal: Principal = Depends(require_query)) -> Response:
    return await _search(request, s, principal, Level.SERIES)


@router.get("/instances")
async def search_instances(request: Request, s: ServicesDep,
                           principal: Principal = Depends(require_query)) -> Response:
    return await _search(request, s, principal, Level.IMAGE)


@router.get("/studies/{study}/series")
async def search_study_series(study: str, request: Request, s: ServicesDep,
                              principal: Principal = Depends(require_query)) -> Response:
    return await _search(request, s, principal, Level.SERIES, study)


@router.get("/studies/{study}/instances")
async def search_study_instances(study: str, request: Request, s: ServicesDep,
                                 principal: Principal = Depends(require_query)) -> Response:
    return await _search(request, s, principal, Level.IMAGE, study)


@router.get("/studies/{study}/series/{series}/instances")
async def search_series_instances(study: str, series: str, request: Request, s: ServicesDep,
                                  principal: Principal = Depends(require_query)) -> Response:
    return await _search(request, s, principal, Level.IMAGE, study, series)
