"""The fast DICOM JSON conversion of matches equals pydicom's, and falls back where it must."""

from __future__ import annotations

from io import BytesIO
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom.dsutils import decode, encode

from actors.dicom_json import DROP, from_bytes, to_match
from simulator.dataset import generate_fleet
from simulator.index import Index
from spanner.query import Level, NodeQuery

EXTRA = (
    "ModalitiesInStudy",
    "NumberOfStudyRelatedInstances",
    "SOPClassesInStudy",
    "InstanceNumber",
    "SeriesNumber",
    "NumberOfPatientRelatedStudies",
)


def wire(ds: Dataset, implicit: bool = True, little: bool = True) -> Dataset:
    """``ds`` as a node actor receives it: encoded, then decoded lazily into raw elements."""
    data = encode(ds, implicit, little)
    assert data is not None
    return decode(BytesIO(data), implicit, little)


def reference(ds: Dataset) -> dict[str, Any]:
    out: dict[str, Any] = ds.to_json_dict()
    for tag in DROP:
        out.pop(f"{tag:08X}", None)
    return out


@pytest.mark.parametrize("level", list(Level))
def test_equal_to_pydicom_for_every_level_and_charset(level: Level) -> None:
    fleet = generate_fleet(seed=21, nodes=3, patients=15)  # ISO_IR 192 and ISO_IR 100 nodes, non-ASCII names
    checked = 0
    for node in fleet:
        index = Index(node, ae_title="X")
        query = NodeQuery(level, {}, EXTRA).identifier()
        for match in index.find(query, "patient_root" if level is Level.PATIENT else "study_root"):
            for implicit, little in ((True, True), (False, True), (False, False)):
                assert to_match(wire(match, implicit, little), little) == reference(
                    wire(match, implicit, little)
                )
            checked += 1
    assert checked > 10


def test_numbers_names_and_empty_values() -> None:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    ds.NumberOfStudyRelatedInstances = "12"
    ds.PatientWeight = "71.5"
    ds.ReferringPhysicianName = None
    ds.StudyDescription = "Kopf nativ äöü"
    got = to_match(wire(ds))
    assert got == reference(wire(ds))
    assert got["00100010"]["Value"][0]["Ideographic"] == "山田^太郎"
    assert got["00080090"] == {"vr": "PN"}


def test_falls_back_for_sequences_and_code_extensions() -> None:
    ds = Dataset()
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    ds.PatientName = "Yamada^Tarou"
    item = Dataset()
    item.CodeValue = "1"
    ds.ProcedureCodeSequence = [item]
    assert to_match(wire(ds)) == reference(wire(ds))


@pytest.mark.parametrize("level", list(Level))
def test_from_raw_bytes_equal_to_pydicom(level: Level) -> None:
    """What the node actor does with each C-FIND response: raw bytes straight to DICOM JSON."""
    fleet = generate_fleet(seed=22, nodes=3, patients=10)
    checked = 0
    for node in fleet:
        index = Index(node, ae_title="X")
        query = NodeQuery(level, {}, EXTRA).identifier()
        for match in index.find(query, "patient_root" if level is Level.PATIENT else "study_root"):
            for implicit in (True, False):
                data = encode(match, implicit, True)
                assert data is not None
                assert from_bytes(data, implicit) == reference(wire(match, implicit, True))
            checked += 1
    assert checked > 10


def test_from_raw_bytes_decodes_other_character_sets_and_falls_back() -> None:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Müller^Jörg"
    data = encode(ds, False, True)
    assert data is not None
    assert from_bytes(data, False)["00100010"]["Value"][0]["Alphabetic"] == "Müller^Jörg"
    ds = Dataset()
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    ds.PatientName = "Yamada^Tarou=山田^太郎"
    item = Dataset()
    item.CodeValue = "1"
    ds.ProcedureCodeSequence = [item]
    data = encode(ds, True, True)
    assert data is not None
    assert from_bytes(data, True) == reference(wire(ds))
