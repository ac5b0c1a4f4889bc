"""The DICOM front: one pynetdicom AE that serves every span under its AE title and forwards to the API.

It never opens an association itself. pynetdicom's own C-MOVE SCP insists on storing the instances
to the Move Destination from this process; here the archives send them, so C-MOVE runs through
``_RelayQueryRetrieve``, which relays the handler's (status, identifier) pairs like a C-FIND. That
class replaces pynetdicom's Query/Retrieve service class for this AE only (other AEs in the process
keep pynetdicom's behaviour).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from io import BytesIO
from types import FrameType
from typing import Any, cast

from pynetdicom import AE, _config, evt
from pynetdicom import association as _association
from pynetdicom.dimse_primitives import C_MOVE
from pynetdicom.dsutils import encode
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import QueryRetrieveServiceClass, ServiceClass, attempt
from pynetdicom.status import STATUS_PENDING, code_to_category
from pynetdicom.transport import ThreadedAssociationServer

from scp import handlers, translate
from scp.client import SpannerClient
from scp.spans import SpanDirectory
from spanner.logs import configure_logging
from spanner.settings import Settings

LOG = logging.getLogger(__name__)

LISTEN_BACKLOG = 128  # socketserver listens with 5: a burst of connects then waits 1 s for SYN retries
SPAN_LOOKUP_TIMEOUT_S = 3.0  # well inside a caller's ACSE timeout (dcmtk and pynetdicom wait 30 s)
_SUPPORTED = (
    translate.VERIFICATION,
    translate.PATIENT_ROOT_FIND,
    translate.STUDY_ROOT_FIND,
    translate.PATIENT_ROOT_MOVE,
    translate.STUDY_ROOT_MOVE,
)


class FrontAE(AE):
    """The front's AE; its associations relay C-MOVE instead of storing (see _RelayQueryRetrieve)."""


class _RelayQueryRetrieve(QueryRetrieveServiceClass):
    """Query/Retrieve whose C-MOVE sends the EVT_C_MOVE handler's statuses as they come (FrontAE only)."""

    def _move_scp(self, req: C_MOVE, context: PresentationContext) -> None:
        if not isinstance(self.ae, FrontAE):
            super()._move_scp(req, context)
            return
        cx_id = cast(int, context.context_id)
        syntax = context.transfer_syntax[0]
        with attempt(self._response(req), self.dimse, cx_id, self.assoc) as ctx:
            ctx.error_msg = "Exception in handler bound to 'evt.EVT_C_MOVE'"
            ctx.error_status = 0xC511
            generator = evt.trigger(
                ctx.assoc,
                evt.EVT_C_MOVE,
                {"request": req, "context": context.as_tuple, "_is_cancelled": self.is_cancelled},
            )
        if not ctx.success or not self.assoc.is_established or generator is None:
            return
        for result, exc in self._wrap_handler(generator):
            if not self.assoc.is_established:
                return
            rsp = self._response(req)
            if exc:
                LOG.error("exception in the C-MOVE handler", exc_info=exc)
                rsp.Status = 0xC511
                self.dimse.send_msg(rsp, cx_id)
                return
            user_status, identifier = cast(tuple[Any, Any], result)
            rsp = self.validate_status(user_status, rsp)
            if identifier is not None:
                data = encode(identifier, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
                rsp.Identifier = BytesIO(cast(bytes, data))
            self.dimse.send_msg(rsp, cx_id)
            if code_to_category(cast(int, rsp.Status)) != STATUS_PENDING:
                return
        if self.assoc.is_established:  # the handler ended without a final status
            rsp = self._response(req)
            rsp.Status = 0xC512
            self.dimse.send_msg(rsp, cx_id)

    @staticmethod
    def _response(req: C_MOVE) -> C_MOVE:
        rsp = C_MOVE()
        rsp.MessageID = req.MessageID
        rsp.MessageIDBeingRespondedTo = req.MessageID
        rsp.AffectedSOPClassUID = req.AffectedSOPClassUID
        return rsp


_install_lock = threading.Lock()


def _install_relay() -> None:
    """Let associations build _RelayQueryRetrieve where pynetdicom would build its Q/R class (once)."""
    with _install_lock:
        original = _association.uid_to_service_class  # type: ignore[attr-defined]
        if getattr(original, "_spanner_relay", False):
            return

        def uid_to_service_class(uid: str) -> type[ServiceClass]:
            found: type[ServiceClass] = original(uid)
            return _RelayQueryRetrieve if found is QueryRetrieveServiceClass else found

        uid_to_service_class._spanner_relay = True  # type: ignore[attr-defined]
        _association.uid_to_service_class = uid_to_service_class  # type: ignore[attr-defined]


class SpannerScp:
    """The DICOM front: ``start()`` listens, ``stop()`` aborts open associations and closes the port."""

    def __init__(self, settings: Settings, base_url: str | None = None, port: int | None = None) -> None:
        self._settings = settings
        self.base_url = (base_url or settings.scp_url).rstrip("/")
        self._port = settings.scp_port if port is None else port
        self._ae: FrontAE | None = None
        self._server: ThreadedAssociationServer | None = None
        self._client: SpannerClient | None = None
        self.spans: SpanDirectory | None = None

    @property
    def port(self) -> int:
        """The bound port; 0 while not listening."""
        return int(self._server.server_address[1]) if self._server is not None else 0

    @property
    def active_associations(self) -> int:
        return len(self._ae.active_associations) if self._ae is not None else 0

    @property
    def host(self) -> str:
        return self._settings.scp_host

    def start(self) -> int:
        """Listen on scp_host:port (0 picks a free port) and return the bound port."""
        if self._server is not None:
            return self.port
        s = self._settings
        _install_relay()
        if not logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG):
            _config.LOG_RESPONSE_IDENTIFIERS = False  # formatting every match for an unread log costs CPU
        client = SpannerClient(self.base_url, read_timeout_s=s.max_timeout_s + s.node_grace_s + 30.0,
                               api_key=s.scp_api_key).start()
        spans = SpanDirectory(lambda: client.spans(SPAN_LOOKUP_TIMEOUT_S), ttl_s=s.scp_span_cache_ttl_s)
        front = handlers.Front(spans, client)
        ae = FrontAE(ae_title=s.ae_title)
        ae.require_called_aet = False  # on_requested checks the called AE title against the spans
        ae.require_calling_aet = []
        ae.maximum_associations = s.scp_max_associations
        ae.acse_timeout = s.scp_acse_timeout_s
        ae.dimse_timeout = s.scp_dimse_timeout_s
        ae.network_timeout = s.scp_network_timeout_s
        for sop_class in _SUPPORTED:
            ae.add_supported_context(sop_class)
        evt_handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, handlers.on_conn_open),
            (evt.EVT_CONN_CLOSE, handlers.on_conn_close),
            (evt.EVT_REQUESTED, handlers.on_requested, [front]),
            (evt.EVT_C_ECHO, handlers.on_echo),
            (evt.EVT_C_FIND, handlers.on_find, [front]),
            (evt.EVT_C_MOVE, handlers.on_move, [front]),
        ]
        try:
            server = ae.start_server((s.scp_host, self._port), block=False, evt_handlers=evt_handlers)
            assert server is not None  # block=False always returns the server
            if server.socket is not None:
                server.socket.listen(LISTEN_BACKLOG)  # listen() again only resizes the queue
        except Exception:
            ae.shutdown()
            client.close()
            raise
        self._ae, self._server, self._client, self.spans = ae, server, client, spans
        LOG.info("DICOM front %s listening on %s:%d -> %s", s.ae_title, s.scp_host, self.port, self.base_url)
        return self.port

    def stop(self) -> None:
        if self._ae is not None:
            self._ae.shutdown()
        if self._client is not None:
            self._client.close()
        self._ae = self._server = self._client = None

    def __enter__(self) -> SpannerScp:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def serve_forever(settings: Settings, on_started: Callable[[SpannerScp], None] | None = None) -> None:
    """Run the front until SIGINT or SIGTERM (for ``spanner scp``); main thread only."""
    configure_logging("scp", settings)
    scp = SpannerScp(settings)
    done = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        done.set()

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        scp.start()
        if on_started is not None:
            on_started(scp)
        while not done.wait(0.5):
            pass
    finally:
        scp.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
