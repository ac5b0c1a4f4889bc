"""The `spanner` command: run the system, run a simulated PACS, query, and manage nodes over HTTP."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from cli.ray_node import (
    DEFAULT_HEAD_PORT,
    RayNode,
    RayNodeError,
    RayNodeOptions,
    head_address,
    head_command,
    worker_command,
)
from spanner.errors import ConfigError, SpannerError

if TYPE_CHECKING:
    from spanner.settings import Settings

app = typer.Typer(help="dicom-spanner: one front door to every PACS.", no_args_is_help=True)
nodes_app = typer.Typer(help="List, add, remove and echo PACS nodes.", no_args_is_help=True)
app.add_typer(nodes_app, name="nodes")
db_app = typer.Typer(help="The database: schema migrations.", no_args_is_help=True)
app.add_typer(db_app, name="db")
keys_app = typer.Typer(help="API keys of the HTTP API (written to the database).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
console = Console()

UrlOption = Annotated[str, typer.Option(envvar="SPANNER_URL", help="Base URL of the spanner HTTP API")]
DEFAULT_URL = "http://127.0.0.1:8000"
ApiKeyOption = Annotated[str, typer.Option(
    "--api-key", envvar="SPANNER_API_KEY", show_default=False,
    help="API key sent as 'Authorization: Bearer <key>' (needed once keys exist)")]


def _call(method: str, url: str, api_key: str = "", **kwargs: Any) -> Any:
    """One HTTP call; a refused connection or a 4xx/5xx becomes a readable message and exit code 1."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.request(method, url, timeout=kwargs.pop("timeout", 60.0), headers=headers, **kwargs)
    except httpx.HTTPError as exc:
        console.print(f"[red]cannot reach {url}: {exc}[/red] (is `make run` running? set SPANNER_URL)")
        raise typer.Exit(1) from exc
    if response.status_code >= 400 and response.status_code != 502:
        detail = response.json().get("detail", response.text) if response.content else response.reason_phrase
        console.print(f"[red]{response.status_code}: {detail}[/red]")
        if response.status_code == 401 and not api_key:
            console.print("send a key with --api-key or SPANNER_API_KEY")
        raise typer.Exit(1)
    return response.json() if response.content else None


NodeIpOption = Annotated[str, typer.Option(
    "--node-ip", envvar="SPANNER_RAY_NODE_IP", show_default=False,
    help="This Ray node's address (default: Ray picks the address of the default route)")]
RayArgsOption = Annotated[str, typer.Option(
    "--ray-args", envvar="SPANNER_RAY_ARGS", show_default=False,
    help="More `ray start` options, e.g. '--num-cpus=2 --labels=site=east'")]


@app.command()
def run(
    head: Annotated[bool, typer.Option(
        "--head", help="Start a Ray head here first and run on it, Serve's HTTP proxy on the head only "
                       "(the compose coordinator); `spanner worker` joins it")] = False,
    ray_port: Annotated[int, typer.Option(envvar="SPANNER_RAY_PORT", help="GCS port of the head (--head)")]
    = DEFAULT_HEAD_PORT,
    node_ip: NodeIpOption = "",
    ray_args: RayArgsOption = "",
) -> None:
    """Start Ray, the Serve app and (with no node configured) a demo fleet of three simulated PACS."""
    from cluster.launcher import run as launch
    from spanner.settings import get_settings

    node: RayNode | None = None
    try:
        settings = get_settings()
        if head:
            node, settings = _start_head(settings, RayNodeOptions(node_ip, ray_args), ray_port)
        # soft_wrap: in a log (no terminal) rich would wrap at 80 columns and break the pasted curl line
        launch(settings, say=lambda text: console.print(text, soft_wrap=True))
    except RayNodeError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    except ConfigError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    except SpannerError as exc:  # e.g. the database cannot be reached
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    finally:
        if node is not None:
            node.stop()


def _start_head(settings: Settings, options: RayNodeOptions, port: int) -> tuple[RayNode, Settings]:
    """A Ray head as a child of this process, with Serve started on it; the settings then join it."""
    from ray import serve
    from ray.serve.config import HTTPOptions

    # Until the launcher installs its handlers, SIGTERM unwinds (and so ends the head) instead of exiting.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    node = RayNode(head_command(options, port, settings.dashboard_host, settings.dashboard_port))
    node.start()
    try:
        address = head_address(options, port)
        node.wait_listening(address)
        settings = settings.model_copy(update={"ray_address": address})
        _join(node, settings)
        # Serve's default puts an HTTP proxy on every node that holds a replica: the published port is
        # the head's, so the proxy stays there (it routes to replicas on any node). The launcher's own
        # serve.start then finds Serve running with the same HTTP options.
        serve.start(
            proxy_location="HeadOnly",
            http_options=HTTPOptions(host=settings.http_host, port=settings.http_port),
            logging_config={"enable_access_log": False},
        )
    except BaseException:
        node.stop()
        raise
    return node, settings


def _join(node: RayNode, settings: Settings, timeout_s: float = 120.0) -> None:
    """Join the head just started: its GCS answers before its raylet has registered, and a driver that
    joins meanwhile is refused, so joining is retried while `ray start` runs, up to ``timeout_s``."""
    from cluster.ray_runtime import connect

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            connect(settings)
            return
        except ConnectionError as exc:
            if not node.running() or time.monotonic() > deadline:
                raise RayNodeError(f"cannot join the Ray head at {settings.ray_address}: {exc}") from exc
            time.sleep(1)


@app.command()
def worker(
    address: Annotated[str, typer.Option(envvar="RAY_ADDRESS", help="GCS address of the head, HOST:PORT")],
    node_ip: NodeIpOption = "",
    ray_args: RayArgsOption = "",
) -> None:
    """Join the Ray cluster at ADDRESS as a worker node (node actors run there) until SIGTERM or Ctrl-C."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    node = RayNode(worker_command(RayNodeOptions(node_ip, ray_args), address))
    console.print(f"joining the Ray cluster at {address}; SIGTERM or Ctrl-C leaves it")
    try:
        node.start()
        code = node.wait()
    except KeyboardInterrupt:
        code = 0
    finally:
        node.stop()
    if code:
        console.print(f"[red]`ray start` ended with code {code}[/red]")
        raise typer.Exit(1)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Migrate the database (DATABASE_URL, else the SQLite file under var/) to the newest schema."""
    from spanner.settings import get_settings
    from spanner.storage import make_engine, upgrade_database

    try:
        engine = make_engine(get_settings().effective_database_url)
        try:
            result = upgrade_database(engine)
        finally:
            engine.dispose()
    except SpannerError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2 if isinstance(exc, ConfigError) else 1) from exc
    where = engine.url.render_as_string(hide_password=True)
    if result.stamped:
        console.print(f"tables made before migrations found: stamped at revision {result.stamped}")
    for change in result.drift:
        console.print(f"[yellow]the database still differs from the code's schema: {change}[/yellow]")
    note = "" if result.changed else " (already current)"
    console.print(f"{where}: {result.from_label} -> {result.after}{note}")


def _key_repository() -> Any:
    """The repository of DATABASE_URL (or the SQLite file under var/), whose schema must be current."""
    from spanner.settings import get_settings
    from spanner.storage import Repository, make_engine, require_current_schema

    try:
        engine = make_engine(get_settings().effective_database_url)
        require_current_schema(engine)
    except SpannerError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2 if isinstance(exc, ConfigError) else 1) from exc
    return Repository(engine)


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="Who holds the key, e.g. ward-ws or dicom-front")],
    role: Annotated[str, typer.Option(help="query (queries, retrievals, reading), admin (also changes nodes "
                                           "and spans, reads the audit) or dicom_front (a DICOM front: "
                                           "queries and retrievals naming the DICOM caller)")],
) -> None:
    """Create an API key and print it once: only its hash is stored."""
    from spanner.keys import new_key
    from spanner.schemas import CLOSING_ROLES
    from spanner.settings import get_settings

    repo = _key_repository()
    key, prefix, key_hash = new_key()
    try:
        closing_before = repo.count_active_api_keys(CLOSING_ROLES)
        repo.create_api_key(name, role, prefix, key_hash)
    except SpannerError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    finally:
        repo.engine.dispose()
    settings = get_settings()
    if closing_before == 0 and role in CLOSING_ROLES and settings.auth_enabled:
        console.print(f"[bold]Authentication is now ON[/bold]: this is the first admin or query key, so "
                      f"every /api request needs a key from now on (a running spanner notices within "
                      f"{settings.auth_cache_ttl_s:g} s, no restart needed)", soft_wrap=True)
    console.print(f"API key {name!r} (role {role}); shown only now, keep it safe:")
    print(key)  # plain, so that `spanner keys create ... | tail -1` gets exactly the key


@keys_app.command("list")
def keys_list() -> None:
    """List the API keys: name, role, public prefix, created, revoked."""
    repo = _key_repository()
    try:
        keys = repo.list_api_keys()
    finally:
        repo.engine.dispose()
    table = Table()
    for col in ("name", "role", "prefix", "created", "revoked"):
        table.add_column(col)
    for k in keys:
        revoked = k.revoked_at.isoformat(timespec="seconds") if k.revoked_at else ""
        table.add_row(k.name, k.role, k.prefix, k.created_at.isoformat(timespec="seconds"), revoked)
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(name: str) -> None:
    """Revoke an API key; replicas stop accepting it within SPANNER_AUTH_CACHE_TTL_S."""
    repo = _key_repository()
    try:
        repo.revoke_api_key(name)
    except SpannerError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    finally:
        repo.engine.dispose()
    console.print(f"revoked {name}")


@app.command()
def simulate(
    port: Annotated[int, typer.Option(help="Port to listen on (127.0.0.1)")] = 11112,
    ae_title: Annotated[str, typer.Option(help="AE title of the simulated PACS")] = "SIM",
    seed: Annotated[int, typer.Option(help="Seed of the generated data set")] = 42,
    node_index: Annotated[int, typer.Option(help="Which node of the seeded fleet to serve (0, 1, 2)")] = 0,
    patients: Annotated[int, typer.Option(help="Patients in the seeded fleet")] = 20,
    latency_ms: Annotated[float, typer.Option(help="Delay before the first response")] = 0.0,
    jitter_ms: Annotated[float, typer.Option(help="Uniform random extra delay")] = 0.0,
    fault: Annotated[str, typer.Option(help="none, refuse, abort, failure, hang or slow")] = "none",
) -> None:
    """Serve a seeded, generated data set as a Query/Retrieve SCP until Ctrl-C."""
    from simulator.dataset import generate_fleet
    from simulator.scp import SimulatorConfig, serve_forever

    fleet = generate_fleet(seed, nodes=max(3, node_index + 1), patients=patients)
    config = SimulatorConfig(
        ae_title=ae_title, port=port, latency_ms=latency_ms, jitter_ms=jitter_ms,
        fault=fault,  # type: ignore[arg-type]  # SimulatorConfig checks it and says what is allowed
        seed=seed,
    )
    console.print(f"simulated PACS {ae_title} on 127.0.0.1:{port}: {len(fleet[node_index])} instances")
    serve_forever(config, fleet[node_index])


@app.command()
def ohif(
    port: Annotated[int, typer.Option(help="Port of the viewer on 127.0.0.1")] = 3000,
    dicomweb: Annotated[str, typer.Option(help="DICOMweb root the viewer asks")] = f"{DEFAULT_URL}/dicomweb",
    dist: Annotated[Path | None, typer.Option(help="OHIF's dist/ folder (default var/ohif/VERSION/dist)")]
    = None,
) -> None:
    """Serve OHIF's viewer (from `make peers`) with its data source at the spanner's DICOMweb front."""
    from cli.ohif import OHIF_VERSION, OhifHttpServer, app_config, default_dist

    try:
        server = OhifHttpServer(dist or default_dist(), app_config(dicomweb.rstrip("/")), port=port)
    except (FileNotFoundError, OSError) as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    console.print(f"OHIF {OHIF_VERSION} on {server.url} -> DICOMweb {dicomweb}; the spanner must allow this "
                  f"origin (SPANNER_CORS_ORIGINS={server.url}); Ctrl-C stops it")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


@app.command()
def scp(
    port: Annotated[int | None, typer.Option(help="Port (default SPANNER_SCP_PORT, 11114)")] = None,
    host: Annotated[str | None, typer.Option(help="Address (default SPANNER_SCP_HOST, 127.0.0.1)")] = None,
    url: Annotated[str | None, typer.Option(help="Base URL of the HTTP API (default SPANNER_URL)")] = None,
) -> None:
    """Serve the spans over DICOM (C-ECHO, C-FIND, C-MOVE; the called AE title picks the span)."""
    from scp.server import SpannerScp, serve_forever
    from spanner.settings import get_settings

    try:
        settings = get_settings()
        given = (("scp_port", port), ("scp_host", host), ("scp_url", url))
        overrides = {key: value for key, value in given if value is not None}
        if overrides:
            settings = settings.model_copy(update=overrides)
    except ConfigError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc

    def started(front: SpannerScp) -> None:
        console.print(f"DICOM front on {front.host}:{front.port} -> {front.base_url}; Ctrl-C stops it")

    try:
        serve_forever(settings, on_started=started)
    except OSError as exc:
        console.print(f"[red]cannot listen on {settings.scp_host}:{settings.scp_port}: {exc}[/red]")
        raise typer.Exit(1) from exc


def _keyword_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep:
        raise typer.BadParameter(f"{text!r}: write KEY=VALUE, e.g. PatientID=PAT*")
    return key.strip(), value


@app.command()
def query(
    level: Annotated[str, typer.Argument(help="PATIENT, STUDY, SERIES or IMAGE")],
    filter_: Annotated[list[str] | None, typer.Option("--filter", "-f", help="KEY=VALUE, repeatable")] = None,
    return_key: Annotated[list[str] | None, typer.Option("--return-key", "-r", help="Extra key")] = None,
    span: Annotated[str, typer.Option(help="Span to query")] = "all",
    timeout_s: Annotated[float | None, typer.Option(help="Deadline per node")] = None,
    limit: Annotated[int | None, typer.Option(help="Page size")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON answer")] = False,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = "",
) -> None:
    """Run a spanning C-FIND and print the merged matches and every node's outcome."""
    body: dict[str, Any] = {
        "level": level.upper(),
        "span": span,
        "filters": dict(_keyword_value(f) for f in filter_ or []),
    }
    if return_key:
        body["return_keys"] = return_key
    if timeout_s is not None:
        body["timeout_s"] = timeout_s
    if limit is not None:
        body["limit"] = limit
    answer = _call("POST", f"{url}/api/v1/queries", api_key, json=body)
    if as_json:
        console.print_json(json.dumps(answer))
        return
    _print_answer(answer)
    if answer["status"] == "failed":
        raise typer.Exit(1)


def _text(element: dict[str, Any] | None) -> str:
    if not element or not element.get("Value"):
        return ""
    values = [v.get("Alphabetic", "") if isinstance(v, dict) else str(v) for v in element["Value"]]
    return "\\".join(values)


COLUMNS = {
    "PATIENT": [("00100020", "PatientID"), ("00100010", "PatientName"), ("00100030", "BirthDate")],
    "STUDY": [
        ("00080020", "StudyDate"),
        ("00100020", "PatientID"),
        ("00100010", "PatientName"),
        ("00080061", "Modalities"),
        ("00081030", "Description"),
        ("0020000D", "StudyInstanceUID"),
    ],
    "SERIES": [
        ("00080060", "Modality"),
        ("00200011", "Number"),
        ("0008103E", "Description"),
        ("0020000E", "SeriesInstanceUID"),
    ],
    "IMAGE": [("00200013", "Number"), ("00080016", "SOPClassUID"), ("00080018", "SOPInstanceUID")],
}


def _print_answer(answer: dict[str, Any]) -> None:
    table = Table(title=f"{answer['level']} matches: {len(answer['matches'])} of {answer['total']}")
    for _, title in COLUMNS[answer["level"]]:
        table.add_column(title)
    table.add_column("nodes")
    for match in answer["matches"]:
        ds = match["dataset"]
        table.add_row(*[_text(ds.get(tag)) for tag, _ in COLUMNS[answer["level"]]], ", ".join(match["nodes"]))
    console.print(table)
    nodes = Table(title=f"status {answer['status']} in {answer['elapsed_ms']} ms")
    for col in ("node", "status", "matches", "ms", "error"):
        nodes.add_column(col)
    for o in answer["nodes"]:
        nodes.add_row(o["node"], o["status"], str(o["matches"]), str(o["elapsed_ms"]), o.get("error") or "")
    console.print(nodes)


@nodes_app.command("list")
def nodes_list(url: UrlOption = DEFAULT_URL, api_key: ApiKeyOption = "") -> None:
    """List the configured nodes."""
    table = Table()
    for col in ("name", "ae_title", "host", "port", "enabled", "priority"):
        table.add_column(col)
    for n in _call("GET", f"{url}/api/v1/nodes", api_key):
        table.add_row(
            n["name"], n["ae_title"], n["host"], str(n["port"]), str(n["enabled"]), str(n["priority"])
        )
    console.print(table)


@nodes_app.command("add")
def nodes_add(
    name: str,
    ae_title: str,
    host: str,
    port: int,
    priority: Annotated[int, typer.Option(help="Lower wins ties")] = 100,
    max_associations: Annotated[int, typer.Option(help="Pool size")] = 4,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = "",
) -> None:
    """Add a node: NAME AE_TITLE HOST PORT."""
    body = {
        "name": name,
        "ae_title": ae_title,
        "host": host,
        "port": port,
        "priority": priority,
        "max_associations": max_associations,
    }
    node = _call("POST", f"{url}/api/v1/nodes", api_key, json=body)
    console.print(f"added {node['name']} ({node['ae_title']}@{node['host']}:{node['port']})")


@nodes_app.command("remove")
def nodes_remove(name: str, url: UrlOption = DEFAULT_URL, api_key: ApiKeyOption = "") -> None:
    """Remove a node and stop its actor."""
    _call("DELETE", f"{url}/api/v1/nodes/{name}", api_key)
    console.print(f"removed {name}")


@nodes_app.command("echo")
def nodes_echo(name: str, url: UrlOption = DEFAULT_URL, api_key: ApiKeyOption = "") -> None:
    """C-ECHO a node through its actor."""
    answer = _call("POST", f"{url}/api/v1/nodes/{name}/echo", api_key)
    console.print(f"{name}: {answer['status']} in {answer['elapsed_ms']} ms {answer.get('error') or ''}")
    if answer["status"] != "ok":
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
