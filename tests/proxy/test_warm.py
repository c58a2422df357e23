"""Warm backend connections (authgate.proxy.warm) against real loopback
servers: a pool fills to its size and no further, hands out a connection
with its greeting unread, refills after a claim, ages connections out,
never hands out one the backend closed or talked on, backs off when
connects fail, waits while its member is marked down, pools implicit TLS
with the handshake done, and closes everything when it stops."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
import pytest_asyncio
import trustme

from authgate.config import Address, BackendSettings, TLSMode
from authgate.proxy import warm
from authgate.proxy.warm import WarmPool
from authgate.routing import Health
from authgate.testing.kit import eventually

GREETING = b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] warm test server ready\r\n"


@dataclass
class Greeter:
    """A server that greets every connection and then only listens: it
    counts connections, and tells which ones we closed."""

    server: asyncio.Server | None = None
    greeting: bytes = GREETING
    greet: bool = True
    answer: bool = False  # say NO to every command line
    accepted: int = 0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    ended: int = 0  # connections whose far end (the pool) closed
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    @property
    def open(self) -> int:
        return self.accepted - self.ended

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.writers.append(writer)
        try:
            if self.greet:
                writer.write(self.greeting)
            else:
                writer.close()
            while line := await reader.readline():
                if self.answer:
                    tag = line.split(b" ", 1)[0]
                    writer.write(tag + b" NO not today\r\n")
        except ConnectionError:
            pass
        finally:
            self.ended += 1
            writer.close()

    def hang_up_all(self, last_words: bytes = b"") -> None:
        for writer in self.writers:
            if not writer.is_closing():
                if last_words:
                    writer.write(last_words)
                writer.close()


async def until(condition: Callable[[], bool], what: str, limit: float = 10.0) -> None:
    """kit.eventually, polled often: the pool's timers here are short."""
    await eventually(condition, f"timed out waiting until {what}", limit, interval=0.005)


async def settle(rounds: int = 50) -> None:
    """Let the loop run callbacks and tasks for a while (no clock)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


@contextlib.asynccontextmanager
async def serving(found: Greeter) -> AsyncIterator[Greeter]:
    """`found` listening on a loopback port until the block ends."""
    found.server = await asyncio.start_server(found.handle, "127.0.0.1", 0)
    try:
        yield found
    finally:
        found.hang_up_all()
        found.server.close()
        await found.server.wait_closed()


@pytest_asyncio.fixture
async def greeter() -> AsyncIterator[Greeter]:
    async with serving(Greeter()) as found:
        yield found


@pytest.fixture
def pauses(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The pool's pauses (back-off, down-member polls), recorded and made
    instant."""
    recorded: list[float] = []
    real_sleep = asyncio.sleep

    async def pause(seconds: float) -> None:
        recorded.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr(warm, "_pause", pause)
    return recorded


def member(port: int, size: int, max_age: float = 60.0, **more: object) -> BackendSettings:
    return BackendSettings(
        address=Address("127.0.0.1", port),
        warm_connections=size,
        warm_max_age=max_age,
        **more,  # type: ignore[arg-type]
    )


def pool_for(
    settings: BackendSettings,
    *,
    health: Health | None = None,
    tls: ssl.SSLContext | None = None,
    loops_back: Callable[[tuple[str, int], tuple[str, int]], bool] = lambda peer, local: False,
) -> WarmPool:
    return WarmPool(
        settings,
        tls,
        connect_timeout=5.0,
        health=health or Health(),
        loops_back=loops_back,
    )


@pytest.mark.asyncio
async def test_fills_to_its_size_and_no_further(greeter: Greeter) -> None:
    pool = pool_for(member(greeter.port, 3))
    pool.start()
    pool.start()  # a second start adds nothing
    try:
        await until(lambda: pool.ready == 3, "three are ready")
        await settle(200)
        assert greeter.accepted == 3
        assert pool.ready == 3
    finally:
        await pool.close()


@pytest.mark.asyncio
async def test_a_claim_gets_the_greeting_unread_and_the_pool_refills(greeter: Greeter) -> None:
    pool = pool_for(member(greeter.port, 2))
    pool.start()
    try:
        await until(lambda: pool.ready == 2, "two are ready")
        channel = pool.claim()
        assert channel is not None
        assert pool.ready == 1
        # The client machine built now reads the greeting as if it had just come.
        assert await channel.read(timeout=5) == GREETING
        channel.write(b"a NOOP\r\n")  # ours to use
        await until(lambda: pool.ready == 2, "the pool is full again")
        assert greeter.accepted == 3
        channel.close()
        await until(lambda: greeter.ended == 1, "the claimed one is closed by its user")
    finally:
        await pool.close()


@pytest.mark.asyncio
async def test_claims_beyond_the_ready_ones_miss(greeter: Greeter) -> None:
    pool = pool_for(member(greeter.port, 1))
    pool.start()
    try:
        await until(lambda: pool.ready == 1, "one is ready")
        first = pool.claim()
        assert first is not None
        assert pool.claim() is None  # none ready: the login connects itself
        first.close()
    finally:
        await pool.close()


@pytest.mark.asyncio
async def test_connections_age_out_and_are_made_again(greeter: Greeter) -> None:
    pool = pool_for(member(greeter.port, 2, max_age=0.05))
    pool.start()
    try:
        await until(lambda: greeter.ended >= 4, "aged connections were closed")
        await until(lambda: pool.ready == 2, "fresh ones took their place")
        assert greeter.accepted >= 6
        channel = pool.claim()
        assert channel is not None and not channel.lost
        channel.close()
    finally:
        await pool.close()


@pytest.mark.asyncio
async def test_a_claim_never_gets_one_too_old_even_before_its_timer(greeter: Greeter) -> None:
    pool = pool_for(member(greeter.port, 1, max_age=60.0))
    pool.start()
    try:
        await until(lambda: pool.ready == 1, "one is ready")
        pool.max_age = 0.0  # every waiting one is now too old
        assert pool.claim() is None
        await until(lambda: greeter.ended == 1, "the old one was closed")
    finally:
        await pool.close()


@pytest.mark.asyncio
async def test_connections_the_backend_closed_are_dropped(greeter: Greeter) -> None:
    pool = pool_for(member(greeter.port, 2))
    pool.backoff_first = 0.01
    pool.start()
    try:
        await until(lambda: pool.ready == 2, "two are ready")
        greeter.hang_up_all(b"* BYE Disconnected for inactivity\r\n")
        await until(lambda: greeter.accepted == 4 and pool.ready == 2, "two new ones")
        for _ in range(2):
            channel = pool.claim()
            assert channel is not None
            assert not channel.peer_ended and not channel.lost
            assert channel.buffered() == GREETING
    finally:
        await pool.close()


@pytest.mark.asyncio
async def test_a_claim_checks_for_itself_that_the_backend_hung_up(greeter: Greeter) -> None:
    """Between the backend's hang-up and the slot's noticing it, a claim
    looks at the connection itself: EOF, or more than the greeting."""
    pool = pool_for(member(greeter.port, 2))
    pool.start()
    try:
        await until(lambda: pool.ready == 2, "two are ready")
        idle = list(pool._idle)
        for entry in idle:
            entry.channel.watch(None)  # the slots do not hear of what follows
        greeter.writers[0].close()  # EOF, nothing said
        greeter.writers[1].write(b"* BYE shutting down\r\n")  # more than the greeting
        await until(
            lambda: idle[0].channel.peer_ended and len(idle[1].channel.buffered()) > len(GREETING),
            "both arrived",
        )
        assert pool.claim() is None
        assert all(entry.channel.transport.is_closing() for entry in idle)  # type: ignore[union-attr]
        await until(lambda: pool.ready == 2, "the slots made new ones")
    finally:
        await pool.close()


@pytest.mark.asyncio
async def test_failed_connects_back_off(greeter: Greeter, pauses: list[float]) -> None:
    greeter.greet = False  # hangs up before any greeting
    pool = pool_for(member(greeter.port, 1))
    pool.start()
    try:
        await until(lambda: len(pauses) >= 8, "eight pauses")
        # Every failed attempt is followed by a pause, growing to the cap.
        assert greeter.accepted <= len(pauses) + 1
        assert pauses[:4] == [0.5, 1.0, 2.0, 4.0]
        assert max(pauses) <= warm.BACKOFF_MOST
        assert pool.ready == 0
        greeter.greet = True
        await until(lambda: pool.ready == 1, "it recovers")
    finally:
        await pool.close()


@pytest.mark.asyncio
async def test_one_that_loops_back_to_us_is_never_pooled(
    greeter: Greeter, pauses: list[float]
) -> None:
    pool = pool_for(member(greeter.port, 1), loops_back=lambda peer, local: True)
    pool.start()
    try:
        await until(lambda: len(pauses) >= 3, "three pauses")
        assert pool.ready == 0 and pool.claim() is None
        await until(lambda: greeter.ended == greeter.accepted, "each was closed")
    finally:
        await pool.close()


@pytest.mark.asyncio
async def test_no_warm_connections_while_the_member_is_down(
    greeter: Greeter, pauses: list[float]
) -> None:
    polls = pauses
    health = Health()
    settings = member(greeter.port, 2)
    health.mark_down(settings.address, 0.0, 1e9, "test")
    pool = pool_for(settings, health=health)
    pool.start()
    try:
        await until(lambda: len(polls) >= 10, "the slots looked a few times")
        assert greeter.accepted == 0 and pool.ready == 0
        assert set(polls) == {warm.DOWN_POLL}
        health.mark_up(settings.address)
        await until(lambda: pool.ready == 2, "filled once it is up")
    finally:
        await pool.close()


@pytest.mark.asyncio
async def test_close_closes_every_waiting_connection_and_stops_filling(greeter: Greeter) -> None:
    pool = pool_for(member(greeter.port, 3))
    pool.start()
    await until(lambda: pool.ready == 3, "three are ready")
    claimed = pool.claim()
    assert claimed is not None
    await until(lambda: pool.ready == 3, "refilled")
    await pool.close()
    await until(lambda: greeter.ended == 3, "the three waiting ones were closed")
    assert not claimed.lost  # a claimed one is its login's, not the pool's
    assert pool.ready == 0 and pool.claim() is None
    pool.start()  # a closed pool does not start again
    await settle(100)
    assert greeter.accepted == 4
    claimed.close()


@pytest.mark.asyncio
async def test_close_during_connects_leaks_nothing(greeter: Greeter) -> None:
    greeter.greeting = b""  # connects, never greets: the slots wait for it
    pool = pool_for(member(greeter.port, 4))
    pool.start()
    await until(lambda: greeter.accepted == 4, "four connected")
    await pool.close()
    await until(lambda: greeter.ended == 4, "all four were closed")


@pytest.mark.asyncio
async def test_implicit_tls_is_pooled_with_the_handshake_done() -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    greeter = Greeter()
    greeter.server = await asyncio.start_server(greeter.handle, "127.0.0.1", 0, ssl=server_context)
    pool = pool_for(
        member(greeter.port, 1, tls=TLSMode.IMPLICIT, server_name="127.0.0.1"), tls=client_context
    )
    pool.start()
    try:
        await until(lambda: pool.ready == 1, "one is ready")
        channel = pool.claim()
        assert channel is not None and channel.tls is not None
        assert await channel.read(timeout=5) == GREETING
        channel.close()
    finally:
        await pool.close()
        greeter.hang_up_all()
        greeter.server.close()
        await greeter.server.wait_closed()
