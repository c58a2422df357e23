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

import re
from collections.abc import Callable
from dataclasses import dataclass

from authgate.policy import Refusal, choose_client_mechanism
from authgate.protocols.base import (
    BackendFailure,
    ClientEvent,
    ClientSettings,
    Event,
    LoginFailed,
    Send,
)
from authgate.protocols.client import ClientState, MalformedReply
from authgate.protocols.common import b64decode_strict
from authgate.protocols.linecode import (
    MECHANISM_NAME,
    UNSENDABLE,
    TableClient,
    TableServer,
    detail,
    dot_block,
    is_cleartext,
    line,
    plain_credentials,
)
from authgate.protocols.server import Attempt, ServerState
from authgate.sasl.base import MAX_PASSWORD_OCTETS, FailureReason, InitialResponse

__all__ = ["ClientState", "Pop3Client", "Pop3Server", "ServerState"]

CRLF = b"\r\n"

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


_Handler = Callable[["Pop3Server", bytes], list[Event]]


class Pop3Server(TableServer):
    """POP3 AUTHORIZATION state toward a mail client: the POP3 dialect of
    `ServerCore`.

    A failed backend login (`backend_failed`) answers [SYS/TEMP] and leaves
    the session un-authenticated: the client may try again or QUIT.
    """

    NAME = "POP3 server"
    LINE_TOO_LONG = line(ERR_LINE_TOO_LONG)
    TOO_MANY_ERRORS = line(ERR_TOO_MANY_ERRORS)
    TOO_MANY_COMMANDS = line(ERR_TOO_MANY_COMMANDS)
    GREETING = GREETING
    # POP3's success reply carries no capabilities (the client asks CAPA
    # again in the TRANSACTION state, which goes to the backend).
    SUCCESS = OK_LOGGED_IN
    BACKEND_FAILED = ERR_BACKEND
    FAILURES = FAILURE_REPLIES
    REFUSALS = _REFUSAL_REPLIES
    # RFC 5034 section 4: continue-req = "+" SP [base64] CRLF; an empty
    # challenge is "+ " with nothing after the space.
    CHALLENGE = b"+ "

    # --------------------------------------------------------- dialect hooks

    def _refusal_reply(self, attempt: Attempt, refusal: Refusal) -> Send:
        if attempt.mechanism == USER_PASS and refusal is Refusal.NOT_AVAILABLE:
            return Send(line(ERR_USER_DISABLED))
        return super()._refusal_reply(attempt, refusal)

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
            return self._say_error(ERR_SESSION_TLS_NO_STLS if no_stls else ERR_SESSION_TLS)
        if keyword == b"PASS":
            return self._cmd_pass(argument, user)
        handler = _COMMANDS.get(keyword)
        if handler is not None:
            return handler(self, argument)
        if keyword in _TRANSACTION_COMMANDS:
            return self._say_error(ERR_NOT_LOGGED_IN)
        return self._say_error(ERR_UNKNOWN)

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
        return [Send(dot_block("+OK Capability list follows", caps))]

    def _cmd_stls(self, argument: bytes) -> list[Event]:
        return self._starttls_command(
            argument, ok=OK_STLS, syntax=ERR_SYNTAX, active=ERR_TLS_ACTIVE, unavailable=ERR_NO_STLS
        )

    def _cmd_auth(self, argument: bytes) -> list[Event]:
        if not argument:
            # No mechanism: list the offered ones (RFC 1734 style, which
            # Outlook and others still send to discover mechanisms).
            return [Send(dot_block("+OK", self._decide().offered))]
        words = argument.split(b" ")
        if len(words) > 2 or not MECHANISM_NAME.fullmatch(words[0]):
            return self._say_error(ERR_SYNTAX if len(words) > 2 else ERR_UNSUPPORTED)
        # RFC 5034 section 4: the initial response is optional; "=" is empty.
        initial = words[1] if len(words) == 2 and words[1] else None
        return self._authenticate(Attempt(words[0].decode("ascii").upper()), initial)

    def _cmd_user(self, argument: bytes) -> list[Event]:
        return self._user_command(USER_PASS, argument, ok=OK_USER, syntax=ERR_SYNTAX)

    def _cmd_pass(self, argument: bytes, user: str | None) -> list[Event]:
        if user is None:
            return self._say_error(ERR_NO_USER)
        password = self._password(Attempt(USER_PASS, authcid=user), argument, syntax=ERR_SYNTAX)
        if not isinstance(password, str):
            return password
        return self._login(Attempt(USER_PASS, authcid=user), user, password)

    def _cmd_quit(self, argument: bytes) -> list[Event]:
        return self._quit(OK_BYE)


_COMMANDS: dict[bytes, _Handler] = {
    b"CAPA": Pop3Server._cmd_capa,
    b"STLS": Pop3Server._cmd_stls,
    b"AUTH": Pop3Server._cmd_auth,
    b"USER": Pop3Server._cmd_user,
    b"QUIT": Pop3Server._cmd_quit,
}


# ====================================================================== client

# RFC 2449 section 8 / RFC 3206: codes that mean "try again later" rather
# than "these credentials are refused".
_TEMPORARY_CODES = ("SYS/TEMP", "IN-USE", "LOGIN-DELAY")
_RESPONSE_CODE = re.compile(r"-ERR \[([^\]]*)\]")
_MAX_CAPA_LINES = 200  # a CAPA list longer than this is no POP3 server's


@dataclass(frozen=True)
class _Reply:
    line: bytes  # the status line (or a "+ " challenge)
    capabilities: tuple[str, ...] | None = None  # a multi-line CAPA reply's lines


class Pop3Client(TableClient[_Reply]):
    """authgate logging in to a backend POP3 server (terminate or relay):
    a dialect of `ClientCore` (authgate.protocols.client).

    After `LoginFailed` the machine is done, except in relay mode when the
    backend merely refused the credentials (-ERR): then `authenticate()` may
    be called again for the mail client's next attempt (RFC 1939 section 4:
    the server stays in the AUTHORIZATION state).
    """

    NAME = "POP3 client"
    AUTH_COMMAND = b"AUTH"
    MAX_AUTH_LINE = MAX_AUTH_LINE

    def __init__(self, settings: ClientSettings) -> None:
        super().__init__(settings)
        # Going by a remembered capability list (known_capabilities), not
        # one asked for on this connection; cleared once the list is asked.
        self._recalled = False
        self._refused_with: tuple[BackendFailure, str] | None = None  # while re-asking CAPA

    # -------------------------------------------------------------- framing

    def _next_reply(self) -> _Reply | None:
        while (line := self._lines.next_line()) is not None:
            if self._collecting is None:
                if self._state is ClientState.CAPABILITY and _is_ok(line):
                    self._collecting = []
                    continue
                return _Reply(line)
            if line == b".":
                caps, self._collecting = self._collecting, None
                return _Reply(b"+OK", tuple(caps))
            if len(self._collecting) >= _MAX_CAPA_LINES:
                raise MalformedReply("CAPA reply too long")
            # RFC 1939 section 3: undo byte-stuffing.
            text = line[1:] if line.startswith(b".") else line
            self._collecting.append(text.decode("utf-8", "replace"))
        return None

    # ------------------------------------------------------------- replies

    def _on_greeting(self, reply: _Reply) -> list[ClientEvent]:
        if not _is_ok(reply.line):
            return self._fail(BackendFailure.UNAVAILABLE, "greeting: " + detail(reply.line))
        if self._settings.starttls:
            # No CAPA before STLS: its list would be forgotten at the
            # handshake (RFC 2595 section 4: ask again under TLS), and a
            # backend without STLS says -ERR to it (RFC 2449 section 5),
            # which fails the login as a missing STLS in the list would.
            return self._send(b"STLS", ClientState.STARTTLS, self._on_stls)
        return self._ask_or_recall()

    def _after_tls(self) -> list[ClientEvent]:
        # RFC 2595 section 4: capabilities may differ under TLS; ask again
        # (or go by the list asked under TLS lately).
        return self._ask_or_recall()

    def _ask_or_recall(self) -> list[ClientEvent]:
        """Ask CAPA, or, in terminate mode, go by the list this backend
        answered lately: one round trip less per login. Relay mode always
        asks: the mail client's mechanism is checked against it."""
        known = self._settings.known_capabilities
        if known is None or self._settings.relay:
            return self._capa_list(self._on_capa)
        self._recalled = True
        self._caps = known
        return self._ready()

    def _capa_list(self, handler: Callable[[_Reply], list[ClientEvent]]) -> list[ClientEvent]:
        return self._send(b"CAPA", ClientState.CAPABILITY, handler)

    def _answered_list(self, reply: _Reply) -> tuple[str, ...] | None:
        """The list a CAPA reply gives (None: not a CAPA reply at all)."""
        if reply.capabilities is not None:
            return reply.capabilities
        if _is_err(reply.line):
            # RFC 2449 section 5: a server without CAPA; USER/PASS is the
            # RFC 1939 baseline we can still try.
            return ("USER",)
        return None

    def _on_capa(self, reply: _Reply) -> list[ClientEvent]:
        caps = self._answered_list(reply)
        if caps is None:
            return self._fail(BackendFailure.UNAVAILABLE, "CAPA reply: " + detail(reply.line))
        # Asked in the clear only without STLS toward the backend, else
        # under TLS (_on_greeting): either way these decide the login.
        self._caps = self._learned = caps
        return self._ready()

    def _on_recheck(self, reply: _Reply) -> list[ClientEvent]:
        """The list asked after a login that went by a remembered one was
        refused: the same list, the refusal stands; another, one retry."""
        assert self._refused_with is not None
        failure, why = self._refused_with
        self._refused_with = None
        caps = self._answered_list(reply)
        if caps is None:
            return self._fail(BackendFailure.UNAVAILABLE, "CAPA reply: " + detail(reply.line))
        self._learned = caps
        way_in = self._way_in()
        self._caps = caps
        if self._way_in() == way_in:
            # The same login again (another list may differ in what the
            # login does not use): the refusal stands, no second try.
            return self._fail(failure, why)
        return self._login()

    def _way_in(self) -> str | None:
        """How a terminate-mode login goes by the present list: the SASL
        mechanism we would choose, USER/PASS, or None (no way in)."""
        name = choose_client_mechanism(self._sasl_offers(), self._settings.mechanisms)
        if name is not None:
            return name
        return "USER" if self._has_capability("USER") else None

    def connection_ended(self, why: str) -> LoginFailed:
        if self._refused_with is not None:
            # The backend hung up while we re-asked CAPA after a refusal, as
            # many POP3 servers do after a failed login: the refusal stands.
            failure, detail_ = self._refused_with
            self._refused_with = None
            return self._ended(failure, detail_)
        return super().connection_ended(why)

    def _on_stls(self, reply: _Reply) -> list[ClientEvent]:
        if not _is_ok(reply.line):
            return self._fail(BackendFailure.UNAVAILABLE, "STLS refused: " + detail(reply.line))
        return self._start_tls()

    # ----------------------------------------------------------------- login

    def _login(self) -> list[ClientEvent]:
        """Terminate mode: log in with our own (master) credentials."""
        creds = self._settings.credentials
        if creds is None:
            return self._fail(BackendFailure.REJECTED, "no credentials for the POP3 backend")
        started = self._master_login(self._sasl_offers())
        if started is not None:
            return started
        if not self._has_capability("USER"):
            return self._fail(BackendFailure.REJECTED, "backend offers no usable login mechanism")
        if creds.authzid:
            # USER/PASS cannot name a second identity.
            return self._fail(
                BackendFailure.REJECTED, "backend offers no SASL mechanism for a master login"
            )
        if not any(is_cleartext(m) for m in self._settings.mechanisms):
            # USER/PASS sends the password like PLAIN: only when the admin
            # allowed a cleartext mechanism toward the backend.
            return self._fail(
                BackendFailure.REJECTED, "backend offers only USER/PASS, no cleartext mechanism set"
            )
        return self._send_user(creds.username, creds.password)

    def _send_user(self, username: str, password: str) -> list[ClientEvent]:
        if not username or UNSENDABLE.search(username + password):
            return self._fail(BackendFailure.REJECTED, "credentials cannot be sent with USER/PASS")
        self._password = password
        return self._send(b"USER " + username.encode(), ClientState.LOGIN, self._on_user)

    def _on_auth(self, reply: _Reply) -> list[ClientEvent]:
        line = reply.line
        if line == b"+" or line.startswith(b"+ "):
            return self._challenge(b64decode_strict(line[2:].strip()))
        if _is_ok(line):
            return self._verified() or self._after_login()
        if _is_err(line):
            return self._refused(line)
        return self._fail(BackendFailure.UNAVAILABLE, "AUTH reply: " + detail(line))

    def _on_user(self, reply: _Reply) -> list[ClientEvent]:
        if _is_ok(reply.line):
            password, self._password = self._password, ""
            return self._send(b"PASS " + password.encode(), ClientState.LOGIN, self._on_pass)
        if _is_err(reply.line):
            return self._refused(reply.line)
        return self._fail(BackendFailure.UNAVAILABLE, "USER reply: " + detail(reply.line))

    def _on_pass(self, reply: _Reply) -> list[ClientEvent]:
        if _is_ok(reply.line):
            return self._after_login()
        if _is_err(reply.line):
            return self._refused(reply.line)
        return self._fail(BackendFailure.UNAVAILABLE, "PASS reply: " + detail(reply.line))

    def _refused(self, line: bytes) -> list[ClientEvent]:
        failure = self._classify(line)
        if self._settings.relay:
            return self._relay_refused(failure, line)
        if self._recalled and failure is not BackendFailure.UNAVAILABLE:
            # The remembered list may be out of date (the backend was
            # reconfigured): ask it (RFC 1939 section 4: still in the
            # AUTHORIZATION state). A temporary refusal says nothing of it.
            self._recalled = False
            self._held = None
            self._refused_with = (failure, detail(line))
            return self._capa_list(self._on_recheck)
        return self._fail(failure, detail(line))

    def _after_login(self) -> list[ClientEvent]:
        # No CAPA after the login: nothing here needs the TRANSACTION-state
        # capabilities (our +OK to the mail client carries none, RFC 2449
        # section 5), and a mail client's own CAPA goes to the backend
        # through the splice, which answers it with the list of the state
        # it is in. One backend round trip less per login.
        if len(self._lines):
            # Lockstep (RFC 1939 section 3): we have asked nothing since the
            # login reply, so these bytes are no answer of the backend's.
            return self._fail(BackendFailure.UNAVAILABLE, "backend spoke out of turn")
        return self._logged_in(())

    # ------------------------------------------------------------ relay mode

    def _plain_as_user(self, mechanism: str, initial: InitialResponse) -> tuple[str, str] | None:
        """A mail client's USER/PASS reaches us as PLAIN; a backend that has
        no SASL PLAIN but USER gets it back as USER/PASS."""
        if "PLAIN" in self._sasl_offers() or not self._has_capability("USER"):
            return None
        credentials = plain_credentials(mechanism, initial)
        if credentials is None or not credentials[0] or UNSENDABLE.search("".join(credentials)):
            return None
        return credentials

    # --------------------------------------------------------------- helpers

    def _classify(self, line: bytes) -> BackendFailure:
        match = _RESPONSE_CODE.match(line.decode("utf-8", "replace"))
        code = match.group(1).upper() if match else ""
        return self._refusal(temporary=code.startswith(_TEMPORARY_CODES))


def _is_ok(line: bytes) -> bool:
    return line == b"+OK" or line.startswith(b"+OK ")


def _is_err(line: bytes) -> bool:
    return line == b"-ERR" or line.startswith(b"-ERR ")
