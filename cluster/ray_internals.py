"""Every use of Ray's private API, in one place, checked against the pinned Ray version.

Ray keeps no promise about what it does not document: ``ray._private`` modules, ``ray.init``'s arguments
with a leading underscore and the environment switches below may change in any release. The project pins
Ray to one minor version (pyproject.toml); :func:`check` runs when this module is imported and refuses any
other version, and any version whose private names are not where this module expects them, so an upgrade
fails at start-up with a message naming this file instead of misbehaving later (a local instance that talks
over the machine's network interface, a benchmark that counts no process).

Upgrading Ray: re-check each function here against the new release, then move ``PINNED_RAY`` along with
the pin in pyproject.toml.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import ray

PINNED_RAY = "2.60"
"""The Ray minor version this module was checked against; pyproject.toml pins the same."""

LOOPBACK = "127.0.0.1"

LOOPBACK_NODE_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
"""Without this a local Ray's processes still report the machine's interface address as their node IP
(``_node_ip_address`` reaches only the driver) and connect to one another over it: raylet to GCS, workers
to the object store. Ray's switch for single-machine platforms makes each of them use 127.0.0.1. Only for
a local instance: a node of a real cluster must use its own address."""

FAST_NODE_DEATH_ENV = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}
"""Ray's internal config (any ``RAY_<name>`` of its config table, read by the GCS at start): the head
marks a Ray node dead after about 3 s of missed health checks instead of Ray's default of about 15 s
(period 3 s x 5 failures). Only then does Ray restart the node's actors elsewhere, so this bounds how
long a lost Ray node's PACS answer ``timeout``. Set it in the environment of ``ray start --head``."""

FAST_METRICS_ENV = {"RAY_metrics_report_interval_ms": "2000"}
"""How often each Ray worker hands its metrics to its node's metrics agent (Ray's default: 10 s); the
cluster test sets it so that a scrape sees a query's metrics seconds later."""

_PRIVATE_INIT_ARGS = ("_node_ip_address", "_temp_dir")


class RayInternalsChanged(RuntimeError):
    """The installed Ray is not the version whose private API this module was written against."""

    def __init__(self, message: str) -> None:
        super().__init__(message)


def check(version: str | None = None) -> None:
    """Raise :class:`RayInternalsChanged` unless Ray is the pinned version and its private names exist."""
    found = ray.__version__ if version is None else version
    if found != PINNED_RAY and not found.startswith(PINNED_RAY + "."):
        raise RayInternalsChanged(
            f"Ray {found} is installed; cluster/ray_internals.py uses Ray {PINNED_RAY}'s private API. "
            f"Re-check that module against Ray {found}, then update PINNED_RAY and the pin in pyproject.toml."
        )
    missing = _missing_private_names()
    if missing:
        raise RayInternalsChanged(
            f"Ray {found} lacks private names cluster/ray_internals.py relies on: {', '.join(missing)}"
        )


def _missing_private_names() -> list[str]:
    from ray._private import ray_constants, state, worker

    missing = []
    if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):
        missing.append("ray._private.ray_constants.ENABLE_RAY_CLUSTER")
    if not callable(getattr(state, "actors", None)):
        missing.append("ray._private.state.actors")
    if not hasattr(worker, "_global_node"):
        missing.append("ray._private.worker._global_node")
    from ray._common import tls_utils

    if not callable(getattr(tls_utils, "add_port_to_grpc_server", None)):
        missing.append("ray._common.tls_utils.add_port_to_grpc_server")
    # ray.init takes its private arguments through **kwargs and pops them by name.
    init_source = inspect.getsource(inspect.unwrap(ray.init))
    missing += [
        f"ray.init({name}=...)" for name in _PRIVATE_INIT_ARGS if f'kwargs.pop("{name}"' not in init_source
    ]
    return missing

LOOPBACK_HOOK = "cluster.ray_internals.keep_servers_on_loopback"


def keep_servers_on_loopback() -> None:
    """Worker setup hook of a local instance: gRPC servers that Ray binds on every interface (a Serve
    replica's inter-deployment server binds ``[::]:0``) bind 127.0.0.1 instead.

    It wraps ``ray._common.tls_utils.add_port_to_grpc_server``, which Serve's replica module imports by
    name when the worker loads it, after this hook has run; :func:`check` refuses a Ray without it."""
    from ray._common import tls_utils

    original = getattr(tls_utils, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "_spanner_loopback", False):
        return

    def on_loopback(server: Any, address: str) -> Any:
        host, _, port = address.rpartition(":")
        if host in ("[::]", "0.0.0.0", ""):
            address = f"127.0.0.1:{port}"
        return original(server, address)

    on_loopback._spanner_loopback = True  # type: ignore[attr-defined]
    tls_utils.add_port_to_grpc_server = on_loopback


def stay_on_loopback() -> None:
    """Call before starting a local Ray: the processes it starts inherit the environment, and this
    process, which read the switch when it imported Ray, gets it set too."""
    os.environ.update(LOOPBACK_NODE_ENV)
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def local_init_options(temp_dir: str | None = None) -> dict[str, Any]:
    """The private ``ray.init`` arguments of a local instance: the driver's node address on loopback (Ray
    would pick the machine's interface address) and, when given, where Ray keeps its session files."""
    options: dict[str, Any] = {"_node_ip_address": LOOPBACK}
    if temp_dir is not None:
        options["_temp_dir"] = temp_dir
    return options


def actor_table() -> dict[str, dict[str, Any]]:
    """Every actor Ray knows of, by ID: ``State``, ``Pid``, ``ActorClassName`` and more (the driver's view
    from the GCS; the public ``ray.util.state`` needs the dashboard, which benchmarks leave off)."""
    from ray._private import state

    table: dict[str, dict[str, Any]] = state.actors()
    return table


def ray_system_pids() -> list[int]:
    """The PIDs of the processes the local Ray instance started (raylet, GCS, dashboard agents...), or an
    empty list when this process started none."""
    from ray._private import worker

    node = getattr(worker, "_global_node", None)
    if node is None:
        return []
    return [int(info.process.pid) for infos in node.all_processes.values() for info in infos]


check()
