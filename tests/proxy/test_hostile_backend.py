"""A hostile backend ("NO STARTTLS", USENIX Security 2021: PREAUTH,
[ALERT]/[REFERRAL] texts, response injection) never speaks to the mail
client through authgate before authgate's own login is done.

Each backend here is a real loopback server that misbehaves on purpose
while authgate logs in to it: IMAP `* PREAUTH`, `* BYE`, `[ALERT]`,
`[REFERRAL]`, untagged data, wrong tags, stray continuations; POP3 and SMTP
error greetings, extra lines, replies sent before the command they answer
(a `235` before AUTH), multi-line junk. Real clients (imaplib, poplib,
smtplib) log in through authgate, and a tap between client and authgate
records every byte the client receives.

Where the backend's behaviour breaks the login: no hostile text reaches the
client, the client gets the protocol's temporary failure, and no session is
spliced (the client's next command is answered by authgate and never
reaches the backend). Where the login still succeeds, the backend's text
from before its login reply is dropped, and what it sends after that reply
(the session's own data) is delivered.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import imaplib
import poplib
import smtplib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from authgate import config as config_mod
from authgate.certs import ensure_dev_certificates
from authgate.credentials.store import UserStore, generate_secrets
from authgate.runner import start_gateway
from authgate.testing.stack import ListenerSpec, config_text

pytestmark = pytest.mark.asyncio

PASSWORD = "pw-hostile-1"
MASTER = "master-pw"
HOSTILE = b"HOSTILE"  # in every byte a misbehaving backend sends before its login reply
SESSION = b"SESSION-DATA"  # what a backend sends after its login reply: the client's


# ------------------------------------------------------------------ plumbing


@dataclass
class Backend:
    """A scripted backend: `script(reader, writer, seen)`; `seen` records
    every line authgate sent it."""

    script: Callable[[asyncio.StreamReader, asyncio.StreamWriter, list[bytes]], Awaitable[None]]
    seen: list[bytes] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self.script(reader, writer, self.seen)
            await writer.drain()
            while line := await reader.readline():  # after the script: listen only
                self.seen.append(line)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def next_line(reader: asyncio.StreamReader, seen: list[bytes]) -> bytes:
    line = await reader.readline()
    if not line:
        raise ConnectionError("authgate closed")
    seen.append(line)
    return line


class Tap:
    """Loopback relay client <-> authgate; `down` is everything the client got."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.down = bytearray()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._relays: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._relays.add(task)
        try:
            await self._pipes(client_r, client_w)
        finally:
            self._relays.discard(task)

    async def _pipes(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, record: bool) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    if record:
                        self.down += data
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(client_r, up_w, False), pipe(up_r, client_w, True))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        # authgate has closed its side by now: the relays end by themselves.
        if self._relays:
            await asyncio.wait(self._relays, timeout=5)


@contextlib.asynccontextmanager
async def through_authgate(tmp: Path, protocol: str, backend: Backend) -> AsyncIterator[Tap]:
    """authgate (terminate mode, master login) in front of `backend`; yields
    the tap the client connects to."""
    server = await asyncio.start_server(backend.handle, "127.0.0.1", 0)
    ensure_dev_certificates(tmp / "certs")
    store = UserStore(realm="localhost")
    store.set_user_secrets(
        "alice", generate_secrets("alice", PASSWORD, "localhost", schemes=["PLAIN"])
    )
    store.save(tmp / "users.toml")
    path = tmp / "authgate.toml"
    path.write_text(
        config_text(
            host="127.0.0.1",
            layout=(ListenerSpec(protocol, protocol, "none"),),
            certs=tmp / "certs",
            users_file=tmp / "users.toml",
            backend_ports={protocol: server.sockets[0].getsockname()[1]},
            master_password=MASTER,
            security="none",
            mechanisms=["PLAIN"],
            exempt=[],
            extra="[limits]\nconnect_timeout = 2\nbackend_timeout = 2\n[defence]\nfailure_delay = 0\n",
        )
    )
    gateway = await start_gateway(config_mod.load(path), UserStore.load(tmp / "users.toml"))
    tap = Tap(gateway.addresses()[protocol][1])
    await tap.start()
    try:
        yield tap
    finally:
        await gateway.stop(drain=1)
        await tap.close()
        server.close()


def master_plain(line: bytes) -> bool:
    """Is this authgate's master login (SASL PLAIN, authzid alice)?"""
    encoded = line.split()[-1]
    return base64.b64decode(encoded) == b"alice\0authgate\0" + MASTER.encode()


# ---------------------------------------------------------------------- IMAP

IMAP_CAPS = b"IMAP4rev1 SASL-IR AUTH=PLAIN"
IMAP_GREETING = b"* OK [CAPABILITY " + IMAP_CAPS + b"] ready\r\n"


def imap(greeting: bytes, login_reply: Callable[[bytes], bytes] | None = None) -> Backend:
    """An IMAP backend: `greeting`, CAPABILITY answered, and `login_reply(tag)`
    to authgate's AUTHENTICATE; any later command gets "<tag> OK SESSION-DATA"."""

    async def script(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: list[bytes]
    ) -> None:
        writer.write(greeting)
        while True:
            line = await next_line(reader, seen)
            tag, _, command = line.rstrip(b"\r\n").partition(b" ")
            if command.upper() == b"CAPABILITY":
                writer.write(b"* CAPABILITY " + IMAP_CAPS + b"\r\n" + tag + b" OK done\r\n")
            elif command.upper().startswith(b"AUTHENTICATE") and login_reply is not None:
                assert master_plain(line), line
                writer.write(login_reply(tag))
            else:
                writer.write(tag + b" OK " + SESSION + b"\r\n")

    return Backend(script)


def logged_in(tag: bytes) -> bytes:
    return tag + b" OK [CAPABILITY IMAP4rev1 XPOSTLOGIN] Logged in\r\n"


IMAP_FAILURES = {
    "preauth greeting": imap(b"* PREAUTH [CAPABILITY IMAP4rev1] HOSTILE logged in as root\r\n"),
    "bye greeting": imap(b"* BYE HOSTILE go away\r\n"),
    "bye during login": imap(IMAP_GREETING, lambda tag: b"* BYE HOSTILE shutting down\r\n"),
    "alert and no": imap(
        IMAP_GREETING,
        lambda tag: b"* OK [ALERT] HOSTILE alert\r\n" + tag + b" NO [ALERT] HOSTILE refused\r\n",
    ),
    "referral": imap(
        IMAP_GREETING, lambda tag: tag + b" NO [REFERRAL imap://HOSTILE.example/] go there\r\n"
    ),
    "wrong tag": imap(IMAP_GREETING, lambda tag: b"x99 OK HOSTILE logged in\r\n"),
    "untagged preauth then bye": imap(
        IMAP_GREETING, lambda tag: b"* PREAUTH HOSTILE\r\n* BYE HOSTILE\r\n" + logged_in(tag)
    ),
    "stray continuation": imap(IMAP_GREETING + b"+ HOSTILE\r\n"),
    # authgate's tags are predictable: a reply to a command not sent yet.
    "login reply before the login": imap(
        IMAP_GREETING + b"a1 OK [CAPABILITY IMAP4rev1] HOSTILE in\r\n"
    ),
    "empty challenge before the login": imap(IMAP_GREETING + b"+ \r\n"),
    "garbage greeting": imap(b"\x16\x03\x01 HOSTILE \xff\xfe\r\n"),
    "unavailable": imap(
        IMAP_GREETING, lambda tag: tag + b" NO [UNAVAILABLE] HOSTILE try later\r\n"
    ),
}


def imap_client(port: int) -> tuple[str, str, list[bytes]]:
    """Log in, then NOOP and LOGOUT: (login error, NOOP status, LOGOUT data)."""
    with imaplib.IMAP4("127.0.0.1", port, timeout=15) as client:
        try:
            client.login("alice", PASSWORD)
        except imaplib.IMAP4.error as exc:
            error = str(exc)
        else:
            error = ""
        typ, _ = client.noop()
        _, bye = client.logout()
        return error, typ, bye


@pytest.mark.parametrize("case", sorted(IMAP_FAILURES))
async def test_imap_backend_misbehaving_during_login(tmp_path: Path, case: str) -> None:
    backend = IMAP_FAILURES[case]
    async with through_authgate(tmp_path, "imap", backend) as tap:
        error, noop, _ = await asyncio.to_thread(imap_client, tap.port)
    assert "[UNAVAILABLE]" in error, error
    assert noop == "OK"
    assert HOSTILE not in tap.down, bytes(tap.down)
    assert SESSION not in tap.down
    assert not any(b"NOOP" in line for line in backend.seen), backend.seen  # never spliced


IMAP_NOISY_SUCCESS = {
    "alert greeting": imap(b"* OK [ALERT] HOSTILE read this\r\n", logged_in),
    "referral greeting": imap(b"* OK [REFERRAL imap://HOSTILE.example/] ready\r\n", logged_in),
    "untagged data before the login reply": imap(
        IMAP_GREETING,
        lambda tag: (
            b"* OK [ALERT] HOSTILE alert\r\n* OK [REFERRAL imap://HOSTILE.example/] x\r\n"
            b"* 3 EXISTS\r\n* FLAGS (\\HOSTILE)\r\n* NO HOSTILE note\r\n" + logged_in(tag)
        ),
    ),
    "continuation-free literal in an untagged response": imap(
        IMAP_GREETING, lambda tag: b'* ID ("name" {7}\r\nHOSTILE)\r\n' + logged_in(tag)
    ),
}


@pytest.mark.parametrize("case", sorted(IMAP_NOISY_SUCCESS))
async def test_imap_backend_noise_before_its_login_reply_is_dropped(
    tmp_path: Path, case: str
) -> None:
    backend = IMAP_NOISY_SUCCESS[case]
    async with through_authgate(tmp_path, "imap", backend) as tap:
        error, noop, _ = await asyncio.to_thread(imap_client, tap.port)
    assert error == "" and noop == "OK"
    assert HOSTILE not in tap.down, bytes(tap.down)
    # The backend's post-login capabilities are the session's: passed on.
    assert b"OK [CAPABILITY IMAP4rev1 XPOSTLOGIN] Logged in" in tap.down
    assert SESSION in tap.down  # the NOOP went to the backend: spliced


async def test_imap_data_after_the_login_reply_is_the_sessions(tmp_path: Path) -> None:
    backend = imap(
        IMAP_GREETING, lambda tag: logged_in(tag) + b"* OK [ALERT] " + SESSION + b" post-login\r\n"
    )
    async with through_authgate(tmp_path, "imap", backend) as tap:
        error, _, _ = await asyncio.to_thread(imap_client, tap.port)
    assert error == ""
    down = bytes(tap.down)
    assert down.index(b"Logged in") < down.index(b"* OK [ALERT] " + SESSION)


# ---------------------------------------------------------------------- POP3

POP3_CAPA = b"+OK\r\nSASL PLAIN\r\nUSER\r\n.\r\n"


def pop3(
    greeting: bytes, capa: bytes = POP3_CAPA, auth_reply: bytes = b"+OK logged in\r\n"
) -> Backend:
    """A POP3 backend: `greeting`, `capa` to CAPA, `auth_reply` to authgate's
    AUTH; after that, CAPA lists capabilities and anything else gets
    "+OK SESSION-DATA"."""

    async def script(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: list[bytes]
    ) -> None:
        writer.write(greeting)
        logged = False
        while True:
            line = await next_line(reader, seen)
            command = line.rstrip(b"\r\n").upper()
            if command == b"CAPA":
                writer.write(POP3_CAPA if logged else capa)
            elif command.startswith(b"AUTH PLAIN ") and not logged:
                assert master_plain(line), line
                writer.write(auth_reply)
                logged = auth_reply.startswith(b"+OK")
            else:
                writer.write(b"+OK " + SESSION + b"\r\n")

    return Backend(script)


POP3_FAILURES = {
    "error greeting": pop3(b"-ERR HOSTILE go away\r\n"),
    "extra line after the greeting": pop3(b"+OK ready\r\n+OK HOSTILE extra\r\n"),
    "capa answered before it was asked": pop3(
        b"+OK ready\r\n" + POP3_CAPA.replace(b"USER", b"HOSTILE")
    ),
    "login reply before the login": pop3(
        b"+OK ready\r\n", capa=POP3_CAPA + b"+OK HOSTILE logged in\r\n"
    ),
    "capa junk never ending": pop3(
        b"+OK ready\r\n", capa=b"+OK\r\nSASL PLAIN\r\nHOSTILE \x00\xff\r\n"
    ),
    "garbage capa": pop3(b"+OK ready\r\n", capa=b"HOSTILE \x16\x03\r\n"),
    "auth refused": pop3(b"+OK ready\r\n", auth_reply=b"-ERR [AUTH] HOSTILE no\r\n"),
    "auth challenge junk": pop3(b"+OK ready\r\n", auth_reply=b"+ HOSTILE!!\r\n"),
    "extra line after the login reply": pop3(
        b"+OK ready\r\n", auth_reply=b"+OK in\r\n+OK HOSTILE extra\r\n"
    ),
}


def pop3_client(port: int) -> tuple[str, bytes]:
    """(login error, the reply to NOOP)."""
    client = poplib.POP3("127.0.0.1", port, timeout=15)
    try:
        try:
            client.user("alice")
            client.pass_(PASSWORD)
        except poplib.error_proto as exc:
            error = str(exc)
        else:
            error = ""
        try:
            noop = client.noop()
        except poplib.error_proto as exc:
            noop = exc.args[0]
        return error, noop
    finally:
        client.quit()


@pytest.mark.parametrize("case", sorted(POP3_FAILURES))
async def test_pop3_backend_misbehaving_during_login(tmp_path: Path, case: str) -> None:
    backend = POP3_FAILURES[case]
    async with through_authgate(tmp_path, "pop3", backend) as tap:
        error, noop = await asyncio.to_thread(pop3_client, tap.port)
    assert "[SYS/TEMP]" in error, error
    assert noop.startswith(b"-ERR") and SESSION not in noop  # authgate's: not logged in
    assert HOSTILE not in tap.down, bytes(tap.down)
    assert not any(b"NOOP" in line for line in backend.seen), backend.seen


async def test_pop3_clean_backend_splices(tmp_path: Path) -> None:
    """The scripted backend itself is fine when it behaves (guards the guard)."""
    backend = pop3(b"+OK ready\r\n")
    async with through_authgate(tmp_path, "pop3", backend) as tap:
        error, noop = await asyncio.to_thread(pop3_client, tap.port)
    assert error == "" and SESSION in noop
    # authgate's login: one CAPA and the AUTH, nothing asked after it; then
    # the mail client's commands.
    assert [line.split()[0] for line in backend.seen] == [b"CAPA", b"AUTH", b"NOOP", b"QUIT"]


# ---------------------------------------------------------------------- SMTP

SMTP_EHLO = b"250-backend\r\n250-AUTH PLAIN\r\n250 8BITMIME\r\n"


def smtp(
    greeting: bytes, ehlo: bytes = SMTP_EHLO, auth_reply: bytes = b"235 2.7.0 ok\r\n"
) -> Backend:
    """An SMTP backend: `greeting`, `ehlo` to EHLO, `auth_reply` to
    authgate's AUTH; later commands get "250 SESSION-DATA"."""

    async def script(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: list[bytes]
    ) -> None:
        writer.write(greeting)
        while True:
            line = await next_line(reader, seen)
            verb = line.split(b" ", 1)[0].rstrip(b"\r\n").upper()
            if verb == b"EHLO":
                writer.write(ehlo)
            elif verb == b"AUTH":
                assert master_plain(line), line
                writer.write(auth_reply)
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
            else:
                writer.write(b"250 " + SESSION + b"\r\n")

    return Backend(script)


SMTP_FAILURES = {
    "error greeting": smtp(b"554 5.3.2 HOSTILE go away\r\n"),
    "235 before AUTH": smtp(b"220 ready\r\n235 2.7.0 HOSTILE authenticated\r\n"),
    "extra reply after EHLO": smtp(b"220 ready\r\n", ehlo=SMTP_EHLO + b"250 HOSTILE extra\r\n"),
    "multi-line reply changing its code": smtp(b"220-ready\r\n250 HOSTILE\r\n"),
    "multi-line junk": smtp(
        b"220 ready\r\n", ehlo=b"250-backend\r\n250-HOSTILE \x00\xff\r\nHOSTILE junk\r\n"
    ),
    "auth refused": smtp(b"220 ready\r\n", auth_reply=b"535 5.7.8 HOSTILE no\r\n"),
    "auth challenge junk": smtp(b"220 ready\r\n", auth_reply=b"334 HOSTILE!!\r\n"),
    "shutting down": smtp(b"220 ready\r\n", auth_reply=b"421 4.3.2 HOSTILE shutting down\r\n"),
}


def smtp_client(port: int) -> tuple[int, int]:
    """(the reply code to AUTH, the reply code to a NOOP after it)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as client:
        client.ehlo("client.example")
        try:
            code, _ = client.login("alice", PASSWORD)
        except smtplib.SMTPAuthenticationError as exc:
            code = exc.smtp_code
        noop, _ = client.noop()
        return code, noop


@pytest.mark.parametrize("case", sorted(SMTP_FAILURES))
async def test_smtp_backend_misbehaving_during_login(tmp_path: Path, case: str) -> None:
    backend = SMTP_FAILURES[case]
    async with through_authgate(tmp_path, "smtp", backend) as tap:
        code, noop = await asyncio.to_thread(smtp_client, tap.port)
    assert code == 454, bytes(tap.down)  # 4.7.0 Temporary authentication failure
    assert noop == 250
    assert HOSTILE not in tap.down, bytes(tap.down)
    assert SESSION not in tap.down
    assert not any(line.upper().startswith(b"NOOP") for line in backend.seen), backend.seen


async def test_smtp_noisy_greeting_is_dropped_and_the_session_spliced(tmp_path: Path) -> None:
    backend = smtp(b"220-HOSTILE banner\r\n220-HOSTILE more\r\n220 ready\r\n")
    async with through_authgate(tmp_path, "smtp", backend) as tap:
        code, noop = await asyncio.to_thread(smtp_client, tap.port)
    assert code == 235 and noop == 250
    assert HOSTILE not in tap.down
    assert SESSION in tap.down  # the NOOP went to the backend
