"""Where a user's session goes: per-user backend routing, pure.

A listener has a default backend (one address, or a pool of them). A user
may be sent elsewhere, looked up in this order (the first that names a
backend wins):

1. the user's own entry in the users file (`backend = "store2"`),
2. a directory attribute (`[directory] backend_attribute`), its value
   mapped through `[routing] hosts` to a backend name,
3. the routing table file (`[routing] table`: user, then domain),
4. the listener's default backend.

A backend with one address pins its users to it: when that address is
down they get the protocol's temporary failure, never another store (their
mail is not there). A pool's members are interchangeable (submission
relays, replicas): rendezvous hashing (highest random weight) gives each
user an order of the members, so a user sticks to one member while the
pool is unchanged, only the users of a removed member move, and when a
member is down its users go to their next member.

No I/O and no clock here: the driver passes `now` and keeps the health
record (`Health`); the routing table is parsed from text (`parse_table`).
"""

from __future__ import annotations

import hashlib
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from authgate.config import Address, BackendSettings

M = TypeVar("M")


def rendezvous_order(user: str, members: Sequence[M], key: Callable[[M], str]) -> list[M]:
    """`members` in the order `user` tries them: by a keyed hash of (member,
    user), highest first. Removing a member changes no other member's
    score, so only the users whose first choice it was move."""
    data = user.encode("utf-8", "surrogatepass")

    def score(member: M) -> tuple[bytes, str]:
        salt = key(member).encode("utf-8")
        digest = hashlib.blake2b(
            data, digest_size=8, key=salt[:64], person=b"authgate-route"
        ).digest()
        return digest, key(member)  # the name breaks (astronomically unlikely) ties

    return sorted(members, key=score, reverse=True)


@dataclass(frozen=True)
class Backend:
    """A named backend, a mail store: one address, or a pool of
    interchangeable ones, for every protocol (`address`, `addresses`) or
    per protocol (`imap`, `pop3`, `smtp`, ...), since one store answers IMAP,
    POP3 and submission on different ports and a user's choice names the
    store."""

    name: str
    members: tuple[BackendSettings, ...]
    per_protocol: Mapping[str, tuple[BackendSettings, ...]] = field(default_factory=dict)
    # Active health check interval in seconds (0: off; -1: not given).
    health_check: float = -1.0
    # Given in the config as [backends.NAME] (not a listener's own backend).
    named: bool = True
    # RFC 2221 login referral ("imap://host/"): for a protocol this backend
    # has no address for, its users are told to go there (IMAP only).
    referral: str | None = None

    def members_for(self, protocol: str) -> tuple[BackendSettings, ...]:
        """The addresses a listener of `protocol` uses (empty: none)."""
        return self.per_protocol.get(protocol) or self.members

    def settings_any(self) -> BackendSettings:
        """The settings every member shares (TLS, master user, ...)."""
        return self.all_members()[0][1]

    def pool(self, protocol: str) -> bool:
        return len(self.members_for(protocol)) > 1

    def all_members(self) -> list[tuple[str | None, BackendSettings]]:
        """(protocol or None for `address`, settings) of every address."""
        found: list[tuple[str | None, BackendSettings]] = [(None, m) for m in self.members]
        for protocol, members in self.per_protocol.items():
            found.extend((protocol, m) for m in members)
        return found

    def describe(self, protocol: str) -> str:
        members = self.members_for(protocol)
        addresses = ", ".join(str(m.address) for m in members) or "no address"
        kind = f"pool of {len(members)}" if len(members) > 1 else "single"
        return f"{self.name} ({kind}: {addresses})"


class TableError(ValueError):
    """A routing table file that cannot be used."""


@dataclass(frozen=True)
class RouteTable:
    """[routing] table: user -> backend name, domain -> backend name."""

    users: Mapping[str, str] = field(default_factory=dict)
    domains: Mapping[str, str] = field(default_factory=dict)

    def lookup(self, user: str) -> tuple[str, str] | None:
        """(backend name, why) for `user`, or None."""
        name = self.users.get(user) or self.users.get(user.lower())
        if name is not None:
            return name, "routing table (user)"
        _local, at, domain = user.rpartition("@")
        if at and domain:
            name = self.domains.get(domain.lower().rstrip("."))
            if name is not None:
                return name, f"routing table (domain {domain.lower()})"
        return None

    def names(self) -> set[str]:
        return set(self.users.values()) | set(self.domains.values())


def parse_table(text: str, source: str, known: Sequence[str]) -> RouteTable:
    """A routing table file's TOML text:

        [users]
        "bob@example.org" = "store2"
        [domains]
        "example.net" = "store1"

    Every name must be one of `known` (the [backends] names)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TableError(f"{source}: not valid TOML: {exc}") from None
    for key in data:
        if key not in ("users", "domains"):
            raise TableError(f"{source}: {key}: unknown key (expected users, domains)")
    parts: dict[str, dict[str, str]] = {}
    for section in ("users", "domains"):
        raw = data.get(section, {})
        if not isinstance(raw, dict):
            raise TableError(f"{source}: {section}: is not a table")
        entries: dict[str, str] = {}
        for who, name in raw.items():
            where = f"{source}: {section}.{who!r}"
            if not isinstance(name, str):
                raise TableError(f"{where}: {name!r} is not a backend name")
            if name not in known:
                have = ", ".join(sorted(known)) or "none"
                raise TableError(f"{where}: {name!r} is not a [backends] name (have: {have})")
            if not who or not who.isprintable():
                raise TableError(f"{where}: is not a user or domain name")
            key = who.lower().rstrip(".") if section == "domains" else who
            entries[key] = name
        parts[section] = entries
    return RouteTable(users=parts["users"], domains=parts["domains"])


class Health:
    """Which addresses are down, until when (seconds on the driver's
    clock). Passive: a failed connect or a timeout marks an address down
    for `down_for`; active checks mark it down or up. Shared by every
    listener of a process (one address, one state)."""

    def __init__(self) -> None:
        self._down: dict[str, tuple[float, str]] = {}

    def is_up(self, address: Address, now: float) -> bool:
        if not self._down:  # the common case, on every login: nothing down
            return True
        entry = self._down.get(str(address))
        if entry is None:
            return True
        if entry[0] <= now:
            del self._down[str(address)]
            return True
        return False

    def mark_down(self, address: Address, now: float, down_for: float, why: str) -> bool:
        """Record it; True if it was up (worth a log line)."""
        was_up = self.is_up(address, now)
        self._down[str(address)] = (now + down_for, why)
        return was_up

    def mark_up(self, address: Address) -> bool:
        """True if it was down."""
        return self._down.pop(str(address), None) is not None

    def down(self, now: float) -> dict[str, str]:
        """The addresses down now, with why."""
        return {a: why for a, (until, why) in self._down.items() if until > now}

    def clear(self) -> None:
        self._down.clear()


@dataclass(frozen=True)
class Route:
    """Where a user goes, and why."""

    user: str | None
    backend: Backend
    protocol: str
    why: str
    # The members to try, in order, that are up now (empty: none is: the
    # user gets the protocol's temporary failure).
    candidates: tuple[BackendSettings, ...]
    # Every member in the user's order, up or down (for explanations).
    order: tuple[BackendSettings, ...]
    # The RFC 2221 URL to send the user to instead (candidates then empty).
    referral: str | None = None

    @property
    def available(self) -> bool:
        return bool(self.candidates)

    def explain(self) -> str:
        lines = [f"backend {self.backend.describe(self.protocol)}", f"because: {self.why}"]
        if len(self.order) > 1:
            lines.append("order: " + ", ".join(str(m.address) for m in self.order))
        chosen = str(self.candidates[0].address) if self.candidates else "none (all down)"
        lines.append(f"connects to: {chosen}")
        return "\n".join(lines)


@dataclass(frozen=True)
class UserHints:
    """What the credential side knows about a user's backend."""

    entry: str | None = None  # users file `backend = "..."`
    directory_host: str | None = None  # the directory attribute's value


class RoutingError(ValueError):
    """A per-user choice names no backend (stale users file, directory value
    missing from [routing] hosts): the user gets a temporary failure."""


def choose(
    user: str | None,
    protocol: str,
    default: Backend,
    backends: Mapping[str, Backend],
    *,
    hints: UserHints = UserHints(),
    table: RouteTable | None = None,
    hosts: Mapping[str, str] | None = None,
    health: Health | None = None,
    now: float = 0.0,
    spread: str = "",
) -> Route:
    """The backend `user` (None: not known, e.g. SMTP pass-through) goes to.
    `spread`: what orders a pool's members when no user is known (the
    client's address), so that such sessions still spread."""
    backend, why = _pick(user, default, backends, hints, table, hosts or {})
    members = backend.members_for(protocol)
    if not members and backend.referral is not None and user is not None:
        url = referral_url(backend.referral, user)
        return Route(user, backend, protocol, why, candidates=(), order=(), referral=url)
    if not members:
        raise RoutingError(f"{why} names backend {backend.name!r}, which has no {protocol} address")
    if len(members) > 1:
        order = tuple(rendezvous_order(user or spread, members, lambda m: str(m.address)))
    else:
        order = members  # one member: nothing to hash
    up = tuple(m for m in order if health is None or health.is_up(m.address, now))
    return Route(user=user, backend=backend, protocol=protocol, why=why, candidates=up, order=order)


def referral_url(base: str, user: str) -> str:
    """RFC 2221 section 4.1 / RFC 5092: the login referral for `user`,
    "imap://host/" -> "imap://user@host/", the name percent-encoded (no CR,
    LF, space or bracket can reach the reply)."""
    scheme, _, rest = base.partition("://")
    return f"{scheme}://{urllib.parse.quote(user, safe='')}@{rest}"


def _pick(
    user: str | None,
    default: Backend,
    backends: Mapping[str, Backend],
    hints: UserHints,
    table: RouteTable | None,
    hosts: Mapping[str, str],
) -> tuple[Backend, str]:
    if user is None:
        return default, "no user known yet: the listener's default backend"
    if hints.entry is not None:
        return _named(backends, hints.entry, "users file entry"), "users file entry"
    if hints.directory_host is not None:
        host = hints.directory_host.strip().lower().rstrip(".")
        name = hosts.get(host)
        if name is None:
            raise RoutingError(f"directory names host {host!r}, which [routing] hosts does not map")
        why = f"directory attribute ({host})"
        return _named(backends, name, why), why
    if table is not None:
        found = table.lookup(user)
        if found is not None:
            return _named(backends, found[0], found[1]), found[1]
    return default, "the listener's default backend"


def _named(backends: Mapping[str, Backend], name: str, why: str) -> Backend:
    backend = backends.get(name)
    if backend is None:
        raise RoutingError(f"{why} names backend {name!r}, which is not in [backends]")
    return backend
