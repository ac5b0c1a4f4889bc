"""A proxied retrieval is admitted by the holder's own node actor like a query: its rate limit and
association limit cover the move the store actor runs, so an archive is never asked for more than its
node allows. Real peers: an Orthanc archive that moves to the spanner, dcmtk's storescp as destination."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spanner.dimse.store import read_part10
from tests.conftest import Api, require
from tests.peers.instances import Storescp, write_instance
from tests.peers.orthanc import OrthancPeer, orthanc_executable

STUDY_UID = "1.2.826.0.1.3680043.8.498.7718.1"


@pytest.fixture
def folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="spanner-admit-") as name:
        yield Path(name)


def retrieve(api: Api, timeout_s: float) -> dict[str, Any]:
    answer = api.http.post("/api/v1/retrievals", timeout=180, json={
        "level": "STUDY", "uids": {"StudyInstanceUID": STUDY_UID}, "span": "all", "timeout_s": timeout_s,
        "destination_ae": "ADMIT_DEST"})
    assert answer.status_code == 200, answer.text
    return dict(json.loads(answer.text.splitlines()[-1]))


@pytest.mark.orthanc
@pytest.mark.dcmtk
def test_the_nodes_rate_limit_covers_a_proxied_move(api: Api, folder: Path) -> None:
    require(orthanc_executable() is not None, "Debian's orthanc")
    files = folder / "files"
    files.mkdir()
    instances = [write_instance(files, 740 + n, 16 * 1024, study_uid=STUDY_UID) for n in range(3)]
    received = folder / "storescp"
    received.mkdir()
    storescp = Storescp(received)
    store = ("SPANNER", "127.0.0.1", int(str(api.settings["store_port"])))
    archive = OrthancPeer(aet="ADMIT_A", modalities={"spanner": store})
    try:
        archive.start().upload_many(p.read_bytes() for p in instances)
        # One C-FIND or C-MOVE per 30 s: the planning look-up takes the only start before the deadline.
        api.add_node("admit-a", archive.dicom_port, ae_title="ADMIT_A", max_queries_per_s=1 / 30)
        made = api.http.post("/api/v1/destinations", json={"name": "admit-dest", "ae_title": "ADMIT_DEST",
                                                           "host": "127.0.0.1", "port": storescp.port})
        assert made.status_code == 201, made.text

        refused = retrieve(api, timeout_s=5)
        assert refused["status"] == "failed" and refused["completed"] == 0, refused
        tried = [t for part in refused["parts"] for t in part["tried"]]
        assert [t["status"] for t in tried] == ["throttled"] and "rate limit" in tried[0]["error"], tried
        assert storescp.received() == {}

        api.http.patch("/api/v1/nodes/admit-a", json={"max_queries_per_s": None})
        allowed = retrieve(api, timeout_s=60)
        assert (allowed["status"], allowed["completed"]) == ("success", 3), allowed
        assert set(storescp.received()) == {read_part10(p).sop_instance_uid for p in instances}
    finally:
        api.http.delete("/api/v1/destinations/admit-dest")
        api.http.delete("/api/v1/nodes/admit-a")
        archive.stop()
        storescp.stop()
