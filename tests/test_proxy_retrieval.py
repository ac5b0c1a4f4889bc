"""POST /api/v1/retrievals in proxy mode through the session's Serve app: a study split across Orthanc
archives A and B (which know only the spanner's storage SCP) lands whole in dcmtk's storescp, a
destination no archive knows; proxy to an AE the spanner does not know is a 422 naming it; direct mode
to that storescp fails at the archives, which do not know it; a DICOM caller the destination does not
allow is a 403; a destination that refuses the association fails every instance, with the reason."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from serve_app.auth import CALLING_AE_HEADER
from spanner.dimse.store import read_part10
from tests.conftest import Api, require
from tests.peers.instances import Storescp, write_instance
from tests.peers.orthanc import OrthancPeer, orthanc_executable
from tests.peers.ports import ClosedPort

STUDY_UID = "1.2.826.0.1.3680043.8.498.7716.1"


@pytest.fixture
def folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="spanner-proxy-api-") as name:
        yield Path(name)


def retrieve(api: Api, **body: Any) -> tuple[int, list[dict[str, Any]]]:
    request = {"level": "STUDY", "uids": {"StudyInstanceUID": STUDY_UID}, "span": "all", "timeout_s": 120}
    answer = api.http.post("/api/v1/retrievals", json=request | body, timeout=180)
    if answer.status_code != 200:
        return answer.status_code, [answer.json()]
    return 200, [json.loads(line) for line in answer.text.splitlines() if line]


@pytest.mark.orthanc
@pytest.mark.dcmtk
def test_a_split_study_lands_whole_at_a_destination_no_archive_knows(api: Api, folder: Path) -> None:
    require(orthanc_executable() is not None, "Debian's orthanc")
    files = folder / "files"
    files.mkdir()
    on_a = [write_instance(files, 800 + n, 32 * 1024, study_uid=STUDY_UID) for n in range(4)]
    on_b = [write_instance(files, 900 + n, 32 * 1024, study_uid=STUDY_UID, series=2) for n in range(3)]
    every = {read_part10(p).sop_instance_uid for p in on_a + on_b}
    store = ("SPANNER", "127.0.0.1", int(str(api.settings["store_port"])))
    received = folder / "storescp"
    received.mkdir()
    storescp = Storescp(received)
    a = OrthancPeer(aet="PROXY_A", modalities={"spanner": store})
    b = OrthancPeer(aet="PROXY_B", modalities={"spanner": store})
    try:
        a.start().upload_many(p.read_bytes() for p in on_a)
        b.start().upload_many(p.read_bytes() for p in on_b)
        api.add_node("proxy-a", a.dicom_port, ae_title="PROXY_A")
        api.add_node("proxy-b", b.dicom_port, ae_title="PROXY_B")
        made = api.http.post("/api/v1/destinations", json={"name": "proxy-dest", "ae_title": "DEST",
                                                           "host": "127.0.0.1", "port": storescp.port})
        assert made.status_code == 201, made.text

        status, lines = retrieve(api, destination_ae="DEST")
        assert status == 200, lines
        result = lines[-1]
        assert result["event"] == "result" and result["mode"] == "proxy", result
        assert (result["status"], result["dimse_status"], result["completed"], result["failed"]) \
            == ("success", 0, 7, 0), result
        holders = sorted(holder for part in result["parts"] for holder in part["holders"])
        assert holders == ["proxy-a", "proxy-b"], result["parts"]
        assert [line["event"] for line in lines[:-1]] == ["progress"] * (len(lines) - 1)
        assert lines[-2]["completed"] == 7
        assert set(storescp.received()) == every

        direct_status, direct = retrieve(api, destination_ae="DEST", mode="direct")
        assert direct_status == 200 and direct[-1]["mode"] == "direct"
        assert direct[-1]["status"] == "failed" and direct[-1]["completed"] == 0, direct[-1]

        closed = ClosedPort()
        api.http.patch("/api/v1/destinations/proxy-dest", json={"port": closed.port})
        _, nowhere = retrieve(api, destination_ae="DEST")
        assert (nowhere[-1]["status"], nowhere[-1]["dimse_status"], nowhere[-1]["completed"]) \
            == ("failed", 0xC000, 0), nowhere[-1]
        assert nowhere[-1]["failed"] == 7 and set(nowhere[-1]["failed_sop_instance_uids"]) == every
        assert "not delivered to DEST" in nowhere[-1]["error"], nowhere[-1]
        closed.release()

        api.http.patch("/api/v1/destinations/proxy-dest", json={"allowed_calling_aets": ["WARDWS"]})
        refused = api.http.post("/api/v1/retrievals", headers={CALLING_AE_HEADER: "OTHERWS"},
                                json={"level": "STUDY", "uids": {"StudyInstanceUID": STUDY_UID},
                                      "destination_ae": "DEST"})
        assert refused.status_code == 403 and "'OTHERWS' may not send" in refused.json()["detail"]

        unknown_status, unknown = retrieve(api, destination_ae="NOWHERE", mode="proxy")
        assert unknown_status == 422 and "'NOWHERE' is not a known destination" in str(unknown[0]), unknown
    finally:
        api.http.delete("/api/v1/destinations/proxy-dest")
        for name in ("proxy-a", "proxy-b"):
            api.http.delete(f"/api/v1/nodes/{name}")
        for peer in (a, b):
            peer.stop()
        storescp.stop()
