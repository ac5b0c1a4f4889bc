"""A lean simulated PACS: the same data, faults and counters as SimulatedPacs, on asyncio sockets.

pynetdicom spends about 0.9 ms of CPU per C-FIND match on the SCP side (its reactor threads, state
machine and per-message datasets). Dozens of simulated PACS sharing the spanner's two cores in the
benchmarks then measure the stand-in, not the spanner. This engine speaks the DICOM Upper Layer
(PS3.8) and DIMSE C-ECHO / C-FIND (PS3.7) itself: one event loop thread for every association of the
process, no polling, one write per response. It serves only what a simulated archive needs: Verification
and Patient/Study Root Find, Implicit or Explicit VR Little Endian, C-CANCEL, release and abort.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import logging
import struct
import threading
from collections.abc import Iterable
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag

from spanner.simulator.index import IdentifierError
from spanner.simulator.scp import (
    _MODELS,
    PATIENT_ROOT_FIND,
    STATUS_CANCEL,
    STATUS_PENDING,
    STUDY_ROOT_FIND,
    VERIFICATION,
    SimulatorBase,
    SimulatorConfig,
)

LOG = logging.getLogger(__name__)

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLEMENTATION_UID = b"1.2.826.0.1.3680043.10.1437.1"  # dicom-spanner simulator
IMPLEMENTATION_VERSION = b"SPANNER_SIM"
SUPPORTED = {VERIFICATION, PATIENT_ROOT_FIND, STUDY_ROOT_FIND}
MAX_RECEIVE = 1 << 20
NO_DATASET = 0x0101
C_ECHO_RQ, C_FIND_RQ, C_CANCEL_RQ = 0x0030, 0x0020, 0x0FFF


class ProtocolError(Exception):
    """The peer sent something this engine cannot take: the association is aborted."""


# -- encoding -----------------------------------------------------------------------------------------
def _pdu(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBI", kind, 0, len(body)) + body


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def _even(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def _command(fields: list[tuple[int, str, Any]]) -> bytes:
    """A command set in Implicit VR Little Endian, CommandGroupLength first (PS3.7 E.1)."""
    body = b""
    for element, vr, value in sorted(fields):
        if vr == "US":
            raw = struct.pack("<H", value)
        elif vr == "UI":
            raw = _even(value.encode(), b"\0")
        else:
            raw = _even(value.encode(), b" ")
        body += struct.pack("<HHI", 0x0000, element, len(raw)) + raw
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body


def _parse_command(raw: bytes) -> dict[int, bytes]:
    fields: dict[int, bytes] = {}
    offset = 0
    while offset + 8 <= len(raw):
        group, element, length = struct.unpack_from("<HHI", raw, offset)
        offset += 8
        if group == 0x0000:
            fields[element] = raw[offset:offset + length]
        offset += length
    return fields


def _us(fields: dict[int, bytes], element: int) -> int:
    raw = fields.get(element, b"")
    if len(raw) != 2:
        raise ProtocolError(f"command element (0000,{element:04X}) missing or not US")
    return int(struct.unpack("<H", raw)[0])


def _ui(fields: dict[int, bytes], element: int) -> str:
    return fields.get(element, b"").rstrip(b"\0 ").decode("ascii", "replace")


@dataclasses.dataclass(slots=True)
class _Context:
    abstract_syntax: str
    transfer_syntax: str

    @property
    def implicit(self) -> bool:
        return self.transfer_syntax == IMPLICIT_LE


@dataclasses.dataclass(slots=True)
class _Message:
    context_id: int
    command: dict[int, bytes]
    dataset: bytes | None


class WireSimulatedPacs(SimulatorBase):
    """Drop-in for SimulatedPacs (same constructor, start/stop, faults, counters), on asyncio."""

    def __init__(self, config: SimulatorConfig, instances: Iterable[Dataset]) -> None:
        super().__init__(config, instances)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._port = 0

    # -- lifecycle ----------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self._port

    def start(self) -> int:
        if self._server is not None:
            return self._port
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._loop = loop

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self._listen())
            ready.set()
            loop.run_forever()

        self._thread = threading.Thread(target=run, name=f"sim-{self.ae_title}", daemon=True)
        self._thread.start()
        ready.wait(10)
        LOG.info("simulator %s (wire) listening on %s:%d", self.ae_title, self._config.host, self._port)
        return self._port

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, self._config.host, self._config.port,
                                                  backlog=128)
        self._port = int(self._server.sockets[0].getsockname()[1])

    def stop(self) -> None:
        """Close the listener and every association (ending any hang)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.close()
            await asyncio.sleep(0)

        with contextlib.suppress(RuntimeError):
            asyncio.run_coroutine_threadsafe(close(), loop).result(5)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
        self._loop = self._thread = self._server = None
        self._port = 0

    @property
    def active_associations(self) -> int:
        return len(self._writers)

    # -- one connection -------------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._count("connections")
        self._writers.add(writer)
        association = _Association(self, reader, writer)
        try:
            await association.run()
        except (ProtocolError, struct.error) as exc:
            LOG.info("simulator %s: aborting an association: %s", self.ae_title, exc)
            association.abort()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


class _Association:
    def __init__(self, pacs: WireSimulatedPacs, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.pacs = pacs
        self.reader = reader
        self.writer = writer
        self.contexts: dict[int, _Context] = {}
        self.max_send = 0  # the peer's maximum PDU length (0: no limit)
        self.cancelled: set[int] = set()
        self.operation: asyncio.Task[None] | None = None
        self.gone = asyncio.Event()  # released, aborted or closed by the peer
        self._fragments: dict[int, list[bytes]] = {}
        self._pending_command: tuple[int, dict[int, bytes]] | None = None
        sock = writer.get_extra_info("socket")
        if sock is not None:
            import socket

            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def _read_pdu(self) -> tuple[int, bytes]:
        header = await self.reader.readexactly(6)
        kind, _, length = struct.unpack(">BBI", header)
        if length > MAX_RECEIVE + 6 and kind == 0x04:
            raise ProtocolError(f"P-DATA-TF of {length} bytes exceeds the {MAX_RECEIVE} announced")
        return kind, await self.reader.readexactly(length)

    async def run(self) -> None:
        kind, body = await self._read_pdu()
        if kind != 0x01:
            raise ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type 0x{kind:02X}")
        if not self._associate(body):
            return
        try:
            while True:
                kind, body = await self._read_pdu()
                if kind == 0x04:
                    for message in self._messages(body):
                        self._dispatch(message)
                elif kind == 0x05:  # A-RELEASE-RQ
                    self.gone.set()
                    if self.operation is not None:
                        await asyncio.wait([self.operation], timeout=5)
                    self.writer.write(_pdu(0x06, b"\0\0\0\0"))
                    await self.writer.drain()
                    return
                elif kind == 0x07:  # A-ABORT
                    return
                else:
                    raise ProtocolError(f"unexpected PDU type 0x{kind:02X} on an established association")
        finally:
            self.gone.set()
            if self.operation is not None and not self.operation.done():
                self.operation.cancel()

    # -- association set-up (PS3.8 9.3.2, 9.3.3) ------------------------------------------------------------
    def _associate(self, body: bytes) -> bool:
        if len(body) < 68:
            raise ProtocolError("A-ASSOCIATE-RQ too short")
        called, calling = body[4:20], body[20:36]
        proposed: list[tuple[int, str, list[str]]] = []
        offset = 68
        while offset + 4 <= len(body):
            kind, _, length = struct.unpack_from(">BBH", body, offset)
            value = body[offset + 4:offset + 4 + length]
            offset += 4 + length
            if kind == 0x20:
                proposed.append(_presentation_context(value))
            elif kind == 0x50:
                self.max_send = _max_length(value)
        config = self.pacs.config
        if config.fault == "refuse":
            self.pacs._count("refused")
            self.writer.write(_pdu(0x03, bytes([0, 1, 1, 3])))  # permanent, user, calling AE not recognised
            return False
        items = _item(0x10, APPLICATION_CONTEXT)
        for context_id, abstract, transfers in proposed:
            if abstract not in SUPPORTED:
                result, chosen = 3, transfers[0] if transfers else IMPLICIT_LE
            elif IMPLICIT_LE in transfers or EXPLICIT_LE in transfers:
                result, chosen = 0, IMPLICIT_LE if IMPLICIT_LE in transfers else EXPLICIT_LE
                self.contexts[context_id] = _Context(abstract, chosen)
            else:
                result, chosen = 4, transfers[0] if transfers else IMPLICIT_LE
            items += _item(0x21, bytes([context_id, 0, result, 0]) + _item(0x40, chosen.encode()))
        user = (_item(0x51, struct.pack(">I", MAX_RECEIVE)) + _item(0x52, IMPLEMENTATION_UID)
                + _item(0x55, IMPLEMENTATION_VERSION))
        items += _item(0x50, user)
        self.writer.write(_pdu(0x02, struct.pack(">HH", 1, 0) + called + calling + bytes(32) + items))
        self.pacs._count("associations")
        return True

    # -- P-DATA (PS3.8 9.3.5, E.2) --------------------------------------------------------------------------
    def _messages(self, body: bytes) -> list[_Message]:
        done: list[_Message] = []
        offset = 0
        while offset + 6 <= len(body):
            (length,) = struct.unpack_from(">I", body, offset)
            context_id, control = body[offset + 4], body[offset + 5]
            fragment = body[offset + 6:offset + 4 + length]
            offset += 4 + length
            is_command, last = bool(control & 0x01), bool(control & 0x02)
            key = 0 if is_command else 1
            self._fragments.setdefault(key, []).append(fragment)
            if not last:
                continue
            raw = b"".join(self._fragments.pop(key))
            if is_command:
                command = _parse_command(raw)
                if _us(command, 0x0800) == NO_DATASET:
                    done.append(_Message(context_id, command, None))
                else:
                    self._pending_command = (context_id, command)
            elif self._pending_command is not None:
                ctx, command = self._pending_command
                self._pending_command = None
                done.append(_Message(ctx, command, raw))
            else:
                raise ProtocolError("a data set arrived without its command")
        return done

    def _dispatch(self, message: _Message) -> None:
        field = _us(message.command, 0x0100)
        if field == C_CANCEL_RQ:
            self.pacs._count("cancels")
            self.cancelled.add(_us(message.command, 0x0120))
            return
        context = self.contexts.get(message.context_id)
        if context is None:
            raise ProtocolError(f"presentation context {message.context_id} was not accepted")
        if field == C_ECHO_RQ:
            self.pacs._count("echoes")
            self._respond(message.context_id, context, 0x8030, message.command, 0x0000)
        elif field == C_FIND_RQ:
            if self.operation is not None and not self.operation.done():
                raise ProtocolError("a second C-FIND while one is running (no asynchronous operations)")
            self.pacs._count("finds")
            self.operation = asyncio.ensure_future(self._find(message, context))
        else:
            raise ProtocolError(f"DIMSE command 0x{field:04X} is not supported by the simulator")

    def _respond(self, context_id: int, context: _Context, field: int, request: dict[int, bytes],
                 status: int, dataset: bytes | None = None, comment: str | None = None) -> None:
        fields: list[tuple[int, str, Any]] = [
            (0x0002, "UI", _ui(request, 0x0002)), (0x0100, "US", field),
            (0x0120, "US", _us(request, 0x0110)), (0x0800, "US", NO_DATASET if dataset is None else 0x0001),
            (0x0900, "US", status),
        ]
        if comment:
            fields.append((0x0902, "LO", comment[:64]))
        pdvs = _pdvs(context_id, _command(fields), True, self.max_send)
        if dataset is not None:
            pdvs += _pdvs(context_id, dataset, False, self.max_send)
        self.writer.write(pdvs)

    async def _find(self, message: _Message, context: _Context) -> None:
        config = self.pacs.config
        msg_id = _us(message.command, 0x0110)

        def respond(status: int, dataset: bytes | None = None, comment: str | None = None) -> None:
            self._respond(message.context_id, context, 0x8020, message.command, status, dataset, comment)

        if config.fault == "hang":
            await self.gone.wait()  # never answers, ignores C-CANCEL
            return
        delay = config.latency_ms + (self.pacs._rng.uniform(0, config.jitter_ms) if config.jitter_ms else 0)
        if config.fault == "slow":
            delay += config.slow_ms
        if await self._cancelled_within(msg_id, delay / 1000):
            respond(STATUS_CANCEL)
            return
        if config.fault == "failure":
            respond(config.failure_status, comment=f"simulated failure on {config.ae_title}")
            return
        model = _MODELS.get(context.abstract_syntax)
        if model is None:
            respond(0x0122, comment="SOP class not supported")
            return
        try:
            identifier = read_dataset(io.BytesIO(message.dataset or b""), context.implicit, True)
            responses = self.pacs.index.find(identifier, model)
        except IdentifierError as exc:
            respond(exc.status, comment=exc.message)
            return
        except Exception as exc:  # an identifier pydicom cannot decode
            respond(0xC000, comment=f"cannot process identifier: {exc}")
            return
        for sent, response in enumerate(responses):
            if config.fault == "abort" and sent >= config.abort_after:
                self.abort()
                return
            if msg_id in self.cancelled:
                respond(STATUS_CANCEL)
                return
            respond(STATUS_PENDING, _encode(response, context.implicit))
            if sent % 16 == 15:  # let a C-CANCEL in, and keep the send buffer bounded
                await self.writer.drain()
        if config.fault == "abort":
            self.abort()
            return
        respond(STATUS_CANCEL if msg_id in self.cancelled else 0x0000)
        self.cancelled.discard(msg_id)
        await self.writer.drain()

    async def _cancelled_within(self, msg_id: int, seconds: float) -> bool:
        """Wait ``seconds``; True as soon as the request is cancelled (checked every 5 ms)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while msg_id not in self.cancelled:
            remaining = deadline - loop.time()
            if remaining <= 0 or self.gone.is_set():
                return False
            await asyncio.sleep(min(remaining, 0.005))
        return True

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.write(_pdu(0x07, bytes([0, 0, 0, 0])))
        self.writer.close()


def _presentation_context(value: bytes) -> tuple[int, str, list[str]]:
    context_id = value[0]
    abstract = ""
    transfers: list[str] = []
    offset = 4
    while offset + 4 <= len(value):
        kind, _, length = struct.unpack_from(">BBH", value, offset)
        uid = value[offset + 4:offset + 4 + length].rstrip(b"\0 ").decode("ascii", "replace")
        offset += 4 + length
        if kind == 0x30:
            abstract = uid
        elif kind == 0x40:
            transfers.append(uid)
    return context_id, abstract, transfers


def _max_length(user_information: bytes) -> int:
    offset = 0
    while offset + 4 <= len(user_information):
        kind, _, length = struct.unpack_from(">BBH", user_information, offset)
        if kind == 0x51 and length == 4:
            return int(struct.unpack_from(">I", user_information, offset + 4)[0])
        offset += 4 + length
    return 0


def _pdvs(context_id: int, payload: bytes, command: bool, max_pdu: int) -> bytes:
    """``payload`` as P-DATA-TF PDUs of at most ``max_pdu`` bytes each (one PDV per PDU)."""
    room = (max_pdu - 6) if max_pdu else len(payload) or 1
    out = b""
    for start in range(0, max(len(payload), 1), room):
        chunk = payload[start:start + room]
        control = (0x01 if command else 0x00) | (0x02 if start + room >= len(payload) else 0x00)
        out += _pdu(0x04, struct.pack(">IBB", len(chunk) + 2, context_id, control) + chunk)
    return out


_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC",
                       "UI", "UR", "UT"})
_LONG_LENGTH_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT"})
SPECIFIC_CHARACTER_SET = BaseTag(0x00080005)
_CHARSETS = {"": "ascii", "ISO_IR 6": "ascii", "ISO_IR 100": "latin_1", "ISO_IR 192": "utf_8"}


class _Slow(Exception):
    """An element the lean encoder leaves to pydicom."""


def _encode(dataset: Dataset, implicit: bool) -> bytes:
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
