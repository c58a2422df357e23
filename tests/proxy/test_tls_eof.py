"""A client that starts TLS, sends its ClientHello and closes (GNU SASL's
gsasl does this when it rejects the server's certificate) ends its session
at once, not at the listener's handshake timeout: a dead peer never holds a
session open. Implicit TLS and STARTTLS, and the backend side: a backend
that closes after our ClientHello ends the client's session too.

The handshake timeout is set far above the wait the test allows itself
(HANDSHAKE_TIMEOUT against SESSION_END_WAIT), so the test fails on the
hang without asserting any wall-clock limit on the fast path."""

from __future__ import annotations

import asyncio
import contextlib
import imaplib
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from authgate import config as config_mod
from authgate.certs import ensure_dev_certificates
from authgate.credentials.store import UserStore, generate_secrets
from authgate.runner import start_gateway
from authgate.testing.stack import ListenerSpec, Stack, config_text, embedded_stack

pytestmark = pytest.mark.asyncio

PASSWORD = "pw-tls-eof-1"
HANDSHAKE_TIMEOUT = 60  # the listener's: far beyond what the test waits
SESSION_END_WAIT = 5.0  # the test's own bound on waiting for the session to end
LAYOUT = (
    ListenerSpec("imap", "imap", "starttls"),
    ListenerSpec("imaps", "imap", "implicit"),
    ListenerSpec("submission", "smtp", "starttls"),
    ListenerSpec("smtps", "smtp", "implicit"),
)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with embedded_stack(
        tmp_path_factory.mktemp("tlseof"),
        users={"alice": PASSWORD},
        security="none",
        layout=LAYOUT,
        record=True,  # each connection's transcript ends when its channel learns the peer is gone
        extra_config=f"[limits]\nhandshake_timeout = {HANDSHAKE_TIMEOUT}\n",
    ) as running:
        yield running


def client_hello() -> bytes:
    """A real ClientHello, as the ssl module's client would send it."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    context = ssl.create_default_context()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16", hello[:8]  # a handshake record
    return hello


async def read_line_starting(reader: asyncio.StreamReader, marker: bytes) -> None:
    for _ in range(50):
        line = await asyncio.wait_for(reader.readline(), 10)
        if not line:
            raise ConnectionError(f"closed before {marker!r}")
        if line.startswith(marker) and line[3:4] != b"-":
            return
    raise AssertionError(f"no line starting {marker!r}")


async def sessions_end(stack: Stack, timeout: float = SESSION_END_WAIT) -> bool:
    """Whether every session of the gateway ended within `timeout` s."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while stack.gateway.session_count:
        if loop.time() > end:
            return False
        await asyncio.sleep(0.02)
    return True


async def hello_then_close(
    stack: Stack, listener: str, starttls: tuple[bytes, ...] = (), started: bytes = b""
) -> None:
    """Connect; with `starttls`, greet and run the STARTTLS lines (each
    answered by a line starting with `started` or 250); send a ClientHello
    and close without reading the server's answer."""
    assert await sessions_end(stack), "a session of an earlier test is still open"
    ep = stack[listener]
    reader, writer = await asyncio.open_connection(ep.host, ep.port)
    try:
        if starttls:
            await asyncio.wait_for(reader.readline(), 10)  # greeting
            for line in starttls:
                writer.write(line)
                await read_line_starting(reader, b"250 " if line.startswith(b"EHLO") else started)
        writer.write(client_hello())
        await writer.drain()
        assert stack.gateway.session_count == 1
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


CASES = {
    "imaps": ("imaps", (), b""),
    "imap-starttls": ("imap", (b"a STARTTLS\r\n",), b"a OK"),
    "smtps": ("smtps", (), b""),
    "smtp-starttls": ("submission", (b"EHLO client.example\r\n", b"STARTTLS\r\n"), b"220 "),
}


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("case", sorted(CASES))
async def test_client_closing_after_its_client_hello_ends_the_session(
    stack: Stack, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="authgate")
    listener, starttls, started = CASES[case]
    await hello_then_close(stack, listener, starttls, started)
    assert await sessions_end(stack), "the session waits for the handshake timeout"
    # The server's channel learnt the connection is gone (asyncio tells it
    # nothing when the handshake fails; before the fix it waited forever).
    transcript = stack.last_transcript(listener)
    assert await transcript.wait_ended(SESSION_END_WAIT), "the channel never saw the peer close"
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        "TLS handshake failed" in m and "127.0.0.1" in m
        for m in messages
    ), messages
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


# ------------------------------------------------------- the backend side

BACKEND_CAPS = b"IMAP4rev1 STARTTLS SASL-IR AUTH=PLAIN"


class HelloThenClose:
    """A real loopback IMAP backend that offers STARTTLS, says "begin TLS",
    reads authgate's ClientHello and closes the connection."""

    def __init__(self) -> None:
        self.hellos = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b"* OK [CAPABILITY " + BACKEND_CAPS + b"] ready\r\n")
            for _ in range(20):
                line = await asyncio.wait_for(reader.readline(), 10)
                tag, _, command = line.rstrip(b"\r\n").partition(b" ")
                if command.upper() == b"CAPABILITY":
                    writer.write(b"* CAPABILITY " + BACKEND_CAPS + b"\r\n" + tag + b" OK done\r\n")
                elif command.upper() == b"STARTTLS":
                    writer.write(tag + b" OK begin TLS\r\n")
                    await writer.drain()
                    record = await asyncio.wait_for(reader.read(4096), 10)
                    if record[:1] == b"\x16":
                        self.hellos += 1
                    return
                else:
                    writer.write(tag + b" BAD not now\r\n")
        except (ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()


def imap_login_error(port: int) -> str:
    """LOGIN through authgate; the error text ("" on success). The socket
    timeout bounds the wait: far below the backend's handshake timeout."""
    with imaplib.IMAP4("127.0.0.1", port, timeout=SESSION_END_WAIT) as client:
        try:
            client.login("alice", PASSWORD)
        except imaplib.IMAP4.error as exc:
            return str(exc)
        return ""


async def test_backend_closing_after_our_client_hello_fails_the_login_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="authgate")
    backend = HelloThenClose()
    server = await asyncio.start_server(backend.handle, "127.0.0.1", 0)
    try:
        ensure_dev_certificates(tmp_path / "certs")
        store = UserStore(realm="localhost")
        store.set_user_secrets(
            "alice", generate_secrets("alice", PASSWORD, "localhost", schemes=["PLAIN"])
        )
        store.save(tmp_path / "users.toml")
        path = tmp_path / "authgate.toml"
        path.write_text(
            config_text(
                host="127.0.0.1",
                layout=(ListenerSpec("imap", "imap", "none"),),
                certs=tmp_path / "certs",
                users_file=tmp_path / "users.toml",
                backend_ports={"imap": server.sockets[0].getsockname()[1]},
                master_password="master-pw",
                security="none",
                mechanisms=["PLAIN"],
                exempt=[],
                # These lines end [listeners.backend]: STARTTLS toward it,
                # and a login (and handshake) timeout far beyond our wait.
                extra=(
                    'tls = "starttls"\nverify = false\n'
                    f"[limits]\nbackend_timeout = {HANDSHAKE_TIMEOUT}\n"
                    "[defence]\nfailure_delay = 0\n"
                ),
            )
        )
        gateway = await start_gateway(config_mod.load(path), UserStore.load(tmp_path / "users.toml"))
        try:
            port = gateway.addresses()["imap"][1]
            error = await asyncio.to_thread(imap_login_error, port)
        finally:
            await gateway.stop(drain=1)
    finally:
        server.close()
    assert backend.hellos == 1, "authgate never began its TLS handshake with the backend"
    assert "[UNAVAILABLE]" in error, error
    messages = [r.getMessage() for r in caplog.records]
    assert any("TLS handshake failed" in m for m in messages), messages
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
