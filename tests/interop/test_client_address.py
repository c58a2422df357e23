"""The backend learns the real client address from authgate: PROXY v2 on
Dovecot's haproxy listener, IMAP ID x-originating-ip via Dovecot's
login_trusted_networks. Dovecot's own login log line is the proof."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from authgate import config as config_mod
from authgate.credentials.store import UserStore, generate_secrets
from authgate.offers import load_store
from authgate.proxy.server import Gateway
from authgate.runner import start_gateway
from tests.interop.dovecot import DovecotInstance
from tests.interop.test_dovecot_direct import login_line

pytestmark = [pytest.mark.interop, pytest.mark.asyncio]

CLIENT = "127.0.0.23"


@pytest_asyncio.fixture
async def gateway(tmp_path: Path, dovecot: DovecotInstance) -> AsyncIterator[Gateway]:
    store = UserStore(realm="localhost")
    store.set_user_secrets("plainuser", generate_secrets("plainuser", dovecot.users["plainuser"], "localhost"))
    store.save(tmp_path / "users.toml")
    master, master_pw = dovecot.master
    listeners = ""
    for name, port, forwarding in (
        ("imap-proxy", dovecot.imap_haproxy, "proxy-v2"),
        ("imap-id", dovecot.imap, "id"),
        ("pop3-proxy", dovecot.pop3_haproxy, "proxy-v2"),
        ("pop3-plain", dovecot.pop3, "none"),
    ):
        protocol = name.split("-")[0]
        listeners += f"""
[[listeners]]
name = "{name}"
protocol = "{protocol}"
listen = "127.0.0.1:0"
[listeners.backend]
address = "127.0.0.1:{port}"
master_user = "{master}"
master_password = "{master_pw}"
client_address = "{forwarding}"
"""
    path = tmp_path / "authgate.toml"
    path.write_text(
        '[policy]\nsecurity = "none"\n[users]\nfile = "users.toml"\n'
        "[defence]\nfailure_delay = 0\npenalties = []\n" + listeners
    )
    config = config_mod.load(path)
    running = await start_gateway(config, load_store(config))
    try:
        yield running
    finally:
        await running.stop(drain=1)


def login_through(gateway: Gateway, name: str, password: str) -> bytes:
    host, port = gateway.addresses()[name]
    with socket.create_connection((host, port), timeout=15, source_address=(CLIENT, 0)) as sock:
        sock.recv(4096)
        if name.startswith("pop3"):
            sock.sendall(b"USER plainuser\r\n")
            sock.recv(4096)
            sock.sendall(f"PASS {password}\r\n".encode())
        else:
            sock.sendall(f"a LOGIN plainuser {password}\r\n".encode())
        return sock.recv(4096)


@pytest.mark.parametrize(("name", "service"), [("imap-proxy", "imap"), ("imap-id", "imap"), ("pop3-proxy", "pop3")])
async def test_backend_sees_the_real_client(
    gateway: Gateway, dovecot: DovecotInstance, name: str, service: str
) -> None:
    mark = dovecot.log_size()
    reply = await asyncio.to_thread(login_through, gateway, name, dovecot.users["plainuser"])
    assert reply.startswith((b"a OK", b"+OK")), reply
    await asyncio.to_thread(dovecot.wait_for_log, login_line(service, "plainuser", "PLAIN", CLIENT), mark)


async def test_a_capa_list_is_remembered_only_without_a_proxy_header(
    gateway: Gateway, dovecot: DovecotInstance
) -> None:
    # Behind a PROXY header Dovecot may answer each client another list
    # (login_trusted_networks: cleartext mechanisms or not): none is kept
    # for the next client. Without one, the list is kept for the next login.
    for name in ("pop3-proxy", "pop3-plain"):
        reply = await asyncio.to_thread(login_through, gateway, name, dovecot.users["plainuser"])
        assert reply.startswith(b"+OK"), reply
    kept = {}
    for runtime in gateway.runtimes:
        assert runtime.routes is not None
        kept[runtime.listener.name] = len(runtime.routes.capabilities)
    assert kept["pop3-proxy"] == 0
    assert kept["pop3-plain"] == 1
