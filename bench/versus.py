"""authgate and the nginx mail proxy side by side, in front of one real Dovecot.

    python -m bench.versus                # about 5 minutes on 2 cores (under 10)
    python -m bench.versus --quick        # about 1 minute (under 2), rougher
    python -m bench.versus --rounds 5 --json samples.json --profile

One run on one machine sets up, in a scratch folder: a Dovecot (bench/dovecot.py:
{PLAIN} passwords, a master user, a 1 MiB and a 10 MiB message in the bench
user's INBOX, login and imap processes reused), the nginx mail proxy
(bench/nginx.py: Debian's nginx + libnginx-mod-mail, one worker, an auth_http
table answered by the same nginx) and `authgate run` in terminate mode (users
file from `authgate passwd --password-stdin`, Dovecot's master user). Three
targets, each in cleartext and with implicit TLS:

- ``direct``: Dovecot itself (its own TLS on the IMAPS port);
- ``nginx``: nginx, which asks its auth_http server, then logs in to Dovecot
  (cleartext) with IMAP LOGIN as ``user*master`` and splices;
- ``authgate``: authgate, which checks the password against its users file,
  logs in to Dovecot (cleartext) with SASL PLAIN and an authzid, and splices.

Every figure is measured `--rounds` times (at least 3); within a figure the
rounds follow each other and the order of the targets rotates. The tables
show medians. The load generator (bench.loadgen, this process) runs on one
core and every server on the other (`os.sched_setaffinity`), and each
measurement reports the CPU the generator, the proxy, Dovecot and the rest
of the machine used, so a saturated generator would show.

Needs root (Dovecot drops privileges itself), Linux (/proc), and the Debian
packages dovecot-core, dovecot-imapd, nginx and libnginx-mod-mail.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime
import json
import math
import os
import platform
import resource
import secrets
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from bench import add_event_loop_option, loadgen
from bench.dovecot import (
    BenchDovecot,
    DovecotError,
    accepts,
    dovecot_version,
    free_ports,
    greets,
    spawn,
    stop_session,
    wait_ready,
)
from bench.nginx import AuthEntry, BenchNginx, NginxError, nginx_version
from bench.serve import make_message

REPO = Path(__file__).resolve().parent.parent
TARGETS = ("direct", "nginx", "authgate")
MODES = ("plain", "tls")  # IMAP, IMAPS
LOGIN_MODES = (*MODES, "pop3")  # logins are measured over cleartext POP3 too
MIB = 1024 * 1024
SIZES = (MIB, 10 * MIB)
USER = "bench"
MASTER_USER = "authgate"
# Connections come from many loopback addresses, as from many clients: no
# per-address cap (authgate's, Dovecot's per user+IP) is what gets measured.
SOURCES = tuple(f"127.0.0.{i}" for i in range(1, 65))
HOSTNAME = "localhost"
_CLK_TCK = os.sysconf("SC_CLK_TCK")


class SetupError(Exception):
    """A server could not be set up; the message says which and why."""


@dataclass(frozen=True)
class Plan:
    rounds: int = 3
    # Concurrent clients of the logins/s figures (the issue's table: #17).
    imap_clients: int = 32
    imaps_clients: int = 128
    pop3_clients: int = 32
    login_seconds: float = 3.0
    fetch_seconds: float = 1.0
    noops: int = 2000
    held: int = 2000  # authenticated sessions held per memory reading of a proxy
    direct_held: int = 200  # per reading of Dovecot itself (see Bench.memory_phase)
    hold_concurrency: int = 64
    memory_tls: bool = True
    latency_logins: int = 60  # one client, one login after the other
    settle: float = 0.5

    def clients(self, mode: str) -> int:
        return {"plain": self.imap_clients, "tls": self.imaps_clients}.get(mode, self.pop3_clients)


DEFAULT_PLAN = Plan()
QUICK_PLAN = Plan(
    login_seconds=0.7,
    fetch_seconds=0.25,
    noops=300,
    held=300,
    direct_held=100,
    memory_tls=False,
    latency_logins=12,
    settle=0.3,
)


# --- /proc: CPU and memory of a process tree ------------------------------------------


def tree_cpu(pids: Sequence[int]) -> float:
    """CPU seconds of `pids` and their live descendants, including the children
    they have reaped (cutime/cstime): Dovecot's short-lived processes end
    during a measurement, and their time must not vanish with them."""
    ticks = 0
    for pid in loadgen.process_tree(pids):
        with contextlib.suppress(OSError, ValueError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            # proc(5) fields 14-17: utime stime cutime cstime (two dropped above).
            ticks += sum(int(v) for v in fields[11:15])
    return ticks / _CLK_TCK


@dataclass(frozen=True)
class Memory:
    rss_kib: int
    pss_kib: int  # shared pages split among their users: sums to real use


def tree_memory(pids: Sequence[int]) -> Memory:
    """RSS and PSS (KiB) summed over `pids` and their descendants. RSS counts a
    shared library page once per process (2,000 Dovecot imap processes would
    count libdovecot 2,000 times); PSS shares it out, so its sum is what the
    tree really holds."""
    rss = pss = 0
    for pid in loadgen.process_tree(pids):
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
    return Memory(rss, pss)


@dataclass(frozen=True)
class Cost:
    """Wall time of one measurement and the CPU seconds spent meanwhile."""

    wall_s: float
    generator_s: float  # this process
    proxy_s: float | None  # nginx or authgate (None for direct)
    dovecot_s: float
    machine_s: float  # all CPUs, everything
    servers_cpu_s: float | None = None  # all busy time of the servers' CPUs (pinned)

    def cores(self, seconds: float | None) -> float:
        return seconds / self.wall_s if seconds is not None and self.wall_s else math.nan

    @property
    def rest_s(self) -> float:
        return max(self.machine_s - self.generator_s - (self.proxy_s or 0.0) - self.dovecot_s, 0)

    @property
    def intruders_s(self) -> float | None:
        """Other processes' time on the CPU the servers are pinned to: what the
        servers could not have, on a shared machine."""
        if self.servers_cpu_s is None:
            return None
        return max(self.servers_cpu_s - (self.proxy_s or 0.0) - self.dovecot_s, 0.0)

    @property
    def target_s(self) -> float:
        """The target's own CPU: the proxy's, or Dovecot's for direct."""
        return self.dovecot_s if self.proxy_s is None else self.proxy_s


def cpu_busy_seconds(cpus: set[int]) -> float:
    """Time the CPUs in `cpus` spent not idle since boot (/proc/stat cpuN lines)."""
    total = 0
    with open("/proc/stat") as f:
        for line in f:
            name, _, rest = line.partition(" ")
            if not name.startswith("cpu") or not name[3:].isdigit() or int(name[3:]) not in cpus:
                continue
            fields = [int(v) for v in rest.split()]
            # user nice system idle iowait irq softirq steal
            total += sum(fields[:8]) - fields[3] - fields[4]
    return total / _CLK_TCK


class Meter:
    def __init__(
        self, proxy: Sequence[int], dovecot: Sequence[int], cpus: set[int] | None = None
    ) -> None:
        self.proxy_pids, self.dovecot_pids = list(proxy), list(dovecot)
        self.cpus = cpus
        self.proxy = tree_cpu(self.proxy_pids) if self.proxy_pids else None
        self.dovecot = tree_cpu(self.dovecot_pids)
        self.servers_cpu = cpu_busy_seconds(cpus) if cpus else None
        self.machine = loadgen.machine_busy_seconds()
        self.generator = time.process_time()
        self.wall = time.perf_counter()

    def stop(self) -> Cost:
        wall = time.perf_counter() - self.wall
        proxy = None if self.proxy is None else tree_cpu(self.proxy_pids) - self.proxy
        return Cost(
            wall_s=wall,
            generator_s=time.process_time() - self.generator,
            proxy_s=proxy,
            dovecot_s=tree_cpu(self.dovecot_pids) - self.dovecot,
            machine_s=loadgen.machine_busy_seconds() - self.machine,
            servers_cpu_s=(
                None
                if self.cpus is None or self.servers_cpu is None
                else cpu_busy_seconds(self.cpus) - self.servers_cpu
            ),
        )


# --- authgate --------------------------------------------------------------------------


@dataclass(frozen=True)
class Tuning:
    """The settings one authgate target runs with that the bench may vary:
    its event loop, and `warm_connections` on its backends (0: off, the
    default)."""

    event_loop: str = "uvloop"
    warm_connections: int = 0

    def describe(self) -> str:
        text = f"event_loop = {self.event_loop!r}"
        if self.warm_connections:
            text += f", warm_connections = {self.warm_connections}"
        return text


@dataclass
class BenchAuthgate:
    """`authgate run -c <config>` in terminate mode in front of Dovecot: IMAP,
    IMAPS and POP3 listeners. `code`: the tree whose `authgate` package runs
    (this checkout, or an older one for the `authgate@base` target): the
    child starts there with PYTHONPATH=`code`, ahead of the installed one."""

    root: Path
    cert: Path
    key: Path
    backend_port: int
    users: dict[str, str]
    master: tuple[str, str]
    cpus: set[int] | None = None
    tuning: Tuning = Tuning()
    backend_pop3_port: int = 0
    code: Path = REPO
    imap: int = 0
    imaps: int = 0
    pop3: int = 0
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(self.code), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        return env

    def imported_from(self) -> Path:
        """Where the child's `import authgate` resolves: must be in `code`."""
        result = subprocess.run(
            [sys.executable, "-c", "import authgate; print(authgate.__file__)"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=self.code,
            env=self.environment(),
        )
        if result.returncode != 0:
            raise SetupError(f"import authgate from {self.code}: {result.stderr[-2000:]}")
        return Path(result.stdout.strip()).resolve()

    @property
    def conf_path(self) -> Path:
        return self.root / "authgate.toml"

    @property
    def log_path(self) -> Path:
        return self.root / "authgate.log"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("authgate is not running")
        return self.process.pid

    def prepare(self, taken: set[int]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        secret = self.root / "master.secret"
        secret.write_text(self.master[1] + "\n")
        secret.chmod(0o600)
        users_file = self.root / "users.toml"
        for user, password in self.users.items():
            # What an admin would run: every form `authgate passwd` writes by
            # default. authgate checks a password with the cheapest form a
            # user has ({CRAM-MD5}/{NTLM}: one HMAC-MD5 or MD4), not argon2.
            result = subprocess.run(
                [
                    *(sys.executable, "-m", "authgate", "passwd", user),
                    *("--users", str(users_file), "--realm", HOSTNAME, "--password-stdin"),
                ],
                input=password + "\n",
                capture_output=True,
                text=True,
                timeout=120,
                cwd=self.code,
                env=self.environment(),
            )
            if result.returncode != 0:
                raise SetupError(f"authgate passwd {user}: {result.stdout}{result.stderr}")
        if not self.imap:
            self.imap, self.imaps, self.pop3 = free_ports(3, taken)
        self.conf_path.write_text(self.render(users_file, secret))

    def render(self, users_file: Path, secret: Path) -> str:
        warm = self.tuning.warm_connections

        def backend(port: int) -> list[str]:
            return [
                "[listeners.backend]",
                f'address = "127.0.0.1:{port}"',
                'mode = "terminate"',
                'tls = "none"',
                f'master_user = "{self.master[0]}"',
                f'master_password_file = "{secret}"',
                'mechanisms = ["PLAIN"]',
                *([f"warm_connections = {warm}"] if warm else []),
            ]

        pop3 = (
            [
                "[[listeners]]",
                'name = "pop3"',
                'protocol = "pop3"',
                f'listen = "127.0.0.1:{self.pop3}"',
                'tls = "none"',
                *backend(self.backend_pop3_port),
                "",
            ]
            if self.backend_pop3_port
            else []
        )
        lines = [
            "# Written by bench/versus.py.",
            f'hostname = "{HOSTNAME}"',
            f'event_loop = "{self.tuning.event_loop}"',
            # The bench runs as root (Dovecot needs it) and so does authgate
            # here, which it refuses unless told (authgate.privileges).
            "run_as_root = true",
            "",
            "[policy]",
            'security = "none"  # PLAIN in cleartext too, as nginx allows',
            'mechanisms = ["PLAIN"]',
            "",
            "[tls]",
            f'cert = "{self.cert}"',
            f'key = "{self.key}"',
            "",
            "[users]",
            f'file = "{users_file}"',
            "",
            # nginx has no per-address or total cap by default either.
            "[limits]",
            "max_connections = 100000",
            "max_connections_per_address = 100000",
            "drain_timeout = 1  # a restart between memory readings need not wait",
            "",
            "[[listeners]]",
            'name = "imap"',
            'protocol = "imap"',
            f'listen = "127.0.0.1:{self.imap}"',
            'tls = "none"',
            *backend(self.backend_port),
            "",
            "[[listeners]]",
            'name = "imaps"',
            'protocol = "imap"',
            f'listen = "127.0.0.1:{self.imaps}"',
            'tls = "implicit"',
            *backend(self.backend_port),
            "",
            *pop3,
        ]
        return "\n".join(lines)

    def start(self, timeout: float = 60.0) -> None:
        argv = [sys.executable, "-m", "authgate", "run", "-c", str(self.conf_path)]
        self.process = spawn(argv, self.log_path, self.cpus, cwd=self.code, env=self.environment())
        problem = wait_ready(
            self.process,
            lambda: (
                greets(self.imap)
                and accepts(self.imaps)
                and (not self.backend_pop3_port or greets(self.pop3, b"+OK"))
            ),
            timeout,
        )
        if problem is not None:
            self.stop()
            raise SetupError(
                f"authgate {problem}:\n" + self.log_path.read_text("utf-8", "replace")[-4000:]
            )

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            stop_session(process)

    def restart(self) -> None:
        self.stop()
        self.start()

    def errors(self) -> list[str]:
        if not self.log_path.exists():
            return []
        lines = self.log_path.read_text("utf-8", "replace").splitlines()
        return [x for x in lines if " ERROR " in x or "internal error" in x or "Traceback" in x]


# --- the three servers ---------------------------------------------------------------------


def target_cpus() -> tuple[set[int] | None, set[int] | None]:
    """(generator CPUs, server CPUs): the first allowed CPU for the generator,
    the rest for the servers; no pinning on a single CPU."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        return None, None
    return {allowed[0]}, set(allowed[1:])


BASE = "authgate@base"  # the --baseline-tree target


class Servers:
    def __init__(
        self,
        workdir: Path,
        cpus: set[int] | None,
        tuning: Tuning = Tuning(),
        baseline: Path | None = None,
        baseline_tuning: Tuning | None = None,
    ) -> None:
        self.workdir = workdir
        self.cpus = cpus
        self.baseline = baseline
        # An older tree may predate a setting's default: name it for that one.
        self.tunings = {"authgate": tuning, BASE: baseline_tuning or tuning}
        # Password-policy proof (three character classes) and nginx-map safe.
        self.password = "Bx7" + secrets.token_hex(8)
        self.master_password = "Mx7" + secrets.token_hex(8)
        self.ca_file = workdir / "ca.pem"
        self.dovecot: BenchDovecot | None = None
        self.nginx: BenchNginx | None = None
        self.authgates: dict[str, BenchAuthgate] = {}

    @property
    def names(self) -> tuple[str, ...]:
        """Every target, in the order of the first round."""
        return TARGETS + ((BASE,) if self.baseline is not None else ())

    @property
    def proxies(self) -> tuple[str, ...]:
        return tuple(n for n in self.names if n != "direct")

    @property
    def authgate(self) -> BenchAuthgate | None:
        return self.authgates.get("authgate")

    @property
    def credentials(self) -> loadgen.Credentials:
        return loadgen.Credentials(USER, self.password)

    def start(self) -> None:
        import trustme

        self.workdir.chmod(0o755)  # Dovecot's unprivileged processes traverse it
        ca = trustme.CA()
        leaf = ca.issue_cert(HOSTNAME, "127.0.0.1")
        cert, key = self.workdir / "cert.pem", self.workdir / "key.pem"
        cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))
        key.chmod(0o600)  # read by root: Dovecot's config process, nginx's master, authgate
        ca.cert_pem.write_to_path(str(self.ca_file))

        messages = [make_message(size, f"m{i}-{size}") for i, size in enumerate(SIZES, start=1)]
        master = (MASTER_USER, self.master_password)
        self.dovecot = BenchDovecot(
            self.workdir / "dovecot", {USER: self.password}, master, cert, key, self.cpus
        )
        self.dovecot.prepare({USER: messages})
        self.dovecot.start()
        taken = {self.dovecot.imap, self.dovecot.imaps, self.dovecot.pop3}
        entry = AuthEntry(self.password, f"{USER}*{MASTER_USER}", self.master_password)
        self.nginx = BenchNginx(
            self.workdir / "nginx",
            cert,
            key,
            self.dovecot.imap,
            {USER: entry},
            self.cpus,
            backend_pop3_port=self.dovecot.pop3,
        )
        self.nginx.prepare(taken)
        self.nginx.start()
        taken |= {self.nginx.imap, self.nginx.imaps, self.nginx.auth, self.nginx.pop3}
        trees = {"authgate": REPO}
        if self.baseline is not None:
            trees[BASE] = self.baseline
        for name, tree in trees.items():
            authgate = BenchAuthgate(
                self.workdir / name.replace("@", "-"),
                cert,
                key,
                self.dovecot.imap,
                {USER: self.password},
                master,
                self.cpus,
                self.tunings[name],
                backend_pop3_port=self.dovecot.pop3,
                code=tree,
            )
            where = authgate.imported_from()
            if not where.is_relative_to(tree.resolve()):
                raise SetupError(f"{name}: `import authgate` in {tree} finds {where}")
            self.authgates[name] = authgate
            authgate.prepare(taken)
            taken |= {authgate.imap, authgate.imaps, authgate.pop3}
            authgate.start()

    def stop(self) -> None:
        for server in (*self.authgates.values(), self.nginx, self.dovecot):
            if server is not None:
                with contextlib.suppress(Exception):
                    server.stop()

    def server(self, name: str) -> BenchDovecot | BenchNginx | BenchAuthgate:
        server: BenchDovecot | BenchNginx | BenchAuthgate | None = (
            self.dovecot
            if name == "direct"
            else self.nginx
            if name == "nginx"
            else self.authgates.get(name)
        )
        if server is None:
            raise SetupError(f"no target {name!r}")
        return server

    def target(self, name: str, mode: str) -> loadgen.Target:
        """`mode`: "plain" (IMAP), "tls" (IMAPS) or "pop3" (cleartext POP3)."""
        server = self.server(name)
        tls = mode == "tls"
        port = server.pop3 if mode == "pop3" else server.imaps if tls else server.imap
        return loadgen.Target(
            "127.0.0.1",
            port,
            tls=tls,
            ca_file=str(self.ca_file),
            sources=SOURCES,
            protocol="pop3" if mode == "pop3" else "imap",
        )

    def proxy_pids(self, name: str) -> list[int]:
        if name == "nginx" and self.nginx is not None:
            return [self.nginx.pid]
        if name in self.authgates:
            return [self.authgates[name].pid]
        return []

    def dovecot_pids(self) -> list[int]:
        return [self.dovecot.pid] if self.dovecot is not None else []

    def meter(self, name: str) -> Meter:
        return Meter(self.proxy_pids(name), self.dovecot_pids(), self.cpus)

    def restart_proxy(self, name: str) -> None:
        if name == "nginx" and self.nginx is not None:
            self.nginx.restart()
        elif name in self.authgates:
            self.authgates[name].restart()

    def server_problems(self) -> list[str]:
        found: list[str] = []
        if self.dovecot is not None:
            found += [f"dovecot: {x}" for x in self.dovecot.warnings()]
        if self.nginx is not None:
            found += [f"nginx: {x}" for x in self.nginx.errors()]
        for name, authgate in self.authgates.items():
            found += [f"{name}: {x}" for x in authgate.errors()]
        return found


# --- measurements ----------------------------------------------------------------------


@dataclass
class Record:
    """One measurement of one target: named values, the CPU spent, a problem."""

    values: dict[str, float]
    cost: Cost | None = None
    problem: str | None = None


@dataclass
class Figure:
    name: str
    measure: Callable[[str], Awaitable[Record]] | None  # None: measured by memory_phase
    records: dict[str, list[Record]] = field(default_factory=dict)  # by target

    def add(self, target: str, record: Record) -> None:
        self.records.setdefault(target, []).append(record)

    def of(self, target: str) -> list[Record]:
        return self.records.get(target, [])


MEASUREMENT_TIMEOUT = 240.0
# Sessions per Dovecot imap process while a proxy's memory is measured.
PROXIED_CLIENT_LIMIT = 100


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def per(cost: Cost | None, operations: float, scale: float, which: str = "target") -> float:
    """CPU per operation: `which` is "target" (the proxy, or Dovecot for
    direct) or "dovecot"."""
    if cost is None or not operations:
        return math.nan
    seconds = cost.target_s if which == "target" else cost.dovecot_s
    return seconds / operations * scale


class Bench:
    def __init__(self, servers: Servers, plan: Plan) -> None:
        self.servers = servers
        self.plan = plan
        self.credentials = servers.credentials

    async def timed(self, name: str, call: Awaitable[Any]) -> tuple[Any, Cost]:
        meter = self.servers.meter(name)
        result = await asyncio.wait_for(call, MEASUREMENT_TIMEOUT)
        return result, meter.stop()

    def logins(self, mode: str) -> Callable[[str], Awaitable[Record]]:
        """`mode`: "plain" (IMAP), "tls" (IMAPS) or "pop3"."""

        async def measure(name: str) -> Record:
            result, cost = await self.timed(
                name,
                loadgen.measure_logins(
                    self.servers.target(name, mode),
                    self.credentials,
                    clients=self.plan.clients(mode),
                    duration=self.plan.login_seconds,
                ),
            )
            return login_record(result, cost)

        return measure

    def latency(self, mode: str) -> Callable[[str], Awaitable[Record]]:
        async def measure(name: str) -> Record:
            target = self.servers.target(name, mode)
            await login_phases(target, self.credentials, 1)  # not timed
            phases, cost = await self.timed(
                name, login_phases(target, self.credentials, self.plan.latency_logins)
            )
            values = {
                f"{phase}_{label}": loadgen.percentile(sorted(times), p)
                for phase, times in phases.items()
                for label, p in (("p50_ms", 50), ("p99_ms", 99))
            }
            return Record(values, cost)

        return measure

    def fetch(self, mode: str, number: int) -> Callable[[str], Awaitable[Record]]:
        async def measure(name: str) -> Record:
            result, cost = await self.timed(
                name,
                loadgen.measure_fetch(
                    self.servers.target(name, mode),
                    self.credentials,
                    message=number,
                    repeat=2,
                    duration=self.plan.fetch_seconds,
                ),
            )
            # The meter also saw the login and the one untimed fetch.
            mib = (result.bytes_fetched + result.message_size) / MIB
            return Record(
                {
                    "mib_per_s": result.mib_per_s,
                    "cpu_ms_per_mib": per(cost, mib, 1e3),
                    "dovecot_ms_per_mib": per(cost, mib, 1e3, "dovecot"),
                },
                cost,
            )

        return measure

    def noop(self, mode: str) -> Callable[[str], Awaitable[Record]]:
        async def measure(name: str) -> Record:
            warmup = 20
            result, cost = await self.timed(
                name,
                loadgen.measure_noop(
                    self.servers.target(name, mode),
                    self.credentials,
                    count=self.plan.noops,
                    warmup=warmup,
                ),
            )
            return Record(
                {
                    "p50_ms": result.p50_ms,
                    "p99_ms": result.p99_ms,
                    "cpu_us_per_noop": per(cost, result.count + warmup, 1e6),
                },
                cost,
            )

        return measure

    async def memory_phase(self, found: dict[str, Figure]) -> None:
        """Memory per held session, on processes that have not held sessions
        before (memory a process once used is seldom given back, and later
        sessions reuse it: a reading after a release would look almost free).

        direct: Dovecot as configured for every other figure (one imap process
        per session, Dovecot's default), freshly started. A session with no
        idle imap process left costs a fork, an exec and a settings fetch
        (10-15 ms here), so direct holds `direct_held` sessions per reading,
        readings stacked on each other (nothing closed in between); the
        figure is the PSS growth of the whole Dovecot tree.

        nginx, authgate: restarted before every reading; a first layer of
        `hold_concurrency` sessions, then `held` more; the figure is the PSS
        growth of the proxy's process tree (nginx: master + worker). Dovecot
        behind them serves PROXIED_CLIENT_LIMIT sessions per imap process
        meanwhile (see BenchDovecot.restart: 2,000 forks per reading would
        take half a minute, and 2,000 idle processes afterwards wake up
        together for every later login); a proxy's own memory does not
        depend on that."""
        plan, servers = self.plan, self.servers
        assert servers.dovecot is not None
        modes = MODES if plan.memory_tls else ("plain",)
        await asyncio.to_thread(servers.dovecot.restart, 1)
        kept: list[loadgen.Connection] = []
        try:
            for mode in modes:
                figure = found[f"memory-{mode}"]
                progress(f"versus: {figure.name} direct")
                # Not measured: one-off costs (the login processes' buffers,
                # TLS state) land before the first reading.
                await self._layer("direct", mode, plan.hold_concurrency, kept)
                for _ in range(plan.rounds):
                    figure.add(
                        "direct",
                        await self._guarded(self._reading("direct", mode, plan.direct_held, kept)),
                    )
        finally:
            await loadgen.release(kept)
        await asyncio.to_thread(servers.dovecot.restart, PROXIED_CLIENT_LIMIT)
        for mode in modes:
            figure = found[f"memory-{mode}"]
            progress(f"versus: {figure.name} nginx, authgate")
            for round_index in range(plan.rounds):
                for name in loadgen.rotation(round_index, servers.proxies):
                    await asyncio.to_thread(servers.restart_proxy, name)
                    kept = []
                    try:
                        await self._layer(name, mode, plan.hold_concurrency, kept)
                        record = await self._guarded(self._reading(name, mode, plan.held, kept))
                    finally:
                        await loadgen.release(kept)
                    figure.add(name, record)
        # Back to one process per session, and no idle imap processes by the
        # thousand, for the next figures.
        await asyncio.to_thread(servers.dovecot.restart, 1)

    async def _guarded(self, reading: Awaitable[Record]) -> Record:
        try:
            return await asyncio.wait_for(reading, MEASUREMENT_TIMEOUT)
        except (loadgen.BenchError, OSError, ssl.SSLError, TimeoutError) as exc:
            text = f"{exc.__class__.__name__}: {exc}"
            progress(f"versus: memory: {text}")
            return Record({}, None, text)

    async def _layer(
        self, name: str, mode: str, count: int, kept: list[loadgen.Connection]
    ) -> list[loadgen.Connection]:
        target = self.servers.target(name, mode)
        opened = await loadgen.hold_connections(
            target,
            self.credentials,
            count,
            concurrency=self.plan.hold_concurrency,
            context=target.ssl_context(),
        )
        kept += opened
        return opened

    async def _reading(
        self, name: str, mode: str, count: int, kept: list[loadgen.Connection]
    ) -> Record:
        """Hold `count` more sessions (added to `kept`, left open) and return
        the growth of the attributed process tree per session."""
        servers = self.servers
        own = servers.proxy_pids(name) or servers.dovecot_pids()
        await asyncio.sleep(self.plan.settle)
        before = tree_memory(own)
        meter = servers.meter(name)
        opened = await self._layer(name, mode, count, kept)
        cost = meter.stop()
        await asyncio.sleep(self.plan.settle)
        # All still logged in, before they are counted.
        await asyncio.gather(*(c.ok(b"NOOP") for c in opened))
        after = tree_memory(own)
        return Record(
            {
                "pss_kib": (after.pss_kib - before.pss_kib) / len(opened),
                "rss_kib": (after.rss_kib - before.rss_kib) / len(opened),
                "opened_per_s": len(opened) / cost.wall_s if cost.wall_s else math.nan,
                "sessions": float(len(opened)),
            },
            cost,
        )


async def login_phases(
    target: loadgen.Target, credentials: loadgen.Credentials, count: int
) -> dict[str, list[float]]:
    """`count` logins one after the other, each timed in phases (ms): `greeting`
    (connect, TLS handshake, greeting), `auth` (AUTHENTICATE PLAIN to its OK:
    for a proxy, the backend login inside it), `logout` (LOGOUT and close), and
    `login` (all three). Where a server stalls shows in which phase grows."""
    context = target.ssl_context()
    phases: dict[str, list[float]] = {"login": [], "greeting": [], "auth": [], "logout": []}
    for _ in range(count):
        begin = time.perf_counter()
        connection = await loadgen.Connection.open(target, context)
        try:
            greeted = time.perf_counter()
            if not await connection.login(credentials):
                raise loadgen.BenchError(f"{target}: login as {credentials.user!r} refused")
            authenticated = time.perf_counter()
        except BaseException:
            connection.abort()
            raise
        await connection.logout()
        end = time.perf_counter()
        for phase, seconds in (
            ("login", end - begin),
            ("greeting", greeted - begin),
            ("auth", authenticated - greeted),
            ("logout", end - authenticated),
        ):
            phases[phase].append(seconds * 1e3)
    return phases


def login_record(result: loadgen.LoginResult, cost: Cost) -> Record:
    problem = None
    if result.refused or result.errors:
        problem = f"{result.refused} refused, {result.errors} errors (first: {result.first_error})"
    return Record(
        {
            "per_second": result.per_second,
            "p50_ms": result.p50_ms,
            "p99_ms": result.p99_ms,
            "cpu_ms_per_login": per(cost, result.logins, 1e3),
            "dovecot_ms_per_login": per(cost, result.logins, 1e3, "dovecot"),
        },
        cost,
        problem,
    )


def figures(bench: Bench, plan: Plan) -> list[Figure]:
    found = [Figure("memory-plain", None)]
    if plan.memory_tls:
        found.append(Figure("memory-tls", None))
    for mode in LOGIN_MODES:
        found.append(Figure(f"logins-{mode}", bench.logins(mode)))
    for mode in MODES:
        for number, size in enumerate(SIZES, start=1):
            found.append(Figure(f"fetch-{size // MIB}MiB-{mode}", bench.fetch(mode, number)))
    for mode in MODES:
        found.append(Figure(f"noop-{mode}", bench.noop(mode)))
    for mode in MODES:
        found.append(Figure(f"latency-{mode}", bench.latency(mode)))
    return found


async def check_targets(servers: Servers) -> None:
    """Every target logs in (IMAP: and sees the two messages; POP3: and says
    STAT), before anything is timed."""
    for name in servers.names:
        for mode in MODES:
            target = servers.target(name, mode)
            sizes = await loadgen.message_sizes(target, servers.credentials)
            if sizes != list(SIZES):
                raise SetupError(f"{name} {mode}: INBOX holds {sizes}, expected {list(SIZES)}")
        async with loadgen.logged_in(servers.target(name, "pop3"), servers.credentials) as pop3:
            await pop3.ok(b"STAT")


async def run(servers: Servers, plan: Plan) -> tuple[list[Figure], float]:
    await check_targets(servers)
    bench = Bench(servers, plan)
    found = figures(bench, plan)
    started = time.perf_counter()
    await bench.memory_phase({f.name: f for f in found})
    for figure in found:
        if figure.measure is None:
            continue
        progress(f"versus: {figure.name} ({time.perf_counter() - started:.0f} s)")
        for round_index in range(plan.rounds):
            for name in loadgen.rotation(round_index, servers.names):
                try:
                    record = await figure.measure(name)
                except (loadgen.BenchError, OSError, ssl.SSLError, TimeoutError) as exc:
                    text = f"{exc.__class__.__name__}: {exc}"
                    record = Record({}, None, text)
                    progress(f"versus: {figure.name} {name}: {text}")
                figure.add(name, record)
    return found, time.perf_counter() - started


# --- profile ---------------------------------------------------------------------------------


def py_spy() -> str | None:
    return shutil.which(
        "py-spy", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
    )


async def profile(servers: Servers, plan: Plan, workdir: Path) -> list[str]:
    """py-spy (sampling, --nonblocking) on authgate during one more login run per
    mode, not timed: the top frames by own time and by time with callees."""
    binary = py_spy()
    assert servers.authgate is not None
    if binary is None:
        return ["(py-spy is not installed: .venv/bin/pip install py-spy)"]
    lines: list[str] = []
    seconds = max(plan.login_seconds * 2, 3.0)
    for mode in MODES:
        output = workdir / f"py-spy-authgate-{mode}.txt"
        spy = await asyncio.create_subprocess_exec(
            binary,
            "record",
            "--pid",
            str(servers.authgate.pid),
            "--duration",
            str(math.ceil(seconds) + 1),
            "--rate",
            "200",
            "--nonblocking",
            "--format",
            "raw",
            "--output",
            str(output),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        await asyncio.sleep(0.5)
        result = await loadgen.measure_logins(
            servers.target("authgate", mode),
            servers.credentials,
            clients=plan.clients(mode),
            duration=seconds,
        )
        _, err = await spy.communicate()
        if spy.returncode != 0 or not output.exists():
            lines.append(f"py-spy failed ({mode}): {err.decode(errors='replace')[-300:]}")
            continue
        lines += [
            "",
            f"py-spy on authgate, {mode}, {result.per_second:.0f} logins/s while sampled"
            f" (raw stacks: {output}):",
            "",
            *summarise_stacks(output.read_text()),
        ]
    return lines


# Leaf frames that are waiting, not working: py-spy's --nonblocking mode does
# not always tell a thread blocked on a lock from one running Python code, and
# the verification pool's idle threads sit in `work_queue.get()` in _worker.
IDLE_LEAVES = ("_worker (futures/thread.py)",)


def summarise_stacks(raw: str, top: int = 12) -> list[str]:
    """Top frames of py-spy's raw (collapsed) output: `frame;frame;... count`."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [short_frame(f) for f in stack.split(";") if f and not f.startswith("process ")]
        frames = [f for f in frames if not f.startswith("thread ")]
        if not frames or frames[-1].startswith(IDLE_LEAVES):
            continue
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    if not samples:
        return ["(no samples)"]
    rows = ["| own % | frame | | with callees % | frame |", "|---:|---|---|---:|---|"]
    for (a, a_n), (b, b_n) in zip(own.most_common(top), inclusive_rank(total, top), strict=False):
        rows.append(f"| {100 * a_n / samples:.1f} | `{a}` | | {100 * b_n / samples:.1f} | `{b}` |")
    rows.append(f"\n{samples} samples.")
    return rows


def inclusive_rank(total: collections.Counter[str], top: int) -> list[tuple[str, int]]:
    # The outermost frames (run_forever, _run_once, asyncio.run) hold nearly
    # every sample and say nothing: skip frames of the event loop machinery.
    boring = ("asyncio/", "runpy", "threading.py", "<module>", "cli.py", "runner.py")
    return [(f, n) for f, n in total.most_common() if not any(b in f for b in boring)][:top]


def short_frame(frame: str) -> str:
    """`handle (authgate/proxy/session.py:123)` -> `handle (proxy/session.py)`."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = Path(path).parts
    keep = "/".join(parts[-2:]) if len(parts) >= 2 else path
    return f"{name} ({keep})" if where else name


# --- reporting -------------------------------------------------------------------------------


def median(figure: Figure | None, target: str, key: str) -> float:
    if figure is None:
        return math.nan
    values = [r.values[key] for r in figure.of(target) if key in r.values]
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


@dataclass(frozen=True)
class Row:
    """One row of a report table: the median of `key` in `figure`, times
    `scale`, per target. `label` may name Plan fields ({imap_clients}).
    `overhead`: the proxies' cells are their figure minus direct's (direct's
    own cell shows its figure). `floor`: "" or REFERENCE OP LIMIT, e.g.
    "nginx>=1" (authgate at least nginx's), "nginx<=1", "direct<=1.2"."""

    label: str
    figure: str
    key: str
    fmt: str
    floor: str = ""
    scale: float = 1.0
    overhead: bool = False


# The table of issue #17, row for row, with its floors.
ISSUE_ROWS = (
    Row(
        "IMAP logins/s (AUTHENTICATE PLAIN, {imap_clients} clients)",
        "logins-plain",
        "per_second",
        "{:.0f}",
        "nginx>=1",
    ),
    Row(
        "proxy CPU per IMAP login, µs",
        "logins-plain",
        "cpu_ms_per_login",
        "{:,.0f}",
        "nginx<=1",
        1e3,
    ),
    Row(
        "IMAPS logins/s ({imaps_clients} clients)", "logins-tls", "per_second", "{:.0f}", "nginx>=1"
    ),
    Row(
        "proxy CPU per IMAPS login, µs",
        "logins-tls",
        "cpu_ms_per_login",
        "{:,.0f}",
        "nginx<=1",
        1e3,
    ),
    Row(
        "POP3 logins/s (AUTH PLAIN, {pop3_clients} clients)",
        "logins-pop3",
        "per_second",
        "{:.0f}",
        "nginx>=1",
    ),
    Row(
        "proxy CPU per POP3 login, µs",
        "logins-pop3",
        "cpu_ms_per_login",
        "{:,.0f}",
        "nginx<=1",
        1e3,
    ),
    Row("one client, IMAP login p50, ms", "latency-plain", "login_p50_ms", "{:.2f}", "nginx<=1"),
    Row("one client, IMAPS login p50, ms", "latency-tls", "login_p50_ms", "{:.2f}", "direct<=1.2"),
    Row(
        "NOOP round trip over direct, p50, µs",
        "noop-plain",
        "p50_ms",
        "{:+.0f}",
        "nginx<=1",
        1e3,
        overhead=True,
    ),
    Row("proxy CPU per spliced NOOP, µs", "noop-plain", "cpu_us_per_noop", "{:.0f}", "nginx<=1"),
    Row(
        "proxy memory per held session (PSS), KiB, cleartext",
        "memory-plain",
        "pss_kib",
        "{:.1f}",
        "nginx<=1",
    ),
    Row(
        "proxy memory per held session (PSS), KiB, TLS",
        "memory-tls",
        "pss_kib",
        "{:.1f}",
        "nginx<=1",
    ),
    Row(
        "FETCH throughput, MiB/s (10 MiB message, cleartext)",
        "fetch-10MiB-plain",
        "mib_per_s",
        "{:.0f}",
        "nginx>=1",
    ),
)

# The figures of earlier runs that the issue's table does not hold.
OTHER_ROWS = (
    Row("FETCH 1 MiB, MiB/s, cleartext", "fetch-1MiB-plain", "mib_per_s", "{:.0f}"),
    Row("FETCH 1 MiB, MiB/s, TLS", "fetch-1MiB-tls", "mib_per_s", "{:.0f}"),
    Row("FETCH 10 MiB, MiB/s, TLS", "fetch-10MiB-tls", "mib_per_s", "{:.0f}"),
    Row("NOOP p50, ms, cleartext", "noop-plain", "p50_ms", "{:.3f}"),
    Row("NOOP p99, ms, cleartext", "noop-plain", "p99_ms", "{:.3f}"),
    # Dovecot's own TLS runs through its imap-login process (one more hop),
    # so direct TLS is no baseline for a proxy's overhead.
    Row("NOOP p50, ms, TLS", "noop-tls", "p50_ms", "{:.3f}"),
    Row("NOOP p99, ms, TLS", "noop-tls", "p99_ms", "{:.3f}"),
    Row("login p50 under load, ms, IMAP", "logins-plain", "p50_ms", "{:.1f}"),
    Row("login p50 under load, ms, IMAPS", "logins-tls", "p50_ms", "{:.1f}"),
    Row("login p50 under load, ms, POP3", "logins-pop3", "p50_ms", "{:.1f}"),
    Row(
        "one client: TLS login, connect + handshake + greeting, p50 ms",
        "latency-tls",
        "greeting_p50_ms",
        "{:.2f}",
    ),
    Row("one client: TLS login, AUTHENTICATE, p50 ms", "latency-tls", "auth_p50_ms", "{:.2f}"),
    Row("one client: TLS login p99, ms", "latency-tls", "login_p99_ms", "{:.2f}"),
    Row(
        "one client: cleartext login, AUTHENTICATE, p50 ms",
        "latency-plain",
        "auth_p50_ms",
        "{:.2f}",
    ),
    Row("one client: cleartext login p99, ms", "latency-plain", "login_p99_ms", "{:.2f}"),
)

COST_ROWS = (
    Row("target CPU ms per login, IMAP", "logins-plain", "cpu_ms_per_login", "{:.2f}"),
    Row("target CPU ms per login, IMAPS", "logins-tls", "cpu_ms_per_login", "{:.2f}"),
    Row("target CPU ms per login, POP3", "logins-pop3", "cpu_ms_per_login", "{:.2f}"),
    Row("Dovecot CPU ms per login, IMAP", "logins-plain", "dovecot_ms_per_login", "{:.2f}"),
    Row("Dovecot CPU ms per login, IMAPS", "logins-tls", "dovecot_ms_per_login", "{:.2f}"),
    Row("Dovecot CPU ms per login, POP3", "logins-pop3", "dovecot_ms_per_login", "{:.2f}"),
    Row(
        "target CPU ms per MiB, 10 MiB, cleartext", "fetch-10MiB-plain", "cpu_ms_per_mib", "{:.2f}"
    ),
    Row("target CPU ms per MiB, 10 MiB, TLS", "fetch-10MiB-tls", "cpu_ms_per_mib", "{:.2f}"),
    Row("target CPU µs per NOOP, cleartext", "noop-plain", "cpu_us_per_noop", "{:.0f}"),
    Row("target CPU µs per NOOP, TLS", "noop-tls", "cpu_us_per_noop", "{:.0f}"),
    Row("memory: RSS KiB per held session, cleartext", "memory-plain", "rss_kib", "{:.1f}"),
    Row("memory: RSS KiB per held session, TLS", "memory-tls", "rss_kib", "{:.1f}"),
    Row("memory: sessions held per reading", "memory-plain", "sessions", "{:.0f}"),
    Row("memory: sessions opened per s, cleartext", "memory-plain", "opened_per_s", "{:.0f}"),
    Row("memory: sessions opened per s, TLS", "memory-tls", "opened_per_s", "{:.0f}"),
)


@dataclass(frozen=True)
class Floor:
    reference: str  # "nginx" or "direct"
    op: str  # "<=" or ">="
    limit: float

    @classmethod
    def parse(cls, text: str) -> Floor:
        for op in ("<=", ">="):
            reference, sep, limit = text.partition(op)
            if sep:
                if reference not in ("nginx", "direct"):
                    raise ValueError(f"floor {text!r}: compared with what?")
                return cls(reference, op, float(limit))
        raise ValueError(f"floor {text!r}: no <= or >=")

    def describe(self, overhead: bool = False) -> str:
        what = "overhead " if overhead else ""
        whose = "nginx's" if overhead else self.reference
        return f"{what}{'≤' if self.op == '<=' else '≥'} {self.limit:.1f}x {whose}"

    def met(self, ratio: float) -> bool:
        return ratio <= self.limit if self.op == "<=" else ratio >= self.limit


def cells(row: Row, values: dict[str, float]) -> dict[str, float]:
    """The numbers a row shows per target: scaled medians, or for an overhead
    row the proxies' figure minus direct's (direct's own figure stays)."""
    scaled = {t: v * row.scale for t, v in values.items()}
    if not row.overhead:
        return scaled
    direct = scaled.get("direct", math.nan)
    return {t: v if t == "direct" else v - direct for t, v in scaled.items()}


def ratio(ours: float, theirs: float) -> float:
    if math.isnan(ours) or math.isnan(theirs) or not theirs:
        return math.nan
    return ours / theirs


def verdict(row: Row, shown: dict[str, float]) -> tuple[str, str, str]:
    """(authgate / nginx cell, floor cell, verdict cell) for the cells of
    `row` as shown (see `cells`)."""
    ours = shown.get("authgate", math.nan)
    against_nginx = ratio(ours, shown.get("nginx", math.nan))
    ratio_cell = "-" if math.isnan(against_nginx) else f"{against_nginx:.2f}x"
    if not row.floor:
        return ratio_cell, "", ""
    floor = Floor.parse(row.floor)
    if row.overhead and shown.get("nginx", math.nan) <= 0:
        return "-", floor.describe(row.overhead), "?"  # nginx adds nothing measurable
    held_to = against_nginx if floor.reference == "nginx" else ratio(ours, shown["direct"])
    if math.isnan(held_to):
        return ratio_cell, floor.describe(row.overhead), "?"
    met = "met" if floor.met(held_to) else "**missed**"
    if floor.reference != "nginx":
        met += f" ({held_to:.2f}x {floor.reference})"
    return ratio_cell, floor.describe(row.overhead), met


def table(
    found: dict[str, Figure],
    rows: Sequence[Row],
    with_floor: bool,
    names: Sequence[str] = TARGETS,
    plan: Plan = DEFAULT_PLAN,
) -> list[str]:
    """A Markdown table: direct, nginx, authgate, authgate / nginx; with
    authgate@base in `names`, its column and authgate / authgate@base; with
    `with_floor`, each row's floor and whether authgate met it."""
    base = BASE in names
    head = "| figure | direct | nginx | authgate | authgate / nginx |"
    rule = "|---|---:|---:|---:|---:|"
    if base:
        head += f" {BASE} | now / base |"
        rule += "---:|---:|"
    if with_floor:
        head += " floor | verdict |"
        rule += "---|---|"
    lines = [head, rule]
    labels = asdict(plan)
    for row in rows:
        figure = found.get(row.figure)
        if figure is None:
            continue
        shown = cells(row, {t: median(figure, t, row.key) for t in names})
        if all(math.isnan(v) for v in shown.values()):
            continue
        ratio_cell, floor, met = verdict(row, shown)
        row_cells = [_show(row, shown, t) for t in TARGETS] + [ratio_cell]
        if base:
            now_base = ratio(shown.get("authgate", math.nan), shown.get(BASE, math.nan))
            row_cells += [_show(row, shown, BASE), _fmt("{:.2f}x", now_base)]
        if with_floor:
            row_cells += [floor, met]
        lines.append(f"| {row.label.format_map(labels)} | " + " | ".join(row_cells) + " |")
    return lines


def _show(row: Row, shown: dict[str, float], target: str) -> str:
    value = shown.get(target, math.nan)
    if target == "direct" and row.overhead:
        return _fmt("{:.0f} (its own)", value)
    return _fmt(row.fmt, value)


def _fmt(fmt: str, value: float) -> str:
    return "-" if math.isnan(value) else fmt.format(value)


def usage_table(found: list[Figure]) -> list[str]:
    lines = [
        "| measurement | target | wall s | generator | proxy | Dovecot | rest of machine"
        " | of which on the servers' CPU |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for figure in found:
        for target, records in figure.records.items():
            costs = [r.cost for r in records if r.cost is not None]
            if not costs:
                continue

            def mid(pick: Callable[[Cost], float | None], costs: list[Cost] = costs) -> str:
                values = [c.cores(pick(c)) for c in costs]
                values = [v for v in values if not math.isnan(v)]
                return f"{statistics.median(values):.2f}" if values else "-"

            wall = statistics.median(c.wall_s for c in costs)
            lines.append(
                f"| {figure.name} | {target} | {wall:.2f} | {mid(lambda c: c.generator_s)}"
                f" | {mid(lambda c: c.proxy_s)} | {mid(lambda c: c.dovecot_s)}"
                f" | {mid(lambda c: c.rest_s)} | {mid(lambda c: c.intruders_s)} |"
            )
    return lines


GENERATOR_BUSY = 0.85  # cores: above this, the generator may have set the pace


def generator_notes(found: list[Figure]) -> list[str]:
    """Measurements where the generator itself was nearly saturated: their
    rates are lower bounds for that target."""
    notes = []
    for figure in found:
        for target, records in figure.records.items():
            loads = [r.cost.cores(r.cost.generator_s) for r in records if r.cost]
            if loads and statistics.median(loads) >= GENERATOR_BUSY:
                notes.append(
                    f"- {figure.name} {target}: the generator used"
                    f" {statistics.median(loads):.2f} of its core; this figure is a lower bound"
                    " for the target."
                )
    return notes


def problems(found: list[Figure]) -> list[str]:
    return [
        f"{figure.name} {target}: {record.problem}"
        for figure in found
        for target, records in figure.records.items()
        for record in records
        if record.problem
    ]


def report(
    found: list[Figure],
    plan: Plan,
    quick: bool,
    elapsed: float,
    pinning: tuple[set[int] | None, set[int] | None],
    extra: Sequence[str],
    server_problems: Sequence[str],
    tunings: dict[str, Tuning] | None = None,
    trees: dict[str, Path] | None = None,
) -> str:
    """The whole report. `trees`: the code each authgate target ran (for
    authgate@base, its column appears when it is there); `tunings`: the
    settings each ran with."""
    by_name = {f.name: f for f in found}
    trees = trees or {"authgate": REPO}
    names = TARGETS + ((BASE,) if BASE in trees else ())
    code = "; ".join(f"{name}: {describe_tree(tree)}" for name, tree in trees.items())
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()
    generator, servers = pinning
    pin_text = (
        f"generator on CPU {sorted(generator)}, every server on CPU {sorted(servers)}"
        if generator and servers
        else "no pinning (one CPU)"
    )
    tunings = tunings or {"authgate": Tuning()}
    settings = "; ".join(
        f"{name} with {tunings.get(name, tunings['authgate']).describe()}" for name in trees
    )
    lines = [
        f"authgate vs nginx mail proxy ({'quick' if quick else 'default'} run), {now}:"
        f" nproc {os.cpu_count()}, {loadgen.cpu_model()}; nginx {nginx_version()},"
        f" Dovecot {dovecot_version()}, Python {platform.python_version()}"
        f" ({ssl.OPENSSL_VERSION}); load average {load[0]:.2f} at the end;"
        f" {elapsed:.0f} s of measuring; {pin_text}; {settings};"
        f" {code}.",
        "",
        f"Medians of {plan.rounds} rounds (target order rotates every round). Logins for"
        f" {plan.login_seconds} s: IMAP {plan.imap_clients} clients, IMAPS"
        f" {plan.imaps_clients}, POP3 {plan.pop3_clients}; connect (+ TLS), greeting,"
        " AUTHENTICATE PLAIN / AUTH PLAIN with an initial response, LOGOUT / QUIT."
        f" Memory: {plan.held} sessions held on fresh processes, PSS growth per session of"
        " nginx (master + worker), authgate (its process) or Dovecot (every process: imap,"
        f" imap-login, auth...) for direct. NOOP: {plan.noops} round trips after login. One"
        f" client: {plan.latency_logins} logins one after the other. In the direct column,"
        " CPU is Dovecot's; the NOOP row shows direct's own p50 and, for the proxies, what"
        " they add to it.",
        "",
        *table(by_name, ISSUE_ROWS, True, names, plan),
        "",
        "Other figures (medians):",
        "",
        *table(by_name, OTHER_ROWS, False, names, plan),
        "",
        "CPU per operation (medians). target = the proxy's own process tree, or Dovecot's for"
        " direct; Dovecot = the backend behind it. Memory: RSS beside PSS, and how fast the"
        " sessions were opened while filling.",
        "",
        *table(by_name, COST_ROWS, False, names, plan),
        "",
        "CPU in cores (CPU seconds / wall seconds), medians per measurement: the generator"
        " (this process), the proxy, Dovecot, everything else on the machine, and how much"
        " of that ran on the CPU the servers are pinned to (time they could not have).",
        "",
        *usage_table(found),
    ]
    notes = generator_notes(found)
    lines += (
        ["", *notes]
        if notes
        else ["", "The generator stayed below 0.85 of its core in every measurement."]
    )
    lines += list(extra)
    trouble = problems(found) + list(server_problems)
    if trouble:
        lines += ["", "PROBLEMS:", *(f"- {p}" for p in trouble)]
    return "\n".join(lines)


def describe_tree(tree: Path) -> str:
    """`/path at <commit>` (+ "with local changes"), for the report's header."""
    try:
        head = subprocess.run(
            ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return str(tree)
    if not head:
        return str(tree)
    return f"{tree} at {head}" + (" with local changes" if dirty else "")


def to_json(found: list[Figure], elapsed: float) -> dict[str, Any]:
    return {
        "elapsed": elapsed,
        "figures": {
            f.name: {
                t: [
                    {
                        "values": r.values,
                        "cost": None if r.cost is None else asdict(r.cost),
                        "problem": r.problem,
                    }
                    for r in rs
                ]
                for t, rs in f.records.items()
            }
            for f in found
        },
    }


# --- main --------------------------------------------------------------------------------


def raise_fd_limit() -> None:
    """Held sessions are descriptors here (2,000+): lift the soft limit to the
    hard one. The servers inherit it (nginx sizes its worker from it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def main_async(
    servers: Servers, plan: Plan, workdir: Path, want_profile: bool
) -> tuple[list[Figure], float, list[str]]:
    found, elapsed = await run(servers, plan)
    extra: list[str] = []
    if want_profile:
        progress("versus: py-spy on authgate")
        extra = await profile(servers, plan, workdir)
    return found, elapsed, extra


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.versus",
        description="Dovecot direct vs nginx mail proxy vs authgate; prints Markdown tables",
    )
    parser.add_argument("--quick", action="store_true", help="a run of under 2 minutes")
    parser.add_argument("--rounds", type=int, help="rounds per figure (default 3, at least 3)")
    parser.add_argument("--json", type=Path, help="also write every sample to this file")
    parser.add_argument("--workdir", type=Path, help="keep the scratch files here")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="afterwards, sample authgate with py-spy during logins and print its top frames",
    )
    add_event_loop_option(parser)
    parser.add_argument(
        "--baseline-event-loop",
        choices=("asyncio", "uvloop"),
        help="the event_loop setting of --baseline-tree's authgate (default: --event-loop's)",
    )
    for option, text in (
        ("--warm", "authgate's backends (0..64; default 0, off)"),
        ("--baseline-warm", "--baseline-tree's backends (default: --warm's)"),
    ):
        parser.add_argument(option, type=int, metavar="N", help=f"warm_connections on {text}")
    for option, field_name, text in (
        ("--imap-clients", "imap_clients", "IMAP logins/s"),
        ("--imaps-clients", "imaps_clients", "IMAPS logins/s"),
        ("--pop3-clients", "pop3_clients", "POP3 logins/s"),
    ):
        parser.add_argument(
            option,
            type=int,
            dest=field_name,
            metavar="N",
            help=f"concurrent clients of {text} (default {getattr(DEFAULT_PLAN, field_name)})",
        )
    parser.add_argument(
        "--baseline-tree",
        type=Path,
        metavar="DIR",
        help=f"also measure the authgate in DIR (e.g. a git worktree of an older commit) as"
        f" the target {BASE!r}, in the same run",
    )
    args = parser.parse_args(argv)
    plan = QUICK_PLAN if args.quick else DEFAULT_PLAN
    if args.rounds is not None:
        if args.rounds < 3:
            parser.error("--rounds must be at least 3: a median of fewer says little")
        plan = replace(plan, rounds=args.rounds)
    for field_name in ("imap_clients", "imaps_clients", "pop3_clients"):
        value = getattr(args, field_name)
        if value is not None:
            if value < 1:
                parser.error(f"--{field_name.replace('_', '-')} must be at least 1")
            plan = replace(plan, **{field_name: value})
    baseline = None
    if args.baseline_tree is not None:
        baseline = args.baseline_tree.resolve()
        if not (baseline / "authgate" / "__init__.py").is_file():
            parser.error(f"--baseline-tree {baseline}: no authgate package in it")
    for option, value in (("--warm", args.warm), ("--baseline-warm", args.baseline_warm)):
        if value is not None and not 0 <= value <= 64:
            parser.error(f"{option} must be 0..64 (authgate's warm_connections)")
    tuning = Tuning(args.event_loop, args.warm or 0)
    baseline_tuning = Tuning(
        args.baseline_event_loop or tuning.event_loop,
        tuning.warm_connections if args.baseline_warm is None else args.baseline_warm,
    )
    if os.geteuid() != 0:
        print("versus: run as root (Dovecot must start as root)", file=sys.stderr)
        return 2
    raise_fd_limit()
    generator_cpus, server_cpus = target_cpus()
    with contextlib.ExitStack() as stack:
        if args.workdir:
            workdir = args.workdir.resolve()
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="versus-")))
        servers = Servers(workdir, server_cpus, tuning, baseline, baseline_tuning)
        stack.callback(servers.stop)
        if generator_cpus:
            # This thread, and the threads it starts later, stay off the servers' CPU.
            os.sched_setaffinity(0, generator_cpus)
        try:
            progress(
                f"versus: starting Dovecot, nginx and {', '.join(servers.proxies[1:])} in {workdir}"
            )
            servers.start()
            found, elapsed, extra = asyncio.run(main_async(servers, plan, workdir, args.profile))
        except (SetupError, DovecotError, NginxError, loadgen.BenchError) as exc:
            print(f"versus: {exc}", file=sys.stderr)
            return 1
        server_problems = servers.server_problems()
    print(
        report(
            found,
            plan,
            args.quick,
            elapsed,
            (generator_cpus, server_cpus),
            extra,
            server_problems,
            {"authgate": tuning, BASE: baseline_tuning},
            {"authgate": REPO, **({BASE: baseline} if baseline else {})},
        )
    )
    if args.json:
        args.json.write_text(json.dumps(to_json(found, elapsed), indent=1))
    return 1 if problems(found) or server_problems else 0


if __name__ == "__main__":
    sys.exit(main())
