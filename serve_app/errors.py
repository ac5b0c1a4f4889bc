"""Spanner errors -> HTTP status, translated once at the ingress boundary."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse

from serve_app.admission import Overloaded
from spanner.errors import (
    Conflict,
    InvalidConfig,
    InvalidQuery,
    NotFound,
    SpannerError,
    StorageError,
)


class Unauthenticated(SpannerError):
    """No API key, or one that is unknown or revoked (HTTP 401)."""


class Forbidden(SpannerError):
    """A valid API key whose role does not allow what it asked (HTTP 403)."""


STATUS: list[tuple[type[SpannerError], int]] = [
    (Unauthenticated, 401),
    (Forbidden, 403),
    (NotFound, 404),
    (Conflict, 409),
    (InvalidQuery, 422),
    (InvalidConfig, 422),
    (StorageError, 503),
    (Overloaded, 503),
]


def status_for(exc: SpannerError) -> int:
    for kind, code in STATUS:
        if isinstance(exc, kind):
            return code
    return 500


def printable(text: str) -> str:
    """``text`` encodable as UTF-8: a lone surrogate quoted from the request becomes ``\\ud800``."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


async def _spanner_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, SpannerError)
    headers: dict[str, str] | None = None
    if isinstance(exc, Unauthenticated):
        headers = {"WWW-Authenticate": "Bearer"}
    elif isinstance(exc, Overloaded):
        headers = {"Retry-After": str(exc.retry_after_s)}
    return JSONResponse({"detail": printable(exc.message)}, status_code=status_for(exc), headers=headers)


def describe_problems(errors: Sequence[Mapping[str, Any]]) -> str:
    """Pydantic's errors as one line: per problem, where it is and what would be accepted."""
    problems = []
    for error in errors:
        loc = [str(p) for p in error.get("loc", ()) if p != "body"]
        where = ".".join(loc)
        message = str(error.get("msg", "invalid"))
        if error.get("type") == "json_invalid":
            message = f"the body is not valid JSON ({error.get('ctx', {}).get('error', 'parse error')})"
        elif error.get("type") == "extra_forbidden":
            message = "unknown field; see /docs for the accepted fields"
        problems.append(f"{where}: {message}" if where else message)
    return "; ".join(problems) or "invalid request"


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """422 whose detail says, per problem, where it is and what would be accepted."""
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"detail": printable(describe_problems(exc.errors()))}, status_code=422)


ERROR_SCHEMA: dict[str, Any] = {
    "title": "Error",
    "type": "object",
    "properties": {"detail": {"type": "string", "description": "What is wrong and what would be accepted"}},
    "required": ["detail"],
}
ERROR_REF = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
API_ERRORS = {
    "401": "No API key, or an unknown or revoked one (authentication on)",
    "403": "The key's role does not allow this, or a key other than a dicom_front one named a DICOM caller",
    "422": "A value is not acceptable; the detail names it",
    "503": "The database is unavailable, or the replica is at capacity (then with Retry-After)",
}


def openapi_of(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, made to match what the handlers above answer: every error is
    ``{"detail": "<string>"}`` (FastAPI declares a list for 422), and each /api operation declares the
    statuses it can answer: 401/403/422/503 all, 404 where a path names a resource or a body a span, 409
    where a node or span is written."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.pop("ValidationError", None)
    components["HTTPValidationError"] = ERROR_SCHEMA | {"title": "HTTPValidationError"}
    components["Error"] = ERROR_SCHEMA
    retry_after = {"Retry-After": {"description": "Seconds to wait before retrying (at capacity)",
                                   "schema": {"type": "integer"}}}
    for path, operations in schema.get("paths", {}).items():
        if not path.startswith("/api/"):
            continue
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            declared = dict(API_ERRORS)
            if "{" in path:
                declared["404"] = "No such resource"
            elif method == "post" and path in ("/api/v1/queries", "/api/v1/retrievals"):
                declared["404"] = "The span does not exist"
            if method in ("post", "put", "patch") and path.startswith(("/api/v1/nodes", "/api/v1/spans")):
                declared["409"] = "Conflicts with what exists (a duplicate name or AE title, a member in use)"
            for code, description in declared.items():
                responses.setdefault(code, {"description": description, **ERROR_REF})
            responses["422"] = {"description": API_ERRORS["422"], **ERROR_REF}
            responses["503"] = {"description": API_ERRORS["503"], "headers": retry_after, **ERROR_REF}
    app.openapi_schema = schema
    return schema


def install(app: FastAPI) -> None:
    app.add_exception_handler(SpannerError, _spanner_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.openapi = lambda: openapi_of(app)  # type: ignore[method-assign]
