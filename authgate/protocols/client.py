"""The client (backend) core every protocol dialect shares, sans-IO.

`ClientCore` logs authgate in to a backend: in terminate mode with our own
(master) credentials, in relay mode with the mail client's SASL exchange,
which the driver passes on through `authenticate()` and `respond()`. It owns
the one state enum, the driver API (receive_data, tls_started,
authenticate, respond, derived: see `authgate.protocols.base`), the input
loop with its out-of-turn rule, STARTTLS toward the backend, and the SASL
client exchange (mechanism choice, initial response held for the first
challenge, challenges, relay, the backend's proof checked on success).

A new dialect (say `FooClient(ClientCore[FooReply])`) implements:
- `NAME` ("FOO client", for ProtocolStateError messages);
- `_next_reply()`: framing. The next complete reply from `self._lines`, or
  None; raise `MalformedReply(detail)` for junk (LineTooLong is handled);
- `_on_greeting(reply)`: the reply in the GREETING state (usually: ask
  for capabilities with `_send(..., ClientState.CAPABILITY, handler)`);
  every later reply goes to the handler named in the last `_send`;
- `_after_tls()`: the command that asks for capabilities again;
- `_auth_command(name, initial)`: the AUTH line (base64, "=" for empty,
  or `self._held = initial` when it cannot go on the line);
- `_challenge_data(reply)`: a reply's challenge (bytes; None if not
  base64), and `_classify(reply)`: the `BackendFailure` of a refusal;
- `_login()`: terminate mode once capabilities are known, normally
  `_master_login(offers)` (None when no mechanism is common);
and calls `_start_tls()`, `_ready()`, `_challenge()`, `_verified()`,
`_logged_in()`, `_fail()` from its handlers. Settings that differ:
`LOCKSTEP` (see below).

The rules, the same in every dialect:
- Nothing the backend sends before the handshake is read after STARTTLS
  (response injection, the mirror image of CVE-2011-0411).
- The backend may not answer a command it has not received yet: in a
  lockstep dialect (POP3, SMTP) any byte buffered behind a complete reply
  once we answered it, or any byte arriving while we wait for the driver,
  ends the login (UNAVAILABLE). IMAP may send untagged data at any time
  (RFC 9051 section 7), so only a tagged reply or continuation counts.
- A SASL challenge that is not base64, a first challenge that is not empty
  while an initial response is held (RFC 4422 section 5), and a challenge
  the mechanism cannot take cancel the exchange ("*") and fail UNAVAILABLE
  (the backend misbehaves); a mechanism's own refusal fails REJECTED.
- After `LoggedIn` the splice owns the connection: receive_data() raises.
  After `LoginFailed`, respond(), derived() and authenticate() are no-ops.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Sequence
from typing import ClassVar, Generic, TypeVar

from authgate.policy import choose_client_mechanism
from authgate.protocols.base import (
    BackendFailure,
    ClientEvent,
    ClientSettings,
    LoggedIn,
    LoginFailed,
    ProtocolStateError,
    RelayChallenge,
    Send,
    StartTLS,
)
from authgate.protocols.common import LineBuffer, LineTooLong, b64encode
from authgate.sasl import mechanism_info
from authgate.sasl.base import (
    NO_RESPONSE,
    ClientAuthError,
    ClientMechanism,
    Derive,
    InitialResponse,
    SaslProtocolError,
)

__all__ = ["ClientCore", "ClientState", "MalformedReply"]

CRLF = b"\r\n"
CANCEL = b"*" + CRLF  # RFC 4422 section 3.5, spelled "*" by all three

# RFC 4422 section 3.1: mechanism names are 1-20 of [A-Z0-9-_].
_MECH_NAME = re.compile(rb"[A-Za-z0-9_-]{1,20}")


class ClientState(enum.Enum):
    # Members are singletons, equal only to themselves: hash them by
    # identity, in C. (Enum.__hash__ is a Python call, and the machine
    # looks its state up in a set several times per login.)
    __hash__ = object.__hash__

    GREETING = "greeting"  # waiting for the greeting
    CAPABILITY = "capability"  # asked CAPA / CAPABILITY / EHLO
    STARTTLS = "starttls"  # sent STARTTLS / STLS
    TLS = "tls"  # StartTLS emitted, waiting for tls_started()
    NEGOTIATE = "negotiate"  # a dialect's own step: IMAP ID, SMTP XCLIENT, replay
    READY = "ready"  # relay mode: waiting for authenticate()
    AUTH = "auth"  # sent AUTH or a SASL response, waiting for the reply
    LOGIN = "login"  # sent a cleartext login command (POP3 USER / PASS)
    RELAY_WAIT = "relay-wait"  # relay: RelayChallenge emitted, waiting for respond()
    DERIVE = "derive"  # Derive emitted (SCRAM's PBKDF2), waiting for derived()
    POST_LOGIN = "post-login"  # logged in, asked for the capabilities after login
    DONE = "done"  # LoggedIn emitted
    FAILED = "failed"  # LoginFailed emitted


# Waiting for a reply: the input loop reads.
READING = frozenset(
    {
        ClientState.GREETING,
        ClientState.CAPABILITY,
        ClientState.STARTTLS,
        ClientState.NEGOTIATE,
        ClientState.AUTH,
        ClientState.LOGIN,
        ClientState.POST_LOGIN,
    }
)
# Waiting for the driver: the backend has nothing to answer.
WAITING_ON_US = frozenset({ClientState.READY, ClientState.RELAY_WAIT, ClientState.DERIVE})
# Relay mode waiting for the mail client: a non-lockstep backend's untagged
# data is still read (and a tagged reply is out of turn).
_RELAY_IDLE = frozenset({ClientState.READY, ClientState.RELAY_WAIT})
# Before the login starts: a relay authenticate() is queued until READY.
BEFORE_LOGIN = frozenset(
    {
        ClientState.GREETING,
        ClientState.CAPABILITY,
        ClientState.STARTTLS,
        ClientState.TLS,
        ClientState.NEGOTIATE,
    }
)


class MalformedReply(Exception):
    """The backend's reply breaks the protocol's syntax (the message is the
    detail for LoginFailed: never a secret)."""


R = TypeVar("R")
Handler = Callable[[R], list[ClientEvent]]


class ClientCore(Generic[R]):
    """The shared backend client machine; a dialect fills in the hooks."""

    NAME: ClassVar[str]
    # Lockstep protocols (RFC 1939 POP3, RFC 5321 SMTP without PIPELINING,
    # which we never use): every reply answers exactly one command of ours.
    LOCKSTEP: ClassVar[bool] = True

    def __init__(self, settings: ClientSettings) -> None:
        self._settings = settings
        self._state = ClientState.GREETING
        self._lines = LineBuffer(settings.max_line)
        self._handler: Handler[R] = self._on_greeting
        self._tls_done = False
        self._mech: ClientMechanism | None = None
        self._held: bytes | None = None  # initial response sent on the first challenge
        self._queued: tuple[str, InitialResponse] | None = None  # relay: early authenticate()
        self._derive: Derive | None = None
        self._final_relayed = False  # relay: the backend's success data went as a challenge
        self._learned: tuple[str, ...] | None = None  # a list asked for, to remember

    @property
    def state(self) -> ClientState:
        return self._state

    @property
    def learned_capabilities(self) -> tuple[str, ...] | None:
        return self._learned

    def connection_ended(self, why: str) -> LoginFailed:
        """The backend's connection ended (or broke) before a result."""
        return self._ended(BackendFailure.UNAVAILABLE, why)

    # ------------------------------------------------------------ driver API

    def receive_data(self, data: bytes) -> list[ClientEvent]:
        if self._state is ClientState.DONE:
            raise ProtocolStateError(f"{self.NAME}: receive_data() after LoggedIn")
        if self._state in (ClientState.FAILED, ClientState.TLS):
            return []  # TLS: plaintext injected before the handshake
        if self._state in WAITING_ON_US and data and self.LOCKSTEP:
            return self._unasked()
        self._lines.feed(data)
        if self._state is ClientState.DERIVE:
            return []  # read once our answer is out
        return self._read()

    def tls_started(self) -> list[ClientEvent]:
        self._expect({ClientState.TLS}, "tls_started")
        self._tls_done = True
        self._lines.clear()  # response injection: nothing from before the handshake
        self._forget_after_tls()
        return self._after_tls()

    def authenticate(self, mechanism: str, initial: InitialResponse) -> list[ClientEvent]:
        if not self._settings.relay or self._queued is not None:
            raise ProtocolStateError(f"{self.NAME}: authenticate() outside relay mode or twice")
        if self._state is ClientState.READY:
            return self._relay_start(mechanism.upper(), initial)
        if self._state in BEFORE_LOGIN:
            # The mail client can be faster than our backend connection:
            # start once the backend's capabilities are known.
            self._queued = (mechanism.upper(), initial)
            return []
        if self._state is ClientState.FAILED:
            return []  # the driver has the LoginFailed already
        raise ProtocolStateError(f"{self.NAME}: authenticate() in state {self._state.value}")

    def respond(self, data: bytes | None) -> list[ClientEvent]:
        if self._final_relayed and self._state is ClientState.RELAY_WAIT:
            self._final_relayed = False
            if data == b"":
                return self._logged_in(())
            # The mail client did not accept the backend's proof (or sent
            # something where RFC 4422 wants nothing): the login is void.
            return self._fail(BackendFailure.REJECTED, "client refused the backend's final data")
        if self._state in (ClientState.FAILED, ClientState.DONE):
            return []
        self._expect({ClientState.RELAY_WAIT}, "respond")
        self._state = ClientState.AUTH
        return [self._response(data), *self._read(answered=True)]

    def derived(self, key: bytes) -> list[ClientEvent]:
        """The result of the `Derive` we emitted, computed off the loop."""
        if self._state is ClientState.FAILED:
            return []
        self._expect({ClientState.DERIVE}, "derived")
        derive, self._derive = self._derive, None
        assert derive is not None
        self._state = ClientState.AUTH
        try:
            reply = derive.finish(key)
        except ClientAuthError as exc:
            return self._cancel(BackendFailure.REJECTED, str(exc))
        # What the backend sent meanwhile (IMAP untagged data) is read now;
        # a reply would be out of turn: it cannot answer what it has not had.
        return [self._response(reply), *self._read(answered=True)]

    # ------------------------------------------------------- dialect hooks

    def _next_reply(self) -> R | None:
        raise NotImplementedError

    def _on_greeting(self, reply: R) -> list[ClientEvent]:
        raise NotImplementedError

    def _on_reply(self, reply: R) -> list[ClientEvent]:
        """Every reply after the greeting; IMAP filters untagged data here."""
        return self._handler(reply)

    def _may_come_unasked(self, reply: R) -> bool:
        """Whether this reply may arrive before the backend had our command."""
        return False

    def _after_tls(self) -> list[ClientEvent]:
        raise NotImplementedError

    def _forget_after_tls(self) -> None:
        """What the dialect forgets at STARTTLS beyond the buffered bytes."""

    def _auth_command(self, name: str, initial: InitialResponse) -> list[ClientEvent]:
        raise NotImplementedError

    def _login(self) -> list[ClientEvent]:
        """Terminate mode, once capabilities (and negotiation) are done."""
        raise NotImplementedError

    def _relay_start(self, name: str, initial: InitialResponse) -> list[ClientEvent]:
        """Relay mode: start the mail client's mechanism at the backend."""
        if not _MECH_NAME.fullmatch(name.encode("ascii", "replace")):
            return self._fail(BackendFailure.REJECTED, "malformed mechanism name")
        return self._auth_command(name, initial)

    def _unasked(self) -> list[ClientEvent]:
        """Lockstep: the backend spoke while we wait for the driver."""
        return self._fail(BackendFailure.UNAVAILABLE, "backend spoke out of turn")

    # ------------------------------------------------------------ input loop

    def _read(self, *, answered: bool = False) -> list[ClientEvent]:
        """Act on the buffered replies. `answered`: we have just sent
        something, so what is buffered came before the backend saw it."""
        out: list[ClientEvent] = []
        while self._state in READING or (not self.LOCKSTEP and self._state in _RELAY_IDLE):
            try:
                reply = self._next_reply()
            except LineTooLong:
                return out + self._fail(BackendFailure.UNAVAILABLE, "backend line too long")
            except MalformedReply as exc:
                return out + self._fail(BackendFailure.UNAVAILABLE, f"malformed reply: {exc}")
            if reply is None:
                break
            sent = answered or any(isinstance(e, Send) for e in out)
            if sent and not self._may_come_unasked(reply):
                return self._out_of_turn(out)
            out += self._on_reply(reply)
            waiting = self._state in READING or self._state in WAITING_ON_US
            if self.LOCKSTEP and waiting and len(self._lines):
                if any(isinstance(e, LoginFailed) for e in out):
                    # POP3 relay: the driver has this attempt's failure; a
                    # backend that speaks unasked is not used for another.
                    self._state = ClientState.FAILED
                    return out
                return self._out_of_turn(out)
        return out

    def _out_of_turn(self, out: list[ClientEvent]) -> list[ClientEvent]:
        # A Derive still out is moot: the login is over.
        out = [e for e in out if not isinstance(e, Derive)]
        return out + self._fail(BackendFailure.UNAVAILABLE, "backend spoke out of turn")

    # ----------------------------------------------------------------- steps

    def _send(self, line: bytes, state: ClientState, handler: Handler[R]) -> list[ClientEvent]:
        """Send one command line; `handler` takes its reply."""
        self._state, self._handler = state, handler
        return [Send(line + CRLF)]

    def _start_tls(self) -> list[ClientEvent]:
        """The backend said yes to STARTTLS: bytes behind that reply were sent
        in the clear and are dropped (response injection)."""
        self._lines.clear()
        self._state = ClientState.TLS
        return [StartTLS()]

    def _ready(self) -> list[ClientEvent]:
        """Capabilities known, negotiation done: log in (or wait for the
        mail client's exchange in relay mode)."""
        if not self._settings.relay:
            return self._login()
        self._state = ClientState.READY
        if self._queued is None:
            return []
        queued, self._queued = self._queued, None
        return self._relay_start(*queued)

    def _master_login(self, offers: Sequence[str]) -> list[ClientEvent] | None:
        """Terminate mode: start our preferred mechanism among `offers`;
        None when none of ours is offered (the dialect decides what then)."""
        credentials = self._settings.credentials
        if credentials is None:
            return self._fail(BackendFailure.REJECTED, "no credentials for the backend login")
        name = choose_client_mechanism(offers, self._settings.mechanisms)
        if name is None:
            return None
        try:
            self._mech = mechanism_info(name).client(credentials, self._settings.sasl_context)
            initial = self._mech.start()
        except KeyError:
            return self._fail(BackendFailure.REJECTED, f"{name} is not implemented")
        except (ValueError, ClientAuthError) as exc:
            # e.g. a master login (authzid) with LOGIN, which cannot carry one.
            return self._fail(BackendFailure.REJECTED, f"cannot log in with {name}: {exc}")
        return self._auth_command(name, NO_RESPONSE if initial is None else initial)

    def _challenge(self, challenge: bytes | None) -> list[ClientEvent]:
        """A SASL challenge from the backend (None: it was not base64)."""
        if challenge is None:
            return self._cancel(BackendFailure.UNAVAILABLE, "backend sent a malformed challenge")
        if self._held is not None:
            # RFC 4422 section 5: the initial response that did not fit the
            # command answers the first, empty, challenge.
            held, self._held = self._held, None
            if challenge:
                return self._cancel(
                    BackendFailure.UNAVAILABLE, "backend's first challenge not empty"
                )
            return [self._response(held)]
        if self._settings.relay:
            self._state = ClientState.RELAY_WAIT
            return [RelayChallenge(challenge)]
        assert self._mech is not None
        try:
            reply = self._mech.step(challenge)
        except ClientAuthError as exc:
            return self._cancel(BackendFailure.REJECTED, str(exc))
        except SaslProtocolError:
            # One challenge too many (after SCRAM's server-final): the
            # backend misbehaves.
            return self._cancel(BackendFailure.UNAVAILABLE, "unexpected challenge")
        if isinstance(reply, Derive):
            # Slow (PBKDF2): the driver computes it off the event loop.
            self._state, self._derive = ClientState.DERIVE, reply
            return [reply]
        return [self._response(reply)]

    def _relay_final(self, data: bytes) -> list[ClientEvent]:
        """Relay mode: the backend's success data (SCRAM's server-final, in
        NNTP's 283 or ManageSieve's OK (SASL ...)) reaches the mail client
        as one more challenge, which it answers empty; the server machine's
        relay API carries no success data."""
        self._final_relayed = True
        self._state = ClientState.RELAY_WAIT
        return [RelayChallenge(data)]

    def _verified(self, additional: bytes | None = None) -> list[ClientEvent] | None:
        """The backend said yes: None when it also proved itself (mutual
        authentication: SCRAM's server signature came as a challenge in
        SMTP, IMAP and POP3, as `additional` data with success in NNTP's
        283 (RFC 4643 section 2.4.1) and ManageSieve's OK (SASL ...) (RFC
        5804 section 2.1))."""
        if self._mech is None:
            return None
        try:
            self._mech.finish(additional)
        except (ClientAuthError, SaslProtocolError) as exc:
            # Logged in, but the backend did not prove itself: unusable.
            detail = str(exc) if isinstance(exc, ClientAuthError) else "mutual auth missing"
            return self._fail(BackendFailure.REJECTED, f"backend not verified: {detail}")
        return None

    def _refusal(self, temporary: bool) -> BackendFailure:
        """The usual classification of a refused login."""
        if temporary:
            return BackendFailure.UNAVAILABLE
        # Relay mode: the mail client's credentials were refused. Terminate
        # mode: the backend refused *our* (master) login.
        if self._settings.relay:
            return BackendFailure.INVALID_CREDENTIALS
        return BackendFailure.REJECTED

    def _logged_in(self, capabilities: Sequence[str]) -> list[ClientEvent]:
        self._state = ClientState.DONE
        # What the backend sent behind its success reply is the session's.
        return [LoggedIn(tuple(capabilities), self._lines.take_rest())]

    def _fail(self, failure: BackendFailure, detail: str) -> list[ClientEvent]:
        return [self._ended(failure, detail)]

    def _ended(self, failure: BackendFailure, detail: str) -> LoginFailed:
        self._state = ClientState.FAILED
        self._mech = None
        self._held = None
        return LoginFailed(failure, detail)

    def _cancel(self, failure: BackendFailure, detail: str) -> list[ClientEvent]:
        return [self._response(None), *self._fail(failure, detail)]

    def _response(self, data: bytes | None) -> Send:
        """A SASL response line: base64 (an empty response is an empty
        line), or "*" to cancel. A dialect hook: ManageSieve sends them as
        strings (RFC 5804 section 2.1)."""
        return Send(CANCEL if data is None else b64encode(data) + CRLF)

    def _expect(self, states: set[ClientState], call: str) -> None:
        if self._state not in states:
            raise ProtocolStateError(f"{self.NAME}: {call}() in state {self._state.value}")
