"""WADO-RS through the session's Serve app, against real Orthanc archives that know only the spanner's
storage SCP, compared with Orthanc's own DICOMweb plugin (Debian's orthanc-dicomweb) holding the same
instances: a study split across archives A and B comes whole, instances and frames byte-identical in pixel
data; bad input gets its status; warm metadata asks no archive; and, with an archive's C-STOREs slowed by
a relay: the first part arrives before the last instance reached the spanner, a client that leaves cancels
the C-MOVE, and an archive killed mid-study gives a partial answer that says so.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit

from spanner.dimse.store import read_part10
from tests.conftest import Api, require
from tests.peers.instances import write_instance
from tests.peers.orthanc import CT_IMAGE_STORAGE, OrthancPeer, dicomweb_plugin, orthanc_executable

pytestmark = [pytest.mark.orthanc]
STUDY = "1.2.826.0.1.3680043.8.498.7714.1"
WARM_STUDY = "1.2.826.0.1.3680043.8.498.7714.2"
SLOW_STUDY = "1.2.826.0.1.3680043.8.498.7714.3"
LEAVE_STUDY = "1.2.826.0.1.3680043.8.498.7714.4"
KILL_STUDY = "1.2.826.0.1.3680043.8.498.7714.5"
FRAMES = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def multiframe(folder: Path, n: int, frames: int, study: str, series: int) -> Path:
    """An uncompressed CT of ``frames`` frames of 64 x 64 8-bit pixels, each frame different."""
    sop = f"{study}.{series}.{n}"
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, sop
    ds.PatientID, ds.PatientName = "STORE1", "Store^Test"  # the patient of write_instance
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, f"{study}.{series}"
    ds.Modality, ds.InstanceNumber, ds.NumberOfFrames = "CT", n, frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.Rows, ds.Columns = 64, 64
    ds.PixelData = os.urandom(64 * 64 * frames)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = CT_IMAGE_STORAGE, sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = folder / f"mf{n}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def parts_of(response: httpx.Response) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart/related answer: (headers, body)."""
    mark = re.search(r"boundary=([^;\s]+)", response.headers["content-type"])
    assert mark, response.headers
    return split(response.content, mark.group(1).strip('"'))


def split(content: bytes, mark: str) -> list[tuple[dict[str, str], bytes]]:
    delimiter = f"--{mark}".encode()
    pieces = content.split(b"\r\n" + delimiter)
    first = pieces[0]
    assert first.startswith(delimiter), content[:200]
    pieces[0] = first[len(delimiter):]
    assert pieces[-1].startswith(b"--"), "no close-delimiter"
    out = []
    for piece in pieces[:-1]:
        head, _, body = piece.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        out.append(({k.lower(): v for k, v in headers.items()}, body))
    return out


def pixels(part10: bytes) -> bytes:
    return bytes(pydicom.dcmread(io.BytesIO(part10)).PixelData)


@dataclass
class Fleet:
    a: OrthancPeer
    b: OrthancPeer
    reference: OrthancPeer
    files: dict[str, Path]  # SOP Instance UID -> the file both sides hold
    multiframe: str
    jpeg: str
    series_b: str


@pytest.fixture(scope="module")
def fleet(api: Api) -> Iterator[Fleet]:
    """STUDY split: series 1 (three CTs and a 4-frame CT) on A, series 2 (a CT and a JPEG) on B; all of it
    in the reference Orthanc with the DICOMweb plugin."""
    require(orthanc_executable() is not None, "Debian's orthanc")
    require(dicomweb_plugin() is not None, "Debian's orthanc-dicomweb")
    store = ("SPANNER", "127.0.0.1", int(str(api.settings["store_port"])))
    with tempfile.TemporaryDirectory(prefix="spanner-wado-") as name:
        folder = Path(name)
        on_a = [write_instance(folder, 100 + n, 32 * 1024, study_uid=STUDY) for n in range(3)]
        on_a.append(multiframe(folder, 7, 4, STUDY, 1))
        on_b = [write_instance(folder, 200, 16 * 1024, study_uid=STUDY, series=2),
                write_instance(folder, 201, 8 * 1024, transfer_syntax=JPEGBaseline8Bit, study_uid=STUDY,
                               series=2)]
        a = OrthancPeer(aet="WADO_A", modalities={"spanner": store})
        b = OrthancPeer(aet="WADO_B", modalities={"spanner": store})
        reference = OrthancPeer(aet="WADO_REF", dicomweb=True)
        try:
            a.start().upload_many(p.read_bytes() for p in on_a)
            b.start().upload_many(p.read_bytes() for p in on_b)
            reference.start().upload_many(p.read_bytes() for p in on_a + on_b)
            api.add_node("wado-a", a.dicom_port, ae_title="WADO_A")
            api.add_node("wado-b", b.dicom_port, ae_title="WADO_B")
            files = {read_part10(p).sop_instance_uid: p for p in on_a + on_b}
            yield Fleet(a, b, reference, files, read_part10(on_a[-1]).sop_instance_uid,
                        read_part10(on_b[1]).sop_instance_uid, f"{STUDY}.2")
        finally:
            for node in ("wado-a", "wado-b"):
                api.http.delete(f"/api/v1/nodes/{node}")
            for peer in (a, b, reference):
                peer.stop(graceful=False)


def test_a_split_study_comes_whole_and_equal_to_orthanc_dicomweb(api: Api, fleet: Fleet) -> None:
    ours = api.http.get(f"/dicomweb/studies/{STUDY}", headers={"Accept": AS_STORED}, timeout=120)
    assert ours.status_code == 200, ours.text
    assert 'type="application/dicom"' in ours.headers["content-type"]
    parts = parts_of(ours)
    got = {str(pydicom.dcmread(io.BytesIO(body)).SOPInstanceUID): body for _, body in parts}
    assert set(got) == set(fleet.files)
    theirs = httpx.get(f"{fleet.reference.dicomweb_url}/studies/{STUDY}", headers={"Accept": AS_STORED},
                       timeout=60)
    assert theirs.status_code == 200, theirs.text
    reference = {str(pydicom.dcmread(io.BytesIO(body)).SOPInstanceUID): body for _, body in parts_of(theirs)}
    for sop, body in got.items():
        assert pixels(body) == pixels(reference[sop]), sop
        assert pixels(body) == pixels(fleet.files[sop].read_bytes()), sop
        # The data set as the archive sent it (the file meta is the spool's own, from the C-STORE).
        assert pydicom.dcmread(io.BytesIO(body)) == pydicom.dcmread(fleet.files[sop]), sop

    series = api.http.get(f"/dicomweb/spans/all/studies/{STUDY}/series/{fleet.series_b}", timeout=60)
    assert series.status_code == 200, series.text
    assert len(parts_of(series)) == 2


def test_frames_equal_orthanc_dicomweb(api: Api, fleet: Fleet) -> None:
    mf = f"/studies/{STUDY}/series/{STUDY}.1/instances/{fleet.multiframe}/frames/1,3,4"
    ours = api.http.get(f"/dicomweb{mf}", headers={"Accept": FRAMES}, timeout=60)
    theirs = httpx.get(f"{fleet.reference.dicomweb_url}{mf}", headers={"Accept": FRAMES}, timeout=60)
    assert ours.status_code == 200 and theirs.status_code == 200, (ours.text, theirs.text)
    ours_parts, their_parts = parts_of(ours), parts_of(theirs)
    assert [b for _, b in ours_parts] == [b for _, b in their_parts]
    whole = bytes(pydicom.dcmread(fleet.files[fleet.multiframe]).PixelData)
    assert [b for _, b in ours_parts] == [whole[i * 4096:(i + 1) * 4096] for i in (0, 2, 3)]
    assert "transfer-syntax=1.2.840.10008.1.2.1" in ours_parts[0][0]["content-type"]
    default = 'multipart/related; type="application/octet-stream"'  # Explicit VR Little Endian
    plain = api.http.get(f"/dicomweb{mf}", headers={"Accept": default})
    assert plain.status_code == 200 and [b for _, b in parts_of(plain)] == [b for _, b in ours_parts]

    jpeg = f"/studies/{STUDY}/series/{fleet.series_b}/instances/{fleet.jpeg}/frames/1"
    ours = api.http.get(f"/dicomweb{jpeg}", headers={"Accept": FRAMES}, timeout=60)
    theirs = httpx.get(f"{fleet.reference.dicomweb_url}{jpeg}", headers={"Accept": FRAMES}, timeout=60)
    assert ours.status_code == 200 and theirs.status_code == 200, (ours.text, theirs.text)
    assert parts_of(ours)[0][1] == parts_of(theirs)[0][1]
    assert "transfer-syntax=1.2.840.10008.1.2.4.50" in parts_of(ours)[0][0]["content-type"]
    # Uncompressed frames of a JPEG instance would need decoding: 406, saying what would do.
    refused = api.http.get(f"/dicomweb{jpeg}", headers={
        "Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=1.2.840.10008.1.2.1'})
    assert refused.status_code == 406 and "transfer-syntax=*" in refused.json()["detail"]


def test_metadata_and_its_bulk_data(api: Api, fleet: Fleet) -> None:
    answer = api.http.get(f"/dicomweb/studies/{STUDY}/metadata", timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("application/dicom+json")
    instances = answer.json()
    theirs = httpx.get(f"{fleet.reference.dicomweb_url}/studies/{STUDY}/metadata", timeout=60).json()
    assert len(instances) == len(theirs) == len(fleet.files)
    by_sop = {i["00080018"]["Value"][0]: i for i in instances}
    for reference in theirs:
        mine = by_sop[reference["00080018"]["Value"][0]]
        for tag in ("0020000D", "0020000E", "00100020", "00280010", "00280011", "00280008"):
            assert mine.get(tag, {}).get("Value") == reference.get(tag, {}).get("Value"), tag
    uri = by_sop[fleet.multiframe]["7FE00010"]["BulkDataURI"]
    assert uri.startswith(api.base_url + "/dicomweb/studies/")
    bulk = api.http.get(uri, timeout=60)
    assert bulk.status_code == 200, bulk.text
    assert parts_of(bulk)[0][1] == bytes(pydicom.dcmread(fleet.files[fleet.multiframe]).PixelData)


def test_bad_input_gets_its_status(api: Api, fleet: Fleet) -> None:
    instance = f"/dicomweb/studies/{STUDY}/series/{STUDY}.1/instances/{fleet.multiframe}"
    cases: list[tuple[str, dict[str, str], int, str]] = [
        ("/dicomweb/studies/1.02.3", {}, 400, "not a UID"),
        ("/dicomweb/studies/abc/metadata", {}, 400, "not a UID"),
        (f"/dicomweb/studies/{STUDY}/series/x.1", {}, 400, "SeriesInstanceUID"),
        ("/dicomweb/studies/1.2.3.999999", {}, 404, "held by no archive"),
        ("/dicomweb/spans/nowhere/studies/1.2.3", {}, 404, "nowhere"),
        (f"{instance}/frames/9", {"Accept": FRAMES}, 400, "has 4 frame(s)"),
        (f"{instance}/frames/0", {"Accept": FRAMES}, 400, "not a frame number"),
        (f"{instance}/frames/1,x", {"Accept": FRAMES}, 400, "not a frame number"),
        (f"/dicomweb/studies/{STUDY}", {"Accept": "text/html"}, 406, "multipart/related"),
        (f"{instance}/metadata", {"Accept": "image/png"}, 406, "application/dicom+json"),
        (f"{instance}/bulkdata/NotAKeyword", {}, 400, "neither 8 hex digits"),
        (f"{instance}/rendered", {}, 501, "not supported"),
        (f"/dicomweb/studies/{STUDY}/thumbnail", {}, 501, "not supported"),
    ]
    for path, headers, status, words in cases:
        answer = api.http.get(path, headers=headers, timeout=60)
        assert answer.status_code == status, (path, answer.status_code, answer.text)
        assert words in answer.json()["detail"], (path, answer.text)


def test_audit_records_dicomweb(api: Api, fleet: Fleet) -> None:
    answer = api.http.get(f"/dicomweb/studies/{STUDY}/series/{fleet.series_b}/metadata", timeout=60)
    assert answer.status_code == 200
    mine = recorded(api, lambda r: r["destination_ae"] == "WADO-RS"
                    and r["uids"].get("SeriesInstanceUID") == fleet.series_b)
    assert mine["channel"] == "dicomweb" and mine["status"] == "success", mine


def recorded(api: Api, which: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The newest retrieval record ``which`` picks; the replica writes it just after the answer."""
    deadline = time.monotonic() + 10
    while True:
        records = api.http.get("/api/v1/retrievals", params={"limit": 20}).json()
        mine = [r for r in records if which(r)]
        if mine or time.monotonic() > deadline:
            assert mine, records[:3]
            return mine[0]
        time.sleep(0.05)


def test_warm_metadata_asks_no_archive(api: Api) -> None:
    """A series retrieved once is answered from the spool with its only archive stopped."""
    require(orthanc_executable() is not None, "Debian's orthanc")
    store = ("SPANNER", "127.0.0.1", int(str(api.settings["store_port"])))
    with tempfile.TemporaryDirectory(prefix="spanner-wado-warm-") as name:
        paths = [write_instance(Path(name), 300 + n, 4096, study_uid=WARM_STUDY) for n in range(5)]
        archive = OrthancPeer(aet="WADO_W", modalities={"spanner": store})
        try:
            archive.start().upload_many(p.read_bytes() for p in paths)
            api.add_node("wado-w", archive.dicom_port, ae_title="WADO_W")
            path = f"/dicomweb/studies/{WARM_STUDY}/series/{WARM_STUDY}.1/metadata"
            cold = api.http.get(path, timeout=60)
            assert cold.status_code == 200 and len(cold.json()) == 5, cold.text
            archive.stop(graceful=False)
            warm = api.http.get(path, timeout=60)
            assert warm.status_code == 200 and "warning" not in warm.headers, warm.text
            assert sorted(json.dumps(i, sort_keys=True) for i in warm.json()) == \
                sorted(json.dumps(i, sort_keys=True) for i in cold.json())
            sop = read_part10(paths[0]).sop_instance_uid
            frames = api.http.get(f"/dicomweb/studies/{WARM_STUDY}/series/{WARM_STUDY}.1/instances/{sop}"
                                  "/frames/1", headers={"Accept": FRAMES})
            assert frames.status_code == 200 and parts_of(frames)[0][1] == pixels(paths[0].read_bytes())
        finally:
            api.http.delete("/api/v1/nodes/wado-w")
            archive.stop(graceful=False)


def test_an_archive_that_cannot_move_to_the_spanner_is_a_502_naming_it(api: Api) -> None:
    """It answers the look-up but does not know the spanner as a move destination: nothing can come."""
    require(orthanc_executable() is not None, "Debian's orthanc")
    study = "1.2.826.0.1.3680043.8.498.7714.6"
    with tempfile.TemporaryDirectory(prefix="spanner-wado-nomove-") as name:
        archive = OrthancPeer(aet="WADO_N")  # no DicomModalities: C-MOVE to SPANNER is refused
        try:
            archive.start().upload(write_instance(Path(name), 400, 1024, study_uid=study).read_bytes())
            api.add_node("wado-n", archive.dicom_port, ae_title="WADO_N")
            answer = api.http.get(f"/dicomweb/studies/{study}", timeout=60)
            assert answer.status_code == 502, answer.text
            assert "wado-n" in answer.json()["detail"], answer.text
        finally:
            api.http.delete("/api/v1/nodes/wado-n")
            archive.stop(graceful=False)


def test_each_archive_is_asked_under_the_calling_ae_title_its_node_names(api: Api) -> None:
    """A split study over two archives that each let only one calling AE title move (their node's
    ``calling_ae_title``): both halves come, each part asked under its own archive's title."""
    require(orthanc_executable() is not None, "Debian's orthanc")
    study = "1.2.826.0.1.3680043.8.498.7714.7"
    store = {"AET": "SPANNER", "Host": "127.0.0.1", "Port": int(str(api.settings["store_port"])),
             "AllowMove": False}  # the move destination, which may not move as a caller

    def only_from(caller: str) -> dict[str, object]:
        return {"DicomAlwaysAllowMove": False, "DicomModalities": {
            "spanner": store, "caller": {"AET": caller, "Host": "127.0.0.1", "Port": 104, "AllowMove": True}}}

    with tempfile.TemporaryDirectory(prefix="spanner-wado-aet-") as name:
        folder = Path(name)
        files = [write_instance(folder, 500, 1024, study_uid=study),
                 write_instance(folder, 501, 1024, study_uid=study, series=2)]
        p = OrthancPeer(aet="WADO_P", extra_config=only_from("WADO_P_CALLER"))
        q = OrthancPeer(aet="WADO_Q", extra_config=only_from("WADO_Q_CALLER"))
        try:
            p.start().upload(files[0].read_bytes())
            q.start().upload(files[1].read_bytes())
            api.add_node("wado-p", p.dicom_port, ae_title="WADO_P", calling_ae_title="WADO_P_CALLER")
            api.add_node("wado-q", q.dicom_port, ae_title="WADO_Q", calling_ae_title="WADO_Q_CALLER")
            answer = api.http.get(f"/dicomweb/studies/{study}", timeout=60)
            assert answer.status_code == 200, answer.text
            got = {str(pydicom.dcmread(io.BytesIO(body)).SOPInstanceUID) for _, body in parts_of(answer)}
            assert got == {read_part10(f).sop_instance_uid for f in files}
        finally:
            for node in ("wado-p", "wado-q"):
                api.http.delete(f"/api/v1/nodes/{node}")
            for peer in (p, q):
                peer.stop(graceful=False)


# -- an archive whose C-STOREs reach the spanner through a slow relay ---------------------------------------
class Relay:
    """benchmarks.relay as a helper process: holds each chunk toward the storage SCP ``delay_ms``."""

    def __init__(self, target: int, delay_ms: float) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.relay", "--targets", str(target),
                                      "--delay-ms", str(delay_ms)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.port = int(json.loads(self.proc.stdout.readline())["ports"][0])

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)


@dataclass
class Slow:
    archive: OrthancPeer
    counts: dict[str, int]  # study -> instances


@pytest.fixture(scope="module")
def slow(api: Api) -> Iterator[Slow]:
    """Archive S holds three studies of 40 instances of 64 KiB; each C-STORE waits 40 ms in the relay."""
    require(orthanc_executable() is not None, "Debian's orthanc")
    relay = Relay(int(str(api.settings["store_port"])), 40)
    archive = OrthancPeer(aet="WADO_S", modalities={"spanner": ("SPANNER", "127.0.0.1", relay.port)})
    counts = {SLOW_STUDY: 40, LEAVE_STUDY: 40, KILL_STUDY: 40}
    try:
        with tempfile.TemporaryDirectory(prefix="spanner-wado-slow-") as name:
            archive.start()
            for index, (study, count) in enumerate(counts.items()):
                archive.upload_many(write_instance(Path(name), 1000 * index + n, 64 * 1024, study_uid=study)
                                    .read_bytes() for n in range(count))
        api.add_node("wado-s", archive.dicom_port, ae_title="WADO_S")
        yield Slow(archive, counts)
    finally:
        api.http.delete("/api/v1/nodes/wado-s")
        archive.stop(graceful=False)
        relay.stop()


def store_stats(api: Api) -> dict[str, int]:
    import ray

    from actors.store_service import ACTOR_NAME

    try:
        actor = ray.get_actor(ACTOR_NAME, namespace=api.namespace)
    except ValueError:  # not created yet: no retrieval went through the spanner in this session
        return {"sessions": 0, "expectations": 0, "spooled": 0, "refused": 0}
    stats: dict[str, int] = ray.get(actor.wado_stats.remote())
    return stats


def first_part(response: httpx.Response) -> tuple[bytes, Iterator[bytes]]:
    """Read until the first part is whole; the bytes read so far and the rest of the stream."""
    mark = re.search(r"boundary=([^;\s]+)", response.headers["content-type"])
    assert mark
    second = f"\r\n--{mark.group(1)}".encode()
    chunks = response.iter_bytes()
    seen = b""
    for chunk in chunks:
        seen += chunk
        if second in seen:
            return seen, chunks
    raise AssertionError("the answer ended before its first part did")


def test_the_first_part_leaves_before_the_last_instance_arrives(api: Api, slow: Slow) -> None:
    before = store_stats(api)["spooled"]
    with api.http.stream("GET", f"/dicomweb/studies/{SLOW_STUDY}", timeout=120) as response:
        assert response.status_code == 200
        seen, rest = first_part(response)
        arrived = store_stats(api)["spooled"] - before
        seen += b"".join(rest)
    assert arrived < slow.counts[SLOW_STUDY], arrived
    mark = re.search(r"boundary=(\S+)", response.headers["content-type"])
    assert mark and len(split(seen, mark.group(1))) == slow.counts[SLOW_STUDY]


def test_a_client_that_leaves_cancels_the_archive(api: Api, slow: Slow) -> None:
    before = store_stats(api)
    with api.http.stream("GET", f"/dicomweb/studies/{LEAVE_STUDY}", timeout=120) as response:
        assert response.status_code == 200
        first_part(response)
    deadline = time.monotonic() + 30
    while (stats := store_stats(api))["sessions"] or stats["expectations"]:
        assert time.monotonic() < deadline, stats
        time.sleep(0.1)
    settled = stats["spooled"] - before["spooled"]
    time.sleep(1.0)  # the archive would have sent about 25 more in this time, had it not been cancelled
    after = store_stats(api)
    assert after["spooled"] - before["spooled"] == settled < slow.counts[LEAVE_STUDY]
    # C-STOREs still sent after the end would be refused (they match no retrieval): at most the one or
    # two in flight through the relay when the C-MOVE was cancelled.
    assert after["refused"] - before["refused"] <= 2, (before, after)
    mine = recorded(api, lambda r: r["uids"].get("StudyInstanceUID") == LEAVE_STUDY)
    assert mine["status"] == "cancelled" and mine["channel"] == "dicomweb", mine


def test_an_archive_killed_mid_study_gives_a_partial_answer_that_says_so(api: Api, slow: Slow) -> None:
    with api.http.stream("GET", f"/dicomweb/studies/{KILL_STUDY}", timeout=120) as response:
        assert response.status_code == 200
        seen, rest = first_part(response)
        slow.archive.stop(graceful=False)
        seen += b"".join(rest)
    mark = re.search(r"boundary=(\S+)", response.headers["content-type"])
    assert mark
    parts = split(seen, mark.group(1))
    status = parts[-1]
    assert status[0]["content-type"] == "application/json", status
    said = json.loads(status[1])
    assert said["partial"] is True and "wado-s" in said["detail"], said
    instances = parts[:-1]
    assert 1 <= len(instances) < slow.counts[KILL_STUDY]
    assert said["delivered"] == len(instances)
    assert len(said["missing"]) == slow.counts[KILL_STUDY] - len(instances)
    for _, body in instances:  # every part sent before the end is a whole instance
        assert len(pixels(body)) == 64 * 1024



DECODED = "1.2.826.0.1.3680043.8.498.7714.9"
EXPLICIT = "1.2.840.10008.1.2.1"
UNCOMPRESSED_FRAMES = f'multipart/related; type="application/octet-stream"; transfer-syntax={EXPLICIT}'


@pytest.mark.orthanc
def test_compressed_instances_and_frames_are_decoded_for_a_client_that_takes_only_uncompressed(
        api: Api) -> None:
    """RLE Lossless (pydicom's codec) and JPEG 2000 Lossless (pylibjpeg-openjpeg): asked with
    transfer-syntax=1.2.840.10008.1.2.1, frames come as the original pixels and instances as Explicit VR
    Little Endian Part-10 files with the same pixel values and the same SOP Instance UID."""
    from pydicom.uid import JPEG2000Lossless, RLELossless

    require(orthanc_executable() is not None, "Debian's orthanc")
    store = ("SPANNER", "127.0.0.1", int(str(api.settings["store_port"])))
    with tempfile.TemporaryDirectory(prefix="spanner-wado-decode-") as name:
        folder = Path(name)
        originals: dict[str, bytes] = {}
        files = []
        for n, syntax in ((301, RLELossless), (302, JPEG2000Lossless)):
            path = write_instance(folder, n, 64 * 1024, study_uid=DECODED)
            ds = pydicom.dcmread(path)
            ds.PixelData = bytes((i * 5 + n) % 253 for i in range(len(ds.PixelData)))
            originals[str(ds.SOPInstanceUID)] = bytes(ds.PixelData)
            ds.compress(syntax, generate_instance_uid=False)
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
        archive = OrthancPeer(aet="WADO_DEC", modalities={"spanner": store})
        try:
            archive.start().upload_many(p.read_bytes() for p in files)
            api.add_node("wado-dec", archive.dicom_port, ae_title="WADO_DEC")
            api.add_span("wado-dec", ["wado-dec"])
            root = f"/dicomweb/spans/wado-dec/studies/{DECODED}/series/{DECODED}.1/instances"
            for sop, pixels in originals.items():
                frame = api.http.get(f"{root}/{sop}/frames/1", timeout=120,
                                     headers={"Accept": UNCOMPRESSED_FRAMES})
                assert frame.status_code == 200, frame.text
                (head, body), = parts_of(frame)  # this instance only, not the rest of its series
                assert f"transfer-syntax={EXPLICIT}" in head["content-type"] and body == pixels
                whole = api.http.get(f"{root}/{sop}", timeout=120, headers={
                    "Accept": f'multipart/related; type="application/dicom"; transfer-syntax={EXPLICIT}'})
                assert whole.status_code == 200, whole.text
                (_, part10), = parts_of(whole)
                copy = pydicom.dcmread(io.BytesIO(part10))
                assert copy.file_meta.TransferSyntaxUID == EXPLICIT and str(copy.SOPInstanceUID) == sop
                assert bytes(copy.PixelData) == pixels
            beyond = api.http.get(f"{root}/{next(iter(originals))}/frames/2", timeout=60,
                                  headers={"Accept": UNCOMPRESSED_FRAMES})
            assert beyond.status_code == 400, beyond.text
        finally:
            api.http.delete("/api/v1/spans/wado-dec")
            api.http.delete("/api/v1/nodes/wado-dec")
            archive.stop(graceful=False)
