"""NNTP listeners in the running proxy, in front of the embedded NNTP
backend: the same defence, audit log, stored-password awareness and PROXY
handling as the mail protocols, seen on the wire."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from passlib.hash import ldap_salted_sha1

from authgate import audit
from authgate import config as config_mod
from authgate.credentials.store import UserStore, generate_secrets
from authgate.offers import load_store
from authgate.proxy.proxy_protocol import build_v2
from authgate.proxy.server import Gateway
from authgate.runner import start_gateway
from authgate.testing.backends import Backends, start_backends
from authgate.testing.stack import MASTER_USER

pytestmark = pytest.mark.asyncio

PASSWORD = "Alice-news-pw1"
SHA_PASSWORD = "Bob-news-pw2"
BALANCER = "127.0.0.1"


@pytest_asyncio.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[tuple[Gateway, Backends]]:
    backends = await start_backends(
        tmp_path / "mail", {"alice": PASSWORD, "bob": SHA_PASSWORD}, master=(MASTER_USER, "mpw")
    )
    store = UserStore(realm="localhost")
    store.set_user_secrets("alice", generate_secrets("alice", PASSWORD, "localhost"))
    # A password pasted from a Dovecot passwd-file: PLAIN/LOGIN only.
    store.set_user_secrets("bob", ["{SSHA}" + ldap_salted_sha1.hash(SHA_PASSWORD)[6:]])
    store.save(tmp_path / "users.toml")
    listeners = ""
    for name, extra in (
        ("news", ""),
        ("news-lb", f'proxy_protocol = true\ntrusted_proxies = ["{BALANCER}/32"]\n'),
    ):
        listeners += f"""
[[listeners]]
name = "{name}"
protocol = "nntp"
listen = "127.0.0.1:0"
{extra}[listeners.backend]
address = "127.0.0.1:{backends.nntp.port}"
master_user = "{MASTER_USER}"
master_password = "mpw"
"""
    path = tmp_path / "authgate.toml"
    path.write_text(
        f"""hostname = "localhost"
[policy]
security = "require-secure-auth"
mechanisms = ["CRAM-MD5", "PLAIN"]
exempt_networks = ["10.9.9.0/24", "127.0.0.2/32"]
[users]
file = "users.toml"
[audit]
file = "{tmp_path / "audit.log"}"
[defence]
failure_delay = 0
penalties = []
block_after = 3
block_window = 60
block_for = 300
[limits]
max_errors = 100
{listeners}"""
    )
    config = config_mod.load(path)
    running = await start_gateway(config, load_store(config))
    try:
        yield running, backends
    finally:
        await running.stop(drain=1)
        await backends.close()


async def session(
    gateway: Gateway, listener: str, lines: list[bytes], *, source: str, header: bytes = b""
) -> list[bytes]:
    """Greeting, then one reply line per command line."""
    host, port = gateway.addresses()[listener]
    reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
    try:
        writer.write(header)
        replies = [await asyncio.wait_for(reader.readline(), 10)]
        if replies[0].startswith(b"400 "):
            return replies  # the goodbye: authgate closes
        for line in lines:
            writer.write(line + b"\r\n")
            reply = await asyncio.wait_for(reader.readline(), 10)
            replies.append(reply)
            if reply.startswith(b"101 "):  # CAPABILITIES: the whole list
                while (more := await asyncio.wait_for(reader.readline(), 10)) != b".\r\n":
                    replies.append(b"  " + more)
        return replies
    finally:
        writer.close()


def login(user: str, password: str) -> list[bytes]:
    return [f"AUTHINFO USER {user}".encode(), f"AUTHINFO PASS {password}".encode()]


async def audit_records(tmp_path: Path, count: int) -> list[dict[str, object]]:
    path = tmp_path / "audit.log"
    for _ in range(200):  # the trail writes in a worker thread
        if path.exists() and len(audit.read_log(path.read_bytes(), None, "a").records) >= count:
            break
        await asyncio.sleep(0.02)
    return audit.read_log(path.read_bytes(), None, "audit.log").records


async def test_sha_store_offers_only_what_it_can_verify(
    gateway: tuple[Gateway, Backends],
) -> None:
    # bob's {SSHA} cannot check CRAM-MD5: nobody is offered it, even alice.
    replies = await session(gateway[0], "news", [b"CAPABILITIES"], source="127.0.0.2")
    assert b"  SASL PLAIN\r\n" in replies and b"  AUTHINFO USER SASL\r\n" in replies
    assert not any(b"CRAM-MD5" in r for r in replies)


async def test_login_is_audited_and_reaches_the_backend(
    gateway: tuple[Gateway, Backends], tmp_path: Path
) -> None:
    running, backends = gateway
    replies = await session(
        running, "news", [*login("bob", SHA_PASSWORD), b"GROUP inbox"], source="127.0.0.2"
    )
    assert [r[:4] for r in replies[1:]] == [b"381 ", b"281 ", b"211 "]
    assert (backends.nntp.logins[-1].user, backends.nntp.logins[-1].authcid) == ("bob", "authgate")
    records = await audit_records(tmp_path, 1)
    (record,) = [r for r in records if r["event"] == "login"]
    assert (record["listener"], record["user"]) == ("news", "bob")


async def test_guessing_address_is_blocked_with_the_nntp_goodbye(
    gateway: tuple[Gateway, Backends],
) -> None:
    running, backends = gateway
    for i in range(3):
        replies = await session(running, "news", login("alice", f"guess-{i}"), source="127.0.0.2")
        assert replies[-1].startswith(b"481 ")
    replies = await session(running, "news", login("alice", PASSWORD), source="127.0.0.2")
    assert replies[0] == b"400 Too many failed logins from your address, try again later\r\n"
    assert backends.nntp.logins == []
    # Another address is not affected.
    replies = await session(running, "news", login("alice", PASSWORD), source="127.0.0.3")
    # Not exempt and no TLS: greeted (not blocked), AUTHINFO USER refused by
    # the policy, so the PASS after it is out of sequence.
    assert [r[:4] for r in replies] == [b"200 ", b"483 ", b"482 "]


async def test_proxy_header_names_the_client_the_policy_judges(
    gateway: tuple[Gateway, Backends],
) -> None:
    running, backends = gateway
    address = running.addresses()["news-lb"]
    office = build_v2(("10.9.9.9", 40000), address)
    replies = await session(
        running, "news-lb", [*login("alice", PASSWORD), b"GROUP inbox"], source=BALANCER,
        header=office,
    )  # fmt: skip
    assert [r[:4] for r in replies[1:]] == [b"381 ", b"281 ", b"211 "]
    remote = build_v2(("203.0.113.50", 40001), address)
    replies = await session(
        running, "news-lb", login("alice", PASSWORD)[:1], source=BALANCER, header=remote
    )
    assert replies[-1].startswith(b"483 ")  # the remote client may not send a password in clear
    assert len(backends.nntp.logins) == 1
