"""authgate end to end: Python's imaplib, poplib and smtplib through the proxy
to the embedded backends, from an exempt (127.0.0.2) and a non-exempt
(127.0.0.1) address, with and without TLS."""

from __future__ import annotations

import asyncio
import imaplib
import poplib
import smtplib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from authgate.testing.stack import Stack, embedded_stack

PASSWORD = "alice-test-pw"
WELCOME = b"Subject: welcome\r\nFrom: a@localhost\r\nTo: alice@localhost\r\n\r\nhello alice\r\n"
OUTSIDER = "127.0.0.1"
EXEMPT = "127.0.0.2"

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with embedded_stack(
        tmp_path,
        users={"alice": PASSWORD},
        exempt=[f"{EXEMPT}/32"],
        messages={"alice": [WELCOME]},
    ) as running:
        yield running


class IMAP(imaplib.IMAP4):
    """imaplib with a chosen source address (for exempt-network tests)."""

    def __init__(self, host: str, port: int, source: str) -> None:
        self._source = source
        super().__init__(host, port, timeout=15)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout, source_address=(self._source, 0))


class POP3(poplib.POP3):
    def __init__(self, host: str, port: int, source: str) -> None:
        self._source = source
        super().__init__(host, port, timeout=15)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout, source_address=(self._source, 0))


def imap_session(stack: Stack, *, source: str, starttls: bool, how: str) -> tuple[str, bytes]:
    ep = stack["imap"]
    with IMAP(ep.host, ep.port, source) as client:
        if starttls:
            client.starttls(stack.ssl_context())
        if how == "login":
            typ, _ = client.login("alice", PASSWORD)
        elif how == "cram":
            typ, _ = client.login_cram_md5("alice", PASSWORD)
        else:
            typ, _ = client.authenticate("PLAIN", lambda _: f"\0alice\0{PASSWORD}".encode())
        client.select("INBOX")
        typ, data = client.fetch("1", "(BODY.PEEK[])")
        first = data[0]
        assert isinstance(first, tuple)
        return typ, first[1]


async def test_imap_cleartext_login_refused_without_tls(stack: Stack) -> None:
    def attempt() -> tuple[list[str], str]:
        ep = stack["imap"]
        with IMAP(ep.host, ep.port, OUTSIDER) as client:
            caps = list(client.capabilities)
            try:
                client.login("alice", PASSWORD)
            except imaplib.IMAP4.error as exc:
                return caps, str(exc)
            return caps, "accepted"

    caps, error = await asyncio.to_thread(attempt)
    assert "LOGINDISABLED" in caps and "STARTTLS" in caps
    assert "AUTH=CRAM-MD5" in caps and "AUTH=PLAIN" not in caps
    assert "PRIVACYREQUIRED" in error
    assert stack.backends.imap.logins == []


@pytest.mark.parametrize(
    ("source", "starttls", "how"),
    [
        (OUTSIDER, True, "login"),  # cleartext inside TLS
        (OUTSIDER, True, "plain"),
        (OUTSIDER, False, "cram"),  # challenge-response without TLS
        (EXEMPT, False, "login"),  # exempt network: cleartext without TLS
        (EXEMPT, False, "plain"),
    ],
)
async def test_imap_login_reaches_the_mailbox(stack: Stack, source: str, starttls: bool, how: str) -> None:
    typ, message = await asyncio.to_thread(imap_session, stack, source=source, starttls=starttls, how=how)
    assert typ == "OK"
    assert message == WELCOME
    # terminate mode: the backend saw a master login acting as alice
    login = stack.backends.imap.logins[-1]
    assert (login.user, login.authcid) == ("alice", "authgate")


async def test_imap_wrong_password(stack: Stack) -> None:
    def attempt() -> str:
        ep = stack["imaps"]
        with imaplib.IMAP4_SSL(ep.host, ep.port, ssl_context=stack.ssl_context(), timeout=15) as client:
            try:
                client.login("alice", "wrong")
            except imaplib.IMAP4.error as exc:
                return str(exc)
        return "accepted"

    assert "AUTHENTICATIONFAILED" in await asyncio.to_thread(attempt)
    assert stack.backends.imap.logins == []


async def test_imaps_implicit_tls(stack: Stack) -> None:
    def session() -> bytes:
        ep = stack["imaps"]
        with imaplib.IMAP4_SSL(ep.host, ep.port, ssl_context=stack.ssl_context(), timeout=15) as client:
            assert "AUTH=PLAIN" in client.capabilities
            client.login("alice", PASSWORD)
            client.select("INBOX")
            _, data = client.fetch("1", "(BODY.PEEK[])")
            first = data[0]
            assert isinstance(first, tuple)
            return first[1]

    assert await asyncio.to_thread(session) == WELCOME


async def test_pop3_policy_and_retrieval(stack: Stack) -> None:
    def session() -> tuple[bytes, list[bytes], str]:
        ep = stack["pop3"]
        with_refusal = ""
        client = POP3(ep.host, ep.port, OUTSIDER)
        try:
            caps = client.capa()
            assert "USER" not in caps and "STLS" in caps
            try:
                client.user("alice")
                client.pass_(PASSWORD)
            except poplib.error_proto as exc:
                with_refusal = str(exc)
            client.stls(stack.ssl_context())
            assert "USER" in client.capa()
            client.user("alice")
            client.pass_(PASSWORD)
            stat = client.stat()
            _, lines, _ = client.retr(1)
            return str(stat).encode(), lines, with_refusal
        finally:
            client.quit()

    stat, lines, refusal = await asyncio.to_thread(session)
    assert "[AUTH]" in refusal
    assert stat.startswith(b"(1,")
    assert b"hello alice" in lines


async def test_pop3_exempt_user_pass(stack: Stack) -> None:
    def session() -> int:
        ep = stack["pop3"]
        client = POP3(ep.host, ep.port, EXEMPT)
        try:
            client.user("alice")
            client.pass_(PASSWORD)
            count, _ = client.stat()
            return count
        finally:
            client.quit()

    assert await asyncio.to_thread(session) == 1


async def test_smtp_submission(stack: Stack) -> None:
    def session() -> tuple[str, str]:
        ep = stack["submission"]
        with smtplib.SMTP(ep.host, ep.port, timeout=15, source_address=(OUTSIDER, 0)) as client:
            client.ehlo("client.example")
            before = client.esmtp_features.get("auth", "")
            client.starttls(context=stack.ssl_context())
            client.ehlo("client.example")
            after = client.esmtp_features.get("auth", "")
            client.login("alice", PASSWORD)
            client.sendmail("alice@localhost", ["alice@localhost"], b"Subject: sent\r\n\r\nvia authgate\r\n")
        return before, after

    before, after = await asyncio.to_thread(session)
    assert "PLAIN" not in before.split() and "CRAM-MD5" in before.split()
    assert "PLAIN" in after.split()
    inbox = list((stack.mail_root / "alice" / "Maildir" / "new").iterdir())
    assert any(b"via authgate" in path.read_bytes() for path in inbox)


async def test_smtp_plain_refused_without_tls(stack: Stack) -> None:
    def attempt() -> tuple[int, bytes]:
        ep = stack["submission"]
        with smtplib.SMTP(ep.host, ep.port, timeout=15, source_address=(OUTSIDER, 0)) as client:
            client.ehlo("client.example")
            return client.docmd("AUTH", "PLAIN AGFsaWNlAGFsaWNlLXRlc3QtcHc=")

    code, text = await asyncio.to_thread(attempt)
    assert code == 538 and b"5.7.11" in text


async def test_starttls_injection_is_not_executed(stack: Stack) -> None:
    """A command pipelined behind STARTTLS in the same packet must be
    discarded, not run inside TLS (CVE-2011-0411)."""

    def attack() -> bytes:
        ep = stack["imap"]
        with socket.create_connection((ep.host, ep.port), timeout=15) as raw:
            raw.recv(4096)  # greeting
            raw.sendall(b"a STARTTLS\r\nb LOGIN alice " + PASSWORD.encode() + b"\r\n")
            reply = b""
            while b"a OK" not in reply:
                reply += raw.recv(4096)
            tls = stack.ssl_context().wrap_socket(raw, server_hostname="localhost")
            tls.sendall(b"c NOOP\r\n")
            seen = b""
            while b"c OK" not in seen:
                chunk = tls.recv(4096)
                if not chunk:
                    break
                seen += chunk
            return seen

    seen = await asyncio.to_thread(attack)
    assert b"c OK" in seen
    assert b"b OK" not in seen and b"b NO" not in seen
    assert stack.backends.imap.logins == []


async def test_dead_backend_gives_temporary_failure(stack: Stack) -> None:
    await stack.backends.imap.close()

    def attempt() -> str:
        ep = stack["imap"]
        with IMAP(ep.host, ep.port, EXEMPT) as client:
            try:
                client.login("alice", PASSWORD)
            except imaplib.IMAP4.error as exc:
                return str(exc)
        return "accepted"

    assert "UNAVAILABLE" in await asyncio.to_thread(attempt)

