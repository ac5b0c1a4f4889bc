"""What a Serve replica holds: settings, the repository, the cache, the coordinator, the node actors."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from actors import event_relay, registry, store_service
from serve_app.admission import Admission
from serve_app.coordinator import Coordinator
from serve_app.keys import KeyCache
from serve_app.records import RecordWriter
from serve_app.retrieval import Retriever
from serve_app.shared_reads import SharedReads
from spanner import hops
from spanner.cache import make_cache
from spanner.config_file import apply_config
from spanner.errors import NotFound, SpannerError
from spanner.keys import hash_key
from spanner.nodespec import ActorTuning, NodeSpec
from spanner.schemas import ALL_SPAN, CLOSING_ROLES, NodeOut
from spanner.settings import Settings
from spanner.storage import Repository, make_engine, require_current_schema

log = logging.getLogger("spanner.serve")


class AuditJanitor:
    """Purges records older than the retention; ``due()`` is the cheap check the request paths make."""

    INTERVAL_S = 3600.0

    def __init__(
        self, repo: Repository, retention_days: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._repo = repo
        self._retention_days = retention_days
        self._clock = clock
        self._last: float | None = None
        self._lock = threading.Lock()

    def due(self) -> bool:
        if self._retention_days <= 0:
            return False
        return self._last is None or self._clock() - self._last >= self.INTERVAL_S

    def purge(self) -> int:
        """Delete what is past retention (call in a thread); a failure is logged, never raised."""
        if self._retention_days <= 0:
            return 0
        with self._lock:
            self._last = self._clock()
        cutoff = datetime.now(UTC) - timedelta(days=self._retention_days)
        try:
            gone = self._repo.purge_audit(cutoff)
        except SpannerError as exc:
            log.warning("audit purge failed: %s", exc)
            return 0
        if gone:
            log.info("audit trail: %d records older than %d days purged", gone, self._retention_days)
        return gone

    def purge_if_due(self) -> None:
        if self.due():
            self.purge()


class Services:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        engine = make_engine(settings.effective_database_url)
        # Replicas never migrate: several starting at once would race. `spanner db upgrade` does it.
        require_current_schema(engine)
        self.repo = Repository(engine)
        self.cache = make_cache(settings)
        self.repo.ensure_default_span(ae_title="SPANNER")
        if settings.config is not None:
            apply_config(self.repo, settings.config)
        self.tuning = ActorTuning(
            circuit_failures=settings.circuit_failures,
            circuit_cooldown_s=settings.circuit_cooldown_s,
            pool_idle_s=settings.pool_idle_s,
            cancel_grace_s=settings.cancel_grace_s,
            log_format=settings.log_format,
            log_level=settings.log_level,
            instance_id=hops.instance_id(settings),
        )
        self.coordinator = Coordinator(
            settings.namespace,
            self.tuning,
            settings.node_grace_s,
            settings.merge_inline_max,
            settings.merge_partitions,
        )
        self.retriever = Retriever(self.coordinator, lookup_timeout_s=settings.default_timeout_s)
        self.keys = KeyCache(self.repo, settings.auth_cache_ttl_s)
        self.span_reads = SharedReads(self.repo.span_for_query)  # what planning a query reads
        self.admission = Admission(settings.admission_max_active, settings.admission_max_waiting)
        self.janitor = AuditJanitor(self.repo, settings.audit_retention_days)
        self.janitor.purge()  # at start, then at most hourly from the request paths
        self.relay = self._start_relay()
        self.records = RecordWriter(after_batch=self._after_records)
        self._store: store_service.StoreHandle | None = None

    def store_if_known(self) -> store_service.StoreHandle | None:
        """The store actor's handle when this replica has looked it up already (no blocking call)."""
        return self._store

    def store(self, fresh: bool = False) -> store_service.StoreHandle:
        """The store actor (a detached named actor), looked up once per replica; ``fresh`` looks again
        (after the actor died and was made anew). Blocking: call it in a thread the first time."""
        if self._store is None or fresh:
            self._store = store_service.get(self.settings)
        return self._store

    def _after_records(self) -> None:
        """After a batch of query records: the relay hears of their events; old records go when due."""
        self.nudge_events()
        self.janitor.purge_if_due()

    # -- events ---------------------------------------------------------------------------------------
    @property
    def events_enabled(self) -> bool:
        """With RABBITMQ_URL, records are written with their events (the outbox) for the relay."""
        return bool(self.settings.rabbitmq_url)

    def _start_relay(self) -> event_relay.RelayHandle | None:
        if not self.events_enabled:
            return None
        s = self.settings
        config = event_relay.RelayConfig(
            database_url=s.effective_database_url, rabbitmq_url=s.rabbitmq_url, exchange=s.events_exchange,
            poll_s=s.events_poll_s, gap_wait_s=s.events_gap_wait_s, retry_s=s.amqp_retry_s,
            timeout_s=s.amqp_timeout_s, retention_hours=s.events_retention_hours,
            log_format=s.log_format, log_level=s.log_level,
        )
        return event_relay.ensure(config, s.namespace)

    def nudge_events(self) -> None:
        """Tell the relay that the outbox has something (fire and forget; it polls anyway)."""
        if self.relay is None:
            return
        try:
            self.relay.nudge.remote()
        except Exception as exc:  # a dead relay is restarted by Ray; its poll picks the event up
            log.debug("event relay not nudged: %s", exc)

    # -- nodes and their actors -------------------------------------------------------------------------
    def spec_for(self, node: NodeOut) -> NodeSpec:
        return NodeSpec(
            name=node.name,
            ae_title=node.ae_title,
            host=node.host,
            port=node.port,
            calling_ae_title=node.calling_ae_title or self.settings.ae_title,
            priority=node.priority,
            max_associations=node.max_associations,
            max_queries_per_s=node.max_queries_per_s,
            connect_timeout_s=node.connect_timeout_s,
            dimse_timeout_s=node.dimse_timeout_s,
            query_timeout_s=node.query_timeout_s,
            reuse_associations=node.reuse_associations,
            query_models=tuple(node.query_models),
            additional_filters=tuple(sorted(node.additional_filters.items())),
            retrieve_method=node.retrieve_method,
            placement=tuple(sorted(node.placement.items())),
        )

    def sync_actor(self, name: str) -> None:
        """After a node changed: its actor runs the current spec, or stops if the node is gone or off, and
        nothing the spool holds from it is served again (a blocking call: routes that change nodes are
        synchronous and run in a worker thread)."""
        self.coordinator.forget(name)
        store_service.forget_node(self.settings, name)
        try:
            node: NodeOut | None = self.repo.get_node(name)
        except NotFound:
            node = None
        if node is None or not node.enabled:
            registry.stop(name, self.settings.namespace)
        else:
            registry.ensure(self.spec_for(node), self.tuning, self.settings.namespace)

    def reconcile(self) -> None:
        """Bring the actors in line with the database (at start-up), and read what every query reads
        once: its statements are compiled and the connection pool open before a first burst of queries
        arrives, not by the first of them (1.2 s of planning on a fresh replica under a burst)."""
        for node in self.repo.list_nodes():
            if node.enabled:
                registry.ensure(self.spec_for(node), self.tuning, self.settings.namespace)
            else:
                registry.stop(node.name, self.settings.namespace)
        self.repo.span_for_query(ALL_SPAN)
        self.repo.active_api_key(hash_key(""))  # no key has this hash: the statement, not a row
        self.repo.count_active_api_keys(CLOSING_ROLES)
