"""The spanner's storage SCP (spanner.store_scp): real Orthanc archives C-MOVE to it, several retrievals at
once from one archive and from two, and every instance lands in the spool under its own retrieval; the
fallback match (calling AE + expected SOP Instance UIDs) for senders without a Move Originator Message ID;
unexpected instances refused; a full spool answers 0xA700 and the failure is kept."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
from pydicom import dcmread

from spanner.dicom_constants import EXPLICIT_VR_LE, IMPLICIT_VR_LE, STUDY_ROOT_MOVE, Status
from spanner.dimse.association import Response, connect
from spanner.dimse.store import read_part10, send_files
from spanner.spool import Spool
from spanner.store_scp import Expectation, StorageScp
from tests.conftest import require
from tests.peers.instances import study_identifier, write_instance
from tests.peers.orthanc import OrthancPeer, orthanc_executable

ROOT = "1.2.826.0.1.3680043.8.498.7714"


@pytest.fixture
def folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="spanner-storescp-") as name:
        yield Path(name)


async def move_study(port: int, archive_ae: str, study_uid: str, expectation: Expectation,
                     destination: str = "SPANNER") -> Response:
    assoc = await connect("127.0.0.1", port, calling_ae="SPANNER", called_ae=archive_ae,
                          contexts=[(STUDY_ROOT_MOVE, (IMPLICIT_VR_LE, EXPLICIT_VR_LE))])
    try:
        async for response in assoc.move(STUDY_ROOT_MOVE, partial(study_identifier, study_uid), destination,
                                         expectation.message_id):
            last = response
    finally:
        await assoc.release()
    return last


def make_study(folder: Path, study: int, count: int) -> list[Path]:
    """``count`` instances of study ``study`` (write_instance numbers them; the UIDs differ per study)."""
    out = folder / f"study{study}"
    out.mkdir()
    paths = []
    for n in range(count):
        path = write_instance(out, study * 100 + n, 4096, study_uid=f"{ROOT}.{study}")
        paths.append(path)
    return paths


@pytest.mark.orthanc
def test_concurrent_moves_from_orthanc_archives_do_not_mix(folder: Path) -> None:
    require(orthanc_executable() is not None, "Debian's orthanc")

    async def body() -> None:
        spool = Spool(folder / "spool", max_bytes=64 << 20, ttl_s=600)
        scp = StorageScp(spool, ae_title="SPANNER")
        port = await scp.start("127.0.0.1", 0)
        target = {"spanner": ("SPANNER", "127.0.0.1", port)}
        a = OrthancPeer(aet="ARCH_A", modalities=target, extra_config={"SynchronousCMove": True})
        b = OrthancPeer(aet="ARCH_B", modalities=target)
        try:
            a.start()
            b.start()
            studies = {1: (a, make_study(folder, 1, 4)), 2: (a, make_study(folder, 2, 3)),
                       3: (b, make_study(folder, 3, 5))}
            for archive, paths in studies.values():
                archive.upload_many(p.read_bytes() for p in paths)
            uids = {s: {read_part10(p).sop_instance_uid for p in paths} for s, (_, paths) in studies.items()}
            study_uid = {s: str(dcmread(paths[0]).StudyInstanceUID) for s, (_, paths) in studies.items()}
            expectations = {s: scp.expect(archive.aet, f"node-{archive.aet}")
                            for s, (archive, _) in studies.items()}
            finals = await asyncio.gather(*(
                move_study(archive.dicom_port, archive.aet, study_uid[s], expectations[s])
                for s, (archive, _) in studies.items()))
            orthanc_log = a.log_tail(30)
        finally:
            a.stop()
            b.stop()
            await scp.close()
        assert [f.status for f in finals] == [Status.SUCCESS] * 3, orthanc_log
        for s, expectation in expectations.items():
            assert expectation.received == uids[s]
            arrived = []
            while not expectation.arrivals.empty():
                arrived.append(expectation.arrivals.get_nowait())
            assert {e.sop_instance_uid for e in arrived} == uids[s]
            assert {e.node for e in arrived} == {expectation.node}
            assert not expectation.failures
        assert len(spool) == 12 and scp.refused == 0
        assert list(spool.incoming.iterdir()) == []

    asyncio.run(body())


def test_fallback_match_refusals_and_a_full_spool(folder: Path) -> None:
    paths = make_study(folder, 4, 4)
    uids = [read_part10(p).sop_instance_uid for p in paths]

    async def body() -> None:
        spool = Spool(folder / "spool", max_bytes=10 * 1024, ttl_s=600)  # room for two instances
        scp = StorageScp(spool, ae_title="SPANNER")
        port = await scp.start("127.0.0.1", 0)
        try:
            older = scp.expect("MODALITY", "node-m", {uids[0], uids[1]})
            newer = scp.expect("MODALITY", "node-m", {uids[1]})
            other_ae = scp.expect("ELSEWHERE", "node-e", {uids[2]})
            results = await send_files("127.0.0.1", port, paths[:3], calling_ae="MODALITY",
                                       called_ae="SPANNER")
            # uids[0], uids[1] go to the older expectation (oldest first); uids[2] is expected only from
            # another AE: refused.
            assert [r.status for r in results] == [Status.SUCCESS, Status.SUCCESS, Status.UNABLE_TO_PROCESS]
            assert older.received == {uids[0], uids[1]} and not newer.received and not other_ae.received
            # A Move Originator Message ID no retrieval holds falls back to the UID match.
            results = await send_files("127.0.0.1", port, [paths[1]], calling_ae="MODALITY",
                                       called_ae="SPANNER", move_originator=("SPANNER", 999))
            assert [r.status for r in results] == [Status.SUCCESS]
            assert newer.received == {uids[1]}
            # By ID: any instance counts for its retrieval. With the spool's two instances on hold
            # (being handed on), a third does not fit: 0xA700, and the retrieval knows which one.
            by_id = scp.expect("MODALITY", "node-m")
            with spool.holding(spool.get(uids[0])), spool.holding(spool.get(uids[1])):  # type: ignore[arg-type]
                results = await send_files("127.0.0.1", port, [paths[3]], calling_ae="MODALITY",
                                           called_ae="SPANNER", move_originator=("SPANNER", by_id.message_id))
            assert [r.status for r in results] == [Status.OUT_OF_RESOURCES]
            assert list(by_id.failures) == [uids[3]] and "full" in by_id.failures[uids[3]]
            results = await send_files("127.0.0.1", port, paths[2:], calling_ae="MODALITY",
                                       called_ae="SPANNER", move_originator=("SPANNER", by_id.message_id))
            assert [r.status for r in results] == [Status.SUCCESS, Status.SUCCESS]  # the oldest evicted
            assert by_id.received == {uids[2], uids[3]} and len(spool) == 2
            scp.forget(by_id)
            results = await send_files("127.0.0.1", port, [paths[3]], calling_ae="MODALITY",
                                       called_ae="SPANNER", move_originator=("SPANNER", by_id.message_id))
            assert [r.status for r in results] == [Status.UNABLE_TO_PROCESS]
        finally:
            await scp.close()
        assert scp.refused == 2
        assert list(spool.incoming.iterdir()) == []

    asyncio.run(body())
