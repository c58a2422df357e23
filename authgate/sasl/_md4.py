"""A small pure-Python MD4 (RFC 1320), used only to derive the NT hash.

OpenSSL 3 moved MD4 to its "legacy" provider, which most distributions do
not load, so ``hashlib.new("md4")`` raises there. passlib carries an MD4 of
its own, but in a private module (``passlib.crypto._md4``) that may move or
vanish; these few lines are cheaper than depending on it. Speed does not
matter: the input is one password, hashed once per lookup or store update.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

__all__ = ["md4"]

_MASK = 0xFFFFFFFF
_IV = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)

# RFC 1320 section 3.4: the three rounds' word order, shifts and constants.
_Round = tuple[Callable[[int, int, int], int], int, tuple[int, ...], tuple[int, ...]]
_ROUNDS: tuple[_Round, ...] = (
    (
        lambda x, y, z: (x & y) | (~x & z),
        0,
        tuple(range(16)),
        (3, 7, 11, 19),
    ),
    (
        lambda x, y, z: (x & y) | (x & z) | (y & z),
        0x5A827999,
        (0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15),
        (3, 5, 9, 13),
    ),
    (
        lambda x, y, z: x ^ y ^ z,
        0x6ED9EBA1,
        (0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15),
        (3, 9, 11, 15),
    ),
)


def _rotl(x: int, n: int) -> int:
    return ((x << n) | (x >> (32 - n))) & _MASK


def md4(data: bytes) -> bytes:
    """The 16-byte MD4 digest of `data`."""
    # Section 3.1/3.2: a 1 bit, zeros up to 56 mod 64, then the bit length
    # as a 64-bit little-endian integer.
    padded = (
        data
        + b"\x80"
        + b"\x00" * ((55 - len(data)) % 64)
        + struct.pack("<Q", (len(data) * 8) & 0xFFFFFFFFFFFFFFFF)
    )
    state = _IV
    for start in range(0, len(padded), 64):
        words = struct.unpack_from("<16I", padded, start)
        a, b, c, d = state
        for func, const, order, shifts in _ROUNDS:
            for i, k in enumerate(order):
                a = _rotl((a + func(b, c, d) + words[k] + const) & _MASK, shifts[i % 4])
                # Rotate the register roles: the operations cycle through
                # a, d, c, b, each using the other three in order.
                a, b, c, d = d, a, b, c
        state = (
            (state[0] + a) & _MASK,
            (state[1] + b) & _MASK,
            (state[2] + c) & _MASK,
            (state[3] + d) & _MASK,
        )
    return struct.pack("<4I", *state)
