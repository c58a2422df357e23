"""Per-user routing in front of two real Dovecot instances (separate ports,
separate mail folders): alice's store is store 1 (the listeners' default),
bob's users file entry sends him to store 2. Each reads a message only
their store has, through IMAP, POP3 and submission, in terminate and relay
mode, with the standard library's real clients. With store 2 stopped, bob
gets the protocol's temporary failure and alice is served; a pool of the
two stores' submission services loses a member and no login fails."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import imaplib
import poplib
import smtplib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from authgate import config as config_mod
from authgate.config import Address
from authgate.credentials.schemes import hash_password
from authgate.credentials.store import UserStore, generate_secrets
from authgate.offers import load_store
from authgate.proxy.routes import HEALTH
from authgate.proxy.server import Gateway
from authgate.routing import rendezvous_order
from authgate.runner import start_gateway
from tests.interop.dovecot import DovecotInstance, _stop, start_dovecot

pytestmark = [pytest.mark.interop]

PASSWORDS = {
    "alice": "alice-Secret-1",
    "bob": "bob-Secret-2",
    # Users both stores know: the submission pool may send them to either.
    "dave": "dave-Secret-4",
    "erin": "erin-Secret-5",
    "frank": "frank-Secret-6",
    "grace": "grace-Secret-7",
}
# Users only the submission pool serves, known to both stores: with 16 of
# them, rendezvous hashing leaves one member without any with a chance of
# 2 in 65,536.
POOL_ONLY = {f"pool{i}": f"pool-Secret-{i}" for i in range(16)}
PASSWORDS.update(POOL_ONLY)
POOLED = [*POOL_ONLY, "dave", "erin", "frank", "grace", "alice"]
ONLY_1 = b"Subject: only-on-store-1"
ONLY_2 = b"Subject: only-on-store-2"


def _users(*names: str) -> dict[str, str]:
    return {name: PASSWORDS[name] for name in names}


def _store(users: dict[str, str], marker: bytes, owner: str) -> Iterator[DovecotInstance]:
    with start_dovecot(users=users) as instance:
        instance.deliver(owner, marker + b"\r\nFrom: t@example.test\r\n\r\nbody\r\n")
        yield instance


@pytest.fixture(scope="module")
def store1() -> Iterator[DovecotInstance]:
    users = _users("alice", "dave", "erin", "frank", "grace", *POOL_ONLY)
    yield from _store(users, ONLY_1, "alice")


# alice: for the pool only
STORE2_USERS = ("bob", "alice", "dave", "erin", "frank", "grace", *POOL_ONLY)


@pytest.fixture(scope="module")
def store2() -> Iterator[DovecotInstance]:
    yield from _store(_users(*STORE2_USERS), ONLY_2, "bob")


@pytest.fixture
def store2_to_stop() -> Iterator[DovecotInstance]:
    """A store 2 of its own for the test that stops it."""
    yield from _store(_users(*STORE2_USERS), ONLY_2, "bob")


@dataclass
class Site:
    gateway: Gateway
    store1: DovecotInstance
    store2: DovecotInstance

    def port(self, listener: str) -> int:
        return self.gateway.addresses()[listener][1]


def _backend(name: str, d: DovecotInstance) -> str:
    master, master_pw = d.master
    return (
        f"[backends.{name}]\n"
        f'imap = "127.0.0.1:{d.imap}"\npop3 = "127.0.0.1:{d.pop3}"\n'
        f'smtp = "127.0.0.1:{d.submission}"\n'
        f'master_user = "{master}"\nmaster_password = "{master_pw}"\n'
    )


@functools.cache
def _users_file() -> str:
    """Made once: hashing six users' secrets takes seconds."""
    users = UserStore(realm="localhost")
    for user, password in PASSWORDS.items():
        if user in POOL_ONLY:  # PLAIN over submission only: one cheap hash
            users.set_user_secrets(user, [hash_password(password, "SSHA512")])
        else:
            users.set_user_secrets(user, generate_secrets(user, password, "localhost"))
    return users.dumps().replace("[users.bob]\n", '[users.bob]\nbackend = "store2"\n')


@contextlib.asynccontextmanager
async def running_site(
    tmp_path: Path, store1: DovecotInstance, store2: DovecotInstance
) -> AsyncIterator[Site]:
    HEALTH.clear()
    (tmp_path / "users.toml").write_text(_users_file())
    master, master_pw = store1.master
    listeners = ""
    for protocol in ("imap", "pop3", "smtp"):
        for mode in ("terminate", "relay"):
            listeners += (
                f'[[listeners]]\nname = "{protocol}-{mode}"\nprotocol = "{protocol}"\n'
                f'listen = "127.0.0.1:0"\nbackend = "store1"\nmode = "{mode}"\n'
            )
    listeners += (
        '[[listeners]]\nname = "smtp-pool"\nprotocol = "smtp"\nlisten = "127.0.0.1:0"\n'
        'backend = "pool"\n'
    )
    path = tmp_path / "authgate.toml"
    path.write_text(
        '[policy]\nsecurity = "none"\nmechanisms = ["PLAIN", "LOGIN", "CRAM-MD5"]\n'
        '[users]\nfile = "users.toml"\n'
        "[defence]\nfailure_delay = 0\npenalties = []\n"
        "[routing]\ndown_for = 600\n"
        + _backend("store1", store1)
        + _backend("store2", store2)
        + "[backends.pool]\n"
        f'smtp = ["127.0.0.1:{store1.submission}", "127.0.0.1:{store2.submission}"]\n'
        f'master_user = "{master}"\nmaster_password = "{master_pw}"\n' + listeners
    )
    config = config_mod.load(path)
    gateway = await start_gateway(config, load_store(config))
    try:
        yield Site(gateway, store1, store2)
    finally:
        await gateway.stop(drain=1)
        HEALTH.clear()


@pytest_asyncio.fixture
async def site(
    tmp_path: Path, store1: DovecotInstance, store2: DovecotInstance
) -> AsyncIterator[Site]:
    async with running_site(tmp_path, store1, store2) as running:
        yield running


# ------------------------------------------------------- real clients (threads)


def imap_read(port: int, user: str, mechanism: str | None = None) -> bytes:
    """Log in (LOGIN, or AUTHENTICATE `mechanism`) and fetch every message."""
    with imaplib.IMAP4("127.0.0.1", port, timeout=20) as client:
        password = PASSWORDS[user]
        if mechanism is None:
            client.login(user, password)
        elif mechanism == "PLAIN":
            client.authenticate("PLAIN", lambda _: f"\0{user}\0{password}".encode())
        else:  # LOGIN: imaplib answers each challenge in turn
            answers = iter([user.encode(), password.encode()])
            client.authenticate("LOGIN", lambda _: next(answers))
        client.select("INBOX", readonly=True)
        _typ, data = client.fetch("1:*", "(BODY.PEEK[HEADER])")
        return b"".join(part[1] for part in data if isinstance(part, tuple))


def pop3_read(port: int, user: str) -> bytes:
    client = poplib.POP3("127.0.0.1", port, timeout=20)
    try:
        client.user(user)
        client.pass_(PASSWORDS[user])
        count, _size = client.stat()
        return b"\r\n".join(line for i in range(1, count + 1) for line in client.top(i, 0)[1])
    finally:
        client.quit()


def smtp_submit(port: int, user: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        client.ehlo("client.example.test")
        client.login(user, PASSWORDS[user])
        client.sendmail(
            f"{user}@example.test",
            ["rcpt@example.test"],
            f"From: {user}@example.test\r\nSubject: from {user}\r\n\r\nhi\r\n",
        )


def temporary_failure(call: object, *args: object) -> str:
    try:
        call(*args)  # type: ignore[operator]
    except (imaplib.IMAP4.error, poplib.error_proto, smtplib.SMTPException) as exc:
        return str(exc)
    raise AssertionError("the login succeeded")


# ---------------------------------------------------------------------- tests


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["terminate", "relay"])
async def test_each_user_reads_only_their_store(site: Site, mode: str) -> None:
    imap, pop3 = site.port(f"imap-{mode}"), site.port(f"pop3-{mode}")
    alice = await asyncio.to_thread(imap_read, imap, "alice")
    bob = await asyncio.to_thread(imap_read, imap, "bob")
    assert ONLY_1 in alice and ONLY_2 not in alice
    assert ONLY_2 in bob and ONLY_1 not in bob
    assert ONLY_1 in await asyncio.to_thread(pop3_read, pop3, "alice")
    assert ONLY_2 in await asyncio.to_thread(pop3_read, pop3, "bob")
    smtp = site.port(f"smtp-{mode}")
    await asyncio.to_thread(smtp_submit, smtp, "bob")
    await asyncio.to_thread(smtp_submit, smtp, "alice")
    await asyncio.to_thread(site.store2.relay.wait_for, lambda m: b"from bob" in m.data)
    await asyncio.to_thread(site.store1.relay.wait_for, lambda m: b"from alice" in m.data)
    assert not any(b"from alice" in m.data for m in site.store2.relay.messages)
    assert not any(b"from bob" in m.data for m in site.store1.relay.messages)


@pytest.mark.asyncio
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_relay_routes_sasl_without_initial_response(site: Site, mechanism: str) -> None:
    # imaplib sends AUTHENTICATE without an initial response: authgate says
    # the first challenge itself and connects once the answer names the user.
    port = site.port("imap-relay")
    assert ONLY_2 in await asyncio.to_thread(imap_read, port, "bob", mechanism)
    assert ONLY_1 in await asyncio.to_thread(imap_read, port, "alice", mechanism)


@pytest.mark.asyncio
async def test_store_down_temporary_failure_and_pool_failover(
    tmp_path: Path, store1: DovecotInstance, store2_to_stop: DovecotInstance
) -> None:
    async with running_site(tmp_path, store1, store2_to_stop) as site:
        await _outage(site)


async def _outage(site: Site) -> None:
    members = [Address("127.0.0.1", site.store1.submission)]
    members.append(Address("127.0.0.1", site.store2.submission))
    on_store2 = [u for u in POOLED if rendezvous_order(u, members, str)[0] == members[1]]
    assert on_store2 and len(on_store2) < len(POOLED)
    for user in POOLED:  # the pool spreads these over both stores' submission
        await asyncio.to_thread(smtp_submit, site.port("smtp-pool"), user)
    for user in on_store2:  # each where its rendezvous order says
        await asyncio.to_thread(
            site.store2.relay.wait_for, lambda m, u=user: m.mail_from == f"{u}@example.test"
        )
    assert site.store2.process is not None
    await asyncio.to_thread(_stop, site.store2.process)
    for mode in ("terminate", "relay"):
        imap_error = await asyncio.to_thread(
            temporary_failure, imap_read, site.port(f"imap-{mode}"), "bob"
        )
        assert "[UNAVAILABLE]" in imap_error
        pop3_error = await asyncio.to_thread(
            temporary_failure, pop3_read, site.port(f"pop3-{mode}"), "bob"
        )
        assert "[SYS/TEMP]" in pop3_error
        smtp_error = await asyncio.to_thread(
            temporary_failure, smtp_submit, site.port(f"smtp-{mode}"), "bob"
        )
        assert "454" in smtp_error and "4.7.0" in smtp_error
        # alice is unaffected
        assert ONLY_1 in await asyncio.to_thread(imap_read, site.port(f"imap-{mode}"), "alice")
    # The pool: every login succeeds, the stopped member's users fail over
    # to store 1 (smtp_submit raises on any failed login or refused mail).
    before = _pooled(site.store1)
    for user in POOLED:
        await asyncio.to_thread(smtp_submit, site.port("smtp-pool"), user)
    for _ in range(100):  # the sink records each message right after its 250
        if _pooled(site.store1) == before + len(POOLED):
            break
        await asyncio.sleep(0.05)
    assert _pooled(site.store1) == before + len(POOLED)


def _pooled(store: DovecotInstance) -> int:
    return sum(1 for m in store.relay.messages if m.mail_from.split("@")[0] in POOLED)
