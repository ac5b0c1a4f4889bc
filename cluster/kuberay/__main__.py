"""``python -m cluster.kuberay`` writes cluster/kuberay/rayservice.yaml; ``--check`` only compares."""

from __future__ import annotations

import argparse
import sys

from cluster.kuberay import MANIFEST, render


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.kuberay", description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed manifest is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not MANIFEST.exists() or MANIFEST.read_text() != text:
            print(f"{MANIFEST} is stale: run `python -m cluster.kuberay`", file=sys.stderr)
            return 1
        return 0
    MANIFEST.write_text(text)
    print(f"wrote {MANIFEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
