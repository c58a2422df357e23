"""The embedded IMAP backend reached directly and through authgate, side by side.

    python -m bench.compare            # about two minutes on two cores
    python -m bench.compare --quick    # about 20 seconds, rougher figures

One run: start `bench.serve` (authgate in terminate mode in front of the
embedded backends) in a child process, measure every figure against the three
targets in turn (the order rotates each round, so slow drift on a shared
machine spreads over all of them), stop the child, print medians and ratios.

Targets: ``direct`` (the backend, cleartext), ``authgate`` (cleartext to
authgate, which logs in to the backend as the user with a master credential
and splices) and ``authgate-tls`` (implicit TLS to authgate). The embedded
backend has no TLS, so TLS through authgate is compared with cleartext direct.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.loadgen import Connection, Credentials, Target, Usage

REPO = Path(__file__).resolve().parent.parent
TARGETS = ("direct", "authgate", "authgate-tls")
MIB = 1024 * 1024
SIZES = (MIB, 10 * MIB)
# authgate caps connections per client address (50 by default): the held
# connections of the memory figure come from many loopback addresses, as they
# would from many clients. Linux answers on all of 127.0.0.0/8.
SOURCES = tuple(f"127.0.0.{i}" for i in range(1, 65))


@dataclass(frozen=True)
class Plan:
    rounds: int = 3
    login_clients: int = 8
    login_seconds: float = 2.5
    slow_logins: bool = True  # also the default-secrets and {ARGON2ID} users
    argon2_clients: int = 4
    argon2_seconds: float = 3.0
    fetch_seconds: float = 1.0
    noops: int = 2000
    held: int = 100  # connections added per memory reading
    settle: float = 0.3


DEFAULT_PLAN = Plan()
QUICK_PLAN = Plan(
    login_seconds=0.6, slow_logins=False, fetch_seconds=0.2, noops=200, held=30, settle=0.2
)


@dataclass
class Samples:
    """Every result of one measurement, per target, in the order taken."""

    results: dict[str, list[Any]] = field(default_factory=lambda: {t: [] for t in TARGETS})


@dataclass(frozen=True)
class Row:
    label: str
    measurement: str
    value: Callable[[Any], float]
    fmt: str  # format of one value


Measure = Callable[[Target], Awaitable[Any]]


async def start_server(workdir: Path, sizes: Sequence[int]) -> tuple[Any, dict[str, Any]]:
    log = (workdir / "serve.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.serve",
        "--workdir",
        str(workdir / "serve"),
        "--sizes",
        ",".join(str(s) for s in sizes),
        "--stdin",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=log,
        cwd=REPO,
    )
    log.close()
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), 120)
        info: dict[str, Any] = json.loads(line)
    except (TimeoutError, ValueError):
        await stop_server(process)
        tail = (workdir / "serve.log").read_text(errors="replace")[-2000:]
        raise SystemExit(f"compare: bench.serve did not start:\n{tail}") from None
    return process, info


async def stop_server(process: Any) -> None:
    """Close its stdin (it stops on EOF); terminate, then kill, if it lingers."""
    if process.stdin is not None:
        process.stdin.close()
    try:
        await asyncio.wait_for(process.wait(), 15)
    except TimeoutError:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 5)
        except TimeoutError:
            process.kill()
            await process.wait()


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# No single measurement takes a minute, even on a crowded machine: past that,
# something hangs (a server that stopped answering), and the run should say so.
MEASUREMENT_TIMEOUT = 120.0


async def bounded(measurement: Awaitable[Any]) -> Any:
    try:
        return await asyncio.wait_for(measurement, MEASUREMENT_TIMEOUT)
    except TimeoutError:
        raise loadgen.BenchError(
            f"a measurement took more than {MEASUREMENT_TIMEOUT:.0f} s: the target hangs"
        ) from None


async def memory_phase(
    targets: dict[str, Target], credentials: Credentials, pids: list[int], plan: Plan
) -> Samples:
    """Layered readings on the fresh server: hold `plan.held` more connections
    per reading and close none until the end, so no reading reuses memory an
    earlier one freed. A first, unmeasured layer per target absorbs what the
    server freed while starting (seeding mail, hashing secrets)."""
    samples = Samples()
    kept: list[Connection] = []
    try:
        for name in TARGETS:
            await bounded(
                loadgen.measure_memory(
                    targets[name],
                    credentials,
                    pids=pids,
                    connections=plan.held,
                    settle=plan.settle,
                    keep=kept,
                )
            )
        for round_index in range(plan.rounds):
            for name in loadgen.rotation(round_index, TARGETS):
                result = await bounded(
                    loadgen.measure_memory(
                        targets[name],
                        credentials,
                        pids=pids,
                        connections=plan.held,
                        settle=plan.settle,
                        warmup=0,
                        keep=kept,
                    )
                )
                samples.results[name].append(result)
    finally:
        await loadgen.release(kept)
    return samples


async def run(plan: Plan, workdir: Path) -> dict[str, Any]:
    progress(f"compare: starting bench.serve in {workdir}")
    process, info = await start_server(workdir, SIZES)
    try:
        pids: list[int] = info["pids"]
        password = info["password"]
        user = Credentials(info["user"], password)
        default_user = Credentials(info["default_user"], password)
        argon2_user = Credentials(info["argon2_user"], password)
        targets = {
            name: Target(
                t["host"], t["port"], tls=t["tls"], ca_file=info["ca_file"], sources=SOURCES
            )
            for name, t in info["targets"].items()
        }
        sizes = await loadgen.message_sizes(targets["direct"], user)
        if sizes != list(SIZES):
            raise SystemExit(f"compare: INBOX holds {sizes}, expected {list(SIZES)}")

        measurements: dict[str, Measure] = {
            "logins": lambda t: loadgen.measure_logins(
                t, user, clients=plan.login_clients, duration=plan.login_seconds, pids=pids
            ),
        }
        if plan.slow_logins:
            measurements["logins-default"] = lambda t: loadgen.measure_logins(
                t,
                default_user,
                clients=plan.login_clients,
                duration=plan.login_seconds,
                pids=pids,
            )
            measurements["logins-argon2"] = lambda t: loadgen.measure_logins(
                t,
                argon2_user,
                clients=plan.argon2_clients,
                duration=plan.argon2_seconds,
                pids=pids,
            )

        def fetch(number: int) -> Measure:
            return lambda t: loadgen.measure_fetch(
                t, user, message=number, repeat=2, duration=plan.fetch_seconds, pids=pids
            )

        for number, size in enumerate(SIZES, start=1):
            measurements[f"fetch-{size // MIB}MiB"] = fetch(number)
        measurements["noop"] = lambda t: loadgen.measure_noop(t, user, count=plan.noops, pids=pids)
        # The SMTP splice (with authgate's SMTP filter): messages go to
        # another user's INBOX, so the fetched ones stay what they are.
        smtp_targets = {
            name: Target(t["host"], t["port"], tls=t["tls"], ca_file=info["ca_file"])
            for name, t in info["smtp_targets"].items()
        }
        smtp_measurements: dict[str, Measure] = {
            "smtp-data-1MiB": lambda t: loadgen.measure_smtp_data(
                t,
                user,
                size=MIB,
                recipient=f"{info['default_user']}@localhost",
                duration=plan.fetch_seconds,
                pids=pids,
            ),
            "smtp-noop": lambda t: loadgen.measure_smtp_noop(t, user, count=plan.noops, pids=pids),
        }

        started = time.perf_counter()
        progress("compare: memory per held connection")
        collected = {"memory": await memory_phase(targets, user, pids, plan)}
        for group, endpoints in ((measurements, targets), (smtp_measurements, smtp_targets)):
            for name, measure in group.items():
                progress(f"compare: {name}")
                samples = collected[name] = Samples()
                # Rounds inside each figure: the samples of one figure are taken
                # close together, A B C / B C A / C A B.
                for round_index in range(plan.rounds):
                    for target in loadgen.rotation(round_index, TARGETS):
                        result = await bounded(measure(endpoints[target]))
                        samples.results[target].append(result)
        elapsed = time.perf_counter() - started
    finally:
        await stop_server(process)
    return {"collected": collected, "elapsed": elapsed, "pids": pids}


# --- Reporting -----------------------------------------------------------------------

ROWS = (
    Row("logins/s, {SSHA512} user", "logins", lambda r: r.per_second, "{:.0f}"),
    Row("logins/s, default-secrets user", "logins-default", lambda r: r.per_second, "{:.0f}"),
    Row("logins/s, {ARGON2ID} user", "logins-argon2", lambda r: r.per_second, "{:.1f}"),
    Row("FETCH 1 MiB, MiB/s", "fetch-1MiB", lambda r: r.mib_per_s, "{:.0f}"),
    Row("FETCH 10 MiB, MiB/s", "fetch-10MiB", lambda r: r.mib_per_s, "{:.0f}"),
    Row("NOOP p50, ms", "noop", lambda r: r.p50_ms, "{:.3f}"),
    Row("NOOP p99, ms", "noop", lambda r: r.p99_ms, "{:.3f}"),
    Row("RSS per held connection, KiB", "memory", lambda r: r.per_connection_kib, "{:.1f}"),
    Row("SMTP DATA 1 MiB, MiB/s", "smtp-data-1MiB", lambda r: r.mib_per_s, "{:.1f}"),
    Row("SMTP NOOP p50, ms", "smtp-noop", lambda r: r.p50_ms, "{:.3f}"),
    Row("SMTP NOOP p99, ms", "smtp-noop", lambda r: r.p99_ms, "{:.3f}"),
)


def _target_cost(result: Any, operations: float, scale: float) -> float:
    cpu = result.usage.target_cpu_s
    return cpu / operations * scale if cpu is not None and operations else math.nan


# The target's CPU time per operation: unlike a rate, it hardly depends on how
# much CPU the machine had to spare, so it is the steadier figure on a busy
# (shared) machine. /proc counts in 10 ms ticks: a few percent of noise.
COST_ROWS = (
    Row(
        "target CPU ms per login, {SSHA512} user",
        "logins",
        lambda r: _target_cost(r, r.logins, 1e3),
        "{:.2f}",
    ),
    Row(
        "target CPU ms per login, default-secrets user",
        "logins-default",
        lambda r: _target_cost(r, r.logins, 1e3),
        "{:.2f}",
    ),
    Row(
        "target CPU ms per login, {ARGON2ID} user",
        "logins-argon2",
        lambda r: _target_cost(r, r.logins, 1e3),
        "{:.1f}",
    ),
    Row(
        "target CPU ms per MiB, FETCH 1 MiB",
        "fetch-1MiB",
        lambda r: _target_cost(r, r.bytes_fetched / MIB, 1e3),
        "{:.2f}",
    ),
    Row(
        "target CPU ms per MiB, FETCH 10 MiB",
        "fetch-10MiB",
        lambda r: _target_cost(r, r.bytes_fetched / MIB, 1e3),
        "{:.2f}",
    ),
    Row("target CPU µs per NOOP", "noop", lambda r: _target_cost(r, r.count, 1e6), "{:.0f}"),
    Row(
        "target CPU ms per MiB, SMTP DATA 1 MiB",
        "smtp-data-1MiB",
        lambda r: _target_cost(r, r.bytes_sent / MIB, 1e3),
        "{:.2f}",
    ),
    Row(
        "target CPU µs per SMTP NOOP",
        "smtp-noop",
        lambda r: _target_cost(r, r.count, 1e6),
        "{:.0f}",
    ),
)


def median_of(samples: Samples, target: str, value: Callable[[Any], float]) -> float:
    return statistics.median(value(r) for r in samples.results[target])


def results_table(collected: dict[str, Samples], rows: Sequence[Row] = ROWS) -> list[str]:
    lines = [
        "| figure | direct | authgate | ratio | authgate TLS | ratio TLS/direct |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        samples = collected.get(row.measurement)
        if samples is None:
            continue
        direct, plain, tls = (median_of(samples, t, row.value) for t in TARGETS)
        cells = [
            row.fmt.format(direct),
            row.fmt.format(plain),
            f"{plain / direct:.2f}" if direct else "-",
            row.fmt.format(tls),
            f"{tls / direct:.2f}" if direct else "-",
        ]
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    return lines


def usage_table(collected: dict[str, Samples]) -> list[str]:
    lines = [
        "| measurement | target | wall s | generator cores | target cores | rest of machine |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, samples in collected.items():
        for target in TARGETS:
            usages: list[Usage] = [r.usage for r in samples.results[target]]
            wall = statistics.median(u.wall_s for u in usages)
            client = statistics.median(u.client_load for u in usages)
            server = statistics.median(u.target_load or 0.0 for u in usages)
            rest = statistics.median(u.other_load or 0.0 for u in usages)
            lines.append(
                f"| {name} | {target} | {wall:.2f} | {client:.2f} | {server:.2f} | {rest:.2f} |"
            )
    return lines


def problems(collected: dict[str, Samples]) -> list[str]:
    found = []
    for name, samples in collected.items():
        for target, results in samples.results.items():
            for r in results:
                if isinstance(r, loadgen.LoginResult) and (r.refused or r.errors):
                    found.append(
                        f"{name} {target}: {r.refused} refused, {r.errors} errors"
                        f" (first: {r.first_error})"
                    )
    return found


def report(outcome: dict[str, Any], plan: Plan, quick: bool) -> str:
    collected: dict[str, Samples] = outcome["collected"]
    held = plan.held
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()
    lines = [
        f"authgate bench ({'quick' if quick else 'default'} run), {now}: "
        f"nproc {os.cpu_count()}, {loadgen.cpu_model()}, Python {platform.python_version()}, "
        f"load average {load[0]:.2f} at the end, {outcome['elapsed']:.0f} s of measuring.",
        "",
        f"Medians of {plan.rounds} rounds; each round measures the three targets in turn,"
        " in an order that rotates every round.",
        "direct: the embedded IMAP backend (SMTP rows: the embedded aiosmtpd backend),"
        " cleartext. authgate: cleartext through authgate"
        " (terminate mode: it verifies the user, logs in to the backend with a master"
        " credential, splices). authgate TLS: implicit TLS to authgate, cleartext from authgate"
        " to the backend; the embedded backend has no TLS, so this column is compared with"
        " cleartext direct and its ratio includes the whole cost of TLS.",
        "authgate and the backend share one process and one event loop (embedded_stack): the"
        " authgate columns carry the backend's work and memory too.",
        f"Logins: {plan.login_clients} concurrent clients for {plan.login_seconds} s"
        + (
            f" ({plan.argon2_clients} for {plan.argon2_seconds} s with the {{ARGON2ID}} user)."
            if plan.slow_logins
            else "; quick runs leave out the default-secrets and {ARGON2ID} users."
        )
        + f" Memory: RSS growth of the target process per connection, {held} more held per"
        " reading, none closed between readings.",
        "",
        *results_table(collected),
        "",
    ]
    memory = collected["memory"]
    direct, plain, tls = (median_of(memory, t, lambda r: r.per_connection_kib) for t in TARGETS)
    lines += [
        f"authgate's own memory per connection (authgate - direct): {plain - direct:.1f} KiB"
        f" cleartext, {tls - direct:.1f} KiB with TLS.",
        "",
        "The target's CPU time per operation (medians; steadier than the rates above when"
        " other processes compete for the CPUs):",
        "",
        *results_table(collected, COST_ROWS),
        "",
        "CPU, in cores (CPU seconds / wall seconds), medians: the generator (this process),"
        " the target (bench.serve: authgate + backend) and everything else on the machine.",
        "",
        *usage_table(collected),
    ]
    trouble = problems(collected)
    if trouble:
        lines += ["", "PROBLEMS:", *(f"- {p}" for p in trouble)]
    return "\n".join(lines)


def to_json(outcome: dict[str, Any]) -> dict[str, Any]:
    return {
        "elapsed": outcome["elapsed"],
        "results": {
            name: {t: [loadgen.result_json(r) for r in rs] for t, rs in samples.results.items()}
            for name, samples in outcome["collected"].items()
        },
    }


def raise_fd_limit() -> None:
    # Every held connection is a descriptor here too.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.compare",
        description="direct vs through authgate, alternating; prints a Markdown table",
    )
    parser.add_argument("--quick", action="store_true", help="a ~20 s run with rougher figures")
    parser.add_argument("--rounds", type=int, help="rounds per figure (default 3, at least 3)")
    parser.add_argument("--json", type=Path, help="also write every sample to this file")
    parser.add_argument("--workdir", type=Path, help="keep the server's files here")
    args = parser.parse_args(argv)
    plan = QUICK_PLAN if args.quick else DEFAULT_PLAN
    if args.rounds is not None:
        if args.rounds < 3:
            parser.error("--rounds must be at least 3: a median of fewer says little")
        plan = Plan(**{**plan.__dict__, "rounds": args.rounds})
    raise_fd_limit()
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            outcome = asyncio.run(run(plan, workdir))
        except loadgen.BenchError as exc:
            print(f"compare: {exc}", file=sys.stderr)
            return 1
    print(report(outcome, plan, args.quick))
    if args.json:
        args.json.write_text(json.dumps(to_json(outcome), indent=1))
    return 1 if problems(outcome["collected"]) else 0


if __name__ == "__main__":
    sys.exit(main())
