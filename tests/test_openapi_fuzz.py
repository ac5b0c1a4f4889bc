"""A bounded schemathesis run against a real Serve app: every operation of the OpenAPI document with
generated inputs; no 5xx, and every answer's status, content type and body as the document declares.

Fuzzing must never make the service contact another host: every node body gets host 127.0.0.1 and a
port nothing listens on, and timeouts are kept short so a generated query cannot hold the run."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import hypothesis
import pytest
import schemathesis

from tests.conftest import Api, migrate
from tests.peers.ports import ClosedPort

MAX_EXAMPLES = 50
SHORT_S = 1.0
FUZZ_PHASES = (hypothesis.Phase.explicit, hypothesis.Phase.generate)  # no shrinking: bounded time


@pytest.fixture(scope="module")
def fuzz_api(api: Api, ray_session: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    from ray import serve

    from serve_app.app import AppArgs, build_app

    var_dir = tmp_path_factory.mktemp("fuzz")
    url = f"sqlite:///{var_dir}/spanner.db"
    migrate(url)
    namespace = f"{ray_session}-fuzz"
    settings = dict(api.settings) | {"namespace": namespace, "var_dir": str(var_dir), "database_url": url,
                                     "max_timeout_s": 2.0, "retrieve_timeout_s": 2.0}
    serve.run(build_app(AppArgs(settings=settings)), name="spanner-fuzz", route_prefix="/fuzz")
    client = Api(f"{api.base_url}/fuzz", namespace, settings)
    yield client
    client.http.close()
    serve.delete("spanner-fuzz")


def _loopback_only(body: Any, port: int) -> Any:
    if isinstance(body, dict):
        if "host" in body:
            body["host"] = "127.0.0.1"
        if "host" in body or "port" in body:  # a PATCH may move a node's port alone
            body["port"] = port
        for key in ("timeout_s", "connect_timeout_s", "dimse_timeout_s", "query_timeout_s"):
            if isinstance(body.get(key), int | float) and not isinstance(body.get(key), bool):
                body[key] = min(max(float(body[key]), 0.1), SHORT_S)
    return body


def test_the_api_matches_its_openapi_document(fuzz_api: Api) -> None:
    """Each operation in turn (schemathesis' Python API: its pytest plugin does not load under this
    pytest); the first failing case of an operation is kept, and all are reported together."""
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance]
    loaded = schemathesis.openapi.from_url(f"{fuzz_api.base_url}/openapi.json")
    closed = ClosedPort()  # bound, never listening: a node there refuses at once, and nobody else has it
    failures: list[str] = []
    operations = 0
    for result in loaded.get_all_operations():
        operation = result.ok()
        operations += 1

        @hypothesis.given(case=operation.as_strategy())
        @hypothesis.settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                             suppress_health_check=list(hypothesis.HealthCheck), phases=FUZZ_PHASES)
        def run(case: Any) -> None:
            case.body = _loopback_only(case.body, closed.port)
            case.call_and_validate(base_url=fuzz_api.base_url, timeout=30, checks=checks)

        try:
            run()
        except Exception as exc:
            where = f"{operation.method.upper()} {operation.path}"
            failures.append(f"{where}: {type(exc).__name__}: {exc}"[:3000])
    closed.release()
    assert operations >= 15
    assert not failures, "\n\n".join(failures)
