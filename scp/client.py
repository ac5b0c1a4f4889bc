"""The DICOM front's HTTP client of the Serve API, on the front's event loop.

Every call is a coroutine, so a C-CANCEL (or a vanished peer) abandons it by cancelling its task.
Cancelling an httpx request closes its connection, which is how Ray Serve learns that the caller
left and cancels the spanning query behind it. httpx errors are translated here, at the boundary.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

import httpx

from scp.errors import ApiError, ApiFailed, ApiRejected, ApiUnreachable

Json = dict[str, Any]


def _detail(response: httpx.Response) -> str:
    """FastAPI's ``{"detail": ...}`` as one line, else the body's start."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    if not isinstance(body, dict):
        return str(body)[:500]
    detail = body.get("detail")
    if isinstance(detail, list):  # FastAPI's own validation errors
        return "; ".join(str(i.get("msg", i)) if isinstance(i, dict) else str(i) for i in detail)
    if detail is None:  # a failed spanning query (502) carries the query answer and its reason
        return str(body.get("reason") or body.get("error") or body)[:500]
    return str(detail)[:500]


def http_error(response: httpx.Response) -> ApiError:
    """An HTTP error answer as the front's error: 4xx rejected, everything else failed."""
    detail = _detail(response)
    code = response.status_code
    if 400 <= code < 500:
        return ApiRejected(detail, code)
    if code == 502:
        return ApiFailed(f"spanning query failed: {detail}", code)
    return ApiFailed(f"spanner API error {code}: {detail}", code)


def _unreachable(base_url: str, exc: httpx.TransportError) -> ApiUnreachable:
    return ApiUnreachable(f"spanner API at {base_url} unreachable: {type(exc).__name__} {exc}".strip())


class SpannerClient:
    """HTTP client of one spanner API; ``start()`` before use, ``close()`` after."""

    def __init__(self, base_url: str, read_timeout_s: float = 330.0, connect_timeout_s: float = 5.0,
                 api_key: str = "") -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = httpx.Timeout(read_timeout_s, connect=connect_timeout_s)
        self._http: httpx.AsyncClient | None = None

    # -- lifecycle (on the loop that makes the calls) -------------------------------------------
    async def start(self) -> SpannerClient:
        if self._http is None:
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=20)
            self._http = httpx.AsyncClient(base_url=self.base_url, timeout=self._timeout, limits=limits,
                                           headers=self._headers)
        return self

    async def close(self) -> None:
        http, self._http = self._http, None
        if http is not None:
            await http.aclose()

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            raise ApiUnreachable("the SCP's HTTP client is not started")
        return self._http

    # -- calls ---------------------------------------------------------------------------------
    async def spans(self, timeout_s: float) -> list[Json]:
        """GET /api/v1/spans within ``timeout_s``."""
        try:
            response = await self._client().get("/api/v1/spans", timeout=timeout_s)
        except httpx.TransportError as exc:
            raise _unreachable(self.base_url, exc) from exc
        if response.status_code != 200:
            raise http_error(response)
        try:
            spans = response.json()
        except ValueError as exc:
            raise ApiFailed(f"GET /api/v1/spans answered no JSON: {exc}") from exc
        if not isinstance(spans, list):
            raise ApiFailed("GET /api/v1/spans answered no list")
        return spans

    async def query(self, body: Json, headers: dict[str, str] | None = None) -> Json:
        """POST /api/v1/queries; the answer of a failed spanning query (502) raises ApiFailed.
        ``headers`` name the DICOM caller for the audit trail."""
        try:
            response = await self._client().post("/api/v1/queries", json=body, headers=headers or {})
        except httpx.TransportError as exc:
            raise _unreachable(self.base_url, exc) from exc
        if response.status_code != 200:
            raise http_error(response)
        try:
            answer = response.json()
        except ValueError as exc:
            raise ApiFailed(f"the query answer is not JSON: {exc}", 200) from exc
        if not isinstance(answer, dict) or not isinstance(answer.get("matches"), list):
            raise ApiFailed("the query answer has no list of matches", 200)
        return answer

    async def retrieve(self, body: Json, headers: dict[str, str] | None = None) -> AsyncGenerator[Json, None]:
        """POST /api/v1/retrievals; its NDJSON events as they come (closing the iterator closes the
        connection)."""
        try:
            async with self._client().stream("POST", "/api/v1/retrievals", json=body,
                                             headers=headers or {}) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise http_error(response)
                async for line in response.aiter_lines():
                    if line.strip():
                        event = _event(line)
                        if isinstance(event, ApiFailed):
                            raise event
                        yield event
        except httpx.TransportError as exc:
            raise _unreachable(self.base_url, exc) from exc
        except (ApiError, GeneratorExit):
            raise
        except httpx.HTTPError as exc:
            raise ApiFailed(f"retrieval stream broke: {type(exc).__name__}: {exc}") from exc


def _event(line: str) -> Json | ApiFailed:
    try:
        event = json.loads(line)
    except ValueError:
        return ApiFailed(f"unreadable retrieval event: {line[:80]!r}", 200)
    if not isinstance(event, dict):
        return ApiFailed(f"retrieval event is not an object: {line[:80]!r}", 200)
    return event
