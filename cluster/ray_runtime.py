"""Starting or joining the Ray cluster: RAY_ADDRESS joins one; without it a local instance starts."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import ray

from cluster.ray_internals import LOOPBACK_HOOK, local_init_options, stay_on_loopback
from spanner.settings import Settings


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` now (from /proc): Ray's raylet, GCS, agents and workers of a local
    instance are children and grandchildren of the process that started it."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # ended meanwhile
        fields = text[text.rfind(")") + 2:].split()
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: set[int] = set()
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def identities(pids: set[int]) -> dict[int, str]:
    """Each live process's start time (field 22 of /proc/PID/stat): with the PID it names one process,
    so a PID reused by another program after ours ended is never signalled."""
    found: dict[int, str] = {}
    for pid in pids:
        started = _start_time(pid)
        if started is not None:
            found[pid] = started
    return found


def _start_time(pid: int) -> str | None:
    """The start time of a live (not zombie) process, else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else fields[19]


def end_processes(processes: dict[int, str], grace_s: float = 2.0) -> int:
    """SIGTERM the processes of ``processes`` (from ``identities``) still alive, SIGKILL those alive
    ``grace_s`` later; returns how many had to be ended. Only processes this one started come here."""

    def alive(pid: int) -> bool:
        return _start_time(pid) == processes[pid]

    left = [pid for pid in processes if alive(pid)]
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while any(alive(pid) for pid in left) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in left:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return len(left)


def connect(settings: Settings, dashboard: bool = True) -> None:
    """Join the cluster at RAY_ADDRESS, or start a local one bound to loopback with its dashboard."""
    if ray.is_initialized():
        return
    # Token authentication is Ray 2.60's default; the local instance listens on loopback only and the
    # dashboard is for the operator at this machine, so it stays off unless RAY_AUTH_MODE says otherwise.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if settings.ray_address:
        ray.init(address=settings.ray_address, namespace=settings.namespace, log_to_driver=False)
        return
    stay_on_loopback()
    ray.init(
        address="local",
        namespace=settings.namespace,
        include_dashboard=dashboard,
        dashboard_host=settings.dashboard_host,
        dashboard_port=settings.dashboard_port,
        log_to_driver=False,
        runtime_env={"worker_process_setup_hook": LOOPBACK_HOOK},
        **local_init_options(),
    )
