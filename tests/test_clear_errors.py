"""Inputs that used to answer 500 or 502 answer 422 with a message naming the problem."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import Api
from tests.peers.ports import free_port

JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def a_node(api: Api) -> Iterator[str]:
    """A node, so that queries get past the span check to their keys (nothing listens on its port)."""
    api.add_node("errors-node", free_port(), ae_title="NOBODY")
    yield "errors-node"
    api.http.delete("/api/v1/nodes/errors-node")


@pytest.mark.parametrize("body", [
    '{"level": "PATIENT", "filters": {"PatientName": "\\ud800"}}',
    '{"level": "PATIENT", "filters": {"PatientID": ["\\udfff"]}}',
    '{"level": "PATIENT", "filters": {"\\ud800": "x"}}',
    '{"level": "PATIENT", "span": "\\ud800"}',
])
def test_a_lone_surrogate_is_422(api: Api, body: str) -> None:
    response = api.http.post("/api/v1/queries", content=body.encode(), headers=JSON)
    assert response.status_code == 422, response.text
    assert "lone surrogate" in response.json()["detail"]


@pytest.mark.parametrize("body", [
    '{"name": "n\\ud800", "ae_title": "X", "host": "127.0.0.1", "port": 104}',
    '{"name": "s1", "ae_title": "S1", "description": "\\ud800", "nodes": []}',
])
def test_a_lone_surrogate_in_a_node_or_span_is_422(api: Api, body: str) -> None:
    path = "/api/v1/nodes" if "host" in body else "/api/v1/spans"
    response = api.http.post(path, content=body.encode(), headers=JSON)
    assert response.status_code == 422, response.text
    assert "lone surrogate" in response.json()["detail"]


@pytest.mark.parametrize("path", ["/api/v1/queries", "/api/v1/retrievals", "/api/v1/audit"])
def test_an_offset_past_64_bits_is_422(api: Api, path: str) -> None:
    response = api.http.get(path, params={"offset": "9223372036854775808"})
    assert response.status_code == 422, response.text
    assert "offset" in response.json()["detail"]


@pytest.mark.parametrize(("body", "named"), [
    ({"level": "IMAGE", "filters": {"PixelData": ""}}, "PixelData"),
    ({"level": "IMAGE", "filters": {"7FE00010": "x"}}, "PixelData"),
    ({"level": "IMAGE", "return_keys": ["PixelData"]}, "PixelData"),
    ({"level": "IMAGE", "return_keys": ["EncapsulatedDocument"]}, "EncapsulatedDocument"),
    ({"level": "SERIES", "return_keys": ["ReferencedImageSequence"]}, "ReferencedImageSequence"),
])
def test_bulk_data_and_sequences_are_not_keys(api: Api, a_node: str, body: dict[str, object],
                                              named: str) -> None:
    response = api.http.post("/api/v1/queries", json=body)
    assert response.status_code == 422, response.text
    assert named in response.json()["detail"]
