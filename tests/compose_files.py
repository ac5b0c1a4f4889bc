"""The compose files as Docker Compose reads them, for tests that have no Docker engine to ask.

`load` interpolates a file with the variables of an env file (Compose's ``${VAR}``, ``${VAR:-default}``,
``${VAR-default}`` and ``$$``), `merge` lays an overlay over a base with Compose's merge rules for the keys
these files use, and `compose_schema` is the Compose Specification's JSON schema as the check-jsonschema
package ships it (from the compose-spec project, Apache-2.0, its licence beside it in that package).
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import re
from pathlib import Path
from typing import Any

import yaml

COMPOSE_DIR = Path(__file__).resolve().parent.parent / "compose"
BASE = COMPOSE_DIR / "docker-compose.yml"
ENTERPRISE = COMPOSE_DIR / "docker-compose.enterprise.yml"
NO_FLUENTD = COMPOSE_DIR / "docker-compose.no-fluentd.yml"
ENV_EXAMPLE = COMPOSE_DIR / ".env.example"

_VARIABLE = re.compile(r"\$(?:(?P<escaped>\$)"
                       r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?-)(?P<default>[^}]*))?\}"
                       r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")
_REPLACED = {"command", "entrypoint"}
"""Sequences an overlay replaces whole (other sequences are appended to, without repeats)."""


def read_env_file(path: Path = ENV_EXAMPLE) -> dict[str, str]:
    """KEY=VALUE lines of an env file; comments and blank lines skipped."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def variables_used(path: Path) -> set[str]:
    """The names of the variables a compose file interpolates (``$$`` escapes excluded)."""
    found = set()
    for m in _VARIABLE.finditer(path.read_text()):
        name = m.group("braced") or m.group("plain")
        if name:
            found.add(name)
    return found


def interpolate(value: Any, env: dict[str, str]) -> Any:
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(m: re.Match[str]) -> str:
        if m.group("escaped"):
            return "$"
        name = m.group("braced") or m.group("plain")
        given = env.get(name)
        if m.group("op") == ":-" and not given:
            return m.group("default")
        if m.group("op") == "-" and given is None:
            return m.group("default")
        return given or ""

    return _VARIABLE.sub(substitute, value)


def load(path: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """A compose file, interpolated with ``env`` (default: .env.example), YAML anchors resolved."""
    raw = yaml.safe_load(path.read_text())
    assert isinstance(raw, dict), f"{path.name} is not a mapping"
    result: dict[str, Any] = interpolate(raw, read_env_file() if env is None else env)
    return result


def _merge_logging(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Compose keeps the base's logging options only when the overlay keeps its driver."""
    if over.get("driver", base.get("driver")) != base.get("driver"):
        return copy.deepcopy(over)
    return _merge(base, over)


def _merge(base: Any, over: Any, key: str = "") -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        if key == "logging":
            return _merge_logging(base, over)
        merged = dict(base)
        for name, value in over.items():
            merged[name] = _merge(base[name], value, name) if name in base else copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(over, list) and key not in _REPLACED and key != "test":
        return base + [item for item in over if item not in base]
    return copy.deepcopy(over)


def merge(*files: dict[str, Any]) -> dict[str, Any]:
    """Files in `docker compose -f a -f b ...` order, merged into one model."""
    merged: dict[str, Any] = {}
    for model in files:
        merged = _merge(merged, model)
    return merged


def compose_schema() -> dict[str, Any]:
    schema_file = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema: dict[str, Any] = json.loads(schema_file.read_text())
    return schema


def active_services(model: dict[str, Any], profiles: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """The services `docker compose up` starts: those without profiles, or with an active one."""
    return {name: service for name, service in model["services"].items()
            if not service.get("profiles") or set(service["profiles"]) & set(profiles)}
