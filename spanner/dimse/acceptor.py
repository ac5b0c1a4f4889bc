"""The acceptor side: a listener that negotiates associations and hands requests to async handlers.

    async def on_find(request: FindRequest) -> AsyncIterator[FindResult]:
        for match in matches(request.identifier, request.implicit):
            yield FindResult(Status.PENDING, encoded_match)   # raw data set bytes
        yield FindResult(Status.SUCCESS)                      # optional: the engine ends with success

    acceptor = Acceptor(AcceptorConfig("PACS", (VERIFICATION, STUDY_ROOT_FIND)), Handlers(find=on_find))
    port = await acceptor.start("127.0.0.1", 0)
    ...
    await acceptor.close()

Handlers are thin, pynetdicom style: ``echo`` returns a status; ``find``, ``move`` and ``get`` are async
generators of results. The engine writes each result as it is yielded and waits for the socket to drain
(backpressure); a C-CANCEL for the request sets ``request.cancelled`` and, at the handler's next yield,
closes the generator and answers Cancel (0xFE00), unless the handler yields its own final response (e.g. a
C-MOVE's Cancel with the counts so far). ``associate`` may refuse an association by returning an
``AssociateReject``; ``admit`` does the same asynchronously, knows the peer's address and may return any
value, kept as ``Request.state`` for the association's requests. A handler that raises answers 0xC000
with the error as ErrorComment.

C-GET (PS3.4 C.4.3): a requester proposes a context per storage class it wants instances of, with an
SCP/SCU Role Selection item (PS3.7 D.3.3.4) asking the SCP role for itself. Classes in
``AcceptorConfig.get_storage_classes`` are accepted only that way (the A-ASSOCIATE-AC answers with the role
granted: the requester SCP, this side SCU), in the first transfer syntax the requester proposes that pydicom
knows; proposed without role selection they are refused (this side would have to take C-STOREs). The
``get`` handler C-STOREs back on the requester's association with ``Request.store`` (spanner.dimse.store's
rules) between the pending responses it yields; the requester's C-STORE responses are read by the session
and handed to the waiting sub-operation.
Garbage, a truncated PDU or an unexpected one aborts that association only; the listener keeps serving.

Limits, so that idle or abusive connections never starve the others:
- ARTIM: a new connection must send its A-ASSOCIATE-RQ within ``artim_s`` (and a release waits at most
  that long for the peer to close); a silent connection is closed.
- ``idle_s``: an established association with no request running and no PDU for that long is aborted.
- ``maximum_associations`` counts established associations only; connections still waiting for their
  request do not take a slot.
- ``maximum_per_peer``: connections from one IP address (established or not); a request from a peer over
  it is rejected (transient, local limit exceeded).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Container, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, cast

from spanner.dicom_constants import (
    AFFECTED_SOP_CLASS_UID,
    AFFECTED_SOP_INSTANCE_UID,
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
    STORAGE_SOP_CLASS_ROOT,
    WARNING_SUBOPERATIONS,
    CommandField,
    Status,
)
from spanner.dimse.association import Association, set_nodelay
from spanner.dimse.errors import ProtocolError
from spanner.dimse.messages import MAX_MESSAGE_BYTES, Assembler, Command, Message
from spanner.dimse.pdu import (
    DEFAULT_MAX_PDU,
    RELEASE_RP,
    AcceptedContext,
    AssociateAccept,
    AssociateReject,
    AssociateRequest,
    ContextResult,
    PduType,
    RejectReason,
    RejectResult,
    RejectSource,
    RoleSelection,
    UserInformation,
    abort,
    read_pdu,
)
from spanner.dimse.store import (
    STORE_TRANSFER_SYNTAXES,
    SpoolFile,
    StoredInstance,
    StoreRequest,
    part10_header,
)
from spanner.dimse.store import store as store_instance

LOG = logging.getLogger(__name__)
LOCAL_LIMIT_EXCEEDED = 2  # reason of source 3, service provider (presentation), PS3.8 9.3.4
DRAIN_EVERY = 16  # pending responses between waits for the socket (backpressure) and looks at a C-CANCEL
# The requests served here, each on a context negotiated for its SOP class.
_REQUESTS = frozenset({CommandField.C_ECHO_RQ, CommandField.C_FIND_RQ, CommandField.C_MOVE_RQ,
                       CommandField.C_GET_RQ, CommandField.C_STORE_RQ})


@dataclass(frozen=True, slots=True)
class AcceptorConfig:
    ae_title: str
    abstract_syntaxes: Container[str]  # e.g. store.STORAGE_CLASSES for a storage SCP
    transfer_syntaxes: Sequence[str] = (IMPLICIT_VR_LE, EXPLICIT_VR_LE)  # preference order
    prefer_proposed_order: bool = False  # True: the requestor's order wins (a storage SCP keeps its syntax)
    store_dir: str = ""  # where incoming C-STORE data sets are written (needed with Handlers.store)
    store_max_bytes: int = 0  # a larger C-STORE data set is refused with 0xA700; 0: no limit
    # A larger command or identifier (anything not streamed to the store) aborts its association; 0: no limit
    message_max_bytes: int = MAX_MESSAGE_BYTES
    max_pdu: int = DEFAULT_MAX_PDU
    artim_s: float = 30.0
    require_called_ae: bool = False
    maximum_associations: int = 64
    maximum_per_peer: int = 0  # 0: no limit
    idle_s: float = 0.0  # 0: an established association may idle for ever
    # Storage classes this side C-STOREs to a C-GET requester: accepted only with role selection
    get_storage_classes: Container[str] = ()


class FindResult(NamedTuple):
    status: int
    identifier: bytes | None = None
    comment: str | None = None


class MoveResult(NamedTuple):
    status: int
    remaining: int | None = 0  # None: not sent (final responses, PS3.4 C.4.2.1.6)
    completed: int = 0
    failed: int = 0
    warning: int = 0
    identifier: bytes | None = None
    comment: str | None = None


@dataclass(slots=True)
class Request:
    """One C-ECHO / C-FIND / C-MOVE / C-GET request as a handler sees it."""

    association: Association
    context: AcceptedContext
    message_id: int
    identifier: bytes | None
    move_destination: str = ""
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    peer: str = ""  # the requestor's IP address
    state: object = None  # what ``Handlers.admit`` returned for this association
    suboperations: SubOperations | None = None  # C-STOREs back to the requester (C-GET)

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

    async def store(self, instance: StoredInstance) -> int:
        """C-STORE ``instance`` back to the requester (a C-GET sub-operation); its C-STORE status.

        Raises NoAcceptedContext / TransferSyntaxNotAccepted (spanner.dimse.store) when the requester
        accepted no context the instance can go through, or the association's errors.
        """
        if self.suboperations is None:
            raise ProtocolError("no C-STORE sub-operations on this association")
        return await self.suboperations.store(instance)


class SubOperations:
    """The C-STOREs this side sends on one accepted association: one at a time (each waits for its
    response, which the session reads and delivers), with message IDs of their own."""

    def __init__(self, association: Association) -> None:
        self._association = association
        self._lock = asyncio.Lock()
        self._message_id = 0

    async def store(self, instance: StoredInstance) -> int:
        async with self._lock:
            self._message_id = self._message_id % 0xFFFF + 1
            return await store_instance(self._association, instance, self._message_id)

    @property
    def storage_classes(self) -> frozenset[str]:
        """The storage classes of the contexts accepted for C-STOREs to the requester."""
        return frozenset(c.abstract_syntax for c in self._association.contexts.values()
                         if c.accepted and c.abstract_syntax.startswith(STORAGE_SOP_CLASS_ROOT))


FindHandler = Callable[[Request], AsyncIterator[FindResult]]
MoveHandler = Callable[[Request], AsyncIterator[MoveResult]]
StoreHandler = Callable[[StoreRequest], Awaitable[int]]


@dataclass(frozen=True, slots=True)
class Handlers:
    echo: Callable[[Request], Awaitable[int]] | None = None  # None: answer success
    find: FindHandler | None = None
    move: MoveHandler | None = None
    get: MoveHandler | None = None  # C-GET: like ``move``; C-STOREs with ``Request.store`` in between
    store: StoreHandler | None = None  # with AcceptorConfig.store_dir; see spanner.dimse.store
    associate: Callable[[AssociateRequest], AssociateReject | None] | None = None
    admit: Callable[[AssociateRequest, str], Awaitable[AssociateReject | object]] | None = None
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
        self._per_peer: dict[str, int] = {}
        self.associations = 0  # established right now
        self.port = 0

    @property
    def active_associations(self) -> int:
        """Open connections, established or still waiting for their A-ASSOCIATE-RQ."""
        return len(self._connections)

    def connections_from(self, peer: str) -> int:
        return self._per_peer.get(peer, 0)

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
        peername = writer.get_extra_info("peername")
        peer = str(peername[0]) if isinstance(peername, tuple) else ""
        self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
        set_nodelay(writer)
        if self.handlers.connected is not None:
            self.handlers.connected()
        session = _Session(self, reader, writer, peer)
        try:
            await session.run()
        except ProtocolError as exc:
            LOG.info("%s: aborting an association: %s", self.config.ae_title, exc)
            session.abort(source=2)
        except TimeoutError:
            LOG.info("%s: closing a connection from %s: %s", self.config.ae_title, peer or "?",
                     "idle too long" if session.assoc is not None else "no A-ASSOCIATE-RQ within ARTIM")
            session.abort(source=2)
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            pass
        except asyncio.CancelledError:
            session.abort()
        finally:
            session.stop_operations()
            if session.assoc is not None:
                self.associations -= 1
            self._connections.discard(task)
            left = self._per_peer.get(peer, 1) - 1
            if left > 0:
                self._per_peer[peer] = left
            else:
                self._per_peer.pop(peer, None)
            writer.close()


class _Session:
    """One accepted connection: negotiation, then messages until release or abort."""

    def __init__(self, acceptor: Acceptor, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, peer: str) -> None:
        self.acceptor = acceptor
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.state: object = None
        self.assoc: Association | None = None
        self.operations: dict[int, tuple[Request, asyncio.Task[None]]] = {}
        self.assembler: Assembler | None = None
        self.suboperations: SubOperations | None = None

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
        if self.assembler is not None:
            self.assembler.abandon()  # a C-STORE cut off mid data set leaves no file behind

    async def run(self) -> None:
        config = self.acceptor.config
        kind, body = await asyncio.wait_for(read_pdu(self.reader, config.max_pdu), config.artim_s)
        if kind != PduType.ASSOCIATE_RQ:
            raise ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type 0x{kind:02X}")
        request = AssociateRequest.decode(body)
        reject = self._refusal(request)
        if reject is None and self.acceptor.handlers.admit is not None:
            admitted = await self.acceptor.handlers.admit(request, self.peer)
            if isinstance(admitted, AssociateReject):
                reject = admitted
            else:
                self.state = admitted
        if reject is None and self.acceptor.associations >= config.maximum_associations:
            reject = AssociateReject(RejectResult.TRANSIENT, RejectSource.SERVICE_PROVIDER_PRESENTATION,
                                     LOCAL_LIMIT_EXCEEDED)
        if reject is not None:
            self.writer.write(reject.encode())
            await self.writer.drain()
            return
        contexts, roles = self._negotiate_all(request)
        accept = AssociateAccept(request.called_ae, request.calling_ae, contexts,
                                 UserInformation(config.max_pdu, roles=roles), request.application_context)
        self.writer.write(accept.encode())
        self.acceptor.associations += 1
        writer = cast(asyncio.StreamWriter, _CoalescingWriter(self.writer))
        self.assoc = Association(self.reader, writer, contexts, calling_ae=request.calling_ae,
                                 called_ae=request.called_ae, peer_max_pdu=request.user.max_pdu,
                                 max_pdu=config.max_pdu, acse_timeout_s=config.artim_s,
                                 peer_implementation_class_uid=request.user.implementation_class_uid)
        if roles:
            self.suboperations = SubOperations(self.assoc)
        if self.acceptor.handlers.established is not None:
            self.acceptor.handlers.established(self.assoc)
        assembler = self.assembler = Assembler(self._store_sink if self.acceptor.handlers.store else None,
                                                  max_bytes=config.message_max_bytes)
        while True:
            kind, body = await self._next_pdu()
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

    async def _next_pdu(self) -> tuple[int, bytes]:
        """The next PDU; TimeoutError once the association idled ``idle_s`` with no request running."""
        idle_s = self.acceptor.config.idle_s
        if not idle_s:
            return await read_pdu(self.reader, self.acceptor.config.max_pdu)
        # One read task, waited on in rounds: a running request keeps the association alive, and the
        # read is never cancelled half-way through a PDU.
        read = asyncio.ensure_future(read_pdu(self.reader, self.acceptor.config.max_pdu))
        try:
            while True:
                done, _ = await asyncio.wait({read}, timeout=idle_s)
                if done:
                    return read.result()
                if not self.operations:
                    raise TimeoutError(f"no PDU for {idle_s:g} s")
        finally:
            if not read.done():
                read.cancel()

    def _refusal(self, request: AssociateRequest) -> AssociateReject | None:
        config = self.acceptor.config
        if request.application_context != APPLICATION_CONTEXT:
            return AssociateReject(RejectResult.PERMANENT, RejectSource.SERVICE_USER,
                                   RejectReason.APPLICATION_CONTEXT_NOT_SUPPORTED)
        # Handlers pass AE titles on (logs, HTTP headers, the audit trail): only what the AE VR allows.
        if not valid_ae_title(request.calling_ae):
            return AssociateReject(RejectResult.PERMANENT, RejectSource.SERVICE_USER,
                                   RejectReason.CALLING_AE_NOT_RECOGNIZED)
        if not valid_ae_title(request.called_ae):
            return AssociateReject(RejectResult.PERMANENT, RejectSource.SERVICE_USER,
                                   RejectReason.CALLED_AE_NOT_RECOGNIZED)
        if config.require_called_ae and request.called_ae != config.ae_title.strip():
            return AssociateReject(RejectResult.PERMANENT, RejectSource.SERVICE_USER,
                                   RejectReason.CALLED_AE_NOT_RECOGNIZED)
        over_limit = (self.acceptor.associations >= config.maximum_associations
                      or 0 < config.maximum_per_peer < self.acceptor.connections_from(self.peer))
        if over_limit:
            if self.acceptor.associations < config.maximum_associations:
                LOG.warning("%s: rejecting %s from %s: %d connections from that address (limit %d)",
                            config.ae_title, request.calling_ae, self.peer,
                            self.acceptor.connections_from(self.peer), config.maximum_per_peer)
            return AssociateReject(RejectResult.TRANSIENT, RejectSource.SERVICE_PROVIDER_PRESENTATION,
                                   LOCAL_LIMIT_EXCEEDED)
        if self.acceptor.handlers.associate is not None:
            return self.acceptor.handlers.associate(request)
        return None

    def _negotiate_all(self, request: AssociateRequest
                       ) -> tuple[tuple[AcceptedContext, ...], tuple[RoleSelection, ...]]:
        """Every proposed context's result, and the role selections granted (PS3.7 D.3.3.4)."""
        config = self.acceptor.config
        contexts: list[AcceptedContext] = []
        granted: dict[str, RoleSelection] = {}
        for c in request.contexts:
            proposed = request.user.role_for(c.abstract_syntax)
            if c.abstract_syntax in config.get_storage_classes and proposed is not None and proposed.scp_role:
                # The requester takes the SCP role (it receives the C-STOREs); this side is SCU only, so
                # a proposed SCU role for the requester is declined.
                known = [ts for ts in c.transfer_syntaxes if ts in STORE_TRANSFER_SYNTAXES]
                result = ContextResult.ACCEPTANCE if known else ContextResult.TRANSFER_SYNTAXES_NOT_SUPPORTED
                syntax = (known or list(c.transfer_syntaxes) or [IMPLICIT_VR_LE])[0]
                contexts.append(AcceptedContext(c.context_id, result, syntax, c.abstract_syntax))
                if known:
                    granted[c.abstract_syntax] = RoleSelection(c.abstract_syntax, False, True)
                continue
            contexts.append(self._negotiate(c.context_id, c.abstract_syntax, c.transfer_syntaxes))
        return tuple(contexts), tuple(granted.values())

    def _negotiate(self, context_id: int, abstract: str, transfers: Sequence[str]) -> AcceptedContext:
        config = self.acceptor.config
        if abstract not in config.abstract_syntaxes:
            return AcceptedContext(context_id, ContextResult.ABSTRACT_SYNTAX_NOT_SUPPORTED,
                                   transfers[0] if transfers else IMPLICIT_VR_LE, abstract)
        ordered = ([ts for ts in transfers if ts in config.transfer_syntaxes] if config.prefer_proposed_order
                   else [ts for ts in config.transfer_syntaxes if ts in transfers])
        if ordered:
            return AcceptedContext(context_id, ContextResult.ACCEPTANCE, ordered[0], abstract)
        return AcceptedContext(context_id, ContextResult.TRANSFER_SYNTAXES_NOT_SUPPORTED,
                               transfers[0] if transfers else IMPLICIT_VR_LE, abstract)

    # -- DIMSE ----------------------------------------------------------------------------------------
    def _dispatch(self, message: Message) -> None:
        try:
            self._dispatch_message(message)
        except BaseException:
            if message.sink is not None:  # a refused C-STORE (e.g. message ID in use) leaves no file
                message.sink.discard()
            raise

    def _dispatch_message(self, message: Message) -> None:
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
        if field_ == CommandField.C_STORE_RSP and self.suboperations is not None:
            self.assoc.deliver(message)  # the requester's answer to a C-GET sub-operation
            return
        msg_id = command.message_id
        if msg_id in self.operations:
            raise ProtocolError(f"message ID {msg_id} is already in use on this association")
        sop_class = command.text(AFFECTED_SOP_CLASS_UID)
        if field_ in _REQUESTS and sop_class != context.abstract_syntax:
            # A handler reads the SOP class from the context (it picks the information model): a
            # request for another class on it is refused, as for a class not negotiated at all.
            if message.sink is not None:
                message.sink.discard()
            self.assoc.send(context.context_id, {
                AFFECTED_SOP_CLASS_UID: sop_class, COMMAND_FIELD: field_ | 0x8000,
                MESSAGE_ID_BEING_RESPONDED_TO: msg_id, STATUS: Status.SOP_CLASS_NOT_SUPPORTED,
                ERROR_COMMENT: f"presentation context {context.context_id} is for another SOP class",
            }, None)
            return
        request = Request(self.assoc, context, msg_id, message.dataset,
                          command.text(MOVE_DESTINATION), peer=self.peer, state=self.state,
                          suboperations=self.suboperations)
        handlers = self.acceptor.handlers
        if field_ == CommandField.C_ECHO_RQ:
            body = self._echo(request)
        elif field_ == CommandField.C_FIND_RQ and handlers.find is not None:
            body = self._stream(request, CommandField.C_FIND_RSP, handlers.find(request))
        elif field_ == CommandField.C_MOVE_RQ and handlers.move is not None:
            body = self._stream(request, CommandField.C_MOVE_RSP, handlers.move(request))
        elif field_ == CommandField.C_GET_RQ and handlers.get is not None:
            body = self._stream(request, CommandField.C_GET_RSP, handlers.get(request))
        elif field_ == CommandField.C_STORE_RQ and isinstance(message.sink, SpoolFile):
            body = self._store(request, message.command, message.sink)
        else:
            raise ProtocolError(f"DIMSE command 0x{field_:04X} is not supported here")
        task = asyncio.get_running_loop().create_task(body)
        sink = message.sink
        if sink is not None:  # also when the task is cancelled before it starts
            task.add_done_callback(lambda _: sink.discard())
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

    def _store_sink(self, context_id: int, command: Command) -> SpoolFile | None:
        assert self.assoc is not None
        context = self.assoc.contexts.get(context_id)
        if command.field != CommandField.C_STORE_RQ or context is None or not context.accepted:
            return None
        config = self.acceptor.config
        header = part10_header(command.text(AFFECTED_SOP_CLASS_UID) or context.abstract_syntax,
                               command.text(AFFECTED_SOP_INSTANCE_UID), context.transfer_syntax)
        return SpoolFile(config.store_dir, header, config.store_max_bytes)

    async def _store(self, request: Request, command: Command, sink: SpoolFile) -> None:
        assert self.assoc is not None and self.acceptor.handlers.store is not None
        stored = StoreRequest.of(self.assoc, request.context, command, sink, self.peer, self.state)
        comment: str | None = sink.refused
        try:
            if sink.refused is not None:
                status = int(Status.OUT_OF_RESOURCES)
            else:
                status = await self.acceptor.handlers.store(stored)
        except Exception as exc:
            LOG.warning("C-STORE handler failed for %s: %s", stored.sop_instance_uid, exc)
            status, comment = int(Status.UNABLE_TO_PROCESS), f"{type(exc).__name__}: {exc}"[:64]
        sink.discard()  # what the handler did not move away
        self.assoc.send(request.context.context_id, {
            AFFECTED_SOP_CLASS_UID: stored.sop_class_uid, AFFECTED_SOP_INSTANCE_UID: stored.sop_instance_uid,
            COMMAND_FIELD: CommandField.C_STORE_RSP, MESSAGE_ID_BEING_RESPONDED_TO: request.message_id,
            STATUS: status, **({ERROR_COMMENT: comment} if comment and status != Status.SUCCESS else {}),
        })
        await self.assoc.drain()

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
                if request.cancelled.is_set() and result.status in PENDING_STATUSES:
                    break
                counts = _counts(result) if isinstance(result, MoveResult) else None
                if result.status in PENDING_STATUSES:
                    self._respond(request, field_, result.status, result.identifier, None, counts)
                    sent += 1
                    if sent % DRAIN_EVERY == 0:
                        await self.assoc.drain()
                        # Let the loop read what arrived meanwhile (a C-CANCEL, an A-ABORT): the writes
                        # above do not block while the socket takes them.
                        await asyncio.sleep(0)
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


class _CoalescingWriter:
    """The association's writer: writes made while the task runs go out as one ``send`` once it yields.

    A handler yielding many small pending responses would otherwise cost a system call (and a wake-up
    of the client) per response, most of the front's CPU per match.
    """

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._parts: list[bytes] = []
        self._scheduled = False

    def write(self, data: bytes) -> None:
        self._parts.append(data)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if self._parts:
            data = b"".join(self._parts)
            self._parts.clear()
            if not self._writer.is_closing():
                self._writer.write(data)

    async def drain(self) -> None:
        self.flush()
        await self._writer.drain()

    def close(self) -> None:
        self.flush()
        self._writer.close()

    def is_closing(self) -> bool:
        return self._writer.is_closing()

    async def wait_closed(self) -> None:
        await self._writer.wait_closed()

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self._writer.get_extra_info(name, default)


def valid_ae_title(title: str) -> bool:
    """Printable ASCII without a backslash (PS3.5 6.2, VR AE); ``title`` as decoded from the PDU."""
    return all(" " <= c <= "~" and c != "\\" for c in title)


def _counts(result: MoveResult) -> dict[int, int]:
    counts = {COMPLETED_SUBOPERATIONS: result.completed, FAILED_SUBOPERATIONS: result.failed,
              WARNING_SUBOPERATIONS: result.warning}
    if result.remaining is not None:
        counts[REMAINING_SUBOPERATIONS] = result.remaining
    return counts
