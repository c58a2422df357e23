"""SASL facts the session hands to the mechanisms, checked through the
running proxy: which DIGEST-MD5 digest-uri hosts are ours (and that a
mismatch is not a password guess), and when SCRAM gets channel-binding data.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from authgate.sasl import mechanism_info
from authgate.sasl._ntlm_messages import (
    Flag,
    build_authenticate,
    build_negotiate,
    parse_challenge,
)
from authgate.sasl.base import ClientContext, ClientCredentials, ClientMechanism, client_step
from authgate.sasl.ntlm import nt_hash, ntlm2_session_response, ntlmv1_response
from authgate.sasl.scram import tls_server_end_point
from authgate.testing.stack import ListenerSpec, Stack, embedded_stack

pytestmark = pytest.mark.asyncio

PASSWORD = "right-pw-1"
# A defence that would block the address after two counted failures.
DEFENCE = """[defence]
failure_delay = 0.0
penalties = []
block_after = 2
block_window = 600
block_for = 600
[limits]
max_errors = 1000
"""


LAYOUT = (
    ListenerSpec("submission", "smtp", "starttls"),
    ListenerSpec("imap", "imap", "none"),
)


@pytest_asyncio.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with embedded_stack(
        tmp_path, users={"alice": PASSWORD}, security="none", layout=LAYOUT, extra_config=DEFENCE
    ) as running:
        yield running


@pytest_asyncio.fixture
async def legacy_stack(tmp_path: Path) -> AsyncIterator[Stack]:
    """The same, with `[policy] allow_ntlm_legacy = true`."""
    async with embedded_stack(
        tmp_path,
        users={"alice": PASSWORD},
        security="none",
        layout=LAYOUT,
        extra_config=DEFENCE,
        allow_ntlm_legacy=True,
    ) as running:
        yield running


class SmtpDialogue:
    """A bare SMTP client on asyncio streams: enough to run one SASL exchange."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(
        cls, host: str, port: int, source: str, context: ssl.SSLContext | None = None
    ) -> SmtpDialogue:
        reader, writer = await asyncio.open_connection(
            host,
            port,
            local_addr=(source, 0),
            ssl=context,
            server_hostname="localhost" if context else None,
        )
        dialogue = cls(reader, writer)
        assert (await dialogue.reply()).startswith("220 ")
        return dialogue

    async def reply(self) -> str:
        lines = []
        while True:
            line = (await asyncio.wait_for(self.reader.readline(), 10)).decode()
            assert line, "connection closed"
            lines.append(line.rstrip("\r\n"))
            if line[3:4] != "-":
                return "\n".join(lines)

    async def say(self, line: str) -> str:
        self.writer.write(line.encode() + b"\r\n")
        return await self.reply()

    async def ehlo(self) -> list[str]:
        reply = await self.say("EHLO client.example.test")
        assert reply.startswith("250")
        auth = [x for x in reply.splitlines() if x[4:].startswith("AUTH ")]
        return auth[0][9:].split() if auth else []

    async def starttls(self, context: ssl.SSLContext) -> None:
        assert (await self.say("STARTTLS")).startswith("220 ")
        await self.writer.start_tls(context, server_hostname="localhost")

    async def authenticate(self, mech: ClientMechanism) -> str:
        """Run `mech` to the end; the server's final reply."""
        first = mech.start()
        command = f"AUTH {mech.name}"
        if first is not None:
            command += " " + (base64.b64encode(first).decode() or "=")
        reply = await self.say(command)
        while reply.startswith("334 "):
            # SCRAM's PBKDF2 in a thread, as the proxy runs it.
            answer = await asyncio.to_thread(client_step, mech, base64.b64decode(reply[4:]))
            reply = await self.say(base64.b64encode(answer).decode())
        return reply

    def close(self) -> None:
        self.writer.close()


def digest_client(service: str, host: str, password: str = PASSWORD) -> ClientMechanism:
    return mechanism_info("DIGEST-MD5").client(
        ClientCredentials("alice", password), ClientContext(service=service, hostname=host)
    )


# ------------------------------------------------------------ DIGEST-MD5


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST.", "127.0.0.1"])
async def test_digest_uri_may_name_our_hostname_or_the_address_connected_to(
    stack: Stack, host: str
) -> None:
    """hostname = "localhost"; 127.0.0.1 is where the client connected. A
    client that was told the IP address puts it into digest-uri (Cyrus SASL,
    GNU SASL, Authen::SASL): that is us too."""
    ep = stack["submission"]
    smtp = await SmtpDialogue.open(ep.host, ep.port, "127.0.0.3")
    try:
        assert "DIGEST-MD5" in await smtp.ehlo()
        reply = await smtp.authenticate(digest_client("smtp", host))
        assert reply.startswith("235 "), reply
    finally:
        smtp.close()
    assert stack.backends.smtp.logins[-1].user == "alice"


async def test_digest_uri_of_another_service_or_host_is_refused_and_not_a_guess(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="authgate.session")
    source = "127.0.0.4"
    guard = stack.gateway.guard
    ep = stack["submission"]
    smtp = await SmtpDialogue.open(ep.host, ep.port, source)
    try:
        await smtp.ehlo()
        # More mismatches than block_after: were they counted, the address
        # would now be blocked and the last login refused.
        for uri in (("imap", "localhost"), ("smtp", "mail.example.net"), ("imap", "127.0.0.1")):
            reply = await smtp.authenticate(digest_client(*uri))
            assert reply == (
                "535 5.7.8 Authentication credentials invalid: digest-uri is not for this server"
            )
        assert guard.addresses.get(guard.address_key(source)) is None
        assert (await smtp.authenticate(digest_client("smtp", "localhost"))).startswith("235 ")
    finally:
        smtp.close()
    messages = [r.getMessage() for r in caplog.records if r.name == "authgate.session"]
    failed = [m for m in messages if "authentication failed" in m]
    assert len(failed) == 3, messages
    assert "DIGEST-MD5 authentication failed: digest-uri-mismatch" in failed[0]
    assert "'imap/localhost' names another service" in failed[0]
    assert "'smtp/mail.example.net' names a host that is not ours" in failed[1]
    assert "'imap/127.0.0.1' names another service" in failed[2]


async def test_wrong_password_with_a_good_digest_uri_is_still_a_guess(stack: Stack) -> None:
    """The other side of the coin: the defence still counts DIGEST-MD5 guesses."""
    source = "127.0.0.5"
    guard = stack.gateway.guard
    ep = stack["submission"]
    smtp = await SmtpDialogue.open(ep.host, ep.port, source)
    try:
        await smtp.ehlo()
        reply = await smtp.authenticate(digest_client("smtp", "127.0.0.1", "wrong"))
        assert reply.startswith("535 5.7.8 Authentication credentials invalid"), reply
        assert "digest-uri" not in reply
    finally:
        smtp.close()
    assert guard.addresses.get(guard.address_key(source)) is not None


async def test_imap_digest_uri_mismatch_reply(stack: Stack) -> None:
    ep = stack["imap"]
    reader, writer = await asyncio.open_connection(ep.host, ep.port)
    try:
        assert (await reader.readline()).startswith(b"* OK")
        mech = digest_client("smtp", "localhost")
        assert mech.start() is None
        writer.write(b"a AUTHENTICATE DIGEST-MD5\r\n")
        challenge = await asyncio.wait_for(reader.readline(), 10)
        assert challenge.startswith(b"+ ")
        writer.write(base64.b64encode(client_step(mech, base64.b64decode(challenge[2:]))) + b"\r\n")
        reply = await asyncio.wait_for(reader.readline(), 10)
        assert reply == (
            b"a NO [AUTHENTICATIONFAILED] Authentication failed: digest-uri is not for this"
            b" server\r\n"
        )
    finally:
        writer.close()


# ------------------------------------------------------------ NTLM legacy


class LegacyNTLMClient:
    """What Cyrus SASL, GNU SASL, fetchmail and Authen::NTLM send: NTLMv1
    ([MS-NLMP] 3.3.1), or with extended session security the NTLM2 session
    response. Written out here because our own client speaks only NTLMv2."""

    name = "NTLM"

    def __init__(self, password: str, *, session_response: bool) -> None:
        self.password = password
        self.ess = session_response
        self.flags = Flag.UNICODE | Flag.NTLM | (Flag.EXTENDED_SESSIONSECURITY if self.ess else 0)

    def start(self) -> bytes:
        return build_negotiate(int(self.flags))

    def step(self, challenge: bytes) -> bytes:
        server_challenge = parse_challenge(challenge).server_challenge
        nt = nt_hash(self.password)
        if self.ess:
            client_challenge = os.urandom(8)
            lm = client_challenge + bytes(16)
            response = ntlm2_session_response(nt, server_challenge, client_challenge)
        else:
            response = ntlmv1_response(nt, server_challenge)
            lm = response  # what Windows sends when it keeps no LM hash
        return build_authenticate(
            int(self.flags), lm, response, b"", "alice".encode("utf-16-le"), b""
        )

    def finish(self, additional: bytes | None) -> None:
        return None


@pytest.mark.parametrize("session_response", [False, True], ids=["ntlmv1", "ntlm2-session"])
async def test_legacy_ntlm_is_too_weak_by_default(stack: Stack, session_response: bool) -> None:
    ep = stack["submission"]
    smtp = await SmtpDialogue.open(ep.host, ep.port, "127.0.0.6")
    try:
        await smtp.ehlo()
        reply = await smtp.authenticate(
            LegacyNTLMClient(PASSWORD, session_response=session_response)
        )
        assert reply == "534 5.7.9 Authentication mechanism is too weak"
    finally:
        smtp.close()
    assert stack.backends.smtp.logins == []


@pytest.mark.parametrize("session_response", [False, True], ids=["ntlmv1", "ntlm2-session"])
async def test_allow_ntlm_legacy_lets_them_in(legacy_stack: Stack, session_response: bool) -> None:
    ep = legacy_stack["submission"]
    smtp = await SmtpDialogue.open(ep.host, ep.port, "127.0.0.6")
    try:
        await smtp.ehlo()
        wrong = await smtp.authenticate(
            LegacyNTLMClient("wrong", session_response=session_response)
        )
        assert wrong == "535 5.7.8 Authentication credentials invalid"
        right = LegacyNTLMClient(PASSWORD, session_response=session_response)
        assert (await smtp.authenticate(right)).startswith("235 ")
    finally:
        smtp.close()
    login = legacy_stack.backends.smtp.logins[-1]
    assert login.user == "alice" and login.mechanism


# ------------------------------------------------------------ channel binding

TLS_LAYOUT = (
    ListenerSpec("submission", "smtp", "starttls"),
    ListenerSpec("smtps", "smtp", "implicit"),
)


@pytest_asyncio.fixture(params=[False, True], ids=["no-plus", "plus"])
async def binding_stack(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stack]:
    """SCRAM-SHA-256 without, or with, SCRAM-SHA-256-PLUS advertised."""
    mechanisms = ("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256") if request.param else ("SCRAM-SHA-256",)
    async with embedded_stack(
        tmp_path,
        users={"alice": PASSWORD},
        security="none",
        mechanisms=mechanisms,
        layout=TLS_LAYOUT,
        extra_config=DEFENCE,
    ) as running:
        yield running


async def tls_dialogue(stack: Stack, transport: str) -> tuple[SmtpDialogue, list[str]]:
    """An SMTP session inside TLS (STARTTLS or implicit), after EHLO: the
    dialogue and the mechanisms advertised."""
    context = stack.ssl_context()
    if transport == "starttls":
        ep = stack["submission"]
        smtp = await SmtpDialogue.open(ep.host, ep.port, "127.0.0.7")
        await smtp.ehlo()
        await smtp.starttls(context)
    else:
        ep = stack["smtps"]
        smtp = await SmtpDialogue.open(ep.host, ep.port, "127.0.0.7", context)
    return smtp, await smtp.ehlo()


def scram(name: str, binding: tuple[str, bytes] | None) -> ClientMechanism:
    """Our SCRAM client: with binding data and a non-PLUS mechanism it sends
    the GS2 flag "y" ("I can bind, I believe you cannot")."""
    return mechanism_info(name).client(
        ClientCredentials("alice", PASSWORD), ClientContext(channel_binding=binding)
    )


def certificate_binding(smtp: SmtpDialogue) -> tuple[str, bytes]:
    """tls-server-end-point (RFC 5929) of the certificate this TLS session shows."""
    der = smtp.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return ("tls-server-end-point", tls_server_end_point(der))


@pytest.mark.parametrize("transport", ["starttls", "implicit"])
async def test_scram_y_flag_follows_what_is_advertised(
    binding_stack: Stack, transport: str
) -> None:
    """RFC 5802 section 6, the same on either transport: a client that can
    bind but sees no -PLUS says "y" and is let in; with -PLUS advertised a
    "y" means someone stripped it, and is refused. (After STARTTLS the
    machine used to get the binding data whatever was advertised, so the
    first case was refused as a wrong password and counted as a guess.)"""
    guard = binding_stack.gateway.guard
    smtp, offered = await tls_dialogue(binding_stack, transport)
    plus = "SCRAM-SHA-256-PLUS" in offered
    try:
        reply = await smtp.authenticate(scram("SCRAM-SHA-256", certificate_binding(smtp)))
    finally:
        smtp.close()
    if plus:
        assert reply.startswith("535 5.7.8 "), reply
    else:
        assert reply.startswith("235 "), reply
        assert guard.addresses.get(guard.address_key("127.0.0.7")) is None


@pytest.mark.parametrize("transport", ["starttls", "implicit"])
async def test_plus_binds_to_this_tls_session(binding_stack: Stack, transport: str) -> None:
    smtp, offered = await tls_dialogue(binding_stack, transport)
    try:
        # A client that cannot bind ("n") is fine either way.
        assert (await smtp.authenticate(scram("SCRAM-SHA-256", None))).startswith("235 ")
    finally:
        smtp.close()
    if "SCRAM-SHA-256-PLUS" not in offered:
        return
    smtp, _ = await tls_dialogue(binding_stack, transport)
    try:
        another = ("tls-server-end-point", bytes(32))
        reply = await smtp.authenticate(scram("SCRAM-SHA-256-PLUS", another))
        assert reply.startswith("535 5.7.8 "), reply
        ours = certificate_binding(smtp)
        assert (await smtp.authenticate(scram("SCRAM-SHA-256-PLUS", ours))).startswith("235 ")
    finally:
        smtp.close()
