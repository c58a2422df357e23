"""CRAM-MD5 (RFC 2195): one server challenge, answered with HMAC-MD5.

The server never needs the password: RFC 2104 section 4 notes that HMAC's
keyed pads can be precomputed, i.e. the MD5 chaining state after one
compression of ``key XOR opad`` and of ``key XOR ipad``. Dovecot stores
exactly those two states as its ``{CRAM-MD5}`` scheme, and so do we, byte
for byte, so that such hashes can be imported unchanged:

    secret = outer state (16 bytes) || inner state (16 bytes)

each state being MD5's A, B, C, D words as little-endian 32-bit integers
(Dovecot's ``hmac_md5_get_cram_context`` writes the *outer* context first).
Finishing HMAC from a mid-stream state is something hashlib cannot do, so
this module carries a small pure-Python MD5 compression function. It is
also used for the client side, which keeps MD5 out of hashlib (FIPS builds
of OpenSSL refuse it).

Note that this secret is password-equivalent for CRAM-MD5 itself: whoever
holds it can answer any challenge. The store must protect it.
"""

from __future__ import annotations

import hmac
import math
import os
import re
import struct

from authgate.sasl.base import (
    NO_RESPONSE,
    Call,
    Challenge,
    ClientAuthError,
    ClientContext,
    ClientCredentials,
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
    invalid,
    malformed,
)

__all__ = [
    "CRAM_MD5_SECRET_LEN",
    "CramMD5Client",
    "CramMD5Server",
    "cram_md5_digest",
    "cram_md5_secret",
]

CRAM_MD5_SECRET_LEN = 32

# ------------------------------------------------------------ pure MD5 (RFC 1321)

_MASK = 0xFFFFFFFF
_BLOCK = 64
# RFC 1321 section 3.4: T[i] = floor(2**32 * abs(sin(i))), i = 1..64.
_T = tuple(int(abs(math.sin(i + 1)) * 2**32) & _MASK for i in range(64))
_SHIFTS = (7, 12, 17, 22) * 4 + (5, 9, 14, 20) * 4 + (4, 11, 16, 23) * 4 + (6, 10, 15, 21) * 4
_IV = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)
_IPAD = bytes([0x36]) * _BLOCK
_OPAD = bytes([0x5C]) * _BLOCK

_State = tuple[int, int, int, int]


def _rotl(x: int, n: int) -> int:
    return ((x << n) | (x >> (32 - n))) & _MASK


def _compress(state: _State, block: bytes) -> _State:
    """One MD5 compression of a 64-byte block into `state`."""
    m = struct.unpack("<16I", block)
    a, b, c, d = state
    for i in range(64):
        if i < 16:
            f = (b & c) | (~b & d)
            g = i
        elif i < 32:
            f = (d & b) | (~d & c)
            g = (5 * i + 1) % 16
        elif i < 48:
            f = b ^ c ^ d
            g = (3 * i + 5) % 16
        else:
            f = c ^ (b | (~d & _MASK))
            g = (7 * i) % 16
        f = (f + a + _T[i] + m[g]) & _MASK
        a, d, c = d, c, b
        b = (b + _rotl(f, _SHIFTS[i])) & _MASK
    return (
        (state[0] + a) & _MASK,
        (state[1] + b) & _MASK,
        (state[2] + c) & _MASK,
        (state[3] + d) & _MASK,
    )


def _md5_finish(state: _State, data: bytes, processed: int) -> bytes:
    """Finish an MD5 computation that has already compressed `processed`
    bytes (a multiple of 64) into `state`, then absorbs `data`."""
    if processed % _BLOCK:
        raise ValueError("processed byte count must be a whole number of blocks")
    total_bits = ((processed + len(data)) * 8) & 0xFFFFFFFFFFFFFFFF
    # RFC 1321 section 3.1-3.2: a 1 bit, zeros to 56 mod 64, 64-bit length.
    padded = data + b"\x80" + b"\x00" * ((55 - len(data)) % _BLOCK)
    padded += struct.pack("<Q", total_bits)
    for offset in range(0, len(padded), _BLOCK):
        state = _compress(state, padded[offset : offset + _BLOCK])
    return struct.pack("<4I", *state)


def _md5(data: bytes) -> bytes:
    return _md5_finish(_IV, data, 0)


def _xor(block: bytes, pad: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(block, pad, strict=True))


def cram_md5_secret(password: str) -> bytes:
    """The 32-byte stored form of `password` (Dovecot's ``{CRAM-MD5}`` raw
    bytes): MD5 state after ``key XOR opad``, then after ``key XOR ipad``."""
    key = password.encode("utf-8")
    if len(key) > _BLOCK:
        # RFC 2104 section 2: keys longer than the block size are hashed first.
        key = _md5(key)
    key = key.ljust(_BLOCK, b"\x00")
    outer = _compress(_IV, _xor(key, _OPAD))
    inner = _compress(_IV, _xor(key, _IPAD))
    return struct.pack("<4I", *outer) + struct.pack("<4I", *inner)


def _unpack_state(raw: bytes) -> _State:
    a, b, c, d = struct.unpack("<4I", raw)
    return (a, b, c, d)


def cram_md5_digest(secret: bytes, challenge: bytes) -> bytes:
    """HMAC-MD5 of `challenge` (16 bytes) keyed by the precomputed pads in
    `secret` (as made by `cram_md5_secret`)."""
    if len(secret) != CRAM_MD5_SECRET_LEN:
        raise ValueError(f"CRAM-MD5 secret must be {CRAM_MD5_SECRET_LEN} bytes")
    outer = _unpack_state(secret[:16])
    inner = _unpack_state(secret[16:])
    # Each state has already absorbed exactly one 64-byte pad block.
    inner_digest = _md5_finish(inner, challenge, _BLOCK)
    return _md5_finish(outer, inner_digest, _BLOCK)


# ------------------------------------------------------------------ server

# RFC 2195 section 2: the response is the user name, a space, and the digest
# as 32 lowercase hex digits. We accept upper case too (harmless leniency).
_DIGEST_HEX = re.compile(rb"[0-9A-Fa-f]{32}")
# Verified against when the user is unknown, so that an unknown user costs
# the same HMAC computation as a known one.
_DUMMY_SECRET = bytes(CRAM_MD5_SECRET_LEN)
# RFC 2195 asks for an RFC 822 msg-id; keep the host part to atom/dot chars.
_HOSTNAME = re.compile(r"[A-Za-z0-9.\-_\[\]:]+")


class CramMD5Server:
    name = "CRAM-MD5"

    def __init__(self, ctx: ServerContext) -> None:
        if not _HOSTNAME.fullmatch(ctx.hostname):
            raise ValueError("server hostname is not usable in a CRAM-MD5 challenge")
        self._ctx = ctx
        self._stage = Stage("CRAM-MD5 server")
        self._challenge = b""
        self._authcid = ""
        self._digest = b""

    def _make_challenge(self) -> bytes:
        # RFC 2195 suggests "<random-digits.timestamp@host>". Being sans-IO we
        # have no clock; 128 random bits give the uniqueness the timestamp was for.
        rnd = (self._ctx.random or os.urandom)(16)
        if len(rnd) != 16:
            raise SaslProtocolError("random source returned the wrong number of bytes")
        left = int.from_bytes(rnd[:8], "big")
        right = int.from_bytes(rnd[8:], "big")
        return f"<{left}.{right}@{self._ctx.hostname}>".encode("ascii")

    def start(self, initial: InitialResponse) -> ServerOutcome:
        self._stage.check(Call.START)
        if initial is not NO_RESPONSE:
            # The server speaks first in CRAM-MD5 (RFC 2195 section 2): any
            # initial response, even an empty one, is a protocol error.
            self._stage.end()
            return malformed("CRAM-MD5 does not allow an initial response")
        self._challenge = self._make_challenge()
        self._stage.expect(Call.STEP, what="'user digest'")
        return Challenge(self._challenge)

    def step(self, response: bytes) -> ServerOutcome:
        self._stage.check(Call.STEP)
        self._stage.end()
        user_raw, sep, digest_hex = response.rpartition(b" ")
        if not sep or not user_raw:
            return malformed("CRAM-MD5 response must be 'user SP digest'")
        if not _DIGEST_HEX.fullmatch(digest_hex):
            return malformed("CRAM-MD5 digest must be 32 hex digits")
        try:
            authcid = user_raw.decode("utf-8")
        except UnicodeDecodeError:
            return malformed("CRAM-MD5 user name is not valid UTF-8")
        if "\x00" in authcid:
            return malformed("CRAM-MD5 user name contains NUL")
        self._authcid = authcid
        self._digest = bytes.fromhex(digest_hex.decode("ascii"))
        self._stage.expect(Call.RESUME, what="the CRAM-MD5 secret")
        return Lookup(SecretLookup(authcid, SecretForm.CRAM_MD5))

    def resume(self, answer: LookupAnswer) -> ServerOutcome:
        self._stage.check(Call.RESUME)
        self._stage.end()
        if answer is None or answer is False:
            cram_md5_digest(_DUMMY_SECRET, self._challenge)
            return invalid()
        if not isinstance(answer, bytes) or len(answer) != CRAM_MD5_SECRET_LEN:
            # The store handed us something other than the form we asked for:
            # a bug on our side, not the client's.
            raise SaslProtocolError("CRAM-MD5 needs a 32-byte secret from the store")
        expected = cram_md5_digest(answer, self._challenge)
        if not hmac.compare_digest(expected, self._digest):
            return invalid()
        # CRAM-MD5 has no authorization identity: the user acts as itself.
        return Success(self._authcid)


# ------------------------------------------------------------------ client


class CramMD5Client:
    name = "CRAM-MD5"

    def __init__(self, creds: ClientCredentials, ctx: ClientContext) -> None:
        if creds.authzid and creds.authzid != creds.username:
            # Silently dropping it would log in as the authcid instead of the
            # requested identity (e.g. a master user): refuse instead.
            raise ValueError("CRAM-MD5 cannot carry an authorization identity")
        if not creds.username or "\x00" in creds.username:
            raise ValueError("CRAM-MD5 needs a user name without NUL")
        self._creds = creds
        self._stage = Stage("CRAM-MD5 client")
        self._answered = False

    def start(self) -> bytes | None:
        self._stage.check(Call.START)
        self._stage.expect(Call.STEP, Call.FINISH, what="the challenge or the success")
        return None  # the server speaks first

    def step(self, challenge: bytes) -> bytes:
        self._stage.check(Call.STEP)
        if self._answered:
            raise ClientAuthError("CRAM-MD5 server sent more than one challenge")
        if not challenge:
            raise ClientAuthError("CRAM-MD5 server sent an empty challenge")
        self._answered = True
        digest = cram_md5_digest(cram_md5_secret(self._creds.password), challenge)
        return self._creds.username.encode("utf-8") + b" " + digest.hex().encode("ascii")

    def finish(self, additional: bytes | None) -> None:
        self._stage.check(Call.FINISH)
        self._stage.end()
        if additional:
            raise ClientAuthError("CRAM-MD5 server sent unexpected data with success")
