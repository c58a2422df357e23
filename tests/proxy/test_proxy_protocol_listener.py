"""Listeners behind a TCP load balancer: the PROXY header from a trusted
balancer names the real client, whom the policy then judges; nobody else
may send one."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from authgate import config as config_mod
from authgate.certs import ensure_dev_certificates
from authgate.credentials.store import UserStore, generate_secrets
from authgate.offers import load_store
from authgate.proxy.proxy_protocol import build_v2
from authgate.proxy.server import Gateway
from authgate.runner import start_gateway
from authgate.testing.backends import start_backends
from authgate.testing.stack import MASTER_USER

pytestmark = pytest.mark.asyncio

BALANCER = "127.0.0.1"
OFFICE_CLIENT = ("10.9.9.9", 40000)  # inside the exempt network
REMOTE_CLIENT = ("203.0.113.50", 40001)


@pytest_asyncio.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    ensure_dev_certificates(tmp_path / "certs")
    backends = await start_backends(tmp_path / "mail", {"alice": "pw"}, master=(MASTER_USER, "mpw"))
    store = UserStore(realm="localhost")
    store.set_user_secrets("alice", generate_secrets("alice", "Alice-pw-1", "localhost"))
    store.save(tmp_path / "users.toml")
    listeners = ""
    for name, tls in (("imap", "none"), ("imaps", "implicit")):
        listeners += f"""
[[listeners]]
name = "{name}"
protocol = "imap"
listen = "127.0.0.1:0"
tls = "{tls}"
proxy_protocol = true
trusted_proxies = ["{BALANCER}/32"]
[listeners.backend]
address = "127.0.0.1:{backends.imap.port}"
master_user = "{MASTER_USER}"
master_password = "mpw"
"""
    path = tmp_path / "authgate.toml"
    path.write_text(
        f"""hostname = "localhost"
[policy]
security = "require-secure-auth"
exempt_networks = ["10.9.9.0/24"]
[tls]
cert = "{tmp_path / 'certs/server.pem'}"
key = "{tmp_path / 'certs/server.key'}"
[users]
file = "users.toml"
[limits]
max_connections_per_address = 2
handshake_timeout = 5
{listeners}"""
    )
    config = config_mod.load(path)
    running = await start_gateway(config, load_store(config))
    try:
        yield running
    finally:
        await running.stop(drain=1)
        await backends.close()


def connect(gateway: Gateway, name: str, source: str) -> socket.socket:
    host, port = gateway.addresses()[name]
    return socket.create_connection((host, port), timeout=10, source_address=(source, 0))


def header(gateway: Gateway, name: str, client: tuple[str, int]) -> bytes:
    return build_v2(client, gateway.addresses()[name])


def recv_or_closed(sock: socket.socket) -> bytes:
    """What the server sent, b"" once it closed (a reset counts as closed)."""
    try:
        return sock.recv(4096)
    except ConnectionResetError:
        return b""


def greeting_of(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


async def test_exempt_client_behind_the_balancer_gets_cleartext(gateway: Gateway) -> None:
    def run() -> tuple[bytes, bytes]:
        with connect(gateway, "imap", BALANCER) as office:
            office.sendall(header(gateway, "imap", OFFICE_CLIENT))
            a = greeting_of(office)
        with connect(gateway, "imap", BALANCER) as remote:
            remote.sendall(header(gateway, "imap", REMOTE_CLIENT))
            b = greeting_of(remote)
        return a, b

    office, remote = await asyncio.to_thread(run)
    assert b"AUTH=PLAIN" in office and b"LOGINDISABLED" not in office  # 10.9.9.9 is exempt
    assert b"AUTH=PLAIN" not in remote and b"LOGINDISABLED" in remote


async def test_trusted_balancer_must_send_the_header(gateway: Gateway) -> None:
    def run() -> bytes:
        with connect(gateway, "imap", BALANCER) as sock:
            sock.sendall(b"a CAPABILITY\r\n")
            return recv_or_closed(sock)

    assert await asyncio.to_thread(run) == b""  # closed, nothing served


async def test_untrusted_peer_cannot_claim_an_address(gateway: Gateway) -> None:
    def run() -> tuple[bytes, bytes]:
        with connect(gateway, "imap", "127.0.0.3") as sock:
            greeting = greeting_of(sock)  # served as itself: a direct client
            sock.sendall(header(gateway, "imap", OFFICE_CLIENT))
            rest = recv_or_closed(sock)
        return greeting, rest

    greeting, rest = await asyncio.to_thread(run)
    assert b"LOGINDISABLED" in greeting  # 127.0.0.3 is not exempt
    assert rest == b""  # the spoofed header got the connection closed


async def test_implicit_tls_after_the_header(gateway: Gateway, tmp_path: Path) -> None:
    context = ssl.create_default_context(cafile=str(tmp_path / "certs/demo-ca.pem"))

    def run() -> bytes:
        raw = connect(gateway, "imaps", BALANCER)
        # The header and the ClientHello leave back to back, as a balancer
        # forwarding a waiting client would send them.
        raw.sendall(header(gateway, "imaps", REMOTE_CLIENT))
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            greeting = greeting_of(tls)
            tls.sendall(b"a LOGIN alice Alice-pw-1\r\n")
            return greeting + tls.recv(4096)

    out = await asyncio.to_thread(run)
    assert b"AUTH=PLAIN" in out
    assert b"a OK" in out


def proxy_warnings(caplog: pytest.LogCaptureFixture, needle: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "PROXY header" in r.getMessage() and needle in r.getMessage()
    ]


async def test_the_balancer_is_not_capped_per_address_its_clients_are(gateway: Gateway) -> None:
    """Every client comes from the balancer's address: the per-address cap
    (2 here) applies to the client each header names, never to the balancer."""

    def run() -> tuple[list[bytes], bytes]:
        held = []
        try:
            greetings = []
            for i in range(4):  # four clients, more than the cap, one balancer
                sock = connect(gateway, "imap", BALANCER)
                held.append(sock)
                sock.sendall(header(gateway, "imap", (f"203.0.113.{60 + i}", 40000)))
                greetings.append(greeting_of(sock))
            for _ in range(2):
                sock = connect(gateway, "imap", BALANCER)
                held.append(sock)
                sock.sendall(header(gateway, "imap", REMOTE_CLIENT))
                greetings.append(greeting_of(sock))
            with connect(gateway, "imap", BALANCER) as third:
                third.sendall(header(gateway, "imap", REMOTE_CLIENT))
                return greetings, greeting_of(third)
        finally:
            for sock in held:
                sock.close()

    greetings, refused = await asyncio.to_thread(run)
    assert all(g.startswith(b"* OK") for g in greetings), greetings
    assert refused.startswith(b"* BYE [UNAVAILABLE] Too many connections")


async def test_a_flood_of_missing_headers_is_logged_once(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)

    def run() -> None:
        for _ in range(30):
            with connect(gateway, "imap", BALANCER) as sock:
                sock.sendall(b"a CAPABILITY\r\n")
                assert recv_or_closed(sock) == b""

    await asyncio.to_thread(run)
    lines = proxy_warnings(caplog, BALANCER)
    assert len(lines) == 1, lines
    assert "bad or missing PROXY header" in lines[0]


async def test_header_from_an_untrusted_peer_on_implicit_tls_is_refused_and_logged(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)

    def run() -> bytes:
        with connect(gateway, "imaps", "127.0.0.3") as sock:
            sock.sendall(header(gateway, "imaps", OFFICE_CLIENT))
            return recv_or_closed(sock)

    assert await asyncio.to_thread(run) == b""
    lines = proxy_warnings(caplog, "127.0.0.3")
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    assert "not in trusted_proxies" in lines[0]


async def test_spoofed_headers_are_logged_once_per_interval(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    def run() -> None:
        for _ in range(20):
            with connect(gateway, "imap", "127.0.0.3") as sock:
                greeting_of(sock)
                sock.sendall(header(gateway, "imap", OFFICE_CLIENT))
                assert recv_or_closed(sock) == b""

    await asyncio.to_thread(run)
    lines = proxy_warnings(caplog, "127.0.0.3")
    assert len(lines) == 1, lines


async def test_a_second_header_behind_the_balancer_is_refused(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    """The balancer's header was read; a client behind it that sends one
    more is trying to claim an address too."""

    def run() -> bytes:
        with connect(gateway, "imap", BALANCER) as sock:
            sock.sendall(header(gateway, "imap", REMOTE_CLIENT))
            greeting_of(sock)
            sock.sendall(header(gateway, "imap", OFFICE_CLIENT))
            return recv_or_closed(sock)

    assert await asyncio.to_thread(run) == b""
    lines = proxy_warnings(caplog, REMOTE_CLIENT[0])
    assert len(lines) == 1 and BALANCER in lines[0], lines
