"""Soak: 200 concurrent clients against a fleet with one archive hanging and one node actor killed
mid-run. Reports latency against the deadline, answers later than deadline + 1 s (goal 0), 5xx count,
records and events lost (goal 0), and resident memory of the ingress and node actors at start and end.

The fleet: three lean simulated PACS in helper processes (benchmarks.simhost) and one pynetdicom
simulator that accepts associations and never answers a C-FIND (fault ``hang``). Events go to a
topic exchange of this run's own on the machine's RabbitMQ, where a queue of this run counts them.
Every client sends its next query (Cache-Control: no-cache) as soon as the last is answered.
"""

from __future__ import annotations

import argparse
import threading
import time
import uuid
from typing import Any

from benchmarks.common import (
    SimFleet,
    SpannerApp,
    add_output_args,
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


def _rss(app: SpannerApp) -> dict[str, float]:
    groups = app.pids()
    return {group: round(sum(rss_mib(pid) for pid in pids), 1) for group, pids in groups.items()
            if group in ("ingress", "node_actors", "proxy")}


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


def run(clients: int, seconds: float, deadline_s: float, kill_at_s: float) -> dict[str, Any]:
    import httpx
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
            results: list[tuple[float, int, str | None]] = []  # latency s, status, query_id
            lock = threading.Lock()
            start = threading.Barrier(clients + 1)
            stop_at = [0.0]

            def client() -> None:
                with httpx.Client(base_url=app.base_url, timeout=deadline_s + 60, trust_env=False,
                                  headers=app.headers) as http:
                    start.wait()
                    while time.monotonic() < stop_at[0]:
                        t0 = time.monotonic()
                        try:
                            response = http.post("/api/v1/queries", json=body)
                            status = response.status_code
                            query_id = response.json().get("query_id") if status in (200, 502) else None
                        except httpx.HTTPError:
                            status, query_id = 0, None
                        with lock:
                            results.append((time.monotonic() - t0, status, query_id))
                        if status == 503:
                            time.sleep(float(response.headers.get("retry-after", "1")))

            threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
            for thread in threads:
                thread.start()
            began = time.monotonic()
            stop_at[0] = began + seconds
            start.wait()
            time.sleep(kill_at_s)
            victim = fleet.nodes[0].name
            handle = registry.lookup(victim, app.namespace)
            killed = handle is not None
            if handle is not None:
                ray.kill(handle)  # not restarted: the coordinator finds it gone and creates it anew
            for thread in threads:
                thread.join()
            wall_s = time.monotonic() - began
            rss_end = _rss(app)
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
    latencies = sorted(r[0] for r in results)
    statuses: dict[str, int] = {}
    for _, status, _ in results:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    late = sum(1 for r in results if r[0] > deadline_s + 1.0)
    late_by_status: dict[str, int] = {}
    for latency, status, _ in results:
        if latency > deadline_s + 1.0:
            late_by_status[str(status)] = late_by_status.get(str(status), 0) + 1
    refused = sorted(r[0] for r in results if r[1] == 503)
    answered_s = sorted(r[0] for r in results if r[1] in (200, 502))
    return {
        "clients": clients, "seconds": round(wall_s, 1), "deadline_s": deadline_s, "requests": len(results),
        "statuses": statuses, "p50_s": round(percentile(latencies, 50), 3),
        "p99_s": round(percentile(latencies, 99), 3), "max_s": round(latencies[-1], 3) if latencies else None,
        "later_than_deadline_plus_1s": late, "late_by_status": late_by_status,
        "answered_p50_s": round(percentile(answered_s, 50), 3),
        "answered_p99_s": round(percentile(answered_s, 99), 3),
        "refused_p50_s": round(percentile(refused, 50), 3),
        "refused_p99_s": round(percentile(refused, 99), 3),
        "http_5xx": sum(n for s, n in statuses.items() if s.startswith("5")),
        "http_503_refused": statuses.get("503", 0), "transport_errors": statuses.get("0", 0),
        "answered_with_record_id": len(answered), "records_lost": len(answered) - recorded,
        "events_lost": max(0, len(answered) - events), "actor_killed": killed,
        "rss_start_mib": rss_start, "rss_end_mib": rss_end,
    }


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
    parser.add_argument("--deadline-s", type=float, default=None, help="span timeout (default 10, --quick 3)")
    args = parser.parse_args()
    seconds = args.seconds or (20.0 if args.quick else 60.0)
    deadline_s = args.deadline_s or (3.0 if args.quick else 10.0)
    result = run(args.clients, seconds, deadline_s, kill_at_s=seconds / 3)
    payload = {"machine": machine_info(), "result": result, "elapsed_s": result["seconds"]}
    rows = [(k, v) for k, v in result.items()]
    markdown = (f"# Soak: {args.clients} clients, one archive hanging, one node actor killed\n\n"
                f"{machine_line(payload)}\n\n" + md_table(["measure", "value"], rows))
    print(markdown)
    write_outputs({k: v for k, v in output_paths(args, "soak").items() if k != "plot"}, payload, markdown)


if __name__ == "__main__":
    main()
