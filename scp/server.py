"""The DICOM front: one listener on the spanner's DIMSE engine that serves every span and forwards to the API.

C-ECHO, C-FIND, C-MOVE and C-GET share one port and one asyncio loop (a thread of its own): the engine's
acceptor negotiates associations and reads requests, scp.handlers turns them into HTTP calls made on
the same loop. The front never opens an association to an archive: for a C-MOVE the API sends the
instances to the Move Destination, and the front relays its progress as pending responses; for a C-GET
the API delivers them to the front's own storage listener (scp.get), which C-STOREs each back to the
requester on its association.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType

from scp import handlers, translate
from scp.client import SpannerClient
from scp.get import GetListener
from scp.spans import SpanDirectory
from spanner import hops
from spanner.dimse.acceptor import Acceptor, AcceptorConfig, Handlers
from spanner.dimse.background import LoopThread
from spanner.dimse.store import StorageClasses
from spanner.logs import configure_logging
from spanner.settings import Settings

LOG = logging.getLogger(__name__)

SPAN_LOOKUP_TIMEOUT_S = 3.0  # well inside a caller's ACSE timeout (dcmtk and pynetdicom wait 30 s)


class SpannerScp:
    """The DICOM front: ``start()`` listens, ``stop()`` aborts open associations and closes the port."""

    def __init__(self, settings: Settings, base_url: str | None = None, port: int | None = None) -> None:
        self._settings = settings
        self.base_url = (base_url or settings.scp_url).rstrip("/")
        self._port = settings.scp_port if port is None else port
        self._runner = LoopThread("scp")
        self._acceptor: Acceptor | None = None
        self._client: SpannerClient | None = None
        self.spans: SpanDirectory | None = None
        self.listener: GetListener | None = None

    @property
    def port(self) -> int:
        """The bound port; 0 while not listening."""
        return self._acceptor.port if self._acceptor is not None else 0

    @property
    def active_associations(self) -> int:
        """Open connections, established or still waiting for their A-ASSOCIATE-RQ."""
        return self._acceptor.active_associations if self._acceptor is not None else 0

    @property
    def cpu_s(self) -> float:
        """CPU time of the front's loop thread so far (every association and HTTP call runs there)."""
        return self._runner.cpu_s

    @property
    def host(self) -> str:
        return self._settings.scp_host

    def start(self) -> int:
        """Listen on scp_host:port (0 picks a free port) and return the bound port."""
        if self._acceptor is not None:
            return self.port
        self._runner.start()
        try:
            self._runner.run(self._start())
        except BaseException:
            self.stop()
            raise
        s = self._settings
        LOG.info("DICOM front %s listening on %s:%d -> %s", s.ae_title, s.scp_host, self.port, self.base_url)
        return self.port

    async def _start(self) -> None:
        s = self._settings
        client = SpannerClient(self.base_url, read_timeout_s=s.max_timeout_s + s.node_grace_s + 30.0,
                               api_key=s.scp_api_key)
        self._client = await client.start()
        spans = SpanDirectory(lambda: client.spans(SPAN_LOOKUP_TIMEOUT_S), ttl_s=s.scp_span_cache_ttl_s)
        listener = GetListener(s.ae_title, s.scp_host, s.spool_max_bytes, s.scp_acse_timeout_s)
        self.listener = listener
        await listener.start()
        front = handlers.Front(spans, client, hops.instance_id(s), listener)
        config = AcceptorConfig(
            s.ae_title, translate.SUPPORTED,
            artim_s=s.scp_acse_timeout_s,
            idle_s=s.scp_network_timeout_s,
            maximum_associations=s.scp_max_associations,
            maximum_per_peer=s.scp_max_connections_per_peer,
            get_storage_classes=StorageClasses(),  # every Storage SOP Class, nothing else
        )
        acceptor = Acceptor(config, Handlers(echo=front.echo, find=front.find, move=front.move,
                                             get=front.get, admit=front.admit))
        await acceptor.start(s.scp_host, self._port)
        self._acceptor, self.spans = acceptor, spans

    async def _stop(self) -> None:
        acceptor, client, listener = self._acceptor, self._client, self.listener
        self._acceptor = self._client = self.listener = None
        if acceptor is not None:
            await acceptor.close()
        if listener is not None:
            await listener.close()
        if client is not None:
            await client.close()

    def stop(self) -> None:
        if self._runner.running:
            try:
                self._runner.run(self._stop())
            finally:
                self._runner.stop()

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
