"""The backend side's driver (authgate.proxy.upstream) over real loopback
sockets: SCRAM's PBKDF2 toward the backend runs in a worker thread, never on
the event loop, and a backend cannot ask for more iterations than the cap.

The backend here is a small asyncio server driven by our own IMAP server
machine (the embedded test backends and the Dovecot of the interop tests
offer the master login as PLAIN only): it offers SCRAM-SHA-256 and holds a
verifier for the user.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from authgate.policy import ExemptNetworks, ListenerPolicy, Protocol, Security, decide
from authgate.protocols.base import (
    Authenticated,
    ClientSettings,
    Close,
    LoggedIn,
    LoginFailed,
    Send,
    SessionSettings,
    Splice,
)
from authgate.protocols.imap import ImapClient, ImapServer
from authgate.proxy.channel import open_channel
from authgate.proxy.upstream import Upstream
from authgate.sasl.base import (
    ClientContext,
    ClientCredentials,
    Lookup,
    LookupAnswer,
    LookupRequest,
    ScramVerifier,
    SecretLookup,
)
from authgate.sasl.scram import make_verifier

pytestmark = pytest.mark.asyncio

PASSWORD = "pbkdf2 off the loop"
HOST = "127.0.0.1"


def store(verifier: ScramVerifier) -> Callable[[LookupRequest], LookupAnswer]:

    def resolve(request: LookupRequest) -> LookupAnswer:
        if isinstance(request, SecretLookup) and request.authcid == "alice":
            return verifier
        return None

    return resolve


@asynccontextmanager
async def scram_backend(
    resolve: Callable[[LookupRequest], LookupAnswer],
) -> AsyncIterator[int]:
    """An IMAP backend on loopback offering AUTH=SCRAM-SHA-256; its port."""
    listener = ListenerPolicy(Protocol.IMAP, Security.NONE, ("SCRAM-SHA-256",), ExemptNetworks())
    settings = SessionSettings(
        hostname="backend.test",
        decide=lambda tls: decide(listener, HOST, tls=tls),
        starttls_available=False,
    )

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        machine = ImapServer(settings)
        pending = list(machine.start())
        try:
            while True:
                while pending:
                    event = pending.pop(0)
                    if isinstance(event, Send):
                        writer.write(event.data)
                    elif isinstance(event, Lookup):
                        pending += machine.resume(resolve(event.request))
                    elif isinstance(event, Authenticated):
                        pending += machine.backend_ready(("IMAP4rev1",))
                    elif isinstance(event, Splice | Close):
                        await writer.drain()
                        return
                await writer.drain()
                data = await reader.read(4096)
                if not data:
                    return
                pending += machine.receive_data(data)
        finally:
            writer.close()

    server = await asyncio.start_server(serve, HOST, 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def log_in(port: int) -> LoggedIn | LoginFailed:
    channel = await open_channel(HOST, port, timeout=10)
    machine = ImapClient(
        ClientSettings(
            hostname="authgate.test",
            mechanisms=("SCRAM-SHA-256",),
            credentials=ClientCredentials("alice", PASSWORD),
            sasl_context=ClientContext(hostname="backend.test"),
        )
    )
    upstream = Upstream(channel, machine, tls_context=None, server_name=HOST, timeout=20)
    try:
        result = await upstream.advance()
    finally:
        upstream.close()
    assert isinstance(result, LoggedIn | LoginFailed)
    return result


def derivation_spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """(thread name, iterations) of every PBKDF2 run from now on."""
    seen: list[tuple[str, int]] = []
    original = hashlib.pbkdf2_hmac

    def spy(name: str, password: bytes, salt: bytes, iterations: int) -> bytes:
        seen.append((threading.current_thread().name, iterations))
        return original(name, password, salt, iterations)

    monkeypatch.setattr(hashlib, "pbkdf2_hmac", spy)
    return seen


async def test_scram_toward_the_backend_derives_off_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PBKDF2 at the backend's iteration count used to run inside the client
    machine's step(), on the event loop (up to 10 million iterations, some
    seconds, every session stalled). The machine now hands it to the driver,
    which runs it in a worker thread."""
    verifier = make_verifier(PASSWORD, "sha256", 50_000, salt=b"a fixed test salt")
    seen = derivation_spy(monkeypatch)
    loop_thread = threading.current_thread().name
    async with scram_backend(store(verifier)) as port:
        result = await log_in(port)
    assert isinstance(result, LoggedIn), result
    assert len(seen) == 1
    thread, iterations = seen[0]
    assert iterations == 50_000 and thread != loop_thread


async def test_backend_asking_for_too_many_iterations_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen = derivation_spy(monkeypatch)
    # A server needs no PBKDF2 to announce a count: random keys will do, the
    # login stops at server-first.
    verifier = ScramVerifier(b"salt" * 4, 10_000_000, bytes(32), bytes(32))
    async with scram_backend(store(verifier)) as port:
        result = await log_in(port)
    assert isinstance(result, LoginFailed)
    assert "iteration count 10000000 is out of the accepted range (4096..100000)" in result.detail
    assert seen == []  # refused before any hashing
