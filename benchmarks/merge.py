"""Merge rate: M IMAGE-level matches from 16 nodes merged into one de-duplicated, sorted page.

Compares the Ray merge graph (actors.merge_tasks.merge_refs, partitions 1 and 4; the node answers are
packed and put in the object store first, as node actors leave them) with the in-process merge_inline.
Packing (spanner.packed.pack) is timed on its own: the node actors do it, each for its own answer.
30% of the M matches are copies of an instance that 2-4 nodes hold; the rest are on one node only.
Matches are built as DICOM JSON dicts directly (pydicom would take longer than the merge).
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import shutil
import tempfile
import time
import uuid
from typing import Any

from benchmarks.common import (
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
from cluster.ray_internals import local_init_options, stay_on_loopback

NODES = 16
PAGE_LIMIT = 1000  # what the API asks for by default (a span's max_results)
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def _match(uid: str, study: str, series: str, patient: str, number: int, date: str, clock: str,
           drop: bool) -> dict[str, Any]:
    ds: dict[str, Any] = {
        "00080016": {"vr": "UI", "Value": [CT_IMAGE]},
        "00080018": {"vr": "UI", "Value": [uid]},
        "00080023": {"vr": "DA", "Value": [date]},
        "00080033": {"vr": "TM", "Value": [clock]},
        "00100020": {"vr": "LO", "Value": [patient]},
        "0020000D": {"vr": "UI", "Value": [study]},
        "0020000E": {"vr": "UI", "Value": [series]},
        "00200013": {"vr": "IS", "Value": [number]},
    }
    if drop:  # a secondary copy that lacks an attribute: merge_all has a gap to fill
        del ds["00200013"]
    return ds


def generate(total: int, nodes: int = NODES, shared: float = 0.3,
             seed: int = 1) -> list[list[dict[str, Any]]]:
    """About ``total`` matches over ``nodes`` lists; ``shared`` of them are copies held by 2-4 nodes."""
    rng = random.Random(seed)
    lists: list[list[dict[str, Any]]] = [[] for _ in range(nodes)]
    base = f"2.25.{uuid.UUID(int=rng.getrandbits(128)).int}"
    made = 0
    entity = 0
    shared_target = int(total * shared)
    shared_made = 0
    while made < total:
        entity += 1
        copies = 1
        if shared_made < shared_target:
            copies = min(rng.randint(2, 4), total - made) if total - made >= 2 else 1
        holders = rng.sample(range(nodes), copies)
        series = entity // 50
        study = series // 4
        date = f"20{10 + study % 15:02d}{1 + study % 12:02d}{1 + study % 28:02d}"
        clock = f"{8 + series % 10:02d}{series % 60:02d}{entity % 60:02d}"
        for rank, node in enumerate(holders):
            lists[node].append(_match(f"{base}.{entity}", f"{base}.1.{study}", f"{base}.2.{series}",
                                      f"P{study % 5000:06d}", entity % 50 + 1, date, clock, drop=rank > 0))
        made += copies
        if copies > 1:
            shared_made += copies
    for matches in lists:
        rng.shuffle(matches)  # nodes answer in their own order
    return lists


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.merge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=None, help="comma-separated M (default 10000,100000,1000000)")
    parser.add_argument("--runs", type=int, default=None, help="runs per method and M (default 5, 3 at 1M)")
    add_output_args(parser, "merge")
    args = parser.parse_args(argv)
    args.sizes = [int(m) for m in (args.sizes or ("10000,50000" if args.quick else "10000,100000,1000000"))
                  .split(",") if m]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    os.environ["RAY_AUTH_MODE"] = "disabled"
    tmp = tempfile.mkdtemp(prefix="spanner-bench-merge-")
    os.environ["RAY_TMPDIR"] = tmp
    import ray

    from actors.merge_tasks import merge_inline, merge_refs
    from spanner.merge import Dedup, MergeSpec
    from spanner.packed import pack
    from spanner.query import Level

    paths = output_paths(args, "merge")
    machine = machine_info()
    started = time.monotonic()
    results: list[dict[str, Any]] = []
    stay_on_loopback()
    ray.init(address="local", num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING", **local_init_options(temp_dir=tmp))
    try:
        meta = [(f"node-{i:02d}", 100 + i) for i in range(NODES)]
        spec = MergeSpec(Level.IMAGE, Dedup.MERGE_ALL, 0, PAGE_LIMIT)
        warm = generate(2000)
        warm_refs = [ray.put(pack(Level.IMAGE, lst)) for lst in warm]
        for partitions in (1, 4):  # start the task workers before anything is timed
            ray.get(merge_refs(spec, meta, warm_refs, partitions=partitions))
        del warm, warm_refs
        for m in args.sizes:
            t0 = time.perf_counter()
            lists = generate(m)
            gen_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            packs = [pack(Level.IMAGE, lst) for lst in lists]
            pack_s = time.perf_counter() - t0
            del lists
            t0 = time.perf_counter()
            refs = [ray.put(packed) for packed in packs]
            put_s = time.perf_counter() - t0
            runs = args.runs or (2 if args.quick else 3 if m >= 1_000_000 else 5)
            print(f"M={m:,}: generated in {gen_s:.1f} s, packed in {pack_s:.1f} s, ray.put in {put_s:.1f} s; "
                  f"{runs} runs per method")
            merged_total = None
            for method in ("ray-p1", "ray-p4", "inline"):
                samples = []
                for _ in range(runs):
                    gc.collect()
                    t0 = time.perf_counter()
                    if method == "inline":
                        total, page = merge_inline(spec, meta, packs)
                    else:
                        partitions = int(method[-1])
                        total, page = ray.get(merge_refs(spec, meta, refs, partitions=partitions))
                    samples.append((time.perf_counter() - t0) * 1000.0)
                    if merged_total is not None and total != merged_total:
                        raise RuntimeError(f"{method} merged {total} entities, another method {merged_total}")
                    merged_total = total
                    del page
                stats = summarize(samples)
                rate = m / (stats["p50_ms"] / 1000.0)
                results.append({"method": method, "matches": m, "merged": merged_total, **stats,
                                "matches_per_s": round(rate), "put_s": round(put_s, 2),
                                "pack_us_per_match": round(pack_s / m * 1e6, 1)})
                print(f"  {method:7s} p50 {stats['p50_ms']:9.1f} ms  {rate:12,.0f} matches/s  "
                      f"(merged {merged_total:,})")
            del packs, refs
            gc.collect()
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    targets = []
    best_1m = [r for r in results if r["matches"] == 1_000_000]
    for r in best_1m:
        name = f"merge of 1M matches, {r['method']} (p50)"
        targets.append(Target(name, r["p50_ms"] / 1000.0, 5.0, unit=" s"))
    print_targets("merge", targets)
    payload = {"benchmark": "merge", "machine": machine, "nodes": NODES, "level": "IMAGE",
               "shared_fraction": 0.3, "page_limit": PAGE_LIMIT, "quick": args.quick,
               "elapsed_s": round(time.monotonic() - started, 1),
               "load_average_at_end": [round(x, 2) for x in os.getloadavg()], "results": results,
               "targets": [t.to_json() for t in targets]}
    md = [f"# Merge rate ({NODES} nodes, IMAGE level, 30% of matches held by 2-4 nodes, "
          f"page of {PAGE_LIMIT})\n",
          machine_line(payload),
          "ray-pN: merge_refs with N partitions over packed answers already in the object store (ray.put "
          "not timed); inline: merge_inline on packed answers already in this process. Packing, done by each "
          "node actor for its own answer, is not timed in either: its cost per match is its own column.\n",
          md_table(["method", "M", "merged", "p50 (ms)", "p95 (ms)", "runs", "matches/s", "ray.put (s)",
                    "pack (us/match)"],
                   [[r["method"], f"{r['matches']:,}", f"{r['merged']:,}", r["p50_ms"], r["p95_ms"],
                     r["runs"], f"{r['matches_per_s']:,}", r["put_s"], r["pack_us_per_match"]]
                    for r in results]),
          "\n## Targets\n", targets_markdown(targets)]
    write_outputs(paths, payload, "\n".join(md))
    plot_lines(paths["plot"], {
        method: ([r["matches"] for r in results if r["method"] == method],
                 [r["matches_per_s"] for r in results if r["method"] == method])
        for method in ("ray-p1", "ray-p4", "inline")
    }, title="Merge rate, 16 nodes, IMAGE level", xlabel="matches (M)", ylabel="matches per second (p50)",
        logx=10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
