"""DIMSE messages: command sets (always Implicit VR Little Endian, PS3.7 E.1) and their PDVs (PS3.8 E.2).

A message is a command set and, when its CommandDataSetType says so, one data set, each split into
P-DATA-TF PDUs no longer than the peer's maximum PDU length. ``Assembler`` joins the fragments again.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from spanner.dicom_constants import (
    AFFECTED_SOP_CLASS_UID,
    COMMAND_DATA_SET_TYPE,
    COMMAND_FIELD,
    ERROR_COMMENT,
    MESSAGE_ID,
    MESSAGE_ID_BEING_RESPONDED_TO,
    MOVE_DESTINATION,
    NO_DATASET,
    STATUS,
)
from spanner.dimse.errors import ProtocolError
from spanner.dimse.pdu import HEADER, PduType

# The VR of every command element written here (the command set is Implicit VR: the VR is not on the wire).
_UI = frozenset({AFFECTED_SOP_CLASS_UID, 0x0003, 0x1000, 0x1001})
_AE = frozenset({MOVE_DESTINATION, 0x1030})
_TEXT = frozenset({ERROR_COMMENT})
_ELEMENT = struct.Struct("<HHI")
# A query identifier or a command is kilobytes; an in-memory message this large is a peer to stop.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


@dataclass(slots=True)
class Command:
    """A decoded command set: element number of group 0000 to its raw value."""

    fields: dict[int, bytes]

    def us(self, element: int, default: int | None = None) -> int:
        raw = self.fields.get(element)
        if raw is None or len(raw) != 2:
            if default is not None:
                return default
            raise ProtocolError(f"command element (0000,{element:04X}) missing or not US")
        return int.from_bytes(raw, "little")

    def text(self, element: int) -> str:
        return self.fields.get(element, b"").rstrip(b"\0 ").decode("ascii", "replace")

    @property
    def field(self) -> int:
        return self.us(COMMAND_FIELD)

    @property
    def message_id(self) -> int:
        return self.us(MESSAGE_ID)

    @property
    def responding_to(self) -> int:
        return self.us(MESSAGE_ID_BEING_RESPONDED_TO)

    @property
    def status(self) -> int:
        return self.us(STATUS)

    @property
    def has_dataset(self) -> bool:
        return self.us(COMMAND_DATA_SET_TYPE) != NO_DATASET


def encode_command(values: dict[int, int | str]) -> bytes:
    """A command set from element -> value (int: US; str: UI, AE or LO by element), group length first."""
    body = bytearray()
    for element in sorted(values):
        value = values[element]
        if isinstance(value, int):
            raw = struct.pack("<H", value)
        elif element in _UI:
            raw = value.encode("ascii")
            raw += b"\0" * (len(raw) % 2)
        else:
            raw = value.encode("ascii", "replace")[:64 if element in _TEXT else 16]
            raw += b" " * (len(raw) % 2)
        body += _ELEMENT.pack(0x0000, element, len(raw)) + raw
    return _ELEMENT.pack(0x0000, 0x0000, 4) + struct.pack("<I", len(body)) + bytes(body)


def decode_command(raw: bytes) -> Command:
    fields: dict[int, bytes] = {}
    offset = 0
    while offset < len(raw):
        if offset + 8 > len(raw):
            raise ProtocolError("truncated command element")
        group, element, length = _ELEMENT.unpack_from(raw, offset)
        offset += 8
        if offset + length > len(raw):
            raise ProtocolError(f"command element (0000,{element:04X}) runs past the command set")
        if group == 0x0000:
            fields[element] = raw[offset:offset + length]
        # Elements of other groups are skipped: Orthanc 1.10 (DCMTK) puts (0008,0058) Failed SOP Instance
        # UID List into the command set of a failed C-GET's response, where PS3.7 has only group 0000.
        offset += length
    return Command(fields)


def fragment(context_id: int, payload: bytes, is_command: bool, max_pdu: int) -> bytes:
    """``payload`` as P-DATA-TF PDUs whose length field is at most ``max_pdu`` (0: no limit), one PDV each."""
    room = max(1, max_pdu - 6) if max_pdu else max(len(payload), 1)
    kind = 0x01 if is_command else 0x00
    if len(payload) <= room:
        return (HEADER.pack(PduType.P_DATA_TF, 0, len(payload) + 6)
                + struct.pack(">IBB", len(payload) + 2, context_id, kind | 0x02) + payload)
    out = bytearray()
    view = memoryview(payload)
    for start in range(0, len(payload), room):
        chunk = view[start:start + room]
        last = 0x02 if start + room >= len(payload) else 0x00
        out += HEADER.pack(PduType.P_DATA_TF, 0, len(chunk) + 6)
        out += struct.pack(">IBB", len(chunk) + 2, context_id, kind | last)
        out += chunk
    return bytes(out)


class DatasetSink(Protocol):
    """Takes a data set's fragments as they arrive instead of the assembler joining them in memory."""

    def write(self, fragment: bytes) -> None: ...

    def close(self) -> None: ...

    def discard(self) -> None: ...


SinkFactory = Callable[[int, Command], DatasetSink | None]
"""Called when a command announcing a data set is complete: a sink for that data set, or None to join it."""


@dataclass(slots=True)
class Message:
    context_id: int
    command: Command
    dataset: bytes | None
    sink: DatasetSink | None = None  # where the data set went instead of ``dataset``, if a sink took it


class Assembler:
    """Joins PDV fragments of P-DATA-TF PDUs into messages (a command, then its data set if any).

    With a ``sinks`` factory, a data set it gives a sink for streams there fragment by fragment (a large
    C-STORE never sits whole in memory); the message then carries the closed sink and no ``dataset``.
    A message held in memory (its command and any data set not in a sink) larger than ``max_bytes`` is a
    ProtocolError (0: no limit): a peer cannot stream an endless identifier into the process.
    """

    def __init__(self, sinks: SinkFactory | None = None, *, max_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self._max_bytes = max_bytes
        self._held = 0  # bytes of the message being joined in memory (a data set in a sink excluded)
        self._command: list[bytes] = []
        self._command_context = 0
        self._data: list[bytes] = []
        self._waiting: tuple[int, Command] | None = None
        self._sinks = sinks
        self._sink: DatasetSink | None = None

    def abandon(self) -> None:
        """The association ended: a data set still streaming into a sink is discarded."""
        if self._sink is not None:
            self._sink.discard()
            self._sink = None

    def feed(self, body: bytes) -> list[Message]:
        done: list[Message] = []
        offset = 0
        if len(body) < 6:
            raise ProtocolError("P-DATA-TF without a PDV")
        while offset < len(body):
            if offset + 6 > len(body):
                raise ProtocolError("truncated PDV header")
            (length,) = struct.unpack_from(">I", body, offset)
            if length < 2 or offset + 4 + length > len(body):
                raise ProtocolError(f"PDV length {length} does not fit its P-DATA-TF")
            context_id, control = body[offset + 4], body[offset + 5]
            fragment_ = body[offset + 6:offset + 4 + length]
            offset += 4 + length
            if control & 0x01 or self._sink is None:
                self._hold(len(fragment_))
            if control & 0x01:
                if self._waiting is not None:
                    raise ProtocolError("a command arrived while a data set was expected")
                if not self._command:
                    self._command_context = context_id
                elif context_id != self._command_context:  # a message keeps one context (PS3.8 9.3.5)
                    raise ProtocolError(f"command fragments on presentation contexts {self._command_context} "
                                        f"and {context_id}")
                self._command.append(fragment_)
                if control & 0x02:
                    command = decode_command(b"".join(self._command))
                    self._command.clear()
                    self._held = 0  # a sink has the data set, or it is counted from here
                    if command.has_dataset:
                        self._waiting = (context_id, command)
                        self._sink = self._sinks(context_id, command) if self._sinks is not None else None
                    else:
                        done.append(Message(context_id, command, None))
            else:
                if self._waiting is None:
                    raise ProtocolError("a data set arrived without its command")
                if context_id != self._waiting[0]:
                    raise ProtocolError(f"a data set on presentation context {context_id} for a command on "
                                        f"context {self._waiting[0]}")
                if self._sink is not None:
                    self._sink.write(fragment_)
                else:
                    self._data.append(fragment_)
                if control & 0x02:
                    ctx, command = self._waiting
                    self._waiting = None
                    if self._sink is not None:
                        sink, self._sink = self._sink, None
                        sink.close()
                        done.append(Message(ctx, command, None, sink))
                        continue
                    dataset = b"".join(self._data)
                    self._data.clear()
                    self._held = 0
                    done.append(Message(ctx, command, dataset))
        return done

    def _hold(self, n: int) -> None:
        self._held += n
        if self._max_bytes and self._held > self._max_bytes:
            raise ProtocolError(f"a DIMSE message exceeds {self._max_bytes} bytes held in memory")
