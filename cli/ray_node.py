"""A Ray node owned by this process: the head of `spanner run --head` or the node of `spanner worker`.

Each is a `ray start --block` child. Ending it ends every process below it, by PID (never `ray stop`,
which ends every Ray process of the machine, other people's included): a compose container, or a
test that runs several nodes on one host, stops exactly the node it started.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

RAY_CLI = (sys.executable, "-m", "ray.scripts.scripts")
"""Ray's command line from this interpreter, so that the node runs the same Ray as the caller."""

DEFAULT_HEAD_PORT = 6379


class RayNodeError(RuntimeError):
    """The Ray node did not start (its `ray start` ended, or its GCS port never answered)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)


@dataclass(frozen=True)
class RayNodeOptions:
    """What a compose service (or a person) says about its Ray node."""

    node_ip: str = ""
    """This node's address for Ray; empty: Ray picks the address of the default route."""
    extra_args: str = ""
    """More `ray start` options (shell words), e.g. "--num-cpus=2 --labels=site=east"."""

    def common_args(self) -> list[str]:
        args = ["--block", "--disable-usage-stats"]
        if self.node_ip:
            args.append(f"--node-ip-address={self.node_ip}")
        return args + shlex.split(self.extra_args)


def head_command(options: RayNodeOptions, port: int, dashboard_host: str, dashboard_port: int) -> list[str]:
    return [*RAY_CLI, "start", "--head", f"--port={port}", "--include-dashboard=true",
            f"--dashboard-host={dashboard_host}", f"--dashboard-port={dashboard_port}",
            *options.common_args()]


def worker_command(options: RayNodeOptions, address: str) -> list[str]:
    return [*RAY_CLI, "start", f"--address={address}", *options.common_args()]


def head_address(options: RayNodeOptions, port: int) -> str:
    """The GCS address drivers on this host join: the node's own address, so that Ray finds this node's
    raylet under the address it registered with."""
    if options.node_ip:
        return f"{options.node_ip}:{port}"
    import ray.util

    ip: str = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
    return f"{ip}:{port}"


@dataclass
class RayNode:
    """One `ray start --block` child and, once stopped, none of its processes."""

    command: list[str]
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> None:
        env = dict(os.environ)
        # Token authentication is Ray 2.60's default; the compose network is the cluster's boundary and
        # the dashboard is published for the operator, as with `spanner run` (RAY_AUTH_MODE overrides).
        env.setdefault("RAY_AUTH_MODE", "disabled")
        self.process = subprocess.Popen(self.command, env=env, stdin=subprocess.DEVNULL)

    def wait_listening(self, address: str, timeout_s: float = 120.0) -> None:
        """Wait until the head's GCS accepts connections; RayNodeError if `ray start` ends first."""
        assert self.process is not None
        host, _, port = address.rpartition(":")
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RayNodeError(f"`ray start` ended with code {self.process.returncode} before {address} "
                                   "answered (its output above says why)")
            with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=1):
                return
            if time.monotonic() > deadline:
                raise RayNodeError(f"the Ray head at {address} did not answer within {timeout_s:g} s")
            time.sleep(0.2)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait(self) -> int:
        assert self.process is not None
        return self.process.wait()

    def stop(self, grace_s: float = 35.0) -> None:
        """SIGTERM `ray start` (it drains the node, for up to 30 s by default, then ends the processes it
        started), and end whatever of its tree is left after ``grace_s``."""
        from cluster.ray_runtime import descendants, end_processes, identities  # imports Ray: only here

        if self.process is None:
            return
        tree = identities(descendants(self.process.pid))
        if self.process.poll() is None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(grace_s)
        end_processes(tree)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
