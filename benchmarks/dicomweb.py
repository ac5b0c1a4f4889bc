"""The DICOMweb front against Orthanc-DICOMweb (Debian's orthanc-dicomweb), in one run over the same archives.

Three Orthanc archives, each with the DICOMweb plugin, hold a seeded fleet (simulator.dataset: shared
patients, a mirrored and a split study). One function per case; each returns its result rows and targets.

- ``qido_study_search``: OHIF's study-list search (``/studies?limit=101&offset=0&includefield=00081030,
  00080060,00080090,00100030``), p50/p95/p99 of:
  - ``orthanc-dicomweb``: straight to the first archive's DICOMweb plugin (one archive, its own answer);
  - ``spanner-1``: through the spanner's /dicomweb/spans/first, the span of that archive alone;
  - ``spanner``: through /dicomweb/spans/orthanc, the span of all three (merged, split studies
    counted again over their series: a second fan-out when one is on the page).
  Targets: spanner p50 <= 1.5x orthanc-dicomweb p50 (three archives merged against one archive's own
  DICOMweb), and the same for spanner-1 (the front's own cost over the same archive).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import httpx

from benchmarks.common import (
    SimNode,
    SpannerApp,
    Target,
    add_output_args,
    machine_info,
    machine_line,
    md_table,
    output_paths,
    print_targets,
    summarize,
    targets_markdown,
    timed_runs,
    write_outputs,
)

OHIF_STUDY_LIST = ("/studies?limit=101&offset=0&fuzzymatching=false"
                   "&includefield=00081030%2C00080060%2C00080090%2C00100030")
ACCEPT = {"Accept": "application/dicom+json"}
QIDO_RATIO = 1.5


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dicomweb", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=None, help="patients in the fleet (default 60)")
    parser.add_argument("--runs", type=int, default=None, help="measured runs per method (default 100)")
    parser.add_argument("--seed", type=int, default=7)
    add_output_args(parser, "dicomweb")
    args = parser.parse_args(argv)
    args.patients = args.patients or (15 if args.quick else 60)
    args.runs = args.runs or (20 if args.quick else 100)
    return args


def _searcher(client: httpx.Client, url: str, expected: int | None) -> Any:
    def search() -> None:
        response = client.get(url)
        if response.status_code != 200 or "warning" in response.headers:
            raise RuntimeError(f"{url}: {response.status_code} {response.headers.get('warning')} "
                               f"{response.text[:300]}")
        if expected is not None and len(response.json()) != expected:
            raise RuntimeError(f"{url}: {len(response.json())} studies, not {expected}")
    return search


def qido_study_search(app: SpannerApp, first_url: str, expected: dict[str, int],
                      args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[Target]]:
    """OHIF's study-list search: straight to one Orthanc-DICOMweb, through the spanner over that archive
    alone and over all three."""
    rows: list[dict[str, Any]] = []
    with httpx.Client(timeout=60.0, trust_env=False, headers=ACCEPT) as direct, \
            httpx.Client(base_url=app.base_url, timeout=60.0, trust_env=False,
                         headers={**app.headers, **ACCEPT}) as spanner:
        cases = [
            ("orthanc-dicomweb", 1, direct, first_url + OHIF_STUDY_LIST, expected["first"]),
            ("spanner-1", 1, spanner, "/dicomweb/spans/first" + OHIF_STUDY_LIST, expected["first"]),
            ("spanner", 3, spanner, "/dicomweb/spans/orthanc" + OHIF_STUDY_LIST, expected["all"]),
        ]
        for method, nodes, client, url, count in cases:
            samples = timed_runs(_searcher(client, url, min(count, 101)), args.runs, 60.0, warmup=3)
            rows.append({"case": "qido_study_search", "method": method, "nodes": nodes,
                         "matches": min(count, 101), **summarize(samples)})
    by = {r["method"]: r["p50_ms"] for r in rows}
    return rows, [
        Target("QIDO-RS study search, spanner over three archives / one Orthanc-DICOMweb, p50",
               by["spanner"] / by["orthanc-dicomweb"], QIDO_RATIO, unit="x"),
        Target("QIDO-RS study search, spanner over that one archive / its Orthanc-DICOMweb, p50",
               by["spanner-1"] / by["orthanc-dicomweb"], QIDO_RATIO, unit="x"),
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from simulator.dataset import generate_fleet
    from tests.peers.orthanc import OrthancPeer, dicomweb_plugin, orthanc_executable, stop_all

    if orthanc_executable() is None or dicomweb_plugin() is None:
        print("needs Debian's orthanc and orthanc-dicomweb (make peers)")
        return 2
    paths = output_paths(args, "dicomweb")
    machine = machine_info()
    started = time.monotonic()
    fleet = generate_fleet(args.seed, 3, args.patients)
    studies = [{str(ds.StudyInstanceUID) for ds in instances} for instances in fleet]
    expected = {"first": len(studies[0]), "all": len(set().union(*studies))}
    peers = [OrthancPeer(aet=f"ORTHANC{i}", default_encoding="Utf8", dicomweb=True,
                         extra_config={"StorageAccessOnFind": "Never"}) for i in range(3)]
    rows: list[dict[str, Any]] = []
    targets: list[Target] = []
    try:
        for peer, instances in zip(peers, fleet, strict=True):
            peer.start()
            peer.upload_datasets(instances)
        print(f"3 Orthanc-DICOMweb archives up with {sum(map(len, fleet))} instances; {expected['all']} "
              f"studies, {expected['first']} on the first")
        with SpannerApp() as app:
            nodes = [SimNode(i, f"orthanc-{i}", peer.aet, peer.dicom_port) for i, peer in enumerate(peers)]
            app.bring_up(nodes)
            app.add_span("orthanc", [n.name for n in nodes], cache_ttl_s=0)  # every search asks the archives
            app.add_span("first", [nodes[0].name], cache_ttl_s=0)
            case_rows, case_targets = qido_study_search(app, peers[0].dicomweb_url, expected, args)
            rows += case_rows
            targets += case_targets
    finally:
        stop_all(peers, graceful=False)
    for r in rows:
        print(f"{r['case']:18s} {r['method']:17s} nodes {r['nodes']}  matches {r['matches']:4d}  "
              f"p50 {r['p50_ms']:7.1f}  p95 {r['p95_ms']:7.1f}  p99 {r['p99_ms']:7.1f} ms  "
              f"({r['runs']} runs)")
    print_targets("dicomweb", targets)
    payload = {"benchmark": "dicomweb", "machine": machine, "patients": args.patients, "quick": args.quick,
               "elapsed_s": round(time.monotonic() - started, 1),
               "load_average_at_end": [round(x, 2) for x in os.getloadavg()], "results": rows,
               "targets": [t.to_json() for t in targets]}
    md = [f"# The DICOMweb front against Orthanc-DICOMweb ({args.patients} patients over 3 archives)\n",
          machine_line(payload),
          "orthanc-dicomweb: straight to the first archive's DICOMweb plugin; spanner-1: through the "
          "spanner's DICOMweb front over that archive alone; spanner: over all three (merged).\n",
          md_table(["case", "method", "archives", "matches", "p50 (ms)", "p95 (ms)", "p99 (ms)", "runs"],
                   [[r["case"], r["method"], r["nodes"], r["matches"], r["p50_ms"], r["p95_ms"], r["p99_ms"],
                     r["runs"]] for r in rows]),
          "", targets_markdown(targets)]
    write_outputs(paths, payload, "\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
