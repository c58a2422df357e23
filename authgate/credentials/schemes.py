"""Stored secrets in Dovecot's ``{SCHEME}value`` notation.

Operators can paste hashes from a Dovecot passwd-file or from ``doveadm pw``
unchanged, so the encodings follow Dovecot's (src/auth/password-scheme*.c):

* fixed-length digests (``{SHA}``, ``{SHA256}``, ``{CRAM-MD5}``, ``{NTLM}``,
  ...) are accepted in hex or base64: like Dovecot we guess hex when the text
  is exactly twice the raw length, base64 otherwise;
* salted digests (``{SSHA}``, ``{SSHA256}``, ``{SSHA512}``, ``{SMD5}``) are
  base64(digest || salt), the salt being whatever follows the digest;
* a ``.HEX`` or ``.B64`` suffix on the scheme name forces the encoding
  (``{SSHA256.HEX}``, ``{PLAIN.B64}``);
* crypt-style hashes (``$6$``, ``$2y$``, ``$argon2id$``) are kept as text and
  checked by passlib, bcrypt and argon2-cffi.

A `StoredSecret` can always tell which challenge-response forms it can hand
to a SASL mechanism (`forms`), and whether it can check a plaintext password
(`verify_password`). Verification of bcrypt, argon2, crypt and SCRAM secrets
is slow on purpose: call it off the event loop (`UserStore.aresolve` does
so unless `quick_to_verify`).

Nothing here puts a secret in an exception message or a repr.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import re
import secrets
import string
from dataclasses import dataclass, field, replace
from typing import Final

import argon2
import argon2.exceptions
import bcrypt as _bcrypt
from passlib.hash import md5_crypt, sha256_crypt, sha512_crypt

from authgate.sasl.base import LookupAnswer, ScramVerifier, SecretForm

__all__ = [
    "ALL_FORMS",
    "SCHEMES",
    "WRITABLE_SCHEMES",
    "SchemeError",
    "StoredSecret",
    "hash_password",
    "parse_secret",
]


class SchemeError(ValueError):
    """A stored secret could not be parsed, or a scheme cannot be written.

    The message names the scheme but never contains the secret's value."""

    def __init__(self, scheme: str, problem: str) -> None:
        self.scheme = scheme
        self.problem = problem
        super().__init__(f"{{{scheme}}}: {problem}" if scheme else problem)


# ------------------------------------------------------------------ schemes


class _Kind(enum.Enum):
    PLAINTEXT = "plaintext"
    DIGEST = "digest"  # unsalted hash of the password
    SALTED = "salted"  # hash(password || salt) || salt
    CRYPT = "crypt"  # passlib modular-crypt handler ($1$, $5$, $6$)
    BCRYPT = "bcrypt"
    ARGON2 = "argon2"
    PBKDF2 = "pbkdf2"  # Dovecot's own $1$salt$rounds$hex (PBKDF2-HMAC-SHA1)
    CRAM_MD5 = "cram-md5"
    DIGEST_MD5 = "digest-md5"
    NTLM = "ntlm"
    SCRAM = "scram"
    ANY_CRYPT = "any-crypt"  # {CRYPT}: dispatch on the $id$ prefix


# Relative cost of checking a password with each kind (0 cheapest), in the
# order measured here (timeit, one wrong password, Python 3.11): plaintext
# and hashlib digests 2-8 us, NTLM ~70 us (pure-Python MD4: OpenSSL 3 has
# none), CRAM-MD5 ~150 us (a pure-Python MD5 block for the pad states),
# SCRAM/PBKDF2 ~1.7 ms at 4096 rounds, crypt/bcrypt/argon2 tens to hundreds
# of ms.
_VERIFY_COST = {
    _Kind.PLAINTEXT: 0,
    _Kind.DIGEST: 1,
    _Kind.SALTED: 1,
    _Kind.DIGEST_MD5: 1,
    _Kind.NTLM: 2,
    _Kind.CRAM_MD5: 3,
    _Kind.SCRAM: 4,  # PBKDF2, typically 4096 rounds
    _Kind.PBKDF2: 5,
    _Kind.CRYPT: 6,
    _Kind.ANY_CRYPT: 6,
    _Kind.BCRYPT: 7,
    _Kind.ARGON2: 7,
}
# Up to this cost a check takes microseconds and holds the GIL throughout
# (small hashlib inputs and pure Python do not release it), so running it in
# a thread would block the event loop just the same, plus the hop.
_INLINE_COST = 3


class _Encoding(enum.Enum):
    NONE = "none"
    BASE64 = "base64"
    HEX = "hex"


@dataclass(frozen=True)
class _Scheme:
    name: str
    kind: _Kind
    encoding: _Encoding = _Encoding.NONE
    # Non-zero: the raw length, which lets us tell hex from base64 (Dovecot's
    # `raw_password_len`).
    raw_len: int = 0
    hash_name: str = ""  # hashlib name for DIGEST / SALTED
    form: SecretForm | None = None
    prefix: str = ""  # crypt-style "$id$"
    # One-way hashes whose brute-forcing is cheap; we read but never write them.
    weak: bool = False


def _digest(name: str, hash_name: str, *, weak: bool = False, b64: bool = True) -> _Scheme:
    size = hashlib.new(hash_name).digest_size
    enc = _Encoding.BASE64 if b64 else _Encoding.HEX
    return _Scheme(name, _Kind.DIGEST, enc, size, hash_name, weak=weak)


def _salted(name: str, hash_name: str, *, weak: bool = False) -> _Scheme:
    return _Scheme(name, _Kind.SALTED, _Encoding.BASE64, 0, hash_name, weak=weak)


SCHEMES: Final[dict[str, _Scheme]] = {
    s.name: s
    for s in (
        _Scheme("PLAIN", _Kind.PLAINTEXT),
        _digest("SHA", "sha1", weak=True),
        _digest("SHA256", "sha256", weak=True),
        _digest("SHA512", "sha512", weak=True),
        _digest("LDAP-MD5", "md5", weak=True),
        _digest("PLAIN-MD5", "md5", weak=True, b64=False),
        _salted("SSHA", "sha1", weak=True),
        _salted("SSHA256", "sha256"),
        _salted("SSHA512", "sha512"),
        _salted("SMD5", "md5", weak=True),
        _Scheme("MD5-CRYPT", _Kind.CRYPT, prefix="$1$", weak=True),
        _Scheme("SHA256-CRYPT", _Kind.CRYPT, prefix="$5$"),
        _Scheme("SHA512-CRYPT", _Kind.CRYPT, prefix="$6$"),
        _Scheme("BLF-CRYPT", _Kind.BCRYPT, prefix="$2"),
        _Scheme("ARGON2I", _Kind.ARGON2, prefix="$argon2i$"),
        _Scheme("ARGON2ID", _Kind.ARGON2, prefix="$argon2id$"),
        _Scheme("PBKDF2", _Kind.PBKDF2, prefix="$1$"),
        _Scheme("CRYPT", _Kind.ANY_CRYPT),
        _Scheme("CRAM-MD5", _Kind.CRAM_MD5, _Encoding.HEX, 32, form=SecretForm.CRAM_MD5),
        _Scheme("DIGEST-MD5", _Kind.DIGEST_MD5, _Encoding.HEX, 16, form=SecretForm.DIGEST_MD5),
        _Scheme("NTLM", _Kind.NTLM, _Encoding.HEX, 16, form=SecretForm.NT_HASH),
        _Scheme("SCRAM-SHA-1", _Kind.SCRAM, hash_name="sha1", form=SecretForm.SCRAM_SHA_1),
        _Scheme("SCRAM-SHA-256", _Kind.SCRAM, hash_name="sha256", form=SecretForm.SCRAM_SHA_256),
    )
}

# Dovecot's other names for the same schemes ({MD5} is MD5-CRYPT there, not a digest).
_ALIASES: Final[dict[str, str]] = {
    "CLEARTEXT": "PLAIN",
    "SHA1": "SHA",
    "MD5": "MD5-CRYPT",
    "BLF": "BLF-CRYPT",
    "NTLM-HASH": "NTLM",
}

_ENCODING_SUFFIXES: Final[dict[str, _Encoding]] = {
    "B64": _Encoding.BASE64,
    "BASE64": _Encoding.BASE64,
    "HEX": _Encoding.HEX,
}

# Schemes `hash_password` writes. Unsalted digests and MD5-CRYPT are read
# (for migration) but never written.
WRITABLE_SCHEMES: Final[frozenset[str]] = frozenset(
    {
        "PLAIN",
        "SSHA256",
        "SSHA512",
        "SHA256-CRYPT",
        "SHA512-CRYPT",
        "BLF-CRYPT",
        "ARGON2I",
        "ARGON2ID",
        "PBKDF2",
        "CRAM-MD5",
        "DIGEST-MD5",
        "NTLM",
        "SCRAM-SHA-1",
        "SCRAM-SHA-256",
    }
)

ALL_FORMS: Final[frozenset[SecretForm]] = frozenset(SecretForm)

_SCRAM_FORMS: Final[dict[SecretForm, str]] = {
    SecretForm.SCRAM_SHA_1: "SCRAM-SHA-1",
    SecretForm.SCRAM_SHA_256: "SCRAM-SHA-256",
}

_SCHEME_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,39}")
_HEX = re.compile(r"(?:[0-9A-Fa-f]{2})*")
# crypt_blowfish: $2a$/$2b$/$2y$, two-digit cost, 22 salt + 31 hash characters.
_BCRYPT = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
_PBKDF2 = re.compile(r"\$1\$([^$]*)\$([0-9]{1,10})\$([0-9A-Fa-f]{40})")
_PASSLIB_CRYPT = {"$1$": md5_crypt, "$5$": sha256_crypt, "$6$": sha512_crypt}
# bcrypt only ever looks at the first 72 bytes of a password (crypt_blowfish
# truncates silently; the bcrypt package refuses longer input).
_BCRYPT_MAX = 72
# Refuse absurd argon2 memory costs (KiB) at parse time rather than failing
# with MemoryError in the middle of a login: 4 GiB.
_ARGON2_MAX_MEMORY = 4 * 1024 * 1024
# SHA-crypt rounds we write: passlib's defaults (535000/656000) cost most of
# a second per login on small hosts; glibc's and Dovecot's 5000 are too few.
# 100000 takes about as long as our argon2id default.
_CRYPT_ROUNDS = 100_000
_PBKDF2_SALT_CHARS = string.ascii_letters + string.digits + "./"


# ------------------------------------------------------------------ helpers


def _pw(password: str) -> bytes:
    # surrogatepass: a lone surrogate must give "wrong password", not a crash.
    return password.encode("utf-8", "surrogatepass")


def _equal(a: bytes, b: bytes) -> bool:
    return len(a) == len(b) and hmac.compare_digest(a, b)


def _decode(scheme: _Scheme, name: str, body: str, forced: _Encoding | None) -> bytes:
    if forced is not None:
        encoding = forced
    elif scheme.raw_len:
        encoding = _Encoding.HEX if len(body) == 2 * scheme.raw_len else _Encoding.BASE64
    else:
        encoding = scheme.encoding
    if encoding is _Encoding.HEX:
        if not body.isascii() or not _HEX.fullmatch(body):
            raise SchemeError(name, "value is not valid hex")
        return bytes.fromhex(body)
    if encoding is _Encoding.BASE64:
        try:
            return base64.b64decode(body.encode("ascii"), validate=True)
        except (ValueError, binascii.Error):
            raise SchemeError(name, "value is not valid base64") from None
    return _pw(body)


# Derivations from plaintext live in the SASL modules; imported lazily so
# that parsing never depends on them.
def _cram_md5(password: str) -> bytes:
    from authgate.sasl.cram_md5 import cram_md5_secret

    return cram_md5_secret(password)


def _digest_ha1(username: str, realm: str, password: str) -> bytes:
    from authgate.sasl.digest_md5 import digest_ha1

    return digest_ha1(username, realm, password)


def _nt_hash(password: str) -> bytes:
    from authgate.sasl.ntlm import nt_hash

    return nt_hash(password)


def _scram_verifier(
    password: str, hash_name: str, iterations: int = 4096, salt: bytes | None = None
) -> ScramVerifier:
    from authgate.sasl.scram import make_verifier

    return make_verifier(password, hash_name, iterations=iterations, salt=salt)


def _scram_parse(body: str, hash_name: str) -> ScramVerifier:
    from authgate.sasl.scram import parse_dovecot

    return parse_dovecot(body, hash_name)


def _scram_format(verifier: ScramVerifier) -> str:
    from authgate.sasl.scram import format_dovecot

    return format_dovecot(verifier)


# ------------------------------------------------------------------ secret


_Payload = str | bytes | ScramVerifier | tuple[str, int, bytes]


@dataclass(frozen=True, kw_only=True)
class StoredSecret:
    """One parsed ``{SCHEME}value`` secret. The repr shows the scheme only.

    `username` and `realm` matter for ``{DIGEST-MD5}`` alone: its HA1 is
    MD5(user:realm:password), so it can check a password, or answer a
    DIGEST-MD5 lookup, only for the user and realm it was made for."""

    scheme: str  # canonical name, e.g. "SSHA256" ({CLEARTEXT} reads as "PLAIN")
    encoded: str = field(repr=False)  # the full text as written, for saving
    payload: _Payload = field(repr=False, compare=False)
    username: str | None = None
    realm: str | None = None
    impl: _Scheme = field(repr=False, compare=False)

    # -- what it can do

    def forms(self) -> frozenset[SecretForm]:
        """The challenge-response forms this secret provides (a
        ``{DIGEST-MD5}`` HA1 only for its own realm; see `secret_for`)."""
        if self.impl.kind is _Kind.PLAINTEXT:
            return ALL_FORMS
        if self.impl.form is not None:
            return frozenset({self.impl.form})
        return frozenset()

    @property
    def verify_cost(self) -> int:
        """Relative cost of `verify_password` (0 cheapest). Every form a user
        holds checks the same password, so the store asks the cheapest one:
        an online guess learns the same yes/no either way, and a deliberately
        slow hash protects nothing while a faster form sits beside it."""
        return _VERIFY_COST[self.impl.kind]

    @property
    def quick_to_verify(self) -> bool:
        """`verify_password` takes microseconds: fine on the event loop."""
        return self.verify_cost <= _INLINE_COST

    @property
    def can_verify_password(self) -> bool:
        if self.impl.kind is _Kind.DIGEST_MD5:
            return self.username is not None and self.realm is not None
        return True

    @property
    def password_equivalent(self) -> bool:
        """Whoever reads this secret can log in with it (for its mechanism)
        without cracking anything: plaintext, CRAM-MD5 pads, HA1, NT hash.
        SCRAM's StoredKey is not: the client proof needs ClientKey."""
        return self.impl.kind in (_Kind.PLAINTEXT, _Kind.CRAM_MD5, _Kind.DIGEST_MD5, _Kind.NTLM)

    @property
    def weak(self) -> bool:
        """A fast unsalted or MD5-based hash: fine to read, cheap to crack."""
        return self.impl.weak

    def bind(self, username: str | None, realm: str | None) -> StoredSecret:
        """The same secret tied to a user and DIGEST-MD5 realm."""
        return replace(self, username=username, realm=realm)

    # -- checking a password

    def verify_password(self, password: str) -> bool:
        """True iff `password` is the password this secret was made from.

        Slow for bcrypt, argon2, crypt, PBKDF2 and SCRAM: never call this on
        the event loop. Fast digests are compared in constant time."""
        kind, payload = self.impl.kind, self.payload
        try:
            if kind is _Kind.PLAINTEXT:
                assert isinstance(payload, str)
                # Compare digests, not the strings: equal lengths always, so
                # neither the stored password's length nor a prefix leaks.
                return hmac.compare_digest(
                    hashlib.sha256(_pw(password)).digest(), hashlib.sha256(_pw(payload)).digest()
                )
            if kind is _Kind.DIGEST:
                assert isinstance(payload, bytes)
                return _equal(hashlib.new(self.impl.hash_name, _pw(password)).digest(), payload)
            if kind is _Kind.SALTED:
                assert isinstance(payload, bytes)
                size = hashlib.new(self.impl.hash_name).digest_size
                digest, salt = payload[:size], payload[size:]
                computed = hashlib.new(self.impl.hash_name, _pw(password) + salt).digest()
                return _equal(computed, digest)
            if kind is _Kind.CRYPT:
                assert isinstance(payload, str)
                handler = _PASSLIB_CRYPT[self.impl.prefix]
                return bool(handler.verify(_pw(password), payload))
            if kind is _Kind.BCRYPT:
                assert isinstance(payload, str)
                return _bcrypt.checkpw(_pw(password)[:_BCRYPT_MAX], payload.encode("ascii"))
            if kind is _Kind.ARGON2:
                assert isinstance(payload, str)
                return _verify_argon2(payload, _pw(password))
            if kind is _Kind.PBKDF2:
                assert isinstance(payload, tuple)
                salt_text, rounds, key = payload
                computed = hashlib.pbkdf2_hmac(
                    "sha1", _pw(password), _pw(salt_text), rounds, len(key)
                )
                return _equal(computed, key)
            if kind is _Kind.CRAM_MD5:
                assert isinstance(payload, bytes)
                return _equal(_cram_md5(password), payload)
            if kind is _Kind.DIGEST_MD5:
                assert isinstance(payload, bytes)
                if self.username is None or self.realm is None:
                    return False
                return _equal(_digest_ha1(self.username, self.realm, password), payload)
            if kind is _Kind.NTLM:
                assert isinstance(payload, bytes)
                return _equal(_nt_hash(password), payload)
            if kind is _Kind.SCRAM:
                assert isinstance(payload, ScramVerifier)
                v = _scram_verifier(password, self.impl.hash_name, payload.iterations, payload.salt)
                # Both keys, without short-circuiting on the first.
                return _equal(v.stored_key, payload.stored_key) & _equal(
                    v.server_key, payload.server_key
                )
        except ValueError:
            # A password the scheme cannot take (NUL in crypt, SASLprep
            # prohibited characters, undecodable text): it is not a match.
            return False
        raise AssertionError(f"unhandled scheme kind {kind}")  # pragma: no cover

    # -- answering a lookup

    def secret_for(self, form: SecretForm, *, username: str, realm: str = "") -> LookupAnswer:
        """This secret in `form` for `username` (and DIGEST-MD5 `realm`), or
        None when it cannot provide it. Plaintext derives every form (SCRAM
        derivation runs PBKDF2: the store caches it)."""
        kind, payload = self.impl.kind, self.payload
        if kind is _Kind.PLAINTEXT:
            assert isinstance(payload, str)
            try:
                return _derive(payload, form, username=username, realm=realm)
            except ValueError:
                return None  # e.g. a password SASLprep prohibits
        if form is not self.impl.form:
            return None
        if kind is _Kind.DIGEST_MD5 and (realm != self.realm or username != self.username):
            return None
        return payload if isinstance(payload, bytes | ScramVerifier) else None

    # -- a look-alike for unknown users

    def imitation(self) -> StoredSecret:
        """A secret of the same scheme and cost made from a random password:
        verifying against it takes as long as verifying against this one.
        Used so that an unknown user costs what a known one does."""
        kind, payload = self.impl.kind, self.payload
        noise = secrets.token_urlsafe(18)
        new: _Payload
        if kind is _Kind.PLAINTEXT:
            new = noise
        elif isinstance(payload, bytes):
            new = secrets.token_bytes(len(payload))
        elif isinstance(payload, ScramVerifier):
            new = ScramVerifier(
                salt=secrets.token_bytes(len(payload.salt)),
                iterations=payload.iterations,
                stored_key=secrets.token_bytes(len(payload.stored_key)),
                server_key=secrets.token_bytes(len(payload.server_key)),
            )
        elif isinstance(payload, tuple):
            salt_text, rounds, key = payload
            new = (_random_salt(len(salt_text)), rounds, secrets.token_bytes(len(key)))
        elif kind is _Kind.CRYPT:
            handler = _PASSLIB_CRYPT[self.impl.prefix]
            parsed = handler.from_string(payload)
            cost = getattr(parsed, "rounds", None)
            tuned = handler.using(rounds=cost) if cost is not None else handler
            new = str(tuned.hash(noise))
        elif kind is _Kind.BCRYPT:
            cost = int(payload[4:6])
            new = _bcrypt.hashpw(noise.encode(), _bcrypt.gensalt(cost, prefix=b"2b")).decode()
        else:  # ARGON2
            hasher = argon2.PasswordHasher.from_parameters(argon2.extract_parameters(payload))
            new = hasher.hash(noise)
        # The encoded text of an imitation is never saved: leave it empty.
        return replace(self, encoded="", payload=new)


def _verify_argon2(encoded: str, password: bytes) -> bool:
    try:
        return argon2.PasswordHasher().verify(encoded, password)
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False


def _random_salt(length: int) -> str:
    return "".join(secrets.choice(_PBKDF2_SALT_CHARS) for _ in range(max(length, 1)))


def _derive(password: str, form: SecretForm, *, username: str, realm: str) -> LookupAnswer:
    if form is SecretForm.PLAINTEXT:
        return password
    if form is SecretForm.CRAM_MD5:
        return _cram_md5(password)
    if form is SecretForm.DIGEST_MD5:
        return _digest_ha1(username, realm, password)
    if form is SecretForm.NT_HASH:
        return _nt_hash(password)
    return _scram_verifier(password, SCHEMES[_SCRAM_FORMS[form]].hash_name)


# ------------------------------------------------------------------ parsing


def _split_prefix(text: str) -> tuple[_Scheme, str, str, _Encoding | None]:
    """(scheme, name as written, body, forced encoding) of ``{NAME}body``."""
    if not text.startswith("{"):
        raise SchemeError("", "missing {SCHEME} prefix")
    end = text.find("}")
    if end < 0:
        raise SchemeError("", "missing {SCHEME} prefix")
    written, body = text[1:end], text[end + 1 :]
    if not written.isascii() or not _SCHEME_NAME.fullmatch(written):
        # Not shaped like a scheme name: it may be a mistyped password, so
        # do not echo it.
        raise SchemeError("", "unknown scheme")
    upper = written.upper()
    base, _, suffix = upper.partition(".")
    forced: _Encoding | None = None
    if suffix:
        if suffix not in _ENCODING_SUFFIXES:
            raise SchemeError(upper, "unknown encoding suffix")
        forced = _ENCODING_SUFFIXES[suffix]
    base = _ALIASES.get(base, base)
    scheme = SCHEMES.get(base)
    if scheme is None:
        raise SchemeError("", f"unknown scheme {{{upper}}}")
    if forced is not None and scheme.kind not in _BINARY_KINDS | {_Kind.PLAINTEXT}:
        raise SchemeError(upper, "this scheme takes no encoding suffix")
    return scheme, upper, body, forced


_BINARY_KINDS: Final = frozenset(
    {_Kind.DIGEST, _Kind.SALTED, _Kind.CRAM_MD5, _Kind.DIGEST_MD5, _Kind.NTLM}
)


def parse_secret(
    text: str, *, username: str | None = None, realm: str | None = None
) -> StoredSecret:
    """Parse ``{SCHEME}value``. Raises SchemeError (never another exception)
    for an unknown scheme or a malformed value.

    `username` and `realm` bind a ``{DIGEST-MD5}`` HA1 (see StoredSecret)."""
    scheme, name, body, forced = _split_prefix(text)
    label = scheme.name  # {CRYPT} keeps its own name; verification uses the real one
    if scheme.kind is _Kind.ANY_CRYPT:
        scheme = _crypt_by_prefix(body)
    payload = _parse_body(scheme, name, body, forced)
    return StoredSecret(
        scheme=label,
        encoded=text,
        payload=payload,
        username=username,
        realm=realm,
        impl=scheme,
    )


def _crypt_by_prefix(body: str) -> _Scheme:
    # Dovecot's {CRYPT} hands the value to libc crypt(3); we support the
    # modular formats libc and crypt_blowfish share, not 13-character DES.
    for scheme in SCHEMES.values():
        if scheme.kind in (_Kind.CRYPT, _Kind.BCRYPT) and body.startswith(scheme.prefix):
            return scheme
    raise SchemeError("CRYPT", "only $1$, $5$, $6$ and $2y$ crypt hashes are supported")


def _parse_body(scheme: _Scheme, name: str, body: str, forced: _Encoding | None) -> _Payload:
    kind = scheme.kind
    if kind is _Kind.PLAINTEXT:
        text = body
        if forced is not None:
            try:
                text = _decode(scheme, name, body, forced).decode("utf-8")
            except UnicodeDecodeError:
                raise SchemeError(name, "decoded value is not UTF-8") from None
        if not text:
            # An empty stored password would let anyone in with an empty one.
            raise SchemeError(name, "empty password")
        return text
    if kind in _BINARY_KINDS:
        raw = _decode(scheme, name, body, forced)
        size = scheme.raw_len
        if kind is _Kind.SALTED:
            size = hashlib.new(scheme.hash_name).digest_size
            if len(raw) <= size:
                raise SchemeError(name, "value is too short for a digest and a salt")
        elif len(raw) != size:
            raise SchemeError(name, f"value must decode to {size} bytes")
        return raw
    if kind is _Kind.CRYPT:
        if not body.startswith(scheme.prefix):
            raise SchemeError(name, f"value must start with {scheme.prefix}")
        try:
            _PASSLIB_CRYPT[scheme.prefix].from_string(body)
        except (ValueError, TypeError):
            raise SchemeError(name, "malformed crypt hash") from None
        return body
    if kind is _Kind.BCRYPT:
        if not body.isascii() or not _BCRYPT.fullmatch(body):
            raise SchemeError(name, "malformed bcrypt hash (want $2y$NN$ and 53 characters)")
        return body
    if kind is _Kind.ARGON2:
        return _parse_argon2(scheme, name, body)
    if kind is _Kind.PBKDF2:
        match = _PBKDF2.fullmatch(body)
        if match is None or int(match[2]) < 1:
            raise SchemeError(name, "malformed value (want $1$salt$rounds$40 hex digits)")
        return (match[1], int(match[2]), bytes.fromhex(match[3]))
    if kind is _Kind.SCRAM:
        return _parse_scram(scheme, name, body)
    raise AssertionError(f"unhandled scheme kind {kind}")  # pragma: no cover


def _parse_argon2(scheme: _Scheme, name: str, body: str) -> str:
    # The type in the hash must match the scheme: a {ARGON2I} label on an
    # argon2id hash is a paste error worth reporting.
    if not body.startswith(scheme.prefix):
        raise SchemeError(name, f"value must start with {scheme.prefix}")
    try:
        params = argon2.extract_parameters(body)
    except (ValueError, TypeError, argon2.exceptions.InvalidHashError):
        raise SchemeError(name, "malformed argon2 hash") from None
    if not (
        params.time_cost >= 1
        and params.parallelism >= 1
        and 8 * params.parallelism <= params.memory_cost <= _ARGON2_MAX_MEMORY
        and params.salt_len >= 8
        and params.hash_len >= 4
    ):
        raise SchemeError(name, "argon2 parameters out of range")
    return body


def _parse_scram(scheme: _Scheme, name: str, body: str) -> ScramVerifier:
    try:
        verifier = _scram_parse(body, scheme.hash_name)
    except ValueError:
        want = "want iterations,salt,StoredKey,ServerKey"
        raise SchemeError(name, f"malformed value ({want})") from None
    size = hashlib.new(scheme.hash_name).digest_size
    if (
        verifier.iterations < 1
        or not verifier.salt
        or len(verifier.stored_key) != size
        or len(verifier.server_key) != size
    ):
        raise SchemeError(name, "SCRAM parameters out of range")
    return verifier


# ------------------------------------------------------------------ writing


def hash_password(
    password: str,
    scheme: str = "ARGON2ID",
    *,
    username: str | None = None,
    realm: str | None = None,
    scram_iterations: int = 4096,
) -> str:
    """The ``{SCHEME}value`` text for `password`, as `authgate passwd` writes it.

    ``{DIGEST-MD5}`` needs `username` and `realm`. Unsalted digests and
    MD5-CRYPT are refused: they are read for migration, never written."""
    name = _ALIASES.get(scheme.upper(), scheme.upper())
    if name not in WRITABLE_SCHEMES:
        if name in SCHEMES:
            raise SchemeError(name, "is read for migration but never written (too weak)")
        raise SchemeError("", f"unknown scheme {{{name}}}")
    pw = _pw(password)
    if name == "PLAIN":
        return "{PLAIN}" + password
    if name in ("SSHA256", "SSHA512"):
        salt = secrets.token_bytes(16)
        digest = hashlib.new(SCHEMES[name].hash_name, pw + salt).digest()
        return f"{{{name}}}" + base64.b64encode(digest + salt).decode("ascii")
    if name == "SHA256-CRYPT":
        return "{SHA256-CRYPT}" + str(sha256_crypt.using(rounds=_CRYPT_ROUNDS).hash(pw))
    if name == "SHA512-CRYPT":
        return "{SHA512-CRYPT}" + str(sha512_crypt.using(rounds=_CRYPT_ROUNDS).hash(pw))
    if name == "BLF-CRYPT":
        if len(pw) > _BCRYPT_MAX:
            raise SchemeError(name, "bcrypt ignores everything after 72 bytes; use ARGON2ID")
        hashed = _bcrypt.hashpw(pw, _bcrypt.gensalt(12, prefix=b"2b")).decode("ascii")
        # Same algorithm; $2y$ is what Dovecot and PHP write and every
        # crypt_blowfish accepts.
        return "{BLF-CRYPT}$2y$" + hashed[4:]
    if name in ("ARGON2I", "ARGON2ID"):
        kind = argon2.Type.I if name == "ARGON2I" else argon2.Type.ID
        return f"{{{name}}}" + argon2.PasswordHasher(type=kind).hash(pw)
    if name == "PBKDF2":
        salt_text, rounds = _random_salt(16), 100_000
        key = hashlib.pbkdf2_hmac("sha1", pw, salt_text.encode("ascii"), rounds, 20)
        return f"{{PBKDF2}}$1${salt_text}${rounds}${key.hex()}"
    if name == "CRAM-MD5":
        return "{CRAM-MD5}" + _cram_md5(password).hex()
    if name == "DIGEST-MD5":
        if username is None or realm is None:
            raise SchemeError(name, "needs the user name and the realm")
        return "{DIGEST-MD5}" + _digest_ha1(username, realm, password).hex()
    if name == "NTLM":
        return "{NTLM}" + _nt_hash(password).hex()
    # SCRAM-SHA-1 / SCRAM-SHA-256
    text = _scram_format(_scram_verifier(password, SCHEMES[name].hash_name, scram_iterations))
    return text if text.startswith("{") else f"{{{name}}}" + text
