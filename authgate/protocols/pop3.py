"""POP3 before authentication, both sides, sans-IO.

`Pop3Server` speaks to mail clients in the AUTHORIZATION state (RFC 1939
section 4) until they have authenticated, then hands the connection to the
driver (`Splice`). `Pop3Client` logs authgate in to a backend POP3 server.

Standards: RFC 1939 (POP3), RFC 2449 (CAPA, extended response codes),
RFC 5034 (AUTH), RFC 2595 (STLS), RFC 3206 ([AUTH], [SYS/TEMP], [SYS/PERM]).

APOP (RFC 1939 section 7) is deliberately absent: it needs the plaintext
password (or an MD5-equivalent of it) on our side, a secret we do not want
to hold or expose that way. Clients that want challenge-response use SASL.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Sequence

from authgate.policy import Refusal, choose_client_mechanism
from authgate.protocols.base import (
    BackendFailure,
    ClientEvent,
    ClientSettings,
    Close,
    Event,
    LoggedIn,
    LoginFailed,
    ProtocolStateError,
    RelayChallenge,
    Send,
    SessionSettings,
    StartTLS,
)
from authgate.protocols.common import (
    LineBuffer,
    LineTooLong,
    b64decode_strict,
    b64encode,
)
from authgate.protocols.server import Attempt, ServerCore, ServerState
from authgate.sasl import MECHANISMS, mechanism_info
from authgate.sasl.base import (
    MAX_PASSWORD_OCTETS,
    NO_RESPONSE,
    ClientAuthError,
    ClientMechanism,
    Derive,
    FailureReason,
    InitialResponse,
    SaslProtocolError,
)

__all__ = ["Pop3Client", "Pop3Server"]

CRLF = b"\r\n"

# RFC 4422 section 3.1: mechanism names are 1-20 of [A-Z0-9-_].
_MECH_NAME = re.compile(rb"[A-Za-z0-9_-]{1,20}")

# RFC 2449 section 4: a command line, AUTH included, is at most 255 octets
# with its CRLF. RFC 5034 section 4 applies that to the initial response: a
# client whose AUTH line would be longer sends the response after the
# server's empty challenge instead.
MAX_AUTH_LINE = 255

# Mechanism label for USER/PASS in `Authenticated` and `AuthFailed`.
USER_PASS = "USER-PASS"  # noqa: S105 (a label, not a password)

# What the driver says, outside the dialogue, just before it closes the
# connection: -ERR, with RFC 3206's SYS/TEMP where trying again later may work.
BYE_BUSY = b"-ERR [SYS/TEMP] Too many connections, try again later\r\n"
BYE_IDLE = b"-ERR Idle timeout, closing connection\r\n"
BYE_BLOCKED = b"-ERR [SYS/TEMP] Too many failed logins from your address, try again later\r\n"
BYE_UNAVAILABLE = b"-ERR [SYS/TEMP] Mail server unavailable, try again later\r\n"


def _line(text: str) -> bytes:
    return text.encode("utf-8") + CRLF


def _multiline(status: str, items: Sequence[str]) -> bytes:
    """A multi-line response (RFC 1939 section 3): status, items, ".".
    Items that start with "." are byte-stuffed."""
    lines = [status, *("." + i if i.startswith(".") else i for i in items), "."]
    return b"".join(_line(one) for one in lines)


def _challenge_line(data: bytes) -> bytes:
    # RFC 5034 section 4: continue-req = "+" SP [base64] CRLF; an empty
    # challenge is "+ " with nothing after the space.
    return b"+ " + b64encode(data) + CRLF


# ====================================================================== server

# Replies. Wording of the TLS refusal follows Dovecot so clients and admins
# who know it recognise it; codes follow RFC 3206: [AUTH] for anything about
# the credentials or the way the client authenticates, [SYS/TEMP] for our
# (or the backend's) temporary trouble.
GREETING = "+OK {host} authgate ready"
OK_LOGGED_IN = "+OK Logged in."
OK_STLS = "+OK Begin TLS negotiation"
OK_BYE = "+OK Logging out."
OK_USER = "+OK"
ERR_UNKNOWN = "-ERR Unknown command."
ERR_NOT_LOGGED_IN = "-ERR Not logged in."
ERR_SYNTAX = "-ERR Syntax error."
ERR_NO_USER = "-ERR No USER given."
ERR_TLS_ACTIVE = "-ERR Command not permitted when TLS active."
ERR_NO_STLS = "-ERR STLS not available."
ERR_SESSION_TLS = "-ERR [AUTH] TLS required: issue STLS first."
ERR_SESSION_TLS_NO_STLS = "-ERR [AUTH] TLS required."
ERR_FAILED = "-ERR [AUTH] Authentication failed."
ERR_TEMP = "-ERR [SYS/TEMP] Temporary authentication failure."
ERR_BACKEND = "-ERR [SYS/TEMP] Mail server unavailable, try again later."
ERR_CANCELLED = "-ERR Authentication cancelled."
ERR_MALFORMED = "-ERR Invalid authentication data."
ERR_LINE_TOO_LONG = "-ERR Line too long."
ERR_TOO_MANY_ERRORS = "-ERR Too many errors, closing connection."
ERR_TOO_MANY_COMMANDS = "-ERR Too many commands, closing connection."
ERR_UNSUPPORTED = "-ERR Unsupported authentication mechanism."
ERR_PLAINTEXT_NEEDS_TLS = (
    "-ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections."
)
ERR_AUTH_NEEDS_TLS = "-ERR [AUTH] Authentication disallowed on non-secure (SSL/TLS) connections."

_REFUSAL_REPLIES: dict[Refusal, str] = {
    Refusal.NOT_AVAILABLE: ERR_UNSUPPORTED,
    Refusal.TLS_REQUIRED: ERR_AUTH_NEEDS_TLS,
    Refusal.MECHANISM_NEEDS_TLS: ERR_PLAINTEXT_NEEDS_TLS,
    Refusal.CHANNEL_BINDING_UNAVAILABLE: "-ERR [AUTH] Channel binding needs a TLS connection.",
}
# USER/PASS refused because no cleartext mechanism is enabled at all.
ERR_USER_DISABLED = "-ERR [AUTH] Plaintext authentication is disabled."

FAILURE_REPLIES: dict[FailureReason, str] = {
    FailureReason.MALFORMED: ERR_MALFORMED,
    FailureReason.CANCELLED: ERR_CANCELLED,
    FailureReason.INVALID_CREDENTIALS: ERR_FAILED,
    FailureReason.AUTHZ_DENIED: ERR_FAILED,
    FailureReason.TEMPORARY: ERR_TEMP,
    FailureReason.TOO_WEAK: "-ERR [AUTH] Authentication mechanism is too weak.",
    FailureReason.ENCRYPTION_REQUIRED: ERR_AUTH_NEEDS_TLS,
    FailureReason.EXPIRED: "-ERR [AUTH] Password expired.",
    FailureReason.DIGEST_URI_MISMATCH: "-ERR [AUTH] Authentication failed: digest-uri is not"
    " for this server.",
    FailureReason.TOO_LONG: (
        f"-ERR [AUTH] Password too long (at most {MAX_PASSWORD_OCTETS} octets)."
    ),
}

# Commands of the TRANSACTION state (RFC 1939 section 5, 7): answered with
# "not logged in" rather than "unknown". NOOP is one of them: RFC 1939 allows
# it only in the TRANSACTION state.
_TRANSACTION_COMMANDS = frozenset(
    {b"STAT", b"LIST", b"RETR", b"DELE", b"NOOP", b"RSET", b"TOP", b"UIDL", b"LAST"}
)

# Allowed while the policy demands TLS for the whole session.
_SESSION_TLS_EXEMPT = frozenset({b"CAPA", b"STLS", b"QUIT"})


_Handler = Callable[[bytes], list[Event]]


class Pop3Server(ServerCore):
    """POP3 AUTHORIZATION state toward a mail client: the POP3 dialect of
    `ServerCore`.

    A failed backend login (`backend_failed`) answers [SYS/TEMP] and leaves
    the session un-authenticated: the client may try again or QUIT.
    """

    NAME = "POP3 server"
    LINE_TOO_LONG = _line(ERR_LINE_TOO_LONG)
    TOO_MANY_ERRORS = _line(ERR_TOO_MANY_ERRORS)
    TOO_MANY_COMMANDS = _line(ERR_TOO_MANY_COMMANDS)

    def __init__(self, settings: SessionSettings) -> None:
        super().__init__(settings)
        self._user: str | None = None  # USER given, waiting for PASS
        self._commands_table: dict[bytes, _Handler] = {
            b"CAPA": self._cmd_capa,
            b"STLS": self._cmd_stls,
            b"AUTH": self._cmd_auth,
            b"USER": self._cmd_user,
            b"QUIT": self._cmd_quit,
        }

    # --------------------------------------------------------- dialect hooks

    def _greeting(self) -> list[Event]:
        return [Send(_line(GREETING.format(host=self._settings.hostname)))]

    def _forget_after_tls(self) -> None:
        # RFC 2595 section 4: the session restarts in AUTHORIZATION; a USER
        # given in the clear is forgotten.
        self._user = None

    def _challenge(self, data: bytes) -> Send:
        return Send(_challenge_line(data))

    def _failure_reply(self, attempt: Attempt, reason: FailureReason) -> Send:
        return Send(_line(FAILURE_REPLIES[reason]))

    def _refusal_reply(self, attempt: Attempt, refusal: Refusal) -> Send:
        if attempt.mechanism == USER_PASS and refusal is Refusal.NOT_AVAILABLE:
            return Send(_line(ERR_USER_DISABLED))
        return Send(_line(_REFUSAL_REPLIES[refusal]))

    def _backend_failed_reply(self, attempt: Attempt, failure: BackendFailure) -> Send:
        if failure is BackendFailure.PASSWORD_EXPIRED:
            return Send(_line(FAILURE_REPLIES[FailureReason.EXPIRED]))
        return Send(_line(ERR_BACKEND))

    def _success_reply(self, attempt: Attempt, capabilities: Sequence[str]) -> Send:
        # POP3's success reply carries no capabilities (the client asks CAPA
        # again in the TRANSACTION state, which goes to the backend).
        return Send(_line(OK_LOGGED_IN))

    # -------------------------------------------------------------- commands

    def _command(self, line: bytes) -> list[Event]:
        goodbye = self._count_command()
        if goodbye is not None:
            return goodbye
        # RFC 1939 section 3: a case-insensitive keyword, then arguments
        # separated by single spaces.
        raw_keyword, _, argument = line.partition(b" ")
        keyword = raw_keyword.upper()
        # RFC 1939 section 7: PASS must follow USER directly.
        user, self._user = self._user, None
        if keyword not in _SESSION_TLS_EXEMPT and self._decide().session_tls_required:
            # require-encrypted: no session at all before TLS.
            no_stls = not self._settings.starttls_available
            return self._error(Send(_line(ERR_SESSION_TLS_NO_STLS if no_stls else ERR_SESSION_TLS)))
        if keyword == b"PASS":
            return self._cmd_pass(argument, user)
        handler = self._commands_table.get(keyword)
        if handler is not None:
            return handler(argument)
        if keyword in _TRANSACTION_COMMANDS:
            return self._error(Send(_line(ERR_NOT_LOGGED_IN)))
        return self._error(Send(_line(ERR_UNKNOWN)))

    def _cmd_capa(self, argument: bytes) -> list[Event]:
        """RFC 2449 section 5: what authgate itself supports before login;
        the backend's TRANSACTION-state capabilities come from the backend
        when the client asks CAPA again after login."""
        decision = self._decide()
        caps: list[str] = []
        if self._settings.starttls_available and not self._tls_active:
            caps.append("STLS")
        if decision.offered:
            caps.append("SASL " + " ".join(decision.offered))
        if decision.cleartext_login:
            caps.append("USER")
        # RESP-CODES and AUTH-RESP-CODE (RFC 2449 section 6.4, RFC 3206
        # section 6): our -ERR replies carry [AUTH] / [SYS/TEMP]. PIPELINING
        # (RFC 2449 section 6.6): commands sent in one go are answered in order.
        caps += ["RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "IMPLEMENTATION authgate"]
        return [Send(_multiline("+OK Capability list follows", caps))]

    def _cmd_stls(self, argument: bytes) -> list[Event]:
        if argument:
            return self._error(Send(_line(ERR_SYNTAX)))
        if self._tls_active:
            return self._error(Send(_line(ERR_TLS_ACTIVE)))  # RFC 2595 section 4
        if not self._settings.starttls_available:
            return self._error(Send(_line(ERR_NO_STLS)))
        return self._begin_tls(Send(_line(OK_STLS)))

    def _cmd_auth(self, argument: bytes) -> list[Event]:
        if not argument:
            # No mechanism: list the offered ones (RFC 1734 style, which
            # Outlook and others still send to discover mechanisms).
            return [Send(_multiline("+OK", self._decide().offered))]
        words = argument.split(b" ")
        if len(words) > 2 or not _MECH_NAME.fullmatch(words[0]):
            return self._error(Send(_line(ERR_SYNTAX if len(words) > 2 else ERR_UNSUPPORTED)))
        # RFC 5034 section 4: the initial response is optional; "=" is empty.
        initial = words[1] if len(words) == 2 and words[1] else None
        return self._authenticate(Attempt(words[0].decode("ascii").upper()), initial)

    def _cmd_user(self, argument: bytes) -> list[Event]:
        refused = self._refuse_login(Attempt(USER_PASS))
        if refused is not None:
            return refused
        try:
            name = argument.decode("utf-8")
        except UnicodeDecodeError:
            return self._error(Send(_line(ERR_SYNTAX)))
        if not name:
            return self._error(Send(_line(ERR_SYNTAX)))
        self._user = name
        return [Send(_line(OK_USER))]

    def _cmd_pass(self, argument: bytes, user: str | None) -> list[Event]:
        if user is None:
            return self._error(Send(_line(ERR_NO_USER)))
        refused = self._refuse_login(Attempt(USER_PASS, authcid=user))
        if refused is not None:
            return refused
        # RFC 1939 section 7: the password is the rest of the line, spaces
        # included (clients send passphrases with spaces unquoted).
        try:
            password = argument.decode("utf-8")
        except UnicodeDecodeError:
            return self._error(Send(_line(ERR_SYNTAX)))
        return self._login(Attempt(USER_PASS, authcid=user), user, password)

    def _cmd_quit(self, argument: bytes) -> list[Event]:
        self._state = ServerState.CLOSED
        return [Send(_line(OK_BYE)), Close()]


# ====================================================================== client


class ClientState(enum.Enum):
    GREETING = "greeting"
    CAPA = "capa"  # before login (again after STLS)
    STLS = "stls"
    TLS_HANDSHAKE = "tls-handshake"
    READY = "ready"  # relay mode: waiting for authenticate()
    AUTH = "auth"  # AUTH sent, reading challenges / the verdict
    DERIVE = "derive"  # Derive emitted (SCRAM's PBKDF2), waiting for derived()
    RELAY_WAIT = "relay-wait"  # relay mode: waiting for respond()
    USER = "user"
    PASS = "pass"  # noqa: S105 (a state name)
    POST_CAPA = "post-capa"  # logged in, collecting the TRANSACTION-state CAPA
    DONE = "done"


# Waiting for the driver (the mail client's turn in relay mode, or PBKDF2
# running off the loop): the backend has nothing to answer yet.
_WAITING_ON_US = frozenset({ClientState.READY, ClientState.RELAY_WAIT, ClientState.DERIVE})
_BEFORE_LOGIN = frozenset(
    {ClientState.GREETING, ClientState.CAPA, ClientState.STLS, ClientState.TLS_HANDSHAKE}
)
_CLIENT_READING = frozenset(
    {
        ClientState.GREETING,
        ClientState.CAPA,
        ClientState.STLS,
        ClientState.AUTH,
        ClientState.USER,
        ClientState.PASS,
        ClientState.POST_CAPA,
    }
)

# RFC 2449 section 8 / RFC 3206: codes that mean "try again later" rather
# than "these credentials are refused".
_TEMPORARY_CODES = ("SYS/TEMP", "IN-USE", "LOGIN-DELAY")
_RESPONSE_CODE = re.compile(r"-ERR \[([^\]]*)\]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _detail(line: bytes) -> str:
    """The backend's reply, printable and short enough for a log."""
    return _CONTROL.sub("?", line[:200].decode("utf-8", "replace"))


class Pop3Client:
    """authgate logging in to a backend POP3 server (terminate or relay).

    After `LoginFailed` the machine is done, except in relay mode when the
    backend merely refused the credentials (-ERR): then `authenticate()` may
    be called again for the mail client's next attempt.

    POP3 is lockstep and has no tags, so the backend may not speak out of
    turn: a line that arrives together with the reply before it, once we
    answered that reply with a command, would be read as the answer to a
    command the backend had not seen yet (response injection); so would a
    line that arrives while we wait for the mail client in relay mode. Both
    end the login (UNAVAILABLE). After STLS's +OK such bytes are dropped, and
    after the login they are `LoggedIn.pending`.
    """

    def __init__(self, settings: ClientSettings) -> None:
        self._settings = settings
        self._state = ClientState.GREETING
        self._lines = LineBuffer(settings.max_line)
        self._tls_done = False
        self._caps: list[str] = []
        self._caps_known = False
        self._collecting: list[str] | None = None  # multi-line CAPA in progress
        self._mech: ClientMechanism | None = None
        self._held: bytes | None = None  # initial response too long for the AUTH line
        self._queued: tuple[str, InitialResponse] | None = None  # relay: early authenticate()
        self._password = ""  # USER/PASS: sent after USER's +OK
        self._derive: Derive | None = None
        self._refused_once = False  # relay mode: a LoginFailed was reported, READY again

    @property
    def state(self) -> ClientState:
        return self._state

    # ------------------------------------------------------------ driver API

    def receive_data(self, data: bytes) -> list[ClientEvent]:
        if self._state in (ClientState.DONE, ClientState.TLS_HANDSHAKE):
            # Before the handshake: response injection, never read it.
            return []
        if self._state in _WAITING_ON_US and data:
            if self._refused_once:
                # The driver has this attempt's LoginFailed already; a backend
                # that speaks unasked is not used for another.
                self._state = ClientState.DONE
                return []
            return self._fail(BackendFailure.UNAVAILABLE, "backend spoke out of turn")
        self._lines.feed(data)
        return self._drain()

    def tls_started(self) -> list[ClientEvent]:
        if self._state is not ClientState.TLS_HANDSHAKE:
            raise ProtocolStateError(f"POP3 client: tls_started() in state {self._state.value}")
        self._tls_done = True
        self._lines.clear()
        # RFC 2595 section 4: capabilities may differ under TLS; ask again.
        self._state = ClientState.CAPA
        return [Send(b"CAPA" + CRLF), *self._drain()]

    def authenticate(self, mechanism: str, initial: InitialResponse) -> list[ClientEvent]:
        if not self._settings.relay or self._queued is not None:
            raise ProtocolStateError("POP3 client: authenticate() outside relay mode or twice")
        if self._state is ClientState.READY:
            return self._relay_start(mechanism.upper(), initial) + self._drain()
        if self._state in _BEFORE_LOGIN:
            # The mail client can be faster than our backend connection:
            # start once the backend's capabilities are known.
            self._queued = (mechanism.upper(), initial)
            return []
        if self._state is ClientState.DONE:
            return []  # already failed; the driver has the LoginFailed
        raise ProtocolStateError(f"POP3 client: authenticate() in state {self._state.value}")

    def respond(self, data: bytes | None) -> list[ClientEvent]:
        if self._state is ClientState.DONE:
            return []
        if self._state is not ClientState.RELAY_WAIT:
            raise ProtocolStateError(f"POP3 client: respond() in state {self._state.value}")
        self._state = ClientState.AUTH
        return [Send(self._response_line(data)), *self._drain()]

    def derived(self, key: bytes) -> list[ClientEvent]:
        """The result of the `Derive` we emitted, computed off the loop."""
        if self._state is ClientState.DONE:
            return []
        if self._state is not ClientState.DERIVE or self._derive is None:
            raise ProtocolStateError(f"POP3 client: derived() in state {self._state.value}")
        derive, self._derive = self._derive, None
        self._state = ClientState.AUTH
        try:
            reply = derive.finish(key)
        except ClientAuthError as exc:
            return [Send(b"*" + CRLF), *self._fail(BackendFailure.REJECTED, str(exc))]
        return [Send(self._response_line(reply)), *self._drain()]

    # ------------------------------------------------------------ line input

    def _drain(self) -> list[ClientEvent]:
        out: list[ClientEvent] = []
        while self._state in _CLIENT_READING:
            try:
                line = self._lines.next_line()
            except LineTooLong:
                return out + self._fail(BackendFailure.UNAVAILABLE, "backend line too long")
            if line is None:
                break
            if any(isinstance(event, Send) for event in out):
                # It answered a command it had not received yet.
                return out + self._fail(BackendFailure.UNAVAILABLE, "backend spoke out of turn")
            out += self._handle(line)
        return out

    def _handle(self, line: bytes) -> list[ClientEvent]:
        match self._state:
            case ClientState.GREETING:
                return self._on_greeting(line)
            case ClientState.CAPA | ClientState.POST_CAPA:
                return self._on_capa(line)
            case ClientState.STLS:
                return self._on_stls(line)
            case ClientState.AUTH:
                return self._on_auth(line)
            case ClientState.USER:
                return self._on_user(line)
            case _:
                return self._on_pass(line)

    def _on_greeting(self, line: bytes) -> list[ClientEvent]:
        if not _is_ok(line):
            return self._fail(BackendFailure.UNAVAILABLE, "greeting: " + _detail(line))
        self._state = ClientState.CAPA
        return [Send(b"CAPA" + CRLF)]

    def _on_capa(self, line: bytes) -> list[ClientEvent]:
        if self._collecting is None:
            if _is_ok(line):
                self._collecting = []
                return []
            if _is_err(line):
                # RFC 2449 section 5: a server without CAPA; USER/PASS is
                # the RFC 1939 baseline we can still try.
                return self._capabilities(["USER"], known=False)
            return self._fail(BackendFailure.UNAVAILABLE, "CAPA reply: " + _detail(line))
        if line == b".":
            caps, self._collecting = self._collecting, None
            return self._capabilities(caps, known=True)
        # RFC 1939 section 3: undo byte-stuffing.
        text = line[1:] if line.startswith(b".") else line
        self._collecting.append(text.decode("utf-8", "replace"))
        return []

    def _capabilities(self, caps: list[str], *, known: bool) -> list[ClientEvent]:
        if self._state is ClientState.POST_CAPA:
            self._state = ClientState.DONE
            return [LoggedIn(tuple(caps) if known else (), self._lines.take_rest())]
        self._caps, self._caps_known = caps, known
        if self._settings.starttls and not self._tls_done:
            if known and not self._has_capability("STLS"):
                return self._fail(BackendFailure.UNAVAILABLE, "backend does not offer STLS")
            self._state = ClientState.STLS
            return [Send(b"STLS" + CRLF)]
        if self._settings.relay:
            self._state = ClientState.READY
            if self._queued is not None:
                mechanism, initial = self._queued
                return self._relay_start(mechanism, initial)
            return []
        return self._login()

    def _on_stls(self, line: bytes) -> list[ClientEvent]:
        if not _is_ok(line):
            return self._fail(BackendFailure.UNAVAILABLE, "STLS refused: " + _detail(line))
        # Anything the backend sent behind its +OK is plaintext it could
        # not have meant for the TLS session (response injection): nothing
        # more is read, and tls_started() throws it away.
        self._state = ClientState.TLS_HANDSHAKE
        return [StartTLS()]

    # ----------------------------------------------------------------- login

    def _login(self) -> list[ClientEvent]:
        """Terminate mode: log in with our own (master) credentials."""
        creds = self._settings.credentials
        if creds is None:
            return self._fail(BackendFailure.REJECTED, "no credentials for the POP3 backend")
        chosen = choose_client_mechanism(self._sasl_offers(), self._settings.mechanisms)
        if chosen is not None:
            self._mech = mechanism_info(chosen).client(creds, self._settings.sasl_context)
            try:
                initial = self._mech.start()
            except ClientAuthError as exc:
                return self._fail(BackendFailure.REJECTED, str(exc))
            return self._send_auth(chosen, NO_RESPONSE if initial is None else initial)
        if not self._has_capability("USER"):
            return self._fail(BackendFailure.REJECTED, "backend offers no usable login mechanism")
        if creds.authzid:
            # USER/PASS cannot name a second identity.
            return self._fail(
                BackendFailure.REJECTED, "backend offers no SASL mechanism for a master login"
            )
        if not any(_is_cleartext(m) for m in self._settings.mechanisms):
            # USER/PASS sends the password like PLAIN: only when the admin
            # allowed a cleartext mechanism toward the backend.
            return self._fail(
                BackendFailure.REJECTED, "backend offers only USER/PASS, no cleartext mechanism set"
            )
        return self._send_user(creds.username, creds.password)

    def _send_user(self, username: str, password: str) -> list[ClientEvent]:
        if not username or _UNSENDABLE.search(username + password):
            return self._fail(BackendFailure.REJECTED, "credentials cannot be sent with USER/PASS")
        self._password = password
        self._state = ClientState.USER
        return [Send(_line("USER " + username))]

    def _send_auth(self, mechanism: str, initial: InitialResponse) -> list[ClientEvent]:
        command = b"AUTH " + mechanism.encode("ascii")
        self._held = None
        if initial is not NO_RESPONSE:
            # RFC 5034 section 4: "=" stands for an empty initial response.
            argument = b64encode(initial) or b"="
            if len(command) + 1 + len(argument) + len(CRLF) <= MAX_AUTH_LINE:
                command += b" " + argument
            else:
                self._held = initial  # sent after the server's empty challenge
        self._state = ClientState.AUTH
        return [Send(command + CRLF)]

    def _on_auth(self, line: bytes) -> list[ClientEvent]:
        if line == b"+" or line.startswith(b"+ "):
            challenge = b64decode_strict(line[2:].strip())
            if challenge is None:
                return [
                    Send(b"*" + CRLF),
                    *self._fail(BackendFailure.UNAVAILABLE, "backend sent a malformed challenge"),
                ]
            return self._on_challenge(challenge)
        if _is_ok(line):
            if self._mech is not None:
                try:
                    self._mech.finish(None)
                except ClientAuthError as exc:
                    # Logged in, but the backend did not prove itself: do
                    # not use this connection.
                    return self._fail(BackendFailure.REJECTED, str(exc))
            return self._logged_in()
        if _is_err(line):
            return self._refused(line)
        return self._fail(BackendFailure.UNAVAILABLE, "AUTH reply: " + _detail(line))

    def _on_challenge(self, challenge: bytes) -> list[ClientEvent]:
        if self._held is not None:
            # RFC 4422 section 4: the initial response that did not fit on
            # the AUTH line answers the first challenge.
            held, self._held = self._held, None
            return [Send(self._response_line(held))]
        if self._mech is None:
            self._state = ClientState.RELAY_WAIT
            return [RelayChallenge(challenge)]
        try:
            reply = self._mech.step(challenge)
        except (ClientAuthError, SaslProtocolError) as exc:
            # SaslProtocolError: a challenge the mechanism cannot take any
            # more (one after SCRAM's server-final): the backend misbehaves.
            return [Send(b"*" + CRLF), *self._fail(BackendFailure.REJECTED, str(exc))]
        if isinstance(reply, Derive):
            # Slow (PBKDF2): the driver computes it off the event loop.
            self._state, self._derive = ClientState.DERIVE, reply
            return [reply]
        return [Send(self._response_line(reply))]

    def _on_user(self, line: bytes) -> list[ClientEvent]:
        if _is_ok(line):
            self._state = ClientState.PASS
            password, self._password = self._password, ""
            return [Send(_line("PASS " + password))]
        if _is_err(line):
            return self._refused(line)
        return self._fail(BackendFailure.UNAVAILABLE, "USER reply: " + _detail(line))

    def _on_pass(self, line: bytes) -> list[ClientEvent]:
        if _is_ok(line):
            return self._logged_in()
        if _is_err(line):
            return self._refused(line)
        return self._fail(BackendFailure.UNAVAILABLE, "PASS reply: " + _detail(line))

    def _refused(self, line: bytes) -> list[ClientEvent]:
        failure = self._classify(line)
        if not self._settings.relay:
            return self._fail(failure, _detail(line))
        # Relay mode: the backend stays in the AUTHORIZATION state (RFC 1939
        # section 4), so the mail client's next attempt can use this
        # connection: authenticate() may be called again.
        self._state = ClientState.READY
        self._held = None
        self._refused_once = True
        return [LoginFailed(failure, _detail(line))]

    def _logged_in(self) -> list[ClientEvent]:
        # Dovecot and others list TRANSACTION-state capabilities after login
        # (RFC 2449 section 5: CAPA is valid in both states).
        self._state = ClientState.POST_CAPA
        return [Send(b"CAPA" + CRLF)]

    # ------------------------------------------------------------ relay mode

    def _relay_start(self, mechanism: str, initial: InitialResponse) -> list[ClientEvent]:
        self._queued = None
        cleartext = self._plain_as_user_pass(mechanism, initial)
        if cleartext is not None:
            return self._send_user(*cleartext)
        return self._send_auth(mechanism, initial)

    def _plain_as_user_pass(
        self, mechanism: str, initial: InitialResponse
    ) -> tuple[str, str] | None:
        """A mail client's USER/PASS reaches us as PLAIN; a backend that has
        no SASL PLAIN but USER gets it back as USER/PASS."""
        if mechanism != "PLAIN" or "PLAIN" in self._sasl_offers():
            return None
        if not self._has_capability("USER") or not isinstance(initial, bytes):
            return None
        fields = initial.split(b"\0")
        if len(fields) != 3 or fields[0]:
            return None  # an authzid cannot be expressed with USER/PASS
        try:
            username, password = fields[1].decode("utf-8"), fields[2].decode("utf-8")
        except UnicodeDecodeError:
            return None
        if not username or _UNSENDABLE.search(username + password):
            return None
        return username, password

    # --------------------------------------------------------------- helpers

    def _sasl_offers(self) -> list[str]:
        for cap in self._caps:
            words = cap.split()
            if words and words[0].upper() == "SASL":
                return words[1:]
        return []

    def _has_capability(self, name: str) -> bool:
        return any(cap.split()[:1] == [name] for cap in (c.upper() for c in self._caps))

    def _classify(self, line: bytes) -> BackendFailure:
        match = _RESPONSE_CODE.match(line.decode("utf-8", "replace"))
        code = match.group(1).upper() if match else ""
        if code.startswith(_TEMPORARY_CODES):
            return BackendFailure.UNAVAILABLE
        # Relay mode: the mail client's credentials were refused. Terminate
        # mode: the backend refused *our* (master) login.
        return (
            BackendFailure.INVALID_CREDENTIALS
            if self._settings.relay
            else (BackendFailure.REJECTED)
        )

    @staticmethod
    def _response_line(data: bytes | None) -> bytes:
        # RFC 5034 section 4: "*" cancels; an empty response is an empty line.
        return (b"*" if data is None else b64encode(data)) + CRLF

    def _fail(self, failure: BackendFailure, detail: str) -> list[ClientEvent]:
        self._state = ClientState.DONE
        self._password = ""
        return [LoginFailed(failure, detail)]


_UNSENDABLE = re.compile("[\r\n\0]")


def _is_cleartext(name: str) -> bool:
    info = MECHANISMS.get(name.upper())
    return info is not None and info.cleartext


def _is_ok(line: bytes) -> bool:
    return line == b"+OK" or line.startswith(b"+OK ")


def _is_err(line: bytes) -> bool:
    return line == b"-ERR" or line.startswith(b"-ERR ")
