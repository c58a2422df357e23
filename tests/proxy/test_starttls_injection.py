"""STARTTLS command injection (CVE-2011-0411, "NO STARTTLS" 2021): bytes
pipelined behind STARTTLS in the same segment are thrown away, never run
inside TLS, and the session logs one warning naming the client's address.
A clean STARTTLS logs nothing of the kind.

Loopback delivers one `write()` as one segment, so the pipelined bytes
reach the protocol machine's line buffer together with the STARTTLS line:
the machine, not the channel, is the one that drops them here."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from authgate.testing.stack import ListenerSpec, Stack, embedded_stack

pytestmark = pytest.mark.asyncio

PASSWORD = "pw-injection-1"
LAYOUT = (
    ListenerSpec("imap", "imap", "starttls"),
    ListenerSpec("pop3", "pop3", "starttls"),
    ListenerSpec("submission", "smtp", "starttls"),
    ListenerSpec("managesieve", "managesieve", "starttls"),
    ListenerSpec("nntp", "nntp", "starttls"),
)


@dataclass(frozen=True)
class Dialect:
    listener: str
    hello: bytes  # sent after the greeting, before STARTTLS (b"" for none)
    starttls: bytes
    started: bytes  # the start of the reply that says "begin TLS"
    injected: bytes  # a command that must never run
    probe: bytes  # a harmless command inside TLS, and the start of its reply
    probe_reply: bytes
    # ManageSieve: the greeting is a capability list ending in an OK line,
    # and the server sends it again unasked after the handshake (RFC 5804
    # section 2.2); read up to these before going on.
    greeted: bytes = b""
    after_tls: bytes = b""


DIALECTS = {
    "imap": Dialect("imap", b"", b"a STARTTLS\r\n", b"a OK", b"b NOOP\r\n", b"c NOOP\r\n", b"c OK"),
    "pop3": Dialect("pop3", b"", b"STLS\r\n", b"+OK", b"NOOP\r\n", b"CAPA\r\n", b"+OK"),
    "smtp": Dialect(
        "submission",
        b"EHLO client.example\r\n",
        b"STARTTLS\r\n",
        b"220 ",
        b"NOOP\r\n",
        b"NOOP\r\n",
        b"250 ",
    ),
    "managesieve": Dialect(
        "managesieve",
        b"",
        b"STARTTLS\r\n",
        b"OK ",
        # Had it run, its reply would name its tag before the probe's.
        b'NOOP "injected"\r\n',
        b'NOOP "probe"\r\n',
        b'OK (TAG "probe")',
        greeted=b"OK ",
        after_tls=b'OK "TLS negotiation successful."',
    ),
    # Had the AUTHINFO USER run, its 381 would come before the probe's 200.
    "nntp": Dialect(
        "nntp",
        b"",
        b"STARTTLS\r\n",
        b"382 ",
        b"AUTHINFO USER alice\r\n",
        b"MODE READER\r\n",
        b"200 ",
    ),
}


@pytest_asyncio.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with embedded_stack(
        tmp_path, users={"alice": PASSWORD}, security="none", layout=LAYOUT
    ) as running:
        yield running


async def read_until(reader: asyncio.StreamReader, marker: bytes) -> bytes:
    """Lines until one starts with `marker` (SMTP: the last line of a reply)."""
    seen = b""
    while True:
        line = await asyncio.wait_for(reader.readline(), 10)
        if not line:
            raise ConnectionError(f"closed before {marker!r}; got {seen!r}")
        seen += line
        if line.startswith(marker) and line[3:4] != b"-":
            return seen


async def starttls_session(stack: Stack, dialect: Dialect, pipelined: bytes) -> bytes:
    """STARTTLS with `pipelined` bytes in the same write; then a probe
    inside TLS. Returns what the client read inside TLS."""
    ep = stack[dialect.listener]
    reader, writer = await asyncio.open_connection(ep.host, ep.port)
    try:
        if dialect.greeted:
            await read_until(reader, dialect.greeted)
        else:
            await asyncio.wait_for(reader.readline(), 10)  # greeting
        if dialect.hello:
            writer.write(dialect.hello)
            await read_until(reader, b"250 ")
        writer.write(dialect.starttls + pipelined)
        await read_until(reader, dialect.started)
        context = ssl.create_default_context(cafile=str(stack.ca_file))
        await writer.start_tls(context, server_hostname="localhost")
        if dialect.after_tls:
            await read_until(reader, dialect.after_tls)
        writer.write(dialect.probe)
        return await read_until(reader, dialect.probe_reply)
    finally:
        writer.close()


def injection_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "authgate.session"
        and r.levelno == logging.WARNING
        and "STARTTLS injection" in r.getMessage()
    ]


@pytest.mark.parametrize("protocol", sorted(DIALECTS))
async def test_injection_is_dropped_with_a_warning_naming_the_address(
    stack: Stack, protocol: str, caplog: pytest.LogCaptureFixture
) -> None:
    dialect = DIALECTS[protocol]
    caplog.set_level(logging.INFO, logger="authgate")
    inside = await starttls_session(stack, dialect, dialect.injected)
    # Only the probe is answered inside TLS: had the injected command run,
    # its reply would come first.
    assert inside.count(b"\n") == 1, inside
    warnings = injection_warnings(caplog)
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    message = warnings[0].getMessage()
    assert "127.0.0.1" in message
    assert f"dropped {len(dialect.injected)} bytes" in message


@pytest.mark.parametrize("protocol", sorted(DIALECTS))
async def test_clean_starttls_logs_no_warning(
    stack: Stack, protocol: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="authgate")
    await starttls_session(stack, DIALECTS[protocol], b"")
    assert injection_warnings(caplog) == []
