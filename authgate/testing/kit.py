"""The test kit for the sans-IO machines: drive them without sockets.

One synchronous driver for any server machine (`ServerDriver`, generic over
the dialect), one fake backend for any client machine (`FakeBackend`), one
credential store built from the shared test passwords (`Store`, `store`,
`PASSWORDS`, `secret`), the same drive for a SASL mechanism alone (`drive`,
`to_first_lookup`), the driver contract (`check_server_batch`,
`check_client_batch`) and small helpers. Used by the protocol tests, the
SASL tests, the hostile-input tests and `bench.fuzz`.

It lives in the package, not in tests/, because `bench/fuzz.py` needs it
and tests/test_hostile_input.py imports `bench.fuzz`: a kit in tests/
would make tests and bench import each other.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import functools
import hashlib
import json
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Generic, TypeVar

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
    NO_RESPONSE,
    Challenge,
    ClientMechanism,
    Derive,
    InitialResponse,
    Lookup,
    LookupAnswer,
    LookupRequest,
    PasswordCheck,
    ScramVerifier,
    SecretForm,
    SecretLookup,
    ServerContext,
    ServerMechanism,
    ServerOutcome,
    TokenCheck,
    TokenVerdict,
    client_step,
)
from authgate.sasl.scram import make_verifier

# ------------------------------------------------------------ passwords

# One set for every test: ASCII with a space (alice), the characters IMAP
# must quote or escape (bob), non-ASCII that SASLprep leaves alone and
# DIGEST-MD5's ISO 8859-1 rule must handle (zoë).
PASSWORDS: dict[str, str] = {
    "alice": "correct horse",
    "bob": 'pa"ss\\word',
    "zoë": "pässwörd 密码",
}
SCRAM_ITERATIONS = 4096
_SCRAM_HASHES = {SecretForm.SCRAM_SHA_1: "sha1", SecretForm.SCRAM_SHA_256: "sha256"}

# What answers a machine's Lookup: the store's resolve, or a test's own.
Resolver = Callable[[LookupRequest], LookupAnswer]


@functools.cache
def scram_verifier(hash_name: str, password: str, user: str = "") -> ScramVerifier:
    """A SCRAM verifier with a salt fixed per user (a store would draw one):
    a recorded exchange replays against a fresh machine, in another process
    too. Cached: it costs a PBKDF2 run (the real store caches too)."""
    salt = hashlib.sha256(user.encode()).digest()[:16]
    return make_verifier(password, hash_name, SCRAM_ITERATIONS, salt=salt)


@functools.cache
def secret(form: SecretForm, password: str, authcid: str = "", realm: str = "") -> LookupAnswer:
    """`password` in the stored `form` a SecretLookup asks for, derived as
    the real store derives it from a plaintext entry."""
    if form in _SCRAM_HASHES:
        return scram_verifier(_SCRAM_HASHES[form], password, authcid)
    return parse_secret("{PLAIN}" + password).secret_for(form, username=authcid, realm=realm)


def bearer_token(password: str) -> str:
    """The stand-in bearer token (OAUTHBEARER, XOAUTH2) of a user with
    `password`: a token has no spaces (RFC 6750 b64token)."""
    return password.replace(" ", "-")


class _AsTheStore(enum.Enum):
    AS_THE_STORE = "as the store"


class Store:
    """A credential store holding plaintext passwords: answers a machine's
    `Lookup` the way the real store does (a PasswordCheck True or False, a
    SecretLookup with the password in the form asked for; an unknown user
    False or None).

    For the SASL tests: with `forms`, only secret lookups in one of those
    forms are expected (anything else fails the test); `unknown` is what an
    unknown user gets instead; every request is appended to `seen`."""

    def __init__(
        self,
        passwords: dict[str, str] | None = None,
        *,
        forms: Iterable[SecretForm] | None = None,
        unknown: LookupAnswer | _AsTheStore = _AsTheStore.AS_THE_STORE,
        seen: list[LookupRequest] | None = None,
    ) -> None:
        self.passwords = PASSWORDS if passwords is None else passwords
        self._forms = None if forms is None else frozenset(forms)
        self._unknown = unknown
        self._seen = seen

    def resolve(self, request: LookupRequest) -> LookupAnswer:
        if self._seen is not None:
            self._seen.append(request)
        if self._forms is not None:  # a secret lookup, and only in these forms
            assert isinstance(request, SecretLookup), request
            assert request.form in self._forms, request.form
        password = self.passwords.get(request.authcid)
        if password is None and self._unknown is not _AsTheStore.AS_THE_STORE:
            return self._unknown
        if isinstance(request, PasswordCheck):
            return password is not None and password == request.password
        if isinstance(request, TokenCheck):  # the token verifier's part
            valid = password is not None and request.token == bearer_token(password)
            return TokenVerdict(valid, request.user if valid else None)
        if password is None:
            return None
        return secret(request.form, password, request.authcid, request.realm)


def store(
    passwords: dict[str, str] | None = None,
    *,
    forms: Iterable[SecretForm] | None = None,
    unknown: LookupAnswer | _AsTheStore = _AsTheStore.AS_THE_STORE,
    seen: list[LookupRequest] | None = None,
) -> Resolver:
    """A `Store`'s resolve, for tests that only need the function."""
    return Store(passwords, forms=forms, unknown=unknown, seen=seen).resolve


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


async def eventually(
    check: Callable[[], bool],
    what: object,
    timeout: float = 10.0,
    interval: float = 0.05,
) -> None:
    """Poll the running loop until `check()` holds; AssertionError with
    `what` (or what it returns, if callable) after `timeout` seconds: a
    deadline against a hang, not a speed limit."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not check():
        if loop.time() > end:
            raise AssertionError(what() if callable(what) else what)
        await asyncio.sleep(interval)


async def audit_records(log: Path, event: str, count: int) -> list[dict[str, object]]:
    """The audit log's `event` records, once `count` of them are written
    (the audit writer runs behind the sessions: polled, bounded)."""
    for _ in range(200):
        if log.exists():
            records = [json.loads(line) for line in log.read_text().splitlines() if line]
            chosen = [r for r in records if r["event"] == event]
            if len(chosen) >= count:
                return chosen
        await asyncio.sleep(0.05)
    raise AssertionError(f"{count} {event} audit records not written")


def installed(name: str) -> str:
    """The path of the client program `name`. A missing one fails the test
    (as pytest.fail does), never skips it: ./dev test installs them."""
    found = shutil.which(name)
    if found is None:
        raise AssertionError(f"{name} is not installed: run ./dev test as root (it installs it)")
    return found


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


# ------------------------------------------------- driving a mechanism


def drive(
    server: ServerMechanism,
    initial: InitialResponse,
    replies: Iterable[bytes],
    answer: LookupAnswer,
) -> ServerOutcome:
    """Feed a SASL server mechanism an initial response, then `replies` to
    its challenges, and `answer` to every lookup, until it ends or the
    replies run out."""
    outcome = server.start(initial)
    pending = iter(replies)
    while True:
        if isinstance(outcome, Lookup):
            outcome = server.resume(answer)
        elif isinstance(outcome, Challenge):
            reply = next(pending, None)
            if reply is None:
                return outcome
            outcome = server.step(reply)
        else:
            return outcome


def to_first_lookup(
    client: ClientMechanism, server: ServerMechanism
) -> tuple[list[bytes], ServerOutcome]:
    """Run a client mechanism against a server one up to the server's first
    lookup (or its end): the client's messages and the server's outcome."""
    messages: list[bytes] = []
    first = client.start()
    if first is not None:
        messages.append(first)
    outcome = server.start(NO_RESPONSE if first is None else first)
    while isinstance(outcome, Challenge):
        message = client_step(client, outcome.data)
        messages.append(message)
        outcome = server.step(message)
    return messages, outcome


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


M = TypeVar("M", bound=ServerMachine)


class ServerDriver(Generic[M]):
    """Drives one server machine (any dialect) the way the proxy does,
    synchronously.

    Every batch is checked against the driver contract, and nothing may
    follow Close or Splice. `Lookup`s are answered from `store` (a `Store`
    or any resolver function; unless `lookups` is off), `StartTLS` with
    `tls_started()` when `tls` is on (the handshake "succeeds" at once),
    `Authenticated` by the `backend` callback and `RelayAuth`/`RelayResponse`
    by the `relay` callback (None leaves them to the test). Collects every
    event and every byte sent to the client."""

    def __init__(
        self,
        machine: M,
        *,
        store: Store | Resolver = STORE,
        lookups: bool = True,
        tls: bool = False,
        backend: BackendAnswer | None = None,
        relay: RelayAnswer | None = None,
    ) -> None:
        self.server: M = machine
        self.resolve = store.resolve if isinstance(store, Store) else store
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
        # A loop, not recursion: a long pipelined input can make a long
        # chain of callbacks (the fuzzer's). The contract puts a waiting
        # event last in its batch, so the order is the proxy's.
        batch: list[Event] | None = events
        while batch is not None:
            check_server_batch(batch)
            if batch and self.finished:
                raise InvariantError(f"events after Close or Splice: {batch!r}")
            self.events += batch
            batch = self._answer(batch)

    def _answer(self, batch: list[Event]) -> list[Event] | None:
        """Take in one batch; the machine's next batch if the driver answered."""
        for event in batch:
            if isinstance(event, Send):
                self.out += event.data
            elif isinstance(event, Lookup) and self.lookups:
                return self.server.resume(self.resolve(event.request))
            elif isinstance(event, StartTLS) and self.tls:
                return self.server.tls_started()
            elif isinstance(event, Authenticated) and self.backend is not None:
                return self.backend(self.server, event)
            elif isinstance(event, RelayAuth | RelayResponse) and self.relay is not None:
                return self.relay(self.server, event)
        return None

    def of(self, kind: type[Any]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    @property
    def closed(self) -> bool:
        return any(isinstance(e, Close) for e in self.events)

    @property
    def finished(self) -> bool:
        """Close or Splice: the machine is done, the driver owns the rest."""
        return any(isinstance(e, Close | Splice) for e in self.events)


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
