"""The server core every protocol dialect shares, sans-IO.

`ServerCore` owns what SMTP, IMAP and POP3 agree on before authentication:
the one state enum, the input loop, the driver API of `authgate.protocols
.base` (start, receive_data, resume, tls_started, backend_ready,
backend_failed, relay_challenge, relay_result), the SASL exchange (initial
response, challenges, final challenge, relay), the policy hooks, and the
rules for `AuthFailed` and `max_errors`. A dialect subclass supplies its
command table and every byte of protocol text (greeting, replies, codes,
challenge framing, goodbyes); the core writes none.

The rules, the same in every dialect:
- Every attempt that ends without a login emits one `AuthFailed`: a policy
  refusal (reason: the `Refusal`), a failed exchange (the `FailureReason`),
  and a backend that could not take the login ("backend-<BackendFailure>").
  The audit log then sees every attempt; the defence counts only the
  reasons that are guesses (authgate.proxy.session.GUESS_REASONS).
- A refusal, a bad command and a failed exchange count toward
  `max_errors`; a temporary failure (credential store or backend
  unavailable) and a failed backend login do not: they are not the
  client's doing (RFC 4954 section 6's 454, RFC 3206's [SYS/TEMP] and RFC
  5530's UNAVAILABLE all tell the client to try again later), and closing
  the session for them would turn our outage into the client's error.
- A cleartext login command (IMAP LOGIN, POP3 USER+PASS) runs through the
  PLAIN mechanism, so its checks (empty fields, NUL, UTF-8, length) and its
  `PasswordCheck` live once; in relay mode it is relayed as PLAIN.
- An over-long line ends the session; inside an exchange it also ends the
  attempt (`AuthFailed` "malformed").
- Relay mode names the user of a relayed PLAIN or LOGIN (`relayed_authcid`)
  for the audit log and the per-user defence, and maps the backend's answer
  as `backend_failed` does: unavailable is temporary, an expired password
  is "expired", any other no (with or without a reason) refuses the
  credentials.

Where protocols must differ, the difference is a named class setting below
(`SASL_LINE_TOO_LONG`, `GOODBYE_NAMES_HOST`, `MISSING_BINDING_IS_UNKNOWN`,
`SUCCESS_DATA`, `EMPTY_RESPONSE`)
with its RFC reason, and a row of tests/protocols/test_contract.py's
DIFFERENCES table.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from authgate.policy import Decision, Refusal
from authgate.protocols.base import (
    Authenticated,
    AuthFailed,
    BackendFailure,
    Close,
    Event,
    ProtocolStateError,
    RelayAuth,
    RelayResponse,
    Send,
    SessionSettings,
    Splice,
    StartTLS,
)
from authgate.protocols.common import (
    ExchangeStep,
    LineBuffer,
    LineTooLong,
    SaslExchange,
    SendChallenge,
    b64decode_strict,
    b64encode,
    decode_initial,
    plain_message,
)
from authgate.sasl.base import (
    Failure,
    FailureReason,
    InitialResponse,
    Lookup,
    LookupAnswer,
    PasswordVerdict,
    ServerContext,
    Success,
)


class ServerState(enum.Enum):
    # Members are singletons, equal only to themselves: hash them by
    # identity, in C. (Enum.__hash__ is a Python call, and the machine
    # looks its state up in a set several times per login.)
    __hash__ = object.__hash__

    NEW = "new"  # start() not called yet
    COMMAND = "command"  # reading commands
    SASL = "sasl"  # sent a challenge, reading the client's response line
    SASL_FINAL = "sasl-final"  # sent success data as a final challenge, reading ""
    RELAY_SASL = "relay-sasl"  # relay: sent the backend's challenge, reading the line
    LOOKUP = "lookup"  # a Lookup is outstanding
    BACKEND = "backend"  # Authenticated is outstanding
    RELAY = "relay"  # RelayAuth / RelayResponse is outstanding
    STARTTLS = "starttls"  # StartTLS is outstanding
    SPLICED = "spliced"  # Splice emitted: the driver owns the connection
    CLOSED = "closed"  # Close emitted


# States in which the machine reads its buffer; in the others it holds what
# it received until the driver calls back (pipelining).
READING = frozenset(
    {ServerState.COMMAND, ServerState.SASL, ServerState.SASL_FINAL, ServerState.RELAY_SASL}
)


# What the client's failure is when the backend decides (relay mode); a
# refusal without a reason is a refusal of the credentials.
_RELAY_FAILURES: dict[BackendFailure | None, FailureReason] = {
    BackendFailure.UNAVAILABLE: FailureReason.TEMPORARY,
    BackendFailure.PASSWORD_EXPIRED: FailureReason.EXPIRED,
}


def relayed_authcid(mechanism: str, data: InitialResponse) -> str | None:
    """The user name in a relayed PLAIN message or LOGIN's first answer, for
    AuthFailed and the defence (never the password: only that field is
    decoded). None for other mechanisms and for what does not parse."""
    if not isinstance(data, bytes):
        return None
    if mechanism == "PLAIN":
        fields = data.split(b"\x00")
        if len(fields) != 3:
            return None
        data = fields[1]
    elif mechanism != "LOGIN":
        return None
    try:
        name = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return name if name and name.isprintable() else None


@dataclass
class Attempt:
    """The authentication in progress."""

    mechanism: str  # SASL name, or the dialect's label for its login command
    tag: bytes = b""  # IMAP: the command's tag, for the tagged reply
    authcid: str | None = None
    exchange: SaslExchange | None = None
    success: Success | None = None  # held while the final challenge is answered
    aborted: FailureReason | None = None  # relay: the client cancelled / sent junk
    relayed: int = 0  # relay: responses passed on to the backend
    cleartext: bool = False  # relay: a login command, which cannot carry a challenge


class ServerCore:
    """The shared server machine; a dialect subclass fills in the hooks."""

    # "POP3 server" etc., for ProtocolStateError messages.
    NAME: ClassVar[str]
    # Whole goodbye lines (wire bytes) the core sends before Close. With
    # GOODBYE_NAMES_HOST, "{host}" in TOO_MANY_* is the listener's hostname.
    LINE_TOO_LONG: ClassVar[bytes]
    TOO_MANY_ERRORS: ClassVar[bytes]
    TOO_MANY_COMMANDS: ClassVar[bytes]
    # Dialect settings, each with its RFC reason where a dialect sets it:
    # SUCCESS_DATA: the success reply can carry SASL "additional data with
    # success" (RFC 4422 section 3.6; NNTP's 283, RFC 4643 section 2.4.1),
    # so no final challenge is sent; the reply hook finds the data in
    # `attempt.success`. EMPTY_RESPONSE: how a client spells an empty SASL
    # response on its own line (NNTP: "=", RFC 4643 section 2.4.1), if not
    # as an empty line.
    SUCCESS_DATA: ClassVar[bool] = False
    EMPTY_RESPONSE: ClassVar[bytes | None] = None

    # ---- dialect settings: the deliberate differences, each with its reason.
    # tests/protocols/test_contract.py's DIFFERENCES has a row for each.

    # The goodbye to an over-long line inside a SASL exchange; None: the
    # same LINE_TOO_LONG as for a command. SMTP: RFC 4954 section 6 gives
    # the exchange its own reply, "500 5.5.6 Authentication Exchange line
    # is too long"; IMAP and POP3 have no such code (one BYE / -ERR).
    SASL_LINE_TOO_LONG: ClassVar[bytes | None] = None
    # Whether the goodbyes for too many errors / commands name the host.
    # SMTP: RFC 5321 sections 3.8 and 4.2.3 write a 421 as "421 <domain>
    # ... closing transmission channel"; IMAP's BYE (RFC 9051 7.1.5) and
    # POP3's -ERR (RFC 1939 3) carry free text, where we name nothing.
    GOODBYE_NAMES_HOST: ClassVar[bool] = False
    # A mechanism that fails for want of encryption inside TLS lacks channel
    # binding data (a *-PLUS mechanism the TLS layer cannot bind): answered
    # as an unknown mechanism when True. SMTP: 538 (RFC 4954 section 6)
    # would tell a client already in TLS to encrypt, which it cannot do;
    # 504 5.5.4 "Unrecognized authentication type" makes it try another
    # mechanism. IMAP and POP3 keep their encryption reply: [PRIVACYREQUIRED]
    # (RFC 5530 3) and [AUTH] (RFC 3206 4) make clients give up on the
    # mechanism, not loop, and neither has a code for "unknown" on failure.
    MISSING_BINDING_IS_UNKNOWN: ClassVar[bool] = False

    def __init__(self, settings: SessionSettings) -> None:
        self._settings = settings
        self._state = ServerState.NEW
        self._tls_active = settings.tls_active
        self._lines = LineBuffer(settings.max_line)
        self._errors = 0
        self._commands = 0
        self._attempt: Attempt | None = None

    # ------------------------------------------------------------ driver API

    @property
    def tls_active(self) -> bool:
        return self._tls_active

    @property
    def state(self) -> ServerState:
        return self._state

    @property
    def errors(self) -> int:
        """Errors counted so far against `max_errors` (SMTP's splice goes on
        counting from here)."""
        return self._errors

    def start(self) -> list[Event]:
        self._expect({ServerState.NEW}, "start")
        self._state = ServerState.COMMAND
        return self._greeting()

    def receive_data(self, data: bytes) -> list[Event]:
        if self._state in (ServerState.NEW, ServerState.SPLICED):
            raise ProtocolStateError(f"{self.NAME}: receive_data() in state {self._state.value}")
        if self._state in (ServerState.CLOSED, ServerState.STARTTLS):
            # CLOSED: in flight before the driver closed. STARTTLS: plaintext
            # that arrives before the handshake must never be executed after
            # it (CVE-2011-0411): drop it rather than let it pile up unread.
            return []
        self._lines.feed(data)
        return self._pump()

    def resume(self, answer: LookupAnswer) -> list[Event]:
        self._expect({ServerState.LOOKUP}, "resume")
        attempt = self._current()
        if isinstance(answer, PasswordVerdict) and answer.identity is not None:
            attempt.authcid = answer.identity  # a failure is logged under the store's name
        assert attempt.exchange is not None
        return self._sasl_step(attempt.exchange.resume(answer)) + self._pump()

    def tls_started(self) -> list[Event]:
        self._expect({ServerState.STARTTLS}, "tls_started")
        # Forget everything said in the clear, including bytes pipelined
        # behind STARTTLS (CVE-2011-0411); the dialect forgets its own state.
        self._tls_active = True
        self._lines.clear()
        self._state = ServerState.COMMAND
        self._forget_after_tls()
        return self._after_tls()

    def backend_ready(self, capabilities: Sequence[str]) -> list[Event]:
        # Relay mode too: a driver that knows the backend's capabilities may
        # call this instead of relay_result(True), for a success reply that
        # carries them (IMAP's OK [CAPABILITY ...]).
        relaying = {ServerState.RELAY, ServerState.RELAY_SASL}
        self._expect({ServerState.BACKEND, *relaying}, "backend_ready")
        if self._state in relaying and self._current().aborted is not None:
            return self.relay_result(False)
        return self._logged_in(capabilities)

    def backend_failed(self, failure: BackendFailure) -> list[Event]:
        self._expect({ServerState.BACKEND}, "backend_failed")
        attempt = self._current()
        reply = self._backend_failed_reply(attempt, failure)
        self._reset_auth()
        # Not the client's fault: recorded, not counted toward max_errors.
        failed = AuthFailed(attempt.mechanism, f"backend-{failure.value}", attempt.authcid)
        return [failed, reply, *self._pump()]

    def referred(self, url: bytes) -> list[Event]:
        """The user's mail is on another site (RFC 2221 login referral):
        the dialect's referral reply, or its unavailable one when it has no
        referrals. From BACKEND (terminate) or RELAY (before any backend)."""
        self._expect({ServerState.BACKEND, ServerState.RELAY}, "referred")
        attempt = self._current()
        reply = self._referral_reply(attempt, url)
        if reply is None:
            reply = self._backend_failed_reply(attempt, BackendFailure.UNAVAILABLE)
        self._reset_auth()
        failed = AuthFailed(attempt.mechanism, "referred", attempt.authcid)
        return [failed, reply, *self._pump()]

    def relay_challenge(self, data: bytes) -> list[Event]:
        self._expect({ServerState.RELAY}, "relay_challenge")
        attempt = self._current()
        if attempt.cleartext or attempt.aborted is not None:
            # A login command has nowhere to carry a challenge, and a client
            # that already cancelled is not asked again: cancel at the backend.
            if attempt.aborted is None:
                attempt.aborted = FailureReason.MALFORMED
            return [RelayResponse(None)]
        self._state = ServerState.RELAY_SASL
        return [self._challenge(data), *self._pump()]

    def relay_result(self, ok: bool, failure: BackendFailure | None = None) -> list[Event]:
        self._expect({ServerState.RELAY, ServerState.RELAY_SASL}, "relay_result")
        attempt = self._current()
        if ok and attempt.aborted is None:
            return self._logged_in(())
        # A backend that accepts after the client cancelled is not believed:
        # the client thinks it is unauthenticated. No Splice follows, so the
        # driver drops that backend connection.
        if attempt.aborted is not None:
            reason = attempt.aborted
        else:
            reason = _RELAY_FAILURES.get(failure, FailureReason.INVALID_CREDENTIALS)
        return self._fail(Failure(reason)) + self._pump()

    # ------------------------------------------------------- dialect hooks

    def _greeting(self) -> list[Event]:
        raise NotImplementedError

    def _command(self, line: bytes) -> list[Event]:
        """One command line in the COMMAND state."""
        raise NotImplementedError

    def _challenge(self, data: bytes) -> Send:
        """A SASL challenge (raw bytes), framed for the wire."""
        raise NotImplementedError

    def _failure_reply(self, attempt: Attempt, reason: FailureReason) -> Send:
        raise NotImplementedError

    def _refusal_reply(self, attempt: Attempt, refusal: Refusal) -> Send:
        raise NotImplementedError

    def _backend_failed_reply(self, attempt: Attempt, failure: BackendFailure) -> Send:
        raise NotImplementedError

    def _referral_reply(self, attempt: Attempt, url: bytes) -> Send | None:
        """A login referral (RFC 2221); None: the dialect has none."""
        return None

    def _success_reply(self, attempt: Attempt, capabilities: Sequence[str]) -> Send:
        raise NotImplementedError

    def _forget_after_tls(self) -> None:
        """What the dialect forgets at STARTTLS beyond the buffered bytes."""

    def _after_tls(self) -> list[Event]:
        """What the server says unasked once TLS is up (ManageSieve: its
        capabilities again, RFC 5804 section 2.2); nothing in the others."""
        return []

    def _unframe_response(self, line: bytes) -> bytes | None:
        """The client's SASL response (base64 text, or "*") carried by one
        input unit; None when the framing itself is wrong. A line as it is
        in SMTP, IMAP and POP3; a quoted string or literal in ManageSieve
        (RFC 5804 section 2.1)."""
        return line

    def _next_line(self) -> bytes | None:
        """The next input unit for `_on_line` (IMAP reads literals here)."""
        return self._lines.next_line()

    # ------------------------------------------------------------ input loop

    def _pump(self) -> list[Event]:
        """Handle buffered input until it runs out or the machine must wait."""
        out: list[Event] = []
        while self._state in READING:
            try:
                line = self._next_line()
            except LineTooLong:
                return out + self._line_too_long()
            if line is None:
                break
            out += self._on_line(line)
        return out

    def _on_line(self, line: bytes) -> list[Event]:
        if self._state is ServerState.COMMAND:
            return self._command(line)
        response = self._unframe_response(line)
        sasl = self._state in (ServerState.SASL, ServerState.RELAY_SASL)
        empty = self.EMPTY_RESPONSE
        if sasl and empty is not None and response is not None and response.strip() == empty:
            response = b""
        match self._state:
            case ServerState.SASL:
                if response is None:
                    return self._fail(Failure(FailureReason.MALFORMED, "response is not a string"))
                exchange = self._current().exchange
                assert exchange is not None
                return self._sasl_step(exchange.respond(response))
            case ServerState.SASL_FINAL:
                if response is None:
                    return self._fail(Failure(FailureReason.MALFORMED, "response is not a string"))
                return self._sasl_final_line(response)
            case _:
                return self._relay_line(response)

    def _line_too_long(self) -> list[Event]:
        if self._state is ServerState.COMMAND or self._attempt is None:
            return self._goodbye(self.LINE_TOO_LONG)
        # The attempt ends without a login: in the audit log like any other.
        attempt = self._attempt
        failed = AuthFailed(attempt.mechanism, FailureReason.MALFORMED.value, attempt.authcid)
        return [failed, *self._goodbye(self.SASL_LINE_TOO_LONG or self.LINE_TOO_LONG)]

    def _count_command(self) -> list[Event] | None:
        """Count one command; the goodbye once there were too many."""
        self._commands += 1
        if self._commands > self._settings.max_commands:
            return self._goodbye(self._named(self.TOO_MANY_COMMANDS))
        return None

    # ------------------------------------------------------- authentication

    def _authenticate(self, attempt: Attempt, initial: bytes | None) -> list[Event]:
        """A SASL command: `initial` is the initial response as sent
        (base64, "=" for empty, "*" to cancel) or None."""
        self._attempt = attempt
        refusal = self._decide().refusal(attempt.mechanism)
        if refusal is not None:
            return self._refuse(refusal)
        if self._settings.relay:
            first = decode_initial(initial)
            if isinstance(first, Failure):
                return self._fail(first)
            attempt.authcid = attempt.authcid or relayed_authcid(attempt.mechanism, first)
            self._state = ServerState.RELAY
            return [RelayAuth(attempt.mechanism, first)]
        exchange = SaslExchange(attempt.mechanism, self._sasl_context())
        attempt.exchange = exchange
        return self._sasl_step(exchange.start(initial))

    def _refuse_login(self, attempt: Attempt) -> list[Event] | None:
        """The policy's refusal of a cleartext login command, if any."""
        refusal = self._decide().login_refusal()
        if refusal is None:
            return None
        self._attempt = attempt
        return self._refuse(refusal)

    def _login(self, attempt: Attempt, user: str, password: str) -> list[Event]:
        """A cleartext login command the policy allowed: PLAIN without the
        framing, run through the PLAIN mechanism (or relayed as PLAIN)."""
        self._attempt = attempt
        message = plain_message(user, password)
        if self._settings.relay:
            attempt.cleartext = True
            self._state = ServerState.RELAY
            return [RelayAuth("PLAIN", message)]
        exchange = SaslExchange("PLAIN", self._sasl_context())
        attempt.exchange = exchange
        return self._sasl_step(exchange.start(b64encode(message)))

    def _sasl_step(self, step: ExchangeStep) -> list[Event]:
        attempt = self._current()
        if isinstance(step, SendChallenge):
            self._state = ServerState.SASL
            return [self._challenge(step.data)]
        if isinstance(step, Lookup):
            # Who is trying: the defence counts the failure against this
            # user (lockout, stale password), the audit log names them.
            attempt.authcid = step.request.authcid or attempt.authcid
            self._state = ServerState.LOOKUP
            return [step]
        if isinstance(step, Failure):
            return self._fail(step)
        attempt.authcid = step.authcid
        attempt.success = step
        if step.additional is not None and not self.SUCCESS_DATA:
            # SMTP, IMAP and POP3 have no "additional data with success"
            # (RFC 4422 section 3.6): send it as a final challenge that the
            # client answers with an empty line.
            self._state = ServerState.SASL_FINAL
            return [self._challenge(step.additional)]
        return self._authenticated(step)

    def _sasl_final_line(self, line: bytes) -> list[Event]:
        success = self._current().success
        assert success is not None
        line = line.strip()
        if line == b"*":
            return self._fail(Failure(FailureReason.CANCELLED, "client cancelled"))
        if line:
            return self._fail(Failure(FailureReason.MALFORMED, "response is not empty"))
        return self._authenticated(success)

    def _relay_line(self, line: bytes | None) -> list[Event]:
        attempt = self._current()
        self._state = ServerState.RELAY
        if line is None:
            attempt.aborted = FailureReason.MALFORMED
            return [RelayResponse(None)]
        line = line.strip()
        if line == b"*":
            attempt.aborted = FailureReason.CANCELLED
            return [RelayResponse(None)]
        decoded = b64decode_strict(line)
        if decoded is None:
            # Already started at the backend: cancel there, and tell the
            # client what was wrong once the backend has answered.
            attempt.aborted = FailureReason.MALFORMED
            return [RelayResponse(None)]
        if not attempt.relayed and attempt.authcid is None:
            attempt.authcid = relayed_authcid(attempt.mechanism, decoded)
        attempt.relayed += 1
        return [RelayResponse(decoded)]

    # -------------------------------------------------------------- outcomes

    def _authenticated(self, success: Success) -> list[Event]:
        self._state = ServerState.BACKEND
        return [Authenticated(success.authcid, success.identity, self._current().mechanism)]

    def _logged_in(self, capabilities: Sequence[str]) -> list[Event]:
        reply = self._success_reply(self._current(), capabilities)
        self._attempt = None
        self._state = ServerState.SPLICED
        # Everything the client pipelined behind its login is for the backend.
        return [reply, Splice(pending=self._lines.take_rest())]

    def _refuse(self, refusal: Refusal) -> list[Event]:
        attempt = self._current()
        reply = self._refusal_reply(attempt, refusal)
        self._reset_auth()
        return [AuthFailed(attempt.mechanism, refusal.value, attempt.authcid), *self._error(reply)]

    def _fail(self, failure: Failure) -> list[Event]:
        attempt = self._current()
        if (
            failure.reason is FailureReason.ENCRYPTION_REQUIRED
            and self._tls_active
            and self.MISSING_BINDING_IS_UNKNOWN
        ):
            reply = self._refusal_reply(attempt, Refusal.NOT_AVAILABLE)
        else:
            reply = self._failure_reply(attempt, failure.reason)
        self._reset_auth()
        reason = failure.reason.value
        failed = AuthFailed(attempt.mechanism, reason, attempt.authcid, failure.detail)
        if failure.reason is FailureReason.TEMPORARY:
            return [failed, reply]  # our trouble, not the client's: not counted
        return [failed, *self._error(reply)]

    def _reset_auth(self) -> None:
        self._attempt = None
        self._state = ServerState.COMMAND

    def _error(self, reply: Send) -> list[Event]:
        """A bad command or failed authentication: reply, count, and say
        goodbye at the limit (nginx-style max_errors against ALPACA-type
        cross-protocol abuse and guessing)."""
        self._errors += 1
        if self._errors >= self._settings.max_errors:
            return [reply, *self._goodbye(self._named(self.TOO_MANY_ERRORS))]
        return [reply]

    def _goodbye(self, line: bytes) -> list[Event]:
        self._state = ServerState.CLOSED
        self._attempt = None
        self._lines.clear()
        return [Send(line), Close()]

    def _named(self, line: bytes) -> bytes:
        """A goodbye line with the hostname put in (GOODBYE_NAMES_HOST)."""
        if not self.GOODBYE_NAMES_HOST:
            return line
        return line.replace(b"{host}", self._settings.hostname.encode("ascii", "replace"))

    def _begin_tls(self, reply: Send) -> list[Event]:
        # Anything pipelined behind STARTTLS was sent in the clear: drop it
        # (CVE-2011-0411) and tell the driver how much, to log the attempt.
        discarded = len(self._lines)
        self._lines.clear()
        self._state = ServerState.STARTTLS
        return [reply, StartTLS(discarded)]

    # --------------------------------------------------------------- helpers

    def _expect(self, states: set[ServerState], call: str) -> None:
        if self._state not in states:
            raise ProtocolStateError(f"{self.NAME}: {call}() in state {self._state.value}")

    def _current(self) -> Attempt:
        if self._attempt is None:  # pragma: no cover - every waiting state sets it
            raise ProtocolStateError(f"{self.NAME}: no authentication in progress")
        return self._attempt

    def _decide(self) -> Decision:
        return self._settings.decide(self._tls_active)

    def _sasl_context(self) -> ServerContext:
        return self._settings.sasl_context(self._tls_active)
