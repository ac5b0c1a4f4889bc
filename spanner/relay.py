"""The outbox relay: publishes stored events to RabbitMQ in id order, and keeps them while it cannot.

At-least-once: an event is marked published only after the broker confirmed it, so a crash between
the two publishes it again (consumers deduplicate by ``event_id``). Order: ids are handed out at
insert but become visible at commit, so on PostgreSQL a later id can appear before an earlier one;
the relay waits up to ``gap_wait_s`` for a missing id before it passes it (a rolled-back transaction
leaves a gap that never fills).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from spanner.errors import BrokerUnavailable, StorageError
from spanner.storage import OutboxEvent, Repository

log = logging.getLogger("spanner.events")

BATCH = 200
PURGE_INTERVAL_S = 600.0


class Publisher(Protocol):
    def ensure_open(self) -> None: ...

    def publish(self, routing_key: str, event_id: str, body: dict[str, Any]) -> None: ...

    def pump(self) -> None: ...

    def close(self) -> None: ...


class OutboxRelay:
    def __init__(
        self,
        repo: Repository,
        publisher: Publisher,
        *,
        broker: str,
        poll_s: float = 1.0,
        gap_wait_s: float = 2.0,
        retry_s: float = 2.0,
        retention_hours: float = 24.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._repo = repo
        self._publisher = publisher
        self._broker = broker
        self._poll_s = poll_s
        self._gap_wait = timedelta(seconds=gap_wait_s)
        self._retry_s = retry_s
        self._retention = timedelta(hours=retention_hours)
        self._clock = clock
        self._last_id: int | None = None
        self._outage_since: float | None = None
        self._delivered_in_outage = 0
        self._last_purge = 0.0
        self.published = 0
        self.wake = threading.Event()
        self.stopping = threading.Event()

    @property
    def connected(self) -> bool:
        return self._outage_since is None

    def run(self) -> None:
        """Until ``stopping`` is set: publish what is due, then sleep until nudged or ``poll_s`` passes."""
        while not self.stopping.is_set():
            pause = self._poll_s
            try:
                self.step()
            except BrokerUnavailable as exc:
                self._broker_down(exc)
                pause = self._retry_s
            except StorageError as exc:
                log.warning("event relay cannot read the outbox: %s", exc, extra={"event": "events.storage"})
                pause = self._retry_s
            except Exception:  # a bug must not end the relay's thread: say so, keep the events, try again
                log.exception("event relay failed; events stay in the outbox",
                              extra={"event": "events.error"})
                self._publisher.close()
                pause = self._retry_s
            self.wake.wait(pause)
            self.wake.clear()
            self._publisher.pump()
        self._publisher.close()

    def step(self) -> int:
        """Publish every event that may go now, in order; returns how many went."""
        if self._last_id is None:
            self._last_id = self._repo.last_published_event_id() or 0
        self._publisher.ensure_open()
        sent = 0
        while True:
            batch = self._ready(self._repo.pending_events(BATCH))
            if not batch:
                break
            done: list[int] = []
            try:
                for event in batch:
                    self._publisher.publish(event.routing_key, event.event_id, event.body)
                    done.append(event.id)
                    self._last_id = max(self._last_id, event.id)
            finally:
                self._repo.mark_published(done)  # what the broker confirmed, even if the rest failed
                sent += len(done)
                self.published += len(done)
                if self._outage_since is not None:
                    self._delivered_in_outage += len(done)
            if len(batch) < BATCH:
                break
        self._broker_up()
        self._purge()
        return sent

    def _ready(self, pending: list[OutboxEvent]) -> list[OutboxEvent]:
        """The leading run of events that may go: it stops before a gap younger than ``gap_wait_s``."""
        assert self._last_id is not None
        ready: list[OutboxEvent] = []
        expected = self._last_id + 1
        now = self._clock()
        for event in pending:
            if event.id > expected and now - event.created_at < self._gap_wait:
                break  # an earlier id may still be committing
            ready.append(event)
            expected = max(expected, event.id) + 1
        return ready

    def _broker_down(self, exc: BrokerUnavailable) -> None:
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            self._delivered_in_outage = 0
            log.warning("event broker unavailable (%s); events wait in the outbox and go out in order once "
                        "it is back", exc, extra={"event": "events.broker_down"})

    def _broker_up(self) -> None:
        if self._outage_since is None:
            return
        down_s = time.monotonic() - self._outage_since
        self._outage_since = None
        log.info("event broker %s is back after %.1f s; %d waiting events delivered", self._broker, down_s,
                 self._delivered_in_outage, extra={"event": "events.broker_up"})

    def _purge(self) -> None:
        if time.monotonic() - self._last_purge < PURGE_INTERVAL_S:
            return
        self._last_purge = time.monotonic()
        gone = self._repo.purge_published_events(self._clock() - self._retention)
        if gone:
            log.info("event outbox: %d published events purged", gone, extra={"event": "events.purged"})
