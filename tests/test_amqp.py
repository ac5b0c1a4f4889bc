"""RabbitMQ through the whole stack: a Serve app (under /amqp) with RABBITMQ_URL on this session's vhost.
Events of HTTP and AMQP queries, AMQP request and reply, dead-lettering with the reason, and a request
the spanner cannot answer being retried until the broker dead-letters it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika
import pytest

from serve_app.amqp_requests import AmqpRequest, RequestConsumer
from simulator.dataset import generate_fleet
from simulator.scp import SimulatedPacs, SimulatorConfig
from spanner.errors import StorageError
from spanner.keys import new_key
from spanner.settings import load_settings
from spanner.storage import Repository, make_engine
from tests.conftest import Api, migrate
from tests.test_events import Listener

QUEUE = "spanner.requests"
DEAD = "spanner.requests.dead"


@pytest.fixture(scope="module")
def pacs() -> Iterator[SimulatedPacs]:
    sim = SimulatedPacs(SimulatorConfig(ae_title="AMQPPACS"), generate_fleet(6, 1, 4)[0])
    sim.start()
    yield sim
    sim.stop()


KEYS: dict[str, str] = {}
"""The amqp app's API keys by name (authentication is on there): ``boss`` (admin, the HTTP client),
``celery`` (query, the AMQP caller), ``gone`` (revoked)."""


@pytest.fixture(scope="module")
def amqp_api(api: Api, ray_session: str, rabbitmq_url: str, pacs: SimulatedPacs,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    from ray import serve

    from serve_app.app import AppArgs, build_app

    var_dir = tmp_path_factory.mktemp("amqp")
    url = f"sqlite:///{var_dir}/spanner.db"
    migrate(url)
    repo = Repository(make_engine(url))
    for name, role in (("boss", "admin"), ("celery", "query"), ("gone", "query")):
        key, prefix, key_hash = new_key()
        repo.create_api_key(name, role, prefix, key_hash)
        KEYS[name] = key
    repo.revoke_api_key("gone")
    repo.engine.dispose()
    namespace = f"{ray_session}-amqp"
    settings = dict(api.settings) | {"namespace": namespace, "var_dir": str(var_dir), "database_url": url,
                                     "rabbitmq_url": rabbitmq_url, "events_poll_s": 5.0,
                                     "auth_enabled": True}
    listener = Listener(rabbitmq_url, "spanner.events")  # the exchange exists before the app
    listener.close()
    serve.run(build_app(AppArgs(settings=settings)), name="spanner-amqp", route_prefix="/amqp")
    client = Api(f"{api.base_url}/amqp", namespace, settings)
    client.http.headers["Authorization"] = f"Bearer {KEYS['boss']}"
    yield client
    client.http.close()
    serve.delete("spanner-amqp")


@dataclass
class Rpc:
    """A caller on the broker: an exclusive reply queue, requests to spanner.requests."""

    url: str
    api_key: str | None = None

    def __post_init__(self) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(self.url))
        self.channel = self.connection.channel()
        self.reply_to = self.channel.queue_declare("", exclusive=True).method.queue

    def send(self, body: bytes | dict[str, Any], *, queue: str = QUEUE, reply: bool = True,
             app_id: str = "celery-worker", content_type: str = "application/json",
             headers: dict[str, Any] | None = None) -> str:
        correlation_id = uuid.uuid4().hex
        raw = json.dumps(body).encode() if isinstance(body, dict) else body
        sent = ({"x-api-key": self.api_key} if self.api_key else {}) | (headers or {})
        props = pika.BasicProperties(content_type=content_type, correlation_id=correlation_id,
                                     reply_to=self.reply_to if reply else None, app_id=app_id,
                                     delivery_mode=2, headers=sent)
        self.channel.basic_publish("", queue, raw, properties=props)
        return correlation_id

    def reply(self, correlation_id: str, timeout_s: float = 30.0) -> tuple[int, dict[str, Any]]:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            method, props, body = self.channel.basic_get(self.reply_to, auto_ack=True)
            if method is None:
                self.connection.sleep(0.02)
                continue
            if props.correlation_id == correlation_id:
                return int(props.headers["x-spanner-status"]), json.loads(body)
        raise AssertionError(f"no reply to {correlation_id} within {timeout_s} s")

    def dead(self, correlation_id: str, queue: str = DEAD, timeout_s: float = 15.0) -> pika.BasicProperties:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            method, props, _ = self.channel.basic_get(queue, auto_ack=True)
            if method is None:
                self.connection.sleep(0.05)
                continue
            if props.correlation_id == correlation_id:
                return props
        raise AssertionError(f"{correlation_id} did not reach {queue} within {timeout_s} s")

    def depth(self, queue: str) -> int:
        return int(self.channel.queue_declare(queue, passive=True).method.message_count)

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()


@pytest.fixture
def rpc(rabbitmq_url: str, amqp_api: Api) -> Iterator[Rpc]:
    caller = Rpc(rabbitmq_url, KEYS["celery"])
    yield caller
    caller.close()


QUERY = {"level": "STUDY", "filters": {"PatientID": "*", "StudyDate": "19000101-"}, "limit": 5}


def test_an_http_query_is_told_as_query_completed_and_its_node_as_up(
        amqp_api: Api, pacs: SimulatedPacs, rabbitmq_url: str) -> None:
    listener = Listener(rabbitmq_url, "spanner.events")
    try:
        amqp_api.add_node("amqp-sim", pacs.port, ae_title="AMQPPACS")
        sent = time.monotonic()
        status, answer = amqp_api.query(**QUERY)
        assert status == 200 and answer["status"] == "success", answer
        got = listener.take(2, timeout_s=10)
        arrived_s = time.monotonic() - sent
    finally:
        listener.close()
    by_key = {key: body for key, _, body in got}
    assert by_key["query.completed"]["data"]["query_id"] == answer["query_id"]
    assert by_key["query.completed"]["data"]["channel"] == "http"
    assert by_key["node.health"]["data"] | {"error": None} == {
        "node": "amqp-sim", "health": "up", "previous": None, "outcome": "ok", "error": None}
    assert arrived_s < 4.0  # nudged: well before the 5 s poll of this app's relay


def test_a_request_over_amqp_is_answered_to_reply_to_and_audited(amqp_api: Api, rpc: Rpc,
                                                                 rabbitmq_url: str) -> None:
    _, over_http = amqp_api.query(**QUERY)
    listener = Listener(rabbitmq_url, "spanner.events")
    try:
        correlation_id = rpc.send(QUERY)
        status, answer = rpc.reply(correlation_id)
        events = listener.take(1, timeout_s=10)
        if events[0][2]["data"]["query_id"] == over_http["query_id"]:  # recorded after its answer had gone
            events = listener.take(1, timeout_s=10)
    finally:
        listener.close()
    assert status == 200, answer
    assert answer["status"] == "success" and answer["total"] == over_http["total"] > 0
    assert [m["dataset"] for m in answer["matches"]] == [m["dataset"] for m in over_http["matches"]]
    record = amqp_api.http.get(f"/api/v1/queries/{answer['query_id']}").json()
    assert (record["principal"], record["channel"], record["client"], record["requester"]) == (
        "celery", "amqp", None, "amqp:celery (celery-worker)")
    audit = amqp_api.http.get("/api/v1/audit", params={"requester": "celery"}).json()
    assert answer["query_id"] in {entry["id"] for entry in audit}
    assert events[0][2]["data"]["query_id"] == answer["query_id"]
    assert events[0][2]["data"]["channel"] == "amqp"


@pytest.mark.parametrize(("key", "reason"), [
    (None, "API key is required"),
    ("spk_forged", "unknown or revoked"),
    ("gone", "unknown or revoked"),
])
def test_a_request_without_a_valid_key_is_refused_and_dead_lettered(
        amqp_api: Api, rpc: Rpc, key: str | None, reason: str) -> None:
    """With authentication on, no patient data goes to a publisher without a valid key; the dead-letter
    copy keeps the reason but not the key."""
    sent = {"x-api-key": KEYS.get(key, key)} if key else {"x-api-key": ""}
    correlation_id = rpc.send(QUERY, headers=sent, app_id="mallory")
    status, detail = rpc.reply(correlation_id)
    assert status == 401 and reason in detail["detail"] and "matches" not in detail
    dead = rpc.dead(correlation_id)
    assert reason in dead.headers["x-spanner-error"] and dead.headers["x-spanner-status"] == 401
    assert "x-api-key" not in dead.headers
    audit = amqp_api.http.get("/api/v1/audit", params={"kind": "query"}).json()
    assert not any("mallory" in str(entry) for entry in audit)


def test_requests_use_the_query_cache_unless_told_no_cache(amqp_api: Api, rpc: Rpc) -> None:
    first = rpc.reply(rpc.send(QUERY))[1]
    cached = rpc.reply(rpc.send(QUERY))[1]
    assert cached["cache"] == "hit" and cached["total"] == first["total"]
    correlation_id = uuid.uuid4().hex
    rpc.channel.basic_publish("", QUEUE, json.dumps(QUERY).encode(), properties=pika.BasicProperties(
        content_type="application/json", correlation_id=correlation_id, reply_to=rpc.reply_to,
        headers={"cache-control": "no-cache", "x-api-key": KEYS["celery"]}))
    assert rpc.reply(correlation_id)[1]["cache"] == "miss"


@pytest.mark.parametrize(("body", "reply", "status", "reason"), [
    (b"{not json", True, 400, "not valid JSON"),
    (b"[1, 2]", True, 400, "must be a JSON object"),
    (json.dumps({"level": "STUDY", "filters": {"NoSuchKeyword": "x"}}).encode(), True, 422, "NoSuchKeyword"),
    (json.dumps({"level": "WARD"}).encode(), True, 422, "level"),
    (json.dumps({"level": "STUDY", "span": "nowhere"}).encode(), True, 404, "nowhere"),
    (json.dumps(QUERY).encode(), False, 400, "reply_to is required"),
])
def test_malformed_requests_are_dead_lettered_with_the_reason(
        amqp_api: Api, rpc: Rpc, body: bytes, reply: bool, status: int, reason: str) -> None:
    correlation_id = rpc.send(body, reply=reply)
    if reply:
        got_status, detail = rpc.reply(correlation_id)
        assert got_status == status and reason in detail["detail"], detail
    dead = rpc.dead(correlation_id)
    assert reason in dead.headers["x-spanner-error"] and dead.headers["x-spanner-status"] == status
    assert dead.headers["x-original-queue"] == QUEUE and dead.app_id == "celery-worker"
    assert rpc.depth(QUEUE) == 0  # nothing requeued
    ok_status, ok = rpc.reply(rpc.send(QUERY))  # and the consumer keeps serving
    assert ok_status == 200 and ok["status"] == "success"


def test_wrong_content_type_is_refused(amqp_api: Api, rpc: Rpc) -> None:
    correlation_id = rpc.send(b"<query/>", content_type="application/xml")
    assert rpc.reply(correlation_id)[0] == 415
    assert "application/xml" in rpc.dead(correlation_id).headers["x-spanner-error"]


@contextlib.contextmanager
def consumer_of(
    queue: str, handler: Any, rabbitmq_url: str, tmp_path: Path, **settings: Any
) -> Iterator[Rpc]:
    """A RequestConsumer of this process on ``queue`` (and a caller), its loop in a thread of its own."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    consumer = RequestConsumer(load_settings(rabbitmq_url=rabbitmq_url, requests_queue=queue,
                                             var_dir=str(tmp_path), **settings), loop, handler)
    consumer.start()
    caller = Rpc(rabbitmq_url)
    try:
        assert consumer.consuming.wait(15)
        yield caller
    finally:
        caller.channel.queue_delete(queue)
        caller.channel.queue_delete(f"{queue}.dead")
        caller.close()
        consumer.stop()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def test_a_request_that_keeps_failing_is_dead_lettered_by_the_broker(rabbitmq_url: str,
                                                                     tmp_path: Path) -> None:
    """The spanner could not answer (its database is down): requeued, and after the delivery limit the
    broker dead-letters it; the last delivery tells the caller."""
    queue = f"flaky.{uuid.uuid4().hex[:6]}"
    deliveries: list[AmqpRequest] = []

    async def failing(request: AmqpRequest) -> tuple[dict[str, Any], int]:
        deliveries.append(request)
        raise StorageError("database error at sqlite:///gone.db: unable to open database file")

    with consumer_of(queue, failing, rabbitmq_url, tmp_path, amqp_delivery_limit=2) as caller:
        correlation_id = caller.send(QUERY, queue=queue)
        status, detail = caller.reply(correlation_id)
        assert status == 503 and "given up after 3 deliveries" in detail["detail"]
        dead = caller.dead(correlation_id, queue=f"{queue}.dead")
        assert dead.headers["x-death"][0]["reason"] == "delivery_limit"
        assert len(deliveries) == 3 and caller.depth(queue) == 0


def test_a_refused_request_logs_no_patient_data_at_info(rabbitmq_url: str, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """The reason of a refusal may quote a filter value: it goes to the caller and the dead-letter
    headers, and to the log only at DEBUG."""
    import logging

    from spanner.errors import InvalidQuery

    queue = f"phi.{uuid.uuid4().hex[:6]}"

    async def refusing(request: AmqpRequest) -> tuple[dict[str, Any], int]:
        raise InvalidQuery("PatientName: 'DOE^JANE' is not a valid value here")

    caplog.set_level(logging.INFO)
    with consumer_of(queue, refusing, rabbitmq_url, tmp_path) as caller:
        correlation_id = caller.send({"level": "STUDY", "filters": {"PatientName": "DOE^JANE"}}, queue=queue)
        status, detail = caller.reply(correlation_id)
        assert status == 422 and "DOE^JANE" in detail["detail"]
        assert "DOE^JANE" in caller.dead(correlation_id, queue=f"{queue}.dead").headers["x-spanner-error"]
    dead_lettered = [r for r in caplog.records if getattr(r, "event", None) == "amqp.dead_lettered"]
    assert len(dead_lettered) == 1
    assert not any("DOE^JANE" in r.getMessage() for r in caplog.records if r.levelno >= logging.INFO)
