"""A stand-in for the spanner HTTP API on a loopback port: canned spans, answers and NDJSON streams.

It lets the DICOM front be tested status by status without Ray, and it notices when a client
closes its connection early (which is how the front cancels a request behind a C-CANCEL).
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.peers.ports import LOOPBACK

Json = dict[str, Any]


@dataclass
class Reply:
    """What one request gets: a status and JSON body, or (status 200) NDJSON ``lines``.

    Status 0 closes the connection without an answer (an API that died mid-request).
    ``delay_s`` passes before the answer (a query) or between lines (a stream); ``hold_s`` keeps a
    stream open after its last line. While waiting, a client that closes is noticed and counted.
    """

    status: int = 200
    body: Any = None
    lines: list[Json] | None = None
    delay_s: float = 0.0
    hold_s: float = 0.0


@dataclass
class FakeApi:
    spans: list[Json] = field(default_factory=list)
    on_query: Callable[[Json], Reply] = lambda body: Reply(body={"status": "success", "total": 0,
                                                                 "matches": []})
    on_retrieval: Callable[[Json], Reply] = lambda body: Reply(404, {"detail": "Not Found"})
    spans_reply: Reply | None = None
    requests: list[tuple[str, Json]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)  # of each POST, in order
    disconnects: list[str] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://{LOOPBACK}:{self._server.server_address[1]}"

    def start(self) -> FakeApi:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                api.requests.append((self.path, {}))
                if self.path == "/api/v1/spans":
                    self._reply(api.spans_reply or Reply(body=api.spans))
                else:
                    self._reply(Reply(404, {"detail": "Not Found"}))

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                api.requests.append((self.path, body))
                api.headers.append({key.lower(): value for key, value in self.headers.items()})
                if self.path == "/api/v1/queries":
                    self._reply(api.on_query(body))
                elif self.path == "/api/v1/retrievals":
                    self._reply(api.on_retrieval(body))
                else:
                    self._reply(Reply(404, {"detail": "Not Found"}))

            def _client_left(self, seconds: float) -> bool:
                """Wait ``seconds``; True as soon as the client closed its end."""
                end = time.monotonic() + seconds
                while (left := end - time.monotonic()) > 0:
                    readable, _, _ = select.select([self.connection], [], [], min(left, 0.01))
                    if readable and not self.connection.recv(1, socket.MSG_PEEK):
                        api.disconnects.append(self.path)
                        return True
                return False

            def _reply(self, reply: Reply) -> None:
                if self._client_left(reply.delay_s if reply.lines is None else 0.0):
                    return
                try:
                    if reply.status == 0:
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    if reply.lines is None:
                        data = json.dumps(reply.body).encode()
                        self.send_response(reply.status)
                        self.send_header("Content-Type", "application/json")
                        self.send_header("Content-Length", str(len(data)))
                        self.end_headers()
                        self.wfile.write(data)
                        return
                    self.send_response(200)
                    self.send_header("Content-Type", "application/x-ndjson")
                    self.end_headers()
                    for line in reply.lines:
                        self.wfile.write((json.dumps(line) + "\n").encode())
                        self.wfile.flush()
                        if self._client_left(reply.delay_s):
                            return
                    self._client_left(reply.hold_s)
                except OSError:
                    api.disconnects.append(self.path)

        self._server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def posted(self, path: str) -> list[Json]:
        return [body for p, body in self.requests if p == path]


def span(name: str, ae_title: str, allowed: list[str] | None = None, max_results: int = 1000) -> Json:
    return {"name": name, "ae_title": ae_title, "allowed_calling_aets": allowed or [],
            "max_results": max_results}
