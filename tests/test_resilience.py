"""Node actors outlive a Serve replica, come back when they die, and are found again by their callers."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import ray

from actors import registry
from simulator.dataset import generate_fleet
from simulator.scp import SimulatedPacs, SimulatorConfig
from tests.conftest import Api


@pytest.fixture(scope="module")
def node(api: Api) -> Iterator[str]:
    instances = generate_fleet(seed=9, nodes=1, patients=3)[0]
    with SimulatedPacs(SimulatorConfig(ae_title="RES"), instances) as sim:
        api.add_node("resilient", sim.port, ae_title="RES")
        yield "resilient"
        api.http.delete("/api/v1/nodes/resilient")


def ok(api: Api, node: str) -> bool:
    status, answer = api.query(level="STUDY", nodes=[node], timeout_s=5)
    return status == 200 and answer["nodes"][0]["status"] == "ok"  # type: ignore[index]


def test_a_dead_node_actor_is_restarted_and_found_again(api: Api, node: str) -> None:
    assert ok(api, node)
    handle = registry.lookup(node, api.namespace)
    ray.kill(handle, no_restart=False)  # the process dies; Ray restarts the actor
    deadline = time.monotonic() + 60
    while not ok(api, node):
        assert time.monotonic() < deadline, "the node never answered again after its actor died"
        time.sleep(0.5)


def test_node_actors_survive_the_restart_of_a_serve_replica(api: Api, node: str) -> None:
    before = registry.lookup(node, api.namespace)
    assert before is not None
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if a["namespace"] == "serve" and "SERVE_REPLICA::spanner#Ingress" in a["name"]]
    assert replicas, "the ingress replica should be a named actor in the serve namespace"
    ray.kill(ray.get_actor(replicas[0]["name"], namespace="serve"), no_restart=True)
    deadline = time.monotonic() + 90
    while True:
        try:
            if ok(api, node):
                break
        except Exception:  # the proxy answers 5xx or drops while the replica is replaced
            pass
        assert time.monotonic() < deadline, "the app did not come back after its replica died"
        time.sleep(0.5)
    after = registry.lookup(node, api.namespace)
    assert after is not None and after._actor_id == before._actor_id  # the same actor, not a new one
