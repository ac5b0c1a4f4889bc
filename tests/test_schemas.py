"""The API models: what they accept, what they normalise, and that their refusals read well."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from spanner.query import InformationModel
from spanner.schemas import (
    Dedup,
    FailureStrategy,
    NodeIn,
    NodeOut,
    NodePatch,
    NodePut,
    SpanIn,
    SpanPatch,
    SpanPut,
    describe_errors,
)

NODE: dict[str, Any] = {"name": "pacs-east", "ae_title": "PACS_EAST", "host": "pacs.example.org", "port": 104}
SPAN: dict[str, Any] = {"name": "radiology", "ae_title": "SPAN_RAD", "nodes": ["pacs-east", "pacs-west"]}


def refusal(model: type[BaseModel], data: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as info:
        model.model_validate(data)
    return describe_errors(info.value)


def messages(model: type[BaseModel], data: dict[str, Any]) -> list[str]:
    with pytest.raises(ValidationError) as info:
        model.model_validate(data)
    return [error["msg"] for error in info.value.errors()]


def test_node_defaults() -> None:
    node = NodeIn.model_validate(NODE)
    assert node.enabled is True
    assert node.priority == 100
    assert node.max_associations == 4
    assert node.connect_timeout_s == 5
    assert node.dimse_timeout_s == 30
    assert node.query_timeout_s is None and node.max_queries_per_s is None and node.calling_ae_title is None
    assert node.reuse_associations is True
    assert node.query_models == [InformationModel.STUDY_ROOT, InformationModel.PATIENT_ROOT]
    assert node.additional_filters == {}
    assert next(iter(NodeIn.model_fields)) == "name"  # name leads in API output


def test_ae_title_too_long_message() -> None:
    msgs = messages(NodeIn, {**NODE, "ae_title": "ABCDEFGHIJKLMNOPQ"})
    assert msgs == ["ae_title: 'ABCDEFGHIJKLMNOPQ' is 17 characters; an AE title has at most 16"]


def test_ae_title_backslash_and_repertoire() -> None:
    assert "backslash" in refusal(NodeIn, {**NODE, "ae_title": "PACS\\1"})
    assert "printable ASCII" in refusal(NodeIn, {**NODE, "ae_title": "PÄCS"})
    assert "printable ASCII" in refusal(NodeIn, {**NODE, "ae_title": "PA\tCS"})
    assert "empty or all spaces" in refusal(NodeIn, {**NODE, "ae_title": "    "})


def test_ae_title_spaces_are_stripped() -> None:
    assert NodeIn.model_validate({**NODE, "ae_title": "  PACS 1  "}).ae_title == "PACS 1"
    # 16 significant characters padded with spaces are still a valid title
    assert NodeIn.model_validate({**NODE, "ae_title": " ABCDEFGHIJKLMNOP "}).ae_title == "ABCDEFGHIJKLMNOP"


def test_calling_ae_title_checked_too() -> None:
    assert refusal(NodeIn, {**NODE, "calling_ae_title": "X" * 17}).startswith("calling_ae_title: ")


@pytest.mark.parametrize("port", [0, 65536, -1])
def test_port_out_of_range(port: int) -> None:
    assert refusal(NodeIn, {**NODE, "port": port}) == \
        f"port: {port} is out of range; give a number >= 1 and <= 65535"


@pytest.mark.parametrize("name", ["Pacs", "pacs_east", "-east", "", "a" * 65, "pacs east"])
def test_bad_slug(name: str) -> None:
    assert refusal(NodeIn, {**NODE, "name": name}).startswith("name: ")


def test_slug_suggests_lowercase() -> None:
    assert "did you mean 'pacs-east'?" in refusal(NodeIn, {**NODE, "name": "PACS-EAST"})


@pytest.mark.parametrize("name", ["a", "0pacs", "pacs-1", "x" * 64])
def test_good_slug(name: str) -> None:
    assert NodeIn.model_validate({**NODE, "name": name}).name == name


@pytest.mark.parametrize("host,stored", [
    ("10.0.0.5", "10.0.0.5"), ("::1", "::1"), ("[::1]", "::1"), ("localhost", "localhost"),
    ("pacs_1.example.org", "pacs_1.example.org"),
])
def test_host_accepts(host: str, stored: str) -> None:
    assert NodeIn.model_validate({**NODE, "host": host}).host == stored


@pytest.mark.parametrize("host", ["", "pacs east", "http://pacs", "-pacs.example.org", "a" * 64 + ".org"])
def test_host_refuses(host: str) -> None:
    assert refusal(NodeIn, {**NODE, "host": host}).startswith("host: ")


def test_additional_filters_stored_by_keyword() -> None:
    node = NodeIn.model_validate({**NODE, "additional_filters": {"00080080": "EAST*", "(0008,0060)": "CT"}})
    assert node.additional_filters == {"InstitutionName": "EAST*", "Modality": "CT"}


def test_additional_filters_unknown_keyword() -> None:
    assert refusal(NodeIn, {**NODE, "additional_filters": {"Institution": "X"}}) == (
        "additional_filters: unknown DICOM keyword 'Institution' "
        "(keywords are case-sensitive, e.g. 'PatientID')")


def test_additional_filters_bad_value() -> None:
    assert "StudyDate" in refusal(NodeIn, {**NODE, "additional_filters": {"StudyDate": "2024"}})


def test_query_models() -> None:
    assert "at least one" in refusal(NodeIn, {**NODE, "query_models": []})
    assert refusal(NodeIn, {**NODE, "query_models": ["modality_worklist"]}).startswith("query_models.0: ")
    node = NodeIn.model_validate({**NODE, "query_models": ["patient_root", "patient_root"]})
    assert node.query_models == [InformationModel.PATIENT_ROOT]


def test_numeric_bounds() -> None:
    text = refusal(NodeIn, {**NODE, "max_associations": 0, "max_queries_per_s": 0, "connect_timeout_s": -1})
    assert "max_associations: 0 is out of range; give a number >= 1 and <= 64" in text
    assert "max_queries_per_s: 0 is out of range; give a number > 0" in text
    assert "connect_timeout_s: -1 is out of range" in text


def test_unknown_field_refused() -> None:
    assert refusal(NodeIn, {**NODE, "aetitle": "X"}) == "aetitle: Extra inputs are not permitted"


def test_node_put_has_no_name() -> None:
    assert "name" not in NodePut.model_fields
    assert "Extra inputs" in refusal(NodePut, NODE)


def test_node_out_carries_timestamps() -> None:
    assert {"created_at", "updated_at"} <= set(NodeOut.model_fields)


def test_node_patch() -> None:
    patch = NodePatch.model_validate({"port": 11112, "calling_ae_title": None})
    assert patch.changes() == {"port": 11112, "calling_ae_title": None}
    assert NodePatch.model_validate({}).changes() == {}
    assert refusal(NodePatch, {"port": None}) == (
        "port: may not be null; leave it out to keep the current value")
    assert refusal(NodePatch, {"port": 0}).startswith("port: 0 is out of range")
    assert "Extra inputs" in refusal(NodePatch, {"name": "renamed"})


def test_span_defaults() -> None:
    span = SpanIn.model_validate(SPAN)
    assert span.timeout_s == 10
    assert span.failure_strategy is FailureStrategy.BEST_EFFORT
    assert span.dedup is Dedup.MERGE_ALL
    assert span.max_results == 1000
    assert span.allowed_calling_aets == []
    assert span.cache_ttl_s == 60
    assert span.minimum_nodes is None


def test_span_minimum_strategy_needs_minimum_nodes() -> None:
    assert refusal(SpanIn, {**SPAN, "failure_strategy": "minimum"}) == \
        "minimum_nodes: required (>= 1) when failure_strategy is 'minimum'"
    assert refusal(SpanIn, {**SPAN, "failure_strategy": "minimum", "minimum_nodes": 3}) == \
        "minimum_nodes: 3 is more than the 2 node(s) of the span"
    assert refusal(SpanIn, {**SPAN, "failure_strategy": "minimum", "minimum_nodes": 0}).startswith(
        "minimum_nodes: 0 is out of range")
    span = SpanIn.model_validate({**SPAN, "failure_strategy": "minimum", "minimum_nodes": 2})
    assert span.minimum_nodes == 2


def test_span_needs_nodes_unless_all() -> None:
    assert refusal(SpanIn, {**SPAN, "nodes": []}).startswith("nodes: a span needs at least one node")
    assert SpanIn.model_validate({"name": "all", "ae_title": "SPANNER"}).nodes == []
    # 'all' may ask for a minimum without listing members: they are the enabled nodes
    SpanIn.model_validate({"name": "all", "ae_title": "SPANNER", "failure_strategy": "minimum",
                           "minimum_nodes": 5})


def test_span_node_list_checked() -> None:
    assert refusal(SpanIn, {**SPAN, "nodes": ["a", "a"]}) == "nodes: node 'a' is listed twice"
    assert refusal(SpanIn, {**SPAN, "nodes": ["Bad Name"]}).startswith("nodes.0: ")


def test_span_bounds() -> None:
    assert refusal(SpanIn, {**SPAN, "timeout_s": 0}) == (
        "timeout_s: 0 is out of range; give a number > 0 and <= 300")
    assert refusal(SpanIn, {**SPAN, "timeout_s": 301}).startswith("timeout_s: 301 is out of range")
    SpanIn.model_validate({**SPAN, "timeout_s": 300})
    assert refusal(SpanIn, {**SPAN, "max_results": 100001}).startswith("max_results: ")
    assert refusal(SpanIn, {**SPAN, "cache_ttl_s": -1}).startswith("cache_ttl_s: ")
    assert refusal(SpanIn, {**SPAN, "dedup": "newest"}).startswith("dedup: ")
    assert refusal(SpanIn, {**SPAN, "failure_strategy": "hope"}).startswith("failure_strategy: ")


def test_span_allowed_calling_aets() -> None:
    span = SpanIn.model_validate({**SPAN, "allowed_calling_aets": [" WS1 ", "WS2"]})
    assert span.allowed_calling_aets == ["WS1", "WS2"]
    assert refusal(SpanIn, {**SPAN, "allowed_calling_aets": ["WS1", "A\\B"]}).startswith(
        "allowed_calling_aets.1: 'A\\\\B' contains a backslash")


def test_span_put_and_patch() -> None:
    assert "name" not in SpanPut.model_fields
    SpanPut.model_validate({"ae_title": "SPAN_RAD", "nodes": []})  # the repository checks it with its name
    assert refusal(SpanPatch, {"timeout_s": None}).startswith("timeout_s: may not be null")
    assert SpanPatch.model_validate({"minimum_nodes": None}).changes() == {"minimum_nodes": None}


def test_openapi_schema_has_descriptions_examples_and_bounds() -> None:
    schema = NodeIn.model_json_schema()
    port = schema["properties"]["port"]
    assert port["minimum"] == 1 and port["maximum"] == 65535 and port["examples"] == [104]
    assert all("description" in prop for prop in schema["properties"].values())
    span = SpanIn.model_json_schema()
    assert span["properties"]["timeout_s"]["exclusiveMinimum"] == 0
    assert all("description" in prop for prop in span["properties"].values())
