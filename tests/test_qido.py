"""The DICOMweb front's QIDO-RS over real Orthanc archives: spans, warnings, failures, bad input, the audit
channel, API keys and CORS (answers equal to a reference server: tests/test_qido_conformance.py)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from serve_app.usecases.qido import FUZZY_DECLINED, MORE_RESULTS
from spanner.keys import new_key
from spanner.storage import Repository, make_engine
from tests.conftest import Api, migrate
from tests.peers.dicomweb_data import MIRRORED_STUDY, NODES, SPAN, SPLIT_STUDY, Universe, universe_of
from tests.peers.ports import ClosedPort

JSON = {"Accept": "application/dicom+json", "Cache-Control": "no-cache"}
ROOT = f"/dicomweb/spans/{SPAN}"
VIEWER = "http://viewer.test:3000"


@pytest.fixture(scope="module")
def universe(api: Api) -> Iterator[Universe]:
    yield from universe_of(api)


def get(api: Api, path: str, **headers: str) -> httpx.Response:
    return api.http.get(path, headers={**JSON, **headers})


def uids(response: httpx.Response, tag: str = "0020000D") -> list[str]:
    return sorted(ds[tag]["Value"][0] for ds in response.json())


def warnings(response: httpx.Response) -> list[str]:
    return response.headers.get_list("warning")


def test_span_all_and_a_named_span_answer(api: Api, universe: Universe) -> None:
    for path in ("/dicomweb/studies?PatientID=PAT-1", f"{ROOT}/studies?PatientID=PAT-1"):
        response = get(api, path)
        assert response.status_code == 200, response.text
        assert uids(response) == sorted([SPLIT_STUDY, MIRRORED_STUDY])
    split = next(ds for ds in get(api, "/dicomweb/studies?PatientID=PAT-1").json()
                 if ds["0020000D"]["Value"] == [SPLIT_STUDY])
    assert sorted(split["00080061"]["Value"]) == ["CT", "MR"]  # the split study once, both modalities
    assert split["00081190"]["Value"] == [f"{api.base_url}/dicomweb/studies/{SPLIT_STUDY}"]
    unknown = get(api, "/dicomweb/spans/nope/studies")
    assert unknown.status_code == 404 and "nope" in unknown.json()["detail"]


def test_ohif_study_list_request(api: Api, universe: Universe) -> None:
    """What OHIF 3 asks for its study list, with its patient-ID-by-tag and wildcard habits."""
    response = get(api, f"{ROOT}/studies?limit=101&offset=0&fuzzymatching=false&includefield=00081030,"
                        "00080060,00080090,00100030&00100020=PAT-2&StudyDate=20240101-20241231"
                        "&StudyDescription=*e*")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/dicom+json")
    found = response.json()
    assert [ds["00081030"]["Value"] for ds in sorted(found, key=lambda d: d["0020000D"]["Value"])] == [
        ["Head"], ["Chest"]]
    assert warnings(response) == []


def test_split_study_counts_hold_from_the_cache_too(api: Api, universe: Universe) -> None:
    """The split study's counts are counted again over its series (2 series, 5 instances; each archive
    alone says 1 and 3 or 2); a second search answered from the query cache says the same."""
    path = f"{ROOT}/studies?StudyInstanceUID={SPLIT_STUDY}"
    answers = [api.http.get(path, headers={"Accept": "application/dicom+json"}).json()[0] for _ in range(2)]
    for answer in answers:
        assert answer["00201206"]["Value"] == [2] and answer["00201208"]["Value"] == [5]
    assert answers[0] == answers[1]
    records = api.http.get("/api/v1/queries", params={"limit": 10}).json()
    assert "hit" in {r["cache"] for r in records if r["span"] == SPAN}


def test_empty_answer_is_200_and_an_empty_list(api: Api, universe: Universe) -> None:
    response = get(api, f"{ROOT}/studies?PatientID=NOBODY")
    assert response.status_code == 200 and response.json() == []


def test_uid_lists_by_comma_or_backslash(api: Api, universe: Universe) -> None:
    comma = get(api, f"{ROOT}/studies?StudyInstanceUID={SPLIT_STUDY},{MIRRORED_STUDY}")
    backslash = get(api, f"{ROOT}/studies?StudyInstanceUID={SPLIT_STUDY}\\{MIRRORED_STUDY}")
    assert uids(comma) == uids(backslash) == sorted([SPLIT_STUDY, MIRRORED_STUDY])


def test_fuzzymatching_is_declined_with_the_standard_warning(api: Api, universe: Universe) -> None:
    response = get(api, f"{ROOT}/studies?PatientName=doe*&fuzzymatching=true")
    assert response.status_code == 200
    assert warnings(response) == [f'299 {httpx.URL(api.base_url).netloc.decode()} "{FUZZY_DECLINED}"']


def test_includefield_all_and_repeated(api: Api, universe: Universe) -> None:
    every = get(api, f"{ROOT}/studies?includefield=all&StudyInstanceUID={SPLIT_STUDY}").json()[0]
    assert every["00081030"]["Value"] == ["Thorax"] and "00080080" in every  # InstitutionName asked, empty
    repeated = get(api, f"{ROOT}/series?includefield=SeriesDate&includefield=0008103E,00080021"
                        f"&StudyInstanceUID={SPLIT_STUDY}").json()
    assert sorted(ds["0008103E"]["Value"][0] for ds in repeated) == ["Thorax T1", "Thorax axial"]


def test_huge_limit_is_capped_by_the_span_and_says_so(api: Api, universe: Universe) -> None:
    api.add_span("dw-small", list(NODES), ae_title="DWSMALL", max_results=2)
    try:
        response = get(api, "/dicomweb/spans/dw-small/instances?limit=1000000")
        assert response.status_code == 200
        assert len(response.json()) == 2
        assert any(MORE_RESULTS in w for w in warnings(response))
        rest = get(api, "/dicomweb/spans/dw-small/instances?offset=2&limit=2")
        assert len(rest.json()) == 2 and not set(uids(rest, "00080018")) & set(uids(response, "00080018"))
    finally:
        api.http.delete("/api/v1/spans/dw-small")


def test_an_archive_down_is_a_partial_answer_with_a_warning(api: Api, universe: Universe) -> None:
    closed = ClosedPort()
    api.add_node("dw-down", closed.port, ae_title="DOWN", connect_timeout_s=1.0)
    api.add_span("dw-partial", [*NODES, "dw-down"], ae_title="DWPART")
    api.add_span("dw-strict", [*NODES, "dw-down"], ae_title="DWSTRICT", failure_strategy="fail_fast")
    try:
        partial = get(api, "/dicomweb/spans/dw-partial/studies?PatientID=PAT-1")
        assert partial.status_code == 200
        assert uids(partial) == sorted([SPLIT_STUDY, MIRRORED_STUDY])
        assert [w for w in warnings(partial) if "dw-down" in w]
        assert all(w.startswith("299 ") for w in warnings(partial))
        assert "archive dw-down: refused" in warnings(partial)[0]
        failed = get(api, "/dicomweb/spans/dw-strict/studies?PatientID=PAT-1")
        assert failed.status_code == 502
        assert "fail_fast" in failed.json()["detail"]
        assert {n["node"]: n["status"] for n in failed.json()["nodes"]}["dw-down"] == "refused"
    finally:
        for span in ("dw-partial", "dw-strict"):
            api.http.delete(f"/api/v1/spans/{span}")
        api.http.delete("/api/v1/nodes/dw-down")
        closed.release()


@pytest.mark.parametrize(("path", "parameter"), [
    ("/studies?PatientNmae=Doe", "PatientNmae"),
    ("/studies?includefield=NoSuchThing", "includefield"),
    ("/studies?includefield=PixelData", "includefield"),
    ("/studies?limit=ten", "limit"),
    ("/studies?limit=0", "limit"),
    ("/studies?offset=-1", "offset"),
    ("/studies?fuzzymatching=maybe", "fuzzymatching"),
    ("/studies?StudyDate=2024", "StudyDate"),
    ("/studies?StudyDate=20240230", "StudyDate"),
    ("/studies?StudyInstanceUID=1.2.x", "StudyInstanceUID"),
    ("/studies?PatientID=A&00100020=B", "00100020"),
    ("/studies/1.2.abc/series", "study"),
    ("/studies/1.2.3/series/01.2/instances", "series"),
    ("/studies/1.2.3/series?StudyInstanceUID=1.2.3", "StudyInstanceUID"),
    ("/studies?0009FFFF=1", "0009FFFF"),
])
def test_bad_parameters_are_400_naming_the_parameter(api: Api, universe: Universe, path: str,
                                                     parameter: str) -> None:
    response = get(api, ROOT + path)
    assert response.status_code == 400, response.text
    assert response.json()["detail"].startswith(f"{parameter}: "), response.json()


def test_an_accept_it_cannot_satisfy_is_406(api: Api, universe: Universe) -> None:
    assert get(api, f"{ROOT}/studies", Accept="image/jpeg").status_code == 406
    assert get(api, f"{ROOT}/studies", Accept="application/dicom+json;q=0, text/html").status_code == 406
    for accept in ("application/json", "*/*", "application/*", "text/html, application/dicom+json;q=0.5"):
        assert get(api, f"{ROOT}/studies?PatientID=PAT-3", Accept=accept).status_code == 200, accept


def test_the_audit_trail_records_channel_dicomweb(api: Api, universe: Universe) -> None:
    get(api, f"{ROOT}/studies?PatientID=PAT-3")
    records = api.http.get("/api/v1/queries", params={"limit": 20}).json()
    mine = [r for r in records if r["span"] == SPAN and r["patient_id"] == "PAT-3"]
    assert mine and mine[0]["channel"] == "dicomweb"


# -- API keys and CORS: an app of its own, keys on, one allowed origin -----------------------------------
@dataclass
class WebApp:
    base_url: str
    keys: dict[str, str]


@pytest.fixture(scope="module")
def web(api: Api, ray_session: str, tmp_path_factory: pytest.TempPathFactory,
        universe: Universe) -> Iterator[WebApp]:
    from ray import serve

    from serve_app.app import AppArgs, build_app

    var_dir = tmp_path_factory.mktemp("web")
    url = f"sqlite:///{var_dir}/spanner.db"
    migrate(url)
    repo = Repository(make_engine(url))
    keys: dict[str, str] = {}
    for name, role in (("boss", "admin"), ("viewer", "query")):
        key, prefix, key_hash = new_key()
        repo.create_api_key(name, role, prefix, key_hash)
        keys[name] = key
    repo.engine.dispose()
    settings = dict(api.settings) | {"namespace": f"{ray_session}-web", "var_dir": str(var_dir),
                                     "database_url": url, "auth_enabled": True, "cors_origins": VIEWER}
    serve.run(build_app(AppArgs(settings=settings)), name="spanner-web", route_prefix="/web")
    app = WebApp(f"{api.base_url}/web", keys)
    with httpx.Client(base_url=app.base_url, timeout=60,
                      headers={"Authorization": f"Bearer {keys['boss']}"}) as admin:
        for name, peer in universe.archives.items():
            body = {"name": name, "ae_title": peer.aet, "host": "127.0.0.1", "port": peer.dicom_port}
            assert admin.post("/api/v1/nodes", json=body).status_code == 201
    yield app
    serve.delete("spanner-web")


def test_keys_are_required_on_the_dicomweb_front(web: WebApp) -> None:
    with httpx.Client(base_url=web.base_url, timeout=60) as http:
        missing = http.get("/dicomweb/studies")
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        found = http.get("/dicomweb/studies?PatientID=PAT-1",
                         headers={"Authorization": f"Bearer {web.keys['viewer']}"})
        assert found.status_code == 200 and len(found.json()) == 2


def test_cors_preflight_and_answers_for_the_allowed_origin(web: WebApp) -> None:
    with httpx.Client(base_url=web.base_url, timeout=60) as http:
        preflight = http.options("/dicomweb/studies", headers={
            "Origin": VIEWER, "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization,accept"})
        assert preflight.status_code == 200, preflight.text
        assert preflight.headers["access-control-allow-origin"] == VIEWER
        allowed = preflight.headers["access-control-allow-headers"].lower()
        assert "authorization" in allowed and "accept" in allowed
        assert "GET" in preflight.headers["access-control-allow-methods"]
        other = http.options("/dicomweb/studies", headers={
            "Origin": "http://elsewhere.test", "Access-Control-Request-Method": "GET"})
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
        answer = http.get("/dicomweb/studies?PatientID=PAT-1&fuzzymatching=true", headers={
            "Origin": VIEWER, "Authorization": f"Bearer {web.keys['viewer']}",
            "Accept": 'multipart/related; type="application/dicom+json", application/dicom+json'})
        assert answer.status_code == 200
        assert answer.headers["access-control-allow-origin"] == VIEWER
        assert "warning" in answer.headers["access-control-expose-headers"].lower()


def test_no_cors_for_an_origin_not_allowed(api: Api, universe: Universe) -> None:
    """The session's API allows only the OHIF test's origin: any other gets no CORS headers."""
    assert api.settings["cors_origins"] != VIEWER
    preflight = api.http.options("/dicomweb/studies", headers={
        "Origin": VIEWER, "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in preflight.headers
    assert preflight.status_code == 400


def test_the_demo_fleets_simulator_answers_every_level(api: Api) -> None:
    """`make run` serves the project's simulated PACS: the README's curl lines work against them."""
    from simulator.dataset import generate_fleet
    from simulator.scp import SimulatedPacs, SimulatorConfig

    sim = SimulatedPacs(SimulatorConfig(ae_title="DWSIM"), generate_fleet(3, 1, 6)[0])
    sim.start()
    try:
        api.add_node("dw-sim", sim.port, ae_title="DWSIM")
        api.add_span("dw-sim", ["dw-sim"], ae_title="DWSIM")
        studies = get(api, "/dicomweb/spans/dw-sim/studies?PatientName=*&includefield=StudyDescription")
        assert studies.status_code == 200 and studies.json(), studies.text
        study = studies.json()[0]["0020000D"]["Value"][0]
        series = get(api, f"/dicomweb/spans/dw-sim/studies/{study}/series")
        assert series.status_code == 200 and series.json()
        assert all(ds["0020000D"]["Value"] == [study] for ds in series.json())
        instances = get(api, f"/dicomweb/spans/dw-sim/studies/{study}/instances")
        assert instances.status_code == 200 and instances.json()
        assert all(ds["00081190"]["Value"][0].startswith(f"{api.base_url}/dicomweb/spans/dw-sim/studies/")
                   for ds in instances.json())
    finally:
        api.http.delete("/api/v1/spans/dw-sim")
        api.http.delete("/api/v1/nodes/dw-sim")
        sim.stop()
