"""NNTP server and client machines (RFC 3977, 4642, 4643), sans-IO."""

from __future__ import annotations

import base64
import itertools
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
from authgate.protocols.nntp import (
    AUTHINFO_USER,
    FAILURE_REPLIES,
    NntpClient,
    NntpServer,
)
from authgate.protocols.server import ServerState
from authgate.sasl.base import (
    NO_RESPONSE,
    STORE_UNAVAILABLE,
    ClientContext,
    ClientCredentials,
    Derive,
    FailureReason,
    Lookup,
    ServerContext,
    client_step,
)
from authgate.sasl.scram import ScramSHA256Client
from authgate.testing.kit import (
    PASSWORDS,
    FakeBackend,
    ServerDriver,
    b64,
    backend_fails,
    backend_ready,
    listener_settings,
    plain,
)

HOST = "news.example.org"
CLIENT_IP = "192.0.2.10"
EXEMPT_IP = "10.1.2.3"
ALL_MECHS = ("SCRAM-SHA-256", "CRAM-MD5", "DIGEST-MD5", "NTLM", "LOGIN", "PLAIN")
PASSWORD = PASSWORDS["alice"]


def make_settings(security: Security = Security.NONE, **kw: Any) -> SessionSettings:
    """The NNTP listener's settings as the proxy builds them (kit.listener_settings)."""
    kw = {"mechanisms": ALL_MECHS, "client": CLIENT_IP, "starttls_available": True, **kw}
    context = ServerContext(service="nntp", hostname=HOST)
    return listener_settings(Protocol.NNTP, security, hostname=HOST, context=context, **kw)


def greeted(settings: SessionSettings | None = None, *, tls: bool = True, **kw: Any) -> ServerDriver:
    session = ServerDriver(
        NntpServer(settings or make_settings(**kw)), tls=tls, backend=backend_ready(())
    )
    assert session.greeting == f"200 {HOST} authgate ready\r\n".encode()
    return session


def capabilities(session: ServerDriver) -> list[str]:
    reply = session.send(b"CAPABILITIES\r\n").decode().split("\r\n")
    assert reply[0] == "101 Capability list:" and reply[-2:] == [".", ""]
    assert reply[1] == "VERSION 2"  # RFC 3977 section 5.2.2: first
    return reply[1:-2]


BASE = ["VERSION 2", "READER", "IMPLEMENTATION authgate"]


# ==================================================== server: CAPABILITIES


@pytest.mark.parametrize(
    ("security", "client", "tls", "expected"),
    [
        (Security.NONE, CLIENT_IP, False,
         ["STARTTLS", "AUTHINFO USER SASL", "SASL " + " ".join(ALL_MECHS)]),
        (Security.REQUIRE_SECURE_AUTH, CLIENT_IP, False,
         ["STARTTLS", "AUTHINFO SASL", "SASL SCRAM-SHA-256 CRAM-MD5 DIGEST-MD5 NTLM"]),
        (Security.REQUIRE_SECURE_AUTH, CLIENT_IP, True,
         ["AUTHINFO USER SASL", "SASL " + " ".join(ALL_MECHS)]),
        (Security.REQUIRE_SECURE_AUTH, EXEMPT_IP, False,
         ["STARTTLS", "AUTHINFO USER SASL", "SASL " + " ".join(ALL_MECHS)]),
        (Security.REQUIRE_ENCRYPTED, CLIENT_IP, False, ["STARTTLS"]),
    ],
)  # fmt: skip
def test_capabilities_per_policy(
    security: Security, client: str, tls: bool, expected: list[str]
) -> None:
    session = greeted(make_settings(security, client=client, exempt=["10.0.0.0/8"], tls_active=tls))
    assert capabilities(session) == BASE + expected


def test_capabilities_asked_again_after_starttls() -> None:
    session = greeted(make_settings(Security.REQUIRE_SECURE_AUTH))
    assert "AUTHINFO SASL" in capabilities(session)
    assert session.send(b"STARTTLS\r\n") == b"382 Continue with TLS negotiation\r\n"
    caps = capabilities(session)
    assert "STARTTLS" not in caps and "AUTHINFO USER SASL" in caps


def test_capabilities_store_cannot_verify_challenge_response() -> None:
    session = greeted(make_settings(verifiable=["PLAIN", "LOGIN"]))
    assert capabilities(session)[-2:] == ["AUTHINFO USER SASL", "SASL LOGIN PLAIN"]


# ============================================== server: commands before login


@pytest.mark.parametrize(
    "command", [b"GROUP local.test", b"ARTICLE 1", b"LIST", b"post", b"OVER 1-2", b"DATE"]
)
def test_reader_commands_need_a_login(command: bytes) -> None:
    session = greeted()
    assert session.send(command + b"\r\n") == b"480 Authentication required\r\n"
    assert [f for f in session.of(AuthFailed)] == []


def test_require_encrypted_answers_483_to_all_but_capabilities_starttls_quit() -> None:
    session = greeted(make_settings(Security.REQUIRE_ENCRYPTED, max_errors=10))
    for command in (b"GROUP x", b"AUTHINFO USER alice", b"AUTHINFO SASL PLAIN", b"MODE READER"):
        reply = session.send(command + b"\r\n")
        assert reply == b"483 Encryption required: use STARTTLS first\r\n", command
    assert session.send(b"CAPABILITIES\r\n").startswith(b"101 ")
    session = greeted(make_settings(Security.REQUIRE_ENCRYPTED, starttls_available=False))
    assert session.send(b"GROUP x\r\n") == b"483 Encryption required\r\n"
    assert session.send(b"HELP\r\n").startswith(b"100 ")
    assert session.send(b"QUIT\r\n") == b"205 Connection closing\r\n"
    assert session.closed


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"FROB", b"500 Unknown command"),
        (b"MODE STREAM", b"501 Syntax error"),
        (b"AUTHINFO", b"501 Syntax error"),
        (b"AUTHINFO GENERIC x", b"501 Syntax error"),
        (b"AUTHINFO USER", b"501 Syntax error"),
        (b"AUTHINFO PASS x", b"482 Authentication commands issued out of sequence"),
        (b"AUTHINFO SASL", b"501 Syntax error"),
        (b"AUTHINFO SASL PL@IN", b"501 Syntax error"),
        (b"AUTHINFO SASL PLAIN a b", b"501 Syntax error"),
        (b"AUTHINFO SASL NOPE", b"503 Mechanism not recognized"),
        (b"STARTTLS now", b"501 Syntax error"),
        (b"mode reader", b"200 Reader mode, posting permitted"),
    ],
)
def test_replies(line: bytes, reply: bytes) -> None:
    assert greeted().send(line + b"\r\n") == reply + b"\r\n"


def test_starttls_unavailable_or_active() -> None:
    assert greeted(starttls_available=False).send(b"STARTTLS\r\n").startswith(b"502 ")
    session = greeted()
    session.send(b"STARTTLS\r\n")
    assert session.send(b"STARTTLS\r\n") == b"502 TLS is already active\r\n"


def test_every_failure_reason_has_a_reply() -> None:
    assert set(FAILURE_REPLIES) == set(FailureReason)
    for text in FAILURE_REPLIES.values():
        assert text[:3] in {"481", "482", "483", "403"}


# ==================================================== server: AUTHINFO USER


def test_authinfo_user_pass_login() -> None:
    session = greeted()
    assert session.send(b"AUTHINFO USER alice\r\n") == b"381 Password required\r\n"
    reply = session.send(f"AUTHINFO PASS {PASSWORD}\r\nGROUP local.test\r\n".encode())
    assert reply == b"281 Authentication accepted\r\n"
    assert session.of(Authenticated) == [Authenticated("alice", "alice", AUTHINFO_USER)]
    assert session.of(Splice) == [Splice(pending=b"GROUP local.test\r\n")]


def test_authinfo_wrong_password_and_retry() -> None:
    session = greeted()
    reply = session.send(b"AUTHINFO USER alice\r\nAUTHINFO PASS nope nope\r\n")
    assert reply == b"381 Password required\r\n481 Authentication failed\r\n"
    assert session.of(AuthFailed) == [AuthFailed(AUTHINFO_USER, "invalid-credentials", "alice")]
    # PASS must follow USER directly.
    assert session.send(b"AUTHINFO PASS x\r\n").startswith(b"482 ")
    session.send(b"AUTHINFO USER alice\r\n")
    assert session.send(f"AUTHINFO PASS {PASSWORD}\r\n".encode()).startswith(b"281 ")


def test_authinfo_user_refused_without_tls() -> None:
    session = greeted(make_settings(Security.REQUIRE_SECURE_AUTH))
    reply = session.send(b"AUTHINFO USER alice\r\n")
    assert reply == b"483 Encryption required for AUTHINFO USER\r\n"
    assert [f.reason for f in session.of(AuthFailed)] == ["mechanism-needs-tls"]
    assert session.send(f"AUTHINFO PASS {PASSWORD}\r\n".encode()).startswith(b"482 ")
    assert not session.of(Lookup)


def test_authinfo_user_disabled() -> None:
    session = greeted(make_settings(mechanisms=("CRAM-MD5",)))
    assert session.send(b"AUTHINFO USER alice\r\n") == b"502 AUTHINFO USER is not available\r\n"


def test_authinfo_pass_too_long_is_refused_before_hashing() -> None:
    session = greeted()
    session.send(b"AUTHINFO USER alice\r\n")
    assert session.send(b"AUTHINFO PASS " + b"x" * 1100 + b"\r\n").startswith(b"481 Password too")
    assert not session.of(Lookup)


# ==================================================== server: AUTHINFO SASL


def test_sasl_plain_initial_response() -> None:
    session = greeted()
    reply = session.send(b"AUTHINFO SASL PLAIN " + plain("alice", PASSWORD) + b"\r\n")
    assert reply == b"281 Authentication accepted\r\n"
    assert session.of(Authenticated) == [Authenticated("alice", "alice", "PLAIN")]


def test_sasl_empty_challenge_is_equals_sign_and_response_too() -> None:
    session = greeted()
    assert session.send(b"AUTHINFO SASL PLAIN\r\n") == b"383 =\r\n"
    assert session.send(plain("alice", PASSWORD) + b"\r\n").startswith(b"281 ")
    # "=" is the empty response to a challenge (RFC 4643 section 2.4.1):
    # the mechanism gets b"", not a base64 error.
    session = greeted()
    assert session.send(b"AUTHINFO SASL PLAIN\r\n") == b"383 =\r\n"
    session.send(b"=\r\n")
    assert [f.detail for f in session.of(AuthFailed)] != ["response is not base64"]
    assert session.of(AuthFailed)[0].reason == "malformed"  # an empty PLAIN message
    # ... and the empty initial response (section 2.4.2).
    session = greeted()
    assert session.send(b"AUTHINFO SASL PLAIN =\r\n").startswith(b"48")
    assert session.of(AuthFailed)[0].detail != "initial response is not base64"


def test_sasl_cancel_is_481() -> None:
    session = greeted()
    session.send(b"AUTHINFO SASL PLAIN\r\n")
    assert session.send(b"*\r\n") == b"481 Authentication cancelled\r\n"
    assert [f.reason for f in session.of(AuthFailed)] == ["cancelled"]


def test_sasl_not_base64_is_protocol_error() -> None:
    session = greeted()
    assert session.send(b"AUTHINFO SASL PLAIN %%%\r\n") == b"482 SASL protocol error\r\n"


def test_sasl_mechanism_needs_tls() -> None:
    session = greeted(make_settings(Security.REQUIRE_SECURE_AUTH))
    reply = session.send(b"AUTHINFO SASL PLAIN " + plain("alice", PASSWORD) + b"\r\n")
    assert reply == b"483 Encryption required for this mechanism\r\n"
    assert not session.of(Lookup)


def test_scram_additional_data_comes_with_283() -> None:
    client = ScramSHA256Client(ClientCredentials("alice", PASSWORD), ClientContext())
    session = greeted()
    first = session.send(b"AUTHINFO SASL SCRAM-SHA-256 " + b64(client.start()) + b"\r\n")
    assert first.startswith(b"383 ")
    final = session.send(b64(client_step(client, base64.b64decode(first[4:].strip()))) + b"\r\n")
    # RFC 4643 section 2.4.1: the server-final message is the 283's data,
    # no final challenge for the client to answer.
    assert final.startswith(b"283 ")
    client.finish(base64.b64decode(final[4:].strip()))
    assert session.of(Authenticated) == [Authenticated("alice", "alice", "SCRAM-SHA-256")]
    assert session.server.state is ServerState.SPLICED


def test_temporary_store_failure_is_403_not_an_error() -> None:
    session = ServerDriver(NntpServer(make_settings(max_errors=1)), lookups=False)
    session.send(b"AUTHINFO SASL PLAIN " + plain("alice", PASSWORD) + b"\r\n")
    reply = session.call(session.server.resume(STORE_UNAVAILABLE))
    assert reply.startswith(b"403 ") and not session.closed


def test_backend_failed_keeps_session_unauthenticated() -> None:
    session = ServerDriver(
        NntpServer(make_settings()), backend=backend_fails(BackendFailure.UNAVAILABLE)
    )
    reply = session.send(b"AUTHINFO SASL PLAIN " + plain("alice", PASSWORD) + b"\r\n")
    assert reply == b"403 News server unavailable, try again later\r\n"
    assert [f.reason for f in session.of(AuthFailed)] == ["backend-unavailable"]
    assert session.send(b"CAPABILITIES\r\n").startswith(b"101 ")


def test_max_errors_goodbye() -> None:
    session = greeted(max_errors=2)
    session.send(b"GROUP x\r\n")
    assert session.send(b"GROUP x\r\n") == (
        b"480 Authentication required\r\n400 Too many errors, closing connection\r\n"
    )
    assert session.closed


def test_line_too_long_goodbye() -> None:
    session = greeted(max_line=50)
    assert session.send(b"X" * 100 + b"\r\n").startswith(b"400 Line too long")
    assert session.closed


def test_starttls_injection_is_discarded() -> None:
    session = greeted(tls=False)
    injected = b"AUTHINFO USER alice\r\nAUTHINFO PASS " + PASSWORD.encode() + b"\r\n"
    reply = session.send(b"STARTTLS\r\n" + injected)
    assert reply == b"382 Continue with TLS negotiation\r\n"
    assert session.events[-1] == StartTLS(discarded=len(injected))
    assert session.server.receive_data(b"AUTHINFO USER bob\r\n") == []
    assert session.call(session.server.tls_started()) == b""
    # The AUTHINFO USER from before the handshake is gone too.
    assert session.send(f"AUTHINFO PASS {PASSWORD}\r\n".encode()).startswith(b"482 ")
    assert not session.of(Lookup) and not session.of(Authenticated)


# ========================================================== server: relay


def test_relay_authinfo_user_becomes_plain() -> None:
    session = ServerDriver(NntpServer(make_settings(relay=True)))
    session.send(b"AUTHINFO USER alice\r\n")
    assert session.send(b"AUTHINFO PASS pw with space\r\n") == b""
    assert session.of(RelayAuth) == [RelayAuth("PLAIN", b"\0alice\0pw with space")]
    assert session.call(session.server.relay_result(True)) == b"281 Authentication accepted\r\n"


def test_relay_sasl_challenges() -> None:
    session = ServerDriver(NntpServer(make_settings(relay=True)))
    assert session.send(b"AUTHINFO SASL CRAM-MD5\r\n") == b""
    assert session.of(RelayAuth) == [RelayAuth("CRAM-MD5", NO_RESPONSE)]
    assert session.call(session.server.relay_challenge(b"<1.2@x>")) == b"383 " + b64("<1.2@x>") + b"\r\n"
    session.send(b"=\r\n")
    assert session.of(RelayResponse) == [RelayResponse(b"")]
    reply = session.call(session.server.relay_result(False, BackendFailure.INVALID_CREDENTIALS))
    assert reply == b"481 Authentication failed\r\n"


# ================================================================== fuzzing

line_strategy = st.one_of(
    st.sampled_from(
        [
            b"CAPABILITIES", b"MODE READER", b"STARTTLS", b"AUTHINFO USER alice",
            b"AUTHINFO PASS " + PASSWORD.encode(), b"AUTHINFO PASS x",
            b"AUTHINFO SASL PLAIN", b"AUTHINFO SASL PLAIN =", b"AUTHINFO SASL CRAM-MD5",
            b"AUTHINFO SASL PLAIN " + plain("alice", PASSWORD), b"=", b"*", b"GROUP x",
            b"QUIT", b"HELP", b"AUTHINFO SASL SCRAM-SHA-256 biwsbj1hbGljZSxyPXh5eg==",
        ]
    ),
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")),
)  # fmt: skip


def _refuse_relay(server: NntpServer, event: RelayAuth | RelayResponse) -> list[Event]:
    return server.relay_result(False, BackendFailure.INVALID_CREDENTIALS)


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
    session = ServerDriver(
        NntpServer(make_settings(security, relay=relay, max_line=120, max_errors=40)),
        tls=True,
        backend=backend_ready(()),
        relay=_refuse_relay,
    )
    data = b"".join(line + b"\r\n" for line in lines)
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    for start, end in itertools.pairwise(points):
        if session.closed or session.of(Splice):
            break
        session.send(data[start:end])
    for data in (b"\r\n", b"*\r\n", b"*\r\n", b"QUIT\r\n"):
        if session.closed or session.of(Splice):
            break
        session.send(data)
    assert session.server.state in (ServerState.CLOSED, ServerState.SPLICED)
    assert all(e.data.endswith(b"\r\n") for e in session.of(Send))


# ====================================================================== client


def client_settings(**overrides: Any) -> ClientSettings:
    base: dict[str, Any] = {
        "hostname": "authgate.example.org",
        "mechanisms": ("PLAIN",),
        "credentials": ClientCredentials("proxy", "proxy-pw", authzid="alice"),
        "sasl_context": ClientContext(service="nntp", hostname=HOST),
    }
    base.update(overrides)
    return ClientSettings(**base)


INN_CAPS = (
    b"101 Capability list:\r\nVERSION 2\r\nIMPLEMENTATION INN 2.7.1\r\nAUTHINFO USER SASL\r\n"
    b"READER\r\nSASL CRAM-MD5 PLAIN\r\nSTARTTLS\r\n.\r\n"
)


def test_client_terminate_uses_the_proxy_account_with_authinfo_user() -> None:
    backend = FakeBackend(NntpClient(client_settings()))
    assert backend.feed(b"201 INN ready (no posting)\r\n") == b"CAPABILITIES\r\n"
    assert backend.feed(INN_CAPS) == b"AUTHINFO USER proxy\r\n"
    assert backend.feed(b"381 Enter password\r\n") == b"AUTHINFO PASS proxy-pw\r\n"
    assert backend.feed(b"281 Authentication succeeded\r\n211 leftover") == b""
    assert backend.result() == LoggedIn((), b"211 leftover")


def test_client_terminate_sasl_when_no_authinfo_user() -> None:
    backend = FakeBackend(NntpClient(client_settings()))
    backend.feed(b"200 hi\r\n")
    caps = b"101 caps\r\nVERSION 2\r\nAUTHINFO SASL\r\nSASL PLAIN\r\n.\r\n"
    assert backend.feed(caps) == b"AUTHINFO SASL PLAIN " + plain("proxy", "proxy-pw", "alice") + b"\r\n"
    backend.feed(b"281 ok\r\n")
    assert isinstance(backend.result(), LoggedIn)


def test_client_starttls_then_capabilities_again_and_injection_dropped() -> None:
    backend = FakeBackend(NntpClient(client_settings(starttls=True)))
    backend.feed(b"200 hi\r\n")
    assert backend.feed(INN_CAPS) == b"STARTTLS\r\n"
    # Response injection: bytes behind the 382 are dropped.
    assert backend.feed(b"382 go ahead\r\n281 fake\r\n") == b""
    assert backend.of(StartTLS) == [StartTLS()]
    assert backend.call(backend.client.tls_started()) == b"CAPABILITIES\r\n"
    caps_after = INN_CAPS.replace(b"STARTTLS\r\n", b"")
    assert backend.feed(caps_after) == b"AUTHINFO USER proxy\r\n"


def test_client_mode_reader_for_a_transit_server() -> None:
    backend = FakeBackend(NntpClient(client_settings()))
    backend.feed(b"200 innd\r\n")
    assert backend.feed(b"101 c\r\nVERSION 2\r\nMODE-READER\r\n.\r\n") == b"MODE READER\r\n"
    assert backend.feed(b"201 nnrpd\r\n") == b"CAPABILITIES\r\n"
    assert backend.feed(INN_CAPS) == b"AUTHINFO USER proxy\r\n"


@pytest.mark.parametrize(
    ("reply", "relay", "failure"),
    [
        (b"481 no", False, BackendFailure.REJECTED),
        (b"481 no", True, BackendFailure.INVALID_CREDENTIALS),
        (b"403 trouble", True, BackendFailure.UNAVAILABLE),
        (b"283 junk%", True, BackendFailure.UNAVAILABLE),
        (b"999 what", False, BackendFailure.UNAVAILABLE),
    ],
)
def test_client_refusals(reply: bytes, relay: bool, failure: BackendFailure) -> None:
    backend = FakeBackend(NntpClient(client_settings(relay=relay)))
    backend.feed(b"200 hi\r\n" + b"")
    backend.feed(INN_CAPS)
    if relay:
        backend.call(backend.client.authenticate("CRAM-MD5", NO_RESPONSE))
    else:
        backend.feed(b"381 pw\r\n")
    backend.feed(reply + b"\r\n")
    result = backend.result()
    assert isinstance(result, LoginFailed) and result.failure is failure


def test_client_relay_plain_goes_as_authinfo_user() -> None:
    backend = FakeBackend(NntpClient(client_settings(relay=True)))
    assert backend.call(backend.client.authenticate("PLAIN", b"\0alice\0pw x")) == b""
    backend.feed(b"200 hi\r\n")
    assert backend.feed(INN_CAPS) == b"AUTHINFO USER alice\r\n"
    assert backend.feed(b"381 pw\r\n") == b"AUTHINFO PASS pw x\r\n"
    assert backend.feed(b"481 nope\r\n") == b""
    assert backend.result() == LoginFailed(BackendFailure.INVALID_CREDENTIALS, "481 nope")
    # The backend stays un-authenticated: the reader's next attempt goes on.
    assert backend.call(backend.client.authenticate("PLAIN", b"\0alice\0pw")) == (
        b"AUTHINFO USER alice\r\n"
    )


def test_client_relay_sasl_challenge_and_283() -> None:
    backend = FakeBackend(NntpClient(client_settings(relay=True)))
    backend.feed(b"200 hi\r\n")
    backend.feed(INN_CAPS)
    assert backend.call(backend.client.authenticate("CRAM-MD5", NO_RESPONSE)) == (
        b"AUTHINFO SASL CRAM-MD5\r\n"
    )
    backend.feed(b"383 " + b64("<1@x>") + b"\r\n")
    assert backend.of(RelayChallenge) == [RelayChallenge(b"<1@x>")]
    assert backend.call(backend.client.respond(b"alice abc")) == b64("alice abc") + b"\r\n"
    backend.feed(b"281 ok\r\n")
    assert isinstance(backend.result(), LoggedIn)


def test_client_long_initial_response_waits_for_challenge() -> None:
    creds = ClientCredentials("proxy", "p" * 400)
    backend = FakeBackend(NntpClient(client_settings(credentials=creds)))
    backend.feed(b"200 hi\r\n")
    caps = b"101 c\r\nVERSION 2\r\nAUTHINFO SASL\r\nSASL PLAIN\r\n.\r\n"
    assert backend.feed(caps) == b"AUTHINFO SASL PLAIN\r\n"
    assert backend.feed(b"383 =\r\n") == b64(b"\0proxy\0" + b"p" * 400) + b"\r\n"


def test_client_out_of_order_calls_raise() -> None:
    client = NntpClient(client_settings())
    with pytest.raises(ProtocolStateError):
        client.authenticate("PLAIN", b"")
    with pytest.raises(ProtocolStateError):
        client.tls_started()


@settings(max_examples=300, deadline=None)
@given(
    chunks=st.lists(st.binary(max_size=60), max_size=15),
    prefix=st.sampled_from([b"", b"200 hi\r\n", b"200 hi\r\n" + INN_CAPS]),
    relay=st.booleans(),
    starttls=st.booleans(),
)
def test_fuzz_client(chunks: list[bytes], prefix: bytes, relay: bool, starttls: bool) -> None:
    client = NntpClient(client_settings(relay=relay, starttls=starttls, max_line=200))
    if relay:
        client.authenticate("PLAIN", b"\0alice\0pw")
    for chunk in [prefix, *chunks]:
        for event in client.receive_data(chunk):
            assert isinstance(
                event, Send | StartTLS | Derive | LoggedIn | LoginFailed | RelayChallenge
            )
            if isinstance(event, StartTLS):
                client.tls_started()
            if isinstance(event, RelayChallenge):
                client.respond(b"")


@pytest.mark.parametrize(("answer", "logged_in"), [(b"", True), (b"no", False)])
def test_client_relay_283_data_goes_to_the_reader_as_a_challenge(
    answer: bytes, logged_in: bool
) -> None:
    backend = FakeBackend(NntpClient(client_settings(relay=True)))
    backend.feed(b"200 hi\r\n")
    backend.feed(INN_CAPS.replace(b"CRAM-MD5", b"SCRAM-SHA-256"))
    backend.call(backend.client.authenticate("SCRAM-SHA-256", b"n,,n=alice,r=abc"))
    backend.feed(b"383 " + b64("r=abcdef,s=c2FsdA==,i=4096") + b"\r\n")
    backend.call(backend.client.respond(b"c=biws,r=abcdef,p=cHJvb2Y="))
    assert backend.feed(b"283 " + b64("v=c2lnbmF0dXJl") + b"\r\n") == b""
    assert backend.of(RelayChallenge)[-1] == RelayChallenge(b"v=c2lnbmF0dXJl")
    assert backend.call(backend.client.respond(answer)) == b""  # nothing more to the backend
    result = backend.result()
    assert isinstance(result, LoggedIn if logged_in else LoginFailed), result
