"""One node's answer to one query: a value, never an exception, so that one failing archive cannot fail
the spanning query it is part of."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

# A match as it crosses processes: the DICOM JSON model (PS3.18 F.2), as pydicom's to_json_dict writes it.
DicomJson = dict[str, Any]


class OutcomeStatus(StrEnum):
    OK = "ok"
    TIMEOUT = "timeout"
    REFUSED = "refused"
    ABORTED = "aborted"
    FAILED = "failed"
    THROTTLED = "throttled"
    CIRCUIT_OPEN = "circuit_open"
    CANCELLED = "cancelled"
    LOOP = "loop"  # the node is a dicom-spanner the query already passed (spanner.hops)
    UNPLACEABLE = "unplaceable"  # no alive Ray node has the labels the node's placement names


@dataclass(slots=True)
class NodeOutcome:
    """Status, counts and timing of one node's query; the matches travel beside it as their own object."""

    node: str
    status: OutcomeStatus
    matches: int = 0
    elapsed_ms: float = 0.0
    error: str | None = None
    dimse_status: int | None = None
    incomplete: bool = False

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["status"] = self.status.value
        return out
