"""IMAP machines (authgate.protocols.imap): server replies under each policy,
refusal and failure codes, literals, pipelining, STARTTLS injection, relay
mode, the backend client, and client-against-server round trips."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest
from hypothesis import example, given, settings
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
from authgate.protocols.common import plain_message
from authgate.protocols.imap import ImapClient, ImapServer
from authgate.sasl.base import (
    MAX_PASSWORD_OCTETS,
    NO_RESPONSE,
    ClientContext,
    ClientCredentials,
    Derive,
    Failure,
    FailureReason,
    Lookup,
    PasswordCheck,
    PasswordVerdict,
    ServerContext,
    Success,
)
from authgate.testing.kit import (
    BackendAnswer,
    FakeBackend,
    ServerDriver,
    Store,
    b64,
    backend_ready,
    resolve,
)

ALL_MECHS = ("CRAM-MD5", "DIGEST-MD5", "NTLM", "LOGIN", "PLAIN")
BACKEND_CAPS = ("IMAP4rev1", "IDLE", "NAMESPACE")
CLIENT_IP = "192.0.2.7"
READY = backend_ready(BACKEND_CAPS)


TLS_BINDING = b"tls-binding"  # the tls-server-end-point data of the pretend TLS session


def session(
    security: Security = Security.NONE,
    mechanisms: Sequence[str] = ALL_MECHS,
    *,
    exempt: Sequence[str] = (),
    verifiable: Sequence[str] | None = None,
    **kwargs: Any,
) -> SessionSettings:
    listener = ListenerPolicy(
        Protocol.IMAP, security, tuple(mechanisms), ExemptNetworks.parse(exempt)
    )

    def decide_for(tls: bool) -> Any:
        return decide(listener, CLIENT_IP, tls=tls, verifiable=verifiable)

    def context_for(tls: bool) -> ServerContext:
        # As the proxy's session does: binding data only with -PLUS offered.
        binds = tls and decide_for(tls).binds_channel
        return ServerContext(
            channel_binding=("tls-server-end-point", TLS_BINDING) if binds else None
        )

    kwargs.setdefault("starttls_available", True)
    kwargs.setdefault("sasl_context", context_for)
    return SessionSettings(hostname="mail.example", decide=decide_for, **kwargs)


def harness(
    settings: SessionSettings,
    *,
    lookups: bool = True,
    tls: bool = False,
    backend: BackendAnswer | None = READY,
) -> ServerDriver:
    """Drives one ImapServer like the proxy would: lookups answered from the
    kit's store, backend logins with BACKEND_CAPS (unless told not to)."""
    return ServerDriver(ImapServer(settings), lookups=lookups, tls=tls, backend=backend)


def capabilities(reply: bytes) -> set[str]:
    """The capability atoms of a greeting or a CAPABILITY reply."""
    for line in reply.split(b"\r\n"):
        if line.startswith(b"* OK [CAPABILITY "):
            return set(line[len(b"* OK [CAPABILITY ") :].split(b"]")[0].decode().split())
        if line.startswith(b"* CAPABILITY "):
            return set(line[len(b"* CAPABILITY ") :].decode().split())
    raise AssertionError(f"no capabilities in {reply!r}")


# ------------------------------------------------------------ capabilities


def test_greeting_names_host_and_capabilities() -> None:
    h = harness(session())
    assert h.greeting.startswith(b"* OK [CAPABILITY IMAP4rev1 ")
    assert h.greeting.endswith(b"] mail.example authgate ready\r\n")
    assert capabilities(h.greeting) == {
        "IMAP4rev1",
        "SASL-IR",
        "LITERAL+",
        "ID",
        "STARTTLS",
        *(f"AUTH={m}" for m in ALL_MECHS),
    }


def test_mechanisms_are_listed_in_the_admins_order() -> None:
    h = harness(session(mechanisms=("PLAIN", "CRAM-MD5", "LOGIN")))
    caps = h.send(b"a CAPABILITY\r\n").split(b"\r\n")[0].split()
    assert [c for c in caps if c.startswith(b"AUTH=")] == [
        b"AUTH=PLAIN",
        b"AUTH=CRAM-MD5",
        b"AUTH=LOGIN",
    ]


@pytest.mark.parametrize(
    ("security", "tls", "exempt", "expected_auth", "logindisabled", "starttls"),
    [
        (Security.NONE, False, (), set(ALL_MECHS), False, True),
        (Security.REQUIRE_SECURE_AUTH, False, (), {"CRAM-MD5", "DIGEST-MD5", "NTLM"}, True, True),
        (Security.REQUIRE_SECURE_AUTH, True, (), set(ALL_MECHS), False, False),
        (Security.REQUIRE_ENCRYPTED, False, (), set(), True, True),
        (Security.REQUIRE_ENCRYPTED, True, (), set(ALL_MECHS), False, False),
        (Security.REQUIRE_SECURE_AUTH, False, ("192.0.2.0/24",), set(ALL_MECHS), False, True),
        (Security.REQUIRE_ENCRYPTED, False, ("192.0.2.0/24",), set(ALL_MECHS), False, True),
        (Security.REQUIRE_ENCRYPTED, False, ("198.51.100.0/24",), set(), True, True),
    ],
)
def test_capability_list_under_each_policy(
    security: Security,
    tls: bool,
    exempt: tuple[str, ...],
    expected_auth: set[str],
    logindisabled: bool,
    starttls: bool,
) -> None:
    h = harness(session(security, exempt=exempt, tls_active=tls))
    replies = (h.greeting, h.send(b"t1 CAPABILITY\r\n"))
    for reply in replies:
        caps = capabilities(reply)
        assert {c[5:] for c in caps if c.startswith("AUTH=")} == expected_auth
        assert ("LOGINDISABLED" in caps) is logindisabled
        assert ("STARTTLS" in caps) is starttls
        assert {"IMAP4rev1", "SASL-IR", "ID", "LITERAL+"} <= caps
    assert h.out == b"".join(replies)  # nothing else was sent


def test_capabilities_change_after_starttls() -> None:
    h = harness(session(Security.REQUIRE_SECURE_AUTH), tls=True)
    before = capabilities(h.greeting)
    assert h.send(b"s STARTTLS\r\n") == b"s OK Begin TLS negotiation now\r\n"
    assert h.server.tls_active
    after = capabilities(h.send(b"c CAPABILITY\r\n"))
    assert "STARTTLS" in before and "STARTTLS" not in after
    assert "LOGINDISABLED" in before and "LOGINDISABLED" not in after
    assert "AUTH=PLAIN" not in before and "AUTH=PLAIN" in after


def test_no_starttls_when_the_listener_cannot() -> None:
    h = harness(session(starttls_available=False))
    assert "STARTTLS" not in capabilities(h.greeting)
    assert h.send(b"s STARTTLS\r\n") == b"s BAD STARTTLS is not available\r\n"
    assert not h.of(StartTLS)


def test_starttls_twice_is_refused() -> None:
    h = harness(session(), tls=True)
    h.send(b"s STARTTLS\r\n")
    assert h.send(b"s2 STARTTLS\r\n") == b"s2 BAD TLS is already active\r\n"
    assert len(h.of(StartTLS)) == 1


def test_only_challenge_response_mechanisms_disable_login_even_in_tls() -> None:
    h = harness(session(mechanisms=("CRAM-MD5", "NTLM"), tls_active=True))
    assert "LOGINDISABLED" in capabilities(h.greeting)
    assert h.send(b"l LOGIN alice x\r\n") == b"l NO [CANNOT] LOGIN is disabled\r\n"


# ------------------------------------------------------------ simple commands


def test_noop_id_and_logout() -> None:
    h = harness(session())
    assert h.send(b"a NOOP\r\n") == b"a OK NOOP completed\r\n"
    assert h.send(b'b ID ("name" "Thunderbird" "version" NIL)\r\n') == (
        b'* ID ("name" "authgate")\r\nb OK ID completed\r\n'
    )
    assert h.send(b"c id nil\r\n").endswith(b"c OK ID completed\r\n")
    assert h.send(b"d LOGOUT\r\n") == b"* BYE Logging out\r\nd OK LOGOUT completed\r\n"
    assert h.closed
    assert h.send(b"e NOOP\r\n") == b""  # nothing after Close


@pytest.mark.parametrize(
    "line",
    [b'x ID ("name")', b"x ID", b'x ID "name" "v"', b"x ID (name value)", b'x ID ("a" "b"'],
)
def test_malformed_id_is_bad(line: bytes) -> None:
    h = harness(session())
    assert h.send(line + b"\r\n") == b"x BAD Syntax error in arguments\r\n"


def test_commands_are_case_insensitive_and_bare_lf_is_accepted() -> None:
    h = harness(session())
    assert h.send(b"a noop\n") == b"a OK NOOP completed\r\n"
    assert h.send(b"b Capability\r\n").startswith(b"* CAPABILITY IMAP4rev1")


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"", b"* BAD Missing or invalid tag\r\n"),
        (b"+x NOOP", b"* BAD Missing or invalid tag\r\n"),
        (b"a*b NOOP", b"* BAD Missing or invalid tag\r\n"),
        (b'"a" NOOP', b"* BAD Missing or invalid tag\r\n"),
        (b"a SELECT INBOX", b"a BAD Unknown command or not valid now\r\n"),
        (b"a ENABLE UTF8=ACCEPT", b"a BAD Unknown command or not valid now\r\n"),
        (b"a NOOP extra", b"a BAD Syntax error in arguments\r\n"),
        (b"a LOGIN onlyuser", b"a BAD Syntax error in arguments\r\n"),
        (b'a LOGIN "unterminated pw', b"a BAD Syntax error in arguments\r\n"),
        (b'a LOGIN u "bad\\escape"', b"a BAD Syntax error in arguments\r\n"),
        (b"a AUTHENTICATE", b"a BAD Syntax error in arguments\r\n"),
        (b'a AUTHENTICATE "PLAIN"', b"a BAD Syntax error in arguments\r\n"),
        (b"a AUTHENTICATE PL@IN", b"a BAD Syntax error in arguments\r\n"),
    ],
)
def test_bad_commands(line: bytes, reply: bytes) -> None:
    h = harness(session())
    assert h.send(line + b"\r\n") == reply
    assert not h.closed


@pytest.mark.parametrize("tag", [b"A0001", b"1", b"1.17", b"x_y-Z9"])
def test_plain_tags_are_echoed(tag: bytes) -> None:
    h = harness(session())
    assert h.send(tag + b" NOOP\r\n") == tag + b" OK NOOP completed\r\n"


@pytest.mark.parametrize("tag", [b"a]1", b"Host:", b"<script>alert`1`</script>", b"a'b", b"a&b", b"a/b"])
def test_tags_that_could_reflect_html_are_not_echoed(tag: bytes) -> None:
    """RFC 9051 allows these tags; echoing them would let a browser's request
    to this port reflect attacker-chosen HTML (ALPACA). Deliberately refused."""
    h = harness(session())
    assert h.send(tag + b" NOOP\r\n") == b"* BAD Missing or invalid tag\r\n"


# ------------------------------------------------------------ limits


def test_too_many_errors_say_bye_and_close() -> None:
    h = harness(session(max_errors=3))
    h.send(b"a FOO\r\nb BAR\r\n")
    assert not h.closed
    reply = h.send(b"c BAZ\r\nd NOOP\r\n")
    assert reply == b"c BAD Unknown command or not valid now\r\n* BYE Too many errors\r\n"
    assert h.closed
    assert h.send(b"e NOOP\r\n") == b""


def test_failed_logins_count_as_errors() -> None:
    h = harness(session(max_errors=2))
    h.send(b"a LOGIN alice wrong\r\n")
    reply = h.send(b"b LOGIN alice wrong2\r\n")
    assert reply.endswith(b"* BYE Too many errors\r\n")
    assert len(h.of(AuthFailed)) == 2
    assert h.closed


def test_line_too_long_says_bye_and_closes() -> None:
    h = harness(session(max_line=64))
    reply = h.send(b"a LOGIN alice " + b"x" * 100 + b"\r\nb NOOP\r\n")
    assert reply == b"* BYE Line too long\r\n"
    assert h.closed


def test_line_too_long_without_newline_closes_early() -> None:
    h = harness(session(max_line=64))
    assert h.send(b"a" * 70) == b"* BYE Line too long\r\n"
    assert h.closed


def test_too_many_commands_before_login() -> None:
    h = harness(session(max_commands=3))
    reply = h.send(b"a NOOP\r\nb NOOP\r\nc NOOP\r\nd NOOP\r\ne NOOP\r\n")
    assert reply.count(b"OK NOOP") == 3
    assert reply.endswith(b"* BYE Too many commands before login\r\n")
    assert h.closed


# ------------------------------------------------------------ LOGIN


def test_login_success_then_splice_with_pipelined_commands() -> None:
    h = harness(session())
    reply = h.send(b'a1 LOGIN alice "correct horse"\r\na2 SELECT INBOX\r\na3 IDLE\r\n')
    assert reply == b"a1 OK [CAPABILITY IMAP4rev1 IDLE NAMESPACE] Logged in\r\n"
    (auth,) = h.of(Authenticated)
    assert auth == Authenticated("alice", "alice", "LOGIN-COMMAND")
    assert h.of(Splice) == [Splice(b"a2 SELECT INBOX\r\na3 IDLE\r\n")]
    assert not h.of(AuthFailed)
    # The checked password travelled in a Lookup only.
    (lookup,) = h.of(Lookup)
    assert lookup.request == PasswordCheck("alice", "correct horse")


def test_login_with_escapes_in_quoted_password() -> None:
    h = harness(session())
    reply = h.send(b'a1 LOGIN "bob" "pa\\"ss\\\\word"\r\n')
    assert reply.startswith(b"a1 OK ")


def test_login_wrong_password() -> None:
    h = harness(session())
    reply = h.send(b"a1 LOGIN alice wrong\r\n")
    assert reply == b"a1 NO [AUTHENTICATIONFAILED] Authentication failed\r\n"
    assert h.of(AuthFailed) == [AuthFailed("LOGIN-COMMAND", "invalid-credentials", "alice")]
    assert b"wrong" not in reply
    assert h.send(b"a2 NOOP\r\n") == b"a2 OK NOOP completed\r\n"


def test_login_empty_password_fails_without_a_lookup() -> None:
    h = harness(session())
    assert h.send(b'a1 LOGIN alice ""\r\n').startswith(b"a1 NO [AUTHENTICATIONFAILED]")
    assert not h.of(Lookup)


@pytest.mark.parametrize(
    ("security", "mechanisms", "reply"),
    [
        (Security.REQUIRE_SECURE_AUTH, ALL_MECHS, b"NO [PRIVACYREQUIRED] LOGIN requires TLS"),
        (Security.REQUIRE_ENCRYPTED, ALL_MECHS, b"NO [PRIVACYREQUIRED] LOGIN requires TLS"),
        (Security.NONE, ("CRAM-MD5",), b"NO [CANNOT] LOGIN is disabled"),
    ],
)
def test_login_refusals(security: Security, mechanisms: tuple[str, ...], reply: bytes) -> None:
    h = harness(session(security, mechanisms))
    assert h.send(b'a1 LOGIN alice "correct horse"\r\n') == b"a1 " + reply + b"\r\n"
    assert not h.of(Lookup)
    (failed,) = h.of(AuthFailed)
    assert failed.mechanism == "LOGIN-COMMAND" and failed.authcid == "alice"


# ------------------------------------------------------------ literals


def test_login_with_synchronising_literals() -> None:
    h = harness(session())
    assert h.send(b"a1 LOGIN {5}\r\n") == b"+ Ready for literal data\r\n"
    assert h.send(b"alice {13}\r\n") == b"+ Ready for literal data\r\n"
    assert h.send(b"correct horse\r\n").startswith(b"a1 OK [CAPABILITY ")
    assert h.of(Authenticated)[0].authcid == "alice"


def test_literal_bytes_may_arrive_in_pieces_and_hold_any_character() -> None:
    password = 'x "{3}\r\n) ('
    h = ServerDriver(ImapServer(session()), store=Store({"carol": password}), backend=READY)
    pw = password.encode()
    assert h.send(b"a1 LOGIN carol {%d}\r\n" % len(pw)) == b"+ Ready for literal data\r\n"
    out = b"".join(h.send(bytes([b])) for b in pw)
    assert out == b""
    assert h.send(b"\r\n").startswith(b"a1 OK ")


def test_login_with_non_synchronising_literals_in_one_packet() -> None:
    h = harness(session())
    reply = h.send(b"a1 LOGIN {5+}\r\nalice {13+}\r\ncorrect horse\r\na2 NOOP\r\n")
    assert reply.startswith(b"a1 OK ")
    assert b"+ Ready" not in reply
    assert h.of(Splice) == [Splice(b"a2 NOOP\r\n")]


def test_too_large_synchronising_literal_is_refused_without_continuation() -> None:
    h = harness(session(max_line=100))
    assert h.send(b"a1 LOGIN alice {101}\r\n") == b"a1 BAD [TOOBIG] Literal too large\r\n"
    assert h.send(b"a2 NOOP\r\n") == b"a2 OK NOOP completed\r\n"


def test_literals_count_toward_the_command_size() -> None:
    h = harness(session(max_line=100))
    assert h.send(b"a1 LOGIN {60}\r\n") == b"+ Ready for literal data\r\n"
    assert h.send(b"u" * 60 + b" {30}\r\n") == b"a1 BAD [TOOBIG] Literal too large\r\n"
    assert h.send(b"a2 NOOP\r\n") == b"a2 OK NOOP completed\r\n"


def test_too_large_non_synchronising_literal_is_read_and_discarded() -> None:
    h = harness(session(max_line=100))
    big = b"y" * 500 + b"\r\nz9 LOGIN alice {13+}\r\n"  # looks like a command: must not run
    reply = h.send(b"a1 LOGIN alice {%d+}\r\n" % len(big) + big + b"\r\na2 NOOP\r\n")
    assert reply == b"a1 BAD [TOOBIG] Literal too large\r\na2 OK NOOP completed\r\n"
    assert not h.of(Lookup)


def test_doomed_command_gets_no_continuation_for_a_later_literal() -> None:
    h = harness(session(max_line=100))
    reply = h.send(b"a1 LOGIN {200+}\r\n" + b"u" * 200 + b" {3}\r\n")
    assert reply == b"a1 BAD [TOOBIG] Literal too large\r\n"
    assert h.send(b"a2 NOOP\r\n") == b"a2 OK NOOP completed\r\n"


def test_absurd_literal_size_is_too_big() -> None:
    h = harness(session())
    assert h.send(b"a1 LOGIN alice {99999999999999999999999}\r\n") == (
        b"a1 BAD [TOOBIG] Literal too large\r\n"
    )


def test_literal_in_untagged_line() -> None:
    h = harness(session())
    assert h.send(b"{3}\r\n") == b"+ Ready for literal data\r\n"
    assert h.send(b"abc\r\n") == b"* BAD Missing or invalid tag\r\n"


def test_literal_with_nul_is_bad() -> None:
    h = harness(session())
    reply = h.send(b"a1 LOGIN alice {3+}\r\na\0b\r\n")
    assert reply == b"a1 BAD Syntax error in arguments\r\n"


# ------------------------------------------------------------ AUTHENTICATE


def test_authenticate_plain_with_initial_response() -> None:
    h = harness(session())
    ir = b64(b"\0alice\0correct horse")
    reply = h.send(b"a1 AUTHENTICATE PLAIN " + ir + b"\r\n")
    assert reply == b"a1 OK [CAPABILITY IMAP4rev1 IDLE NAMESPACE] Logged in\r\n"
    assert h.of(Authenticated) == [Authenticated("alice", "alice", "PLAIN")]


def test_authenticate_plain_without_initial_response() -> None:
    h = harness(session())
    assert h.send(b"a1 AUTHENTICATE plain\r\n") == b"+ \r\n"
    assert h.send(b64(b"\0alice\0correct horse") + b"\r\n").startswith(b"a1 OK ")


def test_authenticate_login_mechanism_prompts() -> None:
    h = harness(session())
    assert h.send(b"a1 AUTHENTICATE LOGIN\r\n") == b"+ " + b64(b"Username:") + b"\r\n"
    assert h.send(b64(b"alice") + b"\r\n") == b"+ " + b64(b"Password:") + b"\r\n"
    assert h.send(b64(b"correct horse") + b"\r\n").startswith(b"a1 OK ")


def test_empty_initial_response_is_passed_as_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    # PLAIN rejects an empty message: "=" reached it as b"", not as "no response".
    h = harness(session())
    assert h.send(b"a1 AUTHENTICATE PLAIN =\r\n") == b"a1 BAD Malformed authentication data\r\n"
    (failed,) = h.of(AuthFailed)
    assert failed == AuthFailed("PLAIN", "malformed", None)


def test_cancel_in_initial_response_and_in_reply() -> None:
    h = harness(session())
    assert h.send(b"a1 AUTHENTICATE PLAIN *\r\n") == b"a1 BAD Authentication cancelled\r\n"
    assert h.send(b"a2 AUTHENTICATE CRAM-MD5\r\n").startswith(b"+ ")
    assert h.send(b"*\r\n") == b"a2 BAD Authentication cancelled\r\n"
    assert [f.reason for f in h.of(AuthFailed)] == ["cancelled", "cancelled"]


def test_bad_base64() -> None:
    h = harness(session())
    assert h.send(b"a1 AUTHENTICATE PLAIN AGFsaWNl$$\r\n") == (
        b"a1 BAD Malformed authentication data\r\n"
    )
    assert h.send(b"a2 AUTHENTICATE PLAIN\r\n") == b"+ \r\n"
    assert h.send(b"not base64!\r\n") == b"a2 BAD Malformed authentication data\r\n"
    assert h.send(b"a3 NOOP\r\n") == b"a3 OK NOOP completed\r\n"


def test_wrong_password_via_sasl_names_the_user_but_not_the_password() -> None:
    h = harness(session())
    reply = h.send(b"a1 AUTHENTICATE PLAIN " + b64(b"\0alice\0nope") + b"\r\n")
    assert reply == b"a1 NO [AUTHENTICATIONFAILED] Authentication failed\r\n"
    assert h.of(AuthFailed) == [AuthFailed("PLAIN", "invalid-credentials", "alice")]
    assert "nope" not in repr(h.of(AuthFailed))


def test_authorization_identity_is_refused() -> None:
    h = harness(session())
    reply = h.send(b"a1 AUTHENTICATE PLAIN " + b64(b"bob\0alice\0correct horse") + b"\r\n")
    assert reply == b"a1 NO [AUTHORIZATIONFAILED] Authorization failed\r\n"


@pytest.mark.parametrize(
    ("security", "mechanisms", "mech", "tls", "verifiable", "reply", "reason"),
    [
        (
            Security.REQUIRE_SECURE_AUTH,
            ALL_MECHS,
            "PLAIN",
            False,
            None,
            b"NO [PRIVACYREQUIRED] This mechanism requires TLS",
            "mechanism-needs-tls",
        ),
        (
            Security.REQUIRE_ENCRYPTED,
            ALL_MECHS,
            "CRAM-MD5",
            False,
            None,
            b"NO [PRIVACYREQUIRED] Authentication requires TLS",
            "tls-required",
        ),
        (
            Security.NONE,
            ("SCRAM-SHA-256-PLUS", "PLAIN"),
            "SCRAM-SHA-256-PLUS",
            False,
            None,
            b"NO [PRIVACYREQUIRED] Channel binding requires TLS",
            "channel-binding-unavailable",
        ),
        (
            Security.NONE,
            ALL_MECHS,
            "X-UNKNOWN",
            False,
            None,
            b"NO [CANNOT] Unsupported authentication mechanism",
            "not-available",
        ),
        (
            Security.NONE,
            ALL_MECHS,
            "SCRAM-SHA-1",
            True,
            None,
            b"NO [CANNOT] Unsupported authentication mechanism",
            "not-available",
        ),
        (
            Security.NONE,
            ALL_MECHS,
            "CRAM-MD5",
            True,
            ("PLAIN", "LOGIN"),
            b"NO [CANNOT] Unsupported authentication mechanism",
            "not-available",
        ),
    ],
)
def test_refusal_codes(
    security: Security,
    mechanisms: tuple[str, ...],
    mech: str,
    tls: bool,
    verifiable: tuple[str, ...] | None,
    reply: bytes,
    reason: str,
) -> None:
    h = harness(session(security, mechanisms, verifiable=verifiable, tls_active=tls))
    ir = b" " + b64(b"\0alice\0correct horse")
    assert h.send(b"a1 AUTHENTICATE " + mech.encode() + ir + b"\r\n") == b"a1 " + reply + b"\r\n"
    assert h.of(AuthFailed) == [AuthFailed(mech, reason, None)]
    assert not h.of(Lookup)


class _FakeExchange:
    """Stands in for SaslExchange to produce every outcome a mechanism can."""

    outcome: Failure | Success = Failure(FailureReason.TEMPORARY)
    started_with: ClassVar[list[bytes | None]] = []

    def __init__(self, name: str, ctx: ServerContext) -> None:
        self.name = name

    def start(self, initial: bytes | None) -> Failure | Success:
        self.started_with.append(initial)
        return self.outcome


@pytest.mark.pure_python  # patches core.SaslExchange
@pytest.mark.parametrize(
    ("reason", "reply"),
    [
        (FailureReason.MALFORMED, b"BAD Malformed authentication data"),
        (FailureReason.CANCELLED, b"BAD Authentication cancelled"),
        (FailureReason.INVALID_CREDENTIALS, b"NO [AUTHENTICATIONFAILED] Authentication failed"),
        (FailureReason.AUTHZ_DENIED, b"NO [AUTHORIZATIONFAILED] Authorization failed"),
        (FailureReason.TEMPORARY, b"NO [UNAVAILABLE] Temporary authentication failure"),
        (FailureReason.TOO_WEAK, b"NO [CANNOT] Authentication mechanism is too weak"),
        (FailureReason.ENCRYPTION_REQUIRED, b"NO [PRIVACYREQUIRED] Encryption required"),
        (FailureReason.EXPIRED, b"NO [EXPIRED] Password expired"),
        (FailureReason.TOO_LONG, b"NO [LIMIT] Password too long (at most 1024 octets)"),
    ],
)
def test_every_failure_reason_has_its_code(
    monkeypatch: pytest.MonkeyPatch, reason: FailureReason, reply: bytes
) -> None:
    monkeypatch.setattr(_FakeExchange, "outcome", Failure(reason, "detail never shown"))
    monkeypatch.setattr(core, "SaslExchange", _FakeExchange)  # the core runs every exchange
    h = harness(session())
    assert h.send(b"a1 AUTHENTICATE NTLM =\r\n") == b"a1 " + reply + b"\r\n"
    assert h.of(AuthFailed) == [AuthFailed("NTLM", reason.value, None)]


@pytest.mark.pure_python  # patches core.SaslExchange
def test_initial_response_reaches_the_exchange_as_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_FakeExchange, "started_with", [])
    monkeypatch.setattr(core, "SaslExchange", _FakeExchange)  # the core runs every exchange
    h = harness(session())
    h.send(b"a1 AUTHENTICATE NTLM =\r\na2 AUTHENTICATE NTLM\r\na3 AUTHENTICATE NTLM TlRM\r\n")
    assert _FakeExchange.started_with == [b"=", None, b"TlRM"]


@pytest.mark.pure_python  # patches core.SaslExchange
def test_success_data_goes_out_as_a_final_challenge(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_FakeExchange, "outcome", Success("alice", None, b"v=proof"))
    monkeypatch.setattr(core, "SaslExchange", _FakeExchange)  # the core runs every exchange
    h = harness(session())
    assert h.send(b"a1 AUTHENTICATE NTLM\r\n") == b"+ " + b64(b"v=proof") + b"\r\n"
    assert not h.of(Authenticated)
    assert h.send(b"\r\n").startswith(b"a1 OK [CAPABILITY ")
    assert h.of(Authenticated) == [Authenticated("alice", "alice", "NTLM")]
    # A non-empty answer to the final challenge is a protocol error.
    h2 = harness(session())
    h2.send(b"a1 AUTHENTICATE NTLM\r\n")
    assert h2.send(b"Zm9v\r\n") == b"a1 BAD Malformed authentication data\r\n"
    assert not h2.of(Authenticated)


def test_session_tls_required_allows_only_a_few_commands() -> None:
    h = harness(session(Security.REQUIRE_ENCRYPTED))
    assert h.send(b"a NOOP\r\n") == b"a OK NOOP completed\r\n"
    assert h.send(b"b CAPABILITY\r\n").endswith(b"b OK CAPABILITY completed\r\n")
    assert h.send(b"c ID NIL\r\n") == b"c NO [PRIVACYREQUIRED] Use STARTTLS first\r\n"
    assert h.send(b"d AUTHENTICATE PLAIN\r\n") == (
        b"d NO [PRIVACYREQUIRED] Authentication requires TLS\r\n"
    )
    h2 = harness(session(Security.REQUIRE_ENCRYPTED, starttls_available=False))
    assert h2.send(b"c ID NIL\r\n") == b"c NO [PRIVACYREQUIRED] Encryption required\r\n"


# ------------------------------------------------------------ waiting & pipelining


def test_input_is_held_while_a_lookup_is_outstanding() -> None:
    h = harness(session(), lookups=False)
    assert h.send(b'a1 LOGIN alice "correct horse"\r\na2 NOOP\r\n') == b""
    assert h.send(b"a3 NOOP\r\n") == b""  # still waiting: nothing is executed
    (lookup,) = h.of(Lookup)
    reply = h.call(h.server.resume(resolve(lookup.request)))
    assert reply.startswith(b"a1 OK ")
    assert h.of(Splice) == [Splice(b"a2 NOOP\r\na3 NOOP\r\n")]


def test_failed_lookup_resumes_pipelined_commands() -> None:
    h = harness(session(), lookups=False)
    h.send(b"a1 LOGIN alice wrong\r\na2 NOOP\r\n")
    reply = h.call(h.server.resume(False))
    assert reply == (
        b"a1 NO [AUTHENTICATIONFAILED] Authentication failed\r\na2 OK NOOP completed\r\n"
    )


def test_bytes_arriving_while_the_backend_logs_in_reach_the_splice() -> None:
    h = harness(session(), backend=None)
    h.send(b"a1 AUTHENTICATE PLAIN " + b64(b"\0alice\0correct horse") + b"\r\na2 SEL")
    assert h.of(Authenticated)
    assert h.send(b"ECT INBOX\r\n") == b""
    reply = h.call(h.server.backend_ready(["IMAP4rev1", "BAD]CAP", "X\r\nY", "MOVE"]))
    assert reply == b"a1 OK [CAPABILITY IMAP4rev1 MOVE] Logged in\r\n"
    assert h.of(Splice) == [Splice(b"a2 SELECT INBOX\r\n")]


def test_backend_failure_keeps_the_session_unauthenticated() -> None:
    h = harness(session(), backend=None)
    h.send(b'a1 LOGIN alice "correct horse"\r\n')
    reply = h.call(h.server.backend_failed(BackendFailure.UNAVAILABLE))
    assert reply == b"a1 NO [UNAVAILABLE] Mail server unavailable, try again later\r\n"
    assert h.send(b"a2 NOOP\r\n") == b"a2 OK NOOP completed\r\n"
    assert not h.of(Splice)


def test_backend_ready_without_capabilities() -> None:
    h = harness(session(), backend=None)
    h.send(b'a1 LOGIN alice "correct horse"\r\n')
    assert h.call(h.server.backend_ready([])) == b"a1 OK Logged in\r\n"


# ------------------------------------------------------------ STARTTLS


def test_starttls_discards_pipelined_commands() -> None:
    """CVE-2011-0411: a command sent with STARTTLS must not run after TLS."""
    h = harness(session())
    reply = h.send(b's STARTTLS\r\nx LOGIN alice "correct horse"\r\ny NOOP\r\n')
    assert reply == b"s OK Begin TLS negotiation now\r\n"
    # The driver is told how much was thrown away, to log the attempt.
    assert h.events[-1] == StartTLS(discarded=len(b'x LOGIN alice "correct horse"\r\ny NOOP\r\n'))
    # Plaintext arriving before the handshake completes is dropped as well.
    assert h.send(b'z LOGIN alice "correct horse"\r\n') == b""
    assert h.call(h.server.tls_started()) == b""
    assert h.send(b"c NOOP\r\n") == b"c OK NOOP completed\r\n"
    assert not h.of(Lookup) and not h.of(Authenticated)


def test_clean_starttls_discards_nothing() -> None:
    h = harness(session())
    h.send(b"s STARTTLS\r\n")
    assert h.events[-1] == StartTLS(discarded=0)


def test_starttls_forgets_a_partial_command() -> None:
    h = harness(session())
    h.send(b"s STARTTLS\r\nx LOG")
    assert h.events[-1] == StartTLS(discarded=5)
    h.call(h.server.tls_started())
    assert h.send(b"c NOOP\r\n") == b"c OK NOOP completed\r\n"


# ------------------------------------------------------------ relay mode


def test_relay_plain_with_initial_response() -> None:
    h = harness(session(relay=True))
    message = b"\0alice\0correct horse"
    assert h.send(b"a1 AUTHENTICATE PLAIN " + b64(message) + b"\r\na2 NOOP\r\n") == b""
    assert h.of(RelayAuth) == [RelayAuth("PLAIN", message)]
    assert not h.of(Lookup)
    reply = h.call(h.server.relay_result(True))
    assert reply == b"a1 OK Logged in\r\n"
    assert h.of(Splice) == [Splice(b"a2 NOOP\r\n")]


def test_relay_challenges_and_responses() -> None:
    h = harness(session(relay=True))
    assert h.send(b"a1 AUTHENTICATE CRAM-MD5\r\n") == b""
    assert h.of(RelayAuth) == [RelayAuth("CRAM-MD5", NO_RESPONSE)]
    assert h.call(h.server.relay_challenge(b"<1.2@host>")) == b"+ " + b64(b"<1.2@host>") + b"\r\n"
    assert h.send(b64(b"alice 0123") + b"\r\n") == b""
    assert h.of(RelayResponse) == [RelayResponse(b"alice 0123")]
    reply = h.call(h.server.backend_ready(["IMAP4rev1", "IDLE"]))
    assert reply == b"a1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n"


def test_relay_empty_initial_response_and_empty_reply() -> None:
    h = harness(session(relay=True))
    h.send(b"a1 AUTHENTICATE LOGIN =\r\n")
    assert h.of(RelayAuth) == [RelayAuth("LOGIN", b"")]
    h.call(h.server.relay_challenge(b""))
    h.send(b"\r\n")
    assert h.of(RelayResponse) == [RelayResponse(b"")]


@pytest.mark.parametrize(
    ("client_line", "reason", "reply"),
    [
        (b"*", "cancelled", b"a1 BAD Authentication cancelled\r\n"),
        (b"%%%", "malformed", b"a1 BAD Malformed authentication data\r\n"),
    ],
)
def test_relay_cancel_and_junk(client_line: bytes, reason: str, reply: bytes) -> None:
    h = harness(session(relay=True))
    h.send(b"a1 AUTHENTICATE DIGEST-MD5\r\n")
    h.call(h.server.relay_challenge(b"nonce=..."))
    assert h.send(client_line + b"\r\n") == b""
    assert h.of(RelayResponse) == [RelayResponse(None)]
    # Even if the backend claimed success, a cancelled exchange is no login.
    assert h.call(h.server.relay_result(True)) == reply
    assert h.of(AuthFailed) == [AuthFailed("DIGEST-MD5", reason, None)]
    assert not h.of(Splice)


@pytest.mark.parametrize(
    ("failure", "reply"),
    [
        (BackendFailure.INVALID_CREDENTIALS, b"NO [AUTHENTICATIONFAILED] Authentication failed"),
        (BackendFailure.REJECTED, b"NO [AUTHENTICATIONFAILED] Authentication failed"),
        (None, b"NO [AUTHENTICATIONFAILED] Authentication failed"),
        (BackendFailure.UNAVAILABLE, b"NO [UNAVAILABLE] Temporary authentication failure"),
    ],
)
def test_relay_failures(failure: BackendFailure | None, reply: bytes) -> None:
    h = harness(session(relay=True))
    h.send(b"a1 AUTHENTICATE PLAIN " + b64(b"\0alice\0x") + b"\r\n")
    assert h.call(h.server.relay_result(False, failure)) == b"a1 " + reply + b"\r\n"
    assert len(h.of(AuthFailed)) == 1
    assert h.send(b"a2 NOOP\r\n") == b"a2 OK NOOP completed\r\n"


def test_relay_login_command_becomes_plain() -> None:
    h = harness(session(relay=True))
    h.send(b'a1 LOGIN alice "correct horse"\r\n')
    assert h.of(RelayAuth) == [RelayAuth("PLAIN", plain_message("alice", "correct horse"))]
    # A challenge has nowhere to go for LOGIN: the backend exchange is
    # cancelled, and the client hears that the exchange could not be carried
    # (as POP3 USER/PASS does), not that its password was wrong.
    assert h.call(h.server.relay_challenge(b"")) == b""
    assert h.of(RelayResponse) == [RelayResponse(None)]
    assert h.call(h.server.relay_result(False, BackendFailure.INVALID_CREDENTIALS)) == (
        b"a1 BAD Malformed authentication data\r\n"
    )


def test_relay_respects_policy_before_contacting_the_backend() -> None:
    h = harness(session(Security.REQUIRE_SECURE_AUTH, relay=True))
    assert h.send(b"a1 AUTHENTICATE PLAIN " + b64(b"\0alice\0x") + b"\r\n").startswith(
        b"a1 NO [PRIVACYREQUIRED]"
    )
    assert h.send(b"a2 AUTHENTICATE PLAIN *\r\n") == b"a2 NO [PRIVACYREQUIRED] " + (
        b"This mechanism requires TLS\r\n"
    )
    h2 = harness(session(relay=True))
    assert h2.send(b"a3 AUTHENTICATE PLAIN ###\r\n").startswith(b"a3 BAD")
    assert not h.of(RelayAuth) and not h2.of(RelayAuth)


# ------------------------------------------------------------ hypothesis: server


_COMMAND_WORDS = st.sampled_from(
    [
        b"a1 ",
        b"NOOP",
        b"LOGIN ",
        b"AUTHENTICATE ",
        b"PLAIN",
        b"LOGIN",
        b"CRAM-MD5",
        b"STARTTLS",
        b"CAPABILITY",
        b"ID ",
        b"LOGOUT",
        b"alice ",
        b'"correct horse"',
        b"(",
        b")",
        b" ",
        b"=",
        b"*",
        b"+",
        b"\\",
        b'"',
        b"AGFsaWNlAGNvcnJlY3QgaG9yc2U=",
        b"NIL",
        b"\x00",
        b"\xff",
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    chunks=st.lists(st.binary(max_size=40), max_size=20),
    relay=st.booleans(),
    security=st.sampled_from(list(Security)),
)
def test_random_bytes_never_crash_the_server(
    chunks: list[bytes], relay: bool, security: Security
) -> None:
    h = harness(session(security, relay=relay, max_line=64, max_errors=5), tls=True)
    for chunk in chunks:
        if h.closed or h.of(Splice):
            break
        h.send(chunk)
        # Relay requests get a "no" so the machine keeps reading.
        while isinstance(h.events[-1], RelayAuth | RelayResponse):
            h.call(h.server.relay_result(False, BackendFailure.INVALID_CREDENTIALS))
    assert all(isinstance(e, Event) for e in h.events)


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(st.lists(_COMMAND_WORDS, max_size=8).map(b"".join), max_size=12))
def test_every_command_line_gets_an_answer(lines: list[bytes]) -> None:
    h = harness(session(max_errors=4, max_commands=8), tls=True)
    for line in lines:
        if h.closed or h.of(Splice):
            break
        reply = h.send(line + b"\r\n")
        assert reply, f"no answer to {line!r}"
        assert reply.endswith(b"\r\n")
    sent = b"".join(e.data for e in h.of(Send))
    if h.closed:
        # The goodbye ends the output; after LOGOUT the tagged OK follows the BYE.
        assert sent.endswith(b"\r\n") and b"* BYE " in b"".join(sent.rsplit(b"\r\n", 3)[-3:])
    # Failed attempts and bad commands beyond the cap would have closed it.
    answers = sent.count(b" BAD ") + sent.count(b" NO ")
    assert answers <= 4 or h.closed


# ------------------------------------------------------------ the backend client


def client_settings(**kwargs: Any) -> ClientSettings:
    kwargs.setdefault("mechanisms", ("PLAIN",))
    kwargs.setdefault("credentials", ClientCredentials("master", "master secret", "alice"))
    return ClientSettings(hostname="gw.example", **kwargs)


def fake_backend(settings: ClientSettings) -> FakeBackend:
    """A scripted backend: feed lines, collect what the client sends."""
    return FakeBackend(ImapClient(settings))


ALICE = ClientCredentials("alice", "correct horse")  # CRAM-MD5 carries no authzid
PLAIN_IR = b64(b"alice\0master\0master secret")


def test_client_uses_greeting_capabilities_and_sasl_ir() -> None:
    b = fake_backend(client_settings())
    sent = b.feed(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] hi\r\n")
    assert sent == b"a1 AUTHENTICATE PLAIN " + PLAIN_IR + b"\r\n"
    assert b.feed(b"a1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n* 1 EXISTS\r\n") == b""
    assert b.result() == LoggedIn(("IMAP4rev1", "IDLE"), b"* 1 EXISTS\r\n")


def test_client_asks_capability_and_holds_initial_response_without_sasl_ir() -> None:
    b = fake_backend(client_settings())
    assert b.feed(b"* OK ready\r\n") == b"a1 CAPABILITY\r\n"
    sent = b.feed(b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\na1 OK done\r\n")
    assert sent == b"a2 AUTHENTICATE PLAIN\r\n"
    assert b.feed(b"+ \r\n") == PLAIN_IR + b"\r\n"
    # No CAPABILITY code in the OK: the client asks.
    assert b.feed(b"a2 OK Logged in\r\n") == b"a3 CAPABILITY\r\n"
    b.feed(b"* CAPABILITY IMAP4rev1 MOVE\r\na3 OK done\r\n")
    assert b.result() == LoggedIn(("IMAP4rev1", "MOVE"), b"")


def test_client_takes_untagged_capability_sent_with_the_login_ok() -> None:
    b = fake_backend(client_settings())
    b.feed(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] hi\r\n")
    b.feed(b"* CAPABILITY IMAP4rev1 QUOTA\r\na1 OK Logged in\r\n")
    assert b.result() == LoggedIn(("IMAP4rev1", "QUOTA"), b"")


@pytest.mark.parametrize(
    "greeting",
    [b"* PREAUTH [CAPABILITY IMAP4rev1] welcome\r\n", b"* BYE go away\r\n", b"HTTP/1.1 200\r\n"],
)
def test_client_refuses_greetings_other_than_ok(greeting: bytes) -> None:
    b = fake_backend(client_settings())
    assert b.feed(greeting) == b""
    result = b.result()
    assert isinstance(result, LoginFailed) and result.failure is BackendFailure.UNAVAILABLE


@pytest.mark.parametrize(
    ("reply", "relay", "failure"),
    [
        (b"a1 NO [AUTHENTICATIONFAILED] no\r\n", False, BackendFailure.REJECTED),
        (b"a1 NO [UNAVAILABLE] later\r\n", False, BackendFailure.UNAVAILABLE),
        (b"a1 BAD what\r\n", False, BackendFailure.REJECTED),
        (b"a1 NO [AUTHENTICATIONFAILED] no\r\n", True, BackendFailure.INVALID_CREDENTIALS),
        (b"a1 NO [UNAVAILABLE] later\r\n", True, BackendFailure.UNAVAILABLE),
        (b"* BYE shutting down\r\n", False, BackendFailure.UNAVAILABLE),
        (b"zz OK wrong tag\r\n", False, BackendFailure.UNAVAILABLE),
    ],
)
def test_client_login_failures(reply: bytes, relay: bool, failure: BackendFailure) -> None:
    b = fake_backend(client_settings(relay=relay))
    b.feed(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] hi\r\n")
    if relay:
        b.call(b.client.authenticate("PLAIN", b"\0alice\0pw"))
    b.feed(reply)
    result = b.result()
    assert isinstance(result, LoginFailed) and result.failure is failure


def test_client_without_common_mechanism() -> None:
    b = fake_backend(client_settings(mechanisms=("CRAM-MD5",)))
    b.feed(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] hi\r\n")
    result = b.result()
    assert isinstance(result, LoginFailed) and result.failure is BackendFailure.REJECTED


def test_client_cancels_when_the_mechanism_objects() -> None:
    b = fake_backend(client_settings())
    b.feed(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] hi\r\n")
    # PLAIN has said everything: a further challenge is a ClientAuthError.
    assert b.feed(b"+ Zm9v\r\n") == b"*\r\n"
    result = b.result()
    assert isinstance(result, LoginFailed) and result.failure is BackendFailure.REJECTED


@pytest.mark.parametrize("challenge", [b"+ not base64!\r\n", b"+ Ready for literal data\r\n"])
def test_client_cancels_on_malformed_challenge(challenge: bytes) -> None:
    b = fake_backend(client_settings(mechanisms=("CRAM-MD5",), credentials=ALICE))
    b.feed(b"* OK [CAPABILITY IMAP4rev1 AUTH=CRAM-MD5] hi\r\n")
    assert b.feed(challenge) == b"*\r\n"
    result = b.result()
    assert isinstance(result, LoginFailed) and result.failure is BackendFailure.UNAVAILABLE


def test_client_rejects_continuation_outside_authenticate() -> None:
    b = fake_backend(client_settings())
    b.feed(b"* OK hi\r\n+ \r\n")
    result = b.result()
    assert isinstance(result, LoginFailed) and result.failure is BackendFailure.UNAVAILABLE


def test_client_sends_id_with_the_client_address_and_skips_literals() -> None:
    b = fake_backend(client_settings(use_id=True, client_address="2001:db8::7", client_port=4711))
    sent = b.feed(b"* OK [CAPABILITY IMAP4rev1 ID SASL-IR AUTH=PLAIN] hi\r\n")
    assert sent == b'a1 ID ("x-originating-ip" "2001:db8::7" "x-originating-port" "4711")\r\n'
    # The ID reply carries a literal whose bytes look like a tagged OK.
    reply = b'* ID ("name" {13}\r\na1 OK fake\r\n "version" "2.3")\r\n'
    assert b.feed(reply[:25]) == b""
    assert b.feed(reply[25:]) == b""
    assert b.feed(b"a1 OK ID completed\r\n") == b"a2 AUTHENTICATE PLAIN " + PLAIN_IR + b"\r\n"


def test_client_sends_no_id_unless_offered_and_configured() -> None:
    b = fake_backend(client_settings(use_id=True, client_address="192.0.2.1"))
    assert b.feed(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] hi\r\n").startswith(b"a1 AUTHENTICATE")
    b2 = fake_backend(client_settings(client_address="192.0.2.1"))
    assert b2.feed(b"* OK [CAPABILITY IMAP4rev1 ID AUTH=PLAIN] hi\r\n").startswith(
        b"a1 AUTHENTICATE"
    )


def test_client_id_refusal_does_not_stop_the_login() -> None:
    b = fake_backend(client_settings(use_id=True, client_address="192.0.2.1"))
    b.feed(b"* OK [CAPABILITY IMAP4rev1 ID AUTH=PLAIN] hi\r\n")
    assert b.feed(b"a1 BAD no ID for you\r\n").startswith(b"a2 AUTHENTICATE PLAIN\r\n")


def test_client_starttls_discards_injected_responses() -> None:
    b = fake_backend(
        client_settings(starttls=True, mechanisms=("PLAIN", "CRAM-MD5"), credentials=ALICE)
    )
    assert b.feed(b"* OK [CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN] hi\r\n") == (b"a1 STARTTLS\r\n")
    injected = b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\na2 OK injected\r\n"
    assert b.feed(b"a1 OK Begin TLS\r\n" + injected) == b""
    assert isinstance(b.events[-1], StartTLS)
    assert b.feed(injected) == b""  # still before the handshake
    assert b.call(b.client.tls_started()) == b"a2 CAPABILITY\r\n"
    sent = b.feed(b"* CAPABILITY IMAP4rev1 AUTH=CRAM-MD5\r\na2 OK done\r\n")
    assert sent == b"a3 AUTHENTICATE CRAM-MD5\r\n"


def test_client_requires_starttls_when_configured() -> None:
    b = fake_backend(client_settings(starttls=True))
    b.feed(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] hi\r\n")
    result = b.result()
    assert isinstance(result, LoginFailed) and result.failure is BackendFailure.UNAVAILABLE
    b2 = fake_backend(client_settings(starttls=True))
    b2.feed(b"* OK [CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN] hi\r\n")
    b2.feed(b"a1 NO not now\r\n")
    assert isinstance(b2.result(), LoginFailed)


def test_client_line_too_long() -> None:
    b = fake_backend(client_settings(max_line=100))
    b.feed(b"* OK " + b"x" * 200 + b"\r\n")
    result = b.result()
    assert isinstance(result, LoginFailed) and result.failure is BackendFailure.UNAVAILABLE


def test_client_relay_mode_queues_authenticate_until_ready() -> None:
    b = fake_backend(ClientSettings(hostname="gw", relay=True))
    assert b.call(b.client.authenticate("cram-md5", NO_RESPONSE)) == b""
    assert b.feed(b"* OK hi\r\n") == b"a1 CAPABILITY\r\n"
    sent = b.feed(b"* CAPABILITY IMAP4rev1 AUTH=CRAM-MD5\r\na1 OK\r\n")
    assert sent == b"a2 AUTHENTICATE CRAM-MD5\r\n"
    b.feed(b"+ " + b64(b"<123@x>") + b"\r\n")
    assert b.events[-1] == RelayChallenge(b"<123@x>")
    assert b.call(b.client.respond(b"alice 00ff")) == b64(b"alice 00ff") + b"\r\n"
    b.feed(b"+ \r\n")
    assert b.call(b.client.respond(None)) == b"*\r\n"
    b.feed(b"a2 BAD cancelled\r\n")
    result = b.result()
    assert isinstance(result, LoginFailed) and result.failure is BackendFailure.REJECTED


def test_client_relay_initial_response_forms() -> None:
    b = fake_backend(ClientSettings(hostname="gw", relay=True))
    b.feed(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=LOGIN AUTH=PLAIN] hi\r\n")
    assert b.call(b.client.authenticate("LOGIN", b"")) == b"a1 AUTHENTICATE LOGIN =\r\n"
    b2 = fake_backend(ClientSettings(hostname="gw", relay=True))
    b2.feed(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] hi\r\n")
    assert b2.call(b2.client.authenticate("PLAIN", b"\0a\0b")) == b"a1 AUTHENTICATE PLAIN\r\n"
    assert b2.feed(b"+ \r\n") == b64(b"\0a\0b") + b"\r\n"  # answered by the client itself
    assert not [e for e in b2.events if isinstance(e, RelayChallenge)]


def test_client_calls_out_of_order_raise() -> None:
    client = ImapClient(client_settings())
    with pytest.raises(ProtocolStateError):
        client.tls_started()
    with pytest.raises(ProtocolStateError):
        client.authenticate("PLAIN", b"")
    relay = ImapClient(ClientSettings(hostname="gw", relay=True))
    with pytest.raises(ProtocolStateError):
        relay.respond(b"")


@settings(max_examples=300, deadline=None)
@given(
    chunks=st.lists(
        st.one_of(
            st.binary(max_size=30),
            st.sampled_from(
                [
                    b"* OK [CAPABILITY IMAP4rev1 SASL-IR ID STARTTLS AUTH=PLAIN] x\r\n",
                    b"* OK hi\r\n",
                    b"* CAPABILITY IMAP4rev1 AUTH=PLAIN AUTH=CRAM-MD5\r\n",
                    b"a1 OK done\r\n",
                    b"a2 OK [CAPABILITY IMAP4rev1] done\r\n",
                    b"a2 NO no\r\n",
                    b"+ \r\n",
                    b"+ PDEyMz4=\r\n",
                    b"* ID ({5}\r\n",
                    b"{99999999999999999999}\r\n",
                ]
            ),
        ),
        max_size=12,
    ),
    relay=st.booleans(),
    starttls=st.booleans(),
)
# A login that succeeds with bytes still to come (found by hypothesis): the
# driver splices at LoggedIn and feeds the client machine no more.
@example(
    chunks=[
        b"* OK [CAPABILITY IMAP4rev1 SASL-IR ID STARTTLS AUTH=PLAIN] x\r\n",
        b"a1 OK done\r\n",
        b"a2 OK [CAPABILITY IMAP4rev1] done\r\n",
        b"* OK hi\r\n",
    ],
    relay=False,
    starttls=False,
)
def test_random_backend_bytes_never_crash_the_client(
    chunks: list[bytes], relay: bool, starttls: bool
) -> None:
    settings_ = client_settings(
        relay=relay,
        starttls=starttls,
        mechanisms=("CRAM-MD5", "PLAIN"),
        use_id=True,
        client_address="192.0.2.1",
    )
    b = fake_backend(settings_)
    if relay:
        b.call(b.client.authenticate("PLAIN", NO_RESPONSE))
    for chunk in chunks:
        if b.of(LoggedIn):
            # The driver splices at LoggedIn (the bytes after the login are
            # in LoggedIn.pending); feeding the machine more is a driver bug,
            # refused loudly since IMAP's client runs on the client core.
            with pytest.raises(ProtocolStateError):
                b.client.receive_data(chunk)
            break
        b.feed(chunk)
        last = b.events[-1] if b.events else None
        if isinstance(last, StartTLS):
            b.call(b.client.tls_started())
        elif isinstance(last, RelayChallenge):
            b.call(b.client.respond(b"x"))
    assert all(isinstance(e, ClientEvent) for e in b.events)


# ------------------------------------------------------------ client against server


_NAMES = ("mua", "gw", "up", "backend")
_PEER = {"mua": "gw", "gw": "mua", "up": "backend", "backend": "up"}


@dataclass
class Sim:
    """The proxy in miniature: a mail client (ImapClient) talks to the gateway
    (ImapServer); in relay mode the gateway's backend client (ImapClient)
    talks to a backend (another ImapServer). Bytes are shuttled until quiet."""

    mua: ImapClient
    gw: ImapServer
    up: ImapClient | None = None
    backend: ImapServer | None = None
    log: dict[str, list[Any]] = field(default_factory=lambda: {n: [] for n in _NAMES})
    inbox: dict[str, bytearray] = field(default_factory=lambda: {n: bytearray() for n in _NAMES})
    tls: set[str] = field(default_factory=set)

    def run(self) -> None:
        self.dispatch("gw", self.gw.start())
        if self.backend is not None:
            self.dispatch("backend", self.backend.start())
        for _ in range(200):
            progressed = False
            for name in _NAMES:
                if self.inbox[name]:
                    data = bytes(self.inbox[name])
                    self.inbox[name].clear()
                    self.dispatch(name, self.machine(name).receive_data(data))
                    progressed = True
            for client, server in (("mua", "gw"), ("up", "backend")):
                if {client, server} <= self.tls:
                    self.tls -= {client, server}
                    self.dispatch(server, self.machine(server).tls_started())
                    self.dispatch(client, self.machine(client).tls_started())
                    progressed = True
            if not progressed:
                return
        raise AssertionError("conversation did not settle")

    def machine(self, name: str) -> Any:
        return getattr(self, name)

    def dispatch(self, name: str, events: Sequence[Any]) -> None:
        """Do what the proxy does with each event."""
        for event in events:
            self.log[name].append(event)
            if isinstance(event, Send):
                self.inbox[_PEER[name]] += event.data
            elif isinstance(event, StartTLS):
                self.tls.add(name)
            elif isinstance(event, Lookup):
                self.dispatch(name, self.machine(name).resume(resolve(event.request)))
            elif isinstance(event, Derive):
                self.dispatch(name, self.machine(name).derived(event.compute()))
            elif isinstance(event, Authenticated):
                self.dispatch(name, self.machine(name).backend_ready(BACKEND_CAPS))
            elif name == "gw" and self.up is not None:
                self._relay_from_gateway(event)
            elif name == "up":
                self._relay_from_backend_client(event)

    def _relay_from_gateway(self, event: Event) -> None:
        assert self.up is not None
        if isinstance(event, RelayAuth):
            self.dispatch("up", self.up.authenticate(event.mechanism, event.initial))
        elif isinstance(event, RelayResponse):
            self.dispatch("up", self.up.respond(event.data))

    def _relay_from_backend_client(self, event: ClientEvent) -> None:
        if isinstance(event, RelayChallenge):
            self.dispatch("gw", self.gw.relay_challenge(event.data))
        elif isinstance(event, LoggedIn):
            self.dispatch("gw", self.gw.backend_ready(event.capabilities))
        elif isinstance(event, LoginFailed):
            self.dispatch("gw", self.gw.relay_result(False, event.failure))

    def of(self, name: str, kind: type[Any]) -> list[Any]:
        return [e for e in self.log[name] if isinstance(e, kind)]


SASL_MECHS = ("PLAIN", "LOGIN", "CRAM-MD5", "DIGEST-MD5", "NTLM", "SCRAM-SHA-1", "SCRAM-SHA-256")


def mua_settings(mech: str, password: str = "correct horse", **kwargs: Any) -> ClientSettings:
    return ClientSettings(
        hostname="laptop",
        mechanisms=(mech,),
        credentials=ClientCredentials("alice", password),
        **kwargs,
    )


@pytest.mark.parametrize("mech", SASL_MECHS)
def test_client_logs_in_to_server(mech: str) -> None:
    sim = Sim(ImapClient(mua_settings(mech)), ImapServer(session(mechanisms=(mech,))))
    sim.run()
    assert sim.of("mua", LoggedIn) == [LoggedIn(BACKEND_CAPS, b"")]
    assert sim.of("gw", Authenticated) == [Authenticated("alice", "alice", mech)]
    assert sim.of("gw", Splice) == [Splice(b"")]


@pytest.mark.parametrize("mech", ["SCRAM-SHA-256", "DIGEST-MD5"])
def test_mutual_authentication_data_travels_as_a_final_challenge(mech: str) -> None:
    sim = Sim(ImapClient(mua_settings(mech)), ImapServer(session(mechanisms=(mech,))))
    sim.run()
    assert sim.of("mua", LoggedIn)
    # Two challenges from the server: the mechanism's and the proof.
    sent_by_gw = b"".join(e.data for e in sim.of("gw", Send))
    assert sent_by_gw.count(b"\r\n+ ") == 2


@pytest.mark.parametrize("mech", SASL_MECHS)
def test_client_with_wrong_password_is_refused(mech: str) -> None:
    sim = Sim(ImapClient(mua_settings(mech, "wrong")), ImapServer(session(mechanisms=(mech,))))
    sim.run()
    (result,) = sim.of("mua", LoginFailed)
    assert result.failure is BackendFailure.REJECTED
    assert "AUTHENTICATIONFAILED" in result.detail
    (failed,) = sim.of("gw", AuthFailed)
    assert failed.reason == "invalid-credentials"


def test_starttls_then_channel_binding_login() -> None:
    mech = "SCRAM-SHA-256-PLUS"
    binding = ClientContext(channel_binding=("tls-server-end-point", TLS_BINDING))
    mua = ImapClient(mua_settings(mech, starttls=True, sasl_context=binding))
    gw = ImapServer(session(Security.REQUIRE_ENCRYPTED, (mech, "PLAIN")))
    sim = Sim(mua, gw)
    sim.run()
    assert sim.of("mua", LoggedIn)
    assert sim.of("gw", StartTLS) and gw.tls_active
    assert sim.of("gw", Authenticated) == [Authenticated("alice", "alice", mech)]


def test_channel_binding_mismatch_fails() -> None:
    mech = "SCRAM-SHA-256-PLUS"
    other = ClientContext(channel_binding=("tls-server-end-point", b"another session"))
    sim = Sim(
        ImapClient(mua_settings(mech, starttls=True, sasl_context=other)),
        ImapServer(session(Security.NONE, (mech,))),
    )
    sim.run()
    assert sim.of("mua", LoginFailed) and not sim.of("gw", Authenticated)


@pytest.mark.parametrize("mech", SASL_MECHS)
def test_relay_chain(mech: str) -> None:
    """mail client -> gateway (relay) -> backend client -> backend server."""
    sim = Sim(
        ImapClient(mua_settings(mech)),
        ImapServer(session(mechanisms=(mech,), relay=True)),
        ImapClient(ClientSettings(hostname="gw", relay=True, starttls=True)),
        ImapServer(session(mechanisms=(mech,))),
    )
    sim.run()
    assert sim.of("mua", LoggedIn) == [LoggedIn(BACKEND_CAPS, b"")]
    assert sim.of("gw", Splice) == [Splice(b"")]
    assert not sim.of("gw", Lookup)  # the gateway verified nothing itself
    assert sim.of("backend", Authenticated) == [Authenticated("alice", "alice", mech)]
    assert sim.of("up", StartTLS)


@pytest.mark.parametrize("mech", ["PLAIN", "CRAM-MD5", "SCRAM-SHA-1"])
def test_relay_chain_wrong_password(mech: str) -> None:
    sim = Sim(
        ImapClient(mua_settings(mech, "wrong")),
        ImapServer(session(mechanisms=(mech,), relay=True)),
        ImapClient(ClientSettings(hostname="gw", relay=True)),
        ImapServer(session(mechanisms=(mech,))),
    )
    sim.run()
    assert sim.of("mua", LoginFailed)
    assert sim.of("up", LoginFailed)[0].failure is BackendFailure.INVALID_CREDENTIALS
    # The relaying gateway names the user where the mechanism shows it in
    # the clear (PLAIN; the core's relayed_authcid), for the audit log and
    # the per-user defence; it cannot for challenge-response mechanisms.
    user = "alice" if mech == "PLAIN" else None
    assert sim.of("gw", AuthFailed) == [AuthFailed(mech, "invalid-credentials", user)]
    assert not sim.of("gw", Splice)


def test_relay_chain_with_id_passes_the_client_address() -> None:
    up = ImapClient(
        ClientSettings(hostname="gw", relay=True, use_id=True, client_address=CLIENT_IP)
    )
    sim = Sim(
        ImapClient(mua_settings("PLAIN")),
        ImapServer(session(mechanisms=("PLAIN",), relay=True)),
        up,
        ImapServer(session(mechanisms=("PLAIN",))),
    )
    sim.run()
    sent_up = b"".join(e.data for e in sim.of("up", Send))
    assert b'ID ("x-originating-ip" "192.0.2.7")' in sent_up
    assert sim.of("mua", LoggedIn)


# ------------------------------------------------------------ password length

LONG_PASSWORD = "é" * 513  # 1,026 octets of UTF-8: over the 1,024 cap


@pytest.mark.parametrize(
    "lines",
    [
        [b'a1 LOGIN alice "' + LONG_PASSWORD.encode() + b'"'],
        [b"a1 LOGIN alice {1026+}", LONG_PASSWORD.encode()],
        [b"a1 AUTHENTICATE PLAIN " + b64(b"\0alice\0" + LONG_PASSWORD.encode())],
        [b"a1 AUTHENTICATE LOGIN", b64(b"alice"), b64(LONG_PASSWORD.encode())],
    ],
    ids=["login-quoted", "login-literal", "authenticate-plain", "authenticate-login"],
)
def test_password_over_the_cap_is_refused_without_a_lookup(lines: list[bytes]) -> None:
    h = harness(session())
    reply = h.send(b"".join(line + b"\r\n" for line in lines))
    assert reply.endswith(b"a1 NO [LIMIT] Password too long (at most 1024 octets)\r\n")
    assert h.of(Lookup) == []  # nothing was hashed
    assert [e.reason for e in h.of(AuthFailed)] == [FailureReason.TOO_LONG.value]
    assert not h.closed  # one error of max_errors; the session goes on
    assert h.send(b'a2 LOGIN alice "correct horse"\r\n').startswith(b"a2 OK ")


def test_password_at_the_cap_is_checked() -> None:
    h = harness(session())
    reply = h.send(b'a1 LOGIN alice "' + b"x" * MAX_PASSWORD_OCTETS + b'"\r\n')
    assert reply == b"a1 NO [AUTHENTICATIONFAILED] Authentication failed\r\n"
    assert len(h.of(Lookup)) == 1


# ------------------------------------------------------- SCRAM toward a backend


def test_client_hands_scram_pbkdf2_to_the_driver() -> None:
    """The client machine does not run PBKDF2 itself: server-first yields a
    Derive (the driver runs it in a thread); nothing is sent until
    `derived()`, and backend bytes arriving meanwhile wait their turn."""
    b = fake_backend(
        client_settings(mechanisms=("SCRAM-SHA-256",), credentials=ClientCredentials("alice", "pw"))
    )
    sent = b.feed(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=SCRAM-SHA-256] hi\r\n")
    assert sent.startswith(b"a1 AUTHENTICATE SCRAM-SHA-256 ")
    first = base64.b64decode(sent.split()[-1]).decode()
    nonce = first.split("r=")[1]
    salt = base64.b64encode(b"salt").decode()
    server_first = f"r={nonce}SRV,s={salt},i=4096".encode()
    assert b.feed(b"+ " + b64(server_first) + b"\r\n") == b""
    (derive,) = [e for e in b.events if isinstance(e, Derive)]
    assert derive.iterations == 4096 and b.events[-1] is derive
    assert b.feed(b"* OK still there\r\n") == b""  # held, not read yet
    with pytest.raises(ProtocolStateError):
        b.client.respond(b"")
    reply = b.call(b.client.derived(derive.compute()))
    assert base64.b64decode(reply.strip()).startswith(f"c=biws,r={nonce}SRV,p=".encode())
    with pytest.raises(ProtocolStateError):
        b.client.derived(derive.compute())


# ------------------------------------------------------- a store's own names


@pytest.mark.parametrize(
    "line", [b"a1 LOGIN ALICE pw", b"a1 AUTHENTICATE PLAIN " + b64(b"\0ALICE\0pw")]
)
def test_the_stores_name_for_the_user_is_the_session(line: bytes) -> None:
    # A directory answers "ALICE" with its entry's uid: that is who logs in.
    h = harness(session(), lookups=False)
    h.send(line + b"\r\n")
    h.call(h.server.resume(PasswordVerdict(True, "alice")))
    assert [(e.authcid, e.identity) for e in h.of(Authenticated)] == [("alice", "alice")]
    h = harness(session(), lookups=False)
    h.send(line + b"\r\n")
    h.call(h.server.resume(PasswordVerdict(False, "alice")))
    assert [e.authcid for e in h.of(AuthFailed)] == ["alice"]


# ------------------------------------------------- client: replies out of turn


def test_client_refuses_a_login_reply_sent_before_the_login() -> None:
    """Our tags are predictable: a tagged OK in the same data as the greeting
    answers an AUTHENTICATE the backend had not received."""
    b = fake_backend(client_settings())
    greeting = b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] hi\r\n"
    assert b.feed(greeting + b"a1 OK [CAPABILITY IMAP4rev1] in\r\n").startswith(b"a1 AUTHENTICATE")
    result = b.result()
    assert isinstance(result, LoginFailed) and result.failure is BackendFailure.UNAVAILABLE


def test_client_takes_the_same_reply_in_its_turn() -> None:
    b = fake_backend(client_settings())
    b.feed(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] hi\r\n")
    b.feed(b"* OK [ALERT] dropped\r\na1 OK [CAPABILITY IMAP4rev1] in\r\n* 1 EXISTS\r\n")
    assert b.result() == LoggedIn(("IMAP4rev1",), b"* 1 EXISTS\r\n")


def test_client_refuses_a_reply_held_while_pbkdf2_ran() -> None:
    """Bytes that came while our SCRAM proof was being computed were sent
    before the backend had it: untagged ones are read, a completion is out of
    turn."""
    b = fake_backend(
        client_settings(
            mechanisms=("SCRAM-SHA-256",), credentials=ClientCredentials("alice", "pw")
        )
    )
    sent = b.feed(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=SCRAM-SHA-256] hi\r\n")
    nonce = base64.b64decode(sent.split()[-1]).decode().split("r=")[1]
    salt = base64.b64encode(b"salt").decode()
    b.feed(b"+ " + b64(f"r={nonce}SRV,s={salt},i=4096".encode()) + b"\r\n")
    (derive,) = [e for e in b.events if isinstance(e, Derive)]
    assert b.feed(b"* OK note\r\na1 OK [CAPABILITY IMAP4rev1] in\r\n") == b""
    b.call(b.client.derived(derive.compute()))
    result = b.result()
    assert isinstance(result, LoginFailed) and result.failure is BackendFailure.UNAVAILABLE
