"""The token verifier: is this bearer token valid, and whose is it?

Two ways, as `[oauth]` says (authgate.oauth.settings):

- **JWT, locally** (RFC 7519, RFC 8725's rules): the signature is checked
  against the identity provider's JWK set (a file, or an https URL fetched
  and kept `jwks_refresh` seconds, fetched again at once, at most every 30
  seconds, when a token names a key id the set lacks: the provider rotated
  its keys). Only the configured asymmetric algorithms are accepted, named
  by us and not by the token, so `alg: none` and an HS256 token signed with
  the public key as its secret are refused. Then `iss` and `aud` must be
  ours, `exp` is required, `nbf` and `iat` are honoured, all with
  `leeway` seconds of clock skew; the `user_claim` names the mail user.
- **Introspection** (RFC 7662): the token is POSTed to the provider with
  our client credentials (HTTP Basic, RFC 6749 section 2.3.1); `active`
  must be true, and `exp`, `iss`, `aud` are checked when present or
  configured. Verdicts are kept `cache_seconds` at most (never past the
  token's expiry), keyed by a hash of the token.

Everything here blocks (HTTP, signatures): `averify` runs it in a thread.
A verdict's `reason` is safe to log; no token ever reaches a log.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from joserfc import jwt
from joserfc.errors import (
    BadSignatureError,
    ExpiredTokenError,
    InvalidClaimError,
    JoseError,
    MissingClaimError,
    SecurityWarning,
)
from joserfc.jwk import KeySet
from joserfc.jwt import JWTClaimsRegistry

from authgate.oauth.settings import OAuthSettings
from authgate.sasl.base import STORE_UNAVAILABLE, LookupAnswer, TokenCheck, TokenVerdict

__all__ = ["TokenVerifier", "VerifierUnavailable"]

log = logging.getLogger("authgate.oauth")

# RFC 9864 prefers the name "Ed25519" to "EdDSA"; identity providers still
# sign with "EdDSA", which an admin enables on purpose in `algorithms`.
warnings.filterwarnings("ignore", "EdDSA is deprecated", SecurityWarning)

MAX_DOCUMENT: Final = 1024 * 1024  # a JWK set or introspection answer
MIN_FORCED_REFRESH: Final = 30.0  # seconds between fetches for an unknown kid
MAX_CACHED: Final = 10_000  # introspection verdicts kept


class VerifierUnavailable(Exception):
    """The identity provider could not be asked (or its keys not read): a
    temporary failure for the client, never "invalid token"."""


def _refused(reason: str, status: str = "invalid_token") -> TokenVerdict:
    return TokenVerdict(False, None, reason, status)


def _http_context(settings: OAuthSettings) -> ssl.SSLContext:
    cafile = str(settings.ca_file) if settings.ca_file is not None else None
    return ssl.create_default_context(cafile=cafile)


def _read_limited(response: Any) -> bytes:
    data: bytes = response.read(MAX_DOCUMENT + 1)
    if len(data) > MAX_DOCUMENT:
        raise VerifierUnavailable("answer longer than 1 MiB")
    return data


class JwkSetSource:
    """The provider's keys, from a file or a URL, cached. Thread-safe."""

    def __init__(
        self,
        location: str,
        *,
        refresh: float,
        timeout: float,
        context: ssl.SSLContext,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._location = location
        self._refresh = refresh
        self._timeout = timeout
        self._context = context
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: KeySet | None = None
        self._fetched = float("-inf")

    def keys(self, *, unknown_kid: bool = False) -> KeySet:
        """The key set; fetched again when older than `refresh`, or when a
        token named a key id the set lacks (at most every 30 s)."""
        with self._lock:
            age = self._clock() - self._fetched
            stale = age >= self._refresh or (unknown_kid and age >= MIN_FORCED_REFRESH)
            if self._keys is None or stale:
                try:
                    self._keys = self._load()
                    self._fetched = self._clock()
                except VerifierUnavailable as exc:
                    if self._keys is None:
                        raise
                    # Keep serving the keys we have; try again in a while.
                    log.warning("JWK set %s not refreshed: %s", self._location, exc)
                    self._fetched = self._clock() - self._refresh + MIN_FORCED_REFRESH
            return self._keys

    def _load(self) -> KeySet:
        try:
            if "://" in self._location:
                # https, or http to loopback only (authgate.oauth.settings)
                request = urllib.request.Request(  # noqa: S310
                    self._location, headers={"Accept": "application/json"}
                )
                with urllib.request.urlopen(  # noqa: S310
                    request, timeout=self._timeout, context=self._context
                ) as response:
                    data = _read_limited(response)
            else:
                data = Path(self._location).read_bytes()[: MAX_DOCUMENT + 1]
            document = json.loads(data)
            if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
                raise VerifierUnavailable("not a JWK set (no keys array)")
            # Keys we cannot use (another kty, an encryption key) are skipped,
            # as RFC 7517 section 5 asks, rather than failing the whole set.
            usable = [k for k in document["keys"] if isinstance(k, dict) and _usable(k)]
            return KeySet.import_key_set({"keys": usable})
        except VerifierUnavailable:
            raise
        except (OSError, ValueError, JoseError) as exc:
            problem = exc.__class__.__name__
            raise VerifierUnavailable(f"cannot read the JWK set: {problem}") from None


def _usable(key: dict[str, Any]) -> bool:
    return key.get("kty") in ("RSA", "EC", "OKP") and key.get("use", "sig") == "sig"


def _b64url_json(part: str) -> Any:
    padded = part + "=" * (-len(part) % 4)
    return json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))


@dataclass
class _Cached:
    verdict: TokenVerdict
    until: float


class TokenVerifier:
    """Answers `TokenCheck`s (see the module's text)."""

    def __init__(
        self,
        settings: OAuthSettings,
        *,
        client_secret: str | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._monotonic = monotonic
        self._context = _http_context(settings)
        self._secret = client_secret if client_secret is not None else settings.client_secret
        self._jwks = (
            JwkSetSource(
                settings.jwks,
                refresh=settings.jwks_refresh,
                timeout=settings.timeout,
                context=self._context,
                clock=monotonic,
            )
            if settings.jwks is not None
            else None
        )
        self._cache: dict[bytes, _Cached] = {}
        self._cache_lock = threading.Lock()

    @classmethod
    def from_settings(
        cls, settings: OAuthSettings, read_secret: Callable[[Path], str] | None = None
    ) -> TokenVerifier:
        """With the client secret read from `client_secret_file` (through
        `read_secret`, which may open a file encrypted at rest)."""
        secret = None
        if settings.client_secret_file is not None:
            reader = read_secret or (lambda p: p.read_text("utf-8"))
            secret = reader(settings.client_secret_file).rstrip("\r\n")
        return cls(settings, client_secret=secret)

    async def averify(self, request: TokenCheck) -> LookupAnswer:
        """`verify` in a thread; STORE_UNAVAILABLE when the provider cannot
        be asked (a temporary failure)."""
        try:
            return await asyncio.to_thread(self.verify, request.token)
        except VerifierUnavailable as exc:
            log.warning("token verification unavailable: %s", exc)
            return STORE_UNAVAILABLE

    def verify(self, token: str) -> TokenVerdict:
        """Blocking. Raises VerifierUnavailable when it cannot decide."""
        if self.settings.introspection:
            return self._introspect(token)
        return self._verify_jwt(token)

    # ------------------------------------------------------------ JWT

    def _verify_jwt(self, token: str) -> TokenVerdict:
        assert self._jwks is not None
        parts = token.split(".")
        if len(parts) != 3:
            return _refused("not a signed JWT")
        try:
            header = _b64url_json(parts[0])
        except (ValueError, binascii.Error, UnicodeDecodeError):
            return _refused("JWT header is not base64url JSON")
        if not isinstance(header, dict):
            return _refused("JWT header is not a JSON object")
        alg = header.get("alg")
        if alg not in self.settings.algorithms:
            # "none" included: the algorithms are ours to name (RFC 8725 3.1).
            return _refused(f"JWT algorithm {str(alg)[:16]!r} not accepted")
        keys = self._jwks.keys()
        kid = header.get("kid")
        if isinstance(kid, str) and all(k.kid != kid for k in keys.keys):
            keys = self._jwks.keys(unknown_kid=True)
        key: Any = keys
        if kid is None:
            # No key id: only a set of one key says which key is meant.
            if len(keys.keys) != 1:
                return _refused("JWT names no key (kid) and the key set has several")
            key = keys.keys[0]
        try:
            decoded = jwt.decode(token, key, algorithms=list(self.settings.algorithms))
        except BadSignatureError:
            return _refused("bad JWT signature")
        except (JoseError, ValueError) as exc:
            return _refused(f"JWT not verified: {exc.__class__.__name__}")
        claims = decoded.claims
        registry = JWTClaimsRegistry(
            now=int(self._clock()),
            leeway=self.settings.leeway,
            iss={"essential": True, "value": self.settings.issuer or ""},
            aud={"essential": True, "values": list(self.settings.audience)},
            exp={"essential": True},
        )
        try:
            registry.validate(claims)
        except ExpiredTokenError:
            return _refused("token expired")
        except MissingClaimError as exc:
            return _refused(f"JWT lacks a required claim: {exc.__class__.__name__}")
        except InvalidClaimError as exc:
            claim = getattr(exc, "claim", "")
            if claim == "nbf":
                return _refused("token not yet valid")
            if claim == "iat":
                return _refused("token issued in the future")
            return _refused(f"wrong {claim or 'claim'}")
        except JoseError as exc:
            return _refused(f"JWT claims refused: {exc.__class__.__name__}")
        return self._user_of(claims)

    def _user_of(self, claims: dict[str, Any]) -> TokenVerdict:
        claim = self.settings.user_claim
        user = claims.get(claim)
        if not isinstance(user, str) or not user or not user.isprintable():
            return _refused(f"token has no {claim} claim")
        if claim == "email" and claims.get("email_verified") is False:
            return _refused("token's email is not verified")
        return TokenVerdict(True, user)

    # ------------------------------------------------------ introspection

    def _introspect(self, token: str) -> TokenVerdict:
        key = hashlib.sha256(token.encode("utf-8")).digest()
        now = self._monotonic()
        with self._cache_lock:
            cached = self._cache.get(key)
            if cached is not None and cached.until > now:
                return cached.verdict
        answer = self._ask(token)
        verdict, lifetime = self._judge(answer)
        until = now + min(self.settings.cache_seconds, lifetime)
        with self._cache_lock:
            if len(self._cache) >= MAX_CACHED:
                self._cache = {k: v for k, v in self._cache.items() if v.until > now}
                if len(self._cache) >= MAX_CACHED:
                    self._cache.clear()
            if until > now:
                self._cache[key] = _Cached(verdict, until)
        return verdict

    def _ask(self, token: str) -> dict[str, Any]:
        url = self.settings.introspection_url
        assert url is not None and self.settings.client_id is not None
        body = urllib.parse.urlencode({"token": token, "token_type_hint": "access_token"})
        # RFC 6749 section 2.3.1: id and secret are form-encoded, then Basic.
        pair = f"{urllib.parse.quote(self.settings.client_id, safe='')}:" + urllib.parse.quote(
            self._secret or "", safe=""
        )
        # https, or http to loopback only (authgate.oauth.settings)
        request = urllib.request.Request(  # noqa: S310
            url,
            data=body.encode("ascii"),
            headers={
                "Authorization": "Basic " + base64.b64encode(pair.encode()).decode("ascii"),
                "Content-Type": "application/x-www-form-urlencoded",
                "Accept": "application/json",
            },
            method="POST",
        )
        try:
            with urllib.request.urlopen(  # noqa: S310
                request, timeout=self.settings.timeout, context=self._context
            ) as response:
                data = _read_limited(response)
            answer = json.loads(data)
        except urllib.error.HTTPError as exc:
            raise VerifierUnavailable(f"introspection answered HTTP {exc.code}") from None
        except (OSError, ValueError) as exc:
            raise VerifierUnavailable(f"introspection failed: {exc.__class__.__name__}") from None
        if not isinstance(answer, dict):
            raise VerifierUnavailable("introspection answer is not a JSON object")
        return answer

    def _judge(self, answer: dict[str, Any]) -> tuple[TokenVerdict, float]:
        """(verdict, seconds it may be kept)."""
        settings = self.settings
        keep = float(settings.cache_seconds)
        if answer.get("active") is not True:
            return _refused("token not active"), keep
        now = self._clock()
        exp = answer.get("exp")
        if isinstance(exp, int | float) and not isinstance(exp, bool):
            if exp + settings.leeway < now:
                return _refused("token expired"), keep
            keep = min(keep, exp + settings.leeway - now)
        nbf = answer.get("nbf")
        if isinstance(nbf, bool) or not isinstance(nbf, int | float):
            nbf = 0
        if nbf > now + settings.leeway:
            return _refused("token not yet valid"), 0.0
        if settings.issuer is not None and answer.get("iss") != settings.issuer:
            return _refused("wrong iss"), keep
        if settings.audience:
            aud = answer.get("aud")
            auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
            if not set(settings.audience) & {a for a in auds if isinstance(a, str)}:
                return _refused("wrong aud"), keep
        return self._user_of(answer), keep
