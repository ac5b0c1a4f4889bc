"""Loopback port helpers: tests bind only to 127.0.0.1 and never assume a fixed port is free."""

from __future__ import annotations

import random
import re
import socket
import subprocess
import time
from pathlib import Path

from cluster.ray_runtime import descendants

__all__ = ["descendants"]  # every process below a PID, from /proc (one implementation, the launcher's)

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (bind port 0, read it back, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def free_port_block(count: int) -> int:
    """Return the first of ``count`` consecutive ports on 127.0.0.1 that were all free a moment ago.

    The block comes from below the kernel's ephemeral range (``ip_local_port_range``), where
    ``bind(0)`` and outgoing connections take their ports, so another test's client socket cannot
    land inside it between this check and the caller's bind.
    """
    low, _ = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    if low <= 10000 + count:
        raise RuntimeError(f"the ephemeral port range starts at {low}: no room below it for a port block")
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(10000, low - count)
        held: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                held.append(sock)
                sock.bind((LOOPBACK, port))
            return base
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise RuntimeError(f"no {count} consecutive free ports below {low} on {LOOPBACK}")


def port_accepts(port: int, host: str = LOOPBACK, timeout: float = 0.2) -> bool:
    """True when a TCP connection to host:port succeeds now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(
    port: int, host: str = LOOPBACK, deadline_s: float = 5.0, interval_s: float = 0.01
) -> float:
    """Wait until host:port accepts connections; return the seconds waited or raise TimeoutError.

    Polls rather than sleeping a fixed time, so a fast server costs a few milliseconds.
    """
    start = time.monotonic()
    end = start + deadline_s
    while True:
        if port_accepts(port, host):
            return time.monotonic() - start
        if time.monotonic() >= end:
            raise TimeoutError(f"{host}:{port} did not accept connections within {deadline_s:.1f} s")
        time.sleep(interval_s)


class ClosedPort:
    """A loopback port that refuses connections for as long as this object lives.

    The socket is bound but never listens, so no other process can take the port and a connect gets
    RST at once: a PACS that is down, without the race of a port that was free a moment ago.
    """

    def __init__(self) -> None:
        import socket

        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind((LOOPBACK, 0))
        self.port: int = int(self._sock.getsockname()[1])

    def release(self) -> None:
        """Free the port, e.g. so a test can start a PACS on it."""
        self._sock.close()


class SilentPort:
    """A loopback port whose kernel completes the TCP handshake (it listens) but that never reads or
    answers: a node that accepts the connection and never sends an A-ASSOCIATE-AC."""

    def __init__(self) -> None:
        import socket

        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind((LOOPBACK, 0))
        self._sock.listen(16)
        self.port: int = int(self._sock.getsockname()[1])

    def release(self) -> None:
        self._sock.close()


_LOOPBACK = re.compile(r"^(127\.\d+\.\d+\.\d+|\[::1\]|\[::ffff:127\.\d+\.\d+\.\d+\]):\d+$")


def off_loopback(pids: set[int]) -> list[str]:
    """TCP connections of these processes whose either end is not a loopback address."""
    table = subprocess.run(["ss", "-tnpH"], capture_output=True, text=True, check=True).stdout
    bad = []
    for line in table.splitlines():
        fields = line.split()
        owners = {int(pid) for pid in re.findall(r"pid=(\d+)", line)}
        if len(fields) >= 5 and owners & pids and not all(_LOOPBACK.match(a) for a in fields[3:5]):
            bad.append(line)
    return bad


def listening_off_loopback(pids: set[int]) -> list[str]:
    """Listening TCP sockets of these processes bound to anything but a loopback address (``*``,
    ``[::]``, ``0.0.0.0`` or an interface address): each one is reachable from the network."""
    table = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    bad = []
    for line in table.splitlines():
        fields = line.split()
        owners = {int(pid) for pid in re.findall(r"pid=(\d+)", line)}
        if len(fields) >= 4 and owners & pids and not _LOOPBACK.match(fields[3]):
            bad.append(line)
    return bad
