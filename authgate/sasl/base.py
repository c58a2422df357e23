"""The step interface every SASL mechanism shares (RFC 4422), with no I/O.

A *server* mechanism is driven by the protocol layer:

    outcome = mech.start(initial_response)      # NO_RESPONSE, b"" or bytes
    while True:
        match outcome:
            case Challenge(data):    send data, read reply -> outcome = mech.step(reply)
            case Lookup(request):    answer = store.resolve(request) (off the loop)
                                     outcome = mech.resume(answer)
            case Success() | Failure(): stop

The mechanism never blocks and never touches a socket or a clock: when it
needs the user's stored secret, or needs a password checked against a slow
hash, it returns a `Lookup` and waits to be resumed with the answer. That
keeps the event loop free of hashing and makes every mechanism testable
with plain function calls (see `run_exchange`).

A *client* mechanism produces the initial response and answers challenges;
it raises `ClientAuthError` when the server's data is malformed or fails
mutual authentication. When an answer needs slow key derivation (SCRAM's
PBKDF2, at an iteration count the server chooses), `step` returns a
`Derive` instead of the answer: the driver runs `compute()` off the event
loop and gets the answer from `finish(key)`.

Base64 belongs to the protocol layer: mechanisms see raw bytes.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Protocol


class _NoResponse(enum.Enum):
    """Marker for "the client sent no initial response", which RFC 4422
    section 5 distinguishes from an empty one (SMTP "=" / IMAP "=")."""

    NO_RESPONSE = "NO_RESPONSE"


NO_RESPONSE: Final = _NoResponse.NO_RESPONSE
InitialResponse = bytes | _NoResponse


class FailureReason(enum.Enum):
    """Why an exchange failed, in terms the protocol layer maps to replies."""

    MALFORMED = "malformed"  # syntax error in the client's message (SMTP 501 5.5.2)
    CANCELLED = "cancelled"  # client sent "*" (SMTP 501 5.7.0, IMAP BAD)
    INVALID_CREDENTIALS = "invalid-credentials"  # wrong user or password (535 5.7.8)
    AUTHZ_DENIED = "authz-denied"  # may not act as the requested authzid (535 5.7.8)
    TEMPORARY = "temporary"  # store unavailable etc. (454 4.7.0)
    TOO_WEAK = "too-weak"  # mechanism not allowed for this client (534 5.7.9)
    ENCRYPTION_REQUIRED = "encryption-required"  # needs TLS first (538 5.7.11)
    EXPIRED = "expired"  # password expired (IMAP [EXPIRED])
    # DIGEST-MD5 digest-uri names another service or a host that is not
    # ours (535 5.7.8). Decided before any password is checked: not a guess.
    DIGEST_URI_MISMATCH = "digest-uri-mismatch"
    # A password over MAX_PASSWORD_OCTETS: refused unhashed. Not a guess (no
    # stored password is that long, see authgate.password_policy).
    TOO_LONG = "too-long"


# The longest password a server mechanism hands to the store, in UTF-8
# octets. Checking a password costs time in proportion to its length for the
# pure-Python MD4 of an NT hash (OpenSSL 3 has none), and a client controls
# that length: an 8,000-character password cost 5 ms of event loop per guess.
# At this cap the worst case is about 0.65 ms; longer ones are refused
# before any hashing. Passphrases are far shorter than this.
MAX_PASSWORD_OCTETS: Final = 1024


@dataclass(frozen=True)
class Challenge:
    """Send `data` to the client and feed its reply to `step()`."""

    data: bytes


@dataclass(frozen=True)
class Success:
    """Authenticated. `additional` is data the server sends with its success
    (SCRAM server-final, DIGEST-MD5 rspauth); protocols without "additional
    data with success" send it as one more challenge instead."""

    authcid: str
    authzid: str | None = None
    additional: bytes | None = None

    @property
    def identity(self) -> str:
        """The identity the session acts as (authzid when one was given)."""
        return self.authzid or self.authcid


@dataclass(frozen=True)
class Failure:
    reason: FailureReason
    # Safe to log: never contains a password, hash or client response.
    detail: str = ""


# ---------------------------------------------------------------- lookups


class SecretForm(enum.Enum):
    """Stored-secret forms a challenge-response mechanism can verify with."""

    PLAINTEXT = "plaintext"  # the password itself (any mechanism)
    CRAM_MD5 = "cram-md5"  # HMAC-MD5 outer/inner pad states (Dovecot {CRAM-MD5})
    DIGEST_MD5 = "digest-md5"  # HA1 = MD5(user:realm:password), realm-bound
    NT_HASH = "nt-hash"  # MD4(UTF-16LE(password))
    SCRAM_SHA_1 = "scram-sha-1"
    SCRAM_SHA_256 = "scram-sha-256"


@dataclass(frozen=True)
class PasswordCheck:
    """Ask the store whether `password` is the user's password (PLAIN, LOGIN).
    Answer: `bool`, or a `PasswordVerdict` from a store that names users its
    own way."""

    authcid: str
    password: str = field(repr=False)
    # Filled in by the driver, not the mechanism: the listener's protocol
    # ("imap", ...) and the client's address. An app password may be limited
    # to protocols, and its last use is recorded with the address.
    protocol: str = ""
    client: str = ""


@dataclass(frozen=True)
class PasswordVerdict:
    """A `PasswordCheck` answered by a store that has its own, canonical name
    for the user: a directory binds "ALICE" to the entry whose uid is
    "alice". `identity` is that name (None when no single user was found);
    from then on the session is that user, toward the backend, in the audit
    log and for the lockout, whatever the client typed."""

    valid: bool
    identity: str | None = None
    # The label of the app password that matched (never the secret): the
    # audit log names it.
    app_password: str | None = None


def password_answer(answer: LookupAnswer) -> tuple[bool, str | None]:
    """A PasswordCheck's answer as (valid, the store's name for the user or
    None). Raises SaslProtocolError for an answer of the wrong kind (our
    bug: the driver answers a PasswordCheck with a bool or a verdict)."""
    if isinstance(answer, PasswordVerdict):
        return answer.valid, answer.identity
    if answer is True:
        return True, None
    if answer is False or answer is None:
        return False, None
    raise SaslProtocolError("a password check needs a bool or PasswordVerdict answer")


@dataclass(frozen=True)
class SecretLookup:
    """Ask the store for one form of the user's secret.

    Answer: the secret in that form, or None when the user is unknown or has
    no secret the form can be derived from:
      CRAM_MD5      -> bytes (32: Dovecot order: MD5 state (A,B,C,D little-endian)
                       after the outer pad, then after the inner pad)
      DIGEST_MD5    -> bytes (16: HA1 for `realm`)
      NT_HASH       -> bytes (16)
      SCRAM_SHA_*   -> ScramVerifier
      PLAINTEXT     -> str
    Mechanisms that can use several forms ask for one and let the store
    derive it from plaintext when that is what it holds.
    """

    authcid: str
    form: SecretForm
    realm: str = ""


@dataclass(frozen=True)
class ScramVerifier:
    """What a SCRAM server stores (RFC 5802 section 3)."""

    salt: bytes
    iterations: int
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)


@dataclass(frozen=True)
class TokenCheck:
    """Ask the token verifier (authgate.oauth) whether `token`, an OAuth 2.0
    bearer token (OAUTHBEARER, XOAUTH2), is valid and whose it is. Answer: a
    `TokenVerdict`. `user` is the user the client named ("" for none)."""

    token: str = field(repr=False)
    user: str = ""
    mechanism: str = ""

    @property
    def authcid(self) -> str:
        """The name the lockout is asked about before the token is checked."""
        return self.user


@dataclass(frozen=True)
class TokenVerdict:
    """A `TokenCheck` answered. `user` is the mail user the token maps to;
    `reason` says why it was refused (safe to log: "expired", "wrong
    audience"), `status` is the RFC 7628 error code for the client."""

    valid: bool
    user: str | None = None
    reason: str = ""
    status: str = "invalid_token"


class _StoreUnavailable(enum.Enum):
    """Answer to a lookup when the store could not answer at all (a
    directory server down): the exchange ends in a temporary failure, not
    in "wrong password"."""

    STORE_UNAVAILABLE = "STORE_UNAVAILABLE"


STORE_UNAVAILABLE: Final = _StoreUnavailable.STORE_UNAVAILABLE

LookupRequest = PasswordCheck | SecretLookup | TokenCheck
LookupAnswer = (
    bool | bytes | str | ScramVerifier | PasswordVerdict | TokenVerdict | None | _StoreUnavailable
)


@dataclass(frozen=True)
class Lookup:
    """Resolve `request` against the credential store (off the event loop),
    then call `resume(answer)`."""

    request: LookupRequest


ServerOutcome = Challenge | Lookup | Success | Failure


class ServerMechanism(Protocol):
    name: str

    def start(self, initial: InitialResponse) -> ServerOutcome: ...

    def step(self, response: bytes) -> ServerOutcome: ...

    def resume(self, answer: LookupAnswer) -> ServerOutcome: ...


class ClientAuthError(Exception):
    """The server's data was malformed or failed mutual authentication."""


@dataclass(frozen=True)
class Derive:
    """A client mechanism needs PBKDF2 before it can answer the challenge:
    run `compute()` off the event loop (hashlib releases the GIL while it
    works), then `finish(key)` gives the answer to send.

    `finish` is the mechanism's own continuation: it checks that it is
    called once, in the right stage (SaslProtocolError otherwise)."""

    hash_name: str  # hashlib name: "sha1", "sha256"
    password: bytes = field(repr=False)
    salt: bytes
    iterations: int
    finish: Callable[[bytes], bytes] = field(repr=False, compare=False)

    def compute(self) -> bytes:
        """The derived key. Blocking: milliseconds to a tenth of a second."""
        return hashlib.pbkdf2_hmac(self.hash_name, self.password, self.salt, self.iterations)

    def run(self) -> bytes:
        """compute() then finish(), here and now: for tests and tools that
        have no event loop to keep free."""
        return self.finish(self.compute())


class ClientMechanism(Protocol):
    name: str

    def start(self) -> bytes | None:
        """The initial response, or None if the mechanism has none."""
        ...

    def step(self, challenge: bytes) -> bytes | Derive:
        """Answer a server challenge, or ask for the slow derivation the
        answer needs (`Derive`)."""
        ...

    def finish(self, additional: bytes | None) -> None:
        """The server reported success; check its additional data (if any)
        and that mutual authentication, where the mechanism has it, happened.
        Raises ClientAuthError otherwise."""
        ...


@dataclass(frozen=True)
class ClientCredentials:
    """What a client mechanism authenticates with."""

    username: str
    password: str = field(repr=False)
    authzid: str = ""


@dataclass(frozen=True)
class ClientContext:
    """Facts about the connection a client mechanism may need."""

    service: str = "imap"  # DIGEST-MD5 digest-uri service
    hostname: str = "localhost"  # server host name (DIGEST-MD5 digest-uri)
    channel_binding: tuple[str, bytes] | None = None  # for SCRAM-*-PLUS
    random: Callable[[int], bytes] | None = None  # nonce source; os.urandom by default


@dataclass(frozen=True)
class ServerContext:
    """Facts about the connection a server mechanism may need."""

    service: str = "imap"  # GSSAPI service name for DIGEST-MD5 digest-uri
    hostname: str = "localhost"  # our host name (DIGEST-MD5 realm and digest-uri)
    # Our other names and addresses: a DIGEST-MD5 digest-uri may name any of
    # them, or `hostname` (the `hostnames` setting, the listener's address).
    aliases: tuple[str, ...] = ()
    realm: str = ""  # DIGEST-MD5 realm; defaults to hostname
    channel_binding: tuple[str, bytes] | None = None  # ("tls-server-end-point", data)
    allow_ntlm_legacy: bool = False  # NTLMv1 / NTLM2 session response
    random: Callable[[int], bytes] | None = None  # nonce source; os.urandom by default
    # OAUTHBEARER's error challenge (RFC 7628 section 3.2.2): the scope a
    # token needs and the identity provider's discovery document.
    oauth_scope: str = ""
    oauth_configuration: str = ""
    # EXTERNAL: the user a verified TLS client certificate maps to.
    external_identity: str | None = None


class SaslProtocolError(Exception):
    """The *driver* called a mechanism out of order: a bug in our code."""


# ---------------------------------------------------------------- call order


class Call(enum.Enum):
    """The calls a driver makes on a mechanism. A `Stage` names the ones it
    expects next."""

    START = "start()"
    STEP = "step()"
    RESUME = "resume()"  # a server's Lookup answered
    FINISH = "finish()"  # a client told of the server's success
    DERIVED = "Derive.finish()"  # a client's Derive computed


class StageError(SaslProtocolError):
    """A call out of order. `expected` holds the calls the exchange was
    waiting for (empty once it has ended), and the message names them."""

    def __init__(self, owner: str, call: Call, expected: tuple[Call, ...], what: str) -> None:
        if expected:
            calls = " or ".join(c.value for c in expected)
            brings = f" ({what})" if what else ""
            text = f"{owner}: {call.value} called out of order, expected {calls}{brings}"
        else:
            text = f"{owner}: {call.value} called after the exchange ended"
        super().__init__(text)
        self.call = call
        self.expected = expected


class Stage:
    """Where one exchange stands, named by the call it expects next.

    scramp's idea (scramp/core.py): the stage *is* the next call, so a call
    out of order is refused with an error that says which call was
    expected, instead of running on half-set state. Every server and client
    mechanism keeps one: each public method first `check`s its own call,
    then says what may come next (`expect`) or that the exchange is over
    (`end`). `what` names the message the next call brings ("the password",
    "client-final-message"): it goes into the error, and a mechanism whose
    `step` takes several messages in turn asks `awaits(what)` which one is due.
    """

    __slots__ = ("_expected", "_owner", "_what")

    def __init__(self, owner: str) -> None:
        self._owner = owner  # "PLAIN server", "SCRAM-SHA-256 client"
        self._expected: tuple[Call, ...] = (Call.START,)
        self._what = ""

    def check(self, call: Call) -> None:
        """Refuse `call` (StageError) unless it is one this stage expects."""
        if call not in self._expected:
            raise StageError(self._owner, call, self._expected, self._what)

    def expect(self, *calls: Call, what: str = "") -> None:
        """The calls that may come next (a client after its answer: another
        challenge or the server's success), and the message they bring."""
        self._expected, self._what = calls, what

    def end(self) -> None:
        """The exchange is over: every further call is refused."""
        self._expected, self._what = (), ""

    def awaits(self, what: str) -> bool:
        """Whether the next call is to bring the message named `what`."""
        return bool(self._expected) and self._what == what

    @property
    def ended(self) -> bool:
        return not self._expected


def start_with_message(
    stage: Stage,
    initial: InitialResponse,
    step: Callable[[bytes], ServerOutcome],
    *,
    what: str,
) -> ServerOutcome:
    """`start` of a server mechanism whose client speaks first with one
    message (PLAIN, EXTERNAL, OAUTHBEARER, XOAUTH2): that message is the
    initial response, or, with none, the reply to an empty challenge.

    RFC 4422 section 5: an *empty* initial response (b"") is not "no initial
    response"; it goes to `step` like any other message."""
    stage.check(Call.START)
    stage.expect(Call.STEP, what=what)
    if initial is NO_RESPONSE:
        return Challenge(b"")
    return step(initial)


class OneMessageClient:
    """A client mechanism that sends one message and expects at most the
    empty challenge a server sends when the message could not go with the
    command (PLAIN, EXTERNAL). Subclasses set `name` and, in `__init__`,
    `_message`, then call `super().__init__()`."""

    name = ""
    _message: bytes

    def __init__(self) -> None:
        self._stage = Stage(f"{self.name} client")
        self._answered = False

    def start(self) -> bytes | None:
        self._stage.check(Call.START)
        self._stage.expect(Call.STEP, Call.FINISH, what="an empty challenge or the success")
        return self._message

    def step(self, challenge: bytes) -> bytes:
        self._stage.check(Call.STEP)
        if challenge or self._answered:
            raise ClientAuthError(f"{self.name} server sent an unexpected challenge")
        self._answered = True
        return self._message

    def finish(self, additional: bytes | None) -> None:
        self._stage.check(Call.FINISH)
        self._stage.end()
        if additional:
            raise ClientAuthError(f"{self.name} server sent unexpected data with success")


def malformed(detail: str) -> Failure:
    return Failure(FailureReason.MALFORMED, detail)


def invalid(detail: str = "invalid credentials") -> Failure:
    return Failure(FailureReason.INVALID_CREDENTIALS, detail)


def too_long(what: str) -> Failure:
    """The refusal of a password over MAX_PASSWORD_OCTETS."""
    return Failure(
        FailureReason.TOO_LONG, f"{what} password is longer than {MAX_PASSWORD_OCTETS} octets"
    )


def check_authzid(outcome: ServerOutcome) -> ServerOutcome:
    """Refuse acting as another identity: we have no proxy-authorization
    rules, so an authzid is accepted only when it names the authcid itself."""
    if isinstance(outcome, Success) and outcome.authzid not in (None, "", outcome.authcid):
        return Failure(FailureReason.AUTHZ_DENIED, "authorization identity differs")
    return outcome


def run_exchange(
    client: ClientMechanism,
    server: ServerMechanism,
    resolve: Callable[[LookupRequest], LookupAnswer],
    *,
    max_steps: int = 16,
    initial_response: bool = True,
) -> ServerOutcome:
    """Drive a client against a server synchronously (tests and the
    `negotiate` command). Returns the server's final outcome; when it is a
    success, the client has checked the server's additional data."""
    first: bytes | None = client.start()
    pending: bytes | None = None  # an initial response held back for the first challenge
    if first is not None and not initial_response:
        pending, first = first, None
    outcome = server.start(NO_RESPONSE if first is None else first)
    for _ in range(max_steps):
        if isinstance(outcome, Lookup):
            outcome = server.resume(resolve(outcome.request))
        elif isinstance(outcome, Challenge):
            # RFC 4422 section 4: without an initial-response slot the client
            # sends its initial response in reply to the first (empty) challenge.
            reply = pending if pending is not None else client_step(client, outcome.data)
            pending = None
            outcome = server.step(reply)
        else:
            if isinstance(outcome, Success):
                client.finish(outcome.additional)
            return outcome
    raise SaslProtocolError(f"exchange did not finish in {max_steps} steps")


def client_step(client: ClientMechanism, challenge: bytes) -> bytes:
    """`client.step(challenge)`, running a `Derive` at once (blocking): for
    tests and synchronous tools, never on an event loop."""
    reply = client.step(challenge)
    return reply.run() if isinstance(reply, Derive) else reply
