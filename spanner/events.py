"""The events the spanner tells the rest of the stack, as they go on the wire (one JSON envelope each).

Events are built here from the records they tell of and written to the outbox in the record's own
transaction (spanner.storage); the relay (spanner.relay) publishes them to a topic exchange. They
carry identifiers, statuses and counts, never patient names, IDs or query filters: a consumer that
needs those reads the audit-protected record through the API by its id.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

QUERY_COMPLETED = "query.completed"
RETRIEVAL_COMPLETED = "retrieval.completed"
NODE_HEALTH = "node.health"
ROUTING_KEYS = (QUERY_COMPLETED, RETRIEVAL_COMPLETED, NODE_HEALTH)
VERSION = 1
SOURCE = "dicom-spanner"

HEALTH_OF_STATUS = {"ok": "up", "refused": "down", "circuit_open": "down"}
"""Node outcomes that say something about the node itself; a timeout or a failure status may be the
query's fault (a short deadline, a bad key), so they leave the node's health as it was."""

_UID_KEYS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


@dataclass(frozen=True, slots=True)
class NewEvent:
    """One event before it is stored: ``body`` is exactly what the broker will carry."""

    routing_key: str
    data: dict[str, Any]
    event_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    occurred_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def body(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "type": self.routing_key,
            "version": VERSION,
            "source": SOURCE,
            "occurred_at": self.occurred_at.isoformat(timespec="milliseconds"),
            "data": self.data,
        }


def _node_summary(outcome: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "node": outcome.get("node"),
        "status": outcome.get("status"),
        "matches": outcome.get("matches"),
        "elapsed_ms": outcome.get("elapsed_ms"),
    }


def query_completed(
    *, query_id: str, span: str, level: str, status: str, total: int, elapsed_ms: float,
    cache: str | None, outcomes: Sequence[Mapping[str, Any]], principal: str | None, channel: str | None,
) -> NewEvent:
    return NewEvent(QUERY_COMPLETED, {
        "query_id": query_id, "span": span, "level": level, "status": status, "total": total,
        "elapsed_ms": elapsed_ms, "cache": cache, "principal": principal, "channel": channel,
        "nodes": [_node_summary(o) for o in outcomes],
    })


def retrieval_completed(
    *, retrieval_id: str, span: str, level: str, uids: Mapping[str, Any], destination_ae: str, status: str,
    dimse_status: int | None, completed: int, failed: int, warning: int, elapsed_ms: float,
    parts: Sequence[Mapping[str, Any]], principal: str | None, channel: str | None,
) -> NewEvent:
    return NewEvent(RETRIEVAL_COMPLETED, {
        "retrieval_id": retrieval_id, "span": span, "level": level,
        "uids": {k: v for k, v in uids.items() if k in _UID_KEYS},  # PatientID stays in the record
        "destination_ae": destination_ae, "status": status, "dimse_status": dimse_status,
        "completed": completed, "failed": failed, "warning": warning, "elapsed_ms": elapsed_ms,
        "nodes": [{k: tried.get(k) for k in ("node", "status", "dimse_status", "completed", "failed")}
                  for part in parts for tried in part.get("tried", ())],
        "principal": principal, "channel": channel,
    })


def node_health(
    *, node: str, health: str, previous: str | None, status: str, error: str | None, at: datetime
) -> NewEvent:
    return NewEvent(NODE_HEALTH, {
        "node": node, "health": health, "previous": previous, "outcome": status, "error": error,
    }, occurred_at=at)


def health_seen(outcomes: Sequence[Mapping[str, Any]]) -> dict[str, tuple[str, str, str | None]]:
    """Per node that told something of its health: (health, outcome status, error)."""
    seen: dict[str, tuple[str, str, str | None]] = {}
    for outcome in outcomes:
        health = HEALTH_OF_STATUS.get(str(outcome.get("status")))
        if health is not None and outcome.get("node"):
            seen[str(outcome["node"])] = (health, str(outcome["status"]), outcome.get("error"))
    return seen
