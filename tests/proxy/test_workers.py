"""`workers = 2`: two processes share the listening port (SO_REUSEPORT)
under a supervisor that restarts a dead worker and drains on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from tests.proxy.running import authgate_process, command, logged_in_session

pytestmark = pytest.mark.asyncio


def worker_pids(parent: int) -> list[int]:
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return sorted(int(pid) for pid in children)


async def wait_for(predicate, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        assert loop.time() < end, "condition not met in time"
        await asyncio.sleep(0.1)


async def test_two_workers_serve_restart_and_stop(tmp_path: Path) -> None:
    async with authgate_process(tmp_path) as run:
        assert run.proc is not None
        run.proc.terminate()
        await run.proc.wait()
        run.config.write_text("workers = 2\n" + run.config.read_text())
        run.stderr.clear()
        await run.start()
        assert run.proc is not None
        await run.wait_for_log(b"2 workers started")
        await wait_for(lambda: len(worker_pids(run.proc.pid)) == 2)  # type: ignore[union-attr]
        first, second = worker_pids(run.proc.pid)

        sessions = [await logged_in_session(run.port) for _ in range(6)]
        for i, (reader, writer) in enumerate(sessions):
            assert (await command(reader, writer, f"s{i}", "SELECT INBOX"))[-1].startswith(f"s{i} OK".encode())

        await asyncio.sleep(2.5)  # past the start-up grace (a worker dying sooner stops all)
        os.kill(first, signal.SIGKILL)  # a worker crashes ...
        await run.wait_for_log(b"starting a new one")
        await wait_for(lambda: len(worker_pids(run.proc.pid)) == 2)  # type: ignore[union-attr]
        assert second in worker_pids(run.proc.pid)  # ... the other never noticed
        reader, writer = await logged_in_session(run.port)  # and service goes on
        writer.close()

        run.proc.send_signal(signal.SIGTERM)
        for _, w in sessions:
            w.close()
        assert await asyncio.wait_for(run.proc.wait(), 20) == 1  # a worker had failed
        await wait_for(lambda: not Path(f"/proc/{second}").exists())
