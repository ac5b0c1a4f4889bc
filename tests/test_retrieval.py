"""Retrieval through the spanner with real archives: C-MOVE from the holders, split studies, failover."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from simulator.scp import SimulatedPacs, SimulatorConfig
from tests.conftest import Api, require
from tests.peers.orthanc import OrthancPeer, make_instance, orthanc_executable, stop_all

ROOT = "1.2.826.0.1.3680043.10.999"
S1, S2, S3 = f"{ROOT}.1", f"{ROOT}.2", f"{ROOT}.3"


def instances(study: str, series: int, per_series: int) -> dict[str, list[str]]:
    """SOP instance UIDs by series UID."""
    return {
        f"{study}.{s}": [f"{study}.{s}.{i}" for i in range(1, per_series + 1)] for s in range(1, series + 1)
    }


def load(peer: OrthancPeer, study: str, series_map: dict[str, list[str]], patient: str) -> None:
    peer.upload_many(
        make_instance(patient, f"{patient}^Test", study, series, sop)
        for series, sops in series_map.items()
        for sop in sops
    )


@pytest.fixture(scope="module")
def archives(api: Api) -> Iterator[dict[str, Any]]:
    require(orthanc_executable() is not None and shutil.which("movescu") is not None, "Debian's orthanc")
    peers = {name: OrthancPeer(aet=f"MOVE_{name.upper()}", default_encoding="Utf8") for name in "abcd"}
    s1, s2, s3 = instances(S1, 2, 3), instances(S2, 3, 2), instances(S3, 1, 4)
    sim_data: list[Any] = []
    sim = None
    try:
        for peer in peers.values():
            peer.start()
        for peer in peers.values():  # every archive knows every other as a C-MOVE destination
            for other in peers.values():
                if other is not peer:
                    peer.add_modality(other.aet.lower(), other.aet, other.dicom_port)
        load(peers["a"], S1, s1, "P1")  # S1: held whole by A
        series = list(s2)
        load(peers["a"], S2, {series[0]: s2[series[0]]}, "P2")  # S2: split across A and C
        load(peers["c"], S2, {k: s2[k] for k in series[1:]}, "P2")
        load(peers["c"], S3, s3, "P3")  # S3: on C, and on a simulator that cannot C-MOVE
        from pydicom.dataset import Dataset

        for series_uid, sops in s3.items():
            for sop in sops:
                ds = Dataset()
                ds.update(
                    {
                        "PatientID": "P3",
                        "PatientName": "P3^Test",
                        "StudyInstanceUID": S3,
                        "SeriesInstanceUID": series_uid,
                        "SOPInstanceUID": sop,
                        "Modality": "CT",
                        "StudyDate": "20240101",
                        "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
                    }
                )
                sim_data.append(ds)
        sim = SimulatedPacs(SimulatorConfig(ae_title="NO_MOVE"), sim_data)
        sim.start()
        for name in "abc":
            api.add_node(f"move-{name}", peers[name].dicom_port, ae_title=peers[name].aet, priority=10)
        api.add_node("move-sim", sim.port, ae_title="NO_MOVE", priority=1)
        api.add_span("movers", ["move-a", "move-b", "move-c", "move-sim"], ae_title="MOVERS")
        yield {"peers": peers, "s1": s1, "s2": s2, "s3": s3, "sim": sim}
    finally:
        api.http.delete("/api/v1/spans/movers")
        for name in ("move-a", "move-b", "move-c", "move-sim"):
            api.http.delete(f"/api/v1/nodes/{name}")
        if sim is not None:
            sim.stop()
        stop_all(peers.values(), graceful=False)


def retrieve(api: Api, **body: Any) -> tuple[int, list[dict[str, Any]]]:
    with api.http.stream(
        "POST", "/api/v1/retrievals", json={"span": "movers", **body}, timeout=120
    ) as response:
        if response.status_code != 200:
            response.read()
            return response.status_code, [response.json()]
        return 200, [json.loads(line) for line in response.iter_lines() if line.strip()]


def stored(peer: OrthancPeer, study: str) -> set[str]:
    result = peer.client.post(
        "/tools/find", json={"Level": "Instance", "Query": {"StudyInstanceUID": study}, "Expand": True}
    ).json()
    return {item["MainDicomTags"]["SOPInstanceUID"] for item in result}


def test_study_held_by_one_archive_lands_whole(api: Api, archives: dict[str, Any]) -> None:
    b = archives["peers"]["b"]
    status, events = retrieve(api, level="STUDY", uids={"StudyInstanceUID": S1}, destination_ae=b.aet)
    assert status == 200, events
    result = events[-1]
    assert result["event"] == "result" and result["status"] == "success", result
    assert result["dimse_status"] == 0 and result["completed"] == 6 and result["failed"] == 0
    assert [p["level"] for p in result["parts"]] == ["STUDY"]
    assert stored(b, S1) == {sop for sops in archives["s1"].values() for sop in sops}
    record = api.http.get(f"/api/v1/retrievals/{result['retrieval_id']}").json()
    assert record["destination_ae"] == b.aet and record["completed"] == 6


def test_split_study_is_moved_part_by_part_and_lands_whole(api: Api, archives: dict[str, Any]) -> None:
    d = archives["peers"]["d"]
    status, events = retrieve(api, level="STUDY", uids={"StudyInstanceUID": S2}, destination_ae=d.aet)
    result = events[-1]
    assert status == 200 and result["status"] == "success", result
    assert sorted(p["level"] for p in result["parts"]) == ["SERIES"] * 3
    assert stored(d, S2) == {sop for sops in archives["s2"].values() for sop in sops}
    assert any(e["event"] == "progress" for e in events[:-1])


def test_failed_holder_is_followed_by_the_next(api: Api, archives: dict[str, Any]) -> None:
    d = archives["peers"]["d"]
    status, events = retrieve(
        api, level="SERIES", uids={"SeriesInstanceUID": f"{S3}.1"}, destination_ae=d.aet
    )
    result = events[-1]
    assert status == 200 and result["status"] == "success", result
    tried = result["parts"][0]["tried"]
    assert [t["node"] for t in tried] == ["move-sim", "move-c"]
    assert tried[0]["status"] == "failed"
    assert stored(d, S3) == set(archives["s3"][f"{S3}.1"])


def test_image_level_moves_the_named_instances(api: Api, archives: dict[str, Any]) -> None:
    b = archives["peers"]["b"]
    sops = archives["s2"][f"{S2}.3"]
    status, events = retrieve(api, level="IMAGE", uids={"SOPInstanceUID": sops}, destination_ae=b.aet)
    result = events[-1]
    assert status == 200 and result["status"] == "success" and result["completed"] == len(sops), result
    assert set(sops) <= stored(b, S2)


def test_unknown_destination_fails_with_the_archives_status(api: Api, archives: dict[str, Any]) -> None:
    """Orthanc 1.10 answers 0xC000 (not 0xA801) for a destination it does not know; it is passed through."""
    status, events = retrieve(api, level="STUDY", uids={"StudyInstanceUID": S1}, destination_ae="NOWHERE")
    result = events[-1]
    assert status == 200 and result["status"] == "failed", result
    tried = result["parts"][0]["tried"]
    assert tried[0]["node"] == "move-a" and tried[0]["dimse_status"] == result["dimse_status"] == 0xC000
    assert result["completed"] == 0


def test_nothing_held_is_a_failure_that_says_so(api: Api, archives: dict[str, Any]) -> None:
    status, events = retrieve(
        api, level="STUDY", uids={"StudyInstanceUID": f"{ROOT}.404"}, destination_ae="X"
    )
    assert status == 200 and events[-1]["status"] == "failed"
    assert "no node" in events[-1]["error"]


def test_many_study_uids_are_looked_up_in_batches(api: Api, archives: dict[str, Any]) -> None:
    """450 StudyInstanceUIDs: 5 look-up C-FINDs per archive (100 UIDs each), not one per UID."""
    d, sim = archives["peers"]["d"], archives["sim"]
    unknown = [f"{ROOT}.9.{i}" for i in range(448)]
    sim.reset_counters()
    status, events = retrieve(api, level="STUDY", uids={"StudyInstanceUID": [S1, *unknown, S3]},
                              destination_ae=d.aet, timeout_s=60)
    result = events[-1]
    assert status == 200 and result["event"] == "result", events
    assert sim.counters.finds == 5
    assert sorted(p["keys"]["StudyInstanceUID"] for p in result["parts"]) == [S1, S3]
    assert result["status"] == "success" and result["completed"] == 10, result
    assert stored(d, S1) >= {sop for sops in archives["s1"].values() for sop in sops}
    assert stored(d, S3) >= {sop for sops in archives["s3"].values() for sop in sops}


@pytest.mark.parametrize(("raw", "words"), [
    ('{"level": "STUDY", "uids": {"StudyInstanceUID": "1.2"}, "destination_ae": "D", "timeout_s": 1e400}',
     "timeout_s"),
    ('{"level": "STUDY", "uids": {"StudyInstanceUID": "1.2"}, "destination_ae": "D", "timeout_s": 1e9}',
     "timeout_s"),
    ('{"level": "STUDY", "uids": {"StudyInstanceUID": [' + ", ".join(['"1.2"'] * 10_001) + ']}, '
     '"destination_ae": "D"}', "10000"),
])
def test_unbounded_retrievals_are_422(api: Api, raw: str, words: str) -> None:
    response = api.http.post("/api/v1/retrievals", content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    assert words in response.json()["detail"]


def test_an_infinite_query_timeout_is_422(api: Api) -> None:
    response = api.http.post("/api/v1/queries", content='{"level": "STUDY", "timeout_s": 1e400}',
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and "timeout_s" in response.json()["detail"], response.text


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"level": "PATIENT", "uids": {"PatientID": "P1"}}, "STUDY, SERIES or IMAGE"),
        ({"level": "STUDY", "uids": {"SeriesInstanceUID": "1.2"}}, "needs StudyInstanceUID"),
        ({"level": "STUDY", "uids": {"StudyInstanceUID": "1.2.*"}}, "not a UID"),
        ({"level": "STUDY", "uids": {"StudyInstanceUID": "1.2"}, "destination_ae": "A" * 17}, "at most 16"),
        ({"level": "STUDY", "uids": {"AccessionNumber": "1"}}, "AccessionNumber"),
    ],
)
def test_bad_retrievals_are_422(api: Api, body: dict[str, Any], words: str) -> None:
    response = api.http.post("/api/v1/retrievals", json={"destination_ae": "DEST"} | body)
    assert response.status_code == 422, response.text
    assert words in response.json()["detail"]


def test_a_retrieval_the_client_leaves_is_still_recorded(api: Api) -> None:
    """The client goes away while the holders are being looked up: the moves are cancelled, and the
    audit trail still gets the retrieval's record (status cancelled, with the reason)."""
    import time

    import httpx

    sim = SimulatedPacs(SimulatorConfig(ae_title="HANG_MOVE", fault="hang"), [])
    sim.start()
    try:
        api.add_node("move-hang", sim.port, ae_title="HANG_MOVE")
        api.add_span("hangers", ["move-hang"], ae_title="HANGERS")
        before = {r["id"] for r in api.http.get("/api/v1/retrievals", params={"limit": 500}).json()}
        body = {"span": "hangers", "level": "STUDY", "uids": {"StudyInstanceUID": S3},
                "destination_ae": "NOWHERE"}
        # no event comes: the client gives up and closes the connection
        with pytest.raises(httpx.ReadTimeout), api.http.stream(
            "POST", "/api/v1/retrievals", json=body, timeout=httpx.Timeout(30, read=2)
        ) as response:
            response.read()
        deadline = time.monotonic() + 20
        new: list[dict[str, Any]] = []
        while not new and time.monotonic() < deadline:
            time.sleep(0.5)
            new = [r for r in api.http.get("/api/v1/retrievals", params={"limit": 500}).json()
                   if r["id"] not in before and r["span"] == "hangers"]
        assert new, "a retrieval the client left has no record"
        assert new[0]["status"] == "cancelled" and "went away" in new[0]["error"], new[0]
    finally:
        api.http.delete("/api/v1/spans/hangers")
        api.http.delete("/api/v1/nodes/move-hang")
        sim.stop()
