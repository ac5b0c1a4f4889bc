"""Proxy C-MOVE through the DICOM front (scp/) with real peers.

Orthanc archives A, B and C know only the spanner's storage SCP; Orthanc D and dcmtk's storescp are
destinations no archive knows, registered only as spanner destinations. dcmtk's movescu through the front
lands a study split across A and B whole in D and in storescp's folder. Then holders killed by PID in the
middle of a transfer (their C-STOREs pass a relay that holds them 30 ms, so a transfer takes a while): the
rest of a mirrored study comes from the mirror; a study nobody else holds ends 0xB000 with the UIDs that
did not arrive, and the counts say only what reached the destination.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE

from scp import translate
from scp.server import SpannerScp
from spanner.dimse.store import read_part10
from spanner.settings import load_settings
from tests.conftest import Api, require
from tests.peers.instances import Storescp, write_instance
from tests.peers.orthanc import OrthancPeer, orthanc_executable, stop_all

ROOT = "1.2.826.0.1.3680043.8.498.7719"
SPLIT, MIRRORED, ALONE, LARGE = f"{ROOT}.1", f"{ROOT}.2", f"{ROOT}.3", f"{ROOT}.5"
SPAN_AE = "PF_FRONT"


def start_relay(target_port: int, delay_ms: float) -> tuple[subprocess.Popen[str], int]:
    """benchmarks.relay as a helper process: its port, in front of ``target_port``; ended by PID."""
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.relay", "--targets", str(target_port),
                             "--delay-ms", str(delay_ms)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    return proc, int(json.loads(proc.stdout.readline())["ports"][0])


def stop_relay(proc: subprocess.Popen[str]) -> None:
    if proc.stdin is not None:
        proc.stdin.close()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def dcmtk(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                          env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"})


def uids_in(peer: OrthancPeer) -> set[str]:
    return {peer.get(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"] for i in peer.instances()}


@pytest.fixture(scope="module")
def folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="spanner-front-proxy-") as name:
        yield Path(name)


@pytest.fixture(scope="module")
def front(api: Api) -> Iterator[SpannerScp]:
    scp = SpannerScp(load_settings(scp_port=0, scp_span_cache_ttl_s=0.1), base_url=api.base_url)
    scp.start()
    yield scp
    scp.stop()


@pytest.fixture(scope="module")
def fleet(api: Api, folder: Path) -> Iterator[dict[str, Any]]:
    """A (slow: its C-STOREs pass a 30 ms relay), B, C as archives; D and storescp as destinations."""
    require(orthanc_executable() is not None, "Debian's orthanc")
    require(shutil.which("movescu") is not None, "dcmtk (movescu, storescp)")
    files = folder / "files"
    files.mkdir()
    split_a = [write_instance(files, 3000 + n, 32 * 1024, study_uid=SPLIT) for n in range(4)]
    split_b = [write_instance(files, 3100 + n, 32 * 1024, study_uid=SPLIT, series=2) for n in range(3)]
    mirrored = [write_instance(files, 3200 + n, 16 * 1024, study_uid=MIRRORED) for n in range(20)]
    alone = [write_instance(files, 3300 + n, 16 * 1024, study_uid=ALONE) for n in range(20)]
    large = [write_instance(files, 3500 + n, 512 * 1024, study_uid=LARGE) for n in range(2)]
    store_port = int(str(api.settings["store_port"]))
    relay, relay_port = start_relay(store_port, 30)
    direct, slow = ("SPANNER", "127.0.0.1", store_port), ("SPANNER", "127.0.0.1", relay_port)
    a = OrthancPeer(aet="PF_A", modalities={"spanner": slow})
    b = OrthancPeer(aet="PF_B", modalities={"spanner": direct})
    c = OrthancPeer(aet="PF_C", modalities={"spanner": direct})
    e = OrthancPeer(aet="PF_E", modalities={"spanner": slow})
    d = OrthancPeer(aet="PF_D")
    # A destination that rejects the association: it checks the called AE title, and is registered
    # under another one.
    r = OrthancPeer(aet="PF_R", extra_config={"DicomCheckCalledAet": True})
    received = folder / "storescp"
    received.mkdir()
    storescp = Storescp(received)
    nodes = {"pf-a": a, "pf-b": b, "pf-c": c, "pf-e": e}
    try:
        a.start().upload_many(p.read_bytes() for p in split_a + mirrored)
        b.start().upload_many(p.read_bytes() for p in split_b + large)
        c.start().upload_many(p.read_bytes() for p in mirrored)
        e.start().upload_many(p.read_bytes() for p in alone)
        d.start()
        r.start()
        for priority, (name, peer) in enumerate(nodes.items()):
            api.add_node(name, peer.dicom_port, ae_title=peer.aet, priority=10 * (priority + 1))
        api.add_span("pf-front", list(nodes), ae_title=SPAN_AE)
        for name, ae, port in (("pf-d", "PF_D", d.dicom_port), ("pf-scp", "DEST", storescp.port),
                               ("pf-r", "NOT_PF_R", r.dicom_port)):
            made = api.http.post("/api/v1/destinations",
                                 json={"name": name, "ae_title": ae, "host": "127.0.0.1", "port": port})
            assert made.status_code == 201, made.text
        yield {"peers": nodes, "d": d, "storescp": storescp,
               "uids": {study: {read_part10(p).sop_instance_uid for p in paths} for study, paths in
                        ((SPLIT, split_a + split_b), (MIRRORED, mirrored), (ALONE, alone), (LARGE, large))}}
    finally:
        for name in ("pf-d", "pf-scp", "pf-r"):
            api.http.delete(f"/api/v1/destinations/{name}")
        api.http.delete("/api/v1/spans/pf-front")
        for name in nodes:
            api.http.delete(f"/api/v1/nodes/{name}")
        stop_all([a, b, c, e, d, r], graceful=False)
        storescp.stop()
        stop_relay(relay)


def test_movescu_lands_a_split_study_whole_at_destinations_no_archive_knows(
        fleet: dict[str, Any], front: SpannerScp) -> None:
    expected = fleet["uids"][SPLIT]
    for destination in ("PF_D", "DEST"):
        run = dcmtk("movescu", "-S", "-aet", "WARDWS", "-aec", SPAN_AE, "-aem", destination,
                    "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={SPLIT}",
                    "127.0.0.1", str(front.port))
        assert run.returncode == 0, run.stderr
    assert uids_in(fleet["d"]) == expected
    assert set(fleet["storescp"].received()) == expected


def peak_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for process {pid}")


def store_and_ingress_pids() -> list[int]:
    from cluster.ray_internals import actor_table

    pids = []
    for info in actor_table().values():
        cls = str(info.get("ActorClassName", ""))
        if info.get("State") == "ALIVE" and info.get("Pid") and (
                cls.endswith("StoreService") or "Ingress" in cls or "ServeReplica" in cls):
            pids.append(int(info["Pid"]))
    return pids


def test_a_study_larger_than_the_memory_bound_passes_with_bounded_memory(
        api: Api, fleet: dict[str, Any], folder: Path) -> None:
    """192 MiB of instances through the store actor: neither it nor the ingress grows by half of that
    (holding the study would grow one of them by all of it). benchmarks.retrieval does the same with 1 GB."""
    big = folder / "big"
    big.mkdir()
    paths = [write_instance(big, 3400 + n, 4 << 20, chunked=True, study_uid=f"{ROOT}.4") for n in range(48)]
    expected = {read_part10(p).sop_instance_uid for p in paths}
    m = OrthancPeer(aet="PF_M", modalities={"spanner": ("SPANNER", "127.0.0.1",
                                                        int(str(api.settings["store_port"])))})
    try:
        m.start().upload_many(p.read_bytes() for p in paths)
        for path in paths:
            path.unlink()
        api.add_node("pf-m", m.dicom_port, ae_title="PF_M")
        api.add_span("pf-big", ["pf-m"], ae_title="PF_BIG")
        warm = api.http.post("/api/v1/retrievals", timeout=120, json={  # the store actor exists from here
            "level": "STUDY", "uids": {"StudyInstanceUID": SPLIT}, "span": "pf-front",
            "destination_ae": "DEST"})
        assert json.loads(warm.text.splitlines()[-1])["status"] == "success", warm.text[-500:]
        pids = store_and_ingress_pids()
        assert len(pids) >= 2, "no store actor or ingress found"
        for pid in pids:
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM starts again from the current RSS
        before = {pid: peak_kib(pid, "VmRSS") for pid in pids}
        answer = api.http.post("/api/v1/retrievals", timeout=300, json={
            "level": "STUDY", "uids": {"StudyInstanceUID": f"{ROOT}.4"}, "span": "pf-big",
            "destination_ae": "DEST", "timeout_s": 240})
        result = json.loads(answer.text.splitlines()[-1])
        assert (result["status"], result["completed"]) == ("success", 48), result
        growth_mib = {pid: (peak_kib(pid, "VmHWM") - before[pid]) / 1024 for pid in pids}
        print(f"peak resident memory growth by PID (MiB): {growth_mib}")
        assert max(growth_mib.values()) < 96, growth_mib
        assert expected <= set(fleet["storescp"].received())
    finally:
        api.http.delete("/api/v1/spans/pf-big")
        api.http.delete("/api/v1/nodes/pf-m")
        m.stop(graceful=False)
        for path in fleet["storescp"].folder.iterdir():
            path.unlink()  # 192 MiB the other tests do not need


def front_move(front: SpannerScp, study: str, destination: str) -> tuple[Dataset, Dataset | None]:
    """C-MOVE through the front; the final response (status, identifier)."""
    ae = AE(ae_title="WARDWS")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(translate.STUDY_ROOT_MOVE)
    assoc = ae.associate("127.0.0.1", front.port, ae_title=SPAN_AE)
    assert assoc.is_established
    ds = Dataset()
    ds.QueryRetrieveLevel, ds.StudyInstanceUID = "STUDY", study
    try:
        responses = list(assoc.send_c_move(ds, destination, translate.STUDY_ROOT_MOVE, msg_id=9))
    finally:
        assoc.release()
    return responses[-1]


def failed_list(identifier: Dataset | None) -> set[str]:
    assert identifier is not None and "FailedSOPInstanceUIDList" in identifier, identifier
    failed = identifier.FailedSOPInstanceUIDList
    return {failed} if isinstance(failed, str) else set(failed)


def test_an_ae_the_spanner_does_not_know_stays_direct_and_fails_at_the_archives(
        fleet: dict[str, Any], front: SpannerScp) -> None:
    final, _ = front_move(front, SPLIT, "NOWHERE")
    assert final.Status in (0xA801, 0xC000), final  # Orthanc 1.10 says 0xC000 for a destination it lacks
    assert final.NumberOfCompletedSuboperations == 0


def test_a_destination_that_rejects_the_association_fails_every_instance_with_the_reason(
        api: Api, fleet: dict[str, Any], front: SpannerScp) -> None:
    final, identifier = front_move(front, SPLIT, "NOT_PF_R")
    assert final.Status == 0xC000, final
    assert final.NumberOfCompletedSuboperations == 0
    assert final.NumberOfFailedSuboperations == len(fleet["uids"][SPLIT])
    assert failed_list(identifier) == fleet["uids"][SPLIT]
    assert "NOT_PF_R" in final.ErrorComment and "rejected the association" in final.ErrorComment, \
        final.ErrorComment
    assert list((Path(str(api.settings["var_dir"])) / "spool" / "incoming").iterdir()) == []


def test_a_full_spool_fails_the_move_with_the_uids_and_keeps_nothing(
        api: Api, fleet: dict[str, Any], front: SpannerScp, folder: Path) -> None:
    """The operator's way to change the spool: end the store actor, which the next retrieval creates with
    the new settings. Here it is created with a spool of 256 KiB, smaller than each 512 KiB instance."""
    import ray

    from actors.store_service import ACTOR_NAME, StoreConfig, StoreService

    with contextlib.suppress(ValueError):  # ValueError: none yet
        ray.kill(ray.get_actor(ACTOR_NAME, namespace=api.namespace))
    spool = folder / "small-spool"
    config = StoreConfig("SPANNER", "127.0.0.1", int(str(api.settings["store_port"])), str(spool), 256 * 1024,
                         600.0)
    small = StoreService.options(name=ACTOR_NAME, namespace=api.namespace, lifetime="detached",
                                 get_if_exists=True).remote(config)  # type: ignore[attr-defined]
    try:
        assert ray.get(small.config.remote(), timeout=60) == config
        final, identifier = front_move(front, LARGE, "DEST")
        # The store SCP answers Orthanc 0xA700 (out of resources) for each; Orthanc then fails its C-MOVE
        # with 0xC000 and no comment, and the spanner names the instances that never came.
        assert final.Status == 0xC000, final
        assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (0, 2)
        assert failed_list(identifier) == fleet["uids"][LARGE]
        assert "did not arrive" in final.ErrorComment, final.ErrorComment
        assert [p.name for p in spool.rglob("*") if p.is_file()] == [".dicom-spanner-spool"]
    finally:
        ray.kill(small)  # the next retrieval creates it again with the session's settings


# -- last: these kill holders A and E -------------------------------------------------------------------
def move_and_kill(front: SpannerScp, study: str, holder: OrthancPeer, storescp: Storescp
                  ) -> tuple[Dataset, Dataset | None, set[str]]:
    """C-MOVE ``study`` through the front to storescp; kill ``holder`` by PID once the first instance of
    the study is at the destination. The final response (status, identifier), and what arrived."""
    before = set(storescp.received())
    names_before = {p.name for p in storescp.folder.iterdir()}
    ae = AE(ae_title="WARDWS")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(translate.STUDY_ROOT_MOVE)
    assoc = ae.associate("127.0.0.1", front.port, ae_title=SPAN_AE)
    assert assoc.is_established
    ds = Dataset()
    ds.QueryRetrieveLevel, ds.StudyInstanceUID = "STUDY", study
    responses: list[tuple[Dataset, Dataset | None]] = []
    worker = threading.Thread(target=lambda: responses.extend(
        assoc.send_c_move(ds, "DEST", translate.STUDY_ROOT_MOVE, msg_id=7)))
    worker.start()
    deadline = time.monotonic() + 30
    while {p.name for p in storescp.folder.iterdir()} <= names_before and time.monotonic() < deadline:
        time.sleep(0.01)  # storescp only writes files: there is no event to wait on
    assert holder.running, "the transfer ended before the holder could be killed"
    holder.stop(graceful=False)
    worker.join(90)
    assoc.release()
    assert responses, "no C-MOVE response"
    status, identifier = responses[-1]
    return status, identifier, set(storescp.received()) - before


def test_holder_killed_mid_transfer_the_rest_comes_from_the_mirror(
        fleet: dict[str, Any], front: SpannerScp) -> None:
    expected = fleet["uids"][MIRRORED]
    final, _, arrived = move_and_kill(front, MIRRORED, fleet["peers"]["pf-a"], fleet["storescp"])
    assert final.Status == 0x0000, final
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (len(expected), 0)
    assert arrived == expected


def test_holder_killed_mid_transfer_with_no_other_holder_fails_what_did_not_arrive(
        fleet: dict[str, Any], front: SpannerScp) -> None:
    expected = fleet["uids"][ALONE]
    final, identifier, arrived = move_and_kill(front, ALONE, fleet["peers"]["pf-e"], fleet["storescp"])
    assert final.Status == 0xB000, final
    assert 0 < len(arrived) < len(expected)
    assert final.NumberOfCompletedSuboperations == len(arrived)
    assert final.NumberOfFailedSuboperations == len(expected - arrived)
    assert identifier is not None and "FailedSOPInstanceUIDList" in identifier, identifier
    failed = identifier.FailedSOPInstanceUIDList
    assert set([failed] if isinstance(failed, str) else failed) == expected - arrived
