"""A lean simulated PACS: the same data, faults and counters as SimulatedPacs, on the spanner's DIMSE engine.

pynetdicom spends about 0.9 ms of CPU per C-FIND match on the SCP side (its reactor threads, state
machine and per-message datasets). Dozens of simulated PACS sharing the spanner's two cores in the
benchmarks then measure the stand-in, not the spanner. This one is an SCP user of ``spanner.dimse``: one
event loop thread for every association of the process, no polling, one write per response.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import struct
import threading
from collections.abc import AsyncIterator, Iterable

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag

from simulator.index import IdentifierError
from simulator.scp import _MODELS, SimulatorBase, SimulatorConfig
from spanner.dicom_constants import PATIENT_ROOT_FIND, STUDY_ROOT_FIND, VERIFICATION, Status
from spanner.dimse.acceptor import Acceptor, AcceptorConfig, FindResult, Handlers, Request
from spanner.dimse.association import Association
from spanner.dimse.pdu import AssociateReject, AssociateRequest, RejectReason, RejectResult, RejectSource

LOG = logging.getLogger(__name__)
SUPPORTED = (VERIFICATION, PATIENT_ROOT_FIND, STUDY_ROOT_FIND)


class WireSimulatedPacs(SimulatorBase):
    """Drop-in for SimulatedPacs (same constructor, start/stop, faults, counters), on asyncio."""

    def __init__(self, config: SimulatorConfig, instances: Iterable[Dataset]) -> None:
        super().__init__(config, instances)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._acceptor: Acceptor | None = None
        self._port = 0

    # -- lifecycle ----------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self._port

    def start(self) -> int:
        if self._acceptor is not None:
            return self._port
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []
        self._loop = loop

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._listen())
            except BaseException as exc:  # e.g. the port is taken: start() raises it
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()

        self._thread = threading.Thread(target=run, name=f"sim-{self.ae_title}", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            self._thread.join(5)
            loop.close()
            self._loop = self._thread = None
            raise failure[0]
        LOG.info("simulator %s (wire) listening on %s:%d", self.ae_title, self._config.host, self._port)
        return self._port

    async def _listen(self) -> None:
        handlers = Handlers(echo=self._echo, find=self._find, associate=self._associate,
                            connected=lambda: self._count("connections"),
                            established=self._established, cancel=lambda _: self._count("cancels"))
        config = AcceptorConfig(self._config.ae_title, SUPPORTED,
                                maximum_associations=self._config.maximum_associations)
        self._acceptor = Acceptor(config, handlers)
        self._port = await self._acceptor.start(self._config.host, self._config.port)

    def stop(self) -> None:
        """Close the listener and every association (ending any hang)."""
        loop, thread, acceptor = self._loop, self._thread, self._acceptor
        if loop is None or thread is None:
            return
        with contextlib.suppress(RuntimeError, TimeoutError):
            if acceptor is not None:
                asyncio.run_coroutine_threadsafe(acceptor.close(), loop).result(5)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
        self._loop = self._thread = self._acceptor = None
        self._port = 0

    @property
    def active_associations(self) -> int:
        return self._acceptor.active_associations if self._acceptor is not None else 0

    # -- handlers -------------------------------------------------------------------------------------
    def _associate(self, request: AssociateRequest) -> AssociateReject | None:
        if self._config.fault != "refuse":
            return None
        self._count("refused")
        return AssociateReject(RejectResult.PERMANENT, RejectSource.SERVICE_USER,
                               RejectReason.CALLING_AE_NOT_RECOGNIZED)

    def _established(self, assoc: Association) -> None:
        self._count("associations")

    async def _echo(self, request: Request) -> int:
        self._count("echoes")
        return Status.SUCCESS

    async def _find(self, request: Request) -> AsyncIterator[FindResult]:
        """C-FIND: wait (latency, slow), then stream matches, honouring C-CANCEL; or misbehave."""
        self._count("finds")
        config = self._config
        if config.fault == "hang":
            await asyncio.Event().wait()  # never answers, ignores C-CANCEL; ends with the association
        delay = config.latency_ms + (self._rng.uniform(0, config.jitter_ms) if config.jitter_ms else 0)
        if config.fault == "slow":
            delay += config.slow_ms
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(request.cancelled.wait(), delay / 1000)
        if request.cancelled.is_set():
            yield FindResult(Status.CANCEL)
            return
        if config.fault == "failure":
            yield FindResult(config.failure_status, comment=f"simulated failure on {config.ae_title}")
            return
        model = _MODELS.get(request.sop_class)
        if model is None:
            yield FindResult(Status.SOP_CLASS_NOT_SUPPORTED, comment="SOP class not supported")
            return
        try:
            identifier = read_dataset(io.BytesIO(request.identifier or b""), request.implicit, True)
            responses = self.index.find(identifier, model)
        except IdentifierError as exc:
            yield FindResult(exc.status, comment=exc.message)
            return
        except Exception as exc:  # an identifier pydicom cannot decode
            yield FindResult(Status.UNABLE_TO_PROCESS, comment=f"cannot process identifier: {exc}")
            return
        for sent, response in enumerate(responses):
            if config.fault == "abort" and sent >= config.abort_after:
                request.association.abort()
                return
            yield FindResult(Status.PENDING, encode(response, request.implicit))
        if config.fault == "abort":
            request.association.abort()


_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC",
                       "UI", "UR", "UT"})
_LONG_LENGTH_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT"})
SPECIFIC_CHARACTER_SET = BaseTag(0x00080005)
_CHARSETS = {"": "ascii", "ISO_IR 6": "ascii", "ISO_IR 100": "latin_1", "ISO_IR 192": "utf_8"}


class _Slow(Exception):
    """An element the lean encoder leaves to pydicom."""


def encode(dataset: Dataset, implicit: bool) -> bytes:
    """A response identifier in Little Endian. The simulator's answers hold only text elements, which
    are written here directly (pydicom's writer costs ~0.2 ms per answer); anything else goes to pydicom."""
    try:
        return _encode_text(dataset, implicit)
    except _Slow:
        buffer = DicomBytesIO()
        buffer.is_little_endian = True
        buffer.is_implicit_VR = implicit
        write_dataset(buffer, dataset)
        return buffer.getvalue()


def _encode_text(dataset: Dataset, implicit: bool) -> bytes:
    charset_elem = dataset._dict.get(SPECIFIC_CHARACTER_SET)
    charset = "" if charset_elem is None else str(charset_elem.value or "")
    encoding = _CHARSETS.get(charset)
    if encoding is None:
        raise _Slow
    out = []
    for tag in sorted(dataset._dict):
        elem = dataset._dict[tag]
        vr = elem.VR
        if vr not in _TEXT_VRS:
            raise _Slow
        value = elem.value
        if value is None or value == "":
            raw = b""
        elif isinstance(value, list | tuple | MultiValue):
            raw = "\\".join("" if v is None else str(v) for v in value).encode(encoding)
        else:
            raw = str(value).encode(encoding)
        if len(raw) % 2:
            raw += b"\0" if vr == "UI" else b" "
        group, element = tag >> 16, tag & 0xFFFF
        if implicit:
            out.append(struct.pack("<HHI", group, element, len(raw)))
        elif vr in _LONG_LENGTH_VRS:
            out.append(struct.pack("<HH2sHI", group, element, vr.encode(), 0, len(raw)))
        else:
            out.append(struct.pack("<HH2sH", group, element, vr.encode(), len(raw)))
        out.append(raw)
    return b"".join(out)
