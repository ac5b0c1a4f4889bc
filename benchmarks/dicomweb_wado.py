"""WADO-RS through the spanner against Orthanc-DICOMweb directly, on the same Orthanc archive, in one run.

    python -m benchmarks.dicomweb_wado [--quick] [--instances 20] [--kib 512] [--rounds 5]

One Orthanc with Debian's DICOMweb plugin is both the archive behind the spanner (it C-MOVEs to the
spanner's storage SCP) and the reference server answering DICOMweb itself. It holds ``3 x rounds`` series
of ``--instances`` CT instances of ``--kib`` KiB of pixel data. Per round:

- first frame: ``/frames/1`` of the series' first instance, Accept ``transfer-syntax=*``. Direct: Orthanc
  reads it from its storage. Spanner cold: a series never asked before (look-up C-FIND, C-MOVE of that
  one instance into the spool, then the frame); spanner warm: the same again, from the spool;
- whole series (``/series/{se}``, multipart of every instance): time to the first part and to the last
  byte; cold on another unseen series, then warm;
- series metadata (``/series/{se}/metadata``): cold on a third unseen series, then warm (no archive asked);
- ``GET /health`` through the spanner beside the warm metadata: the floor of any answer through the Serve
  proxy and the ingress replica at that moment.

Medians over the rounds. Targets (issue 14): warm series metadata <= 1.2x Orthanc-DICOMweb's, cold first
frame <= 2x the direct one. Everything on loopback, sharing the machine's two cores: say so with figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.common import (
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

FRAMES = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
INSTANCES = 'multipart/related; type="application/dicom"; transfer-syntax=*'
STUDY = "1.2.826.0.1.3680043.8.498.7719.1"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=None,
                        help="instances per series (quick 10, else 50)")
    parser.add_argument("--kib", type=int, default=None, help="pixel data per instance (quick 128, else 512)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (quick 3, else 5)")
    add_output_args(parser, "dicomweb-wado")
    args = parser.parse_args(argv)
    args.instances = args.instances or (10 if args.quick else 50)
    args.kib = args.kib or (128 if args.quick else 512)
    args.rounds = args.rounds or (3 if args.quick else 5)
    return args


def timed(client: httpx.Client, path: str, accept: str | None = None) -> float:
    """Milliseconds of one GET, its body read whole."""
    started = time.perf_counter()
    response = client.get(path, headers={"Accept": accept} if accept else {})
    elapsed = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        raise RuntimeError(f"{response.request.url} answered {response.status_code}: {response.text[:300]}")
    return elapsed


def streamed(client: httpx.Client, url: str, accept: str) -> tuple[float, float, int]:
    """Milliseconds to the first body bytes and to the last, and the bytes received."""
    started = time.perf_counter()
    first = 0.0
    size = 0
    with client.stream("GET", url, headers={"Accept": accept}) as response:
        if response.status_code != 200:
            response.read()
            raise RuntimeError(f"{url} answered {response.status_code}: {response.text[:300]}")
        for chunk in response.iter_bytes():
            if not first:
                first = (time.perf_counter() - started) * 1000
            size += len(chunk)
    return first, (time.perf_counter() - started) * 1000, size


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from tests.peers.instances import write_instance
    from tests.peers.orthanc import OrthancPeer, dicomweb_plugin, orthanc_executable

    if orthanc_executable() is None or dicomweb_plugin() is None:
        print("needs Debian's orthanc and orthanc-dicomweb (make peers)")
        return 2
    paths = output_paths(args, "dicomweb-wado")
    machine = machine_info()
    store_port = free_port()
    series_count = 3 * args.rounds + 1  # the last one only warms the store actor and the connections up
    started_at = time.monotonic()
    archive = OrthancPeer(aet="WADO_BENCH", dicomweb=True,
                          modalities={"spanner": ("SPANNER", "127.0.0.1", store_port)})
    samples: dict[str, list[float]] = {}

    def note(name: str, value: float) -> None:
        samples.setdefault(name, []).append(value)

    try:
        archive.start()
        with tempfile.TemporaryDirectory(prefix="spanner-bench-wado-") as name:
            for series in range(1, series_count + 1):
                archive.upload_many(
                    write_instance(Path(name), series * 1000 + n, args.kib * 1024, study_uid=STUDY,
                                   series=series).read_bytes() for n in range(args.instances))
        print(f"Orthanc up with {series_count} series x {args.instances} instances x {args.kib} KiB")
        sops = {int(s["MainDicomTags"]["SeriesInstanceUID"].rsplit(".", 1)[1]): sorted(
            archive.get(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"] for i in s["Instances"])
            for s in (archive.get(f"/series/{sid}") for sid in archive.series())}
        with SpannerApp({"store_port": store_port}) as app, \
                httpx.Client(base_url=archive.dicomweb_url, timeout=120, trust_env=False) as orthanc:
            app.http.post("/api/v1/nodes", json={"name": "archive", "ae_title": archive.aet,
                                                 "host": "127.0.0.1", "port": archive.dicom_port})
            ours = httpx.Client(base_url=app.base_url + "/dicomweb", timeout=120, trust_env=False,
                                headers={"Authorization": app.headers["Authorization"]})

            def frame_path(series: int) -> str:
                return f"/studies/{STUDY}/series/{STUDY}.{series}/instances/{sops[series][0]}/frames/1"

            # one untimed request each way first: the store actor, the plugin and the connections start
            timed(orthanc, frame_path(series_count), FRAMES)
            timed(ours, f"/studies/{STUDY}/series/{STUDY}.{series_count}/metadata")
            for r in range(args.rounds):
                frame_series, whole_series, meta_series = 3 * r + 1, 3 * r + 2, 3 * r + 3
                path = frame_path(frame_series)
                note("first frame: Orthanc-DICOMweb", timed(orthanc, path, FRAMES))
                note("first frame: spanner cold", timed(ours, path, FRAMES))
                note("first frame: spanner warm", timed(ours, path, FRAMES))
                series_path = f"/studies/{STUDY}/series/{STUDY}.{whole_series}"
                for label, client in (("Orthanc-DICOMweb", orthanc), ("spanner cold", ours),
                                      ("spanner warm", ours)):
                    first, last, size = streamed(client, series_path, INSTANCES)
                    note(f"series first part: {label}", first)
                    note(f"whole series: {label}", last)
                    note(f"series MB/s: {label}", size / 1e6 / (last / 1000))
                meta = f"/studies/{STUDY}/series/{STUDY}.{meta_series}/metadata"
                note("series metadata: Orthanc-DICOMweb", timed(orthanc, meta))
                note("series metadata: spanner cold", timed(ours, meta))
                for _ in range(3):  # warm is what a viewer sees opening the study again: several samples
                    note("series metadata: Orthanc-DICOMweb (again)", timed(orthanc, meta))
                    note("series metadata: spanner warm", timed(ours, meta))
                    # the floor of any answer through the Serve proxy and the ingress on this machine now
                    note("GET /health through the spanner", timed(app.http, "/health"))
            ours.close()
    finally:
        archive.stop(graceful=False)

    medians = {name: statistics.median(values) for name, values in samples.items()}
    rows = [(name, f"{medians[name]:.1f}", len(samples[name])) for name in samples]
    direct_meta = statistics.median(samples["series metadata: Orthanc-DICOMweb"]
                                    + samples["series metadata: Orthanc-DICOMweb (again)"])
    targets = [
        Target("warm series metadata / Orthanc-DICOMweb's",
               medians["series metadata: spanner warm"] / direct_meta, 1.2, unit="x"),
        Target("cold first frame / Orthanc-DICOMweb's", medians["first frame: spanner cold"]
               / medians["first frame: Orthanc-DICOMweb"], 2.0, unit="x"),
    ]
    summary = {"machine": machine, "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
               "elapsed_s": round(time.monotonic() - started_at, 1)}
    print(f"\n{machine_line(summary)}")
    for name, value, count in rows:
        print(f"  {name}: {value} (median of {count})")
    print_targets("WADO-RS", targets)
    payload = {**summary, "instances": args.instances, "kib": args.kib, "rounds": args.rounds,
               "medians": medians, "samples": samples, "targets": [t.to_json() for t in targets]}
    markdown = (f"# WADO-RS through the spanner vs Orthanc-DICOMweb\n\n{machine_line(summary)}\n"
                f"{series_count} series x {args.instances} instances x {args.kib} KiB, {args.rounds} rounds "
                "(ms unless stated; medians)\n\n" + md_table(["measure", "median", "samples"], rows)
                + "\n" + targets_markdown(targets))
    write_outputs({**paths, "plot": None}, payload, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
