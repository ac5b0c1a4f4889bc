"""The acceptor side: a listener that negotiates associations and hands requests to async handlers.

    async def on_find(request: FindRequest) -> AsyncIterator[FindResult]:
        for match in matches(request.identifier, request.implicit):
            yield FindResult(Status.PENDING, encoded_match)   # raw data set bytes
        yield FindResult(Status.SUCCESS)                      # optional: the engine ends with success

    acceptor = Acceptor(AcceptorConfig("PACS", (VERIFICATION, STUDY_ROOT_FIND)), Handlers(find=on_find))
    port = await acceptor.start("127.0.0.1", 0)
    ...
    await acceptor.close()

Handlers are thin, pynetdicom style: ``echo`` returns a status; ``find`` and ``move`` are async generators
of results. The engine writes each result as it is yielded and waits for the socket to drain
(backpressure); a C-CANCEL for the request sets ``request.cancelled`` and, at the handler's next yield,
closes the generator and answers Cancel (0xFE00). ``associate`` may refuse an association by returning an
``AssociateReject``. A handler that raises answers 0xC000 with the error as ErrorComment.
Garbage, a truncated PDU or an unexpected one aborts that association only; the listener keeps serving.
ARTIM: an association request (and the release of a connection the peer leaves open) waits at most
``artim_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from spanner.dicom_constants import (
    AFFECTED_SOP_CLASS_UID,
    APPLICATION_CONTEXT,
    COMMAND_FIELD,
    COMPLETED_SUBOPERATIONS,
    ERROR_COMMENT,
    EXPLICIT_VR_LE,
    FAILED_SUBOPERATIONS,
    IMPLICIT_VR_LE,
    MESSAGE_ID_BEING_RESPONDED_TO,
    MOVE_DESTINATION,
    PENDING_STATUSES,
    REMAINING_SUBOPERATIONS,
    STATUS,
    WARNING_SUBOPERATIONS,
    CommandField,
    Status,
)
from spanner.dimse.association import Association, set_nodelay
from spanner.dimse.errors import ProtocolError
from spanner.dimse.messages import Assembler, Message
from spanner.dimse.pdu import (
    DEFAULT_MAX_PDU,
    RELEASE_RP,
    AcceptedContext,
    AssociateAccept,
    AssociateReject,
    AssociateRequest,
    ContextResult,
    PduType,
    UserInformation,
    abort,
    read_pdu,
)

LOG = logging.getLogger(__name__)
YIELD_EVERY = 16  # pending responses written between two turns of the event loop


@dataclass(frozen=True, slots=True)
class AcceptorConfig:
    ae_title: str
    abstract_syntaxes: Sequence[str]
    transfer_syntaxes: Sequence[str] = (IMPLICIT_VR_LE, EXPLICIT_VR_LE)  # preference order
    max_pdu: int = DEFAULT_MAX_PDU
    artim_s: float = 30.0
    require_called_ae: bool = False
    maximum_associations: int = 64


class FindResult(NamedTuple):
    status: int
    identifier: bytes | None = None
    comment: str | None = None


class MoveResult(NamedTuple):
    status: int
    remaining: int = 0
    completed: int = 0
    failed: int = 0
    warning: int = 0
    identifier: bytes | None = None
    comment: str | None = None


@dataclass(slots=True)
class Request:
    """One C-ECHO / C-FIND / C-MOVE request as a handler sees it."""

    association: Association
    context: AcceptedContext
    message_id: int
    identifier: bytes | None
    move_destination: str = ""
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def calling_ae(self) -> str:
        return self.association.calling_ae

    @property
    def called_ae(self) -> str:
        return self.association.called_ae

    @property
    def sop_class(self) -> str:
        return self.context.abstract_syntax

    @property
    def implicit(self) -> bool:
        return self.context.transfer_syntax == IMPLICIT_VR_LE


FindHandler = Callable[[Request], AsyncIterator[FindResult]]
MoveHandler = Callable[[Request], AsyncIterator[MoveResult]]


@dataclass(frozen=True, slots=True)
class Handlers:
    echo: Callable[[Request], Awaitable[int]] | None = None  # None: answer success
    find: FindHandler | None = None
    move: MoveHandler | None = None
    associate: Callable[[AssociateRequest], AssociateReject | None] | None = None
    connected: Callable[[], None] | None = None  # a TCP connection came in (counters)
    cancel: Callable[[int], None] | None = None  # a C-CANCEL arrived for this message ID (counters)
    established: Callable[[Association], None] | None = None
    released: Callable[[Association], None] | None = None


class Acceptor:
    def __init__(self, config: AcceptorConfig, handlers: Handlers) -> None:
        self.config = config
        self.handlers = handlers
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def active_associations(self) -> int:
        return len(self._connections)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._server = await asyncio.start_server(self._accept, host, port, backlog=128)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        """Stop listening and abort every open association."""
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=5)
        self._server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        set_nodelay(writer)
        if self.handlers.connected is not None:
            self.handlers.connected()
        session = _Session(self, reader, writer)
        try:
            await session.run()
        except ProtocolError as exc:
            LOG.info("%s: aborting an association: %s", self.config.ae_title, exc)
            session.abort(source=2)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError, OSError):
            pass
        except asyncio.CancelledError:
            session.abort()
        finally:
            session.stop_operations()
            self._connections.discard(task)
            writer.close()


class _Session:
    """One accepted connection: negotiation, then messages until release or abort."""

    def __init__(self, acceptor: Acceptor, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.acceptor = acceptor
        self.reader = reader
        self.writer = writer
        self.assoc: Association | None = None
        self.operations: dict[int, tuple[Request, asyncio.Task[None]]] = {}

    def abort(self, source: int = 0) -> None:
        if self.assoc is not None:
            self.assoc.abort(source)
        else:
            with contextlib.suppress(Exception):
                self.writer.write(abort(source))
            self.writer.close()

    def stop_operations(self) -> None:
        for _, task in self.operations.values():
            task.cancel()

    async def run(self) -> None:
        config = self.acceptor.config
        kind, body = await asyncio.wait_for(read_pdu(self.reader, config.max_pdu), config.artim_s)
        if kind != PduType.ASSOCIATE_RQ:
            raise ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type 0x{kind:02X}")
        request = AssociateRequest.decode(body)
        reject = self._refusal(request)
        if reject is not None:
            self.writer.write(reject.encode())
            await self.writer.drain()
            return
        contexts = tuple(self._negotiate(c.context_id, c.abstract_syntax, c.transfer_syntaxes)
                         for c in request.contexts)
        accept = AssociateAccept(request.called_ae, request.calling_ae, contexts,
                                 UserInformation(config.max_pdu), request.application_context)
        self.writer.write(accept.encode())
        self.assoc = Association(self.reader, self.writer, contexts, calling_ae=request.calling_ae,
                                 called_ae=request.called_ae, peer_max_pdu=request.user.max_pdu,
                                 max_pdu=config.max_pdu, acse_timeout_s=config.artim_s)
        if self.acceptor.handlers.established is not None:
            self.acceptor.handlers.established(self.assoc)
        assembler = Assembler()
        while True:
            kind, body = await read_pdu(self.reader, config.max_pdu)
            if kind == PduType.P_DATA_TF:
                for message in assembler.feed(body):
                    self._dispatch(message)
            elif kind == PduType.RELEASE_RQ:
                # A requestor releases only when it awaits no more responses: what still runs is stopped.
                running = [task for _, task in self.operations.values()]
                for task in running:
                    task.cancel()
                if running:
                    await asyncio.wait(running, timeout=config.artim_s)
                self.writer.write(RELEASE_RP)
                await self.writer.drain()
                if self.acceptor.handlers.released is not None:
                    self.acceptor.handlers.released(self.assoc)
                with contextlib.suppress(TimeoutError, ConnectionError, asyncio.IncompleteReadError):
                    await asyncio.wait_for(self.reader.read(), config.artim_s)  # the requestor closes
                return
            elif kind == PduType.ABORT:
                return
            else:
                raise ProtocolError(f"unexpected PDU type 0x{kind:02X} on an established association")

    def _refusal(self, request: AssociateRequest) -> AssociateReject | None:
        config = self.acceptor.config
        if request.application_context != APPLICATION_CONTEXT:
            return AssociateReject(1, 1, 2)
        if config.require_called_ae and request.called_ae != config.ae_title.strip():
            return AssociateReject(1, 1, 7)
        if self.acceptor.active_associations > config.maximum_associations:
            return AssociateReject(2, 2, 2)  # transient, ACSE: local limit exceeded
        if self.acceptor.handlers.associate is not None:
            return self.acceptor.handlers.associate(request)
        return None

    def _negotiate(self, context_id: int, abstract: str, transfers: Sequence[str]) -> AcceptedContext:
        config = self.acceptor.config
        if abstract not in config.abstract_syntaxes:
            return AcceptedContext(context_id, ContextResult.ABSTRACT_SYNTAX_NOT_SUPPORTED,
                                   transfers[0] if transfers else IMPLICIT_VR_LE, abstract)
        for ts in config.transfer_syntaxes:
            if ts in transfers:
                return AcceptedContext(context_id, ContextResult.ACCEPTANCE, ts, abstract)
        return AcceptedContext(context_id, ContextResult.TRANSFER_SYNTAXES_NOT_SUPPORTED,
                               transfers[0] if transfers else IMPLICIT_VR_LE, abstract)

    # -- DIMSE ----------------------------------------------------------------------------------------
    def _dispatch(self, message: Message) -> None:
        assert self.assoc is not None
        command = message.command
        field_ = command.field
        if field_ == CommandField.C_CANCEL_RQ:
            if self.acceptor.handlers.cancel is not None:
                self.acceptor.handlers.cancel(command.responding_to)
            running = self.operations.get(command.responding_to)
            if running is not None:
                running[0].cancelled.set()
            return
        context = self.assoc.contexts.get(message.context_id)
        if context is None or not context.accepted:
            raise ProtocolError(f"presentation context {message.context_id} was not accepted")
        msg_id = command.message_id
        if msg_id in self.operations:
            raise ProtocolError(f"message ID {msg_id} is already in use on this association")
        request = Request(self.assoc, context, msg_id, message.dataset,
                          command.text(MOVE_DESTINATION))
        handlers = self.acceptor.handlers
        if field_ == CommandField.C_ECHO_RQ:
            body = self._echo(request)
        elif field_ == CommandField.C_FIND_RQ and handlers.find is not None:
            body = self._stream(request, CommandField.C_FIND_RSP, handlers.find(request))
        elif field_ == CommandField.C_MOVE_RQ and handlers.move is not None:
            body = self._stream(request, CommandField.C_MOVE_RSP, handlers.move(request))
        else:
            raise ProtocolError(f"DIMSE command 0x{field_:04X} is not supported here")
        task = asyncio.get_running_loop().create_task(body)
        self.operations[msg_id] = (request, task)
        task.add_done_callback(lambda _: self.operations.pop(msg_id, None))

    def _respond(self, request: Request, field_: int, status: int, identifier: bytes | None = None,
                 comment: str | None = None, counts: dict[int, int] | None = None) -> None:
        assert self.assoc is not None
        command: dict[int, int | str] = {
            AFFECTED_SOP_CLASS_UID: request.sop_class, COMMAND_FIELD: field_,
            MESSAGE_ID_BEING_RESPONDED_TO: request.message_id, STATUS: status,
        }
        if comment and status not in PENDING_STATUSES and status != Status.SUCCESS:
            command[ERROR_COMMENT] = comment
        if counts:
            command.update(counts)
        self.assoc.send(request.context.context_id, command, identifier)

    async def _echo(self, request: Request) -> None:
        echo = self.acceptor.handlers.echo
        try:
            status = Status.SUCCESS if echo is None else await echo(request)
        except Exception as exc:
            LOG.warning("C-ECHO handler failed: %s", exc)
            status = Status.UNABLE_TO_PROCESS
        self._respond(request, CommandField.C_ECHO_RSP, status)

    async def _stream(self, request: Request, field_: int,
                      results: AsyncIterator[FindResult] | AsyncIterator[MoveResult]) -> None:
        assert self.assoc is not None
        final: tuple[int, bytes | None, str | None, dict[int, int] | None] | None = None
        sent = 0
        try:
            async for result in results:
                if request.cancelled.is_set():
                    break
                counts = _counts(result) if isinstance(result, MoveResult) else None
                if result.status in PENDING_STATUSES:
                    self._respond(request, field_, result.status, result.identifier, None, counts)
                    await self.assoc.drain()
                    sent += 1
                    if sent % YIELD_EVERY == 0:  # drain() returns at once below the high-water mark
                        await asyncio.sleep(0)  # let the reader take a C-CANCEL in
                    continue
                final = (result.status, result.identifier, result.comment, counts)
                break
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            LOG.warning("handler for 0x%04X failed: %s", field_, exc)
            final = (Status.UNABLE_TO_PROCESS, None, f"{type(exc).__name__}: {exc}"[:64], None)
        finally:
            aclose = getattr(results, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
        if final is None:
            final = (Status.CANCEL if request.cancelled.is_set() else Status.SUCCESS, None, None, None)
        if not self.assoc.writer.is_closing():
            self._respond(request, field_, *final)
            await self.assoc.drain()


def _counts(result: MoveResult) -> dict[int, int]:
    return {REMAINING_SUBOPERATIONS: result.remaining, COMPLETED_SUBOPERATIONS: result.completed,
            FAILED_SUBOPERATIONS: result.failed, WARNING_SUBOPERATIONS: result.warning}
