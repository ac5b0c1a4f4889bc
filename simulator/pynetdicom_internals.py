"""The one place that touches pynetdicom internals, for the simulators on pynetdicom: slower reactor
polling, TCP_NODELAY on an association's socket, a look at the DUL's next PDU, and its debug-log switch.

pynetdicom's association reactor and DUL thread sleep a hard-coded 1 ms between looks at their queues,
about 2.4% of a core per open association. A benchmark host running dozens of simulated PACS on
pynetdicom would spend the cores on that, so it may slow them down here. Only simulator processes do
this (never the spanner's: its node actors run on spanner.dimse). The names replaced here are private to
pynetdicom and checked against the version this was written for: another version fails at import.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import pynetdicom
import pynetdicom.association as _association
from pynetdicom import _config, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT, A_RELEASE

SUPPORTED_VERSIONS = ("3.0.",)
if not pynetdicom.__version__.startswith(SUPPORTED_VERSIONS):
    raise ImportError(
        f"simulator.pynetdicom_internals was written for pynetdicom {', '.join(SUPPORTED_VERSIONS)}x and "
        f"patches its private names (association.time, DULServiceProvider._run_loop_delay); pynetdicom "
        f"{pynetdicom.__version__} is installed: check them and update SUPPORTED_VERSIONS"
    )
if not hasattr(_association, "time"):
    raise ImportError("pynetdicom.association no longer imports time: slow_reactor_polling cannot work")


class _PollingClock:
    """Stands in for ``time`` in pynetdicom.association: its reactors' 1 ms idle sleeps become ``poll_s``."""

    def __init__(self, poll_s: float) -> None:
        self.poll_s = poll_s

    def sleep(self, seconds: float) -> None:
        time.sleep(self.poll_s if seconds == 0.001 else seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def slow_reactor_polling(poll_s: float) -> None:
    """Let every association reactor of this process poll every ``poll_s`` instead of every millisecond
    (process-wide; a request then waits up to ``poll_s`` before it is read)."""
    current = getattr(_association, "time", time)
    if isinstance(current, _PollingClock):
        current.poll_s = max(current.poll_s, poll_s)
    else:
        _association.time = _PollingClock(poll_s)  # type: ignore[attr-defined,assignment]


def slow_dul_polling(assoc: Association, poll_s: float) -> None:
    """The same for one association's DUL thread."""
    if not hasattr(assoc.dul, "_run_loop_delay"):
        raise RuntimeError("pynetdicom's DUL has no _run_loop_delay any more: update this module")
    assoc.dul._run_loop_delay = poll_s


def enable_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler: turn Nagle off on the association's socket (either side)."""
    sock = event.assoc.dul.socket
    if sock is not None and sock.socket is not None:
        sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def peer_gone(assoc: Association) -> bool:
    """True once the association is aborted, released or its connection closed (the DUL's next PDU
    says so before pynetdicom's reactor gets to it)."""
    if not assoc.is_established or assoc.is_aborted or not assoc.dul.is_alive():
        return True
    return isinstance(assoc.dul.peek_next_pdu(), A_ABORT | A_P_ABORT | A_RELEASE)


def quiet_response_identifiers() -> None:
    """Stop pynetdicom formatting every response identifier for its debug log (process-wide)."""
    _config.LOG_RESPONSE_IDENTIFIERS = False


def quiet_handlers() -> None:
    """Stop pynetdicom's "standard" handlers formatting a log line for every PDU and DIMSE message even
    when nothing logs them (process-wide; call before any AE is made)."""
    _config.LOG_HANDLER_LEVEL = "none"
