"""C-STORE in the DIMSE engine (spanner.dimse.store) against peers nobody here wrote.

- the engine as storage SCP: dcmtk's storescu sends small and large instances; data sets reach the handler
  as Part-10 files identical to what was sent, a 48 MB instance passes without the process's peak memory
  growing by its size, an over-size one is refused 0xA700, an association aborted mid data set leaves nothing;
- the engine as storage SCU: to dcmtk's storescp (stored syntax kept, JPEG kept; Explicit -> Implicit VR
  converted when the receiver takes only Implicit; JPEG to a receiver taking only uncompressed: that
  instance fails with the reason, the others go) and to Orthanc.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit

from spanner.dicom_constants import (
    AFFECTED_SOP_CLASS_UID,
    AFFECTED_SOP_INSTANCE_UID,
    COMMAND_FIELD,
    MESSAGE_ID,
    CommandField,
    Status,
)
from spanner.dimse.acceptor import Acceptor, AcceptorConfig, Handlers
from spanner.dimse.association import connect
from spanner.dimse.messages import encode_command, fragment
from spanner.dimse.store import (
    STORAGE_CLASSES,
    STORE_TRANSFER_SYNTAXES,
    StoreRequest,
    read_part10,
    send_files,
    storage_contexts,
)
from tests.conftest import require
from tests.peers.instances import ROOT, Storescp, write_instance
from tests.peers.orthanc import CT_IMAGE_STORAGE, OrthancPeer, orthanc_executable


def pixel_data(path: Path) -> bytes:
    value: bytes = pydicom.dcmread(path).PixelData
    return value


@pytest.fixture
def folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="spanner-store-") as name:
        yield Path(name)


async def dcmtk_async(tool: str, *args: str) -> tuple[int, str]:
    require(shutil.which(tool) is not None, f"dcmtk {tool}")
    proc = await asyncio.create_subprocess_exec(tool, *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT,
                                                env={**os.environ, "TCP_NODELAY": "1"})
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode or 0, out.decode(errors="replace")


class StoreScp:
    """The engine as storage SCP: every instance is moved into ``received`` and its request kept."""

    def __init__(self, folder: Path, max_bytes: int = 0) -> None:
        self.incoming = folder / "incoming"
        self.received = folder / "received"
        self.incoming.mkdir()
        self.received.mkdir()
        self.requests: list[StoreRequest] = []
        config = AcceptorConfig("ENGINE_STORE", STORAGE_CLASSES, STORE_TRANSFER_SYNTAXES,
                                prefer_proposed_order=True, store_dir=str(self.incoming),
                                store_max_bytes=max_bytes)
        self.acceptor = Acceptor(config, Handlers(store=self.on_store))

    async def on_store(self, request: StoreRequest) -> int:
        assert request.path.parent == self.incoming
        self.requests.append(request)
        os.replace(request.path, self.received / f"{request.sop_instance_uid}.dcm")
        return Status.SUCCESS


@pytest.mark.dcmtk
def test_storescu_to_the_engine_store_scp(folder: Path) -> None:
    sent = [write_instance(folder, n, 2048 * n) for n in (1, 2, 3)]
    implicit = write_instance(folder, 4, 4096, ImplicitVRLittleEndian)

    async def body() -> StoreScp:
        scp = StoreScp(folder)
        port = await scp.acceptor.start("127.0.0.1", 0)
        try:
            code, out = await dcmtk_async("storescu", "-aet", "MODALITY", "-aec", "ENGINE_STORE", "--max-pdu",
                                          "4096", "127.0.0.1", str(port), *map(str, sent))
            assert code == 0, out
            code, out = await dcmtk_async("storescu", "-xi", "-aec", "ENGINE_STORE", "127.0.0.1", str(port),
                                          str(implicit))
            assert code == 0, out
        finally:
            await scp.acceptor.close()
        return scp

    scp = asyncio.run(body())
    assert [r.calling_ae for r in scp.requests[:3]] == ["MODALITY"] * 3
    assert [r.move_originator_id for r in scp.requests] == [None] * 4
    for path in [*sent, implicit]:
        original = pydicom.dcmread(path)
        received = scp.received / f"{original.SOPInstanceUID}.dcm"
        assert pixel_data(received) == original.PixelData
    assert read_part10(scp.received / f"{ROOT}.1.1.4.dcm").transfer_syntax == ImplicitVRLittleEndian
    assert list(scp.incoming.iterdir()) == []


def peak_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/self/status")


@pytest.mark.dcmtk
def test_a_large_instance_streams_to_disk(folder: Path) -> None:
    """48 MB through the SCP: the process's peak resident memory grows by far less than the instance."""
    size = 48 << 20
    big = write_instance(folder, 9, size, chunked=True)

    async def body() -> tuple[StoreScp, int]:
        scp = StoreScp(folder)
        port = await scp.acceptor.start("127.0.0.1", 0)
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
        before = peak_rss_kib()
        try:
            code, out = await dcmtk_async("storescu", "-aec", "ENGINE_STORE", "127.0.0.1", str(port),
                                          str(big))
            assert code == 0, out
        finally:
            await scp.acceptor.close()
        return scp, peak_rss_kib() - before

    scp, growth_kib = asyncio.run(body())
    assert [r.size for r in scp.requests] == [read_part10(big).dataset_bytes]
    received = scp.received / f"{ROOT}.1.1.9.dcm"
    assert received.stat().st_size - read_part10(received).offset == read_part10(big).dataset_bytes
    assert growth_kib < 16 * 1024, f"peak RSS grew {growth_kib} KiB for a {size >> 20} MiB instance"


def test_store_scp_refuses_oversize_and_forgets_aborted(folder: Path) -> None:
    small = read_part10(write_instance(folder, 1, 1024))
    large = read_part10(write_instance(folder, 2, 300 * 1024))

    async def body() -> StoreScp:
        scp = StoreScp(folder, max_bytes=100_000)
        port = await scp.acceptor.start("127.0.0.1", 0)
        contexts = storage_contexts([(CT_IMAGE_STORAGE, ExplicitVRLittleEndian)])
        try:
            results = await send_files("127.0.0.1", port, [small.path, large.path], calling_ae="MOVER_SCU",
                                       called_ae="ENGINE_STORE", move_originator=("MOVER", 7))
            assert [(r.sop_instance_uid, r.status) for r in results] == [
                (small.sop_instance_uid, Status.SUCCESS), (large.sop_instance_uid, Status.OUT_OF_RESOURCES)]
            # A C-STORE cut off half-way: the command and the first PDVs, then A-ABORT.
            assoc = await connect("127.0.0.1", port, calling_ae="QUITTER", called_ae="ENGINE_STORE",
                                  contexts=contexts)
            ctx = assoc.context_for(CT_IMAGE_STORAGE)
            assoc.writer.write(fragment(ctx.context_id, encode_command({
                AFFECTED_SOP_CLASS_UID: CT_IMAGE_STORAGE, COMMAND_FIELD: CommandField.C_STORE_RQ,
                MESSAGE_ID: 1, AFFECTED_SOP_INSTANCE_UID: small.sop_instance_uid, 0x0800: 1}), True, 0))
            half = small.path.read_bytes()[small.offset:small.offset + 400]
            pdv = struct.pack(">IBB", len(half) + 2, ctx.context_id, 0) + half  # not the data set's last
            assoc.writer.write(struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv)
            await assoc.drain()
            for _ in range(100):
                if any(scp.incoming.iterdir()):
                    break
                await asyncio.sleep(0.01)
            assert any(scp.incoming.iterdir()), "the partial data set was not being written"
            assoc.abort()
            await assoc.close()
            for _ in range(200):
                if not any(scp.incoming.iterdir()):
                    break
                await asyncio.sleep(0.01)
        finally:
            await scp.acceptor.close()
        return scp

    scp = asyncio.run(body())
    assert len(scp.requests) == 1
    assert (scp.requests[0].move_originator_ae, scp.requests[0].move_originator_id) == ("MOVER", 7)
    assert scp.requests[0].calling_ae == "MOVER_SCU"
    assert list(scp.incoming.iterdir()) == []


@pytest.mark.dcmtk
def test_engine_scu_to_storescp_keeps_or_converts_syntaxes(folder: Path) -> None:
    files = folder / "files"
    files.mkdir()
    explicit = write_instance(files, 1, 5000)
    implicit = write_instance(files, 2, 3000, ImplicitVRLittleEndian)
    jpeg = write_instance(files, 3, 2000, JPEGBaseline8Bit)
    everything, only_implicit = folder / "all", folder / "implicit"
    everything.mkdir()
    only_implicit.mkdir()
    accept_all, implicit_only = Storescp(everything, "+xa"), Storescp(only_implicit, "+xi")
    try:
        to_all = asyncio.run(send_files("127.0.0.1", accept_all.port, [explicit, implicit, jpeg],
                                        calling_ae="SPANNER", called_ae="DEST"))
        to_implicit = asyncio.run(send_files("127.0.0.1", implicit_only.port, [explicit, implicit, jpeg],
                                             calling_ae="SPANNER", called_ae="DEST"))
    finally:
        accept_all.stop()
        implicit_only.stop()
    assert [r.status for r in to_all] == [Status.SUCCESS] * 3
    got = accept_all.received()
    for path, syntax in ((explicit, ExplicitVRLittleEndian), (implicit, ImplicitVRLittleEndian),
                         (jpeg, JPEGBaseline8Bit)):
        uid = read_part10(path).sop_instance_uid
        assert read_part10(got[uid]).transfer_syntax == syntax
        assert pixel_data(got[uid]) == pixel_data(path)
    assert [r.status for r in to_implicit[:2]] == [Status.SUCCESS] * 2
    assert to_implicit[2].status is None and to_implicit[2].error is not None
    assert JPEGBaseline8Bit in to_implicit[2].error
    got = implicit_only.received()
    assert set(got) == {read_part10(explicit).sop_instance_uid, read_part10(implicit).sop_instance_uid}
    converted = got[read_part10(explicit).sop_instance_uid]
    assert read_part10(converted).transfer_syntax == ImplicitVRLittleEndian
    assert pixel_data(converted) == pixel_data(explicit)


@pytest.mark.orthanc
def test_engine_scu_to_orthanc(folder: Path) -> None:
    require(orthanc_executable() is not None, "Debian's orthanc")
    paths = [write_instance(folder, n, 10_000 * n) for n in (1, 2, 3)]
    with OrthancPeer(aet="ORTHANC_DEST") as orthanc:
        results = asyncio.run(send_files("127.0.0.1", orthanc.dicom_port, paths, calling_ae="SPANNER",
                                         called_ae="ORTHANC_DEST"))
        assert [r.status for r in results] == [Status.SUCCESS] * 3
        for path in paths:
            uid = read_part10(path).sop_instance_uid
            found = orthanc.client.post("/tools/lookup", content=uid).json()
            assert [f["Type"] for f in found] == ["Instance"]
            stored = orthanc.client.get(f"/instances/{found[0]['ID']}/file").content
            assert pydicom.dcmread(BytesIO(stored)).PixelData == pixel_data(path)


def test_a_store_refused_on_protocol_grounds_leaves_no_file(folder: Path) -> None:
    """A second C-STORE reusing the Message ID of one still running aborts the association (a protocol
    error); neither data set stays in the store folder."""
    instance = read_part10(write_instance(folder, 1, 1024))
    incoming = folder / "incoming"
    incoming.mkdir()
    release = asyncio.Event()

    async def slow(request: StoreRequest) -> int:
        await release.wait()
        return Status.SUCCESS

    config = AcceptorConfig("ENGINE_STORE", STORAGE_CLASSES, STORE_TRANSFER_SYNTAXES, store_dir=str(incoming))
    acceptor = Acceptor(config, Handlers(store=slow))

    async def body() -> None:
        port = await acceptor.start("127.0.0.1", 0)
        try:
            assoc = await connect("127.0.0.1", port, calling_ae="TWICE", called_ae="ENGINE_STORE",
                                  contexts=storage_contexts([(CT_IMAGE_STORAGE, ExplicitVRLittleEndian)]))
            ctx = assoc.context_for(CT_IMAGE_STORAGE)
            data = instance.path.read_bytes()[instance.offset:]
            for _ in range(2):
                assoc.writer.write(fragment(ctx.context_id, encode_command({
                    AFFECTED_SOP_CLASS_UID: CT_IMAGE_STORAGE, COMMAND_FIELD: CommandField.C_STORE_RQ,
                    MESSAGE_ID: 1, AFFECTED_SOP_INSTANCE_UID: instance.sop_instance_uid, 0x0800: 1}), True, 0)
                    + fragment(ctx.context_id, data, False, 0))
            await assoc.drain()
            for _ in range(200):
                if not assoc.is_open:
                    break
                await asyncio.sleep(0.01)
            assert not assoc.is_open, "the engine did not abort the association"
            await assoc.close()
            for _ in range(200):
                if not any(incoming.iterdir()):
                    break
                await asyncio.sleep(0.01)
        finally:
            release.set()
            await acceptor.close()

    asyncio.run(body())
    assert list(incoming.iterdir()) == []


@pytest.mark.dcmtk
def test_compressed_instances_are_decompressed_for_a_receiver_of_uncompressed_data_only(folder: Path) -> None:
    """RLE (pydicom's own codec) and JPEG 2000 lossless (pylibjpeg-openjpeg) reach a storescp that takes
    only Explicit VR Little Endian with the same pixel values; a JPEG whose data does not decode fails
    alone, with the reason."""
    from pydicom.uid import JPEG2000Lossless, RLELossless

    files = folder / "files"
    files.mkdir()
    compressed: dict[str, Path] = {}
    for n, syntax in ((11, RLELossless), (12, JPEG2000Lossless)):
        path = write_instance(files, n, 64 * 1024)
        ds = pydicom.dcmread(path)
        ds.PixelData = bytes((i * 7 + n) % 251 for i in range(len(ds.PixelData)))  # compressible, not random
        ds.compress(syntax, generate_instance_uid=False)
        ds.save_as(path, enforce_file_format=True)
        compressed[syntax] = path
    broken = write_instance(files, 13, 2000, JPEGBaseline8Bit)  # random bytes between JPEG markers
    received = folder / "explicit"
    received.mkdir()
    explicit_only = Storescp(received, "+xe")
    try:
        results = asyncio.run(send_files("127.0.0.1", explicit_only.port, [*compressed.values(), broken],
                                         calling_ae="SPANNER", called_ae="DEST"))
    finally:
        explicit_only.stop()
    assert [r.status for r in results[:2]] == [Status.SUCCESS] * 2, results
    assert results[2].status is None and "could not be decompressed" in (results[2].error or "")
    got = explicit_only.received()
    for syntax, path in compressed.items():
        copy = got[read_part10(path).sop_instance_uid]
        assert read_part10(copy).transfer_syntax == ExplicitVRLittleEndian, syntax
        assert (pydicom.dcmread(copy).pixel_array == pydicom.dcmread(path).pixel_array).all(), syntax
