"""Shared brute-force state in a real redis-server (tests/redis_server.py).

Two `Guard`s on two `RedisState`s (two clients, as two authgate instances
would have) share one Redis. The outage tests kill, freeze and restart the
server under them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authgate.defence import DefenceSettings, Guard, Record, Strike, Verdict
from authgate.defence_redis import (
    DEFAULT_PREFIX,
    DEFAULT_STARTUP_ATTEMPTS,
    DEFAULT_TIMEOUT,
    RedisState,
    decode_record,
    encode_record,
    make_backend,
    shared_secret,
)
from authgate.policy import ExemptNetworks
from tests.redis_server import RedisInstance, RedisServerError, start_redis

ATTACKER = "198.51.100.7"
OTHER = "203.0.113.9"
SECRET = shared_secret("the configured defence secret, shared by all instances")
LAN = ExemptNetworks.parse(["192.168.0.0/16"])

# Outage tests: every Guard call must come back within this, Redis or not.
CALL_BUDGET = 0.2


class WallClock:
    """Wall-clock time that a test can move forward (never back)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


class FrozenWallClock:
    """A wall-style time (near time.time()) that moves only when told, so
    two guards asked one after the other see exactly the same instant."""

    def __init__(self) -> None:
        self.now = float(int(time.time()))

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def server() -> Iterator[RedisInstance]:
    try:
        with start_redis() as instance:
            yield instance
    except RedisServerError as exc:
        pytest.fail(str(exc))


@pytest.fixture
def states() -> Iterator[Callable[..., RedisState]]:
    """A factory of RedisStates (one per 'authgate instance'), closed at the end."""
    made: list[RedisState] = []

    def make(url: str, **kwargs: Any) -> RedisState:
        kwargs.setdefault("retry_interval", 0.1)
        state = RedisState.from_url(url, **kwargs)
        made.append(state)
        return state

    yield make
    for state in made:
        state.close()


def raw_client(server: RedisInstance) -> redis.Redis:
    return redis.Redis.from_url(server.url)


def pair(
    server: RedisInstance,
    states: Callable[..., RedisState],
    clock: Callable[[], float],
    **overrides: Any,
) -> tuple[Guard, Guard, RedisState, RedisState]:
    """Two authgate instances on one Redis, built as the module docstring says."""
    config = DefenceSettings(**overrides)
    state_a = states(server.url, clock=clock)
    state_b = states(server.url, clock=clock)
    a = Guard(config, clock=clock, secret=SECRET, backend=state_a)
    b = Guard(config, clock=clock, secret=SECRET, backend=state_b)
    return a, b, state_a, state_b


def guess(guard: Guard, address: str, n: int, user: str = "alice") -> float:
    return guard.failure(address, user, guard.fingerprint(user, f"guess-{n}"))


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def timed(call: Callable[[], Any]) -> Any:
    started = time.monotonic()
    result = call()
    elapsed = time.monotonic() - started
    assert elapsed < CALL_BUDGET, f"a guard call took {elapsed:.3f} s"
    return result


def warnings_matching(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(
        1
        for record in caplog.records
        if record.name == "authgate.defence"
        and record.levelno == logging.WARNING
        and text in record.getMessage()
    )


# ------------------------------------------------------------ encoding


def test_record_round_trip_is_exact() -> None:
    record = Record(
        strikes=(
            Strike(at=1_700_000_000.123456789, fingerprint=None),
            Strike(at=1_700_000_001.1 + 1e-7, fingerprint=b"\x00" * 31 + b"\xff", forgiven=True),
        ),
        expires_at=1_700_000_061.1 + 1e-7,
    )
    assert decode_record(encode_record(record)) == record
    blocked = Record(until=1_700_000_300.5, expires_at=1_700_000_300.5)
    assert decode_record(encode_record(blocked)) == blocked
    # Compact: no block end is written for a record that blocks nothing.
    assert b'"u"' not in encode_record(record)
    assert b'"u"' in encode_record(blocked)


strikes = st.builds(
    Strike,
    at=st.floats(min_value=0, max_value=4e9, allow_nan=False),
    fingerprint=st.none() | st.binary(min_size=1, max_size=40),
    forgiven=st.booleans(),
)


@given(
    st.builds(
        Record,
        strikes=st.lists(strikes, max_size=12).map(tuple),
        until=st.just(float("-inf")) | st.floats(min_value=0, max_value=4e9),
        expires_at=st.floats(min_value=0, max_value=4e9),
    )
)
def test_any_record_round_trips(record: Record) -> None:
    assert decode_record(encode_record(record)) == record


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"garbage",
        b"\xff\xfe",
        b"[]",
        b'{"v":2,"e":1.0,"s":[]}',  # a future format: unknown, not misread
        b'{"v":1,"s":[]}',
        b'{"v":1,"e":"soon","s":[]}',
        b'{"v":1,"e":true,"s":[]}',
        b'{"v":1,"e":1.0,"s":[[1.0,"not base64!",0]]}',
        b'{"v":1,"e":1.0,"s":[[1.0,null,2]]}',
        b'{"v":1,"e":1.0,"s":[[1.0,null]]}',
        b'{"v":1,"e":1.0,"s":[[1.0,7,0]]}',
        b'{"v":1,"e":1.0,"s":{}}',
    ],
)
def test_damaged_records_read_as_none(raw: bytes) -> None:
    assert decode_record(raw) is None


@given(st.binary(max_size=200))
def test_random_bytes_never_raise(raw: bytes) -> None:
    decode_record(raw)


def test_shared_secret_is_derived_and_checked() -> None:
    one = shared_secret("a long enough configured secret")
    assert one == shared_secret(b"a long enough configured secret")
    assert len(one) == 32 and one != b"a long enough configured secret"[:32]
    assert one != shared_secret("another long enough secret!!")
    with pytest.raises(ValueError, match="16 bytes"):
        shared_secret("short")


# ------------------------------------------------------------ make_backend


def test_make_backend_without_url_keeps_memory_state() -> None:
    assert make_backend(None) is None
    assert make_backend("") is None
    assert make_backend("   ") is None


def test_make_backend_rejects_a_bad_url() -> None:
    with pytest.raises(ValueError):
        make_backend("http://127.0.0.1:6379/0")


def test_make_backend_connects(server: RedisInstance) -> None:
    # The fixture returned once redis-server answered a PING; start-up may
    # take longer than a steady-state call (a cold machine's first connection).
    backend = make_backend(server.url, max_keys=10)
    assert backend is not None
    try:
        assert backend.shared
        # The compare-and-set script is loaded at start-up, not on the first failure.
        assert raw_client(server).script_exists(backend._cas.sha) == [True]
        guard = Guard(DefenceSettings(), clock=time.time, secret=SECRET, backend=backend)
        guess(guard, ATTACKER, 0)
        assert backend.shared
        assert raw_client(server).exists(f"{DEFAULT_PREFIX}a:{ATTACKER}/32") == 1
    finally:
        backend.close()


class OnLog(logging.Handler):
    """Runs `action` (once) in the logging thread when a record containing
    `text` is logged: a test can act at an exact point of a blocking call."""

    def __init__(self, text: str, action: Callable[[], None]) -> None:
        super().__init__(logging.INFO)
        self.text = text
        self.action: Callable[[], None] | None = action

    def emit(self, record: logging.LogRecord) -> None:
        if self.action is not None and self.text in record.getMessage():
            action, self.action = self.action, None
            action()


@pytest.fixture
def on_log() -> Iterator[Callable[[str, Callable[[], None]], None]]:
    logger = logging.getLogger("authgate.defence")
    added: list[OnLog] = []

    def add(text: str, action: Callable[[], None]) -> None:
        handler = OnLog(text, action)
        logger.addHandler(handler)
        added.append(handler)

    yield add
    for handler in added:
        logger.removeHandler(handler)


def test_start_up_allows_longer_than_a_steady_state_call(
    server: RedisInstance, caplog: pytest.LogCaptureFixture
) -> None:
    """A first answer three times slower than the steady-state budget (a
    cold machine, a Redis still starting) is not an outage at start-up."""
    caplog.set_level(logging.INFO, logger="authgate.defence")
    server.freeze()  # the kernel accepts the connection; the answer waits for the thaw
    thaw = threading.Timer(3 * DEFAULT_TIMEOUT, server.thaw)
    started = time.monotonic()
    thaw.start()
    try:
        backend = make_backend(server.url)
    finally:
        thaw.join()
    assert backend is not None
    try:
        # Redis was frozen for longer than a steady-state call may take ...
        assert time.monotonic() - started > DEFAULT_TIMEOUT
        # ... and still the instance starts on the shared state, with no warning.
        assert backend.shared
        assert warnings_matching(caplog, "unreachable") == 0
        guard = Guard(DefenceSettings(), clock=time.time, secret=SECRET, backend=backend)
        guess(guard, ATTACKER, 0)
        assert raw_client(server).exists(f"{DEFAULT_PREFIX}a:{ATTACKER}/32") == 1
    finally:
        backend.close()


def test_start_up_tries_again_when_redis_comes_up_late(
    server: RedisInstance,
    caplog: pytest.LogCaptureFixture,
    on_log: Callable[[str, Callable[[], None]], None],
) -> None:
    """authgate started a moment before Redis (service ordering): the first
    attempt is refused, Redis comes up during the pause, the second
    attempt finds it."""
    caplog.set_level(logging.INFO, logger="authgate.defence")
    server.kill()
    # Start the real server right after the first attempt was logged as a
    # miss (start() returns once it answers PING): no guessed sleep.
    on_log("attempt 1 of 3", server.start)
    backend = make_backend(server.url)
    assert backend is not None
    try:
        assert server.running
        assert backend.shared
        misses = [r.getMessage() for r in caplog.records if "at start-up" in r.getMessage()]
        assert len(misses) == 1, misses
        assert misses[0].startswith(f"Redis at {server.url} did not answer at start-up (")
        assert "ConnectionError" in misses[0] and "next in 0.5 s" in misses[0]
        assert warnings_matching(caplog, "unreachable") == 0
        guard = Guard(DefenceSettings(), clock=time.time, secret=SECRET, backend=backend)
        guess(guard, ATTACKER, 0)
        assert raw_client(server).exists(f"{DEFAULT_PREFIX}a:{ATTACKER}/32") == 1
    finally:
        backend.close()


# ------------------------------------------------------------ sharing


def test_failures_spread_over_two_instances_block_on_both(
    server: RedisInstance, states: Callable[..., RedisState]
) -> None:
    clock = WallClock()
    a, b, _, _ = pair(server, states, clock)
    delays = []
    for n in range(9):
        delays.append(guess(a if n % 2 else b, ATTACKER, n))
        assert not a.check(ATTACKER).blocked and not b.check(ATTACKER).blocked
    # The penalty escalates over both instances, as it would on one.
    assert delays == [4, 6, 10, 17, 17, 17, 17, 17, 17]
    guess(b, ATTACKER, 9)  # the tenth, five on each
    for guard in (a, b):
        verdict = guard.check(ATTACKER)
        assert verdict.blocked and 299 < verdict.retry_after <= 300
        assert not guard.check(OTHER).blocked
    # A failure during the block gets the longest delay on either instance.
    assert guess(a, ATTACKER, 10) == 17


def test_a_success_on_one_instance_forgives_on_the_other(
    server: RedisInstance, states: Callable[..., RedisState]
) -> None:
    a, b, _, _ = pair(server, states, WallClock())
    for n in range(3):
        guess(a, ATTACKER, n)
    b.success(ATTACKER, "alice")
    assert guess(a, ATTACKER, 3) == 4  # the penalty starts again ...
    for n in range(4, 10):
        guess(b, ATTACKER, n)
    assert a.check(ATTACKER).blocked  # ... but the strikes still count


def test_stale_password_counts_once_across_instances(
    server: RedisInstance, states: Callable[..., RedisState]
) -> None:
    a, b, _, _ = pair(server, states, WallClock())
    for n in range(30):  # a phone with the old password, balanced over both
        guard = a if n % 2 else b
        assert guard.failure(ATTACKER, "alice", guard.fingerprint("alice", "old-pass")) == 4
    assert not a.check(ATTACKER).blocked and not b.check(ATTACKER).blocked


def test_without_a_shared_secret_the_stale_password_counts_per_instance(
    server: RedisInstance, states: Callable[..., RedisState]
) -> None:
    # The control for the test above: Guard's default per-process secret.
    clock = WallClock()
    a = Guard(DefenceSettings(), clock=clock, backend=states(server.url, clock=clock))
    b = Guard(DefenceSettings(), clock=clock, backend=states(server.url, clock=clock))
    assert a.failure(ATTACKER, "alice", a.fingerprint("alice", "old-pass")) == 4
    assert b.failure(ATTACKER, "alice", b.fingerprint("alice", "old-pass")) == 6


def test_user_lockout_is_shared(server: RedisInstance, states: Callable[..., RedisState]) -> None:
    a, b, _, _ = pair(server, states, WallClock(), user_lockout_after=3, trusted=LAN)
    guess(a, "198.51.100.1", 0)
    guess(b, "198.51.100.2", 1)
    assert not a.user_locked("alice") and not b.user_locked("alice")
    guess(a, "2001:db8::1", 2)
    assert a.user_locked("Alice") and b.user_locked("ALICE", OTHER)
    assert not b.user_locked("alice", "192.168.1.1")  # trusted: never locked out
    assert not a.user_locked("bob")


def test_two_instances_racing_lose_no_failure(
    server: RedisInstance, states: Callable[..., RedisState]
) -> None:
    # Two threads stand in for two processes hammering one key at once: the
    # compare-and-set must count every failure exactly once.
    clock = WallClock()
    config = DefenceSettings(block_after=10_000, block_window=3600)
    guards = [
        Guard(
            config,
            clock=clock,
            secret=SECRET,
            backend=states(server.url, clock=clock, max_attempts=1000, timeout=5.0),
        )
        for _ in range(2)
    ]
    per_thread = 100

    def hammer(index: int) -> None:
        for n in range(per_thread):
            guess(guards[index], ATTACKER, index * per_thread + n)

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    reader = states(server.url, clock=clock)
    record = reader.get(f"a:{ATTACKER}/32")
    assert record is not None
    assert len(record.strikes) == 2 * per_thread
    assert len({strike.fingerprint for strike in record.strikes}) == 2 * per_thread


def test_a_write_between_read_and_set_is_not_lost(
    server: RedisInstance, states: Callable[..., RedisState]
) -> None:
    clock = FrozenWallClock()
    state = states(server.url, clock=clock)
    rival = states(server.url, clock=clock)
    key = "a:198.51.100.7/32"
    seen: list[Record | None] = []

    def change(old: Record | None) -> tuple[Record | None, int]:
        seen.append(old)
        if len(seen) == 1:
            # Another instance writes after our read, before our write.
            rival.update(
                key,
                lambda _: (Record(strikes=(Strike(clock(), None),), expires_at=clock() + 60), None),
            )
        count = len(old.strikes) if old else 0
        strike = Strike(clock(), b"mine")
        return Record(
            strikes=(*(old.strikes if old else ()), strike), expires_at=clock() + 60
        ), count

    assert state.update(key, change) == 1  # recomputed on the rival's record
    assert seen[0] is None and seen[1] is not None and len(seen) == 2
    stored = rival.get(key)
    assert stored is not None and [s.fingerprint for s in stored.strikes] == [None, b"mine"]


# ------------------------------------------------------------ storage


def test_keys_are_namespaced_and_expire_with_their_record(
    server: RedisInstance, states: Callable[..., RedisState]
) -> None:
    clock = WallClock()
    a, _, _, _ = pair(server, states, clock, user_lockout_after=20)
    plain = raw_client(server)
    address_key = f"{DEFAULT_PREFIX}a:{ATTACKER}/32"
    user_key = f"{DEFAULT_PREFIX}u:alice"

    guess(a, ATTACKER, 0)
    # Strikes live block_window (60 s) and the user's user_lockout_window (900 s).
    assert 59_000 < plain.pttl(address_key) <= 60_000
    assert 899_000 < plain.pttl(user_key) <= 900_000
    assert set(plain.keys("*")) <= {
        address_key.encode(),
        user_key.encode(),
        b"authgate:defence:#probe",
    }

    clock.advance(30)  # a later strike moves the expiry on
    guess(a, ATTACKER, 1)
    assert 59_000 < plain.pttl(address_key) <= 60_000

    for n in range(2, 10):
        guess(a, ATTACKER, n)
    assert a.check(ATTACKER).blocked
    assert 299_000 < plain.pttl(address_key) <= 300_000  # block_for

    # A success clears the user's count: the key goes, not just its content.
    a.success(OTHER, "alice")
    assert plain.exists(user_key) == 0

    # A trusted-free, strike-free success writes nothing at all.
    a.success("203.0.113.50", "carol")
    assert plain.exists(f"{DEFAULT_PREFIX}a:203.0.113.50/32") == 0


def test_prefix_is_configurable(server: RedisInstance, states: Callable[..., RedisState]) -> None:
    clock = WallClock()
    guard = Guard(
        DefenceSettings(), clock=clock, secret=SECRET, backend=states(server.url, prefix="gw1:")
    )
    guess(guard, ATTACKER, 0)
    assert raw_client(server).exists(f"gw1:a:{ATTACKER}/32") == 1
    assert raw_client(server).exists(f"{DEFAULT_PREFIX}a:{ATTACKER}/32") == 0


def test_expired_record_reads_as_none_before_redis_drops_it(
    server: RedisInstance, states: Callable[..., RedisState]
) -> None:
    clock = WallClock()
    a, b, _, _ = pair(server, states, clock)
    for n in range(10):
        guess(a, ATTACKER, n)
    clock.advance(300)  # our clock says the block is over; Redis' TTL may lag a little
    assert b.check(ATTACKER) == Verdict(blocked=False)
    assert guess(b, ATTACKER, 10) == 4


def test_damaged_value_in_redis_is_replaced(
    server: RedisInstance, states: Callable[..., RedisState]
) -> None:
    a, _, _, _ = pair(server, states, WallClock())
    plain = raw_client(server)
    key = f"{DEFAULT_PREFIX}a:{ATTACKER}/32"
    plain.set(key, b"\x00not a record")  # no TTL
    assert a.check(ATTACKER) == Verdict(blocked=False)
    assert guess(a, ATTACKER, 0) == 4
    stored = plain.get(key)
    assert isinstance(stored, bytes) and decode_record(stored) is not None
    assert plain.pttl(key) > 0


def test_odd_user_names_are_stored(
    server: RedisInstance, states: Callable[..., RedisState]
) -> None:
    a, b, _, _ = pair(server, states, WallClock(), user_lockout_after=2)
    plain = raw_client(server)
    odd = b"\xff\xfeinvalid-utf8"  # arrives as bytes from the wire
    long = "x" * 5000
    for user in (odd, long, "with space\r\nand crlf"):
        a.failure(ATTACKER, user, None)
        b.failure(OTHER, user, None)
        assert a.user_locked(user) and b.user_locked(user)
    assert max(len(key) for key in plain.keys("*")) <= len(DEFAULT_PREFIX) + 256


# ------------------------------------------------------------ outages


def test_redis_killed_mid_test_both_instances_keep_answering(
    server: RedisInstance,
    states: Callable[..., RedisState],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="authgate.defence")
    clock = WallClock()
    a, b, state_a, state_b = pair(server, states, clock, user_lockout_after=20)
    for n in range(10):
        guess(a if n % 2 else b, ATTACKER, n)
    assert a.check(ATTACKER).blocked and b.check(ATTACKER).blocked
    guess(a, OTHER, 100)

    server.kill()

    for round_ in range(20):
        for guard in (a, b):
            # The block seen before the outage holds (local mirror).
            assert timed(partial(guard.check, ATTACKER)).blocked
            assert timed(partial(guard.user_locked, "alice")) is False
            if round_ < 5:
                timed(partial(guess, guard, "192.0.2.1", round_))
            timed(partial(guard.success, "192.0.2.99", "bob"))
            timed(guard.prune)
    assert not state_a.shared and not state_b.shared
    assert warnings_matching(caplog, "unreachable: using local brute-force state") == 2
    # Each instance now counts on its own: five failures on each would have
    # blocked the address in the shared state, but not in either local one.
    assert not a.check("192.0.2.1").blocked and not b.check("192.0.2.1").blocked
    for n in range(5, 10):
        timed(partial(guess, a, "192.0.2.1", n))
    assert a.check("192.0.2.1").blocked and not b.check("192.0.2.1").blocked

    # No more warnings, however long the outage lasts.
    for n in range(50):
        timed(partial(guess, b, "192.0.2.77", n))
    assert warnings_matching(caplog, "unreachable") == 2

    server.restart()  # an empty Redis: nothing was persisted
    wait_until(lambda: state_a.shared and state_b.shared)
    assert warnings_matching(caplog, "is back: using shared brute-force state") == 2

    # Shared again: five failures on each instance block a new address on both.
    for n in range(10):
        guess(a if n % 2 else b, "198.51.100.200", n)
    assert a.check("198.51.100.200").blocked and b.check("198.51.100.200").blocked
    assert raw_client(server).exists(f"{DEFAULT_PREFIX}a:198.51.100.200/32") == 1


def test_hung_redis_times_out_and_falls_back(
    server: RedisInstance,
    states: Callable[..., RedisState],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="authgate.defence")
    a, b, state_a, state_b = pair(server, states, WallClock())
    guess(a, ATTACKER, 0)
    server.freeze()  # accepts connections, answers nothing
    try:
        started = time.monotonic()
        for n in range(1, 6):
            for guard in (a, b):
                timed(partial(guess, guard, ATTACKER, n))
                timed(partial(guard.check, ATTACKER))
        # Only the first call on each instance waited for a timeout.
        assert time.monotonic() - started < 2 * CALL_BUDGET + 0.2
        assert not state_a.shared and not state_b.shared
        assert warnings_matching(caplog, "unreachable") == 2
    finally:
        server.thaw()
    wait_until(lambda: state_a.shared and state_b.shared)
    assert warnings_matching(caplog, "is back") == 2


class SlowRedis(redis.Redis):
    """Answers, but each GET takes longer than the guard's whole budget."""

    def get(self, name: Any) -> Any:
        time.sleep(0.15)
        return super().get(name)


def test_slow_redis_trips_the_breaker_even_when_it_answers(
    server: RedisInstance, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="authgate.defence")
    clock = WallClock()
    fast = Guard(DefenceSettings(), clock=clock, secret=SECRET, backend=None)
    client = SlowRedis.from_url(server.url, socket_timeout=2)
    state = RedisState(client, clock=clock, timeout=0.1, retry_interval=0.1)
    try:
        guard = Guard(DefenceSettings(), clock=clock, secret=SECRET, backend=state)
        assert guard.check(ATTACKER) == fast.check(ATTACKER)  # the slow answer is used ...
        assert not state.shared  # ... but the next calls go local
        assert warnings_matching(caplog, "unreachable") == 1
        assert "took" in caplog.text
        assert timed(lambda: guess(guard, ATTACKER, 0)) == 4
        # Redis answers PING-style probes quickly (SET is not slowed): back.
        wait_until(lambda: state.shared)
    finally:
        state.close()


def test_redis_down_at_start_up_then_appearing(
    server: RedisInstance, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="authgate.defence")
    server.kill()
    backend = make_backend(server.url, retry_interval=0.1)
    assert backend is not None
    try:
        assert not backend.shared
        # Every start-up attempt was tried and logged, then one warning.
        for attempt in (1, 2):
            assert f"attempt {attempt} of {DEFAULT_STARTUP_ATTEMPTS}" in caplog.text
        assert f"attempt {DEFAULT_STARTUP_ATTEMPTS} of" not in caplog.text
        assert warnings_matching(caplog, f"Redis at {server.url} unreachable") == 1
        assert f"{DEFAULT_STARTUP_ATTEMPTS} attempt(s) of 1 s" in caplog.text
        guard = Guard(DefenceSettings(), clock=time.time, secret=SECRET, backend=backend)
        assert timed(lambda: guess(guard, ATTACKER, 0)) == 4
        server.start()
        wait_until(lambda: backend.shared)
        assert guess(guard, OTHER, 0) == 4
        assert raw_client(server).exists(f"{DEFAULT_PREFIX}a:{OTHER}/32") == 1
    finally:
        backend.close()


def test_the_log_never_shows_the_redis_password(
    server: RedisInstance, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="authgate.defence")
    server.kill()
    backend = make_backend(f"redis://:hunter2-secret@127.0.0.1:{server.port}/3")
    assert backend is not None
    backend.close()
    assert "hunter2" not in caplog.text
    assert f"redis://127.0.0.1:{server.port}/3 unreachable" in caplog.text


def test_close_stops_the_background_retries(
    server: RedisInstance, states: Callable[..., RedisState]
) -> None:
    state = states(server.url)
    server.kill()
    assert state.get("a:x") is None
    assert not state.shared
    probers = [t for t in threading.enumerate() if t.name == "authgate-defence-redis"]
    assert probers
    state.close()
    for thread in probers:
        assert not thread.is_alive()


# ------------------------------------------------------------ equivalence

ADDRESSES = ("198.51.100.7", "198.51.100.8", "2001:db8::1", "2001:db8::2:1", "192.168.1.1")
USERS = ("alice", "Alice", "bob", b"\xffcarol")
EQUIVALENCE_SETTINGS = DefenceSettings(
    failure_delay=0.5,
    penalties=(1.0, 2.0, 3.0),
    block_after=4,
    block_window=30,
    block_for=120,
    user_lockout_after=3,
    user_lockout_window=90,
    user_lockout_for=60,
    trusted=LAN,
)

operations = st.lists(
    st.one_of(
        st.tuples(st.just("check"), st.sampled_from(ADDRESSES)),
        st.tuples(
            st.just("failure"),
            st.sampled_from(ADDRESSES),
            st.sampled_from(USERS),
            st.none() | st.sampled_from(("pw1", "pw2", "pw3")),
        ),
        st.tuples(st.just("success"), st.sampled_from(ADDRESSES), st.sampled_from(USERS)),
        st.tuples(st.just("locked"), st.sampled_from(USERS), st.sampled_from(ADDRESSES)),
        # Whole multiples of 5 s, as are the windows: a record never has
        # less than 5 s left, so Redis' own (real-time) TTL cannot drop it
        # before the frozen clock says it expired.
        st.tuples(st.just("advance"), st.integers(0, 40).map(lambda n: n * 5)),
    ),
    max_size=60,
)


def run(guard: Guard, op: tuple[Any, ...]) -> Any:
    kind = op[0]
    if kind == "check":
        return guard.check(op[1])
    if kind == "failure":
        _, address, user, password = op
        fingerprint = None if password is None else guard.fingerprint(user, password)
        return guard.failure(address, user, fingerprint)
    if kind == "success":
        return guard.success(op[1], op[2])
    assert kind == "locked"
    return guard.user_locked(op[1], op[2])


def test_redis_backed_guard_decides_as_the_memory_backed_one(
    server: RedisInstance, states: Callable[..., RedisState]
) -> None:
    plain = raw_client(server)
    clock = FrozenWallClock()
    # A generous timeout: a loaded CI machine must not trip the breaker here.
    state = states(server.url, clock=clock, timeout=5.0)

    @settings(
        max_examples=150,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(operations)
    def check(ops: list[tuple[Any, ...]]) -> None:
        plain.flushdb()
        shared = Guard(EQUIVALENCE_SETTINGS, clock=clock, secret=SECRET, backend=state)
        local = Guard(EQUIVALENCE_SETTINGS, clock=clock, secret=SECRET)
        for op in ops:
            if op[0] == "advance":  # one clock for both guards: move it once
                clock.advance(op[1])
            else:
                assert run(shared, op) == run(local, op), op
        assert state.shared

    check()
