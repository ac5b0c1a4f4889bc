"""A small clinical universe for DICOMweb tests, the benchmark and the conformance check: the same
instances go whole into a reference Orthanc-DICOMweb and spread over two archives behind the spanner.

Archive ``a`` and ``b`` share a patient; one study is split (its CT series on ``a``, its MR series on
``b``), one is mirrored (the same instances on both), the rest live on one archive each. Every instance
of a study carries the same study attributes, as a modality writes them.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tests.peers.orthanc import OrthancPeer, dicomweb_plugin, make_instance, orthanc_executable, stop_all

if TYPE_CHECKING:
    from tests.conftest import Api

ROOT = "1.2.826.0.1.3680043.10.1437.99"
SPLIT_STUDY = f"{ROOT}.1"
MIRRORED_STUDY = f"{ROOT}.2"


@dataclass(frozen=True, slots=True)
class Study:
    uid: str
    patient_id: str
    patient_name: str
    date: str
    description: str
    accession: str
    birth_date: str
    sex: str
    series: tuple[tuple[str, str, int, str], ...]
    """(modality, description, instances, archives: 'a', 'b' or 'ab')"""


STUDIES = (
    Study(SPLIT_STUDY, "PAT-1", "Müller^Jörg", "20240105", "Thorax", "ACC-1", "19600101", "M",
          (("CT", "Thorax axial", 3, "a"), ("MR", "Thorax T1", 2, "b"))),
    Study(MIRRORED_STUDY, "PAT-1", "Müller^Jörg", "20230310", "Knee", "ACC-2", "19600101", "M",
          (("MR", "Knee PD", 2, "ab"),)),
    Study(f"{ROOT}.3", "PAT-2", "Doe^Jane", "20240220", "Head", "ACC-3", "19751212", "F",
          (("CT", "Head plain", 2, "a"), ("CT", "Head contrast", 1, "a"))),
    Study(f"{ROOT}.4", "PAT-3", "Roe^Richard", "20221130", "Abdomen", "ACC-4", "19881020", "M",
          (("US", "Liver", 1, "b"),)),
    Study(f"{ROOT}.5", "PAT-2", "Doe^Jane", "20240601", "Chest", "ACC-5", "19751212", "F",
          (("CR", "PA", 1, "b"), ("CR", "Lateral", 1, "b"))),
    Study(f"{ROOT}.6", "PAT-4", "Dunn^Anna", "20190715", "Spine", "", "", "",
          (("MR", "Lumbar T2", 1, "a"),)),
)


def instances(archive: str | None = None) -> list[bytes]:
    """Part-10 files of every instance (``archive`` None: the whole universe, for the reference) or of
    those archive ``a`` or ``b`` holds."""
    files: list[bytes] = []
    for study_index, study in enumerate(STUDIES, start=1):
        for series_index, (modality, description, count, holders) in enumerate(study.series, start=1):
            if archive is not None and archive not in holders:
                continue
            series_uid = f"{study.uid}.{series_index}"
            for number in range(1, count + 1):
                files.append(make_instance(
                    study.patient_id, study.patient_name, study.uid, series_uid, f"{series_uid}.{number}",
                    modality=modality, study_date=study.date, StudyDescription=study.description,
                    AccessionNumber=study.accession, PatientBirthDate=study.birth_date,
                    PatientSex=study.sex, SeriesDescription=description, SeriesNumber=series_index,
                    InstanceNumber=number, StudyID=str(study_index), SeriesDate=study.date,
                    SeriesTime="1200" + f"{series_index:02d}", ReferringPhysicianName="Welby^Marcus",
                ))
    return files


NODES = ("dw-a", "dw-b")
SPAN = "dw"


class Universe:
    """A reference Orthanc-DICOMweb holding every instance, and archives ``a`` and ``b`` registered with
    the spanner as nodes of span ``dw`` (``a`` first by priority); ended by PID on ``close``."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.reference = OrthancPeer(aet="REFERENCE", dicomweb=True, default_encoding="Utf8")
        self.archives = {name: OrthancPeer(aet=f"DW{name[-1].upper()}", default_encoding="Utf8")
                         for name in NODES}

    def start(self) -> Universe:
        try:
            self.reference.start()
            self.reference.upload_many(instances())
            for priority, (name, peer) in enumerate(self.archives.items(), start=1):
                peer.start()
                peer.upload_many(instances(name[-1]))
                self.api.add_node(name, peer.dicom_port, ae_title=peer.aet, priority=priority)
            self.api.add_span(SPAN, list(NODES), ae_title="DWSPAN")
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        self.api.http.delete(f"/api/v1/spans/{SPAN}")
        for name in NODES:
            self.api.http.delete(f"/api/v1/nodes/{name}")
        stop_all([self.reference, *self.archives.values()], graceful=False)


def universe_of(api: Api) -> Iterator[Universe]:
    """A module fixture's body: the universe started (or the peers it needs required), then closed."""
    from tests.conftest import require

    require(orthanc_executable() is not None, "Debian's orthanc")
    require(dicomweb_plugin() is not None, "Debian's orthanc-dicomweb")
    require(shutil.which("findscu") is not None, "dcmtk")
    world = Universe(api).start()
    yield world
    world.close()
