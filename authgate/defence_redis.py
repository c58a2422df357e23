"""Brute-force state shared through Redis, so proxies behind one load
balancer block an attacker together.

How a shared guard is built (every instance the same way)::

    backend = make_backend(config_redis_url, max_keys=settings.max_tracked)
    guard = Guard(
        settings,
        clock=time.time,  # wall clock: every instance must read the same time
        secret=shared_secret(config_secret),  # the same on every instance
        backend=backend,
    )

Why each of those is needed:

* `clock=time.time`: a record holds clock times (strike times, block ends).
  `Guard`'s default, `time.monotonic`, counts from an arbitrary point per
  machine, so one instance would read another's times as nonsense. Keep the
  instances' clocks in sync (NTP); a skew of a second shifts windows by a
  second, nothing worse. `RedisState` takes the same clock (`clock=`,
  default `time.time`): it decides expiry and computes the Redis TTLs.
* A shared `secret`: the stale-password rule compares keyed hashes of
  user+password; with a per-process key (the default) a phone re-sending an
  old password through instance A and then instance B would count twice.
  The secret comes from the configuration (`shared_secret()` derives the
  HMAC key from it), *not* from a key generated and kept in Redis with
  SET NX, because:
  - Redis holds the fingerprints. A key stored beside them would give
    anyone who can read Redis (often the least guarded service on the
    network) both halves of an offline dictionary attack on wrong
    passwords, which are mostly old or mistyped real ones. With the key in
    the configuration, a copy of Redis is useless for that.
  - A key in an unpersisted Redis changes when Redis restarts, and an
    instance started while Redis was down would make up its own: the
    instances would silently disagree. A configured key cannot drift.

Design, for the event loop: `Guard` is synchronous and called on the event
loop, so every Redis call here blocks the loop. So every call is bounded
(socket and connect timeouts of `timeout`, 100 ms by default, no client-side
retries) and guarded by a circuit breaker: the first error or over-long
call switches this instance to local in-memory state (one warning), a
background thread retries Redis every `retry_interval` seconds (the hot path
never waits for a retry), and the instance returns to the shared state when
Redis answers again (logged too). authgate keeps serving if Redis dies.

Start-up is not the steady state: the first connection of a fresh process
pays for everything done once (lazy imports, page faults on a cold machine,
a Redis still loading its data set, the Lua script's first load), and
nothing is served yet, so nothing waits on it. `connect()` therefore gives
each attempt `startup_timeout` (1 s by default, on a client of its own with
that socket timeout) and tries `startup_attempts` times (3) with a pause
between attempts (0.5 s, then 1 s), logging each miss; only then does the
instance start on local state. It also makes the steady-state client's
first connection and loads the script there, so the first Guard call finds
both ready. Worst case (a Redis that accepts and never answers) this holds
up the start by a few seconds, never longer.

While Redis is reachable, every record read or written is mirrored into the
local `MemoryState`s, so an outage does not pardon the attackers this
instance had seen: their blocks and counts carry on locally. What the
instance counts during the outage stays local; when Redis is back, Redis is
authoritative again (an empty Redis after a restart means fresh counts).

Atomic update: a compare-and-set Lua script instead of WATCH/MULTI/EXEC.
Both are optimistic (read, run the pure `change`, write only if nobody
wrote in between, else try again), but the script needs two round trips
(GET, EVALSHA) where WATCH, GET, MULTI...EXEC needs three, and it keeps no
WATCH state on a pooled connection that a timeout could leave half-way.
The rules themselves stay in Python (`change`), not duplicated in Lua.

Storage: one Redis string per record, under `prefix` (default
"authgate:defence:") + the Guard's key ("a:198.51.100.7/32",
"u:alice"), as compact JSON with a version field. Each key carries a Redis
TTL that ends when the record expires, so Redis cleans up by itself and
`prune()` only tidies the local mirrors. Redis should not evict these keys
under memory pressure (use `maxmemory-policy noeviction` or volatile-ttl,
or give it the memory); an evicted key merely forgets one client.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from authgate.defence import Clock, MemoryState, Record, Strike

__all__ = [
    "DEFAULT_PREFIX",
    "DEFAULT_RETRY_INTERVAL",
    "DEFAULT_STARTUP_ATTEMPTS",
    "DEFAULT_STARTUP_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "RedisState",
    "decode_record",
    "encode_record",
    "make_backend",
    "shared_secret",
]

log = logging.getLogger("authgate.defence")

T = TypeVar("T")

DEFAULT_PREFIX = "authgate:defence:"
DEFAULT_TIMEOUT = 0.1  # seconds: per socket operation, and per backend call in all
DEFAULT_RETRY_INTERVAL = 5.0  # seconds between background attempts while Redis is down
DEFAULT_MAX_ATTEMPTS = 8  # compare-and-set attempts before giving up on one write
# Start-up (connect()): a longer budget per attempt, a few attempts, pauses between.
DEFAULT_STARTUP_TIMEOUT = 1.0  # seconds per attempt
DEFAULT_STARTUP_ATTEMPTS = 3
STARTUP_PAUSE = 0.5  # seconds before the second attempt, doubling after each miss

# Keys longer than this (a user name of a few kilobytes) are stored by hash:
# a made-up name should not cost Redis more than a normal one.
_MAX_KEY_BYTES = 256
# Clamp for the TTL, so that an out-of-range expiry can never reach Redis as
# an invalid PX argument. Far above any DefenceSettings window.
_MAX_TTL_MS = 30 * 24 * 3600 * 1000

_FORMAT_VERSION = 1

# Compare-and-set: write ARGV[2] (delete if empty) with TTL ARGV[3] ms, but
# only if the key still holds ARGV[1] (empty: the key is absent). Encoded
# records are never empty, so "" is free to mean "no value". Returns 1 if
# written, 0 if another instance got there first.
_CAS_LUA = """
local current = redis.call('GET', KEYS[1])
if current == false then current = '' end
if current ~= ARGV[1] then return 0 end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return 1
"""

# Everything a broken, unreachable or overloaded Redis can raise: redis-py
# wraps socket errors, but an OSError from a half-set-up socket can slip through.
_REDIS_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, OSError)


def shared_secret(configured: str | bytes) -> bytes:
    """The fingerprint key for `Guard(secret=...)`, derived from a secret in
    the configuration that every instance shares.

    Derived rather than used as is, so the configured value (which may serve
    other purposes or be a passphrase) never becomes the HMAC key itself.
    """
    raw = configured.encode("utf-8") if isinstance(configured, str) else configured
    if len(raw) < 16:
        raise ValueError("the shared defence secret must be at least 16 bytes")
    return hmac.new(raw, b"authgate-defence-fingerprint-key-v1", hashlib.sha256).digest()


# ------------------------------------------------------------ encoding


def encode_record(record: Record) -> bytes:
    """`record` as compact JSON: {"v":1,"e":expires,"u":until,"s":[[at,fp,forgiven],...]}.

    Python's JSON writes floats by `repr`, which reads back to the same
    float, so a record survives the round trip exactly and a Redis-backed
    guard decides exactly as a memory-backed one. "u" is left out when the
    record blocks nothing; fingerprints are base64.
    """
    doc: dict[str, Any] = {"v": _FORMAT_VERSION, "e": record.expires_at}
    if record.until != -math.inf:
        doc["u"] = record.until
    doc["s"] = [
        [
            strike.at,
            None if strike.fingerprint is None else base64.b64encode(strike.fingerprint).decode(),
            int(strike.forgiven),
        ]
        for strike in record.strikes
    ]
    return json.dumps(doc, separators=(",", ":")).encode("ascii")


def _number(value: object) -> float:
    # bool is an int: a true/false where a time belongs is a damaged record.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("not a number")
    return float(value)


def decode_record(raw: bytes) -> Record | None:
    """The record `encode_record` wrote, or None if `raw` is not one (another
    format version, or damage): an unreadable record counts as no record,
    and the next write replaces it."""
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict) or doc.get("v") != _FORMAT_VERSION:
            return None
        if not isinstance(doc["s"], list):
            return None
        strikes = []
        for item in doc["s"]:
            at, fingerprint, forgiven = item
            if fingerprint is not None and not isinstance(fingerprint, str):
                return None
            if forgiven not in (0, 1) or isinstance(forgiven, bool):
                return None
            strikes.append(
                Strike(
                    at=_number(at),
                    fingerprint=(
                        None
                        if fingerprint is None
                        else base64.b64decode(fingerprint, validate=True)
                    ),
                    forgiven=bool(forgiven),
                )
            )
        until = _number(doc["u"]) if "u" in doc else -math.inf
        return Record(strikes=tuple(strikes), until=until, expires_at=_number(doc["e"]))
    except (ValueError, TypeError, KeyError, binascii.Error):
        # json.JSONDecodeError and UnicodeDecodeError are ValueErrors.
        return None


def _ttl_ms(expires_at: float, now: float) -> int:
    """The Redis TTL for a record that expires at `expires_at` (Guard clock),
    rounded up so that Redis never drops a record before it expires."""
    remaining = (expires_at - now) * 1000.0
    if not remaining < _MAX_TTL_MS:  # also catches +inf and nan
        return _MAX_TTL_MS
    return max(1, math.ceil(remaining))


def _describe(client: redis.Redis) -> str:
    """Where `client` points, for log lines: never the password."""
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    host, port, db = kwargs.get("host", "localhost"), kwargs.get("port", 6379), kwargs.get("db", 0)
    if ":" in str(host):
        host = f"[{host}]"  # an IPv6 literal
    return f"redis://{host}:{port}/{db}"


class _Slow(Exception):
    """A Redis call that answered, but too late to keep using Redis."""


# ------------------------------------------------------------ backend


class RedisState:
    """A `GuardBackend` in Redis, shared by every instance pointing at it,
    that falls back to local `MemoryState`s while Redis is unreachable.

    `client` should have short socket timeouts and no retries
    (`RedisState.from_url` and `make_backend` set them up); `timeout` also
    bounds each backend call as a whole: one that took longer trips the
    breaker even though it succeeded. `startup_client`, for `connect()`
    only, points at the same Redis with socket timeouts of the start-up
    budget (default: `client` itself). `clock` must be the Guard's clock.
    `max_keys` bounds each local state (addresses and users separately, as
    `Guard` does with `max_tracked`).
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        startup_client: redis.Redis | None = None,
        clock: Clock = time.time,
        prefix: str = DEFAULT_PREFIX,
        max_keys: int = 100_000,
        timeout: float = DEFAULT_TIMEOUT,
        retry_interval: float = DEFAULT_RETRY_INTERVAL,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> None:
        if not (math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"timeout must be a finite number > 0, not {timeout!r}")
        if not (math.isfinite(retry_interval) and retry_interval > 0):
            raise ValueError(f"retry_interval must be a finite number > 0, not {retry_interval!r}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, not {max_attempts!r}")
        self._client = client
        self._startup_client = startup_client
        self._clock = clock
        self._prefix = prefix.encode("utf-8")
        self._timeout = timeout
        self._retry_interval = retry_interval
        self._max_attempts = max_attempts
        self.name = _describe(client)
        self._cas = client.register_script(_CAS_LUA)
        # Addresses and users apart, as Guard keeps them without a backend:
        # a flood of made-up user names must not evict the address blocks.
        self._local_addresses = MemoryState(clock, max_keys)
        self._local_users = MemoryState(clock, max_keys)
        # The breaker. `_shared` is read on the hot path without the lock (a
        # plain attribute read); the lock orders the transitions between the
        # event loop, which trips it, and the prober thread, which resets it.
        self._shared = True
        self._lock = threading.Lock()
        self._prober: threading.Thread | None = None
        self._closed = threading.Event()

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
        **kwargs: Any,
    ) -> RedisState:
        """A `RedisState` on a new client for `url` ("redis://host:port/db",
        "rediss://...", "unix:///path?db=0"), with bounded calls (and a
        second client with `startup_timeout` for `connect()`).

        Prefer an IP address (or a name in /etc/hosts) in `url`: a reconnect
        resolves the name with a blocking getaddrinfo that no timeout bounds.
        """
        if not (math.isfinite(startup_timeout) and startup_timeout > 0):
            raise ValueError(
                f"startup_timeout must be a finite number > 0, not {startup_timeout!r}"
            )
        return cls(
            _bounded_client(url, timeout),
            startup_client=_bounded_client(url, startup_timeout),
            timeout=timeout,
            **kwargs,
        )

    # ------------------------------------------------------------ status

    @property
    def shared(self) -> bool:
        """True while the records live in Redis; False while this instance
        runs on its local state."""
        return self._shared

    def connect(
        self,
        *,
        attempts: int = DEFAULT_STARTUP_ATTEMPTS,
        timeout: float = DEFAULT_STARTUP_TIMEOUT,
        pause: float = STARTUP_PAUSE,
    ) -> bool:
        """Try Redis now, at start-up, so a misconfiguration shows in the log
        at once; `shared` afterwards. Each of `attempts` attempts may take
        `timeout` (the first connection of a process on a cold machine is
        slower than any later call), with `pause` seconds before the second,
        doubling after each miss; every miss is logged. When all miss, this
        instance starts on its local state and the background retries begin.
        Blocks for all of that: call it before serving, off the event loop."""
        if attempts < 1:
            raise ValueError(f"attempts must be >= 1, not {attempts!r}")
        reason = ""
        for attempt in range(1, attempts + 1):
            reason = self._first_contact(timeout)
            if not reason:
                return True
            if attempt == attempts:
                break
            log.info(
                "Redis at %s did not answer at start-up (%s): attempt %d of %d, next in %g s",
                self.name,
                reason,
                attempt,
                attempts,
                pause,
            )
            if self._closed.wait(pause):
                break
            pause *= 2
        self._trip(f"no answer at start-up, {attempts} attempt(s) of {timeout:g} s: {reason}")
        return False

    def close(self) -> None:
        """Stop the background retries and close the client's connections."""
        self._closed.set()
        with self._lock:
            prober = self._prober
        if prober is not None:
            prober.join(timeout=self._retry_interval + 2 * self._timeout + 1.0)
        self._client.close()
        if self._startup_client is not None:
            self._startup_client.close()

    # ------------------------------------------------------------ GuardBackend

    def get(self, key: str) -> Record | None:
        if self._shared:
            started = time.monotonic()
            try:
                raw = self._client.get(self._redis_key(key))
            except _REDIS_ERRORS as exc:
                self._trip(exc)
            else:
                record = self._decode_live(raw)
                self._mirror(key, record)
                self._check_pace(started)
                return record
        return self._local(key).get(key)

    def update(self, key: str, change: Callable[[Record | None], tuple[Record | None, T]]) -> T:
        if self._shared:
            started = time.monotonic()
            try:
                result = self._update_shared(key, change)
            except _REDIS_ERRORS as exc:
                # Maybe written, maybe not: either way the local state takes
                # over, and `change` is pure, so running it again is safe.
                self._trip(exc)
            else:
                self._check_pace(started)
                return result
        return self._local(key).update(key, change)

    def records(self, prefix: str, limit: int) -> list[tuple[str, Record]]:
        """Live records under `prefix` (SCAN, at most `limit`): every
        instance's, or the local ones while Redis is unreachable. Blocking:
        call it off the event loop."""
        if self._shared:
            try:
                out = []
                pattern = self._prefix + prefix.encode("utf-8") + b"*"
                for raw_key in self._client.scan_iter(match=pattern, count=500):
                    record = self._decode_live(self._client.get(raw_key))
                    if record is not None:
                        key = bytes(raw_key)[len(self._prefix) :].decode("utf-8", "replace")
                        out.append((key, record))
                        if len(out) >= limit:
                            break
                return out
            except _REDIS_ERRORS as exc:
                self._trip(exc)
        return self._local(prefix).records(prefix, limit)

    def prune(self) -> int:
        """Redis expires its keys by itself (TTL); this drops expired local
        mirrors, the number dropped."""
        return self._local_addresses.prune() + self._local_users.prune()

    # ------------------------------------------------------------ internals

    def _redis_key(self, key: str) -> bytes:
        # surrogatepass: a user name that arrived as invalid UTF-8 carries
        # lone surrogates (surrogateescape), which strict UTF-8 cannot encode.
        raw = key.encode("utf-8", "surrogatepass")
        if len(raw) > _MAX_KEY_BYTES:
            # "#" never starts a Guard key ("a:", "u:"), so no collision.
            raw = b"#" + hashlib.sha256(raw).hexdigest().encode("ascii")
        return self._prefix + raw

    def _local(self, key: str) -> MemoryState:
        return self._local_addresses if key.startswith("a:") else self._local_users

    def _decode_live(self, raw: object) -> Record | None:
        if not isinstance(raw, bytes):
            return None
        record = decode_record(raw)
        if record is None or record.expires_at <= self._clock():
            return None
        return record

    def _mirror(self, key: str, record: Record | None) -> None:
        self._local(key).update(key, lambda _old: (record, None))

    def _update_shared(
        self, key: str, change: Callable[[Record | None], tuple[Record | None, T]]
    ) -> T:
        rkey = self._redis_key(key)
        for _attempt in range(self._max_attempts):
            raw = self._client.get(rkey)
            old = self._decode_live(raw)
            new, result = change(old)
            now = self._clock()
            if new is not None and new.expires_at <= now:
                new = None
            if (new is None and raw is None) or (new is not None and new == old):
                # Nothing to write (a failure during a block, a success with
                # no record): the answer rests on a consistent read.
                self._mirror(key, new)
                return result
            value = b"" if new is None else encode_record(new)
            ttl = 0 if new is None else _ttl_ms(new.expires_at, now)
            expected = raw if isinstance(raw, bytes) else b""
            if self._cas(keys=[rkey], args=[expected, value, ttl]) == 1:
                self._mirror(key, new)
                return result
            # Another instance wrote the key between our GET and the script:
            # read it again and recompute.
        # Still contended after all attempts (many instances hammering one
        # key at once). Not written: this one failure is lost from the shared
        # count, which beats overwriting another instance's write or stalling.
        log.debug("defence: %s stayed contended; one update not shared", key)
        self._mirror(key, new)
        return result

    def _check_pace(self, started: float) -> None:
        elapsed = time.monotonic() - started
        if elapsed > self._timeout:
            self._trip(_Slow(f"a call took {elapsed * 1000:.0f} ms"))

    def _trip(self, reason: object) -> None:
        with self._lock:
            if not self._shared:
                return
            self._shared = False
            if isinstance(reason, BaseException):
                reason = f"{type(reason).__name__}: {reason}"
            log.warning(
                "Redis at %s unreachable: using local brute-force state (%s); retrying every %g s",
                self.name,
                reason,
                self._retry_interval,
            )
            if self._prober is None and not self._closed.is_set():
                self._prober = threading.Thread(
                    target=self._probe_until_back, name="authgate-defence-redis", daemon=True
                )
                self._prober.start()

    def _probe_until_back(self) -> None:
        while not self._closed.wait(self._retry_interval):
            if not self._probe(self._client, self._timeout):
                with self._lock:
                    self._shared = True
                    # Cleared under the lock: a trip right after this starts
                    # a fresh prober instead of relying on this ending one.
                    self._prober = None
                log.warning("Redis at %s is back: using shared brute-force state", self.name)
                return
        with self._lock:
            self._prober = None

    def _first_contact(self, timeout: float) -> str:
        """One start-up attempt: the start-up client (long socket timeouts)
        waits for Redis to answer; then the steady-state client makes the
        connection the first Guard calls will reuse. "" on success, else why
        not."""
        if self._startup_client is not None:
            if reason := self._probe(self._startup_client, timeout):
                return reason
            # Done with it: the steady-state client takes over from here.
            self._startup_client.close()
        return self._probe(self._client, timeout)

    def _probe(self, client: redis.Redis, budget: float) -> str:
        """One bounded attempt at a write (a read-only replica after a
        failover answers PING, but could not keep the records), and the
        compare-and-set script loaded (a restarted Redis has forgotten it),
        within `budget` seconds: "" on success, else why not."""
        started = time.monotonic()
        try:
            client.set(self._prefix + b"#probe", b"1", px=60_000)
            client.script_load(_CAS_LUA)
        except _REDIS_ERRORS as exc:
            return f"{type(exc).__name__}: {exc}"
        elapsed = time.monotonic() - started
        if elapsed > budget:
            return f"answered after {elapsed * 1000:.0f} ms"
        return ""


def make_backend(
    url: str | None,
    *,
    clock: Clock = time.time,
    prefix: str = DEFAULT_PREFIX,
    max_keys: int = 100_000,
    timeout: float = DEFAULT_TIMEOUT,
    retry_interval: float = DEFAULT_RETRY_INTERVAL,
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
    startup_attempts: int = DEFAULT_STARTUP_ATTEMPTS,
) -> RedisState | None:
    """The backend for `[defence] redis_url`, or None (keep Guard's own
    in-memory state) when no URL is configured.

    Tries Redis at once (`startup_attempts` attempts of `startup_timeout`
    each, see `RedisState.connect`); if it does not answer, the backend
    starts on local state, logs a warning, and keeps retrying in the
    background, each call then bounded by `timeout`. Blocks while it tries:
    call it before serving, off the event loop. Raises ValueError for a URL
    redis-py cannot parse.
    """
    if url is None or not url.strip():
        return None
    state = RedisState.from_url(
        url.strip(),
        timeout=timeout,
        startup_timeout=startup_timeout,
        clock=clock,
        prefix=prefix,
        max_keys=max_keys,
        retry_interval=retry_interval,
    )
    state.connect(attempts=startup_attempts, timeout=startup_timeout)
    return state


def _bounded_client(url: str, timeout: float) -> redis.Redis:
    """A client for `url` whose every socket operation gives up after
    `timeout` seconds, and which never retries by itself."""
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        # redis.Redis() retries up to 10 times, with backoff of up to a
        # second, and from_url's default has varied between versions: any
        # retry would stall the event loop, so none, explicitly. The breaker
        # and the background prober do the retrying here.
        retry=Retry(NoBackoff(), 0),
    )
