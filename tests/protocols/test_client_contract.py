"""The contract every client (backend) dialect keeps, one test per rule of
`authgate.protocols.client`, parametrised over the dialects.

The backend each client talks to is our own server machine of the same
protocol (driven by the kit's ServerDriver, its lookups answered from the
kit's store): real replies in each protocol's framing, no scripted
transcript. Where a test needs a misbehaving backend it changes one thing
on the wire (junk, an injected line) or in the store (a SCRAM verifier
whose server key is wrong: a backend that cannot prove itself).

Adding a protocol means adding a `ClientDialect` line below.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from authgate.policy import Protocol, Security
from authgate.protocols.base import (
    Authenticated,
    AuthFailed,
    BackendFailure,
    ClientMachine,
    ClientSettings,
    LoggedIn,
    LoginFailed,
    ServerMachine,
    SessionSettings,
    StartTLS,
)
from authgate.protocols.imap import ImapClient, ImapServer
from authgate.protocols.managesieve import ManageSieveClient, ManageSieveServer
from authgate.protocols.nntp import NntpClient, NntpServer
from authgate.protocols.pop3 import Pop3Client, Pop3Server
from authgate.protocols.smtp import SmtpClient, SmtpServer
from authgate.sasl.base import (
    STORE_UNAVAILABLE,
    ClientCredentials,
    LookupAnswer,
    LookupRequest,
    ScramVerifier,
    SecretLookup,
)
from authgate.testing.kit import (
    PASSWORDS,
    FakeBackend,
    ServerDriver,
    b64,
    backend_ready,
    listener_settings,
    plain_message,
    resolve,
)

HOST = "backend.example.test"
GATEWAY = "gw.example.test"
CLIENT = "192.0.2.25"  # authgate, as the backend sees it
PASSWORD = PASSWORDS["alice"]


@dataclass(frozen=True)
class ClientDialect:
    """One protocol's backend client and the server machine it logs in to."""

    name: str
    client: Callable[[ClientSettings], ClientMachine]  # mypy checks each dialect
    server: Callable[[SessionSettings], ServerMachine]
    protocol: Protocol
    starttls: bytes  # the command word the client sends for STARTTLS
    junk_greeting: bytes  # something that is not this protocol's greeting
    # The real backend's answer to what the client asks once logged in (our
    # server machine has handed over by then): IMAP CAPABILITY, POP3 CAPA.
    post_login: Callable[[bytes], bytes] = lambda sent: b""


def _imap_capability(sent: bytes) -> bytes:
    tag = sent.split(b" ", 1)[0]
    return b"* CAPABILITY IMAP4rev1 IDLE\r\n" + tag + b" OK CAPABILITY completed\r\n"


DIALECTS = [
    ClientDialect(
        "imap",
        ImapClient,
        ImapServer,
        Protocol.IMAP,
        b"STARTTLS",
        b"+OK hi\r\n",
        _imap_capability,
    ),
    ClientDialect(
        "pop3",
        Pop3Client,
        Pop3Server,
        Protocol.POP3,
        b"STLS",
        b"* OK hi\r\n",
        lambda sent: b"+OK\r\nTOP\r\nUIDL\r\n.\r\n",
    ),
    ClientDialect("smtp", SmtpClient, SmtpServer, Protocol.SMTP, b"STARTTLS", b"+OK hi\r\n"),
    ClientDialect("nntp", NntpClient, NntpServer, Protocol.NNTP, b"STARTTLS", b"+OK hi\r\n"),
    ClientDialect(
        "managesieve",
        ManageSieveClient,
        ManageSieveServer,
        Protocol.MANAGESIEVE,
        b"STARTTLS",
        b"220 hi\r\n",
    ),
]
each_dialect = pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)

# Deliberate differences between the client dialects, with the reason; a
# test that meets one reads its expectation here.
DIFFERENCES: dict[str, tuple[str, dict[str, object]]] = {
    # How a login with the password goes when PLAIN is what we may use: the
    # SASL mechanism, or NNTP's AUTHINFO USER/PASS.
    "cleartext_login": (
        "RFC 4643 2.3: INN authenticates readers with AUTHINFO USER/PASS against one proxy"
        " account in readers.conf; the others speak SASL PLAIN (RFC 4616)",
        {
            "imap": "PLAIN",
            "pop3": "PLAIN",
            "smtp": "PLAIN",
            "nntp": "AUTHINFO-USER",
            "managesieve": "PLAIN",
        },
    ),
    # A master login (our credentials, the user as authzid): who the backend
    # sees. NNTP's AUTHINFO USER has no authzid: the proxy account itself.
    "master_login_identity": (
        "RFC 4616 authzid names the user; RFC 4643 2.3 AUTHINFO USER has none",
        {
            "imap": "alice",
            "pop3": "alice",
            "smtp": "alice",
            "nntp": "bob",
            "managesieve": "alice",
        },
    ),
}


def differs(key: str, dialect: ClientDialect) -> object:
    return DIFFERENCES[key][1][dialect.name]


def test_every_difference_names_every_dialect() -> None:
    for key, (why, per_dialect) in DIFFERENCES.items():
        assert set(per_dialect) == {d.name for d in DIALECTS}, key
        assert why, key


Resolver = Callable[[LookupRequest], LookupAnswer]
Tamper = Callable[[bytes, bytes], bytes]  # (what the client sent, the reply) -> the reply


@dataclass
class Conversation:
    client: FakeBackend
    server: ServerDriver[ServerMachine]

    def result(self) -> LoggedIn | LoginFailed | None:
        return self.client.result()


def converse(
    dialect: ClientDialect,
    *,
    mechanisms: tuple[str, ...] = ("PLAIN",),
    credentials: ClientCredentials | None = None,
    relay_initial: bytes | None = None,
    starttls: bool = False,
    store: Resolver = resolve,
    tamper: Tamper | None = None,
    greeting: bytes | None = None,
) -> Conversation:
    """Our client machine logs in to our server machine of the same dialect;
    the bytes go back and forth until both rest (bounded)."""
    server = dialect.server(
        listener_settings(
            dialect.protocol,
            Security.NONE,
            ("PLAIN", "SCRAM-SHA-256"),
            hostname=HOST,
            client=CLIENT,
            starttls_available=True,
        )
    )
    backend = ServerDriver(server, store=store, backend=backend_ready(()))
    relay = relay_initial is not None
    settings = ClientSettings(
        hostname=GATEWAY,
        starttls=starttls,
        mechanisms=mechanisms,
        credentials=None if relay else credentials or ClientCredentials("alice", PASSWORD),
        relay=relay,
    )
    client = FakeBackend(dialect.client(settings), derive=True)
    if relay_initial is not None:
        # The mail client was faster than our backend connection: queued.
        client.call(client.client.authenticate("PLAIN", relay_initial))
    wire = backend.greeting if greeting is None else greeting
    handshakes = 0
    for _ in range(50):
        handled = len(client.events)
        sent = client.feed(wire)
        wire = b""
        if any(isinstance(e, StartTLS) for e in client.events[handled:]):
            # The handshake "succeeds" on both sides; what the server says
            # unasked inside TLS (ManageSieve's capabilities) comes now.
            sent += client.call(client.client.tls_started())
            if len(backend.of(StartTLS)) > handshakes:
                handshakes += 1
                wire += backend.call(backend.server.tls_started())
        if client.result() is not None:
            break
        if sent:
            reply = dialect.post_login(sent) if backend.finished else backend.send(sent)
            wire += reply if tamper is None else tamper(sent, reply)
        if not wire:
            break
    return Conversation(client, backend)


def failure_of(talk: Conversation) -> BackendFailure:
    result = talk.result()
    assert isinstance(result, LoginFailed), talk.client.events
    return result.failure


# ------------------------------------------------------------------ logins


@each_dialect
@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256"])
def test_login(dialect: ClientDialect, mechanism: str) -> None:
    talk = converse(dialect, mechanisms=(mechanism,))
    assert isinstance(talk.result(), LoggedIn), talk.client.events
    label = differs("cleartext_login", dialect) if mechanism == "PLAIN" else mechanism
    assert talk.server.of(Authenticated) == [Authenticated("alice", "alice", label)]


@each_dialect
def test_master_login_sends_the_user_as_authzid(dialect: ClientDialect) -> None:
    # Terminate mode logs in with our own (master) credentials for the user.
    # Our server has no proxy-authorisation rules, so it refuses; what it
    # saw is the master's name, and the refusal of *our* login is REJECTED.
    master = ClientCredentials("bob", PASSWORDS["bob"], authzid="alice")
    talk = converse(dialect, credentials=master)
    if differs("master_login_identity", dialect) == "bob":
        # The proxy account logs in as itself (no authzid to send).
        assert isinstance(talk.result(), LoggedIn), talk.client.events
        assert talk.server.of(Authenticated) == [Authenticated("bob", "bob", "AUTHINFO-USER")]
        return
    assert failure_of(talk) is BackendFailure.REJECTED
    assert talk.server.of(AuthFailed) == [AuthFailed("PLAIN", "authz-denied", "bob")]
    assert not talk.server.of(Authenticated)
    # The user named is the authzid of the PLAIN message (RFC 4616).
    assert b64(plain_message("bob", PASSWORDS["bob"], "alice")) in bytes(talk.client.sent)


# ------------------------------------------------------------ classification


@each_dialect
def test_refused_master_login_is_rejected(dialect: ClientDialect) -> None:
    talk = converse(dialect, credentials=ClientCredentials("alice", "not " + PASSWORD))
    assert failure_of(talk) is BackendFailure.REJECTED
    assert [f.reason for f in talk.server.of(AuthFailed)] == ["invalid-credentials"]


@each_dialect
def test_refused_relayed_login_is_invalid_credentials(dialect: ClientDialect) -> None:
    talk = converse(dialect, relay_initial=plain_message("alice", "not " + PASSWORD))
    assert failure_of(talk) is BackendFailure.INVALID_CREDENTIALS


@each_dialect
@pytest.mark.parametrize("relay", [False, True])
def test_temporary_refusal_is_unavailable(dialect: ClientDialect, relay: bool) -> None:
    initial = plain_message("alice", PASSWORD) if relay else None
    talk = converse(dialect, relay_initial=initial, store=lambda request: STORE_UNAVAILABLE)
    assert failure_of(talk) is BackendFailure.UNAVAILABLE
    assert [f.reason for f in talk.server.of(AuthFailed)] == ["temporary"]


@each_dialect
def test_unexpected_greeting_is_unavailable(dialect: ClientDialect) -> None:
    talk = converse(dialect, greeting=dialect.junk_greeting)
    assert failure_of(talk) is BackendFailure.UNAVAILABLE
    assert not talk.server.of(AuthFailed)


@each_dialect
def test_challenge_the_mechanism_refuses_is_rejected(dialect: ClientDialect) -> None:
    # A backend that accepts our proof but cannot prove itself (its SCRAM
    # server key is wrong): the mechanism refuses the server signature,
    # in a final challenge (IMAP, POP3, SMTP) or with success (NNTP,
    # ManageSieve). The login is unusable either way.
    def forged(request: LookupRequest) -> LookupAnswer:
        answer = resolve(request)
        if isinstance(request, SecretLookup) and isinstance(answer, ScramVerifier):
            return dataclasses.replace(answer, server_key=bytes(len(answer.server_key)))
        return answer

    talk = converse(dialect, mechanisms=("SCRAM-SHA-256",), store=forged)
    assert failure_of(talk) is BackendFailure.REJECTED
    result = talk.result()
    assert isinstance(result, LoginFailed) and "server signature" in result.detail


# ------------------------------------------------------------------ STARTTLS


@each_dialect
def test_starttls_toward_the_backend(dialect: ClientDialect) -> None:
    talk = converse(dialect, starttls=True)
    assert talk.client.of(StartTLS) == [StartTLS()]
    assert talk.server.server.tls_active
    assert isinstance(talk.result(), LoggedIn), talk.client.events


@each_dialect
def test_reply_injected_behind_starttls_is_dropped(dialect: ClientDialect) -> None:
    # Response injection (the mirror image of CVE-2011-0411): what the
    # backend's side of the wire sends behind its STARTTLS reply came in
    # the clear; were it read after the handshake, this junk would end the
    # login as a malformed or out-of-turn reply.
    def inject(sent: bytes, reply: bytes) -> bytes:
        return reply + dialect.junk_greeting if dialect.starttls in sent.upper() else reply

    talk = converse(dialect, starttls=True, tamper=inject)
    assert talk.client.of(StartTLS) == [StartTLS()]
    assert isinstance(talk.result(), LoggedIn), talk.client.events
