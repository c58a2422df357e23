"""Out of file descriptors: `authgate run` with a limit of 128 and more
connections than that. The listener pauses and logs once per interval
(asyncio's own accept loop wrote tens of thousands of lines a second), the
established session goes on, and once the flood is gone new clients log in."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from tests.proxy.running import authgate_process, command, logged_in_session

pytestmark = pytest.mark.asyncio

OPEN_FILES = 128
FLOOD = 300  # connections, from 127.4.0.1 .. 127.4.0.100
HOLD = 3.0  # seconds the flood is held while out of descriptors


def open_flood(port: int) -> list[socket.socket]:
    """Connections the kernel completes (backlog) whether or not authgate
    can accept them."""
    return [
        socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(f"127.4.0.{1 + i % 100}", 0))
        for i in range(FLOOD)
    ]


async def test_out_of_descriptors_pauses_accepting_and_logs_little(tmp_path: Path) -> None:
    limits = "max_connections_per_address = 10000\nidle_timeout = 600\npreauth_timeout = 600"
    async with authgate_process(tmp_path, limits=limits, open_files=OPEN_FILES) as run:
        reader, writer = await logged_in_session(run.port)
        mark = len(run.stderr)
        flood = await asyncio.to_thread(open_flood, run.port)
        try:
            await asyncio.sleep(HOLD)
            # The established session is served while the listener waits.
            assert (await command(reader, writer, "n", "NOOP"))[-1].startswith(b"n OK")
            logged = bytes(run.stderr[mark:]).decode(errors="replace").splitlines()
            print(f"\n{len(logged)} lines logged in {HOLD:.0f}s out of descriptors:\n" + "\n".join(logged[:5]))
            assert any("cannot accept" in line for line in logged), logged[:20]  # it really ran out
            assert not any("out of system resource" in line for line in logged)
            assert sum("cannot accept" in line for line in logged) == 1
            assert len(logged) <= 10, logged[:20]
        finally:
            for sock in flood:
                sock.close()
        # Back to normal: the queued connections drain, a new client logs in.
        for _ in range(100):
            try:
                new_reader, new_writer = await asyncio.wait_for(logged_in_session(run.port), 10)
                break
            except (ConnectionError, TimeoutError, AssertionError):
                await asyncio.sleep(0.2)
        else:
            raise AssertionError("no new login after the flood ended")
        assert (await command(new_reader, new_writer, "s", "SELECT INBOX"))[-1].startswith(b"s OK")
        new_writer.close()
        writer.close()
