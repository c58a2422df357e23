"""The brute-force defence inside the running proxy: failure delay, address
blocks, stale passwords, trusted networks, and legitimate users unharmed."""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from authgate.testing.stack import ListenerSpec, Stack, embedded_stack

pytestmark = pytest.mark.asyncio

PASSWORD = "right-pw-1"
DEFENCE = """[defence]
failure_delay = 0.3
penalties = [0.1, 0.2]
block_after = 5
block_window = 60
block_for = 300
trusted_networks = ["127.0.0.9/32"]
[limits]
max_errors = 1000
"""


@pytest_asyncio.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with embedded_stack(
        tmp_path,
        users={"alice": PASSWORD, "bob": "bob-pw-2"},
        security="none",
        layout=(ListenerSpec("imap", "imap", "none"),),
        extra_config=DEFENCE,
    ) as running:
        yield running


async def open_from(
    stack: Stack, source: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    ep = stack["imap"]
    reader, writer = await asyncio.open_connection(ep.host, ep.port, local_addr=(source, 0))
    return reader, writer, await asyncio.wait_for(reader.readline(), 10)


async def login(stack: Stack, source: str, user: str, password: str) -> tuple[bytes, float]:
    """One connection, one LOGIN; the reply and how long it took."""
    reader, writer, greeting = await open_from(stack, source)
    if not greeting.startswith(b"* OK"):
        writer.close()
        return greeting, 0.0
    loop = asyncio.get_running_loop()
    start = loop.time()
    writer.write(f"a LOGIN {user} {password}\r\n".encode())
    reply = await asyncio.wait_for(reader.readline(), 30)
    elapsed = loop.time() - start
    writer.write(b"z LOGOUT\r\n")
    writer.close()
    return reply, elapsed


async def test_failure_delay_before_the_reply(stack: Stack) -> None:
    reply, elapsed = await login(stack, "127.0.0.4", "alice", "wrong")
    assert reply.startswith(b"a NO [AUTHENTICATIONFAILED]")
    assert elapsed >= 0.3 + 0.1  # failure_delay + first penalty


async def test_hammering_address_is_blocked_others_are_not(stack: Stack) -> None:
    for i in range(5):
        reply, _ = await login(stack, "127.0.0.5", "alice", f"guess-{i}")
        assert reply.startswith(b"a NO")
    reply, _ = await login(stack, "127.0.0.5", "alice", PASSWORD)
    assert reply.startswith(b"* BYE [UNAVAILABLE] Too many failed logins")  # even the right one
    reply, _ = await login(stack, "127.0.0.6", "alice", PASSWORD)
    assert reply.startswith(b"a OK")


async def test_stale_password_is_one_guess(stack: Stack) -> None:
    """A phone re-sending the old password after a change is not a guesser."""
    for _ in range(8):
        reply, _ = await login(stack, "127.0.0.7", "bob", "old-password")
        assert reply.startswith(b"a NO")
    reply, _ = await login(stack, "127.0.0.7", "bob", "bob-pw-2")
    assert reply.startswith(b"a OK")


async def test_trusted_network_is_never_blocked(stack: Stack) -> None:
    for i in range(8):
        reply, _ = await login(stack, "127.0.0.9", "alice", f"guess-{i}")
        assert reply.startswith(b"a NO")
    assert not stack.gateway.guard.check("127.0.0.9").blocked
    reply, _ = await login(stack, "127.0.0.9", "alice", PASSWORD)
    assert reply.startswith(b"a OK")


async def test_legitimate_logins_unharmed_while_another_address_hammers(stack: Stack) -> None:
    stop = asyncio.Event()

    async def attacker(n: int) -> None:
        i = 0
        while not stop.is_set():
            await login(stack, "127.0.0.8", "alice", f"attack-{n}-{i}")
            i += 1

    attackers = [asyncio.ensure_future(attacker(n)) for n in range(8)]
    await asyncio.sleep(0.5)
    latencies = []
    try:
        for _ in range(20):
            reply, elapsed = await login(stack, "127.0.0.1", "alice", PASSWORD)
            assert reply.startswith(b"a OK"), reply
            latencies.append(elapsed)
    finally:
        stop.set()
        await asyncio.gather(*attackers, return_exceptions=True)
    p50 = statistics.median(latencies)
    print(
        f"\nlegitimate login under attack: p50 {p50 * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms"
    )
    # The attacker is blocked; the legitimate address carries no penalty.
    assert stack.gateway.guard.check("127.0.0.8").blocked
    assert not stack.gateway.guard.check("127.0.0.1").blocked


async def test_successful_login_resets_the_address_penalty(stack: Stack) -> None:
    for i in range(3):
        reply, _ = await login(stack, "127.0.0.10", "alice", f"typo-{i}")
        assert reply.startswith(b"a NO")
    guard = stack.gateway.guard
    reply, _ = await login(stack, "127.0.0.10", "alice", PASSWORD)
    assert reply.startswith(b"a OK")
    # The next failure starts again at the first penalty step.
    assert guard.failure("127.0.0.10", "alice", None) == pytest.approx(0.3 + 0.1)
    # Without a success in between, the same address would be at the top step.
    for _ in range(3):
        guard.failure("127.0.0.11", "alice", None)
    assert guard.failure("127.0.0.11", "alice", None) == pytest.approx(0.3 + 0.2)


async def test_password_over_the_cap_is_refused_at_once_and_is_no_guess(stack: Stack) -> None:
    """A password over 1,024 octets is refused before anything is hashed. No
    stored password can be that long (`authgate passwd` refuses it), so it
    guesses nothing and counts toward no block (only toward max_errors,
    like any malformed command)."""
    for _ in range(6):  # more than block_after
        reply, _ = await login(stack, "127.0.0.7", "alice", "x" * 1025)
        assert reply == b"a NO [LIMIT] Password too long (at most 1024 octets)\r\n"
    reply, _ = await login(stack, "127.0.0.7", "alice", PASSWORD)
    assert reply.startswith(b"a OK")
    assert [login.user for login in stack.backends.imap.logins] == ["alice"]
