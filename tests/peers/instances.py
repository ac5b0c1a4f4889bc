"""DICOM test instances and peers for the C-STORE, storage SCP and proxy C-MOVE tests.

- ``write_instance``: a CT Part-10 file with random pixel data of a chosen size and transfer syntax;
- ``study_identifier``: a STUDY-level C-MOVE identifier, encoded for the accepted transfer syntax;
- ``Storescp``: dcmtk's storescp on a free loopback port, writing into a folder, ended by its PID.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit

from spanner.dicom_constants import IMPLICIT_VR_LE
from tests.conftest import require
from tests.peers.orthanc import CT_IMAGE_STORAGE
from tests.peers.ports import free_port, wait_for_port

ROOT = "1.2.826.0.1.3680043.8.498.7713"
STUDY = f"{ROOT}.1"


def write_instance(folder: Path, n: int, pixel_bytes: int = 2048,
                   transfer_syntax: str = ExplicitVRLittleEndian, chunked: bool = False,
                   study_uid: str = STUDY, series: int = 1) -> Path:
    """A CT instance with ``pixel_bytes`` of random pixel data, in series ``series`` of the study; ``chunked``
    appends the pixel data in 1 MiB pieces so that the test process never holds it whole."""
    sop = f"{ROOT}.1.1.{n}"
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, sop
    ds.PatientID, ds.PatientName = "STORE1", "Store^Test"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, f"{study_uid}.{series}"
    ds.Modality, ds.InstanceNumber = "CT", n
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.Rows, ds.Columns = (pixel_bytes // 1024, 1024) if pixel_bytes % 1024 == 0 else (1, pixel_bytes)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = CT_IMAGE_STORAGE, sop
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    path = folder / f"{n}.dcm"
    if transfer_syntax == JPEGBaseline8Bit:
        ds.PixelData = encapsulate([b"\xff\xd8" + os.urandom(pixel_bytes) + b"\xff\xd9"])
        ds["PixelData"].VR = "OB"
    elif not chunked:
        ds.PixelData = os.urandom(pixel_bytes)
    ds.save_as(path, enforce_file_format=True, implicit_vr=transfer_syntax == ImplicitVRLittleEndian)
    if chunked:
        with path.open("ab") as f:
            f.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, pixel_bytes))
            for _ in range(pixel_bytes // (1 << 20)):
                f.write(os.urandom(1 << 20))
    return path


def study_identifier(study_uid: str, transfer_syntax: str) -> bytes:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study_uid
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, transfer_syntax == IMPLICIT_VR_LE
    write_dataset(out, ds)
    return out.getvalue()


class Storescp:
    """dcmtk's storescp on a free port, writing into ``folder``; ended by PID."""

    def __init__(self, folder: Path, *options: str) -> None:
        require(shutil.which("storescp") is not None, "dcmtk storescp")
        self.port = free_port()
        self.folder = folder
        self.proc = subprocess.Popen(["storescp", "-aet", "DEST", "-od", str(folder), *options,
                                      str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env={**os.environ, "TCP_NODELAY": "1"})
        wait_for_port(self.port)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)

    def received(self) -> dict[str, Path]:
        return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
                for p in self.folder.iterdir()}
