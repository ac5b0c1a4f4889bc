"""Helper process hosting several simulated PACS for the benchmarks (see common.SimFleet).

Prints one JSON line {"ports": {index: port}} once listening, then serves until its stdin closes
(the driver ended, however it ended) or its lifetime runs out, and stops its simulators.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading

from simulator import pynetdicom_internals
from simulator.dataset import generate_uniform
from simulator.fleet import stop_fleet
from simulator.scp import SimulatedPacs, SimulatorBase, SimulatorConfig
from simulator.wire import WireSimulatedPacs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--indexes", required=True, help="comma-separated node indexes to host")
    parser.add_argument("--studies", type=int, default=20, help="distinct studies (STUDY matches) per node")
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--poll-ms", type=float, default=5.0,
                        help="association polling of the simulated PACS (pynetdicom's default is 1 ms)")
    parser.add_argument("--engine", choices=("wire", "pynetdicom"), default="wire",
                        help="wire: the lean asyncio simulator; pynetdicom: the one the tests use by default")
    parser.add_argument("--lifetime-s", type=float, default=3600.0, help="stop after this long regardless")
    args = parser.parse_args(argv)
    indexes = [int(i) for i in args.indexes.split(",") if i]
    pynetdicom_internals.quiet_handlers()  # a PACS stand-in should cost as little CPU as it can
    fleet: list[SimulatorBase] = []
    try:
        for index in indexes:
            config = SimulatorConfig(ae_title=f"SIM{index:03d}", port=0, latency_ms=args.latency_ms,
                                     jitter_ms=args.jitter_ms, seed=args.seed + index,
                                     poll_ms=args.poll_ms or None)
            engine = WireSimulatedPacs if args.engine == "wire" else SimulatedPacs
            pacs = engine(config, generate_uniform(args.seed, index, studies=args.studies))
            pacs.start()
            fleet.append(pacs)
        ports = {str(i): pacs.port for i, pacs in zip(indexes, fleet, strict=True)}
        print(json.dumps({"ports": ports}), flush=True)
        done = threading.Event()

        def watch_stdin() -> None:
            sys.stdin.read()  # returns at EOF: the driver closed the pipe or died
            done.set()

        threading.Thread(target=watch_stdin, daemon=True).start()
        done.wait(args.lifetime_s)
    finally:
        stop_fleet(fleet)


if __name__ == "__main__":
    main()
