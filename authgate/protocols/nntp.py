"""NNTP before authentication, both sides, sans-IO.

`NntpServer` speaks to news readers until they have authenticated, then
hands the connection to the driver (`Splice`). `NntpClient` logs authgate in
to a backend news server (INN's nnrpd, say).

Standards: RFC 3977 (NNTP: CAPABILITIES, MODE READER, reply codes),
RFC 4642 (STARTTLS), RFC 4643 (AUTHINFO USER/PASS and AUTHINFO SASL).

Server choices worth knowing:
- authgate serves nothing but the login: every reader command (GROUP,
  ARTICLE, LIST, POST, ...) before it gets 480 (RFC 3977 section 3.2.1,
  "authentication required"), or 483 when the policy wants TLS for the
  whole session and there is none (RFC 4642 section 2.2.2).
- AUTHINFO USER/PASS is the cleartext login (like IMAP LOGIN) and runs
  through the core's PLAIN exchange; a policy refusal of it is 483 ("
  encryption or stronger authentication required", RFC 4643 section 2.3.2).
- SASL "additional data with success" goes in the 283 reply (RFC 4643
  section 2.4.1), not in a final challenge: the core's SUCCESS_DATA. An
  empty response is "=" on its own line: the core's EMPTY_RESPONSE.

Client choices worth knowing:
- Terminate mode logs in with one proxy account (`master_user`): AUTHINFO
  USER/PASS when the backend offers it (INN's readers.conf checks that;
  AUTHINFO USER cannot name a second identity, so the backend sees every
  reader as the proxy account), SASL with authzid otherwise.
- Relay mode sends a reader's PLAIN (and its AUTHINFO USER/PASS, which the
  server machine relays as PLAIN) as AUTHINFO USER/PASS whenever the backend
  offers AUTHINFO USER and no authzid is asked for: INN verifies readers.conf
  passwords only there, its SASL goes to Cyrus SASL's own user database.
  The backend's 283 data (SCRAM's server-final) reaches the reader as one
  more 383 challenge, answered with "=" (as ManageSieve's client does): the
  server machine's relay API carries no success data.
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
    Event,
    Send,
)
from authgate.protocols.client import ClientState, MalformedReply
from authgate.protocols.common import b64decode_strict, b64encode
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
from authgate.protocols.server import Attempt
from authgate.sasl.base import (
    MAX_PASSWORD_OCTETS,
    Failure,
    FailureReason,
    InitialResponse,
    too_long,
)

__all__ = ["NntpClient", "NntpServer"]

CRLF = b"\r\n"

# RFC 3977 section 3.1: a command line is at most 512 octets with its CRLF;
# RFC 4643 section 2.4.2: an initial response that would make AUTHINFO SASL
# longer is sent after the server's empty challenge instead.
MAX_COMMAND_LINE = 512

# Mechanism label for AUTHINFO USER/PASS in `Authenticated` and `AuthFailed`.
AUTHINFO_USER = "AUTHINFO-USER"

# What the driver says, outside the dialogue, just before it closes the
# connection: 400, "service not available, the server closes the connection"
# (RFC 3977 section 3.2.1), which also tells a reader to try again later.
BYE_BUSY = b"400 Too many connections, try again later\r\n"
BYE_IDLE = b"400 Idle timeout, closing connection\r\n"
BYE_BLOCKED = b"400 Too many failed logins from your address, try again later\r\n"
BYE_UNAVAILABLE = b"400 News server unavailable, try again later\r\n"


# ====================================================================== server

GREETING = "200 {host} authgate ready"
OK_AUTH = "281 Authentication accepted"
OK_PASSWORD_REQUIRED = "381 Password required"  # noqa: S105 (a reply)
OK_STARTTLS = "382 Continue with TLS negotiation"
OK_READER = "200 Reader mode, posting permitted"
OK_BYE = "205 Connection closing"
ERR_UNKNOWN = "500 Unknown command"
ERR_SYNTAX = "501 Syntax error"
ERR_AUTH_REQUIRED = "480 Authentication required"
ERR_OUT_OF_SEQUENCE = "482 Authentication commands issued out of sequence"
ERR_TLS_ACTIVE = "502 TLS is already active"
ERR_NO_STARTTLS = "502 STARTTLS is not available"
ERR_SESSION_TLS = "483 Encryption required: use STARTTLS first"
ERR_SESSION_TLS_NO_STARTTLS = "483 Encryption required"
ERR_FAILED = "481 Authentication failed"
ERR_BACKEND = "403 News server unavailable, try again later"
ERR_LINE_TOO_LONG = "400 Line too long, closing connection"
ERR_TOO_MANY_ERRORS = "400 Too many errors, closing connection"
ERR_TOO_MANY_COMMANDS = "400 Too many commands before login, closing connection"

_REFUSAL_REPLIES: dict[Refusal, str] = {
    # RFC 4643 section 2.4.2: 503, "mechanism not recognized".
    Refusal.NOT_AVAILABLE: "503 Mechanism not recognized",
    Refusal.TLS_REQUIRED: "483 Encryption required before authentication",
    Refusal.MECHANISM_NEEDS_TLS: "483 Encryption required for this mechanism",
    Refusal.CHANNEL_BINDING_UNAVAILABLE: "483 Channel binding needs a TLS connection",
}
_USER_REFUSAL_REPLIES: dict[Refusal, str] = {
    # RFC 4643 section 2.3.2: 502 when AUTHINFO USER is not possible at all.
    Refusal.NOT_AVAILABLE: "502 AUTHINFO USER is not available",
    Refusal.TLS_REQUIRED: "483 Encryption required before authentication",
    Refusal.MECHANISM_NEEDS_TLS: "483 Encryption required for AUTHINFO USER",
    Refusal.CHANNEL_BINDING_UNAVAILABLE: "483 Encryption required for AUTHINFO USER",
}

FAILURE_REPLIES: dict[FailureReason, str] = {
    # RFC 4643 section 2.4.2: 482 "SASL protocol error" (INN answers that
    # to a response its mechanism cannot parse); a "*" cancel is 481.
    FailureReason.MALFORMED: "482 SASL protocol error",
    FailureReason.CANCELLED: "481 Authentication cancelled",
    FailureReason.INVALID_CREDENTIALS: ERR_FAILED,
    FailureReason.AUTHZ_DENIED: "481 Authorization failed",
    # RFC 3977 section 3.2.1: 403, "internal fault ... preventing action".
    FailureReason.TEMPORARY: "403 Temporary authentication failure, try again later",
    FailureReason.TOO_WEAK: "483 Authentication mechanism is too weak",
    FailureReason.ENCRYPTION_REQUIRED: "483 Encryption required",
    FailureReason.EXPIRED: "481 Password expired",
    FailureReason.DIGEST_URI_MISMATCH: "481 Authentication failed: digest-uri is not"
    " for this server",
    FailureReason.TOO_LONG: f"481 Password too long (at most {MAX_PASSWORD_OCTETS} octets)",
}

# RFC 3977 and its extensions: the commands of a reader session, which
# need a login first (480). Anything else is 500.
_READER_COMMANDS = frozenset(
    {
        b"ARTICLE", b"BODY", b"HEAD", b"STAT", b"GROUP", b"LISTGROUP", b"LAST",
        b"NEXT", b"LIST", b"NEWGROUPS", b"NEWNEWS", b"OVER", b"XOVER", b"HDR",
        b"XHDR", b"XPAT", b"POST", b"IHAVE", b"DATE", b"CHECK", b"TAKETHIS",
        b"XGTITLE", b"COMPRESS",
    }
)  # fmt: skip

# Allowed while the policy demands TLS for the whole session (RFC 4642
# section 2.2.2: everything else gets 483).
_SESSION_TLS_EXEMPT = frozenset({b"CAPABILITIES", b"STARTTLS", b"QUIT", b"HELP"})

_Handler = Callable[["NntpServer", bytes], list[Event]]


class NntpServer(TableServer):
    """NNTP toward a news reader until it has authenticated: the NNTP
    dialect of `ServerCore`.

    A failed backend login (`backend_failed`) answers 403 and leaves the
    session un-authenticated: the reader may try again or QUIT.
    """

    NAME = "NNTP server"
    LINE_TOO_LONG = line(ERR_LINE_TOO_LONG)
    TOO_MANY_ERRORS = line(ERR_TOO_MANY_ERRORS)
    TOO_MANY_COMMANDS = line(ERR_TOO_MANY_COMMANDS)
    SUCCESS_DATA = True  # 283 carries it (RFC 4643 section 2.4.1)
    EMPTY_RESPONSE = b"="  # RFC 4643 section 2.4.1
    GREETING = GREETING
    SUCCESS = OK_AUTH
    BACKEND_FAILED = ERR_BACKEND
    FAILURES = FAILURE_REPLIES
    REFUSALS = _REFUSAL_REPLIES
    # RFC 4643 section 2.4.1: 383 and the base64 challenge, "=" when empty.
    CHALLENGE = b"383 "
    EMPTY_CHALLENGE = b"="

    # --------------------------------------------------------- dialect hooks

    def _refusal_reply(self, attempt: Attempt, refusal: Refusal) -> Send:
        table = _USER_REFUSAL_REPLIES if attempt.mechanism == AUTHINFO_USER else _REFUSAL_REPLIES
        if refusal is Refusal.TLS_REQUIRED and not self._settings.starttls_available:
            return Send(line(ERR_SESSION_TLS_NO_STARTTLS))
        return Send(line(table[refusal]))

    def _success_reply(self, attempt: Attempt, capabilities: Sequence[str]) -> Send:
        # RFC 4643 section 2.4.1: 283 with the additional data, else 281.
        # The reader asks CAPABILITIES again after it (section 2.2), and
        # that goes to the backend.
        success = attempt.success
        if success is not None and success.additional is not None:
            return Send(b"283 " + (b64encode(success.additional) or b"=") + CRLF)
        return super()._success_reply(attempt, capabilities)

    # -------------------------------------------------------------- commands

    def _command(self, line: bytes) -> list[Event]:
        goodbye = self._count_command()
        if goodbye is not None:
            return goodbye
        # RFC 3977 section 3.1: a case-insensitive keyword, arguments
        # separated by spaces or tabs.
        raw_keyword, _, argument = line.strip(b" \t").partition(b" ")
        keyword = raw_keyword.upper()
        user, self._user = self._user, None  # PASS must follow USER directly
        if keyword not in _SESSION_TLS_EXEMPT and self._decide().session_tls_required:
            no_starttls = not self._settings.starttls_available
            text = ERR_SESSION_TLS_NO_STARTTLS if no_starttls else ERR_SESSION_TLS
            return self._say_error(text)
        if keyword == b"AUTHINFO":
            return self._cmd_authinfo(argument.strip(b" \t"), user)
        handler = _COMMANDS.get(keyword)
        if handler is not None:
            return handler(self, argument.strip(b" \t"))
        if keyword in _READER_COMMANDS:
            return self._say_error(ERR_AUTH_REQUIRED)
        return self._say_error(ERR_UNKNOWN)

    def _cmd_capabilities(self, argument: bytes) -> list[Event]:
        """RFC 3977 section 5.2: what authgate supports before the login;
        the reader asks again after it (RFC 4643 section 2.2) and then hears
        the backend's list."""
        decision = self._decide()
        caps = ["VERSION 2", "READER", "IMPLEMENTATION authgate"]
        if self._settings.starttls_available and not self._tls_active:
            caps.append("STARTTLS")  # RFC 4642 section 2.1: not once active
        authinfo = []
        if decision.cleartext_login:
            authinfo.append("USER")
        if decision.offered:
            authinfo.append("SASL")
        if authinfo:
            caps.append("AUTHINFO " + " ".join(authinfo))
        if decision.offered:
            caps.append("SASL " + " ".join(decision.offered))
        return [Send(dot_block("101 Capability list:", caps))]

    def _cmd_mode(self, argument: bytes) -> list[Event]:
        # RFC 3977 section 5.3: we are a reader server already.
        if argument.upper() != b"READER":
            return self._say_error(ERR_SYNTAX)
        return [Send(line(OK_READER))]

    def _cmd_help(self, argument: bytes) -> list[Event]:
        text = [
            "Before authentication this server knows:",
            "  AUTHINFO USER name / AUTHINFO PASS password",
            "  AUTHINFO SASL mechanism [initial-response]",
            "  CAPABILITIES, MODE READER, STARTTLS, HELP, QUIT",
        ]
        return [Send(dot_block("100 Help text follows", text))]

    def _cmd_starttls(self, argument: bytes) -> list[Event]:
        return self._starttls_command(
            argument,
            ok=OK_STARTTLS,
            syntax=ERR_SYNTAX,
            active=ERR_TLS_ACTIVE,
            unavailable=ERR_NO_STARTTLS,
        )

    def _cmd_authinfo(self, argument: bytes, user: str | None) -> list[Event]:
        sub, _, rest = argument.partition(b" ")
        sub = sub.upper()
        rest = rest.strip(b" \t")
        if sub == b"USER":
            return self._authinfo_user(rest)
        if sub == b"PASS":
            return self._authinfo_pass(rest, user)
        if sub == b"SASL":
            return self._authinfo_sasl(rest)
        return self._say_error(ERR_SYNTAX)

    def _authinfo_user(self, argument: bytes) -> list[Event]:
        return self._user_command(
            AUTHINFO_USER, argument, ok=OK_PASSWORD_REQUIRED, syntax=ERR_SYNTAX
        )

    def _authinfo_pass(self, argument: bytes, user: str | None) -> list[Event]:
        if user is None:
            # RFC 4643 section 2.3.2: PASS without USER is out of sequence.
            return self._say_error(ERR_OUT_OF_SEQUENCE)
        attempt = Attempt(AUTHINFO_USER, authcid=user)
        password = self._password(attempt, argument, syntax=ERR_SYNTAX)
        if not isinstance(password, str):
            return password
        if not password:
            return self._say_error(ERR_SYNTAX)
        if len(argument) > MAX_PASSWORD_OCTETS and not self._settings.relay:
            self._attempt = attempt
            return self._fail(too_long("AUTHINFO PASS"))
        if "\0" in user + password:
            self._attempt = attempt
            return self._fail(Failure(FailureReason.INVALID_CREDENTIALS))
        return self._login(attempt, user, password)

    def _authinfo_sasl(self, argument: bytes) -> list[Event]:
        words = argument.split()
        if not 1 <= len(words) <= 2:
            return self._say_error(ERR_SYNTAX)
        if not MECHANISM_NAME.fullmatch(words[0]):
            return self._say_error(ERR_SYNTAX)
        # RFC 4643 section 2.4.2: "=" is an empty initial response.
        initial = words[1] if len(words) == 2 else None
        return self._authenticate(Attempt(words[0].decode("ascii").upper()), initial)

    def _cmd_quit(self, argument: bytes) -> list[Event]:
        return self._quit(OK_BYE)


_COMMANDS: dict[bytes, _Handler] = {
    b"CAPABILITIES": NntpServer._cmd_capabilities,
    b"MODE": NntpServer._cmd_mode,
    b"STARTTLS": NntpServer._cmd_starttls,
    b"HELP": NntpServer._cmd_help,
    b"QUIT": NntpServer._cmd_quit,
}


# ====================================================================== client

_MAX_CAPABILITY_LINES = 200  # a CAPABILITIES list longer than this is no NNTP server's
_STATUS = re.compile(rb"[1-5][0-9][0-9]")


@dataclass(frozen=True)
class _Reply:
    code: int
    line: bytes  # the whole status line
    capabilities: tuple[str, ...] | None = None  # a 101 reply's lines

    @property
    def text(self) -> bytes:
        return self.line[4:]


class NntpClient(TableClient[_Reply]):
    """authgate logging in to a backend news server (terminate or relay):
    a dialect of `ClientCore` (authgate.protocols.client).

    After `LoginFailed` the machine is done, except in relay mode when the
    backend merely refused the credentials (481/482): then `authenticate()`
    may be called again for the reader's next attempt (RFC 4643: the
    session stays un-authenticated).
    """

    NAME = "NNTP client"
    AUTH_COMMAND = b"AUTHINFO SASL"
    MAX_AUTH_LINE = MAX_COMMAND_LINE

    def __init__(self, settings: ClientSettings) -> None:
        super().__init__(settings)
        self._collecting_status = b""  # the 101 line of a list in progress
        self._reader_mode = False  # MODE READER sent

    # -------------------------------------------------------------- framing

    def _next_reply(self) -> _Reply | None:
        while (line := self._lines.next_line()) is not None:
            if self._collecting is None:
                if not _STATUS.fullmatch(line[:3]) or line[3:4] not in (b"", b" "):
                    raise MalformedReply("not an NNTP status line")
                code = int(line[:3])
                if code == 101 and self._state is ClientState.CAPABILITY:
                    self._collecting, self._collecting_status = [], line
                    continue
                return _Reply(code, line)
            if line == b".":
                caps, self._collecting = self._collecting, None
                return _Reply(101, self._collecting_status, tuple(caps))
            if len(self._collecting) >= _MAX_CAPABILITY_LINES:
                raise MalformedReply("CAPABILITIES reply too long")
            text = line[1:] if line.startswith(b".") else line  # dot-stuffing
            self._collecting.append(text.decode("utf-8", "replace"))
        return None

    # ------------------------------------------------------------- replies

    def _on_greeting(self, reply: _Reply) -> list[ClientEvent]:
        # RFC 3977 section 5.1.1: 200 or 201; 400 and 502 refuse service.
        if reply.code not in (200, 201):
            return self._fail(BackendFailure.UNAVAILABLE, "greeting: " + detail(reply.line))
        return self._ask_capabilities()

    def _after_tls(self) -> list[ClientEvent]:
        # RFC 4642 section 2.2.2: capabilities may differ under TLS; ask again.
        return self._ask_capabilities()

    def _ask_capabilities(self) -> list[ClientEvent]:
        return self._send(b"CAPABILITIES", ClientState.CAPABILITY, self._on_capabilities)

    def _on_capabilities(self, reply: _Reply) -> list[ClientEvent]:
        if reply.capabilities is not None:
            return self._capabilities(reply.capabilities)
        if reply.code in (500, 501):
            # An RFC 977 server without CAPABILITIES: AUTHINFO USER (RFC
            # 2980) is the login it may still have.
            return self._capabilities(None)
        return self._fail(BackendFailure.UNAVAILABLE, "CAPABILITIES: " + detail(reply.line))

    def _capabilities(self, caps: tuple[str, ...] | None) -> list[ClientEvent]:
        self._caps = caps if caps is not None else ("AUTHINFO USER",)
        if self._settings.starttls and not self._tls_done:
            if caps is not None and not self._has_capability("STARTTLS"):
                return self._fail(BackendFailure.UNAVAILABLE, "backend does not offer STARTTLS")
            return self._send(b"STARTTLS", ClientState.STARTTLS, self._on_starttls)
        if self._has_capability("MODE-READER") and not self._reader_mode:
            # RFC 3977 section 5.3: a server that also takes feeds (innd)
            # serves readers after MODE READER, with new capabilities.
            self._reader_mode = True
            return self._send(b"MODE READER", ClientState.NEGOTIATE, self._on_mode_reader)
        return self._ready()

    def _on_starttls(self, reply: _Reply) -> list[ClientEvent]:
        if reply.code != 382:
            refused = "STARTTLS refused: " + detail(reply.line)
            return self._fail(BackendFailure.UNAVAILABLE, refused)
        return self._start_tls()

    def _on_mode_reader(self, reply: _Reply) -> list[ClientEvent]:
        if reply.code not in (200, 201):
            return self._fail(BackendFailure.UNAVAILABLE, "MODE READER: " + detail(reply.line))
        return self._ask_capabilities()

    # ----------------------------------------------------------------- login

    def _login(self) -> list[ClientEvent]:
        """Terminate mode: log in as the proxy account."""
        creds = self._settings.credentials
        if creds is None:
            return self._fail(BackendFailure.REJECTED, "no credentials for the NNTP backend")
        cleartext_allowed = any(is_cleartext(m) for m in self._settings.mechanisms)
        if self._authinfo("USER") and cleartext_allowed:
            # One proxy account in readers.conf: AUTHINFO USER has no
            # authzid, so the backend sees every reader as this account.
            return self._send_user(creds.username, creds.password)
        started = self._master_login(self._sasl_offers() if self._authinfo("SASL") else [])
        if started is not None:
            return started
        if self._authinfo("USER"):
            # AUTHINFO USER sends the password like PLAIN: only when the
            # admin allowed a cleartext mechanism toward the backend.
            return self._fail(
                BackendFailure.REJECTED,
                "backend offers only AUTHINFO USER, no cleartext mechanism set",
            )
        return self._fail(BackendFailure.REJECTED, "backend offers no usable login mechanism")

    def _send_user(self, username: str, password: str) -> list[ClientEvent]:
        if not username or UNSENDABLE.search(username) or UNSENDABLE.search(password):
            return self._fail(BackendFailure.REJECTED, "credentials cannot be sent with AUTHINFO")
        self._password = password
        return self._send(b"AUTHINFO USER " + username.encode(), ClientState.LOGIN, self._on_user)

    def _on_auth(self, reply: _Reply) -> list[ClientEvent]:
        if reply.code == 383:
            text = reply.text.strip()
            return self._challenge(b"" if text == b"=" else b64decode_strict(text))
        if reply.code == 281:
            return self._verified() or self._logged_in(())
        if reply.code == 283:
            text = reply.text.strip()
            data = b"" if text == b"=" else b64decode_strict(text)
            if data is None:
                return self._fail(BackendFailure.UNAVAILABLE, "283 reply is not base64")
            if self._settings.relay and data:
                # The reader's mechanism checks it (SCRAM's server-final):
                # one more challenge, which it answers with an empty response.
                return self._relay_final(data)
            return self._verified(data) or self._logged_in(())
        return self._refused(reply)

    def _on_user(self, reply: _Reply) -> list[ClientEvent]:
        if reply.code == 381:
            password, self._password = self._password, ""
            return self._send(
                b"AUTHINFO PASS " + password.encode(), ClientState.LOGIN, self._on_pass
            )
        if reply.code == 281:  # RFC 4643 section 2.3.2: no password needed
            self._password = ""
            return self._logged_in(())
        return self._refused(reply)

    def _on_pass(self, reply: _Reply) -> list[ClientEvent]:
        if reply.code == 281:
            return self._logged_in(())
        return self._refused(reply)

    def _refused(self, reply: _Reply) -> list[ClientEvent]:
        if reply.code not in _REFUSAL_CODES:
            return self._fail(BackendFailure.UNAVAILABLE, "AUTHINFO reply: " + detail(reply.line))
        failure = self._classify(reply)
        if not self._settings.relay:
            return self._fail(failure, detail(reply.line))
        return self._relay_refused(failure, reply.line)

    # ------------------------------------------------------------ relay mode

    def _plain_as_user(self, mechanism: str, initial: InitialResponse) -> tuple[str, str] | None:
        if not self._authinfo("USER"):
            return None
        credentials = plain_credentials(mechanism, initial)
        if credentials is None or not all(credentials):
            return None
        if UNSENDABLE.search("".join(credentials)):
            return None
        return credentials

    # --------------------------------------------------------------- helpers

    def _authinfo(self, variant: str) -> bool:
        """Whether the backend's AUTHINFO capability lists `variant`."""
        for cap in self._caps:
            words = cap.upper().split()
            if words[:1] == ["AUTHINFO"]:
                return variant in words[1:]
        return False

    def _classify(self, reply: _Reply) -> BackendFailure:
        # 403 (internal fault) and 400 (going away) are the backend's trouble.
        return self._refusal(temporary=reply.code in (400, 403))


# Replies to AUTHINFO that are answers, not nonsense: 400/403 trouble, 480-483
# refusals, 501-504 refused as unusable (RFC 3977 3.2.1, RFC 4643 2.3-2.4).
_REFUSAL_CODES = frozenset({400, 403, 480, 481, 482, 483, 500, 501, 502, 503, 504})
