"""The contract every server dialect keeps (IMAP, POP3, SMTP, NNTP, ManageSieve), one test per
rule, parametrised over the dialects.

Where the machines differ today the difference is written down in
`DIFFERENCES` below, each marked "to unify" (no reason anyone wrote down:
the one core of issue #12 should make them agree) or "deliberate" (with
the RFC reason). A test that pins a difference reads its expectation from
that table, so unifying a behaviour means changing one line there.
Adding a protocol means adding a `Dialect` and a line to each table.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from authgate.policy import Protocol, Security
from authgate.protocols.base import (
    Authenticated,
    AuthFailed,
    BackendFailure,
    Close,
    ProtocolStateError,
    RelayAuth,
    ServerMachine,
    SessionSettings,
    Splice,
    StartTLS,
)
from authgate.protocols.common import b64encode
from authgate.protocols.imap import ImapServer
from authgate.protocols.managesieve import ManageSieveServer
from authgate.protocols.nntp import NntpServer
from authgate.protocols.pop3 import Pop3Server
from authgate.protocols.smtp import SmtpServer
from authgate.sasl.base import (
    NO_RESPONSE,
    STORE_UNAVAILABLE,
    ClientContext,
    ClientCredentials,
    Lookup,
    PasswordCheck,
    client_step,
)
from authgate.sasl.scram import ScramSHA256Client
from authgate.testing.kit import (
    PASSWORDS,
    BackendAnswer,
    ServerDriver,
    backend_fails,
    backend_ready,
    listener_settings,
    plain,
    plain_message,
)

HOST = "gate.example.test"
CLIENT = "198.51.100.7"
PASSWORD = PASSWORDS["alice"]
GOOD_PLAIN = plain("alice", PASSWORD)
WRONG_PLAIN = plain("alice", "not " + PASSWORD)


@dataclass(frozen=True)
class Dialect:
    """What a test needs to speak one protocol to its server machine."""

    name: str
    machine: Callable[[SessionSettings], ServerMachine]  # mypy checks each dialect
    protocol: Protocol
    greeting: bytes  # how the greeting starts
    tag: bytes  # IMAP commands carry a tag
    hello: bytes  # what a client says before AUTH (SMTP: EHLO), may be empty
    harmless: bytes  # a command that only gets an answer
    starttls: bytes
    auth: bytes  # the SASL command's verb
    challenge: bytes  # an empty server challenge, as framed on the wire
    success: bytes  # how the reply to a successful login starts
    failed: bytes  # how the reply to a wrong password starts
    needs_tls: bytes  # how the policy refusal of a cleartext mechanism starts
    line_too_long: bytes  # the goodbye to an over-long line (starts with)
    too_many_errors: bytes  # the goodbye after max_errors (starts with)
    refused: tuple[bytes, ...]  # how a refused command's reply may start
    # ManageSieve: the mechanism, the initial response and every SASL
    # response are strings (RFC 5804 section 2.1), not atoms or bare lines.
    strings: bool = False

    def command(self, text: bytes) -> bytes:
        return self.tag + text + b"\r\n"

    def string(self, value: bytes) -> bytes:
        return b'"' + value + b'"' if self.strings else value

    def auth_plain(self, initial: bytes | None = None) -> bytes:
        verb = self.auth + b" " + self.string(b"PLAIN")
        return self.command(verb if initial is None else verb + b" " + self.string(initial))

    def response(self, data: bytes) -> bytes:
        """A SASL response (base64 or "*") as the client frames it."""
        return self.string(data) + b"\r\n"


IMAP = Dialect(
    name="imap",
    machine=ImapServer,
    protocol=Protocol.IMAP,
    greeting=b"* OK [CAPABILITY IMAP4rev1 ",
    tag=b"a1 ",
    hello=b"",
    harmless=b"NOOP",
    starttls=b"STARTTLS",
    auth=b"AUTHENTICATE",
    challenge=b"+ \r\n",
    success=b"a1 OK ",
    failed=b"a1 NO [AUTHENTICATIONFAILED] ",
    needs_tls=b"a1 NO [PRIVACYREQUIRED] ",
    line_too_long=b"* BYE ",
    too_many_errors=b"* BYE ",
    refused=(b"a1 BAD", b"a1 NO"),
)
POP3 = Dialect(
    name="pop3",
    machine=Pop3Server,
    protocol=Protocol.POP3,
    greeting=b"+OK ",
    tag=b"",
    hello=b"",
    harmless=b"CAPA",
    starttls=b"STLS",
    auth=b"AUTH",
    challenge=b"+ \r\n",
    success=b"+OK ",
    failed=b"-ERR [AUTH] ",
    needs_tls=b"-ERR [AUTH] ",
    line_too_long=b"-ERR ",
    too_many_errors=b"-ERR ",
    refused=(b"-ERR",),
)
SMTP = Dialect(
    name="smtp",
    machine=SmtpServer,
    protocol=Protocol.SMTP,
    greeting=b"220 ",
    tag=b"",
    hello=b"EHLO client.example\r\n",
    harmless=b"NOOP",
    starttls=b"STARTTLS",
    auth=b"AUTH",
    challenge=b"334 \r\n",
    success=b"235 ",
    failed=b"535 ",
    needs_tls=b"538 ",
    line_too_long=b"500 ",
    too_many_errors=b"421 ",
    refused=(b"5",),
)
NNTP = Dialect(
    name="nntp",
    machine=NntpServer,
    protocol=Protocol.NNTP,
    greeting=b"200 ",
    tag=b"",
    hello=b"",
    harmless=b"CAPABILITIES",
    starttls=b"STARTTLS",
    auth=b"AUTHINFO SASL",
    challenge=b"383 =\r\n",
    success=b"281 ",
    failed=b"481 ",
    needs_tls=b"483 ",
    line_too_long=b"400 ",
    too_many_errors=b"400 ",
    refused=(b"4", b"5"),
)
MANAGESIEVE = Dialect(
    name="managesieve",
    machine=ManageSieveServer,
    protocol=Protocol.MANAGESIEVE,
    greeting=b'"IMPLEMENTATION" "authgate"\r\n',
    tag=b"",
    hello=b"",
    harmless=b"NOOP",
    starttls=b"STARTTLS",
    auth=b"AUTHENTICATE",
    challenge=b'""\r\n',
    success=b"OK ",
    failed=b'NO "Authentication failed',
    needs_tls=b"NO (ENCRYPT-NEEDED) ",
    line_too_long=b"BYE ",
    too_many_errors=b"BYE ",
    refused=(b"NO ",),
    strings=True,
)
DIALECTS = [IMAP, POP3, SMTP, NNTP, MANAGESIEVE]
each_dialect = pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)

# ------------------------------------------------------------ differences
#
# Where the dialects behave differently today. "to unify": nobody wrote a
# reason down, the one core should make them agree. "deliberate": a
# protocol rule asks for it.

TO_UNIFY = "to unify"
DELIBERATE = "deliberate"
# Was "to unify"; the one core (authgate.protocols.server) now makes every
# dialect agree, for the reason in `why`. Kept as the record, one value.
UNIFIED = "unified"


@dataclass(frozen=True)
class Difference:
    kind: str  # TO_UNIFY, UNIFIED or DELIBERATE
    why: str
    per_dialect: dict[str, object]


DIFFERENCES = {
    # The audit log of a cleartext login refused by policy: was an
    # AuthFailed in SMTP and IMAP, nothing in POP3.
    "policy_refusal_emits_auth_failed": Difference(
        UNIFIED,
        "every refused attempt is in the audit log (the defence counts only guesses)",
        {"imap": True, "pop3": True, "smtp": True, "nntp": True, "managesieve": True},
    ),
    # A backend that cannot take the login (backend_failed): was
    # AuthFailed("backend-...") in SMTP, only a reply in IMAP and POP3.
    "backend_failed_emits_auth_failed": Difference(
        UNIFIED,
        "a login that ends without a session is in the audit log, as backend-<failure>",
        {"imap": True, "pop3": True, "smtp": True, "nntp": True, "managesieve": True},
    ),
    # The store unavailable (a temporary failure): was one more error
    # toward max_errors in IMAP and POP3, not in SMTP.
    "temporary_failure_counts_as_error": Difference(
        UNIFIED,
        "our outage is not the client's error: 454 (RFC 4954 6), [SYS/TEMP] (RFC 3206),"
        " [UNAVAILABLE] (RFC 5530) all say try again later",
        {"imap": False, "pop3": False, "smtp": False, "nntp": False, "managesieve": False},
    ),
    # The protocol's own cleartext login command: IMAP LOGIN and POP3
    # USER/PASS both run through the core's PLAIN exchange (IMAP LOGIN used
    # to ask its own PasswordCheck); SMTP has none.
    "login_command": Difference(
        DELIBERATE,
        "RFC 9051 6.2.3 LOGIN, RFC 1939 7 USER/PASS, RFC 4643 2.3 AUTHINFO USER/PASS;"
        " RFC 5321 has only AUTH (RFC 4954),"
        " RFC 5804 only AUTHENTICATE",
        {
            "imap": (b'LOGIN alice "' + PASSWORD.encode() + b'"\r\n', "LOGIN-COMMAND"),
            "pop3": (b"USER alice\r\nPASS " + PASSWORD.encode() + b"\r\n", "USER-PASS"),
            "smtp": None,
            "nntp": (
                b"AUTHINFO USER alice\r\nAUTHINFO PASS " + PASSWORD.encode() + b"\r\n",
                "AUTHINFO-USER",
            ),
            "managesieve": None,
        },
    ),
    # What STARTTLS forgets that a test can see: SMTP the EHLO (RFC 3207
    # 4.2: the client must EHLO again), POP3 a USER given before (RFC 2595
    # 4: the session restarts in AUTHORIZATION), IMAP nothing it held.
    "starttls_forgets": Difference(
        DELIBERATE,
        "each protocol's STARTTLS RFC names what is discarded (RFC 3207, 2595, 9051, 4642)",
        {
            "imap": None,
            "pop3": (b"USER alice\r\n", b"PASS x\r\n", b"-ERR No USER given."),
            "smtp": (b"", GOOD_PLAIN, b"503 "),
            "nntp": (b"AUTHINFO USER alice\r\n", b"AUTHINFO PASS x\r\n", b"482 "),
            "managesieve": None,
        },
    ),
    # What the server says unasked once the handshake is done: ManageSieve
    # sends its capabilities again (RFC 5804 section 2.2); the others wait
    # for the client to ask (RFC 3207 4.2, RFC 2595 4, RFC 9051 6.2.1).
    "says_after_tls": Difference(
        DELIBERATE,
        "RFC 5804 2.2: the server re-issues its capability list after TLS, unasked",
        {
            "imap": b"",
            "pop3": b"",
            "smtp": b"",
            "nntp": b"",
            "managesieve": b'"IMPLEMENTATION" "authgate"',
        },
    ),
    # An over-long line inside a SASL exchange: the goodbye is the dialect's
    # SASL_LINE_TOO_LONG setting (how the reply starts).
    "sasl_line_too_long": Difference(
        DELIBERATE,
        "RFC 4954 6 gives SMTP's exchange its own 500 5.5.6; IMAP (RFC 9051 7.1.5 BYE) and"
        " POP3 (RFC 1939 3 -ERR) have one goodbye for any over-long line",
        {
            "imap": b"* BYE Line too long",
            "pop3": b"-ERR Line too long.",
            "smtp": b"500 5.5.6 ",
            "nntp": b"400 Line too long",
            "managesieve": b'BYE "Line too long."',
        },
    ),
    # ... and the attempt it ends: was an AuthFailed("malformed") in SMTP,
    # nothing in IMAP and POP3.
    "sasl_line_too_long_emits_auth_failed": Difference(
        UNIFIED,
        "every attempt that ends without a login is in the audit log",
        {"imap": True, "pop3": True, "smtp": True, "nntp": True, "managesieve": True},
    ),
    # Whether the goodbye after max_errors / max_commands names the host
    # (the core's GOODBYE_NAMES_HOST setting).
    "goodbye_names_host": Difference(
        DELIBERATE,
        "RFC 5321 3.8 and 4.2.3 write a 421 as \"421 <domain> ...\"; IMAP's BYE and POP3's"
        " -ERR carry free text",
        {"imap": False, "pop3": False, "smtp": True, "nntp": False, "managesieve": False},
    ),
    # A *-PLUS mechanism inside TLS without channel binding data fails for
    # want of encryption: how the reply starts (the core's
    # MISSING_BINDING_IS_UNKNOWN setting).
    "missing_binding_inside_tls": Difference(
        DELIBERATE,
        "SMTP's 538 (RFC 4954 6) would ask a client already in TLS to encrypt: 504 5.5.4"
        " (unrecognized type) makes it try another mechanism; IMAP's [PRIVACYREQUIRED]"
        " (RFC 5530 3) and POP3's [AUTH] (RFC 3206 4) have no code for unknown on failure",
        {
            "imap": b"a1 NO [PRIVACYREQUIRED] ",
            "pop3": b"-ERR [AUTH] ",
            "smtp": b"504 5.5.4 ",
            "nntp": b"483 ",
            "managesieve": b"NO (ENCRYPT-NEEDED) ",
        },
    ),
    # Relay mode: was the user of a relayed PLAIN / LOGIN named in
    # AuthFailed? SMTP yes, IMAP and POP3 no (so the per-user defence did
    # not see relayed guesses there).
    "relay_names_the_user": Difference(
        UNIFIED,
        "the defence counts a relayed guess against its user as it does a local one",
        {"imap": True, "pop3": True, "smtp": True, "nntp": True, "managesieve": True},
    ),
    # Relay mode: relay_result(False) with no BackendFailure was a temporary
    # failure in SMTP, a refusal of the credentials in IMAP and POP3.
    "relay_refusal_without_reason": Difference(
        UNIFIED,
        "the backend said no: a refusal of the credentials (a driver that knows it was an"
        " outage says UNAVAILABLE)",
        dict.fromkeys(["imap", "pop3", "smtp", "nntp", "managesieve"], "invalid-credentials"),
    ),
    # Relay mode: the backend's "password expired" was "expired" in SMTP,
    # "invalid-credentials" in IMAP and POP3.
    "relay_password_expired": Difference(
        UNIFIED,
        "the client is told its password expired, as backend_failed(PASSWORD_EXPIRED) does",
        dict.fromkeys(["imap", "pop3", "smtp", "nntp", "managesieve"], "expired"),
    ),
    # Relay mode: the backend's verdict while the client is still to answer
    # a relayed challenge (RELAY_SASL: the backend gave up, or accepted
    # early). IMAP and POP3 took it; SMTP's own machine refused it until the
    # client's answer went out. The core takes it in every dialect.
    "relay_early_verdict": Difference(
        UNIFIED,
        "the driver cannot make a backend that already answered wait for the client:"
        " relay_result and backend_ready are taken in RELAY_SASL as in RELAY",
        dict.fromkeys(["imap", "pop3", "smtp", "nntp", "managesieve"], True),
    ),
    # SASL "additional data with success" (SCRAM's server-final): how the
    # success reply that carries it starts, or None for a final challenge
    # answered with an empty response (the core's SUCCESS_DATA setting).
    "success_data": Difference(
        DELIBERATE,
        "RFC 4643 2.4.1 (NNTP 283) and RFC 5804 2.1 (ManageSieve OK (SASL ...)) carry it;"
        " RFC 4954, RFC 9051 and RFC 5034 have no room for it (RFC 4422 3.6)",
        {"imap": None, "pop3": None, "smtp": None, "nntp": b"283 ", "managesieve": b"OK "},
    ),
    # How a client spells an empty SASL response (the core's EMPTY_RESPONSE).
    "empty_response": Difference(
        DELIBERATE,
        "RFC 4643 2.4.1: NNTP sends \"=\"; the others an empty line (ManageSieve: \"\")",
        {"imap": b"", "pop3": b"", "smtp": b"", "nntp": b"=", "managesieve": b""},
    ),
}


def differs(key: str, dialect: Dialect) -> object:
    return DIFFERENCES[key].per_dialect[dialect.name]


def test_every_difference_names_every_dialect_and_a_kind() -> None:
    for key, difference in DIFFERENCES.items():
        assert set(difference.per_dialect) == {d.name for d in DIALECTS}, key
        assert difference.kind in (TO_UNIFY, UNIFIED, DELIBERATE), key
        if difference.kind == UNIFIED:
            assert len(set(map(repr, difference.per_dialect.values()))) == 1, key
        assert difference.why, key


# --------------------------------------------------------------- drivers


def driver(
    dialect: Dialect,
    security: Security = Security.NONE,
    *,
    backend: BackendAnswer | None = None,
    lookups: bool = True,
    hello: bool = True,
    mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN", "CRAM-MD5"),
    **settings: object,
) -> ServerDriver:
    """A greeted session (and, for SMTP, one past EHLO)."""
    session = listener_settings(
        dialect.protocol,
        security,
        mechanisms,
        hostname=HOST,
        client=CLIENT,
        starttls_available=True,
        **settings,
    )
    d = ServerDriver(
        dialect.machine(session),
        backend=backend_ready(()) if backend is None else backend,
        lookups=lookups,
    )
    if hello and dialect.hello:
        assert not d.send(dialect.hello).startswith((b"4", b"5"))
    return d


def reason_of(d: ServerDriver) -> list[str]:
    return [f.reason for f in d.of(AuthFailed)]


# ------------------------------------------------------------ driver API


@each_dialect
def test_out_of_order_calls_raise(dialect: Dialect) -> None:
    """Every driver call outside the state it belongs to is the driver's
    bug: ProtocolStateError, whatever the dialect."""
    server = dialect.machine(listener_settings(dialect.protocol, hostname=HOST, client=CLIENT))
    with pytest.raises(ProtocolStateError):
        server.receive_data(dialect.command(dialect.harmless))
    server.start()
    with pytest.raises(ProtocolStateError):
        server.start()
    calls: list[Callable[[], object]] = [
        lambda: server.resume(True),
        lambda: server.tls_started(),
        lambda: server.backend_ready(()),
        lambda: server.backend_failed(BackendFailure.UNAVAILABLE),
        lambda: server.relay_challenge(b""),
        lambda: server.relay_result(True),
    ]
    for call in calls:
        with pytest.raises(ProtocolStateError):
            call()


# -------------------------------------------------------- greeting, commands


@each_dialect
def test_greeting_then_commands(dialect: Dialect) -> None:
    d = driver(dialect, hello=False)
    assert d.greeting.startswith(dialect.greeting) and d.greeting.endswith(b"\r\n")
    assert HOST.encode() in d.greeting
    reply = d.send(dialect.command(dialect.harmless))
    assert reply.endswith(b"\r\n") and not reply.startswith((b"-ERR", b"5"))
    assert b" BAD " not in reply
    assert not d.closed


# ------------------------------------------------------------------ STARTTLS


@each_dialect
def test_starttls_discards_what_came_before_the_handshake(dialect: Dialect) -> None:
    d = driver(dialect)
    # A man in the middle appends a login behind STARTTLS (CVE-2011-0411).
    injected = dialect.auth_plain(GOOD_PLAIN)
    reply = d.send(dialect.command(dialect.starttls) + injected)
    # ... and the driver is told how much was thrown away, to log the attempt.
    assert d.events[-1] == StartTLS(discarded=len(injected))
    assert reply.count(b"\r\n") == 1  # the STARTTLS reply, nothing for the injection
    # Bytes during the handshake are dropped too.
    assert d.server.receive_data(injected) == []
    said = differs("says_after_tls", dialect)
    after = d.call(d.server.tls_started())
    assert after.startswith(said) if said else after == b""
    assert not d.of(Lookup) and not d.of(Authenticated)
    assert d.server.tls_active


@each_dialect
def test_starttls_forgets_state(dialect: Dialect) -> None:
    forgets = differs("starttls_forgets", dialect)
    d = driver(dialect)
    before = forgets[0] if isinstance(forgets, tuple) else b""
    if before:
        d.send(before)
    d.send(dialect.command(dialect.starttls))
    d.call(d.server.tls_started())
    # A second STARTTLS inside TLS is refused, whatever the protocol.
    reply = d.send(dialect.command(dialect.starttls))
    assert reply.startswith(dialect.refused)
    assert d.of(StartTLS) == [StartTLS()]
    if isinstance(forgets, tuple):
        _, after, refused = forgets
        line = after if after.endswith(b"\r\n") else dialect.auth_plain(after)
        assert d.send(line).startswith(refused)
        assert not d.of(Authenticated)
    else:
        # Nothing to forget but the capabilities: a fresh login works.
        assert d.send(dialect.auth_plain(GOOD_PLAIN)).startswith(dialect.success)


# ----------------------------------------------------------- limits, errors


@each_dialect
def test_over_long_line_ends_with_goodbye_and_close(dialect: Dialect) -> None:
    d = driver(dialect, max_line=64)
    reply = d.send(dialect.tag + b"X" * 200 + b"\r\n")
    assert reply.startswith(dialect.line_too_long)
    assert d.events[-1] == Close()
    assert d.server.receive_data(dialect.command(dialect.harmless)) == []


@each_dialect
def test_max_errors_bad_commands_end_the_session(dialect: Dialect) -> None:
    d = driver(dialect, max_errors=3)
    for _ in range(2):
        d.send(dialect.command(b"BOGUS"))
        assert not d.closed
    reply = d.send(dialect.command(b"BOGUS"))
    assert reply.split(b"\r\n")[1].startswith(dialect.too_many_errors)
    assert d.events[-1] == Close()


# ------------------------------------------------------------------- policy


@each_dialect
def test_cleartext_login_refused_without_tls(dialect: Dialect) -> None:
    d = driver(dialect, Security.REQUIRE_SECURE_AUTH)
    assert d.send(dialect.auth_plain(GOOD_PLAIN)).startswith(dialect.needs_tls)
    assert not d.of(Lookup) and not d.of(Authenticated) and not d.closed
    emits = differs("policy_refusal_emits_auth_failed", dialect)
    assert reason_of(d) == (["mechanism-needs-tls"] if emits else [])


# --------------------------------------------------------------- PLAIN login


@each_dialect
@pytest.mark.parametrize("form", ["initial-response", "challenge"])
def test_plain_login_terminate(dialect: Dialect, form: str) -> None:
    d = driver(dialect)
    if form == "initial-response":
        reply = d.send(dialect.auth_plain(GOOD_PLAIN))
    else:
        assert d.send(dialect.auth_plain()) == dialect.challenge
        reply = d.send(dialect.response(GOOD_PLAIN))
    assert reply.startswith(dialect.success)
    assert d.of(Lookup) and d.of(Authenticated) == [Authenticated("alice", "alice", "PLAIN")]
    assert d.events[-1] == Splice()
    assert not d.of(AuthFailed)


@each_dialect
@pytest.mark.parametrize("form", ["initial-response", "challenge"])
def test_plain_login_relay(dialect: Dialect, form: str) -> None:
    d = driver(dialect, relay=True)
    initial = GOOD_PLAIN if form == "initial-response" else None
    assert d.send(dialect.auth_plain(initial)) == b""
    expected = plain_message("alice", PASSWORD) if initial else NO_RESPONSE
    assert d.of(RelayAuth) == [RelayAuth("PLAIN", expected)]
    assert d.events[-1] == RelayAuth("PLAIN", expected)
    assert not d.of(Lookup)  # relay mode verifies nothing itself
    assert d.call(d.server.relay_result(True)).startswith(dialect.success)
    assert d.events[-1] == Splice()


@each_dialect
def test_cancel_fails_without_a_guess(dialect: Dialect) -> None:
    d = driver(dialect)
    assert d.send(dialect.auth_plain()) == dialect.challenge
    reply = d.send(dialect.response(b"*"))
    assert reply.startswith(dialect.refused)
    failed = d.of(AuthFailed)
    assert [(f.mechanism, f.reason, f.authcid) for f in failed] == [("PLAIN", "cancelled", None)]
    assert not d.of(Lookup)  # no password was tried: nothing for the lockout
    # And the session goes on.
    assert d.send(dialect.auth_plain(GOOD_PLAIN)).startswith(dialect.success)


@each_dialect
def test_wrong_password_is_invalid_credentials(dialect: Dialect) -> None:
    d = driver(dialect)
    assert d.send(dialect.auth_plain(WRONG_PLAIN)).startswith(dialect.failed)
    assert d.of(AuthFailed) == [AuthFailed("PLAIN", "invalid-credentials", "alice")]
    assert not d.of(Authenticated) and not d.closed


# ------------------------------------------------------- today's differences


@each_dialect
def test_backend_failure_audit(dialect: Dialect) -> None:
    d = driver(dialect, backend=backend_fails(BackendFailure.UNAVAILABLE))
    reply = d.send(dialect.auth_plain(GOOD_PLAIN))
    assert not reply.startswith(dialect.success) and not d.of(Splice)
    emits = differs("backend_failed_emits_auth_failed", dialect)
    assert reason_of(d) == (["backend-unavailable"] if emits else [])


@each_dialect
def test_temporary_failure_and_max_errors(dialect: Dialect) -> None:
    d = driver(dialect, lookups=False, max_errors=2)
    d.send(dialect.auth_plain(GOOD_PLAIN))
    d.call(d.server.resume(STORE_UNAVAILABLE))
    assert reason_of(d) == ["temporary"] and not d.closed
    d.send(dialect.command(b"BOGUS"))  # one more error
    assert d.closed is differs("temporary_failure_counts_as_error", dialect)


@each_dialect
def test_login_command(dialect: Dialect) -> None:
    login = differs("login_command", dialect)
    d = driver(dialect)
    if login is None:
        # SMTP, ManageSieve: no such command; a LOGIN-looking line is just unknown.
        assert d.send(b'LOGIN alice "x"\r\n').startswith(dialect.refused)
        assert not d.of(Lookup)
        return
    assert isinstance(login, tuple)
    line, mechanism = login
    d.send(dialect.tag + line)
    lookups = d.of(Lookup)
    assert len(lookups) == 1 and isinstance(lookups[0].request, PasswordCheck)
    assert d.of(Authenticated) == [Authenticated("alice", "alice", mechanism)]


# ----------------------------------------------- named dialect settings


@each_dialect
def test_sasl_line_too_long(dialect: Dialect) -> None:
    d = driver(dialect, max_line=64)
    assert d.send(dialect.auth_plain()) == dialect.challenge
    assert d.send(dialect.response(b"A" * 100)).startswith(differs("sasl_line_too_long", dialect))
    assert d.events[-1] == Close()
    emits = differs("sasl_line_too_long_emits_auth_failed", dialect)
    assert d.of(AuthFailed) == ([AuthFailed("PLAIN", "malformed")] if emits else [])
    assert not d.of(Lookup)


@each_dialect
@pytest.mark.parametrize("limit", ["max_errors", "max_commands"])
def test_goodbye_names_host(dialect: Dialect, limit: str) -> None:
    d = driver(dialect, **{limit: 1})
    command = dialect.command(b"BOGUS" if limit == "max_errors" else dialect.harmless)
    reply = d.send(command * 2)
    goodbye = reply.rstrip(b"\r\n").rsplit(b"\r\n", 1)[-1]
    assert goodbye.startswith(dialect.too_many_errors)
    assert d.events[-1] == Close()
    assert (HOST.encode() in goodbye) is differs("goodbye_names_host", dialect)


@each_dialect
def test_missing_channel_binding_inside_tls(dialect: Dialect) -> None:
    # A real *-PLUS mechanism on a TLS session whose SASL context carries no
    # binding data (no `binding` for listener_settings): SCRAM refuses it.
    d = driver(dialect, tls_active=True, mechanisms=("SCRAM-SHA-256-PLUS",))
    reply = d.send(dialect.command(dialect.auth + b" " + dialect.string(b"SCRAM-SHA-256-PLUS")))
    assert reply.startswith(differs("missing_binding_inside_tls", dialect))
    assert reason_of(d) == ["encryption-required"]
    assert not d.of(Lookup) and not d.closed


@each_dialect
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_relay_names_the_user(dialect: Dialect, mechanism: str) -> None:
    d = driver(dialect, relay=True)
    if mechanism == "PLAIN":
        d.send(dialect.auth_plain(GOOD_PLAIN))
    else:
        d.send(dialect.command(dialect.auth + b" " + dialect.string(b"LOGIN")))
        d.call(d.server.relay_challenge(b"Username:"))
        d.send(dialect.response(b64encode(b"alice")))
        d.call(d.server.relay_challenge(b"Password:"))
        d.send(dialect.response(b64encode(b"wrong")))
    d.call(d.server.relay_result(False, BackendFailure.INVALID_CREDENTIALS))
    named = differs("relay_names_the_user", dialect)
    assert d.of(AuthFailed) == [
        AuthFailed(mechanism, "invalid-credentials", "alice" if named else None)
    ]
    assert "wrong" not in repr(d.of(AuthFailed))  # only the user's field is decoded


@each_dialect
@pytest.mark.parametrize(
    ("failure", "key"),
    [
        (None, "relay_refusal_without_reason"),
        (BackendFailure.PASSWORD_EXPIRED, "relay_password_expired"),
    ],
)
def test_relay_failure_reasons(dialect: Dialect, failure: BackendFailure | None, key: str) -> None:
    d = driver(dialect, relay=True)
    d.send(dialect.auth_plain(WRONG_PLAIN))
    reply = d.call(d.server.relay_result(False, failure))
    assert not reply.startswith(dialect.success) and not d.of(Splice)
    assert reason_of(d) == [differs(key, dialect)]
    assert not d.closed


@each_dialect
@pytest.mark.parametrize("verdict", ["refused", "accepted"])
def test_relay_early_verdict(dialect: Dialect, verdict: str) -> None:
    # The backend answers while the client is still to answer its challenge.
    d = driver(dialect, relay=True)
    d.send(dialect.command(dialect.auth + b" " + dialect.string(b"LOGIN")))
    d.call(d.server.relay_challenge(b"Username:"))
    assert differs("relay_early_verdict", dialect) is True
    if verdict == "refused":
        reply = d.call(d.server.relay_result(False, BackendFailure.INVALID_CREDENTIALS))
        assert not reply.startswith(dialect.success) and not d.of(Splice)
        assert reason_of(d) == ["invalid-credentials"]
        assert not d.closed
    else:
        reply = d.call(d.server.backend_ready(()))
        assert reply.startswith(dialect.success)
        assert len(d.of(Splice)) == 1 and not d.of(AuthFailed)


def _base64_in(reply: bytes) -> bytes:
    """The longest base64 token in a reply: a challenge or success data,
    whatever the dialect's framing around it."""
    tokens = re.findall(rb"[A-Za-z0-9+/]{16,}={0,2}", reply)
    assert tokens, reply
    return base64.b64decode(max(tokens, key=len))


@each_dialect
def test_success_data(dialect: Dialect) -> None:
    client = ScramSHA256Client(ClientCredentials("alice", PASSWORD), ClientContext())
    d = driver(dialect, mechanisms=("SCRAM-SHA-256",))
    start = dialect.auth + b" " + dialect.string(b"SCRAM-SHA-256") + b" "
    first = d.send(dialect.command(start + dialect.string(b64encode(client.start() or b""))))
    final = d.send(dialect.response(b64encode(client_step(client, _base64_in(first)))))
    with_data = differs("success_data", dialect)
    if isinstance(with_data, bytes):
        assert final.startswith(with_data), final
        client.finish(_base64_in(final))  # the server proved itself in its success reply
    else:
        assert not final.startswith(dialect.success) and not d.of(Authenticated)
        assert client_step(client, _base64_in(final)) == b""
        assert d.send(dialect.response(b"")).startswith(dialect.success)
    assert d.of(Authenticated) == [Authenticated("alice", "alice", "SCRAM-SHA-256")]


@each_dialect
def test_empty_response(dialect: Dialect) -> None:
    d = driver(dialect)
    assert d.send(dialect.auth_plain()) == dialect.challenge
    empty = differs("empty_response", dialect)
    assert isinstance(empty, bytes)
    d.send(dialect.response(empty))
    # The mechanism got an empty message (PLAIN refuses it), not junk base64.
    failed = d.of(AuthFailed)
    assert [f.reason for f in failed] == ["malformed"]
    assert failed[0].detail != "response is not base64"
