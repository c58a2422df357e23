"""One listener on IPv4 and IPv6 (`listen = ["127.0.0.1:0", "[::1]:0"]`):
real IMAP logins over both families reach one backend under one listener
name (logs, audit); IPv6 sockets are IPV6_V6ONLY; a reload keeps the
sockets, and moves or re-creates them only when the addresses (or the
accept path) change."""

from __future__ import annotations

import asyncio
import imaplib
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from authgate import config as config_mod
from authgate.audit import read_log
from authgate.certs import ensure_dev_certificates
from authgate.credentials.store import UserStore, generate_secrets
from authgate.offers import load_store
from authgate.proxy.proxy_protocol import build_v2
from authgate.proxy.runtime import build_runtime
from authgate.proxy.server import Gateway
from authgate.runner import start_gateway
from authgate.testing.backends import Backends, start_backends
from authgate.testing.stack import MASTER_USER

pytestmark = pytest.mark.asyncio

PASSWORD = "Alice-dual-1"
REMOTE_CLIENT = ("203.0.113.50", 40001)


@dataclass
class Setup:
    gateway: Gateway
    path: Path
    backends: Backends

    def config_text(self, imap_listen: str, *, proxy_protocol: bool = True) -> str:
        return f"""hostname = "localhost"
[policy]
security = "none"
[tls]
cert = "{self.path.parent / "certs/server.pem"}"
key = "{self.path.parent / "certs/server.key"}"
[users]
file = "users.toml"
[audit]
file = "audit.log"

[[listeners]]
name = "imap"
protocol = "imap"
listen = {imap_listen}
[listeners.backend]
address = "127.0.0.1:{self.backends.imap.port}"
master_user = "{MASTER_USER}"
master_password = "mpw"

[[listeners]]
name = "balanced"
protocol = "imap"
listen = ["127.0.0.1:0", "[::1]:0"]
proxy_protocol = {str(proxy_protocol).lower()}
trusted_proxies = ["127.0.0.1/32", "::1/128"]
[listeners.backend]
address = "127.0.0.1:{self.backends.imap.port}"
master_user = "{MASTER_USER}"
master_password = "mpw"
[listeners.policy]
security = "require-secure-auth"
exempt_networks = ["127.0.0.0/8", "::1/128"]   # the balancer's addresses, not its clients'
"""

    async def reload(self, text: str) -> None:
        self.path.write_text(text)
        config = config_mod.load(self.path)
        await self.gateway.reload(build_runtime(config, load_store(config)), config.defence)


DUAL = '["127.0.0.1:0", "[::1]:0"]'


@pytest_asyncio.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    ensure_dev_certificates(tmp_path / "certs")
    backends = await start_backends(tmp_path / "mail", {"alice": "x"}, master=(MASTER_USER, "mpw"))
    store = UserStore(realm="localhost")
    store.set_user_secrets("alice", generate_secrets("alice", PASSWORD, "localhost"))
    store.save(tmp_path / "users.toml")
    path = tmp_path / "authgate.toml"
    made = Setup(None, path, backends)  # type: ignore[arg-type]
    path.write_text(made.config_text(DUAL))
    config = config_mod.load(path)
    made.gateway = await start_gateway(config, load_store(config))
    try:
        yield made
    finally:
        await made.gateway.stop(drain=1)
        await backends.close()


def imap_login(host: str, port: int) -> str:
    with imaplib.IMAP4(host, port, timeout=15) as client:
        typ, _ = client.login("alice", PASSWORD)
        client.select("INBOX")
        return typ


def greeting_through_balancer(host: str, port: int, *, header: bool = True) -> bytes:
    """A PROXY v2 header (naming a remote client) from the 'balancer' on
    `host`, then the greeting; b"" if the connection closed first."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(15)
        sock.connect((host, port))
        if header:
            sock.sendall(build_v2(REMOTE_CLIENT, (host, port)))
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        return data


def refuses(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        return sock.connect_ex((host, port)) != 0


def v6only(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)


async def test_one_listener_serves_both_families_under_one_name(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="authgate")
    bound = setup.gateway.all_addresses()
    (_, port), (_, port6) = bound["imap"]
    # Port 0 in a list: every socket gets the port the first one got.
    assert bound["imap"] == [("127.0.0.1", port), ("::1", port)] and port6 == port
    assert setup.gateway.addresses()["imap"] == ("127.0.0.1", port)

    assert await asyncio.to_thread(imap_login, "127.0.0.1", port) == "OK"
    assert await asyncio.to_thread(imap_login, "::1", port) == "OK"
    # One backend saw both, as the client's user.
    assert [(x.user, x.authcid) for x in setup.backends.imap.logins] == [
        ("alice", MASTER_USER),
        ("alice", MASTER_USER),
    ]
    # One name in the log and in the audit trail, whichever family.
    logins = [
        r.getMessage()
        for r in caplog.records
        if r.name == "authgate.login" and " user=alice " in r.getMessage()
    ]
    assert len(logins) == 2
    assert " client=127.0.0.1 " in logins[0] and " client=::1 " in logins[1], logins
    await setup.gateway.stop(drain=1)
    audit = read_log((setup.path.parent / "audit.log").read_bytes(), None, "audit.log")
    logins = [r for r in audit.records if r.get("event") == "login"]
    assert [(r["listener"], r["client"]) for r in logins] == [
        ("imap", "127.0.0.1"),
        ("imap", "::1"),
    ]


async def test_ipv6_sockets_are_v6only_on_both_accept_paths(setup: Setup) -> None:
    # V6ONLY is what lets "0.0.0.0:143" and "[::]:143" bind side by side.
    for name in ("imap", "balanced"):
        sockets = setup.gateway._servers[name].sockets
        assert [s.family for s in sockets] == [socket.AF_INET, socket.AF_INET6]
        assert v6only(sockets[1]) == 1, name


async def test_proxy_protocol_listener_on_both_families(setup: Setup) -> None:
    bound = setup.gateway.all_addresses()["balanced"]
    assert [host for host, _ in bound] == ["127.0.0.1", "::1"] and bound[0][1] == bound[1][1]
    for host, port in bound:
        greeting = await asyncio.to_thread(greeting_through_balancer, host, port)
        # The remote client named in the header is judged, not the (exempt) balancer.
        assert greeting.startswith(b"* OK") and b"LOGINDISABLED" in greeting, (host, greeting)


def servers(setup: Setup, name: str) -> list[object]:
    """The listener's listening sockets (one per address), to see whether a
    reload kept them."""
    return list(setup.gateway._servers[name].sockets)


async def test_reload_keeps_the_sockets_of_an_unchanged_listener(setup: Setup) -> None:
    before = {name: servers(setup, name) for name in ("imap", "balanced")}
    addresses = setup.gateway.all_addresses()
    await setup.reload(setup.config_text(DUAL))
    # The very same servers on the very same ports, still accepting.
    assert {name: servers(setup, name) for name in ("imap", "balanced")} == before
    assert setup.gateway.all_addresses() == addresses
    (_, port), _ = addresses["imap"]
    assert await asyncio.to_thread(imap_login, "::1", port) == "OK"


async def test_reload_moves_a_listener_whose_addresses_changed(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="authgate")
    (_, port), _ = setup.gateway.all_addresses()["imap"]
    balanced = servers(setup, "balanced")
    await setup.reload(setup.config_text('["127.0.0.2:0", "[::1]:0"]'))
    (host, new_port), (host6, port6) = setup.gateway.all_addresses()["imap"]
    assert (host, host6) == ("127.0.0.2", "::1") and port6 == new_port
    assert "listener imap stopped (removed or moved)" in caplog.text
    assert f"listening: imap (imap, tls none) on 127.0.0.2:{new_port}, [::1]:{new_port} -> " in (
        caplog.text
    )
    assert await asyncio.to_thread(imap_login, "127.0.0.2", new_port) == "OK"
    assert await asyncio.to_thread(imap_login, "::1", new_port) == "OK"
    assert await asyncio.to_thread(refuses, "127.0.0.1", port)
    assert servers(setup, "balanced") == balanced  # the other listener was left alone


async def test_reload_that_switches_proxy_protocol_re_creates_the_listener(setup: Setup) -> None:
    # A listener that kept its PROXY-reading accept path after the header
    # was switched off, or the plain one after it was switched on, would
    # judge every client behind the balancer as the balancer (its exempt
    # status, its connection count): the servers must be made anew.
    proxied = servers(setup, "balanced")
    await setup.reload(setup.config_text(DUAL, proxy_protocol=False))
    plain = servers(setup, "balanced")
    assert len(plain) == 2 and not any(sock in proxied for sock in plain)
    for host, port in setup.gateway.all_addresses()["balanced"]:
        # No header any more: a client from 127.0.0.1 / ::1 is served at once, as itself.
        greeting = await asyncio.to_thread(greeting_through_balancer, host, port, header=False)
        assert greeting.startswith(b"* OK") and b"AUTH=PLAIN" in greeting, (host, greeting)
    await setup.reload(setup.config_text(DUAL, proxy_protocol=True))
    assert not any(sock in plain for sock in servers(setup, "balanced"))
    for host, port in setup.gateway.all_addresses()["balanced"]:
        greeting = await asyncio.to_thread(greeting_through_balancer, host, port)
        assert b"LOGINDISABLED" in greeting, (host, greeting)


async def test_a_reload_that_cannot_bind_keeps_the_running_listeners(setup: Setup) -> None:
    # The moved listener's new address is taken: the reload fails as a
    # whole, and the listener it would have moved still serves where it was
    # (runner logs "reload failed, keeping the running configuration").
    (_, port), _ = setup.gateway.all_addresses()["imap"]
    squatter = socket.create_server(("127.0.0.3", 0))
    try:
        taken = squatter.getsockname()[1]
        with pytest.raises(OSError):
            await setup.reload(setup.config_text(f'["127.0.0.3:{taken}"]'))
        assert setup.gateway.all_addresses()["imap"][0] == ("127.0.0.1", port)
        assert await asyncio.to_thread(imap_login, "127.0.0.1", port) == "OK"
        assert await asyncio.to_thread(imap_login, "::1", port) == "OK"
    finally:
        squatter.close()
