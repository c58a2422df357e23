"""STARTTLS after authentication ("NO STARTTLS", USENIX Security 2021): once
authgate has logged the client in, the session is spliced to the backend,
so a later STARTTLS/STLS reaches a real Dovecot (one that offers STARTTLS
before login), which refuses it; the session goes on unchanged, in the
clear or inside the TLS the client started with authgate before logging
in. No TLS layer is started in the middle of an authenticated session.

(SMTP cannot get there: a successful AUTH splices to a backend in its own
authenticated state, and its STARTTLS handling after that is the SMTP
command filter's business.)"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from authgate import config as config_mod
from authgate.certs import ensure_dev_certificates
from authgate.credentials.store import UserStore, generate_secrets
from authgate.offers import load_store
from authgate.proxy.server import Gateway
from authgate.runner import start_gateway
from tests.interop.dovecot import DovecotInstance

pytestmark = [pytest.mark.interop, pytest.mark.asyncio]

USER = "plainuser"


@dataclass
class Setup:
    gateway: Gateway
    ca_file: Path  # the CA of authgate's certificate

    def address(self, listener: str) -> tuple[str, int]:
        return self.gateway.addresses()[listener]

    def wrap(self, sock: socket.socket) -> ssl.SSLSocket:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        return context.wrap_socket(sock, server_hostname="localhost")


@pytest_asyncio.fixture
async def setup(tmp_path: Path, dovecot_tls: DovecotInstance) -> AsyncIterator[Setup]:
    ca = ensure_dev_certificates(tmp_path / "certs")
    store = UserStore(realm="localhost")
    store.set_user_secrets(USER, generate_secrets(USER, dovecot_tls.users[USER], "localhost"))
    store.save(tmp_path / "users.toml")
    master, master_pw = dovecot_tls.master
    listeners = ""
    for protocol, port in (("imap", dovecot_tls.imap), ("pop3", dovecot_tls.pop3)):
        for tls in ("none", "starttls"):
            listeners += f"""
[[listeners]]
name = "{protocol}-{tls}"
protocol = "{protocol}"
listen = "127.0.0.1:0"
tls = "{tls}"
[listeners.backend]
address = "127.0.0.1:{port}"
master_user = "{master}"
master_password = "{master_pw}"
"""
    path = tmp_path / "authgate.toml"
    path.write_text(
        '[policy]\nsecurity = "none"\n[users]\nfile = "users.toml"\n'
        f'[tls]\ncert = "{ca.parent / "server.pem"}"\nkey = "{ca.parent / "server.key"}"\n'
        "[defence]\nfailure_delay = 0\npenalties = []\n" + listeners
    )
    config = config_mod.load(path)
    running = await start_gateway(config, load_store(config))
    try:
        yield Setup(running, ca)
    finally:
        await running.stop(drain=1)


class Conversation:
    """Line-by-line talk over a socket that may be upgraded to TLS."""

    def __init__(self, sock: socket.socket | ssl.SSLSocket) -> None:
        self.sock = sock
        self.buffer = b""

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"closed; had {self.buffer!r}")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def until(self, prefix: bytes) -> list[bytes]:
        lines = [self.line()]
        while not lines[-1].startswith(prefix):
            lines.append(self.line())
        return lines

    def say(self, text: bytes) -> None:
        self.sock.sendall(text + b"\r\n")


def imap_session(
    setup: Setup, listener: str, password: str
) -> tuple[list[bytes], list[bytes], str | None]:
    """[STARTTLS with authgate,] LOGIN, STARTTLS again, then SELECT: (reply to
    the second STARTTLS, reply to SELECT, TLS version of the socket)."""
    host, port = setup.address(listener)
    sock: socket.socket | ssl.SSLSocket = socket.create_connection((host, port), timeout=15)
    talk = Conversation(sock)
    talk.line()  # greeting
    if listener.endswith("starttls"):
        talk.say(b"s STARTTLS")
        assert talk.until(b"s ")[-1].startswith(b"s OK")
        sock = talk.sock = setup.wrap(sock)
    talk.say(f"a LOGIN {USER} {password}".encode())
    assert talk.until(b"a ")[-1].startswith(b"a OK"), "login failed"
    talk.say(b"b STARTTLS")
    starttls = talk.until(b"b ")
    # The session is unchanged: same connection, same (no) TLS, still logged in.
    talk.say(b"c SELECT INBOX")
    select = talk.until(b"c ")
    version = sock.version() if isinstance(sock, ssl.SSLSocket) else None
    sock.close()
    return starttls, select, version


def pop3_session(setup: Setup, listener: str, password: str) -> tuple[bytes, bytes, str | None]:
    host, port = setup.address(listener)
    sock: socket.socket | ssl.SSLSocket = socket.create_connection((host, port), timeout=15)
    talk = Conversation(sock)
    talk.line()
    if listener.endswith("starttls"):
        talk.say(b"STLS")
        assert talk.line().startswith(b"+OK")
        sock = talk.sock = setup.wrap(sock)
    talk.say(f"USER {USER}".encode())
    assert talk.line().startswith(b"+OK")
    talk.say(f"PASS {password}".encode())
    assert talk.line().startswith(b"+OK"), "login failed"
    talk.say(b"STLS")
    stls = talk.line()
    talk.say(b"STAT")
    stat = talk.line()
    version = sock.version() if isinstance(sock, ssl.SSLSocket) else None
    sock.close()
    return stls, stat, version


@pytest.mark.parametrize("listener", ["imap-none", "imap-starttls"])
async def test_imap_starttls_after_login_is_refused(
    setup: Setup, dovecot_tls: DovecotInstance, listener: str
) -> None:
    starttls, select, version = await asyncio.to_thread(
        imap_session, setup, listener, dovecot_tls.users[USER]
    )
    assert starttls[-1].startswith((b"b BAD", b"b NO")), starttls
    assert select[-1].startswith(b"c OK"), select
    # In the clear it began, in the clear it stays; TLS with authgate stays that.
    assert (listener == "imap-none") == (version is None)


@pytest.mark.parametrize("listener", ["pop3-none", "pop3-starttls"])
async def test_pop3_stls_after_login_is_refused(
    setup: Setup, dovecot_tls: DovecotInstance, listener: str
) -> None:
    stls, stat, version = await asyncio.to_thread(
        pop3_session, setup, listener, dovecot_tls.users[USER]
    )
    assert stls.startswith(b"-ERR"), stls
    assert stat.startswith(b"+OK"), stat
    assert (listener == "pop3-none") == (version is None)
