"""The spanner on a real three-node Ray cluster on this machine; prints one JSON report (the last line).

Run by tests/test_ray_cluster.py in a process of its own: a pytest session already holds one Ray
instance, and a process can be the driver of one Ray cluster only. It starts a Ray head (labels
site=hq) with ``ray.cluster_utils.Cluster``, the spanner's Serve app with two ingress replicas and the
HTTP proxy on the head only (Ray nodes on one host would fight for the port), three simulated archives,
then adds two worker nodes (site=east, site=west) and measures:

- the same queries on one Ray node and on three (answers compared);
- where node actors run (spread; a ``placement`` honoured; a placement no node offers: ``unplaceable``);
- a worker node killed (every process of it, SIGKILL) during a loop of queries: incomplete queries,
  time until answers are complete again, the slowest query against its deadline;
- one of the two ingress replicas killed by PID (SIGKILL) during a loop of concurrent requests;
- the spanner's metrics in Ray's Prometheus endpoint of each Ray node.

Everything it started it ends (Serve, Ray's processes by the Cluster object then by PID, the archives).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

QUERY_TIMEOUT_S = 3.0
NODE_GRACE_S = 0.5
QUERIES: list[dict[str, Any]] = [
    {"level": "STUDY", "filters": {"PatientName": "*", "StudyDate": ""}, "return_keys": ["StudyDescription"]},
    {"level": "PATIENT", "filters": {"PatientID": "*", "PatientName": ""}},
    {"level": "SERIES", "filters": {"Modality": "CT", "SeriesInstanceUID": ""}},
]
# What the scrape waits for (while queries run: see the metrics phase below).
SPANNER_METRICS = (
    "ray_spanner_node_query_latency_ms_bucket", "ray_spanner_node_outcomes_total",
    "ray_spanner_node_in_flight", "ray_spanner_node_pool_open", "ray_spanner_node_circuit_open",
    "ray_spanner_span_query_latency_ms_bucket", "ray_spanner_span_queries_total",
    "ray_spanner_span_cache_total",
)


class Client:
    def __init__(self, base_url: str) -> None:
        import httpx

        self.http = httpx.Client(base_url=base_url, timeout=30.0)

    def query(self, span: str = "all", **extra: Any) -> tuple[int, dict[str, Any]]:
        body = QUERIES[0] | {"span": span, "timeout_s": QUERY_TIMEOUT_S} | extra
        response = self.http.post("/api/v1/queries", json=body, headers={"Cache-Control": "no-cache"})
        if not response.headers.get("content-type", "").startswith("application/json"):
            return response.status_code, {"error": f"not JSON: {response.text[:200]!r}"}
        return response.status_code, response.json()

    def ok(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        response = self.http.request(method, path, **kw)
        code = response.status_code
        assert code in (200, 201, 204), f"{method} {path}: {code} {response.text}"
        return response.json() if response.content else {}

    def ready(self) -> dict[str, Any]:
        body: dict[str, Any] = self.http.get("/ready").json()
        return body


def answers(client: Client) -> list[dict[str, Any]]:
    """Each query's merged matches and per-node statuses, in a form that compares across runs."""
    found = []
    for body in QUERIES:
        code, out = client.query(**body)
        assert code == 200, out
        found.append({
            "status": out["status"], "total": out["total"],
            "matches": [[m["dataset"], m["nodes"]] for m in out["matches"]],
            "nodes": sorted((n["node"], n["status"], n["matches"]) for n in out["nodes"]),
        })
    return found


def wait_for(what: str, check: Callable[[], Any], timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout_s:g} s")
        time.sleep(0.2)


def node_id_of(ready: dict[str, Any], labels: dict[str, str]) -> str:
    return next(n["node_id"] for n in ready["ray"]["nodes"] if n["labels"] == labels)


def recreate_actors(client: Client, names: list[str]) -> None:
    """Disable and enable each node: its actor goes and a new one is placed on today's Ray nodes."""
    for name in names:
        client.ok("PATCH", f"/api/v1/nodes/{name}", json={"enabled": False})
        client.ok("PATCH", f"/api/v1/nodes/{name}", json={"enabled": True})


def query_loop(client: Client, stop: threading.Event, log: list[dict[str, Any]], **extra: Any) -> None:
    while not stop.is_set():
        started = time.monotonic()
        try:
            code, out = client.query(**extra)
        except Exception as exc:  # a failed request is counted, not raised
            code, out = 0, {"error": f"{type(exc).__name__}: {exc}"}
        ended = time.monotonic()
        log.append({
            "started": started, "ended": ended, "code": code, "status": out.get("status"),
            "error": out.get("error") or out.get("detail"), "elapsed_ms": out.get("elapsed_ms"),
            "nodes": {n["node"]: n["status"] for n in out.get("nodes", [])},
        })


def kill_worker_node(cluster: Any, client: Client, victim_labels: dict[str, str]) -> dict[str, Any]:
    """Kill a worker node during a loop of queries; how the answers fared, and where the actors went."""
    before = client.ready()
    victim_id = node_id_of(before, victim_labels)
    on_victim = sorted(n for n, w in before["ray"]["actors"].items() if w["ray_node_id"] == victim_id)
    victim = next(n for n in cluster.worker_nodes if n.node_id == victim_id)
    log: list[dict[str, Any]] = []
    stop = threading.Event()
    loop = threading.Thread(target=query_loop, args=(client, stop, log))
    loop.start()
    time.sleep(2.0)
    killed_at = time.monotonic()
    cluster.remove_node(victim, allow_graceful=False)  # SIGKILL to the raylet and every process of the node
    # Queries go on until ten in a row after the kill are complete (or 20 s pass).
    wait_for("answers complete again", lambda: _complete_run(log, killed_at, 10), timeout_s=20.0)
    stop.set()
    loop.join()
    after = client.ready()
    later = [e for e in log if e["ended"] > killed_at]
    incomplete = [e for e in later if e["status"] != "success"]
    last_incomplete = max((e["ended"] for e in incomplete), default=killed_at)
    limit_s = QUERY_TIMEOUT_S + 1.0
    return {
        "victim_actors": on_victim,
        "queries": len(log),
        "queries_after_kill": len(later),
        "incomplete": len(incomplete),
        "failed_requests": sum(e["code"] != 200 for e in log),
        "incomplete_statuses": sorted({s for e in incomplete for s in e["nodes"].values()} - {"ok"}),
        "complete_again_s": round(last_incomplete - killed_at, 2),
        # As the client saw it (the proxy hop and this process's own scheduling included), and as the
        # spanner measured it (fan-out to merged answer).
        "slowest_s": round(max(e["ended"] - e["started"] for e in log), 2),
        "slowest_spanner_s": round(max((e["elapsed_ms"] or 0) / 1000 for e in log), 2),
        "deadline_plus_1_s": limit_s,
        "later_than_deadline_plus_1": sum(e["ended"] - e["started"] > limit_s for e in log),
        "spanner_later_than_deadline_plus_1": sum((e["elapsed_ms"] or 0) / 1000 > limit_s for e in log),
        "over_deadline_plus_1_s": [
            [round(e["ended"] - e["started"], 2), e["elapsed_ms"], e["status"], e["nodes"]]
            for e in log if e["ended"] - e["started"] > limit_s
        ],
        "moved_to": {n: after["ray"]["actors"].get(n, {}).get("ray_node_id") for n in on_victim},
        "victim_id": victim_id,
        "nodes_alive_after": after["ray"]["nodes_alive"],
    }


def _complete_run(log: list[dict[str, Any]], since: float, count: int) -> bool:
    after = [e for e in log if e["started"] > since]
    return len(after) >= count and all(e["status"] == "success" for e in after[-count:])


def replica_pids() -> list[int]:
    """The ingress replicas' worker processes (all below this process, which started the cluster)."""
    from cluster.ray_runtime import descendants

    found = []
    for pid in descendants(os.getpid()):
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
            if cmdline.startswith("ray::ServeReplica:spanner:Ingress"):
                found.append(pid)
    return sorted(found)


def kill_replica(client: Client) -> dict[str, Any]:
    """Kill one of the two ingress replicas by PID while two clients send queries."""
    pids = wait_for("two ingress replicas", lambda: (p := replica_pids()) and len(p) == 2 and p)
    logs: list[list[dict[str, Any]]] = [[], []]
    stop = threading.Event()
    clients = [client, Client(str(client.http.base_url))]
    loops = [
        threading.Thread(target=query_loop, args=(c, stop, log)) for c, log in zip(clients, logs, strict=True)
    ]
    for loop in loops:
        loop.start()
    time.sleep(2.0)
    killed_at = time.monotonic()
    os.kill(pids[0], signal.SIGKILL)
    time.sleep(6.0)
    stop.set()
    for loop in loops:
        loop.join()
    log = logs[0] + logs[1]
    failed = [e for e in log if e["code"] != 200]
    in_flight = [e for e in log if e["started"] <= killed_at <= e["ended"]]
    return {
        "requests": len(log),
        "failed": len(failed),
        "failed_codes": sorted({e["code"] for e in failed}),
        "failed_errors": sorted({str(e.get("error")) for e in failed}),
        "in_flight_at_kill": len(in_flight),
        "failed_not_in_flight": sum(not (e["started"] <= killed_at <= e["ended"]) for e in failed),
        "replicas_after": len(wait_for("a replacement replica", lambda: len(replica_pids()) == 2 and [1, 1])),
    }


def scrape_metrics() -> dict[str, list[dict[str, str]]]:
    """Every ``ray_spanner_*`` sample name, with its labels, from the metrics port of each alive Ray node."""
    import ray

    found: dict[str, list[dict[str, str]]] = {}
    for node in ray.nodes():
        port = node.get("MetricsExportPort")
        if not node.get("Alive") or not port:
            continue
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
        for line in text.splitlines():
            if line.startswith(("ray_spanner_", "spanner_")):
                name, _, rest = line.partition("{")
                labels = dict(
                    part.split("=", 1) for part in rest.partition("}")[0].split(",") if "=" in part
                )
                found.setdefault(name, []).append({k: v.strip('"') for k, v in labels.items()})
    return found


def start_head(cluster_class: Any, args: dict[str, Any]) -> Any:
    """The cluster's head, tried twice: Ray gives a head 30 s (fixed) to register with its GCS, which a
    machine loaded by other work can exceed. What a failed attempt started is ended by PID."""
    from cluster.ray_runtime import descendants, end_processes, identities

    try:
        return cluster_class(initialize_head=True, head_node_args=args)
    except Exception as exc:
        print(f"Ray head did not start ({exc}); once more", file=sys.stderr, flush=True)
        end_processes(identities(descendants(os.getpid())))
        return cluster_class(initialize_head=True, head_node_args=args)


def main() -> None:
    from cluster.ray_internals import FAST_METRICS_ENV, FAST_NODE_DEATH_ENV, LOOPBACK_HOOK, stay_on_loopback

    tmp = tempfile.mkdtemp(prefix="spanner-cluster-")
    os.environ.update({"RAY_TMPDIR": tmp, "RAY_AUTH_MODE": "disabled"})
    os.environ.update(FAST_NODE_DEATH_ENV | FAST_METRICS_ENV)
    stay_on_loopback()
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster
    from ray.serve.config import HTTPOptions, ProxyLocation

    from cluster.ray_runtime import descendants, end_processes, identities
    from serve_app.app import AppArgs, build_app
    from simulator.dataset import generate_fleet
    from simulator.scp import SimulatorConfig
    from simulator.wire import WireSimulatedPacs
    from spanner.storage import make_engine, upgrade_database
    from tests.peers.ports import free_port, listening_off_loopback, off_loopback

    report: dict[str, Any] = {"temp_dir": tmp}
    phases: dict[str, float] = {}
    report["phases_s"] = phases
    last = [time.monotonic()]

    def mark() -> float:
        now = time.monotonic()
        took, last[0] = round(now - last[0], 1), now
        return took
    archives: list[Any] = []
    cluster: Any = None
    started = time.monotonic()
    node = {"node_ip_address": "127.0.0.1", "include_dashboard": False, "object_store_memory": 80 * 1024**2}
    try:
        for i, instances in enumerate(generate_fleet(42, 3)):
            pacs = WireSimulatedPacs(SimulatorConfig(ae_title=f"SIM_{i}"), instances)
            pacs.start()
            archives.append(pacs)
        cluster = start_head(Cluster, node | {"num_cpus": 2, "labels": {"site": "hq"}})
        namespace = f"spanner-cluster-{uuid.uuid4().hex[:8]}"
        ray.init(address=cluster.address, namespace=namespace, log_to_driver=False,
                 runtime_env={"worker_process_setup_hook": LOOPBACK_HOOK})
        database = f"sqlite:///{tmp}/spanner.db"
        engine = make_engine(database)
        upgrade_database(engine)
        engine.dispose()
        port = free_port()
        settings = {
            "namespace": namespace, "var_dir": tmp, "database_url": database, "http_port": port,
            "demo_fleet": False, "auth_enabled": False, "node_grace_s": NODE_GRACE_S, "cancel_grace_s": 0.3,
            "circuit_cooldown_s": 1.0, "store_port": free_port(), "log_level": "WARNING",
        }
        # The HTTP proxy on the head only: Ray nodes on one host would all bind the same port.
        serve.start(
            proxy_location=ProxyLocation.HeadOnly, http_options=HTTPOptions(host="127.0.0.1", port=port),
            logging_config={"enable_access_log": False},
        )
        serve.run(build_app(AppArgs(settings=settings, replicas=2)), name="spanner", route_prefix="/")
        client = Client(f"http://127.0.0.1:{port}")
        names = [f"pacs-{i}" for i in range(len(archives))]
        for name, pacs in zip(names, archives, strict=True):
            client.ok("POST", "/api/v1/nodes", json={"name": name, "ae_title": pacs.ae_title,
                                                      "host": "127.0.0.1", "port": pacs.port})
        phases["start"] = mark()

        # One Ray node, then three.
        one_node = answers(client)
        cluster.add_node(**node, num_cpus=1, labels={"site": "east"})
        cluster.add_node(**node, num_cpus=1, labels={"site": "west"})
        wait_for("three Ray nodes", lambda: client.ready()["ray"]["nodes_alive"] == 3)
        recreate_actors(client, names)
        ready = client.ready()
        three_nodes = answers(client)
        report["answers"] = {
            "equal": one_node == three_nodes, "totals": [a["total"] for a in three_nodes],
            "statuses": [a["status"] for a in three_nodes],
        }
        phases["one_and_three_nodes"] = mark()
        report["spread"] = {
            "ray_nodes": {n["node_id"]: n["labels"] for n in ready["ray"]["nodes"]},
            "actors": {n: w["ray_node_id"] for n, w in ready["ray"]["actors"].items()},
        }

        # Placement: a site's archive on that site's Ray node; a site no Ray node offers.
        pinned = {"name": "east-pacs", "ae_title": archives[0].ae_title, "host": "127.0.0.1",
                  "port": archives[0].port, "placement": {"site": "east"}}
        client.ok("POST", "/api/v1/nodes", json=pinned)
        posted = time.monotonic()
        north = pinned | {"name": "north-pacs", "placement": {"site": "north"}}
        client.ok("POST", "/api/v1/nodes", json=north)
        post_s = time.monotonic() - posted
        ready = client.ready()
        code, out = client.query(nodes=["pacs-1", "east-pacs", "north-pacs"])
        report["placement"] = {
            "east_actor_on": ready["ray"]["actors"]["east-pacs"]["ray_node_id"],
            "east_node": node_id_of(ready, {"site": "east"}),
            "north_ready": ready["actors"].get("north-pacs"),
            "north_reason": ready["ray"]["unplaceable"].get("north-pacs", ""),
            "ready_status": ready["status"],
            "north_post_s": round(post_s, 2),
            "query_code": code,
            "query_status": out.get("status"),
            "query_nodes": {n["node"]: [n["status"], n["elapsed_ms"], n.get("error")] for n in out["nodes"]},
            "query_elapsed_ms": out.get("elapsed_ms"),
        }
        for name in ("north-pacs", "east-pacs"):  # the loop below queries nodes that may move
            client.ok("DELETE", f"/api/v1/nodes/{name}")
        phases["placement"] = mark()

        # A worker node dies: the one holding the most node actors (SPREAD is best effort).
        spread = report["spread"]["actors"]
        workers = [{"site": "west"}, {"site": "east"}]
        victim = max(workers, key=lambda labels: list(spread.values()).count(node_id_of(ready, labels)))
        report["node_kill"] = kill_worker_node(cluster, client, victim)
        phases["node_kill"] = mark()
        report["replica_kill"] = kill_replica(client)
        phases["replica_kill"] = mark()

        # Metrics: each Ray node's Prometheus endpoint, once the queries' metrics have been reported.
        def spanner_metrics() -> dict[str, list[dict[str, str]]] | None:
            found = scrape_metrics()
            return found if all(m in found for m in SPANNER_METRICS) else None

        # Scraped while queries run: Ray's agent drops a gauge two report intervals after it was last
        # set, and a node actor sets its gauges as it works (actors/metrics.py).
        metrics: dict[str, list[dict[str, str]]] = {}
        stop = threading.Event()
        loop = threading.Thread(target=query_loop, args=(client, stop, []))
        loop.start()
        try:
            with contextlib.suppress(TimeoutError):  # the test says which are missing
                metrics = wait_for("spanner metrics in Ray's Prometheus endpoints", spanner_metrics, 15)
            metrics = metrics or scrape_metrics()
        finally:
            stop.set()
            loop.join()
        # The label sets, without Ray's own labels (worker, session, version...).
        own = ("node", "span", "status", "result", "le")
        report["metrics"] = {
            name: sorted({json.dumps({k: x[k] for k in own if k in x}, sort_keys=True) for x in found})
            for name, found in metrics.items()
        }
        phases["metrics"] = mark()
        # Every connection of the cluster's processes (three Ray nodes, Serve, the actors) on loopback.
        cluster_pids = descendants(os.getpid()) | {os.getpid()}
        report["off_loopback"] = off_loopback(cluster_pids)
        report["listening_off_loopback"] = listening_off_loopback(cluster_pids)
        report["total_s"] = round(time.monotonic() - started, 1)
    finally:
        ours = identities(descendants(os.getpid()))
        if ray.is_initialized():  # serve.shutdown would otherwise start a Ray instance of its own
            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()
        if cluster is not None:
            with contextlib.suppress(Exception):
                cluster.shutdown()
        for pacs in archives:
            pacs.stop()
        report["left_over_processes_ended"] = end_processes(ours)
        shutil.rmtree(tmp, ignore_errors=True)
        phases["stop"] = mark()
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
