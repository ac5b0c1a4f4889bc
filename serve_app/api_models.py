"""HTTP models of a spanning query and its answer (the node and span models live in spanner.schemas)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from spanner.query import Level
from spanner.schemas import AETitle, Dedup, FailureStrategy, Host, Port, TextInput

MAX_LIST_VALUES = 1000
"""Values of one filter's list (a UID list): one C-FIND identifier stays well inside what archives take."""
MAX_RETRIEVAL_UIDS = 10_000
"""UIDs of one key in one retrieval: they are looked up in batches, within the retrieval's deadline."""
MAX_TIMEOUT_S = 86_400.0
"""Outer bound of any timeout_s an API model accepts (the settings bound queries further: max_timeout_s)."""

FilterValue = str | int | float | Annotated[list[str], Field(max_length=MAX_LIST_VALUES)] | None
Timeout = Annotated[float, Field(gt=0, le=MAX_TIMEOUT_S, allow_inf_nan=False)]


class QueryIn(TextInput):
    """A spanning C-FIND. Only ``level`` is required; the rest defaults from the span."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "level": "STUDY",
                    "filters": {"PatientID": "PAT*", "StudyDate": "20240101-", "ModalitiesInStudy": "CT"},
                    "return_keys": ["StudyDescription"],
                    "span": "all",
                    "timeout_s": 10,
                    "limit": 100,
                }
            ]
        },
    )

    level: Level = Field(description="Query/Retrieve level: PATIENT, STUDY, SERIES or IMAGE")
    filters: dict[str, FilterValue] = Field(
        default_factory=dict,
        description="Matching keys by DICOM keyword or tag, with DICOM matching: wildcards * and ?, "
        "date/time ranges 'A-B', 'A-', '-B', UID lists as a JSON list; null or '' asks for the key",
    )
    return_keys: list[str] = Field(
        default_factory=list, description="Extra attributes to return, by keyword or tag"
    )
    span: str = Field(default="all", description="Span to query; 'all' holds every enabled node")
    nodes: list[str] | None = Field(default=None, description="Narrow the span to these of its nodes")
    timeout_s: Timeout | None = Field(default=None, description="Deadline for every node (span default)")
    failure_strategy: FailureStrategy | None = None
    minimum_nodes: int | None = Field(default=None, ge=1, description="With failure_strategy 'minimum'")
    dedup: Dedup | None = None
    limit: int | None = Field(default=None, ge=1, description="Page size; at most the span's max_results")
    offset: int = Field(default=0, ge=0)


class MatchOut(BaseModel):
    dataset: dict[str, Any] = Field(description="The merged match in the DICOM JSON model (PS3.18 F.2)")
    nodes: list[str] = Field(description="Nodes holding this entity, highest priority first")


class NodeOutcomeOut(BaseModel):
    node: str
    status: str = Field(
        description="ok, timeout, refused, aborted, failed, throttled, circuit_open, cancelled, loop or "
        "unplaceable"
    )
    matches: int
    elapsed_ms: float
    error: str | None = None
    dimse_status: int | None = None
    incomplete: bool = False


class QueryOut(BaseModel):
    query_id: str
    status: str = Field(description="success, partial or failed")
    level: Level
    span: str
    total: int = Field(description="Merged matches before limit and offset")
    matches: list[MatchOut]
    nodes: list[NodeOutcomeOut]
    elapsed_ms: float
    reason: str | None = Field(default=None, description="Why the query is failed, when it is")
    cache: Literal["hit", "miss"] = Field(
        default="miss",
        description="hit: answered from the query cache (only success answers are kept, for the span's "
        "cache_ttl_s; the query_id and elapsed_ms are the hit's own); miss: asked the archives",
    )


class RetrievalMode(StrEnum):
    PROXY = "proxy"  # the holders send to the spanner, which forwards to the destination
    DIRECT = "direct"  # the holders send to the destination themselves


class DeliverTo(TextInput):
    """Where the DICOM front receives a C-GET's instances (its own storage listener)."""

    model_config = ConfigDict(extra="forbid")

    ae_title: AETitle = Field(description="The called AE title that names the C-GET at the front")
    host: Host = Field(description="The front's address: must be the address the request comes from")
    port: Port = Field(description="The front's storage listener port")


class RetrievalIn(TextInput):
    """A retrieval: the archives holding the objects are found, and C-MOVE them to the destination."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "level": "STUDY", "uids": {"StudyInstanceUID": "1.2.840.113619.2.55.3.604688119"},
        "destination_ae": "WORKSTATION1",
    }]})

    level: Level = Field(description="STUDY, SERIES or IMAGE")
    uids: dict[str, str | Annotated[list[str], Field(min_length=1, max_length=MAX_RETRIEVAL_UIDS)]] = Field(
        description="StudyInstanceUID (STUDY), SeriesInstanceUID (SERIES) or SOPInstanceUID (IMAGE), one "
                    "or a list; the parents' UIDs may be given to narrow the search")
    destination_ae: AETitle = Field(description="Move destination: the AE title of a destination "
                                    "(/api/v1/destinations) or, in direct mode, one the holding archives "
                                    "know")
    mode: RetrievalMode | None = Field(
        default=None, description="proxy: through the spanner, to a known destination; direct: the archives "
        "send to destination_ae themselves; default proxy when destination_ae is a known destination, else "
        "direct")
    span: str = Field(default="all", description="Span whose nodes are searched for holders")
    timeout_s: Timeout | None = Field(default=None, description="Deadline of the whole retrieval, the "
                                      "look-ups of the holders included (default retrieve_timeout_s)")
    deliver_to: DeliverTo | None = Field(
        default=None, description="The DICOM front's C-GET only (a key of role dicom_front; the host must be "
        "the address the request comes from): proxy the instances to the front's own storage listener "
        "instead of a known destination; destination_ae then names the C-GET requester for the record")


class EchoOut(BaseModel):
    node: str
    status: str
    elapsed_ms: float
    dimse_status: int | None = None
    error: str | None = None
