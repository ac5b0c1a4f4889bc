"""Proxy C-MOVE (spanner.proxy_move) with real peers: a study split across Orthanc archives A and B, which
know only the spanner's storage SCP, lands in dcmtk's storescp and in Orthanc D (destinations no archive
knows); a JPEG instance that storescp cannot take fails alone with the reason; a holder that is down
ends its part with the error while the other part is delivered; a repeated retrieval comes from the
spool with the archive stopped, until the node's instances are dropped."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import JPEGBaseline8Bit

from benchmarks.relay import start_relay
from spanner.dicom_constants import IMPLICIT_VR_LE, STUDY_ROOT_MOVE, Status
from spanner.dimse.acceptor import Acceptor, AcceptorConfig, Handlers, MoveResult, Request
from spanner.dimse.store import read_part10
from spanner.proxy_move import Fallback, HolderPart, InstanceEvent, PartEvent, Peer, proxy_move
from spanner.spool import Spool
from spanner.store_scp import StorageScp
from tests.conftest import require
from tests.peers.instances import Storescp, study_identifier, write_instance
from tests.peers.orthanc import OrthancPeer, orthanc_executable
from tests.peers.ports import ClosedPort

STUDY_UID = "1.2.826.0.1.3680043.8.498.7715.1"


@pytest.fixture
def folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="spanner-proxy-") as name:
        yield Path(name)


def check_order(events: list[InstanceEvent | PartEvent]) -> None:
    """Each instance is reported as it is forwarded, before its holder's C-MOVE is reported done."""
    ended: set[str] = set()
    for event in events:
        if isinstance(event, PartEvent):
            ended.add(event.node)
        else:
            assert event.node not in ended, f"{event.sop_instance_uid} reported after its part ended"


@pytest.mark.orthanc
@pytest.mark.dcmtk
def test_split_study_to_destinations_no_archive_knows(folder: Path) -> None:
    require(orthanc_executable() is not None, "Debian's orthanc")
    files = folder / "files"
    files.mkdir()
    on_a = [write_instance(files, 500 + n, 64 * 1024, study_uid=STUDY_UID) for n in range(4)]
    on_a.append(write_instance(files, 510, 2048, JPEGBaseline8Bit, study_uid=STUDY_UID))
    on_b = [write_instance(files, 600 + n, 64 * 1024, study_uid=STUDY_UID) for n in range(3)]
    uids_a = {read_part10(p).sop_instance_uid for p in on_a}
    uids_b = {read_part10(p).sop_instance_uid for p in on_b}
    jpeg_uid = read_part10(on_a[-1]).sop_instance_uid
    spool = Spool(folder / "spool", max_bytes=64 << 20, ttl_s=600)
    scp = StorageScp(spool, ae_title="SPANNER")
    received = folder / "storescp"
    received.mkdir()
    storescp = Storescp(received)

    async def body() -> tuple[list[InstanceEvent | PartEvent], list[InstanceEvent | PartEvent], set[str]]:
        port = await scp.start("127.0.0.1", 0)
        target = {"spanner": ("SPANNER", "127.0.0.1", port)}
        a = OrthancPeer(aet="ARCH_A", modalities=target)
        b = OrthancPeer(aet="ARCH_B", modalities=target)
        d = OrthancPeer(aet="DEST_D")
        try:
            a.start().upload_many(p.read_bytes() for p in on_a)
            b.start().upload_many(p.read_bytes() for p in on_b)
            d.start()
            parts = [HolderPart("node-a", Peer("ARCH_A", "127.0.0.1", a.dicom_port),
                                partial(study_identifier, STUDY_UID), frozenset(uids_a)),
                     HolderPart("node-b", Peer("ARCH_B", "127.0.0.1", b.dicom_port),
                                partial(study_identifier, STUDY_UID), frozenset(uids_b))]
            to_storescp = [e async for e in proxy_move(scp, parts, Peer("DEST", "127.0.0.1", storescp.port),
                                                       calling_ae="SPANNER")]
            to_orthanc = [e async for e in proxy_move(scp, parts, Peer("DEST_D", "127.0.0.1", d.dicom_port),
                                                      calling_ae="SPANNER")]
            in_d = {d.get(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"] for i in d.instances()}
            return to_storescp, to_orthanc, in_d
        finally:
            for peer in (a, b, d):
                peer.stop()
            await scp.close()

    try:
        to_storescp, to_orthanc, in_d = asyncio.run(body())
    finally:
        storescp.stop()

    for events in (to_storescp, to_orthanc):
        check_order(events)
        parts_done = {e.node: e for e in events if isinstance(e, PartEvent)}
        assert set(parts_done) == {"node-a", "node-b"}
        assert all(p.status == 0 and p.error is None and not p.not_received for p in parts_done.values())
        assert parts_done["node-a"].counts["completed"] == 5 and parts_done["node-b"].counts["completed"] == 3
    forwarded = {e.sop_instance_uid for e in to_storescp if isinstance(e, InstanceEvent) and e.forwarded}
    failed = {e.sop_instance_uid: e.reason for e in to_storescp
              if isinstance(e, InstanceEvent) and not e.forwarded}
    assert forwarded == (uids_a | uids_b) - {jpeg_uid}
    assert list(failed) == [jpeg_uid] and JPEGBaseline8Bit in (failed[jpeg_uid] or "")
    assert set(storescp.received()) == forwarded
    for path in on_a[:1] + on_b[:1]:
        uid = read_part10(path).sop_instance_uid
        assert storescp.received()[uid].read_bytes()[-1000:] == path.read_bytes()[-1000:]
    assert {e.sop_instance_uid for e in to_orthanc if isinstance(e, InstanceEvent) and e.forwarded} \
        == uids_a | uids_b
    assert in_d == uids_a | uids_b
    assert list(spool.incoming.iterdir()) == []


@pytest.mark.orthanc
def test_a_holder_that_is_down_fails_its_part_only(folder: Path) -> None:
    require(orthanc_executable() is not None, "Debian's orthanc")
    paths = [write_instance(folder, 700 + n, 4096, study_uid=STUDY_UID) for n in range(3)]
    uids = {read_part10(p).sop_instance_uid for p in paths}
    spool = Spool(folder / "spool", max_bytes=16 << 20, ttl_s=600)
    scp = StorageScp(spool, ae_title="SPANNER")
    down = ClosedPort()

    async def body() -> list[InstanceEvent | PartEvent]:
        port = await scp.start("127.0.0.1", 0)
        a = OrthancPeer(aet="ARCH_A", modalities={"spanner": ("SPANNER", "127.0.0.1", port)})
        d = OrthancPeer(aet="DEST_D")
        try:
            a.start().upload_many(p.read_bytes() for p in paths)
            d.start()
            parts = [HolderPart("node-a", Peer("ARCH_A", "127.0.0.1", a.dicom_port),
                                partial(study_identifier, STUDY_UID), frozenset(uids)),
                     HolderPart("node-x", Peer("ARCH_X", "127.0.0.1", down.port),
                                partial(study_identifier, STUDY_UID))]
            events = [e async for e in proxy_move(scp, parts, Peer("DEST_D", "127.0.0.1", d.dicom_port),
                                                  calling_ae="SPANNER")]
            assert len(d.instances()) == 3
            # Again, with the archive gone: every instance comes from the spool.
            a.stop()
            d.clear()
            again = [e async for e in proxy_move(scp, parts[:1], Peer("DEST_D", "127.0.0.1", d.dicom_port),
                                                 calling_ae="SPANNER")]
            assert [(e.node, e.from_spool) for e in again if isinstance(e, PartEvent)] == [("node-a", True)]
            assert {e.sop_instance_uid for e in again if isinstance(e, InstanceEvent) and e.forwarded} == uids
            assert len(d.instances()) == 3
            # A node change drops its instances: the archive is asked again (and is down now).
            scp.spool.drop_node("node-a")
            again = [e async for e in proxy_move(scp, parts[:1], Peer("DEST_D", "127.0.0.1", d.dicom_port),
                                                 calling_ae="SPANNER")]
            assert [(e.node, e.from_spool, e.status) for e in again if isinstance(e, PartEvent)] == [
                ("node-a", False, None)]
            return events
        finally:
            a.stop()
            d.stop()
            await scp.close()

    events = asyncio.run(body())
    parts_done = {e.node: e for e in events if isinstance(e, PartEvent)}
    assert parts_done["node-a"].status == 0
    assert parts_done["node-x"].status is None and "cannot connect" in (parts_done["node-x"].error or "")
    assert {e.sop_instance_uid for e in events if isinstance(e, InstanceEvent) and e.forwarded} == uids


@pytest.mark.orthanc
def test_leaving_early_cancels_and_leaves_nothing_behind(folder: Path) -> None:
    require(orthanc_executable() is not None, "Debian's orthanc")
    paths = [write_instance(folder, 800 + n, 256 * 1024, study_uid=STUDY_UID) for n in range(30)]
    uids = {read_part10(p).sop_instance_uid for p in paths}
    spool = Spool(folder / "spool", max_bytes=64 << 20, ttl_s=600)
    scp = StorageScp(spool, ae_title="SPANNER")

    async def body() -> int:
        port = await scp.start("127.0.0.1", 0)
        a = OrthancPeer(aet="ARCH_A", modalities={"spanner": ("SPANNER", "127.0.0.1", port)})
        d = OrthancPeer(aet="DEST_D")
        try:
            a.start().upload_many(p.read_bytes() for p in paths)
            d.start()
            parts = [HolderPart("node-a", Peer("ARCH_A", "127.0.0.1", a.dicom_port),
                                partial(study_identifier, STUDY_UID), frozenset(uids))]
            async with contextlib.aclosing(proxy_move(scp, parts, Peer("DEST_D", "127.0.0.1", d.dicom_port),
                                                      calling_ae="SPANNER")) as events:
                async for _event in events:
                    break  # the client went away after the first event
            assert scp.active == 0  # later C-STOREs of that C-MOVE are refused, not kept
            for _ in range(100):  # let whatever the archive still had in flight arrive
                before = len(spool) + scp.refused
                await asyncio.sleep(0.05)
                if len(spool) + scp.refused == before:
                    break
            return len(d.instances())
        finally:
            a.stop()
            d.stop()
            await scp.close()

    at_destination = asyncio.run(body())
    assert at_destination >= 1
    assert len(spool) + scp.refused <= len(uids)
    assert list(spool.incoming.iterdir()) == []


def test_the_deadline_cancels_a_holder_that_never_answers(folder: Path) -> None:
    """An archive (the engine's own acceptor) that takes the C-MOVE and never answers it: at the deadline
    the part ends with the reason, the archive's request is cancelled, and no retrieval stays registered."""
    spool = Spool(folder / "spool", max_bytes=1 << 20, ttl_s=600)
    scp = StorageScp(spool, ae_title="SPANNER")
    stopped: list[bool] = []

    async def never(request: Request) -> AsyncIterator[MoveResult]:
        try:
            await asyncio.Event().wait()
            yield MoveResult(Status.SUCCESS)
        finally:
            stopped.append(request.cancelled.is_set())

    archive = Acceptor(AcceptorConfig("SLOW", (STUDY_ROOT_MOVE,)), Handlers(move=never))

    async def body() -> list[InstanceEvent | PartEvent]:
        await scp.start("127.0.0.1", 0)
        port = await archive.start("127.0.0.1", 0)
        try:
            parts = [HolderPart("node-slow", Peer("SLOW", "127.0.0.1", port),
                                partial(study_identifier, STUDY_UID))]
            nowhere = Peer("DEST", "127.0.0.1", ClosedPort().port)  # never reached: nothing arrives
            return [e async for e in proxy_move(scp, parts, nowhere, calling_ae="SPANNER", deadline_s=0.5)]
        finally:
            for _ in range(100):
                if stopped:
                    break
                await asyncio.sleep(0.01)
            await archive.close()
            await scp.close()

    started = time.monotonic()
    events = asyncio.run(body())
    assert time.monotonic() - started < 5
    assert len(events) == 1 and isinstance(events[0], PartEvent)
    assert events[0].status is None and "deadline of 0.5 s" in (events[0].error or "")
    assert stopped, "the archive's C-MOVE handler was never stopped"
    assert scp.active == 0


@pytest.mark.orthanc
def test_an_instance_the_store_scp_refuses_is_never_reported_delivered(folder: Path) -> None:
    """An instance over the store SCP's per-instance limit is refused (0xA700) to the archive; Orthanc then
    fails its C-MOVE. Only what D really holds is reported forwarded; the rest is listed as not received."""
    require(orthanc_executable() is not None, "Debian's orthanc")
    paths = [write_instance(folder, 900, 4096, study_uid=STUDY_UID),
             write_instance(folder, 901, 16 * 1024, study_uid=STUDY_UID),
             write_instance(folder, 902, 4096, study_uid=STUDY_UID)]
    uids = {read_part10(p).sop_instance_uid for p in paths}
    spool = Spool(folder / "spool", max_bytes=16 << 20, ttl_s=600)
    scp = StorageScp(spool, ae_title="SPANNER", max_instance_bytes=8 * 1024)

    async def body() -> tuple[list[InstanceEvent | PartEvent], set[str]]:
        port = await scp.start("127.0.0.1", 0)
        a = OrthancPeer(aet="ARCH_A", modalities={"spanner": ("SPANNER", "127.0.0.1", port)})
        d = OrthancPeer(aet="DEST_D")
        try:
            a.start().upload_many(p.read_bytes() for p in paths)
            d.start()
            parts = [HolderPart("node-a", Peer("ARCH_A", "127.0.0.1", a.dicom_port),
                                partial(study_identifier, STUDY_UID), frozenset(uids))]
            events = [e async for e in proxy_move(scp, parts, Peer("DEST_D", "127.0.0.1", d.dicom_port),
                                                  calling_ae="SPANNER")]
            in_d = {d.get(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"] for i in d.instances()}
            return events, in_d
        finally:
            a.stop()
            d.stop()
            await scp.close()

    events, in_d = asyncio.run(body())
    forwarded = {e.sop_instance_uid for e in events if isinstance(e, InstanceEvent) and e.forwarded}
    (part,) = [e for e in events if isinstance(e, PartEvent)]
    assert read_part10(paths[1]).sop_instance_uid in part.not_received
    assert part.status != 0
    assert forwarded == in_d == uids - part.not_received
    assert list(spool.incoming.iterdir()) == []


def image_identifier(study_uid: str, uids: frozenset[str], transfer_syntax: str) -> bytes:
    """IMAGE level, for the instances ``write_instance`` makes (one series: the study UID + ".1")."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "IMAGE"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = f"{study_uid}.1"
    ds.SOPInstanceUID = sorted(uids)
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, transfer_syntax == IMPLICIT_VR_LE
    write_dataset(out, ds)
    return out.getvalue()


@pytest.mark.orthanc
def test_failover_to_the_mirror_when_a_holder_fails(folder: Path) -> None:
    """A mirrored study on A and C; A cannot move to the spanner (it does not know it: 0xA801), so the part
    fails over to C, which is asked for just the instances that did not come, and they all arrive."""
    require(orthanc_executable() is not None, "Debian's orthanc")
    paths = [write_instance(folder, 950 + n, 4096, study_uid=STUDY_UID) for n in range(3)]
    uids = frozenset(read_part10(p).sop_instance_uid for p in paths)
    spool = Spool(folder / "spool", max_bytes=16 << 20, ttl_s=600)
    scp = StorageScp(spool, ae_title="SPANNER")

    async def body() -> tuple[list[InstanceEvent | PartEvent], int]:
        port = await scp.start("127.0.0.1", 0)
        a = OrthancPeer(aet="ARCH_A")  # no DicomModalities entry for the spanner
        c = OrthancPeer(aet="ARCH_C", modalities={"spanner": ("SPANNER", "127.0.0.1", port)})
        d = OrthancPeer(aet="DEST_D")
        try:
            a.start().upload_many(p.read_bytes() for p in paths)
            c.start().upload_many(p.read_bytes() for p in paths)
            d.start()
            parts = [HolderPart("node-a", Peer("ARCH_A", "127.0.0.1", a.dicom_port),
                                partial(study_identifier, STUDY_UID), uids,
                                fallbacks=(Fallback("node-c", Peer("ARCH_C", "127.0.0.1", c.dicom_port)),),
                                retry=lambda missing: partial(image_identifier, STUDY_UID, missing))]
            events = [e async for e in proxy_move(scp, parts, Peer("DEST_D", "127.0.0.1", d.dicom_port),
                                                  calling_ae="SPANNER")]
            return events, len(d.instances())
        finally:
            for peer in (a, c, d):
                peer.stop()
            await scp.close()

    events, at_destination = asyncio.run(body())
    check_order(events)
    parts_done = {e.node: e for e in events if isinstance(e, PartEvent)}
    assert parts_done["node-a"].status != 0 and parts_done["node-a"].not_received == uids
    assert parts_done["node-a"].failover_to == "node-c"
    assert parts_done["node-c"].status == 0 and not parts_done["node-c"].not_received
    assert {e.sop_instance_uid for e in events if isinstance(e, InstanceEvent) and e.forwarded} == uids
    assert {e.node for e in events if isinstance(e, InstanceEvent)} == {"node-c"}
    assert at_destination == 3


@pytest.mark.orthanc
def test_holder_killed_mid_transfer_the_rest_comes_from_the_mirror(folder: Path) -> None:
    """A's C-STOREs reach the spanner through a relay holding them 30 ms (a WAN hop), so its transfer
    takes a while; A is killed after its first instance was forwarded. The part fails over to C for what
    had not arrived; everything reaches D exactly once, and nothing is reported forwarded twice."""
    require(orthanc_executable() is not None, "Debian's orthanc")
    paths = [write_instance(folder, 1000 + n, 16 * 1024, study_uid=STUDY_UID) for n in range(20)]
    uids = frozenset(read_part10(p).sop_instance_uid for p in paths)
    spool = Spool(folder / "spool", max_bytes=64 << 20, ttl_s=600)
    scp = StorageScp(spool, ae_title="SPANNER")

    async def body() -> tuple[list[InstanceEvent | PartEvent], set[str]]:
        port = await scp.start("127.0.0.1", 0)
        relay = await start_relay(port, 0.03)
        relay_port = relay.sockets[0].getsockname()[1]
        a = OrthancPeer(aet="ARCH_A", modalities={"spanner": ("SPANNER", "127.0.0.1", relay_port)})
        c = OrthancPeer(aet="ARCH_C", modalities={"spanner": ("SPANNER", "127.0.0.1", port)})
        d = OrthancPeer(aet="DEST_D")
        try:
            a.start().upload_many(p.read_bytes() for p in paths)
            c.start().upload_many(p.read_bytes() for p in paths)
            d.start()
            parts = [HolderPart("node-a", Peer("ARCH_A", "127.0.0.1", a.dicom_port),
                                partial(study_identifier, STUDY_UID), uids,
                                fallbacks=(Fallback("node-c", Peer("ARCH_C", "127.0.0.1", c.dicom_port)),),
                                retry=lambda missing: partial(image_identifier, STUDY_UID, missing))]
            events: list[InstanceEvent | PartEvent] = []
            async for event in proxy_move(scp, parts, Peer("DEST_D", "127.0.0.1", d.dicom_port),
                                          calling_ae="SPANNER"):
                events.append(event)
                if isinstance(event, InstanceEvent) and event.node == "node-a" and a.running:
                    a.stop(graceful=False)
            in_d = {d.get(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"] for i in d.instances()}
            return events, in_d
        finally:
            relay.close()
            for peer in (a, c, d):
                peer.stop()
            await scp.close()

    events, in_d = asyncio.run(body())
    check_order(events)
    forwarded = [e for e in events if isinstance(e, InstanceEvent) and e.forwarded]
    from_a = {e.sop_instance_uid for e in forwarded if e.node == "node-a"}
    from_c = {e.sop_instance_uid for e in forwarded if e.node == "node-c"}
    parts_done = {e.node: e for e in events if isinstance(e, PartEvent)}
    assert from_a and from_c, (len(from_a), len(from_c))
    assert parts_done["node-a"].failover_to == "node-c"
    assert parts_done["node-a"].not_received == uids - from_a
    assert from_a.isdisjoint(from_c) and from_a | from_c == uids == in_d
    assert len(forwarded) == len(uids)
    assert list(spool.incoming.iterdir()) == []
