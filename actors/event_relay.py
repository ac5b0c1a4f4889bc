"""The one event relay of a deployment: a named, detached Ray actor that drains the outbox to RabbitMQ.

One per namespace, whatever the number of ingress replicas, so events leave in one order. Replicas
nudge it after each record (a fire-and-forget call) so events go out within milliseconds; it also
looks by itself every ``poll_s``. Ray restarts it when it dies; the outbox loses nothing meanwhile.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import ray

from spanner.logs import configure_logging

ACTOR_NAME = "events:relay"
RelayHandle = Any


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """Everything the relay needs, as plain values (it runs in its own process, maybe on another host)."""

    database_url: str = field(repr=False)  # both may hold a password
    rabbitmq_url: str = field(repr=False)
    exchange: str = "spanner.events"
    poll_s: float = 1.0
    gap_wait_s: float = 2.0
    retry_s: float = 2.0
    timeout_s: float = 5.0
    retention_hours: float = 24.0
    log_format: str = "json"
    log_level: str = "INFO"


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0, max_concurrency=4)  # type: ignore[call-overload]
class EventRelay:
    def __init__(self, config: RelayConfig) -> None:
        from spanner.amqp import EventPublisher, redact
        from spanner.relay import OutboxRelay
        from spanner.storage import Repository, make_engine

        configure_logging("events", config)
        self._config = config
        publisher = EventPublisher(config.rabbitmq_url, config.exchange, config.timeout_s)
        self._relay = OutboxRelay(
            Repository(make_engine(config.database_url)), publisher, broker=redact(config.rabbitmq_url),
            poll_s=config.poll_s, gap_wait_s=config.gap_wait_s, retry_s=config.retry_s,
            retention_hours=config.retention_hours,
        )
        self._thread = threading.Thread(target=self._relay.run, name="event-relay", daemon=True)
        self._thread.start()

    def config(self) -> RelayConfig:
        return self._config

    def nudge(self) -> None:
        """Something was just written to the outbox: look now rather than at the next poll."""
        self._relay.wake.set()

    def status(self) -> dict[str, Any]:
        return {"connected": self._relay.connected, "published": self._relay.published,
                "running": self._thread.is_alive()}

    def close(self) -> None:
        self._relay.stopping.set()
        self._relay.wake.set()
        self._thread.join(timeout=10)


def lookup(namespace: str) -> RelayHandle | None:
    try:
        return ray.get_actor(ACTOR_NAME, namespace=namespace)
    except ValueError:
        return None


def ensure(config: RelayConfig, namespace: str) -> RelayHandle:
    """The relay for ``config``: the running one when its config is current, else a new one."""
    handle = lookup(namespace)
    if handle is not None:
        try:
            current = ray.get(handle.config.remote(), timeout=30)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            current = None
        if current == config:
            return handle
        stop(namespace)
    deadline = time.monotonic() + 10
    while True:
        try:
            handle = EventRelay.options(  # type: ignore[attr-defined]
                name=ACTOR_NAME, namespace=namespace, lifetime="detached", get_if_exists=True
            ).remote(config)
            break
        except ValueError:  # the name is still held by the relay just killed
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    ray.get(handle.config.remote(), timeout=60)
    return handle


def stop(namespace: str) -> bool:
    from actors.registry import end_actor

    handle = lookup(namespace)
    if handle is None:
        return False
    end_actor(handle, lambda: lookup(namespace) is None, close_timeout_s=15)
    return True
