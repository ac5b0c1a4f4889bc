"""One DICOM association on asyncio streams, and the requestor side that opens one.

    assoc = await connect("127.0.0.1", 11112, calling_ae="SPANNER", called_ae="PACS",
                          contexts=[(STUDY_ROOT_FIND, (IMPLICIT_VR_LE, EXPLICIT_VR_LE))])
    async for rsp in assoc.find(STUDY_ROOT_FIND, identifier_bytes_for, msg_id=1):
        ...  # rsp.status, rsp.identifier (raw bytes in the context's transfer syntax)
    await assoc.release()

A reader task per association takes PDUs off the socket as they come (no polling) and queues whole
messages; a peer's A-ABORT, a closed connection or a malformed PDU ends the association at once, also
while it idles in a pool (``is_open`` then turns False). ``find`` and ``move`` iterate responses with the
DIMSE timeout between them; ``cancel`` sends C-CANCEL for a running request; ``abort`` ends everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from spanner.dicom_constants import (
    AFFECTED_SOP_CLASS_UID,
    COMMAND_DATA_SET_TYPE,
    COMMAND_FIELD,
    COMPLETED_SUBOPERATIONS,
    DATASET_PRESENT,
    ERROR_COMMENT,
    EXPLICIT_VR_LE,
    FAILED_SUBOPERATIONS,
    IMPLICIT_VR_LE,
    MESSAGE_ID,
    MESSAGE_ID_BEING_RESPONDED_TO,
    MOVE_DESTINATION,
    NO_DATASET,
    PENDING_STATUSES,
    PRIORITY,
    PRIORITY_MEDIUM,
    REMAINING_SUBOPERATIONS,
    VERIFICATION,
    WARNING_SUBOPERATIONS,
    CommandField,
)
from spanner.dimse.errors import (
    AssociationAborted,
    AssociationRejected,
    ConnectFailed,
    DimseTimeout,
    NoAcceptedContext,
    ProtocolError,
)
from spanner.dimse.messages import (
    Assembler,
    Command,
    DatasetSink,
    Message,
    SinkFactory,
    encode_command,
    fragment,
)
from spanner.dimse.pdu import (
    DEFAULT_MAX_PDU,
    RELEASE_RP,
    RELEASE_RQ,
    AcceptedContext,
    AssociateAccept,
    AssociateReject,
    AssociateRequest,
    ContextResult,
    PduType,
    ProposedContext,
    RoleSelection,
    UserInformation,
    abort,
    read_pdu,
)

LOG = logging.getLogger(__name__)
DEFAULT_TRANSFER_SYNTAXES = (EXPLICIT_VR_LE, IMPLICIT_VR_LE)
Identifier = bytes | Callable[[str], bytes]
"""An identifier already encoded, or a function encoding it for a transfer syntax UID (called once)."""


def set_nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@dataclass(frozen=True, slots=True)
class Response:
    """One DIMSE response: its status, its data set (raw, in ``transfer_syntax``) and its command set."""

    status: int
    identifier: bytes | None
    command: Command
    transfer_syntax: str

    @property
    def pending(self) -> bool:
        return self.status in PENDING_STATUSES

    @property
    def comment(self) -> str | None:
        return self.command.text(ERROR_COMMENT) or None

    @property
    def implicit(self) -> bool:
        return self.transfer_syntax == IMPLICIT_VR_LE

    def suboperations(self) -> dict[str, int]:
        """C-MOVE / C-GET counts (zero where the peer left one out)."""
        names = {"remaining": REMAINING_SUBOPERATIONS, "completed": COMPLETED_SUBOPERATIONS,
                 "failed": FAILED_SUBOPERATIONS, "warning": WARNING_SUBOPERATIONS}
        return {name: self.command.us(element, 0) for name, element in names.items()}


class Association:
    """An established association (either side). Requestor operations: ``echo``, ``find``, ``move``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 contexts: Sequence[AcceptedContext], *, calling_ae: str, called_ae: str,
                 peer_max_pdu: int, max_pdu: int = DEFAULT_MAX_PDU, dimse_timeout_s: float = 30.0,
                 acse_timeout_s: float = 30.0, peer_implementation_class_uid: str = "") -> None:
        self.reader = reader
        self.writer = writer
        self.contexts = {c.context_id: c for c in contexts}
        self.calling_ae = calling_ae
        self.called_ae = called_ae
        self.peer_max_pdu = peer_max_pdu
        self.max_pdu = max_pdu
        self.dimse_timeout_s = dimse_timeout_s
        self.acse_timeout_s = acse_timeout_s
        self.peer_implementation_class_uid = peer_implementation_class_uid
        """As the peer announced it in its A-ASSOCIATE-RQ or -AC (loop protection tells spanners by it)."""
        self.roles: tuple[RoleSelection, ...] = ()
        """The role selections the peer granted in its A-ASSOCIATE-AC (requestor side)."""
        self.sinks: SinkFactory | None = None
        """Where data sets of requests the peer sends on this association go (C-STOREs of a C-GET)."""
        self._inbox: asyncio.Queue[Message | None] = asyncio.Queue()
        self._ended: BaseException | None = None
        self._released = asyncio.Event()
        self._reader_task: asyncio.Task[None] | None = None

    # -- state ------------------------------------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        return self._ended is None and not self.writer.is_closing()

    def context_for(self, abstract_syntax: str) -> AcceptedContext:
        for ctx in self.contexts.values():
            if ctx.abstract_syntax == abstract_syntax and ctx.accepted:
                return ctx
        raise NoAcceptedContext(f"the peer accepted no presentation context for {abstract_syntax}")

    def start_reading(self) -> None:
        """Requestor side: read PDUs in the background from now on."""
        self._reader_task = asyncio.get_running_loop().create_task(self._read_forever())

    def _sink(self, context_id: int, command: Command) -> DatasetSink | None:
        return self.sinks(context_id, command) if self.sinks is not None else None

    async def _read_forever(self) -> None:
        assembler = Assembler(self._sink)
        try:
            while True:
                kind, body = await read_pdu(self.reader, self.max_pdu)
                if kind == PduType.P_DATA_TF:
                    for message in assembler.feed(body):
                        self._inbox.put_nowait(message)
                elif kind == PduType.RELEASE_RP:
                    self._released.set()
                    self._end(AssociationAborted("the association was released"))
                    self.writer.close()
                    return
                elif kind == PduType.ABORT:
                    self._end(AssociationAborted("the peer aborted the association (A-ABORT)"))
                    self.writer.close()
                    return
                elif kind == PduType.RELEASE_RQ:  # the acceptor may not ask; answer and end
                    self.writer.write(RELEASE_RP)
                    self._end(AssociationAborted("the peer released the association"))
                    self.writer.close()
                    return
                else:
                    raise ProtocolError(f"unexpected PDU type 0x{kind:02X} on an established association")
        except ProtocolError as exc:
            self._end(AssociationAborted(f"aborted: the peer sent a malformed PDU ({exc})"))
            self.abort(source=2)
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            self._end(AssociationAborted("the peer closed the connection"))
            self.writer.close()
        except asyncio.CancelledError:
            self._end(AssociationAborted("the association was closed"))
            self.writer.close()
            raise
        finally:
            assembler.abandon()  # a C-STORE cut off mid data set leaves no file behind

    def _end(self, reason: BaseException) -> None:
        if self._ended is None:
            self._ended = reason
        self._inbox.put_nowait(None)

    def deliver(self, message: Message) -> None:
        """Acceptor side: a response to a request this side sent (a C-GET's C-STORE), for ``next_message``."""
        self._inbox.put_nowait(message)

    async def next_message(self, timeout_s: float | None = None) -> Message:
        if self._ended is not None and self._inbox.empty():
            raise self._ended
        try:
            message = self._inbox.get_nowait()  # responses often come several to a PDU or a read
        except asyncio.QueueEmpty:
            try:
                async with asyncio.timeout(timeout_s or self.dimse_timeout_s):
                    message = await self._inbox.get()
            except TimeoutError:
                waited = timeout_s or self.dimse_timeout_s
                raise DimseTimeout(f"no DIMSE message within {waited:g} s") from None
        if message is None:
            self._inbox.put_nowait(None)  # wake any other waiter too
            raise self._ended or AssociationAborted("the association ended")
        return message

    # -- sending ----------------------------------------------------------------------------------------
    def send(self, context_id: int, command: dict[int, int | str], dataset: bytes | None = None) -> None:
        """Queue one message (command and data set) in a single write."""
        command[COMMAND_DATA_SET_TYPE] = NO_DATASET if dataset is None else DATASET_PRESENT
        data = fragment(context_id, encode_command(command), True, self.peer_max_pdu)
        if dataset is not None:
            data += fragment(context_id, dataset, False, self.peer_max_pdu)
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    # -- requestor operations -------------------------------------------------------------------------
    async def echo(self, msg_id: int = 1) -> int:
        ctx = self.context_for(VERIFICATION)
        self.send(ctx.context_id, {AFFECTED_SOP_CLASS_UID: VERIFICATION,
                                   COMMAND_FIELD: CommandField.C_ECHO_RQ, MESSAGE_ID: msg_id})
        while True:
            message = await self.next_message()
            if message.command.field == CommandField.C_ECHO_RSP and message.command.responding_to == msg_id:
                return message.command.status

    async def find(self, abstract_syntax: str, identifier: Identifier, msg_id: int,
                   priority: int = PRIORITY_MEDIUM) -> AsyncIterator[Response]:
        """C-FIND: every response, pending ones first, the final one last."""
        ctx = self.context_for(abstract_syntax)
        data = identifier if isinstance(identifier, bytes) else identifier(ctx.transfer_syntax)
        self.send(ctx.context_id, {AFFECTED_SOP_CLASS_UID: abstract_syntax,
                                   COMMAND_FIELD: CommandField.C_FIND_RQ, MESSAGE_ID: msg_id,
                                   PRIORITY: priority}, data)
        async for response in self._responses(CommandField.C_FIND_RSP, msg_id, ctx.transfer_syntax):
            yield response

    async def move(self, abstract_syntax: str, identifier: Identifier, destination: str, msg_id: int,
                   priority: int = PRIORITY_MEDIUM) -> AsyncIterator[Response]:
        """C-MOVE: pending responses with sub-operation counts, then the final one."""
        ctx = self.context_for(abstract_syntax)
        data = identifier if isinstance(identifier, bytes) else identifier(ctx.transfer_syntax)
        self.send(ctx.context_id, {AFFECTED_SOP_CLASS_UID: abstract_syntax,
                                   COMMAND_FIELD: CommandField.C_MOVE_RQ, MESSAGE_ID: msg_id,
                                   PRIORITY: priority, MOVE_DESTINATION: destination}, data)
        async for response in self._responses(CommandField.C_MOVE_RSP, msg_id, ctx.transfer_syntax):
            yield response

    async def _responses(self, field: int, msg_id: int, transfer_syntax: str) -> AsyncIterator[Response]:
        while True:
            message = await self.next_message()
            command = message.command
            if command.field != field or command.responding_to != msg_id:
                raise ProtocolError(f"unexpected DIMSE message 0x{command.field:04X} while waiting for "
                                    f"responses to message {msg_id}")
            response = Response(command.status, message.dataset, command, transfer_syntax)
            yield response
            if not response.pending:
                return

    def cancel(self, msg_id: int, abstract_syntax: str) -> None:
        """C-CANCEL the request ``msg_id`` (harmless once the association ended)."""
        if not self.is_open:
            return
        ctx = self.context_for(abstract_syntax)
        self.send(ctx.context_id, {COMMAND_FIELD: CommandField.C_CANCEL_RQ,
                                   MESSAGE_ID_BEING_RESPONDED_TO: msg_id})

    async def release(self) -> None:
        """A-RELEASE; aborts instead when the peer does not answer within the ACSE timeout."""
        if not self.is_open:
            return
        self.writer.write(RELEASE_RQ)
        try:
            await asyncio.wait_for(self._released.wait(), self.acse_timeout_s)
        except TimeoutError:
            self.abort()
        await self.close()

    def abort(self, source: int = 0, reason: int = 0) -> None:
        """A-ABORT and close the connection; harmless when already closed."""
        if not self.writer.is_closing():
            with contextlib.suppress(Exception):
                self.writer.write(abort(source, reason))
        if self._ended is None:
            self._ended = AssociationAborted("the association was aborted")
            self._inbox.put_nowait(None)
        self.writer.close()

    async def close(self) -> None:
        self.writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(BaseException):
                await self._reader_task
        # Messages nobody will read now: a C-STORE data set one of them streamed to disk is deleted.
        while not self._inbox.empty():
            message = self._inbox.get_nowait()
            if message is not None and message.sink is not None:
                message.sink.discard()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


async def connect(host: str, port: int, *, calling_ae: str, called_ae: str,
                  contexts: Sequence[tuple[str, Sequence[str]]], max_pdu: int = DEFAULT_MAX_PDU,
                  connect_timeout_s: float = 10.0, acse_timeout_s: float = 30.0,
                  dimse_timeout_s: float = 30.0, roles: Sequence[RoleSelection] = ()) -> Association:
    """Open an association proposing ``contexts`` (abstract syntax, transfer syntaxes), one context each.

    ``roles``: SCP/SCU role selections to propose (a C-GET requester asks for the SCP role of the storage
    classes it wants back); what the peer granted is in ``Association.roles``.

    Raises ConnectFailed, AssociationRejected, AssociationAborted or DimseTimeout (no answer within the
    ACSE timeout: the ARTIM of the requestor).
    """
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), connect_timeout_s)
    except (OSError, TimeoutError) as exc:
        raise ConnectFailed(f"cannot connect to {host}:{port}: {exc or 'timed out'}") from exc
    set_nodelay(writer)
    proposed = tuple(ProposedContext(2 * i + 1, abstract, tuple(transfers))
                     for i, (abstract, transfers) in enumerate(contexts))
    user = UserInformation(max_pdu, roles=tuple(roles))
    writer.write(AssociateRequest(called_ae, calling_ae, proposed, user).encode())
    try:
        kind, body = await asyncio.wait_for(read_pdu(reader, max_pdu), acse_timeout_s)
        if kind == PduType.ASSOCIATE_AC:
            accept = AssociateAccept.decode(body)
        elif kind == PduType.ASSOCIATE_RJ:
            reject = AssociateReject.decode(body)
            raise AssociationRejected(
                f"{called_ae}@{host}:{port} rejected the association from {calling_ae} "
                f"(result {reject.result}, source {reject.source}, reason {reject.reason})",
                reject.result, reject.source, reject.reason)
        elif kind == PduType.ABORT:
            raise AssociationAborted(f"{host}:{port} aborted the association request")
        else:
            raise ProtocolError(f"PDU type 0x{kind:02X} in answer to A-ASSOCIATE-RQ")
    except TimeoutError:
        writer.close()
        raise DimseTimeout(f"{host}:{port} did not answer the association request within {acse_timeout_s:g} s"
                           ) from None
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        writer.close()
        raise AssociationAborted(f"{host}:{port} closed the connection during association set-up") from exc
    except BaseException:
        writer.close()
        raise
    by_id = {c.context_id: c for c in proposed}
    accepted = []
    for c in accept.contexts:
        asked = by_id.get(c.context_id)
        result = c.result
        if asked is None or (c.accepted and c.transfer_syntax not in asked.transfer_syntaxes):
            result = ContextResult.NO_REASON  # accepted with something never proposed: not usable
        accepted.append(AcceptedContext(c.context_id, result, c.transfer_syntax,
                                        asked.abstract_syntax if asked else ""))
    assoc = Association(reader, writer, accepted, calling_ae=calling_ae, called_ae=called_ae,
                        peer_max_pdu=accept.user.max_pdu, max_pdu=max_pdu, dimse_timeout_s=dimse_timeout_s,
                        acse_timeout_s=acse_timeout_s,
                        peer_implementation_class_uid=accept.user.implementation_class_uid)
    assoc.roles = accept.user.roles
    assoc.start_reading()
    return assoc
