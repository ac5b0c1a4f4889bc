"""Starting or joining the Ray cluster: RAY_ADDRESS joins one; without it a local instance starts."""

from __future__ import annotations

import os

import ray

from cluster.ray_internals import local_init_options, stay_on_loopback
from spanner.settings import Settings


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
        **local_init_options(),
    )
