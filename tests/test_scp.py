"""The DICOM front: statuses against a fake API, then real clients (dcmtk, pynetdicom) and real archives."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.association import Association

from scp import translate
from scp.server import SpannerScp
from simulator.dataset import generate_fleet
from simulator.scp import SimulatedPacs, SimulatorConfig
from spanner.dicom_constants import IMPLEMENTATION_CLASS_UID
from spanner.hops import HOPS_HEADER, add_hops
from spanner.settings import load_settings
from tests.conftest import Api, require
from tests.peers.fake_api import FakeApi, Reply, span
from tests.peers.orthanc import OrthancPeer, orthanc_executable, stop_all
from tests.peers.ports import ClosedPort, free_port

VERIFICATION = translate.VERIFICATION
P_FIND, S_FIND = translate.PATIENT_ROOT_FIND, translate.STUDY_ROOT_FIND
P_MOVE, S_MOVE = translate.PATIENT_ROOT_MOVE, translate.STUDY_ROOT_MOVE
Responses = list[tuple[int, Dataset | None, Dataset | None]]
FRONT_ID = "FRONT-A"


# -- helpers ---------------------------------------------------------------------------------------------
def start_front(base_url: str, **settings: Any) -> SpannerScp:
    front = SpannerScp(load_settings(scp_port=0, scp_span_cache_ttl_s=0.1, **settings), base_url=base_url)
    front.start()
    return front


def associate(port: int, called: str = "SPANNER", calling: str = "TESTSCU") -> Association:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for context in (VERIFICATION, P_FIND, S_FIND, P_MOVE, S_MOVE):
        ae.add_requested_context(context)
    return ae.associate("127.0.0.1", port, ae_title=called)


def rejection(assoc: Association) -> tuple[int, int, int]:
    assert assoc.is_rejected, "the association should have been rejected"
    rj = assoc.acceptor.primitive
    assert rj is not None
    return int(rj.result or 0), int(rj.result_source or 0), int(rj.diagnostic or 0)


def identifier(level: str | None, **keys: Any) -> Dataset:
    ds = Dataset()
    if level is not None:
        ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def find(port: int, ds: Dataset, model: str = S_FIND, called: str = "SPANNER") -> Responses:
    assoc = associate(port, called)
    assert assoc.is_established
    try:
        return [(int(st.Status), st, ident) for st, ident in assoc.send_c_find(ds, model)]
    finally:
        assoc.release()


def move(port: int, ds: Dataset, destination: str = "DEST", model: str = S_MOVE) -> Responses:
    assoc = associate(port)
    assert assoc.is_established
    try:
        return [(int(st.Status), st, ident) for st, ident in assoc.send_c_move(ds, destination, model)]
    finally:
        assoc.release()


def final(responses: Responses) -> tuple[int, Dataset]:
    code, st, _ = responses[-1]
    assert st is not None
    return code, st


def match(patient_id: str, name: str = "Smith^Ann", **extra: Any) -> dict[str, Any]:
    ds = Dataset()
    ds.PatientID = patient_id
    ds.PatientName = name
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    return {"dataset": ds.to_json_dict(), "nodes": ["a"]}


def answer(matches: list[dict[str, Any]], status: str = "success", total: int | None = None) -> Reply:
    body = {"query_id": "q1", "status": status, "total": len(matches) if total is None else total,
            "matches": matches, "nodes": [{"node": "a", "status": "ok"}, {"node": "b", "status": "timeout"}]}
    return Reply(body=body)


@pytest.fixture(scope="module")
def fake_api() -> Iterator[FakeApi]:
    api = FakeApi().start()
    yield api
    api.stop()


@pytest.fixture(scope="module")
def fake_front(fake_api: FakeApi) -> Iterator[SpannerScp]:
    scp = start_front(fake_api.base_url, instance_id=FRONT_ID)
    yield scp
    scp.stop()


@pytest.fixture
def fake(fake_api: FakeApi, fake_front: SpannerScp) -> FakeApi:
    """The module's fake API, reset to two spans and empty answers (the front forgets its span table)."""
    fresh = FakeApi(spans=[span("all", "SPANNER"), span("ward", "WARD", allowed=["GOODSCU"])])
    fake_api.spans, fake_api.on_query, fake_api.on_retrieval = fresh.spans, fresh.on_query, fresh.on_retrieval
    fake_api.requests.clear()
    fake_api.headers.clear()
    fake_api.disconnects.clear()
    assert fake_front.spans is not None
    fake_front.spans.invalidate()
    return fake_api


@pytest.fixture
def front(fake: FakeApi, fake_front: SpannerScp) -> SpannerScp:
    return fake_front


# -- association -----------------------------------------------------------------------------------------
def test_echo_and_called_ae_title_selects_the_span(fake: FakeApi, front: SpannerScp) -> None:
    assoc = associate(front.port)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    assert rejection(associate(front.port, called="NOSUCHSPAN")) == (0x01, 0x01, 0x07)


def test_calling_ae_title_must_be_allowed_by_the_span(fake: FakeApi, front: SpannerScp) -> None:
    assert rejection(associate(front.port, called="WARD", calling="BADSCU")) == (0x01, 0x01, 0x03)
    good = associate(front.port, called="WARD", calling="GOODSCU")
    assert good.is_established
    good.release()


def test_span_table_follows_the_api_after_its_ttl(fake: FakeApi, front: SpannerScp) -> None:
    assert associate(front.port, called="NEWSPAN").is_rejected
    fake.spans.append(span("new", "NEWSPAN"))
    time.sleep(0.15)
    assoc = associate(front.port, called="NEWSPAN")
    assert assoc.is_established
    assoc.release()


def test_unreachable_api_rejects_as_transient_at_once() -> None:
    down = ClosedPort()
    scp = start_front(f"http://127.0.0.1:{down.port}")
    try:
        started = time.monotonic()
        assert rejection(associate(scp.port)) == (0x02, 0x03, 0x02)
        assert time.monotonic() - started < 2.0
    finally:
        scp.stop()
        down.release()


# -- C-FIND ----------------------------------------------------------------------------------------------
def test_find_forwards_filters_and_return_keys_and_answers_requested_keys(
    fake: FakeApi, front: SpannerScp
) -> None:
    fake.on_query = lambda body: answer([match("P1", "Müller^Jörg", PatientSex="M", StudyDate="20200101")])
    ds = identifier("PATIENT", PatientName="Mü*", PatientID="", PatientBirthDate="")
    ds.SpecificCharacterSet = "ISO_IR 100"
    responses = find(front.port, ds, model=P_FIND)
    assert [code for code, _, _ in responses] == [0xFF00, 0x0000]
    body = fake.posted("/api/v1/queries")[0]
    assert body == {"level": "PATIENT", "span": "all", "filters": {"PatientName": "Mü*"},
                    "return_keys": ["PatientID", "PatientBirthDate"], "limit": 1000}
    found = responses[0][2]
    assert found is not None
    assert str(found.PatientName) == "Müller^Jörg" and found.PatientID == "P1"
    assert found.SpecificCharacterSet == "ISO_IR 192"
    assert found.QueryRetrieveLevel == "PATIENT" and found.RetrieveAETitle == "SPANNER"
    assert "PatientBirthDate" in found and found.PatientBirthDate == ""  # asked, unknown: zero length
    assert "PatientSex" not in found and "StudyDate" not in found  # not asked: not sent


def test_uid_lists_go_as_json_lists(fake: FakeApi, front: SpannerScp) -> None:
    find(front.port, identifier("SERIES", StudyInstanceUID="1.2", SeriesInstanceUID=["1.2.3", "1.2.4"]))
    assert fake.posted("/api/v1/queries")[0]["filters"] == {
        "StudyInstanceUID": "1.2", "SeriesInstanceUID": ["1.2.3", "1.2.4"]
    }


@pytest.mark.parametrize(
    ("ds", "model", "says"),
    [
        (identifier(None, PatientID="P1"), S_FIND, "QueryRetrieveLevel"),
        (identifier("WARD"), S_FIND, "WARD"),
        (identifier("PATIENT", PatientID=""), S_FIND, "study root"),
    ],
    ids=["no-level", "unknown-level", "level-not-in-model"],
)
def test_invalid_identifier_is_a900_without_asking_the_api(
    fake: FakeApi, front: SpannerScp, ds: Dataset, model: str, says: str
) -> None:
    code, st = final(find(front.port, ds, model))
    assert code == 0xA900 and says in st.ErrorComment
    assert fake.posted("/api/v1/queries") == []


@pytest.mark.parametrize(
    ("reply", "code", "says"),
    [
        (Reply(422, {"detail": "StudyDate: '2024' is not a date; write YYYYMMDD"}), 0xA900, "StudyDate"),
        (Reply(502, {"status": "failed", "reason": "no node answered ok", "matches": []}), 0xC002, "no node"),
        (Reply(500, {"detail": "boom"}), 0xC003, "500"),
        (Reply(0), 0xC001, "unreachable"),
    ],
    ids=["422", "502", "500", "connection-dropped"],
)
def test_api_errors_become_find_failures_with_a_comment(
    fake: FakeApi, front: SpannerScp, reply: Reply, code: int, says: str
) -> None:
    fake.on_query = lambda body: reply
    responses = find(front.port, identifier("STUDY", StudyDate="2024"))
    got, st = final(responses)
    assert (len(responses), got) == (1, code)
    assert says in st.ErrorComment and len(st.ErrorComment) <= 64


def test_partial_answer_streams_what_it_has_and_succeeds(fake: FakeApi, front: SpannerScp) -> None:
    fake.on_query = lambda body: answer([match("P1"), match("P2")], status="partial")
    assert [c for c, _, _ in find(front.port, identifier("STUDY", PatientID=""))] == [0xFF00, 0xFF00, 0x0000]


def test_answer_cut_at_max_results_ends_with_b001(fake: FakeApi, front: SpannerScp) -> None:
    fake.spans[0] = span("all", "SPANNER", max_results=2)
    fake.on_query = lambda body: answer([match("P1"), match("P2")], total=5)
    codes = [c for c, _, _ in find(front.port, identifier("STUDY", PatientID=""))]
    assert codes == [0xFF00, 0xFF00, 0x0000]
    assert fake.posted("/api/v1/queries")[0]["limit"] == 2


def cancel_after(assoc: Association, seconds: float, model: str) -> threading.Timer:
    timer = threading.Timer(seconds, assoc.send_c_cancel, (1, None, model))
    timer.start()
    return timer


def test_cancel_while_the_query_runs_closes_the_http_request(fake: FakeApi, front: SpannerScp) -> None:
    fake.on_query = lambda body: Reply(body={"status": "success", "total": 0, "matches": []}, delay_s=10)
    assoc = associate(front.port)
    started = time.monotonic()
    cancel_after(assoc, 0.3, S_FIND)
    codes = [int(st.Status) for st, _ in assoc.send_c_find(identifier("STUDY"), S_FIND, msg_id=1)]
    took = time.monotonic() - started
    assoc.release()
    assert codes == [0xFE00] and took < 1.5
    deadline = time.monotonic() + 2
    while not fake.disconnects and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fake.disconnects == ["/api/v1/queries"], "the HTTP request should have been closed"


def test_cancel_stops_the_pending_stream(fake: FakeApi, front: SpannerScp) -> None:
    """findscu --cancel 1 sends C-CANCEL after the first pending response; the stream stops soon after."""
    require(shutil.which("findscu") is not None, "dcmtk (findscu)")
    many = [match(f"P{i:05d}") for i in range(3000)]
    fake.on_query = lambda body: answer(many)
    run = dcmtk("findscu", "-v", "-S", "--cancel", "1", "-aec", "SPANNER", "-k", "QueryRetrieveLevel=STUDY",
                "-k", "PatientID", "127.0.0.1", str(front.port))
    assert run.returncode == 0, run.stderr
    output = run.stderr + run.stdout
    pending = len(re.findall(r"Find Response: \d+ \(Pending\)", output))
    # Paced pending responses: the burst and a few milliseconds' worth go out before the C-CANCEL is read.
    assert "Received Final Find Response (Cancel" in output and 1 <= pending < 200, (pending, output[-300:])


# -- loop protection -------------------------------------------------------------------------------------
def spanner_find(port: int, ds: Dataset, from_spanner: bool = True) -> Responses:
    """A C-FIND from a requestor announcing dicom-spanner's Implementation Class UID (or not)."""
    ae = AE(ae_title="OTHERSPAN")
    if from_spanner:
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.add_requested_context(S_FIND)
    assoc = ae.associate("127.0.0.1", port, ae_title="SPANNER")
    assert assoc.is_established
    try:
        return [(int(st.Status), st, ident) for st, ident in assoc.send_c_find(ds, S_FIND)]
    finally:
        assoc.release()


def with_hops(chain: list[str]) -> Dataset:
    ds = identifier("STUDY", PatientID="P1", StudyInstanceUID="")
    add_hops(ds, chain)
    return ds


def test_a_query_that_already_passed_this_front_is_refused(fake: FakeApi, front: SpannerScp) -> None:
    code, st = final(spanner_find(front.port, with_hops(["SPANNER-B", FRONT_ID])))
    assert code == translate.LOOP_DETECTED and "loop" in st.ErrorComment and FRONT_ID in st.ErrorComment
    assert fake.posted("/api/v1/queries") == []


def test_the_hop_chain_of_another_spanner_goes_to_the_api(fake: FakeApi, front: SpannerScp) -> None:
    assert final(spanner_find(front.port, with_hops(["SPANNER-B", "SPANNER-C"])))[0] == 0x0000
    assert fake.posted("/api/v1/queries")[0]["filters"] == {"PatientID": "P1"}  # the private block is not
    assert fake.headers[0][HOPS_HEADER.lower()] == "SPANNER-B,SPANNER-C"


def test_a_move_that_already_passed_this_front_is_refused(fake: FakeApi, front: SpannerScp) -> None:
    ae = AE(ae_title="OTHERSPAN")
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.add_requested_context(S_MOVE)
    assoc = ae.associate("127.0.0.1", front.port, ae_title="SPANNER")
    ds = identifier("STUDY", StudyInstanceUID="1.2")
    add_hops(ds, [FRONT_ID])
    statuses = [st for st, _ in assoc.send_c_move(ds, "DEST", S_MOVE)]
    assoc.release()
    assert int(statuses[-1].Status) == translate.LOOP_DETECTED and "loop" in statuses[-1].ErrorComment
    assert fake.posted("/api/v1/retrievals") == []


def test_a_hop_chain_from_a_client_that_is_no_spanner_is_ignored(fake: FakeApi, front: SpannerScp) -> None:
    assert final(spanner_find(front.port, with_hops([FRONT_ID]), from_spanner=False))[0] == 0x0000
    assert HOPS_HEADER.lower() not in fake.headers[0]


# -- C-MOVE ----------------------------------------------------------------------------------------------
def progress(remaining: int, completed: int, failed: int = 0, warning: int = 0) -> dict[str, Any]:
    return {"event": "progress", "remaining": remaining, "completed": completed, "failed": failed,
            "warning": warning}


def result(dimse_status: int, completed: int, failed: int = 0, uids: list[str] | None = None,
           error: str | None = None) -> dict[str, Any]:
    status = {0: "success", 0xB000: "warning"}.get(dimse_status, "failed")
    return {"event": "result", "retrieval_id": "r1", "status": status, "dimse_status": dimse_status,
            "remaining": 0, "completed": completed, "failed": failed, "warning": 0,
            "failed_sop_instance_uids": uids or [], "error": error}


def counts(st: Dataset) -> tuple[int | None, ...]:
    kinds = ("Remaining", "Completed", "Failed", "Warning")
    return tuple(st.get(f"NumberOf{kind}Suboperations") for kind in kinds)


def test_move_relays_progress_then_success(fake: FakeApi, front: SpannerScp) -> None:
    fake.on_retrieval = lambda body: Reply(lines=[progress(2, 1), progress(1, 2), result(0, 3)])
    responses = move(front.port, identifier("SERIES", StudyInstanceUID="1.2", SeriesInstanceUID="1.2.3"))
    assert [c for c, _, _ in responses] == [0xFF00, 0xFF00, 0x0000]
    assert counts(responses[0][1]) == (2, 1, 0, 0)  # type: ignore[arg-type]
    assert counts(final(responses)[1])[1:] == (3, 0, 0)
    assert fake.posted("/api/v1/retrievals") == [{
        "level": "SERIES", "uids": {"StudyInstanceUID": "1.2", "SeriesInstanceUID": "1.2.3"},
        "destination_ae": "DEST", "span": "all",
    }]


def test_move_with_failures_ends_b000_with_the_failed_list(fake: FakeApi, front: SpannerScp) -> None:
    fake.on_retrieval = lambda body: Reply(lines=[result(0xB000, 2, failed=1, uids=["1.2.3.4.5"])])
    responses = move(front.port, identifier("IMAGE", StudyInstanceUID="1.2", SeriesInstanceUID="1.2.3",
                                           SOPInstanceUID=["1.2.3.4.5", "1.2.3.4.6"]))
    code, st = final(responses)
    assert code == 0xB000 and counts(st)[1:] == (2, 1, 0)
    failed_list = responses[-1][2]
    assert failed_list is not None and failed_list.FailedSOPInstanceUIDList == "1.2.3.4.5"  # VM 1: a str
    assert fake.posted("/api/v1/retrievals")[0]["uids"]["SOPInstanceUID"] == ["1.2.3.4.5", "1.2.3.4.6"]


def test_move_destination_unknown_is_a801(fake: FakeApi, front: SpannerScp) -> None:
    fake.on_retrieval = lambda body: Reply(lines=[result(0xA801, 0, error="no holder knows NOWHERE")])
    code, st = final(move(front.port, identifier("STUDY", StudyInstanceUID="1.2"), destination="NOWHERE"))
    assert code == 0xA801 and "NOWHERE" in st.ErrorComment


@pytest.mark.parametrize(
    ("ds", "reply", "code"),
    [
        (identifier("STUDY"), None, 0xA900),
        (identifier("SERIES", StudyInstanceUID="1.2"), None, 0xA900),
        (identifier("PATIENT", PatientID="P1"), None, 0xC004),
        (identifier("STUDY", StudyInstanceUID="1.2"), Reply(422, {"detail": "not a UID"}), 0xA900),
        (identifier("STUDY", StudyInstanceUID="1.2"), Reply(lines=[progress(1, 0)]), 0xC003),
        (identifier("STUDY", StudyInstanceUID="1.2"), Reply(0), 0xC001),
    ],
    ids=["no-uid", "no-series-uid", "patient-level", "422", "no-result-line", "connection-dropped"],
)
def test_move_failures(fake: FakeApi, front: SpannerScp, ds: Dataset, reply: Reply | None, code: int) -> None:
    if reply is not None:
        fake.on_retrieval = lambda body: reply
    got, st = final(move(front.port, ds, model=P_MOVE))
    assert got == code and st.ErrorComment


def test_move_cancel_closes_the_stream_and_reports_counts_so_far(fake: FakeApi, front: SpannerScp) -> None:
    lines = [progress(10 - i, i) for i in range(1, 10)] + [result(0, 10)]
    fake.on_retrieval = lambda body: Reply(lines=lines, delay_s=0.2)
    assoc = associate(front.port)
    responses = assoc.send_c_move(identifier("STUDY", StudyInstanceUID="1.2"), "DEST", S_MOVE, msg_id=1)
    seen = [next(responses)[0], next(responses)[0]]
    assoc.send_c_cancel(1, None, S_MOVE)
    seen += [st for st, _ in responses]
    assoc.release()
    assert int(seen[-1].Status) == 0xFE00 and len(seen) < 6
    assert counts(seen[-1])[:2] in ((8, 2), (7, 3))
    deadline = time.monotonic() + 2
    while not fake.disconnects and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fake.disconnects == ["/api/v1/retrievals"]


# -- real clients, real API, real archives ------------------------------------------------------------------
NODES = ("scp-a", "scp-b", "scp-c")
IDENTITY = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
            "IMAGE": "SOPInstanceUID"}
ORTHANCS = "ORTHANCS_SCP"


@pytest.fixture(scope="module")
def archives(api: Api) -> Iterator[dict[str, Any]]:
    """Three Orthancs; the middle one answers in ISO_IR 100 (Latin1), the others in ISO_IR 192."""
    require(orthanc_executable() is not None, "Debian's orthanc")
    require(shutil.which("findscu") is not None, "dcmtk (findscu)")
    stored = dict(zip(NODES, generate_fleet(seed=11, nodes=3, patients=8), strict=True))
    peers = [OrthancPeer(aet=f"SCPORTH{i}", default_encoding=None if i == 1 else "Utf8") for i in range(3)]
    try:
        for i, (peer, name) in enumerate(zip(peers, NODES, strict=True)):
            peer.start()
            peer.upload_datasets(stored[name])
            api.add_node(name, peer.dicom_port, ae_title=peer.aet, priority=10 * (i + 1))
        api.add_span("scp-orthancs", list(NODES), ae_title=ORTHANCS)
        yield {"stored": stored, "peers": peers}
    finally:
        api.http.delete("/api/v1/spans/scp-orthancs")
        for name in NODES:
            api.http.delete(f"/api/v1/nodes/{name}")
        stop_all(peers, graceful=False)


@pytest.fixture(scope="module")
def real_front(api: Api) -> Iterator[SpannerScp]:
    scp = start_front(api.base_url)
    yield scp
    scp.stop()


def dcmtk(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                          env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"})


def test_echoscu(real_front: SpannerScp) -> None:
    require(shutil.which("echoscu") is not None, "dcmtk (echoscu)")
    ok = dcmtk("echoscu", "-aet", "DCMTK", "-aec", "SPANNER", "127.0.0.1", str(real_front.port))
    assert ok.returncode == 0, ok.stderr
    refused = dcmtk("echoscu", "-aec", "NOSUCHSPAN", "127.0.0.1", str(real_front.port))
    assert refused.returncode != 0 and "Called AE Title Not Recognized" in refused.stderr, refused.stderr


def test_a_span_admits_only_its_allowed_callers(
    api: Api, archives: dict[str, Any], real_front: SpannerScp
) -> None:
    api.add_span("scp-ward", list(NODES), ae_title="SCP_WARD", allowed_calling_aets=["GOODSCU"])
    try:
        allowed = dcmtk("echoscu", "-aet", "GOODSCU", "-aec", "SCP_WARD", "127.0.0.1", str(real_front.port))
        assert allowed.returncode == 0, allowed.stderr
        refused = dcmtk("echoscu", "-aet", "BADSCU", "-aec", "SCP_WARD", "127.0.0.1", str(real_front.port))
        assert refused.returncode != 0 and "Calling AE Title Not Recognized" in refused.stderr, refused.stderr
    finally:
        api.http.delete("/api/v1/spans/scp-ward")


@pytest.mark.parametrize("level", ["PATIENT", "STUDY", "SERIES", "IMAGE"])
def test_findscu_answer_is_the_union_of_what_was_stored(
    archives: dict[str, Any], real_front: SpannerScp, tmp_path: Path, level: str
) -> None:
    key = IDENTITY[level]
    model = "-P" if level == "PATIENT" else "-S"
    run = dcmtk("findscu", model, "-aet", "DCMTK", "-aec", ORTHANCS, "-X", "-od", str(tmp_path),
                "-k", f"QueryRetrieveLevel={level}", "-k", key, "-k", "PatientName",
                "127.0.0.1", str(real_front.port))
    assert run.returncode == 0, run.stderr
    answers = [dcmread(path) for path in sorted(tmp_path.glob("rsp*.dcm"))]
    everything = [ds for stored in archives["stored"].values() for ds in stored]
    expected = {str(ds[key].value) for ds in everything}
    got = [str(ds[key].value) for ds in answers]
    assert sorted(got) == sorted(expected)
    names = {str(ds.PatientID): str(ds.PatientName) for ds in everything}
    for ds in answers:
        assert ds.SpecificCharacterSet == "ISO_IR 192" and ds.RetrieveAETitle == ORTHANCS
        if level == "PATIENT":
            assert str(ds.PatientName) == names[str(ds.PatientID)]


@pytest.mark.parametrize(("charset", "prefix"), [("ISO_IR 100", "Müller"), ("ISO_IR 192", "Øster")])
def test_non_ascii_names_reach_the_client(
    archives: dict[str, Any], real_front: SpannerScp, charset: str, prefix: str
) -> None:
    """Asked in Latin-1 or UTF-8, answered in UTF-8, from archives that answer ISO_IR 100 and ISO_IR 192."""
    ds = identifier("STUDY", PatientName=f"{prefix}*", StudyInstanceUID="")
    ds.SpecificCharacterSet = charset
    responses = find(real_front.port, ds, called=ORTHANCS)
    assert responses[-1][0] == 0x0000
    expected = {str(ds.StudyInstanceUID): str(ds.PatientName) for stored in archives["stored"].values()
                for ds in stored if str(ds.PatientName).startswith(prefix)}
    answers = [i for c, _, i in responses if i is not None and c == 0xFF00]
    got = {str(i.StudyInstanceUID): str(i.PatientName) for i in answers}
    assert expected and got == expected


def test_a_value_the_api_rejects_is_a900_naming_the_key(real_front: SpannerScp) -> None:
    code, st = final(find(real_front.port, identifier("STUDY", StudyDate="20241399")))
    assert code == 0xA900 and "StudyDate" in st.ErrorComment


@pytest.fixture(scope="module")
def slow_archive(api: Api) -> Iterator[SimulatedPacs]:
    pacs = SimulatedPacs(SimulatorConfig(ae_title="SCPSLOW", fault="slow", slow_ms=8000),
                         generate_fleet(3, 1, 3)[0])
    pacs.start()
    api.add_node("scp-slow", pacs.port, ae_title="SCPSLOW")
    api.add_span("scp-slow", ["scp-slow"], ae_title="SCP_SLOW", timeout_s=10)
    yield pacs
    api.http.delete("/api/v1/spans/scp-slow")
    api.http.delete("/api/v1/nodes/scp-slow")
    pacs.stop()


def test_cancel_reaches_the_archive(slow_archive: SimulatedPacs, real_front: SpannerScp) -> None:
    """C-CANCEL -> the front closes its HTTP request -> Serve cancels the query -> the actor C-CANCELs."""
    before = slow_archive.counters
    assoc = associate(real_front.port, called="SCP_SLOW")
    started = time.monotonic()
    cancel_after(assoc, 1.0, S_FIND)
    codes = [int(st.Status) for st, _ in assoc.send_c_find(identifier("STUDY"), S_FIND, msg_id=1)]
    assoc.release()
    assert codes == [0xFE00] and time.monotonic() - started < 2.5
    deadline = time.monotonic() + 5
    while slow_archive.counters.cancels == before.cancels and time.monotonic() < deadline:
        time.sleep(0.02)
    assert slow_archive.counters.finds > before.finds
    assert slow_archive.counters.cancels > before.cancels, "the archive never saw a C-CANCEL"
    assert time.monotonic() - started < 6.0, "the C-CANCEL came from the span deadline, not from the client"


# -- C-MOVE end to end -----------------------------------------------------------------------------------
def test_movescu_brings_a_study_from_every_archive_that_holds_it(
    api: Api, archives: dict[str, Any], real_front: SpannerScp, tmp_path: Path
) -> None:
    require(shutil.which("movescu") is not None and shutil.which("storescp") is not None, "dcmtk (movescu)")
    stored: dict[str, list[Dataset]] = archives["stored"]
    holders: dict[str, set[str]] = defaultdict(set)
    for node, instances in stored.items():
        for ds in instances:
            holders[str(ds.StudyInstanceUID)].add(node)
    study = max(holders, key=lambda uid: len(holders[uid]))  # a study split or mirrored across archives
    expected = {str(ds.SOPInstanceUID) for instances in stored.values() for ds in instances
                if ds.StudyInstanceUID == study}
    port = free_port()
    for peer in archives["peers"]:
        peer.add_modality("SCPDEST", "SCPDEST", port)
    receiver = subprocess.Popen(
        ["storescp", "-aet", "SCPDEST", "-od", str(tmp_path), "--accept-all", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        run = dcmtk("movescu", "-S", "-aet", "DCMTK", "-aec", ORTHANCS, "-aem", "SCPDEST",
                    "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
                    "127.0.0.1", str(real_front.port), timeout=60)
        assert run.returncode == 0, run.stderr
        got = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in tmp_path.iterdir()}
        assert got == expected
    finally:
        receiver.terminate()
        receiver.wait(5)
