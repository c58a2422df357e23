"""IMAP before authentication: the server side mail clients talk to, and the
client side authgate uses to log in to the backend. Sans-IO (see base.py).

Standards: IMAP4rev1 (RFC 3501) and IMAP4rev2 (RFC 9051) -- we serve
IMAP4rev1 clients and only the not-authenticated state; SASL-IR (RFC 4959);
response codes (RFC 5530); ID (RFC 2971); LITERAL+ (RFC 7888).

Server choices worth knowing:
- A mechanism the policy refuses as NOT_AVAILABLE gets `NO [CANNOT]`:
  RFC 9051 section 6.2.2 asks for a tagged NO without a code, and RFC 5530
  has no exact one; CANNOT ("can never succeed") tells a client not to
  retry the same mechanism, which is true for an unknown or disabled one.
- `backend_failed()` answers `NO [UNAVAILABLE]` and the session stays
  un-authenticated: the client may retry later on the same connection.
- Refused and failed AUTHENTICATE/LOGIN attempts both emit `AuthFailed`
  (reason: the Refusal or FailureReason value) and count as errors.
- Relay mode: `relay_result(True)` answers a plain `OK` (the contract
  carries no capabilities); a driver that knows the backend's capabilities
  may call `backend_ready(caps)` instead to answer `OK [CAPABILITY ...]`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from authgate.policy import Refusal, client_ip
from authgate.protocols.base import (
    BackendFailure,
    ClientEvent,
    ClientSettings,
    Close,
    Event,
    Send,
    SessionSettings,
)
from authgate.protocols.client import ClientCore, ClientState
from authgate.protocols.common import (
    LineBuffer,
    LineTooLong,
    b64decode_strict,
    b64encode,
)
from authgate.protocols.server import Attempt, ServerCore, ServerState
from authgate.protocols.strings import StringSyntaxError, Token, TokenKind, tokenize
from authgate.sasl.base import (
    MAX_PASSWORD_OCTETS,
    NO_RESPONSE,
    Failure,
    FailureReason,
    InitialResponse,
    too_long,
)

__all__ = ["ImapClient", "ImapServer"]

CRLF = b"\r\n"

# What the driver says, outside the dialogue, just before it closes the
# connection: an untagged BYE (RFC 9051 section 7.1.5), with RFC 5530's
# UNAVAILABLE where trying again later may work.
BYE_BUSY = b"* BYE [UNAVAILABLE] Too many connections, try again later\r\n"
BYE_IDLE = b"* BYE Idle timeout, closing connection\r\n"
BYE_BLOCKED = b"* BYE [UNAVAILABLE] Too many failed logins from your address, try again later\r\n"
BYE_UNAVAILABLE = b"* BYE [UNAVAILABLE] Mail server unavailable, try again later\r\n"

# RFC 9051 section 9 allows a tag of any ASTRING-CHAR but "+", which
# includes "<", ">", "'", "&" and ":". We echo a tag in our replies, so a
# line of HTML sent by a browser to this port ("<script>..."; ALPACA's
# reflection attack) or an HTTP header name would come back: tags are
# letters, digits, "-", "." and "_", the form real clients use and nginx
# accepts. Any other tag gets an untagged BAD.
_TAG = re.compile(rb"[A-Za-z0-9._-]+")
# RFC 4422 section 3.1: a SASL mechanism name is 1 to 20 of A-Z 0-9 - _.
_MECH_NAME = re.compile(rb"[A-Za-z0-9_-]{1,20}")
# A line that ends in a literal's octet count: "{n}" (synchronising) or
# "{n+}" (RFC 7888 non-synchronising). More than 18 digits is "too big"
# anyway and keeps int() away from huge digit strings.
_LITERAL_AT_END = re.compile(rb"\{([0-9]+)(\+?)\}\Z")
_MAX_LITERAL_DIGITS = 18
# A capability is an atom (RFC 9051 section 9); "]" would end our response code.
_CAPABILITY_ATOM = re.compile(r"[!#$&'+,\-./0-9:;<=>?@A-Z\[^_`a-z|}~]+")
# RFC 2971 section 3.3: at most 30 field-value pairs.
_MAX_ID_PAIRS = 30


# ===================================================================== tokens


# The string syntax IMAP shares with ManageSieve (RFC 9051 section 4).
_Kind = TokenKind
_Token = Token
# The command's arguments do not parse (answered with tagged BAD).
_SyntaxError = StringSyntaxError


def _tokenize(segments: Sequence[bytes]) -> list[_Token]:
    """Split command arguments into tokens.

    `segments` alternate text and literal data: text, literal, text, ...;
    each text but the last ends with the "{n}" that announced the literal
    after it (RFC 9051 section 4.3).
    """
    tokens: list[_Token] = []
    for index in range(0, len(segments), 2):
        pending = list(segments[index + 1 : index + 2])  # this text's literal
        # A bare CR inside a quoted string has always passed here (a line
        # ends at LF); RFC 9051's QUOTED-CHAR excludes it, ManageSieve refuses it.
        tokens += tokenize(
            segments[index], functools.partial(_segment_literal, pending), quoted_forbidden=b"\x00"
        )
        if pending:
            raise _SyntaxError
    return tokens


def _segment_literal(pending: list[bytes], text: bytes, pos: int) -> tuple[bytes, int]:
    """Only a literal's announcement, which ends the text segment."""
    if not pending or not _LITERAL_AT_END.fullmatch(text, pos):
        raise _SyntaxError
    literal = pending.pop()
    if b"\x00" in literal:  # RFC 9051: CHAR8 excludes NUL
        raise _SyntaxError
    return literal, len(text)


def _astring(token: _Token) -> str:
    if token.kind not in (_Kind.ATOM, _Kind.STRING):
        raise _SyntaxError
    try:
        return token.value.decode("utf-8")
    except UnicodeDecodeError:
        raise _SyntaxError from None


def _quote(text: str) -> bytes:
    """A quoted string for a command or response we send."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    cleaned = "".join(c for c in escaped if c not in "\r\n\0")
    return b'"' + cleaned.encode("utf-8") + b'"'


@functools.lru_cache(maxsize=16)  # a backend sends the same list every login
def _capability_code(capabilities: tuple[str, ...]) -> bytes:
    """ "[CAPABILITY ...] " of the well-formed atoms (b"" if none): a
    backend's list must not be able to inject a line break or a "]" into
    our response code."""
    atoms = [c for c in capabilities if _CAPABILITY_ATOM.fullmatch(c)]
    return b"[CAPABILITY " + " ".join(atoms).encode("ascii") + b"] " if atoms else b""


# ===================================================================== server


# RFC 9051 section 7.1 / RFC 5530 response codes for each refusal.
_REFUSAL_REPLY: dict[Refusal, bytes] = {
    Refusal.TLS_REQUIRED: b"NO [PRIVACYREQUIRED] Authentication requires TLS",
    Refusal.MECHANISM_NEEDS_TLS: b"NO [PRIVACYREQUIRED] This mechanism requires TLS",
    Refusal.CHANNEL_BINDING_UNAVAILABLE: b"NO [PRIVACYREQUIRED] Channel binding requires TLS",
    Refusal.NOT_AVAILABLE: b"NO [CANNOT] Unsupported authentication mechanism",
}
_LOGIN_REFUSAL_REPLY: dict[Refusal, bytes] = {
    Refusal.TLS_REQUIRED: b"NO [PRIVACYREQUIRED] LOGIN requires TLS",
    Refusal.MECHANISM_NEEDS_TLS: b"NO [PRIVACYREQUIRED] LOGIN requires TLS",
    Refusal.CHANNEL_BINDING_UNAVAILABLE: b"NO [PRIVACYREQUIRED] LOGIN requires TLS",
    Refusal.NOT_AVAILABLE: b"NO [CANNOT] LOGIN is disabled",
}
# RFC 9051 section 6.2.2: a response that cannot be decoded and a "*"
# cancellation get a tagged BAD; everything else is a NO with a code.
_FAILURE_REPLY: dict[FailureReason, bytes] = {
    FailureReason.MALFORMED: b"BAD Malformed authentication data",
    FailureReason.CANCELLED: b"BAD Authentication cancelled",
    FailureReason.INVALID_CREDENTIALS: b"NO [AUTHENTICATIONFAILED] Authentication failed",
    FailureReason.AUTHZ_DENIED: b"NO [AUTHORIZATIONFAILED] Authorization failed",
    FailureReason.TEMPORARY: b"NO [UNAVAILABLE] Temporary authentication failure",
    FailureReason.TOO_WEAK: b"NO [CANNOT] Authentication mechanism is too weak",
    FailureReason.ENCRYPTION_REQUIRED: b"NO [PRIVACYREQUIRED] Encryption required",
    FailureReason.EXPIRED: b"NO [EXPIRED] Password expired",
    FailureReason.DIGEST_URI_MISMATCH: b"NO [AUTHENTICATIONFAILED] Authentication failed:"
    b" digest-uri is not for this server",
    # RFC 5530 section 3: LIMIT, "ran up against an implementation limit".
    FailureReason.TOO_LONG: b"NO [LIMIT] Password too long (at most %d octets)"
    % MAX_PASSWORD_OCTETS,
}
# Mechanism label for the LOGIN command in `Authenticated` and `AuthFailed`.
LOGIN_COMMAND = "LOGIN-COMMAND"
_BACKEND_FAILED_REPLY = b"NO [UNAVAILABLE] Mail server unavailable, try again later"

# RFC 9051 section 6.2.1 (and RFC 2595 section 3.1 for LOGINDISABLED): what
# a client may do on a connection that must be encrypted before anything.
_ALLOWED_BEFORE_TLS = frozenset(
    {b"CAPABILITY", b"NOOP", b"LOGOUT", b"STARTTLS", b"LOGIN", b"AUTHENTICATE"}
)


@dataclass
class _Command:
    """A command being read: text lines and literal data, alternating."""

    segments: list[bytes] = field(default_factory=list)
    size: int = 0
    oversized: bool = False  # a non-synchronising literal was too big: discard


class ImapServer(ServerCore):
    """IMAP server machine for the not-authenticated state: the IMAP
    dialect of `ServerCore` (tags, literals, response codes)."""

    NAME = "IMAP server"
    LINE_TOO_LONG = b"* BYE Line too long" + CRLF
    TOO_MANY_ERRORS = b"* BYE Too many errors" + CRLF
    TOO_MANY_COMMANDS = b"* BYE Too many commands before login" + CRLF

    def __init__(self, settings: SessionSettings) -> None:
        super().__init__(settings)
        self._reading: _Command | None = None  # a command with literals, being read
        self._literal_needed = 0
        self._literal = bytearray()

    # --------------------------------------------------------- dialect hooks

    def _greeting(self) -> list[Event]:
        host = self._settings.hostname.encode("utf-8", "replace")
        line = b"* OK [CAPABILITY " + self._capabilities() + b"] " + host + b" authgate ready"
        return [Send(line + CRLF)]

    def _challenge(self, data: bytes) -> Send:
        # RFC 9051 section 7.5: continue-req = "+" SP base64; an empty
        # challenge is "+ " alone.
        return Send(b"+ " + b64encode(data) + CRLF)

    def _failure_reply(self, attempt: Attempt, reason: FailureReason) -> Send:
        return self._tagged(attempt.tag, _FAILURE_REPLY[reason])

    def _refusal_reply(self, attempt: Attempt, refusal: Refusal) -> Send:
        table = _LOGIN_REFUSAL_REPLY if attempt.mechanism == LOGIN_COMMAND else _REFUSAL_REPLY
        return self._tagged(attempt.tag, table[refusal])

    def _backend_failed_reply(self, attempt: Attempt, failure: BackendFailure) -> Send:
        if failure is BackendFailure.PASSWORD_EXPIRED:
            return self._tagged(attempt.tag, _FAILURE_REPLY[FailureReason.EXPIRED])
        return self._tagged(attempt.tag, _BACKEND_FAILED_REPLY)

    def _referral_reply(self, attempt: Attempt, url: bytes) -> Send | None:
        # RFC 2221 section 4.1: NO [REFERRAL url] to LOGIN or AUTHENTICATE.
        text = b"NO [REFERRAL " + url + b"] Your mail is on another server"
        return self._tagged(attempt.tag, text)

    def _success_reply(self, attempt: Attempt, capabilities: Sequence[str]) -> Send:
        code = _capability_code(tuple(capabilities))
        return self._tagged(attempt.tag, b"OK " + code + b"Logged in")

    def _next_line(self) -> bytes | None:
        # A command's literals (RFC 9051 section 4.3) are read whole, then
        # the rest of its line.
        while self._literal_needed:
            if not self._read_literal():
                return None
        return self._lines.next_line()

    # ------------------------------------------------------------- framing

    def _read_literal(self) -> bool:
        """Take literal bytes from the buffer; True once the literal is whole."""
        available = self._lines.take_rest()
        if not available:
            return False
        take, rest = available[: self._literal_needed], available[self._literal_needed :]
        self._lines.feed(rest)
        self._literal_needed -= len(take)
        command = self._reading
        assert command is not None
        if not command.oversized:
            self._literal += take
        if self._literal_needed:
            return False
        if not command.oversized:
            command.segments.append(bytes(self._literal))
        self._literal.clear()
        return True

    def _command(self, line: bytes) -> list[Event]:
        command = self._reading or _Command()
        self._reading = command
        if not command.oversized:  # a doomed command keeps only its tag line
            command.segments.append(line)
            command.size += len(line)
        announced = _LITERAL_AT_END.search(line)
        if announced is None:
            self._reading = None
            if command.oversized:
                return self._too_big(command)
            return self._execute(command.segments)
        digits, plus = announced.groups()
        size = int(digits) if len(digits) <= _MAX_LITERAL_DIGITS else None
        # A literal counts toward the command's size: one command, all its
        # lines and literals, must fit in max_line.
        if size is None or command.oversized or command.size + size > self._settings.max_line:
            if not plus:
                # RFC 9051 section 7.5: refuse instead of sending "+"; the
                # client then does not send the literal at all.
                self._reading = None
                return self._too_big(command)
            # RFC 7888 section 4: a non-synchronising literal arrives anyway;
            # read and discard it (and the rest of the command), then refuse.
            command.oversized = True
            self._literal_needed = size if size is not None else 1 << 62
            return []
        command.size += size
        self._literal_needed = size
        if size == 0:
            command.segments.append(b"")
        if plus:
            return []
        return [Send(b"+ Ready for literal data" + CRLF)]

    def _too_big(self, command: _Command) -> list[Event]:
        tag = _tag_of(command.segments[0])
        return self._error(self._bad_or_untagged(tag, b"BAD [TOOBIG] Literal too large"))

    # ------------------------------------------------------------ commands

    def _execute(self, segments: list[bytes]) -> list[Event]:
        goodbye = self._count_command()
        if goodbye is not None:
            return goodbye
        tag, _, rest = segments[0].partition(b" ")
        if not _TAG.fullmatch(tag):
            return self._error(Send(b"* BAD Missing or invalid tag" + CRLF))
        name, _, arguments = rest.partition(b" ")
        handler = _COMMANDS.get(name.upper())
        if handler is None:
            return self._error(self._tagged(tag, b"BAD Unknown command or not valid now"))
        if self._decide().session_tls_required and name.upper() not in _ALLOWED_BEFORE_TLS:
            return self._error(self._tagged(tag, self._privacy_text()))
        try:
            args = _tokenize([arguments, *segments[1:]])
            return handler(self, tag, args)
        except _SyntaxError:
            return self._error(self._tagged(tag, b"BAD Syntax error in arguments"))

    def _cmd_capability(self, tag: bytes, args: list[_Token]) -> list[Event]:
        _no_arguments(args)
        line = b"* CAPABILITY " + self._capabilities() + CRLF
        return [Send(line), self._tagged(tag, b"OK CAPABILITY completed")]

    def _cmd_noop(self, tag: bytes, args: list[_Token]) -> list[Event]:
        _no_arguments(args)
        return [self._tagged(tag, b"OK NOOP completed")]

    def _cmd_logout(self, tag: bytes, args: list[_Token]) -> list[Event]:
        _no_arguments(args)
        self._state = ServerState.CLOSED
        return [
            Send(b"* BYE Logging out" + CRLF),
            self._tagged(tag, b"OK LOGOUT completed"),
            Close(),
        ]

    def _cmd_starttls(self, tag: bytes, args: list[_Token]) -> list[Event]:
        _no_arguments(args)
        if self._tls_active:
            return self._error(self._tagged(tag, b"BAD TLS is already active"))
        if not self._settings.starttls_available:
            return self._error(self._tagged(tag, b"BAD STARTTLS is not available"))
        return self._begin_tls(self._tagged(tag, b"OK Begin TLS negotiation now"))

    def _cmd_id(self, tag: bytes, args: list[_Token]) -> list[Event]:
        _check_id_arguments(args)
        # RFC 2971 section 3.1: the server answers with its own ID list; we
        # name ourselves only (no version: it helps attackers, not clients).
        return [Send(b'* ID ("name" "authgate")' + CRLF), self._tagged(tag, b"OK ID completed")]

    def _cmd_login(self, tag: bytes, args: list[_Token]) -> list[Event]:
        if len(args) != 2:
            raise _SyntaxError
        user, password = _astring(args[0]), _astring(args[1])
        attempt = Attempt(LOGIN_COMMAND, tag, authcid=user or None)
        refused = self._refuse_login(attempt)
        if refused is not None:
            return refused
        self._attempt = attempt
        # Fields PLAIN could not carry are a failed login (NO), not a BAD.
        if not user or not password or "\0" in user + password:
            return self._fail(Failure(FailureReason.INVALID_CREDENTIALS))
        if len(args[1].value) > MAX_PASSWORD_OCTETS and not self._settings.relay:
            return self._fail(too_long("LOGIN command"))
        return self._login(attempt, user, password)

    def _cmd_authenticate(self, tag: bytes, args: list[_Token]) -> list[Event]:
        if not 1 <= len(args) <= 2 or any(t.kind is not _Kind.ATOM for t in args):
            raise _SyntaxError
        if not _MECH_NAME.fullmatch(args[0].value):
            raise _SyntaxError
        name = args[0].value.decode("ascii").upper()
        initial = args[1].value if len(args) == 2 else None
        return self._authenticate(Attempt(name, tag), initial)

    # -------------------------------------------------------------- helpers

    def _capabilities(self) -> bytes:
        decision = self._decide()
        starttls = self._settings.starttls_available and not self._tls_active
        return _capability_line(decision.offered, decision.cleartext_login, starttls)

    def _privacy_text(self) -> bytes:
        if self._settings.starttls_available and not self._tls_active:
            return b"NO [PRIVACYREQUIRED] Use STARTTLS first"
        return b"NO [PRIVACYREQUIRED] Encryption required"

    @staticmethod
    def _tagged(tag: bytes, text: bytes) -> Send:
        return Send(tag + b" " + text + CRLF)

    def _bad_or_untagged(self, tag: bytes | None, text: bytes) -> Send:
        return self._tagged(tag, text) if tag is not None else Send(b"* " + text + CRLF)


_COMMANDS: dict[bytes, Callable[[ImapServer, bytes, list[_Token]], list[Event]]] = {
    b"CAPABILITY": ImapServer._cmd_capability,
    b"NOOP": ImapServer._cmd_noop,
    b"LOGOUT": ImapServer._cmd_logout,
    b"STARTTLS": ImapServer._cmd_starttls,
    b"ID": ImapServer._cmd_id,
    b"LOGIN": ImapServer._cmd_login,
    b"AUTHENTICATE": ImapServer._cmd_authenticate,
}


def _tag_of(line: bytes) -> bytes | None:
    tag = line.partition(b" ")[0]
    return tag if _TAG.fullmatch(tag) else None


def _no_arguments(args: list[_Token]) -> None:
    if args:
        raise _SyntaxError


def _check_id_arguments(args: list[_Token]) -> None:
    """RFC 2971 section 4: id_params_list = "(" *(string SP nstring) ")" / nil.
    We do not use the client's values, but refuse what is not an ID list."""
    if len(args) == 1 and args[0].kind is _Kind.ATOM and args[0].value.upper() == b"NIL":
        return
    if len(args) < 2 or args[0].kind is not _Kind.LPAREN or args[-1].kind is not _Kind.RPAREN:
        raise _SyntaxError
    inner = args[1:-1]
    if len(inner) % 2 or len(inner) > 2 * _MAX_ID_PAIRS:
        raise _SyntaxError
    for field_token, value in zip(inner[::2], inner[1::2], strict=True):
        if field_token.kind is not _Kind.STRING:
            raise _SyntaxError
        nil = value.kind is _Kind.ATOM and value.value.upper() == b"NIL"
        if value.kind is not _Kind.STRING and not nil:
            raise _SyntaxError


# ===================================================================== client


_RESP_CODE = re.compile(rb"\[([^\]]*)\]")


@dataclass(frozen=True)
class _Status:
    """A tagged (or greeting) status response: OK / NO / BAD / BYE / PREAUTH."""

    status: bytes  # upper case
    code: bytes  # the response code's text without brackets, or b""
    text: bytes

    def describe(self) -> str:
        """For the log: "NO [CODE] text", printable and bounded."""
        code = b"[" + self.code + b"] " if self.code else b""
        return _printable(self.status + b" " + code + self.text)

    def code_name(self) -> bytes:
        return self.code.partition(b" ")[0].upper()

    def capabilities(self) -> tuple[str, ...] | None:
        if self.code_name() != b"CAPABILITY":
            return None
        return _parse_capabilities(self.code.partition(b" ")[2])


@functools.lru_cache(maxsize=64)  # a listener's few policy states
def _capability_line(offered: tuple[str, ...], cleartext_login: bool, starttls: bool) -> bytes:
    """Our CAPABILITY list for a decision's mechanisms and TLS state."""
    caps = ["IMAP4rev1", "SASL-IR", "LITERAL+", "ID"]
    if starttls:
        caps.append("STARTTLS")
    if not cleartext_login:
        caps.append("LOGINDISABLED")  # RFC 9051 section 6.2.3
    caps += [f"AUTH={name}" for name in offered]
    return " ".join(caps).encode("ascii")


def _parse_status(text: bytes) -> _Status:
    status, _, rest = text.partition(b" ")
    code = b""
    match = _RESP_CODE.match(rest)
    if match is not None:
        code = match.group(1)
        rest = rest[match.end() :].lstrip(b" ")
    return _Status(status.upper(), code, rest)


@functools.lru_cache(maxsize=16)  # the same few lists, login after login
def _parse_capabilities(text: bytes) -> tuple[str, ...]:
    return tuple(t.decode("ascii", "replace") for t in text.split(b" ") if t)


@functools.lru_cache(maxsize=16)  # (the lists _parse_capabilities returns)
def _capability_names(capabilities: tuple[str, ...]) -> frozenset[str]:
    """A capability list's names in upper case, to look names up in."""
    return frozenset(c.upper() for c in capabilities)


@functools.lru_cache(maxsize=16)
def _sasl_offers(capabilities: tuple[str, ...]) -> tuple[str, ...]:
    """The SASL mechanisms a capability list offers (its AUTH= names)."""
    return tuple(c[5:] for c in capabilities if c.upper().startswith("AUTH="))


def _printable(text: bytes) -> str:
    """A backend's text for our log: printable ASCII, bounded."""
    return "".join(chr(b) if 0x20 <= b < 0x7F else "?" for b in text[:200])


class _ResponseReader:
    """Frames server responses: a line, and when it ends in "{n}" the n
    bytes of literal data and the rest of the response after it (RFC 9051
    section 4.3). Literal data is skipped, never buffered: we only need each
    response's first line."""

    def __init__(self, lines: LineBuffer) -> None:
        self.lines = lines
        self._skip = 0
        self._first: bytes | None = None

    def next_response(self) -> bytes | None:
        """The first line of the next complete response, or None."""
        while True:
            if self._skip:
                rest = self.lines.take_rest()
                if not rest:
                    return None
                self.lines.feed(rest[self._skip :])
                self._skip -= min(self._skip, len(rest))
                if self._skip:
                    return None
            line = self.lines.next_line()
            if line is None:
                return None
            if self._first is None:
                self._first = line
            announced = _LITERAL_AT_END.search(line)
            if announced is not None and not line.startswith(b"+"):
                digits = announced.group(1)
                # A literal this large is no login-time response: framing lost.
                if len(digits) > _MAX_LITERAL_DIGITS:
                    raise LineTooLong
                self._skip = int(digits)
                continue
            first, self._first = self._first, None
            return first

    def reset(self) -> None:
        self._skip = 0
        self._first = None


class ImapClient(ClientCore[bytes]):
    """IMAP client machine: log in to the backend (or relay a client's SASL),
    a dialect of `ClientCore` (authgate.protocols.client).

    Nothing the backend says before its tagged login reply reaches the mail
    client: untagged data (ALERT, REFERRAL, EXISTS, ...) is read and dropped,
    PREAUTH and BYE end the login. A tagged reply or continuation that
    arrives with the data we answered by sending a command ends the login
    too: it answers a command the backend had not received yet. What follows
    the tagged login reply is the session's (`LoggedIn.pending`).
    """

    NAME = "IMAP client"
    # RFC 9051 section 7: the server may send untagged data at any time; only
    # a tagged reply or a continuation must wait for our command.
    LOCKSTEP = False

    def __init__(self, settings: ClientSettings) -> None:
        super().__init__(settings)
        self._reader = _ResponseReader(self._lines)
        self._next_tag = 0
        self._tag = b""
        self._on_status: Callable[[_Status], list[ClientEvent]] = self._tagged_capability
        self._capabilities: tuple[str, ...] = ()
        self._untagged_caps: tuple[str, ...] | None = None
        self._id_sent = False

    # -------------------------------------------------------------- framing

    def _next_reply(self) -> bytes | None:
        return self._reader.next_response()

    def _may_come_unasked(self, reply: bytes) -> bool:
        return reply.startswith(b"* ")

    def _forget_after_tls(self) -> None:
        self._reader.reset()

    def _after_tls(self) -> list[ClientEvent]:
        # RFC 9051 section 6.2.1: capabilities from before TLS are void.
        return self._command(b"CAPABILITY", ClientState.CAPABILITY, self._tagged_capability)

    # ------------------------------------------------------------ responses

    def _on_reply(self, reply: bytes) -> list[ClientEvent]:
        if self._state is ClientState.GREETING:
            return self._on_greeting(reply)
        if reply.startswith(b"+"):
            return self._continuation(reply[2:] if reply.startswith(b"+ ") else reply[1:])
        if reply.startswith(b"* "):
            return self._untagged(reply[2:])
        tag, _, rest = reply.partition(b" ")
        if tag != self._tag or self._state in (ClientState.READY, ClientState.RELAY_WAIT):
            return self._fail(BackendFailure.UNAVAILABLE, "unexpected tagged response")
        return self._on_status(_parse_status(rest))

    def _on_greeting(self, reply: bytes) -> list[ClientEvent]:
        if not reply.startswith(b"* "):
            return self._fail(BackendFailure.UNAVAILABLE, "malformed greeting")
        status = _parse_status(reply[2:])
        if status.status != b"OK":
            # PREAUTH: someone is logged in already, not as the user; BYE:
            # the backend refuses us. Either way no login can happen here.
            return self._fail(BackendFailure.UNAVAILABLE, f"greeting: {status.describe()}")
        capabilities = status.capabilities()
        if capabilities is None:
            return self._command(b"CAPABILITY", ClientState.CAPABILITY, self._tagged_capability)
        self._capabilities = capabilities
        return self._proceed()

    def _untagged(self, text: bytes) -> list[ClientEvent]:
        name, _, rest = text.partition(b" ")
        if name.upper() == b"BYE":
            return self._fail(BackendFailure.UNAVAILABLE, f"BYE {_printable(rest)}")
        if name.upper() == b"CAPABILITY":
            self._untagged_caps = _parse_capabilities(rest)
        return []  # anything else (ID reply, OK notes) is of no interest

    def _continuation(self, text: bytes) -> list[ClientEvent]:
        if self._state is not ClientState.AUTH:
            return self._fail(BackendFailure.UNAVAILABLE, "unexpected continuation")
        return self._challenge(b64decode_strict(text))

    def _tagged_capability(self, status: _Status) -> list[ClientEvent]:
        capabilities = status.capabilities() or self._untagged_caps
        if status.status != b"OK" or capabilities is None:
            return self._fail(BackendFailure.UNAVAILABLE, "CAPABILITY failed")
        self._capabilities = capabilities
        return self._proceed()

    def _tagged_starttls(self, status: _Status) -> list[ClientEvent]:
        if status.status != b"OK":
            return self._fail(BackendFailure.UNAVAILABLE, f"STARTTLS: {status.describe()}")
        return self._start_tls()

    def _tagged_id(self, status: _Status) -> list[ClientEvent]:
        # The ID reply does not matter: a backend that refuses it (or does
        # not trust us) still lets us log in.
        return self._ready()

    def _tagged_authenticate(self, status: _Status) -> list[ClientEvent]:
        if status.status != b"OK":
            return self._fail(self._classify(status), f"AUTHENTICATE: {status.describe()}")
        # IMAP has no additional data with success: a SCRAM or DIGEST-MD5
        # proof came as the last challenge.
        unverified = self._verified()
        if unverified is not None:
            return unverified
        # Some servers send an untagged CAPABILITY before the tagged OK.
        capabilities = status.capabilities() or self._untagged_caps
        if capabilities is None:
            return self._command(
                b"CAPABILITY", ClientState.POST_LOGIN, self._tagged_post_capability
            )
        return self._logged_in(capabilities)

    def _tagged_post_capability(self, status: _Status) -> list[ClientEvent]:
        capabilities = status.capabilities() or self._untagged_caps or ()
        return self._logged_in(capabilities if status.status == b"OK" else ())

    # ---------------------------------------------------------------- steps

    def _proceed(self) -> list[ClientEvent]:
        """Capabilities are known (again): STARTTLS, ID, then log in."""
        offered = _capability_names(self._capabilities)
        if self._settings.starttls and not self._tls_done:
            if "STARTTLS" not in offered:
                return self._fail(BackendFailure.UNAVAILABLE, "backend does not offer STARTTLS")
            return self._command(b"STARTTLS", ClientState.STARTTLS, self._tagged_starttls)
        address = client_ip(self._settings.client_address or "")
        if self._settings.use_id and "ID" in offered and address and not self._id_sent:
            self._id_sent = True
            # RFC 2971 ID; Dovecot takes the client's address from it when we
            # are in its login_trusted_networks. Only an IP address, written
            # in its canonical form, goes there: never text that could carry
            # a line break or a quote (nginx CVE-2026-28753).
            fields = [b'"x-originating-ip"', _quote(address.compressed)]
            port = self._settings.client_port
            if port is not None and 0 <= port <= 65535:
                fields += [b'"x-originating-port"', _quote(str(port))]
            command = b"ID (" + b" ".join(fields) + b")"
            return self._command(command, ClientState.NEGOTIATE, self._tagged_id)
        return self._ready()

    def _login(self) -> list[ClientEvent]:
        started = self._master_login(_sasl_offers(self._capabilities))
        if started is None:
            return self._fail(BackendFailure.REJECTED, "no common SASL mechanism")
        return started

    def _auth_command(self, name: str, initial: InitialResponse) -> list[ClientEvent]:
        command = b"AUTHENTICATE " + name.encode("ascii")
        sasl_ir = "SASL-IR" in _capability_names(self._capabilities)
        if initial is not NO_RESPONSE:
            if sasl_ir:
                # RFC 4959 section 3: "=" stands for an empty initial response.
                command += b" " + (b64encode(initial) if initial else b"=")
            else:
                self._held = initial
        return self._command(command, ClientState.AUTH, self._tagged_authenticate)

    def _classify(self, status: _Status) -> BackendFailure:
        # RFC 5530 UNAVAILABLE: temporary; a relayed NO: the client's
        # credentials; BAD (or NO to our master login): refused.
        if status.code_name() == b"UNAVAILABLE":
            return BackendFailure.UNAVAILABLE
        if status.status != b"NO":
            return BackendFailure.REJECTED
        return self._refusal(temporary=False)

    def _command(
        self, command: bytes, state: ClientState, on_status: Callable[[_Status], list[ClientEvent]]
    ) -> list[ClientEvent]:
        self._next_tag += 1
        self._tag = b"a%d" % self._next_tag
        self._on_status = on_status
        self._untagged_caps = None  # only a reply to *this* command counts
        return self._send(self._tag + b" " + command, state, self._on_reply)
