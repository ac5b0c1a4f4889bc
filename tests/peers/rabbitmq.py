"""RabbitMQ peers: an isolated vhost on the machine's broker, and a broker of the test's own that it can stop.

The machine's broker (127.0.0.1:5672) is shared; every test session gets a vhost of its own, deleted at
the end. A test that must take the broker away starts its own ``rabbitmq-server`` on free loopback
ports, with its own node name and data folder, and stops it by the PID the broker wrote.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.parse
import uuid
from pathlib import Path

import pika

from tests.peers.ports import LOOPBACK, free_port, port_accepts

MACHINE_PORT = 5672


def rabbitmqctl(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=timeout_s,
                          check=True)


def machine_broker_available() -> bool:
    return shutil.which("rabbitmqctl") is not None and port_accepts(MACHINE_PORT)


def url_for(vhost: str, port: int = MACHINE_PORT) -> str:
    return f"amqp://guest:guest@{LOOPBACK}:{port}/{urllib.parse.quote(vhost, safe='')}"


class Vhost:
    """A vhost of this test session on the machine's broker, for guest."""

    def __init__(self) -> None:
        self.name = f"spanner-test-{uuid.uuid4().hex[:10]}"
        self.url = url_for(self.name)

    def create(self) -> Vhost:
        rabbitmqctl("add_vhost", self.name)
        rabbitmqctl("set_permissions", "-p", self.name, "guest", ".*", ".*", ".*")
        return self

    def delete(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError):
            rabbitmqctl("delete_vhost", self.name)


class OwnedBroker:
    """A rabbitmq-server of this test on free loopback ports; stop() and start() keep its data folder,
    so durable queues and persistent messages survive a restart, as on a real broker. The folder is
    made directly under the temp root: the broker runs as the rabbitmq user, which cannot enter
    pytest's root-only folders."""

    def __init__(self) -> None:
        workdir = Path(tempfile.mkdtemp(prefix="spanner-rabbitmq-"))
        self.workdir = workdir
        self.port = free_port()
        self.dist_port = free_port()
        self.node = f"sptest{uuid.uuid4().hex[:8]}@localhost"
        self.pid: int | None = None
        self._wrapper: subprocess.Popen[bytes] | None = None
        (workdir / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = {LOOPBACK}:{self.port}\nloopback_users = none\n"
        )
        (workdir / "enabled_plugins").write_text("[].\n")
        if os.geteuid() == 0:  # the Debian wrapper runs the broker as the rabbitmq user
            shutil.chown(workdir, "rabbitmq", "rabbitmq")
            for child in workdir.iterdir():
                shutil.chown(child, "rabbitmq", "rabbitmq")

    @property
    def url(self) -> str:
        return url_for("/", self.port)

    def start(self, deadline_s: float = 60.0) -> OwnedBroker:
        env = dict(os.environ) | {
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": LOOPBACK,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(self.workdir / "rabbitmq"),
            "RABBITMQ_MNESIA_BASE": str(self.workdir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.workdir / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.workdir / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.workdir / "broker.pid"),
            "ERL_EPMD_ADDRESS": LOOPBACK,
        }
        pid_file = self.workdir / "broker.pid"
        pid_file.unlink(missing_ok=True)
        log = (self.workdir / "server.out").open("ab")
        self._wrapper = subprocess.Popen(["rabbitmq-server"], env=env, stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL)
        end = time.monotonic() + deadline_s
        while not port_accepts(self.port):
            if self._wrapper.poll() is not None or time.monotonic() > end:
                self.stop()
                raise RuntimeError(f"rabbitmq-server did not start: {self.log_tail()}")
            time.sleep(0.1)
        self.pid = int(pid_file.read_text().strip())
        self._wait_amqp(deadline_s)
        return self

    def log_tail(self, lines: int = 15) -> str:
        out = self.workdir / "server.out"
        return "\n".join(out.read_text(errors="replace").splitlines()[-lines:]) if out.exists() else ""

    def remove(self) -> None:
        """Stop it and delete its data folder."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _wait_amqp(self, deadline_s: float) -> None:
        """The port opens a moment before the broker takes logins."""
        end = time.monotonic() + deadline_s
        while True:
            try:
                pika.BlockingConnection(pika.URLParameters(self.url)).close()
                return
            except pika.exceptions.AMQPError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.1)

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            end = time.monotonic() + timeout_s
            while _alive(self.pid) and time.monotonic() < end:
                time.sleep(0.05)
            if _alive(self.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
            self.pid = None
        if self._wrapper is not None:
            try:
                self._wrapper.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._wrapper.kill()
                self._wrapper.wait()
            self._wrapper = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent shell) counts as gone.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
            return False
    return True
