"""The string syntax IMAP and ManageSieve share: atoms, quoted strings,
literals and parentheses (RFC 9051 section 4, RFC 5804 section 4).

`tokenize` splits text into `Token`s; where a "{" begins a literal, the
protocol's own `literal` callback reads it (IMAP has it as a separate input
unit, ManageSieve inline after the announcement). Any syntax error raises
`StringSyntaxError`.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["StringSyntaxError", "Token", "TokenKind", "read_quoted", "tokenize"]

# An atom runs to a space, parenthesis, quote or "{"; a control character
# inside one is a syntax error.
ATOM = re.compile(rb'[^ ()"{\x00-\x1f\x7f]+')


class StringSyntaxError(Exception):
    """Text that does not parse as atoms, strings and parentheses."""


class TokenKind(enum.Enum):
    ATOM = "atom"
    STRING = "string"  # quoted string or literal: the value, unescaped
    LPAREN = "("
    RPAREN = ")"


@dataclass(frozen=True)
class Token:
    kind: TokenKind
    value: bytes = b""


# Reads the literal whose "{" is at the position given: its value and the
# position after it.
LiteralReader = Callable[[bytes, int], tuple[bytes, int]]


def tokenize(
    text: bytes,
    literal: LiteralReader,
    *,
    quoted_limit: int | None = None,
    quoted_forbidden: bytes = b"\x00\r\n",
) -> list[Token]:
    """The tokens of `text`; `quoted_limit` and `quoted_forbidden` as in
    `read_quoted`."""
    tokens: list[Token] = []
    pos = 0
    while pos < len(text):
        byte = text[pos]
        if byte == 0x20:
            pos += 1
        elif byte in b"()":
            tokens.append(Token(TokenKind.LPAREN if byte == 0x28 else TokenKind.RPAREN))
            pos += 1
        elif byte == 0x22:
            value, pos = read_quoted(text, pos + 1, limit=quoted_limit, forbidden=quoted_forbidden)
            tokens.append(Token(TokenKind.STRING, value))
        elif byte == 0x7B:
            value, pos = literal(text, pos)
            tokens.append(Token(TokenKind.STRING, value))
        else:
            match = ATOM.match(text, pos)
            if match is None:
                raise StringSyntaxError("control character")
            tokens.append(Token(TokenKind.ATOM, match.group()))
            pos = match.end()
    return tokens


def read_quoted(
    text: bytes, pos: int, *, limit: int | None = None, forbidden: bytes = b"\x00\r\n"
) -> tuple[bytes, int]:
    """The quoted string whose opening quote is before `pos`, and the
    position after its closing quote. Only \\\\ and \\" are escapes; the
    octets in `forbidden` never appear, nor more than `limit` of them."""
    value = bytearray()
    while pos < len(text):
        byte = text[pos]
        if byte == 0x22:
            return bytes(value), pos + 1
        if byte == 0x5C:
            if pos + 1 >= len(text) or text[pos + 1] not in b'\\"':
                raise StringSyntaxError("bad escape in a quoted string")
            byte = text[pos + 1]
            pos += 1
        elif byte in forbidden:
            raise StringSyntaxError("CR, LF or NUL in a quoted string")
        value.append(byte)
        if limit is not None and len(value) > limit:
            raise StringSyntaxError("quoted string too long")
        pos += 1
    raise StringSyntaxError("unterminated quoted string")
