"""Transcripts of the plugin's stacks (authgate.testing.transcripts), with
real clients: Python's imaplib, poplib and smtplib over real sockets."""

from __future__ import annotations

import asyncio
import imaplib
import poplib
import re
import smtplib
import textwrap
from typing import BinaryIO

import pytest

from authgate.testing.plugin import AuthgateFactory
from authgate.testing.stack import Stack
from authgate.testing.transcripts import TranscriptAssertion

pytest_plugins = ["pytester"]

PASSWORD = "s3cret-Pw"


def wait_for_close(file: BinaryIO) -> bytes:
    """Read until the server closes (the socket's timeout bounds each read)."""
    rest = b""
    for _ in range(100):
        data = file.read1(65536)
        if not data:
            return rest
        rest += data
    raise AssertionError(f"the server did not close: {rest[:200]!r}")


def imap_starttls_login(stack: Stack) -> None:
    endpoint = stack["imap"]
    with imaplib.IMAP4(endpoint.host, endpoint.port, timeout=10) as client:
        client.starttls(ssl_context=stack.ssl_context())
        client.login("alice", PASSWORD)
        # LOGOUT by hand: imaplib's logout() closes at once, racing the
        # server's own close (RFC 9051 6.1.3: BYE, OK, then the server
        # closes). Waiting for that close makes the order certain.
        client.state = "LOGOUT"  # what logout() sets: BYE is expected
        client._simple_command("LOGOUT")  # returns at the BYE, perhaps before the OK
        assert re.fullmatch(rb"(\S+ OK LOGOUT completed\r\n)?", wait_for_close(client.file))
        client.shutdown()


def imap_cleartext_login(stack: Stack) -> None:
    endpoint = stack["imap"]
    with imaplib.IMAP4(endpoint.host, endpoint.port, timeout=10) as client:
        client.login("alice", PASSWORD)


def pop3_stls_login(stack: Stack) -> None:
    endpoint = stack["pop3"]
    client = poplib.POP3(endpoint.host, endpoint.port, timeout=10)
    try:
        client.stls(context=stack.ssl_context())
        client.user("alice")
        client.pass_(PASSWORD)
        # QUIT by hand: poplib's quit() closes at once, racing the server's
        # own close (RFC 1939 6: the server closes after its +OK). Waiting
        # for that close makes the order certain.
        assert client._shortcmd("QUIT").startswith(b"+OK")
        assert wait_for_close(client.file) == b""
    finally:
        client.close()


def smtps_login(stack: Stack) -> None:
    endpoint = stack["smtps"]
    with smtplib.SMTP_SSL(
        endpoint.host, endpoint.port, context=stack.ssl_context(), timeout=10
    ) as client:
        client.login("alice", PASSWORD)


@pytest.mark.asyncio
async def test_starttls_session_is_recorded_with_the_tls_mark(
    authgate_factory: AuthgateFactory,
) -> None:
    stack = await authgate_factory(users={"alice": PASSWORD})
    await asyncio.to_thread(imap_starttls_login, stack)
    await asyncio.to_thread(pop3_stls_login, stack)
    assert await stack.settled()
    imap, pop3 = stack.transcripts
    assert (imap.listener, imap.protocol, imap.number) == ("imap", "imap", 1)
    assert (pop3.listener, pop3.protocol, pop3.number) == ("pop3", "pop3", 2)
    for transcript in (imap, pop3):
        transcript.assert_tls_started()
        transcript.assert_no_secret_before_tls(PASSWORD)
        # LOGOUT / QUIT: the server closes (the clients above wait for it)
        assert transcript.closed_by == "server"
        assert not transcript.implicit_tls
    # exact bytes: the greeting first, STARTTLS's reply the last plaintext
    assert imap.server_bytes(tls=False).startswith(b"* OK [CAPABILITY IMAP4rev1 ")
    assert imap.server_bytes(tls=False).endswith(b" OK Begin TLS negotiation now\r\n")
    assert imap.client_lines(tls=False)[-1].endswith(b" STARTTLS")
    # imaplib asks again inside TLS (RFC 9051 section 6.2.1)
    imap.assert_reasked_capabilities_after_tls()
    assert any(
        line.endswith(b'LOGIN alice "' + PASSWORD.encode() + b'"')
        for line in imap.client_lines(tls=True)
    )
    # through the hand-over: the backend's LOGOUT answer is in the transcript
    assert imap.server_lines(tls=True)[-1].endswith(b"OK LOGOUT completed")
    # poplib's stls() does not ask CAPA again: the helper says so
    with pytest.raises(TranscriptAssertion, match="did not ask for capabilities again"):
        pop3.assert_reasked_capabilities_after_tls()
    assert pop3.client_lines(tls=True) == [b"USER alice", b"PASS " + PASSWORD.encode(), b"QUIT"]
    assert stack.transcripts_of("pop3") == [pop3]
    assert stack.last_transcript() is pop3
    assert stack.last_transcript("imap") is imap


@pytest.mark.asyncio
async def test_secret_before_tls_is_caught_raw_quoted_and_in_base64(
    authgate_factory: AuthgateFactory,
) -> None:
    stack = await authgate_factory(security="none", mechanisms=["PLAIN"], users={"alice": PASSWORD})
    await asyncio.to_thread(imap_cleartext_login, stack)

    def smtp_plain(stack: Stack) -> None:
        endpoint = stack["submission"]
        with smtplib.SMTP(endpoint.host, endpoint.port, timeout=10) as client:
            client.ehlo()
            client.login("alice", PASSWORD)

    await asyncio.to_thread(smtp_plain, stack)
    assert await stack.settled()
    imap, smtp = stack.transcripts
    with pytest.raises(TranscriptAssertion, match="the secret was sent before TLS") as info:
        imap.assert_no_secret_before_tls(PASSWORD)
    # the message carries the transcript, marked C:/S:
    assert "C: " in str(info.value) and "S: * OK" in str(info.value)
    # smtplib uses AUTH PLAIN with the credentials in base64 on the AUTH line
    line = smtp.secret_before_tls(PASSWORD)
    assert line is not None and line.upper().startswith(b"AUTH PLAIN ")
    assert imap.secret_before_tls("another-password") is None
    with pytest.raises(TranscriptAssertion, match="TLS never started"):
        imap.assert_tls_started()


@pytest.mark.asyncio
async def test_implicit_tls_and_refusal_helpers(authgate_factory: AuthgateFactory) -> None:
    stack = await authgate_factory(users={"alice": PASSWORD})
    await asyncio.to_thread(smtps_login, stack)
    with pytest.raises(imaplib.IMAP4.error, match="PRIVACYREQUIRED"):
        await asyncio.to_thread(imap_cleartext_login, stack)
    assert await stack.settled()
    smtps, imap = stack.transcripts
    assert smtps.implicit_tls and smtps.tls
    assert smtps.server_bytes(tls=False) == b""
    assert smtps.secret_before_tls(PASSWORD) is None
    assert "implicit TLS" in smtps.text()
    # imaplib's login is refused (LOGINDISABLED): it sends only LOGOUT after
    imap.assert_client_stopped_after(b"PRIVACYREQUIRED")
    assert imap.client_commands_after(b"PRIVACYREQUIRED")[0].endswith(b"LOGOUT")
    with pytest.raises(TranscriptAssertion, match="carried on after"):
        imap.assert_client_stopped_after(b"* OK [CAPABILITY")
    with pytest.raises(TranscriptAssertion, match="never said"):
        imap.assert_client_stopped_after(b"no such line")


def test_failing_test_reports_its_transcripts(pytester: pytest.Pytester) -> None:
    """A failing test's report has an "authgate transcripts" section; a
    passing one has none."""
    pytester.makeini(
        "[pytest]\nasyncio_mode = strict\nasyncio_default_fixture_loop_scope = function\n"
    )
    pytester.makepyfile(
        test_inner=textwrap.dedent("""
        import asyncio, imaplib, pytest

        def greet(endpoint):
            with imaplib.IMAP4(endpoint.host, endpoint.port, timeout=10) as client:
                return client.noop()

        @pytest.mark.asyncio
        async def test_fails(authgate):
            await asyncio.to_thread(greet, authgate["imap"])
            await authgate.settled()
            assert False, "on purpose"

        @pytest.mark.asyncio
        async def test_passes(authgate):
            await asyncio.to_thread(greet, authgate["imap"])
        """)
    )
    artefacts = pytester.path / "transcripts"
    result = pytester.runpytest_inprocess(
        "-p", "no:cacheprovider", "-rA", f"--authgate-transcripts={artefacts}"
    )
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    assert out.count("authgate transcripts") == 1
    result.stdout.fnmatch_lines(
        [
            "*- authgate transcripts -*",
            "connection 1 to imap (imap)",
            "S: * OK [[]CAPABILITY IMAP4rev1 *",
            "C: * NOOP",
            "S: * OK NOOP completed",
            "C: * LOGOUT",
            "*closed by the *",
        ]
    )
    # the same text as an artefact file, for the failing test only
    (artefact,) = artefacts.iterdir()
    assert artefact.name == "test_inner.py_test_fails.txt"
    assert artefact.read_text().startswith("connection 1 to imap (imap)\n")
