"""The one gateway to the database: pydantic models in, pydantic models out, spanner errors only.

SQLAlchemy errors are translated here (IntegrityError -> Conflict, anything else -> StorageError), so
callers never import SQLAlchemy and the ingress maps errors to HTTP statuses in one place. Each method
is one short transaction; rows never leave it, so nothing lazy-loads after the session is gone.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticCustomError
from sqlalchemy import Engine, delete, func, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from spanner import events
from spanner.errors import Conflict, InvalidConfig, InvalidQuery, NotFound, StorageError
from spanner.outcome import NodeOutcome
from spanner.schemas import (
    ALL_SPAN,
    ApiKeyOut,
    ApiRole,
    AuditEntryOut,
    Channel,
    DestinationIn,
    DestinationOut,
    DestinationPatch,
    DestinationPut,
    NodeIn,
    NodeOut,
    NodePatch,
    NodePut,
    QueryRecordOut,
    RetrievalRecordOut,
    SpanIn,
    SpanOut,
    SpanPatch,
    SpanPut,
    check_span_policy,
    describe_errors,
)
from spanner.storage.engine import BEGIN_OPTION, describe_db_error
from spanner.storage.tables import (
    ApiKeyRow,
    DestinationRow,
    NodeHealthRow,
    NodeRow,
    OutboxRow,
    QueryRecordRow,
    RetrievalRecordRow,
    SpanNodeRow,
    SpanRow,
)

M = TypeVar("M", bound=BaseModel)

_NODE_FIELDS = tuple(NodePut.model_fields)
_DESTINATION_FIELDS = tuple(DestinationPut.model_fields)
_SPAN_FIELDS = tuple(name for name in SpanPut.model_fields if name != "nodes")  # members live in span_nodes


def _now() -> datetime:
    return datetime.now(UTC)


def _quoted(names: Sequence[str]) -> str:
    return ", ".join(repr(name) for name in names)


class Repository:
    """Nodes, spans and query records; safe to share between threads (one session per call)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._reader = sessionmaker(engine, expire_on_commit=False)
        # On SQLite a writing transaction takes the write lock at BEGIN, so it waits (busy timeout)
        # instead of failing when another process wrote between its first read and its write.
        writer = engine.execution_options(**{BEGIN_OPTION: "IMMEDIATE"}) if engine.dialect.name == "sqlite" \
            else engine
        self._writer = sessionmaker(writer, expire_on_commit=False)

    @contextmanager
    def _session(self, *, write: bool = False) -> Iterator[Session]:
        factory = self._writer if write else self._reader
        try:
            with factory.begin() as session:
                yield session
        except IntegrityError as exc:
            raise Conflict(f"the change conflicts with stored data: {describe_db_error(exc)}") from exc
        except SQLAlchemyError as exc:
            where = self.engine.url.render_as_string(hide_password=True)
            raise StorageError(f"database error at {where}: {describe_db_error(exc)}") from exc

    def ping(self) -> None:
        """Readiness: raises StorageError when the database cannot answer a trivial query."""
        with self._session() as session:
            session.execute(text("SELECT 1"))

    # --- nodes ---------------------------------------------------------------------------------------

    def list_nodes(self) -> list[NodeOut]:
        with self._session() as session:
            rows = session.scalars(select(NodeRow).order_by(NodeRow.name)).all()
            return [_node_out(row) for row in rows]

    def get_node(self, name: str) -> NodeOut:
        with self._session() as session:
            return _node_out(_node_row(session, name))

    def create_node(self, node: NodeIn) -> NodeOut:
        with self._session(write=True) as session:
            if session.get(NodeRow, node.name) is not None:
                raise Conflict(f"node {node.name!r} already exists; replace or patch it instead")
            now = _now()
            row = NodeRow(name=node.name, created_at=now, updated_at=now)
            _assign(row, node, _NODE_FIELDS)
            session.add(row)
            session.flush()
            return _node_out(row)

    def replace_node(self, name: str, node: NodePut) -> NodeOut:
        with self._session(write=True) as session:
            row = _node_row(session, name)
            _assign(row, node, _NODE_FIELDS)
            row.updated_at = _now()
            session.flush()
            return _node_out(row)

    def patch_node(self, name: str, patch: NodePatch) -> NodeOut:
        with self._session(write=True) as session:
            row = _node_row(session, name)
            current = {field: getattr(row, field) for field in _NODE_FIELDS}
            merged = _revalidate(NodePut, {**current, **patch.changes()}, f"node {name!r}")
            _assign(row, merged, _NODE_FIELDS)
            row.updated_at = _now()
            session.flush()
            return _node_out(row)

    def delete_node(self, name: str) -> None:
        """Delete a node; it leaves every span it was in (a span may be left with no nodes)."""
        with self._session(write=True) as session:
            row = _node_row(session, name)
            # The foreign key cascades too; deleting here keeps that true on engines made elsewhere.
            session.execute(delete(SpanNodeRow).where(SpanNodeRow.node_name == name))
            session.execute(delete(NodeHealthRow).where(NodeHealthRow.node_name == name))
            session.delete(row)

    # --- destinations --------------------------------------------------------------------------------

    def list_destinations(self) -> list[DestinationOut]:
        with self._session() as session:
            rows = session.scalars(select(DestinationRow).order_by(DestinationRow.name)).all()
            return [DestinationOut.model_validate(row) for row in rows]

    def get_destination(self, name: str) -> DestinationOut:
        with self._session() as session:
            return DestinationOut.model_validate(_destination_row(session, name))

    def get_destination_by_ae(self, ae_title: str) -> DestinationOut | None:
        """The destination a retrieval names by its AE title, or None when the spanner knows no such one."""
        with self._session() as session:
            row = session.scalar(select(DestinationRow).where(DestinationRow.ae_title == ae_title))
            return None if row is None else DestinationOut.model_validate(row)

    def create_destination(self, destination: DestinationIn) -> DestinationOut:
        with self._session(write=True) as session:
            if session.get(DestinationRow, destination.name) is not None:
                raise Conflict(f"destination {destination.name!r} already exists; replace or patch it "
                               "instead")
            _check_destination_ae_free(session, destination.name, destination.ae_title)
            now = _now()
            row = DestinationRow(name=destination.name, created_at=now, updated_at=now)
            _assign(row, destination, _DESTINATION_FIELDS)
            session.add(row)
            session.flush()
            return DestinationOut.model_validate(row)

    def replace_destination(self, name: str, destination: DestinationPut) -> DestinationOut:
        with self._session(write=True) as session:
            return _store_destination(session, _destination_row(session, name), destination)

    def patch_destination(self, name: str, patch: DestinationPatch) -> DestinationOut:
        with self._session(write=True) as session:
            row = _destination_row(session, name)
            current = {field: getattr(row, field) for field in _DESTINATION_FIELDS}
            merged = _revalidate(DestinationPut, {**current, **patch.changes()}, f"destination {name!r}")
            return _store_destination(session, row, merged)

    def delete_destination(self, name: str) -> None:
        with self._session(write=True) as session:
            session.delete(_destination_row(session, name))

    # --- spans ---------------------------------------------------------------------------------------

    def list_spans(self) -> list[SpanOut]:
        with self._session() as session:
            rows = session.scalars(select(SpanRow).order_by(SpanRow.name)).all()
            members: dict[str, list[str]] = {}
            for span_name, node_name in session.execute(
                    select(SpanNodeRow.span_name, SpanNodeRow.node_name).order_by(SpanNodeRow.position)):
                members.setdefault(span_name, []).append(node_name)
            enabled = _enabled_names(session)
            return [_span_out(row, enabled if row.name == ALL_SPAN else members.get(row.name, []))
                    for row in rows]

    def get_span(self, name: str) -> SpanOut:
        with self._session() as session:
            return _span_out(_span_row(session, name), _members(session, name))

    def create_span(self, span: SpanIn) -> SpanOut:
        if span.name == ALL_SPAN:
            raise Conflict(f"span {ALL_SPAN!r} is reserved and always exists; change its policies with "
                           f"replace or patch")
        with self._session(write=True) as session:
            if session.get(SpanRow, span.name) is not None:
                raise Conflict(f"span {span.name!r} already exists; replace or patch it instead")
            _check_members(session, span.name, span.nodes)
            _check_ae_title_free(session, span.name, span.ae_title)
            now = _now()
            row = SpanRow(name=span.name, created_at=now, updated_at=now)
            _assign(row, span, _SPAN_FIELDS)
            session.add(row)
            session.flush()  # the span row must exist before its members reference it
            _set_members(session, span.name, span.nodes)
            return _span_out(row, _members(session, span.name))

    def replace_span(self, name: str, span: SpanPut) -> SpanOut:
        """Replace a span's policies and members; for 'all' the members are ignored (and it is created if
        missing, since 'all' always exists)."""
        _check_policy(span, name)
        with self._session(write=True) as session:
            row = session.get(SpanRow, name)
            if row is None:
                if name != ALL_SPAN:
                    raise NotFound(f"span {name!r} does not exist")
                row = SpanRow(name=name, created_at=_now())  # added once filled in, or autoflush sends NULLs
            return self._store_span(session, row, span)

    def patch_span(self, name: str, patch: SpanPatch) -> SpanOut:
        with self._session(write=True) as session:
            row = _span_row(session, name)
            current = {field: getattr(row, field) for field in _SPAN_FIELDS}
            current["nodes"] = [] if name == ALL_SPAN else _members(session, name)
            changes = patch.changes()
            if name == ALL_SPAN:
                changes.pop("nodes", None)
            merged = _revalidate(SpanPut, {**current, **changes}, f"span {name!r}")
            _check_policy(merged, name)
            return self._store_span(session, row, merged)

    def _store_span(self, session: Session, row: SpanRow, span: SpanPut) -> SpanOut:
        if row.name != ALL_SPAN:
            _check_members(session, row.name, span.nodes)
        _check_ae_title_free(session, row.name, span.ae_title)
        _assign(row, span, _SPAN_FIELDS)
        row.updated_at = _now()
        session.add(row)
        session.flush()
        if row.name != ALL_SPAN:
            _set_members(session, row.name, span.nodes)
        return _span_out(row, _members(session, row.name))

    def delete_span(self, name: str) -> None:
        if name == ALL_SPAN:
            raise Conflict(f"span {ALL_SPAN!r} cannot be deleted; disable nodes to take them out of it")
        with self._session(write=True) as session:
            row = _span_row(session, name)
            session.execute(delete(SpanNodeRow).where(SpanNodeRow.span_name == name))
            session.delete(row)

    def ensure_default_span(self, ae_title: str = "SPANNER") -> SpanOut:
        """Create span 'all' if missing (at start-up); an existing one is left as it is."""
        with self._session(write=True) as session:
            row = session.get(SpanRow, ALL_SPAN)
            if row is not None:
                return _span_out(row, _enabled_names(session))
            span = _revalidate(SpanIn, {"name": ALL_SPAN, "ae_title": ae_title}, f"span {ALL_SPAN!r}")
            _check_ae_title_free(session, ALL_SPAN, span.ae_title)
            now = _now()
            row = SpanRow(name=ALL_SPAN, created_at=now, updated_at=now)
            _assign(row, span, _SPAN_FIELDS)
            session.add(row)
            session.flush()
            return _span_out(row, _enabled_names(session))

    def span_nodes(self, span_name: str) -> list[NodeOut]:
        """The enabled nodes a query on this span goes to, by priority (lower first), then name."""
        with self._session() as session:
            _span_row(session, span_name)
            return _enabled_members(session, span_name)

    def span_for_query(self, span_name: str) -> tuple[SpanOut, list[NodeOut]]:
        """``get_span`` and ``span_nodes`` in one session: what planning a query reads."""
        with self._session() as session:
            row = _span_row(session, span_name)
            return _span_out(row, _members(session, span_name)), _enabled_members(session, span_name)

    # --- query records -------------------------------------------------------------------------------

    def record_query(
        self,
        *,
        span: str,
        level: str,
        filters: Mapping[str, Any],
        requester: str,
        status: str,
        total: int,
        outcomes: Sequence[Mapping[str, Any] | NodeOutcome],
        elapsed_ms: float,
        error: str | None = None,
        query_id: str | None = None,
        created_at: datetime | None = None,
        cache: str | None = None,
        audit: Audit | None = None,
        emit: bool = False,
    ) -> QueryRecordOut:
        """Store one finished query; ``created_at`` defaults to now (give the start time if known);
        ``cache`` says whether the answer was a cache "hit" or "miss" (None: no cache involved).
        With ``emit`` its ``query.completed`` event, and a ``node.health`` event for each node whose
        health this answer changed (not for cached answers), go to the outbox in the same transaction."""
        row = QueryRecordRow(
            id=query_id or uuid.uuid4().hex,
            created_at=created_at or _now(),
            span=str(span)[:64],
            level=str(level)[:16],
            filters=dict(filters),
            requester=str(requester)[:255],
            status=str(status)[:32],
            total=int(total),
            outcomes=[item.to_json() if isinstance(item, NodeOutcome) else dict(item) for item in outcomes],
            elapsed_ms=float(elapsed_ms),
            error=error,
            cache=cache,
            **(audit or Audit()).columns(),
        )
        with self._session(write=True) as session:
            session.add(row)
            session.flush()
            record = QueryRecordOut.model_validate(row)
            if emit:
                told = [events.query_completed(
                    query_id=record.id, span=record.span, level=record.level, status=record.status,
                    total=record.total, elapsed_ms=record.elapsed_ms, cache=record.cache,
                    outcomes=record.outcomes, principal=record.principal, channel=record.channel)]
                if cache != "hit":
                    told += _health_changes(session, events.health_seen(record.outcomes))
                _add_events(session, told)
            return record

    def get_query(self, query_id: str) -> QueryRecordOut:
        with self._session() as session:
            row = session.get(QueryRecordRow, query_id)
            if row is None:
                raise NotFound(f"query {query_id!r} is not recorded")
            return QueryRecordOut.model_validate(row)

    def list_queries(self, limit: int = 100, offset: int = 0) -> list[QueryRecordOut]:
        """Recorded queries, newest first."""
        _check_page(limit, offset)
        with self._session() as session:
            rows = session.scalars(
                select(QueryRecordRow)
                .order_by(QueryRecordRow.created_at.desc(), QueryRecordRow.id.desc())
                .limit(limit)
                .offset(offset)
            ).all()
            return [QueryRecordOut.model_validate(row) for row in rows]


    def record_retrieval(self, *, retrieval_id: str, span: str, level: str, uids: Mapping[str, Any],
                         destination_ae: str, requester: str, status: str, dimse_status: int | None,
                         completed: int, failed: int, warning: int, parts: Sequence[Mapping[str, Any]],
                         elapsed_ms: float, error: str | None = None, audit: Audit | None = None,
                         created_at: datetime | None = None, emit: bool = False) -> RetrievalRecordOut:
        """Store one finished retrieval (with ``emit``, its ``retrieval.completed`` event beside it)."""
        row = RetrievalRecordRow(
            id=retrieval_id, created_at=created_at or _now(), **(audit or Audit()).columns(),
            span=span[:64], level=level[:16], uids=dict(uids),
            destination_ae=destination_ae[:16], requester=requester[:255], status=status[:32],
            dimse_status=dimse_status, completed=completed, failed=failed, warning=warning,
            parts=[dict(p) for p in parts], elapsed_ms=float(elapsed_ms), error=error,
        )
        with self._session(write=True) as session:
            session.add(row)
            session.flush()
            record = RetrievalRecordOut.model_validate(row)
            if emit:
                _add_events(session, [events.retrieval_completed(
                    retrieval_id=record.id, span=record.span, level=record.level, uids=record.uids,
                    destination_ae=record.destination_ae, status=record.status,
                    dimse_status=record.dimse_status, completed=record.completed, failed=record.failed,
                    warning=record.warning, elapsed_ms=record.elapsed_ms, parts=record.parts,
                    principal=record.principal, channel=record.channel)])
            return record

    def get_retrieval(self, retrieval_id: str) -> RetrievalRecordOut:
        with self._session() as session:
            row = session.get(RetrievalRecordRow, retrieval_id)
            if row is None:
                raise NotFound(f"retrieval {retrieval_id!r} is not recorded")
            return RetrievalRecordOut.model_validate(row)

    def list_retrievals(self, limit: int = 100, offset: int = 0) -> list[RetrievalRecordOut]:
        """Recorded retrievals, newest first."""
        _check_page(limit, offset)
        with self._session() as session:
            rows = session.scalars(
                select(RetrievalRecordRow)
                .order_by(RetrievalRecordRow.created_at.desc(), RetrievalRecordRow.id.desc())
                .limit(limit)
                .offset(offset)
            ).all()
            return [RetrievalRecordOut.model_validate(row) for row in rows]

    # --- audit trail ---------------------------------------------------------------------------------

    def list_audit(self, *, since: datetime | None = None, until: datetime | None = None,
                   principal: str | None = None, patient_id: str | None = None, status: str | None = None,
                   kind: str | None = None, limit: int = 100, offset: int = 0) -> list[AuditEntryOut]:
        """Queries and retrievals, newest first, filtered; each table yields at most offset+limit rows,
        merged here, so a page costs two indexed queries whatever the table sizes."""
        _check_page(limit, offset)
        entries: list[AuditEntryOut] = []
        with self._session() as session:
            kinds: tuple[tuple[type[QueryRecordRow] | type[RetrievalRecordRow], str], ...] = (
                (QueryRecordRow, "query"), (RetrievalRecordRow, "retrieval"))
            for table, name in kinds:
                if kind is not None and kind != name:
                    continue
                query = select(table)
                if since is not None:
                    query = query.where(table.created_at >= since)
                if until is not None:
                    query = query.where(table.created_at < until)
                if principal is not None:
                    query = query.where(table.principal == principal)
                if patient_id is not None:
                    query = query.where(table.patient_id == patient_id)
                if status is not None:
                    query = query.where(table.status == status)
                query = query.order_by(table.created_at.desc(), table.id.desc()).limit(offset + limit)
                entries.extend(_audit_entry(row) for row in session.scalars(query).all())
        entries.sort(key=lambda e: (e.created_at, e.id), reverse=True)
        return entries[offset:offset + limit]

    def purge_audit(self, before: datetime) -> int:
        """Delete query and retrieval records made before ``before``; returns how many went."""
        with self._session(write=True) as session:
            gone = 0
            for table in (QueryRecordRow, RetrievalRecordRow):
                result = session.execute(delete(table).where(table.created_at < before))
                gone += int(getattr(result, "rowcount", 0) or 0)
            return gone

    # --- event outbox --------------------------------------------------------------------------------

    def add_events(self, told: Sequence[events.NewEvent]) -> None:
        """Events that belong to no record (tests, tools); records add theirs in their own transaction."""
        with self._session(write=True) as session:
            _add_events(session, told)

    def pending_events(self, limit: int = 100) -> list[OutboxEvent]:
        """Unpublished events, oldest (lowest id) first."""
        with self._session() as session:
            rows = session.scalars(select(OutboxRow).where(OutboxRow.published_at.is_(None))
                                   .order_by(OutboxRow.id).limit(limit)).all()
            return [OutboxEvent(row.id, row.event_id, row.routing_key, dict(row.payload), row.created_at)
                    for row in rows]

    def mark_published(self, ids: Sequence[int], at: datetime | None = None) -> None:
        if not ids:
            return
        with self._session(write=True) as session:
            session.execute(update(OutboxRow).where(OutboxRow.id.in_(list(ids)))
                            .values(published_at=at or _now()))

    def last_published_event_id(self) -> int | None:
        with self._session() as session:
            found: int | None = session.scalar(select(func.max(OutboxRow.id))
                                               .where(OutboxRow.published_at.is_not(None)))
            return found

    def outbox_counts(self) -> dict[str, int]:
        """How many events wait for the broker, and how many published ones are still kept."""
        with self._session() as session:
            pending = session.scalar(select(func.count()).select_from(OutboxRow)
                                     .where(OutboxRow.published_at.is_(None)))
            total = session.scalar(select(func.count()).select_from(OutboxRow))
            return {"pending": int(pending or 0), "published": int(total or 0) - int(pending or 0)}

    def purge_published_events(self, before: datetime) -> int:
        """Delete events published before ``before``; unpublished ones are never purged."""
        with self._session(write=True) as session:
            result = session.execute(delete(OutboxRow).where(OutboxRow.published_at < before))
            return int(getattr(result, "rowcount", 0) or 0)

    def node_health(self) -> dict[str, str]:
        with self._session() as session:
            rows = session.execute(select(NodeHealthRow.node_name, NodeHealthRow.health)).all()
            return {str(name): str(health) for name, health in rows}

    # --- API keys ------------------------------------------------------------------------------------

    def create_api_key(self, name: str, role: str, prefix: str, key_hash: str) -> ApiKeyOut:
        _check_role(role)
        if not name or len(name) > 64:
            raise InvalidConfig("an API key's name needs 1 to 64 characters")
        with self._session(write=True) as session:
            if session.get(ApiKeyRow, name) is not None:
                raise Conflict(f"API key {name!r} already exists; pick another name "
                               "(revoked names stay taken)")
            row = ApiKeyRow(name=name, role=role, prefix=prefix, hash=key_hash, created_at=_now())
            session.add(row)
            session.flush()
            return ApiKeyOut.model_validate(row)

    def list_api_keys(self) -> list[ApiKeyOut]:
        with self._session() as session:
            rows = session.scalars(select(ApiKeyRow).order_by(ApiKeyRow.name)).all()
            return [ApiKeyOut.model_validate(row) for row in rows]

    def active_api_key(self, key_hash: str) -> ApiKeyOut | None:
        """The unrevoked key with this hash, or None."""
        with self._session() as session:
            row = session.scalar(select(ApiKeyRow).where(ApiKeyRow.hash == key_hash,
                                                         ApiKeyRow.revoked_at.is_(None)))
            return None if row is None else ApiKeyOut.model_validate(row)

    def put_api_key(self, name: str, role: str, prefix: str, key_hash: str) -> ApiKeyOut:
        """Create the key ``name`` or give it a new secret (active again if it was revoked): for keys a
        program holds for itself, such as the one `spanner run` gives its own DICOM front."""
        _check_role(role)
        with self._session(write=True) as session:
            row = session.get(ApiKeyRow, name)
            if row is None:
                row = ApiKeyRow(name=name)
                session.add(row)
            row.role, row.prefix, row.hash = role, prefix, key_hash
            row.created_at, row.revoked_at = _now(), None
            session.flush()
            return ApiKeyOut.model_validate(row)

    def count_active_api_keys(self, roles: Collection[ApiRole] | None = None) -> int:
        """Keys not revoked, of ``roles`` only when given."""
        query = select(func.count()).select_from(ApiKeyRow).where(ApiKeyRow.revoked_at.is_(None))
        if roles is not None:
            query = query.where(ApiKeyRow.role.in_([role.value for role in roles]))
        with self._session() as session:
            return int(session.scalar(query) or 0)

    def revoke_api_key(self, name: str) -> ApiKeyOut:
        with self._session(write=True) as session:
            row = session.get(ApiKeyRow, name)
            if row is None:
                raise NotFound(f"API key {name!r} does not exist; `spanner keys list` shows them")
            if row.revoked_at is None:
                row.revoked_at = _now()
            session.flush()
            return ApiKeyOut.model_validate(row)


@dataclass(frozen=True, slots=True)
class Audit:
    """Who asked for a query or retrieval (the key), over which channel, from where, about which patient,
    and, for DICOM requests, the caller the DICOM front asserted."""

    principal: str | None = None
    channel: Channel | None = None
    client: str | None = None
    patient_id: str | None = None
    asserted_ae: str | None = None
    asserted_peer: str | None = None

    def columns(self) -> dict[str, str | None]:
        return {
            "principal": None if self.principal is None else self.principal[:255],
            "channel": None if self.channel is None else self.channel[:8],
            "client": None if self.client is None else self.client[:255],
            "patient_id": None if self.patient_id is None else self.patient_id[:64],
            "asserted_ae": None if self.asserted_ae is None else self.asserted_ae[:16],
            "asserted_peer": None if self.asserted_peer is None else self.asserted_peer[:255],
        }


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """One stored event as the relay publishes it: ``body`` is the envelope of spanner.events."""

    id: int
    event_id: str
    routing_key: str
    body: dict[str, Any]
    created_at: datetime


def _add_events(session: Session, told: Sequence[events.NewEvent]) -> None:
    session.add_all(OutboxRow(event_id=e.event_id, routing_key=e.routing_key, payload=e.body,
                              created_at=e.occurred_at) for e in told)
    session.flush()


def _health_changes(
    session: Session, seen: Mapping[str, tuple[str, str, str | None]]
) -> list[events.NewEvent]:
    """Store the health each node showed; an event for each change. Compare-and-set, so two replicas
    recording the same change at once tell it once."""
    if not seen:
        return []
    rows = session.execute(select(NodeHealthRow.node_name, NodeHealthRow.health)
                           .where(NodeHealthRow.node_name.in_(list(seen)))).all()
    known = {str(name): str(health) for name, health in rows}
    now = _now()
    told: list[events.NewEvent] = []
    for node, (health, status, error) in sorted(seen.items()):
        previous = known.get(node)
        if previous == health:
            continue
        if previous is None:
            insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
            result = session.execute(insert(NodeHealthRow).values(node_name=node, health=health, since=now)
                                     .on_conflict_do_nothing(index_elements=["node_name"]))
        else:
            result = session.execute(update(NodeHealthRow).where(NodeHealthRow.node_name == node,
                                                                 NodeHealthRow.health == previous)
                                     .values(health=health, since=now))
        if int(getattr(result, "rowcount", 0) or 0) == 1:
            told.append(events.node_health(node=node, health=health, previous=previous, status=status,
                                           error=error, at=now))
    return told


def _audit_entry(row: object) -> AuditEntryOut:
    assert isinstance(row, (QueryRecordRow, RetrievalRecordRow))
    common: dict[str, Any] = {
        "id": row.id, "created_at": row.created_at, "principal": row.principal, "channel": row.channel,
        "client": row.client, "patient_id": row.patient_id, "asserted_ae": row.asserted_ae,
        "asserted_peer": row.asserted_peer, "span": row.span, "level": row.level,
        "status": row.status, "elapsed_ms": row.elapsed_ms, "error": row.error,
    }
    if isinstance(row, QueryRecordRow):
        return AuditEntryOut(kind="query", what=dict(row.filters), total=row.total, nodes=list(row.outcomes),
                             **common)
    return AuditEntryOut(kind="retrieval", what=dict(row.uids), total=row.completed, nodes=list(row.parts),
                         destination_ae=row.destination_ae, **common)


MAX_PAGE_OFFSET = 1_000_000_000
"""Largest offset of a listing: past it the databases' 64-bit LIMIT/OFFSET arithmetic would overflow."""


def _check_page(limit: int, offset: int) -> None:
    """InvalidQuery (422) for a page no database can read."""
    if limit < 0 or offset < 0:
        raise InvalidQuery(f"limit ({limit}) and offset ({offset}) may not be negative")
    if offset > MAX_PAGE_OFFSET or limit > MAX_PAGE_OFFSET:
        raise InvalidQuery(f"offset and limit may be at most {MAX_PAGE_OFFSET:,}; got offset {offset}, "
                           f"limit {limit}")


def _check_role(role: str) -> None:
    if role not in set(ApiRole):
        raise InvalidConfig(f"role {role!r} is not one of {', '.join(ApiRole)}")


# --- helpers (all run inside a session) --------------------------------------------------------------

def _node_row(session: Session, name: str) -> NodeRow:
    row = session.get(NodeRow, name)
    if row is None:
        raise NotFound(f"node {name!r} does not exist")
    return row


def _span_row(session: Session, name: str) -> SpanRow:
    row = session.get(SpanRow, name)
    if row is None:
        raise NotFound(f"span {name!r} does not exist")
    return row


def _assign(row: object, model: BaseModel, fields: Sequence[str]) -> None:
    values = model.model_dump(mode="json", include=set(fields))
    for field in fields:
        setattr(row, field, values[field])


def _node_out(row: NodeRow) -> NodeOut:
    return NodeOut.model_validate(row)


def _span_out(row: SpanRow, nodes: list[str]) -> SpanOut:
    values = {field: getattr(row, field) for field in _SPAN_FIELDS}
    return SpanOut.model_validate({**values, "name": row.name, "nodes": nodes, "created_at": row.created_at,
                                   "updated_at": row.updated_at})


def _enabled_names(session: Session) -> list[str]:
    return list(session.scalars(select(NodeRow.name).where(NodeRow.enabled.is_(True)).order_by(NodeRow.name)))


def _members(session: Session, span_name: str) -> list[str]:
    if span_name == ALL_SPAN:
        return _enabled_names(session)
    return list(session.scalars(select(SpanNodeRow.node_name).where(SpanNodeRow.span_name == span_name)
                                .order_by(SpanNodeRow.position)))


def _enabled_members(session: Session, span_name: str) -> list[NodeOut]:
    query = select(NodeRow).where(NodeRow.enabled.is_(True)).order_by(NodeRow.priority, NodeRow.name)
    if span_name != ALL_SPAN:
        query = query.join(SpanNodeRow, SpanNodeRow.node_name == NodeRow.name) \
            .where(SpanNodeRow.span_name == span_name)
    return [_node_out(row) for row in session.scalars(query).all()]


def _set_members(session: Session, span_name: str, nodes: Sequence[str]) -> None:
    session.execute(delete(SpanNodeRow).where(SpanNodeRow.span_name == span_name))
    session.add_all(SpanNodeRow(span_name=span_name, node_name=node, position=index)
                    for index, node in enumerate(nodes))
    session.flush()


def _check_members(session: Session, span_name: str, nodes: Sequence[str]) -> None:
    known = set(session.scalars(select(NodeRow.name).where(NodeRow.name.in_(list(nodes)))))
    unknown = [node for node in nodes if node not in known]
    if unknown:
        raise InvalidConfig(f"span {span_name!r} lists unknown node(s) {_quoted(unknown)}; create them first")


def _destination_row(session: Session, name: str) -> DestinationRow:
    row = session.get(DestinationRow, name)
    if row is None:
        raise NotFound(f"destination {name!r} does not exist")
    return row


def _check_destination_ae_free(session: Session, name: str, ae_title: str) -> None:
    holder = session.scalar(select(DestinationRow.name).where(DestinationRow.ae_title == ae_title,
                                                              DestinationRow.name != name))
    if holder is not None:
        raise Conflict(f"AE title {ae_title!r} is already used by destination {holder!r}; a retrieval names "
                       "its destination by AE title, so each needs its own")


def _store_destination(session: Session, row: DestinationRow, destination: DestinationPut) -> DestinationOut:
    _check_destination_ae_free(session, row.name, destination.ae_title)
    _assign(row, destination, _DESTINATION_FIELDS)
    row.updated_at = _now()
    session.flush()
    return DestinationOut.model_validate(row)


def _check_ae_title_free(session: Session, span_name: str, ae_title: str) -> None:
    query = select(SpanRow.name).where(SpanRow.ae_title == ae_title, SpanRow.name != span_name)
    holder = session.scalar(query)
    if holder is not None:
        raise Conflict(f"AE title {ae_title!r} is already used by span {holder!r}; each span needs its own")


def _check_policy(span: SpanPut, name: str) -> None:
    try:
        check_span_policy(span, name)
    except PydanticCustomError as exc:
        raise InvalidConfig(f"span {name!r}: {exc.message()}") from None


def _revalidate(model: type[M], values: dict[str, Any], what: str) -> M:
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise InvalidConfig(f"{what}: {describe_errors(exc)}") from None
