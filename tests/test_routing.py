"""Per-user backend routing: named backends and pools in the config, the
order of per-user choices, rendezvous hashing, health, the routing table."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authgate.config import Address, BackendSettings, ConfigError, from_dict, loops
from authgate.routing import (
    Backend,
    Health,
    Route,
    RouteTable,
    RoutingError,
    TableError,
    UserHints,
    choose,
    parse_table,
    rendezvous_order,
)

SOURCE = Path("/etc/authgate/authgate.toml")


def config(**extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "users": {"file": "users.toml"},
        "backends": {
            "store1": {"address": "127.0.0.1:1143", "master_user": "m", "master_password": "p"},
            "store2": {"address": "127.0.0.1:2143", "master_user": "m", "master_password": "p"},
            "submit": {"addresses": ["127.0.0.1:1587", "127.0.0.1:2587"]},
        },
        "listeners": [
            {"name": "imap", "protocol": "imap", "listen": "127.0.0.1:143", "backend": "store1"},
            {"name": "sub", "protocol": "smtp", "listen": "127.0.0.1:587", "backend": "submit"},
        ],
    }
    data.update(extra)
    return data


def test_named_backends_and_pools() -> None:
    cfg = from_dict(config(), SOURCE)
    imap, sub = cfg.listeners
    assert imap.route_default.name == "store1" and not imap.route_default.pool("imap")
    assert imap.backend.address == Address("127.0.0.1", 1143)
    assert imap.backend.master_user == "m"
    assert sub.route_default.pool("smtp")
    assert [m.address.port for m in sub.default_members()] == [1587, 2587]
    assert set(cfg.backends) == {"store1", "store2", "submit"}


def test_per_protocol_addresses() -> None:
    data = config()
    data["backends"]["store2"] = {
        "imap": "127.0.0.1:2143",
        "pop3": ["127.0.0.1:2110", "127.0.0.1:3110"],
        "master_user": "m",
        "master_password": "p",
    }
    data["listeners"][0]["backend"] = "store2"
    cfg = from_dict(data, SOURCE)
    store2 = cfg.backends["store2"]
    assert [m.address.port for m in store2.members_for("imap")] == [2143]
    assert [m.address.port for m in store2.members_for("pop3")] == [2110, 3110]
    assert store2.members_for("smtp") == ()
    assert cfg.listeners[0].backend.address.port == 2143
    with pytest.raises(RoutingError, match="has no smtp address"):
        choose(
            "bob",
            "smtp",
            cfg.listeners[1].route_default,
            cfg.backends,
            hints=UserHints(entry="store2"),
        )


def test_single_host_port_form_still_works() -> None:
    data = config()
    data["listeners"][1]["backend"] = "127.0.0.1:25"
    sub = from_dict(data, SOURCE).listeners[1]
    assert sub.default_backend is None
    assert sub.route_default.members == (BackendSettings(Address("127.0.0.1", 25)),)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda d: d["listeners"][0].update(backend="stor1"),
            "listeners[0].backend: 'stor1' is neither a [backends] name (have: store1, store2, "
            "submit) nor host:port",
        ),
        (
            lambda d: d["backends"]["store2"].update(addresses=["127.0.0.1:9"]),
            "backends.store2.addresses: give address or addresses, not both",
        ),
        (
            lambda d: d["backends"]["store2"].pop("address"),
            "backends.store2.address: is required",
        ),
        (
            lambda d: (
                d["backends"].update(store2={"pop3": "127.0.0.1:2110"}),
                d["listeners"][0].update(backend="store2"),
            ),
            "listeners[0].backend: backends.store2 has no address for imap",
        ),
        (
            lambda d: d["backends"]["submit"].update(addresses=[]),
            "backends.submit.addresses: is an empty list",
        ),
        (
            lambda d: d["backends"]["submit"].update(addresses=["127.0.0.1:1", "127.0.0.1:1"]),
            "backends.submit.addresses[1]: '127.0.0.1:1' is listed twice",
        ),
        (
            lambda d: d["backends"]["store1"].update(adress="x"),
            "backends.store1.adress: unknown key",
        ),
        (
            lambda d: d["backends"]["store1"].pop("master_user"),
            "listeners[0].backend: terminate mode logs in to the backend as the user",
        ),
        (
            lambda d: d.update(routing={"hosts": {"mail2.example.org": "nowhere"}}),
            "routing.hosts.mail2.example.org: 'nowhere' is not a [backends] name",
        ),
        (
            lambda d: d.update(routing={"down_for": 0}),
            "routing.down_for: 0 is outside 1..3600",
        ),
        (
            lambda d: d.update(routing={"table": "/nonexistent/routes.toml"}),
            "routing.table: '/nonexistent/routes.toml' is not a file",
        ),
    ],
)
def test_config_errors_name_the_key(change: Any, message: str) -> None:
    data = config()
    change(data)
    with pytest.raises(ConfigError) as info:
        from_dict(data, SOURCE)
    assert message in str(info.value)


def test_a_backend_that_is_a_listener_is_found_as_a_loop() -> None:
    data = config()
    data["backends"]["store2"]["address"] = "localhost:587"
    data["listeners"][0]["listen"] = "0.0.0.0:1143"
    found = loops(from_dict(data, SOURCE))
    assert found == [
        "backends.store1: '127.0.0.1:1143' is authgate itself (listeners[0].listen): "
        "a session would loop back into the gateway",
        "backends.store2: 'localhost:587' is authgate itself (listeners[1].listen): "
        "a session would loop back into the gateway",
    ]


def _backend(name: str, *ports: int) -> Backend:
    return Backend(name, tuple(BackendSettings(Address("127.0.0.1", p)) for p in ports))


BACKENDS = {
    "store1": _backend("store1", 1143),
    "store2": _backend("store2", 2143),
    "pool": _backend("pool", 1, 2, 3),
}


def test_choice_order_entry_directory_table_default() -> None:
    table = RouteTable(users={"carol@x.org": "store1"}, domains={"y.org": "store2"})
    hosts = {"mail2.example.org": "store2"}
    default = BACKENDS["pool"]

    def pick(user: str, hints: UserHints | None = None) -> tuple[str, str]:
        hints = hints or UserHints()
        route = choose(user, "imap", default, BACKENDS, hints=hints, table=table, hosts=hosts)
        return route.backend.name, route.why

    assert pick("carol@x.org", UserHints(entry="store2")) == ("store2", "users file entry")
    assert pick("carol@x.org", UserHints(directory_host="MAIL2.example.org.")) == (
        "store2",
        "directory attribute (mail2.example.org)",
    )
    assert pick("carol@x.org") == ("store1", "routing table (user)")
    assert pick("dave@Y.org") == ("store2", "routing table (domain y.org)")
    assert pick("erin@z.org") == ("pool", "the listener's default backend")
    with pytest.raises(RoutingError, match="'gone', which is not in"):
        pick("x", UserHints(entry="gone"))
    with pytest.raises(RoutingError, match="does not map"):
        pick("x", UserHints(directory_host="elsewhere"))


def test_pinned_user_never_moves_to_another_store() -> None:
    health = Health()
    health.mark_down(Address("127.0.0.1", 2143), now=100, down_for=30, why="refused")
    def route_at(now: float) -> Route:
        return choose(
            "bob",
            "imap",
            BACKENDS["store1"],
            BACKENDS,
            hints=UserHints(entry="store2"),
            health=health,
            now=now,
        )

    route = route_at(110)
    assert route.backend.name == "store2" and not route.available
    later = route_at(131)
    assert [m.address.port for m in later.candidates] == [2143]


def test_pool_fails_over_to_the_next_member() -> None:
    pool = BACKENDS["pool"]
    first = choose("alice", "imap", pool, BACKENDS).candidates
    health = Health()
    health.mark_down(first[0].address, now=0, down_for=30, why="timeout")
    after = choose("alice", "imap", pool, BACKENDS, health=health, now=1).candidates
    assert after == first[1:]


def test_health_marks_and_expires() -> None:
    health = Health()
    address = Address("127.0.0.1", 9)
    assert health.mark_down(address, 0, 10, "refused") is True
    assert health.mark_down(address, 1, 10, "refused") is False  # already down: no new log line
    assert health.down(5) == {"127.0.0.1:9": "refused"}
    assert not health.is_up(address, 10.9)
    assert health.is_up(address, 11.1)
    assert health.mark_up(address) is False


members = st.lists(st.integers(min_value=1, max_value=65535), min_size=2, max_size=12, unique=True)
users = st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=60, unique=True)


@settings(max_examples=200, deadline=None)
@given(members, users, st.data())
def test_removing_one_member_moves_only_its_users(
    ports: list[int], names: list[str], data: st.DataObject
) -> None:
    addresses = [Address("10.0.0.1", p) for p in ports]
    removed = data.draw(st.sampled_from(addresses))
    rest = [a for a in addresses if a != removed]
    for user in names:
        before = rendezvous_order(user, addresses, str)[0]
        after = rendezvous_order(user, rest, str)[0]
        if before != removed:
            assert after == before  # nobody else moves
        # and the removed member's users go to their second choice
        else:
            assert after == rendezvous_order(user, addresses, str)[1]


@settings(max_examples=100, deadline=None)
@given(members, st.text(max_size=30))
def test_order_does_not_depend_on_the_listed_order(ports: list[int], user: str) -> None:
    addresses = [Address("10.0.0.1", p) for p in ports]
    assert rendezvous_order(user, addresses, str) == rendezvous_order(
        user, list(reversed(addresses)), str
    )


def test_pool_spreads_users() -> None:
    pool = [Address("127.0.0.1", p) for p in (1, 2, 3)]
    firsts = [rendezvous_order(f"user{i}", pool, str)[0] for i in range(300)]
    assert all(firsts.count(a) > 60 for a in pool)


def test_routing_table_file() -> None:
    text = '[users]\n"Bob@x.org" = "store2"\n[domains]\n"Y.org." = "store1"\n'
    table = parse_table(text, "routes.toml", ["store1", "store2"])
    assert table.lookup("Bob@x.org") == ("store2", "routing table (user)")
    assert table.lookup("someone@y.ORG") == ("store1", "routing table (domain y.org)")
    assert table.lookup("nobody") is None
    with pytest.raises(TableError, match=r"routes.toml: users.'a': 'store3' is not a \[backends\]"):
        parse_table('[users]\na = "store3"\n', "routes.toml", ["store1"])
    with pytest.raises(TableError, match="unknown key"):
        parse_table('[user]\na = "store1"\n', "routes.toml", ["store1"])
    with pytest.raises(TableError, match="not valid TOML"):
        parse_table("[users\n", "routes.toml", ["store1"])


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_routing_table_parser_never_crashes(text: str) -> None:
    with contextlib.suppress(TableError):
        parse_table(text, "routes.toml", ["store1"])


# ------------------------------------------------------------------ the CLI

CLI_CONFIG = """
[users]
file = "users.toml"
[routing]
table = "routes.toml"
[backends.store1]
address = "127.0.0.1:1143"
master_user = "m"
master_password = "p"
[backends.store2]
imap = "127.0.0.1:2143"
master_user = "m"
master_password = "p"
[backends.submit]
smtp = ["127.0.0.1:1587", "127.0.0.1:2587"]
[[listeners]]
name = "imap"
protocol = "imap"
listen = "127.0.0.1:143"
backend = "store1"
[[listeners]]
name = "sub"
protocol = "smtp"
listen = "127.0.0.1:587"
backend = "submit"
"""

USERS = """
[users.alice]
secrets = ["{PLAIN}a"]
[users.bob]
secrets = ["{PLAIN}b"]
backend = "store2"
"""


def _cli_files(tmp_path: Path) -> Path:
    (tmp_path / "users.toml").write_text(USERS)
    (tmp_path / "routes.toml").write_text('[domains]\n"example.org" = "store2"\n')
    path = tmp_path / "authgate.toml"
    path.write_text(CLI_CONFIG)
    return path


def test_route_command_explains(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from authgate.cli import main

    path = _cli_files(tmp_path)
    assert main(["route", "-c", str(path), "bob", "--listener", "imap"]) == 0
    out = capsys.readouterr().out
    assert "backend store2 (single: 127.0.0.1:2143)" in out
    assert "because: users file entry" in out
    assert main(["route", "-c", str(path), "carol@example.org", "--listener", "imap"]) == 0
    assert "because: routing table (domain example.org)" in capsys.readouterr().out
    assert main(["route", "-c", str(path), "alice"]) == 0
    out = capsys.readouterr().out
    assert "because: the listener's default backend" in out
    assert "order: 127.0.0.1:" in out  # the pool's order for alice
    # bob on the submission listener: store2 has no smtp address.
    assert main(["route", "-c", str(path), "bob", "--listener", "sub"]) == 1
    assert "has no smtp address" in capsys.readouterr().out


def test_check_and_negotiate_show_routing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from authgate.cli import main

    path = _cli_files(tmp_path)
    assert main(["check", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert "  routing: default store1 (single: 127.0.0.1:1143)" in out
    assert "  routing: default submit (pool of 2: 127.0.0.1:1587, 127.0.0.1:2587)" in out
    assert "routing table" in out and "(0 user(s), 1 domain(s))" in out
    args = ["negotiate", "-c", str(path), "--listener", "imap", "--client-ip", "127.0.0.1"]
    assert main([*args, "--json", "--user", "bob"]) == 0
    backend = json.loads(capsys.readouterr().out)["backend"]
    assert backend == {
        "name": "store2",
        "why": "users file entry",
        "pool": False,
        "order": ["127.0.0.1:2143"],
        "address": "127.0.0.1:2143",
    }
    assert main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["backend"]["name"] == "store1"


def test_users_file_entry_must_name_a_backend(tmp_path: Path) -> None:
    from authgate.cli import main

    path = _cli_files(tmp_path)
    (tmp_path / "users.toml").write_text(USERS.replace('"store2"', '"store9"'))
    assert main(["route", "-c", str(path), "bob"]) == 2


def test_sessions_without_a_user_spread_by_client_address() -> None:
    pool = BACKENDS["pool"]
    firsts = {
        choose(None, "smtp", pool, BACKENDS, spread=f"192.0.2.{i}").candidates[0].address
        for i in range(1, 60)
    }
    assert len(firsts) == 3
    assert (
        choose(None, "smtp", pool, BACKENDS, spread="192.0.2.7").order
        == choose(None, "smtp", pool, BACKENDS, spread="192.0.2.7").order
    )


def test_referral_url_puts_the_user_in_safely() -> None:
    from authgate.routing import referral_url

    assert referral_url("imap://store3.example.org/", "dan") == "imap://dan@store3.example.org/"
    hostile = referral_url("imap://h.example/", "a] x\r\nb@c;AUTH=*")
    assert hostile == "imap://a%5D%20x%0D%0Ab%40c%3BAUTH%3D%2A@h.example/"
    data = config()
    data["backends"]["remote"] = {"referral": "imap://store3.example.org:143/"}
    assert from_dict(data, SOURCE).backends["remote"].referral == "imap://store3.example.org:143/"
    data["backends"]["remote"] = {"referral": "imap://x/\r\n"}
    with pytest.raises(ConfigError, match="is not an imap://host"):
        from_dict(data, SOURCE)
