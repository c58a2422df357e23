"""The embedded backends against real clients: imaplib, poplib, smtplib, curl.

imaplib/poplib/smtplib are blocking, so they run in a thread (asyncio.to_thread)
while the backends serve on the test's event loop.  A few exchanges that the
standard clients cannot produce (SASL-IR, POP3 AUTH, literals, cancels) are
written by hand over asyncio streams.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import imaplib
import poplib
import shutil
import smtplib
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from hypothesis import given
from hypothesis import strategies as st

from authgate.testing.backends import Backends, start_backends
from authgate.testing.imap_backend import _Bad, _sequence_numbers, _tokenize
from authgate.testing.maildir import Maildir, seed_mailbox, to_crlf

USERS = {"alice": "alice-pw", "bob": "bob pw 2"}
MASTER = ("master", "master-secret")

SMALL = (
    b"From: Carol <carol@example.org>\r\n"
    b"To: alice@example.org\r\n"
    b"Subject: dots\r\n"
    b"\r\n"
    b".leading dot\r\n"
    b"..two dots\r\n"
    b".\r\n"
    b"last line\r\n"
)


def big_message(size: int) -> bytes:
    header = b"From: big@example.org\r\nSubject: big\r\n\r\n"
    line = b"0123456789abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ ..dots\r\n"
    body = line * ((size - len(header)) // len(line) + 1)
    return header + body[: size - len(header) - 2] + b"\r\n"


BIG = big_message(2 * 1024 * 1024)


def plain(authzid: str, authcid: str, password: str) -> bytes:
    return f"{authzid}\0{authcid}\0{password}".encode()


def maildir_files(root: Path, user: str) -> list[bytes]:
    box = Maildir(root / user / "Maildir")
    return [m.path.read_bytes() for m in box.scan()]


@pytest_asyncio.fixture
async def backends(tmp_path: Path) -> AsyncIterator[Backends]:
    seed_mailbox(tmp_path, "alice", [SMALL, BIG])
    running = await start_backends(tmp_path, USERS, MASTER)
    try:
        yield running
    finally:
        await running.close()


class Line:
    """A hand-driven line client over asyncio streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int) -> Line:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def line(self) -> bytes:
        return await asyncio.wait_for(self.reader.readline(), 5)

    async def until(self, prefix: bytes) -> list[bytes]:
        """Lines up to and including the first starting with ``prefix``."""
        lines: list[bytes] = []
        while True:
            line = await self.line()
            assert line, f"connection closed before {prefix!r}; got {lines!r}"
            lines.append(line)
            if line.startswith(prefix):
                return lines

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


# --- IMAP -----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_imap_login_select_fetch_exact_bytes(backends: Backends) -> None:
    def session() -> dict[str, Any]:
        with imaplib.IMAP4("127.0.0.1", backends.imap.port) as client:
            assert client.login("alice", USERS["alice"])[0] == "OK"
            typ, count = client.select("INBOX")
            assert typ == "OK"
            return {
                "count": count,
                "uidvalidity": client.response("UIDVALIDITY")[1],
                "small": client.fetch("1", "(BODY.PEEK[])")[1],
                "big": client.fetch("2", "(RFC822)")[1],
                "flags": client.fetch("1:*", "(UID FLAGS RFC822.SIZE)")[1],
            }

    got = await asyncio.to_thread(session)
    count, uidvalidity, small, big, flags = (
        got[k] for k in ("count", "uidvalidity", "small", "big", "flags")
    )
    assert count == [b"2"]
    assert uidvalidity[0].isdigit()
    assert small[0] == (b"1 (BODY[] {%d}" % len(SMALL), SMALL)
    assert big[0][1] == BIG
    assert len(BIG) == 2 * 1024 * 1024
    # BODY.PEEK left message 1 unseen; RFC822 set \Seen on message 2 (RFC 3501 6.4.5).
    assert flags == [
        b"1 (UID 1 FLAGS (\\Recent) RFC822.SIZE %d)" % len(SMALL),
        b"2 (UID 2 FLAGS (\\Seen \\Recent) RFC822.SIZE %d)" % len(BIG),
    ]
    # The \Seen flag is real Maildir state: message 2 now lives in cur/ with ":2,S".
    box = Maildir(backends.store.root / "alice" / "Maildir")
    assert [m.flags for m in box.scan()] == ["", "S"]
    assert all(m.path.parent.name == "cur" for m in box.scan())


@pytest.mark.asyncio
async def test_imap_authenticate_plain_as_master_for_another_user(backends: Backends) -> None:
    seed_mailbox(backends.store.root, "bob", [b"Subject: for bob\r\n\r\nhi bob\r\n"])

    def session() -> tuple[str, Any]:
        with imaplib.IMAP4("127.0.0.1", backends.imap.port) as client:
            # imaplib sends AUTHENTICATE PLAIN and answers the "+ " continuation.
            typ, _ = client.authenticate("PLAIN", lambda _: plain("bob", *MASTER))
            client.select("INBOX", readonly=True)
            data: Any = client.fetch("1", "(BODY[])")[1]
            client.logout()
            return typ, data[0][1]

    typ, body = await asyncio.to_thread(session)
    assert typ == "OK"
    assert body == b"Subject: for bob\r\n\r\nhi bob\r\n"
    record = backends.imap.logins[-1]
    assert (record.user, record.authcid, record.mechanism) == ("bob", "master", "PLAIN")


@pytest.mark.parametrize(
    "credentials",
    [
        ("alice", "wrong"),
        ("nobody", "alice-pw"),
    ],
)
@pytest.mark.asyncio
async def test_imap_login_wrong_password_is_no(
    backends: Backends, credentials: tuple[str, str]
) -> None:
    def session() -> str:
        with imaplib.IMAP4("127.0.0.1", backends.imap.port) as client:
            with pytest.raises(imaplib.IMAP4.error) as excinfo:
                client.login(*credentials)
            # Still not authenticated: SELECT is refused.
            with pytest.raises(imaplib.IMAP4.error):
                client.select("INBOX")
            return str(excinfo.value)

    message = await asyncio.to_thread(session)
    assert "[AUTHENTICATIONFAILED]" in message
    assert backends.imap.logins == []


@pytest.mark.parametrize(
    "message",
    [
        plain("bob", "master", "wrong"),  # master name, wrong master password
        plain("bob", "alice", "alice-pw"),  # a plain user may not act as another
        plain("nobody", *MASTER),  # master, but no such target user
        plain("", *MASTER),  # the master user has no mailbox of its own
        b"alice\0alice-pw",  # two fields only
    ],
)
@pytest.mark.asyncio
async def test_imap_authenticate_rejections(backends: Backends, message: bytes) -> None:
    client = await Line.connect(backends.imap.port)
    await client.line()
    await client.send(b"a AUTHENTICATE PLAIN " + base64.b64encode(message) + b"\r\n")
    assert (await client.line()).startswith(b"a NO [AUTHENTICATIONFAILED]")
    await client.close()
    assert backends.imap.logins == []


@pytest.mark.asyncio
async def test_imap_wire_details(backends: Backends) -> None:
    client = await Line.connect(backends.imap.port)
    assert await client.line() == b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN ID] ready\r\n"
    await client.send(b'a ID ("name" "test" "x-originating-ip" "192.0.2.7")\r\n')
    assert (await client.until(b"a "))[-1] == b"a OK ID completed\r\n"
    # A cancelled exchange is answered with BAD (RFC 3501 6.2.2).
    await client.send(b"b AUTHENTICATE PLAIN\r\n")
    assert await client.line() == b"+ \r\n"
    await client.send(b"*\r\n")
    assert (await client.line()).startswith(b"b BAD")
    # SASL-IR (RFC 4959) as master: the tagged OK carries the post-login capabilities.
    ir = base64.b64encode(plain("alice", *MASTER))
    await client.send(b"c AUTHENTICATE PLAIN " + ir + b"\r\n")
    assert await client.line() == b"c OK [CAPABILITY IMAP4rev1 ID UNSELECT] Logged in\r\n"
    record = backends.imap.logins[-1]
    assert record.client_id == {"name": "test", "x-originating-ip": "192.0.2.7"}
    await client.send(b'd LIST "" "*"\r\n')
    assert await client.until(b"d ") == [b'* LIST () "/" INBOX\r\n', b"d OK LIST completed\r\n"]
    await client.send(b"e SELECT INBOX\r\n")
    lines = await client.until(b"e ")
    assert b"* 2 EXISTS\r\n" in lines and b"* 2 RECENT\r\n" in lines
    assert lines[-1] == b"e OK [READ-WRITE] SELECT completed\r\n"
    # Sequence number 3 does not exist.
    await client.send(b"f FETCH 3 FLAGS\r\n")
    assert (await client.line()).startswith(b"f BAD")
    # UID FETCH always returns the UID; partial fetch and the header section.
    await client.send(b"g UID FETCH 1 (BODY.PEEK[HEADER] BODY.PEEK[]<5.7>)\r\n")
    header = SMALL[: SMALL.index(b"\r\n\r\n") + 4]
    expected = (
        b"* 1 FETCH (UID 1 BODY[HEADER] {%d}\r\n" % len(header)
        + header
        + b" BODY[]<5> {7}\r\n"
        + SMALL[5:12]
        + b")\r\n"
    )
    got = await asyncio.wait_for(client.reader.readexactly(len(expected)), 5)
    assert got == expected
    assert await client.line() == b"g OK FETCH completed\r\n"
    await client.send(b"h LOGOUT\r\n")
    assert await client.until(b"h ") == [b"* BYE Logging out\r\n", b"h OK LOGOUT completed\r\n"]
    assert await client.line() == b""  # the server hung up
    await client.close()


@pytest.mark.asyncio
async def test_imap_login_with_literals(backends: Backends) -> None:
    password = USERS["bob"].encode()
    client = await Line.connect(backends.imap.port)
    await client.line()
    await client.send(b"a LOGIN {3}\r\n")
    assert (await client.line()).startswith(b"+ ")
    await client.send(b"bob {%d}\r\n" % len(password))
    assert (await client.line()).startswith(b"+ ")
    await client.send(password + b"\r\n")
    assert (await client.line()).startswith(b"a OK [CAPABILITY ")
    await client.close()


@pytest.mark.asyncio
async def test_imap_store_expunge_and_new_mail(backends: Backends) -> None:
    client = await Line.connect(backends.imap.port)
    await client.line()
    await client.send(b"a LOGIN alice alice-pw\r\nb SELECT INBOX\r\n")
    await client.until(b"b ")
    await client.send(b"c STORE 1 +FLAGS (\\Deleted \\Flagged)\r\n")
    assert await client.until(b"c ") == [
        b"* 1 FETCH (FLAGS (\\Flagged \\Deleted \\Recent))\r\n",
        b"c OK STORE completed\r\n",
    ]
    await client.send(b"d EXPUNGE\r\n")
    assert await client.until(b"d ") == [b"* 1 EXPUNGE\r\n", b"d OK EXPUNGE completed\r\n"]
    assert maildir_files(backends.store.root, "alice") == [BIG]
    # Mail delivered meanwhile shows up on NOOP with a fresh UID.
    seed_mailbox(backends.store.root, "alice", [b"Subject: new\r\n\r\nnew\r\n"])
    await client.send(b"e NOOP\r\n")
    assert await client.until(b"e ") == [
        b"* 2 EXISTS\r\n",
        b"* 2 RECENT\r\n",
        b"e OK NOOP completed\r\n",
    ]
    await client.send(b"f UID FETCH 1:* UID\r\n")
    assert await client.until(b"f ") == [
        b"* 1 FETCH (UID 2)\r\n",
        b"* 2 FETCH (UID 3)\r\n",
        b"f OK FETCH completed\r\n",
    ]
    await client.close()


@pytest.mark.asyncio
async def test_imap_streams_ten_mebibytes(tmp_path: Path) -> None:
    huge = big_message(10 * 1024 * 1024)
    seed_mailbox(tmp_path, "alice", [huge])
    running = await start_backends(tmp_path, USERS, MASTER)
    try:
        client = await Line.connect(running.imap.port)
        await client.line()
        await client.send(b"a LOGIN alice alice-pw\r\nb EXAMINE INBOX\r\nc FETCH 1 BODY[]\r\n")
        await client.until(b"b ")
        assert await client.line() == b"* 1 FETCH (BODY[] {%d}\r\n" % len(huge)
        body = await asyncio.wait_for(client.reader.readexactly(len(huge)), 30)
        assert body == huge
        # EXAMINE is read-only: no implicit \Seen, so no FLAGS in the response.
        assert await client.until(b"c ") == [b")\r\n", b"c OK FETCH completed\r\n"]
        await client.close()
    finally:
        await running.close()


def test_imap_tokenizer() -> None:
    assert _tokenize(b'a LOGIN "us\\"er" {3}\r\np w') == ["a", "LOGIN", b'us"er', b"p w"]
    assert _tokenize(b"a FETCH 1:* (UID BODY.PEEK[HEADER.FIELDS (From To)]<0.10>)") == [
        "a",
        "FETCH",
        "1:*",
        ["UID", "BODY.PEEK[HEADER.FIELDS (From To)]<0.10>"],
    ]
    for bad in (b"a (", b"a )", b'a "open', b"a {5}\r\nab", b'a "\\x"'):
        with pytest.raises(_Bad):
            _tokenize(bad)


def test_imap_sequence_sets() -> None:
    assert _sequence_numbers("1:*", count=3, uids=None) == [1, 2, 3]
    assert _sequence_numbers("3,1", count=3, uids=None) == [1, 3]
    with pytest.raises(_Bad):
        _sequence_numbers("4", count=3, uids=None)
    with pytest.raises(_Bad):
        _sequence_numbers("1:*", count=0, uids=None)
    # UID sets: missing UIDs are skipped and "*" is the highest UID (RFC 3501 6.4.8).
    assert _sequence_numbers("5:7", count=3, uids=[2, 5, 9]) == [2]
    assert _sequence_numbers("20:*", count=3, uids=[2, 5, 9]) == [3]
    assert _sequence_numbers("1:*", count=0, uids=[]) == []


@given(st.binary(max_size=200))
def test_imap_tokenizer_never_crashes(data: bytes) -> None:
    with contextlib.suppress(_Bad):
        _tokenize(data)


# --- POP3 -----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_pop3_user_pass_stat_retr_round_trip(backends: Backends) -> None:
    def session() -> tuple[tuple[int, int], list[bytes], list[bytes], list[bytes]]:
        client = poplib.POP3("127.0.0.1", backends.pop3.port)
        try:
            client.user("alice")
            assert client.pass_(USERS["alice"]).startswith(b"+OK")
            stat = client.stat()
            _, small, _ = client.retr(1)
            _, big, _ = client.retr(2)
            _, top, _ = client.top(1, 1)
            client.quit()
            return stat, small, big, top
        finally:
            client.close()

    stat, small, big, top = await asyncio.to_thread(session)
    assert stat == (2, len(SMALL) + len(BIG))
    # poplib undoes the dot-stuffing: the lines must join back to the exact bytes.
    assert b"".join(line + b"\r\n" for line in small) == SMALL
    assert b"".join(line + b"\r\n" for line in big) == BIG
    assert top == SMALL.split(b"\r\n")[:5]


@pytest.mark.asyncio
async def test_pop3_retr_is_dot_stuffed_on_the_wire(backends: Backends) -> None:
    client = await Line.connect(backends.pop3.port)
    assert await client.line() == b"+OK ready\r\n"
    await client.send(b"USER alice\r\nPASS alice-pw\r\nRETR 1\r\n")
    await client.until(b"+OK Logged in")
    lines = await client.until(b".\r\n")
    assert lines[0] == b"+OK %d octets\r\n" % len(SMALL)
    assert lines[5:] == [
        b"..leading dot\r\n",
        b"...two dots\r\n",
        b"..\r\n",
        b"last line\r\n",
        b".\r\n",
    ]
    await client.close()


@pytest.mark.asyncio
async def test_pop3_dele_quit_deletes_rset_and_drop_do_not(backends: Backends) -> None:
    root = backends.store.root

    def dele(number: int, finish: str) -> None:
        client = poplib.POP3("127.0.0.1", backends.pop3.port)
        client.user("alice")
        client.pass_(USERS["alice"])
        client.dele(number)
        # A deleted message is gone for the rest of the session.
        with pytest.raises(poplib.error_proto):
            client.retr(number)
        if finish == "rset":
            client.rset()
            client.quit()
        elif finish == "quit":
            client.quit()
        else:
            client.close()  # drop without QUIT: no UPDATE state (RFC 1939 section 6)

    await asyncio.to_thread(dele, 1, "rset")
    assert maildir_files(root, "alice") == [SMALL, BIG]
    await asyncio.to_thread(dele, 1, "drop")
    assert maildir_files(root, "alice") == [SMALL, BIG]
    # The dropped session holds the maildrop lock until the server sees the EOF.
    for _ in range(50):
        try:
            await asyncio.to_thread(dele, 1, "quit")
            break
        except poplib.error_proto as exc:
            assert b"[IN-USE]" in exc.args[0]
            await asyncio.sleep(0.1)
    assert maildir_files(root, "alice") == [BIG]


@pytest.mark.asyncio
async def test_pop3_wrong_password_and_auth_plain(backends: Backends) -> None:
    client = await Line.connect(backends.pop3.port)
    await client.line()
    await client.send(b"USER alice\r\nPASS nope\r\n")
    assert await client.line() == b"+OK\r\n"
    assert await client.line() == b"-ERR [AUTH] Authentication failed.\r\n"
    await client.send(b"STAT\r\n")
    assert (await client.line()).startswith(b"-ERR")
    # AUTH PLAIN with a continuation (RFC 5034), as the master user for bob.
    await client.send(b"AUTH PLAIN\r\n")
    assert await client.line() == b"+ \r\n"
    await client.send(base64.b64encode(plain("bob", *MASTER)) + b"\r\n")
    assert await client.line() == b"+OK Logged in.\r\n"
    await client.send(b"STAT\r\n")
    assert await client.line() == b"+OK 0 0\r\n"
    # The maildrop is locked while this session holds it.
    other = await Line.connect(backends.pop3.port)
    await other.line()
    ir = base64.b64encode(plain("", "bob", USERS["bob"]))
    await other.send(b"AUTH PLAIN " + ir + b"\r\n")
    assert (await other.line()).startswith(b"-ERR [IN-USE]")
    await client.send(b"QUIT\r\n")
    assert (await client.line()).startswith(b"+OK")
    await other.send(b"AUTH PLAIN " + ir + b"\r\n")
    assert await other.line() == b"+OK Logged in.\r\n"
    await other.close()
    await client.close()
    assert [(r.user, r.authcid) for r in backends.pop3.logins] == [
        ("bob", "master"),
        ("bob", "bob"),
    ]


@pytest.mark.asyncio
async def test_pop3_capa_and_uidl(backends: Backends) -> None:
    def session() -> tuple[dict[str, list[str]], list[bytes], list[bytes]]:
        client = poplib.POP3("127.0.0.1", backends.pop3.port)
        try:
            capa = client.capa()
            client.user("alice")
            client.pass_(USERS["alice"])
            uidl = client.uidl()[1]
            listing = client.list()[1]
            client.quit()
            return capa, uidl, listing
        finally:
            client.close()

    capa, uidl, listing = await asyncio.to_thread(session)
    for capability in ("USER", "UIDL", "TOP", "PIPELINING", "RESP-CODES"):
        assert capability in capa
    assert capa["SASL"] == ["PLAIN"]
    keys = [m.key for m in Maildir(backends.store.root / "alice" / "Maildir").scan()]
    assert uidl == [b"1 " + keys[0].encode(), b"2 " + keys[1].encode()]
    assert listing == [b"1 %d" % len(SMALL), b"2 %d" % len(BIG)]


# --- SMTP -----------------------------------------------------------------------------

OUTGOING = (
    b"From: bob@example.org\r\nTo: alice@example.org\r\nSubject: hi\r\n\r\n.dot line\r\nbye\r\n"
)


@pytest.mark.asyncio
async def test_smtp_login_and_sendmail_delivers_to_maildir(backends: Backends) -> None:
    def session() -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", backends.smtp.port, timeout=5) as client:
            client.login("bob", USERS["bob"])
            return client.sendmail("bob@example.org", ["alice@example.org"], OUTGOING)

    refused = await asyncio.to_thread(session)
    assert refused == {}
    assert maildir_files(backends.store.root, "alice") == [SMALL, BIG, OUTGOING]
    assert backends.smtp.logins[-1].user == "bob"


@pytest.mark.asyncio
async def test_smtp_master_plain_with_authzid(backends: Backends) -> None:
    def session() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", backends.smtp.port, timeout=5) as client:
            client.ehlo()
            reply = client.auth("PLAIN", lambda challenge=None: "bob\0master\0master-secret")
            client.sendmail("bob@example.org", ["bob@example.org"], OUTGOING)
            return reply

    code, _ = await asyncio.to_thread(session)
    assert code == 235
    record = backends.smtp.logins[-1]
    assert (record.user, record.authcid, record.mechanism) == ("bob", "master", "PLAIN")
    assert maildir_files(backends.store.root, "bob") == [OUTGOING]


@pytest.mark.asyncio
async def test_smtp_rejections(backends: Backends) -> None:
    def session() -> None:
        with smtplib.SMTP("127.0.0.1", backends.smtp.port, timeout=5) as client:
            client.ehlo()
            assert "PLAIN" in client.esmtp_features["auth"]
            assert "LOGIN" in client.esmtp_features["auth"]
            # No AUTH yet: submission refuses MAIL.
            code, _ = client.mail("bob@example.org")
            assert code == 530
            with pytest.raises(smtplib.SMTPAuthenticationError):
                client.login("bob", "wrong")
            with pytest.raises(smtplib.SMTPAuthenticationError):
                client.auth("PLAIN", lambda challenge=None: "alice\0bob\0bob pw 2")
            client.login("bob", USERS["bob"])  # LOGIN or PLAIN, smtplib's pick
            with pytest.raises(smtplib.SMTPRecipientsRefused) as excinfo:
                client.sendmail("bob@example.org", ["nobody@example.org"], OUTGOING)
            assert excinfo.value.recipients["nobody@example.org"][0] == 550

    await asyncio.to_thread(session)
    assert maildir_files(backends.store.root, "bob") == []


@pytest.mark.asyncio
async def test_smtp_auth_login(backends: Backends) -> None:
    def session() -> int:
        with smtplib.SMTP("127.0.0.1", backends.smtp.port, timeout=5) as client:
            client.ehlo()
            client.user, client.password = "alice", USERS["alice"]
            code, _ = client.auth("LOGIN", client.auth_login, initial_response_ok=False)
            return code

    assert await asyncio.to_thread(session) == 235
    assert backends.smtp.logins[-1].mechanism == "LOGIN"


# --- curl -----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_curl_fetches_by_uid(backends: Backends) -> None:
    curl = shutil.which("curl") or "/usr/bin/curl"
    if not Path(curl).exists():
        pytest.fail("curl is not installed: this test drives /usr/bin/curl against the backend")
    process = await asyncio.create_subprocess_exec(
        curl,
        "--silent",
        "--show-error",
        "--max-time",
        "20",
        f"imap://127.0.0.1:{backends.imap.port}/INBOX;UID=1",
        "-u",
        f"alice:{USERS['alice']}",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    assert out == SMALL


# --- Maildir ---------------------------------------------------------------------------


def test_seed_normalises_to_crlf_and_keeps_order(tmp_path: Path) -> None:
    messages = [f"Subject: {i}\n\nbody {i}\n" for i in range(30)]
    seed_mailbox(tmp_path, "carol", messages)
    assert maildir_files(tmp_path, "carol") == [to_crlf(m.encode()) for m in messages]
    assert to_crlf(b"a\r\nb\nc\r") == b"a\r\nb\r\nc\r"


@pytest.mark.asyncio
async def test_close_ends_open_sessions(tmp_path: Path) -> None:
    running = await start_backends(tmp_path, USERS, MASTER)
    clients = [
        await Line.connect(handle.port) for handle in (running.imap, running.pop3, running.smtp)
    ]
    greetings = [await client.line() for client in clients]
    assert greetings[0].startswith(b"* OK")
    assert greetings[1] == b"+OK ready\r\n"
    assert greetings[2].startswith(b"220 ")
    await asyncio.wait_for(running.close(), 5)
    # Every session was ended by the server, and nobody listens any more.
    for client in clients:
        assert await client.line() == b""
        await client.close()
    with pytest.raises(OSError):
        await Line.connect(running.imap.port)
    await running.close()  # idempotent
