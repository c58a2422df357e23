"""What the line-and-code protocols share: POP3, NNTP and SMTP answer every
command with one status line (a code and a text), log in with a command
whose first word names the mechanism, and (POP3, NNTP) know a USER/PASS
pair of cleartext commands.

`TableServer` is a `ServerCore` whose dialect hooks read reply tables
(class settings): the dialect writes its texts, not the hooks. The client
side gets `TableClient`, the shared parts of a `ClientCore` that reads a
capability list and may log in with USER/PASS. Each dialect keeps its
texts, codes, framing and command table in its own module.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import ClassVar, TypeVar

from authgate.policy import Refusal
from authgate.protocols.base import (
    BackendFailure,
    ClientEvent,
    ClientSettings,
    Close,
    Event,
    LoginFailed,
    Send,
    SessionSettings,
)
from authgate.protocols.client import ClientCore, ClientState
from authgate.protocols.common import b64encode
from authgate.protocols.server import Attempt, ServerCore, ServerState
from authgate.sasl import MECHANISMS
from authgate.sasl.base import NO_RESPONSE, FailureReason, InitialResponse

CRLF = b"\r\n"

# RFC 4422 section 3.1: a mechanism name is 1-20 of [A-Z0-9-_]; clients
# may send it in lower case (the commands are case-insensitive).
MECHANISM_NAME = re.compile(rb"[A-Za-z0-9_-]{1,20}")
# What cannot go on a command line: a line break or NUL would end or split it.
UNSENDABLE = re.compile("[\r\n\0]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def line(text: str) -> bytes:
    """One reply line of ours."""
    return text.encode("utf-8") + CRLF


def dot_block(status: str, items: Sequence[str]) -> bytes:
    """A multi-line response (RFC 1939 section 3, RFC 3977 section 3.1.1):
    the status line, the items (byte-stuffed where they start with "."),
    then "."."""
    lines = [status, *("." + i if i.startswith(".") else i for i in items), "."]
    return b"".join(line(one) for one in lines)


def detail(reply: bytes) -> str:
    """A backend's reply, printable and short enough for a log."""
    return _CONTROL.sub("?", reply[:200].decode("utf-8", "replace"))


def is_cleartext(name: str) -> bool:
    """Whether the SASL mechanism `name` sends the password as it is."""
    info = MECHANISMS.get(name.upper())
    return info is not None and info.cleartext


def plain_credentials(mechanism: str, initial: InitialResponse) -> tuple[str, str] | None:
    """The user name and password of a PLAIN initial response without an
    authzid (which a USER/PASS pair cannot express), else None."""
    if mechanism != "PLAIN" or not isinstance(initial, bytes):
        return None
    fields = initial.split(b"\0")
    if len(fields) != 3 or fields[0]:
        return None
    try:
        return fields[1].decode("utf-8"), fields[2].decode("utf-8")
    except UnicodeDecodeError:
        return None


# ====================================================================== server


class TableServer(ServerCore):
    """A `ServerCore` dialect whose replies are lines from its tables.

    `GREETING` may name `{host}`; a challenge is `CHALLENGE` and the
    base64 data (`EMPTY_CHALLENGE` when there is none); a failed backend login answers
    `BACKEND_FAILED`, or the `EXPIRED` failure when the backend said the
    password has expired. A dialect overrides a hook only where its
    protocol picks the reply by more than the reason (POP3 and NNTP for
    their USER command's refusals, NNTP for its 283 success data).
    """

    GREETING: ClassVar[str]
    SUCCESS: ClassVar[str]
    BACKEND_FAILED: ClassVar[str]
    FAILURES: ClassVar[Mapping[FailureReason, str]]
    REFUSALS: ClassVar[Mapping[Refusal, str]]
    CHALLENGE: ClassVar[bytes]
    EMPTY_CHALLENGE: ClassVar[bytes] = b""

    def __init__(self, settings: SessionSettings) -> None:
        super().__init__(settings)
        self._user: str | None = None  # USER given, waiting for PASS

    def _forget_after_tls(self) -> None:
        # RFC 2595 section 4, RFC 4642 section 2.2.2: the session restarts
        # after STARTTLS; a USER given in the clear is forgotten.
        self._user = None

    def _challenge(self, data: bytes) -> Send:
        return Send(self.CHALLENGE + (b64encode(data) or self.EMPTY_CHALLENGE) + CRLF)

    def _greeting(self) -> list[Event]:
        return [Send(line(self.GREETING.format(host=self._settings.hostname)))]

    def _failure_reply(self, attempt: Attempt, reason: FailureReason) -> Send:
        return Send(line(self.FAILURES[reason]))

    def _refusal_reply(self, attempt: Attempt, refusal: Refusal) -> Send:
        return Send(line(self.REFUSALS[refusal]))

    def _backend_failed_reply(self, attempt: Attempt, failure: BackendFailure) -> Send:
        if failure is BackendFailure.PASSWORD_EXPIRED:
            return Send(line(self.FAILURES[FailureReason.EXPIRED]))
        return Send(line(self.BACKEND_FAILED))

    def _success_reply(self, attempt: Attempt, capabilities: Sequence[str]) -> Send:
        # No capabilities in the reply: the client asks again after the
        # login, and that goes to the backend.
        return Send(line(self.SUCCESS))

    def _quit(self, text: str) -> list[Event]:
        """QUIT: the goodbye, then the connection ends."""
        self._state = ServerState.CLOSED
        return [Send(line(text)), Close()]

    def _say_error(self, text: str) -> list[Event]:
        return self._error(Send(line(text)))

    def _starttls_command(
        self, argument: bytes, *, ok: str, syntax: str, active: str, unavailable: str
    ) -> list[Event]:
        """STLS (RFC 2595 section 4) / STARTTLS (RFC 4642 section 2.2):
        no argument, refused once TLS is active or where there is none."""
        if argument:
            return self._say_error(syntax)
        if self._tls_active:
            return self._say_error(active)
        if not self._settings.starttls_available:
            return self._say_error(unavailable)
        return self._begin_tls(Send(line(ok)))

    def _user_command(self, label: str, argument: bytes, *, ok: str, syntax: str) -> list[Event]:
        """POP3 USER / NNTP AUTHINFO USER: the policy's word on cleartext
        logins, then the name kept in `_user` for the PASS that must follow."""
        refused = self._refuse_login(Attempt(label))
        if refused is not None:
            return refused
        try:
            name = argument.decode("utf-8")
        except UnicodeDecodeError:
            return self._say_error(syntax)
        if not name:
            return self._say_error(syntax)
        self._user = name
        return [Send(line(ok))]

    def _password(self, attempt: Attempt, argument: bytes, *, syntax: str) -> str | list[Event]:
        """PASS's argument (the rest of the line, spaces included: RFC 1939
        section 7, and INN reads it so), or the reply that refuses it."""
        refused = self._refuse_login(attempt)
        if refused is not None:
            return refused
        try:
            return argument.decode("utf-8")
        except UnicodeDecodeError:
            return self._say_error(syntax)


# ====================================================================== client

R = TypeVar("R")


class TableClient(ClientCore[R]):
    """The shared half of the POP3 and NNTP clients: the capability list,
    the AUTH command with its initial response held when the line would be
    too long, the password kept for PASS, and relay mode's second chance.

    `AUTH_COMMAND` is the command before the mechanism name; a line longer
    than `MAX_AUTH_LINE` octets (CRLF included) sends the initial response
    after the server's empty challenge (RFC 5034 section 4, RFC 4643
    section 2.4.2); "=" is an empty one.
    """

    AUTH_COMMAND: ClassVar[bytes]
    MAX_AUTH_LINE: ClassVar[int]

    def __init__(self, settings: ClientSettings) -> None:
        super().__init__(settings)
        self._caps: tuple[str, ...] = ()
        self._collecting: list[str] | None = None  # a multi-line list in progress
        self._password = ""  # USER/PASS: sent after USER's positive reply
        self._refused_once = False  # relay mode: a LoginFailed was reported, READY again

    def _forget_after_tls(self) -> None:
        self._collecting = None

    def _on_auth(self, reply: R) -> list[ClientEvent]:
        raise NotImplementedError

    def _send_user(self, username: str, password: str) -> list[ClientEvent]:
        """USER with `username`, then PASS with `password`."""
        raise NotImplementedError

    def _plain_as_user(self, mechanism: str, initial: InitialResponse) -> tuple[str, str] | None:
        """The user name and password of a mail client's PLAIN (its USER/PASS
        reaches us as PLAIN) when this backend should get them as USER/PASS."""
        raise NotImplementedError

    def _relay_start(self, name: str, initial: InitialResponse) -> list[ClientEvent]:
        cleartext = self._plain_as_user(name, initial)
        if cleartext is not None:
            return self._send_user(*cleartext)
        return super()._relay_start(name, initial)

    def _auth_command(self, name: str, initial: InitialResponse) -> list[ClientEvent]:
        command = self.AUTH_COMMAND + b" " + name.encode("ascii")
        if initial is not NO_RESPONSE:
            argument = b64encode(initial) or b"="
            if len(command) + 1 + len(argument) + len(CRLF) <= self.MAX_AUTH_LINE:
                command += b" " + argument
            else:
                self._held = initial  # sent after the server's empty challenge
        return self._send(command, ClientState.AUTH, self._on_auth)

    def _relay_refused(self, failure: BackendFailure, reply: bytes) -> list[ClientEvent]:
        """Relay mode: the backend stays un-authenticated (RFC 1939 section
        4, RFC 4643), so the client's next attempt can use this connection:
        `authenticate()` may be called again."""
        self._state = ClientState.READY
        self._held = None
        self._password = ""
        self._refused_once = True
        return [LoginFailed(failure, detail(reply))]

    def _unasked(self) -> list[ClientEvent]:
        if self._refused_once:
            # The driver has this attempt's LoginFailed already; a backend
            # that speaks unasked is not used for another.
            self._state = ClientState.FAILED
            return []
        return super()._unasked()

    def _sasl_offers(self) -> list[str]:
        for cap in self._caps:
            words = cap.split()
            if words and words[0].upper() == "SASL":
                return words[1:]
        return []

    def _has_capability(self, name: str) -> bool:
        return any(cap.split()[:1] == [name] for cap in (c.upper() for c in self._caps))

    def _fail(self, failure: BackendFailure, detail: str) -> list[ClientEvent]:
        self._password = ""
        return super()._fail(failure, detail)
