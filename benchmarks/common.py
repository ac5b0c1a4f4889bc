"""Shared pieces of the benchmarks: machine facts, percentiles, targets, output files, process accounting,
simulated PACS hosted in helper processes, and the spanner app started in-process.

The simulators live in their own processes (benchmarks.simhost) so that they do not compete with the HTTP
clients for the driver's GIL. They run the lean asyncio engine (simulator.wire: about 0.15 ms of CPU
per match, against 0.96 ms for the pynetdicom one) unless ``--sim-engine pynetdicom`` asks otherwise: on two
shared cores the stand-in PACS would otherwise be measured as much as the spanner.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Every measured query must reach the archives: skip the query cache's lookup and keep the answer out of it.
NO_CACHE = {"Cache-Control": "no-cache, no-store"}
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


# -- machine and numbers ------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    """What the figures were measured on; the load average says whether others were busy meanwhile."""
    import pydicom
    import pynetdicom
    import ray

    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    return {
        "cpu_count": os.cpu_count(), "cpu_model": model, "memory_gib": round(mem_kib / 1024**2, 1),
        "python": platform.python_version(), "ray": ray.__version__, "pynetdicom": pynetdicom.__version__,
        "pydicom": pydicom.__version__, "platform": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def machine_line(payload: dict[str, Any]) -> str:
    """One markdown line on the machine and how busy it was (other work shares these cores)."""
    m = payload["machine"]
    return (f"{m['cpu_count']} x {m['cpu_model']}, {m['memory_gib']} GiB, Python {m['python']}, "
            f"Ray {m['ray']}, pynetdicom {m['pynetdicom']}; "
            f"load average {m['load_average_at_start']} at start, "
            f"{payload.get('load_average_at_end')} at end; {payload.get('elapsed_s')} s.\n")


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), without numpy."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q / 100.0
    low, high = math.floor(pos), math.ceil(pos)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (pos - low)


def summarize(samples_ms: Iterable[float]) -> dict[str, Any]:
    values = sorted(samples_ms)
    return {"p50_ms": round(percentile(values, 50), 2), "p95_ms": round(percentile(values, 95), 2),
            "p99_ms": round(percentile(values, 99), 2), "runs": len(values)}


def timed_runs(call: Callable[[], float | None], runs: int, budget_s: float, min_runs: int = 3,
               warmup: int = 1) -> list[float]:
    """Milliseconds per call after ``warmup`` calls; stops after ``runs`` or once ``budget_s`` is spent.

    A call may return its own measured milliseconds (e.g. time until results are in hand); else the
    wall time of the call counts.
    """
    for _ in range(warmup):
        call()
    samples: list[float] = []
    deadline = time.monotonic() + budget_s
    for i in range(runs):
        started = time.perf_counter()
        own = call()
        samples.append(own if own is not None else (time.perf_counter() - started) * 1000.0)
        if i + 1 >= min_runs and time.monotonic() > deadline:
            break
    return samples


@dataclass(frozen=True, slots=True)
class Target:
    """One target of the issue: ``measured`` against ``limit`` with ``op`` ('<=' or '>=')."""

    name: str
    measured: float
    limit: float
    op: str = "<="
    unit: str = ""

    @property
    def passed(self) -> bool:
        if math.isnan(self.measured):
            return False
        return self.measured <= self.limit if self.op == "<=" else self.measured >= self.limit

    def line(self) -> str:
        verdict = "pass" if self.passed else "MISS"
        return f"  [{verdict}] {self.name}: measured {self.measured:.3g}{self.unit} (target {self.op} " \
               f"{self.limit:.3g}{self.unit})"

    def to_json(self) -> dict[str, Any]:
        return {"target": self.name, "measured": round(self.measured, 4), "op": self.op,
                "limit": round(self.limit, 4), "unit": self.unit, "passed": self.passed}


def print_targets(title: str, targets: Sequence[Target]) -> None:
    print(f"\nTargets ({title}):")
    for target in targets:
        print(target.line())


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        out.append("| " + " | ".join(_cell(value) for value in row) + " |")
    return "\n".join(out) + "\n"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return "-" if value is None else str(value)


def targets_markdown(targets: Sequence[Target]) -> str:
    return md_table(["target", "measured", "limit", "result"], [
        (t.name, f"{t.measured:.3g}{t.unit}", f"{t.op} {t.limit:.3g}{t.unit}", "pass" if t.passed else "MISS")
        for t in targets
    ])


def add_output_args(parser: argparse.ArgumentParser, stem: str) -> None:
    """--json/--markdown/--plot default to benchmarks/results/<stem>[-quick].*; 'none' skips one."""
    parser.add_argument("--quick", action="store_true", help="small, fast run (make bench-quick)")
    parser.add_argument("--json", default=None, help=f"JSON output (default results/{stem}.json)")
    parser.add_argument("--markdown", default=None, help=f"markdown output (default results/{stem}.md)")
    parser.add_argument("--plot", default=None, help=f"PNG output (default results/{stem}.png)")


def output_paths(args: argparse.Namespace, stem: str) -> dict[str, Path | None]:
    suffix = "-quick" if args.quick else ""
    paths: dict[str, Path | None] = {}
    for kind, ext in (("json", "json"), ("markdown", "md"), ("plot", "png")):
        given = getattr(args, kind, None)
        default = RESULTS_DIR / f"{stem}{suffix}.{ext}"
        paths[kind] = None if given == "none" else Path(given) if given else default
    return paths


def write_outputs(paths: dict[str, Path | None], payload: dict[str, Any], markdown: str) -> None:
    for kind, content in (("json", json.dumps(payload, indent=2) + "\n"), ("markdown", markdown)):
        path = paths.get(kind)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content, encoding="utf-8")
            print(f"wrote {path}")


def plot_lines(path: Path | None, series: dict[str, tuple[Sequence[float], Sequence[float]]], *, title: str,
               xlabel: str, ylabel: str, logx: int = 0, logy: bool = False,
               hlines: dict[str, float] | None = None) -> None:
    """A PNG with one line per series (``logx``: 0 linear, else the log base); matplotlib is optional."""
    if path is None:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed (pip install -e '.[bench]'); no plot at {path}")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for label, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), marker="o", label=label)
    for label, y in (hlines or {}).items():
        ax.axhline(y, linestyle="--", linewidth=1, color="grey")
        ax.annotate(label, (ax.get_xlim()[0], y), textcoords="offset points", xytext=(4, 3), fontsize=8)
    if logx:
        ax.set_xscale("log", base=logx)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    print(f"wrote {path}")


# -- processes ----------------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mib(pid: int) -> float:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KIB / 1024
    except OSError:
        return 0.0


def pss_mib(pid: int) -> float:
    """Proportional set size: RSS with shared pages divided among their sharers (a fairer sum)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class CpuMeter:
    """CPU seconds spent by named groups of processes between ``start()`` and ``stop()``."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self._before: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        return {name: sum(cpu_seconds(pid) for pid in pids) for name, pids in self.groups.items()}

    def start(self) -> None:
        self._before = self._read()

    def stop(self) -> dict[str, float]:
        after = self._read()
        return {name: after[name] - self._before.get(name, 0.0) for name in after}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- simulated PACS in helper processes ---------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SimNode:
    index: int
    name: str
    ae_title: str
    port: int


class SimFleet:
    """``count`` simulated PACS spread round-robin over a few ``benchmarks.simhost`` processes.

    Node ``i`` lives in process ``i % processes``, so the first N nodes use as many processes as they can.
    Each helper stops when its stdin closes (this driver ending, however it ends) or after its lifetime.
    """

    def __init__(self, count: int, studies: int, latency_ms: float, *, jitter_ms: float = 0.0, seed: int = 1,
                 processes: int | None = None, lifetime_s: float = 3600.0, prefix: str = "sim",
                 engine: str = "wire") -> None:
        self.count = count
        self.engine = engine
        self.studies = studies
        self.latency_ms = latency_ms
        self.jitter_ms = jitter_ms
        self.seed = seed
        self.processes = max(1, min(processes or 4, count))
        self.lifetime_s = lifetime_s
        self.prefix = prefix
        self.nodes: list[SimNode] = []
        self._procs: list[subprocess.Popen[str]] = []

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self._procs]

    def cpu_s(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids)

    def start(self, deadline_s: float = 120.0) -> SimFleet:
        repo = Path(__file__).resolve().parent.parent
        for p in range(self.processes):
            indexes = list(range(p, self.count, self.processes))
            cmd = [sys.executable, "-m", "benchmarks.simhost", "--indexes", ",".join(map(str, indexes)),
                   "--studies", str(self.studies), "--latency-ms", str(self.latency_ms),
                   "--jitter-ms", str(self.jitter_ms), "--seed", str(self.seed),
                   "--lifetime-s", str(self.lifetime_s), "--engine", self.engine]
            self._procs.append(subprocess.Popen(cmd, cwd=repo, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                text=True))
        ports: dict[int, int] = {}
        deadline = time.monotonic() + deadline_s
        try:
            for proc in self._procs:
                assert proc.stdout is not None
                ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
                line = proc.stdout.readline() if ready else ""
                if not line:
                    raise RuntimeError(f"simulator host {proc.pid} did not report its ports "
                                       f"(exit code {proc.poll()})")
                ports.update({int(k): v for k, v in json.loads(line)["ports"].items()})
        except BaseException:
            self.stop()
            raise
        self.nodes = [SimNode(i, f"{self.prefix}-{i:03d}", f"SIM{i:03d}", ports[i])
                      for i in range(self.count)]
        return self

    def stop(self) -> None:
        """Close each helper's stdin (it then stops its simulators); end stragglers by PID."""
        for proc in self._procs:
            if proc.stdin is not None and not proc.stdin.closed:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
        for proc in self._procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
            if proc.stdout is not None:
                proc.stdout.close()
        self._procs = []

    def __enter__(self) -> SimFleet:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# -- the spanner app in this process ------------------------------------------------------------------
def migrate(url: str) -> None:
    """The database at the newest schema, as `spanner db upgrade` makes it (the app only checks it)."""
    try:
        from spanner.storage import make_engine, upgrade_database
    except ImportError:  # a tree from before schema migrations: the app creates its tables itself
        return
    engine = make_engine(url)
    try:
        upgrade_database(engine)
    finally:
        engine.dispose()


def _admin_key(url: str) -> str:
    from serve_app.auth import new_key
    from spanner.storage import Repository, make_engine

    key, prefix, key_hash = new_key()
    engine = make_engine(url)
    try:
        Repository(engine).create_api_key("bench", "admin", prefix, key_hash)
    finally:
        engine.dispose()
    return key


class SpannerApp:
    """A local Ray instance with the spanner Serve app on a free loopback port (as tests/conftest.py does)."""

    def __init__(self, settings: dict[str, Any] | None = None, num_cpus: int = 2) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="spanner-bench-"))
        self.namespace = f"spanner-bench-{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        self.num_cpus = num_cpus
        self.settings: dict[str, Any] = {
            "namespace": self.namespace, "var_dir": str(self.tmp / "var"),
            "database_url": f"sqlite:///{self.tmp}/spanner.db", "http_port": self.port, "demo_fleet": False,
            **(settings or {}),
        }
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.http: Any = None
        self.api_key = ""
        self.headers: dict[str, str] = dict(NO_CACHE)

    def start(self) -> SpannerApp:
        os.environ["RAY_AUTH_MODE"] = "disabled"
        os.environ["RAY_TMPDIR"] = str(self.tmp)
        import httpx
        import ray
        from ray import serve
        from ray.serve.config import HTTPOptions

        from cluster.ray_runtime import stay_on_loopback
        from serve_app.app import AppArgs, build_app

        started = time.monotonic()
        migrate(str(self.settings["database_url"]))
        self.api_key = _admin_key(str(self.settings["database_url"]))  # keys on, as in production
        self.headers = {**NO_CACHE, "Authorization": f"Bearer {self.api_key}"}
        stay_on_loopback()
        ray.init(address="local", num_cpus=self.num_cpus, include_dashboard=False, namespace=self.namespace,
                 log_to_driver=False, _temp_dir=str(self.tmp), logging_level="WARNING",
                 _node_ip_address="127.0.0.1")
        try:
            serve.start(http_options=HTTPOptions(host="127.0.0.1", port=self.port),
                        logging_config={"enable_access_log": False, "log_level": "WARNING"})
            serve.run(build_app(AppArgs(settings=self.settings)), name="spanner", route_prefix="/")
        except BaseException:
            ray.shutdown()
            raise
        self.http = httpx.Client(base_url=self.base_url, timeout=120.0, trust_env=False, headers=self.headers)
        print(f"spanner app up on {self.base_url} in {time.monotonic() - started:.1f} s")
        return self

    def stop(self) -> None:
        import ray
        from ray import serve

        if self.http is not None:
            self.http.close()
            self.http = None
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> SpannerApp:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- HTTP -------------------------------------------------------------------------------------------
    def add_node(self, node: SimNode, **extra: Any) -> None:
        body = {"name": node.name, "ae_title": node.ae_title, "host": "127.0.0.1", "port": node.port, **extra}
        response = self.http.post("/api/v1/nodes", json=body)
        if response.status_code != 201:
            raise RuntimeError(f"POST /api/v1/nodes {node.name}: {response.status_code} {response.text}")

    def echo(self, name: str, timeout_s: float = 30.0, attempts: int = 3) -> str:
        """The node actor's C-ECHO status; retried, since a loaded machine can starve a fresh actor."""
        status = "not tried"
        for _ in range(attempts):
            response = self.http.post(f"/api/v1/nodes/{name}/echo", params={"timeout_s": timeout_s})
            status = str(response.json().get("status")) if response.status_code == 200 else \
                f"http {response.status_code}"
            if status == "ok":
                break
        return status

    def delete_node(self, name: str) -> None:
        self.http.delete(f"/api/v1/nodes/{name}")

    def add_span(self, name: str, nodes: list[str], **extra: Any) -> None:
        body = {"name": name, "ae_title": name.upper()[:16], "nodes": nodes, **extra}
        response = self.http.post("/api/v1/spans", json=body)
        if response.status_code != 201:
            raise RuntimeError(f"POST /api/v1/spans {name}: {response.status_code} {response.text}")

    def bring_up(self, nodes: Sequence[SimNode], parallel: int = 16, **extra: Any) -> float:
        """Seconds from the first POST /api/v1/nodes until every node's actor echoes ok."""
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(nodes)))) as pool:
            list(pool.map(lambda n: self.add_node(n, **extra), nodes))
            statuses = list(pool.map(lambda n: self.echo(n.name), nodes))
        elapsed = time.perf_counter() - started
        bad = {n.name: s for n, s in zip(nodes, statuses, strict=True) if s != "ok"}
        if bad:
            raise RuntimeError(f"nodes did not echo ok: {bad}")
        return elapsed

    def tear_down(self, names: Sequence[str], parallel: int = 16) -> None:
        with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(names)))) as pool:
            list(pool.map(self.delete_node, names))

    # -- processes --------------------------------------------------------------------------------------
    def pids(self) -> dict[str, list[int]]:
        """PIDs by role: node actors, the ingress replica, the HTTP proxy, the rest of Ray's own processes."""
        import ray

        groups: dict[str, list[int]] = {"node_actors": [], "ingress": [], "proxy": [], "ray_system": []}
        for info in ray._private.state.actors().values():
            if info.get("State") != "ALIVE" or not info.get("Pid"):
                continue
            cls = str(info.get("ActorClassName", ""))
            if cls.endswith("PacsNode"):
                groups["node_actors"].append(int(info["Pid"]))
            elif "Ingress" in cls or "ServeReplica" in cls:
                groups["ingress"].append(int(info["Pid"]))
            elif "Proxy" in cls:
                groups["proxy"].append(int(info["Pid"]))
            else:
                groups["ray_system"].append(int(info["Pid"]))
        try:
            node = ray._private.worker._global_node
            for infos in node.all_processes.values():
                for proc_info in infos:
                    groups["ray_system"].append(int(proc_info.process.pid))
        except Exception:  # private API: accounting is best effort
            pass
        return groups


# -- real archives behind delay relays ----------------------------------------------------------------
class OrthancFleet:
    """``count`` real Orthanc archives (answering C-FIND from their index: ``StorageAccessOnFind: Never``),
    ``studies`` studies each (generate_uniform: every STUDY C-FIND matches all of them), each behind a
    delay relay (benchmarks.relay, one helper process) that holds client-to-archive bytes ``latency_ms``.

    ``nodes`` point at the relays; ``direct_ports`` at the archives themselves.
    """

    def __init__(self, count: int, studies: int, latency_ms: float, *, seed: int = 1,
                 prefix: str = "orthanc") -> None:
        self.count = count
        self.studies = studies
        self.latency_ms = latency_ms
        self.seed = seed
        self.prefix = prefix
        self.nodes: list[SimNode] = []
        self.direct_ports: list[int] = []
        self._peers: list[Any] = []
        self._relay: subprocess.Popen[str] | None = None

    @property
    def pids(self) -> list[int]:
        return [int(peer.pid) for peer in self._peers if peer.pid]

    @property
    def relay_pids(self) -> list[int]:
        return [self._relay.pid] if self._relay is not None else []

    def start(self) -> OrthancFleet:
        from simulator.dataset import generate_uniform
        from tests.peers.orthanc import OrthancPeer

        try:
            for i in range(self.count):
                peer = OrthancPeer(aet=f"ORTHANC{i:03d}", default_encoding="Utf8",
                                   extra_config={"StorageAccessOnFind": "Never"})
                peer.start()
                self._peers.append(peer)
                peer.upload_datasets(generate_uniform(self.seed, i, studies=self.studies))
            self.direct_ports = [int(peer.dicom_port) for peer in self._peers]
            repo = Path(__file__).resolve().parent.parent
            targets = ",".join(map(str, self.direct_ports))
            cmd = [sys.executable, "-m", "benchmarks.relay", "--targets", targets,
                   "--delay-ms", str(self.latency_ms)]
            self._relay = subprocess.Popen(cmd, cwd=repo, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                           text=True)
            assert self._relay.stdout is not None
            ready, _, _ = select.select([self._relay.stdout], [], [], 30)
            line = self._relay.stdout.readline() if ready else ""
            if not line:
                raise RuntimeError(f"relay helper {self._relay.pid} did not report its ports")
            ports = json.loads(line)["ports"]
        except BaseException:
            self.stop()
            raise
        self.nodes = [SimNode(i, f"{self.prefix}-{i:03d}", peer.aet, int(port))
                      for i, (peer, port) in enumerate(zip(self._peers, ports, strict=True))]
        return self

    def stop(self) -> None:
        from tests.peers.orthanc import stop_all

        if self._relay is not None:
            if self._relay.stdin is not None:
                with contextlib.suppress(OSError):
                    self._relay.stdin.close()
            try:
                self._relay.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._relay.kill()
                self._relay.wait(timeout=5)
            if self._relay.stdout is not None:
                self._relay.stdout.close()
            self._relay = None
        stop_all(self._peers)
        self._peers = []

    def __enter__(self) -> OrthancFleet:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
