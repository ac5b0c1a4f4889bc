"""`spanner run`: Ray (local or RAY_ADDRESS), the Serve app, and the demo fleet when no node is configured.

Ctrl-C (or SIGTERM) stops everything this process started: the Serve app, the simulators and the
local Ray instance with its processes (Ray's agents included: any of them still alive after
``ray.shutdown`` is ended by PID), and says so.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from spanner.logs import configure_logging
from spanner.schemas import DestinationIn, DestinationOut, NodeIn, NodeOut
from spanner.settings import Settings
from spanner.storage import Repository, make_engine, require_current_schema, upgrade_database

if TYPE_CHECKING:
    from scp.server import SpannerScp

DEMO_HOST = "127.0.0.1"
DEMO_DESTINATION = ("demo-viewer", "MYSTORESCP")
"""The destination `spanner run` registers with the demo fleet (name, AE title), on DEMO_HOST at
demo_base_port + 3: a storage SCP started there receives what the banner's movescu line retrieves."""
DEMO_RECEIVED = "/tmp/spanner-in"
LOCAL_DRAIN_S = 5.0  # how long a local stop waits for the replicas to write their queued records


def _is_demo(node: NodeOut, demo: dict[str, tuple[str, int]]) -> bool:
    return node.name in demo and node.host == DEMO_HOST and node.ae_title == demo[node.name][0]


def prepare_database(settings: Settings, say: Callable[[str], None]) -> None:
    """In development the embedded SQLite is migrated to the newest schema; any other database must be
    current already (`spanner db upgrade`), or this raises ConfigError before Ray starts."""
    engine = make_engine(settings.effective_database_url)
    try:
        if settings.environment == "development" and not settings.database_url:
            result = upgrade_database(engine)
            if result.stamped:
                say(f"database made before migrations: stamped at schema revision {result.stamped}")
            for change in result.drift:
                say(f"[yellow]database differs from the code's schema: {change}[/yellow]")
            if result.changed:
                say(f"database schema upgraded: {result.from_label} -> {result.after}")
        else:
            require_current_schema(engine)
    finally:
        engine.dispose()


def demo_destination_port(settings: Settings) -> int:
    from simulator.fleet import DEMO_NODES

    return settings.demo_base_port + len(DEMO_NODES)


def _is_demo_destination(destination: DestinationOut, settings: Settings) -> bool:
    return (destination.name, destination.ae_title) == DEMO_DESTINATION and destination.host == DEMO_HOST \
        and destination.port == demo_destination_port(settings)


def _store_host(settings: Settings) -> str:
    return DEMO_HOST if settings.scp_host in ("0.0.0.0", "") else settings.scp_host


def prepare_demo_fleet(settings: Settings, say: Callable[[str], None]) -> list[Any]:
    """Start and register three simulated PACS unless real nodes exist (then drop stale demo nodes).

    The simulators know the spanner's storage SCP as a move destination, and a demo destination
    (MYSTORESCP) is registered, so that a proxy C-MOVE through the DICOM front works as the banner
    prints it."""
    from simulator.fleet import DEMO_NODES, start_demo_fleet
    from simulator.scp import SimulatorConfig

    demo = {d.name: (d.ae_title, settings.demo_base_port + d.port_offset) for d in DEMO_NODES}
    prepare_database(settings, say)
    repo = Repository(make_engine(settings.effective_database_url))
    nodes = repo.list_nodes()
    real = [n for n in nodes if not _is_demo(n, demo)]
    destinations = repo.list_destinations()
    if real or not settings.demo_fleet:
        for node in nodes:
            if _is_demo(node, demo):
                repo.delete_node(node.name)
                say(f"removed demo node {node.name}: real nodes are configured")
        for destination in destinations:
            if _is_demo_destination(destination, settings):
                repo.delete_destination(destination.name)
        return []
    store = (settings.store_ae, _store_host(settings), settings.store_port)
    fleet = start_demo_fleet(settings.demo_base_port, config=SimulatorConfig(move_destinations=(store,)))
    present = {n.name for n in nodes}
    for name, (ae_title, port) in demo.items():
        if name not in present:
            repo.create_node(NodeIn(name=name, ae_title=ae_title, host=DEMO_HOST, port=port))
    say(f"demo fleet: {', '.join(f'{n} ({ae}@{DEMO_HOST}:{p})' for n, (ae, p) in demo.items())}")
    name, ae_title = DEMO_DESTINATION
    if not any(d.name == name or d.ae_title == ae_title for d in destinations):
        repo.create_destination(DestinationIn(name=name, ae_title=ae_title, host=DEMO_HOST,
                                              port=demo_destination_port(settings)))
        say(f"demo destination: {name} ({ae_title}@{DEMO_HOST}:{demo_destination_port(settings)})")
    return fleet


RUN_FRONT_KEY = "spanner-run-dicom-front"
"""The key `spanner run` gives its own DICOM front when SPANNER_SCP_API_KEY is unset (a new secret each
run, revoked when the run stops)."""


def keys_required(settings: Settings) -> bool:
    """Whether the API asks for keys now (serve_app.auth decides per request the same way): always in
    production; in development once an admin or query key exists, unless auth is turned off."""
    from spanner.schemas import CLOSING_ROLES

    if not settings.auth_enabled:
        return False
    if settings.environment != "development":
        return True
    engine = make_engine(settings.effective_database_url)
    try:
        return Repository(engine).count_active_api_keys(CLOSING_ROLES) > 0
    finally:
        engine.dispose()


def give_front_a_key(settings: Settings) -> Settings:
    """The run's DICOM front gets a dicom_front key of its own (when SPANNER_SCP_API_KEY is unset), so it
    keeps working when keys are, or become, required."""
    from spanner.keys import new_key
    from spanner.schemas import ApiRole

    key, prefix, key_hash = new_key()
    engine = make_engine(settings.effective_database_url)
    try:
        Repository(engine).put_api_key(RUN_FRONT_KEY, ApiRole.DICOM_FRONT, prefix, key_hash)
    finally:
        engine.dispose()
    return settings.model_copy(update={"scp_api_key": key})


def revoke_front_key(settings: Settings) -> None:
    engine = make_engine(settings.effective_database_url)
    try:
        Repository(engine).revoke_api_key(RUN_FRONT_KEY)
    finally:
        engine.dispose()


def auth_line(settings: Settings, required: bool) -> str:
    if required:
        return ("Authentication ON: send 'Authorization: Bearer <key>' (an admin makes keys with "
                "`spanner keys create NAME --role query`); the examples read the key from $SPANNER_API_KEY")
    if not settings.auth_enabled:
        return ("[bold yellow]Authentication OFF[/bold yellow] (SPANNER_AUTH_ENABLED=false): anyone who "
                "reaches the API may use it")
    return ("[bold yellow]Authentication OFF until the first key[/bold yellow] (development, no admin or "
            "query key yet): anyone who reaches the API may use it; `spanner keys create NAME --role admin` "
            "turns it on at once, no restart needed")


def services_line(settings: Settings) -> str:
    """Which real service each URL switched on, and what serves where none is set (no passwords)."""
    from sqlalchemy.engine import make_url

    database = make_url(settings.effective_database_url).render_as_string(hide_password=True)
    cache = f"Redis {make_url(settings.redis_url).render_as_string(hide_password=True)}" \
        if settings.redis_url else "in-process LRU (no REDIS_URL)"
    if settings.rabbitmq_url:
        from spanner.amqp import redact

        requests = f", requests on {settings.requests_queue}" if settings.requests_queue else ""
        events = f"RabbitMQ {redact(settings.rabbitmq_url)} (events on {settings.events_exchange}{requests})"
    else:
        events = "off (no RABBITMQ_URL)"
    return f"Database {database} | cache {cache} | events {events}"


def move_example(settings: Settings, demo_study: str | None) -> str:
    """The banner's C-MOVE lines: with the demo fleet, ready to paste (a storage SCP where the demo
    destination points, and a study of the fleet); otherwise with placeholders."""
    dicom = f"{settings.scp_host} {settings.scp_port}"
    if demo_study is None:
        return ("  movescu -S -aec SPANNER -aem MYSTORESCP -k QueryRetrieveLevel=STUDY "
                f"-k StudyInstanceUID=<uid> {dicom}\n  (MYSTORESCP: a destination added with "
                "POST /api/v1/destinations, or an AE title every archive knows)\n")
    _, ae_title = DEMO_DESTINATION
    port = demo_destination_port(settings)
    return (f"Proxy C-MOVE: the demo archives send to the spanner, which forwards to {ae_title} "
            f"({DEMO_HOST}:{port}):\n"
            f"  mkdir -p {DEMO_RECEIVED} && storescp -aet {ae_title} -od {DEMO_RECEIVED} {port} &\n"
            f"  movescu -S -aec SPANNER -aem {ae_title} -k QueryRetrieveLevel=STUDY "
            f"-k StudyInstanceUID={demo_study} {dicom}\n")


def example(settings: Settings, required: bool, demo_study: str | None = None) -> str:
    url = f"http://{settings.http_host}:{settings.http_port}"
    dicom = f"{settings.scp_host} {settings.scp_port}"
    body = '{"level": "STUDY", "filters": {"PatientName": "*", "StudyDate": "20100101-"}, "limit": 5}'
    export = "  export SPANNER_API_KEY=<your key>   # the CLI reads it (or --api-key)\n" if required else ""
    header = ' -H "Authorization: Bearer $SPANNER_API_KEY"' if required else ""
    return (
        f"\nReady. API {url}  (OpenAPI: {url}/docs)   Ray dashboard: "
        f"http://{settings.dashboard_host}:{settings.dashboard_port}\n{services_line(settings)}\n"
        f"{auth_line(settings, required)}\n\n{export}"
        f"  curl -s -X POST {url}/api/v1/queries -H 'Content-Type: application/json'{header} \\\n"
        f"       -d '{body}'\n\n"
        f"  .venv/bin/spanner query STUDY -f 'StudyDate=20100101-' --limit 5\n\n"
        f"DICOM front {settings.scp_host}:{settings.scp_port} (called AE title SPANNER = span 'all'):\n"
        f"  echoscu -aec SPANNER {dicom}\n"
        f"  findscu -S -aec SPANNER -k QueryRetrieveLevel=STUDY -k StudyDate=20100101- -k PatientName "
        f"-k StudyInstanceUID {dicom}\n"
        f"{move_example(settings, demo_study)}\n"
        "Ctrl-C stops everything.\n"
    )


def start_scp(settings: Settings, say: Callable[[str], None]) -> SpannerScp | None:
    """The DICOM front in this process, forwarding to the local API; None (said why) if it cannot listen."""
    from scp.server import SpannerScp

    host = "127.0.0.1" if settings.http_host in ("0.0.0.0", "") else settings.http_host
    front = SpannerScp(settings, base_url=f"http://{host}:{settings.http_port}")
    try:
        front.start()
    except OSError as exc:
        say(f"DICOM front not started: cannot listen on {settings.scp_host}:{settings.scp_port} ({exc})")
        return None
    return front


def run(settings: Settings, say: Callable[[str], None] = print) -> None:
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, ProxyLocation

    from cluster.ray_runtime import connect, descendants, end_processes, identities
    from serve_app.app import AppArgs, build_app
    from simulator.fleet import stop_fleet

    configure_logging("cli", settings)
    stop = threading.Event()

    def on_signal(*_: object) -> None:
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    fleet: list[Any] = []
    front: SpannerScp | None = None
    own_front_key = False
    try:
        fleet = prepare_demo_fleet(settings, say)
        if not settings.scp_api_key:
            settings = give_front_a_key(settings)
            own_front_key = True
        required = keys_required(settings)
        if not required:
            say(auth_line(settings, required))
        say("starting Ray" + (f" (joining {settings.ray_address})" if settings.ray_address else " (local)"))
        connect(settings)
        # The HTTP proxy on the head only, as cluster/serve_config.yaml has it: Ray nodes that share a
        # host would otherwise all bind the API's port.
        serve.start(
            proxy_location=ProxyLocation.HeadOnly,
            http_options=HTTPOptions(host=settings.http_host, port=settings.http_port),
            logging_config={"enable_access_log": False},
        )
        serve.run(
            build_app(AppArgs(settings=settings.model_dump(mode="json"))),
            name="spanner",
            route_prefix="/",
            blocking=False,
        )
        front = start_scp(settings, say)
        for sig in (signal.SIGINT, signal.SIGTERM):  # ray.init installs its own SIGTERM handler: ours again
            signal.signal(sig, on_signal)
        from simulator.fleet import demo_study_uid

        say(example(settings, required, demo_study_uid() if fleet else None))
        stop.wait()
        say("stopping")
    finally:
        stopping = time.monotonic()
        if front is not None:
            front.stop()
        if own_front_key:
            revoke_front_key(settings)
        ours = identities(descendants(os.getpid()))  # before Ray's shutdown orphans its agents
        if ray.is_initialized():
            try:
                # On a shared cluster only our app goes; a local instance goes whole with its processes,
                # after a drain bounded in time: deleting the app runs each replica's shutdown, which
                # writes the records of the queries it has already answered.
                if settings.ray_address:
                    serve.delete("spanner")
                else:
                    drain = threading.Thread(target=serve.delete, args=("spanner",), daemon=True)
                    drain.start()
                    drain.join(LOCAL_DRAIN_S)
            finally:
                ray.shutdown()
        stop_fleet(fleet)
        ended = end_processes(ours)
        left = f"; {ended} left-over process(es) ended by PID" if ended else ""
        say(f"stopped in {time.monotonic() - stopping:.1f} s: the API, the DICOM front, Ray and the "
            f"demo fleet{left}")
