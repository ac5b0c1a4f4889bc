"""Archives with ``retrieve_method: c-get``: the spanner fetches by C-GET on its own association, with SCP
role selection for the storage classes, so such an archive needs no DICOM destination for the spanner at
all. Real peers: Orthanc archives that know no other AE, dcmtk's storescp and Orthanc as destinations."""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from spanner.dicom_constants import COMMON_STORAGE_CLASSES, STUDY_ROOT_GET, STUDY_ROOT_MOVE
from spanner.dimse.store import get_contexts, read_part10
from spanner.nodespec import RetrieveMethod
from spanner.proxy_move import HolderPart, InstanceEvent, PartEvent, Peer, proxy_move
from spanner.spool import Spool
from spanner.store_scp import StorageScp
from tests.conftest import Api, require
from tests.peers.instances import Storescp, study_identifier, write_instance
from tests.peers.orthanc import OrthancPeer, orthanc_executable

STUDY_UID = "1.2.826.0.1.3680043.8.498.7717.1"
API_STUDY_UID = "1.2.826.0.1.3680043.8.498.7717.2"
RARE_STUDY_UID = "1.2.826.0.1.3680043.8.498.7717.3"
RARE_CLASS = "1.2.840.10008.5.1.4.1.1.481.10"  # RT Physician Intent: not among the classes a C-GET proposes


@pytest.fixture
def folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="spanner-cget-") as name:
        yield Path(name)


def test_a_c_get_proposes_at_most_128_contexts_with_the_scp_role() -> None:
    contexts, roles = get_contexts(STUDY_ROOT_GET)
    assert len(contexts) <= 128 and contexts[0][0] == STUDY_ROOT_GET
    assert [r.sop_class_uid for r in roles] == list(COMMON_STORAGE_CLASSES) == [c for c, _ in contexts[1:]]
    assert all(r.scp_role and not r.scu_role for r in roles)
    assert RARE_CLASS not in COMMON_STORAGE_CLASSES
    with pytest.raises(ValueError, match="at most 128"):
        get_contexts(STUDY_ROOT_GET, [f"1.2.3.{n}" for n in range(128)])


@pytest.mark.orthanc
@pytest.mark.dcmtk
def test_a_split_study_from_a_c_get_archive_and_a_c_move_archive(folder: Path) -> None:
    """A knows no AE at all and gives up its part by C-GET (an instance of a class the C-GET did not
    propose fails alone and is reported as not received); B moves by C-MOVE."""
    require(orthanc_executable() is not None, "Debian's orthanc")
    files = folder / "files"
    files.mkdir()
    on_a = [write_instance(files, 700 + n, 256 * 1024, study_uid=STUDY_UID) for n in range(4)]
    rare = write_instance(files, 711, 2048, study_uid=RARE_STUDY_UID)
    ds = dcmread(rare)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = RARE_CLASS
    ds.save_as(rare, enforce_file_format=True)
    on_b = [write_instance(files, 720 + n, 64 * 1024, study_uid=STUDY_UID, series=2) for n in range(3)]
    uids_a = {read_part10(p).sop_instance_uid for p in on_a}
    uids_b = {read_part10(p).sop_instance_uid for p in on_b}
    rare_uid = read_part10(rare).sop_instance_uid
    spool = Spool(folder / "spool", max_bytes=64 << 20, ttl_s=600)
    scp = StorageScp(spool, ae_title="SPANNER")

    async def body() -> tuple[list[InstanceEvent | PartEvent], set[str], dict[str, bytes],
                              list[InstanceEvent | PartEvent]]:
        port = await scp.start("127.0.0.1", 0)
        a = OrthancPeer(aet="GET_A")  # knows no DICOM destination: C-GET is its only way out
        b = OrthancPeer(aet="MOVE_B", modalities={"spanner": ("SPANNER", "127.0.0.1", port)})
        d = OrthancPeer(aet="DEST_D")
        try:
            a.start().upload_many(p.read_bytes() for p in [*on_a, rare])
            b.start().upload_many(p.read_bytes() for p in on_b)
            d.start()
            parts = [HolderPart("node-a", Peer("GET_A", "127.0.0.1", a.dicom_port),
                                partial(study_identifier, STUDY_UID), frozenset(uids_a),
                                model=STUDY_ROOT_GET, method=RetrieveMethod.C_GET),
                     HolderPart("node-b", Peer("MOVE_B", "127.0.0.1", b.dicom_port),
                                partial(study_identifier, STUDY_UID), frozenset(uids_b),
                                model=STUDY_ROOT_MOVE)]
            events = [e async for e in proxy_move(scp, parts, Peer("DEST_D", "127.0.0.1", d.dicom_port),
                                                  calling_ae="SPANNER")]
            in_d = {d.get(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"]: i for i in d.instances()}
            copies = {uid: d.client.get(f"/instances/{ident}/file").content for uid, ident in in_d.items()}
            rare_part = replace(parts[0], identifier=partial(study_identifier, RARE_STUDY_UID),
                                expected=frozenset({rare_uid}))
            to_d = Peer("DEST_D", "127.0.0.1", d.dicom_port)
            of_rare = [e async for e in proxy_move(scp, [rare_part], to_d, calling_ae="SPANNER")]
            return events, set(in_d), copies, of_rare
        finally:
            for peer in (a, b, d):
                peer.stop()
            await scp.close()

    events, in_d, copies, of_rare = asyncio.run(body())
    parts = {e.node: e for e in events if isinstance(e, PartEvent)}
    forwarded = {e.sop_instance_uid for e in events if isinstance(e, InstanceEvent) and e.forwarded}
    assert forwarded == in_d == uids_a | uids_b
    assert parts["node-a"].counts["completed"] == 4 and parts["node-a"].status == 0, parts
    assert parts["node-b"].error is None and not parts["node-b"].not_received
    for path in on_a:
        original = dcmread(path)
        assert dcmread(_as_file(folder, copies[original.SOPInstanceUID])).PixelData == original.PixelData
    # Orthanc cannot send an instance whose class has no context: a failed sub-operation, never "completed"
    counts = {"remaining": 0, "completed": 0, "failed": 1, "warning": 0}
    assert of_rare == [PartEvent("node-a", 0xC000, counts, not_received=frozenset({rare_uid}))]
    assert list(spool.incoming.iterdir()) == []


def _as_file(folder: Path, data: bytes) -> Path:
    path = folder / "copy.dcm"
    path.write_bytes(data)
    return path


def retrieve(api: Api, **body: Any) -> dict[str, Any]:
    request = {"level": "STUDY", "uids": {"StudyInstanceUID": API_STUDY_UID}, "span": "all", "timeout_s": 120,
               "destination_ae": "CGET_DEST"}
    answer = api.http.post("/api/v1/retrievals", json=request | body, timeout=180)
    assert answer.status_code == 200, answer.text
    lines = [json.loads(line) for line in answer.text.splitlines() if line]
    return dict(lines[-1])


@pytest.mark.orthanc
@pytest.mark.dcmtk
def test_a_c_get_node_delivers_through_the_api_and_from_the_spool_until_the_node_changes(
        api: Api, folder: Path) -> None:
    require(orthanc_executable() is not None, "Debian's orthanc")
    files = folder / "files"
    files.mkdir()
    instances = [write_instance(files, 730 + n, 128 * 1024, study_uid=API_STUDY_UID) for n in range(5)]
    every = {read_part10(p).sop_instance_uid for p in instances}
    received = folder / "storescp"
    received.mkdir()
    storescp = Storescp(received)
    archive = OrthancPeer(aet="CGET_ONLY")  # does not know the spanner's storage SCP
    try:
        archive.start().upload_many(p.read_bytes() for p in instances)
        node = api.add_node("cget-only", archive.dicom_port, ae_title="CGET_ONLY", retrieve_method="c-get")
        assert node["retrieve_method"] == "c-get"
        made = api.http.post("/api/v1/destinations", json={"name": "cget-dest", "ae_title": "CGET_DEST",
                                                           "host": "127.0.0.1", "port": storescp.port})
        assert made.status_code == 201, made.text

        result = retrieve(api)
        assert (result["status"], result["mode"], result["completed"], result["failed"]) \
            == ("success", "proxy", 5, 0), result
        assert set(storescp.received()) == every
        for path in instances:
            uid = read_part10(path).sop_instance_uid
            assert dcmread(storescp.received()[uid]).PixelData == dcmread(path).PixelData

        assert [t["from_spool"] for part in result["parts"] for t in part["tried"]] == [False]

        again = retrieve(api)  # the same study again: from the spool, the archive not asked
        assert (again["status"], again["completed"]) == ("success", 5), again
        assert [t["from_spool"] for part in again["parts"] for t in part["tried"]] == [True]

        assert api.http.patch("/api/v1/nodes/cget-only", json={"priority": 5}).status_code == 200
        after_change = retrieve(api)  # the node changed: what came from it is fetched afresh
        assert (after_change["status"], after_change["completed"]) == ("success", 5), after_change
        assert [t["from_spool"] for part in after_change["parts"] for t in part["tried"]] == [False]

        patched = api.http.patch("/api/v1/nodes/cget-only", json={"retrieve_method": "c-move"})
        assert patched.status_code == 200 and patched.json()["retrieve_method"] == "c-move"
        moved = retrieve(api)  # this archive does not know the spanner's storage SCP
        assert moved["status"] == "failed" and moved["completed"] == 0, moved

        bad = api.http.patch("/api/v1/nodes/cget-only", json={"retrieve_method": "c-send"})
        assert bad.status_code == 422 and "retrieve_method" in bad.text
    finally:
        api.http.delete("/api/v1/destinations/cget-dest")
        api.http.delete("/api/v1/nodes/cget-only")
        archive.stop()
        storescp.stop()
