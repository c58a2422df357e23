"""Limits before authentication: timeouts with a goodbye, connection caps
with the protocol's temporary-failure reply, errors cap, line cap."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

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
