"""The test kit for the sans-IO machines: drive them without sockets.

One synchronous driver for any server machine (`ServerDriver`), one fake
backend for any client machine (`FakeBackend`), a credential store built
from shared test passwords (`Store`, `PASSWORDS`), the driver contract
(`check_server_batch`, `check_client_batch`) and small helpers. Used by the
protocol tests, the hostile-input tests and `bench.fuzz`.

It lives in the package, not in tests/, because `bench/fuzz.py` needs it
and tests/test_hostile_input.py imports `bench.fuzz`: a kit in tests/
would make tests and bench import each other.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any

from authgate.credentials.schemes import parse_secret
from authgate.policy import Decision, ExemptNetworks, ListenerPolicy, Security, decide
from authgate.policy import Protocol as MailProtocol
from authgate.protocols.base import (
    Authenticated,
    AuthFailed,
    BackendFailure,
    ClientEvent,
    Close,
    Event,
    LoggedIn,
    LoginFailed,
    RelayAuth,
    RelayChallenge,
    RelayResponse,
    Send,
    ServerMachine,
    SessionSettings,
    Splice,
    StartTLS,
)
from authgate.protocols.imap import ImapServer
from authgate.protocols.managesieve import ManageSieveServer
from authgate.protocols.nntp import NntpServer
from authgate.protocols.pop3 import Pop3Server
from authgate.protocols.smtp import SmtpServer
from authgate.sasl.base import (
    Derive,
    Lookup,
    LookupAnswer,
    LookupRequest,
    PasswordCheck,
    SecretForm,
    ServerContext,
)
from authgate.sasl.scram import make_verifier

# ------------------------------------------------------------ passwords

# One set for every test: ASCII with a space (alice), the characters IMAP
# must quote or escape (bob), non-ASCII that SASLprep leaves alone (zoë).
PASSWORDS: dict[str, str] = {
    "alice": "correct horse",
    "bob": 'pa"ss\\word',
    "zoë": "pässwörd 密码",
}
SCRAM_ITERATIONS = 4096
_SCRAM_HASHES = {SecretForm.SCRAM_SHA_1: "sha1", SecretForm.SCRAM_SHA_256: "sha256"}


@functools.cache
def _secret(user: str, password: str, form: SecretForm, realm: str) -> LookupAnswer:
    # Cached: a SCRAM verifier costs a PBKDF2 run (the real store caches too).
    if form in _SCRAM_HASHES:
        # A salt fixed per user (a store would draw one): a recorded SCRAM
        # exchange replays against a fresh machine, in another process too.
        salt = hashlib.sha256(user.encode()).digest()[:16]
        return make_verifier(password, _SCRAM_HASHES[form], SCRAM_ITERATIONS, salt=salt)
    return parse_secret("{PLAIN}" + password).secret_for(form, username=user, realm=realm)


class Store:
    """A credential store holding plaintext passwords: answers a machine's
    `Lookup` the way the real store does (password checks, every stored
    secret form)."""

    def __init__(self, passwords: dict[str, str] | None = None) -> None:
        self.passwords = PASSWORDS if passwords is None else passwords

    def resolve(self, request: LookupRequest) -> LookupAnswer:
        password = self.passwords.get(request.authcid)
        if isinstance(request, PasswordCheck):
            return password is not None and password == request.password
        if password is None:
            return None
        return _secret(request.authcid, password, request.form, request.realm)


STORE = Store()
resolve = STORE.resolve

# The size of each stored secret form, for stores that answer wrongly but
# with the right type (hostile-input tests, the fuzzer).
SECRET_SIZES = {
    SecretForm.CRAM_MD5: 32,
    SecretForm.DIGEST_MD5: 16,
    SecretForm.NT_HASH: 16,
    SecretForm.SCRAM_SHA_1: 20,
    SecretForm.SCRAM_SHA_256: 32,
}


# --------------------------------------------------------------- helpers


def b64(data: bytes | str) -> bytes:
    return base64.b64encode(data.encode() if isinstance(data, str) else data)


def b64_str(data: bytes | str) -> str:
    return b64(data).decode()


def plain_message(user: str, password: str, authzid: str = "") -> bytes:
    """The PLAIN client message (RFC 4616), not encoded."""
    return f"{authzid}\0{user}\0{password}".encode()


def plain(user: str, password: str, authzid: str = "") -> bytes:
    """A base64 PLAIN response, as a client puts it on the wire."""
    return b64(plain_message(user, password, authzid))


def plain_str(user: str, password: str, authzid: str = "") -> str:
    return plain(user, password, authzid).decode()


def listener_settings(
    protocol: MailProtocol,
    security: Security = Security.NONE,
    mechanisms: Sequence[str] = ("PLAIN",),
    *,
    hostname: str,
    client: str,
    exempt: ExemptNetworks | Sequence[str] = (),
    verifiable: Iterable[str] | None = None,
    context: ServerContext | None = None,
    binding: bytes | None = None,
    **settings: Any,
) -> SessionSettings:
    """SessionSettings for one listener and one client address, as the
    proxy builds them. With `binding`, a TLS session carries that
    tls-server-end-point data, handed to SASL only when a -PLUS mechanism
    is offered (as the proxy's session decides it)."""
    networks = exempt if isinstance(exempt, ExemptNetworks) else ExemptNetworks.parse(exempt)
    listener = ListenerPolicy(protocol, security, tuple(mechanisms), networks)
    verify = None if verifiable is None else tuple(verifiable)
    plain_context = context if context is not None else ServerContext(hostname=hostname)

    def decide_for(tls: bool) -> Decision:
        return decide(listener, client, tls=tls, verifiable=verify)

    def context_for(tls: bool) -> ServerContext:
        if binding is not None and tls and decide_for(tls).binds_channel:
            return replace(plain_context, channel_binding=("tls-server-end-point", binding))
        return plain_context

    settings.setdefault("sasl_context", context_for)
    return SessionSettings(hostname=hostname, decide=decide_for, **settings)


# ------------------------------------------------------ the driver contract

MAX_SEND = 64 * 1024  # no single write of a machine may be this big
SERVER_EVENTS = (
    Send,
    StartTLS,
    Lookup,
    Authenticated,
    RelayAuth,
    RelayResponse,
    Splice,
    AuthFailed,
    Close,
)
# The driver must act on these before the machine reads again.
WAITING = (Lookup, StartTLS, Authenticated, RelayAuth, RelayResponse)
# Events after which the machine waits for the driver (or is finished):
# nothing may follow them in the same batch.
SERVER_LAST = (*WAITING, Splice, Close)
CLIENT_EVENTS = (Send, StartTLS, Derive, LoggedIn, LoginFailed, RelayChallenge)
# A RelayChallenge may be followed by LoginFailed: a backend that sends more
# after its challenge (unasked) ends the login in the same batch.
CLIENT_LAST = (StartTLS, Derive, LoggedIn, LoginFailed)


class InvariantError(AssertionError):
    """A machine returned something the driver contract rules out."""


def _check_batch(
    events: Sequence[object], allowed: tuple[type, ...], last: tuple[type, ...]
) -> None:
    if not isinstance(events, list):
        raise InvariantError(f"not a list of events: {events!r}")
    for index, event in enumerate(events):
        if not isinstance(event, allowed):
            raise InvariantError(f"not an event: {event!r}")
        if isinstance(event, Send):
            if not isinstance(event.data, bytes):
                raise InvariantError("Send.data is not bytes")
            if len(event.data) >= MAX_SEND:
                raise InvariantError(f"Send of {len(event.data)} bytes")
        if index == len(events) - 1:
            continue
        after = events[index + 1]
        if isinstance(event, last) or (
            isinstance(event, RelayChallenge) and not isinstance(after, LoginFailed)
        ):
            raise InvariantError(f"{type(event).__name__} is followed by {after!r}")


def check_server_batch(events: Sequence[object]) -> None:
    """Raise InvariantError unless `events` is one valid server batch."""
    _check_batch(events, SERVER_EVENTS, SERVER_LAST)


def check_client_batch(events: Sequence[object]) -> None:
    """Raise InvariantError unless `events` is one valid client batch."""
    _check_batch(events, CLIENT_EVENTS, CLIENT_LAST)


# ------------------------------------------------------ the server driver

# What the fake backend does when a server machine hands over a login:
# called with the machine and the event, returns the machine's next batch.
BackendAnswer = Callable[[Any, Authenticated], list[Event]]
RelayAnswer = Callable[[Any, RelayAuth | RelayResponse], list[Event]]


def backend_ready(capabilities: Sequence[str] = ()) -> BackendAnswer:
    """A backend that accepts every login and advertises `capabilities`."""
    return lambda machine, event: machine.backend_ready(tuple(capabilities))


def backend_fails(failure: BackendFailure) -> BackendAnswer:
    """A backend whose login fails with `failure`."""
    return lambda machine, event: machine.backend_failed(failure)


# Every server dialect the driver API types (mypy checks each against it).
SERVER_MACHINES: dict[MailProtocol, Callable[[SessionSettings], ServerMachine]] = {
    MailProtocol.IMAP: ImapServer,
    MailProtocol.POP3: Pop3Server,
    MailProtocol.SMTP: SmtpServer,
    MailProtocol.NNTP: NntpServer,
    MailProtocol.MANAGESIEVE: ManageSieveServer,
}


class ServerDriver:
    """Drives one server machine the way the proxy does, synchronously.

    Every batch is checked against the driver contract. `Lookup`s are
    answered from `store` (unless `lookups` is off), `StartTLS` with
    `tls_started()` when `tls` is on (the handshake "succeeds" at once),
    `Authenticated` by the `backend` callback and `RelayAuth`/`RelayResponse`
    by the `relay` callback (None leaves them to the test). Collects every
    event and every byte sent to the client."""

    def __init__(
        self,
        machine: Any,
        *,
        store: Store = STORE,
        lookups: bool = True,
        tls: bool = False,
        backend: BackendAnswer | None = None,
        relay: RelayAnswer | None = None,
    ) -> None:
        self.server = machine
        self.store = store
        self.lookups = lookups
        self.tls = tls
        self.backend = backend
        self.relay = relay
        self.events: list[Event] = []
        self.out = bytearray()  # everything sent to the client, greeting included
        self.greeting = self.call(machine.start())

    def call(self, events: list[Event]) -> bytes:
        """Act on a batch the test got by calling the machine; return the
        bytes sent to the client meanwhile."""
        start = len(self.out)
        self._act(events)
        return bytes(self.out[start:])

    handle = call

    def send(self, data: bytes | str) -> bytes:
        """Feed the client's bytes; return what the machine wrote back."""
        raw = data.encode() if isinstance(data, str) else data
        return self.call(self.server.receive_data(raw))

    def say(self, line: str) -> str:
        """Send one command line (CRLF added); return the reply as text."""
        return self.send(line + "\r\n").decode()

    def _act(self, events: list[Event]) -> None:
        check_server_batch(events)
        if events and self.closed:
            raise InvariantError(f"events after Close: {events!r}")
        for event in events:
            self.events.append(event)
            if isinstance(event, Send):
                self.out += event.data
            elif isinstance(event, Lookup) and self.lookups:
                self._act(self.server.resume(self.store.resolve(event.request)))
            elif isinstance(event, StartTLS) and self.tls:
                self._act(self.server.tls_started())
            elif isinstance(event, Authenticated) and self.backend is not None:
                self._act(self.backend(self.server, event))
            elif isinstance(event, RelayAuth | RelayResponse) and self.relay is not None:
                self._act(self.relay(self.server, event))

    def of(self, kind: type[Any]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    @property
    def closed(self) -> bool:
        return any(isinstance(e, Close) for e in self.events)


# ------------------------------------------------------- the fake backend


class FakeBackend:
    """The backend's side of one client machine: feed it the backend's
    bytes, read what the client sent. Every batch is checked against the
    driver contract; `Derive` (PBKDF2) is computed at once when `derive`."""

    def __init__(self, client: Any, *, derive: bool = False) -> None:
        self.client = client
        self.derive = derive
        self.events: list[ClientEvent] = []
        self.sent = bytearray()  # everything the client sent

    def feed(self, data: bytes | str) -> bytes:
        """The backend sends `data`; return what the client sent back."""
        raw = data.encode() if isinstance(data, str) else data
        return self.call(self.client.receive_data(raw))

    def call(self, events: list[ClientEvent]) -> bytes:
        """Act on a batch the test got by calling the client machine."""
        start = len(self.sent)
        self._act(events)
        return bytes(self.sent[start:])

    def _act(self, events: list[ClientEvent]) -> None:
        check_client_batch(events)
        for event in events:
            self.events.append(event)
            if isinstance(event, Send):
                self.sent += event.data
            elif isinstance(event, Derive) and self.derive:
                self._act(self.client.derived(event.compute()))

    def of(self, kind: type[Any]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    def result(self) -> LoggedIn | LoginFailed | None:
        """The login's outcome so far (there is at most one)."""
        done = [e for e in self.events if isinstance(e, LoggedIn | LoginFailed)]
        assert len(done) <= 1, self.events
        return done[0] if done else None
