"""Spanner errors -> HTTP status, translated once at the ingress boundary."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
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


async def _spanner_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, SpannerError)
    headers: dict[str, str] | None = None
    if isinstance(exc, Unauthenticated):
        headers = {"WWW-Authenticate": "Bearer"}
    elif isinstance(exc, Overloaded):
        headers = {"Retry-After": str(exc.retry_after_s)}
    return JSONResponse({"detail": exc.message}, status_code=status_for(exc), headers=headers)


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
    return JSONResponse({"detail": describe_problems(exc.errors())}, status_code=422)


def install(app: FastAPI) -> None:
    app.add_exception_handler(SpannerError, _spanner_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
