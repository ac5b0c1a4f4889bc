"""API models of nodes, spans and query records, validated once at the edge.

Every message names the field and says what would be accepted, because these models answer HTTP
clients (422) and the YAML configuration loader alike. Custom checks raise ``PydanticCustomError`` so
the message reads as written, without pydantic's "Value error," prefix.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic_core import PydanticCustomError

from spanner.errors import InvalidQuery
from spanner.merge import Dedup
from spanner.nodespec import RetrieveMethod
from spanner.query import InformationModel, normalise_filters

__all__ = [  # Dedup is re-exported: spanner.merge owns it, the API models use it
    "ALL_SPAN", "AETitle", "Channel", "Dedup", "DestinationIn", "DestinationOut", "DestinationPatch",
    "DestinationPut", "FailureStrategy", "Host", "NodeIn", "NodeOut", "NodePatch", "NodePut",
    "Port", "QueryRecordOut", "Slug", "SpanIn", "SpanOut", "SpanPatch", "SpanPut", "check_span_policy",
    "describe_errors",
]

ALL_SPAN = "all"
"""The reserved span that always holds every enabled node."""

SLUG_MAX = 64
AE_TITLE_MAX = 16
SPAN_TIMEOUT_MAX = 300.0


class FailureStrategy(StrEnum):
    """What a spanning query does when some nodes fail."""

    BEST_EFFORT = "best_effort"  # answer with whatever the reachable nodes returned
    FAIL_FAST = "fail_fast"  # the first failed node fails the whole query
    MINIMUM = "minimum"  # succeed when at least ``minimum_nodes`` answered


def _fail(kind: str, info: ValidationInfo, message: str) -> PydanticCustomError:
    # The field name leads the message so it stays readable when printed without its location.
    return PydanticCustomError(kind, f"{info.field_name}: {message}")


# --- field checks ----------------------------------------------------------------------------------

_SLUG = re.compile(r"[a-z0-9][a-z0-9-]*")


def _check_slug(value: str, info: ValidationInfo) -> str:
    if not value:
        raise _fail("slug", info, "a name may not be empty")
    if len(value) > SLUG_MAX:
        raise _fail("slug", info, f"{value[:20]!r}... is {len(value)} characters; a name has at most "
                                  f"{SLUG_MAX}")
    if not _SLUG.fullmatch(value):
        hint = f" (did you mean {value.lower()!r}?)" if _SLUG.fullmatch(value.lower()) else ""
        raise _fail("slug", info, f"{value!r} is not a valid name; use lowercase letters, digits and '-', "
                                  f"starting with a letter or digit{hint}")
    return value


def _strip(value: object) -> object:
    return value.strip(" ") if isinstance(value, str) else value


def _check_ae_title(value: str, info: ValidationInfo) -> str:
    if not value:
        raise _fail("ae_title", info, "an AE title may not be empty or all spaces")
    if "\\" in value:
        raise _fail("ae_title", info, f"{value!r} contains a backslash, which an AE title may not contain")
    for char in value:
        if not " " <= char <= "~":
            raise _fail("ae_title", info, f"{value!r} contains {char!r}; an AE title is printable ASCII "
                                          f"(the DICOM default repertoire)")
    if len(value) > AE_TITLE_MAX:
        raise _fail("ae_title", info, f"{value!r} is {len(value)} characters; an AE title has at most "
                                      f"{AE_TITLE_MAX}")
    return value


_HOST_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def _check_host(value: str, info: ValidationInfo) -> str:
    text = value.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]  # an IPv6 address as written in a URL
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    labels = text.rstrip(".").split(".")
    if not text or len(text) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise _fail("host", info, f"{value!r} is neither an IP address nor a host name "
                                  f"(letters, digits, '-' and '.', e.g. 'pacs.example.org')")
    return text


def _range(*, gt: float | None = None, ge: float | None = None, le: float | None = None) -> AfterValidator:
    """A bound check with a message that states the accepted range (pydantic's own omits the field)."""
    parts = [f"> {gt:g}" if gt is not None else "", f">= {ge:g}" if ge is not None else "",
             f"<= {le:g}" if le is not None else ""]
    accepted = " and ".join(part for part in parts if part)

    def check(value: float, info: ValidationInfo) -> float:
        if (gt is not None and not value > gt) or (ge is not None and not value >= ge) or \
                (le is not None and not value <= le):
            raise _fail("range", info, f"{value:g} is out of range; give a number {accepted}")
        return value

    return AfterValidator(check)


def _bounds(*, gt: float | None = None, ge: float | None = None, le: float | None = None) -> dict[str, Any]:
    """The same bounds for the OpenAPI schema (the check itself is ``_range``)."""
    out: dict[str, Any] = {}
    if gt is not None:
        out["exclusiveMinimum"] = gt
    if ge is not None:
        out["minimum"] = ge
    if le is not None:
        out["maximum"] = le
    return out


def _check_query_models(value: list[InformationModel], info: ValidationInfo) -> list[InformationModel]:
    if not value:
        models = ", ".join(model.value for model in InformationModel)
        raise _fail("query_models", info, f"give at least one of {models}")
    return list(dict.fromkeys(value))


def _check_filters(value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
    try:
        return normalise_filters(value)
    except InvalidQuery as exc:
        raise _fail("filters", info, exc.message) from None


_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$")


def _check_placement(value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
    if len(value) > 8:
        raise _fail("placement", info, f"{len(value)} labels; at most 8")
    for key, label in value.items():
        for text in (key, label):
            if not _LABEL.match(text):
                raise _fail("placement", info, f"{text!r} is not a Ray node label: 1-63 letters, digits, "
                                               f"'-', '_' or '.', starting and ending with a letter or digit")
    return value


def _check_node_list(value: list[str], info: ValidationInfo) -> list[str]:
    seen: set[str] = set()
    for name in value:
        if name in seen:
            raise _fail("nodes", info, f"node {name!r} is listed twice")
        seen.add(name)
    return value


# --- reusable field types ----------------------------------------------------------------------------

Slug = Annotated[str, AfterValidator(_check_slug)]
AETitle = Annotated[str, BeforeValidator(_strip), AfterValidator(_check_ae_title)]
Host = Annotated[str, AfterValidator(_check_host)]
Port = Annotated[int, _range(ge=1, le=65535), Field(json_schema_extra=_bounds(ge=1, le=65535))]
Positive = Annotated[float, _range(gt=0), Field(json_schema_extra=_bounds(gt=0))]
MaxAssociations = Annotated[int, _range(ge=1, le=64), Field(json_schema_extra=_bounds(ge=1, le=64))]
QueryModels = Annotated[list[InformationModel], AfterValidator(_check_query_models)]
Filters = Annotated[dict[str, str], AfterValidator(_check_filters)]
Placement = Annotated[dict[str, str], AfterValidator(_check_placement)]
SpanTimeout = Annotated[float, _range(gt=0, le=SPAN_TIMEOUT_MAX),
                        Field(json_schema_extra=_bounds(gt=0, le=SPAN_TIMEOUT_MAX))]
MinimumNodes = Annotated[int, _range(ge=1), Field(json_schema_extra=_bounds(ge=1))]
MaxResults = Annotated[int, _range(ge=1, le=100000), Field(json_schema_extra=_bounds(ge=1, le=100000))]
CacheTtl = Annotated[int, _range(ge=0), Field(json_schema_extra=_bounds(ge=0))]
NodeNames = Annotated[list[Slug], AfterValidator(_check_node_list)]

_D = {  # descriptions shared by the In, Put, Patch and Out variants
    "node_name": "Unique name of the node: lowercase letters, digits and '-', 1-64 characters",
    "ae_title": "Called AE title of the PACS (1-16 printable ASCII characters, no backslash)",
    "host": "Host name or IP address of the PACS",
    "port": "TCP port of the PACS's DICOM service",
    "calling_ae_title": "Calling AE title the spanner presents to this node; empty means the spanner's own",
    "enabled": "Disabled nodes keep their configuration but are never queried",
    "priority": "Lower wins: decides which node's match is kept when de-duplication must choose",
    "max_associations": "Most associations open to this node at once",
    "max_queries_per_s": "Throttle: most C-FIND requests per second sent to this node; empty means no limit",
    "connect_timeout_s": "Seconds to wait for the TCP connection and association",
    "dimse_timeout_s": "Seconds to wait for each DIMSE message from the node",
    "query_timeout_s": "Most seconds one query may take on this node; empty means the span's timeout",
    "reuse_associations": "Keep associations open between queries (pooling saves ~10-30 ms per query)",
    "query_models": "Query/Retrieve information models the node supports",
    "additional_filters": "Matching keys added to every query sent to this node (keyword or tag -> value); "
                          "stored by keyword",
    "retrieve_method": "How the node gives up instances to a proxied retrieval: c-move to the spanner's "
                       "storage SCP (the archive must know SPANNER_STORE_AE at the spanner's host and "
                       "SPANNER_STORE_PORT), or c-get on the node actor's own association",
    "placement": "Ray node labels the node's actor must run on (e.g. {\"site\": \"east\"} for a PACS behind "
                 "the east site's firewall); empty means any Ray node",
    "span_name": "Unique name of the span: lowercase letters, digits and '-', 1-64 characters; 'all' is "
                 "reserved for the span of every enabled node",
    "span_ae_title": "AE title under which the DICOM front serves this span; unique across spans",
    "description": "Free text for people",
    "nodes": "Names of the member nodes (ignored for 'all', which holds every enabled node)",
    "timeout_s": "Deadline of a spanning query in seconds",
    "failure_strategy": "best_effort: answer with what arrived; fail_fast: any failed node fails the query; "
                        "minimum: succeed when at least minimum_nodes answered",
    "minimum_nodes": "Nodes that must answer when failure_strategy is 'minimum'",
    "dedup": "How copies of one entity from several nodes become one match, taken in (priority, name) "
             "order: merge_all fills gaps from later copies; first_wins keeps the first copy; "
             "most_complete keeps the copy with the most filled attributes",
    "max_results": "Most matches a spanning query returns",
    "allowed_calling_aets": "Calling AE titles the DICOM front accepts for this span; empty means any",
    "cache_ttl_s": "Seconds an answer is served from the cache; 0 turns caching off",
    "destination_name": "Unique name of the destination: lowercase letters, digits and '-', 1-64 characters",
    "destination_ae_title": "AE title of the destination's storage SCP; a retrieval names the destination "
                            "by it, so it is unique across destinations",
    "destination_host": "Host name or IP address of the destination",
    "destination_port": "TCP port of the destination's storage SCP",
    "destination_callers": "Calling AE titles the DICOM front lets send to this destination; empty means any",
    "created_at": "When this was created (UTC)",
    "updated_at": "When this was last changed (UTC)",
}


def _doc(key: str, example: Any = None, **kwargs: Any) -> Any:
    """Field() with the shared description and an example for OpenAPI."""
    examples = [example] if example is not None else None
    return Field(description=_D[key], examples=examples, **kwargs)


_STRICT = ConfigDict(extra="forbid")
_FILTERS_EXAMPLE = {"InstitutionName": "EAST*"}
_OUT = ConfigDict(extra="ignore", from_attributes=True)


# --- request bodies ----------------------------------------------------------------------------------

def _first_lone_surrogate(value: object, path: str = "") -> str | None:
    """Where in ``value`` (a parsed JSON body) a string or key holds a lone surrogate, else None.

    JSON may carry ``"\\ud800"``; such a string is no Unicode text: it cannot be stored, sent to an
    archive or even echoed in an error message as UTF-8."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and _first_lone_surrogate(key) is not None:
                return (path or "body") + " (a key)"
            found = _first_lone_surrogate(item, where)
            if found is not None:
                return found
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = _first_lone_surrogate(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


class TextInput(BaseModel):
    """Base of request bodies: a lone surrogate anywhere is refused (422) before any field sees it."""

    @model_validator(mode="before")
    @classmethod
    def _refuse_lone_surrogates(cls, data: Any) -> Any:
        where = _first_lone_surrogate(data)
        if where is not None:
            where = where.encode("utf-8", "backslashreplace").decode()
            raise PydanticCustomError(
                "invalid_text", "{where}: holds a lone surrogate (such as \\ud800), which is not valid "
                "Unicode text; send the text as UTF-8", {"where": where})
        return data


# --- nodes -------------------------------------------------------------------------------------------

class _NodeName(TextInput):
    name: Slug = _doc("node_name", "pacs-east")


class NodePut(TextInput):
    """A node's whole configuration without its name: the body of PUT /nodes/{name}."""

    model_config = _STRICT

    ae_title: AETitle = _doc("ae_title", "PACS_EAST")
    host: Host = _doc("host", "pacs-east.example.org")
    port: Port = _doc("port", 104)
    calling_ae_title: AETitle | None = _doc("calling_ae_title", "SPANNER", default=None)
    enabled: bool = _doc("enabled", default=True)
    priority: int = _doc("priority", 100, default=100)
    max_associations: MaxAssociations = _doc("max_associations", 4, default=4)
    max_queries_per_s: Positive | None = _doc("max_queries_per_s", 20.0, default=None)
    connect_timeout_s: Positive = _doc("connect_timeout_s", 5.0, default=5.0)
    dimse_timeout_s: Positive = _doc("dimse_timeout_s", 30.0, default=30.0)
    query_timeout_s: Positive | None = _doc("query_timeout_s", 20.0, default=None)
    reuse_associations: bool = _doc("reuse_associations", default=True)
    query_models: QueryModels = _doc(
        "query_models", ["study_root", "patient_root"],
        default_factory=lambda: [InformationModel.STUDY_ROOT, InformationModel.PATIENT_ROOT])
    additional_filters: Filters = _doc("additional_filters", _FILTERS_EXAMPLE, default_factory=dict)
    retrieve_method: RetrieveMethod = _doc("retrieve_method", "c-move", default=RetrieveMethod.C_MOVE)
    placement: Placement = _doc("placement", {"site": "east"}, default_factory=dict)


class NodeIn(NodePut, _NodeName):
    """A new node: the body of POST /nodes and an entry of the configuration file."""

    model_config = _STRICT


class NodeOut(NodeIn):
    """A stored node as the API returns it."""

    model_config = _OUT

    created_at: datetime = _doc("created_at")
    updated_at: datetime = _doc("updated_at")


_NODE_NULLABLE = frozenset({"calling_ae_title", "max_queries_per_s", "query_timeout_s"})


class _Patch(TextInput):
    """A PATCH body: absent fields keep their value; null clears only the fields in ``nullable``."""

    nullable: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="after")
    def _no_null_for_required(self) -> Self:
        for name in sorted(self.model_fields_set - self.nullable):
            if getattr(self, name) is None:
                raise PydanticCustomError("null", f"{name}: may not be null; leave it out to keep the "
                                                  f"current value")
        return self

    def changes(self) -> dict[str, Any]:
        """Only the fields the client sent."""
        return self.model_dump(exclude_unset=True)


class NodePatch(_Patch):
    """Fields to change on a node (PATCH); absent fields keep their value, null clears an optional one."""

    model_config = _STRICT
    nullable = _NODE_NULLABLE

    ae_title: AETitle | None = _doc("ae_title", "PACS_EAST", default=None)
    host: Host | None = _doc("host", "pacs-east.example.org", default=None)
    port: Port | None = _doc("port", 104, default=None)
    calling_ae_title: AETitle | None = _doc("calling_ae_title", "SPANNER", default=None)
    enabled: bool | None = _doc("enabled", False, default=None)
    priority: int | None = _doc("priority", 100, default=None)
    max_associations: MaxAssociations | None = _doc("max_associations", 4, default=None)
    max_queries_per_s: Positive | None = _doc("max_queries_per_s", 20.0, default=None)
    connect_timeout_s: Positive | None = _doc("connect_timeout_s", 5.0, default=None)
    dimse_timeout_s: Positive | None = _doc("dimse_timeout_s", 30.0, default=None)
    query_timeout_s: Positive | None = _doc("query_timeout_s", 20.0, default=None)
    reuse_associations: bool | None = _doc("reuse_associations", True, default=None)
    query_models: QueryModels | None = _doc("query_models", ["study_root"], default=None)
    additional_filters: Filters | None = _doc("additional_filters", _FILTERS_EXAMPLE, default=None)
    retrieve_method: RetrieveMethod | None = _doc("retrieve_method", "c-get", default=None)
    placement: Placement | None = _doc("placement", {"site": "east"}, default=None)




# --- spans -------------------------------------------------------------------------------------------

class _SpanName(TextInput):
    name: Slug = _doc("span_name", "radiology")


class _SpanFields(TextInput):
    ae_title: AETitle = _doc("span_ae_title", "SPAN_RAD")
    description: str | None = _doc("description", "Every radiology PACS", default=None, max_length=1000)
    nodes: NodeNames = _doc("nodes", ["pacs-east", "pacs-west"], default_factory=list)
    timeout_s: SpanTimeout = _doc("timeout_s", 10.0, default=10.0)
    failure_strategy: FailureStrategy = _doc("failure_strategy", "best_effort",
                                             default=FailureStrategy.BEST_EFFORT)
    minimum_nodes: MinimumNodes | None = _doc("minimum_nodes", 2, default=None)
    dedup: Dedup = _doc("dedup", "merge_all", default=Dedup.MERGE_ALL)
    max_results: MaxResults = _doc("max_results", 1000, default=1000)
    allowed_calling_aets: list[AETitle] = _doc("allowed_calling_aets", ["WORKSTATION1"], default_factory=list)
    cache_ttl_s: CacheTtl = _doc("cache_ttl_s", 60, default=60)


class SpanPut(_SpanFields):
    """A span's whole configuration without its name: the body of PUT /spans/{name}."""

    model_config = _STRICT

    @model_validator(mode="after")
    def _check_policy(self) -> Self:
        check_span_policy(self, getattr(self, "name", None))
        return self


class SpanIn(SpanPut, _SpanName):
    """A new span: the body of POST /spans and an entry of the configuration file."""

    model_config = _STRICT


class SpanOut(_SpanFields, _SpanName):
    """A stored span; for 'all', ``nodes`` is every enabled node at the time of reading."""

    model_config = _OUT

    created_at: datetime = _doc("created_at")
    updated_at: datetime = _doc("updated_at")


_SPAN_NULLABLE = frozenset({"description", "minimum_nodes"})


class SpanPatch(_Patch):
    """Fields to change on a span (PATCH); absent fields keep their value, null clears an optional one."""

    model_config = _STRICT
    nullable = _SPAN_NULLABLE

    ae_title: AETitle | None = _doc("span_ae_title", "SPAN_RAD", default=None)
    description: str | None = _doc("description", "Every radiology PACS", default=None, max_length=1000)
    nodes: NodeNames | None = _doc("nodes", ["pacs-east"], default=None)
    timeout_s: SpanTimeout | None = _doc("timeout_s", 10.0, default=None)
    failure_strategy: FailureStrategy | None = _doc("failure_strategy", "minimum", default=None)
    minimum_nodes: MinimumNodes | None = _doc("minimum_nodes", 2, default=None)
    dedup: Dedup | None = _doc("dedup", "first_wins", default=None)
    max_results: MaxResults | None = _doc("max_results", 1000, default=None)
    allowed_calling_aets: list[AETitle] | None = _doc("allowed_calling_aets", ["WORKSTATION1"], default=None)
    cache_ttl_s: CacheTtl | None = _doc("cache_ttl_s", 60, default=None)


def check_span_policy(span: _SpanFields, name: str | None) -> None:
    """Rules across fields; ``name`` is None for PUT bodies, whose name the repository checks."""
    minimum = span.failure_strategy is FailureStrategy.MINIMUM
    if minimum and span.minimum_nodes is None:
        raise PydanticCustomError("minimum_nodes", "minimum_nodes: required (>= 1) when failure_strategy "
                                                   "is 'minimum'")
    if name is None or name == ALL_SPAN:
        # PUT bodies are checked again with their name; 'all' takes its members from the enabled nodes.
        return
    if not span.nodes:
        raise PydanticCustomError("nodes", "nodes: a span needs at least one node (only 'all' holds every "
                                           "enabled node by itself)")
    if minimum and span.minimum_nodes is not None and span.minimum_nodes > len(span.nodes):
        raise _too_few(span)


def _too_few(span: _SpanFields) -> PydanticCustomError:
    return PydanticCustomError("minimum_nodes", f"minimum_nodes: {span.minimum_nodes} is more than the "
                                                f"{len(span.nodes)} node(s) of the span")


# --- destinations ------------------------------------------------------------------------------------

class _DestinationName(TextInput):
    name: Slug = _doc("destination_name", "ward-ws1")


class DestinationPut(TextInput):
    """A destination's whole configuration without its name: the body of PUT /destinations/{name}."""

    model_config = _STRICT

    ae_title: AETitle = _doc("destination_ae_title", "WORKSTATION1")
    host: Host = _doc("destination_host", "ws1.example.org")
    port: Port = _doc("destination_port", 104)
    allowed_calling_aets: list[AETitle] = _doc("destination_callers", ["WORKSTATION1"], default_factory=list)


class DestinationIn(DestinationPut, _DestinationName):
    """A new destination: the body of POST /destinations."""

    model_config = _STRICT


class DestinationOut(DestinationIn):
    """A stored destination as the API returns it."""

    model_config = _OUT

    created_at: datetime = _doc("created_at")
    updated_at: datetime = _doc("updated_at")


class DestinationPatch(_Patch):
    """Fields to change on a destination (PATCH); absent fields keep their value."""

    model_config = _STRICT

    ae_title: AETitle | None = _doc("destination_ae_title", "WORKSTATION1", default=None)
    host: Host | None = _doc("destination_host", "ws1.example.org", default=None)
    port: Port | None = _doc("destination_port", 104, default=None)
    allowed_calling_aets: list[AETitle] | None = _doc("destination_callers", ["WORKSTATION1"], default=None)


# --- query records -----------------------------------------------------------------------------------

class _AuditFields(BaseModel):
    """Who asked, over what, from where, about whom: shared by query and retrieval records."""

    principal: str | None = Field(default=None, description="Who asked: the name of the API key that made "
                                  "the request, or anonymous (null before the audit trail existed)",
                                  examples=["ward-ws"])
    channel: str | None = Field(default=None, description="http, dimse, amqp or dicomweb", examples=["http"])
    client: str | None = Field(default=None, description="Network address (HTTP) or broker user (AMQP) of "
                               "the asking client", examples=["10.0.0.7"])
    asserted_ae: str | None = Field(default=None, description="DICOM requests: the calling AE title the "
                                    "DICOM front asserted (only a dicom_front key may)",
                                    examples=["RADIOLOGY_WS9"])
    asserted_peer: str | None = Field(default=None, description="DICOM requests: the DICOM client's address "
                                      "the DICOM front asserted", examples=["10.0.0.9"])
    patient_id: str | None = Field(default=None, description="The PatientID asked about, when one was given")


class QueryRecordOut(_AuditFields):
    """One spanning query as recorded for GET /queries: what was asked, by whom, and each node's outcome."""

    model_config = _OUT

    id: str = Field(description="Identifier of the query (hex UUID)",
                    examples=["3f2a9c0e5b7d4e1f8a6b2c4d9e0f1a2b"])
    created_at: datetime = Field(description="When the query started (UTC)")
    span: str = Field(description="Span the query ran on", examples=["all"])
    level: str = Field(description="Query/Retrieve level", examples=["STUDY"])
    filters: dict[str, Any] = Field(description="Matching keys by keyword", examples=[{"PatientID": "12345"}])
    requester: str = Field(description="Who asked: a calling AE title or an HTTP client", examples=["WS1"])
    status: str = Field(description="Overall result of the query", examples=["ok"])
    total: int = Field(description="Matches returned after merging", examples=[12])
    outcomes: list[dict[str, Any]] = Field(
        description="Per-node outcomes (node, status, matches, elapsed_ms, error)")
    elapsed_ms: float = Field(description="Wall time of the whole query in milliseconds", examples=[58.2])
    error: str | None = Field(default=None, description="Why the query failed, when it did")
    cache: str | None = Field(default=None, description="hit (answered from the query cache) or miss",
                              examples=["miss"])


class RetrievalRecordOut(_AuditFields):
    """One retrieval (C-MOVE through the spanner) as recorded: what moved where, from which archives."""

    model_config = _OUT

    id: str = Field(description="Identifier of the retrieval (hex UUID)")
    created_at: datetime = Field(description="When the retrieval started (UTC)")
    span: str = Field(description="Span whose nodes were asked", examples=["all"])
    level: str = Field(description="STUDY, SERIES or IMAGE", examples=["STUDY"])
    uids: dict[str, Any] = Field(description="Unique keys of what was asked for")
    destination_ae: str = Field(description="Move destination AE title", examples=["WORKSTATION1"])
    requester: str = Field(description="Who asked")
    status: str = Field(description="success, warning or failed")
    dimse_status: int | None = Field(description="Final C-MOVE status (0x0000, 0xB000, 0xA801, 0xC000)")
    completed: int = Field(description="Sub-operations completed")
    failed: int = Field(description="Sub-operations failed")
    warning: int = Field(description="Sub-operations with warnings")
    parts: list[dict[str, Any]] = Field(description="Each part: level, keys, node tried, outcome, counts")
    elapsed_ms: float = Field(description="Wall time in milliseconds")
    error: str | None = Field(default=None, description="Why it failed, when it did")


class AuditEntryOut(BaseModel):
    """One query or retrieval in the audit trail: who asked what, from where, and how each node answered."""

    kind: Literal["query", "retrieval"]
    id: str
    created_at: datetime = Field(description="When it started (UTC)")
    principal: str | None = Field(description="Name of the API key that asked, or anonymous")
    channel: str | None = Field(description="http, dimse, amqp or dicomweb")
    client: str | None = Field(description="Address (HTTP) or broker user (AMQP) of the asking client")
    asserted_ae: str | None = Field(default=None, description="DICOM: calling AE title the front asserted")
    asserted_peer: str | None = Field(default=None, description="DICOM: client address the front asserted")
    patient_id: str | None
    span: str
    level: str
    what: dict[str, Any] = Field(description="The query's filters, or the retrieval's unique keys")
    destination_ae: str | None = Field(default=None, description="Retrievals: the move destination")
    status: str
    total: int = Field(description="Queries: merged matches; retrievals: sub-operations completed")
    nodes: list[dict[str, Any]] = Field(description="Per-node outcomes (queries) or parts (retrievals)")
    elapsed_ms: float
    error: str | None = None


class Channel(StrEnum):
    """The door a query or retrieval came through, as the audit trail records it (at most 8 characters:
    the column's width)."""

    HTTP = "http"  # the JSON API under /api
    DIMSE = "dimse"  # the DICOM front, asserting its caller
    AMQP = "amqp"  # a request on RabbitMQ
    DICOMWEB = "dicomweb"  # the DICOMweb front under /dicomweb


class ApiRole(StrEnum):
    """What a key may do. ``query``: queries, retrievals, reading nodes, spans and records; ``admin``: also
    changing nodes and spans and reading the audit trail; ``dicom_front``: what ``query`` may, and it alone
    may name the DICOM caller (calling AE title and peer address) for the audit trail."""

    ADMIN = "admin"
    QUERY = "query"
    DICOM_FRONT = "dicom_front"


CLOSING_ROLES = (ApiRole.ADMIN, ApiRole.QUERY)
"""In development the API is open until an active key of one of these roles exists (a dicom_front key,
which `spanner run` makes for its own front, does not close it)."""


class ApiKeyOut(BaseModel):
    """An API key as listed: never the key itself, only its public prefix."""

    model_config = _OUT

    name: str
    role: ApiRole
    prefix: str = Field(description="The key's first characters, to tell keys apart")
    created_at: datetime
    revoked_at: datetime | None = None


# --- messages ----------------------------------------------------------------------------------------

def describe_errors(exc: ValidationError) -> str:
    """All problems on one line, each led by its field path, for logs, ConfigError and CLI output."""
    lines: list[str] = []
    for error in exc.errors(include_url=False):
        loc = error["loc"]
        path = ".".join(str(part) for part in loc)
        message = str(error["msg"])
        field = next((part for part in reversed(loc) if isinstance(part, str)), None)
        if field and message.startswith(f"{field}: "):
            message = message[len(field) + 2:]  # our own messages lead with the field name: use the full path
        lines.append(f"{path}: {message}" if path else message)
    return "; ".join(lines)
