"""Serve's own HTTP hop: what the proxy (ray::ProxyActor) and the ingress replica spend per request.

GET /health is the cheapest route the ingress has (no key, no database, no node): its round trip is
the proxy hop plus the least a FastAPI route costs in the replica. Reports the round trip's p50/p95
and the CPU per request of the proxy, the ingress and Ray's own processes (utime+stime from /proc).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from benchmarks.common import CpuMeter, SpannerApp, summarize, timed_runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.proxy_hop", description=__doc__)
    parser.add_argument("--runs", type=int, default=500, help="measured requests")
    parser.add_argument("--budget-s", type=float, default=20.0, help="stop after this long (at least 3)")
    args = parser.parse_args(argv)
    with SpannerApp() as app:
        def once() -> float:
            started = time.perf_counter()
            response = app.http.get("/health")
            if response.status_code != 200:
                raise RuntimeError(f"/health answered {response.status_code}")
            return (time.perf_counter() - started) * 1000.0

        pids = app.pids()
        groups = {role: pids[role] for role in ("proxy", "ingress", "ray_system")}
        meter = CpuMeter({**groups, "driver": [os.getpid()]})
        meter.start()
        samples = timed_runs(once, args.runs, args.budget_s, warmup=20)
        cpu = meter.stop()
        calls = len(samples) + 20
    summary: dict[str, Any] = summarize(samples)
    per_request = {name: round(1000 * s / calls, 3) for name, s in cpu.items()}
    print(f"GET /health through Serve's proxy: p50 {summary['p50_ms']:.2f} ms, "
          f"p95 {summary['p95_ms']:.2f} ms over {summary['runs']} requests")
    print("CPU ms per request: " + ", ".join(f"{name} {ms}" for name, ms in per_request.items()))
    print(f"load average at end {[round(x, 2) for x in os.getloadavg()]} (the machine may be shared)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
