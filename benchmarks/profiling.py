"""py-spy sampling of the spanner's processes while a benchmark drives them, summarised by frame.

Used by ``--profile`` of fanout and throughput: one ``py-spy record --format raw`` per process (the
ingress replica, the HTTP proxy, one node actor), then the functions holding the most samples.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path


def py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def start(pids: dict[str, int], seconds: float, out_dir: Path,
          rate: int = 250) -> list[subprocess.Popen[bytes]]:
    """One sampler per named PID for ``seconds`` (idle threads left out); each ends by itself."""
    exe = py_spy()
    if exe is None:
        print("py-spy not found; no profile")
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for role, pid in pids.items():
        cmd = [exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
               "--rate", str(rate), "--format", "raw", "--output", str(out_dir / f"{role}.txt"),
               "--nonblocking"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs


def wait(procs: list[subprocess.Popen[bytes]], timeout_s: float = 60.0) -> None:
    for proc in procs:
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait(timeout=5)


# Leaves that are a thread blocked in native code, which py-spy cannot tell from work: Ray's core worker
# loop in every worker's main thread.
BLOCKED_LEAVES = ("Worker.main_loop (worker.py",)


def summary(path: Path, top: int = 12) -> list[tuple[str, float, float]]:
    """(function, % of busy samples with it on the stack, % where it is the leaf), busiest leaves first."""
    inclusive: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    total = 0
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(frame) for frame in stack.split(";")]
        if frames[-1].startswith(BLOCKED_LEAVES):
            continue
        total += count
        for frame in set(frames):
            inclusive[frame] += count
        leaf[frames[-1]] += count
    if total == 0:
        return []
    ranked = sorted(inclusive, key=lambda f: (leaf[f], inclusive[f]), reverse=True)[:top]
    return [(frame, 100.0 * inclusive[frame] / total, 100.0 * leaf[frame] / total) for frame in ranked]


def _short(frame: str) -> str:
    """'fn (path/to/module.py:12)' -> 'fn (module.py)': lines differ per call site, files do not."""
    name, _, where = frame.partition(" (")
    file = where.split(":", 1)[0].rsplit("/", 1)[-1].rstrip(")")
    return f"{name} ({file})" if file else name


def print_summary(out_dir: Path, top: int = 12) -> None:
    for path in sorted(out_dir.glob("*.txt")):
        rows = summary(path, top)
        print(f"\nprofile {path.stem} (% of busy samples, Ray's core worker loop left out: on stack / leaf):")
        for frame, incl, self_pct in rows:
            print(f"  {incl:5.1f}% {self_pct:5.1f}%  {frame}")
