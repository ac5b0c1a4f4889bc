"""C-GET at the DICOM front against the session's Serve app and real Orthanc archives A and B (one study
split across them): dcmtk's getscu writes the study whole (SOP Instance UIDs and pixel data compared) at
STUDY, SERIES and IMAGE level in both information models; a C-CANCEL from pynetdicom stops within a few
instances with 0xFE00; an instance the holder lost ends 0xB000 with its UID in the Failed SOP Instance UID
List; a requester with no storage context gets 0xA702; the front's listener folder is empty after each.
The API refuses ``deliver_to`` from anyone but the front, and any host but the caller's own."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian, JPEGBaseline8Bit
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage, MRImageStorage

from scp.server import SpannerScp
from spanner.dicom_constants import PATIENT_ROOT_GET, STUDY_ROOT_GET
from spanner.settings import load_settings
from tests.conftest import Api, require
from tests.peers.instances import write_instance
from tests.peers.orthanc import OrthancPeer, orthanc_executable

SPLIT = "1.2.826.0.1.3680043.8.498.7721.1"  # series 1 on A (4), series 2 on B (3)
LOSSY = "1.2.826.0.1.3680043.8.498.7721.2"  # on A only; one file removed from A's storage
LONG = "1.2.826.0.1.3680043.8.498.7721.3"  # 40 instances on B, for C-CANCEL
SYNTAX = "1.2.826.0.1.3680043.8.498.7721.4"  # on B: one Explicit VR Little Endian, one JPEG Baseline
CALLED = "CGETSPAN"


@dataclass
class Fleet:
    front: SpannerScp
    files: dict[str, Path]  # SOP Instance UID -> the file uploaded
    by_study: dict[str, list[str]]
    lost: str  # the SOP Instance UID A lost

    @property
    def port(self) -> int:
        return self.front.port

    def spool_left(self) -> list[str]:
        listener = self.front.listener
        assert listener is not None
        return os.listdir(listener.folder)


def _sop(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


@pytest.fixture(scope="module")
def fleet(api: Api) -> Iterator[Fleet]:
    require(orthanc_executable() is not None, "Debian's orthanc")
    require(shutil.which("getscu") is not None, "dcmtk getscu")
    folder = Path(tempfile.mkdtemp(prefix="spanner-front-get-test-"))
    store = ("SPANNER", "127.0.0.1", int(str(api.settings["store_port"])))
    # No storage cache: a file removed from A's storage is gone for A too; A answers C-FIND from its index
    # (as many archives do), so it still lists the instance it can no longer send.
    a = OrthancPeer(aet="GET_A", modalities={"spanner": store},
                    extra_config={"MaximumStorageCacheSize": 0, "StorageAccessOnFind": "Never"})
    b = OrthancPeer(aet="GET_B", modalities={"spanner": store})
    front: SpannerScp | None = None
    try:
        on_a = [write_instance(folder, 2100 + n, 16 * 1024, study_uid=SPLIT) for n in range(4)]
        on_b = [write_instance(folder, 2200 + n, 16 * 1024, study_uid=SPLIT, series=2) for n in range(3)]
        lossy = [write_instance(folder, 2300 + n, 8 * 1024, study_uid=LOSSY) for n in range(3)]
        long = [write_instance(folder, 2400 + n, 4 * 1024, study_uid=LONG) for n in range(40)]
        syntax = [write_instance(folder, 2500, 4 * 1024, study_uid=SYNTAX),
                  write_instance(folder, 2501, 4 * 1024, JPEGBaseline8Bit, study_uid=SYNTAX)]
        a.start().upload_many(p.read_bytes() for p in on_a + lossy)
        b.start().upload_many(p.read_bytes() for p in on_b + long + syntax)
        lost = _sop(lossy[0])
        # A keeps the instance in its index but loses the file: its C-MOVE sub-operation fails.
        orthanc_id = a.client.post("/tools/lookup", content=lost).json()[0]["ID"]
        uuid = a.get(f"/instances/{orthanc_id}/attachments/dicom/info")["Uuid"]
        (a.workdir / "storage" / uuid[:2] / uuid[2:4] / uuid).unlink()
        api.add_node("get-a", a.dicom_port, ae_title="GET_A")
        api.add_node("get-b", b.dicom_port, ae_title="GET_B")
        api.add_span("cget", ["get-a", "get-b"], ae_title=CALLED)
        front = SpannerScp(load_settings(scp_port=0, scp_span_cache_ttl_s=0.1), base_url=api.base_url)
        front.start()
        files = {_sop(p): p for p in on_a + on_b + lossy + long + syntax}
        by_study = {SPLIT: [_sop(p) for p in on_a + on_b], LOSSY: [_sop(p) for p in lossy],
                    LONG: [_sop(p) for p in long], SYNTAX: [_sop(p) for p in syntax]}
        yield Fleet(front, files, by_study, lost)
    finally:
        if front is not None:
            front.stop()
        api.http.delete("/api/v1/spans/cget")
        for name in ("get-a", "get-b"):
            api.http.delete(f"/api/v1/nodes/{name}")
        a.stop()
        b.stop()
        shutil.rmtree(folder, ignore_errors=True)


def getscu(fleet: Fleet, out: Path, model: str, *keys: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["getscu", model, "-aec", CALLED, "-aet", "GETTER", "-od", str(out),
                           *(arg for key in keys for arg in ("-k", key)), "127.0.0.1", str(fleet.port)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TCP_NODELAY": "1"})


def assert_same(fleet: Fleet, out: Path, expected: list[str]) -> None:
    got = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(p) for p in out.iterdir())}
    assert sorted(got) == sorted(expected)
    for uid, ds in got.items():
        assert ds.PixelData == pydicom.dcmread(fleet.files[uid]).PixelData, uid


SERIES_1 = f"{SPLIT}.1"


@pytest.mark.orthanc
@pytest.mark.dcmtk
@pytest.mark.parametrize(("model", "level", "keys", "which"), [
    ("-S", "STUDY", [f"StudyInstanceUID={SPLIT}"], slice(0, 7)),
    ("-P", "STUDY", ["PatientID=STORE1", f"StudyInstanceUID={SPLIT}"], slice(0, 7)),
    ("-S", "SERIES", [f"StudyInstanceUID={SPLIT}", f"SeriesInstanceUID={SPLIT}.2"], slice(4, 7)),
    ("-P", "SERIES", ["PatientID=STORE1", f"StudyInstanceUID={SPLIT}", f"SeriesInstanceUID={SERIES_1}"],
     slice(0, 4)),
    ("-S", "IMAGE", [f"StudyInstanceUID={SPLIT}", f"SeriesInstanceUID={SERIES_1}", "SOPInstanceUID={first}"],
     slice(0, 1)),
    ("-P", "IMAGE", ["PatientID=STORE1", f"StudyInstanceUID={SPLIT}", f"SeriesInstanceUID={SERIES_1}",
                     "SOPInstanceUID={first}"], slice(0, 1)),
])
def test_getscu_through_the_front_writes_what_it_asked_for(
    fleet: Fleet, tmp_path: Path, model: str, level: str, keys: list[str], which: slice
) -> None:
    expected = fleet.by_study[SPLIT][which]
    keys = [k.format(first=fleet.by_study[SPLIT][0]) for k in keys]
    run = getscu(fleet, tmp_path, model, f"QueryRetrieveLevel={level}", *keys)
    assert run.returncode == 0, run.stdout + run.stderr
    assert_same(fleet, tmp_path, expected)
    assert fleet.spool_left() == []


def requester(*storage: str) -> AE:
    ae = AE(ae_title="PYGETTER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(STUDY_ROOT_GET)
    ae.add_requested_context(PATIENT_ROOT_GET)
    for sop_class in storage:
        ae.add_requested_context(sop_class)
    return ae


def study(uid: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel, ds.StudyInstanceUID = "STUDY", uid
    return ds


def connect(fleet: Fleet, received: list[str], keep: dict[str, Dataset] | None = None,
            *syntaxes: str) -> Association:
    """A pynetdicom C-GET requester taking CT instances (SCP role; in ``syntaxes`` when given), noting what
    it receives (and keeping the data sets in ``keep``)."""
    def on_store(event: evt.Event) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        if keep is not None:
            keep[received[-1]] = event.dataset
        return 0x0000

    ae = requester()
    ae.add_requested_context(CTImageStorage, list(syntaxes) or None)
    assoc = ae.associate(
        "127.0.0.1", fleet.port, ae_title=CALLED, ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    return assoc


@pytest.mark.orthanc
def test_a_lost_instance_ends_b000_with_its_uid(fleet: Fleet) -> None:
    received: list[str] = []
    assoc = connect(fleet, received)
    try:
        responses = list(assoc.send_c_get(study(LOSSY), STUDY_ROOT_GET))
    finally:
        assoc.release()
    status, identifier = responses[-1]
    assert status.Status == 0xB000, status
    assert sorted(received) == sorted(set(fleet.by_study[LOSSY]) - {fleet.lost})
    assert (status.NumberOfCompletedSuboperations, status.NumberOfFailedSuboperations) == (2, 1)
    failed = identifier.FailedSOPInstanceUIDList
    assert ([failed] if isinstance(failed, str) else list(failed)) == [fleet.lost]
    pending = [r[0] for r in responses[:-1]]
    assert pending and all(r.Status == 0xFF00 for r in pending)
    assert all("NumberOfRemainingSuboperations" in r for r in pending)
    assert fleet.spool_left() == []


@pytest.mark.orthanc
def test_c_cancel_stops_within_a_few_instances(fleet: Fleet) -> None:
    received: list[str] = []
    assoc = connect(fleet, received)
    responses = []
    try:
        for status, _ in assoc.send_c_get(study(LONG), STUDY_ROOT_GET, msg_id=7):
            responses.append(status)
            if len(responses) == 2:
                context = next(c for c in assoc.accepted_contexts if c.abstract_syntax == STUDY_ROOT_GET)
                assoc.send_c_cancel(7, context.context_id)
    finally:
        assoc.release()
    final = responses[-1]
    assert final.Status == 0xFE00, final
    assert 2 <= final.NumberOfCompletedSuboperations <= 8, final
    assert len(received) == final.NumberOfCompletedSuboperations < 40
    assert fleet.spool_left() == []


@pytest.mark.orthanc
def test_a_requester_that_aborts_leaves_nothing_behind(fleet: Fleet) -> None:
    received: list[str] = []
    assoc = connect(fleet, received)
    for status, _ in assoc.send_c_get(study(LONG), STUDY_ROOT_GET):
        if status.Status == 0xFF00 and status.NumberOfCompletedSuboperations >= 2:
            assoc.abort()
            break
    # The front refuses what still comes and closes the retrieval: a C-GET right after gets everything.
    again: list[str] = []
    second = connect(fleet, again)
    try:
        final = list(second.send_c_get(study(SPLIT), STUDY_ROOT_GET))[-1][0]
    finally:
        second.release()
    assert final.Status == 0x0000 and sorted(again) == sorted(fleet.by_study[SPLIT])
    assert 2 <= len(received) < 40
    assert fleet.spool_left() == []


@pytest.mark.orthanc
@pytest.mark.parametrize("storage", [(), (MRImageStorage,)])
def test_a_requester_without_a_storage_context_for_the_instances_gets_a702(
    fleet: Fleet, storage: tuple[str, ...]
) -> None:
    ae = requester(*storage)
    assoc = ae.associate("127.0.0.1", fleet.port, ae_title=CALLED,
                         ext_neg=[build_role(c, scp_role=True) for c in storage])
    assert assoc.is_established
    try:
        responses = list(assoc.send_c_get(study(SPLIT), STUDY_ROOT_GET))
    finally:
        assoc.release()
    final = responses[-1][0]
    assert final.Status == 0xA702, final
    assert final.get("NumberOfCompletedSuboperations", 0) == 0
    if storage:  # the instances came and could not go: each one failed
        assert final.NumberOfFailedSuboperations == 7
    assert fleet.spool_left() == []


@pytest.mark.orthanc
def test_storage_contexts_need_the_scp_role(fleet: Fleet) -> None:
    """Proposed without role selection, a storage context would have the requester send to the front."""
    ae = requester(CTImageStorage)
    assoc = ae.associate("127.0.0.1", fleet.port, ae_title=CALLED)
    try:
        assert assoc.is_established
        storage = [c for c in assoc.accepted_contexts if c.abstract_syntax == CTImageStorage]
        assert storage == []
    finally:
        assoc.release()


def test_deliver_to_is_the_front_s_alone(api: Api) -> None:
    """With auth off every caller counts as the front; the host must still be the caller's own address."""
    body = {"level": "STUDY", "uids": {"StudyInstanceUID": SPLIT}, "destination_ae": "GETTER",
            "deliver_to": {"ae_title": "GETX", "host": "10.1.2.3", "port": 104}}
    refused = api.http.post("/api/v1/retrievals", json=body)
    assert refused.status_code == 403 and "not the address this request comes from" in refused.text
    direct = api.http.post("/api/v1/retrievals", json=body | {"mode": "direct"})
    assert direct.status_code == 422 and "proxy mode only" in direct.text


def test_only_a_dicom_front_key_may_name_deliver_to() -> None:
    """With keys on, the route passes front=False for every role but dicom_front."""
    from serve_app.api_models import RetrievalIn
    from serve_app.errors import Forbidden
    from serve_app.usecases.retrieval import front_destination

    body = RetrievalIn.model_validate({
        "level": "STUDY", "uids": {"StudyInstanceUID": SPLIT}, "destination_ae": "GETTER",
        "deliver_to": {"ae_title": "GETX", "host": "127.0.0.1", "port": 104}})
    with pytest.raises(Forbidden, match="only the DICOM front"):
        front_destination(body, front=False, requester="127.0.0.1")
    assert front_destination(body, front=True, requester="127.0.0.1").port == 104


@pytest.mark.orthanc
def test_an_instance_goes_converted_or_fails_by_the_requester_s_syntaxes(fleet: Fleet) -> None:
    """The requester takes CT in Implicit VR Little Endian only: the Explicit one is converted, the JPEG
    one cannot be and fails with its UID listed."""
    received: list[str] = []
    kept: dict[str, Dataset] = {}
    assoc = connect(fleet, received, kept, ImplicitVRLittleEndian)
    try:
        status, identifier = list(assoc.send_c_get(study(SYNTAX), STUDY_ROOT_GET))[-1]
    finally:
        assoc.release()
    plain, jpeg = fleet.by_study[SYNTAX]
    assert status.Status == 0xB000, status
    assert received == [plain]
    assert kept[plain].PixelData == pydicom.dcmread(fleet.files[plain]).PixelData
    assert str(identifier.FailedSOPInstanceUIDList) == jpeg
    assert fleet.spool_left() == []


ONLY_GET = "1.2.826.0.1.3680043.8.498.7721.5"


def _dcmtk(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TCP_NODELAY": "1"})


@pytest.mark.orthanc
@pytest.mark.dcmtk
def test_getscu_and_movescu_through_the_front_from_an_archive_that_knows_no_ae(
        fleet: Fleet, api: Api, tmp_path: Path) -> None:
    """The holder knows neither the spanner nor the destination: with ``retrieve_method: c-get`` the
    spanner fetches on its own association, and both getscu and movescu through the front get it whole."""
    from tests.peers.instances import Storescp

    files = [write_instance(tmp_path, 2600 + n, 8 * 1024, study_uid=ONLY_GET) for n in range(5)]
    expected = sorted(_sop(p) for p in files)
    c = OrthancPeer(aet="GET_C")
    received = tmp_path / "storescp"
    received.mkdir()
    storescp = Storescp(received)
    try:
        c.start().upload_many(p.read_bytes() for p in files)
        api.add_node("get-c", c.dicom_port, ae_title="GET_C", retrieve_method="c-get")
        api.add_span("getonly", ["get-c"], ae_title="GETONLY")
        made = api.http.post("/api/v1/destinations", json={"name": "get-dest", "ae_title": "DEST",
                                                           "host": "127.0.0.1", "port": storescp.port})
        assert made.status_code == 201, made.text
        out = tmp_path / "out"
        out.mkdir()
        keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={ONLY_GET}"]
        front = ["127.0.0.1", str(fleet.port)]
        got = _dcmtk("getscu", "-S", "-aec", "GETONLY", "-aet", "GETTER", "-od", str(out), *keys, *front)
        assert got.returncode == 0, got.stderr
        assert sorted(str(pydicom.dcmread(p).SOPInstanceUID) for p in out.iterdir()) == expected
        moved = _dcmtk("movescu", "-S", "-aec", "GETONLY", "-aet", "MOVER", "-aem", "DEST", *keys, *front)
        assert moved.returncode == 0, moved.stderr
        assert sorted(storescp.received()) == expected
        assert fleet.spool_left() == []
    finally:
        api.http.delete("/api/v1/destinations/get-dest")
        api.http.delete("/api/v1/spans/getonly")
        api.http.delete("/api/v1/nodes/get-c")
        c.stop()
        storescp.stop()
