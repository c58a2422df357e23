"""Events shared by the sans-IO protocol machines (SMTP, IMAP, POP3).

A *server* machine speaks to the mail client until it is authenticated:

    machine = ImapServer(settings)
    out = machine.start()                  # greeting (a list of events)
    out = machine.receive_data(chunk)      # any number of bytes
    out = machine.resume(answer)           # after a Lookup
    out = machine.tls_started()            # after a StartTLS handshake
    out = machine.backend_ready(caps)      # terminate mode: backend login worked
    out = machine.backend_failed(reason)   # ... or did not
    out = machine.relay_challenge(data)    # relay mode: backend sent a challenge
    out = machine.relay_result(ok, reason) # relay mode: backend's verdict

Each call returns the events the driver must act on, in order. The driver
(authgate.proxy) owns sockets, TLS, timers and the backend; the machine owns
every byte of protocol text. A *client* machine (logging in to a backend)
works the same way from the other side.

Invariants every machine keeps:
- After `StartTLS` it has discarded every byte received before the
  handshake (CVE-2011-0411 command injection) and forgotten what the client
  said before (RFC 3207 section 4.2: EHLO again; capabilities change).
- Lines longer than `max_line` and more than `max_errors` bad commands end
  the session with the protocol's goodbye and `Close`, not an exception.
- Nothing a peer sends makes a machine raise; calling it out of order does
  (`ProtocolStateError`: a driver bug).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from authgate.policy import Decision
from authgate.sasl.base import (
    ClientContext,
    ClientCredentials,
    Derive,
    InitialResponse,
    Lookup,
    LookupAnswer,
    ServerContext,
)


class ProtocolStateError(Exception):
    """The driver called a machine out of order: a bug in our code."""


# ------------------------------------------------------------------ events


@dataclass(frozen=True)
class Send:
    """Write these bytes to the peer."""

    data: bytes


@dataclass(frozen=True)
class StartTLS:
    """Flush what was sent, drop anything still buffered from the peer, run
    the TLS handshake, then call `tls_started()`.

    `discarded` (server machines): how many bytes the client had pipelined
    behind its STARTTLS command, which the machine threw away unread: a
    STARTTLS injection attempt (CVE-2011-0411), for the driver to log."""

    discarded: int = 0


# `Lookup` (from authgate.sasl.base): resolve its request against the
# credential store off the event loop, then call `resume(answer)`.


@dataclass(frozen=True)
class Authenticated:
    """Terminate mode: the client proved it is `authcid` (acting as
    `identity`). Log in to the backend as `identity`, then call
    `backend_ready()` or `backend_failed()`."""

    authcid: str
    identity: str
    mechanism: str  # "LOGIN-COMMAND" / "USER-PASS" for cleartext commands


@dataclass(frozen=True)
class RelayAuth:
    """Relay mode: start `mechanism` at the backend with this initial
    response; pass its challenges to `relay_challenge()` and its verdict to
    `relay_result()`. For IMAP LOGIN / POP3 USER+PASS, mechanism is "PLAIN"
    and `initial` is the PLAIN message built from them."""

    mechanism: str
    initial: InitialResponse


@dataclass(frozen=True)
class RelayResponse:
    """Relay mode: the client's answer to the last challenge (None: the client
    cancelled with "*"); send it to the backend."""

    data: bytes | None


@dataclass(frozen=True)
class Splice:
    """Authenticated (or, SMTP port 25, passed through): the machine is done.
    Connect the client to the backend. `pending` are bytes the client already
    sent after the last command (pipelined): deliver them to the backend
    first. `replay` (SMTP pass-through only) are lines to send to the backend
    before `pending`, answering nothing back to the client."""

    pending: bytes = b""
    replay: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class AuthFailed:
    """For the brute-force defence and the audit log: a failed attempt."""

    mechanism: str
    reason: str
    authcid: str | None = None
    # The mechanism's own words (Failure.detail: never a secret), for the
    # log line; not part of what the failure is.
    detail: str = field(default="", compare=False)


@dataclass(frozen=True)
class Close:
    """Close the connection (after sending what was queued)."""


Event = (
    Send
    | StartTLS
    | Lookup
    | Authenticated
    | RelayAuth
    | RelayResponse
    | Splice
    | AuthFailed
    | Close
)


# --------------------------------------------------------- server machines


class ServerMachine(Protocol):
    """What the driver may call on a server machine (the module docstring's
    API). ImapServer, Pop3Server and SmtpServer satisfy it; mypy checks
    that where the contract tests list them."""

    @property
    def tls_active(self) -> bool: ...
    def start(self) -> list[Event]: ...
    def receive_data(self, data: bytes) -> list[Event]: ...
    def resume(self, answer: LookupAnswer) -> list[Event]: ...
    def tls_started(self) -> list[Event]: ...
    def backend_ready(self, capabilities: Sequence[str]) -> list[Event]: ...
    def backend_failed(self, failure: BackendFailure) -> list[Event]: ...
    def relay_challenge(self, data: bytes) -> list[Event]: ...
    def relay_result(self, ok: bool, failure: BackendFailure | None = None) -> list[Event]: ...


class ClientMachine(Protocol):
    """What the driver may call on a client (backend) machine. ImapClient,
    Pop3Client and SmtpClient (dialects of authgate.protocols.client's
    ClientCore) satisfy it."""

    def receive_data(self, data: bytes) -> list[ClientEvent]: ...
    def tls_started(self) -> list[ClientEvent]: ...
    def authenticate(self, mechanism: str, initial: InitialResponse) -> list[ClientEvent]: ...
    def respond(self, data: bytes | None) -> list[ClientEvent]: ...
    def derived(self, key: bytes) -> list[ClientEvent]: ...
    @property
    def learned_capabilities(self) -> tuple[str, ...] | None:
        """The capability list this connection asked for and got (POP3's
        CAPA), for the driver to remember; None when it asked nothing."""
        ...

    def connection_ended(self, why: str) -> LoginFailed:
        """The backend's connection ended or broke before a result: the
        failure to report (`why` says how it ended)."""
        ...


# ----------------------------------------------------- backend client events


@dataclass(frozen=True)
class LoggedIn:
    """The backend accepted the login. `capabilities` are what it announced
    after login (IMAP; SMTP's EHLO keywords; none from POP3 and NNTP, whose
    success replies carry none: the client asks the backend itself), for
    the success reply to the client. `pending` are bytes the backend sent
    after its success reply: deliver them to the client first."""

    capabilities: tuple[str, ...] = ()
    pending: bytes = b""


@dataclass(frozen=True)
class LoginFailed:
    failure: BackendFailure
    detail: str = ""  # the backend's reply text, for the log (no secrets in it)


@dataclass(frozen=True)
class RelayChallenge:
    """Relay mode: the backend sent this SASL challenge (decoded bytes)."""

    data: bytes


# `Derive` (from authgate.sasl.base): a client mechanism needs PBKDF2 (SCRAM
# toward the backend); run `compute()` off the event loop, then call
# `derived(key)`.

ClientEvent = Send | StartTLS | Derive | LoggedIn | LoginFailed | RelayChallenge


class BackendFailure(enum.Enum):
    """Why the driver could not log in to / reach the backend."""

    UNAVAILABLE = "unavailable"  # connect failed, timeout, closed: temporary
    REJECTED = "rejected"  # backend refused the (master) login
    INVALID_CREDENTIALS = "invalid-credentials"  # relay mode: backend said no
    # Not the backend's doing: the user proved their password, but it has
    # expired under the password policy, so authgate does not log them in.
    PASSWORD_EXPIRED = "password-expired"  # noqa: S105 - a reason, not a password


# --------------------------------------------------------------- settings


@dataclass(frozen=True)
class SessionSettings:
    """What a server machine needs to know about its listener and client."""

    hostname: str
    # The policy for this client, given whether TLS is active; the driver
    # binds the client address and store so the machine only supplies TLS.
    decide: Callable[[bool], Decision]
    # SASL context (service name, realm, channel binding) given TLS state:
    # the machine passes it to the mechanism unchanged. The channel-binding
    # data belongs in it exactly when `decide(tls).binds_channel`.
    sasl_context: Callable[[bool], ServerContext] = field(
        default=lambda tls: ServerContext()
    )
    starttls_available: bool = False  # the listener can STARTTLS
    tls_active: bool = False  # implicit TLS: already encrypted at start()
    relay: bool = False  # relay SASL to the backend instead of verifying
    submission: bool = True  # SMTP: refuse MAIL FROM before AUTH
    max_line: int = 8192  # longest command line / SASL response line
    max_errors: int = 3  # bad commands + failed auths before goodbye
    max_commands: int = 100  # commands before authentication
    # ManageSieve: the backend's capabilities ("NAME value" each), read when
    # the greeting is written: its Sieve-language ones ("SIEVE", "NOTIFY",
    # ...) go in our capability list (RFC 5804 section 1.7). The driver
    # learns them from the backend before it calls start().
    backend_capabilities: Callable[[], Sequence[str]] = field(default=lambda: ())


@dataclass(frozen=True)
class ClientSettings:
    """How authgate logs in to a backend (the client side machines).

    Terminate mode: `credentials` is the master login (authzid = the user)
    or, for SMTP without a master user, None and XCLIENT LOGIN= is used.
    Relay mode (`relay=True`): the driver calls `authenticate()` and
    `respond()` with what the mail client sent.
    """

    hostname: str  # our name (EHLO argument)
    starttls: bool = False  # issue STARTTLS/STLS before logging in
    mechanisms: tuple[str, ...] = ("PLAIN",)  # our preference toward the backend
    credentials: ClientCredentials | None = None
    sasl_context: ClientContext = field(default_factory=ClientContext)
    relay: bool = False
    # Tell the backend the real client address, when configured and offered:
    # IMAP ID x-originating-ip / SMTP XCLIENT ADDR=.
    client_address: str | None = None
    client_port: int | None = None
    xclient_login: str | None = None  # SMTP terminate mode without a master user
    use_id: bool = False  # IMAP: send ID with x-originating-ip
    use_xclient: bool = False  # SMTP: send XCLIENT ADDR= (refuse a backend without it)
    # SMTP pass-through (port 25): no login; after the greeting (and STARTTLS,
    # XCLIENT) send these lines, the client's own EHLO/HELO, each answered
    # with 2xx, then report LoggedIn.
    replay: tuple[bytes, ...] = ()
    max_line: int = 65536
    # ManageSieve: log in to nothing; once the backend's capabilities are
    # known (after STARTTLS, if set) report them as LoggedIn.capabilities,
    # for the capability list of our own greeting.
    capabilities_only: bool = False
    # POP3 terminate mode: the capability list this backend answered lately
    # (authgate.proxy.routes.CapabilityMemory). The login goes by it without
    # asking CAPA; a refused login asks, and retries once if the list changed.
    known_capabilities: tuple[str, ...] | None = None
