"""The spanner on a real multi-node Ray cluster, and the files that deploy it on one.

The cluster scenario (tests/ray_cluster_scenario.py: a Ray head and two labelled worker nodes, the Serve
app with two ingress replicas, three simulated archives) runs once, in a process of its own -- this
session's Ray instance (conftest) and a second cluster cannot share one driver -- and each test below
checks one part of its JSON report.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from actors.placement import RayNode, actor_options, unplaceable_reason

ROOT = Path(__file__).resolve().parent.parent
SCENARIO_TIMEOUT_S = 420  # about 100 s on a quiet machine; this one is often shared
pytestmark = pytest.mark.timeout(SCENARIO_TIMEOUT_S + 60)  # the first test's set-up runs the scenario


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR")}
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.ray_cluster_scenario"], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=SCENARIO_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the group this test started, nothing else
        process.communicate()
        pytest.fail(f"the cluster scenario took longer than {SCENARIO_TIMEOUT_S} s")
    tail = "\n".join(line for line in err.splitlines() if "[state-dump]" not in line)[-4000:]
    assert process.returncode == 0, f"the cluster scenario failed:\n{tail}"
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    (tmp_path_factory.mktemp("cluster") / "report.json").write_text(json.dumps(result, indent=1))
    return result


def test_same_answers_on_one_ray_node_and_on_three(report: dict[str, Any]) -> None:
    answers = report["answers"]
    assert answers["statuses"] == ["success"] * 3
    assert all(total > 0 for total in answers["totals"])
    assert answers["equal"]


def test_node_actors_spread_over_the_ray_nodes(report: dict[str, Any]) -> None:
    spread = report["spread"]
    assert len(spread["ray_nodes"]) == 3
    placed_on = set(spread["actors"].values())
    assert placed_on <= set(spread["ray_nodes"])
    # Ray calls SPREAD best effort; three actors have landed one per Ray node in every run so far.
    assert len(placed_on) >= 2, spread


def test_a_site_archive_runs_on_its_sites_ray_node_only(report: dict[str, Any]) -> None:
    placement = report["placement"]
    assert placement["east_actor_on"] == placement["east_node"]
    assert placement["query_nodes"]["east-pacs"][0] == "ok"


def test_a_placement_no_ray_node_offers_answers_unplaceable_at_once(report: dict[str, Any]) -> None:
    placement = report["placement"]
    assert placement["north_post_s"] < 5.0  # creating the node does not wait for its actor to run
    assert placement["north_ready"] == "unplaceable"
    assert "site=north" in placement["north_reason"] and "site=east" in placement["north_reason"]
    assert placement["ready_status"] == "ready"  # a missing site is reported, not unreadiness
    status, elapsed_ms, error = placement["query_nodes"]["north-pacs"]
    assert status == "unplaceable" and "ray start --labels site=north" in error
    assert elapsed_ms == 0.0
    assert placement["query_code"] == 200 and placement["query_status"] == "partial"
    assert placement["query_elapsed_ms"] < 3000  # the query's deadline: nothing waited for the actor


def test_losing_a_worker_node_during_queries(report: dict[str, Any]) -> None:
    kill = report["node_kill"]
    assert kill["victim_actors"], "no node actor ran on the worker node that was killed"
    assert kill["failed_requests"] == 0
    # The spanner's own measure, fan-out to merged answer; the client's (the proxy hop and this loaded
    # machine's scheduling of the client included) is reported beside it in the README's figures.
    assert kill["spanner_later_than_deadline_plus_1"] == 0, kill
    assert kill["complete_again_s"] <= 10.0, kill
    assert set(kill["incomplete_statuses"]) <= {"timeout", "failed"}
    assert kill["nodes_alive_after"] == 2
    for actor, where in kill["moved_to"].items():
        assert where and where != kill["victim_id"], f"{actor} did not come back on another Ray node"


def test_losing_one_of_two_ingress_replicas(report: dict[str, Any]) -> None:
    kill = report["replica_kill"]
    assert kill["requests"] > 10
    assert kill["failed_not_in_flight"] == 0, kill
    assert kill["failed"] <= kill["in_flight_at_kill"]
    assert kill["replicas_after"] == 2


def test_the_spanners_metrics_are_in_rays_prometheus_endpoint(report: dict[str, Any]) -> None:
    metrics = report["metrics"]
    nodes = {"pacs-0", "pacs-1", "pacs-2"}
    for name in ("ray_spanner_node_query_latency_ms_bucket", "ray_spanner_node_outcomes_total"):
        tagged = {json.loads(labels).get("node") for labels in metrics.get(name, [])}
        assert nodes <= tagged, f"{name} per node: {sorted(tagged - {None})}"
    for name in ("ray_spanner_span_query_latency_ms_bucket", "ray_spanner_span_queries_total"):
        assert any(json.loads(labels).get("span") == "all" for labels in metrics.get(name, [])), name


def test_every_metric_of_the_grafana_dashboard_is_scraped(report: dict[str, Any]) -> None:
    dashboard = json.loads((ROOT / "cluster" / "grafana-dashboard.json").read_text())
    text = json.dumps(dashboard)
    named = set(re.findall(r"ray_spanner_[a-z_]+", text))
    assert len(named) >= 6
    assert named <= set(report["metrics"]), sorted(named - set(report["metrics"]))
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert any("by (node" in e for e in exprs) and any("by (span" in e for e in exprs)


def test_the_cluster_talks_only_over_loopback(report: dict[str, Any]) -> None:
    assert report["off_loopback"] == []


def test_the_scenario_left_no_process_behind(report: dict[str, Any]) -> None:
    """Every Ray process of the cluster names the scenario's temp dir on its command line."""
    left = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().decode(errors="replace")
        except OSError:
            continue  # ended meanwhile
        if report["temp_dir"] in text:
            left.append(f"{cmdline.parent.name}: {text[:120]}")
    assert not left, left
    assert not Path(report["temp_dir"]).exists()


# -- without a cluster --------------------------------------------------------------------------------------
def test_placement_is_met_only_by_an_alive_ray_node_with_every_label() -> None:
    east = RayNode("n1", "127.0.0.1", True, {"site": "east", "zone": "a"})
    dead_west = RayNode("n2", "127.0.0.1", False, {"site": "west"})
    assert unplaceable_reason((), [east]) is None
    assert unplaceable_reason((("site", "east"),), [east]) is None
    assert unplaceable_reason((("site", "east"), ("zone", "a")), [east]) is None
    why = unplaceable_reason((("site", "west"),), [east, dead_west])
    assert why is not None and "site=west" in why and "site=east,zone=a" in why
    assert unplaceable_reason((("site", "east"), ("zone", "b")), [east]) is not None


def test_node_actors_spread_and_carry_their_placement_as_a_label_selector() -> None:
    assert actor_options(()) == {"num_cpus": 0.001, "scheduling_strategy": "SPREAD"}
    assert actor_options((("site", "east"),))["label_selector"] == {"site": "east"}


def test_the_rayservice_manifest_is_generated_from_the_serve_config() -> None:
    from cluster.kuberay import MANIFEST, SITES, render

    assert MANIFEST.read_text() == render(), "stale: run `python -m cluster.kuberay`"
    service = yaml.safe_load(MANIFEST.read_text())
    serve_config = yaml.safe_load((ROOT / "cluster" / "serve_config.yaml").read_text())
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert embedded["applications"] == serve_config["applications"]
    assert embedded["proxy_location"] == serve_config["proxy_location"]
    assert embedded["http_options"]["host"] == "0.0.0.0"  # reachable from the pod's service
    groups = {g["groupName"]: g for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    for site in SITES:
        assert groups[f"site-{site}"]["rayStartParams"]["labels"] == f"site={site}"
    assert "labels" not in groups["general"]["rayStartParams"]
    assert service["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_the_manifest_check_command_fails_when_stale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cluster.kuberay.__main__ as command

    stale = tmp_path / "rayservice.yaml"
    stale.write_text("kind: RayService\n")
    monkeypatch.setattr(command, "MANIFEST", stale)
    assert command.main(["--check"]) == 1
    assert command.main([]) == 0
    assert command.main(["--check"]) == 0
