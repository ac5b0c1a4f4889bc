"""Seeded instance-level datasets for simulated PACS: a small hospital universe or a uniform load.

The fleet universe looks like real archives so that merging has something to do: several nodes
share patients and studies, a shared study is either mirrored (same series everywhere) or split
(different series on different nodes), and copies differ in completeness. Everything derives
from the seed (UIDs included), so tests and benchmarks can regenerate the same data anywhere.
"""

from __future__ import annotations

import datetime as dt
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from io import BytesIO

from pydicom import uid as uids
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset

ISSUER = "SPANNER_DEMO"
# Even nodes speak UTF-8, odd nodes Latin-1: a merge must cope with both.
CHARSETS = ("ISO_IR 192", "ISO_IR 100")
# Attributes a secondary copy of a study may lack (one of them, chosen per copy).
DROPPABLE = ("StudyDescription", "ReferringPhysicianName")

# Every name is Latin-1 encodable, so it survives on an ISO_IR 100 node.
_FAMILY = ("Müller", "Øster", "Smith", "García", "Dubois", "Nguyen", "Kowalski", "Jensen", "Rossi",
           "Schäfer", "O'Brien", "Lefèvre", "Brown", "Andersson", "Novák", "Nakamura")
_GIVEN = ("Jörg", "Åse", "Anna", "José", "Émile", "Ingrid", "Mark", "Zoë", "Søren", "Maria", "Peter",
          "Chloé", "Hiro", "Fatima", "Lars", "Inês")
_PHYSICIANS = ("House^Gregory", "Lindström^Åke", "Grey^Meredith", "Nóvoa^Luís", "Kildare^James")
# modality -> (SOP class, study descriptions, series descriptions)
_MODALITIES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "CT": (uids.CTImageStorage, ("CT CHEST W/O CONTRAST", "CT ABDOMEN PELVIS W CONTRAST", "CT HEAD"),
           ("AXIAL 5MM", "CORONAL MPR", "SCOUT", "AXIAL 1MM")),
    "MR": (uids.MRImageStorage, ("MR BRAIN W/WO CONTRAST", "MR KNEE LEFT", "MR LUMBAR SPINE"),
           ("T1 AXIAL", "T2 SAGITTAL", "FLAIR", "DWI")),
    "CR": (uids.ComputedRadiographyImageStorage, ("XR CHEST PA LAT",), ("PA", "LATERAL")),
    "US": (uids.UltrasoundImageStorage, ("US ABDOMEN", "US THYROID"), ("LIVER", "KIDNEYS", "CINE")),
    "DX": (uids.DigitalXRayImageStorageForPresentation, ("XR HAND RIGHT", "XR ANKLE LEFT"),
           ("AP", "OBLIQUE", "LATERAL")),
}
_DOSE_REPORT: tuple[str, str, str] = ("SR", uids.XRayRadiationDoseSRStorage, "RADIATION DOSE REPORT")
_EPOCH = dt.date(2015, 1, 1)
_SPAN_DAYS = 10 * 365


def make_uid(*parts: object) -> str:
    """A deterministic UID under 2.25 (ISO/IEC 9834-8): the decimal form of a name-based UUID."""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, '|'.join(('dicom-spanner', *map(str, parts)))).int}"


def node_charset(node_index: int) -> str:
    """The SpecificCharacterSet that node ``node_index`` writes into its datasets."""
    return CHARSETS[node_index % len(CHARSETS)]


@dataclass(slots=True)
class _Patient:
    name: str
    patient_id: str
    birth_date: str
    sex: str


@dataclass(slots=True)
class _Series:
    uid: str
    number: int
    modality: str
    sop_class: str
    description: str
    time: dt.datetime
    instance_uids: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Study:
    uid: str
    time: dt.datetime
    accession: str
    study_id: str
    description: str
    referring: str
    series: list[_Series] = field(default_factory=list)


def _make_patient(rng: random.Random, patient_id: str, index: int) -> _Patient:
    # The first two names are fixed non-ASCII ones so every universe exercises character sets.
    fixed = ("Müller^Jörg", "Øster^Åse")
    name = fixed[index] if index < len(fixed) else f"{rng.choice(_FAMILY)}^{rng.choice(_GIVEN)}"
    birth = dt.date(1940, 1, 1) + dt.timedelta(days=rng.randrange(70 * 365))
    return _Patient(name, patient_id, birth.strftime("%Y%m%d"), rng.choice("MFO"))


def _make_study(rng: random.Random, key: tuple[object, ...], accession: str, n_series: int,
                max_instances: int, fixed_instances: int | None = None) -> _Study:
    """One study with ``n_series`` series; ``key`` makes its UIDs unique and reproducible."""
    modality = rng.choice(sorted(_MODALITIES))
    sop_class, study_descriptions, series_descriptions = _MODALITIES[modality]
    day = _EPOCH + dt.timedelta(days=rng.randrange(_SPAN_DAYS))
    start = dt.datetime.combine(day, dt.time()) + dt.timedelta(seconds=rng.randrange(7 * 3600, 19 * 3600))
    study = _Study(make_uid(*key, "study"), start, accession, str(rng.randrange(1, 10**6)),
                   rng.choice(study_descriptions), rng.choice(_PHYSICIANS))
    with_dose_report = modality == "CT" and n_series > 1 and rng.random() < 0.5
    for number in range(1, n_series + 1):
        if with_dose_report and number == n_series:
            series_modality, series_class, description = _DOSE_REPORT
        else:
            series_modality, series_class, description = modality, sop_class, rng.choice(series_descriptions)
        series = _Series(make_uid(*key, "series", number), number, series_modality, series_class, description,
                         start + dt.timedelta(minutes=2 * number))
        count = fixed_instances if fixed_instances is not None else rng.randint(1, max_instances)
        series.instance_uids = [make_uid(*key, "instance", number, i) for i in range(1, count + 1)]
        study.series.append(series)
    return study


def _instances(patient: _Patient, study: _Study, series_list: Sequence[_Series], charset: str,
               drop: Sequence[str] = ()) -> list[Dataset]:
    """Instance datasets of ``series_list`` as one node stores them, without the ``drop`` attributes."""
    out: list[Dataset] = []
    for series in series_list:
        for number, sop_uid in enumerate(series.instance_uids, start=1):
            content = series.time + dt.timedelta(seconds=number)
            ds = Dataset()
            ds.SpecificCharacterSet = charset
            ds.SOPClassUID = series.sop_class
            ds.SOPInstanceUID = sop_uid
            ds.PatientName = patient.name
            ds.PatientID = patient.patient_id
            ds.IssuerOfPatientID = ISSUER
            ds.PatientBirthDate = patient.birth_date
            ds.PatientSex = patient.sex
            ds.StudyInstanceUID = study.uid
            ds.StudyDate = study.time.strftime("%Y%m%d")
            ds.StudyTime = study.time.strftime("%H%M%S")
            ds.AccessionNumber = study.accession
            ds.StudyID = study.study_id
            ds.StudyDescription = study.description
            ds.ReferringPhysicianName = study.referring
            ds.SeriesInstanceUID = series.uid
            ds.Modality = series.modality
            ds.SeriesNumber = series.number
            ds.SeriesDescription = series.description
            ds.SeriesDate = series.time.strftime("%Y%m%d")
            ds.SeriesTime = series.time.strftime("%H%M%S")
            ds.InstanceNumber = number
            ds.ContentDate = content.strftime("%Y%m%d")
            ds.ContentTime = content.strftime("%H%M%S")
            for keyword in drop:
                delattr(ds, keyword)
            out.append(ds)
    return out


def generate_fleet(seed: int, nodes: int = 3, patients: int = 20, *, max_studies_per_patient: int = 3,
                   max_series_per_study: int = 3, max_instances_per_series: int = 3,
                   shared_fraction: float = 0.35) -> list[list[Dataset]]:
    """One list of instances per node over one shared universe.

    Patient ``i`` lives on node ``i % nodes``; some patients also appear elsewhere. With two or
    more nodes the universe always holds: patient 0 ('Müller^Jörg') with a study mirrored on
    every node whose secondary copies lack StudyDescription, and patient 1 ('Øster^Åse') with a
    study split across every node. Other sharing is drawn from the seed.
    """
    if nodes < 1 or patients < 0:
        raise ValueError("generate_fleet needs at least one node and a non-negative patient count")
    rng = random.Random(f"fleet:{seed}:{nodes}")
    out: list[list[Dataset]] = [[] for _ in range(nodes)]
    for p in range(patients):
        patient = _make_patient(rng, f"PAT{p + 1:05d}", p)
        home = p % nodes
        others = [n for n in range(nodes) if n != home]
        if others and p < 2:
            holders = [home, *others]
        elif others and rng.random() < shared_fraction:
            holders = [home, *sorted(rng.sample(others, rng.randint(1, len(others))))]
        else:
            holders = [home]
        for s in range(rng.randint(1, max_studies_per_patient)):
            forced = p < 2 and s == 0
            study_nodes = [home, *(n for n in holders[1:] if forced or rng.random() < 0.6)]
            split = len(study_nodes) > 1 and (p == 1 if forced else rng.random() < 0.5)
            n_series = rng.randint(1, max_series_per_study)
            if split:
                n_series = max(n_series, len(study_nodes))
            study = _make_study(rng, ("fleet", seed, p, s), f"A{seed % 1000:03d}{p:05d}{s:02d}", n_series,
                                max_instances_per_series)
            for rank, node in enumerate(study_nodes):
                series = study.series[rank :: len(study_nodes)] if split else study.series
                drop: tuple[str, ...] = ()
                if rank > 0:
                    drop = ("StudyDescription",) if p == 0 else (rng.choice(DROPPABLE),)
                out[node].extend(_instances(patient, study, series, node_charset(node), drop))
    return out


def generate_uniform(seed: int, node_index: int, studies: int, series_per_study: int = 1,
                     instances_per_series: int = 1) -> list[Dataset]:
    """``studies`` distinct studies (one patient each) for one node, shared with no other node.

    For benchmarks: every node answers a STUDY-level C-FIND with exactly ``studies`` matches.
    """
    rng = random.Random(f"uniform:{seed}:{node_index}")
    charset = node_charset(node_index)
    out: list[Dataset] = []
    for k in range(studies):
        patient = _make_patient(rng, f"U{node_index:03d}-{k:07d}", k)
        key = ("uniform", seed, node_index, k)
        study = _make_study(rng, key, f"U{node_index:03d}{k:07d}", series_per_study, instances_per_series,
                            fixed_instances=instances_per_series)
        out.extend(_instances(patient, study, study.series, charset))
    return out


def to_file_dataset(ds: Dataset) -> FileDataset:
    """``ds`` with Part 10 file meta (Explicit VR Little Endian); ``ds`` itself is not changed."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = uids.ExplicitVRLittleEndian
    meta.ImplementationClassUID = uids.PYDICOM_IMPLEMENTATION_UID
    return FileDataset("", Dataset(ds), file_meta=meta, preamble=b"\0" * 128)


def write_part10(ds: Dataset) -> bytes:
    """A Part 10 byte string, e.g. for POST /instances on Orthanc's REST API."""
    buffer = BytesIO()
    to_file_dataset(ds).save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
