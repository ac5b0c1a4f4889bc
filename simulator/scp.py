"""A simulated PACS on loopback: Verification, Query/Retrieve Find and Move, with injectable faults.

C-MOVE sends the matching instances by C-STORE to a destination listed in ``move_destinations`` (AE
title, host, port), as an archive configured with its known AEs would; any other destination is
answered 0xA801. Faults apply to C-FIND only.

Each simulator is its own pynetdicom AE serving one ``Index``. Faults and latency are read from
the current config at the start of every request, so ``set_fault`` changes behaviour between
queries of a running fleet without restarting it. Every accepted socket gets TCP_NODELAY: command
and data set are separate writes, and Nagle with delayed ACK would stall each message about 40 ms.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import random
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any, Literal, Self, get_args

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.transport import ThreadedAssociationServer

from simulator.dataset import to_file_dataset
from simulator.index import IdentifierError, Index
from simulator.pynetdicom_internals import (
    enable_nodelay as enable_nodelay,  # re-exported: benchmarks and tests hand it to pynetdicom AEs
)
from simulator.pynetdicom_internals import (
    peer_gone,
    quiet_response_identifiers,
    slow_dul_polling,
    slow_reactor_polling,
)
from spanner.dicom_constants import (
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    PATIENT_ROOT_FIND,
    PATIENT_ROOT_MOVE,
    STUDY_ROOT_FIND,
    STUDY_ROOT_MOVE,
    VERIFICATION,
    Status,
)
from spanner.query import InformationModel

LOG = logging.getLogger(__name__)

Fault = Literal["none", "refuse", "abort", "failure", "hang", "slow"]
FAULTS: tuple[str, ...] = get_args(Fault)
FindResponse = tuple[int | Dataset, Dataset | None]

STATUS_PENDING = Status.PENDING
STATUS_CANCEL = Status.CANCEL
# C-FIND failures outside the 0xA000-0xCFFF ranges a simulated failure may also answer (PS3.4 C.4.1.1.4)
_OTHER_FIND_FAILURES = frozenset({Status.SOP_CLASS_NOT_SUPPORTED, Status.OUT_OF_RESOURCES,
                                  Status.IDENTIFIER_DOES_NOT_MATCH})
_STEP_S = 0.005  # how often waits look at C-CANCEL and at the association
_MODELS: dict[str, InformationModel] = {
    PATIENT_ROOT_FIND: InformationModel.PATIENT_ROOT,
    STUDY_ROOT_FIND: InformationModel.STUDY_ROOT,
}


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    """How one simulated PACS listens and misbehaves.

    ``abort_after`` pending responses go out before an ``abort`` fault aborts; ``slow_ms`` is the
    extra wait of a ``slow`` fault; ``seed`` makes the latency jitter reproducible.
    """

    ae_title: str = "SIMULATOR"
    host: str = "127.0.0.1"
    port: int = 0
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    fault: Fault = "none"
    abort_after: int = 1
    failure_status: int = 0xC001
    slow_ms: float = 5000.0
    seed: int | None = None
    maximum_associations: int = 64
    poll_ms: float | None = None  # None: pynetdicom's 1 ms; larger saves CPU per open association
    move_destinations: tuple[tuple[str, str, int], ...] = ()  # (AE title, host, port) C-MOVE may send to

    def __post_init__(self) -> None:
        if self.fault not in FAULTS:
            raise ValueError(f"fault {self.fault!r} is not one of {', '.join(FAULTS)}")
        if not 1 <= len(self.ae_title.strip()) <= 16 or "\\" in self.ae_title:
            raise ValueError(f"AE title {self.ae_title!r} must be 1-16 characters without a backslash")
        if min(self.latency_ms, self.jitter_ms, self.slow_ms, self.abort_after) < 0:
            raise ValueError("latency_ms, jitter_ms, slow_ms and abort_after cannot be negative")
        if not (0xA000 <= self.failure_status <= 0xCFFF or self.failure_status in _OTHER_FIND_FAILURES):
            raise ValueError(f"failure_status 0x{self.failure_status:04X} is not a C-FIND failure status")


@dataclass(frozen=True, slots=True)
class Counters:
    """What a simulator has seen since start (or the last ``reset_counters``)."""

    connections: int = 0
    associations: int = 0
    refused: int = 0
    echoes: int = 0
    finds: int = 0
    cancels: int = 0
    moves: int = 0


def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]
    return status


class SimulatorBase(abc.ABC):
    """What every simulator engine shares: its data, its config (faults changeable at run time), counters."""

    @abc.abstractmethod
    def start(self) -> int:
        """Listen (port 0 picks a free one) and return the bound port."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Close the listener and every association."""

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __init__(self, config: SimulatorConfig, instances: Iterable[Dataset]) -> None:
        self._config = config
        self.index = Index(instances, ae_title=config.ae_title)
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {f.name: 0 for f in dataclasses.fields(Counters)}
        self._rng = random.Random(config.seed)

    @property
    def config(self) -> SimulatorConfig:
        return self._config

    @property
    def ae_title(self) -> str:
        return self._config.ae_title

    def set_fault(self, fault: Fault, **params: Any) -> None:
        """Change the fault (and e.g. abort_after, failure_status, slow_ms, latency_ms) at run time."""
        fixed = sorted(set(params) & {"ae_title", "host", "port", "maximum_associations"})
        if fixed:
            raise ValueError(f"{', '.join(fixed)} cannot change while running; make a new simulator")
        with self._lock:
            self._config = dataclasses.replace(self._config, fault=fault, **params)

    @property
    def counters(self) -> Counters:
        with self._lock:
            return Counters(**self._counts)

    def reset_counters(self) -> None:
        with self._lock:
            self._counts = dict.fromkeys(self._counts, 0)

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1


class SimulatedPacs(SimulatorBase):
    """One simulated PACS on pynetdicom: ``start()`` it, query it, ``stop()`` it."""

    def __init__(self, config: SimulatorConfig, instances: Iterable[Dataset]) -> None:
        self._instances = list(instances)
        super().__init__(config, self._instances)
        self._stopping = threading.Event()
        self._ae: AE | None = None
        self._server: ThreadedAssociationServer | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def port(self) -> int:
        """The bound port; 0 while not listening."""
        return int(self._server.server_address[1]) if self._server is not None else 0

    def start(self) -> int:
        """Listen (port 0 picks a free one) and return the bound port."""
        if self._server is not None:
            return self.port
        if self._config.poll_ms:
            slow_reactor_polling(self._config.poll_ms / 1000)
        if not logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG):
            # pynetdicom formats every response identifier for a debug log nobody reads: ~20% of the
            # SCP's CPU per match. Process-wide, and only while pynetdicom's debug logging is off.
            quiet_response_identifiers()
        ae = AE(ae_title=self._config.ae_title)
        ae.require_called_aet = False
        ae.require_calling_aet = []
        ae.maximum_associations = self._config.maximum_associations
        for sop_class in (VERIFICATION, PATIENT_ROOT_FIND, STUDY_ROOT_FIND, PATIENT_ROOT_MOVE,
                          STUDY_ROOT_MOVE):
            ae.add_supported_context(sop_class)
        # The storage contexts a C-MOVE's sub-association proposes: one per SOP class held (at most 128).
        for sop_class in sorted({str(ds.SOPClassUID) for ds in self._instances})[:128]:
            ae.add_requested_context(sop_class, [EXPLICIT_VR_LE, IMPLICIT_VR_LE])
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_DIMSE_RECV, self._on_dimse_recv),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_C_MOVE, self._on_move),
        ]
        self._stopping.clear()
        address = (self._config.host, self._config.port)
        self._server = ae.start_server(address, block=False, evt_handlers=handlers)
        self._ae = ae
        LOG.info("simulator %s listening on %s:%d", self.ae_title, self._config.host, self.port)
        return self.port

    def stop(self) -> None:
        """Abort open associations (ending any hang) and close the listening socket."""
        self._stopping.set()
        if self._ae is not None:
            self._ae.shutdown()
        self._ae = None
        self._server = None

    # -- run-time state ---------------------------------------------------------------------------
    @property
    def active_associations(self) -> int:
        """Associations open right now, including any a ``hang`` is sitting on."""
        return len(self._ae.active_associations) if self._ae is not None else 0

    # -- event handlers ------------------------------------------------------------------------
    def _on_conn_open(self, event: evt.Event) -> None:
        enable_nodelay(event)
        if self._config.poll_ms:
            slow_dul_polling(event.assoc, self._config.poll_ms / 1000)
        self._count("connections")

    def _on_requested(self, event: evt.Event) -> None:
        """A ``refuse`` fault rejects the association: permanent, calling AE title not recognised."""
        if self._config.fault != "refuse":
            return
        self._count("refused")
        event.assoc.acse.send_reject(0x01, 0x01, 0x03)
        event.assoc.kill()

    def _on_established(self, event: evt.Event) -> None:
        self._count("associations")

    def _on_dimse_recv(self, event: evt.Event) -> None:
        # Counted here, not in the C-FIND handler, so that a hang that ignores C-CANCEL still counts it.
        if type(event.message).__name__ == "C_CANCEL_RQ":
            self._count("cancels")

    def _on_echo(self, event: evt.Event) -> int:
        self._count("echoes")
        return Status.SUCCESS

    def _on_find(self, event: evt.Event) -> Iterator[FindResponse]:
        """C-FIND: wait (latency, slow), then stream matches, honouring C-CANCEL; or misbehave."""
        self._count("finds")
        config = self._config
        cancelled = _CancelWatch(event)
        if config.fault == "hang":
            self._hang(event.assoc)
            return
        delay_ms = config.latency_ms + (self._rng.uniform(0, config.jitter_ms) if config.jitter_ms else 0.0)
        if config.fault == "slow":
            delay_ms += config.slow_ms
        if self._wait(delay_ms / 1000.0, event.assoc, cancelled):
            yield STATUS_CANCEL, None
            return
        if config.fault == "failure":
            yield _status(config.failure_status, f"simulated failure on {config.ae_title}"), None
            return
        model = _MODELS.get(str(event.request.AffectedSOPClassUID))
        if model is None:
            yield _status(Status.SOP_CLASS_NOT_SUPPORTED, "SOP class not supported"), None
            return
        try:
            responses = self.index.find(event.identifier, model)
        except IdentifierError as exc:
            yield _status(exc.status, exc.message), None
            return
        except Exception as exc:  # an identifier pydicom cannot decode
            yield _status(Status.UNABLE_TO_PROCESS, f"cannot process identifier: {exc}"), None
            return
        for sent, response in enumerate(responses):
            if config.fault == "abort" and sent >= config.abort_after:
                event.assoc.abort()
                return
            if cancelled():
                yield STATUS_CANCEL, None
                return
            yield STATUS_PENDING, response
        if config.fault == "abort":
            event.assoc.abort()
            return
        if cancelled():
            yield STATUS_CANCEL, None

    def _on_move(self, event: evt.Event) -> Iterator[Any]:
        """pynetdicom's C-MOVE protocol: the destination's address, the count, then each instance."""
        self._count("moves")
        known = {ae: (host, port) for ae, host, port in self._config.move_destinations}
        destination = known.get((event.move_destination or "").strip())
        if destination is None:
            yield None, None  # pynetdicom answers 0xA801: move destination unknown
            return
        chosen = self._matching(event.identifier)
        yield destination
        yield len(chosen)
        for ds in chosen:
            if event.is_cancelled:
                yield STATUS_CANCEL, None
                return
            yield STATUS_PENDING, to_file_dataset(ds)  # pynetdicom picks the context by its transfer syntax

    def _matching(self, identifier: Dataset) -> list[Dataset]:
        """The instances whose unique keys are among the identifier's (a key left out matches all)."""
        wanted: dict[str, set[str]] = {}
        for keyword in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            value = identifier.get(keyword)
            if value:
                wanted[keyword] = {str(v) for v in (value if isinstance(value, MultiValue) else [value])}
        return [ds for ds in self._instances
                if all(str(ds.get(keyword, "")) in values for keyword, values in wanted.items())]

    def _wait(self, seconds: float, assoc: Association, cancelled: Callable[[], bool]) -> bool:
        """Sleep ``seconds`` in small steps; True as soon as the request is cancelled."""
        deadline = time.monotonic() + seconds
        while True:
            if cancelled():
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stopping.is_set() or peer_gone(assoc):
                return False
            self._stopping.wait(min(remaining, _STEP_S))

    def _hang(self, assoc: Association) -> None:
        """Never answer, ignore C-CANCEL; return once the peer aborts or releases, or on stop()."""
        while not self._stopping.is_set() and not peer_gone(assoc):
            self._stopping.wait(_STEP_S * 4)


class _CancelWatch:
    """``event.is_cancelled`` is true only once (pynetdicom pops the request): remember it."""

    def __init__(self, event: evt.Event) -> None:
        self._event = event
        self._seen = False

    def __call__(self) -> bool:
        self._seen = self._seen or bool(self._event.is_cancelled)
        return self._seen


def serve_forever(config: SimulatorConfig, instances: Iterable[Dataset],
                  on_started: Callable[[SimulatedPacs], None] | None = None) -> None:
    """Run one simulator until SIGINT or SIGTERM (for ``spanner simulate``); main thread only."""
    pacs = SimulatedPacs(config, instances)
    done = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        done.set()

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        pacs.start()
        if on_started is not None:
            on_started(pacs)
        while not done.wait(0.5):
            pass
    finally:
        pacs.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
