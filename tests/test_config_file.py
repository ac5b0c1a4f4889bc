"""Loading nodes and spans from YAML: upserts, and errors that point at the file and the entry."""

from __future__ import annotations

from pathlib import Path

import pytest

from spanner.config_file import apply_config, load_config
from spanner.errors import ConfigError
from spanner.schemas import FailureStrategy, NodeIn, SpanIn
from spanner.storage import Repository, create_schema, make_engine

GOOD = """
nodes:
  - name: east
    ae_title: PACS_EAST
    host: 10.0.0.5
    port: 104
    additional_filters: {"00080080": "EAST*"}
  - {name: west, ae_title: PACS_WEST, host: pacs-west.example.org, port: 11112, priority: 10}
spans:
  - name: radiology
    ae_title: SPAN_RAD
    nodes: [east, west]
    failure_strategy: minimum
    minimum_nodes: 1
  - {name: all, ae_title: SPANNER, timeout_s: 20}
"""


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    engine = make_engine(f"sqlite:///{tmp_path / 'spanner.db'}")
    create_schema(engine)
    repo = Repository(engine)
    repo.ensure_default_span()
    return repo


def write(tmp_path: Path, text: str, name: str = "spanner.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_apply_creates_then_replaces(repo: Repository, tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    report = apply_config(repo, path)
    assert report.created == ["node 'east'", "node 'west'", "span 'radiology'"]
    assert report.replaced == ["span 'all'"]
    assert repo.get_node("east").additional_filters == {"InstitutionName": "EAST*"}
    rad = repo.get_span("radiology")
    assert rad.nodes == ["east", "west"] and rad.failure_strategy is FailureStrategy.MINIMUM
    assert repo.get_span("all").timeout_s == 20

    write(tmp_path, GOOD.replace("port: 104", "port: 4242"))
    again = apply_config(repo, path)
    assert again.created == []
    assert len(again.replaced) == 4
    assert repo.get_node("east").port == 4242


def test_apply_leaves_unmentioned_entries(repo: Repository, tmp_path: Path) -> None:
    repo.create_node(NodeIn.model_validate({"name": "old", "ae_title": "OLD", "host": "h", "port": 1}))
    apply_config(repo, write(tmp_path, GOOD))
    assert {n.name for n in repo.list_nodes()} == {"old", "east", "west"}


def test_span_may_use_existing_nodes(repo: Repository, tmp_path: Path) -> None:
    repo.create_node(NodeIn.model_validate({"name": "old", "ae_title": "OLD", "host": "h", "port": 1}))
    apply_config(repo, write(tmp_path, "spans:\n  - {name: legacy, ae_title: LEGACY, nodes: [old]}\n"))
    assert repo.get_span("legacy").nodes == ["old"]


def test_bad_entry_names_file_and_entry(repo: Repository, tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("ae_title: PACS_EAST", "ae_title: PACS_EAST_TOO_LONG_X"))
    with pytest.raises(ConfigError) as info:
        apply_config(repo, path)
    message = str(info.value)
    assert message.startswith(f"{path}: nodes[0] ('east'): ae_title: 'PACS_EAST_TOO_LONG_X' is 20 characters")
    assert repo.list_nodes() == []  # nothing applied


def test_bad_span_entry(repo: Repository, tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("    minimum_nodes: 1\n", ""))
    with pytest.raises(ConfigError, match=r"spans\[0\] \('radiology'\): minimum_nodes: required"):
        apply_config(repo, path)


def test_unknown_node_in_span_writes_nothing(repo: Repository, tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("nodes: [east, west]", "nodes: [east, ghost]"))
    with pytest.raises(ConfigError, match=r"spans\[0\] \('radiology'\): unknown node\(s\) 'ghost'"):
        apply_config(repo, path)
    assert repo.list_nodes() == []


def test_repository_refusal_is_blamed_on_the_entry(repo: Repository, tmp_path: Path) -> None:
    repo.create_node(NodeIn.model_validate({"name": "old", "ae_title": "OLD", "host": "h", "port": 1}))
    repo.create_span(SpanIn.model_validate({"name": "taken", "ae_title": "SPAN_RAD", "nodes": ["old"]}))
    path = write(tmp_path, GOOD)
    with pytest.raises(ConfigError, match=r"spans\[0\] \('radiology'\): AE title 'SPAN_RAD' is already used"):
        apply_config(repo, path)


@pytest.mark.parametrize("text,expected", [
    ("nodes: [\n", "not valid YAML"),
    ("- just a list\n", "must be a mapping"),
    ("nodez: []\n", "unknown section(s) 'nodez'"),
    ("nodes: {name: east}\n", "'nodes' must be a list"),
    ("nodes:\n  - east\n", "nodes[0]: an entry must be a mapping"),
    ("nodes:\n  - {name: east, ae_title: E, host: h, port: 0}\n",
     "nodes[0] ('east'): port: 0 is out of range"),
    ("nodes:\n  - {name: east, ae_title: E, host: h, port: 1, colour: red}\n",
     "nodes[0] ('east'): colour: Extra inputs are not permitted"),
    ("nodes:\n  - {name: e, ae_title: E, host: h, port: 1}\n  - {name: e, ae_title: F, host: h, port: 2}\n",
     "nodes[1] ('e'): the name is declared twice"),
    ("spans:\n  - {name: a1, ae_title: X, nodes: [n]}\n  - {name: a2, ae_title: X, nodes: [n]}\n",
     "spans[1] ('a2'): AE title 'X' is also used by span 'a1'"),
    ("nodes:\n  - {name: e, ae_title: E, host: h, port: 1, additional_filters: {Foo: x}}\n",
     "additional_filters: unknown DICOM keyword 'Foo'"),
])
def test_load_errors(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ")
    assert expected in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_empty_file(repo: Repository, tmp_path: Path) -> None:
    report = apply_config(repo, write(tmp_path, "# nothing yet\n"))
    assert report.created == [] and report.replaced == []
    assert load_config(write(tmp_path, "nodes:\nspans:\n", "b.yaml")).nodes == []
