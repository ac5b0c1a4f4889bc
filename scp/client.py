"""The DICOM front's HTTP client of the Serve API: every call can be abandoned half-way.

Requests run on one asyncio loop in a background thread; a handler thread waits on them in short
polls so that a C-CANCEL (or a vanished peer) cancels the request's task at once. Cancelling an
httpx request closes its connection, which is how Ray Serve learns that the caller left and
cancels the spanning query behind it. httpx errors are translated here, at the boundary.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import queue
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

import httpx

from scp.errors import Abandoned, ApiError, ApiFailed, ApiRejected, ApiUnreachable, FrontKeyRefused

LOG = logging.getLogger(__name__)
T = TypeVar("T")
Json = dict[str, Any]
StopCheck = Callable[[], bool]

POLL_S = 0.01  # how often a waiting handler looks at C-CANCEL and at its association
_END = object()


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
    if code in (401, 403):
        refused = FrontKeyRefused(f"the spanner API refused the DICOM front's API key ({code}: {detail}); "
                                  "set SPANNER_SCP_API_KEY to a key of role dicom_front "
                                  "(`spanner keys create dicom-front --role dicom_front`)", code)
        LOG.error("%s", refused, extra={"event": "scp.api_key_refused", "status": code})
        return refused
    if 400 <= code < 500:
        return ApiRejected(detail, code)
    if code == 502:
        return ApiFailed(f"spanning query failed: {detail}", code)
    return ApiFailed(f"spanner API error {code}: {detail}", code)


def _unreachable(base_url: str, exc: httpx.TransportError) -> ApiUnreachable:
    return ApiUnreachable(f"spanner API at {base_url} unreachable: {type(exc).__name__} {exc}".strip())


class Pending(Generic[T]):
    """One request in flight; ``wait`` returns its result or abandons it when ``stop()`` says so."""

    def __init__(self, future: concurrent.futures.Future[T]) -> None:
        self._future = future

    def wait(self, stop: StopCheck) -> T:
        while True:
            try:
                return self._future.result(timeout=POLL_S)
            except concurrent.futures.TimeoutError:
                if stop():
                    self.cancel()
                    raise Abandoned("the DICOM client cancelled; the HTTP request was closed") from None
            except concurrent.futures.CancelledError:
                raise Abandoned("the HTTP request was cancelled") from None

    def cancel(self) -> None:
        self._future.cancel()


class EventStream:
    """The NDJSON lines of a streamed answer, read on the loop and handed over through a queue."""

    def __init__(self) -> None:
        self._queue: queue.Queue[object] = queue.Queue()
        self._future: concurrent.futures.Future[None] | None = None

    def attach(self, future: concurrent.futures.Future[None]) -> None:
        self._future = future

    def put(self, item: object) -> None:
        self._queue.put(item)

    def next(self, stop: StopCheck) -> Json | None:
        """The next event, None at the end of the stream; raises the stream's error or Abandoned."""
        while True:
            if stop():
                self.close()
                raise Abandoned("the DICOM client cancelled; the HTTP stream was closed")
            try:
                item = self._queue.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if item is _END:
                return None
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, dict)
            return item

    def close(self) -> None:
        """Stop reading and close the connection (idempotent)."""
        if self._future is not None:
            self._future.cancel()


class SpannerClient:
    """HTTP client of one spanner API; ``start()`` before use, ``close()`` after."""

    def __init__(self, base_url: str, read_timeout_s: float = 330.0, connect_timeout_s: float = 5.0,
                 api_key: str = "") -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = httpx.Timeout(read_timeout_s, connect=connect_timeout_s)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._http: httpx.AsyncClient | None = None
        self._lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> SpannerClient:
        with self._lock:
            if self._loop is not None:
                return self
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="scp-http", daemon=True)
            thread.start()
            self._loop, self._thread = loop, thread
        self._http = self._submit(self._make_client()).result(5)
        return self

    async def _make_client(self) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=20)
        return httpx.AsyncClient(base_url=self.base_url, timeout=self._timeout, limits=limits,
                                 headers=self._headers)

    def close(self) -> None:
        with self._lock:
            loop, thread, http = self._loop, self._thread, self._http
            self._loop = self._thread = self._http = None
        if loop is None:
            return
        if http is not None:
            with contextlib.suppress(Exception):  # closing is best effort; the loop goes anyway
                asyncio.run_coroutine_threadsafe(http.aclose(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(5)
        loop.close()

    def __enter__(self) -> SpannerClient:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        if self._loop is None:
            coro.close()
            raise ApiUnreachable("the SCP's HTTP client is not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            raise ApiUnreachable("the SCP's HTTP client is not started")
        return self._http

    # -- calls ---------------------------------------------------------------------------------
    def spans(self, timeout_s: float) -> list[Json]:
        """GET /api/v1/spans within ``timeout_s``."""
        future = self._submit(self._get_spans(timeout_s))
        try:
            return future.result(timeout_s + 1.0)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise ApiUnreachable(f"spanner API at {self.base_url} silent for {timeout_s:g} s") from None

    async def _get_spans(self, timeout_s: float) -> list[Json]:
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

    def query(self, body: Json, headers: dict[str, str] | None = None) -> Pending[Json]:
        """POST /api/v1/queries; the answer of a failed spanning query (502) raises ApiFailed.
        ``headers`` name the DICOM caller for the audit trail."""
        return Pending(self._submit(self._post_query(body, headers or {})))

    async def _post_query(self, body: Json, headers: dict[str, str]) -> Json:
        try:
            response = await self._client().post("/api/v1/queries", json=body, headers=headers)
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

    def retrieve(self, body: Json, headers: dict[str, str] | None = None) -> EventStream:
        """POST /api/v1/retrievals; its NDJSON events are read as they come."""
        stream = EventStream()
        stream.attach(self._submit(self._stream_retrieval(body, stream, headers or {})))
        return stream

    async def _stream_retrieval(self, body: Json, stream: EventStream, headers: dict[str, str]) -> None:
        try:
            async with self._client().stream("POST", "/api/v1/retrievals", json=body,
                                             headers=headers) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise http_error(response)
                async for line in response.aiter_lines():
                    if line.strip():
                        stream.put(_event(line))
            stream.put(_END)
        except httpx.TransportError as exc:
            stream.put(_unreachable(self.base_url, exc))
        except ApiError as exc:
            stream.put(exc)
        except Exception as exc:  # never leave the reader waiting on a queue nobody fills
            stream.put(ApiFailed(f"retrieval stream broke: {type(exc).__name__}: {exc}"))


def _event(line: str) -> Json | ApiFailed:
    try:
        event = json.loads(line)
    except ValueError:
        return ApiFailed(f"unreadable retrieval event: {line[:80]!r}", 200)
    if not isinstance(event, dict):
        return ApiFailed(f"retrieval event is not an object: {line[:80]!r}", 200)
    return event
