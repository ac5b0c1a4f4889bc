"""Retrieval through the spanner against Orthanc-to-Orthanc direct C-MOVE of the same study, in the same run.

    python -m benchmarks.retrieval [--quick] [--instances 250 --mib 4 --rounds 2]

The spanner runs as in production (Ray, the Serve app with API keys, the store actor, the DICOM front).
Archive A (Orthanc) holds one study of N instances of M MiB; it knows three move destinations: the
spanner's storage SCP, Orthanc D and SINK (a storage SCP in this process that notes when each instance
arrives). D and SINK are also registered as spanner destinations. Each round runs every case twice, once
to D (throughput: wall time from the C-MOVE request to its final response, instances/s, MB/s) and once
to SINK (time until the first instance is at the destination). D is emptied before each run.

Cases (``CASES``; a function per case, so that another way of retrieving is one more entry):

- ``direct``: A C-MOVEs the study straight to the destination (the baseline);
- ``proxy-front``: C-MOVE to the span's AE title on the spanner's DICOM front, destination D or SINK; the
  front asks the API, which finds the holders and has the store actor fetch from A into its spool and
  forward each instance by C-STORE as it arrives.
- ``get-front``: C-GET to the same AE title: the store actor forwards each instance to the front, which
  C-STOREs it back on this process's own association (it plays the destination in both runs).

Memory: before the proxied runs the peak resident memory (VmHWM) of the store actor and the ingress
replica is reset (``/proc/PID/clear_refs``); after them, the growth is VmHWM minus the resident memory at
the reset. CPU per process group (utime+stime from /proc) for each case tells where the time goes.
Targets: proxied throughput >= 0.8 x direct, first instance <= 1.5 x direct's, memory growth < 200 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks.common import (
    CpuMeter,
    SimNode,
    SpannerApp,
    Target,
    add_output_args,
    free_port,
    machine_info,
    machine_line,
    md_table,
    output_paths,
    print_targets,
    targets_markdown,
    write_outputs,
)

STUDY_UID = "1.2.826.0.1.3680043.8.498.7720.1"
WARMUP_UID = "1.2.826.0.1.3680043.8.498.7720.2"
SPAN_AE = "RETRIEVE"
SINK_AE = "SINK"
MB = 1_000_000


@dataclass
class Context:
    """What every case needs: the archive, the destinations, the front, the sink's arrival times."""

    archive_aet: str
    archive_port: int
    front_port: int
    arrivals: list[float]  # perf_counter of each C-STORE the sink took, this run

    def reset(self) -> None:
        self.arrivals.clear()


@dataclass(frozen=True, slots=True)
class Run:
    case: str
    destination: str
    seconds: float
    instances: int
    first_s: float | None  # first instance at the destination (SINK runs only)


async def c_move(host: str, port: int, called_ae: str, destination: str, study: str) -> tuple[int, int]:
    """One STUDY-level C-MOVE with the engine's SCU; (final status, completed sub-operations)."""
    from spanner.dicom_constants import EXPLICIT_VR_LE, IMPLICIT_VR_LE, STUDY_ROOT_MOVE
    from spanner.dimse.association import connect
    from tests.peers.instances import study_identifier

    contexts = [(STUDY_ROOT_MOVE, (EXPLICIT_VR_LE, IMPLICIT_VR_LE))]
    assoc = await connect(host, port, calling_ae="BENCH", called_ae=called_ae, contexts=contexts,
                          dimse_timeout_s=3600)
    final = None
    async for response in assoc.move(STUDY_ROOT_MOVE, partial(study_identifier, study), destination, 1):
        final = response
    await assoc.release()
    assert final is not None
    return final.status, final.suboperations().get("completed", 0)


async def direct(ctx: Context, destination: str, study: str) -> tuple[int, int]:
    """The archive moves the study to a destination it knows."""
    return await c_move("127.0.0.1", ctx.archive_port, ctx.archive_aet, destination, study)


async def proxy_front(ctx: Context, destination: str, study: str) -> tuple[int, int]:
    """C-MOVE through the spanner's DICOM front to a spanner destination no archive needs to know."""
    return await c_move("127.0.0.1", ctx.front_port, SPAN_AE, destination, study)


async def get_front(ctx: Context, destination: str, study: str) -> tuple[int, int]:
    """C-GET through the spanner's DICOM front: the instances come back on this requester's own
    association (``destination`` plays no part: the requester is the destination)."""
    from spanner.dicom_constants import STUDY_ROOT_GET, Status
    from spanner.dimse.association import connect
    from spanner.dimse.store import StoreRequest, get, get_contexts, receive_stores
    from tests.peers.instances import study_identifier

    async def on_store(request: StoreRequest) -> int:
        ctx.arrivals.append(time.perf_counter())
        return Status.SUCCESS  # the file is deleted when the handler returns

    contexts, roles = get_contexts(STUDY_ROOT_GET)
    folder = tempfile.mkdtemp(prefix="spanner-bench-get-")
    try:
        assoc = await connect("127.0.0.1", ctx.front_port, calling_ae="BENCH", called_ae=SPAN_AE,
                              contexts=contexts, roles=roles, dimse_timeout_s=3600)
        receive_stores(assoc, folder)
        final = None
        async for response in get(assoc, STUDY_ROOT_GET, partial(study_identifier, study), 1, on_store):
            final = response
        await assoc.release()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert final is not None
    return final.status, final.suboperations().get("completed", 0)


Case = Callable[[Context, str, str], Awaitable[tuple[int, int]]]
CASES: dict[str, Case] = {"direct": direct, "proxy-front": proxy_front, "get-front": get_front}


async def timed(name: str, case: Case, ctx: Context, destination: str, study: str, expected: int) -> Run:
    ctx.reset()
    started = time.perf_counter()
    status, completed = await case(ctx, destination, study)
    seconds = time.perf_counter() - started
    if status != 0 or completed != expected:
        raise RuntimeError(f"{name} to {destination}: status 0x{status:04X}, {completed} of {expected}")
    first = ctx.arrivals[0] - started if destination == SINK_AE and ctx.arrivals else None
    return Run(name, destination, seconds, completed, first)


def vm_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux: ``echo 5 > /proc/PID/clear_refs``)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def spanner_pids() -> dict[str, list[int]]:
    """PIDs by role, with the store actor on its own."""
    from cluster.ray_internals import actor_table, ray_system_pids

    groups: dict[str, list[int]] = {"store_actor": [], "ingress": [], "node_actors": [], "proxy": [],
                                    "ray_other": []}
    for info in actor_table().values():
        if info.get("State") != "ALIVE" or not info.get("Pid"):
            continue
        cls, pid = str(info.get("ActorClassName", "")), int(info["Pid"])
        role = ("store_actor" if cls.endswith("StoreService") else "node_actors" if cls.endswith("PacsNode")
                else "ingress" if "Ingress" in cls or "ServeReplica" in cls else "proxy" if "Proxy" in cls
                else "ray_other")
        groups[role].append(pid)
    groups["ray_other"] += ray_system_pids()
    return groups


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_output_args(parser, "retrieval")
    parser.add_argument("--instances", type=int, default=None, help="instances in the study (250; quick 40)")
    parser.add_argument("--mib", type=int, default=None, help="MiB of pixel data per instance (4; quick 1)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of every case (2; quick 2)")
    args = parser.parse_args(argv)
    instances = args.instances or (40 if args.quick else 250)
    mib = args.mib or (1 if args.quick else 4)
    rounds = args.rounds or 2
    from tests.peers.orthanc import orthanc_executable

    if orthanc_executable() is None:
        print("needs Debian's orthanc (make peers)")
        return 2
    return asyncio.run(run(args, instances, mib, rounds))


async def run(args: argparse.Namespace, instances: int, mib: int, rounds: int) -> int:
    from scp.server import SpannerScp
    from spanner.dicom_constants import Status
    from spanner.dimse.acceptor import Acceptor, AcceptorConfig, Handlers
    from spanner.dimse.store import STORAGE_CLASSES, STORE_TRANSFER_SYNTAXES, StoreRequest
    from spanner.settings import load_settings
    from tests.peers.instances import write_instance
    from tests.peers.orthanc import OrthancPeer, stop_all

    paths = output_paths(args, "retrieval")
    machine = machine_info()
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="spanner-bench-retrieval-"))
    arrivals: list[float] = []

    async def on_store(request: StoreRequest) -> int:
        arrivals.append(time.perf_counter())
        return Status.SUCCESS  # the file is deleted when the handler returns

    (work / "sink").mkdir()
    sink = Acceptor(AcceptorConfig(SINK_AE, STORAGE_CLASSES, STORE_TRANSFER_SYNTAXES,
                                   prefer_proposed_order=True, store_dir=str(work / "sink")),
                    Handlers(store=on_store))
    sink_port = await sink.start("127.0.0.1", 0)
    files = work / "files"
    files.mkdir()
    study = [write_instance(files, 20000 + n, mib << 20, chunked=True, study_uid=STUDY_UID)
             for n in range(instances)]
    warmup = [write_instance(files, 29000 + n, 4096, study_uid=WARMUP_UID) for n in range(3)]
    study_bytes = sum(p.stat().st_size for p in study)
    print(f"study: {instances} instances, {study_bytes / MB:.0f} MB")
    store_port = free_port()
    a = OrthancPeer(aet="ARCHIVE_A", modalities={"spanner": ("SPANNER", "127.0.0.1", store_port)})
    d = OrthancPeer(aet="DEST_D")
    runs: list[Run] = []
    lookup_ms = float("nan")
    cpu: dict[str, dict[str, float]] = {}
    memory: dict[str, Any] = {}
    front = None
    try:
        d.start()
        a.start().upload_many(p.read_bytes() for p in study + warmup)
        a.add_modality("dest-d", "DEST_D", d.dicom_port)
        a.add_modality("sink", SINK_AE, sink_port)
        for path in study:
            path.unlink()  # A has them; the disk has better uses
        with SpannerApp({"store_port": store_port}) as app:
            app.bring_up([SimNode(0, "archive-a", "ARCHIVE_A", a.dicom_port)])
            app.add_span("retrieve", ["archive-a"], ae_title=SPAN_AE)
            for name, ae, port in (("dest-d", "DEST_D", d.dicom_port), ("sink", SINK_AE, sink_port)):
                made = app.http.post("/api/v1/destinations",
                                     json={"name": name, "ae_title": ae, "host": "127.0.0.1", "port": port})
                if made.status_code != 201:
                    raise RuntimeError(f"POST /api/v1/destinations: {made.status_code} {made.text}")
            front = SpannerScp(load_settings(demo_fleet=False, scp_api_key=app.front_key),
                               base_url=app.base_url, port=0)
            ctx = Context("ARCHIVE_A", a.dicom_port, front.start(), arrivals)
            # The store actor, its port and the node actor's associations come up on first use.
            await proxy_front(ctx, "DEST_D", WARMUP_UID)
            await direct(ctx, "DEST_D", WARMUP_UID)
            # What the proxied path asks before any instance moves: one spanning SERIES-level query.
            lookups = []
            for _ in range(5):
                begun = time.perf_counter()
                answer = app.http.post("/api/v1/queries", json={"level": "SERIES", "span": "retrieve",
                                                                "filters": {"StudyInstanceUID": STUDY_UID}})
                lookups.append(time.perf_counter() - begun)
                if answer.status_code != 200 or answer.json().get("total") != 1:
                    raise RuntimeError(f"series look-up: {answer.status_code} {answer.text[:200]}")
            lookup_ms = statistics.median(lookups) * 1000
            pids = spanner_pids()
            groups = {**pids, "orthanc_a": [int(a.pid or 0)], "orthanc_d": [int(d.pid or 0)],
                      "bench_process": [os.getpid()]}
            watched = {role: pids[role] for role in ("store_actor", "ingress")}
            base = {role: sum(vm_kib(pid, "VmRSS") for pid in ps) for role, ps in watched.items()}
            memory["reset"] = all(reset_peak(pid) for ps in watched.values() for pid in ps)
            for round_no in range(rounds):
                for name, case in CASES.items():
                    for destination in ("DEST_D", SINK_AE):
                        d.clear()
                        meter = CpuMeter(groups)
                        front_cpu = front.cpu_s
                        meter.start()
                        result = await timed(name, case, ctx, destination, STUDY_UID, instances)
                        used = meter.stop()
                        used["front_thread"] = front.cpu_s - front_cpu
                        bucket = cpu.setdefault(name, {})
                        for group, seconds in used.items():
                            bucket[group] = bucket.get(group, 0.0) + seconds
                        runs.append(result)
                        print(f"round {round_no + 1} {name:11s} -> {destination:6s} {result.seconds:7.2f} s  "
                              f"{instances / result.seconds:7.1f} inst/s  "
                              f"{study_bytes / MB / result.seconds:7.1f} MB/s"
                              + (f"  first {result.first_s * 1000:.0f} ms" if result.first_s else ""))
            memory["growth_mib"] = {
                role: round(max(0, sum(vm_kib(pid, "VmHWM") for pid in ps) - base[role]) / 1024, 1)
                for role, ps in watched.items()}
            memory["base_rss_mib"] = {role: round(kib / 1024, 1) for role, kib in base.items()}
    finally:
        if front is not None:
            front.stop()
        await sink.close()
        stop_all([a, d], graceful=False)
        shutil.rmtree(work, ignore_errors=True)

    def median(case: str, destination: str, key: str) -> float:
        values = [getattr(r, key) for r in runs if r.case == case and r.destination == destination]
        return statistics.median(v for v in values if v is not None)

    summary = []
    for name in CASES:
        seconds = median(name, "DEST_D", "seconds")
        summary.append({"case": name, "seconds": round(seconds, 3),
                        "instances_per_s": round(instances / seconds, 1),
                        "mb_per_s": round(study_bytes / MB / seconds, 1),
                        "first_instance_ms": round(median(name, SINK_AE, "first_s") * 1000, 1),
                        "cpu_s_per_run": {g: round(s / (2 * rounds), 3) for g, s in cpu[name].items()}})
    by = {s["case"]: s for s in summary}
    throughput = by["proxy-front"]["mb_per_s"] / by["direct"]["mb_per_s"]
    first = by["proxy-front"]["first_instance_ms"] / by["direct"]["first_instance_ms"]
    growth = sum(memory["growth_mib"].values()) * 1024 * 1024 / MB
    get_throughput = by["get-front"]["mb_per_s"] / by["direct"]["mb_per_s"]
    get_first = by["get-front"]["first_instance_ms"] / by["direct"]["first_instance_ms"]
    targets = [Target("proxied throughput / direct Orthanc-to-Orthanc", throughput, 0.8, ">=", "x"),
               Target("first instance at the destination, proxied / direct", first, 1.5, "<=", "x"),
               Target("C-GET through the front, throughput / direct C-MOVE", get_throughput, 0.8, ">=", "x"),
               Target("C-GET through the front, first instance / direct C-MOVE's", get_first, 1.5, "<=", "x"),
               Target("peak resident memory growth, store actor + ingress", growth, 200, "<=", " MB")]
    print_targets("retrieval", targets)
    payload = {"benchmark": "retrieval", "machine": machine, "quick": args.quick, "instances": instances,
               "mib_per_instance": mib, "study_mb": round(study_bytes / MB, 1), "rounds": rounds,
               "series_lookup_ms": round(lookup_ms, 1), "elapsed_s": round(time.monotonic() - started, 1),
               "load_average_at_end": [round(x, 2) for x in os.getloadavg()], "summary": summary,
               "runs": [asdict(r) for r in runs], "memory": memory, "targets": [t.to_json() for t in targets]}
    groups_seen = sorted({g for s in summary for g in s["cpu_s_per_run"]})
    md = [f"# Retrieval: {instances} instances x {mib} MiB ({study_bytes / MB:.0f} MB), {rounds} rounds\n",
          machine_line(payload),
          "direct: Orthanc A C-MOVEs the study to Orthanc D (or SINK) itself; proxy-front: C-MOVE through "
          "the spanner's DICOM front, the store actor fetching from A and forwarding each instance; "
          "get-front: C-GET through the front, each instance coming back on the requester's association. "
          "Medians of the rounds; first instance measured at SINK (a storage SCP in the benchmark "
          "process).\n",
          md_table(["case", "wall (s)", "instances/s", "MB/s", "first instance (ms)"],
                   [[s["case"], s["seconds"], s["instances_per_s"], s["mb_per_s"], s["first_instance_ms"]]
                    for s in summary]),
          "\nCPU seconds per run (mean over the D and SINK runs) by process group:\n",
          md_table(["case", *groups_seen],
                   [[s["case"], *(s["cpu_s_per_run"].get(g, 0.0) for g in groups_seen)] for s in summary]),
          f"\nOne spanning SERIES-level query over the span through the API (what the proxied path asks "
          f"before its first C-MOVE): {lookup_ms:.1f} ms (median of 5).\n",
          f"\nPeak resident memory growth over the proxied runs (VmHWM reset: {memory['reset']}): "
          f"{memory['growth_mib']} MiB on top of {memory['base_rss_mib']} MiB.\n",
          targets_markdown(targets)]
    write_outputs(paths, payload, "\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
