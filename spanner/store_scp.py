"""The spanner's storage SCP: where archives asked to C-MOVE to the spanner send their instances.

    scp = StorageScp(spool, ae_title="SPANNER")
    await scp.start("0.0.0.0", 11115)
    expectation = scp.expect(archive_ae="PACS_A", node="pacs-a", expected=sop_uids)  # may be empty
    async for response in assoc.move(..., destination="SPANNER", msg_id=expectation.message_id): ...
    entry = await expectation.arrivals.get()       # a SpoolEntry, as soon as it is in the spool
    scp.forget(expectation)

Matching an incoming C-STORE to its retrieval (several run at once, from one archive or many):
1. by the calling AE title of the storing archive and the Move Originator Message ID it carries, which
   is the Message ID of the C-MOVE request (PS3.7 9.3.1.1). ``expect`` hands out message IDs unique among
   the live expectations of one archive, so the pair names one retrieval;
2. fallback, for archives that omit the Move Originator Message ID (or send one no retrieval holds): by
   the calling AE title and the SOP Instance UID, among the expectations of that archive that list the
   UID in ``expected`` and have not received it yet, the oldest first. An expectation with no expected
   UIDs can only be matched the first way.
A C-STORE that matches nothing is refused (0xC000, "no retrieval expects ..."), and nothing is kept.
A spool that cannot take the instance answers Out of Resources (0xA700) and the failure is recorded
on the expectation (``failures``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from spanner.dicom_constants import Status
from spanner.dimse.acceptor import Acceptor, AcceptorConfig, Handlers
from spanner.dimse.store import STORAGE_CLASSES, STORE_TRANSFER_SYNTAXES, StoreRequest
from spanner.spool import Spool, SpoolEntry, SpoolFull

LOG = logging.getLogger(__name__)
MAX_MESSAGE_ID = 0xFFFF


class UnexpectedInstance(Exception):
    """A C-STORE no retrieval waits for; the store SCP refuses it (the message becomes its ErrorComment)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class TooManyRetrievals(Exception):
    """Every Move Originator Message ID of one archive is in use."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(eq=False)
class Expectation:
    """One C-MOVE's worth of instances expected from one archive."""

    archive_ae: str
    node: str
    message_id: int
    expected: frozenset[str]
    arrivals: asyncio.Queue[SpoolEntry] = field(default_factory=asyncio.Queue)
    received: set[str] = field(default_factory=set)
    failures: dict[str, str] = field(default_factory=dict)  # SOP Instance UID -> why it was refused
    on_arrival: Callable[[SpoolEntry], None] | None = None

    def waits_for(self, sop_instance_uid: str) -> bool:
        return sop_instance_uid in self.expected and sop_instance_uid not in self.received


class StorageScp:
    def __init__(self, spool: Spool, ae_title: str = "SPANNER", max_instance_bytes: int = 0,
                 maximum_associations: int = 64) -> None:
        self.spool = spool
        self.ae_title = ae_title
        self.max_instance_bytes = max_instance_bytes or spool.max_bytes
        self._by_id: dict[tuple[str, int], Expectation] = {}
        self._ids = itertools.count(1)
        config = AcceptorConfig(ae_title, STORAGE_CLASSES, STORE_TRANSFER_SYNTAXES,
                                prefer_proposed_order=True, store_dir=str(spool.incoming),
                                store_max_bytes=self.max_instance_bytes,
                                maximum_associations=maximum_associations)
        self.acceptor = Acceptor(config, Handlers(store=self._on_store))
        self.refused = 0  # C-STOREs that matched no retrieval

    async def start(self, host: str, port: int) -> int:
        return await self.acceptor.start(host, port)

    async def close(self) -> None:
        await self.acceptor.close()

    def expect(self, archive_ae: str, node: str, expected: frozenset[str] | set[str] = frozenset(),
               on_arrival: Callable[[SpoolEntry], None] | None = None) -> Expectation:
        """Register a retrieval from ``archive_ae``; C-MOVE it with ``message_id`` of the result.

        ``on_arrival`` takes each instance instead of ``arrivals`` (one consumer for several archives).
        """
        for _ in range(MAX_MESSAGE_ID):
            message_id = next(self._ids) % MAX_MESSAGE_ID + 1
            if (archive_ae, message_id) not in self._by_id:
                break
        else:
            raise TooManyRetrievals(f"{MAX_MESSAGE_ID} retrievals from {archive_ae} are running already")
        expectation = Expectation(archive_ae, node, message_id, frozenset(expected))
        expectation.on_arrival = on_arrival
        self._by_id[(archive_ae, message_id)] = expectation
        return expectation

    @property
    def active(self) -> int:
        """Retrievals registered and not forgotten yet."""
        return len(self._by_id)

    def forget(self, expectation: Expectation) -> None:
        """The retrieval ended: later C-STOREs for it are refused."""
        if self._by_id.get((expectation.archive_ae, expectation.message_id)) is expectation:
            del self._by_id[(expectation.archive_ae, expectation.message_id)]

    def match(self, calling_ae: str, originator_id: int | None, sop_instance_uid: str) -> Expectation | None:
        if originator_id is not None:
            found = self._by_id.get((calling_ae, originator_id))
            if found is not None:
                return found
        for (archive_ae, _), expectation in self._by_id.items():  # registration order: the oldest first
            if archive_ae == calling_ae and expectation.waits_for(sop_instance_uid):
                return expectation
        return None

    async def _on_store(self, request: StoreRequest) -> int:
        expectation = self.match(request.calling_ae, request.move_originator_id, request.sop_instance_uid)
        if expectation is None:
            self.refused += 1
            raise UnexpectedInstance(f"no retrieval expects {request.sop_instance_uid} from "
                                     f"{request.calling_ae}")
        return self.take(expectation, request)

    def take(self, expectation: Expectation, request: StoreRequest) -> int:
        """Put an instance that arrived for ``expectation`` into the spool (the storage SCP's C-STOREs, and
        those an archive sends back on a C-GET's own association) and hand it to the retrieval."""
        try:
            entry = self.spool.put(expectation.node, request.path)
        except SpoolFull as exc:
            LOG.warning("%s: %s", self.ae_title, exc.message)
            expectation.failures[request.sop_instance_uid] = exc.message
            return Status.OUT_OF_RESOURCES
        expectation.received.add(entry.sop_instance_uid)
        if expectation.on_arrival is not None:
            expectation.on_arrival(entry)
        else:
            expectation.arrivals.put_nowait(entry)
        return Status.SUCCESS
