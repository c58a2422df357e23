"""ManageSieve before authentication, both sides, sans-IO.

`ManageSieveServer` speaks to Sieve clients (RFC 5804) until they have
authenticated, then hands the connection to the driver (`Splice`): the
dialect of `ServerCore`. `ManageSieveClient` logs authgate in to a backend
ManageSieve server (Dovecot's managesieve): the dialect of `ClientCore`.

What sets the protocol apart from IMAP and POP3, and where it lives:
- Every argument is a string: quoted (at most 1024 octets, RFC 5804
  section 4) or a literal `{n+}` CRLF octets (`{n}` from the server).
  `LogicalLines` frames a line with its literals, `parse_line` splits it.
- SASL challenges and responses are strings too, and "*" (a string)
  cancels (section 2.1): the core's `_unframe_response` hook.
- The success reply carries SASL additional data: `OK (SASL "...")`
  (the core's SUCCESS_DATA setting).
- The greeting is a capability list, and so is what the server says unasked
  after a STARTTLS handshake (section 2.2; the core's `_after_tls` hook).
  "SIEVE", "NOTIFY" and the other Sieve-language capabilities are the
  backend's (`SessionSettings.backend_capabilities`); "SASL" and "STARTTLS"
  are ours, from the policy.
- Response codes in parentheses: ENCRYPT-NEEDED for a policy refusal,
  TRYLATER for our (or the backend's) temporary trouble, AUTH-TOO-WEAK.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from authgate.policy import Refusal
from authgate.protocols.base import (
    BackendFailure,
    ClientEvent,
    ClientSettings,
    Close,
    Event,
    Send,
    SessionSettings,
)
from authgate.protocols.client import ClientCore, ClientState, MalformedReply
from authgate.protocols.common import LineBuffer, LineTooLong, b64decode_strict, b64encode
from authgate.protocols.server import Attempt, ServerCore, ServerState

# The spliced session's filter speaks through the same output and event
# types as SMTP's, which the driver already reports.
from authgate.protocols.smtp_splice import FilterOutput, Refused, SpliceEnded
from authgate.protocols.strings import StringSyntaxError, Token, TokenKind, tokenize
from authgate.sasl.base import MAX_PASSWORD_OCTETS, NO_RESPONSE, FailureReason, InitialResponse

__all__ = [
    "LogicalLines",
    "ManageSieveClient",
    "ManageSieveServer",
    "ManageSieveSpliceFilter",
    "SieveSyntaxError",
    "Token",
    "TokenKind",
    "encode_string",
    "parse_line",
]

CRLF = b"\r\n"

# RFC 5804 section 4: "quoted" is limited to 1024 octets between the quotes.
MAX_QUOTED = 1024
# More digits than this is no literal we would read anyway, and keeps int()
# away from huge digit strings.
_MAX_LITERAL_DIGITS = 10
# A line that ends in a literal's announcement: "{n+}" from a client
# (literal-c2s), "{n}" from a server (literal-s2c). We accept both from
# either side, as Dovecot does.
_LITERAL_AT_END = re.compile(rb"\{([0-9]+)\+?\}\Z")
_LITERAL = re.compile(rb"\{([0-9]{1,10})\+?\}\r\n")
# RFC 4422 section 3.1: a SASL mechanism name is 1 to 20 of A-Z 0-9 - _.
_MECH_NAME = re.compile(rb"[A-Za-z0-9_-]{1,20}")
# NOOP's tag is echoed in TAG (section 2.13): only the characters real
# clients use, so nothing a browser sends to this port comes back (ALPACA).
_ECHO_TAG = re.compile(rb"[A-Za-z0-9._-]{1,64}")

# What the driver says, outside the dialogue, just before it closes the
# connection: BYE, with TRYLATER where trying again later may work.
BYE_BUSY = b'BYE (TRYLATER) "Too many connections, try again later."\r\n'
BYE_IDLE = b'BYE "Disconnected for inactivity."\r\n'
BYE_BLOCKED = b'BYE (TRYLATER) "Too many failed logins from your address, try again later."\r\n'
BYE_UNAVAILABLE = b'BYE (TRYLATER) "Sieve server unavailable, try again later."\r\n'


# ===================================================================== tokens


# A line that does not parse as ManageSieve (answered with NO); the tokens
# are the string syntax ManageSieve shares with IMAP.
SieveSyntaxError = StringSyntaxError


class LogicalLines:
    """Frames input into logical lines: a line whose end announces a literal
    goes on after the literal's octets (RFC 5804 section 4). Each logical
    line comes back raw, literal octets included and every announcement
    followed by CRLF, for `parse_line`. A logical line (its lines and
    literals together) longer than `limit` raises LineTooLong: the limit
    holds whatever the literal's count says, and the octets are never read."""

    def __init__(self, lines: LineBuffer, limit: int) -> None:
        self._lines = lines
        self._limit = limit
        self._parts = bytearray()  # the logical line so far
        self._needed = 0  # literal octets still to come

    def next(self) -> bytes | None:
        while True:
            if self._needed:
                available = self._lines.take_rest()
                take, rest = available[: self._needed], available[self._needed :]
                self._lines.feed(rest)
                self._parts += take
                self._needed -= len(take)
                if self._needed:
                    return None
            line = self._lines.next_line()
            if line is None:
                return None
            if len(self._parts) + len(line) > self._limit:
                raise LineTooLong
            announced = _LITERAL_AT_END.search(line)
            if announced is None:
                whole = bytes(self._parts + line)
                self._parts.clear()
                return whole
            digits = announced.group(1)
            if len(digits) > _MAX_LITERAL_DIGITS:
                raise LineTooLong
            size = int(digits)
            self._parts += line + CRLF
            if len(self._parts) + size > self._limit:
                raise LineTooLong
            self._needed = size

    def reset(self) -> None:
        self._parts.clear()
        self._needed = 0

    @property
    def pending(self) -> bool:
        """Part of a logical line has been read."""
        return bool(self._parts) or bool(self._needed)


def parse_line(raw: bytes) -> list[Token]:
    """Split one logical line (as `LogicalLines` returns it) into tokens.
    RFC 5804 section 4: a quoted string holds at most MAX_QUOTED octets and
    no CR, LF or NUL; a literal's octets follow its announcement."""
    return tokenize(raw, _inline_literal, quoted_limit=MAX_QUOTED)


def _inline_literal(raw: bytes, pos: int) -> tuple[bytes, int]:
    match = _LITERAL.match(raw, pos)
    if match is None:
        raise SieveSyntaxError("malformed literal")
    start = match.end()
    end = start + int(match.group(1))
    if end > len(raw):
        raise SieveSyntaxError("literal shorter than announced")
    return raw[start:end], end


def encode_string(value: bytes, *, client: bool = False) -> bytes:
    """A string for the wire: quoted when it may be, else a literal
    ("{n+}" from a client, "{n}" from a server)."""
    if len(value) <= MAX_QUOTED and not any(b in value for b in b"\r\n\0"):
        return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"{%d%s}\r\n" % (len(value), b"+" if client else b"") + value


def _quote_text(text: str) -> bytes:
    """Our own reply texts, and a backend's capability values: printable,
    then quoted."""
    cleaned = "".join(c if c.isprintable() else "?" for c in text)
    return encode_string(cleaned.encode("utf-8"))


# ===================================================================== server

# RFC 5804 section 1.3 response codes for each refusal: ENCRYPT-NEEDED
# means "this needs TLS (or a security layer)".
_REFUSAL_REPLY: dict[Refusal, bytes] = {
    Refusal.TLS_REQUIRED: b'NO (ENCRYPT-NEEDED) "Authentication requires TLS."',
    Refusal.MECHANISM_NEEDS_TLS: b'NO (ENCRYPT-NEEDED) "Plaintext authentication disallowed'
    b' on non-secure (SSL/TLS) connections."',
    Refusal.CHANNEL_BINDING_UNAVAILABLE: b'NO (ENCRYPT-NEEDED) "Channel binding requires TLS."',
    Refusal.NOT_AVAILABLE: b'NO "Unsupported authentication mechanism."',
}
# Section 2.1: a cancelled exchange gets NO; TRYLATER (section 1.3) for a
# temporary failure, AUTH-TOO-WEAK for a mechanism the policy finds too weak.
_FAILURE_REPLY: dict[FailureReason, bytes] = {
    FailureReason.MALFORMED: b'NO "Malformed authentication data."',
    FailureReason.CANCELLED: b'NO "Authentication cancelled."',
    FailureReason.INVALID_CREDENTIALS: b'NO "Authentication failed."',
    FailureReason.AUTHZ_DENIED: b'NO "Authorization failed."',
    FailureReason.TEMPORARY: b'NO (TRYLATER) "Temporary authentication failure."',
    FailureReason.TOO_WEAK: b'NO (AUTH-TOO-WEAK) "Authentication mechanism is too weak."',
    FailureReason.ENCRYPTION_REQUIRED: b'NO (ENCRYPT-NEEDED) "Encryption required."',
    FailureReason.EXPIRED: b'NO "Password expired."',
    FailureReason.DIGEST_URI_MISMATCH: b'NO "Authentication failed: digest-uri is not'
    b' for this server."',
    FailureReason.TOO_LONG: b'NO "Password too long (at most %d octets)."' % MAX_PASSWORD_OCTETS,
}
_BACKEND_FAILED_REPLY = b'NO (TRYLATER) "Sieve server unavailable, try again later."'
_NO_SYNTAX = b'NO "Syntax error."'
_NO_UNKNOWN = b'NO "Unknown command."'
_NO_AUTH_FIRST = b'NO "Authenticate first."'

# Commands of the authenticated state (RFC 5804 section 2): "authenticate
# first" rather than "unknown".
_AUTHENTICATED_COMMANDS = frozenset(
    {
        b"HAVESPACE",
        b"PUTSCRIPT",
        b"LISTSCRIPTS",
        b"SETACTIVE",
        b"GETSCRIPT",
        b"DELETESCRIPT",
        b"RENAMESCRIPT",
        b"CHECKSCRIPT",
        b"UNAUTHENTICATE",
    }
)
# The backend's capabilities that describe the Sieve language (and so go in
# our greeting). SASL, STARTTLS, IMPLEMENTATION and VERSION describe the
# pre-login dialogue, which is ours; OWNER exists only after login; an
# unknown extension capability might promise a pre-login command we lack.
BACKEND_CAPABILITIES = ("SIEVE", "NOTIFY", "MAXREDIRECTS", "LANGUAGE", "EXTLISTS")


_Handler = Callable[["ManageSieveServer", list[Token]], list[Event]]


class ManageSieveServer(ServerCore):
    """The ManageSieve non-authenticated state toward a Sieve client: the
    ManageSieve dialect of `ServerCore`.

    A failed backend login (`backend_failed`) answers NO (TRYLATER) and the
    session stays un-authenticated: the client may try again or LOGOUT.
    """

    NAME = "ManageSieve server"
    LINE_TOO_LONG = b'BYE "Line too long."' + CRLF
    TOO_MANY_ERRORS = b'BYE "Too many errors."' + CRLF
    TOO_MANY_COMMANDS = b'BYE "Too many commands before login."' + CRLF
    SUCCESS_DATA = True  # RFC 5804 section 2.1: OK (SASL "...")

    def __init__(self, settings: SessionSettings) -> None:
        super().__init__(settings)
        self._framer = LogicalLines(self._lines, settings.max_line)

    # --------------------------------------------------------- dialect hooks

    def _greeting(self) -> list[Event]:
        text = f"{self._settings.hostname} authgate ready."
        return [Send(self._capability_response() + b"OK " + _quote_text(text) + CRLF)]

    def _after_tls(self) -> list[Event]:
        # RFC 5804 section 2.2: after the handshake the server sends its
        # capabilities again, unasked (now without STARTTLS, maybe with
        # more SASL mechanisms), then OK.
        return [Send(self._capability_response() + b'OK "TLS negotiation successful."' + CRLF)]

    def _forget_after_tls(self) -> None:
        self._framer.reset()

    def _next_line(self) -> bytes | None:
        return self._framer.next()

    def _challenge(self, data: bytes) -> Send:
        # Section 2.1: a server challenge is a string holding base64.
        return Send(encode_string(b64encode(data)) + CRLF)

    def _unframe_response(self, line: bytes) -> bytes | None:
        # Section 2.1: the client's response is one string of base64, or
        # the string "*" to cancel.
        try:
            tokens = parse_line(line)
        except SieveSyntaxError:
            return None
        if len(tokens) != 1 or tokens[0].kind is not TokenKind.STRING:
            return None
        return tokens[0].value

    def _failure_reply(self, attempt: Attempt, reason: FailureReason) -> Send:
        return _reply(_FAILURE_REPLY[reason])

    def _refusal_reply(self, attempt: Attempt, refusal: Refusal) -> Send:
        return _reply(_REFUSAL_REPLY[refusal])

    def _backend_failed_reply(self, attempt: Attempt, failure: BackendFailure) -> Send:
        if failure is BackendFailure.PASSWORD_EXPIRED:
            return _reply(_FAILURE_REPLY[FailureReason.EXPIRED])
        return _reply(_BACKEND_FAILED_REPLY)

    def _success_reply(self, attempt: Attempt, capabilities: Sequence[str]) -> Send:
        # Section 2.1: no capabilities after login unless a security layer
        # was negotiated (we never negotiate one); the additional data with
        # success (SCRAM's server signature) goes in the SASL code.
        additional = attempt.success.additional if attempt.success is not None else None
        if additional is not None:
            code = b"(SASL " + encode_string(b64encode(additional)) + b") "
            return _reply(b"OK " + code + b'"Logged in."')
        return _reply(b'OK "Logged in."')

    # -------------------------------------------------------------- commands

    def _command(self, line: bytes) -> list[Event]:
        goodbye = self._count_command()
        if goodbye is not None:
            return goodbye
        try:
            tokens = parse_line(line)
        except SieveSyntaxError:
            return self._error(_reply(_NO_SYNTAX))
        if not tokens or tokens[0].kind is not TokenKind.ATOM:
            return self._error(_reply(_NO_SYNTAX))
        verb = tokens[0].value.upper()
        handler = _COMMANDS.get(verb)
        if handler is not None:
            return handler(self, tokens[1:])
        if verb in _AUTHENTICATED_COMMANDS:
            return self._error(_reply(_NO_AUTH_FIRST))
        return self._error(_reply(_NO_UNKNOWN))

    def _cmd_capability(self, args: list[Token]) -> list[Event]:
        if args:
            return self._error(_reply(_NO_SYNTAX))
        return [Send(self._capability_response() + b'OK "Capability completed."' + CRLF)]

    def _cmd_noop(self, args: list[Token]) -> list[Event]:
        # Section 2.13: NOOP [string]; the string comes back as TAG.
        if len(args) > 1 or any(t.kind is not TokenKind.STRING for t in args):
            return self._error(_reply(_NO_SYNTAX))
        if args and _ECHO_TAG.fullmatch(args[0].value):
            return [_reply(b"OK (TAG " + encode_string(args[0].value) + b') "Done."')]
        return [_reply(b'OK "NOOP completed."')]

    def _cmd_logout(self, args: list[Token]) -> list[Event]:
        self._state = ServerState.CLOSED
        return [_reply(b'OK "Logout completed."'), Close()]

    def _cmd_starttls(self, args: list[Token]) -> list[Event]:
        if args:
            return self._error(_reply(_NO_SYNTAX))
        if self._tls_active:
            return self._error(_reply(b'NO "TLS is already active."'))
        if not self._settings.starttls_available:
            return self._error(_reply(b'NO "STARTTLS is not available."'))
        return self._begin_tls(_reply(b'OK "Begin TLS negotiation now."'))

    def _cmd_authenticate(self, args: list[Token]) -> list[Event]:
        # Section 2.1: AUTHENTICATE auth-type [SP string]; both are strings.
        if not 1 <= len(args) <= 2 or any(t.kind is not TokenKind.STRING for t in args):
            return self._error(_reply(_NO_SYNTAX))
        if not _MECH_NAME.fullmatch(args[0].value):
            return self._error(_reply(_REFUSAL_REPLY[Refusal.NOT_AVAILABLE]))
        name = args[0].value.decode("ascii").upper()
        initial = args[1].value if len(args) == 2 else None
        return self._authenticate(Attempt(name), initial)

    # -------------------------------------------------------------- helpers

    def _capability_response(self) -> bytes:
        """Section 1.7: one line per capability, a name and maybe a value."""
        decision = self._decide()
        lines: list[tuple[str, str | None]] = [
            ("IMPLEMENTATION", "authgate"),
            # The mechanisms the policy offers now; an empty list when it
            # offers none before TLS (Dovecot does the same).
            ("SASL", " ".join(decision.offered)),
        ]
        lines += _sieve_capabilities(self._settings.backend_capabilities())
        if self._settings.starttls_available and not self._tls_active:
            lines.append(("STARTTLS", None))
        lines.append(("VERSION", "1.0"))
        out = bytearray()
        for name, value in lines:
            out += _quote_text(name)
            if value is not None:
                out += b" " + _quote_text(value)
            out += CRLF
        return bytes(out)


_COMMANDS: dict[bytes, _Handler] = {
    b"CAPABILITY": ManageSieveServer._cmd_capability,
    b"NOOP": ManageSieveServer._cmd_noop,
    b"LOGOUT": ManageSieveServer._cmd_logout,
    b"STARTTLS": ManageSieveServer._cmd_starttls,
    b"AUTHENTICATE": ManageSieveServer._cmd_authenticate,
}



def _reply(text: bytes) -> Send:
    return Send(text + CRLF)


def _sieve_capabilities(backend: Sequence[str]) -> list[tuple[str, str | None]]:
    """The backend's Sieve-language capabilities ("NAME value" each), each
    name once, in the backend's order."""
    seen: set[str] = set()
    out: list[tuple[str, str | None]] = []
    for capability in backend:
        name, _, value = capability.partition(" ")
        name = name.upper()
        if name in BACKEND_CAPABILITIES and name not in seen:
            seen.add(name)
            out.append((name, value))
    return out


# ===================================================================== client

# A capability list longer than this is no ManageSieve server's.
_MAX_CAPABILITY_LINES = 200


def _printable(text: bytes) -> str:
    """A backend's text for our log: printable ASCII, bounded."""
    return "".join(chr(b) if 0x20 <= b < 0x7F else "?" for b in text[:200])


@dataclass(frozen=True)
class _Response:
    """One response from the backend: OK/NO/BYE (with the capability lines
    before it, in a capability response), or a SASL challenge."""

    status: bytes = b""  # OK / NO / BYE (upper case); b"" for a challenge
    code: tuple[Token, ...] = ()  # the response code's tokens, without parentheses
    text: bytes = b""
    capabilities: tuple[str, ...] = ()
    challenge: bytes | None = None  # a challenge string's value (base64)

    def code_name(self) -> bytes:
        return self.code[0].value.upper() if self.code else b""

    def describe(self) -> str:
        code = b"(" + b" ".join(t.value for t in self.code) + b") " if self.code else b""
        return _printable(self.status + b" " + code + self.text)


def _parse_response(tokens: list[Token]) -> _Response:
    """OK / NO / BYE [SP "(" resp-code ")"] [SP string] (RFC 5804 section 4)."""
    status = tokens[0].value.upper()
    rest = tokens[1:]
    code: list[Token] = []
    if rest and rest[0].kind is TokenKind.LPAREN:
        try:
            close = next(i for i, t in enumerate(rest) if t.kind is TokenKind.RPAREN)
        except StopIteration:
            raise MalformedReply("unclosed response code") from None
        code, rest = rest[1:close], rest[close + 1 :]
        if not code or code[0].kind is not TokenKind.ATOM:
            raise MalformedReply("malformed response code")
    if len(rest) > 1 or (rest and rest[0].kind is not TokenKind.STRING):
        raise MalformedReply("malformed response text")
    return _Response(status, tuple(code), rest[0].value if rest else b"")


_STATUSES = (b"OK", b"NO", b"BYE")


class ManageSieveClient(ClientCore[_Response]):
    """authgate logging in to a backend ManageSieve server (terminate or
    relay): a dialect of `ClientCore` (authgate.protocols.client).

    With `ClientSettings.capabilities_only` it logs in to nothing: once the
    backend's capabilities are known (after STARTTLS, if configured) it
    reports them as `LoggedIn.capabilities`, for our own greeting.

    Relay mode: a backend's OK (SASL "...") carries the mechanism's last
    data (SCRAM's server signature); the mail client gets it as one more
    challenge (RFC 4422 section 3.6 allows either form) and its empty
    answer completes the login.
    """

    NAME = "ManageSieve client"

    def __init__(self, settings: ClientSettings) -> None:
        super().__init__(settings)
        self._framer = LogicalLines(self._lines, settings.max_line)
        self._caps: tuple[str, ...] = ()
        self._collected: list[str] = []

    # -------------------------------------------------------------- framing

    def _next_reply(self) -> _Response | None:
        while (raw := self._framer.next()) is not None:
            try:
                tokens = parse_line(raw)
            except SieveSyntaxError as exc:
                raise MalformedReply(str(exc)) from None
            if not tokens:
                raise MalformedReply("empty line")
            first = tokens[0]
            if first.kind is TokenKind.ATOM and first.value.upper() in _STATUSES:
                response = _parse_response(tokens)
                caps, self._collected = tuple(self._collected), []
                return _Response(response.status, response.code, response.text, caps)
            if first.kind is not TokenKind.STRING:
                raise MalformedReply("neither a string nor OK/NO/BYE")
            if self._state is ClientState.AUTH:
                if len(tokens) != 1:
                    raise MalformedReply("a challenge is one string")
                return _Response(challenge=first.value)
            # A capability line: "NAME" [SP "value"] (section 1.7).
            if len(tokens) > 2 or any(t.kind is not TokenKind.STRING for t in tokens):
                raise MalformedReply("malformed capability line")
            if len(self._collected) >= _MAX_CAPABILITY_LINES:
                raise MalformedReply("capability list too long")
            words = [t.value.decode("utf-8", "replace") for t in tokens]
            self._collected.append(" ".join(words))
        return None

    def _forget_after_tls(self) -> None:
        self._framer.reset()
        self._collected = []

    def _response(self, data: bytes | None) -> Send:
        # Section 2.1: responses are strings; "*" cancels.
        if data is None:
            return Send(b'"*"' + CRLF)
        return Send(encode_string(b64encode(data), client=True) + CRLF)

    # ------------------------------------------------------------ responses

    def _on_greeting(self, reply: _Response) -> list[ClientEvent]:
        if reply.status != b"OK":
            return self._fail(BackendFailure.UNAVAILABLE, "greeting: " + reply.describe())
        self._caps = reply.capabilities
        return self._proceed()

    def _after_tls(self) -> list[ClientEvent]:
        # Section 2.2: the server sends its capabilities again, unasked.
        self._state, self._handler = ClientState.CAPABILITY, self._on_capabilities
        return []

    def _on_capabilities(self, reply: _Response) -> list[ClientEvent]:
        if reply.status != b"OK" or not reply.capabilities:
            return self._fail(BackendFailure.UNAVAILABLE, "capabilities: " + reply.describe())
        self._caps = reply.capabilities
        return self._proceed()

    def _proceed(self) -> list[ClientEvent]:
        if self._settings.starttls and not self._tls_done:
            if not self._has("STARTTLS"):
                return self._fail(BackendFailure.UNAVAILABLE, "backend does not offer STARTTLS")
            return self._send(b"STARTTLS", ClientState.STARTTLS, self._on_starttls)
        if self._settings.capabilities_only:
            return self._logged_in(self._caps)
        return self._ready()

    def _on_starttls(self, reply: _Response) -> list[ClientEvent]:
        if reply.status != b"OK":
            return self._fail(BackendFailure.UNAVAILABLE, "STARTTLS: " + reply.describe())
        return self._start_tls()

    # ----------------------------------------------------------------- login

    def _login(self) -> list[ClientEvent]:
        offers: list[str] = []
        for capability in self._caps:
            name, _, value = capability.partition(" ")
            if name.upper() == "SASL":
                offers = value.split()
        started = self._master_login(offers)
        if started is None:
            return self._fail(BackendFailure.REJECTED, "no common SASL mechanism")
        return started

    def _auth_command(self, name: str, initial: InitialResponse) -> list[ClientEvent]:
        # Section 2.1: the initial response is always allowed; an empty one
        # is the empty string.
        command = b"AUTHENTICATE " + encode_string(name.encode("ascii"))
        if initial is not NO_RESPONSE:
            command += b" " + encode_string(b64encode(initial), client=True)
        return self._send(command, ClientState.AUTH, self._on_auth)

    def _on_auth(self, reply: _Response) -> list[ClientEvent]:
        if reply.challenge is not None:
            return self._challenge(b64decode_strict(reply.challenge))
        if reply.status == b"OK":
            additional = self._success_data(reply)
            if additional is not None and self._settings.relay:
                # The mail client's mechanism checks it: one more challenge.
                return self._relay_final(additional)
            return self._verified(additional) or self._logged_in(())
        return self._fail(self._classify(reply), "AUTHENTICATE: " + reply.describe())

    def _success_data(self, reply: _Response) -> bytes | None:
        if reply.code_name() != b"SASL":
            return None
        if len(reply.code) != 2 or reply.code[1].kind is not TokenKind.STRING:
            return None
        return b64decode_strict(reply.code[1].value)

    def _classify(self, reply: _Response) -> BackendFailure:
        # TRYLATER (section 1.3) and BYE: temporary; NO: refused.
        if reply.code_name() == b"TRYLATER" or reply.status == b"BYE":
            return BackendFailure.UNAVAILABLE
        return self._refusal(temporary=False)

    def _has(self, name: str) -> bool:
        return any(c.partition(" ")[0].upper() == name for c in self._caps)


# ===================================================== after the hand-over

# Commands that would change, under authgate's feet, who is logged in at the
# backend or what carries the session: UNAUTHENTICATE (RFC 5804 section
# 2.14.1) would let the client log in again straight at the backend, past
# the policy; AUTHENTICATE and STARTTLS are not allowed after a login.
_REFUSED_AFTER_LOGIN = frozenset({b"UNAUTHENTICATE", b"AUTHENTICATE", b"STARTTLS"})
BYE_REFUSED_AFTER_LOGIN = b'BYE "UNAUTHENTICATE, AUTHENTICATE and STARTTLS end the session here."'
_LINE_START_VERB = re.compile(rb"[ ]*([A-Za-z]+)")


class ManageSieveSpliceFilter:
    """The spliced session's client side: commands pass to the backend
    unchanged, literals (a PUTSCRIPT's script) stream through unread, and
    a command in `_REFUSED_AFTER_LOGIN` ends the session with BYE instead
    of reaching the backend. Answering it with NO in place would put our
    reply before the backend's answers to commands pipelined ahead of it;
    ending the session keeps the order and the policy. The backend's bytes
    pass unchanged. A command line (its literals not counted) longer than
    `max_line` ends the session too."""

    def __init__(self, max_line: int) -> None:
        self._max_line = max_line
        self._line = bytearray()  # the physical line being read
        self._literal = 0  # literal octets still to pass through
        self._continued = False  # the line goes on after a literal: not a command start
        self._closed = False

    @property
    def held(self) -> int:
        return len(self._line)

    def from_client(self, data: bytes) -> FilterOutput:
        if self._closed:
            return FilterOutput()
        out = FilterOutput()
        forward = bytearray()
        pos = 0
        while pos < len(data):
            if self._literal:
                take = min(self._literal, len(data) - pos)
                forward += data[pos : pos + take]
                self._literal -= take
                pos += take
                continue
            end = data.find(b"\n", pos)
            if end < 0:
                self._line += data[pos:]
                if len(self._line) > self._max_line:
                    return self._end(out, forward, "line too long")
                break
            self._line += data[pos : end + 1]
            pos = end + 1
            line, self._line = bytes(self._line), bytearray()
            if len(line) > self._max_line + 2:
                return self._end(out, forward, "line too long")
            if not self._continued:
                verb = _LINE_START_VERB.match(line)
                if verb is not None and verb.group(1).upper() in _REFUSED_AFTER_LOGIN:
                    name = verb.group(1).upper().decode("ascii")
                    reply = BYE_REFUSED_AFTER_LOGIN.decode("ascii")
                    out.events.append(Refused(name, reply))
                    return self._end(out, forward, None)
            forward += line
            announced = _LITERAL_AT_END.search(line.rstrip(b"\r\n"))
            if announced is None:
                self._continued = False
                continue
            digits = announced.group(1)
            if len(digits) > _MAX_LITERAL_DIGITS:
                return self._end(out, forward[: -len(line)], "literal too large")
            self._literal = int(digits)
            self._continued = True
        out.to_backend = bytes(forward)
        return out

    def from_backend(self, data: bytes) -> FilterOutput:
        return FilterOutput(to_client=data)

    def _end(self, out: FilterOutput, forward: bytearray, reason: str | None) -> FilterOutput:
        """Forward what came before, say goodbye, close."""
        self._closed = True
        self._line.clear()
        out.to_backend = bytes(forward)
        out.to_client = (
            BYE_REFUSED_AFTER_LOGIN if reason is None else b'BYE "' + reason.encode() + b'."'
        ) + CRLF
        if reason is not None:
            out.events.append(SpliceEnded(reason))
        out.close = True
        return out
