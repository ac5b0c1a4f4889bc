"""The `spanner` command against the running API: nodes, echo and a query table."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from simulator.dataset import generate_fleet
from simulator.scp import SimulatedPacs, SimulatorConfig
from tests.conftest import Api

runner = CliRunner()


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatedPacs]:
    instances = generate_fleet(seed=4, nodes=1, patients=3)[0]
    with SimulatedPacs(SimulatorConfig(ae_title="CLI_SIM"), instances) as s:
        yield s


def test_nodes_add_list_echo_query_remove(api: Api, sim: SimulatedPacs) -> None:
    url = ["--url", api.base_url]
    added = runner.invoke(app, ["nodes", "add", "cli-node", "CLI_SIM", "127.0.0.1", str(sim.port), *url])
    assert added.exit_code == 0, added.output
    try:
        listed = runner.invoke(app, ["nodes", "list", *url])
        assert listed.exit_code == 0 and "cli-node" in listed.output
        echoed = runner.invoke(app, ["nodes", "echo", "cli-node", *url])
        assert echoed.exit_code == 0 and "ok" in echoed.output
        queried = runner.invoke(app, ["query", "PATIENT", "-f", "PatientID=PAT*", "--span", "all", *url],
                                terminal_width=200)
        assert queried.exit_code == 0, queried.output
        assert "PAT00001" in queried.output and "cli-node" in queried.output
        bad = runner.invoke(app, ["query", "STUDY", "-f", "Nope=1", *url])
        assert bad.exit_code == 1 and "unknown DICOM keyword" in bad.output
    finally:
        removed = runner.invoke(app, ["nodes", "remove", "cli-node", *url])
        assert removed.exit_code == 0


def test_unreachable_api_says_so() -> None:
    result = runner.invoke(app, ["nodes", "list", "--url", "http://127.0.0.1:1"])
    assert result.exit_code == 1 and "cannot reach" in result.output


def test_ohif_without_the_viewer_says_how_to_get_it(tmp_path: Path) -> None:
    result = runner.invoke(app, ["ohif", "--dist", str(tmp_path), "--port", "0"])
    assert result.exit_code == 1
    assert "no OHIF viewer" in result.output and "make peers" in result.output
