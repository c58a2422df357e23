"""SMTP before authentication: the server mail clients talk to, and the
client authgate uses to log in to a backend. Sans-IO (see
`authgate.protocols.base` for the call sequence and invariants).

Standards: RFC 5321 (SMTP), RFC 4954 (AUTH), RFC 3207 (STARTTLS),
RFC 3463 / RFC 5248 (enhanced status codes), RFC 2920 (PIPELINING) and
Postfix's XCLIENT_README (passing the real client to the backend).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from authgate.policy import Refusal, client_ip
from authgate.protocols.base import (
    BackendFailure,
    ClientEvent,
    ClientSettings,
    Event,
    Send,
    SessionSettings,
    Splice,
)
from authgate.protocols.client import ClientCore, ClientState, MalformedReply
from authgate.protocols.common import b64decode_strict, b64encode
from authgate.protocols.linecode import MECHANISM_NAME, TableServer
from authgate.protocols.server import Attempt, ServerState
from authgate.sasl.base import MAX_PASSWORD_OCTETS, FailureReason, InitialResponse

__all__ = ["SmtpClient", "SmtpServer"]

CRLF = b"\r\n"

# RFC 4954 section 4: the AUTH command line may be up to 12288 octets; a
# client whose initial response would not fit sends AUTH without it and
# answers the server's empty challenge instead (RFC 4422 section 5).
AUTH_LINE_LIMIT = 12288

# The AUTH lines we send to a backend stay within RFC 5321's 512-octet
# command line (section 4.5.3.1.4, CRLF included); a longer initial
# response (a bearer token) answers the empty challenge instead, which every
# server takes. RFC 4954's 12288 is not honoured everywhere: Dovecot 2.3.19's
# submission-login answers "500 5.5.2 Line too long" past about 1 KiB.
BACKEND_AUTH_LINE = 512

# What the driver says, outside the dialogue, just before it closes the
# connection: RFC 5321 section 3.8 (421 when the service must shut the
# transmission channel), enhanced codes from RFC 3463.
BYE_BUSY = b"421 4.7.0 Too many connections, try again later\r\n"
BYE_IDLE = b"421 4.4.2 Idle timeout, closing connection\r\n"
BYE_BLOCKED = b"421 4.7.0 Too many failed logins from your address, try again later\r\n"
BYE_UNAVAILABLE = b"421 4.3.0 Service temporarily unavailable\r\n"


def _reply(text: str) -> Send:
    return Send(text.encode("ascii") + CRLF)


def _multiline(code: int, texts: Sequence[str]) -> Send:
    """RFC 5321 section 4.2.1: "code-text" on every line but the last."""
    last = len(texts) - 1
    lines = (f"{code}{' ' if i == last else '-'}{text}" for i, text in enumerate(texts))
    return Send("".join(f"{line}\r\n" for line in lines).encode("ascii"))


# ================================================================== server

_AUTH_OK = "235 2.7.0 Authentication successful"
_AUTH_TEMPFAIL = "454 4.7.0 Temporary authentication failure"
_AUTH_INVALID = "535 5.7.8 Authentication credentials invalid"
_STARTTLS_FIRST = "530 5.7.0 Must issue a STARTTLS command first"
_NEEDS_ENCRYPTION = "538 5.7.11 Encryption required for requested authentication mechanism"
_UNKNOWN_MECHANISM = "504 5.5.4 Unrecognized authentication type"

# RFC 4954 section 6 and RFC 3207 section 4 give these codes.
_REFUSAL_REPLIES: dict[Refusal, str] = {
    Refusal.NOT_AVAILABLE: _UNKNOWN_MECHANISM,
    Refusal.TLS_REQUIRED: _STARTTLS_FIRST,
    Refusal.MECHANISM_NEEDS_TLS: _NEEDS_ENCRYPTION,
    # *-PLUS is withheld only outside TLS: STARTTLS would make it available,
    # which is exactly what 538 tells the client.
    Refusal.CHANNEL_BINDING_UNAVAILABLE: _NEEDS_ENCRYPTION,
}

_FAILURE_REPLIES: dict[FailureReason, str] = {
    FailureReason.MALFORMED: "501 5.5.2 Malformed authentication data",
    FailureReason.CANCELLED: "501 5.7.0 Authentication cancelled",
    FailureReason.INVALID_CREDENTIALS: _AUTH_INVALID,
    FailureReason.AUTHZ_DENIED: _AUTH_INVALID,
    FailureReason.TEMPORARY: _AUTH_TEMPFAIL,
    FailureReason.TOO_WEAK: "534 5.7.9 Authentication mechanism is too weak",
    FailureReason.ENCRYPTION_REQUIRED: _NEEDS_ENCRYPTION,
    # RFC 5248 has no "expired" code; 5.7.8 is what RFC 4954 uses for
    # credentials that cannot be used, the text says why.
    FailureReason.EXPIRED: "535 5.7.8 Authentication credentials invalid: password expired",
    # The client's digest-uri names another service or a name we do not
    # answer to: its credentials are made out for another server.
    FailureReason.DIGEST_URI_MISMATCH: "535 5.7.8 Authentication credentials invalid:"
    " digest-uri is not for this server",
    # RFC 3463: X.5.4 "invalid command arguments"; nothing was checked.
    FailureReason.TOO_LONG: f"501 5.5.4 Password too long (at most {MAX_PASSWORD_OCTETS} octets)",
}


def _valid_helo(arg: bytes) -> bool:
    # A domain or address literal. No control characters: a CR could end
    # the line early when the name is replayed to a backend.
    return bool(arg) and not any(c < 0x20 or c == 0x7F for c in arg)


_Handler = Callable[["SmtpServer", bytes], list[Event]]


class SmtpServer(TableServer):
    """The SMTP server side until the client is authenticated (or, on a
    server-to-server listener, starts a mail transaction): the SMTP dialect
    of `ServerCore` (EHLO, reply codes, pass-through to a backend).

    Replies follow RFC 5321 with RFC 3463 enhanced codes (advertised as
    ENHANCEDSTATUSCODES). After `backend_failed()` the client gets 454 4.7.0
    and the session continues unauthenticated (it may retry AUTH); the
    reply to the error that reaches `max_errors` is followed by "421 4.7.0"
    and `Close` (as Postfix does). The rules behind both are the core's.

    Server-to-server listeners (`settings.submission` False): a MAIL command
    without authentication ends this machine with
    `Splice(pending=b"MAIL ...\\r\\n" + rest, replay=(b"EHLO <name>\\r\\n",))`
    (HELO instead of EHLO when the client said HELO). The client already
    has our greeting and our EHLO reply, so the driver hands `replay` to an
    `SmtpClient` (`ClientSettings.replay`), which reads the backend's
    greeting, forwards the client's address (XCLIENT, or the PROXY header
    the driver wrote first), and sends the replay lines, none of it
    forwarded to the client. If that fails the driver answers the client
    "421 4.3.0" and closes both sides; otherwise it writes `pending` to the
    backend and splices: the backend's reply to MAIL is the first thing the
    client sees from it. AUTH on such a listener is governed by the policy
    as everywhere else.
    """

    NAME = "SMTP server"
    # RFC 5321 section 4.5.3.1.4: "500 Line too long".
    LINE_TOO_LONG = b"500 5.5.2 Line too long" + CRLF
    SASL_LINE_TOO_LONG = b"500 5.5.6 Authentication Exchange line is too long" + CRLF
    TOO_MANY_ERRORS = b"421 4.7.0 {host} Too many errors" + CRLF
    TOO_MANY_COMMANDS = b"421 4.7.0 {host} Too many commands" + CRLF
    GOODBYE_NAMES_HOST = True
    MISSING_BINDING_IS_UNKNOWN = True
    # The banner names no version (nothing to look up in a CVE list).
    GREETING = "220 {host} ESMTP authgate"
    # SMTP has no capability list in the 235 reply: the client keeps the
    # EHLO reply it has.
    SUCCESS = _AUTH_OK
    BACKEND_FAILED = _AUTH_TEMPFAIL
    FAILURES = _FAILURE_REPLIES
    REFUSALS = _REFUSAL_REPLIES
    # RFC 4954 section 4: "334" SP base64; an empty challenge is "334 ".
    CHALLENGE = b"334 "

    def __init__(self, settings: SessionSettings) -> None:
        super().__init__(settings)
        self._line = b""  # the command line being handled
        self._helo: bytes | None = None  # argument of the last EHLO/HELO
        self._esmtp = False  # the client said EHLO (not HELO)

    # --------------------------------------------------------- dialect hooks

    def _forget_after_tls(self) -> None:
        # RFC 3207 section 4.2: forget everything the client said before;
        # it must EHLO again, and the capabilities change.
        self._helo = None
        self._esmtp = False

    # -------------------------------------------------------------- commands

    def _command(self, line: bytes) -> list[Event]:
        goodbye = self._count_command()
        if goodbye is not None:
            return goodbye
        self._line = line
        verb, _, arg = line.partition(b" ")
        handler = _COMMANDS.get(verb.upper())
        if handler is None:
            return self._error(_reply("500 5.5.2 Command unrecognized"))
        return handler(self, arg.strip())

    def _cmd_ehlo(self, arg: bytes) -> list[Event]:
        if not _valid_helo(arg):
            return self._error(_reply("501 5.5.4 Syntax: EHLO hostname"))
        self._helo, self._esmtp = arg, True
        keywords = ["PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"]
        # No SIZE: the backend's limit is unknown here, and a wrong one
        # would be worse than none (the backend still enforces its own).
        if self._settings.starttls_available and not self._tls_active:
            keywords.append("STARTTLS")
        offered = self._decide().offered
        if offered:
            keywords.append("AUTH " + " ".join(offered))
        return [_multiline(250, [self._settings.hostname, *keywords])]

    def _cmd_helo(self, arg: bytes) -> list[Event]:
        if not _valid_helo(arg):
            return self._error(_reply("501 5.5.4 Syntax: HELO hostname"))
        self._helo, self._esmtp = arg, False
        return [_reply(f"250 {self._settings.hostname}")]

    def _cmd_starttls(self, arg: bytes) -> list[Event]:
        # RFC 3207 section 4: no parameters; section 4.2: a second STARTTLS
        # is out of sequence (503); never advertised on this listener: "not
        # implemented" (RFC 5321 section 4.2.4).
        return self._starttls_command(
            arg,
            ok="220 2.0.0 Ready to start TLS",
            syntax="501 5.5.4 Syntax error (no parameters allowed)",
            active="503 5.5.1 TLS already active",
            unavailable="502 5.5.1 STARTTLS not available",
        )

    def _cmd_auth(self, arg: bytes) -> list[Event]:
        if not self._esmtp:
            # RFC 4954 section 4: AUTH is an extension; it exists only after
            # EHLO (and again only after the EHLO that follows STARTTLS).
            return self._error(_reply("503 5.5.1 Send EHLO first"))
        parts = arg.split()
        if not 1 <= len(parts) <= 2 or not MECHANISM_NAME.fullmatch(parts[0]):
            return self._error(_reply("501 5.5.4 Syntax: AUTH mechanism [initial-response]"))
        initial = parts[1] if len(parts) == 2 else None
        return self._authenticate(Attempt(parts[0].decode("ascii").upper()), initial)

    def _cmd_mail(self, arg: bytes) -> list[Event]:
        if self._helo is None:
            # RFC 5321 section 4.1.4: a transaction needs EHLO/HELO first.
            return self._error(_reply("503 5.5.1 Send HELO/EHLO first"))
        if arg[:5].upper() != b"FROM:":
            return self._error(_reply("501 5.5.4 Syntax: MAIL FROM:<address>"))
        decision = self._decide()
        submission = self._settings.submission
        if decision.session_tls_required or (submission and decision.tls_required):
            return self._error(_reply(_STARTTLS_FIRST))
        if submission:
            return self._error(_reply("530 5.7.0 Authentication required"))
        # Server-to-server mail: hand the client to the backend unauthenticated
        # (see the class docstring for what the driver does with this).
        self._state = ServerState.SPLICED
        verb = b"EHLO" if self._esmtp else b"HELO"
        pending = self._line + CRLF + self._lines.take_rest()
        return [Splice(pending=pending, replay=(verb + b" " + self._helo + CRLF,))]

    def _cmd_noop(self, arg: bytes) -> list[Event]:
        return [_reply("250 2.0.0 OK")]

    def _cmd_rset(self, arg: bytes) -> list[Event]:
        return [_reply("250 2.0.0 OK")]

    def _cmd_help(self, arg: bytes) -> list[Event]:
        return [_reply("214 2.0.0 Commands: EHLO HELO STARTTLS AUTH MAIL NOOP RSET VRFY QUIT")]

    def _cmd_vrfy(self, arg: bytes) -> list[Event]:
        # RFC 5321 section 3.5.3: 252 when we will not say whether a user
        # exists (we could not, before authentication, without a backend).
        return [_reply("252 2.5.0 Cannot VRFY user; try RCPT to attempt delivery")]

    def _cmd_expn(self, arg: bytes) -> list[Event]:
        # RFC 5321 section 3.5.2 lets a server disable EXPN: 502.
        return self._error(_reply("502 5.5.1 EXPN not available"))

    def _cmd_out_of_sequence(self, arg: bytes) -> list[Event]:
        return self._error(_reply("503 5.5.1 Need MAIL command"))

    def _cmd_quit(self, arg: bytes) -> list[Event]:
        return self._goodbye(f"221 2.0.0 {self._settings.hostname} Bye".encode("ascii") + CRLF)


_COMMANDS: dict[bytes, _Handler] = {
    b"EHLO": SmtpServer._cmd_ehlo,
    b"HELO": SmtpServer._cmd_helo,
    b"STARTTLS": SmtpServer._cmd_starttls,
    b"AUTH": SmtpServer._cmd_auth,
    b"MAIL": SmtpServer._cmd_mail,
    b"RCPT": SmtpServer._cmd_out_of_sequence,
    b"DATA": SmtpServer._cmd_out_of_sequence,
    b"BDAT": SmtpServer._cmd_out_of_sequence,
    b"NOOP": SmtpServer._cmd_noop,
    b"RSET": SmtpServer._cmd_rset,
    b"HELP": SmtpServer._cmd_help,
    b"VRFY": SmtpServer._cmd_vrfy,
    b"EXPN": SmtpServer._cmd_expn,
    b"QUIT": SmtpServer._cmd_quit,
}


# ================================================================== client


@dataclass(frozen=True)
class _Reply:
    code: int
    texts: tuple[str, ...]  # the text of each line, without the code

    def describe(self) -> str:
        """For LoginFailed.detail: the backend's own words, shortened."""
        text = " ".join(t for t in self.texts[:2] if t)
        text = "".join(c if c.isprintable() else "?" for c in text)
        return f"{self.code} {text}".strip()[:200]


# RFC 5321 section 4.2: Reply-code [ SP / "-" textstring ]; the first digit
# is 2-5. A code alone (no space) is tolerated when the text is empty.
_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -]?)(.*)", re.DOTALL)
_MAX_REPLY_LINES = 200


class _ReplyReader:
    """Collects the lines of one (possibly multi-line) reply."""

    def __init__(self) -> None:
        self._code = 0
        self._texts: list[str] = []

    def feed(self, line: bytes) -> _Reply | None:
        match = _REPLY_LINE.fullmatch(line)
        if match is None:
            raise MalformedReply("reply line does not start with a reply code")
        code = int(match.group(1))
        separator, text = match.group(2), match.group(3)
        if not separator and text:
            raise MalformedReply("reply code not followed by space or hyphen")
        if self._texts and code != self._code:
            raise MalformedReply("multi-line reply changes its reply code")
        if len(self._texts) >= _MAX_REPLY_LINES:
            raise MalformedReply("multi-line reply is too long")
        self._code = code
        self._texts.append(text.decode("ascii", "replace"))
        if separator == b"-":
            return None
        reply = _Reply(code, tuple(self._texts))
        self._texts = []
        return reply


# XCLIENT_README: NAME and HELO values may be up to 255 characters, and the
# whole XCLIENT line must stay within SMTP's 512-octet command limit. With a
# HELO value of at most 255 xtext characters, ours always fits in one line.
_XCLIENT_VALUE_MAX = 255
_UNAVAILABLE = "[UNAVAILABLE]"


def xtext(value: str | bytes) -> str:
    """RFC 3461 section 4 xtext (XCLIENT attribute values): printable ASCII
    except "+" and "=" as is, every other octet as "+XX"."""
    octets = value.encode("utf-8") if isinstance(value, str) else value
    return "".join(
        chr(b) if 0x21 <= b <= 0x7E and b not in (0x2B, 0x3D) else f"+{b:02X}" for b in octets
    )


def _xclient_address(address: str | None) -> str:
    """XCLIENT_README: IPv4 as is, IPv6 prefixed with "IPV6:"."""
    ip = None if address is None else client_ip(address)
    if ip is None:
        return _UNAVAILABLE
    return f"IPV6:{ip.compressed}" if ip.version == 6 else str(ip)


class SmtpClient(ClientCore[_Reply]):
    """authgate logging in to an SMTP backend (submission with AUTH), or
    handing a server-to-server client over to it (pass-through): a dialect
    of `ClientCore` (authgate.protocols.client).

    Sequence: greeting (220) -> EHLO -> [STARTTLS -> EHLO] -> [XCLIENT ->
    220 -> EHLO] -> AUTH (terminate mode), or wait for `authenticate()`
    (relay mode). `authenticate()` may be called at any time after
    construction: it is held until the EHLO exchange is done.

    Pass-through (`settings.replay`, port 25): greeting -> [EHLO ->
    STARTTLS] -> [EHLO -> XCLIENT -> 220] -> each replay line (the client's
    own EHLO or HELO) -> LoggedIn with the keywords of the backend's reply
    to the replayed EHLO. Our own EHLO is sent only when STARTTLS or XCLIENT
    needs the backend's keywords.

    XCLIENT (Postfix XCLIENT_README) always carries ADDR=: a backend that
    lets authgate send XCLIENT re-checks its authorisation against the new
    address, so the client cannot send an XCLIENT of its own through the
    splice. A backend whose XCLIENT lacks ADDR is refused, and so is one
    without XCLIENT when forwarding is configured (never a silent fallback
    to a backend that sees every client as authgate's own address).
    """

    NAME = "SMTP client"

    def __init__(self, settings: ClientSettings) -> None:
        super().__init__(settings)
        self._reader = _ReplyReader()
        self._keywords: tuple[str, ...] = ()
        self._xclient_done = False
        self._xclient_login_done = False
        self._replayed = 0  # pass-through: replay lines sent so far

    # -------------------------------------------------------------- framing

    def _next_reply(self) -> _Reply | None:
        while (line := self._lines.next_line()) is not None:
            reply = self._reader.feed(line)
            if reply is not None:
                return reply
        return None

    def _forget_after_tls(self) -> None:
        self._reader = _ReplyReader()

    def _after_tls(self) -> list[ClientEvent]:
        return self._send_ehlo()

    # ---------------------------------------------------------------- steps

    def _offer(self, keyword: str) -> tuple[str, ...] | None:
        """The parameters of an EHLO keyword, or None when not offered."""
        for line in self._keywords:
            word, *params = line.split()
            if word.upper() == keyword:
                return tuple(params)
            if keyword == "AUTH" and word.upper().startswith("AUTH="):
                # The pre-RFC 2554 spelling "AUTH=PLAIN LOGIN" some servers add.
                return (word[5:], *params)
        return None

    def _send_ehlo(self) -> list[ClientEvent]:
        ehlo = f"EHLO {self._settings.hostname}".encode("ascii")
        return self._send(ehlo, ClientState.CAPABILITY, self._on_ehlo)

    def _on_greeting(self, reply: _Reply) -> list[ClientEvent]:
        if reply.code != 220:
            return self._fail(BackendFailure.UNAVAILABLE, f"greeting: {reply.describe()}")
        settings = self._settings
        if settings.replay and not settings.starttls and not settings.use_xclient:
            # Pass-through with nothing to negotiate: the client's own EHLO
            # is the only one the backend needs to see.
            return self._send_replay()
        return self._send_ehlo()

    def _on_ehlo(self, reply: _Reply) -> list[ClientEvent]:
        if reply.code != 250:
            return self._fail(BackendFailure.UNAVAILABLE, f"EHLO: {reply.describe()}")
        # The first line is the server's name; keywords follow (RFC 5321 4.1.1.1).
        self._keywords = tuple(text.strip() for text in reply.texts[1:] if text.strip())
        if self._settings.starttls and not self._tls_done:
            if self._offer("STARTTLS") is None:
                return self._fail(BackendFailure.UNAVAILABLE, "backend does not offer STARTTLS")
            return self._send(b"STARTTLS", ClientState.STARTTLS, self._on_starttls)
        if not self._xclient_done:
            xclient = self._xclient()
            if xclient is not None:
                return xclient
        if self._settings.replay:
            return self._send_replay()
        return self._ready()

    def _on_starttls(self, reply: _Reply) -> list[ClientEvent]:
        if reply.code != 220:
            return self._fail(BackendFailure.UNAVAILABLE, f"STARTTLS: {reply.describe()}")
        return self._start_tls()

    def _xclient(self) -> list[ClientEvent] | None:
        """Send XCLIENT when configured; None when it is not."""
        settings = self._settings
        login = settings.xclient_login
        if not settings.use_xclient and login is None:
            return None
        # A login that cannot be made is the backend refusing it; forwarding
        # that cannot be done is a fault to put right, not the client's.
        failure = BackendFailure.REJECTED if login is not None else BackendFailure.UNAVAILABLE
        supported = self._offer("XCLIENT")
        if supported is None:
            return self._fail(
                failure, "backend does not offer XCLIENT (smtpd_authorized_xclient_hosts?)"
            )
        names = {name.upper() for name in supported}
        if "ADDR" not in names:
            return self._fail(failure, "backend's XCLIENT lacks ADDR")
        attributes: list[tuple[str, str | bytes]] = [
            ("ADDR", _xclient_address(settings.client_address))
        ]
        if settings.client_port is not None and "PORT" in names:
            attributes.append(("PORT", str(settings.client_port)))
        if settings.replay:
            attributes += self._passthrough_attributes(names)
        if login is not None:
            if "LOGIN" not in names:
                return self._fail(BackendFailure.REJECTED, "backend's XCLIENT lacks LOGIN")
            attributes.append(("LOGIN", login))
        self._xclient_done = True
        self._xclient_login_done = login is not None
        command = "XCLIENT " + " ".join(f"{name}={xtext(value)}" for name, value in attributes)
        return self._send(command.encode("ascii"), ClientState.NEGOTIATE, self._on_xclient)

    def _passthrough_attributes(self, names: set[str]) -> list[tuple[str, str | bytes]]:
        """NAME, HELO and PROTO of a pass-through client, where offered.

        NAME is [UNAVAILABLE]: authgate does no reverse DNS lookups, so the
        backend learns no client hostname (as with nginx without a
        resolver). HELO is the name the client gave; PROTO says whether it
        said EHLO or HELO."""
        verb, _, helo = self._settings.replay[-1].rstrip(b"\r\n").partition(b" ")
        attributes: list[tuple[str, str | bytes]] = []
        if "NAME" in names:
            attributes.append(("NAME", _UNAVAILABLE))
        if "HELO" in names:
            helo_ok = 0 < len(xtext(helo)) <= _XCLIENT_VALUE_MAX
            attributes.append(("HELO", helo if helo_ok else _UNAVAILABLE))
        if "PROTO" in names:
            attributes.append(("PROTO", "ESMTP" if verb.upper() == b"EHLO" else "SMTP"))
        return attributes

    def _on_xclient(self, reply: _Reply) -> list[ClientEvent]:
        # XCLIENT_README: success resets the session to the greeting stage
        # and answers with a new 220 greeting; EHLO again (pass-through:
        # the client's own EHLO).
        if reply.code == 220:
            return self._send_replay() if self._settings.replay else self._send_ehlo()
        failure = BackendFailure.REJECTED if reply.code >= 500 else BackendFailure.UNAVAILABLE
        return self._fail(failure, f"XCLIENT: {reply.describe()}")

    def _send_replay(self) -> list[ClientEvent]:
        line = self._settings.replay[self._replayed]
        self._replayed += 1
        return self._send(line.rstrip(b"\r\n"), ClientState.NEGOTIATE, self._on_replay)

    def _on_replay(self, reply: _Reply) -> list[ClientEvent]:
        if reply.code // 100 != 2:
            return self._fail(BackendFailure.UNAVAILABLE, f"replayed HELO: {reply.describe()}")
        line = self._settings.replay[self._replayed - 1]
        if line[:4].upper() == b"EHLO":
            self._keywords = tuple(text.strip() for text in reply.texts[1:] if text.strip())
        if self._replayed < len(self._settings.replay):
            return self._send_replay()
        return self._logged_in(self._keywords)

    def _login(self) -> list[ClientEvent]:
        if self._xclient_login_done:
            # XCLIENT LOGIN= made the session authenticated as the user.
            return self._logged_in(self._keywords)
        if self._settings.credentials is None:
            return self._fail(BackendFailure.REJECTED, "no credentials and no XCLIENT LOGIN")
        started = self._master_login(self._offer("AUTH") or ())
        if started is None:
            return self._fail(BackendFailure.REJECTED, "backend offers none of our mechanisms")
        return started

    def _auth_command(self, name: str, initial: InitialResponse) -> list[ClientEvent]:
        command = b"AUTH " + name.encode("ascii")
        if initial == b"":
            command += b" ="  # RFC 4954 section 4: an empty initial response
        elif isinstance(initial, bytes):
            encoded = b64encode(initial)
            if len(command) + 1 + len(encoded) + 2 > BACKEND_AUTH_LINE:
                self._held = initial
            else:
                command += b" " + encoded
        return self._send(command, ClientState.AUTH, self._on_auth)

    def _on_auth(self, reply: _Reply) -> list[ClientEvent]:
        if reply.code == 334:
            text = reply.texts[-1].strip().encode("ascii", "replace")
            return self._challenge(b64decode_strict(text))
        if reply.code == 235:
            # SMTP has no data with success: anything (SCRAM's server-final)
            # came as a challenge already.
            return self._verified() or self._logged_in(self._keywords)
        return self._fail(self._classify(reply), f"AUTH: {reply.describe()}")

    def _classify(self, reply: _Reply) -> BackendFailure:
        # RFC 4954 section 6: 454 and other 4xx are temporary; only 535 says
        # the credentials are wrong; other 5xx refuse the login itself.
        if 400 <= reply.code < 500 or reply.code < 400:
            return BackendFailure.UNAVAILABLE
        if reply.code == 535:
            return self._refusal(temporary=False)
        return BackendFailure.REJECTED
