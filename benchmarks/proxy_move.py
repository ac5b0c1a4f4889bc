"""Proxy C-MOVE against Orthanc-to-Orthanc direct C-MOVE of the same study, in the same run.

    python -m benchmarks.proxy_move --instances 200 --kib 512 --rounds 3

- direct: archive A C-MOVEs the study to Orthanc D, which A knows (the baseline);
- proxy: A C-MOVEs to the spanner's storage SCP (spanner.store_scp, in this process), which forwards each
  instance to D by C-STORE as it reaches the spool (spanner.proxy_move). The spool is emptied between
  rounds, so every round asks the archive.
Reported per method: wall time, instances/s, MB/s (median of the rounds); for proxy also the time to the
first instance in the spool and to the first one accepted by D, the CPU of this process (utime+stime from
/proc) and its peak resident memory growth (VmHWM, reset before the rounds). D is emptied between rounds.
Everything runs on loopback and shares the machine's cores with whatever else runs: say so with figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

from spanner.dicom_constants import EXPLICIT_VR_LE, IMPLICIT_VR_LE, STUDY_ROOT_MOVE
from spanner.dimse.association import connect
from spanner.dimse.store import read_part10
from spanner.proxy_move import HolderPart, InstanceEvent, Peer, proxy_move
from spanner.spool import Spool, SpoolEntry
from spanner.store_scp import StorageScp
from tests.peers.instances import study_identifier, write_instance
from tests.peers.orthanc import OrthancPeer

STUDY_UID = "1.2.826.0.1.3680043.8.498.7716.1"


def cpu_s() -> float:
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def direct(a: OrthancPeer) -> float:
    started = time.perf_counter()
    assoc = await connect("127.0.0.1", a.dicom_port, calling_ae="BENCH", called_ae=a.aet,
                          contexts=[(STUDY_ROOT_MOVE, (EXPLICIT_VR_LE, IMPLICIT_VR_LE))], dimse_timeout_s=600)
    async for response in assoc.move(STUDY_ROOT_MOVE, partial(study_identifier, STUDY_UID), "DEST_D", 1):
        final = response
    await assoc.release()
    assert final.status == 0, hex(final.status)
    return time.perf_counter() - started


class TimedSpool(Spool):
    """Notes when the first instance of a round reached the spool."""

    first_put = 0.0

    def put(self, node: str, path: Path) -> SpoolEntry:
        if not self.first_put:
            self.first_put = time.perf_counter()
        return super().put(node, path)


async def proxied(scp: StorageScp, spool: TimedSpool, a: OrthancPeer, d: OrthancPeer,
                  expected: frozenset[str]) -> tuple[float, float, float]:
    spool.clear()
    spool.first_put = 0.0
    started = time.perf_counter()
    first_forwarded = 0.0
    forwarded = 0
    parts = [HolderPart("a", Peer(a.aet, "127.0.0.1", a.dicom_port), partial(study_identifier, STUDY_UID),
                        expected)]
    async for event in proxy_move(scp, parts, Peer("DEST_D", "127.0.0.1", d.dicom_port),
                                  calling_ae="SPANNER", dimse_timeout_s=600):
        if isinstance(event, InstanceEvent) and event.forwarded:
            forwarded += 1
            if not first_forwarded:
                first_forwarded = time.perf_counter() - started
    assert forwarded == len(expected), f"{forwarded} of {len(expected)} forwarded"
    return time.perf_counter() - started, spool.first_put - started, first_forwarded


async def main(instances: int, kib: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as name:
        folder = Path(name)
        files = folder / "files"
        files.mkdir()
        paths = [write_instance(files, 900 + n, kib * 1024, study_uid=STUDY_UID) for n in range(instances)]
        expected = frozenset(read_part10(p).sop_instance_uid for p in paths)
        total_mb = sum(p.stat().st_size for p in paths) / 1e6
        spool = TimedSpool(folder / "spool", max_bytes=int(total_mb * 1e6 * 2) + (1 << 20), ttl_s=3600)
        scp = StorageScp(spool, ae_title="SPANNER")
        port = await scp.start("127.0.0.1", 0)
        d = OrthancPeer(aet="DEST_D").start()
        a = OrthancPeer(aet="ARCH_A", modalities={"spanner": ("SPANNER", "127.0.0.1", port),
                                                  "d": ("DEST_D", "127.0.0.1", d.dicom_port)}).start()
        try:
            a.upload_many(p.read_bytes() for p in paths)
            for p in paths:
                p.unlink()
            times: dict[str, list[float]] = {"direct": [], "proxy": []}
            firsts: list[tuple[float, float]] = []
            cpu = 0.0
            Path("/proc/self/clear_refs").write_text("5")
            rss_before = peak_rss_mib()
            for _ in range(rounds):
                d.clear()
                times["direct"].append(await direct(a))
                d.clear()
                cpu_before = cpu_s()
                wall, first_spooled, first_forwarded = await proxied(scp, spool, a, d, expected)
                cpu += cpu_s() - cpu_before
                times["proxy"].append(wall)
                firsts.append((first_spooled, first_forwarded))
                assert len(d.instances()) == instances
            rss_growth = peak_rss_mib() - rss_before
        finally:
            a.stop()
            d.stop()
            await scp.close()
    print(f"study: {instances} instances, {total_mb:.1f} MB; {rounds} rounds; {os.cpu_count()} CPUs (shared)")
    for method, values in times.items():
        wall = statistics.median(values)
        print(f"{method:7s} median {wall * 1000:8.1f} ms  {instances / wall:7.1f} inst/s  "
              f"{total_mb / wall:7.1f} MB/s")
    ratio = statistics.median(times["direct"]) / statistics.median(times["proxy"])
    print(f"proxy throughput / direct throughput: {ratio:.2f}")
    spooled, forwarded = statistics.median(f[0] for f in firsts), statistics.median(f[1] for f in firsts)
    print(f"proxy: first instance in the spool after {spooled * 1000:.1f} ms, accepted by D after "
          f"{forwarded * 1000:.1f} ms (median)")
    print(f"proxy: CPU of the spanner process {cpu / rounds * 1000:.0f} ms per study "
          f"({cpu / rounds / total_mb * 1000:.2f} ms/MB); peak RSS growth {rss_growth:.1f} MiB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--kib", type=int, default=512, help="pixel data per instance, KiB")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.instances, args.kib, args.rounds))
