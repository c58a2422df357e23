"""authgate's POP3 login to a real Dovecot, counted line by line: a tap
between authgate and Dovecot records what authgate sends.

In the clear authgate asks CAPA once (to choose a mechanism), then logs in
with AUTH PLAIN as the master user, and asks nothing after the login: the
mail client's own CAPA in the TRANSACTION state goes to Dovecot through
the splice and gets Dovecot's list of that state, the same list a direct
login gets. With STLS toward the backend the first command is STLS (a CAPA
list from before the handshake would be forgotten, RFC 2595 section 4).
The list is remembered for a minute: the next login sends AUTH alone, and
a login that Dovecot refuses asks CAPA to see whether the list went stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import poplib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio

from authgate import config as config_mod
from authgate.certs import ensure_dev_certificates
from authgate.credentials.store import UserStore, generate_secrets
from authgate.offers import load_store
from authgate.proxy.server import Gateway
from authgate.runner import start_gateway
from authgate.testing.kit import eventually
from tests.interop.dovecot import DovecotInstance

pytestmark = [pytest.mark.interop, pytest.mark.asyncio]

USER = "plainuser"
GHOST = "ghost"  # ours, unknown to Dovecot: the master login is refused
HOST = "127.0.0.1"


@dataclass
class UpTap:
    """Loopback relay authgate -> Dovecot; `up[i]` is every byte authgate
    sent on its i-th connection."""

    target: int
    up: list[bytearray] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None
    _relays: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _relay(self, down_r: asyncio.StreamReader, down_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._relays.add(task)
        sent = bytearray()
        self.up.append(sent)
        up_r, up_w = await asyncio.open_connection(HOST, self.target)

        async def pipe(
            src: asyncio.StreamReader, dst: asyncio.StreamWriter, record: bytearray | None
        ) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    if record is not None:
                        record += data
                    dst.write(data)
                    await dst.drain()
            dst.close()

        try:
            await asyncio.gather(pipe(down_r, up_w, sent), pipe(up_r, down_w, None))
        finally:
            self._relays.discard(task)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._relays:
            await asyncio.wait(self._relays, timeout=5)


@dataclass
class Setup:
    gateway: Gateway
    plain: UpTap  # authgate -> Dovecot in the clear
    stls: UpTap  # authgate -> Dovecot with STLS

    def port(self, listener: str) -> int:
        return self.gateway.addresses()[listener][1]


@pytest_asyncio.fixture
async def setup(tmp_path: Path, dovecot_tls: DovecotInstance) -> AsyncIterator[Setup]:
    assert dovecot_tls.ca_pem is not None
    certs = ensure_dev_certificates(tmp_path / "certs").parent
    dovecot_ca = tmp_path / "dovecot-ca.pem"
    dovecot_ca.write_bytes(dovecot_tls.ca_pem)
    store = UserStore(realm="localhost")
    store.set_user_secrets(USER, generate_secrets(USER, dovecot_tls.users[USER], "localhost"))
    store.set_user_secrets(GHOST, generate_secrets(GHOST, "Gh0st-passw0rd", "localhost"))
    store.save(tmp_path / "users.toml")
    master, master_pw = dovecot_tls.master
    plain, stls = UpTap(dovecot_tls.pop3), UpTap(dovecot_tls.pop3)
    await plain.start()
    await stls.start()
    backend = f'master_user = "{master}"\nmaster_password = "{master_pw}"\n'
    path = tmp_path / "authgate.toml"
    path.write_text(
        '[policy]\nsecurity = "none"\n[users]\nfile = "users.toml"\n'
        f'[tls]\ncert = "{certs / "server.pem"}"\nkey = "{certs / "server.key"}"\n'
        "[defence]\nfailure_delay = 0\npenalties = []\n"
        '[[listeners]]\nname = "pop3-plain"\nprotocol = "pop3"\nlisten = "127.0.0.1:0"\n'
        f'tls = "none"\n[listeners.backend]\naddress = "{HOST}:{plain.port}"\n{backend}'
        '[[listeners]]\nname = "pop3-stls"\nprotocol = "pop3"\nlisten = "127.0.0.1:0"\n'
        f'tls = "none"\n[listeners.backend]\naddress = "{HOST}:{stls.port}"\n{backend}'
        f'tls = "starttls"\nca_file = "{dovecot_ca}"\nserver_name = "localhost"\n'
    )
    config = config_mod.load(path)
    running = await start_gateway(config, load_store(config))
    try:
        yield Setup(running, plain, stls)
    finally:
        await running.stop(drain=1)
        await plain.close()
        await stls.close()


def transaction_capa(
    port: int, dovecot: DovecotInstance | None, password: str
) -> dict[str, list[str]]:
    """USER/PASS, then CAPA in the TRANSACTION state, STAT, QUIT. Direct to
    Dovecot (`dovecot` given: after STLS) or through authgate."""
    client = poplib.POP3(HOST, port, timeout=15)
    try:
        if dovecot is not None:
            client.stls(dovecot.client_ssl_context())
        client.user(USER)
        client.pass_(password)
        caps = client.capa()
        client.stat()
    finally:
        client.quit()
    return caps


def words(sent: bytearray) -> list[bytes]:
    """The command word of each line authgate sent."""
    return [line.split(b" ", 1)[0].upper() for line in bytes(sent).split(b"\r\n") if line]


async def test_cleartext_login_asks_capa_once_and_client_capa_is_dovecots(
    setup: Setup, dovecot_tls: DovecotInstance
) -> None:
    password = dovecot_tls.users[USER]
    direct = await asyncio.to_thread(transaction_capa, dovecot_tls.pop3, dovecot_tls, password)
    through = await asyncio.to_thread(transaction_capa, setup.port("pop3-plain"), None, password)
    assert through == direct
    assert "IMPLEMENTATION" not in through or through["IMPLEMENTATION"] != ["authgate"]
    assert "UIDL" in through and "TOP" in through
    assert len(setup.plain.up) == 1
    # Ours: CAPA, AUTH. The mail client's through the splice: CAPA, STAT, QUIT.
    assert words(setup.plain.up[0]) == [b"CAPA", b"AUTH", b"CAPA", b"STAT", b"QUIT"]
    assert bytes(setup.plain.up[0]).split(b"\r\n")[1].startswith(b"AUTH PLAIN ")


async def test_stls_backend_login_starts_with_stls(
    setup: Setup, dovecot_tls: DovecotInstance
) -> None:
    password = dovecot_tls.users[USER]
    direct = await asyncio.to_thread(transaction_capa, dovecot_tls.pop3, dovecot_tls, password)
    through = await asyncio.to_thread(transaction_capa, setup.port("pop3-stls"), None, password)
    assert through == direct
    assert len(setup.stls.up) == 1
    # The only cleartext line: STLS, before any CAPA; the rest is TLS records.
    sent = bytes(setup.stls.up[0])
    assert sent.startswith(b"STLS\r\n")
    assert sent[len(b"STLS\r\n") :][:1] == b"\x16"  # a TLS handshake record


async def test_the_next_login_goes_by_the_remembered_list(
    setup: Setup, dovecot_tls: DovecotInstance
) -> None:
    password = dovecot_tls.users[USER]
    port = setup.port("pop3-plain")
    first = await asyncio.to_thread(transaction_capa, port, None, password)
    second = await asyncio.to_thread(transaction_capa, port, None, password)
    assert second == first
    assert len(setup.plain.up) == 2
    assert words(setup.plain.up[0])[:2] == [b"CAPA", b"AUTH"]
    # One round trip less: AUTH first; then the mail client's own commands.
    assert words(setup.plain.up[1]) == [b"AUTH", b"CAPA", b"STAT", b"QUIT"]


async def test_a_refused_login_asks_capa_and_the_refusal_stands(
    setup: Setup, dovecot_tls: DovecotInstance
) -> None:
    port = setup.port("pop3-plain")
    await asyncio.to_thread(transaction_capa, port, None, dovecot_tls.users[USER])

    def ghost_login() -> str:
        client = poplib.POP3(HOST, port, timeout=15)
        try:
            client.user(GHOST)
            with pytest.raises(poplib.error_proto) as refused:
                client.pass_("Gh0st-passw0rd")
            return str(refused.value)
        finally:
            client.close()

    answer = await asyncio.to_thread(ghost_login)
    assert answer.startswith("b'-ERR")
    await eventually(lambda: len(setup.plain.up) == 2, "no second backend connection")
    # Refused on the remembered list: CAPA, the same list, no second AUTH.
    await eventually(
        lambda: words(setup.plain.up[1])[:2] == [b"AUTH", b"CAPA"],
        lambda: f"sent to Dovecot: {words(setup.plain.up[1])}",
    )
    assert words(setup.plain.up[1]).count(b"AUTH") == 1
