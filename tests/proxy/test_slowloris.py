"""5,000 idle pre-authentication connections (a slowloris spread over 100
addresses) cost bounded memory and do not stop a legitimate login."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from tests.proxy.running import authgate_process, command, logged_in_session

pytestmark = pytest.mark.asyncio

HELD = 5000
SOURCES = 100  # 127.1.0.1 .. 127.1.0.100, 50 connections each (the per-address cap)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def open_idle(port: int, count: int) -> list[socket.socket]:
    held = []
    for i in range(count):
        source = f"127.1.0.{1 + i % SOURCES}"
        sock = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
        held.append(sock)
    return held


async def test_slowloris_does_not_block_a_legitimate_login(tmp_path: Path) -> None:
    async with authgate_process(
        tmp_path, limits="idle_timeout = 600\npreauth_timeout = 600\nmax_connections = 20000"
    ) as run:
        assert run.proc is not None
        # warm up: one full session so lazily imported code is in the baseline
        reader, writer = await logged_in_session(run.port)
        await command(reader, writer, "z", "LOGOUT")
        writer.close()
        await asyncio.sleep(0.5)
        before = rss_kib(run.proc.pid)
        held = await asyncio.to_thread(open_idle, run.port, HELD)
        try:
            # every held connection has been greeted: the proxy really holds them
            await asyncio.to_thread(lambda: [s.recv(512) for s in held])
            after = rss_kib(run.proc.pid)
            per_connection = (after - before) * 1024 / HELD
            print(f"\nmemory per idle pre-auth connection: {per_connection:.0f} bytes "
                  f"(RSS {before} KiB -> {after} KiB with {HELD} held)")
            reader, writer = await logged_in_session(run.port)
            assert (await command(reader, writer, "b", "SELECT INBOX"))[-1].startswith(b"b OK")
            writer.close()
            # Bounded: no per-connection buffer grows while a client idles.
            assert per_connection < 64 * 1024
        finally:
            for sock in held:
                sock.close()
