"""Warm backend connections (`warm_connections`) in front of a real Dovecot:
logins through the gateway take a warm, greeted connection, log in as the
user with the master credential and read the mailbox, and the pool
refills. Dovecot drops its oldest connections that have not logged in when
its login process is full ("* BYE Connection queue full"): those are warm
ones, and no client is handed one."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from authgate import config as config_mod
from authgate.credentials.store import UserStore, generate_secrets
from authgate.offers import load_store
from authgate.proxy.routes import HEALTH
from authgate.proxy.server import Gateway
from authgate.proxy.warm import WarmPool
from authgate.runner import start_gateway
from tests.interop.dovecot import DovecotInstance, start_dovecot
from tests.proxy.test_routing_sessions import _lines
from tests.proxy.test_warm import until

pytestmark = [pytest.mark.interop]

USER, PASSWORD = "warmuser", "warm-Secret-1"
SUBJECT = b"Subject: warm-through-dovecot"


@contextlib.asynccontextmanager
async def gateway_for(
    tmp_path: Path, dovecot: DovecotInstance, warm: int
) -> AsyncIterator[tuple[Gateway, WarmPool]]:
    HEALTH.clear()
    users = UserStore(realm="localhost")
    users.set_user_secrets(USER, generate_secrets(USER, PASSWORD, "localhost"))
    (tmp_path / "users.toml").write_text(users.dumps())
    master, master_pw = dovecot.master
    (tmp_path / "authgate.toml").write_text(
        '[policy]\nsecurity = "none"\nmechanisms = ["PLAIN"]\n[users]\nfile = "users.toml"\n'
        '[[listeners]]\nname = "imap"\nprotocol = "imap"\nlisten = "127.0.0.1:0"\n'
        f'[listeners.backend]\naddress = "127.0.0.1:{dovecot.imap}"\n'
        f'master_user = "{master}"\nmaster_password = "{master_pw}"\n'
        f"warm_connections = {warm}\nwarm_max_age = 60\n"
    )
    config = config_mod.load(tmp_path / "authgate.toml")
    gateway = await start_gateway(config, load_store(config))
    try:
        (pool,) = gateway.runtime("imap").warm_pools()
        yield gateway, pool
    finally:
        await gateway.stop(drain=1)
        HEALTH.clear()


async def read_subject(port: int) -> bytes:
    """Log in with LOGIN, fetch the newest message's header: what came back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await _lines(reader, b"* OK")
        writer.write(f'a LOGIN {USER} "{PASSWORD}"\r\n'.encode())
        login = await _lines(reader, b"a ")
        if b"a OK" not in login:
            return login
        writer.write(b"b SELECT INBOX\r\nc FETCH * BODY.PEEK[HEADER]\r\n")
        await _lines(reader, b"b ")
        fetched = await _lines(reader, b"c ")
        writer.write(b"d LOGOUT\r\n")
        await _lines(reader, b"d ")
        return fetched
    finally:
        writer.close()


def _instance(extra_config: str = "") -> Iterator[DovecotInstance]:
    with start_dovecot(users={USER: PASSWORD}, extra_config=extra_config) as instance:
        instance.deliver(USER, SUBJECT + b"\r\nFrom: t@example.test\r\n\r\nbody\r\n")
        yield instance


@pytest.fixture(scope="module")
def dovecot_warm() -> Iterator[DovecotInstance]:
    yield from _instance()


# One login process holding at most 2 clients: a third connection makes
# Dovecot drop the oldest that has not logged in.
SMALL_LOGIN = "service imap-login {\n  process_limit = 1\n  client_limit = 2\n}\n"


@pytest.fixture(scope="module")
def dovecot_small() -> Iterator[DovecotInstance]:
    yield from _instance(SMALL_LOGIN)


@pytest.mark.asyncio
async def test_logins_through_warm_connections_to_dovecot(
    tmp_path: Path, dovecot_warm: DovecotInstance
) -> None:
    mark = dovecot_warm.log_size()
    async with gateway_for(tmp_path, dovecot_warm, warm=2) as (gateway, pool):
        await until(lambda: pool.ready == 2, "two warm connections to Dovecot")
        port = gateway.addresses()["imap"][1]
        for _ in range(3):
            assert SUBJECT in await read_subject(port)
            await until(lambda: pool.ready == 2, "refilled")
        assert pool.claimed == 3
    # Dovecot logged the user's three sessions (its log process may write
    # the last line shortly after the client saw LOGOUT's reply).
    dovecot_warm.wait_for_log(rf"(?s)(imap\({USER}\)[^\n]*Logged out.*){{3}}", since=mark)


@pytest.mark.asyncio
async def test_connections_dovecot_dropped_are_not_handed_to_clients(
    tmp_path: Path, dovecot_small: DovecotInstance
) -> None:
    async with gateway_for(tmp_path, dovecot_small, warm=2) as (gateway, pool):
        await until(lambda: pool.ready == 2, "two warm connections fill the login process")
        warm = [entry.channel for entry in pool._idle]
        mark = dovecot_small.log_size()
        # A third client of Dovecot's: it drops the oldest warm connection.
        _, intruder = await asyncio.open_connection("127.0.0.1", dovecot_small.imap)
        try:
            await asyncio.to_thread(
                dovecot_small.wait_for_log, "Connection queue full", mark, 10.0
            )
            await until(lambda: any(c.peer_ended or c.lost for c in warm), "we saw the drop")
            dropped = [c for c in warm if c.peer_ended or c.lost]
        finally:
            intruder.close()
        port = gateway.addresses()["imap"][1]
        for _ in range(3):
            assert SUBJECT in await read_subject(port)
        # None of the logins got a connection Dovecot had dropped: they
        # would have failed; and the pool closed those on its side.
        assert all(c.transport is None or c.transport.is_closing() for c in dropped)
