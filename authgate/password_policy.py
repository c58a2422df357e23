"""Password policy: strength rules for new passwords and password expiry.

The admin page this project re-creates asks for a minimum length, a mix of
character classes, no parts of the user's name, and expiry with warnings.
Everything here is pure (the date is passed in, the banned-passwords file
is read once when the policy is parsed); the `expiry` command is in
`authgate.commands.password_policy`.

```toml
[password_policy]
min_length = 8                 # characters (code points)
min_classes = 3                # of: lower case, upper case, digits, other characters
forbid_user_name = true
forbid_full_name = true        # any part of the full name longer than 2 characters
banned_passwords_file = "banned.txt"   # one per line, compared case-insensitively
expire_days = 180              # omit: passwords never expire
warn_days = [21, 14, 7]        # warning stages before expiry
```

Messages never contain the password: they go to terminals, logs and
protocol replies.
"""

from __future__ import annotations

import datetime
import enum
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Final

from authgate.sasl.base import MAX_PASSWORD_OCTETS
from authgate.settings import Range, Table

__all__ = [
    "CLASS_NAMES",
    "ExpiryState",
    "ExpiryStatus",
    "PasswordPolicy",
    "check",
    "expiry_status",
    "format_violations",
    "load_banned",
    "parse_policy",
]

TABLE: Final = "password_policy"
CLASS_NAMES: Final = ("lower case", "upper case", "digits", "other characters")
DEFAULT_WARN_DAYS: Final[tuple[int, ...]] = (21, 14, 7)

# Name parts this short (initials, "Li", "de") turn up by chance in strong
# passwords and add next to nothing to a guesser's dictionary. Windows'
# complexity rule skips account names and display-name tokens under three
# characters for the same reason; we apply it to the user name too.
MIN_NAME_PART: Final = 3
# Separators of full-name parts: the admin page's spaces, hyphens, dots and
# commas, plus any other white space (tabs in pasted directory data).
_NAME_SEPARATORS: Final = re.compile(r"[\s\-.,]+")

_KEYS: Final = frozenset(
    {
        "min_length",
        "min_classes",
        "forbid_user_name",
        "forbid_full_name",
        "banned_passwords_file",
        "expire_days",
        "warn_days",
    }
)


@dataclass(frozen=True)
class PasswordPolicy:
    min_length: int = 8
    min_classes: int = 3  # 0 disables the rule; at most len(CLASS_NAMES)
    forbid_user_name: bool = True
    forbid_full_name: bool = True
    # Normalized (see _fold) banned passwords; a large list stays out of reprs.
    banned: frozenset[str] = field(default=frozenset(), repr=False)
    banned_file: Path | None = None
    expire_days: int | None = None  # None: passwords never expire
    warn_days: tuple[int, ...] = DEFAULT_WARN_DAYS  # descending

    # What a configuration may set ([password_policy] in authgate.toml).
    RANGES: ClassVar[Mapping[str, Range]] = {
        "min_length": Range(1, 1024, integer=True),
        "min_classes": Range(0, len(CLASS_NAMES), integer=True),
        # Ten years: longer is a typo for "never" (omit the key for that).
        "expire_days": Range(1, 3650, integer=True),
    }

    def __post_init__(self) -> None:
        # parse_policy reports these with file and key path; this guards
        # policies built in code.
        if self.min_length < 0:
            raise ValueError("min_length must not be negative")
        if not self.RANGES["min_classes"].contains(self.min_classes):
            raise ValueError(f"min_classes must be 0-{len(CLASS_NAMES)}")
        if self.expire_days is not None and self.expire_days < 1:
            raise ValueError("expire_days must be at least 1")
        if any(d < 1 for d in self.warn_days):
            raise ValueError("warn_days must be at least 1")
        object.__setattr__(self, "warn_days", tuple(sorted(set(self.warn_days), reverse=True)))


# ------------------------------------------------------------------ rules


def _fold(text: str) -> str:
    """Case-insensitive, compatibility-normalized form for comparisons, so
    that 'SMITH' or full-width 'Ｓｍｉｔｈ' still count as 'Smith'."""
    return unicodedata.normalize("NFKC", text).casefold()


def _classes(password: str) -> int:
    lower = upper = digit = other = False
    for ch in password:
        if ch.islower():
            lower = True
        elif ch.isupper():
            upper = True
        elif ch.isdigit():
            digit = True
        else:
            # Punctuation, spaces, and letters without case (CJK, Arabic...).
            other = True
    return lower + upper + digit + other


def name_parts(full_name: str) -> list[str]:
    """The parts of a full name that a password must not contain: split on
    white space, hyphens, dots and commas; parts under MIN_NAME_PART
    characters ignored; duplicates (case-insensitive) dropped."""
    parts: dict[str, str] = {}
    for part in _NAME_SEPARATORS.split(full_name):
        if len(part) >= MIN_NAME_PART:
            parts.setdefault(_fold(part), part)
    return list(parts.values())


def _user_name_forms(username: str) -> list[str]:
    """The user name and, for 'bob.smith@example.org', its local part."""
    forms = [username]
    local, at, _ = username.partition("@")
    if at and local:
        forms.append(local)
    return [f for f in forms if len(f) >= MIN_NAME_PART]


def check(
    policy: PasswordPolicy, password: str, username: str, full_name: str | None = None
) -> list[str]:
    """Every rule `password` breaks, one sentence each (empty: acceptable).
    The messages name the rule, never the password."""
    problems: list[str] = []
    length = len(password)
    if length < policy.min_length:
        problems.append(f"at least {policy.min_length} characters (has {length})")
    octets = len(password.encode("utf-8", "surrogatepass"))
    if octets > MAX_PASSWORD_OCTETS:
        # Logins refuse longer ones unchecked (authgate.sasl.base): such a
        # password could be stored but never used.
        problems.append(f"at most {MAX_PASSWORD_OCTETS} octets in UTF-8 (has {octets})")
    classes = _classes(password)
    if classes < policy.min_classes:
        problems.append(
            f"at least {policy.min_classes} of: {', '.join(CLASS_NAMES)} (has {classes})"
        )
    folded = _fold(password)
    if policy.forbid_user_name and any(_fold(f) in folded for f in _user_name_forms(username)):
        problems.append("must not contain the user name")
    if policy.forbid_full_name and full_name:
        user_forms = {_fold(f) for f in _user_name_forms(username)}
        for part in name_parts(full_name):
            key = _fold(part)
            # Already reported as the user name (user "smith", "John Smith").
            if policy.forbid_user_name and key in user_forms:
                continue
            if key in folded:
                problems.append(f"must not contain {part!r} from the full name")
    if policy.banned and folded.strip() in policy.banned:
        problems.append("is on the list of banned passwords")
    return problems


def format_violations(violations: Iterable[str]) -> str:
    """One line naming every unmet rule, for `authgate passwd` to raise as a
    UserError; '' when there are none."""
    items = list(violations)
    if not items:
        return ""
    return "the password does not meet the password policy: " + "; ".join(items)


# ----------------------------------------------------------------- expiry


class ExpiryState(enum.Enum):
    OK = "ok"
    WARN = "warn"  # within the warning window
    EXPIRED = "expired"
    # Expiry is configured but the user has no password_changed date. Not
    # treated as expired: that would lock out every user of an old file.
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class ExpiryStatus:
    state: ExpiryState
    expires: datetime.date | None = None  # first day the password no longer works
    days_left: int | None = None  # expires - today; 0 or less when expired
    # WARN: the warning stage reached (21, 14 or 7 by default): the smallest
    # of warn_days that is still >= days_left. A reminder mailer sends one
    # message per stage.
    threshold: int | None = None


def expiry_status(
    policy: PasswordPolicy, password_changed: datetime.date | None, today: datetime.date
) -> ExpiryStatus:
    """Where a password stands on `today`. It expires `expire_days` after
    it was changed: on that day it is expired (0 days left)."""
    if policy.expire_days is None:
        return ExpiryStatus(ExpiryState.OK)
    if password_changed is None:
        return ExpiryStatus(ExpiryState.UNKNOWN)
    expires = password_changed + datetime.timedelta(days=policy.expire_days)
    days_left = (expires - today).days
    if days_left <= 0:
        return ExpiryStatus(ExpiryState.EXPIRED, expires, days_left)
    stages = [d for d in policy.warn_days if d >= days_left]
    if stages:
        return ExpiryStatus(ExpiryState.WARN, expires, days_left, min(stages))
    return ExpiryStatus(ExpiryState.OK, expires, days_left)


# ---------------------------------------------------------------- parsing


def load_banned(path: Path) -> frozenset[str]:
    """One banned password per line; blank lines skipped. Lists found on the
    net are not always UTF-8: undecodable bytes are kept as surrogates, so
    such a line simply never matches instead of failing the load."""
    text = path.read_text(encoding="utf-8", errors="surrogateescape")
    return frozenset(_fold(line.strip()) for line in text.splitlines() if line.strip())


def parse_policy(table: Mapping[str, Any], source: Path, where: str = TABLE) -> PasswordPolicy:
    """Validate a `[password_policy]` TOML table; ConfigError names the file,
    the key path and the bad value. Relative paths are resolved against the
    file's folder."""
    t = Table(table, where, source)
    error = t.error

    def integer(key: str) -> int | None:
        if key not in table:
            return None
        value = table[key]
        bounds = PasswordPolicy.RANGES[key]
        # bool is an int subclass: `min_length = true` is a mistake.
        if not bounds.is_kind(value):
            raise error(key, f"{value!r} is not an integer")
        if not bounds.contains(value):
            raise error(key, f"{value!r} is not between {bounds.low:g} and {bounds.high:g}")
        return int(value)

    def boolean(key: str, default: bool) -> bool:
        value = table.get(key, default)
        if not isinstance(value, bool):
            raise error(key, f"{value!r} is not true or false")
        return value

    for key in sorted(table):
        if key not in _KEYS:
            raise error(key, f"unknown key (expected {', '.join(sorted(_KEYS))})")

    min_length = integer("min_length")
    min_classes = integer("min_classes")
    expire_days = integer("expire_days")

    warn_days: tuple[int, ...] = DEFAULT_WARN_DAYS
    if "warn_days" in table:
        raw = table["warn_days"]
        if not isinstance(raw, list):
            raise error("warn_days", f"{raw!r} is not a list of integers")
        days: list[int] = []
        for i, item in enumerate(raw):
            if not isinstance(item, int) or isinstance(item, bool) or item < 1:
                raise error(f"warn_days[{i}]", f"{item!r} is not a positive integer")
            if item in days:
                raise error(f"warn_days[{i}]", f"{item!r} is listed twice")
            if expire_days is not None and item >= expire_days:
                raise error(
                    f"warn_days[{i}]",
                    f"{item!r} is not less than expire_days ({expire_days}): "
                    "the warning would start when the password is set",
                )
            days.append(item)
        warn_days = tuple(days)
    elif expire_days is not None:
        # The defaults adapt to a short expiry instead of failing.
        warn_days = tuple(d for d in DEFAULT_WARN_DAYS if d < expire_days)

    banned: frozenset[str] = frozenset()
    banned_file: Path | None = None
    if "banned_passwords_file" in table:
        raw_path = table["banned_passwords_file"]
        if not isinstance(raw_path, str) or not raw_path:
            raise error("banned_passwords_file", f"{raw_path!r} is not a file name")
        banned_file = Path(raw_path).expanduser()
        if not banned_file.is_absolute():
            banned_file = source.parent / banned_file
        try:
            banned = load_banned(banned_file)
        except OSError as exc:
            reason = exc.strerror or exc.__class__.__name__
            raise error("banned_passwords_file", f"cannot read {banned_file}: {reason}") from None

    defaults = PasswordPolicy()
    return PasswordPolicy(
        min_length=defaults.min_length if min_length is None else min_length,
        min_classes=defaults.min_classes if min_classes is None else min_classes,
        forbid_user_name=boolean("forbid_user_name", defaults.forbid_user_name),
        forbid_full_name=boolean("forbid_full_name", defaults.forbid_full_name),
        banned=banned,
        banned_file=banned_file,
        expire_days=expire_days,
        warn_days=warn_days,
    )
