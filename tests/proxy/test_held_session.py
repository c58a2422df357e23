"""A held (spliced) session keeps its two connections and nothing of its
pre-authentication: not the protocol machine, not the policy decisions,
not the backend's client machine. Memory per held session is what a
gateway of many idle IMAP clients spends (bench.versus measures it)."""

from __future__ import annotations

import asyncio
import gc
import imaplib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from authgate.proxy.session import ClientSession
from authgate.proxy.upstream import Upstream
from authgate.testing.kit import eventually
from authgate.testing.stack import Stack, embedded_stack

PASSWORD = "alice-test-pw"

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with embedded_stack(tmp_path, users={"alice": PASSWORD}, exempt=["127.0.0.1/32"]) as s:
        yield s


def sessions() -> list[ClientSession]:
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, ClientSession)]


async def test_a_held_session_lets_go_of_its_login_state(stack: Stack) -> None:
    ep = stack["imap"]
    client = await asyncio.to_thread(imaplib.IMAP4, ep.host, ep.port, timeout=15)
    try:
        await asyncio.to_thread(client.login, "alice", PASSWORD)
        await asyncio.to_thread(client.noop)  # spliced: the backend answers
        await eventually(lambda: len(sessions()) == 1, lambda: f"sessions: {sessions()}")
        (held,) = sessions()
        assert held.machine is None
        assert held.upstream is None
        assert held._decisions == {}
        upstreams = [o for o in gc.get_objects() if isinstance(o, Upstream)]
        assert upstreams == []
        # Still a working session.
        typ, _ = await asyncio.to_thread(client.select, "INBOX")
        assert typ == "OK"
    finally:
        await asyncio.to_thread(client.logout)
