"""Throughput: C concurrent HTTP clients sending spanning queries to a span of 4 simulated PACS.

Each client is a thread with its own keep-alive httpx client, sending the next query as soon as the
last one is answered, for a fixed time per C. Reports spanning queries per second and latency
percentiles per C, and the CPU each process group spent per query.

Defaults: K=1 match per node (a patient lookup). Each match costs the simulators about 1 ms of CPU,
so with K=20 the four simulators alone would need 8 cores for 100 queries/s: K=1 keeps the measure on
the spanner. Nodes get max_associations 16 because a node's associations bound its rate: with the
default 4 and L=50 ms one node answers at most 4 / 0.05 s = 80 queries/s.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks import profiling
from benchmarks.common import (
    CpuMeter,
    SimFleet,
    SpannerApp,
    Target,
    add_output_args,
    machine_info,
    machine_line,
    md_table,
    output_paths,
    plot_lines,
    print_targets,
    summarize,
    targets_markdown,
    write_outputs,
)

SPAN = "bench4"


def drive(app: SpannerApp, body: dict[str, Any], clients: int, seconds: float, expected: int
          ) -> tuple[list[float], int, float]:
    """Latencies (ms) of queries that completed, error count, and the wall seconds the clients ran."""
    import httpx

    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client() -> None:
        with httpx.Client(base_url=app.base_url, timeout=30.0, trust_env=False, headers=app.headers) as http:
            start.wait()
            while time.monotonic() < stop_at[0]:
                t0 = time.perf_counter()
                try:
                    response = http.post("/api/v1/queries", json=body)
                    answer = response.json()
                    ok = response.status_code == 200 and answer.get("total") == expected \
                        and answer.get("cache") != "hit"
                except httpx.HTTPError:
                    ok = False
                elapsed = (time.perf_counter() - t0) * 1000.0
                with lock:
                    if ok:
                        latencies.append(elapsed)
                    else:
                        errors[0] += 1

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    stop_at[0] = time.monotonic() + seconds
    began = time.monotonic()
    start.wait()
    for thread in threads:
        thread.join(timeout=seconds + 60)
    return latencies, errors[0], time.monotonic() - began


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default=None, help="comma-separated C values (default 1,2,4,8,16,32)")
    parser.add_argument("--matches", type=int, default=1, help="study matches per node (K)")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="simulator latency L")
    parser.add_argument("--seconds", type=float, default=None, help="measuring time per C (default 10)")
    parser.add_argument("--max-associations", type=int, default=16, help="per node (the API's default is 4)")
    parser.add_argument("--sim-engine", choices=("wire", "pynetdicom"), default="wire",
                        help="engine of the simulated PACS (see benchmarks/common.py)")
    parser.add_argument("--profile", action="store_true", help="py-spy the spanner's processes at one C")
    parser.add_argument("--profile-clients", type=int, default=16, help="the C to profile at (default 16)")
    add_output_args(parser, "throughput")
    args = parser.parse_args(argv)
    given = args.clients or ("1,4,16" if args.quick else "1,2,4,8,16,32")
    args.clients = sorted({int(c) for c in given.split(",") if c})
    args.seconds = args.seconds or (3.0 if args.quick else 10.0)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    paths = output_paths(args, "throughput")
    machine = machine_info()
    started = time.monotonic()
    results: list[dict[str, Any]] = []
    expected = 4 * args.matches
    body = {"level": "STUDY", "span": SPAN}
    sims = SimFleet(4, args.matches, args.latency_ms, processes=2, prefix="tput", engine=args.sim_engine)
    with sims as fleet, SpannerApp() as app:
        up_s = app.bring_up(fleet.nodes, max_associations=args.max_associations)
        app.add_span(SPAN, [node.name for node in fleet.nodes])
        print(f"4 nodes up in {up_s:.2f} s (K={args.matches}, L={args.latency_ms:g} ms, "
              f"max_associations {args.max_associations})")
        pids = app.pids()
        for clients in args.clients:
            drive(app, body, clients, 1.0, expected)  # warm: this many associations per node
            meter = CpuMeter({"simulators": fleet.pids, "node_actors": pids["node_actors"],
                              "ingress": pids["ingress"], "proxy": pids["proxy"],
                              "ray_system": pids["ray_system"], "driver": [os.getpid()]})
            meter.start()
            latencies, errors, wall = drive(app, body, clients, args.seconds, expected)
            cpu = meter.stop()
            done = max(1, len(latencies))
            per_query = {g: round(1000 * v / done, 2) for g, v in cpu.items()}
            row = {"clients": clients, "qps": round(len(latencies) / wall, 1), **summarize(latencies),
                   "errors": errors, "cpu_ms_per_query": per_query,
                   "cpu_busy_cores": round(sum(cpu.values()) / wall, 2)}
            results.append(row)
            print(f"C={clients:3d}: {row['qps']:7.1f} q/s  p50 {row['p50_ms']:7.1f}  "
                  f"p99 {row['p99_ms']:7.1f} ms  errors {errors}  busy cores {row['cpu_busy_cores']}")
            if args.profile and clients == args.profile_clients:
                profile_dir = (paths["json"] or Path("benchmarks/results/x")).parent / "profile-throughput"
                roles = {"ingress": pids["ingress"][0], "proxy": pids["proxy"][0],
                         "node_actor": pids["node_actors"][0]}
                samplers = profiling.start(roles, 8, profile_dir)
                drive(app, body, clients, 8.5, expected)
                profiling.wait(samplers)
                profiling.print_summary(profile_dir)
    targets = []
    at16 = next((r for r in results if r["clients"] == 16), None)
    if at16 is not None:
        targets = [Target("spanning queries/s over 4 nodes with 16 clients", at16["qps"], 100, ">=", " q/s"),
                   Target("p99 with 16 clients", at16["p99_ms"], 250, "<=", " ms")]
    print_targets("throughput", targets)
    payload = {"benchmark": "throughput", "machine": machine, "nodes": 4, "latency_ms": args.latency_ms,
               "matches_per_node": args.matches, "max_associations": args.max_associations,
               "seconds_per_point": args.seconds, "quick": args.quick,
               "elapsed_s": round(time.monotonic() - started, 1),
               "load_average_at_end": [round(x, 2) for x in os.getloadavg()], "results": results,
               "targets": [t.to_json() for t in targets]}
    groups = ["simulators", "node_actors", "ingress", "proxy", "ray_system", "driver"]
    md = [f"# Throughput over a span of 4 nodes (K={args.matches}, L={args.latency_ms:g} ms, "
          f"max_associations {args.max_associations})\n", machine_line(payload),
          md_table(["clients", "queries/s", "p50 (ms)", "p95 (ms)", "p99 (ms)", "queries", "errors",
                    "busy cores", *[f"CPU ms/q {g}" for g in groups]],
                   [[r["clients"], r["qps"], r["p50_ms"], r["p95_ms"], r["p99_ms"], r["runs"], r["errors"],
                     r["cpu_busy_cores"], *[r["cpu_ms_per_query"].get(g) for g in groups]] for r in results]),
          "\n## Targets\n", targets_markdown(targets)]
    write_outputs(paths, payload, "\n".join(md))
    plot_lines(paths["plot"], {
        "queries/s": ([r["clients"] for r in results], [r["qps"] for r in results]),
        "p99 ms": ([r["clients"] for r in results], [r["p99_ms"] for r in results]),
    }, title=f"Spanning queries over 4 nodes (K={args.matches}, L={args.latency_ms:g} ms)",
        xlabel="concurrent clients (C)", ylabel="queries/s and p99 (ms)", logx=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
