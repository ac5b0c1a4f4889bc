"""/api/v1/destinations through the session's Serve app: create, read, replace, patch, delete, and the
errors a hospital integration engineer meets (bad AE title, a taken AE title, unknown names)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import Api

WS = {"name": "ward-ws1", "ae_title": "WARDWS1", "host": "127.0.0.1", "port": 11112}


@pytest.fixture
def ward_ws(api: Api) -> Iterator[dict[str, object]]:
    made = api.http.post("/api/v1/destinations", json=WS)
    assert made.status_code == 201, made.text
    yield made.json()
    api.http.delete(f"/api/v1/destinations/{WS['name']}")


def test_a_destination_is_created_read_changed_and_deleted(api: Api, ward_ws: dict[str, object]) -> None:
    assert ward_ws["allowed_calling_aets"] == [] and ward_ws["created_at"] == ward_ws["updated_at"]
    assert api.http.get("/api/v1/destinations/ward-ws1").json() == ward_ws
    assert ward_ws in api.http.get("/api/v1/destinations").json()
    put = api.http.put("/api/v1/destinations/ward-ws1",
                       json={"ae_title": "WARDWS2", "host": "localhost", "port": 104,
                             "allowed_calling_aets": ["SPAN_RAD "]})
    assert put.status_code == 200, put.text
    assert (put.json()["ae_title"], put.json()["allowed_calling_aets"]) == ("WARDWS2", ["SPAN_RAD"])
    patched = api.http.patch("/api/v1/destinations/ward-ws1", json={"port": 11113})
    assert patched.status_code == 200
    assert (patched.json()["ae_title"], patched.json()["port"]) == ("WARDWS2", 11113)
    assert api.http.delete("/api/v1/destinations/ward-ws1").status_code == 204
    gone = api.http.get("/api/v1/destinations/ward-ws1")
    assert gone.status_code == 404 and "ward-ws1" in gone.json()["detail"]


def test_bad_destinations_are_refused_with_the_reason(api: Api, ward_ws: dict[str, object]) -> None:
    again = api.http.post("/api/v1/destinations", json=WS)
    assert again.status_code == 409 and "already exists" in again.json()["detail"]
    taken = api.http.post("/api/v1/destinations", json={**WS, "name": "other-ws"})
    assert taken.status_code == 409
    assert "'WARDWS1' is already used by destination 'ward-ws1'" in taken.json()["detail"]
    for bad in ({**WS, "name": "x", "ae_title": "TOO_LONG_AE_TITLE_X"}, {**WS, "name": "x", "port": 0},
                {**WS, "name": "Bad Name"}, {**WS, "name": "x", "ae_title": "A\\B"},
                {**WS, "name": "x", "x": 1}):
        answer = api.http.post("/api/v1/destinations", json=bad)
        assert answer.status_code == 422, (bad, answer.text)
    null = api.http.patch("/api/v1/destinations/ward-ws1", json={"host": None})
    assert null.status_code == 422 and "host: may not be null" in null.text
    other = api.http.post("/api/v1/destinations", json={**WS, "name": "other-ws", "ae_title": "OTHERWS"})
    assert other.status_code == 201
    try:
        clash = api.http.patch("/api/v1/destinations/other-ws", json={"ae_title": "WARDWS1"})
        assert clash.status_code == 409 and "ward-ws1" in clash.json()["detail"]
    finally:
        api.http.delete("/api/v1/destinations/other-ws")
    for method in ("GET", "PATCH", "DELETE"):
        missing = api.http.request(method, "/api/v1/destinations/nowhere",
                                   **({"json": {"port": 1}} if method == "PATCH" else {}))
        assert missing.status_code == 404 and "'nowhere' does not exist" in missing.json()["detail"], method
