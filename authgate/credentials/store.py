"""The user store: a small TOML users file, and the answers SASL lookups need.

```toml
realm = "mail.example.org"   # DIGEST-MD5 realm the {DIGEST-MD5} hashes were made for
[users.alice]
secrets = ["{ARGON2ID}$argon2id$v=19$...", "{SCRAM-SHA-256}4096,...", "{NTLM}8846..."]
[users."bob@example.org"]
secrets = ["{SSHA}..."]
realm = "other.example.org"  # optional: this user's HA1 was made for another realm
full_name = "Bob"            # optional
password_changed = 2024-05-01  # optional (TOML date or ISO string)
backend = "store2"           # optional: a [backends] name this user's sessions go to
```

Which SASL mechanisms a server may offer depends on what is stored: a
challenge-response mechanism needs the password or its own form of secret
for *every* user (`offerable`), while PLAIN and LOGIN only need a secret
that can check a password. Checking passwords against bcrypt or argon2 is
slow on purpose, so `resolve` blocks and `aresolve` runs such a check in a
thread (a check with a fast digest it runs at once: cheaper than the hop).
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import os
import re
import secrets as _secrets
import threading
import tomllib
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final

from authgate.atrest.envelope import Keyring, unseal_secret, write_secret_file
from authgate.client_certs import normalise_fingerprint
from authgate.credentials.apps import (
    AppPassword,
    AppUsage,
    UsageLog,
    dump_app,
    label_problem,
    load_app,
    new_app_password,
    protocols_problem,
    usage_path,
)
from authgate.credentials.schemes import (
    SchemeError,
    StoredSecret,
    hash_password,
    parse_secret,
)
from authgate.sasl import MECHANISMS, MechanismInfo
from authgate.sasl.base import (
    LookupAnswer,
    LookupRequest,
    PasswordCheck,
    PasswordVerdict,
    ScramVerifier,
    SecretForm,
    SecretLookup,
)

__all__ = [
    "DEFAULT_WRITE_SCHEMES",
    "DIRECTORY_REASON",
    "MAX_LISTED_USERS",
    "StoreError",
    "StoreOffer",
    "User",
    "UserStore",
    "generate_secrets",
]

# What `authgate passwd` writes: one secret per family, so that every
# mechanism works. The trade-off: the {CRAM-MD5}, {DIGEST-MD5} and {NTLM}
# forms are password-equivalent (whoever reads the file can log in with
# those mechanisms without cracking anything) and {NTLM} and {DIGEST-MD5} are
# fast unsalted MD4/MD5 digests that crack like plaintext. A site that does
# not need those mechanisms should write only ARGON2ID and SCRAM.
DEFAULT_WRITE_SCHEMES: Final[tuple[str, ...]] = (
    "ARGON2ID",
    "SCRAM-SHA-256",
    "SCRAM-SHA-1",
    "CRAM-MD5",
    "DIGEST-MD5",
    "NTLM",
)

DIRECTORY_REASON: Final = "directory users are verified by LDAP bind"
# OAUTHBEARER, XOAUTH2, EXTERNAL: authgate.offers asks their own verifiers.
NOT_THE_STORES: Final = "not verified by the users file (see authgate.offers)"

# How many user names an offer lists per dropped mechanism; the count is kept.
MAX_LISTED_USERS: Final = 20

_TOP_KEYS: Final = frozenset({"realm", "users"})
_USER_KEYS: Final = frozenset(
    {
        "secrets",
        "realm",
        "full_name",
        "password_changed",
        "password_login",
        "apps",
        "cert_fingerprints",
        "backend",
    }
)
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_SCRAM_FORMS: Final = frozenset({SecretForm.SCRAM_SHA_1, SecretForm.SCRAM_SHA_256})
_FORM_SCHEMES: Final[dict[SecretForm, str]] = {
    SecretForm.CRAM_MD5: "{CRAM-MD5}",
    SecretForm.DIGEST_MD5: "{DIGEST-MD5}",
    SecretForm.NT_HASH: "{NTLM}",
    SecretForm.SCRAM_SHA_1: "{SCRAM-SHA-1}",
    SecretForm.SCRAM_SHA_256: "{SCRAM-SHA-256}",
}


class StoreError(ValueError):
    """The users file (or a change to it) is invalid. The message names the
    file and the key path, never a secret value."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class User:
    name: str
    secrets: tuple[StoredSecret, ...]
    # This user's own DIGEST-MD5 realm, when it differs from the file's.
    realm: str | None = None
    full_name: str | None = None
    password_changed: datetime.date | None = None
    # App passwords (authgate.credentials.apps), and whether the main
    # password may still log in (False: only app passwords, OAuth, EXTERNAL).
    apps: tuple[AppPassword, ...] = ()
    password_login: bool = True
    # SHA-256 fingerprints of TLS client certificates that log in as this
    # user with EXTERNAL (client_cert_user = "fingerprint").
    cert_fingerprints: tuple[str, ...] = ()
    # A [backends] name: where this user's sessions go (authgate.routing).
    backend: str | None = None

    def app(self, label: str) -> AppPassword | None:
        return next((a for a in self.apps if a.label == label), None)

    @functools.cached_property
    def password_checker(self) -> StoredSecret | None:
        """The secret a password check runs (`_cheapest_checker`), chosen
        once per user record: a login asks for it twice (`_quick`, then
        the check itself). A changed user is a new record (`replace`)."""
        return _cheapest_checker(self.secrets)

    @functools.cached_property
    def quick_password_check(self) -> bool:
        """Every secret a password check of this user runs takes
        microseconds (fine on the event loop); once per user record."""
        return all(s.quick_to_verify for s in _password_checkers(self))


@dataclass(frozen=True)
class StoreOffer:
    """The mechanisms a store can verify for every user, in the admin's order.

    `dropped` maps each mechanism left out to the (sorted) users that caused
    it, at most MAX_LISTED_USERS of them; `dropped_count` has the full count
    and `reasons` a sentence an admin can act on."""

    mechanisms: tuple[str, ...]
    dropped: dict[str, tuple[str, ...]] = field(default_factory=dict)
    dropped_count: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)

    @classmethod
    def password_only(cls, order: Sequence[str], reason: str = "") -> StoreOffer:
        """The offer for a verifier that can only check passwords (users
        verified by an LDAP bind, a relay backend keeping one-way hashes): it
        reveals no secret, so only cleartext mechanisms work. `reason` says
        why, for `authgate check`."""
        kept: list[str] = []
        dropped: dict[str, tuple[str, ...]] = {}
        counts: dict[str, int] = {}
        reasons: dict[str, str] = {}
        for name, info in _canonical(order):
            if info is None:
                dropped[name], counts[name], reasons[name] = (), 0, "unknown mechanism"
            elif info.cleartext:
                kept.append(name)
            else:
                dropped[name], counts[name], reasons[name] = (), 0, reason or DIRECTORY_REASON
        return cls(tuple(kept), dropped, counts, reasons)


def _canonical(order: Sequence[str]) -> list[tuple[str, MechanismInfo | None]]:
    """The admin's order, names upper-cased, duplicates dropped."""
    seen: set[str] = set()
    result: list[tuple[str, MechanismInfo | None]] = []
    for raw in order:
        name = raw.upper()
        if name not in seen:
            seen.add(name)
            result.append((name, MECHANISMS.get(name)))
    return result


# ------------------------------------------------------------------ TOML


def _toml_string(text: str) -> str:
    """A TOML basic string (TOML 1.0 section "String")."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_string(key)


def _name_problem(name: str) -> str | None:
    if not name:
        return "user name is empty"
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in name):
        return "user name contains a control character"
    return None


def _text_problem(text: str) -> str | None:
    # TOML (and UTF-8) cannot carry lone surrogates.
    if any(unicodedata.category(ch) == "Cs" for ch in text):
        return "contains a lone surrogate, which TOML cannot store"
    return None


# ------------------------------------------------------------------ store


class UserStore:
    """Users and their stored secrets; answers `LookupRequest`s.

    Thread-safe: `resolve` runs in worker threads while the event loop
    thread may replace a user's secrets."""

    def __init__(
        self,
        users: Iterable[User] = (),
        *,
        realm: str | None = None,
        path: str | os.PathLike[str] | None = None,
        executor: Executor | None = None,
    ) -> None:
        self._users: dict[str, User] = {}
        self._realm = realm
        self._path = Path(path) if path is not None else None
        self._executor = executor
        self._lock = threading.RLock()
        self._scram_cache: dict[tuple[str, SecretForm], ScramVerifier] = {}
        # The decoy secrets an unknown user is checked against (see
        # `prepare`); `_generation` counts changes, so a decoy built from an
        # older set of users is not kept.
        self._dummy: tuple[StoredSecret, ...] | None = None
        self._generation = 0
        self._keyring: Keyring | None = None  # set by load(): save() seals with it
        self._usage = UsageLog(None)  # app passwords' last use; load() gives it a file
        for user in users:
            self._users[user.name] = user

    # -- loading

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        executor: Executor | None = None,
        keyring: Keyring | None = None,
    ) -> UserStore:
        """Read a users file, decrypting it when it is encrypted at rest
        (`keyring`; see authgate.atrest)."""
        source = str(path)
        try:
            data = Path(path).read_bytes()
            text = unseal_secret(Path(path), data, keyring).decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise StoreError(source, "", f"cannot read: {exc.__class__.__name__}") from None
        store = cls.loads(text, source=source, executor=executor)
        store._path = Path(path)
        store._keyring = keyring
        store._usage = UsageLog.load(usage_path(Path(path)), keyring)
        return store

    @classmethod
    def loads(
        cls, text: str, *, source: str = "<users>", executor: Executor | None = None
    ) -> UserStore:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise StoreError(source, "", f"not valid TOML: {exc}") from None
        for key in data:
            if key not in _TOP_KEYS:
                raise StoreError(source, _toml_key(key), "unknown key (expected realm, users)")
        realm = data.get("realm")
        if realm is not None and not isinstance(realm, str):
            raise StoreError(source, "realm", "must be a string")
        users = data.get("users", {})
        if not isinstance(users, dict):
            raise StoreError(source, "users", "must be a table")
        loaded = [_load_user(source, name, value, realm) for name, value in users.items()]
        store = cls(loaded, realm=realm, executor=executor)
        store.prepare()
        return store

    def prepare(self) -> None:
        """Build the decoy secrets unknown users are checked against, now.

        Blocking (an imitation of an Argon2 or bcrypt hash is one such hash,
        ~100 ms): `load` and `loads` call it, and they run before the event
        loop starts or in a thread on reload. A store built or changed in
        code gets its decoy in the first lookup thread that needs it; the
        event loop never builds one (`_quick` sends the check to a thread)."""
        self._dummy_secrets()

    # -- reading

    @property
    def realm(self) -> str | None:
        """The DIGEST-MD5 realm of the file's {DIGEST-MD5} hashes."""
        return self._realm

    @property
    def path(self) -> Path | None:
        return self._path

    def names(self) -> list[str]:
        with self._lock:
            return list(self._users)

    def user(self, name: str) -> User | None:
        with self._lock:
            return self._users.get(name)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._users

    def __len__(self) -> int:
        with self._lock:
            return len(self._users)

    # -- lookups

    def resolve(self, request: LookupRequest) -> LookupAnswer:
        """Answer a mechanism's lookup. Blocking (password hashing): call it
        in a thread, e.g. through `aresolve`."""
        if isinstance(request, PasswordCheck):
            return self._check_password(request.authcid, request.password, request.protocol)
        if isinstance(request, SecretLookup):
            return self._lookup(request.authcid, request.form, request.realm)
        raise TypeError(f"not a lookup request: {type(request).__name__}")

    async def aresolve(
        self, request: LookupRequest, *, executor: Executor | None = None
    ) -> LookupAnswer:
        """`resolve`, in a worker thread when it means slow hashing, so
        hashing never blocks the loop. A check with a fast form (plaintext,
        a digest, NTLM, CRAM-MD5: microseconds, holding the GIL anyway) is
        answered at once: the hop to a thread costs more than the check."""
        chosen = executor or self._executor
        if self._quick(request):
            answer = self.resolve(request)
        elif chosen is None:
            answer = await asyncio.to_thread(self.resolve, request)
        else:
            answer = await asyncio.get_running_loop().run_in_executor(
                chosen, self.resolve, request
            )
        if isinstance(answer, PasswordVerdict) and answer.app_password and answer.identity:
            assert isinstance(request, PasswordCheck)
            self._usage.note(answer.identity, answer.app_password, request.client)
            # A small file write, in a thread: never on the event loop.
            await asyncio.get_running_loop().run_in_executor(chosen, self._usage.save)
        return answer

    # -- app passwords

    def user_for_fingerprint(self, fingerprint: str) -> str | None:
        """The user who lists this client-certificate fingerprint, if one
        (and only one) does."""
        with self._lock:
            found = [u.name for u in self._users.values() if fingerprint in u.cert_fingerprints]
        return found[0] if len(found) == 1 else None

    def app_usage(self, name: str, label: str) -> AppUsage | None:
        """When and from where app password `label` of `name` was last used."""
        return self._usage.get(name, label)

    def add_app_password(
        self, name: str, label: str, protocols: Sequence[str] | None = None
    ) -> str:
        """Generate an app password for existing user `name` and store its
        hash; returns the password (to be shown once). StoreError if the
        user is unknown, the label taken or bad, or a protocol unknown."""
        source = str(self._path) if self._path is not None else "<users>"
        where = f"users.{_toml_key(name)}.apps"
        problem = label_problem(label) or (
            protocols_problem(p.lower() for p in protocols) if protocols is not None else None
        )
        if problem is not None:
            raise StoreError(source, where, problem)
        with self._lock:
            user = self._users.get(name)
            if user is None:
                raise StoreError(source, f"users.{_toml_key(name)}", "no such user")
            if user.app(label) is not None:
                raise StoreError(source, where, f"an app password labelled {label!r} exists")
            password, app = new_app_password(label, protocols)
            self._users[name] = replace(user, apps=(*user.apps, app))
            self._forget(name)
        self._usage.forget(name, label)
        return password

    def revoke_app_password(self, name: str, label: str) -> bool:
        with self._lock:
            user = self._users.get(name)
            if user is None or user.app(label) is None:
                return False
            self._users[name] = replace(user, apps=tuple(a for a in user.apps if a.label != label))
            self._forget(name)
        self._usage.forget(name, label)
        return True

    def set_password_login(self, name: str, allowed: bool) -> None:
        with self._lock:
            user = self._users.get(name)
            if user is None:
                source = str(self._path) if self._path is not None else "<users>"
                raise StoreError(source, f"users.{_toml_key(name)}", "no such user")
            self._users[name] = replace(user, password_login=allowed)
            self._forget(name)

    def save_usage(self) -> None:
        """Write the app passwords' last-use file (blocking)."""
        self._usage.save()

    def _quick(self, request: LookupRequest) -> bool:
        if isinstance(request, PasswordCheck):
            user = self.user(request.authcid)
            if user is not None:
                return user.quick_password_check
            with self._lock:
                dummy = self._dummy
            if dummy is None:
                return False  # the decoy is built in the worker thread, never here
            checker = _cheapest_checker(dummy)
            return checker is None or checker.quick_to_verify
        if isinstance(request, SecretLookup):
            # Stored forms are read, not computed; only deriving a SCRAM
            # verifier from a plaintext password (PBKDF2) is slow.
            if request.form not in _SCRAM_FORMS:
                return True
            with self._lock:
                return (request.authcid, request.form) in self._scram_cache
        return False

    def _check_password(self, name: str, password: str, protocol: str = "") -> LookupAnswer:
        user = self.user(name)
        if user is None:
            # Spend what a known user with a wrong password costs, so the
            # answer's timing does not tell which users exist.
            dummy = _cheapest_checker(self._dummy_secrets())
            if dummy is not None:
                dummy.verify_password(password)
            return False
        # Every app password is tried (no early exit: the time taken does not
        # tell which label matched, or how many there are beyond the count).
        matched: AppPassword | None = None
        for app in user.apps:
            if app.secret.verify_password(password) and matched is None:
                matched = app
        if matched is not None:
            # One limited to other protocols is a wrong password here.
            return PasswordVerdict(matched.allows(protocol), name, matched.label)
        if not user.password_login:
            return False
        checker = user.password_checker
        return checker is not None and checker.verify_password(password)

    def _lookup(self, name: str, form: SecretForm, realm: str) -> LookupAnswer:
        user = self.user(name)
        if user is None or not user.password_login:
            # password_login = false: the main password, in any form, no
            # longer logs in; app passwords serve cleartext mechanisms only.
            return None
        # A stored form first: it is what the admin put there, and cheap.
        for secret in user.secrets:
            if SecretForm.PLAINTEXT not in secret.forms():
                answer = secret.secret_for(form, username=name, realm=realm)
                if answer is not None:
                    return answer
        for secret in user.secrets:
            if SecretForm.PLAINTEXT in secret.forms():
                if form in _SCRAM_FORMS:
                    return self._cached_scram(user, secret, form)
                answer = secret.secret_for(form, username=name, realm=realm)
                if answer is not None:
                    return answer
        return None

    def _cached_scram(self, user: User, secret: StoredSecret, form: SecretForm) -> LookupAnswer:
        # PBKDF2 with 4096 iterations on every SCRAM login would be wasted
        # work; a fixed salt per user is also what a stored verifier has.
        key = (user.name, form)
        with self._lock:
            cached = self._scram_cache.get(key)
        if cached is not None:
            return cached
        answer = secret.secret_for(form, username=user.name)
        if isinstance(answer, ScramVerifier):
            with self._lock:
                # Keep it only if the user was not changed meanwhile.
                if self._users.get(user.name) is user:
                    answer = self._scram_cache.setdefault(key, answer)
        return answer

    def _dummy_secrets(self) -> tuple[StoredSecret, ...]:
        """The decoy secrets, built if need be. Blocking: never call it on
        the event loop. The build runs outside the lock, which the event
        loop takes for every lookup."""
        with self._lock:
            if self._dummy is not None:
                return self._dummy
            generation = self._generation
            users = list(self._users.values())
        dummy = _make_dummy(users)
        with self._lock:
            if self._generation == generation and self._dummy is None:
                self._dummy = dummy
        return dummy

    # -- what can be offered

    def _usable_forms(self, user: User, realm: str | None) -> tuple[bool, set[SecretForm]]:
        can_check = False
        forms: set[SecretForm] = set()
        for secret in user.secrets:
            can_check = can_check or secret.can_verify_password
            provided = set(secret.forms())
            # An HA1 answers only for the realm it was computed with.
            if (
                SecretForm.PLAINTEXT not in provided
                and SecretForm.DIGEST_MD5 in provided
                and (realm is None or secret.realm != realm)
            ):
                provided.discard(SecretForm.DIGEST_MD5)
            forms |= provided
        return can_check, forms

    def _mechanisms_of(self, user: User, realm: str | None) -> set[str]:
        can_check, forms = self._usable_forms(user, realm)
        result: set[str] = set()
        for name, info in MECHANISMS.items():
            if info.bearer or info.external:
                continue  # a token verifier's or a client certificate's
            if info.cleartext:
                if can_check:
                    result.add(name)
            elif SecretForm.PLAINTEXT in forms or info.forms & forms:
                result.add(name)
        return result

    def mechanisms_for(self, name: str, *, realm: str | None = None) -> set[str]:
        """The mechanisms that can verify user `name` (empty if unknown).

        `realm` is the DIGEST-MD5 realm the server announces; it defaults to
        the file's realm, against which stored HA1s are checked."""
        user = self.user(name)
        if user is None:
            return set()
        return self._mechanisms_of(user, realm if realm is not None else self._realm)

    def offerable(self, order: Sequence[str], *, realm: str | None = None) -> StoreOffer:
        """The mechanisms of `order` that every user can use, order kept.

        A store whose passwords are one-way hashes offers only PLAIN and
        LOGIN whatever the admin listed; an empty store offers all of it."""
        effective = realm if realm is not None else self._realm
        with self._lock:
            users = list(self._users.values())
        per_user = [(u.name, self._mechanisms_of(u, effective)) for u in users]
        kept: list[str] = []
        dropped: dict[str, tuple[str, ...]] = {}
        counts: dict[str, int] = {}
        reasons: dict[str, str] = {}
        for name, info in _canonical(order):
            if info is None:
                dropped[name], counts[name], reasons[name] = (), 0, "unknown mechanism"
                continue
            if info.bearer or info.external:
                dropped[name], counts[name], reasons[name] = (), 0, NOT_THE_STORES
                continue
            missing = sorted(user for user, mechs in per_user if name not in mechs)
            if not missing:
                kept.append(name)
                continue
            dropped[name] = tuple(missing[:MAX_LISTED_USERS])
            counts[name] = len(missing)
            reasons[name] = _drop_reason(info, len(missing), effective)
        return StoreOffer(tuple(kept), dropped, counts, reasons)

    # -- changing and saving

    def set_user_secrets(
        self,
        name: str,
        secrets: Sequence[str],
        *,
        password_changed: datetime.date | None = None,
        realm: str | None = None,
    ) -> User:
        """Replace (or create) user `name`'s secrets, keeping their other
        keys. `realm` is the DIGEST-MD5 realm the secrets were made for, when
        it differs from the file's. Raises StoreError, naming the position
        of a bad secret."""
        source = str(self._path) if self._path is not None else "<users>"
        where = f"users.{_toml_key(name)}"
        problem = _name_problem(name)
        if problem is not None:
            raise StoreError(source, where, problem)
        with self._lock:
            old = self._users.get(name)
            if realm is None or realm == self._realm:
                realm = old.realm if old is not None and realm is None else None
            parsed = _parse_secrets(source, where, name, list(secrets), realm, self._realm)
            user = User(
                name=name,
                secrets=parsed,
                realm=realm,
                full_name=old.full_name if old is not None else None,
                password_changed=password_changed
                or (old.password_changed if old is not None else None),
                apps=old.apps if old is not None else (),
                password_login=old.password_login if old is not None else True,
                cert_fingerprints=old.cert_fingerprints if old is not None else (),
                backend=old.backend if old is not None else None,
            )
            self._users[name] = user
            self._forget(name)
            return user

    def remove_user(self, name: str) -> bool:
        with self._lock:
            removed = self._users.pop(name, None) is not None
            self._forget(name)
            return removed

    def _forget(self, name: str) -> None:
        for form in _SCRAM_FORMS:
            self._scram_cache.pop((name, form), None)
        self._dummy = None  # the most common profile may have changed
        self._generation += 1

    def dumps(self) -> str:
        """The users file as TOML (comments of a loaded file are not kept)."""
        with self._lock:
            users = list(self._users.values())
            realm = self._realm
        lines = [
            "# authgate users file. The secrets can be cracked offline or are",
            "# password-equivalent: keep this file readable by authgate only (0600).",
        ]
        if realm is not None:
            lines.append(f"realm = {_toml_string(realm)}")
        if not users:
            lines += ["", "[users]"]
        for user in users:
            lines += ["", f"[users.{_toml_key(user.name)}]"]
            if user.full_name is not None:
                lines.append(f"full_name = {_toml_string(user.full_name)}")
            if user.realm is not None:
                lines.append(f"realm = {_toml_string(user.realm)}")
            if user.password_changed is not None:
                lines.append(f"password_changed = {user.password_changed.isoformat()}")
            if not user.password_login:
                lines.append("password_login = false")
            if user.cert_fingerprints:
                listed = ", ".join(_toml_string(f) for f in user.cert_fingerprints)
                lines.append(f"cert_fingerprints = [{listed}]")
            if user.backend is not None:
                lines.append(f"backend = {_toml_string(user.backend)}")
            lines.append("secrets = [")
            lines += [f"    {_toml_string(s.encoded)}," for s in user.secrets]
            lines.append("]")
            for app in user.apps:
                lines += ["", f"[[users.{_toml_key(user.name)}.apps]]"]
                lines += dump_app(app, _toml_string)
        return "\n".join(lines) + "\n"

    def save(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write the file atomically with mode 0600 (sealed when the store was
        loaded with a keyring): a crash leaves the old file or the new one,
        never half of either."""
        target = Path(path) if path is not None else self._path
        if target is None:
            raise ValueError("no path to save to")
        write_secret_file(target, self.dumps().encode("utf-8"), self._keyring)
        if self._path is None:
            self._path = target
        return target


def _make_dummy(users: Sequence[User]) -> tuple[StoredSecret, ...]:
    # Imitate the most common set of schemes (and their costs): an
    # all-{SSHA} store must not make unknown users the slow ones.
    def profile(user: User) -> tuple[str, ...]:
        return tuple(s.scheme for s in user.secrets if s.can_verify_password)

    counts = Counter(profile(u) for u in users)
    if counts:
        common = counts.most_common(1)[0][0]
        model = next(u for u in users if profile(u) == common)
        return tuple(s.imitation() for s in model.secrets if s.can_verify_password)
    noise = _secrets.token_urlsafe(18)
    return (parse_secret(hash_password(noise, DEFAULT_WRITE_SCHEMES[0])),)


def _password_checkers(user: User) -> list[StoredSecret]:
    """The secrets a password check of `user` may run: every app password,
    then the cheapest main secret unless password_login is off."""
    checkers = [app.secret for app in user.apps]
    if user.password_login:
        main = user.password_checker
        if main is not None:
            checkers.append(main)
    return checkers


def _cheapest_checker(secrets: Iterable[StoredSecret]) -> StoredSecret | None:
    """The secret to check a password with: all of a user's forms describe
    the same password, so the cheapest gives the same answer (see
    StoredSecret.verify_cost). Unknown users imitate the same choice."""
    usable = [s for s in secrets if s.can_verify_password]
    return min(usable, key=lambda s: s.verify_cost, default=None)


def _drop_reason(info: MechanismInfo, count: int, realm: str | None) -> str:
    users = "1 user has" if count == 1 else f"{count} users have"
    if info.cleartext:
        return f"{users} no secret that can check a password"
    needed = " or ".join(sorted(_FORM_SCHEMES[f] for f in info.forms))
    if SecretForm.DIGEST_MD5 in info.forms:
        needed += f" for realm {realm!r}" if realm is not None else " (no realm is set)"
    return f"{users} neither the password ({{PLAIN}}) nor a {needed} secret"


def _load_user(source: str, name: str, value: object, realm: str | None) -> User:
    where = f"users.{_toml_key(name)}"
    problem = _name_problem(name)
    if problem is not None:
        raise StoreError(source, where, problem)
    if not isinstance(value, dict):
        raise StoreError(source, where, "must be a table")
    for key in value:
        if key not in _USER_KEYS:
            expected = ", ".join(sorted(_USER_KEYS))
            raise StoreError(source, f"{where}.{_toml_key(key)}", f"unknown key ({expected})")
    user_realm = value.get("realm")
    if user_realm is not None and not isinstance(user_realm, str):
        raise StoreError(source, f"{where}.realm", "must be a string")
    full_name = value.get("full_name")
    if full_name is not None and not isinstance(full_name, str):
        raise StoreError(source, f"{where}.full_name", "must be a string")
    changed = _load_date(source, f"{where}.password_changed", value.get("password_changed"))
    backend = value.get("backend")
    if backend is not None and (not isinstance(backend, str) or not backend):
        raise StoreError(source, f"{where}.backend", "must be a [backends] name")
    if "secrets" not in value:
        raise StoreError(source, f"{where}.secrets", "missing")
    texts = value["secrets"]
    if not isinstance(texts, list):
        raise StoreError(source, f"{where}.secrets", "must be an array of strings")
    secrets = _parse_secrets(source, where, name, texts, user_realm, realm)
    password_login = value.get("password_login", True)
    if not isinstance(password_login, bool):
        raise StoreError(source, f"{where}.password_login", "must be true or false")
    raw_apps = value.get("apps", [])
    if not isinstance(raw_apps, list):
        raise StoreError(source, f"{where}.apps", "must be an array of tables ([[...apps]])")
    apps: list[AppPassword] = []
    for index, raw in enumerate(raw_apps):
        app = load_app(raw)
        if isinstance(app, str):
            raise StoreError(source, f"{where}.apps[{index}]", app)
        if any(a.label == app.label for a in apps):
            raise StoreError(source, f"{where}.apps[{index}]", f"label {app.label!r} repeated")
        apps.append(app)
    prints = value.get("cert_fingerprints", [])
    if not isinstance(prints, list):
        raise StoreError(source, f"{where}.cert_fingerprints", "must be an array of strings")
    fingerprints: list[str] = []
    for index, text in enumerate(prints):
        normal = normalise_fingerprint(text) if isinstance(text, str) else None
        if normal is None:
            raise StoreError(
                source, f"{where}.cert_fingerprints[{index}]", "is not a SHA-256 fingerprint"
            )
        fingerprints.append(normal)
    return User(
        name,
        secrets,
        user_realm,
        full_name,
        changed,
        tuple(apps),
        password_login,
        tuple(fingerprints),
        backend,
    )


def _load_date(source: str, key: str, value: object) -> datetime.date | None:
    if value is None:
        return None
    # tomllib gives datetime for date-times; a datetime is also a date.
    if isinstance(value, datetime.datetime):
        raise StoreError(source, key, "must be a date (YYYY-MM-DD), not a date-time")
    if isinstance(value, datetime.date):
        return value
    if isinstance(value, str):
        try:
            return datetime.date.fromisoformat(value)
        except ValueError:
            pass
    raise StoreError(source, key, "must be a date (YYYY-MM-DD)")


def _parse_secrets(
    source: str,
    where: str,
    name: str,
    texts: Sequence[object],
    user_realm: str | None,
    store_realm: str | None,
) -> tuple[StoredSecret, ...]:
    if not texts:
        # A user nobody can log in as would veto every mechanism in
        # `offerable`; remove the user instead.
        raise StoreError(source, f"{where}.secrets", "must list at least one secret")
    realm = user_realm if user_realm is not None else store_realm
    parsed: list[StoredSecret] = []
    for index, text in enumerate(texts):
        key = f"{where}.secrets[{index}]"
        if not isinstance(text, str):
            raise StoreError(source, key, "must be a string")
        problem = _text_problem(text)
        if problem is not None:
            raise StoreError(source, key, problem)
        try:
            secret = parse_secret(text, username=name, realm=realm)
        except SchemeError as exc:
            raise StoreError(source, key, str(exc)) from None
        if secret.scheme == "DIGEST-MD5" and realm is None:
            raise StoreError(
                source,
                key,
                "{DIGEST-MD5} is bound to a realm: set `realm` at the top of the file "
                "or in this user's table",
            )
        parsed.append(secret)
    return tuple(parsed)


def generate_secrets(
    username: str,
    password: str,
    realm: str | None,
    schemes: Sequence[str] = DEFAULT_WRITE_SCHEMES,
) -> list[str]:
    """The ``{SCHEME}`` strings `authgate passwd` stores for a user.

    The default makes every mechanism work; see DEFAULT_WRITE_SCHEMES for
    what that costs. ``DIGEST-MD5`` needs `realm` (the server's realm)."""
    result: list[str] = []
    for scheme in schemes:
        if scheme.upper() == "DIGEST-MD5" and realm is None:
            raise ValueError("DIGEST-MD5 needs a realm: set one or leave DIGEST-MD5 out")
        result.append(hash_password(password, scheme, username=username, realm=realm))
    return result
