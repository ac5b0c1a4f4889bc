"""RabbitMQ plumbing shared by the event relay and the request consumer (pika, blocking connections).

Each side declares the topology it relies on, idempotently: the events' topic exchange, and the
requests queue (a quorum queue, so the broker itself counts deliveries and dead-letters a request
that keeps coming back) with its dead-letter exchange and queue. pika's errors are translated into
BrokerUnavailable here, so callers never import pika's exception tree.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from spanner.errors import BrokerUnavailable

CONTENT_TYPE = "application/json"
APP_ID = "dicom-spanner"
ERROR_HEADER = "x-spanner-error"
STATUS_HEADER = "x-spanner-status"
PIKA_ERRORS: tuple[type[BaseException], ...] = (pika.exceptions.AMQPError, OSError)


def redact(url: str) -> str:
    """The URL without its password, for logs and errors."""
    params = pika.URLParameters(url)
    vhost = urllib.parse.quote(params.virtual_host, safe="")
    return f"amqp://{params.credentials.username}@{params.host}:{params.port}/{vhost}"


def connect(url: str, timeout_s: float) -> pika.BlockingConnection:
    """A blocking connection that fails within ``timeout_s`` (one attempt; callers retry)."""
    params = pika.URLParameters(url)
    params.socket_timeout = timeout_s
    params.stack_timeout = timeout_s * 2
    params.blocked_connection_timeout = timeout_s * 6  # a broker out of memory or disk blocks publishers
    params.connection_attempts = 1
    params.heartbeat = 30
    params.client_properties = {"connection_name": APP_ID}
    try:
        return pika.BlockingConnection(params)
    except PIKA_ERRORS as exc:
        raise BrokerUnavailable(f"RabbitMQ at {redact(url)} cannot be reached: {describe(exc)}") from exc


def describe(exc: BaseException) -> str:
    text = str(exc).strip() or repr(exc)
    return f"{type(exc).__name__}: {text}" if type(exc).__name__ not in text else text


@dataclass(frozen=True, slots=True)
class RequestTopology:
    """The names around one requests queue."""

    queue: str

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.queue}.dlx"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.queue}.dead"

    def declare(self, channel: BlockingChannel, delivery_limit: int) -> None:
        channel.exchange_declare(self.dead_letter_exchange, exchange_type="fanout", durable=True)
        channel.queue_declare(self.dead_letter_queue, durable=True)
        channel.queue_bind(self.dead_letter_queue, self.dead_letter_exchange)
        channel.queue_declare(self.queue, durable=True, arguments={
            "x-queue-type": "quorum",
            "x-delivery-limit": delivery_limit,
            "x-dead-letter-exchange": self.dead_letter_exchange,
        })


def declare_events(channel: BlockingChannel, exchange: str) -> None:
    channel.exchange_declare(exchange, exchange_type="topic", durable=True)


def json_properties(
    *, message_id: str | None = None, type_: str | None = None, correlation_id: str | None = None,
    headers: Mapping[str, Any] | None = None, persistent: bool = True,
) -> pika.BasicProperties:
    return pika.BasicProperties(
        content_type=CONTENT_TYPE, content_encoding="utf-8", delivery_mode=2 if persistent else 1,
        message_id=message_id, type=type_, correlation_id=correlation_id, app_id=APP_ID,
        timestamp=int(time.time()), headers=dict(headers) if headers else None,
    )


def dumps(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


class EventPublisher:
    """Publishes events to the topic exchange with publisher confirms: ``publish`` returns only once
    the broker has the message (persistent), and raises BrokerUnavailable otherwise."""

    def __init__(self, url: str, exchange: str, timeout_s: float) -> None:
        self.url = url
        self.exchange = exchange
        self.timeout_s = timeout_s
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None

    @property
    def is_open(self) -> bool:
        return self._connection is not None and self._connection.is_open

    def ensure_open(self) -> None:
        if self.is_open:
            return
        self.close()
        connection = connect(self.url, self.timeout_s)
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            declare_events(channel, self.exchange)
        except PIKA_ERRORS as exc:
            _close_quietly(connection)
            raise BrokerUnavailable(f"RabbitMQ at {redact(self.url)}: {describe(exc)}") from exc
        self._connection, self._channel = connection, channel

    def publish(self, routing_key: str, event_id: str, body: Mapping[str, Any]) -> None:
        self.ensure_open()
        assert self._channel is not None
        try:
            self._channel.basic_publish(self.exchange, routing_key, dumps(body),
                                        properties=json_properties(message_id=event_id, type_=routing_key))
        except PIKA_ERRORS as exc:
            self.close()
            raise BrokerUnavailable(f"publishing to {self.exchange!r} at {redact(self.url)} failed: "
                                    f"{describe(exc)}") from exc

    def pump(self) -> None:
        """Let pika answer heartbeats while the relay is idle."""
        if self._connection is None:
            return
        try:
            self._connection.process_data_events(time_limit=0)
        except PIKA_ERRORS:
            self.close()

    def close(self) -> None:
        if self._connection is not None:
            _close_quietly(self._connection)
        self._connection = self._channel = None


def _close_quietly(connection: pika.BlockingConnection) -> None:
    try:
        if connection.is_open:
            connection.close()
    except PIKA_ERRORS:
        pass
