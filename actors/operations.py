"""Blocking DIMSE operations, each run in its own thread so the actor can stop waiting at a deadline.

A C-FIND that overruns is cancelled (C-CANCEL) and, if the peer keeps going, aborted; its thread
ends on its own and only then frees the association slot, so ``max_associations`` really bounds
what is open against the PACS.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom.association import Association

from actors.dicom_json import to_match
from actors.pool import AssociationPool
from spanner.errors import DimseFailure, NodeError
from spanner.outcome import DicomJson

PENDING = (0xFF00, 0xFF01)
CANCELLED = 0xFE00


def _little_endian(identifier: Dataset) -> bool:
    encoding = getattr(identifier, "original_encoding", (True, True))
    return encoding[1] is not False


class _Cancellable:
    """What C-FIND and C-MOVE share: the association in use, C-CANCEL, and abort as the last resort."""

    def __init__(self, pool: AssociationPool, model: UID, msg_id: int, dimse_timeout_s: float) -> None:
        self._pool = pool
        self._model = model
        self._msg_id = msg_id
        self._dimse_timeout_s = dimse_timeout_s
        self._lock = threading.Lock()
        self._assoc: Association | None = None
        self.final_status: int | None = None
        self.error_comment: str | None = None
        self.error: NodeError | None = None
        self.aborted = False
        self.cancel_sent = False
        self.finished = threading.Event()

    def _use(self, assoc: Association) -> None:
        with self._lock:
            self._assoc = assoc
        assoc.dimse_timeout = self._dimse_timeout_s

    def cancel(self) -> None:
        """Ask the peer to stop (C-CANCEL); harmless when the operation already ended."""
        with self._lock:
            assoc = self._assoc
            if assoc is None or self.finished.is_set() or self.cancel_sent:
                return
            self.cancel_sent = True
        with contextlib.suppress(RuntimeError, ValueError):  # the association ended meanwhile
            assoc.send_c_cancel(self._msg_id, query_model=self._model)

    def abort_if_running(self) -> None:
        """The peer ignored C-CANCEL: abort the association so the thread and the slot are freed."""
        with self._lock:
            assoc = self._assoc
        if assoc is not None and not self.finished.is_set():
            self.aborted = True
            assoc.abort()


class FindOperation(_Cancellable):
    """One C-FIND on a pooled association; retried once on a fresh one if a reused one turns out dead."""

    def __init__(
        self, pool: AssociationPool, identifier: Dataset, model: UID, msg_id: int, dimse_timeout_s: float
    ) -> None:
        super().__init__(pool, model, msg_id, dimse_timeout_s)
        self._identifier = identifier
        self.matches: list[DicomJson] = []

    def run(self) -> None:
        try:
            for attempt in (1, 2):
                if not self._attempt(last=attempt == 2):
                    return
        finally:
            self.finished.set()

    def _attempt(self, last: bool) -> bool:
        """One try; True asks for a retry on a fresh association."""
        try:
            assoc, reused = self._pool.acquire()
        except NodeError as exc:
            self.error = exc
            return False
        self._use(assoc)
        got_any = False
        try:
            responses = assoc.send_c_find(self._identifier, self._model, msg_id=self._msg_id)
            for status, identifier in responses:
                if "Status" not in status:  # aborted, or no answer within the DIMSE timeout
                    if reused and not got_any and not last and not self.cancel_sent:
                        self._pool.give_back(assoc, reusable=False, polite=False)
                        return True
                    self.aborted = True
                    break
                got_any = True
                code = int(status.Status)
                if code in PENDING:
                    if identifier is not None:
                        self.matches.append(to_match(identifier, _little_endian(identifier)))
                    continue
                self.final_status = code
                self.error_comment = str(status.get("ErrorComment", "")) or None
                break
        except (ValueError, RuntimeError) as exc:  # no accepted context for the model, encoding failure
            self.error = DimseFailure(f"C-FIND could not be sent: {exc}")
        self._pool.give_back(
            assoc, reusable=self.final_status is not None and not self.aborted, polite=not self.aborted
        )
        return False


class EchoOperation:
    """One C-ECHO on a pooled association (the circuit breaker's probe and the /echo endpoint)."""

    def __init__(self, pool: AssociationPool) -> None:
        self._pool = pool
        self.status: int | None = None
        self.error: NodeError | None = None
        self.finished = threading.Event()

    def run(self) -> None:
        try:
            try:
                assoc, _ = self._pool.acquire()
            except NodeError as exc:
                self.error = exc
                return
            rsp = assoc.send_c_echo()
            self.status = int(rsp.Status) if "Status" in rsp else None
            self._pool.give_back(assoc, reusable=self.status is not None)
        finally:
            self.finished.set()

    def cancel(self) -> None:
        """A C-ECHO is not cancellable; its thread ends by the DIMSE timeout."""

    def abort_if_running(self) -> None:
        """Nothing to abort: see cancel()."""


SUBOPS = (
    "NumberOfRemainingSuboperations",
    "NumberOfCompletedSuboperations",
    "NumberOfFailedSuboperations",
    "NumberOfWarningSuboperations",
)


def suboperations(status: Dataset) -> dict[str, int]:
    """The sub-operation counts of a C-MOVE response, zero where the PACS left one out."""
    names = ("remaining", "completed", "failed", "warning")
    return {name: int(status.get(key) or 0) for name, key in zip(names, SUBOPS, strict=True)}


class MoveOperation(_Cancellable):
    """One C-MOVE on a pooled association; each pending response is reported through ``on_progress``."""

    def __init__(
        self,
        pool: AssociationPool,
        identifier: Dataset,
        model: UID,
        destination: str,
        msg_id: int,
        dimse_timeout_s: float,
        on_progress: Callable[[dict[str, int]], None],
    ) -> None:
        super().__init__(pool, model, msg_id, dimse_timeout_s)
        self._identifier = identifier
        self._destination = destination
        self._on_progress = on_progress
        self.counts = {"remaining": 0, "completed": 0, "failed": 0, "warning": 0}
        self.failed_uids: list[str] = []

    def run(self) -> None:
        try:
            self._run()
        finally:
            self.finished.set()

    def _run(self) -> None:
        try:
            assoc, _ = self._pool.acquire()
        except NodeError as exc:
            self.error = exc
            return
        self._use(assoc)
        try:
            responses = assoc.send_c_move(
                self._identifier, self._destination, self._model, msg_id=self._msg_id
            )
            for status, identifier in responses:
                if "Status" not in status:
                    self.aborted = True
                    break
                code = int(status.Status)
                self.counts.update(suboperations(status))
                if code in PENDING:
                    self._on_progress(dict(self.counts))
                    continue
                self.final_status = code
                self.error_comment = str(status.get("ErrorComment", "")) or None
                if identifier is not None and "FailedSOPInstanceUIDList" in identifier:
                    value = identifier.FailedSOPInstanceUIDList
                    values = value if isinstance(value, list | tuple) else [value]
                    self.failed_uids = [str(v) for v in values]
                break
        except (ValueError, RuntimeError) as exc:
            self.error = DimseFailure(f"C-MOVE could not be sent: {exc}")
        self._pool.give_back(
            assoc, reusable=self.final_status is not None and not self.aborted, polite=not self.aborted
        )
