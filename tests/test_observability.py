"""Logs and metrics: the JSON line format, the privacy rule for query logs, metrics inside Ray processes."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from spanner.logs import JsonFormatter, TextFormatter, configure_logging, make_formatter, query_log_fields


@dataclass(frozen=True)
class _Opts:
    log_format: str = "json"
    log_level: str = "INFO"


@pytest.fixture
def clean_root() -> Iterator[logging.Logger]:
    """Restore the root logger (handlers, level) and pynetdicom's level after each test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    pnd_level = logging.getLogger("pynetdicom").level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("pynetdicom").setLevel(pnd_level)


def _emit(formatter: logging.Formatter, *records: tuple[int, str, dict[str, Any]]) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    log = logging.getLogger("spanner.test.observability")
    log.propagate = False
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG)
    for level, message, extra in records:
        log.log(level, message, extra=extra)
    return stream.getvalue()


def test_json_formatter_writes_one_object_per_line_with_the_keys() -> None:
    out = _emit(
        JsonFormatter("node:pacs-a"),
        (logging.INFO, "first\nwith a newline", {}),
        (
            logging.WARNING,
            "second",
            {"query_id": "q1", "node": "pacs-a", "event": "node.find", "elapsed_ms": 12.5},
        ),
    )
    lines = out.splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert {"time", "level", "service", "logger", "message"} <= first.keys()
    assert first["message"] == "first\nwith a newline"
    assert first["service"] == "node:pacs-a" and first["level"] == "INFO"
    assert first["time"].endswith("+00:00")  # ISO 8601, UTC
    assert first["logger"] == "spanner.test.observability"
    assert "query_id" not in first
    assert second["level"] == "WARNING"
    assert (second["query_id"], second["node"], second["event"], second["elapsed_ms"]) == (
        "q1",
        "pacs-a",
        "node.find",
        12.5,
    )


def test_text_format_is_for_people() -> None:
    out = _emit(TextFormatter("scp"), (logging.INFO, "hello", {"node": "pacs-a"}))
    assert "hello" in out and "[scp]" in out and "node=pacs-a" in out
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)
    assert isinstance(make_formatter("scp", "text"), TextFormatter)
    assert isinstance(make_formatter("scp", "json"), JsonFormatter)


def test_configure_logging_is_idempotent(clean_root: logging.Logger) -> None:
    before = len(clean_root.handlers)
    configure_logging("cli", _Opts())
    configure_logging("cli", _Opts())
    configure_logging("cli", _Opts(log_format="text", log_level="DEBUG"))
    assert len(clean_root.handlers) == before + 1
    ours = clean_root.handlers[-1]
    assert isinstance(ours.formatter, TextFormatter)
    assert clean_root.level == logging.DEBUG
    configure_logging("cli", _Opts())
    assert isinstance(ours.formatter, JsonFormatter) and clean_root.level == logging.INFO
    # pynetdicom prints whole identifiers (patient data) at INFO: held back unless DEBUG
    assert logging.getLogger("pynetdicom").level == logging.WARNING


def test_settings_have_the_log_fields() -> None:
    from spanner.settings import load_settings

    s = load_settings(log_format="text", log_level="DEBUG")
    assert (s.log_format, s.log_level) == ("text", "DEBUG")
    assert (load_settings().log_format, load_settings().log_level) == ("json", "INFO")


def test_query_log_line_carries_no_filter_values() -> None:
    """The route's INFO line is built from these fields only: patient data cannot reach it."""
    fields = query_log_fields(
        query_id="abc",
        span="all",
        level="STUDY",
        status="ok",
        total=3,
        elapsed_ms=41.0,
        cache="miss",
    )
    assert fields["event"] == "query.completed" and fields["query_id"] == "abc"
    assert {"span", "status", "total", "elapsed_ms", "cache"} <= fields.keys()
    out = _emit(JsonFormatter("ingress"), (logging.INFO, "query abc on span all: ok, 3 matches", fields))
    doc = json.loads(out)
    assert doc["level"] == "INFO" and doc["query_level"] == "STUDY" and doc["total"] == 3
    flat = out.lower()
    for forbidden in ("patientname", "patientid", "doe^jane", "pid-4711", "filters"):
        assert forbidden not in flat


def test_route_log_call_uses_only_the_safe_fields(caplog: pytest.LogCaptureFixture) -> None:
    """The route helper itself: a plan whose filters hold a name and an ID logs neither."""
    from serve_app.usecases import query as spanning
    from spanner.query import Level, NodeQuery

    query = NodeQuery(level=Level.STUDY, filters={"PatientName": "DOE^JANE", "PatientID": "PID-4711"})

    class _Plan:
        span = "all"

    plan: Any = _Plan()
    plan.query = query
    with caplog.at_level(logging.DEBUG, logger="serve_app.usecases.query"):
        spanning._completed("q-1", plan, "ok", 2, 12.0, "miss")
    assert len(caplog.records) == 1
    record = caplog.records[0]
    assert record.levelno == logging.INFO and record.__dict__["event"] == "query.completed"
    text = JsonFormatter("ingress").format(record).lower()
    assert "doe^jane" not in text and "pid-4711" not in text and "patient" not in text
    assert '"span": "all"' in text and '"cache": "miss"' in text


def test_metrics_helpers_record_inside_ray(ray_session: str) -> None:
    import ray

    @ray.remote(num_cpus=0)
    class _Probe:
        def run(self) -> bool:
            from actors.metrics import NodeMetrics
            from serve_app.metrics import record_span_query

            node = NodeMetrics("pacs-a")
            node.query_finished("ok", 12.5)
            node.outcome("move_throttled")
            node.throttled()
            node.state(pool_open=2, in_flight=1, circuit_open=False)
            NodeMetrics("pacs-b").state(pool_open=0, in_flight=0, circuit_open=True)
            record_span_query("all", "ok", 40.0, "miss")
            record_span_query("all", "ok", 1.0, "hit")
            return True

    probe = _Probe.remote()  # type: ignore[attr-defined]
    try:
        assert ray.get(probe.run.remote(), timeout=30) is True
    finally:
        ray.kill(probe)


def test_node_actor_stats_still_work(ray_session: str) -> None:
    """A real PacsNode actor (no PACS behind it) configures its logging and publishes its gauges."""
    import ray

    from actors.pacs_node import PacsNode
    from spanner.nodespec import ActorTuning, NodeSpec
    from tests.peers.ports import free_port

    spec = NodeSpec(
        name="obs-node",
        ae_title="NOBODY",
        host="127.0.0.1",
        port=free_port(),
        calling_ae_title="SPANNER",
        connect_timeout_s=0.5,
    )
    tuning = ActorTuning(log_format="text", log_level="DEBUG")
    actor = PacsNode.remote(spec, tuning)  # type: ignore[attr-defined]
    try:
        echo = ray.get(actor.echo.remote(1.0), timeout=30)
        stats = ray.get(actor.stats.remote(), timeout=30)
    finally:
        ray.kill(actor)
    assert echo.status.value != "ok"
    assert stats["node"] == "obs-node" and stats["in_flight"] == 0 and "circuit" in stats
