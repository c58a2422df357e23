"""ManageSieve (RFC 5804): the server dialect, the backend client, and the
string/literal parser they share. Sans-IO: no sockets."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authgate.policy import Protocol, Security
from authgate.protocols.base import (
    Authenticated,
    AuthFailed,
    BackendFailure,
    ClientEvent,
    ClientSettings,
    Close,
    Event,
    LoggedIn,
    LoginFailed,
    RelayAuth,
    RelayChallenge,
    RelayResponse,
    Send,
    SessionSettings,
    Splice,
    StartTLS,
)
from authgate.protocols.client import ClientState
from authgate.protocols.common import LineBuffer, LineTooLong
from authgate.protocols.managesieve import (
    MAX_QUOTED,
    LogicalLines,
    ManageSieveClient,
    ManageSieveServer,
    ManageSieveSpliceFilter,
    SieveSyntaxError,
    Token,
    TokenKind,
    encode_string,
    parse_line,
)
from authgate.sasl.base import NO_RESPONSE, ClientContext, ClientCredentials, Derive, Lookup
from authgate.testing.kit import (
    FakeBackend,
    ServerDriver,
    b64,
    backend_fails,
    backend_ready,
    listener_settings,
    plain,
    plain_message,
    resolve,
)

HOST = "gate.example.test"
OUTSIDER = "198.51.100.7"
PASSWORD = "correct horse"
GOOD = plain("alice", PASSWORD)
# What Dovecot's managesieve says about itself (its greeting's lines).
DOVECOT_CAPS = (
    "IMPLEMENTATION Dovecot Pigeonhole",
    "SIEVE fileinto reject envelope vacation",
    "NOTIFY mailto",
    "SASL PLAIN",
    "STARTTLS",
    "VERSION 1.0",
)


def session(
    security: Security = Security.NONE,
    mechanisms: Sequence[str] = ("PLAIN", "CRAM-MD5", "SCRAM-SHA-256"),
    **kwargs: Any,
) -> SessionSettings:
    kwargs.setdefault("starttls_available", True)
    kwargs.setdefault("backend_capabilities", lambda: DOVECOT_CAPS)
    return listener_settings(
        Protocol.MANAGESIEVE, security, mechanisms, hostname=HOST, client=OUTSIDER, **kwargs
    )


def driver(security: Security = Security.NONE, **kwargs: Any) -> ServerDriver:
    backend = kwargs.pop("backend", backend_ready())
    tls = kwargs.pop("tls", False)
    return ServerDriver(ManageSieveServer(session(security, **kwargs)), backend=backend, tls=tls)


def q(data: bytes | str) -> str:
    """A quoted string, as a client writes one."""
    raw = data if isinstance(data, bytes) else data.encode()
    return encode_string(raw, client=True).decode()


def capability_lines(reply: bytes) -> list[list[bytes]]:
    """The capability lines of a capability response, as token values."""
    lines = bytes(reply).split(b"\r\n")  # parse_line takes bytes, not a bytearray
    out = []
    for line in lines:
        if line.startswith(b'"'):
            out.append([t.value for t in parse_line(line)])
    return out


# ================================================================ greeting


def test_greeting_lists_our_sasl_the_backends_sieve_and_starttls() -> None:
    d = driver(Security.REQUIRE_SECURE_AUTH)
    caps = capability_lines(d.greeting)
    assert caps == [
        [b"IMPLEMENTATION", b"authgate"],
        # The policy withholds PLAIN without TLS; the backend's "SASL PLAIN"
        # is not ours to repeat.
        [b"SASL", b"CRAM-MD5 SCRAM-SHA-256"],
        [b"SIEVE", b"fileinto reject envelope vacation"],
        [b"NOTIFY", b"mailto"],
        [b"STARTTLS"],
        [b"VERSION", b"1.0"],
    ]
    assert d.greeting.endswith(b'OK "gate.example.test authgate ready."\r\n')


def test_require_encrypted_offers_no_mechanism_before_tls() -> None:
    d = driver(Security.REQUIRE_ENCRYPTED)
    assert [b"SASL", b""] in capability_lines(d.greeting)
    reply = d.say(f"AUTHENTICATE {q('PLAIN')} {q(GOOD)}")
    assert reply.startswith('NO (ENCRYPT-NEEDED) "')
    assert [f.reason for f in d.of(AuthFailed)] == ["tls-required"]


def test_backend_capability_values_cannot_break_our_lines() -> None:
    hostile = ('SIEVE fileinto"\r\nOK "injected', "OWNER alice", "SIEVE twice", "MAXREDIRECTS 4")
    d = driver(backend_capabilities=lambda: hostile)
    caps = capability_lines(d.greeting)
    assert [c[0] for c in caps] == [
        b"IMPLEMENTATION",
        b"SASL",
        b"SIEVE",
        b"MAXREDIRECTS",
        b"STARTTLS",
        b"VERSION",
    ]
    assert caps[2] == [b"SIEVE", b'fileinto"??OK "injected']
    assert d.greeting.count(b"\r\nOK ") == 1


def test_capability_and_noop() -> None:
    d = driver()
    reply = d.send(b"capability\r\n")
    assert capability_lines(reply) == capability_lines(d.greeting)
    assert reply.endswith(b'OK "Capability completed."\r\n')
    assert d.say(f"NOOP {q('tag-1')}") == 'OK (TAG "tag-1") "Done."\r\n'
    # A tag a browser could use to reflect markup is not echoed (ALPACA).
    assert d.say(f"NOOP {q('<script>')}") == 'OK "NOOP completed."\r\n'
    assert not d.of(AuthFailed) and not d.closed


def test_logout() -> None:
    d = driver()
    assert d.say("LOGOUT") == 'OK "Logout completed."\r\n'
    assert d.events[-1] == Close()


# ================================================================ STARTTLS


def test_starttls_resends_capabilities_after_the_handshake() -> None:
    d = driver(Security.REQUIRE_SECURE_AUTH, tls=True)
    reply = d.send(b"STARTTLS\r\n")
    first, _, after = reply.partition(b"\r\n")
    assert first == b'OK "Begin TLS negotiation now."'
    caps = capability_lines(after)
    assert [b"SASL", b"PLAIN CRAM-MD5 SCRAM-SHA-256"] in caps
    assert [b"STARTTLS"] not in caps
    assert after.endswith(b'OK "TLS negotiation successful."\r\n')
    assert d.server.tls_active
    # Inside TLS cleartext PLAIN is allowed; a second STARTTLS is not.
    assert d.say("STARTTLS").startswith('NO "TLS is already active."')
    assert d.say(f"AUTHENTICATE {q('PLAIN')} {q(GOOD)}") == 'OK "Logged in."\r\n'


def test_starttls_injection_is_discarded() -> None:
    d = driver()
    injected = f"AUTHENTICATE {q('PLAIN')} {q(GOOD)}\r\n".encode()
    reply = d.send(b"STARTTLS\r\n" + injected)
    assert reply == b'OK "Begin TLS negotiation now."\r\n'
    assert d.events[-1] == StartTLS(discarded=len(injected))
    assert d.server.receive_data(injected) == []  # during the handshake too
    after = d.call(d.server.tls_started())
    assert after.endswith(b'OK "TLS negotiation successful."\r\n')
    assert not d.of(Lookup) and not d.of(Authenticated)


def test_starttls_injection_inside_a_literal_is_discarded() -> None:
    d = driver()
    body = GOOD
    injected = b'AUTHENTICATE "PLAIN" {%d+}\r\n%s\r\n' % (len(body), body)
    d.send(b"STARTTLS\r\n" + injected[:20])
    d.send(injected[20:])
    d.call(d.server.tls_started())
    assert not d.of(Lookup) and not d.of(Authenticated)


def test_starttls_without_tls_configured() -> None:
    d = driver(starttls_available=False)
    assert [b"STARTTLS"] not in capability_lines(d.greeting)
    assert d.say("STARTTLS") == 'NO "STARTTLS is not available."\r\n'


# =========================================================== AUTHENTICATE


@pytest.mark.parametrize("form", ["quoted", "literal", "sync-literal"])
def test_initial_response_quoted_or_literal(form: str) -> None:
    d = driver()
    if form == "quoted":
        line = b'AUTHENTICATE "PLAIN" "' + GOOD + b'"\r\n'
    else:
        plus = b"+" if form == "literal" else b""
        line = b"AUTHENTICATE {5%s}\r\nPLAIN {%d%s}\r\n%s\r\n" % (plus, len(GOOD), plus, GOOD)
    assert d.send(line) == b'OK "Logged in."\r\n'
    assert d.of(Authenticated) == [Authenticated("alice", "alice", "PLAIN")]
    assert d.events[-1] == Splice()


@pytest.mark.parametrize("framing", ["quoted", "literal"])
def test_challenge_and_string_response(framing: str) -> None:
    d = driver()
    assert d.say('AUTHENTICATE "PLAIN"') == '""\r\n'  # an empty challenge: an empty string
    response = b'"%s"\r\n' % GOOD if framing == "quoted" else b"{%d+}\r\n%s\r\n" % (len(GOOD), GOOD)
    assert d.send(response) == b'OK "Logged in."\r\n'


def test_cancel_is_the_string_star() -> None:
    d = driver()
    d.say('AUTHENTICATE "PLAIN"')
    assert d.say('"*"') == 'NO "Authentication cancelled."\r\n'
    assert [(f.reason, f.authcid) for f in d.of(AuthFailed)] == [("cancelled", None)]
    assert d.say(f'AUTHENTICATE "PLAIN" {q(GOOD)}') == 'OK "Logged in."\r\n'


@pytest.mark.parametrize("line", [GOOD.decode(), "*", f'"{GOOD.decode()}" "x"', '"unterminated'])
def test_a_response_that_is_not_one_string_is_malformed(line: str) -> None:
    d = driver()
    d.say('AUTHENTICATE "PLAIN"')
    assert d.say(line) == 'NO "Malformed authentication data."\r\n'
    assert [f.reason for f in d.of(AuthFailed)] == ["malformed"]


def test_wrong_password() -> None:
    d = driver()
    reply = d.say(f'AUTHENTICATE "PLAIN" {q(plain("alice", "guess"))}')
    assert reply == 'NO "Authentication failed."\r\n'
    assert d.of(AuthFailed) == [AuthFailed("PLAIN", "invalid-credentials", "alice")]


@pytest.mark.parametrize(
    "line",
    [
        "AUTHENTICATE PLAIN",  # an atom where a string belongs
        'AUTHENTICATE "PLAIN" "a" "b"',
        "AUTHENTICATE",
        '"AUTHENTICATE" "PLAIN"',
        "CAPABILITY extra",
    ],
)
def test_syntax_errors(line: str) -> None:
    d = driver()
    assert d.say(line) == 'NO "Syntax error."\r\n'
    assert not d.of(Lookup)


def test_unknown_and_authenticated_state_commands() -> None:
    d = driver(max_errors=5)
    assert d.say("BOGUS") == 'NO "Unknown command."\r\n'
    assert d.say('PUTSCRIPT "s" {4+}\r\nkeep') == 'NO "Authenticate first."\r\n'
    assert d.say("LISTSCRIPTS") == 'NO "Authenticate first."\r\n'


def test_unsupported_mechanism() -> None:
    d = driver()
    assert d.say('AUTHENTICATE "GSSAPI"') == 'NO "Unsupported authentication mechanism."\r\n'
    assert [f.reason for f in d.of(AuthFailed)] == ["not-available"]


def test_policy_refuses_cleartext_plain_without_tls() -> None:
    d = driver(Security.REQUIRE_SECURE_AUTH)
    reply = d.say(f'AUTHENTICATE "PLAIN" {q(GOOD)}')
    assert reply.startswith('NO (ENCRYPT-NEEDED) "Plaintext authentication disallowed')
    assert [f.reason for f in d.of(AuthFailed)] == ["mechanism-needs-tls"]
    assert not d.of(Lookup)


def test_exempt_client_may_use_plain_without_tls() -> None:
    d = driver(Security.REQUIRE_SECURE_AUTH, exempt=["198.51.100.0/24"])
    assert d.say(f'AUTHENTICATE "PLAIN" {q(GOOD)}') == 'OK "Logged in."\r\n'


def test_backend_failure_is_trylater_and_the_session_goes_on() -> None:
    d = driver(backend=backend_fails(BackendFailure.UNAVAILABLE))
    reply = d.say(f'AUTHENTICATE "PLAIN" {q(GOOD)}')
    assert reply == 'NO (TRYLATER) "Sieve server unavailable, try again later."\r\n'
    assert [f.reason for f in d.of(AuthFailed)] == ["backend-unavailable"]
    assert not d.closed


def test_pipelined_bytes_after_login_go_to_the_backend() -> None:
    d = driver()
    d.send(f'AUTHENTICATE "PLAIN" {q(GOOD)}\r\nLISTSCRIPTS\r\n'.encode())
    assert d.events[-1] == Splice(pending=b"LISTSCRIPTS\r\n")


# ============================================================ limits


def test_quoted_string_over_1024_octets_is_a_syntax_error() -> None:
    d = driver(max_line=4096)
    assert d.say(f'NOOP "{"a" * (MAX_QUOTED + 1)}"') == 'NO "Syntax error."\r\n'
    assert d.say(f'NOOP "{"a" * MAX_QUOTED}"') == 'OK "NOOP completed."\r\n'


def test_literal_larger_than_max_line_ends_the_session_unread() -> None:
    d = driver(max_line=256)
    reply = d.send(b'AUTHENTICATE "PLAIN" {100000+}\r\n')
    assert reply == b'BYE "Line too long."\r\n'
    assert d.events[-1] == Close()
    assert d.server.receive_data(b"x" * 1000) == []


def test_lines_and_literals_together_count_toward_max_line() -> None:
    d = driver(max_line=100)
    chunk = b"{40+}\r\n" + b"a" * 40 + b" "
    reply = d.send(b"NOOP " + chunk * 3 + b"\r\n")
    assert reply == b'BYE "Line too long."\r\n'


def test_max_errors() -> None:
    d = driver(max_errors=3)
    d.say("BOGUS")
    d.say("BOGUS")
    reply = d.say("BOGUS")
    assert reply.endswith('BYE "Too many errors."\r\n')
    assert d.events[-1] == Close()


# ============================================================ relay mode


def test_relay_passes_sasl_through() -> None:
    d = driver(relay=True)
    assert d.say('AUTHENTICATE "CRAM-MD5"') == ""
    assert d.of(RelayAuth) == [RelayAuth("CRAM-MD5", NO_RESPONSE)]
    assert d.call(d.server.relay_challenge(b"<1.2@host>")) == b'"' + b64(b"<1.2@host>") + b'"\r\n'
    d.send(b'"' + b64(b"alice 0123") + b'"\r\n')
    assert d.of(RelayResponse) == [RelayResponse(b"alice 0123")]
    assert d.call(d.server.relay_result(True)) == b'OK "Logged in."\r\n'
    assert d.events[-1] == Splice()


def test_relay_initial_response_and_refusal() -> None:
    d = driver(relay=True)
    d.send(b'AUTHENTICATE "PLAIN" {%d+}\r\n%s\r\n' % (len(GOOD), GOOD))
    assert d.of(RelayAuth) == [RelayAuth("PLAIN", plain_message("alice", PASSWORD))]
    reply = d.call(d.server.relay_result(False, BackendFailure.INVALID_CREDENTIALS))
    assert reply == b'NO "Authentication failed."\r\n'


def test_relay_response_that_is_not_a_string_cancels_at_the_backend() -> None:
    d = driver(relay=True)
    d.say('AUTHENTICATE "CRAM-MD5"')
    d.call(d.server.relay_challenge(b"<1.2@host>"))
    d.say("notastring")
    assert d.of(RelayResponse) == [RelayResponse(None)]
    assert d.call(d.server.relay_result(False)) == b'NO "Malformed authentication data."\r\n'


# ======================================================== client machine


def client_settings(**kwargs: Any) -> ClientSettings:
    kwargs.setdefault("mechanisms", ("PLAIN",))
    kwargs.setdefault("credentials", ClientCredentials("master", "master secret", "alice"))
    return ClientSettings(hostname="gw.example", **kwargs)


GREETING = (
    b'"IMPLEMENTATION" "Dovecot Pigeonhole"\r\n"SIEVE" "fileinto reject"\r\n'
    b'"NOTIFY" "mailto"\r\n"SASL" "PLAIN"\r\n"STARTTLS"\r\n"VERSION" "1.0"\r\n'
    b'OK "Dovecot ready."\r\n'
)
MASTER_PLAIN = b64(b"alice\0master\0master secret")


def test_client_master_login() -> None:
    b = FakeBackend(ManageSieveClient(client_settings()))
    assert b.feed(GREETING) == b'AUTHENTICATE "PLAIN" "' + MASTER_PLAIN + b'"\r\n'
    assert b.feed(b'OK "Logged in."\r\n') == b""
    assert b.result() == LoggedIn((), b"")


def test_client_greeting_in_pieces_and_pending_bytes() -> None:
    b = FakeBackend(ManageSieveClient(client_settings()))
    for i in range(0, len(GREETING), 7):
        b.feed(GREETING[i : i + 7])
    assert b.sent.startswith(b'AUTHENTICATE "PLAIN"')
    b.feed(b'OK "Logged in."\r\n')
    assert b.result() == LoggedIn((), b"")


def test_client_starttls_waits_for_the_capabilities_sent_unasked() -> None:
    client = ManageSieveClient(client_settings(starttls=True))
    b = FakeBackend(client)
    assert b.feed(GREETING) == b"STARTTLS\r\n"
    # Bytes behind the OK were sent in the clear: dropped (response injection).
    b.feed(b'OK "Begin TLS."\r\nOK "Logged in."\r\n')
    assert b.of(StartTLS) == [StartTLS()]
    assert b.call(client.tls_started()) == b""
    assert client.state is ClientState.CAPABILITY
    after_tls = GREETING.replace(b'"STARTTLS"\r\n', b"").replace(b"Dovecot ready", b"TLS ok")
    assert b.feed(after_tls).startswith(b'AUTHENTICATE "PLAIN"')
    b.feed(b'OK "Logged in."\r\n')
    assert isinstance(b.result(), LoggedIn)


def test_client_refuses_a_backend_without_starttls() -> None:
    b = FakeBackend(ManageSieveClient(client_settings(starttls=True)))
    b.feed(GREETING.replace(b'"STARTTLS"\r\n', b""))
    result = b.result()
    assert isinstance(result, LoginFailed) and result.failure is BackendFailure.UNAVAILABLE


@pytest.mark.parametrize(
    ("reply", "relay", "failure"),
    [
        (b'NO "Authentication failed."\r\n', False, BackendFailure.REJECTED),
        (b'NO "Authentication failed."\r\n', True, BackendFailure.INVALID_CREDENTIALS),
        (b'NO (TRYLATER) "Busy."\r\n', True, BackendFailure.UNAVAILABLE),
        (b'BYE "Going down."\r\n', False, BackendFailure.UNAVAILABLE),
        (b"junk (\r\n", False, BackendFailure.UNAVAILABLE),
    ],
)
def test_client_classifies_refusals(reply: bytes, relay: bool, failure: BackendFailure) -> None:
    client = ManageSieveClient(client_settings(relay=relay))
    b = FakeBackend(client)
    b.feed(GREETING)
    if relay:
        b.call(client.authenticate("PLAIN", b"\0alice\0pw"))
    b.feed(reply)
    result = b.result()
    assert isinstance(result, LoginFailed) and result.failure is failure


def test_client_capabilities_only() -> None:
    b = FakeBackend(ManageSieveClient(client_settings(capabilities_only=True)))
    assert b.feed(GREETING) == b""
    result = b.result()
    assert isinstance(result, LoggedIn)
    assert "SIEVE fileinto reject" in result.capabilities
    assert "STARTTLS" in result.capabilities


def test_client_takes_a_literal_challenge_and_answers_with_a_string() -> None:
    client = ManageSieveClient(client_settings(relay=True))
    b = FakeBackend(client)
    b.feed(GREETING.replace(b'"SASL" "PLAIN"', b'"SASL" "CRAM-MD5"'))
    assert b.call(client.authenticate("CRAM-MD5", NO_RESPONSE)) == b'AUTHENTICATE "CRAM-MD5"\r\n'
    challenge = b64(b"<1.2@host>")
    b.feed(b"{%d}\r\n%s\r\n" % (len(challenge), challenge))
    assert b.of(RelayChallenge) == [RelayChallenge(b"<1.2@host>")]
    assert b.call(client.respond(b"alice 0123")) == b'"' + b64(b"alice 0123") + b'"\r\n'
    b.feed(b'OK "Logged in."\r\n')
    assert isinstance(b.result(), LoggedIn)


def test_client_cancels_with_the_string_star() -> None:
    client = ManageSieveClient(client_settings(relay=True))
    b = FakeBackend(client)
    b.feed(GREETING)
    b.call(client.authenticate("PLAIN", NO_RESPONSE))
    b.feed(b'""\r\n')
    assert b.call(client.respond(None)) == b'"*"\r\n'


def test_client_long_initial_response_goes_as_a_literal() -> None:
    client = ManageSieveClient(client_settings(relay=True))
    b = FakeBackend(client)
    b.feed(GREETING)
    message = b"\0alice\0" + b"p" * 2000
    sent = b.call(client.authenticate("PLAIN", message))
    encoded = b64(message)
    assert sent == b'AUTHENTICATE "PLAIN" {%d+}\r\n%s\r\n' % (len(encoded), encoded)


def test_client_out_of_turn_reply_fails() -> None:
    b = FakeBackend(ManageSieveClient(client_settings()))
    b.feed(GREETING + b'OK "Logged in."\r\n')
    result = b.result()
    assert isinstance(result, LoginFailed) and "out of turn" in result.detail


# ================================================ our client and our server


_NAMES = ("mua", "gw", "up", "backend")
_PEER = {"mua": "gw", "gw": "mua", "up": "backend", "backend": "up"}


@dataclass
class Sim:
    """A mail client (our ManageSieve client) talks to the gateway (our
    server); in relay mode the gateway's backend client talks to a backend
    (another of our servers). Bytes are shuttled until quiet."""

    mua: ManageSieveClient
    gw: ManageSieveServer
    up: ManageSieveClient | None = None
    backend: ManageSieveServer | None = None
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
                    self.dispatch(name, getattr(self, name).receive_data(data))
                    progressed = True
            for client, server in (("mua", "gw"), ("up", "backend")):
                if {client, server} <= self.tls:
                    self.tls -= {client, server}
                    self.dispatch(server, getattr(self, server).tls_started())
                    self.dispatch(client, getattr(self, client).tls_started())
                    progressed = True
            if not progressed:
                return
        raise AssertionError("conversation did not settle")

    def dispatch(self, name: str, events: Sequence[Event | ClientEvent]) -> None:
        machine = getattr(self, name)
        for event in events:
            self.log[name].append(event)
            if isinstance(event, Send):
                self.inbox[_PEER[name]] += event.data
            elif isinstance(event, StartTLS):
                self.tls.add(name)
            elif isinstance(event, Lookup):
                self.dispatch(name, machine.resume(resolve(event.request)))
            elif isinstance(event, Derive):
                self.dispatch(name, machine.derived(event.compute()))
            elif isinstance(event, Authenticated):
                self.dispatch(name, machine.backend_ready(()))
            elif name == "gw" and self.up is not None:
                if isinstance(event, RelayAuth):
                    self.dispatch("up", self.up.authenticate(event.mechanism, event.initial))
                elif isinstance(event, RelayResponse):
                    self.dispatch("up", self.up.respond(event.data))
            elif name == "up":
                if isinstance(event, RelayChallenge):
                    self.dispatch("gw", self.gw.relay_challenge(event.data))
                elif isinstance(event, LoggedIn):
                    self.dispatch("gw", self.gw.relay_result(True))
                elif isinstance(event, LoginFailed):
                    self.dispatch("gw", self.gw.relay_result(False, event.failure))

    def of(self, name: str, kind: type[Any]) -> list[Any]:
        return [e for e in self.log[name] if isinstance(e, kind)]


MECHS = ("PLAIN", "LOGIN", "CRAM-MD5", "DIGEST-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256")


def mua(mech: str, password: str = PASSWORD, **kwargs: Any) -> ManageSieveClient:
    return ManageSieveClient(
        ClientSettings(
            hostname="laptop",
            mechanisms=(mech,),
            credentials=ClientCredentials("alice", password),
            sasl_context=ClientContext(hostname=HOST),
            **kwargs,
        )
    )


@pytest.mark.parametrize("mech", MECHS)
def test_our_client_logs_in_to_our_server(mech: str) -> None:
    sim = Sim(mua(mech, starttls=True), ManageSieveServer(session(mechanisms=(mech,))))
    sim.run()
    assert sim.of("mua", LoggedIn) == [LoggedIn((), b"")]
    assert sim.of("gw", Authenticated) == [Authenticated("alice", "alice", mech)]


@pytest.mark.parametrize("mech", ["SCRAM-SHA-256", "SCRAM-SHA-1"])
def test_success_data_travels_in_the_sasl_response_code(mech: str) -> None:
    sim = Sim(mua(mech), ManageSieveServer(session(mechanisms=(mech,))))
    sim.run()
    assert sim.of("mua", LoggedIn)
    sent = b"".join(e.data for e in sim.of("gw", Send))
    assert b'\r\nOK (SASL "' in sent


@pytest.mark.parametrize("mech", MECHS)
def test_wrong_password_through_our_client(mech: str) -> None:
    sim = Sim(mua(mech, "wrong"), ManageSieveServer(session(mechanisms=(mech,))))
    sim.run()
    (result,) = sim.of("mua", LoginFailed)
    assert result.failure is BackendFailure.REJECTED
    assert [f.reason for f in sim.of("gw", AuthFailed)] == ["invalid-credentials"]


@pytest.mark.parametrize("mech", MECHS)
def test_relay_chain(mech: str) -> None:
    """mail client -> gateway (relay) -> backend client -> backend server;
    SCRAM's proof comes back from the backend in its OK
    (SASL ...) and reaches the mail client as a last challenge."""
    sim = Sim(
        mua(mech),
        ManageSieveServer(session(mechanisms=(mech,), relay=True)),
        ManageSieveClient(ClientSettings(hostname="gw", relay=True, starttls=True)),
        ManageSieveServer(session(mechanisms=(mech,))),
    )
    sim.run()
    assert sim.of("mua", LoggedIn) == [LoggedIn((), b"")]
    assert sim.of("gw", Splice) == [Splice(b"")]
    assert not sim.of("gw", Lookup)
    assert sim.of("backend", Authenticated) == [Authenticated("alice", "alice", mech)]
    assert sim.of("up", StartTLS)


# ================================================== the parser (hypothesis)

_value = st.binary(max_size=80)
_atom = st.from_regex(rb"[A-Za-z0-9*.+_-]{1,12}", fullmatch=True)


@st.composite
def _lines(draw: st.DrawFn) -> tuple[list[Token], bytes]:
    """Tokens and one way to write them (strings quoted or as literals)."""
    tokens = [Token(TokenKind.ATOM, draw(_atom))]
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.booleans()):
            tokens.append(Token(TokenKind.STRING, draw(_value)))
        else:
            tokens.append(Token(TokenKind.ATOM, draw(_atom)))
    parts = []
    for token in tokens:
        if token.kind is TokenKind.ATOM:
            parts.append(token.value)
        elif draw(st.booleans()) or any(b in token.value for b in b"\r\n\0"):
            plus = b"+" if draw(st.booleans()) else b""
            parts.append(b"{%d%s}\r\n" % (len(token.value), plus) + token.value)
        else:
            parts.append(encode_string(token.value))
    return tokens, b" ".join(parts) + b"\r\n"


@given(st.lists(_lines(), min_size=1, max_size=4), st.lists(st.integers(1, 40), max_size=30))
@settings(max_examples=300, deadline=None)
def test_framing_and_parsing_round_trip_in_any_chunking(
    lines: list[tuple[list[Token], bytes]], cuts: list[int]
) -> None:
    wire = b"".join(raw for _, raw in lines)
    buffer = LineBuffer(4096)
    framer = LogicalLines(buffer, 4096)
    got: list[list[Token]] = []
    pos = 0
    for size in [*cuts, len(wire)]:
        buffer.feed(wire[pos : pos + size])
        pos += size
        while (raw := framer.next()) is not None:
            got.append(parse_line(raw))
        if pos >= len(wire):
            break
    assert got == [tokens for tokens, _ in lines]
    assert not framer.pending


@given(st.binary(max_size=300))
@settings(max_examples=500, deadline=None)
def test_parser_takes_any_bytes(data: bytes) -> None:
    buffer = LineBuffer(128)
    framer = LogicalLines(buffer, 128)
    buffer.feed(data)
    for _ in range(400):
        try:
            raw = framer.next()
        except LineTooLong:
            return
        if raw is None:
            return
        with contextlib.suppress(SieveSyntaxError):
            parse_line(raw)
    raise AssertionError("more logical lines than bytes")


@given(st.binary(max_size=2000))
@settings(max_examples=200, deadline=None)
def test_encode_string_round_trips(value: bytes) -> None:
    encoded = encode_string(value) + b"\r\n"
    buffer = LineBuffer(4096)
    buffer.feed(encoded)
    raw = LogicalLines(buffer, 8192).next()
    assert raw is not None and parse_line(raw) == [Token(TokenKind.STRING, value)]


@given(st.lists(st.binary(max_size=60), max_size=8), st.booleans(), st.booleans())
@settings(max_examples=300, deadline=None)
def test_random_client_bytes_never_crash_the_server(
    chunks: list[bytes], relay: bool, tls: bool
) -> None:
    d = driver(Security.REQUIRE_SECURE_AUTH, relay=relay, tls=tls, max_line=200)
    for chunk in [b'AUTHENTICATE "PLAIN"\r\n', *chunks]:
        if d.closed or any(isinstance(e, Splice) for e in d.events):
            break
        if d.of(RelayAuth) or d.of(RelayResponse):
            break  # waiting for the backend: not the client's turn
        d.send(chunk)


@given(st.lists(st.binary(max_size=60), max_size=8), st.booleans())
@settings(max_examples=300, deadline=None)
def test_random_backend_bytes_never_crash_the_client(chunks: list[bytes], starttls: bool) -> None:
    client = ManageSieveClient(client_settings(starttls=starttls))
    b = FakeBackend(client)
    for chunk in [GREETING, *chunks]:
        if b.result() is not None:
            break
        if client.state is ClientState.TLS:
            b.call(client.tls_started())
        b.feed(chunk)


def test_parse_line_rejects_bad_quoting() -> None:
    for raw in (b'"a\\x"', b'"a\rb"', b"{3+}\r\nab", b"{x}\r\n", b"NOOP \x01"):
        with pytest.raises(SieveSyntaxError):
            parse_line(raw)


# ================================================== after the hand-over


def filter_all(chunks: list[bytes], max_line: int = 200) -> tuple[bytes, bytes, bool, list[Any]]:
    guard = ManageSieveSpliceFilter(max_line)
    backend, client, events = b"", b"", []
    for chunk in chunks:
        out = guard.from_client(chunk)
        backend += out.to_backend
        client += out.to_client
        events += out.events
        if out.close:
            return backend, client, True, events
    return backend, client, False, events


def test_splice_filter_passes_commands_and_literals_unread() -> None:
    script = b"UNAUTHENTICATE\r\nSTARTTLS\r\n" * 30  # inside a literal: data, not commands
    wire = b'PUTSCRIPT "s" {%d+}\r\n%s\r\nLISTSCRIPTS\r\nSETACTIVE "s"\r\n' % (len(script), script)
    for size in (1, 7, 64, len(wire)):
        chunks = [wire[i : i + size] for i in range(0, len(wire), size)]
        backend, client, closed, events = filter_all(chunks)
        assert backend == wire and client == b"" and not closed and events == []


@pytest.mark.parametrize("command", [b"UNAUTHENTICATE", b'authenticate "PLAIN" "x"', b"StartTLS"])
def test_splice_filter_ends_the_session_at_a_command_that_would_log_in_again(
    command: bytes,
) -> None:
    backend, client, closed, events = filter_all([b"LISTSCRIPTS\r\n" + command + b"\r\nLOGOUT\r\n"])
    assert backend == b"LISTSCRIPTS\r\n"  # what came before still goes
    assert closed and client.startswith(b'BYE "')
    assert [type(e).__name__ for e in events] == ["Refused"]


def test_splice_filter_bounds_lines_and_literal_counts() -> None:
    _, client, closed, _ = filter_all([b"NOOP " + b"x" * 300], max_line=200)
    assert closed and client == b'BYE "line too long."\r\n'
    backend, client, closed, _ = filter_all([b'NOOP "a"\r\nPUTSCRIPT "s" {99999999999+}\r\n'])
    assert backend == b'NOOP "a"\r\n' and closed and client == b'BYE "literal too large."\r\n'


@given(st.lists(_lines(), min_size=1, max_size=4), st.lists(st.integers(1, 40), max_size=30))
@settings(max_examples=200, deadline=None)
def test_splice_filter_forwards_any_other_command_in_any_chunking(
    lines: list[tuple[list[Token], bytes]], cuts: list[int]
) -> None:
    refused = {b"UNAUTHENTICATE", b"AUTHENTICATE", b"STARTTLS"}
    lines = [(tokens, raw) for tokens, raw in lines if tokens[0].value.upper() not in refused]
    wire = b"".join(raw for _, raw in lines)
    chunks, pos = [], 0
    for size in cuts:
        chunks.append(wire[pos : pos + size])
        pos += size
    chunks.append(wire[pos:])
    backend, client, closed, _ = filter_all(chunks, max_line=4096)
    assert backend == wire and client == b"" and not closed


def test_a_one_way_password_store_leaves_only_cleartext_mechanisms() -> None:
    # Passwords stored as SHA: CRAM-MD5 and SCRAM cannot be verified, so the
    # capability list (inside TLS) offers PLAIN only and refuses the others.
    d = driver(verifiable=("PLAIN", "LOGIN"), tls=True)
    d.send(b"STARTTLS\r\n")
    caps = capability_lines(d.out[len(d.greeting) :])
    assert [b"SASL", b"PLAIN"] in caps
    assert d.say('AUTHENTICATE "CRAM-MD5"') == 'NO "Unsupported authentication mechanism."\r\n'
    assert [f.reason for f in d.of(AuthFailed)] == ["not-available"]
    assert d.say(f'AUTHENTICATE "PLAIN" {q(GOOD)}') == 'OK "Logged in."\r\n'


def test_mechanisms_are_listed_in_the_admins_order() -> None:
    d = driver(mechanisms=("SCRAM-SHA-256", "CRAM-MD5", "PLAIN"))
    assert [b"SASL", b"SCRAM-SHA-256 CRAM-MD5 PLAIN"] in capability_lines(d.greeting)
    d = driver(mechanisms=("PLAIN", "SCRAM-SHA-256"))
    assert [b"SASL", b"PLAIN SCRAM-SHA-256"] in capability_lines(d.greeting)
