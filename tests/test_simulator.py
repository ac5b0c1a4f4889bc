"""The PACS simulator: generated data, the index, and real loopback C-FIND with pynetdicom and dcmtk.

One simulator serves the whole module (pynetdicom's server takes 0.5 s to stop); each test sets
the fault it needs and the ``sim`` fixture resets it. No Ray here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association

from simulator.dataset import generate_fleet, generate_uniform, node_charset, write_part10
from simulator.fleet import DEMO_NODES, start_demo_fleet, stop_fleet
from simulator.index import IdentifierError, Index
from simulator.scp import (
    PATIENT_ROOT_FIND,
    STUDY_ROOT_FIND,
    VERIFICATION,
    SimulatedPacs,
    SimulatorConfig,
    enable_nodelay,
)
from simulator.wire import WireSimulatedPacs
from spanner.query import InformationModel, Level
from tests.conftest import require

LOOPBACK = "127.0.0.1"
SEED = 42
NODE = 1  # an ISO_IR 100 node: Latin-1 on the wire
PATIENT_ROOT = InformationModel.PATIENT_ROOT
STUDY_ROOT = InformationModel.STUDY_ROOT
SOP_UIDS = {PATIENT_ROOT: PATIENT_ROOT_FIND, STUDY_ROOT: STUDY_ROOT_FIND}
INSTANCE_KEYWORDS = (
    "SOPClassUID", "SOPInstanceUID", "Modality", "StudyDate", "StudyTime", "SeriesDate", "SeriesTime",
    "ContentDate", "ContentTime", "AccessionNumber", "StudyID", "SeriesDescription", "SeriesNumber",
    "InstanceNumber", "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
    "StudyInstanceUID", "SeriesInstanceUID", "SpecificCharacterSet",
)


# -- helpers -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def universe() -> list[list[Dataset]]:
    return generate_fleet(SEED, 3)


@pytest.fixture(scope="module")
def node(universe: list[list[Dataset]]) -> list[Dataset]:
    return universe[NODE]


@pytest.fixture(scope="module", params=["pynetdicom", "wire"])
def pacs(node: list[Dataset], request: pytest.FixtureRequest) -> Iterator[SimulatedPacs]:
    """Both engines behave alike on the wire: every test of a running simulator runs against each."""
    engine = WireSimulatedPacs if request.param == "wire" else SimulatedPacs
    simulator = engine(SimulatorConfig(ae_title="SIM_T", seed=1), node)
    simulator.start()
    yield simulator
    simulator.stop()


@pytest.fixture
def sim(pacs: SimulatedPacs) -> Iterator[SimulatedPacs]:
    pacs.set_fault("none", latency_ms=0, jitter_ms=0)
    pacs.reset_counters()
    yield pacs
    pacs.set_fault("none", latency_ms=0, jitter_ms=0)


@contextmanager
def association(port: int, dimse_timeout: float = 5.0, max_pdu: int = 16382) -> Iterator[Association]:
    """A pynetdicom SCU association with TCP_NODELAY, released (if still up) on exit."""
    ae = AE(ae_title="PYTEST_SCU")
    ae.maximum_pdu_size = max_pdu
    for uid in (VERIFICATION, PATIENT_ROOT_FIND, STUDY_ROOT_FIND):
        ae.add_requested_context(uid)
    ae.acse_timeout = 5
    ae.network_timeout = 5
    ae.dimse_timeout = dimse_timeout
    handlers: list[Any] = [(evt.EVT_CONN_OPEN, enable_nodelay)]
    assoc = ae.associate(LOOPBACK, port, ae_title="ANY_CALLED", evt_handlers=handlers)
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def query(level: Level, **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level.value
    for keyword, value in keys.items():
        setattr(ds, keyword, value or None)
    return ds


def find(assoc: Association, identifier: Dataset, model: InformationModel = STUDY_ROOT,
         msg_id: int = 1) -> tuple[list[Dataset], Dataset | None]:
    """Pending identifiers and the final status dataset (None when the association went away)."""
    matches: list[Dataset] = []
    final: Dataset | None = None
    for status, ds in assoc.send_c_find(identifier, SOP_UIDS[model], msg_id=msg_id):
        if "Status" not in status:
            break
        if status.Status in (0xFF00, 0xFF01):
            assert ds is not None
            matches.append(ds)
        else:
            final = status
    return matches, final


def code(status: Dataset | None) -> int | None:
    return int(status.Status) if status is not None else None


def wait_until(condition: Callable[[], bool], timeout_s: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def by_study(instances: list[Dataset]) -> dict[str, list[Dataset]]:
    out: dict[str, list[Dataset]] = defaultdict(list)
    for ds in instances:
        out[ds.StudyInstanceUID].append(ds)
    return out


def port_accepts(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.2):
            return True
    except OSError:
        return False


# -- generated data ------------------------------------------------------------------------------
def test_fleet_is_deterministic_per_seed(universe: list[list[Dataset]]) -> None:
    again = generate_fleet(SEED, 3)
    assert [[d.SOPInstanceUID for d in n] for n in again] == [[d.SOPInstanceUID for d in n] for n in universe]
    other = generate_fleet(SEED + 1, 3)
    assert not {d.SOPInstanceUID for d in other[0]} & {d.SOPInstanceUID for d in universe[0]}


def test_fleet_shares_patients_and_studies_mirrored_and_split(universe: list[list[Dataset]]) -> None:
    series_on: dict[str, dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))
    patients_on: dict[str, set[int]] = defaultdict(set)
    for index, instances in enumerate(universe):
        for ds in instances:
            series_on[ds.StudyInstanceUID][index].add(ds.SeriesInstanceUID)
            patients_on[ds.PatientID].add(index)
    shared = {uid: nodes for uid, nodes in series_on.items() if len(nodes) > 1}
    mirrored = [uid for uid, nodes in shared.items() if len({frozenset(s) for s in nodes.values()}) == 1]
    split = [uid for uid, nodes in shared.items()
             if all(not (a & b) for i, a in nodes.items() for j, b in nodes.items() if i < j)]
    assert mirrored and split
    assert any(len(nodes) == 3 for nodes in patients_on.values())
    assert any(len(nodes) == 1 for nodes in patients_on.values())


def test_copies_of_a_study_differ_in_completeness(universe: list[list[Dataset]]) -> None:
    holders: dict[str, list[Dataset]] = defaultdict(list)
    for instances in universe:
        for study in by_study(instances).values():
            holders[study[0].StudyInstanceUID].append(study[0])
    incomplete = [copies for copies in holders.values() if len(copies) > 1
                  and any("StudyDescription" not in c or "ReferringPhysicianName" not in c for c in copies)
                  and any("StudyDescription" in c and "ReferringPhysicianName" in c for c in copies)]
    assert incomplete


def test_names_and_character_sets(universe: list[list[Dataset]]) -> None:
    names = {str(d.PatientName) for n in universe for d in n}
    assert {"Müller^Jörg", "Øster^Åse"} <= names
    for index, instances in enumerate(universe):
        assert {d.SpecificCharacterSet for d in instances} == {node_charset(index)}
    assert {node_charset(i) for i in range(3)} == {"ISO_IR 100", "ISO_IR 192"}


def test_instances_carry_every_level(universe: list[list[Dataset]]) -> None:
    for ds in universe[0]:
        assert all(keyword in ds for keyword in INSTANCE_KEYWORDS)
        assert "PixelData" not in ds
    assert {d.SOPClassUID.name for n in universe for d in n} >= {"CT Image Storage"}


def test_uniform_studies_are_distinct_and_unshared() -> None:
    node0 = generate_uniform(7, 0, 25, series_per_study=2, instances_per_series=3)
    node1 = generate_uniform(7, 1, 25, series_per_study=2, instances_per_series=3)
    assert len(node0) == 150
    assert len(by_study(node0)) == 25
    assert {len(study) for study in by_study(node0).values()} == {6}
    assert not {d.StudyInstanceUID for d in node0} & {d.StudyInstanceUID for d in node1}
    assert not {d.PatientID for d in node0} & {d.PatientID for d in node1}
    assert [d.SOPInstanceUID for d in generate_uniform(7, 0, 25, 2, 3)] == [d.SOPInstanceUID for d in node0]


def test_part10_round_trip(node: list[Dataset]) -> None:
    source = next(d for d in node if str(d.PatientName) == "Øster^Åse")
    data = write_part10(source)
    assert data[128:132] == b"DICM"
    assert "Øster".encode("latin-1") in data  # written in the node's ISO_IR 100
    back = dcmread(BytesIO(data))
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert back.file_meta.MediaStorageSOPInstanceUID == source.SOPInstanceUID
    assert str(back.PatientName) == "Øster^Åse"
    assert "TransferSyntaxUID" not in getattr(source, "file_meta", Dataset())


# -- the index -----------------------------------------------------------------------------------
def test_index_computes_counts_and_modalities(node: list[Dataset]) -> None:
    index = Index(node, ae_title="SIM_T")
    for uid, instances in by_study(node).items():
        (record,) = index.search(Level.STUDY, {"StudyInstanceUID": uid})
        assert record.lookup("NumberOfStudyRelatedInstances") == (str(len(instances)),)
        series = {d.SeriesInstanceUID for d in instances}
        assert record.lookup("NumberOfStudyRelatedSeries") == (str(len(series)),)
        assert record.lookup("ModalitiesInStudy") == tuple(sorted({d.Modality for d in instances}))
        assert record.lookup("SOPClassesInStudy") == tuple(sorted({d.SOPClassUID for d in instances}))
    patient_id = node[0].PatientID
    (patient,) = index.search(Level.PATIENT, {"PatientID": patient_id})
    mine = [d for d in node if d.PatientID == patient_id]
    assert patient.lookup("NumberOfPatientRelatedStudies") == (str(len(by_study(mine))),)
    assert patient.lookup("NumberOfPatientRelatedInstances") == (str(len(mine)),)


def test_response_holds_exactly_the_requested_keys(node: list[Dataset]) -> None:
    index = Index(node, ae_title="SIM_T")
    request = query(Level.STUDY, StudyInstanceUID=node[0].StudyInstanceUID, PatientName="", SOPInstanceUID="",
                    NameOfPhysiciansReadingStudy="")
    (response,) = index.find(request, STUDY_ROOT)
    assert {e.keyword for e in response} == {
        "StudyInstanceUID", "PatientName", "SOPInstanceUID", "NameOfPhysiciansReadingStudy",
        "QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle",
    }
    assert response.SpecificCharacterSet == "ISO_IR 100"
    assert response.RetrieveAETitle == "SIM_T"
    assert response.SOPInstanceUID in (None, "")  # below the level: returned empty
    assert response.NameOfPhysiciansReadingStudy in (None, "")


def test_level_outside_the_model_is_refused(node: list[Dataset]) -> None:
    index = Index(node)
    with pytest.raises(IdentifierError) as info:
        index.find(query(Level.PATIENT, PatientID=""), STUDY_ROOT)
    assert info.value.status == 0xA900
    with pytest.raises(IdentifierError):
        index.find(Dataset(), PATIENT_ROOT)


def test_patient_root_below_patient_level_is_relational(node: list[Dataset]) -> None:
    patient_id = node[0].PatientID
    expected = {d.SeriesInstanceUID for d in node if d.PatientID == patient_id}
    request = query(Level.SERIES, PatientID=patient_id, SeriesInstanceUID="")
    responses = Index(node).find(request, PATIENT_ROOT)
    assert {r.SeriesInstanceUID for r in responses} == expected


# -- on the wire ---------------------------------------------------------------------------------
def test_echo(sim: SimulatedPacs) -> None:
    with association(sim.port) as assoc:
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
    assert sim.counters.echoes == 1
    assert sim.counters.associations == 1


Nodes = list[Dataset]
Case = tuple[Level, InformationModel, Callable[[Nodes], dict[str, str]], str, Callable[[Nodes], set[str]]]


def _of_patient(n: Nodes, attr: str) -> set[str]:
    return {str(d[attr].value) for d in n if d.PatientID == n[0].PatientID}


def _where(n: Nodes, attr: str, parent: str, ref: Dataset) -> set[str]:
    return {str(d[attr].value) for d in n if d[parent].value == ref[parent].value}


CASES: dict[str, Case] = {
    "patient/patient-root": (Level.PATIENT, PATIENT_ROOT, lambda n: {}, "PatientID",
                             lambda n: {d.PatientID for d in n}),
    "study/patient-root": (Level.STUDY, PATIENT_ROOT, lambda n: {"PatientID": n[0].PatientID},
                           "StudyInstanceUID", lambda n: _of_patient(n, "StudyInstanceUID")),
    "study/study-root": (Level.STUDY, STUDY_ROOT, lambda n: {}, "StudyInstanceUID",
                         lambda n: {d.StudyInstanceUID for d in n}),
    "series/study-root": (Level.SERIES, STUDY_ROOT, lambda n: {"StudyInstanceUID": n[-1].StudyInstanceUID},
                          "SeriesInstanceUID",
                          lambda n: _where(n, "SeriesInstanceUID", "StudyInstanceUID", n[-1])),
    "series/patient-root-relational": (Level.SERIES, PATIENT_ROOT, lambda n: {"PatientID": n[0].PatientID},
                                       "SeriesInstanceUID", lambda n: _of_patient(n, "SeriesInstanceUID")),
    "image/study-root": (Level.IMAGE, STUDY_ROOT, lambda n: {"SeriesInstanceUID": n[0].SeriesInstanceUID},
                         "SOPInstanceUID", lambda n: _where(n, "SOPInstanceUID", "SeriesInstanceUID", n[0])),
    "image/patient-root": (Level.IMAGE, PATIENT_ROOT, lambda n: {"StudyInstanceUID": n[0].StudyInstanceUID},
                           "SOPInstanceUID", lambda n: _where(n, "SOPInstanceUID", "StudyInstanceUID", n[0])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_find_each_level_and_model(sim: SimulatedPacs, node: list[Dataset], case: str) -> None:
    level, model, filters, key, expected = CASES[case]
    with association(sim.port) as assoc:
        matches, final = find(assoc, query(level, **{key: "", **filters(node)}), model)
    assert code(final) == 0x0000
    assert {str(m[key].value) for m in matches} == expected(node)
    assert all(m.QueryRetrieveLevel == level.value and m.RetrieveAETitle == "SIM_T" for m in matches)


def test_study_attributes_on_the_wire(sim: SimulatedPacs, node: list[Dataset]) -> None:
    request = query(Level.STUDY, StudyInstanceUID="", PatientName="øster*", ModalitiesInStudy="",
                    NumberOfStudyRelatedInstances="", StudyDate="20000101-")
    request.SpecificCharacterSet = "ISO_IR 192"
    with association(sim.port) as assoc:
        matches, final = find(assoc, request)
    studies = by_study([d for d in node if str(d.PatientName) == "Øster^Åse"])
    assert code(final) == 0
    assert {m.StudyInstanceUID for m in matches} == set(studies)
    for match in matches:
        instances = studies[match.StudyInstanceUID]
        assert match.SpecificCharacterSet == "ISO_IR 100"
        assert str(match.PatientName) == "Øster^Åse"
        assert int(match.NumberOfStudyRelatedInstances) == len(instances)
        modalities = match.ModalitiesInStudy
        assert sorted([modalities] if isinstance(modalities, str) else modalities) == sorted(
            {d.Modality for d in instances})


@pytest.mark.dcmtk
def test_findscu_against_the_simulator(sim: SimulatedPacs, node: list[Dataset], tmp_path: Path) -> None:
    findscu = shutil.which("findscu")
    if findscu is None:
        require(False, "dcmtk findscu")
        return
    command = [findscu, "-S", "-aet", "DCMTK", "-aec", "SIM_T", "-X", "-od", str(tmp_path),
               "-k", "QueryRetrieveLevel=STUDY", "-k", "SpecificCharacterSet=ISO_IR 192",
               "-k", "StudyInstanceUID", "-k", "PatientName=Øster*", "-k", "NumberOfStudyRelatedSeries",
               LOOPBACK, str(sim.port)]
    result = subprocess.run(command, capture_output=True, timeout=20, env={**os.environ, "TCP_NODELAY": "1"})
    assert result.returncode == 0, result.stderr.decode("latin-1")
    responses = [dcmread(path) for path in sorted(tmp_path.glob("rsp*.dcm"))]
    expected = {d.StudyInstanceUID for d in node if str(d.PatientName) == "Øster^Åse"}
    assert {r.StudyInstanceUID for r in responses} == expected
    assert {str(r.PatientName) for r in responses} == {"Øster^Åse"}
    assert sim.counters.finds == 1


# -- faults --------------------------------------------------------------------------------------
def test_refuse_rejects_the_association(sim: SimulatedPacs) -> None:
    sim.set_fault("refuse")
    with association(sim.port) as assoc:
        assert assoc.is_rejected
        assert not assoc.is_established
    assert sim.counters.refused == 1
    sim.set_fault("none")
    with association(sim.port) as assoc:
        assert assoc.send_c_echo().Status == 0


def test_abort_after_n_pending_responses(sim: SimulatedPacs, node: list[Dataset]) -> None:
    assert len(by_study(node)) > 3
    sim.set_fault("abort", abort_after=2)
    with association(sim.port) as assoc:
        matches, final = find(assoc, query(Level.STUDY, StudyInstanceUID=""))
        assert len(matches) == 2
        assert final is None
        assert wait_until(lambda: assoc.is_aborted or not assoc.is_established)


def test_failure_answers_the_configured_status(sim: SimulatedPacs) -> None:
    sim.set_fault("failure", failure_status=0xC123)
    with association(sim.port) as assoc:
        matches, final = find(assoc, query(Level.STUDY, StudyInstanceUID=""))
    assert matches == []
    assert code(final) == 0xC123
    assert final is not None and "SIM_T" in final.ErrorComment


def test_hang_never_answers_and_ignores_cancel(sim: SimulatedPacs) -> None:
    sim.set_fault("hang")
    with association(sim.port, dimse_timeout=1.0) as assoc:
        timer = threading.Timer(0.1, assoc.send_c_cancel, (7,), {"query_model": STUDY_ROOT_FIND})
        timer.start()
        started = time.monotonic()
        matches, final = find(assoc, query(Level.STUDY, StudyInstanceUID=""), msg_id=7)
        elapsed = time.monotonic() - started
        timer.join()
    assert matches == [] and final is None  # the SCU gave up at its DIMSE timeout and aborted
    assert elapsed >= 0.9
    assert sim.counters.cancels == 1
    assert wait_until(lambda: sim.active_associations == 0), "the hanging handler outlived the abort"


def test_slow_honours_cancel_promptly(sim: SimulatedPacs) -> None:
    sim.set_fault("slow", slow_ms=5000)
    with association(sim.port) as assoc:
        timer = threading.Timer(0.1, assoc.send_c_cancel, (3,), {"query_model": STUDY_ROOT_FIND})
        timer.start()
        started = time.monotonic()
        matches, final = find(assoc, query(Level.STUDY, StudyInstanceUID=""), msg_id=3)
        elapsed = time.monotonic() - started
        timer.join()
        assert assoc.send_c_echo().Status == 0  # the association is still usable
    assert code(final) == 0xFE00
    assert matches == []
    assert elapsed < 0.6
    assert sim.counters.cancels == 1


def test_unknown_fault_is_refused(sim: SimulatedPacs) -> None:
    with pytest.raises(ValueError, match="fault"):
        sim.set_fault("explode")  # type: ignore[arg-type]


# -- latency and load ----------------------------------------------------------------------------
def first_response_after(assoc: Association) -> float:
    started = time.monotonic()
    responses = assoc.send_c_find(query(Level.STUDY, StudyInstanceUID=""), STUDY_ROOT_FIND)
    next(responses)
    elapsed = time.monotonic() - started
    for _ in responses:
        pass
    return elapsed


def test_latency_and_jitter_are_honoured(sim: SimulatedPacs) -> None:
    with association(sim.port) as assoc:
        baseline = first_response_after(assoc)
        sim.set_fault("none", latency_ms=200)
        delayed = first_response_after(assoc)
        sim.set_fault("none", latency_ms=100, jitter_ms=100)
        jittered = [first_response_after(assoc) for _ in range(3)]
    assert baseline < 0.1
    assert 0.2 <= delayed < 0.2 + 0.15
    assert all(0.1 <= t < 0.2 + 0.15 for t in jittered)


def test_many_concurrent_associations(sim: SimulatedPacs, node: list[Dataset]) -> None:
    counts: list[int] = []

    def one() -> None:
        with association(sim.port) as assoc:
            matches, final = find(assoc, query(Level.STUDY, StudyInstanceUID=""))
            if code(final) == 0:
                counts.append(len(matches))

    threads = [threading.Thread(target=one) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert counts == [len(by_study(node))] * 12


def test_answers_are_fragmented_to_the_peers_maximum_pdu(sim: SimulatedPacs, node: list[Dataset]) -> None:
    """A peer that takes small PDUs (here 128 bytes, below one identifier) gets every answer whole."""
    images = query(Level.IMAGE, StudyInstanceUID="", SOPInstanceUID="", PatientName="")
    with association(sim.port) as roomy:
        expected, _ = find(roomy, images)
    with association(sim.port, max_pdu=128) as tight:
        matches, final = find(tight, images)
    assert code(final) == 0 and len(matches) == len(expected) == len(node)
    assert [m.to_json_dict() for m in matches] == [m.to_json_dict() for m in expected]


def test_garbage_ends_that_connection_only(sim: SimulatedPacs) -> None:
    junks = (b"\x01\x00\x00\x00\x00\x05hello", b"\x04\x00\x00\x00\x00\x02\x00\x00", b"GET / HTTP/1.1\r\n\r\n")
    for junk in junks:
        with socket.create_connection((LOOPBACK, sim.port), timeout=2) as sock:
            sock.sendall(junk)
            sock.shutdown(socket.SHUT_WR)
            with contextlib.suppress(OSError):
                while sock.recv(4096):
                    pass
    with association(sim.port) as assoc:
        assert assoc.send_c_echo().Status == 0


# -- fleet and serve_forever ---------------------------------------------------------------------
def test_demo_fleet() -> None:
    fleet = start_demo_fleet()
    ports = [p.port for p in fleet]
    try:
        assert [p.ae_title for p in fleet] == [n.ae_title for n in DEMO_NODES] == ["SIM_A", "SIM_B", "SIM_C"]
        assert [n.name for n in DEMO_NODES] == ["demo-a", "demo-b", "demo-c"]
        assert len(set(ports)) == 3 and 0 not in ports
        with association(fleet[0].port) as assoc:
            request = query(Level.PATIENT, PatientName="MÜLLER*", PatientID="")
            matches, final = find(assoc, request, PATIENT_ROOT)
        assert code(final) == 0
        assert [str(m.PatientName) for m in matches] == ["Müller^Jörg"]
        assert matches[0].SpecificCharacterSet == "ISO_IR 192"
        assert matches[0].RetrieveAETitle == "SIM_A"
    finally:
        stop_fleet(fleet)
    assert not any(port_accepts(port) for port in ports)


def test_serve_forever_until_sigterm() -> None:
    script = (
        "from simulator.dataset import generate_fleet\n"
        "from simulator.scp import SimulatorConfig, serve_forever\n"
        "serve_forever(SimulatorConfig(ae_title='SIM_CLI'), generate_fleet(1, 1, 2)[0],\n"
        "              on_started=lambda p: print(p.port, flush=True))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        with association(port) as assoc:
            assert assoc.send_c_echo().Status == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_c_move_sends_the_matching_instances_to_a_known_destination_only(tmp_path: Path) -> None:
    """A destination listed in move_destinations gets every instance of the study by C-STORE; any other
    AE title is answered 0xA801 (move destination unknown), as an archive does."""
    from spanner.dicom_constants import STUDY_ROOT_MOVE
    from tests.peers.instances import Storescp

    instances = generate_fleet(5, 1, 4)[0]
    study = str(instances[0].StudyInstanceUID)
    expected = {str(ds.SOPInstanceUID) for ds in instances if ds.StudyInstanceUID == study}
    storescp = Storescp(tmp_path)
    config = SimulatorConfig(ae_title="SIM_MOVE", move_destinations=(("DEST", "127.0.0.1", storescp.port),))
    pacs = SimulatedPacs(config, instances)
    pacs.start()
    try:
        ae = AE(ae_title="MOVER")
        ae.add_requested_context(STUDY_ROOT_MOVE)
        assoc = ae.associate("127.0.0.1", pacs.port, ae_title="SIM_MOVE")
        ds = Dataset()
        ds.QueryRetrieveLevel, ds.StudyInstanceUID = "STUDY", study
        known = [int(st.Status) for st, _ in assoc.send_c_move(ds, "DEST", STUDY_ROOT_MOVE)]
        unknown = [int(st.Status) for st, _ in assoc.send_c_move(ds, "NOWHERE", STUDY_ROOT_MOVE)]
        assoc.release()
    finally:
        pacs.stop()
        storescp.stop()
    assert known[-1] == 0x0000 and unknown == [0xA801], (known, unknown)
    assert set(storescp.received()) == expected and pacs.counters.moves == 2
