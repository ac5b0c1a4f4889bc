"""Nodes and spans declared in a YAML file (``SPANNER_CONFIG``), applied at start-up.

The file is checked as a whole before anything is written, so a typo in the last span does not leave
half of the file applied; every error names the file and the entry, because whoever reads it is
looking at that file. Entries are upserted: created when missing, replaced when present. Nodes and
spans that the file does not mention are left alone.

    nodes:
      - {name: pacs-east, ae_title: PACS_EAST, host: 10.0.0.5, port: 104}
    spans:
      - {name: radiology, ae_title: SPAN_RAD, nodes: [pacs-east], failure_strategy: best_effort}
      - {name: all, ae_title: SPANNER, timeout_s: 20}   # policies of the built-in span
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from spanner.errors import ConfigError, Conflict, InvalidConfig, NotFound
from spanner.schemas import ALL_SPAN, NodeIn, NodePut, SpanIn, SpanPut, describe_errors
from spanner.storage.repository import Repository

M = TypeVar("M", bound=BaseModel)
E = TypeVar("E", NodeIn, SpanIn)
P = TypeVar("P", NodePut, SpanPut)
_SECTIONS = ("nodes", "spans")


@dataclass(frozen=True, slots=True)
class ConfigFile:
    """A validated configuration file."""

    path: Path
    nodes: list[NodeIn] = field(default_factory=list)
    spans: list[SpanIn] = field(default_factory=list)


@dataclass(slots=True)
class ConfigReport:
    """What applying a file did, for the start-up log ("node 'x'", "span 'y'")."""

    created: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)


def load_config(path: str | os.PathLike[str]) -> ConfigFile:
    """Read and validate the file; raises ConfigError naming the file and the failing entry."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{source}: configuration file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: cannot read the configuration file: {exc}") from exc
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if document is None:
        return ConfigFile(source)
    if not isinstance(document, dict):
        raise ConfigError(f"{source}: the file must be a mapping with 'nodes' and 'spans' lists, "
                          f"not {type(document).__name__}")
    unknown = sorted(str(key) for key in document if key not in _SECTIONS)
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {', '.join(map(repr, unknown))}; "
                          f"expected 'nodes' and 'spans'")
    nodes = [_entry(source, "nodes", i, raw, NodeIn) for i, raw in _items(source, document, "nodes")]
    spans = [_entry(source, "spans", i, raw, SpanIn) for i, raw in _items(source, document, "spans")]
    config = ConfigFile(source, nodes, spans)
    _check_unique(config)
    return config


def apply_config(repo: Repository, path: str | os.PathLike[str]) -> ConfigReport:
    """Upsert the file's nodes, then its spans; raises ConfigError before writing when the file is bad.

    StorageError passes through unchanged: an unreachable database is not the file's fault.
    """
    config = load_config(path)
    known = {node.name for node in repo.list_nodes()} | {node.name for node in config.nodes}
    for index, span in enumerate(config.spans):
        missing = [name for name in span.nodes if name not in known] if span.name != ALL_SPAN else []
        if missing:
            raise ConfigError(f"{config.path}: {_where('spans', index, span.name)}: unknown node(s) "
                              f"{', '.join(map(repr, missing))}; declare them under 'nodes' or create them "
                              f"first")

    report = ConfigReport()
    _upsert(config.path, "nodes", config.nodes, NodePut, repo.replace_node, repo.create_node, report)
    _upsert(config.path, "spans", config.spans, SpanPut, repo.replace_span, repo.create_span, report)
    return report


def _items(source: Path, document: dict[Any, Any], name: str) -> list[tuple[int, Any]]:
    value = document.get(name)
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{source}: '{name}' must be a list of entries, not {type(value).__name__}")
    return list(enumerate(value))


def _upsert(
    path: Path,
    section: str,
    entries: Sequence[E],
    put_model: type[P],
    replace: Callable[[str, P], object],
    create: Callable[[E], object],
    report: ConfigReport,
) -> None:
    """Replace each entry of one section, or create it where the database has none of that name."""
    kind = section.removesuffix("s")
    for index, entry in enumerate(entries):
        put = put_model.model_validate(entry.model_dump(exclude={"name"}))
        with _blame(path, _where(section, index, entry.name)):
            try:
                replace(entry.name, put)
                report.replaced.append(f"{kind} {entry.name!r}")
            except NotFound:
                create(entry)
                report.created.append(f"{kind} {entry.name!r}")


def _where(section: str, index: int, name: object) -> str:
    return f"{section}[{index}] ({name!r})" if isinstance(name, str) and name else f"{section}[{index}]"


def _entry(source: Path, section: str, index: int, raw: Any, model: type[M]) -> M:
    name = raw.get("name") if isinstance(raw, dict) else None
    where = _where(section, index, name)
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {where}: an entry must be a mapping of fields, not "
                          f"{type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {where}: {describe_errors(exc)}") from None


def _check_unique(config: ConfigFile) -> None:
    sections = (("nodes", [n.name for n in config.nodes]), ("spans", [s.name for s in config.spans]))
    for section, names in sections:
        seen: set[str] = set()
        for index, name in enumerate(names):
            if name in seen:
                raise ConfigError(f"{config.path}: {_where(section, index, name)}: the name is declared "
                                  f"twice")
            seen.add(name)
    holders: dict[str, str] = {}
    for index, span in enumerate(config.spans):
        if span.ae_title in holders:
            where = _where("spans", index, span.name)
            raise ConfigError(f"{config.path}: {where}: AE title {span.ae_title!r} is also used by span "
                              f"{holders[span.ae_title]!r}")
        holders[span.ae_title] = span.name


@contextmanager
def _blame(path: Path, where: str) -> Iterator[None]:
    """Turn a repository refusal into a ConfigError that points at the file's entry."""
    try:
        yield
    except (InvalidConfig, Conflict) as exc:
        raise ConfigError(f"{path}: {where}: {exc}") from exc
