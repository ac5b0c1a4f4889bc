"""API keys, roles and the audit trail: a second Serve app (under /auth) with authentication on, the
session's open app for anonymous records, the DICOM front with a key, retention, and the keys CLI."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from typer.testing import CliRunner

from cli.main import app as cli
from scp import translate
from scp.server import SpannerScp
from serve_app.services import AuditJanitor
from simulator.dataset import generate_fleet
from simulator.scp import SimulatedPacs, SimulatorConfig
from spanner.errors import NotFound
from spanner.keys import new_key
from spanner.schemas import Channel, QueryRecordOut
from spanner.settings import get_settings, load_settings
from spanner.storage import Audit, Repository, make_engine
from tests.conftest import Api, migrate

TTL_S = 0.5
OLD = datetime.now(UTC) - timedelta(days=400)


@dataclass
class AuthApp:
    api: Api
    repo: Repository
    keys: dict[str, str]

    def get(self, path: str, **headers: str) -> httpx.Response:
        return self.api.http.get(path, headers=headers)


def _old_query(repo: Repository, query_id: str) -> None:
    repo.record_query(query_id=query_id, span="all", level="STUDY", filters={"PatientID": "OLD1"},
                      requester="x", status="success", total=0, outcomes=[], elapsed_ms=1.0, created_at=OLD,
                      audit=Audit(principal="old", channel=Channel.HTTP, client="10.0.0.1",
                                  patient_id="OLD1"))


@pytest.fixture(scope="module")
def pacs() -> Iterator[SimulatedPacs]:
    sim = SimulatedPacs(SimulatorConfig(ae_title="AUDITPACS"), generate_fleet(5, 1, 4)[0])
    sim.start()
    yield sim
    sim.stop()


@pytest.fixture(scope="module")
def auth(api: Api, ray_session: str, tmp_path_factory: pytest.TempPathFactory,
         pacs: SimulatedPacs) -> Iterator[AuthApp]:
    from ray import serve

    from serve_app.app import AppArgs, build_app

    var_dir = tmp_path_factory.mktemp("auth")
    url = f"sqlite:///{var_dir}/spanner.db"
    migrate(url)
    repo = Repository(make_engine(url))
    keys: dict[str, str] = {}
    for name, role in (("boss", "admin"), ("ward", "query"), ("gone", "query"), ("front", "dicom_front")):
        key, prefix, key_hash = new_key()
        repo.create_api_key(name, role, prefix, key_hash)
        keys[name] = key
    _old_query(repo, "old-before-start")  # the ingress purges it at start
    namespace = f"{ray_session}-auth"
    settings = dict(api.settings) | {"namespace": namespace, "var_dir": str(var_dir), "database_url": url,
                                     "auth_enabled": True, "auth_cache_ttl_s": TTL_S}
    serve.run(build_app(AppArgs(settings=settings)), name="spanner-auth", route_prefix="/auth")
    client = Api(f"{api.base_url}/auth", namespace, settings)
    client.http.headers["Authorization"] = f"Bearer {keys['boss']}"
    client.add_node("audit-sim", pacs.port, ae_title="AUDITPACS")
    yield AuthApp(client, repo, keys)
    client.http.close()
    serve.delete("spanner-auth")
    repo.engine.dispose()


def anonymous(auth: AuthApp) -> httpx.Client:
    return httpx.Client(base_url=auth.api.base_url, timeout=60.0)


def test_keys_are_required_and_roles_apply(auth: AuthApp) -> None:
    with anonymous(auth) as http:
        missing = http.get("/api/v1/nodes")
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert "API key is required" in missing.json()["detail"]
        wrong = http.get("/api/v1/nodes", headers={"Authorization": "Bearer spk_nonsense"})
        assert wrong.status_code == 401 and "unknown or revoked" in wrong.json()["detail"]
        assert http.get("/health").status_code == 200
        assert http.get("/openapi.json").status_code == 200
        ward = {"X-API-Key": auth.keys["ward"]}
        assert http.get("/api/v1/nodes", headers=ward).status_code == 200
        body = {"name": "nope", "ae_title": "NOPE", "host": "127.0.0.1", "port": 104}
        forbidden = http.post("/api/v1/nodes", json=body, headers=ward)
        assert forbidden.status_code == 403 and "admin key" in forbidden.json()["detail"]
        assert http.get("/api/v1/audit", headers=ward).status_code == 403
        boss = {"Authorization": f"Bearer {auth.keys['boss']}"}
        assert http.post("/api/v1/nodes", json=body, headers=boss).status_code == 201
        assert http.delete("/api/v1/nodes/nope", headers={"X-API-Key": auth.keys["boss"]}).status_code == 204


def test_dicomweb_takes_the_same_keys(auth: AuthApp) -> None:
    """WADO-RS under /dicomweb: 401 without a key, a query key is enough (here a study nobody holds)."""
    with anonymous(auth) as http:
        missing = http.get("/dicomweb/studies/1.2.3.4/metadata")
        assert missing.status_code == 401 and "API key is required" in missing.json()["detail"]
        ward = {"Authorization": f"Bearer {auth.keys['ward']}"}
        unknown = http.get("/dicomweb/spans/all/studies/1.2.3.4/metadata", headers=ward)
        assert unknown.status_code == 404 and "held by no archive" in unknown.json()["detail"], unknown.text


def test_a_revoked_key_is_refused_within_the_cache_ttl(auth: AuthApp) -> None:
    headers = {"X-API-Key": auth.keys["gone"]}
    with anonymous(auth) as http:
        assert http.get("/api/v1/spans", headers=headers).status_code == 200
        auth.repo.revoke_api_key("gone")
        time.sleep(TTL_S + 0.3)
        refused = http.get("/api/v1/spans", headers=headers)
        assert refused.status_code == 401 and "revoked" in refused.json()["detail"]


def test_the_audit_names_the_key_and_filters(auth: AuthApp) -> None:
    started = datetime.now(UTC)
    with anonymous(auth) as http:
        answer = http.post("/api/v1/queries", json={"level": "PATIENT", "filters": {"PatientID": "PAT*"}},
                           headers={"X-API-Key": auth.keys["ward"], "X-Spanner-Calling-AE": ""}).json()
    entries = auth.api.http.get("/api/v1/audit", params={"since": started.isoformat()}).json()
    mine = [e for e in entries if e["id"] == answer["query_id"]]
    assert len(mine) == 1
    entry = mine[0]
    assert (entry["kind"], entry["principal"], entry["channel"], entry["client"]) == \
        ("query", "ward", "http", "127.0.0.1")
    assert entry["patient_id"] == "PAT*" and entry["what"] == {"PatientID": "PAT*"}
    assert entry["nodes"][0]["node"] == "audit-sim" and entry["status"] == "success"
    by_patient = auth.api.http.get("/api/v1/audit", params={"patient_id": "PAT*", "requester": "ward"}).json()
    assert answer["query_id"] in {e["id"] for e in by_patient}
    assert auth.api.http.get("/api/v1/audit", params={"status": "failed", "requester": "ward"}).json() == []
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert auth.api.http.get("/api/v1/audit", params={"since": future}).json() == []
    assert auth.api.http.get("/api/v1/audit", params={"kind": "retrieval", "requester": "ward"}).json() == []
    naive = auth.api.http.get("/api/v1/audit", params={"since": "2026-01-01T00:00:00"})
    assert naive.status_code == 422 and "time zone" in naive.json()["detail"]


def test_a_dicom_query_is_audited_with_the_calling_ae(auth: AuthApp) -> None:
    front = SpannerScp(load_settings(scp_port=0, scp_span_cache_ttl_s=0.1, scp_api_key=auth.keys["front"]),
                       base_url=auth.api.base_url)
    front.start()
    try:
        ae = AE(ae_title="AUDITWS")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ae.add_requested_context(translate.PATIENT_ROOT_FIND)
        assoc = ae.associate("127.0.0.1", front.port, ae_title="SPANNER")
        assert assoc.is_established
        ds = Dataset()
        ds.QueryRetrieveLevel = "PATIENT"
        ds.PatientID = "DIMSE*"
        statuses = [int(st.Status) for st, _ in assoc.send_c_find(ds, translate.PATIENT_ROOT_FIND)]
        assoc.release()
    finally:
        front.stop()
    assert statuses[-1] == 0x0000
    entries = auth.api.http.get("/api/v1/audit", params={"patient_id": "DIMSE*"}).json()
    assert len(entries) == 1
    entry = entries[0]
    assert (entry["principal"], entry["channel"], entry["client"]) == ("front", "dimse", "127.0.0.1")
    assert (entry["asserted_ae"], entry["asserted_peer"]) == ("AUDITWS", "127.0.0.1")
    record = auth.api.http.get(f"/api/v1/queries/{entry['id']}").json()
    assert (record["principal"], record["asserted_ae"]) == ("front", "AUDITWS")


@pytest.mark.parametrize("headers", [
    {"X-Spanner-Calling-AE": "RADIOLOGY_WS9", "X-Spanner-Peer": "10.9.9.9"},
    {"X-Spanner-Calling-AE": "RADIOLOGY_WS9"},
    {"X-Spanner-Peer": "10.9.9.9"},
])
@pytest.mark.parametrize("holder", ["ward", "boss"])
def test_only_the_dicom_front_role_may_assert_a_caller(auth: AuthApp, holder: str,
                                                       headers: dict[str, str]) -> None:
    """A query or admin key that names a DICOM caller is refused: it cannot write another identity into
    the audit trail, and nothing is recorded under the forged name."""
    with anonymous(auth) as http:
        query = http.post("/api/v1/queries", json={"level": "PATIENT", "filters": {"PatientID": "FORGED*"}},
                          headers={"X-API-Key": auth.keys[holder], **headers})
        retrieval = http.post("/api/v1/retrievals", json={"level": "STUDY", "destination_ae": "ANY",
                                                          "uids": {"StudyInstanceUID": "1.2.3"}},
                              headers={"X-API-Key": auth.keys[holder], **headers})
    for refused in (query, retrieval):
        assert refused.status_code == 403, refused.text
        assert "dicom_front" in refused.json()["detail"] and holder in refused.json()["detail"]
    entries = auth.api.http.get("/api/v1/audit", params={"patient_id": "FORGED*"}).json()
    assert entries == []


@pytest.mark.parametrize("holder", ["ward", "boss"])
def test_only_the_dicom_front_role_may_send_a_hop_chain(auth: AuthApp, holder: str) -> None:
    """A hop chain (loop protection) from another key is refused; the front's key may send one, and a
    chain that cannot be one is a 422 that says why."""
    body = {"level": "PATIENT", "filters": {"PatientID": "HOPS*"}}
    with anonymous(auth) as http:
        forged = http.post("/api/v1/queries", json=body,
                           headers={"X-API-Key": auth.keys[holder], "X-Spanner-Hops": "SPANNER-B"})
        sent = http.post("/api/v1/queries", json=body,
                         headers={"X-API-Key": auth.keys["front"], "X-Spanner-Hops": "SPANNER-B"})
        too_long = http.post("/api/v1/queries", json=body,
                             headers={"X-API-Key": auth.keys["front"], "X-Spanner-Hops": ",".join("X" * 17)})
        forged_move = http.post("/api/v1/retrievals", json={"level": "STUDY", "destination_ae": "ANY",
                                                            "uids": {"StudyInstanceUID": "1.2.3"}},
                                headers={"X-API-Key": auth.keys[holder], "X-Spanner-Hops": "SPANNER-B"})
    for refused in (forged, forged_move):
        assert refused.status_code == 403 and "X-Spanner-Hops" in refused.json()["detail"], refused.text
    assert sent.status_code == 200, sent.text
    assert too_long.status_code == 422 and "at most 16" in too_long.json()["detail"], too_long.text


def test_the_dicom_front_key_asks_but_administers_nothing(auth: AuthApp) -> None:
    front = {"X-API-Key": auth.keys["front"]}
    with anonymous(auth) as http:
        assert http.get("/api/v1/spans", headers=front).status_code == 200
        body = {"name": "nope", "ae_title": "NOPE", "host": "127.0.0.1", "port": 104}
        assert http.post("/api/v1/nodes", json=body, headers=front).status_code == 403
        assert http.get("/api/v1/audit", headers=front).status_code == 403
        asked = http.post("/api/v1/queries", json={"level": "PATIENT", "filters": {"PatientID": "FRONT*"}},
                          headers={**front, "X-Spanner-Calling-AE": "WS7", "X-Spanner-Peer": "10.1.1.7"})
    assert asked.status_code == 200, asked.text
    entry = auth.api.http.get("/api/v1/audit", params={"patient_id": "FRONT*"}).json()[0]
    assert (entry["principal"], entry["channel"], entry["asserted_ae"], entry["asserted_peer"]) == \
        ("front", "dimse", "WS7", "10.1.1.7")


def test_without_a_key_the_dicom_headers_are_not_believed(auth: AuthApp) -> None:
    """The open app trusts them (auth off); an attacker without a key is refused before that matters."""
    with anonymous(auth) as http:
        response = http.post("/api/v1/queries", json={"level": "PATIENT"},
                             headers={"X-Spanner-Calling-AE": "FAKE"})
    assert response.status_code == 401


def test_retention_purges_old_records(auth: AuthApp) -> None:
    with pytest.raises(Exception, match="not recorded"):
        auth.repo.get_query("old-before-start")  # purged by the ingress at start
    _old_query(auth.repo, "old-1")
    auth.repo.record_retrieval(retrieval_id="old-r", span="all", level="STUDY", uids={"PatientID": ["OLD1"]},
                               destination_ae="X", requester="x", status="success", dimse_status=0,
                               completed=0, failed=0, warning=0, parts=[], elapsed_ms=1.0, created_at=OLD)
    now = [0.0]
    janitor = AuditJanitor(auth.repo, 365, clock=lambda: now[0])
    assert janitor.due() and janitor.purge() == 2
    assert auth.api.http.get("/api/v1/audit", params={"patient_id": "OLD1"}).json() == []
    now[0] = 3599.0
    assert not janitor.due()
    now[0] = 3600.0
    assert janitor.due()
    assert not AuditJanitor(auth.repo, 0).due()


def test_the_open_app_records_anonymous_http(api: Api, pacs: SimulatedPacs) -> None:
    api.add_node("audit-open", pacs.port, ae_title="AUDITPACS")
    try:
        status, answer = api.query(level="PATIENT", filters={"PatientID": "PAT*"}, nodes=["audit-open"])
        assert status == 200
        record = api.http.get(f"/api/v1/queries/{answer['query_id']}").json()
        assert (record["principal"], record["channel"], record["client"], record["patient_id"]) == \
            ("anonymous", "http", "127.0.0.1", "PAT*")
        entries = api.http.get("/api/v1/audit", params={"requester": "anonymous", "kind": "query"}).json()
        assert entries[0]["id"] == answer["query_id"]
    finally:
        api.http.delete("/api/v1/nodes/audit-open")


def test_production_cannot_turn_auth_off() -> None:
    with pytest.raises(Exception, match="must not turn API keys off"):
        load_settings(environment="production", database_url="postgresql://x@127.0.0.1/x", demo_fleet=False,
                      auth_enabled=False)


def test_keys_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'keys.db'}")
    get_settings.cache_clear()
    runner = CliRunner()
    try:
        assert runner.invoke(cli, ["db", "upgrade"]).exit_code == 0
        made = runner.invoke(cli, ["keys", "create", "ward", "--role", "query"], terminal_width=200)
        assert made.exit_code == 0, made.output
        key = made.output.strip().splitlines()[-1]
        assert key.startswith("spk_") and len(key) > 40
        assert runner.invoke(cli, ["keys", "create", "ward", "--role", "query"]).exit_code == 1
        bad = runner.invoke(cli, ["keys", "create", "x", "--role", "root"], terminal_width=200)
        assert bad.exit_code == 1 and "admin, query, dicom_front" in bad.output
        front = runner.invoke(cli, ["keys", "create", "front", "--role", "dicom_front"], terminal_width=200)
        assert front.exit_code == 0, front.output
        listed = runner.invoke(cli, ["keys", "list"], terminal_width=200)
        assert "ward" in listed.output and key[:12] in listed.output and key not in listed.output
        assert runner.invoke(cli, ["keys", "revoke", "ward"]).exit_code == 0
        assert runner.invoke(cli, ["keys", "revoke", "nobody"]).exit_code == 1
        repo = Repository(make_engine(f"sqlite:///{tmp_path / 'keys.db'}"))
        assert repo.list_api_keys()[1].revoked_at is not None and repo.count_active_api_keys() == 1
        repo.engine.dispose()
    finally:
        get_settings.cache_clear()


def recorded(repo: Repository, query_id: str) -> QueryRecordOut:
    """The query's record, read from the database: the replica writes it just after the answer has gone."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return repo.get_query(query_id)
        except NotFound:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_development_turns_authentication_on_with_the_first_key(
        api: Api, ray_session: str, tmp_path_factory: pytest.TempPathFactory, pacs: SimulatedPacs) -> None:
    """Development without an admin or query key is open (a dicom_front key alone keeps it so); the first
    such key closes every route within the cache TTL, no restart; a valid key is named even while open."""
    from ray import serve

    from serve_app.app import AppArgs, build_app

    var_dir = tmp_path_factory.mktemp("dev")
    url = f"sqlite:///{var_dir}/spanner.db"
    migrate(url)
    repo = Repository(make_engine(url))
    front, prefix, key_hash = new_key()
    repo.create_api_key("front", "dicom_front", prefix, key_hash)
    namespace = f"{ray_session}-dev"
    settings = dict(api.settings) | {"namespace": namespace, "var_dir": str(var_dir), "database_url": url,
                                     "environment": "development", "auth_enabled": True,
                                     "auth_cache_ttl_s": TTL_S}
    serve.run(build_app(AppArgs(settings=settings)), name="spanner-dev", route_prefix="/dev")
    try:
        with httpx.Client(base_url=f"{api.base_url}/dev", timeout=60.0) as http:
            assert http.get("/api/v1/spans").status_code == 200  # open: no admin or query key yet
            node = {"name": "dev-sim", "ae_title": "AUDITPACS", "host": "127.0.0.1", "port": pacs.port}
            assert http.post("/api/v1/nodes", json=node).status_code == 201
            asked = http.post("/api/v1/queries", json={"level": "PATIENT"},
                              headers={"X-API-Key": front, "X-Spanner-Calling-AE": "WS1"})
            record = recorded(repo, asked.json()["query_id"])
            assert (record.principal, record.asserted_ae) == ("front", "WS1"), asked.text
            ward, prefix, key_hash = new_key()
            repo.create_api_key("ward", "query", prefix, key_hash)
            deadline = time.monotonic() + TTL_S + 5
            refused = http.get("/api/v1/spans")
            while refused.status_code == 200 and time.monotonic() < deadline:
                time.sleep(0.1)
                refused = http.get("/api/v1/spans")
            assert refused.status_code == 401 and "API key is required" in refused.json()["detail"]
            assert http.get("/api/v1/spans", headers={"X-API-Key": ward}).status_code == 200
            assert http.get("/api/v1/spans", headers={"X-API-Key": front}).status_code == 200
            assert http.get("/api/v1/audit", headers={"X-API-Key": ward}).status_code == 403
    finally:
        serve.delete("spanner-dev")
        repo.engine.dispose()


def test_keys_create_says_when_authentication_turns_on(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'keys.db'}")
    get_settings.cache_clear()
    runner = CliRunner()
    try:
        assert runner.invoke(cli, ["db", "upgrade"]).exit_code == 0
        front = runner.invoke(cli, ["keys", "create", "front", "--role", "dicom_front"], terminal_width=300)
        assert front.exit_code == 0 and "Authentication is now ON" not in front.output
        first = runner.invoke(cli, ["keys", "create", "boss", "--role", "admin"], terminal_width=300)
        assert first.exit_code == 0 and "Authentication is now ON" in first.output
        assert "no restart needed" in first.output
        second = runner.invoke(cli, ["keys", "create", "ward", "--role", "query"], terminal_width=300)
        assert second.exit_code == 0 and "Authentication is now ON" not in second.output
    finally:
        get_settings.cache_clear()


def test_the_cli_sends_its_key(auth: AuthApp) -> None:
    runner = CliRunner()
    url = ["--url", auth.api.base_url]
    refused = runner.invoke(cli, ["nodes", "list", *url], terminal_width=200, env={"SPANNER_API_KEY": ""})
    assert refused.exit_code == 1 and "401" in refused.output and "--api-key" in refused.output
    flagged = runner.invoke(cli, ["nodes", "list", *url, "--api-key", auth.keys["ward"]], terminal_width=200)
    assert flagged.exit_code == 0 and "audit-sim" in flagged.output
    queried = runner.invoke(cli, ["query", "PATIENT", "-f", "PatientID=PAT*", *url], terminal_width=200,
                            env={"SPANNER_API_KEY": auth.keys["ward"]})
    assert queried.exit_code == 0, queried.output


def test_destinations_are_read_with_a_query_key_and_changed_only_with_an_admin_key(
        auth: AuthApp) -> None:
    body = {"name": "keyed-ws", "ae_title": "KEYEDWS", "host": "127.0.0.1", "port": 11112}
    ward = {"X-API-Key": auth.keys["ward"]}
    boss = {"X-API-Key": auth.keys["boss"]}
    with anonymous(auth) as http:
        assert http.get("/api/v1/destinations").status_code == 401
        refused = http.post("/api/v1/destinations", json=body, headers=ward)
        assert refused.status_code == 403 and "admin key" in refused.json()["detail"]
        assert http.post("/api/v1/destinations", json=body, headers=boss).status_code == 201
        try:
            listed = http.get("/api/v1/destinations", headers=ward)
            assert listed.status_code == 200 and [d["name"] for d in listed.json()] == ["keyed-ws"]
            assert http.get("/api/v1/destinations/keyed-ws", headers=ward).json()["ae_title"] == "KEYEDWS"
            put = {key: value for key, value in body.items() if key != "name"}
            for method, json in (("PUT", put), ("PATCH", {"port": 2}), ("DELETE", None)):
                answer = http.request(method, "/api/v1/destinations/keyed-ws", headers=ward, json=json)
                assert answer.status_code == 403, (method, answer.text)
            patched = http.patch("/api/v1/destinations/keyed-ws", json={"port": 11113}, headers=boss)
            assert patched.status_code == 200 and patched.json()["port"] == 11113
        finally:
            assert http.delete("/api/v1/destinations/keyed-ws", headers=boss).status_code == 204
