"""The benchmark scaffold works: every load-generator figure against the
embedded backend, through authgate and through authgate with TLS, for tiny
counts. Correctness only: benchmarks report speed, tests never assert on it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from bench import compare, loadgen
from bench.loadgen import Credentials, Target
from bench.serve import ARGON2_USER, DEFAULT_USER, USER, BenchStack, bench_stack, make_message

REPO = Path(__file__).resolve().parents[2]
SIZE = 5000  # octets of the one message in USER's INBOX
TARGETS = ("direct", "authgate", "authgate-tls")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("certs")  # made once, reused by every stack


# One stack for the module (each takes a second or two to start: it hashes
# three users' passwords), on the module's event loop.
shared_loop = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def running(
    tmp_path_factory: pytest.TempPathFactory, certs: Path
) -> AsyncIterator[BenchStack]:
    async with bench_stack(tmp_path_factory.mktemp("stack"), sizes=[SIZE], certs=certs) as bench:
        yield bench


def target_of(bench: BenchStack, name: str) -> Target:
    spec = bench.describe()["targets"][name]
    return Target(spec["host"], spec["port"], tls=spec["tls"], ca_file=str(bench.stack.ca_file))


@shared_loop
@pytest.mark.parametrize("name", TARGETS)
async def test_every_figure_is_sane(running: BenchStack, name: str) -> None:
    target = target_of(running, name)
    user = Credentials(USER, running.password)
    pids = [os.getpid()]  # the stack runs in this process

    logins = await loadgen.measure_logins(target, user, clients=2, count=5, pids=pids)
    assert (logins.logins, logins.refused, logins.errors) == (5, 0, 0), logins.first_error
    assert logins.per_second > 0
    assert 0 < logins.p50_ms <= logins.p99_ms
    assert logins.usage.target_cpu_s is not None and logins.usage.target_cpu_s >= 0

    assert await loadgen.message_sizes(target, user) == [SIZE]
    fetch = await loadgen.measure_fetch(target, user, message=1, repeat=1, warmup=0)
    assert (fetch.fetches, fetch.message_size, fetch.bytes_fetched) == (1, SIZE, SIZE)
    assert fetch.mib_per_s > 0

    memory = await loadgen.measure_memory(
        target, user, pids=pids, connections=3, concurrency=2, settle=0.0
    )
    assert memory.connections == 3
    assert memory.rss_before_kib > 0 and memory.rss_after_kib > 0

    noop = await loadgen.measure_noop(target, user, count=10, warmup=1)
    assert noop.count == 10
    assert 0 < noop.p50_ms <= noop.p99_ms
    assert noop.mean_ms > 0


@pytest.mark.asyncio
async def test_fetch_counts_a_large_literal_exactly(tmp_path: Path, certs: Path) -> None:
    # Bigger than one read chunk of the generator, and not a multiple of it.
    size = 3 * 1024 * 1024 + 17
    async with bench_stack(tmp_path, sizes=[SIZE, size], certs=certs) as bench:
        user = Credentials(USER, bench.password)
        for name in ("direct", "authgate-tls"):
            fetch = await loadgen.measure_fetch(
                target_of(bench, name), user, message=2, repeat=2, warmup=0
            )
            assert (fetch.message_size, fetch.bytes_fetched) == (size, 2 * size)


@shared_loop
@pytest.mark.parametrize("user", [DEFAULT_USER, ARGON2_USER])
async def test_every_user_logs_in_through_authgate(running: BenchStack, user: str) -> None:
    target = target_of(running, "authgate-tls")
    result = await loadgen.measure_logins(
        target, Credentials(user, running.password), clients=1, count=1
    )
    assert (result.logins, result.errors, result.refused) == (1, 0, 0), result.first_error


@shared_loop
async def test_users_keep_the_secrets_the_figures_are_named_after(running: BenchStack) -> None:
    store = running.stack.gateway.runtimes[0].store
    assert store is not None

    def schemes(name: str) -> list[str]:
        user = store.user(name)
        assert user is not None
        return [secret.scheme for secret in user.secrets]

    assert schemes(USER) == ["SSHA512"]
    assert schemes(ARGON2_USER) == ["ARGON2ID"]
    assert len(schemes(DEFAULT_USER)) > 1  # every form `authgate passwd` writes


@pytest.mark.asyncio
async def test_wrong_password_is_counted_as_refused(tmp_path: Path, certs: Path) -> None:
    # A stack of its own: authgate may slow down or block an address after
    # failed logins, which must not leak into the other tests.
    async with bench_stack(tmp_path, sizes=[SIZE], certs=certs) as bench:
        wrong = Credentials(USER, "not-the-password")
        for name, count in (("direct", 2), ("authgate", 1)):
            result = await loadgen.measure_logins(
                target_of(bench, name), wrong, clients=1, count=count
            )
            assert (result.logins, result.refused, result.errors) == (0, count, 0), name


@shared_loop
async def test_connections_come_from_the_given_sources(running: BenchStack) -> None:
    sources = ("127.0.0.2", "127.0.0.3")
    spec = target_of(running, "direct")
    target = Target(spec.host, spec.port, sources=sources)
    held = await loadgen.hold_connections(
        target, Credentials(USER, running.password), 4, concurrency=2
    )
    try:
        used = {c.writer.get_extra_info("sockname")[0] for c in held}
    finally:
        await loadgen.release(held)
    assert used == set(sources)


@shared_loop
async def test_cli_prints_json(running: BenchStack) -> None:
    target = target_of(running, "authgate")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.loadgen",
        "--target",
        f"{target.host}:{target.port}",
        "--what",
        "noop",
        "--count",
        "5",
        "--user",
        USER,
        "--pid",
        str(os.getpid()),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "BENCH_PASSWORD": running.password},
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    result = json.loads(out)
    assert result["count"] == 5
    assert result["p50_ms"] > 0
    assert result["usage"]["target_cpu_s"] is not None


@pytest.mark.parametrize("size", [100, 101, 155, 156, 157, 1000, 65536, 1024 * 1024])
def test_make_message_has_the_exact_size(size: int) -> None:
    data = make_message(size, "t")
    assert len(data) == size
    assert data.endswith(b"\r\n")
    # Only CRLF line ends: the stored size is what was asked for.
    assert data.count(b"\n") == data.count(b"\r\n") == data.count(b"\r")
    assert b"\r\n\r\n" in data


def test_make_message_refuses_a_size_without_room_for_the_header() -> None:
    with pytest.raises(ValueError):
        make_message(10, "t")


def test_process_figures_include_children() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in loadgen.process_tree([os.getpid()])
        assert loadgen.rss_kib([child.pid]) > 0
        assert loadgen.rss_kib([os.getpid()]) > loadgen.rss_kib([child.pid]) > 0
        assert loadgen.cpu_seconds([os.getpid()]) > 0
    finally:
        child.kill()
        child.wait()


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert loadgen.percentile(values, 50) == 50.0
    assert loadgen.percentile(values, 99) == 99.0
    assert loadgen.percentile([7.0], 99) == 7.0


def test_rounds_rotate_every_target_through_every_position() -> None:
    orders = [loadgen.rotation(r, compare.TARGETS) for r in range(3)]
    for position in range(3):
        assert {order[position] for order in orders} == set(compare.TARGETS)


def test_parse_target() -> None:
    assert loadgen.parse_target("127.0.0.1:143") == ("127.0.0.1", 143)
    assert loadgen.parse_target("[::1]:993") == ("::1", 993)
    with pytest.raises(Exception, match="host:port"):
        loadgen.parse_target("localhost")


def _logins(rate: float, target_cpu_s: float) -> loadgen.LoginResult:
    usage = loadgen.Usage(
        wall_s=1.0, client_cpu_s=0.1, target_cpu_s=target_cpu_s, machine_cpu_s=1.0
    )
    return loadgen.LoginResult(
        clients=1, logins=int(rate), refused=0, errors=0, per_second=rate,
        p50_ms=1.0, p99_ms=1.0, usage=usage,
    )  # fmt: skip


def test_tables_show_medians_and_ratios_to_direct() -> None:
    samples = compare.Samples()
    rates = {"direct": [100, 300, 200], "authgate": [50, 10, 60], "authgate-tls": [20, 24, 30]}
    for name, values in rates.items():
        samples.results[name] = [_logins(v, target_cpu_s=0.5) for v in values]
    lines = compare.results_table({"logins": samples})
    assert "| logins/s, {SSHA512} user | 200 | 50 | 0.25 | 24 | 0.12 |" in lines
    # 0.5 CPU seconds over 200 logins: 2.5 ms each; over 50: 10 ms (4x).
    costs = compare.results_table({"logins": samples}, compare.COST_ROWS)
    assert (
        "| target CPU ms per login, {SSHA512} user | 2.50 | 10.00 | 4.00 | 20.83 | 8.33 |" in costs
    )
