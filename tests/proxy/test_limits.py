"""Limits before authentication: timeouts with a goodbye, connection caps
with the protocol's temporary-failure reply, errors cap, line cap."""

from __future__ import annotations

import asyncio
import imaplib
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from authgate.testing.kit import eventually
from authgate.testing.stack import ListenerSpec, Stack, embedded_stack

pytestmark = pytest.mark.asyncio

PLAIN_LAYOUT = (
    ListenerSpec("imap", "imap", "none"),
    ListenerSpec("pop3", "pop3", "none"),
    ListenerSpec("smtp", "smtp", "none"),
)


@pytest_asyncio.fixture
async def stack(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Stack]:
    marker = request.node.get_closest_marker("limits")
    extra = "[limits]\n" + "\n".join(f"{k} = {v}" for k, v in (marker.kwargs if marker else {}).items())
    async with embedded_stack(
        tmp_path, users={"alice": "pw-alice-1"}, security="none", layout=PLAIN_LAYOUT, extra_config=extra + "\n"
    ) as running:
        yield running


async def connect(stack: Stack, name: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    ep = stack[name]
    reader, writer = await asyncio.open_connection(ep.host, ep.port)
    greeting = await asyncio.wait_for(reader.readline(), 10)
    return reader, writer, greeting


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(), 10)


@pytest.mark.limits(idle_timeout=1)
@pytest.mark.parametrize(
    ("name", "goodbye"),
    [("imap", b"* BYE Idle timeout"), ("pop3", b"-ERR Idle timeout"), ("smtp", b"421 4.4.2 Idle timeout")],
)
async def test_idle_timeout_says_goodbye_and_closes(stack: Stack, name: str, goodbye: bytes) -> None:
    reader, writer, _ = await connect(stack, name)
    rest = await read_until_closed(reader)
    writer.close()
    assert rest.startswith(goodbye)


@pytest.mark.limits(idle_timeout=30, preauth_timeout=2)
async def test_preauth_cap_ends_a_trickling_client(stack: Stack) -> None:
    reader, writer, _ = await connect(stack, "imap")
    loop = asyncio.get_running_loop()
    start = loop.time()
    closed = False
    # One harmless command every half second keeps the idle timer happy ...
    for i in range(20):
        writer.write(f"n{i} NOOP\r\n".encode())
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
        except ConnectionError:
            closed = True
            break
        if not line or line.startswith(b"* BYE"):
            closed = True
            break
        await asyncio.sleep(0.5)
    writer.close()
    # ... but the whole pre-authentication phase is capped.
    assert closed
    assert loop.time() - start < 8


@pytest.mark.limits(max_connections_per_address=2)
@pytest.mark.parametrize(
    ("name", "busy"),
    [("imap", b"* BYE [UNAVAILABLE]"), ("pop3", b"-ERR [SYS/TEMP]"), ("smtp", b"421 4.7.0")],
)
async def test_per_address_cap_gives_temporary_failure(stack: Stack, name: str, busy: bytes) -> None:
    held = [await connect(stack, name) for _ in range(2)]
    reader, writer, greeting = await connect(stack, name)
    assert greeting.startswith(busy)
    assert await read_until_closed(reader) == b""
    writer.close()
    for _, w, _ in held:
        w.close()
    # Once one goes away there is room again.
    await asyncio.sleep(0.3)
    _, writer, greeting = await connect(stack, name)
    assert not greeting.startswith(busy)
    writer.close()


@pytest.mark.limits(max_connections=3)
async def test_global_cap(stack: Stack) -> None:
    held = [await connect(stack, n) for n in ("imap", "pop3", "smtp")]
    _, writer, greeting = await connect(stack, "imap")
    assert greeting.startswith(b"* BYE [UNAVAILABLE]")
    writer.close()
    for _, w, _ in held:
        w.close()


@pytest.mark.limits(max_errors=3)
async def test_errors_cap_closes_after_three_bad_commands(stack: Stack) -> None:
    reader, writer, _ = await connect(stack, "smtp")
    writer.write(b"EHLO x\r\n")
    writer.write(b"BOGUS1\r\nBOGUS2\r\nBOGUS3\r\nNOOP\r\n")
    rest = await read_until_closed(reader)
    writer.close()
    replies = rest.split(b"\r\n")
    assert replies.count(b"500 5.5.2 Command unrecognized") == 3
    assert replies[-2].startswith(b"421 4.7.0")  # the goodbye is the last thing said
    assert not any(r.startswith(b"250 2.0.0") for r in replies)  # NOOP after the cap: not served


@pytest.mark.limits(max_line=1024)
async def test_overlong_line_is_refused_and_closed(stack: Stack) -> None:
    reader, writer, _ = await connect(stack, "imap")
    writer.write(b"a " + b"X" * 5000 + b"\r\n")
    rest = await read_until_closed(reader)
    writer.close()
    assert b"BAD" in rest or b"BYE" in rest


# ------------------------------------------- caps from accept(), TLS listeners
#
# Connections are counted when they are accepted, not when the TLS handshake
# is over: one address holding thousands of half-open handshakes on IMAPS
# cost 109 MiB and, with the descriptors gone, stopped every listener.

TLS_LAYOUT = (ListenerSpec("imaps", "imap", "implicit"), ListenerSpec("imap", "imap", "none"))
HOLDER = "127.0.0.5"  # the address that holds connections open
OTHER = "127.0.0.6"  # a legitimate client elsewhere


@pytest_asyncio.fixture
async def tls_stack(
    tmp_path: Path, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[Stack]:
    caplog.set_level(logging.INFO)
    limits = request.node.get_closest_marker("limits")
    defence = request.node.get_closest_marker("defence")
    extra = "[limits]\n" + "".join(f"{k} = {v}\n" for k, v in (limits.kwargs if limits else {}).items())
    extra += "[defence]\n" + "".join(f"{k} = {v}\n" for k, v in (defence.kwargs if defence else {}).items())
    async with embedded_stack(
        tmp_path, users={"alice": "pw-alice-1"}, security="none", layout=TLS_LAYOUT, extra_config=extra
    ) as running:
        yield running


def open_raw(stack: Stack, name: str, source: str, count: int) -> list[socket.socket]:
    """`count` TCP connections from `source` that never start TLS."""
    ep = stack[name]
    return [
        socket.create_connection((ep.host, ep.port), timeout=10, source_address=(source, 0))
        for _ in range(count)
    ]


def closed_by_server(sock: socket.socket, timeout: float = 5.0) -> bool:
    """The server closed (or reset) `sock` without a byte, within `timeout`."""
    sock.settimeout(timeout)
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def imaps_login(stack: Stack, source: str) -> str:
    ep = stack["imaps"]

    class FromSource(imaplib.IMAP4_SSL):
        def _create_socket(self, timeout: float | None) -> socket.socket:
            sock = socket.create_connection((self.host, self.port), timeout, source_address=(source, 0))
            return self.ssl_context.wrap_socket(sock, server_hostname=self.host)

    with FromSource(ep.host, ep.port, ssl_context=stack.ssl_context(), timeout=10) as client:
        typ, _ = client.login("alice", "pw-alice-1")
        client.logout()
        return typ


def refusal_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "refused, too many" in r.getMessage()]


@pytest.mark.limits(max_connections_per_address=5)
async def test_handshake_pending_connections_count_against_the_address_cap(
    tls_stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = tls_stack.gateway
    held = await asyncio.to_thread(open_raw, tls_stack, "imaps", HOLDER, 5)
    try:
        await eventually(lambda: gateway.connections_from(HOLDER) == 5, "pending handshakes not counted")
        assert gateway.session_count == 5
        # 40 more from the same address, none of them finishing a handshake:
        # each is closed at once (no TLS yet, so nothing can be said first).
        extra = await asyncio.to_thread(open_raw, tls_stack, "imaps", HOLDER, 40)
        try:
            assert all(await asyncio.to_thread(lambda: [closed_by_server(s) for s in extra]))
        finally:
            for sock in extra:
                sock.close()
        assert gateway.connections_from(HOLDER) == 5
        # Another address is served as usual meanwhile.
        assert await asyncio.to_thread(imaps_login, tls_stack, OTHER) == "OK"
        # 40 refusals, one line (the rest are counted into the next one).
        assert len(refusal_lines(caplog)) == 1, refusal_lines(caplog)
    finally:
        for sock in held:
            sock.close()
    # A handshake that ends (the client went away) gives its slot back.
    await eventually(lambda: gateway.connections_from(HOLDER) == 0, "slots of failed handshakes leaked")
    await eventually(lambda: gateway.session_count == 0, "sessions leaked")
    assert await asyncio.to_thread(imaps_login, tls_stack, HOLDER) == "OK"


@pytest.mark.limits(max_connections_per_address=2, handshake_timeout=1)
async def test_failed_and_timed_out_handshakes_release_their_slots(tls_stack: Stack) -> None:
    gateway = tls_stack.gateway
    silent = await asyncio.to_thread(open_raw, tls_stack, "imaps", HOLDER, 2)
    try:
        await eventually(lambda: gateway.connections_from(HOLDER) == 2, "pending handshakes not counted")
        (third,) = await asyncio.to_thread(open_raw, tls_stack, "imaps", HOLDER, 1)
        assert await asyncio.to_thread(closed_by_server, third)
        third.close()
        # The handshake timeout ends both, and their slots are free again.
        assert all(await asyncio.to_thread(lambda: [closed_by_server(s, 10) for s in silent]))
        await eventually(lambda: gateway.connections_from(HOLDER) == 0, "timed-out handshakes leaked")
    finally:
        for sock in silent:
            sock.close()
    # Garbage instead of a ClientHello: the handshake fails, the slot is freed.
    for _ in range(5):  # more than the cap: any leak would show
        (sock,) = await asyncio.to_thread(open_raw, tls_stack, "imaps", HOLDER, 1)
        sock.sendall(b"a LOGIN alice pw-alice-1\r\n")
        assert await asyncio.to_thread(closed_by_server, sock)
        sock.close()
    await eventually(lambda: gateway.connections_from(HOLDER) == 0, "failed handshakes leaked")
    assert await asyncio.to_thread(imaps_login, tls_stack, HOLDER) == "OK"


@pytest.mark.limits(max_connections_per_address=2)
@pytest.mark.defence(ipv4_prefix=24)
async def test_per_address_cap_groups_addresses_as_the_defence_does(tls_stack: Stack) -> None:
    # With the defence counting 127.0.0.0/24 as one client, so does the cap.
    held = await asyncio.to_thread(open_raw, tls_stack, "imap", HOLDER, 1)
    held += await asyncio.to_thread(open_raw, tls_stack, "imap", OTHER, 1)
    try:
        (third,) = await asyncio.to_thread(open_raw, tls_stack, "imap", "127.0.0.7", 1)
        third.settimeout(10)
        # A plaintext listener still says why before it closes.
        assert (await asyncio.to_thread(third.recv, 4096)).startswith(b"* BYE [UNAVAILABLE]")
        third.close()
        assert tls_stack.gateway.connections_from("127.0.0.200") == 2
    finally:
        for sock in held:
            sock.close()


async def test_the_cap_key_is_the_defence_grouping() -> None:
    """IPv6 by /64 and IPv4-mapped unwrapped (loopback has one IPv6 address,
    so the grouping itself is checked on the key the gateway counts under)."""
    from authgate.defence import DefenceSettings
    from authgate.proxy.server import Gateway

    gateway = Gateway([], DefenceSettings())
    gateway._per_address[gateway.guard.address_key("2001:db8:1:2::7")] = 3
    gateway._per_address[gateway.guard.address_key("192.0.2.9")] = 1
    assert gateway.connections_from("2001:db8:1:2:ffff::1") == 3
    assert gateway.connections_from("2001:db8:1:3::7") == 0
    assert gateway.connections_from("::ffff:192.0.2.9") == 1
