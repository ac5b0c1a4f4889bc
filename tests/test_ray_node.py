"""cli/ray_node.py: the `ray start` commands of `spanner run --head` and `spanner worker`; ending a node."""

from __future__ import annotations

import time

import pytest

from cli.ray_node import RAY_CLI, RayNode, RayNodeError, RayNodeOptions, head_command, worker_command
from cluster.ray_runtime import descendants, identities


def test_commands_carry_the_node_address_and_the_extra_options() -> None:
    options = RayNodeOptions(node_ip="10.1.2.3", extra_args="--num-cpus=0 --labels='site=east'")
    head = head_command(options, 6390, "0.0.0.0", 8266)
    assert head[:len(RAY_CLI)] == list(RAY_CLI)
    assert head[len(RAY_CLI):len(RAY_CLI) + 2] == ["start", "--head"]
    for arg in ("--port=6390", "--dashboard-host=0.0.0.0", "--dashboard-port=8266", "--block",
                "--node-ip-address=10.1.2.3", "--num-cpus=0", "--labels=site=east"):
        assert arg in head
    worker = worker_command(RayNodeOptions(), "head:6379")
    assert "--address=head:6379" in worker and "--head" not in worker
    assert not any(arg.startswith("--node-ip-address") for arg in worker), "Ray picks the address"


def test_a_node_whose_ray_start_ends_says_so() -> None:
    node = RayNode(["sh", "-c", "exit 3"])
    node.start()
    with pytest.raises(RayNodeError, match="ended with code 3"):
        node.wait_listening("127.0.0.1:1", timeout_s=30)
    node.stop()


def test_stopping_a_node_ends_everything_below_it() -> None:
    # A child that ignores SIGTERM, as a stuck raylet might: it is ended by PID after the grace.
    node = RayNode(["sh", "-c", "sh -c 'trap \"\" TERM; sleep 60' & sleep 60 & wait"])
    node.start()
    assert node.process is not None
    deadline = time.monotonic() + 10
    while len(descendants(node.process.pid)) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)  # the shell forks its children
    below = descendants(node.process.pid)
    assert len(below) >= 3
    node.stop(grace_s=0.5)
    assert node.process.poll() is not None
    deadline = time.monotonic() + 5
    while identities(below) and time.monotonic() < deadline:
        time.sleep(0.05)  # SIGKILL lands a moment after it is sent
    assert identities(below) == {}, "a process below the node is still alive"
