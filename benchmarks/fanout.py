"""Fan-out latency: one study-level C-FIND to N simulated PACS, four ways, p50/p95/p99 per N.

- spanner: POST /api/v1/queries end to end (one node actor per PACS, pooled associations);
- sequential: a pynetdicom loop, a fresh association per node, default sockets (what a script does);
- threadpool: a ThreadPoolExecutor fan-out, a fresh association per node, TCP_NODELAY on;
- pooled: a ThreadPoolExecutor fan-out over one kept pynetdicom association per node (TCP_NODELAY);
- own: one archive's own answer time, a kept pynetdicom association to the first node alone;
- limit: the simulators' latency L itself, the floor no method can beat.

``--archives orthanc`` runs the same against real Orthanc archives (C-FIND from their index, K studies
each) behind delay relays (benchmarks.relay) that hold client-to-archive bytes L ms, instead of the
lean simulators; the simulators' own latency is then 0 and the relay stands for L.

Latency of the baselines is the time until the caller holds every node's matches (releases that
are still on the critical path, as in the sequential loop, count). Per N it also reports the time
to bring the N node actors up and their memory, and the CPU each process group spent per query.
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks import profiling
from benchmarks.common import (
    CpuMeter,
    OrthancFleet,
    SimFleet,
    SimNode,
    SpannerApp,
    Target,
    add_output_args,
    machine_info,
    machine_line,
    md_table,
    output_paths,
    plot_lines,
    print_targets,
    pss_mib,
    rss_mib,
    summarize,
    targets_markdown,
    timed_runs,
    write_outputs,
)

PENDING = (0xFF00, 0xFF01)
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
METHODS = ("spanner", "pooled", "own", "threadpool", "sequential", "limit")
IDLE_WINDOW_S = 2.0
Parts = tuple[float, float, float]  # HTTP round trip, coordinator elapsed, slowest node actor elapsed (ms)


# -- the two baselines a person would write -----------------------------------------------------------
def _make_ae() -> Any:
    from pynetdicom import AE

    ae = AE(ae_title="BENCH")
    ae.add_requested_context(STUDY_ROOT_FIND)
    ae.maximum_associations = 256
    return ae


def _find_fresh(ae: Any, node: SimNode, identifier: Any, nodelay: bool) -> tuple[int, float]:
    """Associate, C-FIND, note when the last match arrived, release: (matches, perf_counter at answer)."""
    from pynetdicom import evt

    from simulator.scp import enable_nodelay

    handlers = [(evt.EVT_CONN_OPEN, enable_nodelay)] if nodelay else []
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title, evt_handlers=handlers)
    if not assoc.is_established:
        raise RuntimeError(f"no association with {node.ae_title} on port {node.port}")
    matches = []
    try:
        for status, identifier_rsp in assoc.send_c_find(identifier, STUDY_ROOT_FIND):
            if "Status" in status and int(status.Status) in PENDING and identifier_rsp is not None:
                matches.append(identifier_rsp.to_json_dict() if nodelay else identifier_rsp)
        answered = time.perf_counter()
    finally:
        assoc.release()
    return len(matches), answered


def sequential_once(ae: Any, nodes: list[SimNode], identifier: Any, expected: int) -> float:
    started = time.perf_counter()
    answered = started
    got = 0
    for node in nodes:
        count, answered = _find_fresh(ae, node, identifier, nodelay=False)
        got += count
    if got != expected:
        raise RuntimeError(f"sequential got {got} matches, expected {expected}")
    return (answered - started) * 1000.0


def threadpool_once(pool: ThreadPoolExecutor, ae: Any, nodes: list[SimNode], identifier: Any,
                    expected: int) -> float:
    started = time.perf_counter()
    results = list(pool.map(lambda node: _find_fresh(ae, node, identifier, nodelay=True), nodes))
    got = sum(count for count, _ in results)
    if got != expected:
        raise RuntimeError(f"threadpool got {got} matches, expected {expected}")
    return (max(answered for _, answered in results) - started) * 1000.0


class PooledClient:
    """One kept pynetdicom association per node (TCP_NODELAY): the 30-line script a person would pool."""

    def __init__(self, ae: Any, nodes: list[SimNode]) -> None:
        from pynetdicom import evt

        from simulator.scp import enable_nodelay

        self.assocs = []
        for node in nodes:
            assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title,
                                 evt_handlers=[(evt.EVT_CONN_OPEN, enable_nodelay)])
            if not assoc.is_established:
                raise RuntimeError(f"no association with {node.ae_title} on port {node.port}")
            self.assocs.append(assoc)
        self.wrong = 0

    def find(self, i: int, identifier: Any) -> int:
        matches = 0
        for status, identifier_rsp in self.assocs[i].send_c_find(identifier, STUDY_ROOT_FIND):
            if "Status" in status and int(status.Status) in PENDING and identifier_rsp is not None:
                identifier_rsp.to_json_dict()
                matches += 1
        return matches

    def fan_out(self, pool: ThreadPoolExecutor, identifier: Any, expected: int) -> None:
        got = sum(pool.map(lambda i: self.find(i, identifier), range(len(self.assocs))))
        self.wrong += got != expected

    def close(self) -> None:
        for assoc in self.assocs:
            assoc.release()


# -- the benchmark -----------------------------------------------------------------------------------
def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fanout", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", default=None, help="comma-separated N values (default 1,2,4,8,16,32,64)")
    parser.add_argument("--matches", type=int, default=None,
                        help="study matches per node (K; default 20, 5 with --archives orthanc)")
    parser.add_argument("--archives", choices=("sim", "orthanc"), default="sim",
                        help="lean simulators, or real Orthanc archives behind delay relays")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="simulator latency L before answering")
    parser.add_argument("--runs", type=int, default=None, help="measured runs per method and N (default 60)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop measuring a method at an N after this long (at least 3 runs; default 20)")
    parser.add_argument("--warmup", type=int, default=None, help="unmeasured runs first (default 3)")
    parser.add_argument("--sim-processes", type=int, default=4, help="processes hosting the simulators")
    parser.add_argument("--timeline", default=None, help="write ray.timeline() (Chrome trace) after max N")
    parser.add_argument("--sim-engine", choices=("wire", "pynetdicom"), default="wire",
                        help="engine of the simulated PACS (see benchmarks/common.py)")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy the ingress, proxy and a node actor during extra spanner runs at max N")
    add_output_args(parser, "fanout")
    args = parser.parse_args(argv)
    args.nodes = sorted({int(n) for n in (args.nodes or ("1,4,16" if args.quick else "1,2,4,8,16,32,64"))
                         .split(",") if n})
    args.runs = args.runs or (10 if args.quick else 60)
    args.matches = args.matches or (5 if args.archives == "orthanc" else 20)
    args.budget_s = args.budget_s or (2.0 if args.quick else 20.0)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    return args


def _measure_n(app: SpannerApp, fleet: SimFleet | OrthancFleet, n: int, args: argparse.Namespace, ae: Any,
               identifier: Any, paths: dict[str, Path | None]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every method at one N: result rows, and the N's own row (actors, memory, CPU, breakdown)."""
    latency, k = args.latency_ms, args.matches
    results: list[dict[str, Any]] = []
    nodes = fleet.nodes[:n]
    names = [node.name for node in nodes]
    expected = n * k
    up_s = app.bring_up(nodes)
    # A deadline far past any measured latency: a complete answer is timed, never a partial one.
    body = {"level": "STUDY", "nodes": names, "limit": 1000, "timeout_s": 120}
    errors: list[str] = []
    parts: list[Parts] = []
    def spanner_once(body: dict[str, Any] = body, expected: int = expected,
                     errors: list[str] = errors, parts: list[Parts] = parts) -> float:
        started = time.perf_counter()
        response = app.http.post("/api/v1/queries", json=body)
        answer = response.json()
        elapsed = (time.perf_counter() - started) * 1000.0
        if response.status_code != 200 or answer.get("total") != expected or answer.get("cache") == "hit":
            errors.append(f"{response.status_code} total={answer.get('total')} cache={answer.get('cache')} "
                          f"{answer.get('reason')}")
        slowest = max((o["elapsed_ms"] for o in answer.get("nodes", ())), default=0.0)
        parts.append((elapsed, float(answer.get("elapsed_ms", 0.0)), slowest))
        return elapsed
    pids = app.pids()
    relays = fleet.relay_pids if isinstance(fleet, OrthancFleet) else []
    meter = CpuMeter({"simulators": fleet.pids, "relays": relays, "node_actors": pids["node_actors"],
                      "ingress": pids["ingress"], "proxy": pids["proxy"],
                      "ray_system": pids["ray_system"], "driver": [os.getpid()]})
    # What the node actor processes burn doing nothing (Ray's own threads), to tell it from query work.
    idle_meter = CpuMeter({"node_actors": pids["node_actors"]})
    idle_meter.start()
    time.sleep(IDLE_WINDOW_S)
    idle_per_s = idle_meter.stop()["node_actors"] / IDLE_WINDOW_S
    meter.start()
    batch_started = time.monotonic()
    samples = timed_runs(spanner_once, args.runs, args.budget_s, warmup=args.warmup)
    cpu = meter.stop()
    actor_net = max(0.0, cpu["node_actors"] - idle_per_s * (time.monotonic() - batch_started))
    calls = len(samples) + args.warmup
    measured = parts[args.warmup:]
    spanner_cpu = sum(v for g, v in cpu.items() if g not in ("simulators", "relays"))
    cores = os.cpu_count() or 1
    actor_rss = [rss_mib(pid) for pid in pids["node_actors"]]
    row: dict[str, Any] = {
        "nodes": n, "actors_up_s": round(up_s, 2), "node_actors": len(actor_rss),
        "node_actor_rss_mib_total": round(sum(actor_rss)),
        "node_actor_rss_mib_mean": round(sum(actor_rss) / max(1, len(actor_rss)), 1),
        "node_actor_pss_mib_total": round(sum(pss_mib(pid) for pid in pids["node_actors"])),
        "ingress_rss_mib": round(sum(rss_mib(pid) for pid in pids["ingress"])),
        "spanner_cpu_ms_per_query": {name: round(1000 * s / calls, 2) for name, s in cpu.items()},
        "simulator_cpu_ms_per_match": round(1000 * cpu["simulators"] / (calls * expected), 3),
        "spanner_cpu_ms_per_match": round(1000 * spanner_cpu / (calls * expected), 3),
        # The node actors alone (ray::PacsNode processes): per match, and per archive per query.
        "node_actor_cpu_ms_per_match": round(1000 * cpu["node_actors"] / (calls * expected), 4),
        "node_actor_cpu_ms_per_archive_query": round(1000 * cpu["node_actors"] / (calls * n), 3),
        # The same net of the actors' idle burn measured just before (Ray's threads, about 6-10 ms/s each).
        "node_actor_idle_ms_per_s": round(1000 * idle_per_s, 1),
        "node_actor_net_cpu_ms_per_match": round(1000 * actor_net / (calls * expected), 4),
        "node_actor_net_cpu_ms_per_archive_query": round(1000 * actor_net / (calls * n), 3),
        # All CPU a query costs (simulators included) spread over every core: no schedule beats it.
        "cpu_floor_ms": round(1000 * (spanner_cpu + cpu["simulators"] + cpu["relays"]) / calls / cores, 1),
        # Medians: HTTP round trip minus the coordinator's own time (proxy, ingress, JSON, record);
        # coordinator minus the slowest node actor (fan-out, merge); the slowest node actor itself.
        "breakdown_ms": _breakdown(measured),
        "spanner_errors": len(errors), "spanner_error_sample": errors[:3],
    }
    results.append({"method": "spanner", "nodes": n, **summarize(samples)})
    if args.profile and n == max(args.nodes):
        profile_dir = (paths["json"] or Path("benchmarks/results/x")).parent / "profile-fanout"
        roles = {"ingress": pids["ingress"][0], "proxy": pids["proxy"][0],
                 "node_actor": pids["node_actors"][0]}
        samplers = profiling.start(roles, 10, profile_dir)
        time.sleep(0.5)
        timed_runs(spanner_once, 10_000, 9.0, warmup=0)
        profiling.wait(samplers)
        profiling.print_summary(profile_dir)
        row["profile_dir"] = str(profile_dir)
    if args.timeline and n == max(args.nodes):
        import ray
        ray.timeline(filename=args.timeline)
        print(f"wrote {args.timeline}")
    pooled = PooledClient(ae, nodes)
    try:
        with ThreadPoolExecutor(max_workers=n) as pool:
            meter = CpuMeter({"simulators": fleet.pids, "driver": [os.getpid()]})
            meter.start()
            def fan_out(pool: ThreadPoolExecutor = pool) -> None:
                pooled.fan_out(pool, identifier, expected)

            samples = timed_runs(fan_out, args.runs, args.budget_s, warmup=1)
            cpu = meter.stop()
        row["pooled_cpu_ms_per_query"] = {name: round(1000 * s / (len(samples) + 1), 2)
                                          for name, s in cpu.items()}
        row["pooled_wrong_answers"] = pooled.wrong
        results.append({"method": "pooled", "nodes": n, **summarize(samples)})
        def own() -> None:
            pooled.find(0, identifier)

        samples = timed_runs(own, args.runs, args.budget_s, warmup=1)
        results.append({"method": "own", "nodes": n, **summarize(samples)})
    finally:
        pooled.close()
    with ThreadPoolExecutor(max_workers=n) as pool:
        meter = CpuMeter({"simulators": fleet.pids, "driver": [os.getpid()]})
        meter.start()
        samples = timed_runs(lambda pool=pool, nodes=nodes, expected=expected:
                             threadpool_once(pool, ae, nodes, identifier, expected),
                             args.runs, args.budget_s, warmup=1)
        cpu = meter.stop()
    row["threadpool_cpu_ms_per_query"] = {name: round(1000 * s / (len(samples) + 1), 2)
                                          for name, s in cpu.items()}
    results.append({"method": "threadpool", "nodes": n, **summarize(samples)})
    samples = timed_runs(lambda nodes=nodes, expected=expected:
                         sequential_once(ae, nodes, identifier, expected),
                         args.runs, args.budget_s, warmup=1)
    results.append({"method": "sequential", "nodes": n, **summarize(samples)})
    results.append({"method": "limit", "nodes": n, "p50_ms": latency, "p95_ms": latency,
                    "p99_ms": latency, "runs": 0})
    app.tear_down(names)
    line = "  ".join(f"{r['method']} {r['p50_ms']:.1f}/{r['p99_ms']:.1f}" for r in results)
    print(f"N={n:3d}  (p50/p99 ms)  {line}  actors up {up_s:.2f} s, "
          f"{row['node_actor_rss_mib_mean']:.0f} MiB each, errors {len(errors)}")
    return results, row


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from spanner.query import Level, NodeQuery

    latency, k = args.latency_ms, args.matches
    paths = output_paths(args, "fanout" if args.archives == "sim" else "fanout-orthanc")
    machine = machine_info()
    identifier = NodeQuery(Level.STUDY).identifier()
    ae = _make_ae()
    results: list[dict[str, Any]] = []
    per_n: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    started = time.monotonic()
    fleet: SimFleet | OrthancFleet
    if args.archives == "orthanc":
        fleet = OrthancFleet(max(args.nodes), k, latency, prefix="bench-orthanc")
    else:
        fleet = SimFleet(max(args.nodes), k, latency, processes=args.sim_processes, prefix="bench",
                         engine=args.sim_engine)
    with fleet, SpannerApp() as app:
        kind = "Orthanc archives behind relays" if args.archives == "orthanc" else "simulators"
        print(f"{len(fleet.nodes)} {kind} (K={k}, L={latency:g} ms)")
        for n in args.nodes:
            try:
                rows, row = _measure_n(app, fleet, n, args, ae, identifier, paths)
            except Exception as exc:  # keep what was measured; larger N would only fail the same way
                print(f"N={n}: failed, stopping here: {exc}")
                failures.append({"nodes": n, "error": f"{type(exc).__name__}: {exc}"})
                app.tear_down([node.name for node in fleet.nodes[:n]])
                break
            results.extend(rows)
            per_n.append(row)
    targets = _targets(results, per_n)
    print_targets("fanout", targets)
    payload = {"benchmark": "fanout", "machine": machine, "latency_ms": latency, "matches_per_node": k,
               "sim_engine": args.sim_engine, "archives": args.archives,
               "quick": args.quick, "elapsed_s": round(time.monotonic() - started, 1),
               "load_average_at_end": [round(x, 2) for x in os.getloadavg()], "results": results,
               "per_n": per_n, "failures": failures, "targets": [t.to_json() for t in targets]}
    write_outputs(paths, payload, _markdown(payload, targets))
    plot_lines(paths["plot"], {
        m: ([r["nodes"] for r in results if r["method"] == m],
            [r["p50_ms"] for r in results if r["method"] == m]) for m in METHODS
    }, title=f"C-FIND fan-out, K={k} matches/node, L={latency:g} ms (p50)", xlabel="nodes (N)",
        ylabel="latency p50 (ms)", logx=2, logy=True)
    return 0


def _breakdown(parts: list[Parts]) -> dict[str, float]:
    if not parts:
        return {}
    http = sorted(p[0] - p[1] for p in parts)
    coordinator = sorted(p[1] - p[2] for p in parts)
    slowest = sorted(p[2] for p in parts)
    mid = len(parts) // 2
    return {"http_ingress_record": round(http[mid], 1),
            "coordinator_fanout_merge": round(coordinator[mid], 1),
            "slowest_node_actor": round(slowest[mid], 1)}


def _p50(results: list[dict[str, Any]], method: str, n: int) -> float:
    return next((r["p50_ms"] for r in results if r["method"] == method and r["nodes"] == n), float("nan"))


def _targets(results: list[dict[str, Any]], per_n: list[dict[str, Any]]) -> list[Target]:
    """Issue #10's targets: against one archive's own time and the pooled client, and node actor CPU."""
    targets: list[Target] = []
    for n, factor in ((16, 1.2), (64, 2.0)):
        if any(r["nodes"] == n for r in results):
            targets.append(Target(f"spanner p50 / own p50 at N={n}",
                                  _p50(results, "spanner", n) / _p50(results, "own", n), factor, unit="x"))
    if any(r["nodes"] == 16 for r in results):
        targets.append(Target("spanner p50 / pooled p50 at N=16",
                              _p50(results, "spanner", 16) / _p50(results, "pooled", 16), 0.5, unit="x"))
    row = next((r for r in per_n if r["nodes"] == 16), per_n[-1] if per_n else None)
    if row is not None:
        targets.append(Target(f"node actor CPU per match at N={row['nodes']}",
                              row["node_actor_cpu_ms_per_match"], 0.1, unit=" ms"))
        targets.append(Target(f"node actor CPU per archive per query at N={row['nodes']}",
                              row["node_actor_cpu_ms_per_archive_query"], 1.5, unit=" ms"))
    return targets


def _markdown(payload: dict[str, Any], targets: list[Target]) -> str:
    results, per_n = payload["results"], payload["per_n"]
    k, latency = payload["matches_per_node"], payload["latency_ms"]
    archives = "real Orthanc archives behind delay relays" if payload.get("archives") == "orthanc" else \
        "lean simulators"
    out = [f"# Fan-out latency (K={k} matches per node, L={latency:g} ms, {archives})\n",
           machine_line(payload),
           "## Latency (ms)\n"]
    measured = [m for m in METHODS if m != "limit"]
    rows = []
    for row in per_n:
        n = row["nodes"]
        cells: list[Any] = [n]
        for method in measured:
            r: dict[str, Any] = next((r for r in results if r["method"] == method and r["nodes"] == n), {})
            cells += [r.get("p50_ms"), r.get("p99_ms"), r.get("runs")]
        rows.append([*cells, payload["latency_ms"]])
    out.append(md_table(["N", *[f"{m} {col}" for m in measured for col in ("p50", "p99", "runs")], "limit"],
                        rows))
    out.append("\n## Node actors and CPU per spanner query\n")
    groups = ["simulators", "relays", "node_actors", "ingress", "proxy", "ray_system", "driver"]
    out.append(md_table(
        ["N", "actors up (s)", "actor RSS each (MiB)", "actors RSS total", "actors PSS total", "ingress RSS",
         "errors"],
        [[r["nodes"], r["actors_up_s"], r["node_actor_rss_mib_mean"], r["node_actor_rss_mib_total"],
          r["node_actor_pss_mib_total"], r["ingress_rss_mib"], r["spanner_errors"]] for r in per_n]))
    out.append("\nCPU ms per spanner query by process group; the CPU floor is all of it over every core. "
               "Node actor CPU is given as measured and net of what the idle actors burned just before "
               "(Ray's own threads; 'idle actors ms/s' is their sum). "
               "Breakdown (medians, ms): HTTP round trip minus coordinator time; coordinator minus the "
               "slowest node actor; the slowest node actor.\n")
    out.append(md_table(
        ["N", *groups, "CPU floor (ms)", "archive ms/match", "spanner ms/match", "node actor ms/match",
         "node actor ms/archive/query", "idle actors ms/s", "net ms/match", "net ms/archive/query",
         "http+ingress", "fan-out+merge", "slowest actor"],
        [[r["nodes"], *[r["spanner_cpu_ms_per_query"].get(g) for g in groups], r["cpu_floor_ms"],
          r["simulator_cpu_ms_per_match"], r["spanner_cpu_ms_per_match"], r["node_actor_cpu_ms_per_match"],
          r["node_actor_cpu_ms_per_archive_query"], r["node_actor_idle_ms_per_s"],
          r["node_actor_net_cpu_ms_per_match"], r["node_actor_net_cpu_ms_per_archive_query"],
          *[r["breakdown_ms"].get(key) for key in ("http_ingress_record", "coordinator_fanout_merge",
                                                   "slowest_node_actor")]] for r in per_n]))
    out.append("\n## Targets\n")
    out.append(targets_markdown(targets))
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
