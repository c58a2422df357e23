"""Per-user routing through a running gateway, in front of two stores of the
embedded backends (real IMAP, POP3 and SMTP servers over separate Maildirs):
alice's store is the default, bob's users file entry and carol's routing
table entry send them to store 2, in terminate and relay mode. With store 2
stopped, its users get the protocol's temporary failure and alice is served.
A pool of two SMTP backends loses a member and logins go on."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from authgate.config import load, loops
from authgate.credentials.store import UserStore, generate_secrets
from authgate.offers import load_store
from authgate.proxy.routes import HEALTH
from authgate.proxy.server import Gateway
from authgate.runner import start_gateway
from authgate.testing.backends import Backends, seed_mailbox, start_backends, start_smtp_backend
from tests.netutil import free_port

PASSWORDS = {"alice": "pw-alice-1", "bob": "pw-bob-2", "carol": "pw-carol-3", "dan": "pw-dan-4"}
MASTER = ("authgate", "master-pw")


@dataclass
class Site:
    gateway: Gateway
    store1: Backends
    store2: Backends
    extra_smtp: object  # the pool's second member (a ServerHandle)

    def port(self, listener: str) -> int:
        return self.gateway.addresses()[listener][1]


def _addresses(b: Backends) -> str:
    return (
        f'imap = "127.0.0.1:{b.imap.port}"\npop3 = "127.0.0.1:{b.pop3.port}"\n'
        f'smtp = "127.0.0.1:{b.smtp.port}"\n'
        f'master_user = "{MASTER[0]}"\nmaster_password = "{MASTER[1]}"\n'
    )


@pytest_asyncio.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    HEALTH.clear()
    seed_mailbox(tmp_path / "mail1", "alice", [b"Subject: only-on-store-1\r\n\r\none\r\n"])
    for user in ("bob", "carol"):
        seed_mailbox(tmp_path / "mail2", user, [b"Subject: only-on-store-2\r\n\r\ntwo\r\n"])
    store1 = await start_backends(tmp_path / "mail1", {"alice": PASSWORDS["alice"]}, master=MASTER)
    others = {u: PASSWORDS[u] for u in ("bob", "carol")}
    store2 = await start_backends(tmp_path / "mail2", others, master=MASTER)
    extra = await start_smtp_backend(store1.store, "127.0.0.1")
    users = UserStore(realm="localhost")
    for user, password in PASSWORDS.items():
        users.set_user_secrets(user, generate_secrets(user, password, "localhost"))
    text = users.dumps().replace("[users.bob]\n", '[users.bob]\nbackend = "store2"\n')
    text = text.replace("[users.dan]\n", '[users.dan]\nbackend = "remote"\n')
    (tmp_path / "users.toml").write_text(text)
    (tmp_path / "routes.toml").write_text('[users]\n"carol" = "store2"\n')
    listeners = ""
    for protocol in ("imap", "pop3"):
        for mode in ("terminate", "relay"):
            listeners += (
                f'[[listeners]]\nname = "{protocol}-{mode}"\nprotocol = "{protocol}"\n'
                f'listen = "127.0.0.1:0"\nbackend = "store1"\nmode = "{mode}"\n'
            )
    listeners += (
        '[[listeners]]\nname = "submission"\nprotocol = "smtp"\nlisten = "127.0.0.1:0"\n'
        'backend = "store1"\n'
        '[[listeners]]\nname = "submission-relay"\nprotocol = "smtp"\n'
        'listen = "127.0.0.1:0"\nbackend = "store1"\nmode = "relay"\n'
        '[[listeners]]\nname = "submission-pool"\nprotocol = "smtp"\nlisten = "127.0.0.1:0"\n'
        'backend = "pool"\n'
    )
    config_path = tmp_path / "authgate.toml"
    config_path.write_text(
        '[users]\nfile = "users.toml"\n[policy]\nsecurity = "none"\n'
        'mechanisms = ["PLAIN", "LOGIN", "CRAM-MD5"]\n'
        '[routing]\ntable = "routes.toml"\ndown_for = 600\n'
        f"[backends.store1]\n{_addresses(store1)}"
        f"[backends.store2]\n{_addresses(store2)}"
        '[backends.remote]\nreferral = "imap://store3.example.org/"\n'
        "[backends.pool]\n"
        f'smtp = ["127.0.0.1:{store1.smtp.port}", "127.0.0.1:{extra.port}"]\n'
        f'master_user = "{MASTER[0]}"\nmaster_password = "{MASTER[1]}"\n' + listeners
    )
    config = load(config_path)
    gateway = await start_gateway(config, load_store(config))
    try:
        yield Site(gateway, store1, store2, extra)
    finally:
        await gateway.stop(drain=1)
        await asyncio.gather(store1.close(), store2.close(), extra.close())
        HEALTH.clear()


async def _lines(reader: asyncio.StreamReader, until: bytes) -> bytes:
    got = b""
    for _ in range(200):
        line = await asyncio.wait_for(reader.readline(), 10)
        got += line
        if not line or line.startswith(until):
            break
    return got


async def imap_session(port: int, user: str, *, sasl: str | None = None) -> tuple[bytes, bytes]:
    """Log in (LOGIN, or AUTHENTICATE `sasl` without an initial response),
    then SELECT INBOX and FETCH the subject: (login reply, fetch output)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await _lines(reader, b"* OK")
        password = PASSWORDS[user]
        if sasl is None:
            writer.write(f'a LOGIN {user} "{password}"\r\n'.encode())
        else:
            writer.write(f"a AUTHENTICATE {sasl}\r\n".encode())
            await _lines(reader, b"+")
            if sasl == "PLAIN":
                writer.write(base64.b64encode(f"\0{user}\0{password}".encode()) + b"\r\n")
            else:  # LOGIN
                writer.write(base64.b64encode(user.encode()) + b"\r\n")
                await _lines(reader, b"+")
                writer.write(base64.b64encode(password.encode()) + b"\r\n")
        login = await _lines(reader, b"a ")
        if b"a OK" not in login:
            return login, b""
        writer.write(b"b SELECT INBOX\r\nc FETCH 1 BODY.PEEK[]\r\n")
        await _lines(reader, b"b ")
        fetched = await _lines(reader, b"c ")
        writer.write(b"d LOGOUT\r\n")
        return login, fetched
    finally:
        writer.close()


async def pop3_session(port: int, user: str) -> tuple[bytes, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await _lines(reader, b"+OK")
        writer.write(f"USER {user}\r\n".encode())
        await _lines(reader, b"+OK")
        writer.write(f"PASS {PASSWORDS[user]}\r\n".encode())
        login = await asyncio.wait_for(reader.readline(), 10)
        if not login.startswith(b"+OK"):
            return login, b""
        writer.write(b"TOP 1 0\r\n")
        top = await _lines(reader, b".")
        writer.write(b"QUIT\r\n")
        return login, top
    finally:
        writer.close()


async def smtp_login(port: int, user: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await _lines(reader, b"220 ")
        writer.write(b"EHLO client.example\r\n")
        await _lines(reader, b"250 ")
        token = base64.b64encode(f"\0{user}\0{PASSWORDS[user]}".encode()).decode()
        writer.write(f"AUTH PLAIN {token}\r\n".encode())
        reply = await asyncio.wait_for(reader.readline(), 10)
        writer.write(b"QUIT\r\n")
        return reply
    finally:
        writer.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["terminate", "relay"])
async def test_each_user_reads_their_own_store(site: Site, mode: str) -> None:
    port = site.port(f"imap-{mode}")
    for user, subject in (
        ("alice", b"only-on-store-1"),
        ("bob", b"only-on-store-2"),  # users file entry
        ("carol", b"only-on-store-2"),  # routing table
    ):
        login, fetched = await imap_session(port, user)
        assert b"a OK" in login, (user, login)
        assert subject in fetched, (user, fetched)
    pop3 = site.port(f"pop3-{mode}")
    for user, subject in (("alice", b"only-on-store-1"), ("bob", b"only-on-store-2")):
        login, top = await pop3_session(pop3, user)
        assert login.startswith(b"+OK"), (user, login)
        assert subject in top, (user, top)
    assert {r.user for r in site.store1.imap.logins} == {"alice"}
    assert {r.user for r in site.store2.imap.logins} == {"bob", "carol"}


@pytest.mark.asyncio
async def test_relay_learns_the_user_from_the_first_sasl_message(site: Site) -> None:
    # No initial response: authgate says the first challenge itself, reads
    # the user from the answer, then starts the exchange at bob's store.
    # (The embedded backend has only PLAIN; LOGIN: tests/interop/test_routing.py.)
    mechanism = "PLAIN"
    login, fetched = await imap_session(site.port("imap-relay"), "bob", sasl=mechanism)
    assert b"a OK" in login, login
    assert b"only-on-store-2" in fetched
    login, fetched = await imap_session(site.port("imap-relay"), "alice", sasl=mechanism)
    assert b"only-on-store-1" in fetched


@pytest.mark.asyncio
async def test_submission_goes_to_the_users_store(site: Site) -> None:
    assert (await smtp_login(site.port("submission"), "alice")).startswith(b"235")
    assert (await smtp_login(site.port("submission"), "bob")).startswith(b"235")
    assert {r.user for r in site.store1.smtp.logins} == {"alice"}
    assert {r.user for r in site.store2.smtp.logins} == {"bob"}


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["terminate", "relay"])
async def test_a_store_down_gives_its_users_a_temporary_failure(
    site: Site, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    await site.store2.close()
    login, _ = await imap_session(site.port(f"imap-{mode}"), "bob")
    assert b"a NO [UNAVAILABLE]" in login
    assert "marked down" in caplog.text
    # Known down now: not even tried again, and never another store.
    login, _ = await imap_session(site.port(f"imap-{mode}"), "bob")
    assert b"a NO [UNAVAILABLE]" in login
    assert "backend store2 is down" in caplog.text
    login, _ = await pop3_session(site.port(f"pop3-{mode}"), "bob")
    assert login.startswith(b"-ERR [SYS/TEMP]")
    if mode == "terminate":
        assert (await smtp_login(site.port("submission"), "bob")).startswith(b"454 4.7.0")
    assert "bob" not in {r.user for r in site.store1.imap.logins}
    login, fetched = await imap_session(site.port(f"imap-{mode}"), "alice")
    assert b"only-on-store-1" in fetched


@pytest.mark.asyncio
async def test_pool_survives_a_member_stopping(site: Site) -> None:
    users = ["alice"] * 6
    for user in users:
        assert (await smtp_login(site.port("submission-pool"), user)).startswith(b"235")
    await site.extra_smtp.close()  # type: ignore[attr-defined]
    # Connects to the stopped member fail over to the live one at once.
    for user in users:
        assert (await smtp_login(site.port("submission-pool"), user)).startswith(b"235")


@pytest.mark.asyncio
async def test_a_backend_that_is_authgate_itself_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    HEALTH.clear()
    port = free_port()
    path = tmp_path / "authgate.toml"
    path.write_text(
        '[policy]\nsecurity = "none"\n'
        f'[[listeners]]\nname = "loop"\nprotocol = "imap"\nlisten = "127.0.0.1:{port}"\n'
        f'[listeners.backend]\naddress = "127.0.0.1:{port}"\nmode = "relay"\n'
    )
    config = load(path)
    assert loops(config) == [
        f"listeners[0].backend: '127.0.0.1:{port}' is authgate itself (listeners[0].listen): "
        "a session would loop back into the gateway"
    ]
    gateway = await start_gateway(config, None)
    try:
        login, _ = await imap_session(port, "alice")
        assert b"a NO [UNAVAILABLE]" in login
        assert "is authgate itself (one of its own listeners): refused" in caplog.text
        assert caplog.text.count("is authgate itself (one of") == 2  # one error, one mark-down
    finally:
        await gateway.stop(drain=1)
        HEALTH.clear()


@pytest.mark.asyncio
async def test_active_check_notices_a_stopped_member_before_any_login(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    HEALTH.clear()
    seed_mailbox(tmp_path / "mail", "alice", [])
    backends = await start_backends(tmp_path / "mail", {"alice": PASSWORDS["alice"]}, master=MASTER)
    second = await start_smtp_backend(backends.store, "127.0.0.1")
    users = UserStore(realm="localhost")
    users.set_user_secrets("alice", generate_secrets("alice", PASSWORDS["alice"], "localhost"))
    users.save(tmp_path / "users.toml")
    path = tmp_path / "authgate.toml"
    path.write_text(
        '[users]\nfile = "users.toml"\n[policy]\nsecurity = "none"\n'
        "[backends.pool]\n"
        f'smtp = ["127.0.0.1:{backends.smtp.port}", "127.0.0.1:{second.port}"]\n'
        "health_check = 0.2\n"
        f'master_user = "{MASTER[0]}"\nmaster_password = "{MASTER[1]}"\n'
        '[[listeners]]\nname = "sub"\nprotocol = "smtp"\nlisten = "127.0.0.1:0"\n'
        'backend = "pool"\n'
    )
    config = load(path)
    gateway = await start_gateway(config, load_store(config))
    try:
        await second.close()
        for _ in range(100):  # bounded: the check runs every 0.2 s
            if "marked down" in caplog.text:
                break
            await asyncio.sleep(0.05)
        assert f"member 127.0.0.1:{second.port} marked down for 30s: health check" in caplog.text
        for _ in range(4):
            reply = await smtp_login(gateway.addresses()["sub"][1], "alice")
            assert reply.startswith(b"235")
        # No session had to find out for itself.
        assert "unreachable" not in caplog.text
    finally:
        await gateway.stop(drain=1)
        await backends.close()
        HEALTH.clear()


async def _plain_without_initial_response(
    port: int, user: str, greeting: bytes, command: bytes, prompt: bytes
) -> bytes:
    """AUTH PLAIN with no initial response: the server's empty challenge,
    then the credentials; the final reply."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await _lines(reader, greeting)
        if greeting == b"220 ":
            writer.write(b"EHLO client.example\r\n")
            await _lines(reader, b"250 ")
        writer.write(command)
        challenge = await asyncio.wait_for(reader.readline(), 10)
        assert challenge.startswith(prompt), challenge
        token = base64.b64encode(f"\0{user}\0{PASSWORDS[user]}".encode())
        writer.write(token + b"\r\n")
        return await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()


@pytest.mark.asyncio
async def test_relay_holds_plain_for_pop3_and_smtp_too(site: Site) -> None:
    pop3 = await _plain_without_initial_response(
        site.port("pop3-relay"), "bob", b"+OK", b"AUTH PLAIN\r\n", b"+"
    )
    assert pop3.startswith(b"+OK"), pop3
    smtp = await _plain_without_initial_response(
        site.port("submission-relay"), "bob", b"220 ", b"AUTH PLAIN\r\n", b"334"
    )
    assert smtp.startswith(b"235"), smtp
    assert {r.user for r in site.store2.pop3.logins} == {"bob"}
    assert {r.user for r in site.store2.smtp.logins} == {"bob"}
    assert not site.store1.pop3.logins and not site.store1.smtp.logins


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["terminate", "relay"])
async def test_a_user_on_another_site_gets_an_imap_referral(site: Site, mode: str) -> None:
    # RFC 2221: the LOGIN answer names the server, with the user in the URL.
    login, _ = await imap_session(site.port(f"imap-{mode}"), "dan")
    assert b"a NO [REFERRAL imap://dan@store3.example.org/]" in login
    # POP3 has no referral: a temporary failure, no backend asked.
    login, _ = await pop3_session(site.port(f"pop3-{mode}"), "dan")
    assert login.startswith(b"-ERR [SYS/TEMP]")
    assert "dan" not in {r.user for r in site.store1.imap.logins + site.store2.imap.logins}
