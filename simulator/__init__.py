"""Simulated PACS for tests, demos and benchmarks: seeded data, C-FIND matching, and two SCPs serving them:
one on the spanner's DIMSE engine (``wire``), one on pynetdicom (``scp``).

Names are re-exported lazily so that ``import simulator.matching`` does not pull in
pynetdicom, and nothing is generated at import time.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from simulator.dataset import generate_fleet, generate_uniform, to_file_dataset, write_part10
    from simulator.fleet import DEMO_NODES, DemoNode, start_demo_fleet, stop_fleet
    from simulator.index import IdentifierError, Index
    from simulator.scp import Counters, SimulatedPacs, SimulatorConfig, enable_nodelay, serve_forever
    from simulator.wire import WireSimulatedPacs

_EXPORTS = {
    "generate_fleet": "dataset", "generate_uniform": "dataset", "to_file_dataset": "dataset",
    "write_part10": "dataset", "DEMO_NODES": "fleet", "DemoNode": "fleet", "start_demo_fleet": "fleet",
    "stop_fleet": "fleet", "IdentifierError": "index", "Index": "index", "Counters": "scp",
    "SimulatedPacs": "scp", "SimulatorConfig": "scp", "enable_nodelay": "scp", "serve_forever": "scp",
    "WireSimulatedPacs": "wire",
}
__all__ = [
    "DEMO_NODES", "Counters", "DemoNode", "IdentifierError", "Index", "SimulatedPacs", "SimulatorConfig",
    "WireSimulatedPacs",
    "enable_nodelay", "generate_fleet", "generate_uniform", "serve_forever", "start_demo_fleet", "stop_fleet",
    "to_file_dataset", "write_part10",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
