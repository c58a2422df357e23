"""LDAP (RFC 4511, StartTLS RFC 4513 section 3): a message-aware relay.

The line-based protocols end their pre-authentication phase with a login
and then splice bytes. LDAP does not fit that shape: a client may bind
again at any time (RFC 4511 section 4.2.1), so a relay that stopped looking
after the first bind would let the second one, a password over a cleartext
connection, through unchecked. So this machine stays in the stream for the
whole session, one LDAPMessage at a time, in both directions:

* every BindRequest goes through the policy function (authgate.policy): a
  simple bind with a password is a cleartext login, a SASL bind names its
  mechanism; refused ones are answered here and never reach the backend;
* the StartTLS ExtendedRequest is answered here (authgate's certificate),
  and what the client sent behind it is thrown away (CVE-2011-0411);
* every other message goes to the backend exactly as it came (its bytes,
  not a re-encoding), in order;
* the backend's BindResponses are read, so a failed bind (resultCode 49)
  counts for the brute-force defence like any failed login; everything the
  backend sends is passed on unchanged.

Events in, actions out (sans-IO): `receive_client(data)`,
`receive_backend(data)`, `tls_started()`, `bind_refused(message_id)`. The
driver (authgate.proxy.ldap_session) owns the sockets, the TLS handshake,
the defence and the audit log.

Result codes, as RFC 4511 appendix A and RFC 4513 give them:

* confidentialityRequired (13): a simple bind with a password, or a
  cleartext SASL mechanism, without TLS under require-secure-auth; any
  request but StartTLS without TLS under require-encrypted;
* strongerAuthRequired (8): a simple bind when the policy enables no
  cleartext mechanism;
* authMethodNotSupported (7): a SASL mechanism the policy does not offer;
* unwillingToPerform (53): a DN with an empty password (an
  "unauthenticated bind", RFC 4513 section 5.1.2, which some servers
  take for an anonymous bind);
* protocolError (2): StartTLS on a listener without it; operationsError
  (1): StartTLS inside TLS, or with operations outstanding;
* malformed BER, a message over the size limit, a tag a client may not
  send: a notice of disconnection (protocolError), then the connection
  closes (its framing is lost).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, TypeAlias

from authgate.policy import Decision, Refusal
from authgate.protocols import ber
from authgate.protocols.base import ProtocolStateError, StartTLS
from authgate.sasl import MECHANISMS
from authgate.sasl.relayed import relayed_user


class ResultCode(enum.IntEnum):
    SUCCESS = 0
    OPERATIONS_ERROR = 1
    PROTOCOL_ERROR = 2
    AUTH_METHOD_NOT_SUPPORTED = 7
    STRONGER_AUTH_REQUIRED = 8
    CONFIDENTIALITY_REQUIRED = 13
    SASL_BIND_IN_PROGRESS = 14
    INVALID_CREDENTIALS = 49
    BUSY = 51
    UNAVAILABLE = 52
    UNWILLING_TO_PERFORM = 53

    @property
    def rfc_name(self) -> str:
        """The name RFC 4511 gives it: confidentialityRequired."""
        first, *rest = self.name.lower().split("_")
        return first + "".join(word.capitalize() for word in rest)


# Message size limits, slapd's defaults (sockbuf_max_incoming 262143 before
# a bind, sockbuf_max_incoming_auth 4194303 after one): a request larger than
# the directory would take is refused here, before it is buffered.
MAX_REQUEST_ANONYMOUS: Final = 262143
MAX_REQUEST_BOUND: Final = 4194303
# One response (a search entry with its attributes): larger than any entry
# a mail directory holds. A backend over it is broken or hostile.
MAX_RESPONSE: Final = 16 * 1024 * 1024

# What a client may send (RFC 4511 section 4.2 to 4.14): anything else is a
# protocol error, as slapd treats it.
REQUESTS: Final = frozenset({*ber.RESPONSE_TO, ber.UNBIND_REQUEST, ber.ABANDON_REQUEST})

SIMPLE: Final = "SIMPLE"  # the audit log's and defence's name for a simple bind

# The lines the driver says outside the dialogue, before closing: notices
# of disconnection (RFC 4511 section 4.4.1).
BYE_BUSY: Final = ber.notice_of_disconnection(ResultCode.BUSY, "Too many connections, try later")
BYE_IDLE: Final = ber.notice_of_disconnection(ResultCode.UNAVAILABLE, "Idle timeout")
BYE_BLOCKED: Final = ber.notice_of_disconnection(
    ResultCode.UNAVAILABLE, "Too many failed logins from your address, try later"
)
BYE_UNAVAILABLE: Final = ber.notice_of_disconnection(
    ResultCode.UNAVAILABLE, "Directory temporarily unavailable"
)
BYE_ERRORS: Final = ber.notice_of_disconnection(ResultCode.UNAVAILABLE, "Too many errors")


def no_client_machine(*_: object) -> None:
    """LDAP has no backend login to drive: the relay forwards the client's
    own binds (terminate mode is refused by the config)."""
    raise ProtocolStateError("LDAP is relayed message by message: no backend login machine")


def bye_protocol_error(why: str) -> bytes:
    return ber.notice_of_disconnection(ResultCode.PROTOCOL_ERROR, why)


_RDN_SEPARATOR = re.compile(r"(?<!\\)[,;]")


def bind_name(raw: bytes) -> str | None:
    """A simple bind's DN as the defence and the audit log name it (None:
    empty). slapd matches DNs loosely (RFC 4514 spacing, attribute types in
    any case), so `UID=alice , ou=people` and `uid=alice,ou=people` are one
    user for the per-user lockout: spaces around separators and `=` go,
    attribute types are lower-cased (the defence folds the values' case).
    Backslash-escaped separators stay as they are."""
    text = raw.decode("utf-8", "replace")
    if not text:
        return None
    rdns = []
    for rdn in _RDN_SEPARATOR.split(text):
        kind, sep, value = rdn.partition("=")
        rdns.append(f"{kind.strip().lower()}{sep}{value.strip()}")
    return ",".join(rdns)


def simple_bind_refusal(decision: Decision) -> tuple[ResultCode, str] | None:
    """Why a simple bind with a password is refused (resultCode, the
    policy's reason), or None: it goes to the directory. It carries the
    password in the clear, so it is allowed exactly when a cleartext
    mechanism (PLAIN, LOGIN) is: IMAP LOGIN's rule."""
    refusal = decision.login_refusal()
    if refusal is None:
        return None
    if refusal is Refusal.NOT_AVAILABLE:
        return ResultCode.STRONGER_AUTH_REQUIRED, refusal.value
    return ResultCode.CONFIDENTIALITY_REQUIRED, refusal.value


def sasl_bind_refusal(decision: Decision, mechanism: str) -> tuple[ResultCode, str] | None:
    """Why a SASL bind with `mechanism` is refused, or None."""
    name = mechanism.upper()
    refusal = decision.refusal(name) if name in MECHANISMS else Refusal.NOT_AVAILABLE
    if refusal is None:
        return None
    if refusal is Refusal.NOT_AVAILABLE:
        return ResultCode.AUTH_METHOD_NOT_SUPPORTED, refusal.value
    return ResultCode.CONFIDENTIALITY_REQUIRED, refusal.value


# ---------------------------------------------------------------- actions


@dataclass(frozen=True)
class ToClient:
    data: bytes


@dataclass(frozen=True)
class ToBackend:
    """Forward to the backend (connect first if there is no connection)."""

    data: bytes


@dataclass(frozen=True)
class Bind:
    """A BindRequest the policy lets through, to forward unless the defence
    says no (address blocked: the blocked goodbye; user locked out: call
    `bind_refused(message_id)`). `user` is what the bind names (a simple
    bind's DN, the user a SASL message names), or None."""

    message_id: int
    user: str | None
    mechanism: str
    data: bytes


@dataclass(frozen=True)
class BindRefused:
    """The policy refused a bind (answered here; for the log and audit)."""

    user: str | None
    mechanism: str
    code: ResultCode
    reason: str


@dataclass(frozen=True)
class BindDone:
    """The backend answered a bind (its response follows as ToClient)."""

    message_id: int
    user: str | None
    mechanism: str
    code: int
    anonymous: bool

    @property
    def guess(self) -> bool:
        """A wrong password: what the brute-force defence counts."""
        return self.code == ResultCode.INVALID_CREDENTIALS


@dataclass(frozen=True)
class ResetBackend:
    """Close the backend connection: StartTLS, and nothing said before it
    (a bind above all) may carry over into the TLS session."""


@dataclass(frozen=True)
class Close:
    reason: str


Action: TypeAlias = (
    ToClient | ToBackend | Bind | BindRefused | BindDone | ResetBackend | StartTLS | Close
)


@dataclass(frozen=True)
class LdapSettings:
    decide: Callable[[bool], Decision]  # the policy for this client, per TLS state
    starttls_available: bool
    tls_active: bool
    max_errors: int = 3


@dataclass
class _PendingBind:
    user: str | None
    mechanism: str
    anonymous: bool


@dataclass
class _Sasl:
    """A SASL exchange in progress (the backend answered 14 last)."""

    mechanism: str
    messages: int = 0
    user: str | None = None


@dataclass
class _State:
    outstanding: set[int] = field(default_factory=set)
    binds: dict[int, _PendingBind] = field(default_factory=dict)
    sasl: _Sasl | None = None
    forwarded: bool = False  # something went to the (current) backend connection


class LdapRelay:
    """The sans-IO relay of one LDAP session (see the module docstring)."""

    def __init__(self, settings: LdapSettings) -> None:
        self.settings = settings
        self.tls = settings.tls_active
        self.errors = 0
        # A non-anonymous bind succeeded and no bind has started since.
        self.authenticated = False
        self._client = ber.MessageReader(MAX_REQUEST_ANONYMOUS)
        self._backend = ber.MessageReader(MAX_RESPONSE)
        self._state = _State()
        self._awaiting_tls = False
        self._closed = False

    # ------------------------------------------------------------ client

    def receive_client(self, data: bytes) -> list[Action]:
        if self._awaiting_tls:
            raise ProtocolStateError("client data while StartTLS is under way")
        if self._closed:
            return []
        self._client.feed(data)
        out: list[Action] = []
        while not self._closed and not self._awaiting_tls:
            try:
                message = self._client.next()
            except ber.BerError as exc:
                return [*out, *self._protocol_error(str(exc))]
            if message is None:
                break
            out.extend(self._request(message))
        return out

    def tls_started(self) -> list[Action]:
        if not self._awaiting_tls:
            raise ProtocolStateError("tls_started without StartTLS")
        self._awaiting_tls = False
        self.tls = True
        return []

    def bind_refused(self, message_id: int) -> list[Action]:
        """The driver refused a `Bind` (the user is locked out): it fails
        like a wrong password, and the backend never sees it. (A client that
        reused the message ID in the same write may have replaced the
        pending entry already: the answer is the same.)"""
        self._state.binds.pop(message_id, None)
        self._state.outstanding.discard(message_id)
        self._state.sasl = None
        if self._closed:
            return []
        reply = ber.response(
            message_id, ber.BIND_RESPONSE, ResultCode.INVALID_CREDENTIALS, "Invalid credentials"
        )
        return [ToClient(reply), *self._count_error()]

    def _protocol_error(self, why: str) -> list[Action]:
        self._closed = True
        return [ToClient(bye_protocol_error(why)), Close(f"protocol error: {why}")]

    def _count_error(self) -> list[Action]:
        self.errors += 1
        if self.errors < self.settings.max_errors:
            return []
        self._closed = True
        return [ToClient(BYE_ERRORS), Close("too many errors")]

    def _request(self, message: ber.Message) -> list[Action]:
        op = message.op
        if op not in REQUESTS:
            return self._protocol_error(f"a client may not send tag 0x{op:02x}")
        if message.message_id == 0:
            return self._protocol_error("messageID 0 is reserved for the server")
        if op == ber.UNBIND_REQUEST:
            self._closed = True
            if not self._state.forwarded:
                # Nothing went to the backend (since StartTLS): no
                # connection to open just to say goodbye on it.
                return [Close("client unbound")]
            return [ToBackend(message.raw), Close("client unbound")]
        try:
            if op == ber.EXTENDED_REQUEST:
                name = ber.parse_extended_name(message.body)
                if name == ber.STARTTLS_OID:
                    return self._starttls(message)
            if op == ber.BIND_REQUEST:
                return self._bind(message, ber.parse_bind(message.body))
            if op == ber.ABANDON_REQUEST:
                self._state.outstanding.discard(ber.decode_int(message.body))
        except ber.BerError as exc:
            return self._protocol_error(str(exc))
        if self._decision().session_tls_required:
            if op == ber.ABANDON_REQUEST:
                return []  # nothing was forwarded: nothing to abandon
            return self._refuse(message, ResultCode.CONFIDENTIALITY_REQUIRED, "TLS required")
        if op != ber.ABANDON_REQUEST:
            self._state.outstanding.add(message.message_id)
        self._state.forwarded = True
        return [ToBackend(message.raw)]

    def _decision(self) -> Decision:
        return self.settings.decide(self.tls)

    def _refuse(self, message: ber.Message, code: ResultCode, text: str) -> list[Action]:
        reply = ber.response(message.message_id, ber.RESPONSE_TO[message.op], code, text)
        return [ToClient(reply)]

    def _starttls(self, message: ber.Message) -> list[Action]:
        reply: list[Action]
        if not self.settings.starttls_available:
            return self._refuse(message, ResultCode.PROTOCOL_ERROR, "StartTLS is not offered")
        if self.tls:
            return self._refuse(message, ResultCode.OPERATIONS_ERROR, "TLS is already active")
        if self._state.outstanding:
            return self._refuse(message, ResultCode.OPERATIONS_ERROR, "operations are outstanding")
        reply = [
            ToClient(
                ber.response(
                    message.message_id,
                    ber.EXTENDED_RESPONSE,
                    ResultCode.SUCCESS,
                    name=ber.STARTTLS_OID,
                )
            )
        ]
        # RFC 4513 section 3.1.3 lets the session go on as it was; we do not:
        # whatever was bound before TLS (perhaps by someone who injected a
        # bind into the cleartext) is dropped with the backend connection,
        # and the TLS session starts anonymous.
        self._awaiting_tls = True
        self.authenticated = False
        self._state = _State()
        self._client.limit = MAX_REQUEST_ANONYMOUS
        self._backend = ber.MessageReader(MAX_RESPONSE)
        discarded = self._client.discard()
        return [*reply, ResetBackend(), StartTLS(discarded)]

    # -------------------------------------------------------------- binds

    def _bind(self, message: ber.Message, bind: ber.SimpleBind | ber.SaslBind) -> list[Action]:
        # RFC 4511 section 4.2.1: a bind in progress makes the session anonymous.
        self.authenticated = False
        self._client.limit = MAX_REQUEST_ANONYMOUS
        decision = self._decision()
        dn = bind_name(bind.name)
        if isinstance(bind, ber.SimpleBind):
            self._state.sasl = None
            anonymous = not bind.name and not bind.password
            if anonymous:
                if decision.session_tls_required:
                    return self._refuse_bind(
                        message, None, SIMPLE, ResultCode.CONFIDENTIALITY_REQUIRED, "tls-required"
                    )
                return self._forward_bind(message, None, SIMPLE, anonymous=True)
            if not bind.password:
                return self._refuse_bind(
                    message, dn, SIMPLE, ResultCode.UNWILLING_TO_PERFORM, "unauthenticated-bind"
                )
            refused = simple_bind_refusal(decision)
            if refused is None:
                return self._forward_bind(message, dn, SIMPLE, anonymous=False)
            return self._refuse_bind(message, dn, SIMPLE, *refused)
        mechanism = bind.mechanism.upper()
        refused = sasl_bind_refusal(decision, mechanism)
        if refused is not None:
            self._state.sasl = None
            return self._refuse_bind(message, dn, mechanism, *refused)
        sasl = self._state.sasl
        if sasl is None or sasl.mechanism != mechanism:
            sasl = self._state.sasl = _Sasl(mechanism)
        if bind.credentials is not None:
            if sasl.user is None:
                sasl.user = relayed_user(mechanism, sasl.messages, bind.credentials)
            sasl.messages += 1
        return self._forward_bind(message, sasl.user or dn, mechanism, anonymous=False)

    def _forward_bind(
        self, message: ber.Message, user: str | None, mechanism: str, *, anonymous: bool
    ) -> list[Action]:
        self._state.binds[message.message_id] = _PendingBind(user, mechanism, anonymous)
        self._state.outstanding.add(message.message_id)
        self._state.forwarded = True
        if anonymous:
            return [ToBackend(message.raw)]
        return [Bind(message.message_id, user, mechanism, message.raw)]

    def _refuse_bind(
        self,
        message: ber.Message,
        user: str | None,
        mechanism: str,
        code: ResultCode,
        reason: str,
    ) -> list[Action]:
        text = {
            ResultCode.CONFIDENTIALITY_REQUIRED: "TLS required for this bind (use StartTLS)",
            ResultCode.STRONGER_AUTH_REQUIRED: "Simple binds are not enabled",
            ResultCode.AUTH_METHOD_NOT_SUPPORTED: f"SASL mechanism {mechanism} not available",
            ResultCode.UNWILLING_TO_PERFORM: "Unauthenticated bind (DN with no password) refused",
        }[code]
        return [
            BindRefused(user, mechanism, code, reason),
            *self._refuse(message, code, text),
            *self._count_error(),
        ]

    # ------------------------------------------------------------ backend

    def receive_backend(self, data: bytes) -> list[Action]:
        """The backend's bytes: every message passes to the client unchanged;
        a BindResponse is read first."""
        if self._closed:
            return []
        self._backend.feed(data)
        out: list[Action] = []
        while not self._closed:
            try:
                message = self._backend.next()
            except ber.BerError as exc:
                self._closed = True
                return [*out, ToClient(BYE_UNAVAILABLE), Close(f"backend sent bad BER: {exc}")]
            if message is None:
                break
            out.extend(self._response(message))
        return out

    def _response(self, message: ber.Message) -> list[Action]:
        state = self._state
        msgid = message.message_id
        if message.op not in ber.NOT_FINAL:
            state.outstanding.discard(msgid)
        pending = state.binds.pop(msgid, None) if message.op == ber.BIND_RESPONSE else None
        if pending is None:
            return [ToClient(message.raw)]
        try:
            code = ber.parse_result(message.body).code
        except ber.BerError as exc:
            self._closed = True
            return [ToClient(BYE_UNAVAILABLE), Close(f"backend sent a bad BindResponse: {exc}")]
        done = BindDone(msgid, pending.user, pending.mechanism, code, pending.anonymous)
        out: list[Action] = [done, ToClient(message.raw)]
        if code == ResultCode.SASL_BIND_IN_PROGRESS:
            return out
        state.sasl = None
        if code == ResultCode.SUCCESS:
            if not pending.anonymous:
                self.authenticated = True
                self._client.limit = MAX_REQUEST_BOUND
            return out
        return [*out, *self._count_error()]
