"""Brute-force defence: how long to stall a failed login, and whom to turn away.

Pure and clock-injected: the proxy asks `Guard.check()` before it serves a
client, reports each failed or successful authentication, and sleeps for
the delay `Guard.failure()` returns before it sends the refusal. Nothing here
sleeps, schedules or touches a socket, so every rule is testable with a fake
clock.

The rules, after the mail servers that already do this:

* Every failed authentication is answered after `failure_delay` seconds, and
  an address with recent failures waits longer, growing with each one
  (Dovecot's auth penalty: 2, 4, 8, then capped at 15 s). A sequential
  guesser is slowed; parallel connections are not, hence the block.
* `block_after` failures within `block_window` seconds block the address for
  `block_for` seconds (Kerio's anti-hammering: 10 in 60 s, 5 minutes).
* Clients are grouped by network: an IPv6 host owns at least a /64 and can
  rotate through it at will, so counting single IPv6 addresses counts nothing.
  An IPv4-mapped IPv6 peer (dual-stack socket) is the IPv4 client it wraps.
* The same wrong password for the same user, sent again (a phone still
  holding the password from before a change), is one guess, not many:
  Dovecot skips the penalty increase when username+password matches a recent
  attempt. We recognise it by a keyed hash, never by storing the password.
* Trusted networks (webmail, the office) are never penalised beyond the base
  delay and never blocked.
* An optional per-user lockout, off by default: it lets anyone who knows a
  user name lock that user out.

Storage is behind `GuardBackend`, so the in-memory `MemoryState` can be
replaced by shared state (e.g. Redis) when several proxies must agree,
without touching the counting rules, which are pure functions of a `Record`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import secrets
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import ClassVar, Final, Protocol, TypeVar

from authgate.policy import ExemptNetworks, IPAddress, client_ip
from authgate.settings import Range

Clock = Callable[[], float]
T = TypeVar("T")

_NOT_BLOCKED = -math.inf
CLIENT_CACHE = 4096  # addresses whose (key, trusted?) a Guard remembers


@dataclass(frozen=True)
class DefenceSettings:
    """Brute-force defence settings. Times are in seconds."""

    failure_delay: float = 2.0  # before every failed-auth reply, trusted clients too
    # Extra delay for an address with 1, 2, 3, 4+ recent (unforgiven) failures.
    penalties: tuple[float, ...] = (2.0, 4.0, 8.0, 15.0)
    block_after: int = 10  # counted failures ...
    block_window: float = 60.0  # ... within this many seconds ...
    block_for: float = 300.0  # ... block the address this long
    trusted: ExemptNetworks = field(default_factory=ExemptNetworks)
    ipv4_prefix: int = 32
    ipv6_prefix: int = 64
    # Per-user lockout: `user_lockout_after` failures within
    # `user_lockout_window` lock the user for `user_lockout_for`. Off (None)
    # by default, because anyone who knows a user name can lock that user out.
    user_lockout_after: int | None = None
    # Longer than block_window: guessing one user is spread over many
    # addresses and goes slowly, or the address block would catch it.
    user_lockout_window: float = 900.0
    user_lockout_for: float = 900.0
    # Hard cap on tracked keys, separately for addresses and for users, so a
    # flood of made-up user names cannot evict the address blocks.
    max_tracked: int = 100_000

    # What a configuration may set ([defence] in authgate.toml). Settings
    # built in code need only be sound (the checks below): tests use tiny
    # caps and windows that no operator should.
    RANGES: ClassVar[Mapping[str, Range]] = {
        "failure_delay": Range(0, 60),
        "block_after": Range(1, 1_000_000, integer=True),
        "block_window": Range(1, 86400),
        "block_for": Range(1, 30 * 86400),
        # A /8 is as coarse as an IPv4 block may sensibly get.
        "ipv4_prefix": Range(8, ipaddress.IPV4LENGTH, integer=True),
        "ipv6_prefix": Range(16, ipaddress.IPV6LENGTH, integer=True),
        "user_lockout_after": Range(1, 1_000_000, integer=True),
        "user_lockout_window": Range(1, 30 * 86400),
        "user_lockout_for": Range(1, 30 * 86400),
        "max_tracked": Range(100, 100_000_000, integer=True),
    }
    PENALTY: ClassVar[Range] = Range(0, 3600)  # each of `penalties`

    def __post_init__(self) -> None:
        def seconds(name: str, value: float, *, positive: bool) -> None:
            ok = math.isfinite(value) and (value > 0 if positive else value >= 0)
            if not ok:
                need = "> 0" if positive else ">= 0"
                raise ValueError(f"{name} must be a finite number {need}, not {value!r}")

        seconds("failure_delay", self.failure_delay, positive=False)
        for i, penalty in enumerate(self.penalties):
            seconds(f"penalties[{i}]", penalty, positive=False)
        seconds("block_window", self.block_window, positive=True)
        seconds("block_for", self.block_for, positive=True)
        seconds("user_lockout_window", self.user_lockout_window, positive=True)
        seconds("user_lockout_for", self.user_lockout_for, positive=True)
        if self.block_after < 1:
            raise ValueError(f"block_after must be >= 1, not {self.block_after!r}")
        if self.user_lockout_after is not None and self.user_lockout_after < 1:
            raise ValueError(
                f"user_lockout_after must be >= 1 or unset, not {self.user_lockout_after!r}"
            )
        # Sound: any prefix of the address (a configuration: RANGES).
        for name, bits in (("ipv4", ipaddress.IPV4LENGTH), ("ipv6", ipaddress.IPV6LENGTH)):
            prefix = getattr(self, f"{name}_prefix")
            if not 0 <= prefix <= bits:
                raise ValueError(f"{name}_prefix must be 0..{bits}, not {prefix!r}")
        if self.max_tracked < 1:
            raise ValueError(f"max_tracked must be >= 1, not {self.max_tracked!r}")

    @property
    def max_delay(self) -> float:
        """The longest delay `Guard.failure()` ever returns."""
        return self.failure_delay + max(self.penalties, default=0.0)

    def penalty(self, level: int) -> float:
        """Extra delay for an address with `level` recent failures."""
        if level <= 0 or not self.penalties:
            return 0.0
        return self.penalties[min(level, len(self.penalties)) - 1]


@dataclass(frozen=True)
class Verdict:
    """`Guard.check()`'s answer: refuse the client for `retry_after` seconds?"""

    blocked: bool
    retry_after: float = 0.0


# The answer to nearly every check (made once: a login asks three times).
NOT_BLOCKED: Final = Verdict(blocked=False)


@dataclass(frozen=True)
class Strike:
    """One counted failed guess."""

    at: float  # clock time of the (latest) attempt
    # Keyed hash of user+password, to recognise the same guess sent again;
    # None when the mechanism never showed us the password (CRAM-MD5, SCRAM,
    # ...): such failures always count.
    fingerprint: bytes | None
    # A later success from the address reset the penalty; the strike still
    # counts toward the block (else one valid account would let an attacker
    # reset the block count at will).
    forgiven: bool = False


@dataclass(frozen=True)
class Record:
    """The stored state of one address or one user."""

    strikes: tuple[Strike, ...] = ()  # counted failures inside the window, oldest first
    until: float = _NOT_BLOCKED  # blocked (address) or locked (user) until this clock time
    # After this clock time the record means nothing and may be dropped.
    expires_at: float = _NOT_BLOCKED


class GuardBackend(Protocol):
    """Where `Guard` keeps its records.

    Keys are short strings ("a:<network>", "u:<user>"); a record is dropped
    when its `expires_at` has passed (by the backend's idea of `Guard`'s
    clock: a backend shared between processes needs a shared clock, i.e.
    `clock=time.time`, and a shared `secret` so fingerprints agree).

    `update` must apply `change` atomically: it is a read-modify-write of one
    key. A Redis backend would WATCH the key, GET and decode the record, run
    `change`, then MULTI / SET ... PXAT expires_at (or DEL) / EXEC, retrying
    on conflict; `change` is pure, so running it again is safe.
    """

    def get(self, key: str) -> Record | None:
        """The live record for `key`, or None."""
        ...

    def update(self, key: str, change: Callable[[Record | None], tuple[Record | None, T]]) -> T:
        """Replace the record with `change(old)[0]` (None deletes it) and
        return `change(old)[1]`."""
        ...

    def prune(self) -> int:
        """Drop expired records now; the number dropped (0 if the backend
        expires them by itself)."""
        ...


class MemoryState:
    """In-process `GuardBackend`: a dict in least-recently-used order.

    Memory is bounded twice: a record is dropped once it expires, and at most
    `max_keys` records are kept (the least recently used goes first). Expired
    records at the cold end are dropped on each write, so the cost is O(1)
    amortised per call; `prune()` sweeps everything and is for a periodic
    timer, not the hot path.
    """

    def __init__(self, clock: Clock, max_keys: int) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, not {max_keys!r}")
        self._clock = clock
        self._max_keys = max_keys
        self._records: OrderedDict[str, Record] = OrderedDict()

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, key: object) -> bool:
        return key in self._records

    def get(self, key: str) -> Record | None:
        record = self._records.get(key)
        if record is None:
            return None
        if record.expires_at <= self._clock():
            del self._records[key]
            return None
        # Reads count as use: a blocked client that keeps knocking keeps its
        # block from being evicted by a flood of newcomers.
        self._records.move_to_end(key)
        return record

    def update(self, key: str, change: Callable[[Record | None], tuple[Record | None, T]]) -> T:
        new, result = change(self.get(key))
        now = self._clock()
        if new is None or new.expires_at <= now:
            self._records.pop(key, None)
        else:
            self._records[key] = new
            self._records.move_to_end(key)
        self._trim(now)
        return result

    def records(self, prefix: str, limit: int) -> list[tuple[str, Record]]:
        """Live records whose key starts with `prefix` (at most `limit`)."""
        now = self._clock()
        out = []
        for key, record in self._records.items():
            if key.startswith(prefix) and record.expires_at > now:
                out.append((key, record))
                if len(out) >= limit:
                    break
        return out

    def prune(self) -> int:
        now = self._clock()
        expired = [key for key, rec in self._records.items() if rec.expires_at <= now]
        for key in expired:
            del self._records[key]
        return len(expired)

    def _trim(self, now: float) -> None:
        records = self._records
        while records:
            key, oldest = next(iter(records.items()))
            if len(records) <= self._max_keys and oldest.expires_at > now:
                return
            del records[key]


class Guard:
    """The brute-force defence for one proxy (or, with a shared backend, for
    a group of them).

    Call order for one authentication: `check(address)` when the client
    connects (and again before each attempt on a long connection); refuse
    if blocked. Once the user name is known, `user_locked(user, address)`;
    refuse as a failed authentication if locked, without checking the
    password. Then `failure(...)` (sleep for the result before replying) or
    `success(...)`.

    Choice on trusted addresses: they get the base delay only and are never
    blocked, and a lockout does not stop them (`user_locked` is False from a
    trusted address), so an outside attacker cannot lock a user out of the
    office. Their failures do count toward the user's lockout: the lockout
    protects the account, whoever guesses, and a stale password re-sent from
    a trusted phone counts once anyway.
    """

    def __init__(
        self,
        settings: DefenceSettings,
        *,
        clock: Clock = time.monotonic,
        secret: bytes | None = None,
        backend: GuardBackend | None = None,
    ) -> None:
        if secret is not None and len(secret) < 16:
            raise ValueError("secret must be at least 16 bytes")
        self._settings = settings
        # address -> (key, trusted?): a login asks it 3-5 times of one
        # address (check, user_locked, success); bounded, cleared with the
        # settings it depends on.
        self._clients: dict[str | IPAddress, tuple[str, bool]] = {}
        self._clock = clock
        # Per process by default: fingerprints only need to match within the
        # lifetime of the counters, and a fresh key makes them useless offline.
        self._secret = secret if secret is not None else secrets.token_bytes(32)
        self.addresses: GuardBackend
        self.users: GuardBackend
        if backend is None:
            self.addresses = MemoryState(clock, settings.max_tracked)
            self.users = MemoryState(clock, settings.max_tracked)
        else:
            self.addresses = self.users = backend  # keys carry "a:" / "u:" prefixes

    # ------------------------------------------------------------- keys

    def fingerprint(self, username: str | bytes, password: str | bytes) -> bytes:
        """A keyed hash (HMAC-SHA256) of user+password, to recognise the same
        wrong password sent again without storing it."""
        user = _user_name(username).encode("utf-8", "surrogatepass")
        if isinstance(password, str):
            password = password.encode("utf-8", "surrogatepass")
        # Length-prefixed, so ("ab", "c") and ("a", "bc") differ.
        message = b"authgate-defence-v1\0" + len(user).to_bytes(4, "big") + user + password
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    def address_key(self, address: str | IPAddress) -> str:
        """The key an address is counted under: its network, e.g.
        "a:2001:db8:1:2::/64", "a:198.51.100.7/32"."""
        return self._client(address)[0]

    @property
    def settings(self) -> DefenceSettings:
        return self._settings

    @settings.setter
    def settings(self, settings: DefenceSettings) -> None:
        self._settings = settings  # a reload: keys and trust may differ now
        self._clients.clear()

    def _client(self, address: str | IPAddress) -> tuple[str, bool]:
        """(key, trusted?) for `address`, parsing it once."""
        known = self._clients.get(address)
        if known is not None:
            return known
        ip = client_ip(address)
        if ip is None:
            # Not an IP peer (a Unix socket, say): its own bucket, never an error.
            known = f"a:?{address}", False
        else:
            known = _network_key(ip, self._settings), ip in self._settings.trusted
        if len(self._clients) >= CLIENT_CACHE:
            self._clients.clear()
        self._clients[address] = known
        return known

    # ------------------------------------------------------------ queries

    def check(self, address: str | IPAddress) -> Verdict:
        """Is `address` blocked, and for how long still?"""
        key, trusted = self._client(address)
        if trusted:
            return NOT_BLOCKED
        record = self.addresses.get(key)
        now = self._clock()
        if record is None or record.until <= now:
            return NOT_BLOCKED
        return Verdict(blocked=True, retry_after=record.until - now)

    def user_locked(self, username: str | bytes, address: str | IPAddress | None = None) -> bool:
        """Is `username` locked out (for clients at `address`)?"""
        if self.settings.user_lockout_after is None:
            return False
        if address is not None and self._client(address)[1]:
            return False
        record = self.users.get(_user_key(username))
        return record is not None and record.until > self._clock()

    # ------------------------------------------------------------ reports

    def failure(
        self,
        address: str | IPAddress,
        username: str | bytes | None,
        fingerprint: bytes | None = None,
    ) -> float:
        """Record a failed authentication; the delay (seconds) to wait before
        the client is told.

        `fingerprint` is `self.fingerprint(user, password)` when the mechanism
        revealed the password (PLAIN, LOGIN, IMAP LOGIN, USER/PASS), else None.
        Do not call this for temporary failures (backend down): the
        credentials may have been right.
        """
        s = self.settings
        now = self._clock()
        if username is not None and s.user_lockout_after is not None:
            after = s.user_lockout_after
            self.users.update(
                _user_key(username),
                lambda old: _user_failure(old, now, fingerprint, s, after),
            )
        key, trusted = self._client(address)
        if trusted:
            return s.failure_delay
        return self.addresses.update(key, lambda old: _address_failure(old, now, fingerprint, s))

    def success(self, address: str | IPAddress, username: str | bytes) -> None:
        """Record a successful authentication: the address's penalty starts
        again from the base delay, and the user's failure count is cleared.
        Neither an address block nor a user lockout in force is lifted, and
        the address's failures still count toward its block."""
        now = self._clock()
        if self.settings.user_lockout_after is not None:
            self.users.update(_user_key(username), lambda old: (_still_barred(old, now), None))
        key, trusted = self._client(address)
        if not trusted:
            self.addresses.update(key, lambda old: (_forgive(old, now), None))

    # ------------------------------------------------- operator's actions
    #
    # `authgate block` / `unblock` / `status` through the control socket
    # (authgate.proxy.control). A shared backend (Redis) makes them act on
    # every instance at once.

    def block(self, address: str | IPAddress, seconds: float) -> str:
        """Block `address`'s network for `seconds` (trusted or not: the
        operator said so); the network key."""
        key = self.address_key(address)
        now = self._clock()
        until = now + seconds

        def change(old: Record | None) -> tuple[Record | None, None]:
            strikes = old.strikes if old is not None else ()
            expires = max(old.expires_at if old is not None else until, until)
            return Record(strikes, until, expires), None

        self.addresses.update(key, change)
        return key

    def unblock(self, address: str | IPAddress) -> tuple[str, bool]:
        """Lift `address`'s block and forget its failures; (key, whether it
        was blocked)."""
        key = self.address_key(address)
        now = self._clock()
        return key, self.addresses.update(
            key, lambda old: (None, old is not None and old.until > now)
        )

    def blocks(self, limit: int = 1000) -> list[tuple[str, float]]:
        """Blocked networks ("203.0.113.7/32") and the seconds left, longest
        first; at most `limit`. Empty when the backend cannot list."""
        listing = getattr(self.addresses, "records", None)
        if listing is None:
            return []
        now = self._clock()
        found = [
            (key[2:], record.until - now)
            for key, record in listing("a:", limit)
            if record.until > now
        ]
        return sorted(found, key=lambda item: -item[1])[:limit]

    def prune(self) -> int:
        """Drop expired state now (for a periodic timer); records dropped."""
        dropped = self.addresses.prune()
        if self.users is not self.addresses:
            dropped += self.users.prune()
        return dropped


# ------------------------------------------------------------ pure rules


def _network_key(ip: IPAddress, settings: DefenceSettings) -> str:
    bits, prefix = (32, settings.ipv4_prefix) if ip.version == 4 else (128, settings.ipv6_prefix)
    if prefix < bits:
        # By version, not ip_address(): "::1" as an integer is also an IPv4 address.
        host = int(ip) >> (bits - prefix) << (bits - prefix)
        ip = ipaddress.IPv4Address(host) if ip.version == 4 else ipaddress.IPv6Address(host)
    return f"a:{ip}/{prefix}"


def _user_name(username: str | bytes) -> str:
    if isinstance(username, bytes):
        username = username.decode("utf-8", "surrogateescape")
    # "Alice" and "alice" are one target for a guesser whenever the store
    # folds case; counting them together costs a case-sensitive store nothing.
    # Directories fold more than Python's casefold: slapd binds "ALİCE"
    # (dotted capital I, casefolded to i + U+0307) as alice. So compatibility
    # forms are folded too and combining marks dropped: a few distinct users
    # may share a counter ("café", "cafe"), no user gets several.
    folded = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", username).casefold())
    return "".join(ch for ch in folded if not unicodedata.combining(ch))


def _user_key(username: str | bytes) -> str:
    return "u:" + _user_name(username)


def _live(record: Record | None, now: float) -> Record | None:
    return record if record is not None and record.expires_at > now else None


def _add_strike(
    strikes: tuple[Strike, ...], now: float, fingerprint: bytes | None, window: float
) -> tuple[tuple[Strike, ...], bool]:
    """The strikes inside the window after one more failure, and whether it
    counted (False: the same guess again)."""
    recent = tuple(s for s in strikes if now - s.at < window)
    if fingerprint is not None:
        for i, strike in enumerate(recent):
            if strike.fingerprint is not None and hmac.compare_digest(
                strike.fingerprint, fingerprint
            ):
                # Refresh it, so a client that keeps retrying stays one guess.
                again = replace(strike, at=now)
                return (*recent[:i], *recent[i + 1 :], again), False
    return (*recent, Strike(at=now, fingerprint=fingerprint)), True


def _address_failure(
    old: Record | None, now: float, fingerprint: bytes | None, s: DefenceSettings
) -> tuple[Record | None, float]:
    record = _live(old, now)
    if record is not None and record.until > now:
        # A connection admitted before the block began. Not counted: the block
        # is not extended, or a busy NAT could stay blocked for ever.
        return record, s.max_delay
    strikes, _ = _add_strike(record.strikes if record else (), now, fingerprint, s.block_window)
    delay = s.failure_delay + s.penalty(sum(not strike.forgiven for strike in strikes))
    if len(strikes) >= s.block_after:
        until = now + s.block_for
        return Record(until=until, expires_at=until), delay
    return Record(strikes=strikes, expires_at=strikes[-1].at + s.block_window), delay


def _user_failure(
    old: Record | None, now: float, fingerprint: bytes | None, s: DefenceSettings, after: int
) -> tuple[Record | None, None]:
    record = _live(old, now)
    if record is not None and record.until > now:
        return record, None
    previous = record.strikes if record else ()
    strikes, _ = _add_strike(previous, now, fingerprint, s.user_lockout_window)
    if len(strikes) >= after:
        until = now + s.user_lockout_for
        return Record(until=until, expires_at=until), None
    return Record(strikes=strikes, expires_at=strikes[-1].at + s.user_lockout_window), None


def _still_barred(old: Record | None, now: float) -> Record | None:
    """After a success: keep a block or lockout in force, forget the rest."""
    record = _live(old, now)
    return record if record is not None and record.until > now else None


def _forgive(old: Record | None, now: float) -> Record | None:
    record = _live(old, now)
    if record is None or record.until > now:
        return record
    return replace(record, strikes=tuple(replace(s, forgiven=True) for s in record.strikes))
