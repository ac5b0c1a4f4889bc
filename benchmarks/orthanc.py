"""Real archives: three Orthanc servers, one C-FIND each way, p50/p95/p99.

- spanner: POST /api/v1/queries over the span of the three Orthancs (merged answer);
- spanner-1: the same, narrowed to the first Orthanc (same work as the two below, plus the spanner);
- findscu-scp: dcmtk's findscu to the spanner's DICOM front (scp/), span of the three;
- findscu: dcmtk's findscu straight to the first Orthanc, a process per query, TCP_NODELAY=1;
- pynetdicom: one pooled association (reused, TCP_NODELAY) to the first Orthanc, C-FIND after C-FIND.

Orthanc runs with TCP_NODELAY=1 too (tests.peers.orthanc does that), and the same keys are asked
everywhere (spanner.query's default return keys of the level).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import time
from typing import Any

from benchmarks.common import (
    SimNode,
    SpannerApp,
    add_output_args,
    machine_info,
    machine_line,
    md_table,
    output_paths,
    plot_lines,
    summarize,
    timed_runs,
    write_outputs,
)

FIND_MODELS = {"STUDY": "1.2.840.10008.5.1.4.1.2.2.1", "PATIENT": "1.2.840.10008.5.1.4.1.2.1.1"}
IDENTITY = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
            "IMAGE": "SOPInstanceUID"}
METHODS = ("spanner", "spanner-1", "findscu-scp", "findscu", "pynetdicom")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.orthanc", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=None, help="patients in the fleet (default 60)")
    parser.add_argument("--level", default="STUDY", choices=["PATIENT", "STUDY", "SERIES", "IMAGE"])
    parser.add_argument("--runs", type=int, default=None, help="measured runs per method (default 100)")
    parser.add_argument("--seed", type=int, default=7)
    add_output_args(parser, "orthanc")
    args = parser.parse_args(argv)
    args.patients = args.patients or (15 if args.quick else 60)
    args.runs = args.runs or (20 if args.quick else 100)
    return args


def findscu_command(name: str, level: Any, aec: str, host: str, port: int) -> list[str]:
    """findscu asking the level's default keys, as the spanner does, so every method moves the same data."""
    from spanner.query import DEFAULT_RETURN_KEYS, IDENTITY_KEYS

    keys = [*DEFAULT_RETURN_KEYS[level], *IDENTITY_KEYS[level]]
    key_args = [arg for key in dict.fromkeys(keys) for arg in ("-k", key)]
    return ["findscu", "-S" if name != "PATIENT" else "-P", "-aet", "BENCH", "-aec", aec,
            "-k", f"QueryRetrieveLevel={name}", *key_args, host, str(port)]


def run_findscu(cmd: list[str]) -> None:
    done = subprocess.run(cmd, env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, timeout=30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"findscu failed: {done.stderr.decode(errors='replace')[-500:]}")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from pynetdicom import AE, evt

    from simulator.dataset import generate_fleet
    from simulator.scp import enable_nodelay
    from spanner.query import Level, NodeQuery
    from tests.peers.orthanc import OrthancPeer, orthanc_executable, stop_all

    if orthanc_executable() is None or shutil.which("findscu") is None:
        print("needs Debian's orthanc and dcmtk (make peers)")
        return 2
    paths = output_paths(args, "orthanc")
    machine = machine_info()
    started = time.monotonic()
    level = Level(args.level)
    fleet = generate_fleet(args.seed, 3, args.patients)
    identity = IDENTITY[args.level]
    holders: dict[str, set[int]] = {}
    for node, instances in enumerate(fleet):
        for ds in instances:
            holders.setdefault(str(getattr(ds, identity)), set()).add(node)
    expected_all = len(holders)
    expected_first = sum(1 for nodes in holders.values() if 0 in nodes)
    peers = [OrthancPeer(aet=f"ORTHANC{i}", default_encoding="Utf8") for i in range(3)]
    results: list[dict[str, Any]] = []
    try:
        for peer, instances in zip(peers, fleet, strict=True):
            peer.start()
            peer.upload_datasets(instances)
        print(f"3 Orthancs up with {sum(map(len, fleet))} instances; {expected_all} {args.level} entities, "
              f"{expected_first} on the first")
        first = peers[0]
        with SpannerApp() as app:
            nodes = [SimNode(i, f"orthanc-{i}", peer.aet, peer.dicom_port) for i, peer in enumerate(peers)]
            app.bring_up(nodes)
            app.add_span("orthanc", [n.name for n in nodes], cache_ttl_s=0)  # every method asks the archives

            def spanner(body: dict[str, Any], expected: int) -> None:
                response = app.http.post("/api/v1/queries", json=body)
                total = response.json().get("total")
                if response.status_code != 200 or total != expected or response.json().get("cache") == "hit":
                    raise RuntimeError(f"spanner answered {response.status_code} with {total} matches, "
                                       f"not {expected}")

            body: dict[str, Any] = {"level": args.level, "span": "orthanc", "limit": 1000}
            samples = timed_runs(lambda: spanner(body, expected_all), args.runs, 60.0, warmup=3)
            results.append({"method": "spanner", "nodes": 3, "matches": expected_all, **summarize(samples)})
            body_1 = {**body, "nodes": ["orthanc-0"]}
            samples = timed_runs(lambda: spanner(body_1, expected_first), args.runs, 60.0, warmup=3)
            results.append({"method": "spanner-1", "nodes": 1, "matches": expected_first,
                            **summarize(samples)})

            from scp.server import SpannerScp
            from spanner.settings import load_settings

            front_settings = load_settings(demo_fleet=False, scp_api_key=app.front_key)
            front = SpannerScp(front_settings, base_url=app.base_url, port=0)
            scp_port = front.start()
            calls = [0]

            def via_front_once(cmd: list[str]) -> None:
                calls[0] += 1
                run_findscu(cmd)

            try:  # a DICOM client's view: findscu to the span's AE title on the spanner's DICOM front
                via_front = findscu_command(args.level, level, "ORTHANC", "127.0.0.1", scp_port)
                cpu_before = front.cpu_s  # the front's loop thread: every association and HTTP call
                samples = timed_runs(lambda: via_front_once(via_front), args.runs, 60.0, warmup=2)
                front_cpu_ms = (front.cpu_s - cpu_before) * 1000 / max(1, calls[0])
            finally:
                front.stop()
            results.append({"method": "findscu-scp", "nodes": 3, "matches": expected_all,
                            **summarize(samples), "front_cpu_ms_per_query": round(front_cpu_ms, 2)})

        cmd = findscu_command(args.level, level, first.aet, first.host, first.dicom_port)
        samples = timed_runs(lambda: run_findscu(cmd), args.runs, 60.0, warmup=2)
        results.append({"method": "findscu", "nodes": 1, "matches": expected_first, **summarize(samples)})

        ae = AE(ae_title="BENCH")
        model = FIND_MODELS["PATIENT" if args.level == "PATIENT" else "STUDY"]
        ae.add_requested_context(model)
        assoc = ae.associate(first.host, first.dicom_port, ae_title=first.aet,
                             evt_handlers=[(evt.EVT_CONN_OPEN, enable_nodelay)])
        if not assoc.is_established:
            raise RuntimeError("no association with the first Orthanc")
        identifier = NodeQuery(level).identifier()

        wrong: list[str] = []

        def direct() -> None:
            statuses = [(int(status.Status) if "Status" in status else None, ds is not None)
                        for status, ds in assoc.send_c_find(identifier, model)]
            got = sum(1 for code, has_ds in statuses if has_ds and code in (0xFF00, 0xFF01))
            if got != expected_first:  # reported, not fatal: one odd answer should not void the run
                wrong.append(f"{got} matches, not {expected_first}; last statuses {statuses[-2:]}")

        try:
            samples = timed_runs(direct, args.runs, 60.0, warmup=2)
        finally:
            assoc.release()
        results.append({"method": "pynetdicom", "nodes": 1, "matches": expected_first, **summarize(samples),
                        "wrong_answers": len(wrong), "wrong_sample": wrong[:3]})
        if wrong:
            print(f"pynetdicom: {len(wrong)} answers with the wrong count, e.g. {wrong[0]}")
    finally:
        stop_all(peers, graceful=False)
    for r in results:
        print(f"{r['method']:11s} nodes {r['nodes']}  matches {r['matches']:4d}  p50 {r['p50_ms']:7.1f}  "
              f"p95 {r['p95_ms']:7.1f}  p99 {r['p99_ms']:7.1f} ms  ({r['runs']} runs)")
    by_method = {r["method"]: r for r in results}
    front_ratio = round(by_method["findscu-scp"]["p50_ms"] / by_method["findscu"]["p50_ms"], 2)
    front_cpu = by_method["findscu-scp"]["front_cpu_ms_per_query"]
    print(f"findscu through the front (3 archives) / findscu straight to one: p50 {front_ratio}x "
          f"(target <= 1.5x); front CPU {front_cpu} ms per query")
    payload = {"benchmark": "orthanc", "machine": machine, "level": args.level, "patients": args.patients,
               "quick": args.quick, "elapsed_s": round(time.monotonic() - started, 1),
               "load_average_at_end": [round(x, 2) for x in os.getloadavg()], "results": results,
               "front_ratio_p50": front_ratio}
    md = [f"# Three real Orthanc archives ({args.level} level, {args.patients} patients over 3 nodes)\n",
          machine_line(payload),
          "spanner and findscu-scp (findscu through the spanner's DICOM front): the span of three; "
          "spanner-1, findscu and pynetdicom (one pooled association): the first Orthanc only. "
          "TCP_NODELAY on every socket.\n",
          md_table(["method", "nodes", "matches", "p50 (ms)", "p95 (ms)", "p99 (ms)", "runs"],
                   [[r["method"], r["nodes"], r["matches"], r["p50_ms"], r["p95_ms"], r["p99_ms"], r["runs"]]
                    for r in results]),
          f"\nfindscu through the front / findscu straight to one archive (p50): {front_ratio}x "
          f"(target <= 1.5x); the front's CPU per query: {front_cpu} ms.\n"]
    write_outputs(paths, payload, "\n".join(md))
    plot_lines(paths["plot"], {
        f"{r['method']} ({r['nodes']} node(s))": ([50, 95, 99], [r["p50_ms"], r["p95_ms"], r["p99_ms"]])
        for r in results
    }, title=f"C-FIND against Orthanc, {args.level} level", xlabel="percentile", ylabel="latency (ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
