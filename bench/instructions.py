"""Instructions per login of the proxy process alone, counted by callgrind.

    python -m bench.instructions [--logins 200] [--protocol imap|pop3] [--tls] [--profile FILE]
    python -m bench.instructions --event-loop asyncio       # authgate on asyncio's own loop
    python -m bench.instructions --strace [--keep FILE]     # system calls per login
    python -m bench.instructions --keep callgrind.out       # for callgrind_annotate
    python -m bench.instructions --bound                    # bench.bound, the least a proxy does

Wall-clock figures on a shared machine are noise; the number of
instructions a login costs the proxy is not (it repeats to within a few
tenths of a percent under any load). This starts the embedded backends
(authgate.testing) in this process, `authgate run` in a child process under
`valgrind --tool=callgrind` (or cProfile with --profile: the phase shares),
then runs warm-up logins, zeroes the counters (`callgrind_control -z`),
runs `--logins` complete logins one after the other (connect, greeting,
AUTHENTICATE PLAIN / AUTH PLAIN with an initial response as a master-user
login to the backend, LOGOUT / QUIT, close) and dumps the counters
(`callgrind_control -d`). Prints one line: instructions per login.
With `--tls` the listener is implicit TLS (IMAPS, POP3S) and each login
starts with a full TLS handshake (the client trusts the dev CA; no
session resumption): the figure then includes the server's handshake.
`--keep FILE` copies that dump to FILE (`callgrind_annotate FILE`).

`--strace` counts system calls instead: `authgate run` starts without
valgrind, and after the warm-up `strace -f -c -p PID` attaches to it (all
its threads, and any it starts), the measured logins run, and strace is
stopped (SIGINT: it detaches and writes its summary) before anything else
happens: the counts are those of the measured logins alone. Prints the
system calls per login by name (`--keep FILE` keeps strace's summary).

The user holds every form `authgate passwd` writes by default, as in
`bench.versus`. Needs valgrind (Debian `valgrind`), or strace for --strace.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from authgate.certs import ensure_dev_certificates
from authgate.credentials.store import UserStore
from authgate.testing.backends import start_backends
from authgate.testing.stack import MASTER_USER, ListenerSpec, config_text, user_secrets
from bench import add_event_loop_option, bound

USER = "bench-default"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def login(
    protocol: str, port: int, user: str, password: str, tls: ssl.SSLContext | None = None
) -> None:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=tls, server_hostname="localhost" if tls else None
    )
    token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    try:
        if protocol == "imap":
            await reader.readline()
            writer.write(f"a AUTHENTICATE PLAIN {token}\r\n".encode())
            while not (line := await reader.readline()).startswith(b"a "):
                if not line:
                    raise RuntimeError("closed during login")
            if not line.startswith(b"a OK"):
                raise RuntimeError(f"login refused: {line!r}")
            writer.write(b"b LOGOUT\r\n")
        else:
            await reader.readline()
            writer.write(f"AUTH PLAIN {token}\r\n".encode())
            line = await reader.readline()
            if not line.startswith(b"+OK"):
                raise RuntimeError(f"login refused: {line!r}")
            writer.write(b"QUIT\r\n")
        await reader.read()  # until the proxy closes
    finally:
        writer.close()


async def wait_listening(port: int, proc: subprocess.Popen[bytes], limit: float) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("authgate exited while starting")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.5)
            continue
        writer.close()
        return
    raise RuntimeError("authgate did not listen in time")


def control(pid: int, option: str) -> None:
    subprocess.run(["callgrind_control", option, str(pid)], check=True, capture_output=True)


@dataclass(frozen=True)
class Syscalls:
    """One row of `strace -c`: a system call, how often, how often it failed."""

    name: str
    calls: int
    errors: int = 0


def parse_strace_summary(text: str) -> list[Syscalls]:
    """The rows of `strace -c`'s table (`% time seconds usecs/call calls
    errors syscall`, errors blank when none), without the total line."""
    rows = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) not in (5, 6) or fields[-1] == "total":
            continue
        try:
            float(fields[0])
            calls = int(fields[3])
            errors = int(fields[4]) if len(fields) == 6 else 0
        except ValueError:
            continue  # the heading, a rule
        rows.append(Syscalls(fields[-1], calls, errors))
    return rows


def per_login_table(rows: Sequence[Syscalls], logins: int) -> list[str]:
    """System calls per login by name, most frequent first, as Markdown."""
    total = sum(r.calls for r in rows)
    lines = [
        "| system call | per login | failed per login |",
        "|---|---:|---:|",
    ]
    for row in sorted(rows, key=lambda r: (-r.calls, r.name)):
        failed = f"{row.errors / logins:.2f}" if row.errors else "-"
        lines.append(f"| {row.name} | {row.calls / logins:.2f} | {failed} |")
    errors = sum(r.errors for r in rows)
    lines.append(f"| total | {total / logins:.2f} | {errors / logins:.2f} |")
    return lines


async def start_strace(pid: int, output: Path) -> asyncio.subprocess.Process:
    """`strace -f -c -p PID -o output`, once it has attached (it says so)."""
    tracer = await asyncio.create_subprocess_exec(
        *("strace", "-f", "-c", "-p", str(pid), "-o", str(output)),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert tracer.stderr is not None
    said = b""
    try:
        async with asyncio.timeout(30):
            while b"attached" not in said:
                line = await tracer.stderr.readline()
                if not line:
                    raise RuntimeError(f"strace did not attach: {said.decode(errors='replace')}")
                said += line
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            tracer.kill()
        await tracer.wait()
        raise
    return tracer


async def stop_strace(tracer: asyncio.subprocess.Process) -> None:
    """SIGINT: strace detaches and writes its summary."""
    tracer.send_signal(signal.SIGINT)
    assert tracer.stderr is not None
    await tracer.stderr.read()  # until it exits (it reports each detach)
    if await tracer.wait() not in (0, -signal.SIGINT, 128 + signal.SIGINT):
        raise RuntimeError(f"strace exited with status {tracer.returncode}")


async def run(args: argparse.Namespace, work: Path) -> int:
    password = secrets.token_urlsafe(12)
    certs = work / "certs"
    ca_file = ensure_dev_certificates(certs)
    tls = ssl.create_default_context(cafile=str(ca_file)) if args.tls else None
    backends = await start_backends(
        work / "mail", {USER: password}, master=(MASTER_USER, "master-" + password)
    )
    try:
        store = UserStore(realm="localhost")
        store.set_user_secrets(USER, list(user_secrets(USER, password)))
        store.save(work / "users.toml")
        port = free_port()
        mode = "implicit" if args.tls else "none"
        # Root in this bench (valgrind, the embedded backends' Maildirs).
        (work / "authgate.toml").write_text(
            "run_as_root = true\n"
            + f'event_loop = "{args.event_loop}"\n'
            + config_text(
                host="127.0.0.1",
                layout=(ListenerSpec(args.protocol, args.protocol, mode, port=port),),
                certs=certs,
                users_file=work / "users.toml",
                backend_ports={"imap": backends.imap.port, "pop3": backends.pop3.port},
                master_password="master-" + password,
                security="none",
                mechanisms=("PLAIN",),
                exempt=(),
            )
            # The backend's warm connections (authgate.proxy.warm), if asked.
            + (f"warm_connections = {args.warm}\n" if args.warm else "")
        )
        out = work / "callgrind.out"
        traced = work / "strace.txt"
        command = [sys.executable, "-m", "authgate", "run", "-c", str(work / "authgate.toml")]
        if args.bound:  # the same logins through bench.bound instead
            command = bound.command(
                work / "bound.json",
                protocol=args.protocol,
                listen=port,
                backend=backends.imap.port if args.protocol == "imap" else backends.pop3.port,
                user=USER,
                password=password,
                master=MASTER_USER,
                master_password="master-" + password,
            )
        if args.profile:
            command[1:1] = ["-m", "cProfile", "-o", str(args.profile)]
        elif not args.strace:
            command[:0] = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
        callgrind = not (args.profile or args.strace)
        log = open(work / "authgate.log", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            await wait_listening(port, proc, 300)
            for _ in range(args.warmup):
                await login(args.protocol, port, USER, password, tls)
            tracer = await start_strace(proc.pid, traced) if args.strace else None
            if callgrind:
                control(proc.pid, "-z")
            try:
                for _ in range(args.logins):
                    await login(args.protocol, port, USER, password, tls)
            finally:
                if tracer is not None:
                    await stop_strace(tracer)
            if callgrind:
                control(proc.pid, "-d")
        finally:
            proc.send_signal(2)  # SIGINT: cProfile writes its file
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
        if args.profile:
            print(f"profile written to {args.profile}")
            return 0
        if args.strace:
            rows = parse_strace_summary(traced.read_text(errors="replace"))
            if not rows:
                raise RuntimeError("strace counted no system calls")
            if args.keep:
                shutil.copyfile(traced, args.keep)
            total = sum(r.calls for r in rows)
            print(
                f"{args.protocol}: {total / args.logins:,.1f} system calls per login "
                f"({args.logins} logins, {total:,} calls; strace -f -c, warm-up excluded)"
            )
            print("\n".join(per_login_table(rows, args.logins)))
            return 0
        dumps = sorted(work.glob("callgrind.out*"), key=lambda p: p.stat().st_mtime)
        # The dump taken after the logins: the first file with parts (".1").
        dumped = [p for p in dumps if re.search(r"\.\d+$", p.name)]
        text = dumped[0].read_text(errors="replace")
        match = re.search(r"^(?:summary|totals):\s*(\d+)", text, re.M)
        if match is None:
            raise RuntimeError("no totals in the callgrind dump")
        total = int(match.group(1))
        if args.keep:
            shutil.copyfile(dumped[0], args.keep)
            print(f"callgrind output kept in {args.keep}")
        print(
            f"{args.protocol}{'s' if args.tls else ''}{' (bench.bound)' if args.bound else ''}: "
            f"{total / args.logins:,.0f} instructions per login "
            f"({args.logins} logins, {total:,} instructions)"
        )
        return 0
    finally:
        await backends.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions")
    parser.add_argument("--logins", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--protocol", choices=("imap", "pop3"), default="imap")
    parser.add_argument("--tls", action="store_true", help="implicit TLS (IMAPS, POP3S)")
    parser.add_argument("--profile", type=Path, help="cProfile the proxy instead (output file)")
    parser.add_argument(
        "--strace",
        action="store_true",
        help="count system calls per login by name (strace -f -c) instead of instructions",
    )
    parser.add_argument(
        "--keep",
        type=Path,
        metavar="FILE",
        help="copy callgrind's dump of the measured logins (or, with --strace, strace's"
        " summary) to FILE",
    )
    parser.add_argument("--warm", type=int, default=0, help="warm_connections on the backend")
    add_event_loop_option(parser)
    parser.add_argument(
        "--bound",
        action="store_true",
        help="measure bench.bound (the least a Python login proxy on uvloop does) instead"
        " of authgate",
    )
    args = parser.parse_args(argv)
    if args.profile and args.strace:
        parser.error("--profile or --strace, not both")
    if args.bound and (args.tls or args.warm or args.event_loop != "uvloop"):
        parser.error("--bound is cleartext, on uvloop, without warm connections")
    if args.keep is not None:
        args.keep = args.keep.resolve()
    if args.strace:
        if shutil.which("strace") is None:
            print("needs strace (apt-get install strace)", file=sys.stderr)
            return 2
    elif not args.profile and shutil.which("valgrind") is None:
        print("needs valgrind (apt-get install valgrind)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="authgate-instr-"))
    try:
        return asyncio.run(run(args, work))
    finally:
        if not os.environ.get("KEEP"):
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(work)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
