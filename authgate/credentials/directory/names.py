"""User names toward a directory: escaping into DNs and filters, the
spellings refused, the entry's canonical name."""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping, Sequence
from typing import Final

USER_PLACEHOLDER: Final = "{user}"
MAX_USERNAME_LENGTH: Final = 256


def escape_dn_value(value: str) -> str:
    """`value` as an RDN attribute value (RFC 4514 section 2.4).

    Escaped with a backslash: ``" + , ; < > \\ =``, a leading space or
    ``#``, a trailing space (``=`` need not be, RFC 4514 allows it and it
    keeps a value from looking like a second AVA to lax parsers). NUL and
    other control characters are hex-escaped per UTF-8 byte (``\\00``)."""
    out: list[str] = []
    last = len(value) - 1
    for i, ch in enumerate(value):
        if ch in '"+,;<>\\=' or (i == 0 and ch in " #") or (i == last and ch == " "):
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append("".join(f"\\{b:02x}" for b in ch.encode("utf-8")))
        else:
            out.append(ch)
    return "".join(out)


def escape_filter_value(value: str) -> str:
    """`value` as a filter assertion value (RFC 4515 section 3): ``*``,
    ``(``, ``)``, ``\\`` and NUL become ``\\2a``, ``\\28``, ``\\29``,
    ``\\5c``, ``\\00``; other control characters are hex-escaped too."""
    out: list[str] = []
    for ch in value:
        if ch in "*()\\" or ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append("".join(f"\\{b:02x}" for b in ch.encode("utf-8")))
        else:
            out.append(ch)
    return "".join(out)


def _plain_name(name: str) -> bool:
    """Non-empty, not too long, no control characters (Cc, NUL included) or
    lone surrogates (Cs, not encodable)."""
    if not name or len(name) > MAX_USERNAME_LENGTH:
        return False
    return not any(unicodedata.category(ch) in ("Cc", "Cs") for ch in name)


# RFC 4518 section 2.2 maps these to nothing before comparing: "al\u00adice"
# may match "alice". (Format characters, category Cf, are refused anyway.)
_MAPPED_TO_NOTHING: Final = frozenset(
    "\u034f\u180b\u180c\u180d\ufffc" + "".join(chr(c) for c in range(0xFE00, 0xFE10))
)


def _username_problem(name: str) -> str | None:
    """Why the directory must not be asked about `name`, or None.

    Directory matching rules (caseIgnoreMatch, RFC 4518) ignore leading and
    trailing spaces, fold runs of spaces and compatibility forms (NFKC) and
    drop some characters: slapd binds " alice", "alice " and "ａｌｉｃｅ" as
    alice. Such spellings would give one user many names (for the lockout,
    the audit log, the backend), and no one types them on purpose. Case is
    left alone: the directory folds it and the canonical name replaces it."""
    if not _plain_name(name):
        return "empty, too long or with a control character"
    if name != name.strip(" ") or "  " in name:
        return "leading, trailing or repeated spaces"
    if unicodedata.normalize("NFKC", name) != name:
        return "not in NFKC form (compatibility or width variants)"
    for ch in name:
        category = unicodedata.category(ch)
        if category in ("Cf", "Co", "Cn", "Zl", "Zp") or (category == "Zs" and ch != " "):
            return "an invisible, unassigned or non-ASCII space character"
        if ch in _MAPPED_TO_NOTHING:
            return "a character the directory ignores"
    return None


def _fold(name: str) -> str:
    return unicodedata.normalize("NFKC", name).casefold()


def _canonical_name(values: Sequence[bytes], typed: str) -> str | None:
    """The user's name from the entry's canonical attribute: its only value,
    or among several the one that is `typed` but for case. None when there
    is no such single value."""
    names: list[str] = []
    for value in values:
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if _plain_name(text):
            names.append(text)
    if len(names) == 1:
        return names[0]
    matches = [n for n in names if _fold(n) == _fold(typed)]
    return matches[0] if len(matches) == 1 else None


def _attribute_values(entry: Mapping[str, Sequence[bytes]], attribute: str) -> list[bytes]:
    # Attribute descriptions are case-insensitive (RFC 4512 section 2.5).
    wanted = attribute.lower()
    return [v for name, values in entry.items() if name.lower() == wanted for v in values]


def _password_ok(password: str) -> bool:
    # Empty: an unauthenticated bind, which permissive servers report as a
    # success (RFC 4513 section 5.1.2). Lone surrogates cannot be sent.
    return bool(password) and not any(unicodedata.category(ch) == "Cs" for ch in password)
