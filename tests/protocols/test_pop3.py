"""POP3 server and client machines (RFC 1939, 2449, 5034, 2595, 3206), sans-IO."""

from __future__ import annotations

import base64
import itertools
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authgate.policy import Protocol, Security
from authgate.protocols.base import (
    Authenticated,
    AuthFailed,
    BackendFailure,
    ClientSettings,
    Close,
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
from authgate.protocols.pop3 import (
    ERR_BACKEND,
    ERR_CANCELLED,
    ERR_FAILED,
    ERR_MALFORMED,
    ERR_PLAINTEXT_NEEDS_TLS,
    ERR_TEMP,
    ERR_UNSUPPORTED,
    FAILURE_REPLIES,
    ClientState,
    Pop3Client,
    Pop3Server,
    ServerState,
)
from authgate.sasl.base import (
    NO_RESPONSE,
    ClientContext,
    ClientCredentials,
    Derive,
    FailureReason,
    Lookup,
    PasswordVerdict,
    ServerContext,
    client_step,
)
from authgate.sasl.scram import make_verifier
from authgate.testing.kit import (
    PASSWORDS,
    FakeBackend,
    ServerDriver,
    b64,
    backend_ready,
    listener_settings,
    plain,
    resolve,
)

HOST = "pop.example.org"
CLIENT_IP = "192.0.2.10"
EXEMPT_IP = "10.1.2.3"
ALL_MECHS = ("SCRAM-SHA-256", "CRAM-MD5", "DIGEST-MD5", "NTLM", "LOGIN", "PLAIN")
FIXED_CAPS = ["RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "IMPLEMENTATION authgate"]
BACKEND_CAPA = b"+OK\r\nTOP\r\nUIDL\r\nRESP-CODES\r\n.\r\n"


def make_settings(security: Security = Security.NONE, **kw: Any) -> SessionSettings:
    """The POP3 listener's settings as the proxy builds them (kit.listener_settings)."""
    kw = {"mechanisms": ALL_MECHS, "client": CLIENT_IP, "starttls_available": True, **kw}
    context = ServerContext(service="pop", hostname=HOST)
    return listener_settings(Protocol.POP3, security, hostname=HOST, context=context, **kw)


def capa(session: ServerDriver) -> list[str]:
    reply = session.send(b"CAPA\r\n").decode().split("\r\n")
    assert reply[0].startswith("+OK") and reply[-2:] == [".", ""]
    return reply[1:-2]


def greeted(
    settings: SessionSettings | None = None, *, auto_tls: bool = True, **kw: Any
) -> ServerDriver:
    # As the proxy does: lookups answered from the kit's store, StartTLS
    # "succeeds" at once (when `auto_tls`), the backend left to the test.
    session = ServerDriver(Pop3Server(settings or make_settings(**kw)), tls=auto_tls)
    assert bytes(session.out) == f"+OK {HOST} authgate ready\r\n".encode()
    return session


# =========================================================== server: CAPA/policy


def test_greeting_has_no_apop_timestamp() -> None:
    session = greeted()
    assert b"<" not in session.out  # APOP deliberately not offered


@pytest.mark.parametrize(
    ("security", "client", "tls", "expected"),
    [
        # none: everything, anywhere.
        (Security.NONE, CLIENT_IP, False, ["STLS", "SASL " + " ".join(ALL_MECHS), "USER"]),
        # require-secure-auth: no cleartext before TLS, all of it inside.
        (
            Security.REQUIRE_SECURE_AUTH,
            CLIENT_IP,
            False,
            ["STLS", "SASL SCRAM-SHA-256 CRAM-MD5 DIGEST-MD5 NTLM"],
        ),
        (Security.REQUIRE_SECURE_AUTH, CLIENT_IP, True, ["SASL " + " ".join(ALL_MECHS), "USER"]),
        # require-encrypted: nothing before TLS but STLS.
        (Security.REQUIRE_ENCRYPTED, CLIENT_IP, False, ["STLS"]),
        (Security.REQUIRE_ENCRYPTED, CLIENT_IP, True, ["SASL " + " ".join(ALL_MECHS), "USER"]),
        # exempt networks are treated as "none".
        (
            Security.REQUIRE_ENCRYPTED,
            EXEMPT_IP,
            False,
            ["STLS", "SASL " + " ".join(ALL_MECHS), "USER"],
        ),
        (
            Security.REQUIRE_SECURE_AUTH,
            EXEMPT_IP,
            False,
            ["STLS", "SASL " + " ".join(ALL_MECHS), "USER"],
        ),
    ],
)
def test_capa_per_policy(security: Security, client: str, tls: bool, expected: list[str]) -> None:
    session = greeted(make_settings(security, client=client, exempt=["10.0.0.0/8"], tls_active=tls))
    assert capa(session) == expected + FIXED_CAPS


def test_capa_after_stls_changes() -> None:
    session = greeted(make_settings(Security.REQUIRE_SECURE_AUTH))
    assert "USER" not in capa(session)
    assert session.send(b"STLS\r\n") == b"+OK Begin TLS negotiation\r\n"
    assert session.server.tls_active
    caps = capa(session)
    assert "STLS" not in caps and "USER" in caps and "SASL " + " ".join(ALL_MECHS) in caps


def test_capa_without_starttls_listener_or_cleartext() -> None:
    session = greeted(make_settings(mechanisms=("CRAM-MD5",), starttls_available=False))
    assert capa(session) == ["SASL CRAM-MD5", *FIXED_CAPS]  # no USER: no cleartext mech


def test_capa_store_cannot_verify() -> None:
    session = greeted(make_settings(verifiable={"PLAIN", "LOGIN"}))
    assert capa(session)[1] == "SASL LOGIN PLAIN"
    assert session.send(b"AUTH CRAM-MD5\r\n") == (ERR_UNSUPPORTED + "\r\n").encode()


def test_auth_without_argument_lists_mechanisms() -> None:
    session = greeted(make_settings(Security.REQUIRE_SECURE_AUTH))
    assert (
        session.send(b"AUTH\r\n")
        == b"+OK\r\nSCRAM-SHA-256\r\nCRAM-MD5\r\nDIGEST-MD5\r\nNTLM\r\n.\r\n"
    )


# ============================================================ server: refusals


def test_plaintext_refused_without_tls() -> None:
    session = greeted(make_settings(Security.REQUIRE_SECURE_AUTH))
    expected = (ERR_PLAINTEXT_NEEDS_TLS + "\r\n").encode()
    assert session.send(b"AUTH PLAIN " + plain("alice", PASSWORDS["alice"]) + b"\r\n") == expected
    assert session.send(b"USER alice\r\n") == expected
    assert not session.of(Lookup)  # nothing was checked
    # Every refused attempt is in the audit log (not a guess for the defence).
    assert [(f.mechanism, f.reason) for f in session.of(AuthFailed)] == [
        ("PLAIN", "mechanism-needs-tls"),
        ("USER-PASS", "mechanism-needs-tls"),
    ]
    assert not session.of(Close)
    session.send(b"AUTH LOGIN\r\n")
    assert session.of(Close) == [Close()]  # third error (max_errors=3): goodbye


def test_pass_after_refused_user_is_not_accepted() -> None:
    session = greeted(make_settings(Security.REQUIRE_SECURE_AUTH, max_errors=10))
    session.send(b"USER alice\r\n")
    assert session.send(b"PASS x\r\n") == b"-ERR No USER given.\r\n"


def test_session_tls_required_blocks_everything_but_capa_stls_quit() -> None:
    session = greeted(make_settings(Security.REQUIRE_ENCRYPTED, max_errors=10))
    for command in (b"USER alice", b"AUTH CRAM-MD5", b"AUTH", b"NOOP", b"XYZZY"):
        assert session.send(command + b"\r\n") == b"-ERR [AUTH] TLS required: issue STLS first.\r\n"
    assert capa(session) == ["STLS", *FIXED_CAPS]
    assert session.send(b"STLS\r\n") == b"+OK Begin TLS negotiation\r\n"
    assert session.send(b"USER alice\r\n") == b"+OK\r\n"


def test_session_tls_required_without_stls_then_quit() -> None:
    session = greeted(make_settings(Security.REQUIRE_ENCRYPTED, starttls_available=False))
    assert session.send(b"USER a\r\n") == b"-ERR [AUTH] TLS required.\r\n"
    assert session.send(b"QUIT\r\n") == b"+OK Logging out.\r\n"
    assert session.of(Close)


@pytest.mark.parametrize(
    ("command", "reply"),
    [
        (b"AUTH FOO", ERR_UNSUPPORTED),
        (b"AUTH SCRAM-SHA-1", ERR_UNSUPPORTED),  # known but not enabled
        (b"AUTH B@D", ERR_UNSUPPORTED),
        (b"AUTH PLAIN a b", "-ERR Syntax error."),
        (b"AUTH SCRAM-SHA-256-PLUS", "-ERR [AUTH] Channel binding needs a TLS connection."),
        (b"NOOP", "-ERR Not logged in."),
        (b"STAT", "-ERR Not logged in."),
        (b"HELO x", "-ERR Unknown command."),
        (b"", "-ERR Unknown command."),
        (b"PASS secret", "-ERR No USER given."),
        (b"STLS now", "-ERR Syntax error."),
        (b"USER", "-ERR Syntax error."),
        (b"USER \xff", "-ERR Syntax error."),
    ],
)
def test_error_replies(command: bytes, reply: str) -> None:
    session = greeted(make_settings(mechanisms=(*ALL_MECHS, "SCRAM-SHA-256-PLUS")))
    assert session.send(command + b"\r\n") == (reply + "\r\n").encode()
    assert session.server.state is ServerState.COMMAND


def test_stls_when_unavailable_or_active() -> None:
    session = greeted(make_settings(starttls_available=False))
    assert session.send(b"STLS\r\n") == b"-ERR STLS not available.\r\n"
    session = greeted(make_settings(tls_active=True))
    assert session.send(b"STLS\r\n") == b"-ERR Command not permitted when TLS active.\r\n"


def test_every_failure_reason_has_a_reply() -> None:
    assert set(FAILURE_REPLIES) == set(FailureReason)
    assert FAILURE_REPLIES[FailureReason.EXPIRED] == "-ERR [AUTH] Password expired."
    assert (
        FAILURE_REPLIES[FailureReason.TOO_LONG]
        == "-ERR [AUTH] Password too long (at most 1024 octets)."
    )
    assert FAILURE_REPLIES[FailureReason.INVALID_CREDENTIALS] == ERR_FAILED
    assert FAILURE_REPLIES[FailureReason.TEMPORARY].startswith("-ERR [SYS/TEMP] ")
    assert (
        FAILURE_REPLIES[FailureReason.CANCELLED]
        == ERR_CANCELLED
        == "-ERR Authentication cancelled."
    )


# ====================================================== server: USER/PASS, AUTH


def login_ok(session: ServerDriver) -> bytes:
    assert session.server.state is ServerState.BACKEND
    return session.call(session.server.backend_ready(("TOP", "UIDL")))


def test_user_pass_success_with_spaces_in_password() -> None:
    session = greeted()
    assert session.send(b"USER alice\r\n") == b"+OK\r\n"
    assert session.send(b"PASS correct horse\r\n") == b""
    assert session.of(Authenticated) == [Authenticated("alice", "alice", "USER-PASS")]
    assert session.server.state is ServerState.BACKEND
    assert login_ok(session) == b"+OK Logged in.\r\n"
    assert session.of(Splice) == [Splice(pending=b"")]


def test_user_pass_utf8() -> None:
    session = greeted()
    session.send("USER zoë\r\nPASS pässwörd 密码\r\n".encode())
    assert session.of(Authenticated) == [Authenticated("zoë", "zoë", "USER-PASS")]


def test_user_pass_wrong_password() -> None:
    session = greeted()
    reply = session.send(b"USER alice\r\nPASS wrong\r\n")
    assert reply == b"+OK\r\n" + (ERR_FAILED + "\r\n").encode()
    assert session.of(AuthFailed) == [AuthFailed("USER-PASS", "invalid-credentials", "alice")]
    # The USER is consumed: another PASS needs another USER.
    assert session.send(b"PASS correct horse\r\n") == b"-ERR No USER given.\r\n"


def test_pass_must_follow_user_directly() -> None:
    session = greeted()
    session.send(b"USER alice\r\nCAPA\r\n")
    assert session.send(b"PASS correct horse\r\n") == b"-ERR No USER given.\r\n"
    assert not session.of(Authenticated)


def test_auth_plain_initial_response() -> None:
    session = greeted()
    assert session.send(b"AUTH PLAIN " + plain("bob", 'pa"ss\\word') + b"\r\n") == b""
    assert session.of(Authenticated) == [Authenticated("bob", "bob", "PLAIN")]


def test_auth_plain_without_initial_response_gets_empty_challenge() -> None:
    session = greeted()
    assert session.send(b"auth plain\r\n") == b"+ \r\n"  # keywords are case-insensitive
    assert session.server.state is ServerState.SASL
    session.send(plain("bob", 'pa"ss\\word') + b"\r\n")
    assert session.of(Authenticated) == [Authenticated("bob", "bob", "PLAIN")]


def test_auth_plain_other_authzid_refused() -> None:
    session = greeted()
    session.send(b"AUTH PLAIN " + plain("bob", 'pa"ss\\word', "alice") + b"\r\n")
    assert session.of(AuthFailed) == [AuthFailed("PLAIN", "authz-denied", "bob")]
    assert session.out.endswith((ERR_FAILED + "\r\n").encode())


def test_auth_login_prompts() -> None:
    session = greeted()
    assert session.send(b"AUTH LOGIN\r\n") == b"+ " + b64("Username:") + b"\r\n"
    assert session.send(b64("alice") + b"\r\n") == b"+ " + b64("Password:") + b"\r\n"
    session.send(b64(PASSWORDS["alice"]) + b"\r\n")
    assert session.of(Authenticated) == [Authenticated("alice", "alice", "LOGIN")]


def test_auth_cram_md5_wrong_password() -> None:
    session = greeted()
    challenge_line = session.send(b"AUTH CRAM-MD5\r\n")
    assert challenge_line.startswith(b"+ ") and len(challenge_line) > 6
    session.send(b64("alice 00000000000000000000000000000000") + b"\r\n")
    # The user named in the exchange: the defence counts it against alice.
    assert session.of(AuthFailed) == [AuthFailed("CRAM-MD5", "invalid-credentials", "alice")]
    assert session.out.endswith(b"-ERR [AUTH] Authentication failed.\r\n")
    assert session.server.state is ServerState.COMMAND


@pytest.mark.parametrize(
    ("lines", "reason", "reply"),
    [
        ([b"AUTH PLAIN *"], "cancelled", ERR_CANCELLED),
        ([b"AUTH PLAIN", b"*"], "cancelled", ERR_CANCELLED),
        ([b"AUTH LOGIN", b"*"], "cancelled", ERR_CANCELLED),
        ([b"AUTH PLAIN not!base64"], "malformed", ERR_MALFORMED),
        ([b"AUTH PLAIN", b"%%%"], "malformed", ERR_MALFORMED),
        ([b"AUTH PLAIN ="], "malformed", ERR_MALFORMED),  # empty PLAIN message
        ([b"AUTH CRAM-MD5 ="], "malformed", ERR_MALFORMED),  # server-first: no initial response
    ],
)
def test_sasl_cancel_and_malformed(lines: list[bytes], reason: str, reply: str) -> None:
    session = greeted()
    session.send(b"".join(line + b"\r\n" for line in lines))
    assert [f.reason for f in session.of(AuthFailed)] == [reason]
    assert session.out.endswith((reply + "\r\n").encode())
    assert not session.of(Lookup)
    assert session.server.state is ServerState.COMMAND


def test_temporary_store_failure_is_sys_temp() -> None:
    # A SCRAM-SHA-1 verifier handed to SCRAM-SHA-256 does not fit: TEMPORARY.
    settings = make_settings()
    server = Pop3Server(settings)
    server.start()
    (challenge,) = server.receive_data(
        b"AUTH SCRAM-SHA-256 " + b64("n,,n=alice,r=abcdefgh") + b"\r\n"
    )
    assert isinstance(challenge, Lookup)
    events = server.resume(make_verifier("pw", "sha1", salt=b"s"))
    assert events == [
        AuthFailed("SCRAM-SHA-256", "temporary", "alice"),
        Send((ERR_TEMP + "\r\n").encode()),
    ]


def test_scram_additional_data_as_final_challenge() -> None:
    creds = ClientCredentials("alice", PASSWORDS["alice"])
    from authgate.sasl.scram import ScramSHA256Client

    client = ScramSHA256Client(creds, ClientContext())
    session = greeted()
    first = session.send(b"AUTH SCRAM-SHA-256 " + b64(client.start()) + b"\r\n")
    server_first = base64.b64decode(first[2:].strip())
    final = session.send(b64(client_step(client, server_first)) + b"\r\n")
    assert final.startswith(b"+ ")  # server-final as a challenge (RFC 5034 has no data on +OK)
    assert session.server.state is ServerState.SASL_FINAL
    assert client_step(client, base64.b64decode(final[2:].strip())) == b""
    assert not session.of(Authenticated)
    session.send(b"\r\n")
    assert session.of(Authenticated) == [Authenticated("alice", "alice", "SCRAM-SHA-256")]


@pytest.mark.parametrize(("reply", "reason"), [(b"*", "cancelled"), (b"Zm9v", "malformed")])
def test_final_challenge_needs_empty_reply(reply: bytes, reason: str) -> None:
    from authgate.sasl.scram import ScramSHA256Client

    client = ScramSHA256Client(ClientCredentials("alice", PASSWORDS["alice"]), ClientContext())
    session = greeted()
    first = session.send(b"AUTH SCRAM-SHA-256 " + b64(client.start()) + b"\r\n")
    session.send(b64(client_step(client, base64.b64decode(first[2:].strip()))) + b"\r\n")
    session.send(reply + b"\r\n")
    assert not session.of(Authenticated)
    assert [f.reason for f in session.of(AuthFailed)] == [reason]


def test_backend_failed_keeps_session_unauthenticated() -> None:
    session = greeted()
    session.send(b"USER alice\r\nPASS correct horse\r\n")
    reply = session.call(session.server.backend_failed(BackendFailure.UNAVAILABLE))
    assert reply == (ERR_BACKEND + "\r\n").encode() and ERR_BACKEND.startswith("-ERR [SYS/TEMP] ")
    # In the audit log, but not a guess: the client did nothing wrong.
    assert session.of(AuthFailed) == [AuthFailed("USER-PASS", "backend-unavailable", "alice")]
    assert session.server.state is ServerState.COMMAND
    session.send(b"USER alice\r\nPASS correct horse\r\n")
    assert len(session.of(Authenticated)) == 2
    assert login_ok(session) == b"+OK Logged in.\r\n"


def test_quit() -> None:
    session = greeted()
    assert session.send(b"QUIT\r\nCAPA\r\n") == b"+OK Logging out.\r\n"
    assert session.of(Close) == [Close()]
    assert session.server.receive_data(b"CAPA\r\n") == []


# ================================================= server: limits and pipelining


def test_errors_cap_says_goodbye_and_closes() -> None:
    session = greeted(make_settings(max_errors=3))
    reply = session.send(b"A\r\nB\r\nC\r\nD\r\n")
    assert (
        reply == b"-ERR Unknown command.\r\n" * 3 + b"-ERR Too many errors, closing connection.\r\n"
    )
    assert session.of(Close) == [Close()]
    assert session.server.state is ServerState.CLOSED


def test_failed_logins_count_as_errors() -> None:
    session = greeted(make_settings(max_errors=2))
    session.send(b"USER alice\r\nPASS a\r\nUSER alice\r\nPASS b\r\nUSER alice\r\n")
    assert len(session.of(AuthFailed)) == 2
    assert session.of(Close) == [Close()]
    assert session.out.endswith(b"-ERR Too many errors, closing connection.\r\n")


def test_line_too_long_closes() -> None:
    session = greeted(make_settings(max_line=64))
    assert session.send(b"USER " + b"a" * 100) == b"-ERR Line too long.\r\n"
    assert session.of(Close) == [Close()]
    session = greeted(make_settings(max_line=64))
    session.send(b"AUTH PLAIN\r\n")
    assert session.send(b"A" * 70 + b"\r\n") == b"-ERR Line too long.\r\n"  # SASL lines too


def test_max_commands() -> None:
    session = greeted(make_settings(max_commands=3, max_errors=100))
    reply = session.send(b"CAPA\r\n" * 4)
    assert reply.endswith(b"-ERR Too many commands, closing connection.\r\n")
    assert reply.count(b"+OK Capability list follows") == 3
    assert session.of(Close) == [Close()]


def test_pipelined_commands_wait_for_lookup_and_reach_splice() -> None:
    server = Pop3Server(make_settings())
    server.start()
    events = server.receive_data(
        b"CAPA\r\nUSER alice\r\nPASS correct horse\r\nSTAT\r\nLIST 1\r\nQUIT\r\n"
    )
    assert isinstance(events[-1], Lookup)
    assert b"".join(e.data for e in events if isinstance(e, Send)).endswith(b".\r\n+OK\r\n")
    # More pipelined input while the lookup is outstanding is only buffered.
    assert server.receive_data(b"RETR 1\r\n") == []
    events = server.resume(True)
    assert events == [Authenticated("alice", "alice", "USER-PASS")]
    events = server.backend_ready(())
    assert events == [
        Send(b"+OK Logged in.\r\n"),
        Splice(pending=b"STAT\r\nLIST 1\r\nQUIT\r\nRETR 1\r\n"),
    ]


def test_pipelined_sasl_response_and_partial_command_reach_splice() -> None:
    session = greeted()
    session.send(b"AUTH PLAIN\r\n" + plain("bob", 'pa"ss\\word') + b"\r\nSTAT\r\nRE")
    assert login_ok(session) == b"+OK Logged in.\r\n"
    assert session.of(Splice) == [Splice(pending=b"STAT\r\nRE")]


def test_pipelined_after_failure_continues() -> None:
    session = greeted()
    reply = session.send(b'USER alice\r\nPASS nope\r\nUSER bob\r\nPASS pa"ss\\word\r\nSTAT\r\n')
    assert reply == b"+OK\r\n-ERR [AUTH] Authentication failed.\r\n+OK\r\n"
    login_ok(session)
    assert session.of(Splice) == [Splice(pending=b"STAT\r\n")]


def test_stls_injection_is_discarded() -> None:
    session = greeted(make_settings(), auto_tls=False)
    server = session.server
    reply = session.send(b"STLS\r\nUSER alice\r\nPASS correct horse\r\n")
    assert reply == b"+OK Begin TLS negotiation\r\n"
    # The driver is told how much was thrown away, to log the attempt.
    assert session.events[-1] == StartTLS(
        discarded=len(b"USER alice\r\nPASS correct horse\r\n")
    )
    # Plaintext arriving during the handshake is dropped too.
    assert server.receive_data(b"USER bob\r\n") == []
    assert server.tls_started() == []
    # Nothing said before the handshake is executed after it.
    assert session.send(b'PASS pa"ss\\word\r\n') == b"-ERR No USER given.\r\n"
    assert not session.of(Lookup) and not session.of(Authenticated)
    assert session.send(b"STLS\r\n") == b"-ERR Command not permitted when TLS active.\r\n"


def test_clean_stls_discards_nothing() -> None:
    session = greeted(make_settings(), auto_tls=False)
    session.send(b"STLS\r\n")
    assert session.events[-1] == StartTLS(discarded=0)


def test_receive_data_after_splice_raises() -> None:
    # (The calls out of order before login: test_contract, for every dialect.)
    server = Pop3Server(make_settings())
    server.start()
    server.receive_data(b'USER bob\r\nPASS pa"ss\\word\r\n')
    server.resume(True)
    server.backend_ready(())
    with pytest.raises(ProtocolStateError):
        server.receive_data(b"STAT\r\n")


def test_no_secret_in_replies_or_events() -> None:
    session = greeted(make_settings(max_errors=20))
    session.send(b"USER alice\r\nPASS hunter2 wrong\r\n")
    session.send(b"AUTH PLAIN " + plain("alice", "hunter2 wrong") + b"\r\n")
    session.send(b"AUTH LOGIN\r\n" + b64("alice") + b"\r\n" + b64("hunter2 wrong") + b"\r\n")
    assert b"hunter2" not in session.out
    assert all("hunter2" not in repr(e) for e in session.events)
    assert len(session.of(AuthFailed)) == 3


# ============================================================= server: relay


def relay_session(**kw: Any) -> ServerDriver:
    return greeted(make_settings(relay=True, **kw))


def test_relay_plain_initial_response() -> None:
    session = relay_session()
    message = b'\0bob\0pa"ss\\word'
    session.send(b"AUTH PLAIN " + b64(message) + b"\r\nSTAT\r\n")
    assert session.of(RelayAuth) == [RelayAuth("PLAIN", message)]
    assert not session.of(Authenticated)
    assert session.call(session.server.relay_result(True)) == b"+OK Logged in.\r\n"
    assert session.of(Splice) == [Splice(pending=b"STAT\r\n")]


@pytest.mark.parametrize(
    ("line", "initial"), [(b"AUTH CRAM-MD5", NO_RESPONSE), (b"AUTH PLAIN =", b"")]
)
def test_relay_initial_response_forms(line: bytes, initial: object) -> None:
    session = relay_session()
    session.send(line + b"\r\n")
    assert [e.initial for e in session.of(RelayAuth)] == [initial]


def test_relay_challenges_and_responses() -> None:
    session = relay_session()
    session.send(b"AUTH CRAM-MD5\r\n")
    assert (
        session.call(session.server.relay_challenge(b"<1.2@x>")) == b"+ " + b64("<1.2@x>") + b"\r\n"
    )
    session.send(b64("bob 0123") + b"\r\n")
    assert session.of(RelayResponse) == [RelayResponse(b"bob 0123")]
    reply = session.call(session.server.relay_result(False, BackendFailure.INVALID_CREDENTIALS))
    assert reply == (ERR_FAILED + "\r\n").encode()
    assert session.of(AuthFailed) == [AuthFailed("CRAM-MD5", "invalid-credentials", None)]
    assert session.server.state is ServerState.COMMAND


def test_relay_empty_challenge_and_cancel() -> None:
    session = relay_session()
    session.send(b"AUTH LOGIN\r\n")
    assert session.call(session.server.relay_challenge(b"")) == b"+ \r\n"
    session.send(b"*\r\n")
    assert session.of(RelayResponse) == [RelayResponse(None)]
    reply = session.call(session.server.relay_result(False, BackendFailure.INVALID_CREDENTIALS))
    assert reply == (ERR_CANCELLED + "\r\n").encode()
    assert [f.reason for f in session.of(AuthFailed)] == ["cancelled"]


def test_relay_bad_base64_cancels_at_backend() -> None:
    session = relay_session()
    session.send(b"AUTH LOGIN\r\n")
    session.call(session.server.relay_challenge(b"Username:"))
    session.send(b"!!!\r\n")
    assert session.of(RelayResponse) == [RelayResponse(None)]
    reply = session.call(session.server.relay_result(False, BackendFailure.INVALID_CREDENTIALS))
    assert reply == (ERR_MALFORMED + "\r\n").encode()


def test_relay_local_refusals_do_not_reach_backend() -> None:
    session = relay_session(max_errors=10)
    session.send(b"AUTH PLAIN *\r\nAUTH PLAIN @@\r\nAUTH FOO\r\n")
    assert not session.of(RelayAuth)
    assert [f.reason for f in session.of(AuthFailed)] == ["cancelled", "malformed", "not-available"]


def test_relay_user_pass_becomes_plain() -> None:
    session = relay_session()
    session.send(b"USER alice\r\nPASS two words\r\n")
    assert session.of(RelayAuth) == [RelayAuth("PLAIN", b"\0alice\0two words")]
    reply = session.call(session.server.relay_result(False, BackendFailure.UNAVAILABLE))
    assert reply == (ERR_TEMP + "\r\n").encode()
    assert session.of(AuthFailed) == [AuthFailed("USER-PASS", "temporary", "alice")]


def test_relay_user_pass_cannot_take_a_challenge() -> None:
    session = relay_session()
    session.send(b"USER alice\r\nPASS pw\r\n")
    assert session.server.relay_challenge(b"huh") == [RelayResponse(None)]
    session.call(session.server.relay_result(False, BackendFailure.INVALID_CREDENTIALS))
    assert session.out.endswith((ERR_MALFORMED + "\r\n").encode())


def test_relay_respects_policy() -> None:
    session = relay_session(security=Security.REQUIRE_SECURE_AUTH)
    assert session.send(b"AUTH PLAIN\r\n") == (ERR_PLAINTEXT_NEEDS_TLS + "\r\n").encode()
    assert not session.of(RelayAuth)


# ===================================================== server: hypothesis fuzz

COMMANDS = [
    b"CAPA",
    b"STLS",
    b"AUTH",
    b"AUTH PLAIN",
    b"AUTH LOGIN",
    b"AUTH CRAM-MD5",
    b"AUTH DIGEST-MD5",
    b"AUTH NTLM",
    b"AUTH PLAIN =",
    b"AUTH PLAIN *",
    b"AUTH PLAIN " + plain("bob", 'pa"ss\\word'),
    b"AUTH SCRAM-SHA-256 " + b64("n,,n=alice,r=abcdefghijkl"),
    b"USER alice",
    b"USER bob",
    b'PASS pa"ss\\word',
    b"PASS wrong",
    b"NOOP",
    b"QUIT",
    b"*",
    b"=",
    b"",
]
line_strategy = st.one_of(
    st.sampled_from(COMMANDS),
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")),
    st.text(max_size=30).map(lambda t: t.replace("\n", "").encode()),
)


def _refuse_relay(server: Pop3Server, event: RelayAuth | RelayResponse) -> list[Event]:
    return server.relay_result(False, BackendFailure.INVALID_CREDENTIALS)


class FuzzDriver(ServerDriver):
    """The kit's driver answering every callback; input after Close or
    Splice is not fed."""

    def __init__(self, settings: SessionSettings) -> None:
        super().__init__(
            Pop3Server(settings), tls=True, backend=backend_ready(()), relay=_refuse_relay
        )

    def send(self, data: bytes | str) -> bytes:
        if self.closed or self.of(Splice):
            return b""
        return super().send(data)

    def finish(self) -> None:
        """Whatever state the machine is in, it still answers: end a partial
        line and any exchange, then QUIT. Separate reads, since a pipelined
        STLS rightly discards what follows it in the same read."""
        for data in (b"\r\n", b"*\r\n", b"*\r\n", b"QUIT\r\n"):
            self.send(data)
        assert self.server.state in (ServerState.CLOSED, ServerState.SPLICED)
        assert all(e.data.endswith(b"\r\n") for e in self.of(Send))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lines=st.lists(line_strategy, max_size=25),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=10),
    relay=st.booleans(),
    security=st.sampled_from(list(Security)),
)
def test_fuzz_server_command_lines(
    lines: list[bytes], cuts: list[int], relay: bool, security: Security
) -> None:
    driver = FuzzDriver(
        make_settings(security, relay=relay, max_line=120, max_errors=40, max_commands=60)
    )
    data = b"".join(line + b"\r\n" for line in lines)
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    for start, end in itertools.pairwise(points):
        driver.send(data[start:end])
    # Whatever state it is in, it still answers: end any exchange, then QUIT.
    driver.finish()


@settings(max_examples=200, deadline=None)
@given(chunks=st.lists(st.binary(max_size=80), max_size=20))
def test_fuzz_server_random_bytes(chunks: list[bytes]) -> None:
    driver = FuzzDriver(make_settings(max_line=100, max_errors=10))
    for chunk in chunks:
        driver.send(chunk)
    driver.finish()


# ====================================================================== client


def client_settings(**overrides: Any) -> ClientSettings:
    base: dict[str, Any] = {
        "hostname": "authgate.example.org",
        "mechanisms": ("SCRAM-SHA-256", "CRAM-MD5", "PLAIN"),
        "credentials": ClientCredentials("alice", PASSWORDS["alice"]),
        "sasl_context": ClientContext(service="pop", hostname=HOST),
    }
    base.update(overrides)
    return ClientSettings(**base)


def fake_backend(settings: ClientSettings | None = None) -> FakeBackend:
    """A scripted backend: feed it replies, read what the client sent."""
    return FakeBackend(Pop3Client(settings or client_settings()))


def test_client_bad_greeting() -> None:
    backend = fake_backend()
    backend.feed(b"-ERR go away\r\n")
    assert backend.result() == LoginFailed(BackendFailure.UNAVAILABLE, "greeting: -ERR go away")
    assert backend.sent == b""


def test_client_plain_with_initial_response() -> None:
    backend = fake_backend(client_settings(mechanisms=("PLAIN",)))
    assert backend.feed(b"+OK hi\r\n") == b"CAPA\r\n"
    sent = backend.feed(b"+OK\r\nSASL PLAIN LOGIN\r\nUSER\r\n.\r\n")
    assert sent == b"AUTH PLAIN " + plain("alice", PASSWORDS["alice"]) + b"\r\n"
    # No CAPA after the login: nothing needs the TRANSACTION-state list (a
    # mail client's own CAPA reaches the backend through the splice).
    assert backend.feed(b"+OK Logged in.\r\n") == b""
    assert backend.result() == LoggedIn((), b"")


@pytest.mark.parametrize("behind", [b"+OK HOSTILE\r\n", b"+OK HOST"])
def test_client_bytes_behind_the_login_reply_are_out_of_turn(behind: bytes) -> None:
    # Lockstep: we asked nothing after the login, so whatever comes with
    # its +OK (a whole line or part of one) is no answer of the backend's.
    backend = fake_backend(client_settings(mechanisms=("PLAIN",)))
    backend.feed(b"+OK hi\r\n")
    backend.feed(b"+OK\r\nSASL PLAIN\r\n.\r\n")
    assert backend.feed(b"+OK Logged in.\r\n" + behind) == b""
    assert backend.result() == LoginFailed(BackendFailure.UNAVAILABLE, "backend spoke out of turn")
    assert not any(isinstance(e, LoggedIn) for e in backend.events)


def test_client_master_login_uses_authzid() -> None:
    creds = ClientCredentials("master", "mpw", authzid="alice")
    backend = fake_backend(client_settings(credentials=creds, mechanisms=("PLAIN",)))
    backend.feed(b"+OK\r\n")
    sent = backend.feed(b"+OK\r\nSASL PLAIN\r\n.\r\n")
    assert sent == b"AUTH PLAIN " + plain("master", "mpw", "alice") + b"\r\n"


def test_client_long_initial_response_waits_for_challenge() -> None:
    creds = ClientCredentials("alice", "p" * 300)
    backend = fake_backend(client_settings(credentials=creds, mechanisms=("PLAIN",)))
    backend.feed(b"+OK\r\n")
    assert backend.feed(b"+OK\r\nSASL PLAIN\r\n.\r\n") == b"AUTH PLAIN\r\n"
    assert backend.feed(b"+ \r\n") == plain("alice", "p" * 300) + b"\r\n"
    assert backend.feed(b"+OK\r\n") == b""
    assert backend.result() == LoggedIn((), b"")


@pytest.mark.parametrize(
    ("reply", "relay", "failure"),
    [
        (b"-ERR [AUTH] Authentication failed.", False, BackendFailure.REJECTED),
        (b"-ERR [AUTH] Authentication failed.", True, BackendFailure.INVALID_CREDENTIALS),
        (b"-ERR bad", False, BackendFailure.REJECTED),
        (b"-ERR [SYS/TEMP] try later", False, BackendFailure.UNAVAILABLE),
        (b"-ERR [SYS/TEMP] try later", True, BackendFailure.UNAVAILABLE),
        (b"-ERR [IN-USE] locked", True, BackendFailure.UNAVAILABLE),
        (b"-ERR [SYS/PERM] no", True, BackendFailure.INVALID_CREDENTIALS),
        (b"garbage", False, BackendFailure.UNAVAILABLE),
    ],
)
def test_client_auth_failures(reply: bytes, relay: bool, failure: BackendFailure) -> None:
    backend = fake_backend(client_settings(relay=relay, mechanisms=("PLAIN",)))
    backend.feed(b"+OK\r\n")  # greeting; CAPA is answered once asked
    backend.feed(b"+OK\r\nSASL PLAIN\r\n.\r\n")
    if relay:
        backend.call(backend.client.authenticate("PLAIN", b"\0u\0p"))
    backend.feed(reply + b"\r\n")
    result = backend.result()
    assert isinstance(result, LoginFailed) and result.failure is failure


def test_client_user_pass_fallback_when_capa_fails() -> None:
    backend = fake_backend()
    backend.feed(b"+OK\r\n")
    assert backend.feed(b"-ERR unknown command\r\n") == b"USER alice\r\n"
    assert backend.feed(b"+OK\r\n") == b"PASS correct horse\r\n"
    assert backend.feed(b"+OK\r\n") == b""
    assert backend.result() == LoggedIn(())


def test_client_master_login_cannot_use_user_pass() -> None:
    creds = ClientCredentials("master", "mpw", authzid="alice")
    backend = fake_backend(client_settings(credentials=creds))
    backend.feed(b"+OK\r\n")  # greeting; CAPA is answered once asked
    backend.feed(b"+OK\r\nUSER\r\nTOP\r\n.\r\n")
    assert backend.result() == LoginFailed(
        BackendFailure.REJECTED, "backend offers no SASL mechanism for a master login"
    )
    assert backend.sent == b"CAPA\r\n"


def test_client_user_pass_only_with_cleartext_preference() -> None:
    backend = fake_backend(client_settings(mechanisms=("CRAM-MD5",)))
    backend.feed(b"+OK\r\n")  # greeting; CAPA is answered once asked
    backend.feed(b"+OK\r\nUSER\r\n.\r\n")
    result = backend.result()
    assert isinstance(result, LoginFailed) and result.failure is BackendFailure.REJECTED


def test_client_nothing_usable() -> None:
    backend = fake_backend(client_settings(mechanisms=("CRAM-MD5",)))
    backend.feed(b"+OK\r\n")  # greeting; CAPA is answered once asked
    backend.feed(b"+OK\r\nSASL GSSAPI\r\n.\r\n")
    assert backend.result() == LoginFailed(
        BackendFailure.REJECTED, "backend offers no usable login mechanism"
    )


def test_client_malformed_challenge() -> None:
    backend = fake_backend(client_settings(mechanisms=("CRAM-MD5",)))
    backend.feed(b"+OK\r\n")  # greeting; CAPA is answered once asked
    backend.feed(b"+OK\r\nSASL CRAM-MD5\r\n.\r\n")
    assert backend.feed(b"+ !!notbase64\r\n") == b"*\r\n"
    assert backend.result() == LoginFailed(
        BackendFailure.UNAVAILABLE, "backend sent a malformed challenge"
    )


def test_client_mechanism_error_cancels() -> None:
    backend = fake_backend(client_settings(mechanisms=("PLAIN",)))
    backend.feed(b"+OK\r\n")  # greeting; CAPA is answered once asked
    backend.feed(b"+OK\r\nSASL PLAIN\r\n.\r\n")
    assert backend.feed(b"+ " + b64("unexpected") + b"\r\n") == b"*\r\n"
    result = backend.result()
    assert isinstance(result, LoginFailed) and result.failure is BackendFailure.REJECTED


def test_client_success_without_mutual_auth_is_rejected() -> None:
    backend = fake_backend(client_settings(mechanisms=("SCRAM-SHA-256",)))
    backend.feed(b"+OK\r\n")  # greeting; CAPA is answered once asked
    backend.feed(b"+OK\r\nSASL SCRAM-SHA-256\r\n.\r\n")
    backend.feed(b"+OK\r\n")  # success with no server-final: an impostor
    result = backend.result()
    assert isinstance(result, LoginFailed) and result.failure is BackendFailure.REJECTED
    assert not any(isinstance(e, LoggedIn) for e in backend.events)


def test_client_stls_response_injection_discarded() -> None:
    backend = fake_backend(client_settings(starttls=True, mechanisms=("PLAIN",)))
    # No CAPA in the clear: its list would be forgotten at the handshake.
    assert backend.feed(b"+OK\r\n") == b"STLS\r\n"
    # The injected "+OK" must not be taken as the CAPA reply after TLS.
    backend.feed(b"+OK Begin TLS\r\n+OK\r\nSASL PLAIN\r\n.\r\n")
    assert backend.events[-1] == StartTLS()
    assert backend.feed(b"+OK\r\nSASL INJECTED\r\n.\r\n") == b""  # during the handshake
    assert backend.call(backend.client.tls_started()) == b"CAPA\r\n"
    assert backend.client.state is ClientState.CAPABILITY
    assert backend.feed(b"+OK\r\nSASL PLAIN\r\n.\r\n").startswith(b"AUTH PLAIN ")


@pytest.mark.parametrize("refusal", [b"-ERR Unknown command.", b"-ERR STLS not available."])
def test_client_stls_not_offered(refusal: bytes) -> None:
    # RFC 2449 section 5 / RFC 2595 section 4: a backend without STLS says
    # -ERR to it; the login fails before any credentials are sent.
    backend = fake_backend(client_settings(starttls=True))
    assert backend.feed(b"+OK\r\n") == b"STLS\r\n"
    backend.feed(refusal + b"\r\n")
    assert backend.result() == LoginFailed(
        BackendFailure.UNAVAILABLE, "STLS refused: " + refusal.decode()
    )
    assert backend.sent == b"STLS\r\n"


def test_client_relay_queues_early_authenticate_and_relays() -> None:
    backend = fake_backend(client_settings(relay=True, credentials=None))
    assert backend.call(backend.client.authenticate("CRAM-MD5", NO_RESPONSE)) == b""
    backend.feed(b"+OK\r\n")
    assert backend.feed(b"+OK\r\nSASL CRAM-MD5 PLAIN\r\n.\r\n") == b"AUTH CRAM-MD5\r\n"
    backend.feed(b"+ " + b64("<1.2@backend>") + b"\r\n")
    assert backend.events[-1] == RelayChallenge(b"<1.2@backend>")
    assert backend.call(backend.client.respond(b"alice 0123")) == b64("alice 0123") + b"\r\n"
    assert backend.feed(b"+OK\r\n") == b""
    assert backend.result() == LoggedIn(())


def test_client_relay_cancel_and_empty_initial() -> None:
    backend = fake_backend(client_settings(relay=True, credentials=None))
    backend.feed(b"+OK\r\n")  # greeting; CAPA is answered once asked
    backend.feed(b"+OK\r\nSASL LOGIN\r\n.\r\n")
    assert backend.call(backend.client.authenticate("LOGIN", b"")) == b"AUTH LOGIN =\r\n"
    backend.feed(b"+ \r\n")
    assert backend.call(backend.client.respond(None)) == b"*\r\n"
    backend.feed(b"-ERR cancelled\r\n")
    assert backend.result().failure is BackendFailure.INVALID_CREDENTIALS


def test_client_relay_plain_to_user_pass_backend() -> None:
    backend = fake_backend(client_settings(relay=True, credentials=None))
    backend.feed(b"+OK\r\n")  # greeting; CAPA is answered once asked
    backend.feed(b"+OK\r\nUSER\r\n.\r\n")
    assert backend.call(backend.client.authenticate("PLAIN", b"\0bob\0s3 cret")) == b"USER bob\r\n"
    assert backend.feed(b"+OK\r\n") == b"PASS s3 cret\r\n"
    backend.feed(b"-ERR [AUTH] nope\r\n")
    assert backend.result() == LoginFailed(BackendFailure.INVALID_CREDENTIALS, "-ERR [AUTH] nope")


def test_client_out_of_order_calls_raise() -> None:
    client = Pop3Client(client_settings())
    with pytest.raises(ProtocolStateError):
        client.tls_started()
    with pytest.raises(ProtocolStateError):
        client.authenticate("PLAIN", b"x")  # not relay mode
    relay = Pop3Client(client_settings(relay=True))
    with pytest.raises(ProtocolStateError):
        relay.respond(b"x")


# ------------------------------------------- a remembered capability list

KNOWN = ("USER", "SASL PLAIN SCRAM-SHA-256", "PIPELINING")


def test_client_asks_capa_and_reports_the_list_it_learned() -> None:
    backend = fake_backend(client_settings(mechanisms=("PLAIN",)))
    assert backend.client.learned_capabilities is None
    backend.feed(b"+OK\r\n")
    backend.feed(b"+OK\r\nUSER\r\nSASL PLAIN SCRAM-SHA-256\r\nPIPELINING\r\n.\r\n")
    backend.feed(b"+OK Logged in.\r\n")
    assert backend.result() == LoggedIn(())
    assert backend.client.learned_capabilities == KNOWN


def test_client_without_capa_learns_the_user_pass_baseline() -> None:
    backend = fake_backend()
    backend.feed(b"+OK\r\n")
    backend.feed(b"-ERR unknown command\r\n")
    assert backend.client.learned_capabilities == ("USER",)


def test_client_goes_by_a_known_list_without_asking() -> None:
    backend = fake_backend(client_settings(mechanisms=("PLAIN",), known_capabilities=KNOWN))
    # One round trip less: AUTH straight after the greeting.
    assert backend.feed(b"+OK hi\r\n") == b"AUTH PLAIN " + plain("alice", PASSWORDS["alice"]) + b"\r\n"
    assert backend.feed(b"+OK Logged in.\r\n") == b""
    assert backend.result() == LoggedIn(())
    assert backend.client.learned_capabilities is None  # nothing new to remember
    assert b"CAPA" not in backend.sent


def test_client_known_list_of_user_only_logs_in_with_user_pass() -> None:
    backend = fake_backend(client_settings(known_capabilities=("USER",)))
    assert backend.feed(b"+OK\r\n") == b"USER alice\r\n"
    assert backend.feed(b"+OK\r\n") == b"PASS correct horse\r\n"
    backend.feed(b"+OK\r\n")
    assert backend.result() == LoggedIn(())


def test_client_known_list_under_stls_skips_the_capa_after_the_handshake() -> None:
    backend = fake_backend(
        client_settings(mechanisms=("PLAIN",), starttls=True, known_capabilities=KNOWN)
    )
    assert backend.feed(b"+OK\r\n") == b"STLS\r\n"
    backend.feed(b"+OK Begin TLS\r\n")
    assert backend.of(StartTLS)
    assert backend.call(backend.client.tls_started()).startswith(b"AUTH PLAIN ")


def test_client_refused_on_a_known_list_asks_and_the_same_list_lets_the_refusal_stand() -> None:
    backend = fake_backend(client_settings(mechanisms=("PLAIN",), known_capabilities=KNOWN))
    backend.feed(b"+OK\r\n")
    assert backend.feed(b"-ERR [AUTH] Authentication failed.\r\n") == b"CAPA\r\n"
    assert backend.result() is None
    backend.feed(b"+OK\r\nUSER\r\nSASL PLAIN SCRAM-SHA-256\r\nPIPELINING\r\n.\r\n")
    assert backend.result() == LoginFailed(
        BackendFailure.REJECTED, "-ERR [AUTH] Authentication failed."
    )
    assert backend.sent.count(b"AUTH ") == 1  # no second try with the same list
    assert backend.client.learned_capabilities == KNOWN


def test_client_refused_on_an_outdated_list_retries_once_with_the_new_one() -> None:
    # The backend was reconfigured: PLAIN is gone, CRAM-MD5 is offered.
    backend = fake_backend(
        client_settings(mechanisms=("PLAIN", "CRAM-MD5"), known_capabilities=KNOWN)
    )
    backend.feed(b"+OK\r\n")
    assert backend.feed(b"-ERR Unsupported authentication mechanism.\r\n") == b"CAPA\r\n"
    assert backend.feed(b"+OK\r\nSASL CRAM-MD5\r\n.\r\n") == b"AUTH CRAM-MD5\r\n"
    assert backend.client.learned_capabilities == ("SASL CRAM-MD5",)
    # A second refusal is final: the list was just asked.
    assert backend.feed(b"+ PDEyMzQ1QGV4YW1wbGU+\r\n") != b""
    assert backend.feed(b"-ERR [AUTH] no\r\n") == b""
    assert backend.result() == LoginFailed(BackendFailure.REJECTED, "-ERR [AUTH] no")
    assert backend.sent.count(b"CAPA") == 1


def test_client_a_new_list_with_the_same_way_in_lets_the_refusal_stand() -> None:
    # PIPELINING gone, the order changed: the same PLAIN login again would
    # be refused again, and would count twice against us at the backend.
    backend = fake_backend(client_settings(mechanisms=("PLAIN",), known_capabilities=KNOWN))
    backend.feed(b"+OK\r\n")
    assert backend.feed(b"-ERR [AUTH] Authentication failed.\r\n") == b"CAPA\r\n"
    assert backend.feed(b"+OK\r\nSASL SCRAM-SHA-256 PLAIN\r\nUSER\r\n.\r\n") == b""
    assert backend.result() == LoginFailed(
        BackendFailure.REJECTED, "-ERR [AUTH] Authentication failed."
    )
    assert backend.sent.count(b"AUTH ") == 1
    # The new list is still the one to remember.
    assert backend.client.learned_capabilities == ("SASL SCRAM-SHA-256 PLAIN", "USER")


def test_client_a_hang_up_while_re_asking_capa_keeps_the_refusal() -> None:
    # Many POP3 servers close after a refused login: that is no outage.
    backend = fake_backend(client_settings(mechanisms=("PLAIN",), known_capabilities=KNOWN))
    backend.feed(b"+OK\r\n")
    assert backend.feed(b"-ERR [AUTH] Authentication failed.\r\n") == b"CAPA\r\n"
    assert backend.client.connection_ended("backend closed the connection") == LoginFailed(
        BackendFailure.REJECTED, "-ERR [AUTH] Authentication failed."
    )


def test_client_a_hang_up_before_any_answer_is_unavailable() -> None:
    backend = fake_backend(client_settings(mechanisms=("PLAIN",), known_capabilities=KNOWN))
    backend.feed(b"+OK\r\n")
    assert backend.client.connection_ended("backend closed the connection") == LoginFailed(
        BackendFailure.UNAVAILABLE, "backend closed the connection"
    )
    assert backend.client.state is ClientState.FAILED
    assert backend.client.receive_data(b"-ERR late\r\n") == []  # the login is over


def test_client_a_temporary_refusal_on_a_known_list_asks_nothing() -> None:
    backend = fake_backend(client_settings(mechanisms=("PLAIN",), known_capabilities=KNOWN))
    backend.feed(b"+OK\r\n")
    assert backend.feed(b"-ERR [SYS/TEMP] try later\r\n") == b""
    assert backend.result() == LoginFailed(BackendFailure.UNAVAILABLE, "-ERR [SYS/TEMP] try later")


def test_client_a_broken_reply_to_the_second_capa_fails_unavailable() -> None:
    backend = fake_backend(client_settings(mechanisms=("PLAIN",), known_capabilities=KNOWN))
    backend.feed(b"+OK\r\n")
    backend.feed(b"-ERR [AUTH] no\r\n")
    backend.feed(b"what\r\n")
    assert backend.result() == LoginFailed(BackendFailure.UNAVAILABLE, "CAPA reply: what")


def test_client_relay_mode_asks_capa_even_with_a_known_list() -> None:
    # The mail client's own mechanism is checked against the backend's list.
    backend = fake_backend(client_settings(relay=True, known_capabilities=KNOWN))
    assert backend.feed(b"+OK\r\n") == b"CAPA\r\n"


@settings(max_examples=300, deadline=None)
@given(
    chunks=st.lists(st.binary(max_size=60), max_size=15),
    prefix=st.sampled_from([b"", b"+OK\r\n", b"+OK\r\n+OK\r\nSASL PLAIN SCRAM-SHA-256\r\n.\r\n"]),
    relay=st.booleans(),
    starttls=st.booleans(),
    known=st.sampled_from([None, KNOWN, ("USER",)]),
)
def test_fuzz_client(
    chunks: list[bytes],
    prefix: bytes,
    relay: bool,
    starttls: bool,
    known: tuple[str, ...] | None,
) -> None:
    client = Pop3Client(
        client_settings(relay=relay, starttls=starttls, max_line=200, known_capabilities=known)
    )
    if relay:
        client.authenticate("PLAIN", b"\0alice\0pw")
    for chunk in [prefix, *chunks]:
        for event in client.receive_data(chunk):
            assert isinstance(
                event, Send | StartTLS | Derive | LoggedIn | LoginFailed | RelayChallenge
            )
            if isinstance(event, Derive):
                client.derived(event.compute())
            if isinstance(event, StartTLS):
                client.tls_started()
            if isinstance(event, RelayChallenge):
                client.respond(b"")


# ======================================================= client against server


@dataclass
class Net:
    """Delivers events between machines in order, like the proxy would."""

    route: Callable[[str, Any], None] = field(default=lambda node, event: None)
    queue: deque[tuple[str, Any]] = field(default_factory=deque)
    log: list[tuple[str, Any]] = field(default_factory=list)

    def emit(self, node: str, events: Iterable[Any]) -> None:
        self.queue.extend((node, e) for e in events)

    def run(self) -> None:
        for _ in range(500):
            if not self.queue:
                return
            node, event = self.queue.popleft()
            self.log.append((node, event))
            self.route(node, event)
        raise AssertionError("conversation did not finish")

    def of(self, node: str, kind: type) -> list[Any]:
        return [e for n, e in self.log if n == node and isinstance(e, kind)]


class FakeMailbox:
    """What the client sees once spliced through to a logged-in backend."""

    def __init__(self) -> None:
        self.received = bytearray()

    def answer(self, data: bytes) -> bytes:
        self.received += data
        return BACKEND_CAPA if data == b"CAPA\r\n" else b"+OK\r\n"


def terminate_conversation(
    client_cfg: ClientSettings, server_cfg: SessionSettings
) -> tuple[Net, FakeMailbox]:
    """Pop3Client (as a mail client) against Pop3Server (terminate mode)."""
    server, client, mailbox = Pop3Server(server_cfg), Pop3Client(client_cfg), FakeMailbox()
    net = Net()
    tls_waiting: set[str] = set()
    spliced = False

    def route(node: str, event: Any) -> None:
        nonlocal spliced
        if isinstance(event, Derive):  # our client's PBKDF2 (a thread, in the proxy)
            net.emit("client", client.derived(event.compute()))
        elif isinstance(event, StartTLS):
            tls_waiting.add(node)
            if tls_waiting == {"server", "client"}:
                net.emit("server", server.tls_started())
                net.emit("client", client.tls_started())
        elif node == "server":
            if isinstance(event, Send):
                net.emit("client", client.receive_data(event.data))
            elif isinstance(event, Lookup):
                net.emit("server", server.resume(resolve(event.request)))
            elif isinstance(event, Authenticated):
                net.emit("server", server.backend_ready(("TOP", "UIDL")))
            elif isinstance(event, Splice):
                spliced = True
        elif isinstance(event, Send):
            if spliced:
                net.emit("client", client.receive_data(mailbox.answer(event.data)))
            else:
                net.emit("server", server.receive_data(event.data))

    net.route = route
    net.emit("server", server.start())
    net.run()
    return net, mailbox


@pytest.mark.parametrize(
    "mechanism", ["PLAIN", "LOGIN", "CRAM-MD5", "DIGEST-MD5", "NTLM", "SCRAM-SHA-256"]
)
@pytest.mark.parametrize("starttls", [False, True])
def test_client_against_server(mechanism: str, starttls: bool) -> None:
    client_cfg = client_settings(mechanisms=(mechanism,), starttls=starttls)
    server_cfg = make_settings(Security.REQUIRE_SECURE_AUTH if starttls else Security.NONE)
    net, mailbox = terminate_conversation(client_cfg, server_cfg)
    assert net.of("client", LoggedIn) == [LoggedIn(())]
    assert net.of("server", Authenticated) == [Authenticated("alice", "alice", mechanism)]
    assert bool(net.of("server", StartTLS)) is starttls
    assert mailbox.received == b""  # no CAPA once logged in


def test_client_against_server_user_pass() -> None:
    # The server offers only USER (no SASL cleartext mech it could verify
    # besides PLAIN is enabled): the client falls back to USER/PASS.
    server_cfg = make_settings(mechanisms=("CRAM-MD5", "PLAIN"))
    client_cfg = client_settings(mechanisms=("LOGIN",))
    net, _ = terminate_conversation(client_cfg, server_cfg)
    assert net.of("server", Authenticated) == [Authenticated("alice", "alice", "USER-PASS")]
    assert len(net.of("client", LoggedIn)) == 1


def test_client_against_server_wrong_password() -> None:
    client_cfg = client_settings(
        mechanisms=("SCRAM-SHA-256",), credentials=ClientCredentials("alice", "wrong")
    )
    net, _ = terminate_conversation(client_cfg, make_settings())
    assert net.of("client", LoginFailed) == [
        LoginFailed(BackendFailure.REJECTED, "-ERR [AUTH] Authentication failed.")
    ]
    assert [f.reason for f in net.of("server", AuthFailed)] == ["invalid-credentials"]


def relay_conversation(
    user_cfg: ClientSettings, *, backend_mechanisms: tuple[str, ...] = ALL_MECHS
) -> Net:
    """user (Pop3Client) -> front (Pop3Server, relay) -> back (Pop3Client,
    relay) -> backend (Pop3Server, terminate, holding the passwords)."""
    user = Pop3Client(user_cfg)
    front = Pop3Server(make_settings(relay=True))
    back = Pop3Client(client_settings(relay=True, credentials=None))
    backend = Pop3Server(make_settings(mechanisms=backend_mechanisms))
    mailbox = FakeMailbox()
    net = Net()
    state = {"front_spliced": False, "backend_spliced": False}

    def route(node: str, event: Any) -> None:
        if isinstance(event, Derive):  # the mail client's PBKDF2
            assert node == "user"
            net.emit("user", user.derived(event.compute()))
        elif node == "user" and isinstance(event, Send):
            if state["front_spliced"]:
                net.emit("back", [Send(event.data)])  # spliced: straight through
            else:
                net.emit("front", front.receive_data(event.data))
        elif node == "front":
            if isinstance(event, Send):
                net.emit("user", user.receive_data(event.data))
            elif isinstance(event, RelayAuth):
                net.emit("back", back.authenticate(event.mechanism, event.initial))
            elif isinstance(event, RelayResponse):
                net.emit("back", back.respond(event.data))
            elif isinstance(event, Splice):
                state["front_spliced"] = True
        elif node == "back":
            if isinstance(event, Send):
                if state["backend_spliced"]:
                    answer = mailbox.answer(event.data)
                    target = user if state["front_spliced"] else back
                    net.emit("user" if target is user else "back", target.receive_data(answer))
                else:
                    net.emit("backend", backend.receive_data(event.data))
            elif isinstance(event, RelayChallenge):
                net.emit("front", front.relay_challenge(event.data))
            elif isinstance(event, LoggedIn):
                net.emit("front", front.relay_result(True))
            elif isinstance(event, LoginFailed):
                net.emit("front", front.relay_result(False, event.failure))
        elif node == "backend":
            if isinstance(event, Send):
                net.emit("back", back.receive_data(event.data))
            elif isinstance(event, Lookup):
                net.emit("backend", backend.resume(resolve(event.request)))
            elif isinstance(event, Authenticated):
                net.emit("backend", backend.backend_ready(()))
            elif isinstance(event, Splice):
                state["backend_spliced"] = True

    net.route = route
    net.emit("front", front.start())
    net.emit("backend", backend.start())
    net.run()
    return net


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256"])
def test_relay_end_to_end(mechanism: str) -> None:
    net = relay_conversation(client_settings(mechanisms=(mechanism,)))
    assert net.of("backend", Authenticated) == [Authenticated("alice", "alice", mechanism)]
    assert net.of("back", LoggedIn) == [LoggedIn(())]
    assert net.of("user", LoggedIn) == [LoggedIn(())]
    assert len(net.of("front", Splice)) == 1


def test_relay_end_to_end_user_pass_to_user_only_backend() -> None:
    # Mail client speaks USER/PASS, front relays it as PLAIN, back turns it
    # into USER/PASS again because the backend offers no SASL PLAIN.
    net = relay_conversation(
        client_settings(mechanisms=("PLAIN",)), backend_mechanisms=("CRAM-MD5", "LOGIN")
    )
    # The user's client has SASL LOGIN on offer but prefers PLAIN only: USER/PASS.
    assert net.of("front", RelayAuth) == [RelayAuth("PLAIN", b"\0alice\0correct horse")]
    assert net.of("backend", Authenticated) == [Authenticated("alice", "alice", "USER-PASS")]
    assert len(net.of("user", LoggedIn)) == 1


def test_relay_end_to_end_wrong_password() -> None:
    net = relay_conversation(
        client_settings(mechanisms=("CRAM-MD5",), credentials=ClientCredentials("alice", "bad"))
    )
    assert net.of("back", LoginFailed)[0].failure is BackendFailure.INVALID_CREDENTIALS
    assert net.of("front", AuthFailed) == [AuthFailed("CRAM-MD5", "invalid-credentials", None)]
    assert net.of("user", LoginFailed) == [
        LoginFailed(BackendFailure.REJECTED, "-ERR [AUTH] Authentication failed.")
    ]


def test_client_relay_can_retry_after_refusal() -> None:
    backend = fake_backend(client_settings(relay=True, credentials=None))
    backend.feed(b"+OK\r\n")  # greeting; CAPA is answered once asked
    backend.feed(b"+OK\r\nSASL PLAIN\r\n.\r\n")
    backend.call(backend.client.authenticate("PLAIN", b"\0bob\0wrong"))
    backend.feed(b"-ERR [AUTH] Authentication failed.\r\n")
    assert backend.result().failure is BackendFailure.INVALID_CREDENTIALS
    assert backend.client.state is ClientState.READY
    assert backend.call(backend.client.authenticate("PLAIN", b'\0bob\0pa"ss\\word')) == (
        b"AUTH PLAIN " + plain("bob", 'pa"ss\\word') + b"\r\n"
    )
    # A malformed reply, unlike a refusal, ends the machine.
    backend.feed(b"what?\r\n")
    assert state_of(backend.client) is ClientState.FAILED


def state_of(client: Pop3Client) -> ClientState:
    return client.state  # a call, so mypy does not keep an earlier narrowing


# ====================================================== server: password length

LONG_PASSWORD = "é" * 513  # 1,026 octets of UTF-8: over the 1,024 cap
TOO_LONG_REPLY = b"-ERR [AUTH] Password too long (at most 1024 octets).\r\n"


@pytest.mark.parametrize(
    "lines",
    [
        [b"USER alice", b"PASS " + LONG_PASSWORD.encode()],
        [b"AUTH PLAIN " + plain("alice", LONG_PASSWORD)],
        [b"AUTH LOGIN", b64("alice"), b64(LONG_PASSWORD)],
    ],
    ids=["user-pass", "auth-plain", "auth-login"],
)
def test_password_over_the_cap_is_refused_without_a_lookup(lines: list[bytes]) -> None:
    session = greeted()
    reply = session.send(b"".join(line + b"\r\n" for line in lines))
    assert reply.endswith(TOO_LONG_REPLY)
    assert session.of(Lookup) == []
    assert [e.reason for e in session.of(AuthFailed)] == [FailureReason.TOO_LONG.value]
    session.send(b"USER alice\r\nPASS correct horse\r\n")
    assert session.of(Authenticated) == [Authenticated("alice", "alice", "USER-PASS")]


def test_the_stores_name_for_the_user_is_the_session() -> None:
    server = Pop3Server(make_settings())
    server.start()
    sent = server.receive_data(b"USER ALICE\r\nPASS pw\r\n")
    assert [e.request.authcid for e in sent if isinstance(e, Lookup)] == ["ALICE"]
    events = server.resume(PasswordVerdict(True, "alice"))
    assert [e for e in events if isinstance(e, Authenticated)] == [
        Authenticated("alice", "alice", "USER-PASS")
    ]
    server = Pop3Server(make_settings())
    server.start()
    server.receive_data(b"USER ALICE\r\nPASS pw\r\n")
    events = server.resume(PasswordVerdict(False, "alice"))
    assert [e.authcid for e in events if isinstance(e, AuthFailed)] == ["alice"]


# ------------------------------------------------- client: replies out of turn


def test_client_refuses_replies_sent_before_their_command() -> None:
    backend = fake_backend(client_settings(mechanisms=("PLAIN",)))
    assert backend.feed(b"+OK\r\n+OK\r\nSASL PLAIN\r\n.\r\n") == b"CAPA\r\n"
    result = backend.result()
    assert isinstance(result, LoginFailed) and result.failure is BackendFailure.UNAVAILABLE


def test_client_relay_refuses_data_while_waiting_for_the_mail_client() -> None:
    backend = fake_backend(client_settings(relay=True, credentials=None))
    backend.feed(b"+OK\r\n")
    backend.feed(b"+OK\r\nSASL PLAIN\r\n.\r\n")
    assert backend.client.state is ClientState.READY
    assert backend.feed(b"+OK logged in\r\n") == b""
    result = backend.result()
    assert isinstance(result, LoginFailed) and result.failure is BackendFailure.UNAVAILABLE


def test_client_relay_after_a_refusal_unasked_data_ends_it_quietly() -> None:
    backend = fake_backend(client_settings(relay=True, credentials=None))
    backend.feed(b"+OK\r\n")
    backend.feed(b"+OK\r\nSASL PLAIN\r\n.\r\n")
    backend.call(backend.client.authenticate("PLAIN", b"\0bob\0wrong"))
    backend.feed(b"-ERR [AUTH] Authentication failed.\r\n")
    assert backend.feed(b"+OK surprise\r\n") == b""
    assert backend.result().failure is BackendFailure.INVALID_CREDENTIALS  # one LoginFailed
    assert backend.client.state is ClientState.FAILED


def test_client_refuses_a_reply_sent_while_pbkdf2_ran() -> None:
    backend = fake_backend(client_settings(mechanisms=("SCRAM-SHA-256",)))
    backend.feed(b"+OK\r\n")
    sent = backend.feed(b"+OK\r\nSASL SCRAM-SHA-256\r\n.\r\n")
    nonce = base64.b64decode(sent.split()[-1]).decode().split("r=")[1]
    salt = base64.b64encode(b"salt").decode()
    backend.feed(b"+ " + base64.b64encode(f"r={nonce}SRV,s={salt},i=4096".encode()) + b"\r\n")
    (derive,) = [e for e in backend.events if isinstance(e, Derive)]
    assert backend.feed(b"+OK logged in\r\n") == b""  # before it had our proof
    assert backend.call(backend.client.derived(derive.compute())) == b""
    result = backend.result()
    assert isinstance(result, LoginFailed) and result.failure is BackendFailure.UNAVAILABLE
