"""Warm backend connections through a running gateway: logins in terminate
and relay mode go through a warm connection of the embedded IMAP and POP3
backends and the pools refill; a login the backend refuses closes its
claimed connection (never given back); a reload closes the old pools and
fills the new ones; stopping the gateway closes every warm connection; a
PROXY v2 backend cannot be given warm connections."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from authgate.config import ConfigError, load
from authgate.credentials.store import UserStore, generate_secrets
from authgate.offers import load_store
from authgate.proxy.routes import HEALTH
from authgate.proxy.runtime import build_runtime
from authgate.proxy.server import Gateway
from authgate.proxy.warm import WarmPool
from authgate.runner import start_gateway
from authgate.testing.backends import Backends, seed_mailbox, start_backends
from tests.proxy.test_routing_sessions import imap_session, pop3_session
from tests.proxy.test_warm import Greeter, serving, until

PASSWORD = "pw-alice-1"
MASTER = ("authgate", "master-pw")


def _config(tmp_path: Path, store: Backends, *, warm: int = 2, master: str = MASTER[1]) -> Path:
    text = (
        '[users]\nfile = "users.toml"\n[policy]\nsecurity = "none"\n'
        'mechanisms = ["PLAIN", "LOGIN"]\n'
        "[backends.store]\n"
        f'imap = "127.0.0.1:{store.imap.port}"\npop3 = "127.0.0.1:{store.pop3.port}"\n'
        f'master_user = "{MASTER[0]}"\nmaster_password = "{master}"\n'
        f"warm_connections = {warm}\nwarm_max_age = 60\n"
    )
    for protocol in ("imap", "pop3"):
        for mode in ("terminate", "relay"):
            text += (
                f'[[listeners]]\nname = "{protocol}-{mode}"\nprotocol = "{protocol}"\n'
                f'listen = "127.0.0.1:0"\nbackend = "store"\nmode = "{mode}"\n'
            )
    path = tmp_path / "authgate.toml"
    path.write_text(text)
    return path


def _pools(gateway: Gateway) -> dict[str, WarmPool]:
    found: dict[str, WarmPool] = {}
    for runtime in gateway.runtimes:
        for pool in runtime.warm_pools():
            found[str(pool.member.address)] = pool
    return found


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[Backends]:
    HEALTH.clear()
    seed_mailbox(tmp_path / "mail", "alice", [b"Subject: warm-hello\r\n\r\nhi\r\n"])
    backends = await start_backends(tmp_path / "mail", {"alice": PASSWORD}, master=MASTER)
    users = UserStore(realm="localhost")
    users.set_user_secrets("alice", generate_secrets("alice", PASSWORD, "localhost"))
    (tmp_path / "users.toml").write_text(users.dumps())
    try:
        yield backends
    finally:
        await backends.close()
        HEALTH.clear()


@pytest.mark.asyncio
async def test_logins_go_through_warm_connections_and_the_pools_refill(
    tmp_path: Path, store: Backends
) -> None:
    config = load(_config(tmp_path, store))
    gateway = await start_gateway(config, load_store(config))
    try:
        pools = _pools(gateway)
        assert len(pools) == 2  # one per member, shared by its two listeners
        imap = pools[f"127.0.0.1:{store.imap.port}"]
        pop3 = pools[f"127.0.0.1:{store.pop3.port}"]
        await until(lambda: imap.ready == 2 and pop3.ready == 2, "both pools are full")
        ports = gateway.addresses()
        for mode in ("terminate", "relay"):
            # Two logins in a row: the second finds the pool refilled or not,
            # and works either way.
            for _ in range(2):
                warm_before = imap.claimed
                login, fetched = await imap_session(ports[f"imap-{mode}"][1], "alice")
                assert b"a OK" in login, login
                assert b"warm-hello" in fetched
                login, top = await pop3_session(ports[f"pop3-{mode}"][1], "alice")
                assert login.startswith(b"+OK"), login
                assert b"warm-hello" in top
            assert imap.claimed > warm_before
            await until(lambda: imap.ready == 2 and pop3.ready == 2, "refilled")
        assert imap.claimed >= 2 and pop3.claimed >= 2
        assert [r.user for r in store.imap.logins] == ["alice"] * 4
    finally:
        await gateway.stop(drain=1)
    assert _pools(gateway)[f"127.0.0.1:{store.imap.port}"].ready == 0


@pytest_asyncio.fixture
async def refuser() -> AsyncIterator[Greeter]:
    """An IMAP server that greets and says NO to every command."""
    async with serving(Greeter(answer=True)) as found:
        yield found


@pytest.mark.asyncio
async def test_a_refused_login_closes_its_warm_connection(tmp_path: Path, refuser: Greeter) -> None:
    HEALTH.clear()
    users = UserStore(realm="localhost")
    users.set_user_secrets("alice", generate_secrets("alice", PASSWORD, "localhost"))
    (tmp_path / "users.toml").write_text(users.dumps())
    (tmp_path / "authgate.toml").write_text(
        '[users]\nfile = "users.toml"\n[policy]\nsecurity = "none"\n'
        '[[listeners]]\nname = "imap"\nprotocol = "imap"\nlisten = "127.0.0.1:0"\n'
        f'[listeners.backend]\naddress = "127.0.0.1:{refuser.port}"\n'
        'master_user = "authgate"\nmaster_password = "x"\nwarm_connections = 2\n'
    )
    config = load(tmp_path / "authgate.toml")
    gateway = await start_gateway(config, load_store(config))
    try:
        (pool,) = _pools(gateway).values()
        await until(lambda: pool.ready == 2, "the pool is full")
        login, _ = await imap_session(gateway.addresses()["imap"][1], "alice")
        assert b"a NO" in login, login
        assert pool.claimed == 1
        # The claimed connection was closed, not given back; a new one took its place.
        await until(lambda: refuser.ended == 1 and pool.ready == 2, "closed and refilled")
        assert refuser.open == 2
    finally:
        await gateway.stop(drain=1)
    await until(lambda: refuser.open == 0, "every connection closed at stop")
    HEALTH.clear()


@pytest.mark.asyncio
async def test_a_reload_closes_the_old_pools_and_fills_the_new(
    tmp_path: Path, refuser: Greeter
) -> None:
    HEALTH.clear()
    (tmp_path / "authgate.toml").write_text(
        '[[listeners]]\nname = "imap"\nprotocol = "imap"\nlisten = "127.0.0.1:0"\n'
        f'[listeners.backend]\naddress = "127.0.0.1:{refuser.port}"\n'
        'mode = "relay"\nwarm_connections = 3\n'
    )
    config = load(tmp_path / "authgate.toml")
    gateway = await start_gateway(config, None)
    try:
        (old,) = _pools(gateway).values()
        await until(lambda: old.ready == 3, "the first pool is full")
        await gateway.reload(build_runtime(config, None), config.defence)
        (new,) = _pools(gateway).values()
        assert new is not old
        await until(lambda: new.ready == 3 and refuser.ended == 3, "old closed, new full")
        assert old.ready == 0 and old.claim() is None
        assert refuser.open == 3
    finally:
        await gateway.stop(drain=1)
    await until(lambda: refuser.open == 0, "every connection closed at stop")


def test_warm_connections_refuse_proxy_v2(tmp_path: Path) -> None:
    (tmp_path / "authgate.toml").write_text(
        '[[listeners]]\nname = "imap"\nprotocol = "imap"\nlisten = "127.0.0.1:0"\n'
        '[listeners.backend]\naddress = "127.0.0.1:1143"\nmode = "relay"\n'
        'client_address = "proxy-v2"\nwarm_connections = 2\n'
    )
    with pytest.raises(ConfigError, match=r"warm_connections.*PROXY v2"):
        load(tmp_path / "authgate.toml")


@pytest.mark.parametrize(
    ("setting", "bad"),
    [("warm_connections", "65"), ("warm_connections", "1.5"), ("warm_max_age", "0")],
)
def test_warm_settings_are_bounded(tmp_path: Path, setting: str, bad: str) -> None:
    (tmp_path / "authgate.toml").write_text(
        '[[listeners]]\nname = "imap"\nprotocol = "imap"\nlisten = "127.0.0.1:0"\n'
        f'[listeners.backend]\naddress = "127.0.0.1:1143"\nmode = "relay"\n{setting} = {bad}\n'
    )
    with pytest.raises(ConfigError, match=setting):
        load(tmp_path / "authgate.toml")
