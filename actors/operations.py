"""DIMSE operations of a node actor, as coroutines on its event loop (one task each, no threads).

A C-FIND or C-MOVE that overruns its deadline is cancelled (C-CANCEL) and, if the peer keeps going,
aborted (PacsNodeImpl._stop); the task ends on its own and only then frees the association slot, so
``max_associations`` really bounds what is open against the PACS. C-FIND responses are read from their
raw bytes straight into DICOM JSON (actors.dicom_json.from_bytes), no pydicom Dataset per match.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset

from actors.dicom_json import from_bytes
from actors.dimse import Association, Marked, encoder, identifier_for, node_error
from actors.pool import AssociationPool
from spanner.dicom_constants import FAILED_SOP_INSTANCE_UID_LIST, Status
from spanner.dimse import errors as engine
from spanner.dimse.association import Identifier
from spanner.errors import NodeError
from spanner.outcome import DicomJson

CANCELLED = Status.CANCEL


class _Cancellable:
    """What C-FIND and C-MOVE share: the association in use, C-CANCEL, and abort as the last resort."""

    def __init__(self, pool: AssociationPool, model: str, msg_id: int, dimse_timeout_s: float,
                 for_spanner: Marked | None) -> None:
        self._pool = pool
        self._for_spanner = for_spanner
        self._model = model
        self._msg_id = msg_id
        self._dimse_timeout_s = dimse_timeout_s
        self._assoc: Association | None = None
        self.final_status: int | None = None
        self.error_comment: str | None = None
        self.error: NodeError | None = None
        self.aborted = False
        self.cancel_sent = False
        self.finished = asyncio.Event()

    @property
    def associated(self) -> bool:
        """An association was established for this operation: there is one to send C-CANCEL on."""
        return self._assoc is not None

    def _use(self, assoc: Association) -> None:
        self._assoc = assoc
        assoc.dimse_timeout_s = self._dimse_timeout_s

    def cancel(self) -> None:
        """Ask the peer to stop (C-CANCEL); harmless when the operation already ended."""
        assoc = self._assoc
        if assoc is None or self.finished.is_set() or self.cancel_sent:
            return
        self.cancel_sent = True
        with contextlib.suppress(engine.DimseError):  # the association ended meanwhile
            assoc.cancel(self._msg_id, self._model)

    def abort_if_running(self) -> None:
        """The peer ignored C-CANCEL: abort the association, which ends the operation and frees the slot."""
        if self._assoc is not None and not self.finished.is_set():
            self.aborted = True
            self._assoc.abort()

    def _give_back(self, assoc: Association) -> None:
        self._pool.give_back(assoc, reusable=self.final_status is not None and not self.aborted,
                             polite=not self.aborted)


class FindOperation(_Cancellable):
    """One C-FIND on a pooled association; retried once on a fresh one if a reused one turns out dead."""

    def __init__(self, pool: AssociationPool, identifier: Identifier, model: str, msg_id: int,
                 dimse_timeout_s: float, for_spanner: Marked | None = None) -> None:
        super().__init__(pool, model, msg_id, dimse_timeout_s, for_spanner)
        self._identifier = identifier
        self.matches: list[DicomJson] = []

    async def run(self) -> None:
        try:
            for attempt in (1, 2):
                if not await self._attempt(last=attempt == 2):
                    return
        finally:
            self.finished.set()

    async def _attempt(self, last: bool) -> bool:
        """One try; True asks for a retry on a fresh association."""
        try:
            assoc, reused = await self._pool.acquire()
        except NodeError as exc:
            self.error = exc
            return False
        self._use(assoc)
        got_any = False
        try:
            identifier = identifier_for(assoc, self._identifier, self._for_spanner)
            async for response in assoc.find(self._model, identifier, self._msg_id):
                got_any = True
                if response.pending:
                    if response.identifier is not None:
                        try:
                            self.matches.append(from_bytes(response.identifier, response.implicit))
                        except Exception as exc:  # bytes neither the raw reader nor pydicom can read
                            self._unreadable(assoc, exc)
                            break
                    continue
                self.final_status = response.status
                self.error_comment = response.comment
        except (engine.AssociationAborted, engine.ProtocolError, engine.DimseTimeout) as exc:
            if reused and not got_any and not last and not self.cancel_sent and not self.aborted:
                self._pool.give_back(assoc, reusable=False, polite=False)
                return True
            self.aborted = True
            if isinstance(exc, engine.DimseTimeout):
                assoc.abort()
        except engine.DimseError as exc:  # no accepted context for the model
            self.error = node_error(exc, self._pool.spec)
        except (ValueError, TypeError) as exc:  # the identifier could not be encoded
            self.error = node_error(engine.DimseError(f"C-FIND could not be sent: {exc}"), self._pool.spec)
        self._give_back(assoc)
        return False

    def _unreadable(self, assoc: Association, exc: Exception) -> None:
        """A response identifier that cannot be read: the stream is untrustworthy, so the query ends
        aborted with the reason and the association goes."""
        reason = f"a C-FIND response identifier cannot be read ({type(exc).__name__}: {exc})"
        self.error = node_error(engine.ProtocolError(reason), self._pool.spec)
        self.aborted = True
        assoc.abort()


class EchoOperation:
    """One C-ECHO on a pooled association (the circuit breaker's probe and the /echo endpoint)."""

    def __init__(self, pool: AssociationPool) -> None:
        self._pool = pool
        self.status: int | None = None
        self.error: NodeError | None = None
        self.finished = asyncio.Event()

    async def run(self) -> None:
        try:
            try:
                assoc, _ = await self._pool.acquire()
            except NodeError as exc:
                self.error = exc
                return
            try:
                self.status = await assoc.echo()
            except engine.NoAcceptedContext as exc:
                self.error = node_error(exc, self._pool.spec)
            except engine.DimseError:
                self.status = None
            self._pool.give_back(assoc, reusable=self.status is not None, polite=self.status is not None)
        finally:
            self.finished.set()

    def cancel(self) -> None:
        """A C-ECHO is not cancellable; it ends by the DIMSE timeout."""

    def abort_if_running(self) -> None:
        """Nothing to abort: see cancel()."""


class MoveOperation(_Cancellable):
    """One C-MOVE on a pooled association; each pending response is reported through ``on_progress``."""

    def __init__(self, pool: AssociationPool, identifier: Dataset, model: str, destination: str,
                 msg_id: int, dimse_timeout_s: float, on_progress: Callable[[dict[str, int]], None],
                 for_spanner: Marked | None = None) -> None:
        super().__init__(pool, model, msg_id, dimse_timeout_s, for_spanner)
        self._identifier = encoder(identifier)
        self._destination = destination
        self._on_progress = on_progress
        self.counts = {"remaining": 0, "completed": 0, "failed": 0, "warning": 0}
        self.failed_uids: list[str] = []

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            self.finished.set()

    async def _run(self) -> None:
        try:
            assoc, _ = await self._pool.acquire()
        except NodeError as exc:
            self.error = exc
            return
        self._use(assoc)
        try:
            identifier = identifier_for(assoc, self._identifier, self._for_spanner)
            async for response in assoc.move(self._model, identifier, self._destination, self._msg_id):
                self.counts.update(response.suboperations())
                if response.pending:
                    self._on_progress(dict(self.counts))
                    continue
                self.final_status = response.status
                self.error_comment = response.comment
                if response.identifier is not None:
                    self.failed_uids = _failed_uids(response.identifier, response.implicit)
        except (engine.AssociationAborted, engine.ProtocolError, engine.DimseTimeout) as exc:
            self.aborted = True
            if isinstance(exc, engine.DimseTimeout):
                assoc.abort()
        except engine.DimseError as exc:
            self.error = node_error(exc, self._pool.spec)
        except (ValueError, TypeError) as exc:
            self.error = node_error(engine.DimseError(f"C-MOVE could not be sent: {exc}"), self._pool.spec)
        self._give_back(assoc)


def _failed_uids(raw: bytes, implicit: bool) -> list[str]:
    """(0008,0058) Failed SOP Instance UID List of a final C-MOVE response, if the PACS sent one."""
    try:
        ds = read_dataset(BytesIO(raw), implicit, True)
        value = ds.get(FAILED_SOP_INSTANCE_UID_LIST)
    except Exception:  # a malformed identifier on a final response is no reason to lose the counts
        return []
    if value is None or not value.value:
        return []
    values = [value.value] if isinstance(value.value, str) else value.value
    return [str(v) for v in values if v]


class LeaseOperation:
    """A slot held for work done elsewhere (a proxied retrieval's associations, opened by the store actor):
    it counts against the node's association limit from the moment it is granted until it is released,
    or until its deadline, when the actor stops it as any operation."""

    def __init__(self) -> None:
        self.granted = asyncio.Event()
        self.finished = asyncio.Event()
        self._released = asyncio.Event()

    async def run(self) -> None:
        self.granted.set()
        try:
            await self._released.wait()
        finally:
            self.finished.set()

    def release(self) -> None:
        self._released.set()

    def cancel(self) -> None:
        self._released.set()

    def abort_if_running(self) -> None:
        self._released.set()
