"""compose/: both files against the Compose Specification's JSON schema, and what the schema cannot say."""

from __future__ import annotations

import re
from typing import Any

import jsonschema
import pytest
from typer.testing import CliRunner

from cli.main import app
from tests.compose_files import (
    BASE,
    COMPOSE_DIR,
    ENTERPRISE,
    ENV_EXAMPLE,
    NO_FLUENTD,
    active_services,
    compose_schema,
    load,
    merge,
    read_env_file,
    variables_used,
)

SPANNER_SERVICES = ("spanner-migrate", "spanner", "spanner-coordinator", "ray-worker", "dimse-scp-listener")
OVERLAY_SERVICES = ("spanner-coordinator", "ray-worker", "dimse-scp-listener")
FILES = (BASE, ENTERPRISE, NO_FLUENTD)


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = compose_schema()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def enterprise() -> dict[str, Any]:
    return merge(load(BASE), load(ENTERPRISE))


def errors(validator: jsonschema.protocols.Validator, model: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(model)]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_each_file_follows_the_compose_specification(
        validator: jsonschema.protocols.Validator, path: Any) -> None:
    assert errors(validator, load(path)) == []


@pytest.mark.parametrize("files", [(BASE,), (BASE, ENTERPRISE), (BASE, ENTERPRISE, NO_FLUENTD)],
                         ids=["standalone", "enterprise", "enterprise-no-fluentd"])
def test_merged_models_follow_the_specification_and_hang_together(
        validator: jsonschema.protocols.Validator, files: tuple[Any, ...]) -> None:
    model = merge(*(load(f) for f in files))
    assert errors(validator, model) == []
    services = active_services(model)
    for name, service in services.items():
        for target, rule in service.get("depends_on", {}).items():
            assert target in services, f"{name} depends on {target}, which this stack does not start"
            if rule["condition"] == "service_healthy":
                test = services[target].get("healthcheck", {}).get("test")
                assert test and test != ["NONE"], f"{name} waits for {target} to be healthy: it has no check"


def test_the_schema_rejects_what_compose_rejects(validator: jsonschema.protocols.Validator) -> None:
    """The check can fail: an unknown key and a wrong depends_on condition are both reported."""
    model = enterprise()
    model["services"]["ray-worker"]["replica"] = 2
    model["services"]["dimse-scp-listener"]["depends_on"]["spanner-coordinator"]["condition"] = "healthy"
    found = errors(validator, model)
    assert any("replica" in e for e in found) and any("healthy" in e for e in found), found


def test_the_standalone_stack_has_its_services_healthy_before_the_spanner() -> None:
    services = active_services(load(BASE))
    assert set(services) == {"postgres", "redis", "rabbitmq", "spanner-migrate", "spanner"}
    for name in ("postgres", "redis", "rabbitmq"):
        assert services[name]["healthcheck"]["test"], name
        assert services["spanner"]["depends_on"][name] == {"condition": "service_healthy"}
    migrated = {"condition": "service_completed_successfully"}
    assert services["spanner"]["depends_on"]["spanner-migrate"] == migrated
    env = services["spanner"]["environment"]
    assert env["DATABASE_URL"].startswith("postgresql://") and "@postgres:5432/" in env["DATABASE_URL"]
    assert env["REDIS_URL"] == "redis://redis:6379/0" and "@rabbitmq:5672/" in env["RABBITMQ_URL"]
    assert set(services["spanner"]["ports"]) == {"8000:8000", "8265:8265", "11114:11114"}


def test_the_overlay_lays_the_seed_topology_over_the_stack() -> None:
    model = enterprise()
    services = active_services(model)
    assert "spanner" not in services and active_services(model, ("standalone",))["spanner"]
    assert {"postgres", "redis", "rabbitmq", "spanner-migrate", *OVERLAY_SERVICES} == set(services)
    coordinator, worker, listener = (services[n] for n in OVERLAY_SERVICES)
    assert "8002:8000" in coordinator["ports"] and "8265:8265" in coordinator["ports"]
    assert listener["ports"] == ["11114:11114"]
    assert "ports" not in worker and "container_name" not in worker, "--scale ray-worker=N needs both absent"
    assert coordinator["command"] == ["spanner", "run", "--head"]
    assert worker["command"] == ["spanner", "worker"] and listener["command"] == ["spanner", "scp"]
    head = coordinator["environment"]
    assert worker["environment"]["RAY_ADDRESS"] == f"spanner-coordinator:{head['SPANNER_RAY_PORT']}"
    assert listener["environment"]["SPANNER_URL"] == f"http://spanner-coordinator:{head['SPANNER_HTTP_PORT']}"
    assert "/health" in " ".join(coordinator["healthcheck"]["test"])
    assert "/usr/bin/echoscu " in " ".join(listener["healthcheck"]["test"]), "dcmtk's, not pynetdicom's"
    for name in ("ray-worker", "dimse-scp-listener"):
        assert services[name]["depends_on"]["spanner-coordinator"] == {"condition": "service_healthy"}
    for name in ("postgres", "redis", "rabbitmq"):
        assert coordinator["depends_on"][name] == {"condition": "service_healthy"}
    for name in OVERLAY_SERVICES:
        limits = services[name]["deploy"]["resources"]["limits"]
        assert float(limits["cpus"]) > 0 and re.fullmatch(r"\d+[MG]", limits["memory"]), name


def test_logs_go_to_fluentd_under_the_seed_tags_and_switch_off() -> None:
    services = enterprise()["services"]
    for name in OVERLAY_SERVICES:
        logging = services[name]["logging"]
        assert logging["driver"] == "fluentd"
        assert logging["options"]["tag"] == f"axiom.{name.replace('-', '_')}.{{{{.Name}}}}"
        assert logging["options"]["fluentd-address"] == read_env_file()["FLUENTD_ADDRESS"]
    off = merge(load(BASE), load(ENTERPRISE), load(NO_FLUENTD))["services"]
    for name in OVERLAY_SERVICES:
        assert off[name]["logging"]["driver"] == "json-file"
        assert not any(key.startswith("fluentd") or key == "tag" for key in off[name]["logging"]["options"])


def test_every_spanner_service_runs_the_one_image_with_a_command_the_cli_has() -> None:
    model = merge(load(BASE), load(ENTERPRISE))["services"]
    runner = CliRunner()
    for name in SPANNER_SERVICES:
        service = model[name]
        assert service["build"] == {"context": "..", "dockerfile": "compose/Dockerfile"}, name
        assert service["image"] == "dicom-spanner:latest", name
        if name != "spanner-migrate":
            assert service["init"] is True, f"{name}: an init as PID 1 forwards SIGTERM and reaps"
        command = service["command"]
        assert command[0] == "spanner"
        words = [w for w in command[1:] if not w.startswith("-")]
        result = runner.invoke(app, [*words, "--help"])
        assert result.exit_code == 0, f"{name}: `{' '.join(command)}` is not a command: {result.output}"
        for flag in (w for w in command[1:] if w.startswith("--")):
            assert flag in result.output, f"{name}: {flag} is not an option of {' '.join(words)}"
    dockerfile = (COMPOSE_DIR / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", dockerfile, re.M)
    assert "dcmtk" in dockerfile and "pip install" in dockerfile


def test_every_variable_the_files_use_is_in_the_env_example() -> None:
    documented = set(read_env_file(ENV_EXAMPLE))
    for path in FILES:
        assert variables_used(path) <= documented, f"{path.name}: {variables_used(path) - documented}"
