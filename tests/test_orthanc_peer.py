"""Real Orthanc peers: start, load, and what their C-FIND answers look like (the spanner must merge them).

Measured figures are printed (run with `-s` to see them).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # generated names mypy cannot see
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from simulator.dataset import generate_uniform, write_part10
from tests.conftest import require
from tests.peers.orthanc import (
    CT_IMAGE_STORAGE,
    OrthancPeer,
    OrthancPeerError,
    make_instance,
    orthanc_executable,
    stop_all,
)
from tests.peers.ports import free_port, port_accepts, wait_for_port

pytestmark = pytest.mark.orthanc

ROOT = "1.2.826.0.1.3680043.8.498.7741"


@dataclass(frozen=True)
class Inst:
    """One uploaded instance, the expectation every answer is checked against."""

    patient_id: str
    patient_name: str
    study: str
    series: str
    sop: str
    modality: str
    study_date: str
    charset: str

    def part10(self) -> bytes:
        return make_instance(
            self.patient_id, self.patient_name, self.study, self.series, self.sop, modality=self.modality,
            study_date=self.study_date, SpecificCharacterSet=self.charset,
        )


S1, S2, S3, S4 = (f"{ROOT}.{n}" for n in (1, 2, 3, 4))
MULLER = "Müller^Jürgen"
GERARD = "Gérard^Zoë"
YAMADA = "山田^太郎"
OZTURK = "Öztürk^Ayşe"
A_DATA = [
    Inst("PID1", MULLER, S1, f"{S1}.1", f"{S1}.1.1", "CT", "20240101", "ISO_IR 192"),
    Inst("PID1", MULLER, S1, f"{S1}.1", f"{S1}.1.2", "CT", "20240101", "ISO_IR 192"),
    Inst("PID1", MULLER, S1, f"{S1}.2", f"{S1}.2.1", "SR", "20240101", "ISO_IR 192"),
    Inst("PID2", GERARD, S2, f"{S2}.1", f"{S2}.1.1", "MR", "20230505", "ISO_IR 100"),
    Inst("PID3", YAMADA, S3, f"{S3}.1", f"{S3}.1.1", "CT", "20220202", "ISO_IR 192"),
]
B_DATA = [
    Inst("PID3", YAMADA, S3, f"{S3}.1", f"{S3}.1.1", "CT", "20220202", "ISO_IR 192"),
    Inst("PID4", OZTURK, S4, f"{S4}.1", f"{S4}.1.1", "CT", "20210303", "ISO_IR 192"),
]
ECHO_ONLY_KEYS = {"SpecificCharacterSet", "QueryRetrieveLevel", "RetrieveAETitle"}


@pytest.fixture(scope="module")
def peers() -> Iterator[tuple[OrthancPeer, OrthancPeer]]:
    """Peer A keeps Orthanc's default encoding (Latin1); peer B answers in UTF-8."""
    require(orthanc_executable() is not None, "Orthanc (Debian package `orthanc`)")
    a = OrthancPeer("PEER_A")
    b = OrthancPeer("PEER_B", default_encoding="Utf8")
    try:
        a.start()
        b.start()
        started = ", ".join(f"{p.aet} {(p.start_seconds or 0) * 1000:.0f} ms" for p in (a, b))
        print(f"\northanc start: {started}")
        a.upload_many(i.part10() for i in A_DATA)
        b.upload_many(i.part10() for i in B_DATA)
        yield a, b
    finally:
        stop_all([a, b])


def _nodelay(event: Event) -> None:
    """pynetdicom never sets TCP_NODELAY; without it each DIMSE message stalls ~40 ms (Nagle, delayed ACK)."""
    transport = event.assoc.dul.socket
    assert transport is not None and transport.socket is not None
    transport.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def c_find(peer: OrthancPeer, model: str, **keys: str) -> list[Dataset]:
    """One association, one C-FIND; returns the pending identifiers and fails on any non-success end."""
    ae = AE("SPANNER_TEST")
    ae.add_requested_context(model)
    handlers: list[Any] = [(evt.EVT_CONN_OPEN, _nodelay)]
    assoc = ae.associate(peer.host, peer.dicom_port, ae_title=peer.aet, evt_handlers=handlers)
    assert assoc.is_established, f"association to {peer.aet} refused"
    query = Dataset()
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    answers: list[Dataset] = []
    try:
        for status, identifier in assoc.send_c_find(query, model):
            assert status is not None, "C-FIND got no response"
            if status.Status in (0xFF00, 0xFF01):
                assert identifier is not None
                answers.append(identifier)
            else:
                assert status.Status == 0x0000, f"C-FIND ended with status 0x{status.Status:04X}"
    finally:
        assoc.release()
    return answers


def by(answers: list[Dataset], keyword: str) -> dict[str, Dataset]:
    return {str(getattr(ds, keyword)): ds for ds in answers}


def test_peers_start_on_loopback(peers: tuple[OrthancPeer, OrthancPeer]) -> None:
    a, b = peers
    for peer in peers:  # how fast is for the benchmarks to say: a loaded machine may take seconds
        assert peer.start_seconds is not None
        assert peer.get("/system")["DicomAet"] == peer.aet
        assert peer.config()["RemoteAccessAllowed"] is False
        assert port_accepts(peer.dicom_port) and port_accepts(peer.http_port)
    assert len({a.dicom_port, a.http_port, b.dicom_port, b.http_port}) == 4
    assert a.statistics()["CountInstances"] == len(A_DATA) and len(a.instances()) == len(A_DATA)
    assert len(a.studies()) == 3 and len(b.studies()) == 2


def test_study_level_answers_fill_counts_and_modalities(peers: tuple[OrthancPeer, OrthancPeer]) -> None:
    a, _ = peers
    answers = c_find(
        a, StudyRootQueryRetrieveInformationModelFind, QueryRetrieveLevel="STUDY", StudyInstanceUID="",
        PatientName="", PatientID="", StudyDate="", ModalitiesInStudy="", NumberOfStudyRelatedSeries="",
        NumberOfStudyRelatedInstances="", InstitutionName="",
    )
    studies = by(answers, "StudyInstanceUID")
    assert set(studies) == {S1, S2, S3}
    s1 = studies[S1]
    assert str(s1.PatientName) == MULLER and s1.PatientID == "PID1" and s1.StudyDate == "20240101"
    assert list(s1.ModalitiesInStudy) == ["CT", "SR"]
    assert (s1.NumberOfStudyRelatedSeries, s1.NumberOfStudyRelatedInstances) == (2, 3)
    assert str(studies[S2].PatientName) == GERARD and studies[S2].ModalitiesInStudy == "MR"
    # Requested but absent from the file: returned empty, not left out.
    assert "InstitutionName" in s1 and s1.InstitutionName == ""
    # Orthanc adds these three to every answer whether asked or not.
    assert s1.SpecificCharacterSet == "ISO_IR 100" and s1.QueryRetrieveLevel == "STUDY"
    assert s1.RetrieveAETitle == a.aet


def test_study_level_matching(peers: tuple[OrthancPeer, OrthancPeer]) -> None:
    a, _ = peers
    find = StudyRootQueryRetrieveInformationModelFind
    name = c_find(a, find, QueryRetrieveLevel="STUDY", StudyInstanceUID="", PatientName="mü*")
    assert [ds.StudyInstanceUID for ds in name] == [S1]  # PN matching ignores case
    dates = c_find(a, find, QueryRetrieveLevel="STUDY", StudyInstanceUID="", StudyDate="20230101-")
    assert {ds.StudyInstanceUID for ds in dates} == {S1, S2}
    modality = c_find(a, find, QueryRetrieveLevel="STUDY", StudyInstanceUID="", ModalitiesInStudy="MR")
    assert [ds.StudyInstanceUID for ds in modality] == [S2]
    # A unique key that was not asked for is not returned either.
    bare = c_find(a, find, QueryRetrieveLevel="STUDY", PatientID="PID1")
    assert len(bare) == 1 and "StudyInstanceUID" not in bare[0]


def test_series_level_without_study_uid(peers: tuple[OrthancPeer, OrthancPeer]) -> None:
    a, _ = peers
    find = StudyRootQueryRetrieveInformationModelFind
    answers = c_find(a, find, QueryRetrieveLevel="SERIES", SeriesInstanceUID="", Modality="",
                     NumberOfSeriesRelatedInstances="")
    series = by(answers, "SeriesInstanceUID")
    assert set(series) == {i.series for i in A_DATA}  # relational: every series of every study
    assert series[f"{S1}.1"].Modality == "CT" and series[f"{S1}.1"].NumberOfSeriesRelatedInstances == 2
    assert "StudyInstanceUID" not in series[f"{S1}.1"]
    scoped = c_find(a, find, QueryRetrieveLevel="SERIES", StudyInstanceUID=S1, SeriesInstanceUID="")
    assert {ds.SeriesInstanceUID for ds in scoped} == {f"{S1}.1", f"{S1}.2"}
    assert all(ds.StudyInstanceUID == S1 for ds in scoped)


def test_image_level_without_series_uid(peers: tuple[OrthancPeer, OrthancPeer]) -> None:
    a, _ = peers
    find = StudyRootQueryRetrieveInformationModelFind
    in_study = c_find(a, find, QueryRetrieveLevel="IMAGE", StudyInstanceUID=S1, SOPInstanceUID="",
                      SOPClassUID="", InstanceNumber="")
    assert {ds.SOPInstanceUID for ds in in_study} == {i.sop for i in A_DATA if i.study == S1}
    assert all(ds.SOPClassUID == CT_IMAGE_STORAGE and "SeriesInstanceUID" not in ds for ds in in_study)
    everything = c_find(a, find, QueryRetrieveLevel="IMAGE", SOPInstanceUID="")
    assert {ds.SOPInstanceUID for ds in everything} == {i.sop for i in A_DATA}


def test_patient_level_patient_root(peers: tuple[OrthancPeer, OrthancPeer]) -> None:
    a, _ = peers
    answers = c_find(
        a, PatientRootQueryRetrieveInformationModelFind, QueryRetrieveLevel="PATIENT", PatientID="",
        PatientName="", NumberOfPatientRelatedStudies="", NumberOfPatientRelatedSeries="",
        NumberOfPatientRelatedInstances="",
    )
    patients = by(answers, "PatientID")
    assert set(patients) == {"PID1", "PID2", "PID3"}
    p1 = patients["PID1"]
    assert str(p1.PatientName) == MULLER
    assert (p1.NumberOfPatientRelatedStudies, p1.NumberOfPatientRelatedSeries,
            p1.NumberOfPatientRelatedInstances) == (1, 2, 3)


def test_answer_charset_is_default_encoding_not_the_files(peers: tuple[OrthancPeer, OrthancPeer]) -> None:
    """Latin1 (Orthanc's default) drops what Latin-1 cannot hold; Utf8 answers ISO_IR 192 intact."""
    a, b = peers
    find = StudyRootQueryRetrieveInformationModelFind
    for charset in ("ISO_IR 192", "ISO_IR 100"):  # the request's own charset changes nothing
        from_a = by(c_find(a, find, SpecificCharacterSet=charset, QueryRetrieveLevel="STUDY",
                           StudyInstanceUID="", PatientName=""), "StudyInstanceUID")
        assert {ds.SpecificCharacterSet for ds in from_a.values()} == {"ISO_IR 100"}
        assert str(from_a[S1].PatientName) == MULLER and str(from_a[S2].PatientName) == GERARD
        assert str(from_a[S3].PatientName) == "^"  # 山田^太郎 lost: not representable in Latin-1
    from_b = by(c_find(b, find, QueryRetrieveLevel="STUDY", StudyInstanceUID="", PatientName=""),
                "StudyInstanceUID")
    assert {ds.SpecificCharacterSet for ds in from_b.values()} == {"ISO_IR 192"}
    assert str(from_b[S3].PatientName) == YAMADA and str(from_b[S4].PatientName) == OZTURK
    matched = c_find(b, find, SpecificCharacterSet="ISO_IR 192", QueryRetrieveLevel="STUDY",
                     StudyInstanceUID="", PatientName="山*")
    assert [ds.StudyInstanceUID for ds in matched] == [S3]


def _findscu(peer: OrthancPeer, out: Path, nodelay: bool) -> tuple[float, list[Dataset]]:
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    if nodelay:
        env["TCP_NODELAY"] = "1"
    keys = ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={S1}", "PatientName",
            "NumberOfStudyRelatedInstances", "ModalitiesInStudy"]
    args = ["findscu", "-S", *(arg for key in keys for arg in ("-k", key)), "-X", "-od", str(out),
            peer.host, str(peer.dicom_port), "-aec", peer.aet, "-aet", "FINDSCU"]
    started = time.monotonic()
    run = subprocess.run(args, capture_output=True, env=env, timeout=10, check=False)
    elapsed = time.monotonic() - started
    assert run.returncode == 0, run.stderr.decode("utf-8", "replace")
    return elapsed, [dcmread(path) for path in sorted(out.glob("rsp*.dcm"))]


@pytest.mark.dcmtk
def test_findscu_study_query(peers: tuple[OrthancPeer, OrthancPeer], tmp_path: Path) -> None:
    require(shutil.which("findscu") is not None, "dcmtk findscu")
    a, _ = peers
    timings: dict[bool, list[float]] = {True: [], False: []}
    for round_ in range(2):
        for nodelay in (True, False):
            elapsed, answers = _findscu(a, tmp_path / f"{round_}-{nodelay}", nodelay)
            timings[nodelay].append(elapsed)
            assert len(answers) == 1
            ds = answers[0]
            assert ds.StudyInstanceUID == S1 and str(ds.PatientName) == MULLER
            assert ds.NumberOfStudyRelatedInstances == 3 and list(ds.ModalitiesInStudy) == ["CT", "SR"]
    print(f"\nfindscu vs Orthanc(TCP_NODELAY=1): with TCP_NODELAY=1 {min(timings[True]) * 1000:.0f} ms, "
          f"without {min(timings[False]) * 1000:.0f} ms")


def test_upload_rate_and_stop_cleans_up() -> None:
    """A throwaway peer: REST upload rate, then stop() must end the process and remove its folder."""
    require(orthanc_executable() is not None, "Orthanc (Debian package `orthanc`)")
    count = 100
    files = [write_part10(ds) for ds in generate_uniform(seed=7, node_index=0, studies=count)]
    with OrthancPeer("RATE") as peer:
        started = time.monotonic()
        assert peer.upload_many(files) == count
        rate = count / (time.monotonic() - started)
        assert peer.statistics()["CountInstances"] == count
        pid, workdir, port = peer.pid, peer.workdir, peer.http_port
        assert pid is not None
        stop_started = time.monotonic()
    stop_s = time.monotonic() - stop_started
    print(f"\nREST upload: {rate:.0f} instances/s on one keep-alive connection; graceful stop {stop_s:.1f} s")
    assert not workdir.exists() and not port_accepts(port)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_c_move_to_a_declared_modality(peers: tuple[OrthancPeer, OrthancPeer]) -> None:
    """A C-MOVE destination declared at run time (PUT /modalities) receives the study (SynchronousCMove)."""
    a, _ = peers
    with OrthancPeer("DEST") as dest:
        a.add_modality("dest", dest.aet, dest.dicom_port)
        ae = AE("SPANNER_TEST")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = ae.associate(a.host, a.dicom_port, ae_title=a.aet)
        assert assoc.is_established
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = S1
        try:
            responses = assoc.send_c_move(query, dest.aet, StudyRootQueryRetrieveInformationModelMove)
            statuses = [status.Status for status, _ in responses if status is not None]
        finally:
            assoc.release()
        assert statuses[-1] == 0x0000
        assert dest.statistics()["CountInstances"] == 3
        dest.stop(graceful=False)


def test_start_failure_raises_with_log_tail() -> None:
    """A port Orthanc cannot bind must fail fast with its log, not hang until the deadline."""
    require(orthanc_executable() is not None, "Orthanc (Debian package `orthanc`)")
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        busy = blocker.getsockname()[1]
        peer = OrthancPeer("BROKEN", extra_config={"DicomPort": busy})  # collides on every attempt
        started = time.monotonic()
        with pytest.raises(OrthancPeerError, match="Orthanc exited") as info:
            peer.start(attempts=1)
        assert time.monotonic() - started < 2.0
        assert "already in use" in str(info.value)  # the log tail carries Orthanc's reason
        assert not peer.running


def test_wait_for_port_deadline() -> None:
    """Nobody listens on a just-freed port: the wait gives up at its deadline."""
    port = free_port()
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        wait_for_port(port, deadline_s=0.1)
    assert time.monotonic() - started < 1.0
