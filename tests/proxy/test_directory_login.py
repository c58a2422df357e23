"""Directory users through the proxy: an LDAP bind against a real slapd
verifies them, only PLAIN and LOGIN are offered, and a directory outage is
a temporary failure, never "wrong password"."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from authgate import config as config_mod
from authgate.certs import ensure_dev_certificates
from authgate.offers import load_store
from authgate.proxy.server import Gateway
from authgate.runner import start_gateway
from authgate.testing.backends import Backends, start_backends
from authgate.testing.stack import MASTER_USER
from tests.ldap_server import PEOPLE, SlapdInstance, start_slapd

pytestmark = pytest.mark.asyncio

USER = "dirk"
PASSWORD = "Dirk-LDAP-pw-1"


@pytest.fixture(scope="module")
def slapd() -> Iterator[SlapdInstance]:
    with start_slapd({USER: ("people", PASSWORD)}) as instance:
        yield instance


@pytest_asyncio.fixture
async def proxy(tmp_path: Path, slapd: SlapdInstance) -> AsyncIterator[tuple[Gateway, Backends]]:
    ensure_dev_certificates(tmp_path / "certs")
    backends = await start_backends(tmp_path / "mail", {USER: "unused"}, master=(MASTER_USER, "mpw"))
    path = tmp_path / "authgate.toml"
    path.write_text(
        f"""hostname = "localhost"
[policy]
security = "none"
mechanisms = ["CRAM-MD5", "LOGIN", "PLAIN"]
[directory]
url = "{slapd.ldaps_url}"
ca_file = "{slapd.ca_file}"
bind_dn_template = "uid={{user}},{PEOPLE}"
[[listeners]]
name = "imap"
protocol = "imap"
listen = "127.0.0.1:0"
[listeners.backend]
address = "127.0.0.1:{backends.imap.port}"
master_user = "{MASTER_USER}"
master_password = "mpw"
[defence]
failure_delay = 0
penalties = []
"""
    )
    config = config_mod.load(path)
    gateway = await start_gateway(config, load_store(config))
    try:
        yield gateway, backends
    finally:
        await gateway.stop(drain=1)
        await backends.close()


async def exchange(gateway: Gateway, *lines: str) -> list[bytes]:
    host, port = gateway.addresses()["imap"]
    reader, writer = await asyncio.open_connection(host, port)
    replies = [await asyncio.wait_for(reader.readline(), 10)]
    for i, line in enumerate(lines):
        writer.write(f"t{i} {line}\r\n".encode())
        while True:
            reply = await asyncio.wait_for(reader.readline(), 15)
            replies.append(reply)
            if reply.startswith(f"t{i} ".encode()) or not reply:
                break
    writer.close()
    return replies


async def test_directory_user_logs_in_with_an_ldap_bind(
    proxy: tuple[Gateway, Backends], slapd: SlapdInstance
) -> None:
    gateway, backends = proxy
    mark = slapd.log_size()
    replies = await exchange(gateway, f"LOGIN {USER} {PASSWORD}")
    assert replies[-1].startswith(b"t0 OK")
    assert backends.imap.logins[-1].user == USER
    assert any(USER in dn for dn in slapd.binds(mark))


async def test_only_cleartext_mechanisms_are_offered(proxy: tuple[Gateway, Backends]) -> None:
    gateway, _ = proxy
    greeting = (await exchange(gateway))[0]
    assert b"AUTH=PLAIN" in greeting and b"AUTH=LOGIN" in greeting
    assert b"AUTH=CRAM-MD5" not in greeting  # a directory reveals no secret to check it with


async def test_wrong_password_is_refused(proxy: tuple[Gateway, Backends]) -> None:
    gateway, _ = proxy
    replies = await exchange(gateway, f"LOGIN {USER} wrong-password")
    assert replies[-1].startswith(b"t0 NO [AUTHENTICATIONFAILED]")


async def test_directory_down_is_a_temporary_failure(
    proxy: tuple[Gateway, Backends], slapd: SlapdInstance
) -> None:
    gateway, _ = proxy
    slapd.stop()
    try:
        replies = await exchange(gateway, f"LOGIN {USER} {PASSWORD}")
        assert replies[-1].startswith(b"t0 NO [UNAVAILABLE]")
    finally:
        slapd.start()
    replies = await exchange(gateway, f"LOGIN {USER} {PASSWORD}")
    assert replies[-1].startswith(b"t0 OK")
