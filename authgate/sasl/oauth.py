"""OAUTHBEARER (RFC 7628) and XOAUTH2 (Google, Microsoft): an OAuth 2.0
bearer token instead of a password.

OAUTHBEARER, RFC 7628 section 3.1:

    client-resp = (gs2-header kvsep *kvpair kvsep) / kvsep
    gs2-header  = gs2-cb-flag "," [ "a=" saslname ] ","     ; RFC 5801
    kvpair      = key "=" value kvsep        key = 1*ALPHA
    value       = *(VCHAR / SP / HTAB / CR / LF)
    kvsep       = %x01
    auth        = "Bearer" 1*SP b64token    ; RFC 6750 section 2.1

On failure the server sends one challenge, a JSON object whose `status` is
the error ("invalid_token"), the client answers it with a single %x01, and
only then does the server fail the exchange (section 3.2.3).

XOAUTH2 has no GS2 header and names the user itself:

    "user=" user %x01 "auth=Bearer " token %x01 %x01

and its failure challenge is `{"status":"401","schemes":"bearer",...}`,
answered with an empty response.

The mechanism verifies nothing: it asks for a `TokenCheck` and the driver
answers with a `TokenVerdict` from the token verifier (authgate.oauth), off
the event loop. A bearer token is a cleartext credential: policy offers
these mechanisms under require-secure-auth only inside TLS, like PLAIN.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Final

from authgate.sasl.base import (
    STORE_UNAVAILABLE,
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
    ServerContext,
    ServerOutcome,
    Stage,
    Success,
    TokenCheck,
    TokenVerdict,
    malformed,
    start_with_message,
)

__all__ = [
    "MAX_TOKEN_OCTETS",
    "OAuthBearerClient",
    "OAuthBearerServer",
    "OAuthMessage",
    "XOAuth2Client",
    "XOAuth2Server",
    "parse_oauthbearer",
    "parse_xoauth2",
]

# Identity providers' tokens run to a few KiB (Azure AD's with group claims
# to 8). Longer messages are refused before any parsing beyond the length.
MAX_TOKEN_OCTETS: Final = 16 * 1024
KVSEP: Final = b"\x01"
_KEY = re.compile(rb"[A-Za-z]+")
# RFC 7628 value: VCHAR / SP / HTAB / CR / LF
_VALUE = re.compile(rb"[\x21-\x7e \t\r\n]*")
# RFC 6750 b64token: 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_BEARER = re.compile(r"Bearer +(.+)", re.IGNORECASE)


@dataclass(frozen=True)
class OAuthMessage:
    """A parsed client message: the user it names ("" for none) and the
    token, plus the other key-value pairs (host, port, ...)."""

    user: str
    token: str
    pairs: tuple[tuple[str, str], ...] = ()


def _saslname(raw: bytes) -> str | None:
    """RFC 5801 saslname: UTF-8, "," written =2C and "=" written =3D."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == ",":
            return None
        if ch == "=":
            code = text[i + 1 : i + 3]
            if code == "2C":
                out.append(",")
            elif code == "3D":
                out.append("=")
            else:
                return None
            i += 3
            continue
        if ch == "\x00":
            return None
        out.append(ch)
        i += 1
    return "".join(out)


def _kvpairs(data: bytes) -> list[tuple[str, str]] | str:
    """`*kvpair kvsep` (the trailing kvsep included), or the problem."""
    if not data.endswith(KVSEP):
        return "message does not end with %x01"
    body = data[:-1]
    if not body:
        return []
    if not body.endswith(KVSEP):
        return "key-value pair not ended by %x01"
    pairs: list[tuple[str, str]] = []
    for item in body[:-1].split(KVSEP):
        key, eq, value = item.partition(b"=")
        if not eq or not _KEY.fullmatch(key):
            return "malformed key-value pair"
        if not _VALUE.fullmatch(value):
            return "key-value pair value has a forbidden character"
        pairs.append((key.decode("ascii"), value.decode("ascii")))
    return pairs


def _bearer(pairs: list[tuple[str, str]]) -> str | Failure:
    """The token of the one `auth` pair; a Failure if it is no bearer token."""
    auths = [v for k, v in pairs if k == "auth"]
    if len(auths) != 1:
        return malformed("message must carry exactly one auth pair")
    match = _BEARER.fullmatch(auths[0])
    if match is None:
        return malformed("auth pair is not a Bearer token")
    token = match.group(1)
    if not _B64TOKEN.fullmatch(token):
        return malformed("bearer token has a forbidden character")
    return token


def parse_oauthbearer(message: bytes) -> OAuthMessage | Failure:
    """An OAUTHBEARER initial client response. The Failure's detail never
    repeats the message (it holds the token)."""
    if len(message) > MAX_TOKEN_OCTETS:
        return malformed(f"OAUTHBEARER message is longer than {MAX_TOKEN_OCTETS} octets")
    flag, comma, rest = message.partition(b",")
    if not comma:
        return malformed("OAUTHBEARER message has no GS2 header")
    if flag.startswith(b"p="):
        # RFC 7628 section 3.1: channel binding is not defined for it.
        return malformed("OAUTHBEARER does not support channel binding")
    if flag not in (b"n", b"y"):
        return malformed("bad GS2 channel-binding flag")
    authzid_part, comma, rest = rest.partition(b",")
    if not comma:
        return malformed("GS2 header is not closed by ','")
    user = ""
    if authzid_part:
        if not authzid_part.startswith(b"a="):
            return malformed("GS2 authzid must start with a=")
        name = _saslname(authzid_part[2:])
        if not name:
            return malformed("GS2 authzid is not a valid saslname")
        user = name
    if not rest.startswith(KVSEP):
        return malformed("GS2 header must be followed by %x01")
    pairs = _kvpairs(rest[1:])
    if isinstance(pairs, str):
        return malformed(pairs)
    token = _bearer(pairs)
    if isinstance(token, Failure):
        return token
    return OAuthMessage(user, token, tuple((k, v) for k, v in pairs if k != "auth"))


def parse_xoauth2(message: bytes) -> OAuthMessage | Failure:
    """An XOAUTH2 client message: user=...^Aauth=Bearer ...^A^A."""
    if len(message) > MAX_TOKEN_OCTETS:
        return malformed(f"XOAUTH2 message is longer than {MAX_TOKEN_OCTETS} octets")
    pairs = _kvpairs(message)
    if isinstance(pairs, str):
        return malformed(pairs)
    users = [v for k, v in pairs if k == "user"]
    if len(users) != 1 or not users[0]:
        return malformed("XOAUTH2 message must name exactly one user")
    token = _bearer(pairs)
    if isinstance(token, Failure):
        return token
    return OAuthMessage(users[0], token)


def error_challenge(mechanism: str, ctx: ServerContext, verdict: TokenVerdict) -> bytes:
    """The JSON failure challenge (RFC 7628 section 3.2.2; XOAUTH2's form)."""
    body: dict[str, str]
    if mechanism == "XOAUTH2":
        body = {"status": "401", "schemes": "bearer"}
    else:
        body = {"status": verdict.status or "invalid_token"}
    if ctx.oauth_scope:
        body["scope"] = ctx.oauth_scope
    if ctx.oauth_configuration:
        body["openid-configuration"] = ctx.oauth_configuration
    return json.dumps(body, separators=(",", ":")).encode("ascii")


class _BearerServer:
    name = ""
    _ACK = b""  # the client's answer to the failure challenge

    def __init__(self, ctx: ServerContext) -> None:
        self._ctx = ctx
        self._stage = Stage(f"{self.name} server")
        self._message: OAuthMessage | None = None
        self._refusal = ""

    def _parse(self, message: bytes) -> OAuthMessage | Failure:
        raise NotImplementedError

    def start(self, initial: InitialResponse) -> ServerOutcome:
        return start_with_message(self._stage, initial, self.step, what="the client response")

    def step(self, response: bytes) -> ServerOutcome:
        self._stage.check(Call.STEP)
        if self._stage.awaits("the answer to the error"):
            self._stage.end()
            # RFC 7628 section 3.2.3: whatever the client says now, the
            # exchange fails; a wrong answer is malformed, but the token
            # was wrong all the same (the defence counts a cancel too).
            if response != self._ACK:
                return malformed("client did not acknowledge the error challenge")
            return Failure(FailureReason.INVALID_CREDENTIALS, self._refusal)
        parsed = self._parse(response)
        if isinstance(parsed, Failure):
            self._stage.end()
            return parsed
        self._message = parsed
        self._stage.expect(Call.RESUME, what="the token check")
        return Lookup(TokenCheck(parsed.token, parsed.user, self.name))

    def resume(self, answer: LookupAnswer) -> ServerOutcome:
        self._stage.check(Call.RESUME)
        assert self._message is not None
        if answer is STORE_UNAVAILABLE:
            self._stage.end()
            return Failure(FailureReason.TEMPORARY, "token verifier unavailable")
        verdict = answer if isinstance(answer, TokenVerdict) else TokenVerdict(False)
        if verdict.valid and verdict.user:
            self._stage.end()
            # The authzid, when given, must name the token's own user
            # (check_authzid refuses another one).
            return Success(verdict.user, self._message.user or None)
        self._refusal = verdict.reason or "invalid token"
        self._stage.expect(Call.STEP, what="the answer to the error")
        return Challenge(error_challenge(self.name, self._ctx, verdict))


class OAuthBearerServer(_BearerServer):
    name = "OAUTHBEARER"
    _ACK = KVSEP

    def _parse(self, message: bytes) -> OAuthMessage | Failure:
        return parse_oauthbearer(message)


class XOAuth2Server(_BearerServer):
    name = "XOAUTH2"
    _ACK = b""

    def _parse(self, message: bytes) -> OAuthMessage | Failure:
        return parse_xoauth2(message)


# ------------------------------------------------------------------ clients


def _escape_saslname(name: str) -> str:
    return name.replace("=", "=3D").replace(",", "=2C")


class _BearerClient:
    """`creds.password` is the access token, `creds.username` the user."""

    name = ""
    _ACK = b""

    def __init__(self, creds: ClientCredentials, ctx: ClientContext) -> None:
        # Our own configuration: refuse only what would break the framing
        # (a server refuses a token that is no RFC 6750 b64token itself).
        if not creds.password or any(c in creds.password for c in "\x00\x01\r\n"):
            raise ValueError(f"{self.name} needs a bearer token (no NUL, %x01, CR or LF)")
        if any(c in creds.username for c in "\x00\x01"):
            raise ValueError(f"{self.name} user name must not contain NUL or %x01")
        self._message = self._build(creds, ctx)
        self._stage = Stage(f"{self.name} client")
        self._failed = False

    def _build(self, creds: ClientCredentials, ctx: ClientContext) -> bytes:
        raise NotImplementedError

    def start(self) -> bytes | None:
        self._stage.check(Call.START)
        self._stage.expect(Call.STEP, Call.FINISH, what="a challenge or the success")
        return self._message

    def step(self, challenge: bytes) -> bytes:
        self._stage.check(Call.STEP)
        if not challenge:
            return self._message  # no initial-response slot: the message now
        if self._failed:
            raise ClientAuthError(f"{self.name} server sent a second challenge")
        self._failed = True  # the error challenge: acknowledge it, the server fails
        return self._ACK

    def finish(self, additional: bytes | None) -> None:
        self._stage.check(Call.FINISH)
        self._stage.end()
        if self._failed or additional:
            raise ClientAuthError(f"{self.name} server reported success after an error")


class OAuthBearerClient(_BearerClient):
    name = "OAUTHBEARER"
    _ACK = KVSEP

    def _build(self, creds: ClientCredentials, ctx: ClientContext) -> bytes:
        who = creds.authzid or creds.username
        header = f"n,a={_escape_saslname(who)}," if who else "n,,"
        pairs = f"\x01host={ctx.hostname}\x01auth=Bearer {creds.password}\x01\x01"
        return (header + pairs).encode("utf-8")


class XOAuth2Client(_BearerClient):
    name = "XOAUTH2"
    _ACK = b""

    def _build(self, creds: ClientCredentials, ctx: ClientContext) -> bytes:
        return f"user={creds.username}\x01auth=Bearer {creds.password}\x01\x01".encode()
