"""SMTP server and client machines (sans-IO): replies, policy, SASL, STARTTLS,
pipelining, relay mode, XCLIENT, and our client against our server."""

from __future__ import annotations

import base64
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authgate.policy import ExemptNetworks, ListenerPolicy, Protocol, Security, decide
from authgate.protocols import server as core
from authgate.protocols.base import (
    Authenticated,
    AuthFailed,
    BackendFailure,
    ClientEvent,
    ClientSettings,
    Event,
    LoggedIn,
    LoginFailed,
    ProtocolStateError,
    RelayAuth,
    RelayChallenge,
    RelayResponse,
    Send,
    SessionSettings,
    Splice,
    StartTLS,
)
from authgate.protocols.smtp import SmtpClient, SmtpServer, xtext
from authgate.sasl import DEFAULT_ORDER
from authgate.sasl.base import (
    NO_RESPONSE,
    ClientContext,
    ClientCredentials,
    Derive,
    Failure,
    FailureReason,
    InitialResponse,
    Lookup,
    PasswordVerdict,
    ServerContext,
    Success,
)
from authgate.testing.kit import (
    CLIENT_EVENTS,
    PASSWORDS,
    SERVER_EVENTS,
    BackendAnswer,
    FakeBackend,
    ServerDriver,
    b64_str,
    backend_fails,
    backend_ready,
    plain_str,
    resolve,
)

HOST = "mx.example.test"
LAN = ExemptNetworks.parse(["192.168.0.0/16"])
OUTSIDER = "198.51.100.7"
INSIDER = "192.168.1.20"
ALL = (*DEFAULT_ORDER, "SCRAM-SHA-1", "SCRAM-SHA-256", "SCRAM-SHA-256-PLUS")
CHALLENGE_RESPONSE = ("CRAM-MD5", "DIGEST-MD5", "NTLM", "SCRAM-SHA-1", "SCRAM-SHA-256")
READY = backend_ready(("PIPELINING",))


def session(
    security: Security = Security.NONE,
    *,
    tls: bool = False,
    starttls: bool = True,
    client: str = OUTSIDER,
    mechanisms: tuple[str, ...] = DEFAULT_ORDER,
    verifiable: tuple[str, ...] | None = None,
    **kwargs: Any,
) -> SessionSettings:
    listener = ListenerPolicy(Protocol.SMTP, security, mechanisms, exempt=LAN)
    kwargs.setdefault("sasl_context", lambda t: ServerContext(service="smtp", hostname=HOST))
    return SessionSettings(
        hostname=HOST,
        decide=lambda t: decide(listener, client, tls=t, verifiable=verifiable),
        starttls_available=starttls,
        tls_active=tls,
        **kwargs,
    )


def driver(settings: SessionSettings, backend: BackendAnswer | None = READY) -> ServerDriver:
    """A mail client's view of one SmtpServer: lookups answered from the kit's
    store and, unless told otherwise, the backend login reported successful."""
    return ServerDriver(SmtpServer(settings), backend=backend)


def ehlo(talk: ServerDriver, name: str = "client.example") -> str:
    return talk.say(f"EHLO {name}")


def keywords(reply: str) -> list[str]:
    lines = reply.split("\r\n")[:-1]
    assert lines[0] == f"250-{HOST}" or lines[0] == f"250 {HOST}"
    return [line[4:] for line in lines[1:]]


def auth_line(reply: str) -> str | None:
    return next((k for k in keywords(reply) if k.startswith("AUTH ")), None)


# ================================================================ greeting, EHLO


def test_greeting_names_host_but_no_version() -> None:
    talk = driver(session())
    assert talk.greeting.decode() == f"220 {HOST} ESMTP authgate\r\n"


def test_ehlo_reply_exact() -> None:
    talk = driver(session(Security.NONE, mechanisms=("PLAIN", "CRAM-MD5")))
    assert ehlo(talk) == (
        f"250-{HOST}\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n"
        "250-STARTTLS\r\n250 AUTH PLAIN CRAM-MD5\r\n"
    )


@pytest.mark.parametrize(
    ("security", "tls", "client", "expected"),
    [
        (Security.NONE, False, OUTSIDER, DEFAULT_ORDER),
        (Security.REQUIRE_SECURE_AUTH, False, OUTSIDER, ("CRAM-MD5", "DIGEST-MD5", "NTLM")),
        (Security.REQUIRE_SECURE_AUTH, True, OUTSIDER, DEFAULT_ORDER),
        (Security.REQUIRE_SECURE_AUTH, False, INSIDER, DEFAULT_ORDER),
        (Security.REQUIRE_ENCRYPTED, False, OUTSIDER, ()),
        (Security.REQUIRE_ENCRYPTED, True, OUTSIDER, DEFAULT_ORDER),
        (Security.REQUIRE_ENCRYPTED, False, INSIDER, DEFAULT_ORDER),
    ],
)
def test_ehlo_auth_keyword_follows_policy(
    security: Security, tls: bool, client: str, expected: tuple[str, ...]
) -> None:
    talk = driver(session(security, tls=tls, client=client))
    reply = ehlo(talk)
    assert auth_line(reply) == ("AUTH " + " ".join(expected) if expected else None)
    # STARTTLS is offered exactly when it is possible and not done yet.
    assert ("STARTTLS" in keywords(reply)) is (not tls)


def test_ehlo_omits_starttls_when_listener_cannot() -> None:
    reply = ehlo(driver(session(starttls=False)))
    assert "STARTTLS" not in keywords(reply)
    assert "SIZE" not in " ".join(keywords(reply))


def test_ehlo_auth_limited_by_store() -> None:
    talk = driver(session(verifiable=("PLAIN", "LOGIN")))
    assert auth_line(ehlo(talk)) == "AUTH LOGIN PLAIN"
    assert talk.say("AUTH CRAM-MD5").startswith("504 5.5.4 ")
    assert talk.of(AuthFailed) == [AuthFailed("CRAM-MD5", "not-available")]


def test_ehlo_syntax() -> None:
    talk = driver(session())
    assert talk.say("EHLO").startswith("501 5.5.4 ")
    assert talk.send(b"EHLO a\x0bb\r\n").decode().startswith("501 5.5.4 ")
    assert talk.say("ehlo [192.0.2.1]").startswith(f"250-{HOST}")


def test_helo_has_no_extensions_and_no_auth() -> None:
    talk = driver(session())
    assert talk.say("HELO client.example") == f"250 {HOST}\r\n"
    assert talk.say(f"AUTH PLAIN {plain_str('alice', PASSWORDS['alice'])}").startswith("503 5.5.1 ")
    assert not talk.of(Lookup)


# ============================================================== simple commands


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        ("NOOP", "250 2.0.0 "),
        ("noop anything", "250 2.0.0 "),
        ("RSET", "250 2.0.0 "),
        ("HELP", "214 2.0.0 "),
        ("VRFY alice", "252 2.5.0 "),
        ("EXPN staff", "502 5.5.1 "),
        ("RCPT TO:<a@example.org>", "503 5.5.1 "),
        ("DATA", "503 5.5.1 "),
        ("XCLIENT ADDR=1.2.3.4", "500 5.5.2 "),
        ("", "500 5.5.2 "),
    ],
)
def test_simple_commands(line: str, reply: str) -> None:
    talk = driver(session())
    ehlo(talk)
    answer = talk.say(line)
    assert answer.startswith(reply) and answer.count("\r\n") == 1


def test_quit() -> None:
    talk = driver(session())
    assert talk.say("QUIT").startswith("221 2.0.0 ")
    assert talk.closed
    assert talk.say("NOOP") == ""  # nothing more after Close


def test_auth_before_ehlo() -> None:
    talk = driver(session())
    assert talk.say(f"AUTH PLAIN {plain_str('alice', PASSWORDS['alice'])}").startswith("503 5.5.1 ")
    assert not talk.of(Lookup)


# ==================================================================== AUTH


def test_plain_with_initial_response_succeeds_only_after_backend() -> None:
    talk = driver(session(), backend=None)
    ehlo(talk)
    assert talk.say(f"AUTH PLAIN {plain_str('alice', PASSWORDS['alice'])}") == ""
    assert talk.of(Authenticated) == [Authenticated("alice", "alice", "PLAIN")]
    assert (
        talk.call(talk.server.backend_ready(())).decode()
        == "235 2.7.0 Authentication successful\r\n"
    )
    assert talk.of(Splice) == [Splice(pending=b"")]


def test_plain_without_initial_response() -> None:
    talk = driver(session())
    ehlo(talk)
    assert talk.say("auth plain") == "334 \r\n"  # empty challenge, lower-case command
    assert talk.say(plain_str("bob", PASSWORDS["bob"])).startswith("235 2.7.0 ")


def test_login_mechanism_prompts() -> None:
    talk = driver(session())
    ehlo(talk)
    assert talk.say("AUTH LOGIN") == f"334 {b64_str('Username:')}\r\n"
    assert talk.say(b64_str("alice")) == f"334 {b64_str('Password:')}\r\n"
    assert talk.say(b64_str(PASSWORDS["alice"])).startswith("235 2.7.0 ")


def test_login_with_initial_response() -> None:
    talk = driver(session())
    ehlo(talk)
    assert talk.say(f"AUTH LOGIN {b64_str('alice')}") == f"334 {b64_str('Password:')}\r\n"


def test_equals_sign_is_an_empty_initial_response() -> None:
    # "=" is an empty response, not a missing one: PLAIN then has no message.
    talk = driver(session())
    ehlo(talk)
    assert talk.say("AUTH PLAIN =").startswith("501 5.5.2 ")
    assert talk.of(AuthFailed)[0].reason == "malformed"


def test_wrong_password_never_echoed() -> None:
    talk = driver(session())
    ehlo(talk)
    wrong = "wonder lamp"
    reply = talk.say(f"AUTH PLAIN {plain_str('alice', wrong)}")
    assert reply == "535 5.7.8 Authentication credentials invalid\r\n"
    assert talk.of(AuthFailed) == [AuthFailed("PLAIN", "invalid-credentials", "alice")]
    everything = repr(talk.events) + "".join(e.data.decode() for e in talk.of(Send))
    assert wrong not in everything and plain_str("alice", wrong) not in everything


def test_unknown_user() -> None:
    talk = driver(session())
    ehlo(talk)
    assert talk.say(f"AUTH PLAIN {plain_str('mallory', 'x')}").startswith("535 5.7.8 ")


@pytest.mark.parametrize(
    ("line", "reply", "reason"),
    [
        ("AUTH PLAIN not*base64", "501 5.5.2 ", "malformed"),
        ("AUTH PLAIN *", "501 5.7.0 Authentication cancelled", "cancelled"),
        ("AUTH FOO", "504 5.5.4 ", "not-available"),
        ("AUTH X-UNKNOWN-MECH", "504 5.5.4 ", "not-available"),
    ],
)
def test_auth_refusals(line: str, reply: str, reason: str) -> None:
    talk = driver(session())
    ehlo(talk)
    assert talk.say(line).startswith(reply)
    assert [f.reason for f in talk.of(AuthFailed)] == [reason]


@pytest.mark.parametrize("line", ["AUTH", "AUTH PLAIN a b", "AUTH PL@IN", "AUTH " + "X" * 21])
def test_auth_syntax_errors(line: str) -> None:
    talk = driver(session())
    ehlo(talk)
    assert talk.say(line).startswith("501 5.5.4 ")
    assert not talk.of(AuthFailed)


def test_cancel_in_the_middle() -> None:
    talk = driver(session())
    ehlo(talk)
    talk.say("AUTH LOGIN")
    assert talk.say("*") == "501 5.7.0 Authentication cancelled\r\n"
    assert talk.say("NOOP").startswith("250 ")  # back to commands


def test_bad_base64_in_the_middle() -> None:
    talk = driver(session())
    ehlo(talk)
    talk.say("AUTH LOGIN")
    assert talk.say("!!!").startswith("501 5.5.2 ")


@pytest.mark.parametrize(
    ("security", "tls", "mechanism", "reply", "reason"),
    [
        (
            Security.REQUIRE_ENCRYPTED,
            False,
            "CRAM-MD5",
            "530 5.7.0 Must issue a STARTTLS command first",
            "tls-required",
        ),
        (
            Security.REQUIRE_SECURE_AUTH,
            False,
            "PLAIN",
            "538 5.7.11 Encryption required for requested authentication mechanism",
            "mechanism-needs-tls",
        ),
        (
            Security.NONE,
            False,
            "SCRAM-SHA-256-PLUS",
            "538 5.7.11 ",
            "channel-binding-unavailable",
        ),
        # Inside TLS, but the driver supplied no channel binding data.
        (Security.NONE, True, "SCRAM-SHA-256-PLUS", "504 5.5.4 ", "encryption-required"),
    ],
)
def test_policy_refusals(
    security: Security, tls: bool, mechanism: str, reply: str, reason: str
) -> None:
    talk = driver(session(security, tls=tls, mechanisms=ALL))
    ehlo(talk)
    assert talk.say(f"AUTH {mechanism} {b64_str('n,,n=alice,r=abc')}").startswith(reply)
    assert [f.reason for f in talk.of(AuthFailed)] == [reason]


@dataclass
class FakeExchange:
    """Stands in for SaslExchange to reach every FailureReason."""

    outcome: Failure | Success

    def start(self, initial: bytes | None) -> Failure | Success:
        return self.outcome

    def respond(self, line: bytes) -> Failure | Success:
        raise AssertionError("not reached")


def fake_exchange(monkeypatch: pytest.MonkeyPatch, outcome: Failure | Success) -> None:
    # The core runs every exchange.
    monkeypatch.setattr(core, "SaslExchange", lambda name, ctx: FakeExchange(outcome))


@pytest.mark.pure_python  # patches core.SaslExchange
@pytest.mark.parametrize(
    ("reason", "reply"),
    [
        (FailureReason.MALFORMED, "501 5.5.2 "),
        (FailureReason.CANCELLED, "501 5.7.0 "),
        (FailureReason.INVALID_CREDENTIALS, "535 5.7.8 Authentication credentials invalid"),
        (FailureReason.AUTHZ_DENIED, "535 5.7.8 "),
        (FailureReason.TEMPORARY, "454 4.7.0 Temporary authentication failure"),
        (FailureReason.TOO_WEAK, "534 5.7.9 "),
        (FailureReason.ENCRYPTION_REQUIRED, "538 5.7.11 "),
        (FailureReason.EXPIRED, "535 5.7.8 Authentication credentials invalid: password expired"),
        (FailureReason.TOO_LONG, "501 5.5.4 Password too long (at most 1024 octets)"),
    ],
)
def test_every_failure_reason_has_its_reply(
    monkeypatch: pytest.MonkeyPatch, reason: FailureReason, reply: str
) -> None:
    fake_exchange(monkeypatch, Failure(reason, "detail"))
    talk = driver(session())
    ehlo(talk)
    assert talk.say("AUTH PLAIN").startswith(reply)
    assert talk.of(AuthFailed) == [AuthFailed("PLAIN", reason.value)]


@pytest.mark.pure_python  # patches core.SaslExchange
def test_success_data_sent_as_final_challenge(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_exchange(monkeypatch, Success("alice", additional=b"v=proof"))
    talk = driver(session())
    ehlo(talk)
    assert talk.say("AUTH PLAIN") == f"334 {b64_str('v=proof')}\r\n"
    assert not talk.of(Authenticated)  # not before the client accepted our proof
    assert talk.say("").startswith("235 2.7.0 ")


@pytest.mark.pure_python  # patches core.SaslExchange
@pytest.mark.parametrize(("answer", "reply"), [("*", "501 5.7.0 "), ("Zm9v", "501 5.5.2 ")])
def test_success_data_rejected_by_client(
    monkeypatch: pytest.MonkeyPatch, answer: str, reply: str
) -> None:
    fake_exchange(monkeypatch, Success("alice", additional=b"v=proof"))
    talk = driver(session())
    ehlo(talk)
    talk.say("AUTH PLAIN")
    assert talk.say(answer).startswith(reply)
    assert not talk.of(Authenticated)
    assert talk.of(AuthFailed)[0].authcid == "alice"


@pytest.mark.parametrize(
    "failure", [f for f in BackendFailure if f is not BackendFailure.PASSWORD_EXPIRED]
)
def test_backend_failure_is_temporary_and_session_goes_on(failure: BackendFailure) -> None:
    talk = driver(session(max_errors=1), backend=backend_fails(failure))
    ehlo(talk)
    reply = talk.say(f"AUTH PLAIN {plain_str('alice', PASSWORDS['alice'])}")
    assert reply == "454 4.7.0 Temporary authentication failure\r\n"
    assert talk.of(AuthFailed) == [AuthFailed("PLAIN", f"backend-{failure.value}", "alice")]
    assert not talk.closed  # not counted as an error even with max_errors=1
    talk.backend = READY
    assert talk.say(f"AUTH PLAIN {plain_str('alice', PASSWORDS['alice'])}").startswith("235 ")


def test_expired_password_gets_535_and_no_login() -> None:
    talk = driver(session(), backend=backend_fails(BackendFailure.PASSWORD_EXPIRED))
    ehlo(talk)
    reply = talk.say(f"AUTH PLAIN {plain_str('alice', PASSWORDS['alice'])}")
    assert reply == "535 5.7.8 Authentication credentials invalid: password expired\r\n"
    assert not talk.closed


def test_channel_binding_from_the_sasl_context_reaches_plus_mechanism() -> None:
    binding = b"\x01" * 32
    server_settings = session(
        Security.NONE,
        mechanisms=("SCRAM-SHA-256-PLUS",),
        sasl_context=lambda t: ServerContext(
            service="smtp",
            hostname=HOST,
            channel_binding=("tls-server-end-point", binding) if t else None,
        ),
    )
    client_settings = ClientSettings(
        hostname="proxy.example",
        starttls=True,
        mechanisms=("SCRAM-SHA-256-PLUS",),
        credentials=ClientCredentials("alice", PASSWORDS["alice"]),
        sasl_context=ClientContext(channel_binding=("tls-server-end-point", binding)),
    )
    client_events, server_events = pump(SmtpClient(client_settings), SmtpServer(server_settings))
    assert LoggedIn in {type(e) for e in client_events}
    assert Authenticated("alice", "alice", "SCRAM-SHA-256-PLUS") in server_events


# ==================================================================== limits


def test_errors_are_capped() -> None:
    talk = driver(session(max_errors=3))
    ehlo(talk)
    assert talk.say("BOGUS").startswith("500 ")
    assert talk.say(f"AUTH PLAIN {plain_str('alice', 'nope')}").startswith("535 ")
    last = talk.say("GET / HTTP/1.1")
    assert last.startswith("500 5.5.2 ")
    assert "\r\n421 4.7.0 " in last
    assert talk.closed
    assert talk.say("NOOP") == ""


@pytest.mark.pure_python  # patches core.SaslExchange
def test_temporary_failures_do_not_count(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_exchange(monkeypatch, Failure(FailureReason.TEMPORARY))
    talk = driver(session(max_errors=1))
    ehlo(talk)
    for _ in range(3):
        assert talk.say("AUTH PLAIN").startswith("454 ")
    assert not talk.closed


def test_command_line_too_long() -> None:
    talk = driver(session(max_line=64))
    assert talk.say("NOOP " + "x" * 100).startswith("500 5.5.2 Line too long")
    assert talk.closed


def test_command_line_too_long_without_line_end() -> None:
    talk = driver(session(max_line=64))
    assert talk.send("x" * 200).decode().startswith("500 ")
    assert talk.closed


def test_sasl_line_too_long() -> None:
    talk = driver(session(max_line=64))
    ehlo(talk)
    talk.say("AUTH LOGIN")
    assert talk.say("A" * 100).startswith("500 5.5.6 ")
    assert talk.of(AuthFailed) == [AuthFailed("LOGIN", "malformed")]
    assert talk.closed


def test_commands_are_capped() -> None:
    talk = driver(session(max_commands=3))
    for _ in range(3):
        assert talk.say("NOOP").startswith("250 ")
    assert talk.say("NOOP").startswith("421 4.7.0 ")
    assert talk.closed


# ================================================================ pipelining


def test_pipelined_commands_answered_in_order() -> None:
    talk = driver(session())
    reply = talk.send("EHLO a\r\nNOOP\r\nBOGUS\r\nRSET\r\n").decode()
    codes = [line[:4] for line in reply.split("\r\n") if line][-3:]
    assert codes == ["250 ", "500 ", "250 "]


def test_pipelining_after_auth_reaches_splice() -> None:
    talk = driver(session(), backend=None)
    data = (
        f"EHLO a\r\nAUTH PLAIN {plain_str('alice', PASSWORDS['alice'])}\r\n"
        "MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\nDA"
    )
    talk.send(data)
    assert len(talk.of(Authenticated)) == 1
    # Nothing behind AUTH was executed while the backend login is pending ...
    assert talk.send("TA\r\n").decode() == ""
    assert not any(b"503" in e.data or b"530" in e.data for e in talk.of(Send))
    # ... and it all reaches the backend, partial line included.
    assert talk.call(talk.server.backend_ready(())).decode().startswith("235 ")
    assert talk.of(Splice) == [
        Splice(pending=b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
    ]


def test_input_while_lookup_outstanding_is_held() -> None:
    server = SmtpServer(session())
    server.start()
    events = server.receive_data(f"EHLO a\r\nAUTH PLAIN {plain_str('alice', 'nope')}\r\n".encode())
    assert isinstance(events[-1], Lookup)
    assert server.receive_data(b"NOOP\r\n") == []  # held, not answered before the 535
    after = server.resume(False)
    sent = b"".join(e.data for e in after if isinstance(e, Send))
    assert sent.startswith(b"535 ") and sent.endswith(b"250 2.0.0 OK\r\n")


# ==================================================================== STARTTLS


def test_starttls_discards_pipelined_input() -> None:
    """CVE-2011-0411: commands in the same read as STARTTLS must not run."""
    talk = driver(session(Security.NONE))
    ehlo(talk)
    injected = f"AUTH PLAIN {plain_str('alice', PASSWORDS['alice'])}\r\n"
    assert talk.send("STARTTLS\r\n" + injected).decode() == "220 2.0.0 Ready to start TLS\r\n"
    # The driver is told how much was thrown away, to log the attempt.
    assert talk.events[-1] == StartTLS(discarded=len(injected))
    # Plaintext arriving before the handshake is dropped too.
    assert talk.send("NOOP\r\n").decode() == ""
    assert talk.call(talk.server.tls_started()).decode() == ""
    assert talk.server.tls_active
    assert not talk.of(Lookup) and not talk.of(Authenticated)
    assert talk.say("NOOP").startswith("250 ")


def test_clean_starttls_discards_nothing() -> None:
    talk = driver(session(Security.NONE))
    ehlo(talk)
    talk.send("STARTTLS\r\n")
    assert talk.events[-1] == StartTLS(discarded=0)


def test_after_starttls_ehlo_again() -> None:
    talk = driver(session(Security.REQUIRE_SECURE_AUTH))
    assert auth_line(ehlo(talk)) == "AUTH CRAM-MD5 DIGEST-MD5 NTLM"
    talk.say("STARTTLS")
    talk.call(talk.server.tls_started())
    # RFC 3207 4.2: the EHLO from before the handshake is forgotten.
    assert talk.say(f"AUTH PLAIN {plain_str('alice', PASSWORDS['alice'])}").startswith("503 5.5.1 ")
    reply = ehlo(talk)
    assert "STARTTLS" not in keywords(reply)
    assert auth_line(reply) == "AUTH " + " ".join(DEFAULT_ORDER)
    assert talk.say(f"AUTH PLAIN {plain_str('alice', PASSWORDS['alice'])}").startswith("235 ")


@pytest.mark.parametrize(
    ("tls", "starttls", "line", "reply"),
    [
        (True, True, "STARTTLS", "503 5.5.1 "),
        (False, False, "STARTTLS", "502 5.5.1 "),
        (False, True, "STARTTLS now", "501 5.5.4 "),
    ],
)
def test_starttls_refused(tls: bool, starttls: bool, line: str, reply: str) -> None:
    talk = driver(session(tls=tls, starttls=starttls))
    ehlo(talk)
    assert talk.say(line).startswith(reply)
    assert not talk.of(StartTLS)


# ==================================================================== MAIL


@pytest.mark.parametrize(
    ("security", "reply"),
    [
        (Security.NONE, "530 5.7.0 Authentication required"),
        (Security.REQUIRE_SECURE_AUTH, "530 5.7.0 Authentication required"),
        (Security.REQUIRE_ENCRYPTED, "530 5.7.0 Must issue a STARTTLS command first"),
    ],
)
def test_mail_before_auth_on_submission(security: Security, reply: str) -> None:
    talk = driver(session(security))
    ehlo(talk)
    assert talk.say("MAIL FROM:<a@example.org>").startswith(reply)
    assert not talk.of(Splice)


def test_mail_before_helo() -> None:
    talk = driver(session(submission=False))
    assert talk.say("MAIL FROM:<a@example.org>").startswith("503 5.5.1 ")
    assert talk.say("MAIL <a@example.org>").startswith("503 5.5.1 ")


@pytest.mark.parametrize(
    ("verb", "security"), [("EHLO", Security.NONE), ("HELO", Security.REQUIRE_ENCRYPTED)]
)
def test_server_to_server_splices_at_mail(verb: str, security: Security) -> None:
    talk = driver(session(security, submission=False))
    talk.say(f"{verb} relay.example.net")
    talk.send("MAIL FROM:<a@example.org> BODY=8BITMIME\r\nRCPT TO:<b@example.org>\r\nDA")
    assert talk.of(Splice) == [
        Splice(
            pending=b"MAIL FROM:<a@example.org> BODY=8BITMIME\r\nRCPT TO:<b@example.org>\r\nDA",
            replay=(f"{verb} relay.example.net\r\n".encode(),),
        )
    ]
    with pytest.raises(ProtocolStateError):
        talk.server.receive_data(b"more")


def test_server_to_server_mail_syntax_checked() -> None:
    talk = driver(session(submission=False))
    ehlo(talk)
    assert talk.say("MAIL TO:<x>").startswith("501 5.5.4 ")
    assert not talk.of(Splice)


def test_server_to_server_auth_still_follows_policy() -> None:
    talk = driver(session(Security.REQUIRE_SECURE_AUTH, submission=False))
    ehlo(talk)
    assert talk.say(f"AUTH PLAIN {plain_str('alice', PASSWORDS['alice'])}").startswith(
        "538 5.7.11 "
    )


# ================================================================ relay mode


def relay_talk(**kwargs: Any) -> ServerDriver:
    talk = driver(session(relay=True, **kwargs))
    ehlo(talk)
    return talk


def test_relay_plain_initial_response() -> None:
    talk = relay_talk()
    assert talk.say(f"AUTH PLAIN {plain_str('alice', PASSWORDS['alice'])}") == ""
    message = f"\0alice\0{PASSWORDS['alice']}".encode()
    assert talk.of(RelayAuth) == [RelayAuth("PLAIN", message)]
    assert not talk.of(Lookup)
    talk.send("MAIL FROM:<a@example.org>\r\n")  # pipelined: held
    assert talk.call(talk.server.relay_result(True)).decode().startswith("235 2.7.0 ")
    assert talk.of(Splice) == [Splice(pending=b"MAIL FROM:<a@example.org>\r\n")]


@pytest.mark.parametrize(
    ("initial", "expected"), [("", NO_RESPONSE), (" =", b""), (" " + b64_str("alice"), b"alice")]
)
def test_relay_initial_response_forms(initial: str, expected: InitialResponse) -> None:
    talk = relay_talk()
    talk.say("AUTH LOGIN" + initial)
    assert talk.of(RelayAuth) == [RelayAuth("LOGIN", expected)]


def test_relay_challenges_and_responses() -> None:
    talk = relay_talk()
    talk.say("AUTH LOGIN")
    assert (
        talk.call(talk.server.relay_challenge(b"Username:")).decode()
        == f"334 {b64_str('Username:')}\r\n"
    )
    assert talk.say(b64_str("alice")) == ""
    assert (
        talk.call(talk.server.relay_challenge(b"Password:")).decode()
        == f"334 {b64_str('Password:')}\r\n"
    )
    assert talk.say(b64_str("bad")) == ""
    assert talk.of(RelayResponse) == [RelayResponse(b"alice"), RelayResponse(b"bad")]
    reply = talk.call(talk.server.relay_result(False, BackendFailure.INVALID_CREDENTIALS)).decode()
    assert reply.startswith("535 5.7.8 ")
    assert talk.of(AuthFailed) == [AuthFailed("LOGIN", "invalid-credentials", "alice")]


@pytest.mark.parametrize(
    ("answer", "reply", "reason"),
    [("*", "501 5.7.0 ", "cancelled"), ("@@@", "501 5.5.2 ", "malformed")],
)
def test_relay_client_abort_cancels_at_backend(answer: str, reply: str, reason: str) -> None:
    talk = relay_talk()
    talk.say("AUTH LOGIN")
    talk.call(talk.server.relay_challenge(b"Username:"))
    talk.say(answer)
    assert talk.of(RelayResponse) == [RelayResponse(None)]
    # Even a backend that says yes after a cancel is not believed.
    assert talk.call(talk.server.relay_result(True)).decode().startswith(reply)
    assert not talk.of(Splice)
    assert talk.of(AuthFailed)[0].reason == reason


@pytest.mark.parametrize(
    ("failure", "reply"),
    [
        # A refusal without a reason refuses the credentials, in every
        # dialect (the contract's relay_refusal_without_reason; was 454 here).
        (None, "535 5.7.8 "),
        (BackendFailure.UNAVAILABLE, "454 4.7.0 "),
        (BackendFailure.PASSWORD_EXPIRED, "535 5.7.8 Authentication credentials invalid: password"),
        (BackendFailure.REJECTED, "535 5.7.8 "),
    ],
)
def test_relay_backend_failures(failure: BackendFailure | None, reply: str) -> None:
    talk = relay_talk()
    talk.say(f"AUTH PLAIN {plain_str('alice', 'x')}")
    assert talk.call(talk.server.relay_result(False, failure)).decode().startswith(reply)
    assert talk.of(AuthFailed)[0].authcid == "alice"


def test_relay_still_refuses_by_policy() -> None:
    talk = relay_talk(security=Security.REQUIRE_SECURE_AUTH)
    assert talk.say(f"AUTH PLAIN {plain_str('alice', 'x')}").startswith("538 ")
    assert talk.say("AUTH PLAIN *").startswith("538 ")
    assert not talk.of(RelayAuth)


def test_relay_cancel_and_junk_in_initial_response_stay_local() -> None:
    talk = relay_talk()
    assert talk.say("AUTH PLAIN *").startswith("501 5.7.0 ")
    assert talk.say("AUTH PLAIN %%%").startswith("501 5.5.2 ")
    assert not talk.of(RelayAuth)


# ============================================================ driver misuse


# ======================================================== client vs server


def pump(
    client: SmtpClient,
    server: SmtpServer,
    *,
    backend: Callable[[SmtpServer], list[Event]] = lambda s: s.backend_ready(()),
) -> tuple[list[ClientEvent], list[Event]]:
    """Shuttle bytes between our client and our server until both rest."""
    client_events: list[ClientEvent] = []
    server_events: list[Event] = []
    to_server: list[Event] = list(server.start())
    to_client: list[ClientEvent] = []
    handshake = {"client": False, "server": False}
    for _ in range(200):
        while to_server:
            event = to_server.pop(0)
            server_events.append(event)
            if isinstance(event, Send):
                to_client += client.receive_data(event.data)
            elif isinstance(event, Lookup):
                to_server += server.resume(resolve(event.request))
            elif isinstance(event, Authenticated):
                to_server += backend(server)
            elif isinstance(event, StartTLS):
                handshake["server"] = True
        while to_client:
            cevent = to_client.pop(0)
            client_events.append(cevent)
            if isinstance(cevent, Send):
                to_server += server.receive_data(cevent.data)
            elif isinstance(cevent, Derive):  # PBKDF2: a worker thread, in the proxy
                to_client += client.derived(cevent.compute())
            elif isinstance(cevent, StartTLS):
                handshake["client"] = True
        if all(handshake.values()):
            handshake = {"client": False, "server": False}
            to_server += server.tls_started()
            to_client += client.tls_started()
        if not to_server and not to_client:
            return client_events, server_events
    raise AssertionError("conversation did not settle")


def client_settings(**kwargs: Any) -> ClientSettings:
    defaults: dict[str, Any] = {
        "hostname": "proxy.example",
        "credentials": ClientCredentials("alice", PASSWORDS["alice"]),
        "sasl_context": ClientContext(service="smtp", hostname=HOST),
    }
    return ClientSettings(**(defaults | kwargs))


def outcome(events: Sequence[ClientEvent]) -> LoggedIn | LoginFailed:
    final = [e for e in events if isinstance(e, LoggedIn | LoginFailed)]
    assert len(final) == 1
    return final[0]


@pytest.mark.parametrize("mechanism", [*DEFAULT_ORDER, "SCRAM-SHA-1", "SCRAM-SHA-256"])
def test_client_logs_in_to_server(mechanism: str) -> None:
    server = SmtpServer(session(Security.NONE, mechanisms=(mechanism,)))
    client = SmtpClient(client_settings(mechanisms=("X-NONE", mechanism)))
    client_events, server_events = pump(client, server)
    result = outcome(client_events)
    assert isinstance(result, LoggedIn)
    assert "PIPELINING" in result.capabilities and f"AUTH {mechanism}" in result.capabilities
    assert Authenticated("alice", "alice", mechanism) in server_events
    assert Splice() in server_events


@pytest.mark.parametrize("mechanism", ["PLAIN", "CRAM-MD5", "SCRAM-SHA-256"])
def test_client_wrong_password(mechanism: str) -> None:
    server = SmtpServer(session(Security.NONE, mechanisms=(mechanism,)))
    creds = ClientCredentials("alice", "not it")
    client_events, _ = pump(
        SmtpClient(client_settings(credentials=creds, mechanisms=(mechanism,))), server
    )
    result = outcome(client_events)
    assert isinstance(result, LoginFailed) and result.failure is BackendFailure.REJECTED
    assert "535" in result.detail and "not it" not in result.detail


def test_client_starttls_then_plain_under_secure_auth() -> None:
    server = SmtpServer(session(Security.REQUIRE_SECURE_AUTH))
    client = SmtpClient(client_settings(starttls=True, mechanisms=("PLAIN",)))
    client_events, server_events = pump(client, server)
    assert isinstance(outcome(client_events), LoggedIn)
    assert StartTLS() in client_events and StartTLS() in server_events
    assert server.tls_active


def test_client_no_common_mechanism() -> None:
    server = SmtpServer(session(Security.REQUIRE_SECURE_AUTH))  # no PLAIN without TLS
    client_events, _ = pump(SmtpClient(client_settings(mechanisms=("PLAIN",))), server)
    result = outcome(client_events)
    assert isinstance(result, LoginFailed) and result.failure is BackendFailure.REJECTED


def test_client_needs_starttls_offered() -> None:
    server = SmtpServer(session(starttls=False))
    client_events, _ = pump(SmtpClient(client_settings(starttls=True)), server)
    result = outcome(client_events)
    assert isinstance(result, LoginFailed) and result.failure is BackendFailure.UNAVAILABLE


def test_client_backend_temporary_failure() -> None:
    server = SmtpServer(session())
    client_events, _ = pump(
        SmtpClient(client_settings()),
        server,
        backend=lambda s: s.backend_failed(BackendFailure.UNAVAILABLE),
    )
    result = outcome(client_events)
    assert isinstance(result, LoginFailed) and result.failure is BackendFailure.UNAVAILABLE


# ============================================================ scripted backend


def fake_backend(settings: ClientSettings | None = None, **kwargs: Any) -> FakeBackend:
    """Feeds an SmtpClient canned backend bytes and records what it sends."""
    return FakeBackend(SmtpClient(settings or client_settings(**kwargs)))


EHLO_PLAIN = "250-backend.example\r\n250-PIPELINING\r\n250 AUTH PLAIN LOGIN\r\n"


def test_client_parses_multiline_and_bare_code() -> None:
    backend = fake_backend()
    assert backend.feed("220-backend.example ESMTP\r\n220\r\n") == b"EHLO proxy.example\r\n"
    sent = backend.feed("250-backend.example\r\n250-SIZE 1000\r\n250 AUTH=PLAIN\r\n")
    assert sent == f"AUTH PLAIN {plain_str('alice', PASSWORDS['alice'])}\r\n".encode()
    assert backend.feed("235 2.7.0 ok\r\n250 early\r\n") == b""
    assert backend.result() == LoggedIn(("SIZE 1000", "AUTH=PLAIN"), pending=b"250 early\r\n")
    with pytest.raises(ProtocolStateError):
        backend.client.receive_data(b"more")


@pytest.mark.parametrize(
    "greeting",
    [
        "554 5.3.2 go away\r\n",
        "hello there\r\n",
        "220-a\r\n250 b\r\n",  # code changes inside a reply
        "220x\r\n",
        "999 what\r\n",
        "220 ok\r\n250-b\r\n250 AUTH PLAIN\r\n",  # answers an EHLO not sent yet
    ],
)
def test_client_bad_greeting(greeting: str) -> None:
    backend = fake_backend()
    backend.feed(greeting)
    result = backend.result()
    assert isinstance(result, LoginFailed) and result.failure is BackendFailure.UNAVAILABLE


def test_client_reply_line_too_long() -> None:
    backend = fake_backend(max_line=100)
    backend.feed("220 " + "x" * 200)
    result = backend.result()
    assert isinstance(result, LoginFailed) and result.failure is BackendFailure.UNAVAILABLE


def test_client_starttls_discards_injected_replies() -> None:
    backend = fake_backend(starttls=True)
    backend.feed("220 backend\r\n")
    assert backend.feed("250-b\r\n250 STARTTLS\r\n") == b"STARTTLS\r\n"
    # The injected "250 AUTH" reply arrives with the 220: it must be ignored.
    assert backend.feed("220 go ahead\r\n250-fake\r\n250 AUTH PLAIN\r\n") == b""
    assert backend.events[-1] == StartTLS()
    assert backend.feed("250 more injection\r\n") == b""
    started = backend.client.tls_started()
    assert started == [Send(b"EHLO proxy.example\r\n")]
    assert backend.feed(EHLO_PLAIN).startswith(b"AUTH PLAIN ")


def test_client_login_mechanism_by_challenges() -> None:
    backend = fake_backend(mechanisms=("LOGIN",))
    backend.feed("220 b\r\n")
    assert backend.feed(EHLO_PLAIN) == b"AUTH LOGIN\r\n"
    assert backend.feed(f"334 {b64_str('Username:')}\r\n") == f"{b64_str('alice')}\r\n".encode()
    assert (
        backend.feed(f"334 {b64_str('Password:')}\r\n")
        == f"{b64_str(PASSWORDS['alice'])}\r\n".encode()
    )
    backend.feed("235 ok\r\n")
    assert isinstance(backend.result(), LoggedIn)


@pytest.mark.parametrize(
    ("reply", "failure"),
    [
        ("535 5.7.8 no\r\n", BackendFailure.REJECTED),
        ("454 4.7.0 later\r\n", BackendFailure.UNAVAILABLE),
        ("421 4.3.2 shutting down\r\n", BackendFailure.UNAVAILABLE),
        ("504 5.5.4 what\r\n", BackendFailure.REJECTED),
        ("250 odd\r\n", BackendFailure.UNAVAILABLE),
    ],
)
def test_client_auth_failures(reply: str, failure: BackendFailure) -> None:
    backend = fake_backend()
    backend.feed("220 b\r\n")
    backend.feed(EHLO_PLAIN)
    backend.feed(reply)
    result = backend.result()
    assert isinstance(result, LoginFailed) and result.failure is failure


def test_client_mechanism_error_cancels() -> None:
    # PLAIN does not expect a non-empty challenge after its initial response.
    backend = fake_backend()
    backend.feed("220 b\r\n")
    backend.feed(EHLO_PLAIN)
    assert backend.feed(f"334 {b64_str('surprise')}\r\n") == b"*\r\n"
    result = backend.result()
    assert isinstance(result, LoginFailed) and result.failure is BackendFailure.REJECTED


def test_client_bad_challenge_base64() -> None:
    backend = fake_backend(mechanisms=("LOGIN",))
    backend.feed("220 b\r\n")
    backend.feed(EHLO_PLAIN)
    assert backend.feed("334 ***\r\n") == b"*\r\n"
    result = backend.result()
    assert isinstance(result, LoginFailed) and result.failure is BackendFailure.UNAVAILABLE


def test_client_master_user_with_login_only_backend() -> None:
    # LOGIN cannot carry an authzid: the client must not log in as the master.
    creds = ClientCredentials("master", "secret", authzid="alice")
    backend = fake_backend(credentials=creds, mechanisms=("PLAIN", "LOGIN"))
    backend.feed("220 b\r\n")
    assert backend.feed("250-b\r\n250 AUTH LOGIN\r\n") == b""
    result = backend.result()
    assert isinstance(result, LoginFailed) and result.failure is BackendFailure.REJECTED


# ================================================================== XCLIENT


def test_xtext() -> None:
    assert xtext("a+b=c d\u00e9") == "a+2Bb+3Dc+20d+C3+A9"


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("192.0.2.7", "ADDR=192.0.2.7"),
        ("2001:db8::1", "ADDR=IPV6:2001:db8::1"),
        ("::ffff:192.0.2.7", "ADDR=192.0.2.7"),
        ("not an address", "ADDR=[UNAVAILABLE]"),
    ],
)
def test_xclient_addr_and_port(address: str, expected: str) -> None:
    backend = fake_backend(use_xclient=True, client_address=address, client_port=4711)
    backend.feed("220 b\r\n")
    sent = backend.feed("250-b\r\n250-XCLIENT NAME ADDR PORT HELO\r\n250 AUTH PLAIN\r\n")
    assert sent == f"XCLIENT {expected} PORT=4711\r\n".encode()
    assert backend.feed("220 b ESMTP\r\n") == b"EHLO proxy.example\r\n"
    # XCLIENT is sent once; the next EHLO goes straight to AUTH.
    assert backend.feed("250-b\r\n250-XCLIENT ADDR PORT\r\n250 AUTH PLAIN\r\n").startswith(
        b"AUTH PLAIN "
    )


def test_xclient_configured_but_not_offered_fails() -> None:
    # Never a silent fallback: the backend would see every client as authgate.
    backend = fake_backend(use_xclient=True, client_address="192.0.2.7")
    backend.feed("220 b\r\n")
    assert backend.feed(EHLO_PLAIN) == b""
    result = backend.result()
    assert isinstance(result, LoginFailed) and result.failure is BackendFailure.UNAVAILABLE
    assert "does not offer XCLIENT" in result.detail


@pytest.mark.parametrize("login", [None, "bob"])
def test_xclient_without_addr_is_refused(login: str | None) -> None:
    # An XCLIENT without ADDR would leave the backend trusting the client's
    # own XCLIENT after the splice: never send one.
    backend = fake_backend(
        credentials=None, use_xclient=True, client_address="192.0.2.7", xclient_login=login
    )
    backend.feed("220 b\r\n")
    assert backend.feed("250-b\r\n250 XCLIENT NAME LOGIN PORT\r\n") == b""
    result = backend.result()
    assert isinstance(result, LoginFailed) and "lacks ADDR" in result.detail


def test_xclient_login_always_carries_addr() -> None:
    # Terminate mode without client_address forwarding still sends ADDR=.
    backend = fake_backend(
        credentials=None, client_address="192.0.2.9", client_port=25000, xclient_login="bob"
    )
    backend.feed("220 b\r\n")
    sent = backend.feed("250-b\r\n250 XCLIENT ADDR PORT LOGIN\r\n")
    assert sent == b"XCLIENT ADDR=192.0.2.9 PORT=25000 LOGIN=bob\r\n"


def test_xclient_login_without_credentials() -> None:
    backend = fake_backend(
        credentials=None,
        use_xclient=True,
        client_address="192.0.2.7",
        xclient_login="bob+x=y",
    )
    backend.feed("220 b\r\n")
    sent = backend.feed("250-b\r\n250 XCLIENT ADDR LOGIN\r\n")
    assert sent == b"XCLIENT ADDR=192.0.2.7 LOGIN=bob+2Bx+3Dy\r\n"
    assert backend.feed("220 b\r\n") == b"EHLO proxy.example\r\n"
    assert backend.feed("250-b\r\n250-PIPELINING\r\n250 AUTH PLAIN\r\n") == b""
    assert backend.result() == LoggedIn(("PIPELINING", "AUTH PLAIN"))


@pytest.mark.parametrize(
    ("ehlo_reply", "xclient_reply", "failure"),
    [
        ("250-b\r\n250 AUTH PLAIN\r\n", None, BackendFailure.REJECTED),  # no XCLIENT
        ("250-b\r\n250 XCLIENT ADDR\r\n", None, BackendFailure.REJECTED),  # no LOGIN
        ("250-b\r\n250 XCLIENT LOGIN\r\n", None, BackendFailure.REJECTED),  # no ADDR
        (
            "250-b\r\n250 XCLIENT ADDR LOGIN\r\n",
            "550 5.7.0 not authorized\r\n",
            BackendFailure.REJECTED,
        ),
        ("250-b\r\n250 XCLIENT ADDR LOGIN\r\n", "421 4.7.0 busy\r\n", BackendFailure.UNAVAILABLE),
    ],
)
def test_xclient_login_failures(
    ehlo_reply: str, xclient_reply: str | None, failure: BackendFailure
) -> None:
    backend = fake_backend(credentials=None, xclient_login="bob")
    backend.feed("220 b\r\n")
    backend.feed(ehlo_reply)
    if xclient_reply is not None:
        backend.feed(xclient_reply)
    result = backend.result()
    assert isinstance(result, LoginFailed) and result.failure is failure


# ---------------------------------------------------------- pass-through


PASSTHROUGH_EHLO = (
    "250-b\r\n250-XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN\r\n250 CHUNKING\r\n"
)


@pytest.mark.parametrize(
    ("replay", "expected"),
    [
        (b"EHLO mx.example.net\r\n", "HELO=mx.example.net PROTO=ESMTP"),
        (b"HELO [192.0.2.1]\r\n", "HELO=[192.0.2.1] PROTO=SMTP"),
        # xtext: "+" and "=" and non-ASCII octets are encoded.
        (b"EHLO a+b=c\xc3\xa9\r\n", "HELO=a+2Bb+3Dc+C3+A9 PROTO=ESMTP"),
        # XCLIENT_README: HELO values are at most 255 characters.
        (b"EHLO " + b"h" * 256 + b"\r\n", "HELO=[UNAVAILABLE] PROTO=ESMTP"),
    ],
)
def test_passthrough_xclient_then_replay(replay: bytes, expected: str) -> None:
    backend = fake_backend(
        credentials=None,
        relay=False,
        use_xclient=True,
        client_address="192.0.2.7",
        client_port=40000,
        replay=(replay,),
    )
    assert backend.feed("220 b\r\n") == b"EHLO proxy.example\r\n"
    sent = backend.feed(PASSTHROUGH_EHLO)
    assert sent == f"XCLIENT ADDR=192.0.2.7 PORT=40000 NAME=[UNAVAILABLE] {expected}\r\n".encode()
    assert len(sent) <= 512  # XCLIENT_README: within SMTP's command line limit
    # XCLIENT's 220 is answered with the client's own EHLO/HELO, not ours.
    assert backend.feed("220 b ESMTP\r\n") == replay
    assert backend.feed("250-b\r\n250-PIPELINING\r\n250 CHUNKING\r\n") == b""
    expected_keywords = (
        ("PIPELINING", "CHUNKING") if replay.startswith(b"EHLO") else backend_keywords()
    )
    assert backend.result() == LoggedIn(expected_keywords)


def backend_keywords() -> tuple[str, ...]:
    return tuple(line[4:] for line in PASSTHROUGH_EHLO.splitlines()[1:])


@pytest.mark.parametrize(
    ("ehlo", "xclient", "detail"),
    [
        ("250-b\r\n250 PIPELINING\r\n", None, "does not offer XCLIENT"),
        ("250-b\r\n250 XCLIENT NAME HELO\r\n", None, "lacks ADDR"),
        (PASSTHROUGH_EHLO, "550 5.7.0 Error: insufficient authorization\r\n", "XCLIENT: 550"),
    ],
)
def test_passthrough_without_xclient_fails(ehlo: str, xclient: str | None, detail: str) -> None:
    backend = fake_backend(
        credentials=None,
        relay=False,
        use_xclient=True,
        client_address="192.0.2.7",
        replay=(b"EHLO mx.example.net\r\n",),
    )
    backend.feed("220 b\r\n")
    backend.feed(ehlo)
    if xclient is not None:
        backend.feed(xclient)
    result = backend.result()
    assert isinstance(result, LoginFailed) and detail in result.detail


def test_passthrough_without_forwarding_replays_at_once() -> None:
    # PROXY v2 (written by the driver) or no forwarding: no EHLO of ours.
    backend = fake_backend(credentials=None, relay=False, replay=(b"EHLO mx.example.net\r\n",))
    assert backend.feed("220 b\r\n") == b"EHLO mx.example.net\r\n"
    assert backend.feed("250-b\r\n250 SIZE 100\r\nleft") == b""
    assert backend.result() == LoggedIn(("SIZE 100",), pending=b"left")


def test_passthrough_replay_refused() -> None:
    backend = fake_backend(credentials=None, relay=False, replay=(b"HELO x\r\n",))
    backend.feed("220 b\r\n")
    backend.feed("554 5.7.1 go away\r\n")
    result = backend.result()
    assert isinstance(result, LoginFailed) and result.failure is BackendFailure.UNAVAILABLE


def test_no_credentials_and_no_xclient_login() -> None:
    backend = fake_backend(credentials=None)
    backend.feed("220 b\r\n")
    backend.feed(EHLO_PLAIN)
    result = backend.result()
    assert isinstance(result, LoginFailed) and result.failure is BackendFailure.REJECTED


# ============================================================ relay client


def relay_backend() -> FakeBackend:
    return fake_backend(relay=True, credentials=None)


def test_relay_client_queues_authenticate_until_ready() -> None:
    backend = relay_backend()
    assert backend.client.authenticate("login", NO_RESPONSE) == []
    backend.feed("220 b\r\n")
    assert backend.feed(EHLO_PLAIN) == b"AUTH LOGIN\r\n"
    assert backend.feed(f"334 {b64_str('Username:')}\r\n") == b""
    assert backend.events[-1] == RelayChallenge(b"Username:")
    assert backend.client.respond(b"alice") == [Send(f"{b64_str('alice')}\r\n".encode())]
    backend.feed(f"334 {b64_str('Password:')}\r\n")
    assert backend.client.respond(None) == [Send(b"*\r\n")]
    backend.feed("501 5.7.0 cancelled\r\n")
    result = backend.result()
    assert isinstance(result, LoginFailed) and result.failure is BackendFailure.REJECTED


@pytest.mark.parametrize(
    ("initial", "line"),
    [
        (b"", "AUTH PLAIN ="),
        (b"\0alice\0pw", f"AUTH PLAIN {b64_str(chr(0) + 'alice' + chr(0) + 'pw')}"),
    ],
)
def test_relay_client_initial_response(initial: bytes, line: str) -> None:
    backend = relay_backend()
    backend.feed("220 b\r\n")
    assert backend.feed(EHLO_PLAIN) == b""
    assert backend.client.authenticate("PLAIN", initial) == [Send(line.encode() + b"\r\n")]


@pytest.mark.parametrize("size", [10000, 400])
def test_relay_client_long_initial_response_waits_for_empty_challenge(size: int) -> None:
    """Past RFC 5321's 512-octet command line (CRLF included) the initial
    response answers the empty challenge: 400 octets are 536 in base64,
    10000 are past even RFC 4954's 12288-octet AUTH line."""
    backend = relay_backend()
    backend.feed("220 b\r\n")
    backend.feed(EHLO_PLAIN)
    big = b"x" * size
    assert backend.client.authenticate("PLAIN", big) == [Send(b"AUTH PLAIN\r\n")]
    assert backend.feed("334 \r\n") == base64.b64encode(big) + b"\r\n"
    assert not any(isinstance(e, RelayChallenge) for e in backend.events)


def test_relay_client_auth_line_boundary_is_512_octets() -> None:
    backend = relay_backend()
    backend.feed("220 b\r\n")
    backend.feed(EHLO_PLAIN)
    fits = b"x" * 375  # "AUTH PLAIN " + 500 base64 octets + CRLF = 513
    assert len(b"AUTH PLAIN " + base64.b64encode(fits) + b"\r\n") == 513
    assert backend.client.authenticate("PLAIN", fits) == [Send(b"AUTH PLAIN\r\n")]
    fits = b"x" * 372  # 496 base64 octets: 509 in all
    backend = relay_backend()
    backend.feed("220 b\r\n")
    backend.feed(EHLO_PLAIN)
    line = b"AUTH PLAIN " + base64.b64encode(fits) + b"\r\n"
    assert backend.client.authenticate("PLAIN", fits) == [Send(line)]


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("235 2.7.0 ok\r\n", LoggedIn(("PIPELINING", "AUTH PLAIN LOGIN"))),
        ("535 5.7.8 no\r\n", BackendFailure.INVALID_CREDENTIALS),
        ("454 4.7.0 later\r\n", BackendFailure.UNAVAILABLE),
        ("534 5.7.9 weak\r\n", BackendFailure.REJECTED),
    ],
)
def test_relay_client_results(reply: str, expected: LoggedIn | BackendFailure) -> None:
    backend = relay_backend()
    backend.feed("220 b\r\n")
    backend.feed(EHLO_PLAIN)
    backend.client.authenticate("PLAIN", b"\0alice\0pw")
    backend.feed(reply)
    result = backend.result()
    if isinstance(expected, LoggedIn):
        assert result == expected
    else:
        assert isinstance(result, LoginFailed) and result.failure is expected


def test_relay_client_unsolicited_reply() -> None:
    backend = relay_backend()
    backend.feed("220 b\r\n")
    backend.feed(EHLO_PLAIN)
    backend.feed("421 4.3.2 bye\r\n")
    result = backend.result()
    assert isinstance(result, LoginFailed) and result.failure is BackendFailure.UNAVAILABLE


def test_client_misuse_raises() -> None:
    terminate = SmtpClient(client_settings())
    with pytest.raises(ProtocolStateError):
        terminate.authenticate("PLAIN", b"x")
    with pytest.raises(ProtocolStateError):
        terminate.respond(b"x")
    with pytest.raises(ProtocolStateError):
        terminate.tls_started()
    relay = SmtpClient(client_settings(relay=True))
    relay.authenticate("PLAIN", b"x")
    with pytest.raises(ProtocolStateError):
        relay.authenticate("PLAIN", b"x")


# =========================================== relay end to end: four machines


def relay_chain(mechanism: str, password: str) -> tuple[list[ClientEvent], list[Event]]:
    """mail client -> authgate server (relay) -> authgate client (relay) ->
    backend server (verifies). Returns the mail client's and authgate
    server's events."""
    mail_client = SmtpClient(
        client_settings(mechanisms=(mechanism,), credentials=ClientCredentials("alice", password))
    )
    gate_server = SmtpServer(session(relay=True, mechanisms=(mechanism,)))
    gate_client = SmtpClient(client_settings(relay=True, credentials=None))
    backend = SmtpServer(session(mechanisms=(mechanism,)))

    mail_events: list[ClientEvent] = []
    gate_events: list[Event] = []
    queue: list[tuple[str, Any]] = [("gate", e) for e in gate_server.start()]
    queue += [("backend", e) for e in backend.start()]
    for _ in range(500):
        if not queue:
            return mail_events, gate_events
        source, event = queue.pop(0)
        if source == "mail":
            mail_events.append(event)
            if isinstance(event, Derive):
                queue += [("mail", e) for e in mail_client.derived(event.compute())]
            elif isinstance(event, Send):
                queue += [("gate", e) for e in gate_server.receive_data(event.data)]
        elif source == "gate":
            gate_events.append(event)
            if isinstance(event, Send):
                queue += [("mail", e) for e in mail_client.receive_data(event.data)]
            elif isinstance(event, RelayAuth):
                queue += [
                    ("gclient", e) for e in gate_client.authenticate(event.mechanism, event.initial)
                ]
            elif isinstance(event, RelayResponse):
                queue += [("gclient", e) for e in gate_client.respond(event.data)]
        elif source == "gclient":
            if isinstance(event, Send):
                queue += [("backend", e) for e in backend.receive_data(event.data)]
            elif isinstance(event, RelayChallenge):
                queue += [("gate", e) for e in gate_server.relay_challenge(event.data)]
            elif isinstance(event, LoggedIn):
                queue += [("gate", e) for e in gate_server.relay_result(True)]
            elif isinstance(event, LoginFailed):
                queue += [("gate", e) for e in gate_server.relay_result(False, event.failure)]
        else:  # backend
            if isinstance(event, Send):
                queue += [("gclient", e) for e in gate_client.receive_data(event.data)]
            elif isinstance(event, Lookup):
                queue += [("backend", e) for e in backend.resume(resolve(event.request))]
            elif isinstance(event, Authenticated):
                queue += [("backend", e) for e in backend.backend_ready(())]
    raise AssertionError("relay chain did not settle")


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256"])
def test_relay_end_to_end(mechanism: str) -> None:
    mail_events, gate_events = relay_chain(mechanism, PASSWORDS["alice"])
    assert isinstance(outcome(mail_events), LoggedIn)
    assert Splice() in gate_events
    mail_events, gate_events = relay_chain(mechanism, "wrong")
    result = outcome(mail_events)
    assert isinstance(result, LoginFailed) and "535 5.7.8" in result.detail
    assert [e.reason for e in gate_events if isinstance(e, AuthFailed)] == ["invalid-credentials"]


# ================================================================ hypothesis

COMMAND_LINES = st.sampled_from(
    [
        b"EHLO a",
        b"HELO b",
        b"STARTTLS",
        b"AUTH PLAIN",
        b"AUTH LOGIN",
        b"AUTH CRAM-MD5",
        b"AUTH SCRAM-SHA-256",
        b"AUTH PLAIN " + plain_str("alice", PASSWORDS["alice"]).encode(),
        b"AUTH PLAIN =",
        b"AUTH PLAIN *",
        b"*",
        b"",
        b"YWxpY2U=",
        b"MAIL FROM:<a@b>",
        b"RCPT TO:<c@d>",
        b"NOOP",
        b"QUIT",
        b"\xff\xfe\x00",
    ]
)
LINES = st.one_of(COMMAND_LINES, st.binary(max_size=80))


@settings(max_examples=300, deadline=None)
@given(
    lines=st.lists(LINES, max_size=30),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=10),
    relay=st.booleans(),
    submission=st.booleans(),
    security=st.sampled_from(list(Security)),
)
def test_server_survives_random_input(
    lines: list[bytes], cuts: list[int], relay: bool, submission: bool, security: Security
) -> None:
    talk = driver(session(security, relay=relay, submission=submission, max_line=200, max_errors=5))
    stream = b"".join(line + b"\r\n" for line in lines)
    bounds = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    for start, end in itertools.pairwise(bounds):
        if talk.closed or talk.of(Splice):
            break
        seen = len(talk.events)
        talk.send(stream[start:end])
        # Answer whatever the machine now waits for, like a driver would.
        while len(talk.events) > seen:
            seen = len(talk.events)
            last = talk.events[-1]
            if isinstance(last, StartTLS):
                talk.call(talk.server.tls_started())
            elif isinstance(last, RelayAuth | RelayResponse):
                talk.call(talk.server.relay_result(False, BackendFailure.INVALID_CREDENTIALS))
    assert all(isinstance(e, SERVER_EVENTS) for e in talk.events)
    if not (talk.closed or talk.of(Splice)):
        # Still alive, and nothing outstanding: another line gets a reaction.
        before = len(talk.events)
        talk.send("NOOP\r\n")
        assert len(talk.events) > before


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.binary(max_size=60), max_size=20), relay=st.booleans())
def test_client_survives_random_backend_bytes(chunks: list[bytes], relay: bool) -> None:
    client = SmtpClient(client_settings(relay=relay, max_line=120))
    done = False
    for chunk in chunks:
        events = client.receive_data(chunk)
        assert all(isinstance(e, CLIENT_EVENTS) for e in events)
        for event in events:
            if isinstance(event, StartTLS):
                client.tls_started()
            if isinstance(event, Derive):
                client.derived(event.compute())
            done = done or isinstance(event, LoggedIn)
        if done:
            break


@settings(max_examples=200, deadline=None)
@given(
    replies=st.lists(
        st.sampled_from(
            [
                "220 b\r\n",
                "250-b\r\n250 AUTH PLAIN\r\n",
                "250 b\r\n",
                "334 \r\n",
                "334 ZZ\r\n",
                "235 ok\r\n",
                "535 no\r\n",
                "220-x\r\n",
                "220\r\n",
                "xyz\r\n",
                "454 later\r\n",
            ]
        ),
        max_size=12,
    )
)
def test_client_survives_random_replies(replies: list[str]) -> None:
    client = SmtpClient(client_settings())
    for reply in replies:
        events = client.receive_data(reply.encode())
        assert all(isinstance(e, CLIENT_EVENTS) for e in events)
        if any(isinstance(e, LoggedIn | LoginFailed) for e in events):
            break


# ================================================================ password length

LONG_PASSWORD = "é" * 513  # 1,026 octets of UTF-8: over the 1,024 cap


@pytest.mark.parametrize(
    "lines",
    [
        [f"AUTH PLAIN {plain_str('alice', LONG_PASSWORD)}"],
        ["AUTH LOGIN", b64_str("alice"), b64_str(LONG_PASSWORD)],
    ],
    ids=["plain", "login"],
)
def test_password_over_the_cap_is_refused_without_a_lookup(lines: list[str]) -> None:
    talk = driver(session())
    ehlo(talk)
    replies = [talk.say(line) for line in lines]
    assert replies[-1] == "501 5.5.4 Password too long (at most 1024 octets)\r\n"
    assert talk.of(Lookup) == []
    assert [e.reason for e in talk.of(AuthFailed)] == [FailureReason.TOO_LONG.value]
    assert talk.say(f"AUTH PLAIN {plain_str('alice', PASSWORDS['alice'])}").startswith("235 ")


def test_the_stores_name_for_the_user_is_the_session() -> None:
    for valid in (True, False):
        server = SmtpServer(session())
        server.start()
        server.receive_data(b"EHLO c\r\n")
        server.receive_data(f"AUTH PLAIN {plain_str('ALICE', 'pw')}\r\n".encode())
        events = server.resume(PasswordVerdict(valid, "alice"))
        if valid:
            assert [e for e in events if isinstance(e, Authenticated)] == [
                Authenticated("alice", "alice", "PLAIN")
            ]
        else:
            assert [e.authcid for e in events if isinstance(e, AuthFailed)] == ["alice"]
