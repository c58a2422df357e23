"""`authgate run` as a real process: SIGTERM drains, SIGHUP reloads."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from tests.proxy.running import (
    Running,
    authgate_process,
    command,
    imap_open,
    logged_in_session,
    running,
)

pytestmark = pytest.mark.asyncio

__all__ = ["running"]


async def test_sigterm_drains_then_exits_cleanly(running: Running) -> None:
    reader, writer = await logged_in_session(running.port)
    running.signal(signal.SIGTERM)
    await running.wait_for_log(b"stopping")
    # No new connections ...
    with pytest.raises(OSError):
        await imap_open(running.port)
    # ... but the established session still works until it ends.
    assert (await command(reader, writer, "b", "NOOP"))[-1].startswith(b"b OK")
    await command(reader, writer, "c", "LOGOUT")
    writer.close()
    assert running.proc is not None
    assert await asyncio.wait_for(running.proc.wait(), 15) == 0
    await running.wait_for_log(b"stopped")


async def test_sigterm_cuts_sessions_after_the_drain_time(running: Running) -> None:
    reader, writer = await logged_in_session(running.port)
    running.signal(signal.SIGTERM)
    assert running.proc is not None
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert await asyncio.wait_for(running.proc.wait(), 20) == 0
    assert loop.time() - start >= 4  # drain_timeout = 5 in the fixture's config
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_sighup_reloads_policy_keeps_sessions_and_rejects_bad_config(running: Running) -> None:
    reader, writer = await logged_in_session(running.port)
    _, w1, greeting = await imap_open(running.port)
    w1.close()
    assert b"AUTH=PLAIN" not in greeting and b"LOGINDISABLED" in greeting

    running.write_config("none")
    running.signal(signal.SIGHUP)
    await running.wait_for_log(b"reloaded")
    _, w2, greeting = await imap_open(running.port)
    w2.close()
    assert b"AUTH=PLAIN" in greeting and b"LOGINDISABLED" not in greeting
    assert (await command(reader, writer, "b", "NOOP"))[-1].startswith(b"b OK")  # old session lives

    running.config.write_text(running.config.read_text().replace('security = "none"', 'security = "nope"'))
    running.signal(signal.SIGHUP)
    await running.wait_for_log(b"reload failed")
    assert b"policy.security: 'nope'" in running.stderr
    _, w3, greeting = await imap_open(running.port)
    w3.close()
    assert b"AUTH=PLAIN" in greeting  # still the last good configuration
    assert (await command(reader, writer, "c", "NOOP"))[-1].startswith(b"c OK")
    writer.close()


@pytest.mark.parametrize(("setting", "served_on"), [(None, "uvloop"), ("asyncio", "asyncio")])
async def test_serves_on_the_event_loop_configured(
    tmp_path: Path, setting: str | None, served_on: str
) -> None:
    async with authgate_process(tmp_path, event_loop=setting) as run:
        await run.wait_for_log(f"event loop: {served_on}".encode())
        reader, writer = await logged_in_session(run.port)
        assert (await command(reader, writer, "b", "SELECT INBOX"))[-1].startswith(b"b OK")
        fetched = b"".join(await command(reader, writer, "c", "FETCH 1 BODY.PEEK[TEXT]"))
        assert b"hello" in fetched
        run.signal(signal.SIGTERM)  # drains on either loop: the session finishes
        await run.wait_for_log(b"stopping")
        assert (await command(reader, writer, "d", "LOGOUT"))[-1].startswith(b"d OK")
        writer.close()
        assert run.proc is not None
        assert await asyncio.wait_for(run.proc.wait(), 15) == 0
