"""One client's login latency through `authgate run`, with and without warm
backend connections (`warm_connections`, authgate.proxy.warm), in one run.

    .venv/bin/python -m bench.warm_latency                 # embedded IMAP backend
    .venv/bin/python -m bench.warm_latency --dovecot       # a private real Dovecot
    .venv/bin/python -m bench.warm_latency --logins 200 --rounds 3 --warm 4

Each round starts `authgate run` (terminate mode, a master user, PLAIN) once
with `warm_connections = 0` and once with `--warm`, in alternating order,
and times `--logins` sequential logins of one client: connect, greeting,
AUTHENTICATE PLAIN with SASL-IR until its OK ("login"), and the whole cycle
with LOGOUT ("cycle"). Prints the medians over rounds of each round's p50.
Wall-clock figures: compare them within one run only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from authgate.credentials.store import UserStore
from authgate.testing.backends import start_backends
from authgate.testing.stack import user_secrets
from bench.loadgen import Connection, Credentials, Target, percentile

USER = "bench"
MASTER_USER = "authgate"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError("authgate run exited")
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        await asyncio.sleep(0.05)
    raise RuntimeError("authgate run did not listen")


async def timed_logins(
    port: int, credentials: Credentials, count: int
) -> tuple[float, float, float]:
    """p50 in ms of (connect..AUTHENTICATE OK, connect..LOGOUT done, and
    AUTHENTICATE..OK: the part a warm connection shortens)."""
    target = Target("127.0.0.1", port)
    logins: list[float] = []
    cycles: list[float] = []
    auths: list[float] = []
    for _ in range(count):
        begin = time.perf_counter()
        connection = await Connection.open(target)
        greeted = time.perf_counter()
        if not await connection.login(credentials):
            raise RuntimeError("login refused")
        logins.append(time.perf_counter() - begin)
        auths.append(time.perf_counter() - greeted)
        await connection.logout()
        cycles.append(time.perf_counter() - begin)
        # The pool refills between one login and the next, as it would
        # between two clients: give the loop a moment.
        await asyncio.sleep(0.002)
    return tuple(percentile(sorted(v), 50) * 1000 for v in (logins, cycles, auths))  # type: ignore[return-value]


async def one_run(
    work: Path, backend: str, master: str, users_file: Path, warm: int, args: argparse.Namespace
) -> tuple[float, float, float]:
    port = free_port()
    metrics = free_port()
    config = work / f"authgate-{warm}.toml"
    config.write_text(
        "run_as_root = true\n"
        f'[metrics]\nlisten = "127.0.0.1:{metrics}"\n'
        '[policy]\nsecurity = "none"\nmechanisms = ["PLAIN"]\n'
        f'[users]\nfile = "{users_file}"\n'
        f'[[listeners]]\nname = "imap"\nprotocol = "imap"\nlisten = "127.0.0.1:{port}"\n'
        f'[listeners.backend]\naddress = "{backend}"\n'
        f'master_user = "{MASTER_USER}"\nmaster_password = "{master}"\n'
        f"warm_connections = {warm}\n"
    )
    log = open(work / f"authgate-{warm}.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "authgate", "run", "-c", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        await wait_listening(port, proc)
        credentials = Credentials(USER, args.password)
        await timed_logins(port, credentials, 20)  # warm-up
        figures = await timed_logins(port, credentials, args.logins)
        if warm:
            print("  warm claims:", await claims(metrics), flush=True)
        return figures
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


async def claims(port: int) -> str:
    """authgate_backend_warm_claims_total by result, from /metrics."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
    text = (await reader.read()).decode("utf-8", "replace")
    writer.close()
    found = []
    for line in text.splitlines():
        if line.startswith("authgate_backend_warm_claims_total{"):
            result = line.split('result="', 1)[1].split('"', 1)[0]
            found.append(f"{result} {float(line.rsplit(' ', 1)[1]):.0f}")
    return ", ".join(sorted(found)) or "none"


@contextlib.contextmanager
def dovecot_backend(password: str) -> Iterator[tuple[str, str]]:
    from tests.interop.dovecot import start_dovecot

    master = "master-" + password
    with start_dovecot(users={USER: password}, master=(MASTER_USER, master)) as instance:
        yield f"127.0.0.1:{instance.imap}", master


async def run(args: argparse.Namespace, work: Path) -> int:
    args.password = secrets.token_urlsafe(12)
    store = UserStore(realm="localhost")
    store.set_user_secrets(USER, list(user_secrets(USER, args.password)))
    users_file = work / "users.toml"
    store.save(users_file)
    results: dict[int, list[tuple[float, float, float]]] = {0: [], args.warm: []}
    with contextlib.ExitStack() as stack:
        backends = None
        if args.dovecot:
            address, master = stack.enter_context(dovecot_backend(args.password))
        else:
            master = "master-" + args.password
            backends = await start_backends(
                work / "mail", {USER: args.password}, master=(MASTER_USER, master)
            )
            address = f"127.0.0.1:{backends.imap.port}"
        try:
            for round_index in range(args.rounds):
                order = [0, args.warm] if round_index % 2 == 0 else [args.warm, 0]
                for warm in order:
                    figures = await one_run(work, address, master, users_file, warm, args)
                    results[warm].append(figures)
                    print(
                        f"round {round_index + 1} warm_connections={warm}: "
                        f"login p50 {figures[0]:.3f} ms, cycle p50 {figures[1]:.3f} ms, "
                        f"AUTHENTICATE..OK p50 {figures[2]:.3f} ms",
                        flush=True,
                    )
        finally:
            if backends is not None:
                await backends.close()
    which = "real Dovecot" if args.dovecot else "embedded backend"
    print(f"\n{which}, {args.logins} sequential logins x {args.rounds} rounds, medians of p50:")
    for warm, runs in results.items():
        login = statistics.median(f[0] for f in runs)
        cycle = statistics.median(f[1] for f in runs)
        auth = statistics.median(f[2] for f in runs)
        print(
            f"  warm_connections = {warm}: login {login:.3f} ms, whole cycle {cycle:.3f} ms, "
            f"AUTHENTICATE..OK {auth:.3f} ms"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.warm_latency")
    parser.add_argument("--logins", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warm", type=int, default=4)
    parser.add_argument("--dovecot", action="store_true", help="a private real Dovecot")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="authgate-warm-"))
    try:
        return asyncio.run(run(args, work))
    finally:
        if os.environ.get("KEEP"):
            print(work)


if __name__ == "__main__":
    sys.exit(main())
