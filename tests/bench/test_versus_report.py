"""bench.versus's report (the table of issue #17, floors, the authgate@base
column), bench.instructions' strace summary, and loadgen's POP3 login loop
against the embedded POP3 backend. No wall-clock assertions: the figures
here are made up, or counts."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench import loadgen, versus
from bench.instructions import Syscalls, parse_strace_summary, per_login_table
from bench.versus import BASE, ISSUE_ROWS, Figure, Floor, Plan, Record, Row, table


def figure(name: str, key: str, by_target: dict[str, list[float]]) -> Figure:
    found = Figure(name, None)
    for target, values in by_target.items():
        for value in values:
            found.add(target, Record({key: value}))
    return found


def row_of(lines: list[str], label: str) -> list[str]:
    matches = [line for line in lines if line.startswith(f"| {label} |")]
    assert len(matches) == 1, lines
    return [cell.strip() for cell in matches[0].strip("|").split("|")]


def test_issue_rows_are_the_issues_table_in_order() -> None:
    labels = [r.label.format_map(vars(Plan())) for r in ISSUE_ROWS]
    assert labels == [
        "IMAP logins/s (AUTHENTICATE PLAIN, 32 clients)",
        "proxy CPU per IMAP login, µs",
        "IMAPS logins/s (128 clients)",
        "proxy CPU per IMAPS login, µs",
        "POP3 logins/s (AUTH PLAIN, 32 clients)",
        "proxy CPU per POP3 login, µs",
        "one client, IMAP login p50, ms",
        "one client, IMAPS login p50, ms",
        "NOOP round trip over direct, p50, µs",
        "proxy CPU per spliced NOOP, µs",
        "proxy memory per held session (PSS), KiB, cleartext",
        "proxy memory per held session (PSS), KiB, TLS",
        "FETCH throughput, MiB/s (10 MiB message, cleartext)",
    ]


def test_client_counts_in_the_labels_follow_the_plan() -> None:
    found = {"logins-plain": figure("logins-plain", "per_second", {"nginx": [10], "authgate": [5]})}
    lines = table(found, ISSUE_ROWS[:1], True, plan=Plan(imap_clients=7))
    assert row_of(lines, "IMAP logins/s (AUTHENTICATE PLAIN, 7 clients)")


def test_medians_ratio_and_a_missed_rate_floor() -> None:
    found = {
        "logins-plain": figure(
            "logins-plain",
            "per_second",
            {"direct": [300, 100, 200], "nginx": [900, 898, 1], "authgate": [624, 600, 700]},
        )
    }
    cells = row_of(
        table(found, ISSUE_ROWS[:1], True), "IMAP logins/s (AUTHENTICATE PLAIN, 32 clients)"
    )
    assert cells[1:] == ["200", "898", "624", "0.69x", "≥ 1.0x nginx", "**missed**"]


def test_cpu_rows_are_scaled_to_microseconds_and_held_below_nginx() -> None:
    row = ISSUE_ROWS[1]
    found = {
        "logins-plain": figure(
            "logins-plain",
            "cpu_ms_per_login",
            {"direct": [1.0], "nginx": [0.359], "authgate": [0.3]},
        )
    }
    cells = row_of(table(found, [row], True), "proxy CPU per IMAP login, µs")
    assert cells[1:] == ["1,000", "359", "300", "0.84x", "≤ 1.0x nginx", "met"]


def test_noop_overhead_is_the_proxy_minus_direct() -> None:
    row = next(r for r in ISSUE_ROWS if r.overhead)
    found = {
        "noop-plain": figure(
            "noop-plain", "p50_ms", {"direct": [0.100], "nginx": [0.126], "authgate": [0.163]}
        )
    }
    cells = row_of(table(found, [row], True), row.label)
    assert cells[1:4] == ["100 (its own)", "+26", "+63"]
    assert cells[4] == "2.42x"
    assert cells[-1] == "**missed**"


def test_overhead_row_when_nginx_adds_nothing() -> None:
    row = next(r for r in ISSUE_ROWS if r.overhead)
    found = {
        "noop-plain": figure(
            "noop-plain", "p50_ms", {"direct": [0.1], "nginx": [0.1], "authgate": [0.12]}
        )
    }
    cells = row_of(table(found, [row], True), row.label)
    assert cells[-2:] == ["overhead ≤ 1.0x nginx's", "?"]


def test_tls_latency_is_held_to_direct() -> None:
    row = next(r for r in ISSUE_ROWS if r.floor.startswith("direct"))
    found = {
        "latency-tls": figure(
            "latency-tls",
            "login_p50_ms",
            {"direct": [2.73], "nginx": [47.6], "authgate": [4.46]},
        )
    }
    cells = row_of(table(found, [row], True), row.label)
    assert cells[4] == "0.09x"
    assert cells[-2:] == ["≤ 1.2x direct", "**missed** (1.63x direct)"]
    found["latency-tls"] = figure(
        "latency-tls", "login_p50_ms", {"direct": [3.0], "nginx": [47.6], "authgate": [3.3]}
    )
    assert row_of(table(found, [row], True), row.label)[-1] == "met (1.10x direct)"


def test_baseline_column_and_now_over_base() -> None:
    row = ISSUE_ROWS[1]
    found = {
        "logins-plain": figure(
            "logins-plain",
            "cpu_ms_per_login",
            {"direct": [1.0], "nginx": [0.4], "authgate": [0.6], BASE: [0.8]},
        )
    }
    lines = table(found, [row], True, names=(*versus.TARGETS, BASE))
    assert lines[0].startswith(
        "| figure | direct | nginx | authgate | authgate / nginx | authgate@base | now / base |"
    )
    cells = row_of(lines, row.label)
    assert cells[5:7] == ["800", "0.75x"]
    # Without the base target there is no such column.
    assert BASE not in table(found, [row], True)[0]


def test_rows_without_figures_are_left_out_and_missing_targets_show_a_dash() -> None:
    found = {"memory-plain": figure("memory-plain", "pss_kib", {"nginx": [10.4]})}
    lines = table(found, ISSUE_ROWS, True)
    assert len(lines) == 3  # head, rule, the one row measured
    cells = row_of(lines, "proxy memory per held session (PSS), KiB, cleartext")
    assert cells[1:5] == ["-", "10.4", "-", "-"]


def test_floor_parse_and_describe() -> None:
    assert Floor.parse("nginx>=1") == Floor("nginx", ">=", 1.0)
    assert Floor.parse("direct<=1.2").describe() == "≤ 1.2x direct"
    assert Floor.parse("nginx<=1").met(1.0)
    assert not Floor.parse("nginx>=1").met(0.99)
    for bad in ("nginx", "haproxy<=1", "nginx<=x"):
        with pytest.raises(ValueError):
            Floor.parse(bad)


def test_every_row_floor_parses_and_names_a_figure_the_run_makes() -> None:
    names = {"memory-plain", "memory-tls"}
    names |= {f"logins-{m}" for m in versus.LOGIN_MODES}
    names |= {f"{what}-{m}" for what in ("noop", "latency") for m in versus.MODES}
    names |= {f"fetch-{s}MiB-{m}" for s in (1, 10) for m in versus.MODES}
    for row in (*ISSUE_ROWS, *versus.OTHER_ROWS, *versus.COST_ROWS):
        assert row.figure in names, row
        if row.floor:
            Floor.parse(row.floor)


def test_plan_clients_by_mode() -> None:
    plan = Plan(imap_clients=1, imaps_clients=2, pop3_clients=3)
    assert [plan.clients(m) for m in versus.LOGIN_MODES] == [1, 2, 3]


def test_client_count_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(versus.os, "geteuid", lambda: 1000)  # main stops before any server
    with pytest.raises(SystemExit):
        versus.main(["--imap-clients", "0"])
    assert versus.main(["--imap-clients", "5", "--pop3-clients", "9", "--quick"]) == 2


def test_baseline_tree_must_hold_authgate(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        versus.main(["--baseline-tree", str(tmp_path)])


def test_describe_tree_names_the_commit() -> None:
    text = versus.describe_tree(versus.REPO)
    assert text.startswith(f"{versus.REPO} at ")


def test_nan_cells() -> None:
    assert math.isnan(versus.ratio(1.0, math.nan))
    assert math.isnan(versus.ratio(1.0, 0.0))
    shown = versus.cells(Row("x", "f", "k", "{}", overhead=True), {"nginx": 2.0})
    assert math.isnan(shown["nginx"])  # no direct figure: no overhead


# --- bench.instructions --strace ----------------------------------------------------

STRACE_SUMMARY = """\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 38.30    0.000424           8        48           read
 20.00    0.000200           2       100        50 recvfrom
  0.00    0.000000           0         2         2 accept4
------ ----------- ----------- --------- --------- ----------------
100.00    0.001107           4       150        52 total
"""


def test_parse_strace_summary() -> None:
    assert parse_strace_summary(STRACE_SUMMARY) == [
        Syscalls("read", 48, 0),
        Syscalls("recvfrom", 100, 50),
        Syscalls("accept4", 2, 2),
    ]
    assert parse_strace_summary("") == []


def test_per_login_table() -> None:
    lines = per_login_table(parse_strace_summary(STRACE_SUMMARY), 2)
    assert lines[2] == "| recvfrom | 50.00 | 25.00 |"
    assert lines[3] == "| read | 24.00 | - |"
    assert lines[-1] == "| total | 75.00 | 26.00 |"


# --- loadgen: POP3 --------------------------------------------------------------------


@pytest.mark.asyncio
async def test_pop3_login_loop_against_the_embedded_backend(tmp_path: Path) -> None:
    from authgate.testing.backends import start_backends

    backends = await start_backends(tmp_path / "mail", {"bench": "secret-1"})
    try:
        target = loadgen.Target("127.0.0.1", backends.pop3.port, protocol="pop3")
        assert str(target).startswith("pop3://")
        good = await loadgen.measure_logins(
            target, loadgen.Credentials("bench", "secret-1"), clients=1, count=6
        )
        assert (good.logins, good.refused, good.errors) == (6, 0, 0)
        bad = await loadgen.measure_logins(
            target, loadgen.Credentials("bench", "wrong"), clients=1, count=2
        )
        assert (bad.logins, bad.refused) == (0, 2)
        # One at a time: this backend locks the maildrop per session (RFC 1939).
        held = await loadgen.hold_connections(target, loadgen.Credentials("bench", "secret-1"), 1)
        assert all(isinstance(c, loadgen.Pop3Connection) for c in held)
        await loadgen.release(held)
    finally:
        await backends.close()


def test_connection_class_by_protocol() -> None:
    assert loadgen.connection_class(loadgen.Target("h", 1)) is loadgen.Connection
    assert loadgen.connection_class(loadgen.Target("h", 1, protocol="pop3")) is (
        loadgen.Pop3Connection
    )
    with pytest.raises(ValueError):
        loadgen.connection_class(loadgen.Target("h", 1, protocol="smtp"))


@pytest.mark.parametrize(
    ("tuning", "warm"), [(versus.Tuning(), 0), (versus.Tuning("asyncio", 3), 3)]
)
def test_bench_authgate_config_carries_its_tuning(
    tmp_path: Path, tuning: versus.Tuning, warm: int
) -> None:
    """The config the bench writes for a target loads as authgate's own, with
    the target's event loop and warm connections on every backend."""
    from authgate.config import load

    bench = versus.BenchAuthgate(
        tmp_path,
        tmp_path / "cert.pem",
        tmp_path / "key.pem",
        1143,
        {},
        ("authgate", "secret"),
        tuning=tuning,
        backend_pop3_port=1110,
        imap=2143,
        imaps=2993,
        pop3=2110,
    )
    for name in ("cert.pem", "key.pem", "master.secret", "users.toml"):
        (tmp_path / name).write_text("")
    bench.conf_path.write_text(bench.render(tmp_path / "users.toml", tmp_path / "master.secret"))
    config = load(bench.conf_path)
    assert config.event_loop.value == tuning.event_loop
    assert [listener.backend.warm_connections for listener in config.listeners] == [warm] * 3


def test_warm_options_are_checked_and_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(versus.os, "geteuid", lambda: 1000)  # main stops before any server
    with pytest.raises(SystemExit):
        versus.main(["--warm", "65"])
    with pytest.raises(SystemExit):
        versus.main(["--baseline-warm", "-1"])
    assert versus.main(["--warm", "4", "--quick"]) == 2
    assert versus.Tuning("uvloop", 4).describe() == "event_loop = 'uvloop', warm_connections = 4"
    assert versus.Tuning("asyncio").describe() == "event_loop = 'asyncio'"


def test_report_header_names_each_targets_settings() -> None:
    header = versus.report(
        [],
        Plan(),
        True,
        1.0,
        (None, None),
        [],
        [],
        {"authgate": versus.Tuning(), BASE: versus.Tuning("asyncio", 4)},
        {"authgate": versus.REPO, BASE: versus.REPO},
    ).splitlines()[0]
    assert "authgate with event_loop = 'uvloop';" in header
    assert f"{BASE} with event_loop = 'asyncio', warm_connections = 4;" in header
