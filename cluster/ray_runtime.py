"""Starting or joining the Ray cluster: RAY_ADDRESS joins one; without it a local instance starts."""

from __future__ import annotations

import os

import ray

from spanner.settings import Settings

LOOPBACK_NODE = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
"""Without this a local Ray's processes still report the machine's interface address as their node IP
(``_node_ip_address`` reaches only the driver) and connect to one another over it: raylet to GCS, workers
to the object store. Ray's switch for single-machine platforms makes each of them use 127.0.0.1. Only for
a local instance: a node of a real cluster must use its own address."""


def stay_on_loopback() -> None:
    """Call before starting a local Ray: the processes it starts inherit the environment, and this
    process, which read the switch when it imported Ray, gets it set too."""
    os.environ.update(LOOPBACK_NODE)
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


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
        _node_ip_address="127.0.0.1",
    )
