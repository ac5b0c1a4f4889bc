"""Delay relays standing for a WAN hop: each listens on loopback and forwards to one archive, holding
client-to-archive bytes for ``--delay-ms`` (answers flow back at once). The kernel here has no netem.

Run as a helper process: prints one JSON line {"ports": [relay port per target]} once listening, then
relays until its stdin closes. Loopback only, both sides.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import sys

LOOPBACK = "127.0.0.1"


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    """Copy until EOF; with a delay, each chunk is written ``delay_s`` after it was read, in order."""
    loop = asyncio.get_running_loop()
    try:
        while data := await reader.read(65536):
            if delay_s:
                loop.call_later(delay_s, _write, writer, data)
            else:
                writer.write(data)
        if delay_s:
            loop.call_later(delay_s, _close, writer)
        else:
            _close(writer)
    except (ConnectionError, OSError):
        _close(writer)


def _write(writer: asyncio.StreamWriter, data: bytes) -> None:
    if not writer.is_closing():
        writer.write(data)


def _close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.close()


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def start_relay(target_port: int, delay_s: float) -> asyncio.Server:
    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            archive_reader, archive_writer = await asyncio.open_connection(LOOPBACK, target_port)
        except OSError:
            _close(client_writer)
            return
        _nodelay(client_writer)
        _nodelay(archive_writer)
        await asyncio.gather(_pipe(client_reader, archive_writer, delay_s),
                             _pipe(archive_reader, client_writer, 0.0))

    return await asyncio.start_server(handle, LOOPBACK, 0, backlog=128)


async def _main(targets: list[int], delay_s: float) -> None:
    servers = [await start_relay(port, delay_s) for port in targets]
    print(json.dumps({"ports": [int(s.sockets[0].getsockname()[1]) for s in servers]}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the driver goes away
    for server in servers:
        server.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--targets", required=True, help="comma-separated archive ports on 127.0.0.1")
    parser.add_argument("--delay-ms", type=float, default=50.0)
    args = parser.parse_args(argv)
    asyncio.run(_main([int(p) for p in args.targets.split(",") if p], args.delay_ms / 1000))


if __name__ == "__main__":
    main()
