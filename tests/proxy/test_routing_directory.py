"""Routing by a directory attribute: users verified by an LDAP bind against
a real slapd go to the backend their entry names (`[directory]
backend_attribute`, mapped through `[routing] hosts`). The attribute is
departmentNumber, one inetOrgPerson already has (the test slapd loads no
mail schema; a site would use mailHost)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from authgate import config as config_mod
from authgate.offers import load_store
from authgate.proxy.routes import HEALTH
from authgate.proxy.server import Gateway
from authgate.runner import start_gateway
from authgate.testing.backends import Backends, seed_mailbox, start_backends
from authgate.testing.stack import MASTER_USER
from tests.ldap_server import PEOPLE, SlapdInstance, start_slapd

pytestmark = pytest.mark.asyncio

USERS = {"dora": ("people", "Dora-LDAP-pw-1"), "ed": ("people", "Ed-LDAP-pw-2")}


@pytest.fixture(scope="module")
def slapd() -> Iterator[SlapdInstance]:
    hosts = {"ed": {"departmentNumber": "Mail2.Example.ORG"}}  # dora has none: the default
    with start_slapd(USERS, attributes=hosts) as instance:
        yield instance


@pytest_asyncio.fixture
async def site(
    tmp_path: Path, slapd: SlapdInstance
) -> AsyncIterator[tuple[Gateway, Backends, Backends]]:
    HEALTH.clear()
    seed_mailbox(tmp_path / "m1", "dora", [b"Subject: store-1\r\n\r\n1\r\n"])
    seed_mailbox(tmp_path / "m2", "ed", [b"Subject: store-2\r\n\r\n2\r\n"])
    store1 = await start_backends(tmp_path / "m1", {"dora": "x"}, master=(MASTER_USER, "mpw"))
    store2 = await start_backends(tmp_path / "m2", {"ed": "x"}, master=(MASTER_USER, "mpw"))
    path = tmp_path / "authgate.toml"
    path.write_text(
        f"""[policy]
security = "none"
[directory]
url = "{slapd.ldaps_url}"
ca_file = "{slapd.ca_file}"
bind_dn_template = "uid={{user}},{PEOPLE}"
backend_attribute = "departmentNumber"
[routing]
hosts = {{ "mail2.example.org" = "store2" }}
[backends.store1]
imap = "127.0.0.1:{store1.imap.port}"
master_user = "{MASTER_USER}"
master_password = "mpw"
[backends.store2]
imap = "127.0.0.1:{store2.imap.port}"
master_user = "{MASTER_USER}"
master_password = "mpw"
[defence]
failure_delay = 0
penalties = []
[[listeners]]
name = "imap"
protocol = "imap"
listen = "127.0.0.1:0"
backend = "store1"
"""
    )
    config = config_mod.load(path)
    gateway = await start_gateway(config, load_store(config))
    try:
        yield gateway, store1, store2
    finally:
        await gateway.stop(drain=1)
        await asyncio.gather(store1.close(), store2.close())
        HEALTH.clear()


async def login_and_fetch(gateway: Gateway, user: str) -> bytes:
    host, port = gateway.addresses()["imap"]
    reader, writer = await asyncio.open_connection(host, port)
    try:
        got = await asyncio.wait_for(reader.readline(), 10)
        password = USERS[user][1]
        writer.write(
            f'a LOGIN {user} "{password}"\r\nb SELECT INBOX\r\nc FETCH 1 BODY.PEEK[]\r\n'.encode()
        )
        for _ in range(100):
            line = await asyncio.wait_for(reader.readline(), 15)
            got += line
            if not line or line.startswith((b"c ", b"a NO", b"a BAD")):
                break
        return got
    finally:
        writer.close()


async def test_the_directory_attribute_picks_the_backend(
    site: tuple[Gateway, Backends, Backends],
) -> None:
    gateway, store1, store2 = site
    ed = await login_and_fetch(gateway, "ed")
    assert b"a OK" in ed and b"Subject: store-2" in ed
    dora = await login_and_fetch(gateway, "dora")  # no attribute: the default
    assert b"a OK" in dora and b"Subject: store-1" in dora
    assert [r.user for r in store2.imap.logins] == ["ed"]
    assert [r.user for r in store1.imap.logins] == ["dora"]
