"""AMQP requests: spanning queries from the existing stack over RabbitMQ, answered to ``reply_to`` (RPC).

Each ingress replica runs one consumer thread with one blocking pika connection; replicas share the
queue. A request runs on the replica's event loop exactly like POST /api/v1/queries; its answer is
published from the pika thread (pika is not thread-safe, so everything touching the channel happens
there, handed over with ``add_callback_threadsafe``). At most ``amqp_prefetch`` requests run at once
per replica.

What goes where:
- who asks: the API key in the ``x-api-key`` message header, checked like an HTTP request's key; the
  audit names that key (the broker's ``user_id`` goes in as the client, ``app_id`` only in the
  requester text). With authentication on, a request without a valid key gets a 401 error reply and
  goes to the dead-letter queue with the reason. The key never travels on: it is removed from the
  headers of a dead-lettered message;
- answered (200, or 502 when the query failed under its strategy): reply, ack;
- malformed (not JSON, not a query, no ``reply_to``, a value the API would answer 4xx): error reply
  when there is a ``reply_to``, and the message goes to the dead-letter queue with the reason;
- the spanner could not answer now (database down, an unexpected error): requeued; the queue's
  delivery limit makes the broker dead-letter it after ``amqp_delivery_limit`` returns, and the last
  delivery gets an error reply, so nothing loops forever and no caller waits forever.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic
from pydantic import ValidationError

from serve_app.api_models import QueryIn
from serve_app.auth import principal_of
from serve_app.errors import describe_problems, status_for
from serve_app.services import Services
from serve_app.usecases import query
from spanner.amqp import (
    CONTENT_TYPE,
    ERROR_HEADER,
    PIKA_ERRORS,
    STATUS_HEADER,
    RequestTopology,
    connect,
    describe,
    dumps,
    json_properties,
    redact,
)
from spanner.errors import BrokerUnavailable, SpannerError
from spanner.schemas import Channel
from spanner.settings import Settings
from spanner.storage import Audit

log = logging.getLogger("spanner.amqp")

DELIVERY_COUNT_HEADER = "x-delivery-count"
API_KEY_HEADER = "x-api-key"
RECONNECT_ON: tuple[type[BaseException], ...] = (BrokerUnavailable, *PIKA_ERRORS)


@dataclass(frozen=True, slots=True)
class AmqpRequest:
    query: QueryIn
    reply_to: str
    correlation_id: str | None
    app_id: str | None
    user_id: str | None
    no_cache: bool
    api_key: str | None = dataclasses.field(default=None, repr=False)


async def answer(s: Services, request: AmqpRequest) -> tuple[dict[str, Any], int]:
    """Run one AMQP request as its key's principal; an absent or unknown key raises Unauthenticated
    (401) when authentication is on, which the consumer answers and dead-letters."""
    principal = await principal_of(s, request.api_key)
    audit = Audit(principal=principal.name, channel=Channel.AMQP, client=request.user_id)
    requester = f"amqp:{principal.name}" + (f" ({request.app_id})" if request.app_id else "")
    answer = await query.run_query(s, request.query, audit, requester, read_cache=not request.no_cache)
    await s.records.submit(answer.record)
    return answer.body, answer.status


class Malformed(Exception):
    """A request that can never be answered as sent; ``status`` is the HTTP status it would get."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason, status)
        self.reason = reason
        self.status = status


def parse(body: bytes, props: pika.BasicProperties) -> AmqpRequest:
    if not props.reply_to:
        raise Malformed("reply_to is required: it names the queue the answer goes to")
    if props.content_type and props.content_type.split(";")[0].strip() != CONTENT_TYPE:
        raise Malformed(f"content_type {props.content_type!r} is not {CONTENT_TYPE}", 415)
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Malformed(f"the body is not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise Malformed("the body must be a JSON object: a spanning query as POST /api/v1/queries takes")
    try:
        query = QueryIn.model_validate(doc)
    except ValidationError as exc:
        raise Malformed(describe_problems(exc.errors()), 422) from None
    headers = props.headers or {}
    cache_control = str(headers.get("cache-control", "")).lower()
    raw_key = headers.get(API_KEY_HEADER)
    api_key = (raw_key.decode(errors="replace") if isinstance(raw_key, bytes) else str(raw_key or "")).strip()
    return AmqpRequest(query, props.reply_to, props.correlation_id, props.app_id, props.user_id,
                       no_cache="no-cache" in cache_control, api_key=api_key or None)


Handler = Callable[[AmqpRequest], Coroutine[Any, Any, tuple[dict[str, Any], int]]]


class RequestConsumer:
    def __init__(self, settings: Settings, loop: asyncio.AbstractEventLoop, handler: Handler) -> None:
        self._url = settings.rabbitmq_url
        self._topology = RequestTopology(settings.requests_queue)
        self._prefetch = settings.amqp_prefetch
        self._delivery_limit = settings.amqp_delivery_limit
        self._timeout_s = settings.amqp_timeout_s
        self._retry_s = settings.amqp_retry_s
        self._loop = loop
        self._handler = handler
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="amqp-requests", daemon=True)
        self._outage = False
        self.consuming = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop taking requests; unacknowledged ones go back to the queue for another replica."""
        self._stopping.set()
        self._thread.join(timeout_s)

    # -- the pika thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._consume()
            except RECONNECT_ON as exc:
                self.consuming.clear()
                if not self._outage:
                    self._outage = True
                    log.warning("AMQP requests: RabbitMQ at %s unavailable (%s); retrying every %g s",
                                redact(self._url), describe(exc), self._retry_s,
                                extra={"event": "amqp.broker_down"})
                self._stopping.wait(self._retry_s)
            except Exception:  # a bug must not end the consumer: unacked requests go back to the queue
                self.consuming.clear()
                log.exception("AMQP requests: consumer failed; reconnecting", extra={"event": "amqp.error"})
                self._stopping.wait(self._retry_s)

    def _consume(self) -> None:
        connection = connect(self._url, self._timeout_s)
        try:
            channel = connection.channel()
            self._topology.declare(channel, self._delivery_limit)
            channel.confirm_delivery()  # a dead-lettered request is acked only once the broker has it
            channel.basic_qos(prefetch_count=self._prefetch)
            on_message = functools.partial(self._on_message, connection)
            channel.basic_consume(self._topology.queue, on_message_callback=on_message)
            if self._outage:
                log.info("AMQP requests: RabbitMQ at %s is back", redact(self._url),
                         extra={"event": "amqp.broker_up"})
                self._outage = False
            self.consuming.set()
            while not self._stopping.is_set():
                connection.process_data_events(time_limit=0.25)
        finally:
            self.consuming.clear()
            try:
                if connection.is_open:
                    connection.close()
            except PIKA_ERRORS:
                pass

    def _on_message(self, connection: pika.BlockingConnection, channel: BlockingChannel,
                    method: Basic.Deliver, props: pika.BasicProperties, body: bytes) -> None:
        try:
            request = parse(body, props)
        except Malformed as bad:
            self._error_reply(channel, props, bad.reason, bad.status)
            self._dead_letter(channel, method, props, body, bad.reason, bad.status)
            return
        started = time.monotonic()
        future = asyncio.run_coroutine_threadsafe(self._handler(request), self._loop)
        done = functools.partial(self._finish, channel, method, props, body, request, started)
        future.add_done_callback(lambda f: connection.add_callback_threadsafe(functools.partial(done, f)))

    def _finish(self, channel: BlockingChannel, method: Basic.Deliver, props: pika.BasicProperties,
                body: bytes, request: AmqpRequest, started: float,
                future: concurrent.futures.Future[tuple[dict[str, Any], int]]) -> None:
        if not channel.is_open:
            return  # the broker requeued it with the channel; another delivery will answer it
        exc = future.exception()
        if exc is None:
            answer, status = future.result()
            self._reply(channel, request.reply_to, request.correlation_id, answer, status)
            channel.basic_ack(method.delivery_tag)
            return
        status = status_for(exc) if isinstance(exc, SpannerError) else 500
        reason = exc.message if isinstance(exc, SpannerError) else f"internal error: {describe(exc)}"
        if 400 <= status < 500:
            self._reply(channel, request.reply_to, request.correlation_id, {"detail": reason}, status)
            self._dead_letter(channel, method, props, body, reason, status)
            return
        returns = int((props.headers or {}).get(DELIVERY_COUNT_HEADER, 0) or 0)
        log.warning("AMQP request failed after %.0f ms (%s, delivery %d of %d)",
                    (time.monotonic() - started) * 1000, type(exc).__name__, returns + 1,
                    self._delivery_limit + 1, extra={"event": "amqp.request_failed"})
        log.debug("AMQP request failed: %s", reason)
        if returns >= self._delivery_limit:  # the broker dead-letters it now: tell the caller
            self._reply(channel, request.reply_to, request.correlation_id,
                        {"detail": f"{reason}; given up after {returns + 1} deliveries"}, status)
        channel.basic_nack(method.delivery_tag, requeue=True)

    def _reply(self, channel: BlockingChannel, reply_to: str, correlation_id: str | None,
               answer: dict[str, Any], status: int) -> None:
        props = json_properties(correlation_id=correlation_id, headers={STATUS_HEADER: status},
                                persistent=False)
        channel.basic_publish("", reply_to, dumps(answer), properties=props)

    def _error_reply(self, channel: BlockingChannel, props: pika.BasicProperties, reason: str,
                     status: int) -> None:
        if props.reply_to:
            self._reply(channel, props.reply_to, props.correlation_id, {"detail": reason}, status)

    def _dead_letter(self, channel: BlockingChannel, method: Basic.Deliver, props: pika.BasicProperties,
                     body: bytes, reason: str, status: int) -> None:
        """The message, unchanged, with the reason in its headers, on the dead-letter queue; then acked."""
        headers = {k: v for k, v in (props.headers or {}).items() if k.lower() != API_KEY_HEADER}
        headers |= {ERROR_HEADER: reason[:4000], STATUS_HEADER: status,
                    "x-original-queue": self._topology.queue}
        kept = pika.BasicProperties(
            content_type=props.content_type, content_encoding=props.content_encoding, headers=headers,
            delivery_mode=2, correlation_id=props.correlation_id, reply_to=props.reply_to,
            message_id=props.message_id, timestamp=props.timestamp, type=props.type, app_id=props.app_id,
        )
        channel.basic_publish(self._topology.dead_letter_exchange, self._topology.queue, body,
                              properties=kept)
        channel.basic_ack(method.delivery_tag)
        # The reason may quote a filter value (patient data): only DEBUG carries it.
        log.warning("AMQP request dead-lettered (status %d; the reason is in its %s header)", status,
                    ERROR_HEADER, extra={"event": "amqp.dead_lettered", "status": status})
        log.debug("AMQP request dead-lettered: %s", reason)
