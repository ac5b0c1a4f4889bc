"""The demo fleet: three simulated PACS over one shared universe, for demos and end-to-end tests."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, replace

from simulator.dataset import generate_fleet
from simulator.scp import SimulatedPacs, SimulatorBase, SimulatorConfig


@dataclass(frozen=True, slots=True)
class DemoNode:
    """One demo node: its spanner node name, its AE title and its port offset from ``base_port``."""

    name: str
    ae_title: str
    port_offset: int


DEMO_NODES: tuple[DemoNode, ...] = (
    DemoNode("demo-a", "SIM_A", 0),
    DemoNode("demo-b", "SIM_B", 1),
    DemoNode("demo-c", "SIM_C", 2),
)


def start_demo_fleet(base_port: int | None = None, seed: int = 42,
                     config: SimulatorConfig | None = None) -> list[SimulatedPacs]:
    """Start SIM_A, SIM_B and SIM_C on ``base_port`` +0/+1/+2 (free ports when None).

    ``config`` supplies everything but AE title and port (latency, faults, host). If one node
    cannot start, the ones already started are stopped before the error propagates.
    """
    universe = generate_fleet(seed, len(DEMO_NODES))
    template = config or SimulatorConfig()
    fleet: list[SimulatedPacs] = []
    try:
        for node, instances in zip(DEMO_NODES, universe, strict=True):
            port = 0 if base_port is None else base_port + node.port_offset
            pacs = SimulatedPacs(replace(template, ae_title=node.ae_title, port=port), instances)
            pacs.start()
            fleet.append(pacs)
    except BaseException:
        stop_fleet(fleet)
        raise
    return fleet


def demo_study_uid(seed: int = 42) -> str:
    """A study of the demo fleet held by the most nodes (split or mirrored across them): the one the
    banner's movescu line asks for."""
    holders: dict[str, set[int]] = {}
    for node, instances in enumerate(generate_fleet(seed, len(DEMO_NODES))):
        for ds in instances:
            holders.setdefault(str(ds.StudyInstanceUID), set()).add(node)
    return max(sorted(holders), key=lambda uid: len(holders[uid]))


def stop_fleet(fleet: Iterable[SimulatorBase]) -> None:
    """Stop every simulator in parallel (each stop waits up to 0.5 s for pynetdicom's server loop)."""
    threads = [threading.Thread(target=pacs.stop, name=f"stop-{pacs.ae_title}") for pacs in fleet]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
