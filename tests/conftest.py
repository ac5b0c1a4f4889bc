"""Session-wide peers: one Ray instance per test session; real servers started once and shared."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator

import pytest

from tests.peers.ports import free_port

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")



def require(condition: bool, what: str) -> None:
    """Skip locally when a peer is missing; under CI a missing peer fails the run (never a quiet skip)."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"{what} is required under CI and is missing", pytrace=False)
    pytest.skip(f"{what} is missing")


@pytest.fixture(scope="session")
def ray_session() -> Iterator[str]:
    """One local Ray instance for the whole session (never joins a running cluster); yields its namespace."""
    import ray

    from cluster.ray_internals import local_init_options, stay_on_loopback

    stay_on_loopback()
    tmp = tempfile.mkdtemp(prefix="spanner-ray-")
    os.environ["RAY_TMPDIR"] = tmp
    namespace = f"spanner-test-{uuid.uuid4().hex[:8]}"
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        namespace=namespace,
        log_to_driver=False,
        **local_init_options(temp_dir=tmp),
    )
    yield namespace
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


def migrate(url: str) -> None:
    """Bring a test database to the newest schema, as `spanner db upgrade` does (the app only checks)."""
    from spanner.storage import make_engine, upgrade_database

    engine = make_engine(url)
    try:
        upgrade_database(engine)
    finally:
        engine.dispose()


class Api:
    """A running spanner Serve app in this session's Ray, with a small HTTP client."""

    def __init__(self, base_url: str, namespace: str, settings: dict[str, object]) -> None:
        import httpx

        self.base_url = base_url
        self.namespace = namespace
        self.settings = settings
        self.http = httpx.Client(base_url=base_url, timeout=60.0)

    def add_node(self, name: str, port: int, ae_title: str = "PACS", **extra: object) -> dict[str, object]:
        body = {"name": name, "ae_title": ae_title, "host": "127.0.0.1", "port": port, **extra}
        existing = self.http.get(f"/api/v1/nodes/{name}")
        if existing.status_code == 200:
            response = self.http.put(
                f"/api/v1/nodes/{name}", json={k: v for k, v in body.items() if k != "name"}
            )
        else:
            response = self.http.post("/api/v1/nodes", json=body)
        assert response.status_code in (200, 201), response.text
        result: dict[str, object] = response.json()
        return result

    def add_span(self, name: str, nodes: list[str], **extra: object) -> dict[str, object]:
        body = {"name": name, "ae_title": extra.pop("ae_title", name.upper()[:16]), "nodes": nodes, **extra}
        if self.http.get(f"/api/v1/spans/{name}").status_code == 200:
            response = self.http.put(
                f"/api/v1/spans/{name}", json={k: v for k, v in body.items() if k != "name"}
            )
        else:
            response = self.http.post("/api/v1/spans", json=body)
        assert response.status_code in (200, 201), response.text
        result: dict[str, object] = response.json()
        return result

    def query(self, **body: object) -> tuple[int, dict[str, object]]:
        """A query that asks the archives every time (Cache-Control: no-cache): tests of the fan-out must
        not be answered from the query cache; tests of the cache post their own requests."""
        response = self.http.post("/api/v1/queries", json=body, headers={"Cache-Control": "no-cache"})
        return response.status_code, response.json()


OHIF_PORT = free_port()
"""Where tests/test_ohif.py serves the viewer: the session's API allows that origin and no other (CORS)."""
OHIF_ORIGIN = f"http://127.0.0.1:{OHIF_PORT}"


@pytest.fixture(scope="session")
def api(ray_session: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """The Serve app on a free loopback port over a SQLite file; one per session, shared by the API tests."""
    from ray import serve
    from ray.serve.config import HTTPOptions

    from serve_app.app import AppArgs, build_app
    from tests.peers.ports import free_port

    port = free_port()
    var_dir = tmp_path_factory.mktemp("var")
    settings: dict[str, object] = {
        "namespace": ray_session,
        "var_dir": str(var_dir),
        "database_url": f"sqlite:///{var_dir}/spanner.db",
        "http_port": port,
        "demo_fleet": False,
        "circuit_cooldown_s": 1.0,
        "cancel_grace_s": 0.3,
        "node_grace_s": 1.0,
        "auth_enabled": False,  # the suite's API runs open; tests/test_auth_audit.py deploys one with keys
        "store_port": free_port(),  # the proxy retrieval's storage SCP (tests/test_proxy_retrieval.py)
        "cors_origins": OHIF_ORIGIN,  # OHIF on its own origin calls the DICOMweb front (tests/test_ohif.py)
    }
    migrate(str(settings["database_url"]))
    serve.start(
        http_options=HTTPOptions(host="127.0.0.1", port=port), logging_config={"enable_access_log": False}
    )
    serve.run(build_app(AppArgs(settings=settings)), name="spanner", route_prefix="/")
    client = Api(f"http://127.0.0.1:{port}", ray_session, settings)
    yield client
    client.http.close()
    serve.shutdown()


PG_HOST = "127.0.0.1:5432"


def _admin_url() -> str | None:
    import psycopg2

    for user in ("postgres", "root"):
        url = f"postgresql://{user}@{PG_HOST}/postgres"
        try:
            psycopg2.connect(url, connect_timeout=3).close()
        except psycopg2.OperationalError:
            continue
        return url
    return None


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """An isolated database for this session, dropped at the end."""
    import psycopg2

    admin = _admin_url()
    require(admin is not None, f"PostgreSQL at {PG_HOST}")
    assert admin is not None
    name = f"spanner_test_{uuid.uuid4().hex[:12]}"
    conn = psycopg2.connect(admin)
    conn.autocommit = True
    try:
        with conn.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        yield admin.rsplit("/", 1)[0] + "/" + name
    finally:
        with conn.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


@pytest.fixture(scope="session")
def api_pg(api: Api, postgres_url: str, ray_session: str) -> Iterator[Api]:
    """A second app of the same Serve instance, under /pg, storing in an isolated PostgreSQL database."""
    from ray import serve

    from serve_app.app import AppArgs, build_app

    namespace = f"{ray_session}-pg"
    settings = dict(api.settings) | {"namespace": namespace, "database_url": postgres_url}
    migrate(postgres_url)
    serve.run(build_app(AppArgs(settings=settings)), name="spanner-pg", route_prefix="/pg")
    client = Api(f"{api.base_url}/pg", namespace, settings)
    yield client
    client.http.close()
    serve.delete("spanner-pg")


@pytest.fixture(scope="session")
def rabbitmq_url() -> Iterator[str]:
    """A vhost of this session on the machine's RabbitMQ, deleted at the end."""
    from tests.peers.rabbitmq import Vhost, machine_broker_available

    require(machine_broker_available(), "RabbitMQ at 127.0.0.1:5672 with rabbitmqctl")
    vhost = Vhost().create()
    yield vhost.url
    vhost.delete()
