"""DIGEST-MD5 (RFC 2831): server and client, no I/O.

The mechanism is historic (RFC 6331) but mail clients still offer it. We
implement the authentication-only subset a proxy can live with:

* ``qop=auth`` only. ``auth-int`` and ``auth-conf`` install a security layer
  that wraps every later byte of the session; the proxy splices the session
  to the backend after authentication and could not unwrap it.
* ``algorithm=md5-sess`` only (the one algorithm RFC 2831 defines).
* No subsequent authentication (RFC 2831 section 2.2): every exchange gets a
  fresh nonce and ``nc`` must be ``00000001``, which makes a captured
  response useless against any other exchange.

Exchange (server first, RFC 2831 section 2.1)::

    S: realm="...",nonce="...",qop="auth",charset=utf-8,algorithm=md5-sess
    C: charset=utf-8,username="...",realm="...",nonce="...",nc=00000001,
       cnonce="...",digest-uri="imap/host",response=<32 hex>,qop=auth
    S: rspauth=<32 hex>          (sent as one more challenge)
    C: (empty)

The server never needs the password: HA1 = MD5(user ":" realm ":" password)
suffices (section 2.1.2.1), which is what the credential store keeps as
``{DIGEST-MD5}``. HA1 is password-equivalent for this mechanism, and bound
to the realm.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from authgate.sasl.base import (
    NO_RESPONSE,
    Call,
    Challenge,
    ClientAuthError,
    ClientContext,
    ClientCredentials,
    Failure,
    FailureReason,
    InitialResponse,
    Lookup,
    LookupAnswer,
    SaslProtocolError,
    SecretForm,
    SecretLookup,
    ServerContext,
    ServerOutcome,
    Stage,
    Success,
    check_authzid,
    invalid,
    malformed,
)

__all__ = [
    "MAX_CHALLENGE_SIZE",
    "MAX_RESPONSE_SIZE",
    "DigestMD5Client",
    "DigestMD5Server",
    "DigestResponse",
    "DirectiveSyntaxError",
    "digest_ha1",
    "digest_uri_host",
    "format_directives",
    "parse_digest_response",
    "parse_directives",
]

# RFC 2831 sections 2.1.1 and 2.1.2: "The size of a digest-challenge MUST be
# less than 2048 bytes", "... a digest-response MUST be less than 4096 bytes".
MAX_CHALLENGE_SIZE = 2048
MAX_RESPONSE_SIZE = 4096

_NONCE_BYTES = 24  # 192 random bits, base64 without padding (32 characters)
_NC = b"00000001"  # the first (and, for us, only) use of the nonce
_QOP_AUTH = b"auth"
_HEX32 = re.compile(rb"[0-9A-Fa-f]{32}")
_HEX8 = re.compile(rb"[0-9A-Fa-f]{8}")

# ------------------------------------------------------------ hashing


def _md5(data: bytes) -> bytes:
    # MD5 is what RFC 2831 prescribes; there is no choice to make. The flag
    # keeps hashlib's MD5 available on FIPS builds of OpenSSL.
    return hashlib.md5(data, usedforsecurity=False).digest()


def _md5_hex(data: bytes) -> bytes:
    return _md5(data).hex().encode("ascii")


def _hash_form(text: str) -> bytes:
    """RFC 2831 section 2.1.2.1: with charset=utf-8, a string whose
    characters all lie in ISO 8859-1 is hashed in ISO 8859-1, any other
    string in UTF-8. Without charset the values were ISO 8859-1 on the wire,
    so the same rule gives the same bytes."""
    try:
        return text.encode("iso-8859-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")


def digest_ha1(username: str, realm: str, password: str) -> bytes:
    """HA1 = MD5(username ":" realm ":" password), the 16 bytes a server
    needs to verify DIGEST-MD5 (``{DIGEST-MD5}`` hex in the store, the same
    digest as passlib's ``htdigest`` for ASCII input).

    The ISO 8859-1 rule is applied to each of the three strings on its own.
    The RFC's prose ("all the characters of either username-value or
    passwd") is ambiguous; the reference implementation (Cyrus SASL,
    ``DigestCalcSecret``: "We should use code example instead") and Java's
    SASL provider convert each string independently, GNU SASL converts only
    the password. Per-string conversion agrees with Cyrus always and with
    GNU SASL whenever user name and realm are ASCII.
    """
    return _md5(_hash_form(username) + b":" + _hash_form(realm) + b":" + _hash_form(password))


def _response_value(
    ha1: bytes,
    nonce: bytes,
    cnonce: bytes,
    authzid: bytes | None,
    digest_uri: bytes,
    *,
    for_rspauth: bool,
    qop: bytes = _QOP_AUTH,
) -> bytes:
    """RFC 2831 section 2.1.2.1 (response) and 2.1.3 (rspauth), for
    qop=auth and nc=00000001: 32 lowercase hex digits. `qop` is the value
    as the client spelled it (ABNF literals are case-insensitive)."""
    a1 = ha1 + b":" + nonce + b":" + cnonce
    if authzid:
        a1 += b":" + authzid
    # The client proves itself over "AUTHENTICATE:uri", the server over ":uri",
    # so the server's answer cannot be replayed as a client response.
    a2 = (b"" if for_rspauth else b"AUTHENTICATE") + b":" + digest_uri
    kd = b":".join((_md5_hex(a1), nonce, _NC, cnonce, qop, _md5_hex(a2)))
    return _md5_hex(kd)


def _fresh_nonce(random: Callable[[int], bytes] | None) -> bytes:
    """A nonce or cnonce: random bytes, base64 so that it is plain ASCII
    without quotes or backslashes (RFC 2831 asks for that of both)."""
    raw = (random or os.urandom)(_NONCE_BYTES)
    if len(raw) != _NONCE_BYTES:
        raise SaslProtocolError("random source returned the wrong number of bytes")
    return base64.b64encode(raw)


# ------------------------------------------------------------ directive lists


class DirectiveSyntaxError(ValueError):
    """A directive list breaks the RFC 2831 section 7 grammar. The message
    names the problem and never quotes the offending input."""


# RFC 2831 section 7.1 (from RFC 2616 section 2.2): token = 1*<any CHAR
# except CTLs or separators>.
_SEPARATORS = frozenset(b'()<>@,;:\\"/[]?={} \t')
_TOKEN_CHARS = frozenset(c for c in range(0x21, 0x7F) if c not in _SEPARATORS)
_SP, _HT = 0x20, 0x09
_QUOTE, _BACKSLASH, _COMMA, _EQUALS = 0x22, 0x5C, 0x2C, 0x3D


def _is_text(c: int) -> bool:
    """TEXT minus line breaks: any octet but CTLs, HT allowed. Folded line
    breaks inside quoted strings are legal in RFC 2616 but no SASL client
    sends them, and a CR or LF in a user name is never what anyone meant."""
    return c == _HT or (c >= 0x20 and c != 0x7F)


def _skip_lws(data: bytes, pos: int) -> int:
    # LWS = [CRLF] 1*( SP | HT ), implied between any two words (#rule).
    end = len(data)
    while pos < end:
        c = data[pos]
        if c in (_SP, _HT):
            pos += 1
        elif data.startswith(b"\r\n", pos) and data[pos + 2 : pos + 3] in (b" ", b"\t"):
            pos += 3
        else:
            break
    return pos


def _scan_token(data: bytes, pos: int) -> int:
    end = len(data)
    while pos < end and data[pos] in _TOKEN_CHARS:
        pos += 1
    return pos


def _scan_quoted(data: bytes, pos: int) -> tuple[bytes, int]:
    """Unescape the quoted-string starting at data[pos] == '"'; return the
    value and the position after the closing quote."""
    out = bytearray()
    pos += 1
    end = len(data)
    while pos < end:
        c = data[pos]
        if c == _QUOTE:
            return bytes(out), pos + 1
        if c == _BACKSLASH:
            # quoted-pair = "\" CHAR; we refuse escaped control characters
            # for the same reason as unescaped ones.
            if pos + 1 >= end:
                break
            escaped = data[pos + 1]
            if escaped > 0x7E or not _is_text(escaped):
                raise DirectiveSyntaxError("invalid escape in quoted string")
            out.append(escaped)
            pos += 2
            continue
        if not _is_text(c):
            raise DirectiveSyntaxError("control character in quoted string")
        out.append(c)
        pos += 1
    raise DirectiveSyntaxError("unterminated quoted string")


def parse_directives(data: bytes) -> list[tuple[str, bytes]]:
    """Split a digest-challenge / digest-response into (name, value) pairs.

    RFC 2831 section 7.1 "#rule": elements separated by commas with optional
    linear white space, empty elements allowed and ignored. Each element is
    ``token "=" ( token | quoted-string )``. Names are returned in lower case
    (they compare case-insensitively, as HTTP auth-params do); values are
    returned unescaped and undecoded, in order, duplicates included.
    """
    items: list[tuple[str, bytes]] = []
    end = len(data)
    pos = _skip_lws(data, 0)
    while pos < end:
        if data[pos] == _COMMA:  # a null element
            pos = _skip_lws(data, pos + 1)
            continue
        name_end = _scan_token(data, pos)
        if name_end == pos:
            raise DirectiveSyntaxError("expected a directive name")
        name = data[pos:name_end].decode("ascii").lower()
        pos = _skip_lws(data, name_end)
        if pos >= end or data[pos] != _EQUALS:
            raise DirectiveSyntaxError("expected '=' after a directive name")
        pos = _skip_lws(data, pos + 1)
        if pos < end and data[pos] == _QUOTE:
            value, pos = _scan_quoted(data, pos)
        else:
            value_end = _scan_token(data, pos)
            if value_end == pos:
                raise DirectiveSyntaxError("expected a token or quoted string as value")
            value, pos = data[pos:value_end], value_end
        items.append((name, value))
        pos = _skip_lws(data, pos)
        if pos < end:
            if data[pos] != _COMMA:
                raise DirectiveSyntaxError("expected ',' between directives")
            pos = _skip_lws(data, pos + 1)
    return items


def _is_token(value: bytes) -> bool:
    return bool(value) and all(c in _TOKEN_CHARS for c in value)


def format_directives(items: Iterable[tuple[str, bytes, bool]]) -> bytes:
    """Join (name, value, quoted) triples into a directive list.

    Unquoted values must be tokens; RFC 2831's grammar fixes which
    directives are unquoted (``algorithm``, ``charset``, ``nc``, ``qop`` in
    a response, ``response``, ``rspauth``), and at least curl 7.88 gives up
    on a quoted ``algorithm``. Raises ValueError for values that cannot be
    represented (a bug in the caller, not peer input).
    """
    parts: list[bytes] = []
    for name, value, quoted in items:
        raw_name = name.encode("ascii")
        if not _is_token(raw_name):
            raise ValueError("directive name is not a token")
        if quoted:
            if not all(_is_text(c) for c in value):
                raise ValueError("control character in a quoted directive value")
            escaped = value.replace(b"\\", b"\\\\").replace(b'"', b'\\"')
            parts.append(raw_name + b'="' + escaped + b'"')
        else:
            if not _is_token(value):
                raise ValueError("unquoted directive value is not a token")
            parts.append(raw_name + b"=" + value)
    return b",".join(parts)


def _group(items: list[tuple[str, bytes]]) -> dict[str, list[bytes]]:
    grouped: dict[str, list[bytes]] = {}
    for name, value in items:
        grouped.setdefault(name, []).append(value)
    return grouped


# ------------------------------------------------------------ digest-uri hosts


def digest_uri_host(host: str) -> str:
    """The form in which a digest-uri host compares with our names.

    Host names compare case-insensitively, with one trailing dot ignored
    ("Mail.Example.ORG." is "mail.example.org"). An IP address compares by
    value: "[::1]" (the URI form, RFC 3986) and "::1" are one host, an
    IPv6 zone ("%eth0") is dropped, and an IPv4-mapped IPv6 address is the
    IPv4 address it wraps (a dual-stack socket reports IPv4 peers that way).
    Anything else is returned unchanged and matches only itself.
    """
    bracketed = host.startswith("[") and host.endswith("]")
    inner = host[1:-1] if bracketed else host
    if ":" in inner:  # IPv6, written bare or in brackets
        inner = inner.split("%", 1)[0]
    elif bracketed:  # only IPv6 literals take brackets
        return host
    try:
        address = ipaddress.ip_address(inner)
    except ValueError:
        return host if bracketed else host.lower().removesuffix(".")
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def _shown(value: str) -> str:
    """A client's value quoted for a log line, cut to a readable length."""
    return repr(value if len(value) <= 80 else value[:80] + "...")


def _mismatch(detail: str) -> Failure:
    return Failure(FailureReason.DIGEST_URI_MISMATCH, detail)


# What DigestMD5Server.step expects, in turn.
_DIGEST_RESPONSE = "the digest-response"
_ACK = "an empty reply to rspauth"


# ------------------------------------------------------------------ server

_REQUIRED_IN_RESPONSE = ("username", "nonce", "cnonce", "nc", "digest-uri", "response")
_RESPONSE_DIRECTIVES = frozenset(
    (*_REQUIRED_IN_RESPONSE, "realm", "qop", "maxbuf", "charset", "cipher", "authzid")
)


@dataclass(frozen=True)
class DigestResponse:
    """A digest-response (RFC 2831 section 2.1.2) that keeps to the grammar
    and to what we offer: each directive once, the required ones present,
    strings decoded, qop=auth. Whether it answers *our* challenge is
    `DigestMD5Server`'s check; whether it proves the password, the store's."""

    username: str
    realm: str | None  # None when the client sent no realm directive
    nonce: bytes
    cnonce: bytes
    nc: bytes  # 8 hex digits
    qop: bytes  # as sent, since it enters the digest ("auth" when absent)
    digest_uri: str  # serv-type/host[/serv-name]
    digest_uri_raw: bytes  # as sent, since it enters the digest
    response: bytes  # 32 lowercase hex digits
    authzid: str | None
    authzid_raw: bytes | None

    @property
    def service(self) -> str:
        return self.digest_uri.split("/")[0]

    @property
    def host(self) -> str:
        return self.digest_uri.split("/")[1]


def parse_digest_response(data: bytes) -> DigestResponse | Failure:
    """Read a digest-response, or a MALFORMED failure whose detail never
    quotes the client's values. Pure: no state, no secret, no I/O."""
    if len(data) >= MAX_RESPONSE_SIZE:
        return malformed("digest-response too long")
    try:
        grouped = _group(parse_directives(data))
    except DirectiveSyntaxError as exc:
        return malformed(f"digest-response: {exc}")
    # Section 2.1.2: every directive may appear at most once (realm may
    # repeat only in the challenge). Two different usernames or nonces in
    # one message would leave it to the parser which one "counts".
    for name, values in grouped.items():
        if len(values) > 1:
            named = name if name in _RESPONSE_DIRECTIVES else "unknown"
            return malformed(f"duplicate directive ({named})")
    missing = [name for name in _REQUIRED_IN_RESPONSE if name not in grouped]
    if missing:
        return malformed(f"missing directive {missing[0]}")
    one = {name: values[0] for name, values in grouped.items()}

    charset = one.get("charset")
    if charset is not None and charset.lower() != b"utf-8":
        return malformed("charset must be utf-8")
    # Without charset=utf-8 the strings are ISO 8859-1 (section 2.1.2).
    encoding = "utf-8" if charset is not None else "iso-8859-1"
    try:
        username = one["username"].decode(encoding)
        realm = one["realm"].decode(encoding) if "realm" in one else None
        authzid_raw = one.get("authzid") or None  # authzid="" means none
        authzid = authzid_raw.decode(encoding) if authzid_raw is not None else None
        digest_uri = one["digest-uri"].decode(encoding)
    except UnicodeDecodeError:
        return malformed(f"a directive value is not valid {encoding}")
    if not username:
        return malformed("empty username")

    qop = one.get("qop", _QOP_AUTH)
    if qop.lower() != _QOP_AUTH:
        return malformed("only qop=auth is offered")
    if not _HEX8.fullmatch(one["nc"]):
        return malformed("nc is not 8 hex digits")
    if not _HEX32.fullmatch(one["response"]):
        return malformed("response is not 32 hex digits")
    if not one["cnonce"]:
        return malformed("empty cnonce")
    uri_parts = digest_uri.split("/")
    if len(uri_parts) not in (2, 3) or not all(uri_parts[:2]):
        return malformed("digest-uri is not serv-type/host[/serv-name]")
    return DigestResponse(
        username=username,
        realm=realm,
        nonce=one["nonce"],
        cnonce=one["cnonce"],
        nc=one["nc"],
        qop=qop,
        digest_uri=digest_uri,
        digest_uri_raw=one["digest-uri"],
        response=one["response"].lower(),
        authzid=authzid,
        authzid_raw=authzid_raw,
    )


class DigestMD5Server:
    name: str = "DIGEST-MD5"

    def __init__(self, ctx: ServerContext) -> None:
        self._ctx = ctx
        self._realm = ctx.realm or ctx.hostname
        self._hosts = frozenset(digest_uri_host(h) for h in (ctx.hostname, *ctx.aliases))
        if not all(_is_text(c) for c in self._realm.encode("utf-8")):
            # Configuration error: caught when the mechanism is built, not
            # when a client is half-way through an exchange.
            raise ValueError("DIGEST-MD5 realm contains control characters")
        self._stage = Stage("DIGEST-MD5 server")
        self._nonce = b""
        # The digest-response we accepted, kept while the store answers and
        # until the client acknowledges our rspauth.
        self._response: DigestResponse | None = None

    def _fail(self, failure: Failure) -> Failure:
        self._stage.end()
        self._response = None
        return failure

    def start(self, initial: InitialResponse) -> ServerOutcome:
        self._stage.check(Call.START)
        if initial is not NO_RESPONSE:
            # Server-first mechanism: any initial response, even an empty one,
            # breaks the exchange. A digest-response here would be RFC 2831
            # section 2.2 subsequent authentication, which we do not offer.
            return self._fail(malformed("DIGEST-MD5 does not take an initial response"))
        self._nonce = _fresh_nonce(self._ctx.random)
        self._stage.expect(Call.STEP, what=_DIGEST_RESPONSE)
        return Challenge(
            format_directives(
                [
                    ("realm", self._realm.encode("utf-8"), True),
                    ("nonce", self._nonce, True),
                    ("qop", _QOP_AUTH, True),  # qop-options is a quoted list
                    ("charset", b"utf-8", False),
                    ("algorithm", b"md5-sess", False),  # unquoted: curl needs it
                ]
            )
        )

    def step(self, response: bytes) -> ServerOutcome:
        self._stage.check(Call.STEP)
        if self._stage.awaits(_ACK):
            return self._on_ack(response)
        outcome = self._on_response(response)
        if isinstance(outcome, Failure):
            return self._fail(outcome)
        self._stage.expect(Call.RESUME, what="HA1 for the user and realm")
        return outcome

    def _on_response(self, data: bytes) -> Failure | Lookup:
        """parse -> value -> check: the grammar first, then our state."""
        response = parse_digest_response(data)
        if isinstance(response, Failure):
            return response
        refusal = self._check(response)
        if refusal is not None:
            return refusal
        self._response = response
        return Lookup(
            SecretLookup(response.username, SecretForm.DIGEST_MD5, realm=response.realm or "")
        )

    def _check(self, response: DigestResponse) -> Failure | None:
        """Whether a well-formed digest-response answers our challenge."""
        # The nonce is single use: issued by this object for this exchange.
        if not hmac.compare_digest(response.nonce, self._nonce):
            return invalid("nonce does not belong to this exchange")
        # Section 2.1.2: nc counts uses of the nonce; anything but the first
        # use is subsequent authentication or a replay.
        if response.nc != _NC:
            return invalid("nonce count must be 00000001")
        # Section 2.1.2 / 4: the server SHOULD check digest-uri, so that a
        # response made for another service or server cannot be relayed
        # here. The service strictly; the host against every name and
        # address of ours, since clients put there whatever name or address
        # they connected to. No password has been checked yet: a mismatch
        # is a misconfigured client (or a relayed response), not a guess.
        shown = _shown(response.digest_uri)
        if response.service != self._ctx.service:
            return _mismatch(f"digest-uri {shown} names another service")
        if digest_uri_host(response.host) not in self._hosts:
            return _mismatch(f"digest-uri {shown} names a host that is not ours")
        if response.realm is not None and response.realm != self._realm:
            return invalid("realm was not offered")
        return None

    def resume(self, answer: LookupAnswer) -> ServerOutcome:
        self._stage.check(Call.RESUME)
        response = self._response
        if response is None:  # pragma: no cover - set whenever the stage is
            raise SaslProtocolError("DIGEST-MD5 server lost its pending response")
        if answer is None:
            # Unknown user (or no usable secret): verify against a random HA1
            # so that the work done matches that for a known user.
            ha1, known = (self._ctx.random or os.urandom)(16), False
        elif isinstance(answer, bytes) and len(answer) == 16:
            ha1, known = answer, True
        else:
            raise SaslProtocolError("DIGEST-MD5 lookup must be answered with 16 bytes or None")
        expected = self._digest(ha1, response, for_rspauth=False)
        matches = hmac.compare_digest(expected, response.response)
        if not (matches and known):
            return self._fail(invalid())
        rspauth = self._digest(ha1, response, for_rspauth=True)
        self._stage.expect(Call.STEP, what=_ACK)
        # Section 2.1.3: the server proves it knew HA1 too. Sent as a
        # challenge so that SMTP, IMAP and POP3 all carry it the same way.
        return Challenge(b"rspauth=" + rspauth)

    def _digest(self, ha1: bytes, response: DigestResponse, *, for_rspauth: bool) -> bytes:
        return _response_value(
            ha1,
            self._nonce,
            response.cnonce,
            response.authzid_raw,
            response.digest_uri_raw,
            for_rspauth=for_rspauth,
            qop=response.qop,
        )

    def _on_ack(self, data: bytes) -> ServerOutcome:
        response = self._response
        self._stage.end()
        self._response = None
        if response is None:  # pragma: no cover - set whenever the stage is
            raise SaslProtocolError("DIGEST-MD5 server lost its pending response")
        if data:
            return malformed("expected an empty response after rspauth")
        return check_authzid(Success(response.username, response.authzid, additional=None))


# ------------------------------------------------------------------ client

_CHALLENGE_DIRECTIVES = frozenset(
    {"realm", "nonce", "qop", "stale", "maxbuf", "charset", "algorithm", "cipher"}
)


# What DigestMD5Client.step expects, in turn.
_DIGEST_CHALLENGE = "the digest-challenge"
_RSPAUTH = "rspauth, as a challenge or with the success"
_VERIFIED = "the success (rspauth checked)"


class DigestMD5Client:
    name: str = "DIGEST-MD5"

    def __init__(self, creds: ClientCredentials, ctx: ClientContext) -> None:
        self._creds = creds
        self._ctx = ctx
        self._stage = Stage("DIGEST-MD5 client")
        self._rspauth = b""

    def _error(self, detail: str) -> ClientAuthError:
        self._stage.end()
        self._rspauth = b""
        return ClientAuthError(f"DIGEST-MD5: {detail}")

    def start(self) -> bytes | None:
        self._stage.check(Call.START)
        self._stage.expect(Call.STEP, Call.FINISH, what=_DIGEST_CHALLENGE)
        return None  # server first

    def step(self, challenge: bytes) -> bytes:
        self._stage.check(Call.STEP)
        if self._stage.awaits(_DIGEST_CHALLENGE):
            return self._answer_challenge(challenge)
        if self._stage.awaits(_RSPAUTH):
            self._verify_rspauth(challenge)
            return b""
        raise self._error("unexpected challenge after rspauth")

    def finish(self, additional: bytes | None) -> None:
        self._stage.check(Call.FINISH)
        if self._stage.awaits(_RSPAUTH) and additional is not None:
            # A protocol that carries "additional data with success" (RFC 4422
            # section 3.6) delivers rspauth here instead of as a challenge.
            self._verify_rspauth(additional)
        elif self._stage.awaits(_VERIFIED) and additional:
            raise self._error("unexpected additional data after rspauth")
        if not self._stage.awaits(_VERIFIED):
            raise self._error("server reported success without a valid rspauth")
        self._stage.end()

    def _answer_challenge(self, challenge: bytes) -> bytes:
        if len(challenge) >= MAX_CHALLENGE_SIZE:
            raise self._error("digest-challenge too long")
        try:
            grouped = _group(parse_directives(challenge))
        except DirectiveSyntaxError as exc:
            raise self._error(f"digest-challenge: {exc}") from None
        # Section 2.1.1: only realm may appear more than once.
        for name in _CHALLENGE_DIRECTIVES - {"realm"}:
            if len(grouped.get(name, ())) > 1:
                raise self._error(f"duplicate directive ({name}) in challenge")
        one = {name: values[0] for name, values in grouped.items()}

        nonce = one.get("nonce", b"")
        if not nonce:
            raise self._error("challenge has no nonce")
        # Section 2.1.1: algorithm is required and must be md5-sess. Its
        # grammar says token, but some servers quote it: both parse the same.
        if one.get("algorithm", b"").lower() != b"md5-sess":
            raise self._error("challenge does not offer algorithm=md5-sess")
        # qop-options absent means "auth" (section 2.1.1).
        qops = {q.strip(b" \t").lower() for q in one.get("qop", _QOP_AUTH).split(b",")}
        if _QOP_AUTH not in qops:
            raise self._error("server does not offer qop=auth")
        charset = one.get("charset")
        if charset is not None and charset.lower() != b"utf-8":
            raise self._error("challenge charset must be utf-8")
        utf8 = charset is not None
        encoding = "utf-8" if utf8 else "iso-8859-1"

        try:
            realms = [value.decode(encoding) for value in grouped.get("realm", [])]
        except UnicodeDecodeError:
            raise self._error(f"realm is not valid {encoding}") from None
        realm = next(
            (r for r in realms if r.lower() == self._ctx.hostname.lower()),
            realms[0] if realms else "",
        )

        creds = self._creds
        digest_uri = f"{self._ctx.service}/{self._ctx.hostname}"
        try:
            username_raw = creds.username.encode(encoding)
            realm_raw = realm.encode(encoding)
            authzid_raw = creds.authzid.encode(encoding) if creds.authzid else None
            uri_raw = digest_uri.encode(encoding)
        except UnicodeEncodeError:
            raise self._error(
                "credentials need charset=utf-8, which the server did not offer"
            ) from None
        cnonce = _fresh_nonce(self._ctx.random)
        ha1 = digest_ha1(creds.username, realm, creds.password)
        response = _response_value(ha1, nonce, cnonce, authzid_raw, uri_raw, for_rspauth=False)
        self._rspauth = _response_value(ha1, nonce, cnonce, authzid_raw, uri_raw, for_rspauth=True)

        items: list[tuple[str, bytes, bool]] = []
        if utf8:
            items.append(("charset", b"utf-8", False))
        items.append(("username", username_raw, True))
        if realms:  # section 2.1.2: required when the server offered realms
            items.append(("realm", realm_raw, True))
        items += [
            ("nonce", nonce, True),
            ("nc", _NC, False),
            ("cnonce", cnonce, True),
            ("digest-uri", uri_raw, True),
            ("response", response, False),
            ("qop", _QOP_AUTH, False),
        ]
        if authzid_raw is not None:
            items.append(("authzid", authzid_raw, True))
        try:
            message = format_directives(items)
        except ValueError:
            # A nonce (from the server) or credential with control characters.
            raise self._error("cannot represent the response") from None
        self._stage.expect(Call.STEP, Call.FINISH, what=_RSPAUTH)
        return message

    def _verify_rspauth(self, data: bytes) -> None:
        try:
            grouped = _group(parse_directives(data))
        except DirectiveSyntaxError as exc:
            raise self._error(f"response-auth: {exc}") from None
        values = grouped.get("rspauth", [])
        if len(values) != 1 or not _HEX32.fullmatch(values[0]):
            raise self._error("expected exactly one rspauth of 32 hex digits")
        if not hmac.compare_digest(values[0].lower(), self._rspauth):
            raise self._error("server failed mutual authentication (wrong rspauth)")
        self._stage.expect(Call.STEP, Call.FINISH, what=_VERIFIED)
