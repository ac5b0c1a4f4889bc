"""C-STORE in the engine (PS3.4 Annex B, PS3.7 9.1.1), both sides, data sets on disk, never whole in memory.

SCP: an ``Acceptor`` whose ``Handlers.store`` is set and whose ``AcceptorConfig.store_dir`` names a folder
writes each incoming C-STORE data set, PDV by PDV as it arrives, into a Part-10 file there (a file meta header
built from the command and the accepted context, then the data set's bytes as they came). The handler gets a
``StoreRequest`` with that file's path and returns a status; it may move the file away (``os.replace``);
whatever is left is deleted after it returns. A data set over ``store_max_bytes``, or one the disk refuses,
is dropped as it arrives and answered Out of Resources (0xA700) without calling the handler.

    async def on_store(request: StoreRequest) -> int:
        os.replace(request.path, archive / f"{request.sop_instance_uid}.dcm")
        return Status.SUCCESS

SCU: ``read_part10`` reads a stored file's meta header (SOP class, SOP instance, transfer syntax, where the
data set starts); ``storage_contexts`` proposes, per SOP class, the stored transfer syntax in a context of its
own and Explicit/Implicit VR Little Endian in another; ``store`` sends the file's data set over an open
association, read from disk in PDU-sized pieces. When the peer accepted only the other context, an
instance is converted to Explicit or Implicit VR Little Endian with pydicom, decompressing its pixel data
first when it is stored compressed (that one instance is then in memory); an instance in a syntax no
installed decoder reads fails with ``TransferSyntaxNotAccepted``, one whose data will not decode with
``ConversionFailed``.

Disk writes and reads are plain blocking calls on the event loop: pieces are at most one PDU (16 KiB to
a few hundred KiB) and land in or come from the page cache.
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

from pydicom.uid import AllTransferSyntaxes

from spanner.dicom_constants import (
    AFFECTED_SOP_CLASS_UID,
    AFFECTED_SOP_INSTANCE_UID,
    COMMAND_DATA_SET_TYPE,
    COMMAND_FIELD,
    COMMON_STORAGE_CLASSES,
    DATASET_PRESENT,
    ERROR_COMMENT,
    EXPLICIT_VR_LE,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION,
    IMPLICIT_VR_LE,
    MESSAGE_ID,
    MESSAGE_ID_BEING_RESPONDED_TO,
    MOVE_ORIGINATOR_AE_TITLE,
    MOVE_ORIGINATOR_MESSAGE_ID,
    PRIORITY,
    PRIORITY_MEDIUM,
    STATUS,
    STORAGE_SOP_CLASS_ROOT,
    VERIFICATION,
    CommandField,
    Status,
)
from spanner.dimse.association import Association, Identifier, Response, connect
from spanner.dimse.errors import DimseError, NoAcceptedContext, ProtocolError
from spanner.dimse.messages import Command, Message, encode_command, fragment
from spanner.dimse.pdu import HEADER, AcceptedContext, PduType, RoleSelection

UNCOMPRESSED_LE = (EXPLICIT_VR_LE, IMPLICIT_VR_LE)
_PREAMBLE = b"\0" * 128 + b"DICM"
_SHORT_VRS = frozenset({b"UL", b"UI", b"SH", b"AE", b"US", b"CS"})
_SEND_PIECE = 1 << 20  # bytes per PDU when the peer sets no maximum PDU length
_DRAIN_EVERY = 4 << 20  # let the socket drain after this many bytes are queued


class TransferSyntaxNotAccepted(DimseError):
    """The peer accepted none of the contexts through which this instance could go."""


class NotPart10(DimseError):
    """A file given to the SCU is not a DICOM Part-10 file (no preamble, no meta header)."""


class StorageClasses:
    """Every Storage SOP Class (by its root) and ``also``: the abstract syntaxes of a storage SCP."""

    def __init__(self, *also: str) -> None:
        self.also = frozenset(also)

    def __contains__(self, uid: object) -> bool:
        return isinstance(uid, str) and (uid.startswith(STORAGE_SOP_CLASS_ROOT) or uid in self.also)


STORAGE_CLASSES = StorageClasses(VERIFICATION)
# A storage SCP takes an instance in any syntax pydicom knows, in the order the sender prefers
# (AcceptorConfig.prefer_proposed_order), so that it arrives as the archive stores it.
STORE_TRANSFER_SYNTAXES: tuple[str, ...] = tuple(AllTransferSyntaxes)


# -- Part-10 file meta (PS3.10 7.1) ---------------------------------------------------------------------
def _element(element: int, vr: bytes, value: bytes) -> bytes:
    if vr in _SHORT_VRS:
        return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sHI", 0x0002, element, vr, 0, len(value)) + value


def _ui(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\0" * (len(raw) % 2)


def part10_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, "DICM" and the file meta group of an instance whose data set follows in that syntax."""
    version = IMPLEMENTATION_VERSION.encode("ascii")
    body = (_element(0x0001, b"OB", b"\0\1") + _element(0x0002, b"UI", _ui(sop_class_uid))
            + _element(0x0003, b"UI", _ui(sop_instance_uid)) + _element(0x0010, b"UI", _ui(transfer_syntax))
            + _element(0x0012, b"UI", _ui(IMPLEMENTATION_CLASS_UID))
            + _element(0x0013, b"SH", version + b" " * (len(version) % 2)))
    return _PREAMBLE + _element(0x0000, b"UL", struct.pack("<I", len(body))) + body


@dataclass(frozen=True, slots=True)
class StoredInstance:
    """A Part-10 file on disk: what its meta header says, and where its data set starts."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    offset: int  # of the data set, past the meta group
    size: int  # of the whole file

    @property
    def dataset_bytes(self) -> int:
        return self.size - self.offset


def read_part10(path: str | os.PathLike[str]) -> StoredInstance:
    """The meta header of a Part-10 file (read element by element: a missing group length is tolerated)."""
    path = Path(path)
    values: dict[int, bytes] = {}
    with path.open("rb") as f:
        if f.read(132)[128:] != b"DICM":
            raise NotPart10(f"{path} is not a DICOM Part-10 file (no DICM prefix)")
        offset = 132
        while True:
            head = f.read(8)
            if len(head) < 8:
                break
            group, element, vr = struct.unpack("<HH2s", head[:6])
            if group != 0x0002:
                break
            if vr in _SHORT_VRS:
                (length,) = struct.unpack("<H", head[6:8])
                header_size = 8
            else:
                (length,) = struct.unpack("<I", f.read(4))
                header_size = 12
            values[element] = f.read(length)
            offset += header_size + length
            f.seek(offset)
        size = os.fstat(f.fileno()).st_size

    def text(element: int) -> str:
        return values.get(element, b"").rstrip(b"\0 ").decode("ascii", "replace")

    if not text(0x0002) or not text(0x0003) or not text(0x0010):
        raise NotPart10(f"{path}: the file meta header lacks the SOP class, SOP instance or transfer syntax")
    return StoredInstance(path, text(0x0002), text(0x0003), text(0x0010), offset, size)


# -- SCP side --------------------------------------------------------------------------------------------
class SpoolFile:
    """The ``DatasetSink`` of one incoming C-STORE: a Part-10 file written as the PDVs arrive.

    Past ``max_bytes`` (0: no limit) or on a disk error it stops writing, deletes what it wrote and keeps
    the reason in ``refused``; the data set's remaining PDVs are read off the wire and dropped.
    """

    def __init__(self, directory: str | os.PathLike[str], header: bytes, max_bytes: int = 0) -> None:
        self.max_bytes = max_bytes
        self.size = 0  # data set bytes received
        self.refused: str | None = None
        fd, name = tempfile.mkstemp(suffix=".part", dir=directory)
        self.path = Path(name)
        self._file: BinaryIO | None = os.fdopen(fd, "wb")
        self._write(header)

    def _write(self, data: bytes) -> None:
        if self._file is None:
            return
        try:
            self._file.write(data)
        except OSError as exc:
            self._refuse(f"cannot write the instance to disk: {exc.strerror or exc}")

    def write(self, fragment: bytes) -> None:
        self.size += len(fragment)
        if self.max_bytes and self.size > self.max_bytes and self.refused is None:
            self._refuse(f"the instance exceeds the {self.max_bytes} bytes this store SCP takes")
        self._write(fragment)

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError as exc:
                self._file = None
                self._refuse(f"cannot write the instance to disk: {exc.strerror or exc}")
            self._file = None

    def _refuse(self, reason: str) -> None:
        self.refused = reason
        self.discard()

    def discard(self) -> None:
        """Close and delete the file (harmless when the handler has moved it away)."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


@dataclass(slots=True)
class StoreRequest:
    """One C-STORE request as a store handler sees it; the data set is the Part-10 file at ``path``."""

    association: Association
    context: AcceptedContext
    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    path: Path
    size: int  # data set bytes received
    move_originator_ae: str = ""  # set by an archive storing on behalf of a C-MOVE (PS3.7 9.3.1.1)
    move_originator_id: int | None = None
    peer: str = ""
    state: object = None

    @property
    def calling_ae(self) -> str:
        return self.association.calling_ae

    @property
    def transfer_syntax(self) -> str:
        return self.context.transfer_syntax

    @classmethod
    def of(cls, association: Association, context: AcceptedContext, command: Command, sink: SpoolFile,
           peer: str, state: object) -> StoreRequest:
        originator_id = command.fields.get(MOVE_ORIGINATOR_MESSAGE_ID)
        return cls(association, context, command.message_id,
                   command.text(AFFECTED_SOP_CLASS_UID) or context.abstract_syntax,
                   command.text(AFFECTED_SOP_INSTANCE_UID), sink.path, sink.size,
                   command.text(MOVE_ORIGINATOR_AE_TITLE),
                   command.us(MOVE_ORIGINATOR_MESSAGE_ID) if originator_id is not None else None,
                   peer, state)


# -- SCU side --------------------------------------------------------------------------------------------
def storage_contexts(instances: Iterable[tuple[str, str]]) -> list[tuple[str, Sequence[str]]]:
    """Contexts to propose for (SOP class, stored transfer syntax) pairs: the stored syntax alone, then
    Explicit/Implicit VR Little Endian, so that the peer's choice shows whether conversion is needed."""
    contexts: list[tuple[str, Sequence[str]]] = []
    seen: set[tuple[str, tuple[str, ...]]] = set()
    for sop_class, transfer_syntax in instances:
        for syntaxes in ((transfer_syntax,), UNCOMPRESSED_LE):
            if (sop_class, syntaxes) not in seen:
                seen.add((sop_class, syntaxes))
                contexts.append((sop_class, syntaxes))
    return contexts


def convertible(transfer_syntax: str) -> bool:
    """Whether an instance stored in ``transfer_syntax`` can be re-encoded in Explicit/Implicit VR Little
    Endian here: the uncompressed ones and deflate always; a compressed one when a pydicom pixel data
    decoder for it is installed (pylibjpeg: JPEG, JPEG-LS, JPEG 2000; pydicom itself: RLE)."""
    from pydicom.pixels.decoders.base import get_decoder
    from pydicom.uid import UID

    uid = UID(transfer_syntax)
    if transfer_syntax in UNCOMPRESSED_LE or (uid.is_transfer_syntax and not uid.is_compressed):
        return True
    try:
        return bool(get_decoder(uid).is_available)
    except NotImplementedError:  # no decoder is known for this syntax at all
        return False


def _pick_context(assoc: Association, instance: StoredInstance) -> AcceptedContext:
    accepted = [c for c in assoc.contexts.values()
                if c.accepted and c.abstract_syntax == instance.sop_class_uid]
    if not accepted:
        raise NoAcceptedContext(f"the peer accepted no context for SOP class {instance.sop_class_uid} "
                                f"(instance {instance.sop_instance_uid})")
    for ctx in accepted:
        if ctx.transfer_syntax == instance.transfer_syntax:
            return ctx
    if convertible(instance.transfer_syntax):
        for ctx in sorted(accepted, key=lambda c: c.transfer_syntax != EXPLICIT_VR_LE):
            if ctx.transfer_syntax in UNCOMPRESSED_LE:
                return ctx
    offered = ", ".join(sorted({c.transfer_syntax for c in accepted}))
    raise TransferSyntaxNotAccepted(
        f"instance {instance.sop_instance_uid} is stored in {instance.transfer_syntax}; the peer accepts "
        f"{instance.sop_class_uid} only in {offered}, and the spanner converts only to Explicit or "
        f"Implicit VR Little Endian from a syntax it can decode")


class ConversionFailed(TransferSyntaxNotAccepted):
    """The instance's syntax is one the spanner decodes, but this instance's data could not be decoded."""


def convert(instance: StoredInstance, transfer_syntax: str) -> bytes:
    """The data set re-encoded in Explicit or Implicit VR Little Endian, decompressing its pixel data when
    it is stored compressed (in memory: one instance, decoded)."""
    from pydicom import dcmread  # only conversions need these
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    from pydicom.uid import UID

    ds = dcmread(instance.path)
    if UID(instance.transfer_syntax).is_compressed:
        try:
            # The instance keeps its UID: a change of transfer syntax does not make a new instance.
            ds.decompress(generate_instance_uid=False)  # now Explicit VR Little Endian
        except Exception as exc:  # a codec's own error types: the instance is not sent, with the reason
            raise ConversionFailed(
                f"instance {instance.sop_instance_uid} is stored in {instance.transfer_syntax} and could not "
                f"be decompressed for a receiver that takes only uncompressed data: {exc}") from exc
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, transfer_syntax == IMPLICIT_VR_LE
    write_dataset(out, ds)
    return out.getvalue()


async def store(assoc: Association, instance: StoredInstance, msg_id: int,
                move_originator: tuple[str, int] | None = None, priority: int = PRIORITY_MEDIUM) -> int:
    """C-STORE ``instance`` over ``assoc``; the status of the peer's C-STORE-RSP.

    ``move_originator`` (AE title, message ID) marks a sub-operation of a C-MOVE (PS3.7 9.3.1.1).
    Raises NoAcceptedContext, TransferSyntaxNotAccepted, or the association's errors.
    """
    ctx = _pick_context(assoc, instance)
    command: dict[int, int | str] = {
        AFFECTED_SOP_CLASS_UID: instance.sop_class_uid, COMMAND_FIELD: CommandField.C_STORE_RQ,
        MESSAGE_ID: msg_id, PRIORITY: priority, COMMAND_DATA_SET_TYPE: DATASET_PRESENT,
        AFFECTED_SOP_INSTANCE_UID: instance.sop_instance_uid,
    }
    if move_originator is not None:
        command[MOVE_ORIGINATOR_AE_TITLE], command[MOVE_ORIGINATOR_MESSAGE_ID] = move_originator
    max_pdu = assoc.peer_max_pdu
    converted = (None if ctx.transfer_syntax == instance.transfer_syntax
                 else convert(instance, ctx.transfer_syntax))
    assoc.writer.write(fragment(ctx.context_id, encode_command(command), True, max_pdu))
    if converted is None:
        await _send_file(assoc, ctx.context_id, instance)
    else:
        assoc.writer.write(fragment(ctx.context_id, converted, False, max_pdu))
    await assoc.drain()
    while True:
        message = await assoc.next_message()
        reply = message.command
        if reply.field == CommandField.C_STORE_RSP and reply.responding_to == msg_id:
            return reply.status
        raise ProtocolError(f"unexpected DIMSE message 0x{reply.field:04X} while waiting for the "
                            f"C-STORE response to message {msg_id}")


async def _send_file(assoc: Association, context_id: int, instance: StoredInstance) -> None:
    """The data set as P-DATA-TF PDUs of one PDV each, read from disk one PDU at a time."""
    room = assoc.peer_max_pdu - 6 if assoc.peer_max_pdu else _SEND_PIECE
    left = instance.dataset_bytes
    queued = 0
    with instance.path.open("rb") as f:
        f.seek(instance.offset)
        if left == 0:  # an empty data set still needs its last fragment
            assoc.writer.write(HEADER.pack(PduType.P_DATA_TF, 0, 6)
                               + struct.pack(">IBB", 2, context_id, 0x02))
        while left > 0:
            piece = f.read(min(room, left))
            if not piece:
                raise ProtocolError(f"{instance.path} shrank while it was being sent")
            left -= len(piece)
            control = 0x02 if left == 0 else 0x00
            assoc.writer.write(HEADER.pack(PduType.P_DATA_TF, 0, len(piece) + 6)
                               + struct.pack(">IBB", len(piece) + 2, context_id, control) + piece)
            queued += len(piece)
            if queued >= _DRAIN_EVERY:
                queued = 0
                await assoc.drain()


class StoreResult(NamedTuple):
    sop_instance_uid: str
    status: int | None  # the peer's C-STORE status; None when the instance could not be sent
    error: str | None = None


async def send_files(host: str, port: int, paths: Iterable[str | os.PathLike[str]], *, calling_ae: str,
                     called_ae: str, move_originator: tuple[str, int] | None = None,
                     dimse_timeout_s: float = 30.0) -> list[StoreResult]:
    """C-STORE Part-10 files to ``called_ae`` over one association, one result per file.

    An instance the peer accepted no usable context for is not sent (status None, the reason in
    ``error``); the others still go. Association errors (connect, reject, abort, timeout) raise.
    """
    instances = [read_part10(p) for p in paths]
    contexts = storage_contexts((i.sop_class_uid, i.transfer_syntax) for i in instances)
    assoc = await connect(host, port, calling_ae=calling_ae, called_ae=called_ae, contexts=contexts,
                          dimse_timeout_s=dimse_timeout_s)
    results: list[StoreResult] = []
    try:
        for msg_id, instance in enumerate(instances, start=1):
            try:
                status = await store(assoc, instance, msg_id, move_originator)
            except (NoAcceptedContext, TransferSyntaxNotAccepted) as exc:
                results.append(StoreResult(instance.sop_instance_uid, None, exc.message))
            else:
                results.append(StoreResult(instance.sop_instance_uid, status))
    except BaseException:
        assoc.abort()
        await assoc.close()
        raise
    await assoc.release()
    return results


# -- C-GET, requestor side (PS3.4 C.4.3, PS3.7 9.1.3) ---------------------------------------------------
StoreHandler = Callable[[StoreRequest], Awaitable[int]]


def get_contexts(get_model: str, storage_classes: Sequence[str] = COMMON_STORAGE_CLASSES
                 ) -> tuple[list[tuple[str, Sequence[str]]], list[RoleSelection]]:
    """The contexts and role selections of a C-GET requester: the C-GET's own context, then one per
    storage class with every syntax pydicom knows (the archive then sends what it stores), each with the
    SCP role for the requester, so that the archive may C-STORE back on the association."""
    if len(storage_classes) > 127:
        raise ValueError(f"{len(storage_classes)} storage classes: an association holds at most 128 contexts")
    contexts: list[tuple[str, Sequence[str]]] = [(get_model, UNCOMPRESSED_LE)]
    contexts += [(sop_class, STORE_TRANSFER_SYNTAXES) for sop_class in storage_classes]
    roles = [RoleSelection(sop_class, scu_role=False, scp_role=True) for sop_class in storage_classes]
    return contexts, roles


def receive_stores(assoc: Association, directory: str | os.PathLike[str], max_bytes: int = 0) -> None:
    """From now on, C-STORE data sets the peer sends on ``assoc`` are written to Part-10 files in
    ``directory`` as they arrive (a larger one than ``max_bytes`` is refused with 0xA700)."""

    def sink(context_id: int, command: Command) -> SpoolFile | None:
        context = assoc.contexts.get(context_id)
        if command.field != CommandField.C_STORE_RQ or context is None or not context.accepted:
            return None
        header = part10_header(command.text(AFFECTED_SOP_CLASS_UID) or context.abstract_syntax,
                               command.text(AFFECTED_SOP_INSTANCE_UID), context.transfer_syntax)
        return SpoolFile(directory, header, max_bytes)

    assoc.sinks = sink


async def _answer_store(assoc: Association, message: Message, on_store: StoreHandler) -> None:
    """Hand one incoming C-STORE to ``on_store`` and answer it with the status it returns."""
    command = message.command
    context = assoc.contexts.get(message.context_id)
    sink = message.sink
    comment: str | None = None
    if context is None or not isinstance(sink, SpoolFile):
        status, comment = int(Status.UNABLE_TO_PROCESS), "no accepted context for the C-STORE"
    elif sink.refused is not None:
        status, comment = int(Status.OUT_OF_RESOURCES), sink.refused
    else:
        request = StoreRequest.of(assoc, context, command, sink, "", None)
        try:
            status = await on_store(request)
        except Exception as exc:  # the archive hears why; the retrieval goes on with the next instance
            status, comment = int(Status.UNABLE_TO_PROCESS), f"{type(exc).__name__}: {exc}"[:64]
    if isinstance(sink, SpoolFile):
        sink.discard()  # what the handler did not move away
    reply: dict[int, int | str] = {
        AFFECTED_SOP_CLASS_UID: command.text(AFFECTED_SOP_CLASS_UID),
        AFFECTED_SOP_INSTANCE_UID: command.text(AFFECTED_SOP_INSTANCE_UID),
        COMMAND_FIELD: CommandField.C_STORE_RSP, MESSAGE_ID_BEING_RESPONDED_TO: command.message_id,
        STATUS: status}
    if comment and status != Status.SUCCESS:
        reply[ERROR_COMMENT] = comment
    assoc.send(message.context_id, reply)
    await assoc.drain()


async def get(assoc: Association, abstract_syntax: str, identifier: Identifier, msg_id: int,
              on_store: StoreHandler, priority: int = PRIORITY_MEDIUM) -> AsyncIterator[Response]:
    """C-GET over ``assoc`` (opened with ``get_contexts`` and ``receive_stores``): the archive's pending
    and final responses, while each instance it C-STOREs back goes to ``on_store`` as it arrives.

    The DIMSE timeout runs between messages, so a long retrieval that keeps sending never times out.
    """
    ctx = assoc.context_for(abstract_syntax)
    data = identifier if isinstance(identifier, bytes) else identifier(ctx.transfer_syntax)
    assoc.send(ctx.context_id, {AFFECTED_SOP_CLASS_UID: abstract_syntax, COMMAND_FIELD: CommandField.C_GET_RQ,
                                MESSAGE_ID: msg_id, PRIORITY: priority}, data)
    while True:
        message = await assoc.next_message()
        command = message.command
        if command.field == CommandField.C_STORE_RQ:
            await _answer_store(assoc, message, on_store)
            continue
        if command.field != CommandField.C_GET_RSP or command.responding_to != msg_id:
            raise ProtocolError(f"unexpected DIMSE message 0x{command.field:04X} while waiting for "
                                f"responses to C-GET {msg_id}")
        response = Response(command.status, message.dataset, command, ctx.transfer_syntax)
        yield response
        if not response.pending:
            return
