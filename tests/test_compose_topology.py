"""The enterprise overlay's topology, without containers.

Each service of compose/docker-compose.enterprise.yml runs its own command with its own environment
(the compose files interpolated with .env.example) as local processes: the coordinator (a Ray head with
Serve), two Ray workers joining it, and the DICOM listener forwarding to the coordinator. They run in a
network namespace the test creates, whose loopback stands for the compose network: every service
hostname maps to 127.0.0.1, and every port a service listens on gets a port of its own (one namespace
holds them all, as one host). Ray refuses 127.0.0.1 as the address of a node that others join on the
host's own network; in a namespace with nothing but loopback it keeps it, and no traffic leaves it.

PostgreSQL and Redis are real servers in the namespace, on the ports DATABASE_URL and REDIS_URL map to;
PostgreSQL is waited on through its compose health check (pg_isready) and migrated by spanner-migrate's
command before the coordinator starts. RabbitMQ is left out (events are off): its service has tests of its
own (test_events.py, test_amqp.py), and the compose file checks cover its wiring.

Simulated archives register through the API; a query through the API and findscu through the listener
answer the same studies, and the node actors run on the worker nodes as well as the head.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from cluster.ray_runtime import descendants, end_processes, identities
from tests.compose_files import BASE, ENTERPRISE, load, merge
from tests.conftest import require
from tests.peers.ports import free_port

pytestmark = [pytest.mark.dcmtk, pytest.mark.timeout(900)]

HOSTS = ("spanner-coordinator", "postgres", "redis", "rabbitmq")
LEFT_OUT = ("RABBITMQ_URL",)  # see the module docstring
VENV_BIN = Path(sys.executable).parent
ARCHIVES = 3
HEALTHY_WITHIN_S = 300.0  # a ceiling: on a loaded machine a Ray head alone took over a minute
RAY_ON_ONE_HOST = {
    # Every node of the cluster shares this host's two cores with the rest of the test session: a raylet
    # may take longer than Ray's 30 s to register, and a stopping node need not drain (the test ends all).
    "RAY_raylet_start_wait_time_s": "120",
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
}


@dataclass
class Topology:
    """The namespace, the processes started in it, and where each service's ports went."""

    netns: str
    tmp: Path
    ray_tmp: Path
    """Ray's session folders: a short path, since Ray's socket paths must fit in 107 bytes."""
    ports: dict[tuple[str, int], int] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    envs: dict[str, dict[str, str]] = field(default_factory=dict)

    def port(self, service: str, container_port: int) -> int:
        key = (service, container_port)
        if key not in self.ports:
            self.ports[key] = free_port()
        return self.ports[key]

    def base_env(self) -> dict[str, str]:
        return {"PATH": f"{VENV_BIN}:/usr/bin:/bin:{postgres_bin()}", "HOME": str(self.tmp),
                "LANG": "C.UTF-8", "TCP_NODELAY": "1", "PYTHONUNBUFFERED": "1", **RAY_ON_ONE_HOST}

    def start(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = (self.tmp / f"{name}.log").open("wb")
        process = subprocess.Popen(["ip", "netns", "exec", self.netns, *command], env=env,
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.processes[name] = process
        return process

    def run(self, command: list[str], env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.netns, *command], env=env or self.base_env(),
                              capture_output=True, text=True, timeout=timeout)

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")[-8000:]

    def wait_healthy(self, name: str, service: dict[str, Any]) -> None:
        """Run the service's compose health check (its shell form, with its environment) until it passes,
        as `depends_on: condition: service_healthy` waits for it."""
        kind, *test = service["healthcheck"]["test"]
        command = ["sh", "-c", test[0]] if kind == "CMD-SHELL" else test
        deadline = time.monotonic() + HEALTHY_WITHIN_S
        while True:
            process = self.processes[name]
            assert process.poll() is None, f"{name} ended with {process.returncode}:\n{self.log(name)}"
            check = self.run(command, self.envs[name], timeout=30)
            if check.returncode == 0:
                return
            assert time.monotonic() < deadline, \
                f"{name} not healthy in time: {check.stdout}{check.stderr}\n{self.log(name)}"
            time.sleep(0.5)

    def get(self, url: str) -> Any:
        done = self.run(["curl", "-sf", "--max-time", "30", url])
        assert done.returncode == 0, f"GET {url}: {done.stderr}"
        return json.loads(done.stdout)

    def post(self, url: str, body: dict[str, Any]) -> Any:
        done = self.run(["curl", "-sf", "--max-time", "60", "-H", "Content-Type: application/json",
                         "-X", "POST", "-d", json.dumps(body), url])
        assert done.returncode == 0, f"POST {url}: {done.stderr}"
        return json.loads(done.stdout)


def service_env(top: Topology, name: str, service: dict[str, Any]) -> dict[str, str]:
    """The service's compose environment with hostnames on 127.0.0.1 and each port moved to its own."""
    env = top.base_env()
    for key, raw in service.get("environment", {}).items():
        if key in LEFT_OUT:
            continue
        value = str(raw)
        for host in HOSTS:  # host:port of another service, as in RAY_ADDRESS, SPANNER_URL, REDIS_URL
            value = re.sub(rf"(?<=[/@]){host}:(\d+)|^{host}:(\d+)",
                           lambda m, h=host: f"127.0.0.1:{top.port(h, int(m.group(1) or m.group(2)))}", value)
        if key.endswith("_PORT"):  # a port this service listens on
            value = str(top.port(name, int(value)))
        env[key] = value
    return env


def ray_args(top: Topology, name: str, env: dict[str, str]) -> str:
    """One host holds every node: each keeps its files and its dashboard agent's port to itself."""
    own = f"--temp-dir={top.ray_tmp / name} --dashboard-agent-listen-port={free_port()}"
    return f"{env.get('SPANNER_RAY_ARGS', '')} {own}".strip()


def command(service: dict[str, Any]) -> list[str]:
    words = list(service["command"])
    assert words[0] == "spanner"
    return [str(VENV_BIN / "spanner"), *words[1:]]


def stop(top: Topology) -> None:
    """SIGTERM every service (as `docker compose down` does), then end by PID whatever is left below."""
    tree: dict[int, str] = {}
    for process in top.processes.values():
        tree |= identities(descendants(process.pid) | {process.pid})
    last = ("spanner-coordinator", "redis", "postgres")  # what the others depend on stops after them
    first = [name for name in top.processes if name not in last]
    for group in (first, *([name] for name in last if name in top.processes)):
        for name in group:
            if top.processes[name].poll() is None:
                # the postgres image stops with SIGINT (a fast shutdown); everything else with SIGTERM
                top.processes[name].send_signal(signal.SIGINT if name == "postgres" else signal.SIGTERM)
        for name in group:
            try:
                top.processes[name].wait(30)
            except subprocess.TimeoutExpired:
                top.processes[name].kill()
                top.processes[name].wait()
    end_processes(tree)


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Topology, dict[str, Any]]]:
    require(os.geteuid() == 0 and shutil.which("ip") is not None, "root and iproute2 (a network namespace)")
    for tool in ("findscu", "echoscu", "curl", "redis-server"):
        require(shutil.which(tool, path="/usr/bin:/bin") is not None, tool)
    require(bool(postgres_bin()), "PostgreSQL's server programs")
    services = merge(load(BASE), load(ENTERPRISE))["services"]
    top = Topology(netns=f"spanner-compose-{uuid.uuid4().hex[:8]}", tmp=tmp_path_factory.mktemp("compose"),
                   ray_tmp=Path(tempfile.mkdtemp(prefix="spanner-compose-")))
    subprocess.run(["ip", "netns", "add", top.netns], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", top.netns, "ip", "link", "set", "lo", "up"], check=True)
        _start(top, services)
        yield top, services
    finally:
        try:
            stop(top)
        finally:
            subprocess.run(["ip", "netns", "del", top.netns], check=False)
            shutil.rmtree(top.ray_tmp, ignore_errors=True)


def _start(top: Topology, services: dict[str, Any]) -> None:
    top.start("redis", ["redis-server", "--bind", "127.0.0.1", "--port", str(top.port("redis", 6379)),
                        "--save", "", "--appendonly", "no"], top.base_env())
    start_postgres(top, services)
    coordinator = services["spanner-coordinator"]
    env = service_env(top, "spanner-coordinator", coordinator)
    env |= {"SPANNER_VAR_DIR": str(top.tmp / "var"), "SPANNER_RAY_ARGS": ray_args(top, "head", env)}
    top.envs["spanner-coordinator"] = env
    top.start("spanner-coordinator", command(coordinator), env)
    for i in range(ARCHIVES):  # the archives start meanwhile
        port = str(top.port(f"sim-{i}", 104))
        top.start(f"sim-{i}", [str(VENV_BIN / "spanner"), "simulate", "--port", port, "--ae-title", f"SIM{i}",
                               "--node-index", str(i)], top.base_env())
    top.wait_healthy("spanner-coordinator", coordinator)
    for i in (1, 2):  # docker compose up --scale ray-worker=2
        name = f"ray-worker-{i}"
        env = service_env(top, name, services["ray-worker"])
        env |= {"SPANNER_RAY_ARGS": ray_args(top, name, env)}
        top.envs[name] = env
        top.start(name, command(services["ray-worker"]), env)
    listener = services["dimse-scp-listener"]
    top.envs["dimse-scp-listener"] = service_env(top, "dimse-scp-listener", listener)
    top.start("dimse-scp-listener", command(listener), top.envs["dimse-scp-listener"])
    top.wait_healthy("dimse-scp-listener", listener)
    api = f"http://127.0.0.1:{top.port('spanner-coordinator', 8000)}"
    deadline = time.monotonic() + HEALTHY_WITHIN_S
    while len([n for n in top.get(f"{dashboard(top)}/api/v0/nodes")["data"]["result"]["result"]
               if n["state"] == "ALIVE"]) < 3:
        assert time.monotonic() < deadline, f"the workers did not join:\n{top.log('ray-worker-1')}"
        time.sleep(0.5)
    for i in range(ARCHIVES):
        cli = top.run([str(VENV_BIN / "spanner"), "nodes", "add", f"sim-{i}", f"SIM{i}", "127.0.0.1",
                       str(top.port(f"sim-{i}", 104))], env={**top.base_env(), "SPANNER_URL": api})
        assert cli.returncode == 0, cli.stdout + cli.stderr


def postgres_bin() -> str:
    """The newest PostgreSQL server's programs (Debian keeps them off PATH)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
    return str(found[-1]) if found else ""


def start_postgres(top: Topology, services: dict[str, Any]) -> None:
    """The postgres service: a server of the test's own in the namespace, with the compose file's user
    and database, healthy by its compose check, then migrated by spanner-migrate's command."""
    env = services["postgres"]["environment"]
    data = top.ray_tmp / "pg"
    data.mkdir()
    top.ray_tmp.chmod(0o755)
    shutil.chown(data, "postgres", "postgres")
    # setpriv execs the program as postgres (runuser would stay in between and keep the stop signal)
    as_postgres = [shutil.which("setpriv") or "/usr/bin/setpriv", "--reuid=postgres", "--regid=postgres",
                   "--init-groups", "--"]
    initdb = subprocess.run([*as_postgres, f"{postgres_bin()}/initdb", "-D", str(data),
                             "-U", env["POSTGRES_USER"], "--auth=trust"],
                            capture_output=True, text=True, timeout=120)
    assert initdb.returncode == 0, initdb.stderr
    port = top.port("postgres", 5432)
    top.start("postgres", [*as_postgres, f"{postgres_bin()}/postgres", "-D", str(data), "-p", str(port),
                           "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories="],
              top.base_env())
    # pg_isready reads where the server is from libpq's variables: the port moved, no socket
    top.envs["postgres"] = {**top.base_env(), **env, "PGHOST": "127.0.0.1", "PGPORT": str(port)}
    top.wait_healthy("postgres", services["postgres"])
    created = top.run(["createdb", "-h", "127.0.0.1", "-p", str(port), "-U", env["POSTGRES_USER"],
                       env["POSTGRES_DB"]])
    assert created.returncode == 0, created.stderr
    migrate = services["spanner-migrate"]
    done = top.run(command(migrate), service_env(top, "spanner-migrate", migrate), timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def dcmtk(tool: str) -> str:
    """dcmtk's tool, not pynetdicom's command of the same name in the virtualenv."""
    found = shutil.which(tool, path="/usr/bin:/bin")
    assert found is not None
    return found


def dashboard(top: Topology) -> str:
    return f"http://127.0.0.1:{top.port('spanner-coordinator', 8265)}"


def actors_url(top: Topology, class_name: str) -> str:
    """Ray's state API (on the dashboard): the actors of one class, with the Ray node each runs on."""
    return (f"{dashboard(top)}/api/v0/actors?filter_keys=class_name&filter_predicates=%3D"
            f"&filter_values={class_name}&limit=100")


def test_the_services_run_as_the_overlay_says(topology: tuple[Topology, dict[str, Any]]) -> None:
    top, services = topology
    for name in ("spanner-coordinator", "ray-worker-1", "ray-worker-2", "dimse-scp-listener"):
        assert top.processes[name].poll() is None, f"{name} ended:\n{top.log(name)}"
    nodes = top.get(f"{dashboard(top)}/api/v0/nodes")["data"]["result"]["result"]
    alive = [n for n in nodes if n["state"] == "ALIVE"]
    assert len(alive) == 3 and sum(n["is_head_node"] for n in alive) == 1
    assert {n["node_ip"] for n in alive} == {"127.0.0.1"}
    head = next(n for n in alive if n["is_head_node"])
    assert head["resources_total"].get("CPU", 0) == 0, "the head offers no CPU (SPANNER_RAY_ARGS)"
    proxies = [a for a in top.get(actors_url(top, "ProxyActor"))["data"]["result"]["result"]
               if a["state"] == "ALIVE"]
    assert [a["node_id"] for a in proxies] == [head["node_id"]], "Serve's HTTP proxy runs on the head only"
    worker_args = shlex.split(services["ray-worker"]["environment"]["SPANNER_RAY_ARGS"])
    expected_cpus = float(worker_args[0].removeprefix("--num-cpus="))
    assert all(n["resources_total"]["CPU"] == expected_cpus for n in alive if not n["is_head_node"])


def test_a_query_through_the_api_and_findscu_through_the_listener_agree(
        topology: tuple[Topology, dict[str, Any]]) -> None:
    top, _ = topology
    api = f"http://127.0.0.1:{top.port('spanner-coordinator', 8000)}"
    answer = top.post(f"{api}/api/v1/queries", {"level": "STUDY", "filters": {"PatientName": "*"},
                                                "return_keys": ["StudyInstanceUID"], "limit": 1000})
    assert answer["status"] == "success", answer
    assert {o["node"]: o["status"] for o in answer["nodes"]} == {f"sim-{i}": "ok" for i in range(ARCHIVES)}
    from_api = {m["dataset"]["0020000D"]["Value"][0] for m in answer["matches"]}
    assert answer["total"] == len(from_api) > 0

    out = top.tmp / "findscu"
    out.mkdir()
    scp_port = top.port("dimse-scp-listener", 11114)
    run = top.run([dcmtk("findscu"), "-S", "-aet", "DCMTK", "-aec", "SPANNER", "-X", "-od", str(out),
                   "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientName=*", "-k", "StudyInstanceUID",
                   "127.0.0.1", str(scp_port)], timeout=60)
    assert run.returncode == 0, run.stderr
    from_front = {str(dcmread(path).StudyInstanceUID) for path in out.glob("rsp*.dcm")}
    assert from_front == from_api


def test_node_actors_run_on_the_worker_nodes(topology: tuple[Topology, dict[str, Any]]) -> None:
    """Ray places the node actors over the cluster's nodes, the workers' included; each archive added
    beyond the first three (the same simulated PACS under another name) is one more placement, until one
    lands on a worker (nine all on the head would be a chance of one in 3**9)."""
    top, _ = topology
    api = f"http://127.0.0.1:{top.port('spanner-coordinator', 8000)}"
    nodes = top.get(f"{dashboard(top)}/api/v0/nodes")["data"]["result"]["result"]
    workers = {n["node_id"] for n in nodes if n["state"] == "ALIVE" and not n["is_head_node"]}
    url = actors_url(top, "PacsNode")
    extra = 0
    while True:
        actors = [a for a in top.get(url)["data"]["result"]["result"] if a["state"] == "ALIVE"]
        if {a["node_id"] for a in actors} & workers:
            break
        assert extra < 6, f"no node actor on a worker node: {[(a['name'], a['node_id']) for a in actors]}"
        extra += 1
        top.post(f"{api}/api/v1/nodes", {"name": f"extra-{extra}", "ae_title": "SIM0", "host": "127.0.0.1",
                                         "port": top.port("sim-0", 104)})
    assert len(actors) == ARCHIVES + extra
    echo = top.post(f"{api}/api/v1/nodes/sim-0/echo", {})
    assert echo["status"] == "ok", echo
