"""The brute-force defence, driven by a fake clock: no sleeping."""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authgate.defence import (
    DefenceSettings,
    Guard,
    GuardBackend,
    MemoryState,
    Record,
    Strike,
    Verdict,
)
from authgate.policy import ExemptNetworks

T = TypeVar("T")

ATTACKER = "198.51.100.7"
LAN = ExemptNetworks.parse(["192.168.0.0/16", "fd00::/8"])


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(**overrides: Any) -> tuple[Guard, FakeClock]:
    clock = FakeClock()
    return Guard(DefenceSettings(**overrides), clock=clock), clock


def guess(guard: Guard, address: str, n: int, user: str = "alice") -> float:
    """A distinct wrong password from `address`; the delay."""
    return guard.failure(address, user, guard.fingerprint(user, f"guess-{n}"))


def tracked(backend: GuardBackend) -> int:
    assert isinstance(backend, MemoryState)
    return len(backend)


# ----------------------------------------------------------------- delays


def test_delay_sequence_escalates_and_caps() -> None:
    guard, _ = make()
    assert [guess(guard, ATTACKER, n) for n in range(6)] == [4, 6, 10, 17, 17, 17]


def test_delays_follow_the_settings() -> None:
    guard, _ = make(failure_delay=1.0, penalties=(0.5, 3.0))
    assert [guess(guard, ATTACKER, n) for n in range(4)] == [1.5, 4.0, 4.0, 4.0]
    no_penalty, _ = make(failure_delay=0.25, penalties=())
    assert [guess(no_penalty, ATTACKER, n) for n in range(3)] == [0.25, 0.25, 0.25]


def test_escalation_decays_after_the_window() -> None:
    guard, clock = make()
    assert [guess(guard, ATTACKER, n) for n in range(3)] == [4, 6, 10]
    clock.advance(59.9)
    assert guess(guard, ATTACKER, 3) == 17  # the three are still recent
    clock.advance(0.1)  # now the first three are 60 s old; the fourth is not
    assert guess(guard, ATTACKER, 4) == 6
    clock.advance(60)
    assert guess(guard, ATTACKER, 5) == 4


def test_other_addresses_are_unaffected() -> None:
    guard, _ = make()
    for n in range(5):
        guess(guard, ATTACKER, n)
    assert guess(guard, "203.0.113.9", 0) == 4


# ----------------------------------------------------------------- blocks


def test_tenth_failure_within_the_window_blocks() -> None:
    guard, clock = make()
    for n in range(9):
        guess(guard, ATTACKER, n)
        assert guard.check(ATTACKER) == Verdict(blocked=False)
        clock.advance(6)
    guess(guard, ATTACKER, 9)  # t = 54 s after the first
    assert guard.check(ATTACKER) == Verdict(blocked=True, retry_after=300.0)
    assert guard.check("203.0.113.9").blocked is False


def test_failures_spread_over_more_than_the_window_never_block() -> None:
    guard, clock = make()
    for n in range(50):  # 7 s apart: at most 9 in any 60 s
        guess(guard, ATTACKER, n)
        assert not guard.check(ATTACKER).blocked
        clock.advance(7)


def test_window_boundary_is_exclusive() -> None:
    on_edge, clock = make()
    guess(on_edge, ATTACKER, 0)
    clock.advance(60)
    for n in range(1, 10):
        guess(on_edge, ATTACKER, n)
    assert not on_edge.check(ATTACKER).blocked  # the first is exactly 60 s old

    inside, clock = make()
    guess(inside, ATTACKER, 0)
    clock.advance(59.999)
    for n in range(1, 10):
        guess(inside, ATTACKER, n)
    assert inside.check(ATTACKER).blocked


def test_block_expires_and_resets_the_counters() -> None:
    guard, clock = make()
    for n in range(10):
        guess(guard, ATTACKER, n)
    clock.advance(299.5)
    verdict = guard.check(ATTACKER)
    assert verdict.blocked and verdict.retry_after == pytest.approx(0.5)
    clock.advance(0.5)
    assert guard.check(ATTACKER) == Verdict(blocked=False)
    assert guess(guard, ATTACKER, 10) == 4  # back to the first step


def test_failures_during_a_block_get_the_longest_delay_and_do_not_extend_it() -> None:
    guard, clock = make()
    for n in range(10):
        guess(guard, ATTACKER, n)
    clock.advance(100)
    for n in range(20):
        assert guess(guard, ATTACKER, 100 + n) == 17
    clock.advance(200)
    assert not guard.check(ATTACKER).blocked


def test_block_after_one() -> None:
    guard, _ = make(block_after=1, block_for=5)
    assert guess(guard, ATTACKER, 0) == 4
    assert guard.check(ATTACKER) == Verdict(blocked=True, retry_after=5.0)


# ---------------------------------------------------------------- trusted


def test_trusted_addresses_get_the_base_delay_and_are_never_blocked() -> None:
    guard, clock = make(trusted=LAN)
    for address in ("192.168.1.5", "::ffff:192.168.1.5", "fd00::1"):
        for n in range(100):
            assert guess(guard, address, n) == 2.0
            assert guard.check(address) == Verdict(blocked=False)
            clock.advance(0.1)
    assert tracked(guard.addresses) == 0
    # An outsider's failures still count as usual.
    assert guess(guard, ATTACKER, 0) == 4


def test_new_settings_change_what_an_address_already_seen_is() -> None:
    # The guard remembers each address's key and trust: a reload with other
    # trusted networks or prefixes must not be answered from that memory.
    guard, _ = make(ipv4_prefix=32)
    assert guard.address_key("192.168.1.5") == "a:192.168.1.5/32"
    assert guess(guard, "192.168.1.5", 0) == 4
    guard.settings = DefenceSettings(trusted=LAN, ipv4_prefix=24)
    assert guard.address_key("192.168.1.5") == "a:192.168.1.0/24"
    assert guess(guard, "192.168.1.5", 1) == 2.0  # trusted now: the base delay


# ------------------------------------------------------- address grouping


def test_ipv6_hosts_share_their_64() -> None:
    guard, _ = make()
    assert guess(guard, "2001:db8:1:2::1", 0) == 4
    assert guess(guard, "2001:db8:1:2:ffff:ffff:ffff:fffe", 1) == 6
    assert guess(guard, "2001:db8:1:3::1", 2) == 4  # the next /64
    for n in range(8):  # ten addresses of one /64: one client
        guess(guard, f"2001:db8:1:2::{n + 10:x}", 10 + n)
    assert guard.check("2001:db8:1:2:abcd::1").blocked
    assert not guard.check("2001:db8:1:3::1").blocked
    assert guard.address_key("2001:db8:1:2::99") == "a:2001:db8:1:2::/64"


def test_ipv6_zone_is_ignored() -> None:
    guard, _ = make()
    assert guard.address_key("fe80::1%eth0") == guard.address_key("fe80::2")


def test_prefixes_are_configurable() -> None:
    guard, _ = make(ipv4_prefix=24, ipv6_prefix=48)
    assert guess(guard, "203.0.113.1", 0) == 4
    assert guess(guard, "203.0.113.254", 1) == 6
    assert guess(guard, "203.0.114.1", 2) == 4
    assert guard.address_key("2001:db8:1:ffff::1") == "a:2001:db8:1::/48"


def test_ipv4_mapped_ipv6_is_the_ipv4_client() -> None:
    guard, _ = make()
    assert guard.address_key("::ffff:1.2.3.4") == guard.address_key("1.2.3.4") == "a:1.2.3.4/32"
    for n in range(5):
        guess(guard, "::ffff:1.2.3.4", n)
    for n in range(5, 10):
        guess(guard, "1.2.3.4", n)
    assert guard.check("1.2.3.4").blocked
    assert guard.check("::ffff:1.2.3.4").blocked
    assert guard.check(ipaddress.ip_address("::ffff:1.2.3.4")).blocked


def test_small_ipv6_is_not_mistaken_for_ipv4() -> None:
    guard, _ = make()
    assert guard.address_key("::1") == "a:::/64"
    assert guard.address_key("0.0.0.1") == "a:0.0.0.1/32"


def test_non_ip_peers_have_their_own_bucket() -> None:
    guard, _ = make()
    for n in range(10):
        guess(guard, "", n)
    assert guard.check("").blocked
    assert not guard.check("unix:/run/x").blocked


# -------------------------------------------------------- stale passwords


def test_same_wrong_password_is_one_guess() -> None:
    guard, clock = make()
    stale = guard.fingerprint("alice", "old-password")
    delays = []
    for _ in range(50):
        delays.append(guard.failure(ATTACKER, "alice", stale))
        assert not guard.check(ATTACKER).blocked
        clock.advance(1)
    assert delays == [4.0] * 50


def test_same_wrong_password_retried_for_hours_stays_one_guess() -> None:
    guard, clock = make()
    stale = guard.fingerprint("alice", "old-password")
    for _ in range(200):
        assert guard.failure(ATTACKER, "alice", stale) == 4.0
        clock.advance(30)


def test_different_passwords_each_count() -> None:
    guard, _ = make()
    delays = [
        guard.failure(ATTACKER, "alice", guard.fingerprint("alice", f"p{n}")) for n in range(10)
    ]
    assert delays[:4] == [4, 6, 10, 17]
    assert guard.check(ATTACKER).blocked


def test_same_password_for_different_users_counts() -> None:
    guard, _ = make()
    for n in range(10):  # password spraying: one password, many users
        user = f"user{n}"
        guard.failure(ATTACKER, user, guard.fingerprint(user, "Summer2024!"))
    assert guard.check(ATTACKER).blocked


def test_a_repeat_among_new_guesses_does_not_escalate() -> None:
    guard, _ = make()
    stale = guard.fingerprint("alice", "old")
    assert guard.failure(ATTACKER, "alice", stale) == 4
    assert guess(guard, ATTACKER, 1) == 6
    assert guard.failure(ATTACKER, "alice", stale) == 6  # current level, not the next
    assert guess(guard, ATTACKER, 2) == 10


def test_failures_without_fingerprint_always_count() -> None:
    guard, _ = make()
    delays = [guard.failure(ATTACKER, "alice", None) for _ in range(10)]
    assert delays[:4] == [4, 6, 10, 17]
    assert guard.check(ATTACKER).blocked


def test_fingerprint_is_keyed_and_unambiguous() -> None:
    clock = FakeClock()
    a = Guard(DefenceSettings(), clock=clock, secret=b"k" * 32)
    b = Guard(DefenceSettings(), clock=clock, secret=b"j" * 32)
    assert a.fingerprint("alice", "pw") == a.fingerprint("alice", b"pw")
    assert a.fingerprint("alice", "pw") == a.fingerprint("Alice", "pw")
    assert a.fingerprint("alice", "pw") != b.fingerprint("alice", "pw")
    assert a.fingerprint("ab", "c") != a.fingerprint("a", "bc")
    assert a.fingerprint("alice", "pw") != a.fingerprint("alice", "pw2")
    assert len(a.fingerprint("alice", "pw")) == 32
    # Odd input never raises (lone surrogates from a lenient decode).
    assert len(a.fingerprint("\udcff", "\ud800")) == 32
    with pytest.raises(ValueError, match="16 bytes"):
        Guard(DefenceSettings(), secret=b"short")


def test_random_secret_per_guard() -> None:
    assert Guard(DefenceSettings()).fingerprint("a", "b") != Guard(DefenceSettings()).fingerprint(
        "a", "b"
    )


def test_password_is_never_stored() -> None:
    password = "correct horse battery staple"
    guard, clock = make(user_lockout_after=3, trusted=LAN)
    for address in (ATTACKER, "2001:db8::1", "192.168.1.1"):
        for n in range(12):
            user = f"alice{n % 2}"
            pw = password if n % 3 == 0 else password + str(n)
            guard.failure(address, user, guard.fingerprint(user, pw))
            clock.advance(1)
        guard.success(address, "bob")
    seen: list[object] = []
    _walk(guard, seen, set())
    assert len(seen) > 10  # the walk did reach the records
    needle_s, needle_b = password, password.encode()
    for value in seen:
        if isinstance(value, str):
            assert needle_s not in value
        elif isinstance(value, bytes | bytearray):
            assert needle_b not in value


def _walk(obj: object, out: list[object], visited: set[int]) -> None:
    if id(obj) in visited:
        return
    visited.add(id(obj))
    out.append(obj)
    if isinstance(obj, dict):
        for key, value in obj.items():
            _walk(key, out, visited)
            _walk(value, out, visited)
    elif isinstance(obj, list | tuple | set | frozenset):
        for item in obj:
            _walk(item, out, visited)
    elif hasattr(obj, "__dict__"):
        for value in vars(obj).values():
            _walk(value, out, visited)


# ---------------------------------------------------------------- success


def test_success_resets_the_penalty() -> None:
    guard, _ = make()
    assert [guess(guard, ATTACKER, n) for n in range(3)] == [4, 6, 10]
    guard.success(ATTACKER, "alice")
    assert [guess(guard, ATTACKER, n) for n in range(3, 5)] == [4, 6]


def test_success_does_not_reset_the_block_count() -> None:
    # Else one valid account would let an attacker guess other users' passwords without end.
    guard, _ = make()
    for n in range(9):
        guess(guard, ATTACKER, n, user=f"victim{n}")
    guard.success(ATTACKER, "mallory")
    guess(guard, ATTACKER, 9, user="victim9")
    assert guard.check(ATTACKER).blocked


def test_success_does_not_lift_a_block() -> None:
    guard, _ = make()
    for n in range(10):
        guess(guard, ATTACKER, n)
    guard.success(ATTACKER, "alice")
    assert guard.check(ATTACKER).blocked


def test_success_elsewhere_changes_nothing() -> None:
    guard, _ = make()
    guess(guard, ATTACKER, 0)
    guard.success("203.0.113.9", "alice")
    assert guess(guard, ATTACKER, 1) == 6


# --------------------------------------------------------- user lockout


def test_user_lockout_is_off_by_default() -> None:
    guard, _ = make()
    for n in range(200):
        guess(guard, str(ipaddress.IPv4Address(0x0A000000 + n)), n)
    assert not guard.user_locked("alice")
    assert tracked(guard.users) == 0


def test_user_lockout_from_many_addresses() -> None:
    guard, clock = make(user_lockout_after=5, user_lockout_window=600, user_lockout_for=900)
    for n in range(4):
        guess(guard, f"203.0.113.{n}", n)
        clock.advance(100)
    assert not guard.user_locked("alice")
    guess(guard, "203.0.113.99", 4)
    assert guard.user_locked("alice")
    assert guard.user_locked("ALICE")  # case folded
    assert guard.user_locked(b"alice", "198.51.100.1")
    assert not guard.user_locked("bob")
    clock.advance(899)
    assert guard.user_locked("alice")
    clock.advance(1)
    assert not guard.user_locked("alice")


def test_user_lockout_window_decays() -> None:
    guard, clock = make(user_lockout_after=3, user_lockout_window=100)
    for n in range(10):
        guess(guard, f"203.0.113.{n}", n)
        clock.advance(50)  # never 3 within 100 s
    assert not guard.user_locked("alice")


def test_user_lockout_does_not_stop_trusted_clients_but_counts_them() -> None:
    guard, _ = make(user_lockout_after=3, trusted=LAN)
    for n in range(3):
        guess(guard, "192.168.0.10", n)
    assert guard.user_locked("alice", ATTACKER)
    assert guard.user_locked("alice")
    assert not guard.user_locked("alice", "192.168.0.10")


def test_stale_password_does_not_lock_the_user() -> None:
    guard, clock = make(user_lockout_after=3)
    stale = guard.fingerprint("alice", "old")
    for n in range(50):
        guard.failure(f"203.0.113.{n % 3}", "alice", stale)  # phone roaming between networks
        clock.advance(5)
    assert not guard.user_locked("alice")


def test_success_clears_the_user_count_but_not_a_lockout() -> None:
    guard, _ = make(user_lockout_after=3)
    guess(guard, ATTACKER, 0)
    guess(guard, ATTACKER, 1)
    guard.success("203.0.113.5", "alice")
    guess(guard, ATTACKER, 2)
    guess(guard, ATTACKER, 3)
    assert not guard.user_locked("alice")
    guess(guard, ATTACKER, 4)
    assert guard.user_locked("alice")
    guard.success("203.0.113.5", "alice")
    assert guard.user_locked("alice")


def test_failures_without_a_user_name_count_only_for_the_address() -> None:
    guard, _ = make(user_lockout_after=1)
    assert guard.failure(ATTACKER, None) == 4
    assert tracked(guard.users) == 0


# ----------------------------------------------------------------- memory


def test_memory_is_bounded() -> None:
    guard, clock = make(max_tracked=1000)
    base = int(ipaddress.IPv4Address("10.0.0.0"))
    for n in range(200_000):
        guard.failure(str(ipaddress.IPv4Address(base + n)), None)
        if n % 997 == 0:
            clock.advance(0.001)
            assert tracked(guard.addresses) <= 1000
    assert tracked(guard.addresses) == 1000
    # The newest survive, the oldest were evicted.
    state = guard.addresses
    assert isinstance(state, MemoryState)
    assert guard.address_key(str(ipaddress.IPv4Address(base + 199_999))) in state
    assert guard.address_key("10.0.0.0") not in state


def test_user_memory_is_bounded_apart_from_addresses() -> None:
    # A flood of made-up user names must not evict an address block.
    guard, _ = make(max_tracked=100, user_lockout_after=5)
    for n in range(10):
        guess(guard, ATTACKER, n)
    for n in range(20_000):
        guard.failure("203.0.113.1" if n % 2 else "203.0.113.2", f"user{n}", None)
    assert tracked(guard.users) == 100
    assert guard.check(ATTACKER).blocked


def test_eviction_spares_a_blocked_client_that_keeps_knocking() -> None:
    guard, _ = make(max_tracked=1000)
    for n in range(10):
        guess(guard, ATTACKER, n)
    base = int(ipaddress.IPv4Address("10.0.0.0"))
    for n in range(5000):
        guard.failure(str(ipaddress.IPv4Address(base + n)), None)
        if n % 500 == 0:
            assert guard.check(ATTACKER).blocked  # a read is a use
    assert guard.check(ATTACKER).blocked


def test_idle_state_is_dropped() -> None:
    guard, clock = make(user_lockout_after=5)
    for n in range(20):
        guard.failure(f"203.0.113.{n}", f"user{n}", None)
    for n in range(10):
        guess(guard, ATTACKER, n)  # blocked: kept 300 s
    assert tracked(guard.addresses) == 21
    assert tracked(guard.users) == 21
    clock.advance(60)
    assert guard.prune() == 20  # the addresses' windows ended; the block stays
    assert tracked(guard.addresses) == 1
    assert tracked(guard.users) == 21  # their window is 900 s
    clock.advance(240)
    assert guard.prune() == 1
    assert tracked(guard.addresses) == 0
    clock.advance(600)
    assert guard.prune() == 21
    assert tracked(guard.users) == 0


def test_expired_state_is_dropped_on_the_hot_path() -> None:
    guard, clock = make()
    for n in range(500):
        guard.failure(f"203.0.113.{n % 250}", None)
    clock.advance(61)
    guard.failure(ATTACKER, None)  # no prune(): the write sweeps the cold end
    assert tracked(guard.addresses) == 1


def test_memory_state_directly() -> None:
    clock = FakeClock(0.0)
    state = MemoryState(clock, max_keys=2)
    assert state.update("a", lambda old: (Record(expires_at=10.0), old)) is None
    assert state.get("a") == Record(expires_at=10.0)
    state.update("b", lambda old: (Record(expires_at=20.0), None))
    state.get("a")  # "b" is now the least recently used
    state.update("c", lambda old: (Record(expires_at=20.0), None))
    assert "b" not in state and "a" in state and "c" in state
    state.update("c", lambda old: (None, None))
    assert "c" not in state
    clock.now = 10.0
    assert state.get("a") is None and len(state) == 0
    state.update("d", lambda old: (Record(expires_at=5.0), None))  # already expired: not stored
    assert len(state) == 0
    with pytest.raises(ValueError):
        MemoryState(clock, max_keys=0)


class SerialisingBackend:
    """A stand-in for a shared store: records go out as plain data and come
    back as new objects, keyed by the strings `Guard` chooses."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.data: dict[str, dict[str, Any]] = {}

    def get(self, key: str) -> Record | None:
        raw = self.data.get(key)
        if raw is None or raw["expires_at"] <= self.clock():
            return None
        strikes = tuple(Strike(**s) for s in raw["strikes"])
        return Record(strikes=strikes, until=raw["until"], expires_at=raw["expires_at"])

    def update(self, key: str, change: Callable[[Record | None], tuple[Record | None, T]]) -> T:
        new, result = change(self.get(key))
        if new is None:
            self.data.pop(key, None)
        else:
            self.data[key] = dataclasses.asdict(new)
        return result

    def prune(self) -> int:
        return 0


def test_logic_runs_on_another_backend() -> None:
    clock = FakeClock()
    backend = SerialisingBackend(clock)
    guard = Guard(DefenceSettings(user_lockout_after=3), clock=clock, backend=backend)
    assert [guess(guard, ATTACKER, n) for n in range(4)] == [4, 6, 10, 17]
    stale = guard.fingerprint("alice", "old")
    assert guard.failure(ATTACKER, "alice", stale) == 17
    assert guard.failure(ATTACKER, "alice", stale) == 17
    for n in range(5):
        guess(guard, ATTACKER, 10 + n)
    assert guard.check(ATTACKER).blocked
    assert guard.user_locked("alice")
    assert {key[:2] for key in backend.data} == {"a:", "u:"}
    assert guard.prune() == 0


# --------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("failure_delay", -1.0),
        ("failure_delay", float("nan")),
        ("penalties", (1.0, -2.0)),
        ("block_after", 0),
        ("block_window", 0.0),
        ("block_for", float("inf")),
        ("ipv4_prefix", 33),
        ("ipv6_prefix", -1),
        ("user_lockout_after", 0),
        ("user_lockout_for", 0.0),
        ("user_lockout_window", -5.0),
        ("max_tracked", 0),
    ],
)
def test_bad_settings_are_refused(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field.split("[")[0]):
        DefenceSettings(**{field: value})  # type: ignore[arg-type]


def test_max_delay() -> None:
    assert DefenceSettings().max_delay == 17.0
    assert DefenceSettings(penalties=()).max_delay == 2.0


# ------------------------------------------------------------- properties

ADDRESSES = st.sampled_from(
    [
        "198.51.100.7",
        "::ffff:198.51.100.7",
        "198.51.100.8",
        "2001:db8::1",
        "2001:db8::2",
        "2001:db8:0:1::1",
        "192.168.3.4",  # trusted
        "fd00::5",  # trusted
        "",
        "not an address",
    ]
) | st.text(max_size=20)
USERS = st.none() | st.sampled_from(["alice", "Alice", "bob", "carol"]) | st.text(max_size=8)
PASSWORDS = st.none() | st.sampled_from(["old", "guess1", "guess2"]) | st.text(max_size=8)
ADVANCE = st.sampled_from(
    [0.0, 0.5, 1.0, 30.0, 59.9, 60.0, 61.0, 299.0, 300.0, 1000.0]
) | st.floats(min_value=0, max_value=2000, allow_nan=False)
OPS = st.lists(
    st.tuples(st.sampled_from(["fail", "ok", "check"]), ADDRESSES, USERS, PASSWORDS, ADVANCE),
    max_size=80,
)
SETTINGS = st.builds(
    DefenceSettings,
    failure_delay=st.floats(min_value=0, max_value=5, allow_nan=False),
    penalties=st.lists(st.floats(min_value=0, max_value=30, allow_nan=False), max_size=5).map(
        tuple
    ),
    block_after=st.integers(min_value=1, max_value=6),
    block_window=st.floats(min_value=0.5, max_value=120),
    block_for=st.floats(min_value=0.5, max_value=600),
    trusted=st.just(LAN),
    ipv6_prefix=st.integers(min_value=0, max_value=128),
    ipv4_prefix=st.integers(min_value=0, max_value=32),
    user_lockout_after=st.none() | st.integers(min_value=1, max_value=4),
    max_tracked=st.integers(min_value=1, max_value=6),
)


@settings(max_examples=300, deadline=None)
@given(SETTINGS, OPS)
def test_random_sequences_keep_the_invariants(s: DefenceSettings, ops: list[Any]) -> None:
    clock = FakeClock()
    guard = Guard(s, clock=clock)
    for op, address, user, password, advance in ops:
        clock.advance(advance)
        trusted = address in LAN
        if op == "fail":
            fp = (
                guard.fingerprint(user, password)
                if user is not None and password is not None
                else None
            )
            delay = guard.failure(address, user, fp)
            assert s.failure_delay <= delay <= s.max_delay
            if trusted:
                assert delay == s.failure_delay
        elif op == "ok":
            guard.success(address, user if user is not None else "")
        verdict = guard.check(address)
        if verdict.blocked:
            assert 0 < verdict.retry_after <= s.block_for * (1 + 1e-9)
            assert not trusted
        else:
            assert verdict.retry_after == 0
        if user is not None:
            locked = guard.user_locked(user, address)
            assert not (locked and (trusted or s.user_lockout_after is None))
        assert tracked(guard.addresses) <= s.max_tracked
        assert tracked(guard.users) <= s.max_tracked


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from([0.0, 0.1, 1.0, 10.0, 59.0, 61.0, 500.0]), max_size=60),
    st.text(max_size=10),
)
def test_one_repeated_password_never_blocks_or_escalates(
    advances: list[float], password: str
) -> None:
    guard, clock = make(user_lockout_after=2)
    stale = guard.fingerprint("alice", password)
    for advance in advances:
        clock.advance(advance)
        assert guard.failure(ATTACKER, "alice", stale) == 4.0
        assert not guard.check(ATTACKER).blocked
        assert not guard.user_locked("alice")
