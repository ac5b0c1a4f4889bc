"""Soak: 200 concurrent clients against a fleet with one archive hanging and one node actor killed
mid-run. Reports latency against the deadline, answers later than deadline + 1 s (goal 0), 5xx count,
records and events lost (goal 0), and resident memory of the ingress and node actors at start and end.

The fleet: three lean simulated PACS in helper processes (benchmarks.simhost) and one pynetdicom
simulator that accepts associations and never answers a C-FIND (fault ``hang``). Events go to a
topic exchange of this run's own on the machine's RabbitMQ, where a queue of this run counts them.
Every client sends its next query (Cache-Control: no-cache) as soon as the last is answered; the clients
are coroutines on one event loop in a process of their own (``_Load``), so what they measure, from send
to answer, is the spanner's time and not their own contention for this process's interpreter lock.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import (
    SimFleet,
    SpannerApp,
    add_output_args,
    cpu_seconds,
    machine_info,
    machine_line,
    md_table,
    output_paths,
    percentile,
    rss_mib,
    write_outputs,
)

RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
SPAN = "soak"
LAG_TICK_S = 0.05


def _rss(app: SpannerApp) -> dict[str, float]:
    groups = app.pids()
    return {group: round(sum(rss_mib(pid) for pid in pids), 1) for group, pids in groups.items()
            if group in ("ingress", "node_actors", "proxy")}


def _cpu(groups: dict[str, list[int]]) -> dict[tuple[str, int], float]:
    """CPU seconds (utime + stime) so far of each process, by group and PID."""
    return {(group, pid): cpu_seconds(pid) for group, pids in groups.items() for pid in pids}


def _cpu_spent(start: dict[tuple[str, int], float], end: dict[tuple[str, int], float]) -> dict[str, float]:
    """CPU seconds spent per group between two readings; a process gone by the end (the killed node
    actor) is not counted, one started meanwhile (its successor) counts from zero."""
    spent: dict[str, float] = {}
    for (group, pid), seconds in end.items():
        if seconds:
            spent[group] = spent.get(group, 0.0) + seconds - start.get((group, pid), 0.0)
    return {group: round(seconds, 1) for group, seconds in sorted(spent.items())}


def _events_queue(exchange: str) -> tuple[Any, Any, str]:
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    channel = connection.channel()
    channel.exchange_declare(exchange, exchange_type="topic", durable=True)
    queue = channel.queue_declare(f"{exchange}.count", exclusive=True).method.queue
    channel.queue_bind(queue, exchange, routing_key="query.completed")
    return connection, channel, queue


def _count_events(channel: Any, queue: str, expected: int, wait_s: float) -> int:
    counted, deadline = 0, time.monotonic() + wait_s
    while time.monotonic() < deadline:
        method, _, _ = channel.basic_get(queue, auto_ack=True)
        if method is None:
            if counted >= expected:
                break
            channel.connection.sleep(0.1)
            continue
        counted += 1
    return counted


Result = tuple[float, int, "str | None", "float | None", "float | None", dict[str, float], float]
"""One answer: seconds from send to answer, HTTP status (0: transport error), query_id, the seconds the
replica's app took (``Server-Timing: app;dur=``), the seconds from send to the app's receipt (its
``received`` wall clock; same machine): the rest lies on the way back, and every ``Server-Timing``
duration in seconds (``loop``, ``accept``, ``plan``, ``admit``, ``nodes``, ``merge``: serve_app.timing), and
when it was sent (epoch s)."""


class _Load:
    """The clients, in a process of their own started with ``spawn`` (this one runs Ray's driver)."""

    def __init__(self, base_url: str, headers: dict[str, str], body: dict[str, Any], clients: int,
                 seconds: float, deadline_s: float) -> None:
        context = multiprocessing.get_context("spawn")
        self._started = context.Event()
        self._receive, send = context.Pipe(duplex=False)
        args = (send, self._started, base_url, headers, body, clients, seconds, deadline_s)
        self._process = context.Process(target=_load_main, args=args, daemon=True)
        self.cpu_end: dict[tuple[str, int], float] = {}
        self.lags: list[float] = []

    def start(self) -> float:
        """Start the clients; returns (monotonic) when they began sending."""
        self._process.start()
        if not self._started.wait(120.0):
            raise RuntimeError("the soak's client process did not start within 120 s")
        return time.monotonic()

    @property
    def pid(self) -> int:
        return int(self._process.pid or 0)

    def results_and_stop(self, cpu: Callable[[], dict[tuple[str, int], float]]) -> list[Result]:
        """The clients' results; ``cpu()`` is read the moment they arrive (kept in ``cpu_end``), before
        the client process ends and its CPU time can no longer be read; the clients' loop lags in ``lags``."""
        results: list[Result]
        results, self.lags = self._receive.recv()
        self.cpu_end = cpu()
        self._process.join(10.0)
        return results


def _load_main(send: Any, started: Any, base_url: str, headers: dict[str, str], body: dict[str, Any],
               clients: int, seconds: float, deadline_s: float) -> None:
    send.send(asyncio.run(_load(started, base_url, headers, body, clients, seconds, deadline_s)))
    send.close()


def _server_timing(header: str) -> tuple[dict[str, float], float | None]:
    """Every duration (s) of a Server-Timing header by name, and its ``received`` wall clock (epoch s)."""
    durations: dict[str, float] = {}
    received = None
    for metric in header.split(","):
        name, _, params = metric.strip().partition(";")
        if params.startswith("dur="):
            durations[name] = float(params[4:]) / 1000
        elif name == "received" and params.startswith("desc="):
            received = float(params[5:].strip('"'))
    return durations, received


async def _load(started: Any, base_url: str, headers: dict[str, str], body: dict[str, Any], clients: int,
                seconds: float, deadline_s: float) -> tuple[list[Result], list[float]]:
    """Every answer, and how late the clients' own event loop ran a 50 ms timer (each 50 ms): a loaded
    client adds its own delay to what it measures."""
    import aiohttp

    results: list[Result] = []
    lags: list[float] = []
    # aiohttp, not httpx: with 200 connections httpx's pool cost the clients 15 ms of CPU per request,
    # a third of the machine the spanner needs; aiohttp costs about a tenth of that.
    connector = aiohttp.TCPConnector(limit=clients, limit_per_host=clients, force_close=False)
    timeout = aiohttp.ClientTimeout(total=deadline_s + 60)
    payload = json.dumps(body).encode()
    request_headers = {**headers, "Content-Type": "application/json"}
    async with aiohttp.ClientSession(base_url, connector=connector, timeout=timeout, trust_env=False,
                                     headers=request_headers) as http:
        stop_at = time.monotonic() + seconds

        async def client() -> None:
            while time.monotonic() < stop_at:
                t0, sent = time.monotonic(), time.time()
                retry_after, before_s, phases = 0.0, None, dict[str, float]()
                try:
                    async with http.post("/api/v1/queries", data=payload) as response:
                        answer = await response.read()
                    latency = time.monotonic() - t0
                    status, query_id = response.status, None
                    phases, received = _server_timing(response.headers.get("server-timing", ""))
                    server_s = phases.pop("app", None)
                    before_s = None if received is None else received - sent
                    if status in (200, 502):
                        query_id = json.loads(answer).get("query_id")
                    elif status == 503:
                        retry_after = float(response.headers.get("retry-after", "1"))
                except (aiohttp.ClientError, TimeoutError, ValueError):  # ValueError: a body not JSON
                    latency, status, query_id, server_s = time.monotonic() - t0, 0, None, None
                results.append((latency, status, query_id, server_s, before_s, phases, sent))
                await asyncio.sleep(max(0.0, min(retry_after, stop_at - time.monotonic())))

        async def lag() -> None:
            while time.monotonic() < stop_at:
                asked = time.monotonic()
                await asyncio.sleep(LAG_TICK_S)
                lags.append(time.monotonic() - asked - LAG_TICK_S)

        started.set()
        await asyncio.gather(lag(), *(client() for _ in range(clients)))
    return results, lags


def run(clients: int, seconds: float, deadline_s: float, kill_at_s: float,
        raw: str | None = None) -> dict[str, Any]:
    import ray

    from actors import registry
    from simulator.dataset import generate_fleet
    from simulator.scp import SimulatedPacs, SimulatorConfig

    exchange = f"soak.{uuid.uuid4().hex[:8]}"
    settings = {"rabbitmq_url": RABBITMQ_URL, "events_exchange": exchange, "requests_queue": "",
                "events_poll_s": 1.0}
    connection, channel, queue = _events_queue(exchange)
    hanging = SimulatedPacs(SimulatorConfig(ae_title="HANGING", fault="hang"), generate_fleet(5, 1, 3)[0])
    hanging.start()
    try:
        with SimFleet(3, studies=2, latency_ms=5.0, prefix="soak") as fleet, SpannerApp(settings) as app:
            app.bring_up(fleet.nodes, max_associations=8)
            app.http.post("/api/v1/nodes", json={"name": "hanging", "ae_title": "HANGING",
                                                 "host": "127.0.0.1", "port": hanging.port})
            names = [n.name for n in fleet.nodes] + ["hanging"]
            app.add_span(SPAN, names, timeout_s=deadline_s)
            body = {"level": "PATIENT", "span": SPAN, "filters": {"PatientID": "*"}, "limit": 10}
            rss_start = _rss(app)
            load = _Load(app.base_url, app.headers, body, clients, seconds, deadline_s)
            began = load.start()
            others = {"simulators": fleet.pids, "clients": [load.pid]}
            cpu_start = _cpu({**app.pids(), **others})
            time.sleep(kill_at_s)
            victim = fleet.nodes[0].name
            handle = registry.lookup(victim, app.namespace)
            killed = handle is not None
            if handle is not None:
                ray.kill(handle)  # not restarted: the coordinator finds it gone and creates it anew
            # Dropped while Ray runs: a handle collected after ray.shutdown() ends this process from Ray's
            # core worker, before the results are printed.
            del handle
            results = load.results_and_stop(lambda: _cpu({**app.pids(), **others}))
            wall_s = time.monotonic() - began
            cpu_s = _cpu_spent(cpu_start, load.cpu_end)
            rss_end = _rss(app)
            probe_warnings = _proxy_probe_warnings(app)
            answered = [r for r in results if r[2] is not None]
            time.sleep(2.0)  # the last records are written before their answers; events follow
            recorded = sum(1 for _ in _record_ids(app, {r[2] for r in answered if r[2]}))
            events = _count_events(channel, queue, len(answered), wait_s=30.0)
    finally:
        hanging.stop()
        try:
            channel.exchange_delete(exchange)
        finally:
            connection.close()
    if raw:  # every answer, for a closer look than the summary
        Path(raw).write_text(json.dumps(results))
    latencies = sorted(r[0] for r in results)
    statuses: dict[str, int] = {}
    for _, status, *_ in results:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    late = sum(1 for r in results if r[0] > deadline_s + 1.0)
    late_by_status: dict[str, int] = {}
    for latency, status, *_ in results:
        if latency > deadline_s + 1.0:
            late_by_status[str(status)] = late_by_status.get(str(status), 0) + 1
    refused = sorted(r[0] for r in results if r[1] == 503)
    answered_s = sorted(r[0] for r in results if r[1] in (200, 502))
    # Latency outside the replica's app (Serve's proxy, the replica's queue and loop before the app, sending).
    app_s = sorted(r[3] for r in results if r[3] is not None)
    outside_s = sorted(r[0] - r[3] for r in results if r[3] is not None)
    refused_app_s = sorted(r[3] for r in results if r[3] is not None and r[1] == 503)
    late_timed = [r for r in results if r[0] > deadline_s + 1.0 and r[3] is not None]
    late_in_app_s = sorted(r[3] for r in late_timed)
    late_outside_s = sorted(r[0] - r[3] for r in late_timed)
    late_before_s = sorted(r[4] for r in late_timed if r[4] is not None)
    late_after_s = sorted(r[0] - r[3] - r[4] for r in late_timed if r[4] is not None)
    before_app_s = sorted(r[4] for r in results if r[4] is not None)
    late_phases_p50_s = _phases_p50([r[5] for r in late_timed])
    return {
        "clients": clients, "seconds": round(wall_s, 1), "deadline_s": deadline_s, "requests": len(results),
        "statuses": statuses, "p50_s": round(percentile(latencies, 50), 3),
        "p99_s": round(percentile(latencies, 99), 3), "max_s": round(latencies[-1], 3) if latencies else None,
        "later_than_deadline_plus_1s": late, "late_by_status": late_by_status,
        # Of those, how many the replica's app itself answered past the deadline (the part the spanner
        # controls); the rest lost their time before the app (proxy, Ray, a starved client) or after it.
        "late_with_app_past_deadline": sum(1 for r in late_timed if r[3] is not None and r[3] > deadline_s),
        "answered_p50_s": round(percentile(answered_s, 50), 3),
        "answered_p99_s": round(percentile(answered_s, 99), 3),
        "in_app_p50_s": round(percentile(app_s, 50), 3), "in_app_p99_s": round(percentile(app_s, 99), 3),
        "outside_app_p50_s": round(percentile(outside_s, 50), 3),
        "outside_app_p99_s": round(percentile(outside_s, 99), 3),
        "refused_in_app_p99_s": round(percentile(refused_app_s, 99), 3),
        "late_in_app_p50_s": round(percentile(late_in_app_s, 50), 3),
        "late_outside_app_p50_s": round(percentile(late_outside_s, 50), 3),
        "late_before_app_p50_s": round(percentile(late_before_s, 50), 3),
        "late_after_app_p50_s": round(percentile(late_after_s, 50), 3),
        "late_in_app_phases_p50_s": late_phases_p50_s,
        "answered_in_app_phases_p50_s": _phases_p50([r[5] for r in results if r[1] in (200, 502)]),
        "before_app_p50_s": round(percentile(before_app_s, 50), 3),
        "before_app_p99_s": round(percentile(before_app_s, 99), 3),
        "refused_p50_s": round(percentile(refused, 50), 3),
        "refused_p99_s": round(percentile(refused, 99), 3),
        "http_5xx": sum(n for s, n in statuses.items() if s.startswith("5")),
        "http_503_refused": statuses.get("503", 0), "transport_errors": statuses.get("0", 0),
        "answered_with_record_id": len(answered), "records_lost": len(answered) - recorded,
        "events_lost": max(0, len(answered) - events), "actor_killed": killed,
        "client_loop_lag_p99_s": round(percentile(sorted(load.lags), 99), 3),
        "client_loop_lag_max_s": round(max(load.lags, default=0.0), 3),
        "proxy_queue_len_probe_timeouts": probe_warnings,
        "cpu_s": cpu_s, "rss_start_mib": rss_start, "rss_end_mib": rss_end,
    }


def _proxy_probe_warnings(app: SpannerApp) -> int | None:
    """How often Serve's proxy failed to learn the replica's queue length in time (its log says so): each
    time, requests wait in the proxy while it probes again with a longer deadline. None: no proxy log."""
    logs = list(Path(app.tmp).glob("session_latest/logs/serve/proxy_*.log"))
    if not logs:
        return None
    return sum(path.read_text(errors="replace").count("Failed to get queue length") for path in logs)


def _phases_p50(timings: list[dict[str, float]]) -> dict[str, float]:
    """The median of each Server-Timing phase over ``timings`` (a phase absent from one is not counted)."""
    names = sorted({name for timing in timings for name in timing})
    return {name: round(percentile(sorted(t[name] for t in timings if name in t), 50), 3) for name in names}


def _record_ids(app: SpannerApp, ids: set[str]) -> list[str]:
    """Which of ``ids`` the database holds."""
    from sqlalchemy import select

    from spanner.storage import make_engine
    from spanner.storage.tables import QueryRecordRow

    engine = make_engine(str(app.settings["database_url"]))
    try:
        with engine.connect() as conn:
            found = {str(i) for i in conn.execute(select(QueryRecordRow.id)).scalars()}
    finally:
        engine.dispose()
    return sorted(ids & found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_args(parser, "soak")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=None, help="run time (default 60, --quick 20)")
    parser.add_argument("--raw", default=None, help="also write every answer's figures to this JSON file")
    parser.add_argument("--deadline-s", type=float, default=None, help="span timeout (default 10, --quick 3)")
    args = parser.parse_args()
    seconds = args.seconds or (20.0 if args.quick else 60.0)
    deadline_s = args.deadline_s or (3.0 if args.quick else 10.0)
    result = run(args.clients, seconds, deadline_s, kill_at_s=seconds / 3, raw=args.raw)
    payload = {"machine": machine_info(), "result": result, "elapsed_s": result["seconds"]}
    rows = [(k, v) for k, v in result.items()]
    markdown = (f"# Soak: {args.clients} clients, one archive hanging, one node actor killed\n\n"
                f"{machine_line(payload)}\n\n" + md_table(["measure", "value"], rows))
    print(markdown)
    write_outputs({k: v for k, v in output_paths(args, "soak").items() if k != "plot"}, payload, markdown)


if __name__ == "__main__":
    main()
