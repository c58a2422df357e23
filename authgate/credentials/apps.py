"""App passwords: extra, generated passwords a user's mail clients log in with.

In the users file, next to the main password's secrets:

```toml
[users.alice]
secrets = ["{ARGON2ID}..."]
password_login = false          # the main password no longer opens mail
[[users.alice.apps]]
label = "phone"
secret = "{SSHA512}..."
created = 2026-12-02T14:00:00Z
protocols = ["imap", "smtp"]    # optional: only these listeners' protocols
```

An app password is generated (never chosen), shown once and stored hashed.
It is a cleartext password for PLAIN, LOGIN, IMAP LOGIN and POP3 USER/PASS
only: what is stored is a one-way hash, so the SHA-store rule applies and no
challenge-response mechanism can check it. Because it is random with 120 bits
of entropy, a salted SHA-512 ({SSHA512}) protects it as well as a slow hash
protects a chosen password, and it can be checked on the event loop.

When and from where each one was last used is kept in a separate file beside
the users file (`<users file>.apps-used`, sealed like it when the store is
encrypted at rest), written off the event loop: the users file is the
admin's, changed only by `authgate passwd` and `authgate apps`.
"""

from __future__ import annotations

import datetime
import json
import re
import secrets as _secrets
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from authgate.atrest.envelope import Keyring, unseal_secret, write_secret_file
from authgate.credentials.schemes import SchemeError, StoredSecret, hash_password, parse_secret

__all__ = [
    "APP_PROTOCOLS",
    "APP_SCHEME",
    "AppPassword",
    "AppUsage",
    "UsageLog",
    "generate_app_password",
    "usage_path",
]

# The protocols an app password may be limited to (a listener's `protocol`).
APP_PROTOCOLS: Final = frozenset({"imap", "pop3", "smtp", "nntp", "ldap", "managesieve"})
APP_SCHEME: Final = "SSHA512"
MAX_LABEL: Final = 64
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._@+-]*")
# 24 characters of a 32-symbol alphabet (lower case, no l/o/0/1): 120 bits,
# typed on a phone keyboard in four groups of six.
_ALPHABET: Final = "abcdefghijkmnpqrstuvwxyz23456789"


@dataclass(frozen=True)
class AppPassword:
    label: str
    secret: StoredSecret
    created: datetime.datetime
    # None: any protocol; otherwise the listener protocols it opens.
    protocols: frozenset[str] | None = None

    def allows(self, protocol: str) -> bool:
        """Whether it may log in on a listener of `protocol` ("" when the
        caller is not a listener: a test or a tool, no limit applies)."""
        return self.protocols is None or not protocol or protocol in self.protocols


@dataclass(frozen=True)
class AppUsage:
    at: datetime.datetime
    client: str  # the client's address


def label_problem(label: str) -> str | None:
    if not label:
        return "app password label is empty"
    if len(label) > MAX_LABEL:
        return f"app password label is longer than {MAX_LABEL} characters"
    if not _LABEL.fullmatch(label):
        return "app password label may hold letters, digits, space and . _ @ + - only"
    return None


def protocols_problem(protocols: Iterable[str]) -> str | None:
    unknown = sorted(set(protocols) - APP_PROTOCOLS)
    if unknown:
        return f"unknown protocol {unknown[0]!r} (expected {', '.join(sorted(APP_PROTOCOLS))})"
    return None


def generate_app_password() -> str:
    """A new app password: 24 random letters and digits in groups of six."""
    chars = "".join(_secrets.choice(_ALPHABET) for _ in range(24))
    return "-".join(chars[i : i + 6] for i in range(0, 24, 6))


def new_app_password(
    label: str, protocols: Iterable[str] | None, *, now: datetime.datetime | None = None
) -> tuple[str, AppPassword]:
    """(the password to show once, the record to store)."""
    password = generate_app_password()
    secret = parse_secret(hash_password(password, APP_SCHEME))
    created = (now or datetime.datetime.now(datetime.UTC)).replace(microsecond=0)
    limit = frozenset(p.lower() for p in protocols) if protocols is not None else None
    return password, AppPassword(label, secret, created, limit)


def load_app(value: object) -> AppPassword | str:
    """One `[[users.X.apps]]` table, or the problem with it (no secret value)."""
    if not isinstance(value, dict):
        return "must be a table"
    unknown = set(value) - {"label", "secret", "created", "protocols"}
    if unknown:
        return f"unknown key {sorted(unknown)[0]!r} (expected created, label, protocols, secret)"
    label = value.get("label")
    if not isinstance(label, str):
        return "label must be a string"
    problem = label_problem(label)
    if problem is not None:
        return problem
    text = value.get("secret")
    if not isinstance(text, str):
        return "secret must be a string"
    try:
        secret = parse_secret(text)
    except SchemeError as exc:
        return f"secret: {exc}"
    if not secret.can_verify_password or secret.forms():
        # A plaintext or password-equivalent form would make it usable with
        # challenge-response mechanisms, and readable: a one-way hash only.
        return "secret must be a one-way hash ({SSHA512}, {ARGON2ID}, ...)"
    created = value.get("created")
    if isinstance(created, datetime.datetime):
        if created.tzinfo is None:
            created = created.replace(tzinfo=datetime.UTC)
    else:
        return "created must be a date-time (e.g. 2026-12-02T14:00:00Z)"
    protocols = value.get("protocols")
    limit: frozenset[str] | None = None
    if protocols is not None:
        if not isinstance(protocols, list) or not all(isinstance(p, str) for p in protocols):
            return "protocols must be an array of strings"
        problem = protocols_problem(p.lower() for p in protocols)
        if problem is not None:
            return f"protocols: {problem}"
        limit = frozenset(p.lower() for p in protocols)
    return AppPassword(label, secret, created, limit)


def dump_app(app: AppPassword, toml_string: Callable[[str], str]) -> list[str]:
    """The TOML lines of one app password (`toml_string` quotes a string)."""
    lines = [
        f"label = {toml_string(app.label)}",
        f"secret = {toml_string(app.secret.encoded)}",
        f"created = {app.created.astimezone(datetime.UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}",
    ]
    if app.protocols is not None:
        listed = ", ".join(toml_string(p) for p in sorted(app.protocols))
        lines.append(f"protocols = [{listed}]")
    return lines


# ------------------------------------------------------------------ usage


def usage_path(users_file: Path) -> Path:
    return users_file.with_name(users_file.name + ".apps-used")


class UsageLog:
    """When and from where each app password was last used.

    `note` records in memory (microseconds, fine on the event loop); `save`
    writes the file and blocks: run it in a thread. Thread-safe."""

    def __init__(self, path: Path | None, keyring: Keyring | None = None) -> None:
        self._path = path
        self._keyring = keyring
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._usage: dict[tuple[str, str], AppUsage] = {}

    @classmethod
    def load(cls, path: Path, keyring: Keyring | None = None) -> UsageLog:
        """Read the file (blocking); a missing or unreadable one is empty:
        last-used times are a convenience, never a reason to refuse logins."""
        log = cls(path, keyring)
        try:
            data = unseal_secret(path, path.read_bytes(), keyring)
            raw = json.loads(data.decode("utf-8"))
        except (OSError, ValueError):
            return log
        if isinstance(raw, dict):
            log._usage = _parse_usage(raw)
        return log

    def note(self, user: str, label: str, client: str, at: datetime.datetime | None = None) -> None:
        when = (at or datetime.datetime.now(datetime.UTC)).replace(microsecond=0)
        with self._lock:
            self._usage[(user, label)] = AppUsage(when, client)

    def get(self, user: str, label: str) -> AppUsage | None:
        with self._lock:
            return self._usage.get((user, label))

    def forget(self, user: str, label: str | None = None) -> None:
        with self._lock:
            for key in [k for k in self._usage if k[0] == user and label in (None, k[1])]:
                del self._usage[key]

    def save(self) -> None:
        """Write the file atomically (blocking). No path: nothing to do."""
        if self._path is None:
            return
        with self._write_lock:
            with self._lock:
                snapshot = dict(self._usage)
            tree: dict[str, dict[str, dict[str, str]]] = {}
            for (user, label), usage in sorted(snapshot.items()):
                tree.setdefault(user, {})[label] = {
                    "at": usage.at.isoformat(),
                    "from": usage.client,
                }
            data = json.dumps(tree, indent=1, sort_keys=True).encode("utf-8") + b"\n"
            write_secret_file(self._path, data, self._keyring)


def _parse_usage(raw: Mapping[str, object]) -> dict[tuple[str, str], AppUsage]:
    result: dict[tuple[str, str], AppUsage] = {}
    for user, labels in raw.items():
        if not isinstance(labels, dict):
            continue
        for label, entry in labels.items():
            if not isinstance(entry, dict):
                continue
            at, client = entry.get("at"), entry.get("from")
            if not isinstance(at, str) or not isinstance(client, str):
                continue
            try:
                when = datetime.datetime.fromisoformat(at)
            except ValueError:
                continue
            result[(user, label)] = AppUsage(when, client)
    return result
