"""TLS 1.3 session tickets on an implicit-TLS listener: exactly
`TLS13_TICKETS` (1) per full handshake, not OpenSSL's 2, and the one
ticket resumes a session, also on more than one later connection (OpenSSL's
stateless tickets may be used again). A real client: Python's ssl, counting
the NewSessionTicket messages it reads with OpenSSL's message callback."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from authgate.proxy.tls import TLS13_TICKETS
from authgate.testing.stack import ListenerSpec, Stack, embedded_stack

pytestmark = pytest.mark.asyncio

NEW_SESSION_TICKET = 4  # TLS handshake message type (RFC 8446 section 4)


@pytest_asyncio.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    layout = (ListenerSpec("imaps", "imap", "implicit"),)
    async with embedded_stack(
        tmp_path, users={"alice": "pw-tickets-1"}, security="none", layout=layout
    ) as running:
        yield running


def connect(
    stack: Stack, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> tuple[ssl.SSLSession | None, bool, bytes]:
    """Handshake, read the greeting (the tickets come before it): the
    session to resume later, whether this one was resumed, the greeting."""
    ep = stack["imaps"]
    with (
        socket.create_connection((ep.host, ep.port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls,
    ):
        greeting = tls.recv(1024)
        assert tls.version() == "TLSv1.3"
        return tls.session, tls.session_reused, greeting


def counting_context(stack: Stack, seen: list[int]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(stack.ca_file))

    def on_message(_conn: Any, direction: str, _v: Any, _ct: Any, msg_type: Any, _d: Any) -> None:
        if direction == "read" and msg_type == NEW_SESSION_TICKET:
            seen.append(msg_type)

    ctx._msg_callback = on_message  # type: ignore[attr-defined]
    return ctx


async def test_one_ticket_per_full_handshake(stack: Stack) -> None:
    seen: list[int] = []
    ctx = counting_context(stack, seen)
    session, reused, greeting = await asyncio.to_thread(connect, stack, ctx)
    assert greeting.startswith(b"* OK")
    assert not reused
    assert session is not None and session.has_ticket
    assert len(seen) == TLS13_TICKETS == 1


async def test_the_ticket_resumes_more_than_one_connection(stack: Stack) -> None:
    ctx = ssl.create_default_context(cafile=str(stack.ca_file))
    session, reused, _ = await asyncio.to_thread(connect, stack, ctx)
    assert not reused
    for _ in range(2):
        _, reused, greeting = await asyncio.to_thread(connect, stack, ctx, session)
        assert reused
        assert greeting.startswith(b"* OK")
