"""A cheap asyncio IMAP load generator.

Raw asyncio streams and just enough IMAP to log in, fetch and NOOP (and of
POP3 to log in: greeting, ``AUTH PLAIN`` with an initial response, ``QUIT``,
for a `Target` with ``protocol="pop3"``): no imaplib,
no response parsing beyond tags and literal lengths, so that the generator
spends as little CPU as possible and the server under test is what gets
measured. Four figures, each a function returning a small dataclass:

- `measure_logins`: logins per second with N concurrent clients, each doing
  connect, greeting, ``AUTHENTICATE PLAIN`` with an initial response
  (SASL-IR, RFC 4959), ``LOGOUT``, for a fixed duration or count;
- `measure_fetch`: MiB/s of ``FETCH n BODY.PEEK[]`` repeated over one
  logged-in connection;
- `measure_memory`: the target's RSS growth per held authenticated connection;
- `measure_noop`: NOOP round-trip latency (p50/p99) over one logged-in connection.

Pass the target's pids to also get its CPU time (from /proc) next to the
generator's own, to show which side was the bottleneck.

    python -m bench.loadgen --target 127.0.0.1:1143 --what logins --clients 8 --duration 3
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import os
import platform
import re
import ssl
import sys
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

# Big enough that a large FETCH literal streams in few, large reads.
_STREAM_LIMIT = 4 * 1024 * 1024
_READ_CHUNK = 1024 * 1024
_LITERAL = re.compile(rb"\{(\d{1,12})\}\r\n\Z")
_SIZE = re.compile(rb"RFC822\.SIZE (\d{1,12})")
_CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """The target answered something a benchmark run cannot go on with."""


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    tls: bool = False  # implicit TLS (IMAPS)
    ca_file: str | None = None
    server_hostname: str | None = None  # default: host (the dev certificate names 127.0.0.1)
    # Local addresses to connect from, in turn: a gateway may cap connections
    # per client address, and many held connections should look like many clients.
    sources: tuple[str, ...] = ()
    protocol: str = "imap"  # or "pop3": which client `connection_class` gives

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        return ssl.create_default_context(cafile=self.ca_file)

    def __str__(self) -> str:
        return f"{self.protocol}{'s' if self.tls else ''}://{self.host}:{self.port}"


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str

    def plain_initial_response(self) -> bytes:
        # RFC 4616: authzid NUL authcid NUL passwd, empty authzid.
        message = b"\0" + self.user.encode() + b"\0" + self.password.encode()
        return base64.b64encode(message)


# --- /proc: the target's RSS and CPU time -------------------------------------------


def process_tree(pids: Iterable[int]) -> list[int]:
    """`pids` and all their live descendants."""
    parents: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # The command name (field 2) may hold spaces and parentheses: split after it.
        fields = stat[stat.rindex(")") + 2 :].split()
        parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    todo = [p for p in pids if Path(f"/proc/{p}").exists()]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.append(pid)
            todo.extend(parents.get(pid, ()))
    return found


def rss_kib(pids: Iterable[int]) -> int:
    """Sum of VmRSS (KiB) over `pids` and their descendants."""
    total = 0
    for pid in process_tree(pids):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
    return total


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU time of `pids` and their descendants, all threads.

    From utime and stime in /proc/<pid>/stat, in clock ticks (10 ms): coarse,
    but they include threads that have ended. Per-thread schedstat counts in
    nanoseconds yet loses an ended thread's time, and the threads argon2
    starts for each hash (one per lane) end right after it.
    """
    ticks = 0
    for pid in process_tree(pids):
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            # Fields 14 and 15 of proc(5) (utime, stime); we dropped the first two.
            ticks += int(fields[11]) + int(fields[12])
    return ticks / _CLK_TCK


def machine_busy_seconds() -> float:
    """CPU time all CPUs spent not idle since boot (first line of /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is inside user)
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / _CLK_TCK


def cpu_model() -> str:
    """The machine's CPU, for a report's header."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def rotation(round_index: int, names: Sequence[str]) -> list[str]:
    """The target order of one round: A B C, then B C A, then C A B, ..."""
    shift = round_index % len(names)
    return list(names[shift:]) + list(names[:shift])


@dataclass(frozen=True)
class Usage:
    """Wall time of one measurement and the CPU time spent in it: by the
    generator, by the target, and by the whole machine (the rest is other
    processes: on a shared machine they compete with both sides)."""

    wall_s: float
    client_cpu_s: float  # this process (the generator), all threads
    target_cpu_s: float | None  # the target's process tree; None without pids
    machine_cpu_s: float  # all CPUs, everything

    @property
    def client_load(self) -> float:
        """Generator CPU as a fraction of one core (1.0 = one core saturated)."""
        return self.client_cpu_s / self.wall_s if self.wall_s else 0.0

    @property
    def target_load(self) -> float | None:
        if self.target_cpu_s is None or not self.wall_s:
            return None
        return self.target_cpu_s / self.wall_s

    @property
    def other_load(self) -> float | None:
        """Everything else on the machine, in cores (None without target pids)."""
        if self.target_cpu_s is None or not self.wall_s:
            return None
        rest = self.machine_cpu_s - self.client_cpu_s - self.target_cpu_s
        return max(rest, 0.0) / self.wall_s


class _Meter:
    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = pids
        self.target = cpu_seconds(pids) if pids else None
        self.machine = machine_busy_seconds()
        self.client = time.process_time()
        self.wall = time.perf_counter()

    def stop(self) -> Usage:
        wall = time.perf_counter() - self.wall
        client = time.process_time() - self.client
        target = cpu_seconds(self.pids) - self.target if self.target is not None else None
        return Usage(wall, client, target, machine_busy_seconds() - self.machine)


# --- A minimal IMAP client -----------------------------------------------------------


class Connection:
    """One IMAP connection: tagged commands, untagged lines and literals skipped."""

    _opened = 0  # for the round robin over Target.sources
    GREETING = b"* OK"

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._tag = 0

    @classmethod
    async def open(cls, target: Target, context: ssl.SSLContext | None = None) -> Connection:
        """Connect and read the greeting (the TLS handshake is part of it)."""
        if target.tls and context is None:
            context = target.ssl_context()
        local = None
        if target.sources:
            cls._opened += 1
            local = (target.sources[cls._opened % len(target.sources)], 0)
        reader, writer = await asyncio.open_connection(
            target.host,
            target.port,
            ssl=context,
            server_hostname=(target.server_hostname or target.host) if context else None,
            limit=_STREAM_LIMIT,
            local_addr=local,
        )
        connection = cls(reader, writer)
        try:
            greeting = await connection._line()
            if not greeting.startswith(cls.GREETING):
                raise BenchError(f"{target}: unexpected greeting {greeting[:80]!r}")
        except BaseException:
            connection.abort()
            raise
        return connection

    async def _line(self) -> bytes:
        line = await self.reader.readline()
        if not line.endswith(b"\n"):
            raise BenchError("connection closed by the server")
        return line

    async def _skip(self, count: int) -> None:
        while count > 0:
            data = await self.reader.read(min(count, _READ_CHUNK))
            if not data:
                raise BenchError("connection closed inside a literal")
            count -= len(data)

    async def command(self, text: bytes) -> tuple[bytes, int, list[bytes]]:
        """Send one command; return (tagged status line, literal octets received,
        untagged lines without their literals)."""
        self._tag += 1
        tag = b"b%d" % self._tag
        self.writer.write(tag + b" " + text + b"\r\n")
        literal_octets = 0
        untagged: list[bytes] = []
        while True:
            line = await self._line()
            if line.startswith(tag + b" "):
                return line[len(tag) + 1 :].rstrip(b"\r\n"), literal_octets, untagged
            if line.startswith(b"+"):
                raise BenchError(f"unexpected continuation for {text.split(b' ')[0]!r}")
            untagged.append(line)
            # A literal may end any line of a response; its data follows, then
            # the rest of the line (RFC 3501 section 4.3).
            while match := _LITERAL.search(line):
                size = int(match.group(1))
                await self._skip(size)
                literal_octets += size
                line = await self._line()
                untagged.append(line)

    async def ok(self, text: bytes) -> int:
        status, octets, _ = await self.command(text)
        if not status.startswith(b"OK"):
            raise BenchError(f"{text.split(b' ')[0].decode()} failed: {status[:120]!r}")
        return octets

    async def login(self, credentials: Credentials) -> bool:
        """AUTHENTICATE PLAIN with SASL-IR; False when the server says NO."""
        status, _, _ = await self.command(
            b"AUTHENTICATE PLAIN " + credentials.plain_initial_response()
        )
        if status.startswith(b"OK"):
            return True
        if status.startswith(b"NO"):
            return False
        raise BenchError(f"AUTHENTICATE answered {status[:120]!r}")

    async def logout(self) -> None:
        with contextlib.suppress(BenchError, ConnectionError):
            await self.command(b"LOGOUT")
        await self.close()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await self.writer.wait_closed()

    def abort(self) -> None:
        self.writer.transport.abort()


class Pop3Connection(Connection):
    """One POP3 connection, just enough for the login loop: greeting, ``AUTH
    PLAIN`` with an initial response (RFC 5034), ``QUIT``."""

    GREETING = b"+OK"

    async def pop3(self, line: bytes) -> bytes:
        """Send one command line; return the one-line reply (+OK / -ERR)."""
        self.writer.write(line + b"\r\n")
        return (await self._line()).rstrip(b"\r\n")

    async def login(self, credentials: Credentials) -> bool:
        reply = await self.pop3(b"AUTH PLAIN " + credentials.plain_initial_response())
        if reply.startswith(b"+OK"):
            return True
        if reply.startswith(b"-ERR"):
            return False
        raise BenchError(f"AUTH PLAIN answered {reply[:120]!r}")

    async def ok(self, text: bytes) -> int:
        """`text` must be answered +OK (a one-line reply: NOOP, STAT)."""
        reply = await self.pop3(text)
        if not reply.startswith(b"+OK"):
            raise BenchError(f"{text.split(b' ')[0].decode()} failed: {reply[:120]!r}")
        return 0

    async def logout(self) -> None:
        with contextlib.suppress(BenchError, ConnectionError):
            await self.pop3(b"QUIT")
        await self.close()


def connection_class(target: Target) -> type[Connection]:
    """The client for `target.protocol`: IMAP or POP3."""
    if target.protocol == "pop3":
        return Pop3Connection
    if target.protocol == "imap":
        return Connection
    raise ValueError(f"no client for protocol {target.protocol!r}")


@contextlib.asynccontextmanager
async def logged_in(target: Target, credentials: Credentials) -> AsyncIterator[Connection]:
    connection = await connection_class(target).open(target)
    try:
        if not await connection.login(credentials):
            raise BenchError(f"{target}: login as {credentials.user!r} refused")
        yield connection
    except BaseException:
        connection.abort()  # it may be mid-response: a LOGOUT could wait forever
        raise
    await connection.logout()


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an ascending sequence."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


# --- (a) logins per second -----------------------------------------------------------


@dataclass(frozen=True)
class LoginResult:
    clients: int
    logins: int  # completed: connect, greeting, AUTHENTICATE OK, LOGOUT
    refused: int  # AUTHENTICATE answered NO
    errors: int  # anything else (connection reset, BAD, closed early)
    per_second: float
    p50_ms: float  # one whole login cycle
    p99_ms: float
    usage: Usage
    first_error: str | None = None


async def measure_logins(
    target: Target,
    credentials: Credentials,
    *,
    clients: int = 8,
    duration: float | None = None,
    count: int | None = None,
    pids: Sequence[int] = (),
) -> LoginResult:
    """`clients` concurrent loops of connect/login/logout until `duration`
    seconds have passed or `count` logins were started (one of the two)."""
    if (duration is None) == (count is None):
        raise ValueError("give exactly one of duration and count")
    context = target.ssl_context()  # one context: the generator does not re-read the CA
    kind = connection_class(target)
    started = 0
    done: list[float] = []
    refused = errors = 0
    first_error: str | None = None
    meter = _Meter(pids)
    deadline = meter.wall + duration if duration is not None else math.inf

    async def client() -> None:
        nonlocal started, refused, errors, first_error
        while time.perf_counter() < deadline and (count is None or started < count):
            started += 1
            begin = time.perf_counter()
            connection: Connection | None = None
            try:
                connection = await kind.open(target, context)
                if await connection.login(credentials):
                    await connection.logout()
                    done.append(time.perf_counter() - begin)
                else:
                    refused += 1
                    await connection.close()
                connection = None
            except (OSError, ssl.SSLError, BenchError, asyncio.IncompleteReadError) as exc:
                errors += 1
                first_error = first_error or f"{exc.__class__.__name__}: {exc}"
            finally:
                if connection is not None:
                    connection.abort()

    await asyncio.gather(*(client() for _ in range(clients)))
    usage = meter.stop()
    latencies = sorted(done)
    return LoginResult(
        clients=clients,
        logins=len(done),
        refused=refused,
        errors=errors,
        per_second=len(done) / usage.wall_s if usage.wall_s else 0.0,
        p50_ms=percentile(latencies, 50) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
        usage=usage,
        first_error=first_error,
    )


# --- (b) FETCH throughput ------------------------------------------------------------


@dataclass(frozen=True)
class FetchResult:
    message: int  # sequence number fetched
    message_size: int  # its RFC822.SIZE
    fetches: int
    bytes_fetched: int  # literal octets received over all fetches
    mib_per_s: float  # bytes_fetched over the time spent in the timed fetches
    usage: Usage


async def message_sizes(target: Target, credentials: Credentials) -> list[int]:
    """RFC822.SIZE of every message in INBOX, in sequence order."""
    async with logged_in(target, credentials) as connection:
        _, _, untagged = await connection.command(b"EXAMINE INBOX")
        exists = [int(m.group(1)) for u in untagged if (m := re.match(rb"\* (\d+) EXISTS", u))]
        if not exists or exists[-1] == 0:
            return []
        _, _, lines = await connection.command(b"FETCH 1:* RFC822.SIZE")
        return [int(m.group(1)) for line in lines if (m := _SIZE.search(line))]


async def measure_fetch(
    target: Target,
    credentials: Credentials,
    *,
    message: int = 1,
    repeat: int = 5,
    duration: float = 0.0,
    warmup: int = 1,
    pids: Sequence[int] = (),
) -> FetchResult:
    """``FETCH message BODY.PEEK[]`` over one connection, `repeat` times and
    for at least `duration` seconds, after `warmup` untimed fetches (they
    bring the file into the page cache).

    Give a duration of half a second or more when you want CPU times: /proc
    counts them in clock ticks (10 ms)."""
    async with logged_in(target, credentials) as connection:
        await connection.ok(b"EXAMINE INBOX")  # read-only: nothing moves on disk
        _, _, lines = await connection.command(b"FETCH %d RFC822.SIZE" % message)
        sizes = [int(m.group(1)) for line in lines if (m := _SIZE.search(line))]
        if len(sizes) != 1:
            raise BenchError(f"{target}: no message {message}")
        size = sizes[0]
        command = b"FETCH %d BODY.PEEK[]" % message
        for _ in range(warmup):
            await connection.ok(command)
        total = fetches = 0
        meter = _Meter(pids)
        deadline = meter.wall + duration
        while fetches < repeat or time.perf_counter() < deadline:
            octets = await connection.ok(command)
            if octets != size:
                raise BenchError(f"{target}: fetched {octets} octets of a {size}-octet message")
            total += octets
            fetches += 1
        usage = meter.stop()
    return FetchResult(
        message=message,
        message_size=size,
        fetches=fetches,
        bytes_fetched=total,
        mib_per_s=total / usage.wall_s / 2**20 if usage.wall_s else 0.0,
        usage=usage,
    )


# --- (c) memory per held connection --------------------------------------------------


@dataclass(frozen=True)
class MemoryResult:
    connections: int  # opened between the two readings, all held at the second
    rss_before_kib: int
    rss_after_kib: int
    per_connection_kib: float
    usage: Usage


async def hold_connections(
    target: Target,
    credentials: Credentials,
    count: int,
    *,
    concurrency: int = 8,
    context: ssl.SSLContext | None = None,
) -> list[Connection]:
    """Open `count` authenticated connections, `concurrency` at a time; all or none."""
    context = context or target.ssl_context()
    gate = asyncio.Semaphore(concurrency)
    kind = connection_class(target)

    async def open_one() -> Connection:
        async with gate:
            connection = await kind.open(target, context)
            try:
                if not await connection.login(credentials):
                    raise BenchError(f"{target}: login as {credentials.user!r} refused")
            except BaseException:
                connection.abort()
                raise
            return connection

    results = await asyncio.gather(*(open_one() for _ in range(count)), return_exceptions=True)
    held = [r for r in results if isinstance(r, Connection)]
    failures = [r for r in results if not isinstance(r, Connection)]
    if failures:
        for connection in held:
            connection.abort()
        raise BenchError(f"{len(failures)} of {count} connections failed: {failures[0]!r}")
    return held


async def release(connections: Iterable[Connection]) -> None:
    await asyncio.gather(*(c.logout() for c in connections), return_exceptions=True)


async def measure_memory(
    target: Target,
    credentials: Credentials,
    *,
    pids: Sequence[int],
    connections: int = 100,
    concurrency: int = 8,
    settle: float = 0.5,
    warmup: int | None = None,
    keep: list[Connection] | None = None,
) -> MemoryResult:
    """Hold `connections` authenticated connections; report the RSS growth of
    the target's process tree per connection.

    Memory a process once used is seldom given back, and the next allocations
    reuse it: a connection opened after others were closed looks almost free.
    So nothing is closed before the second reading. `warmup` connections
    (default: one per concurrent opener) are opened first and held, so that
    one-off costs (worker threads, lazily built state) land before the first
    reading. With `keep`, every connection opened is appended to it and left
    open for the caller (who must `release` them): repeated calls then stack
    measurements without any freed memory between them. Measure on a target
    that has not held many connections before, for the same reason.
    """
    if not pids:
        raise ValueError("measure_memory needs the target's pids")
    context = target.ssl_context()
    held: list[Connection] = [] if keep is None else keep
    meter = _Meter(pids)
    try:
        held += await hold_connections(
            target,
            credentials,
            concurrency if warmup is None else warmup,
            concurrency=concurrency,
            context=context,
        )
        await asyncio.sleep(settle)
        before = rss_kib(pids)
        opened = await hold_connections(
            target, credentials, connections, concurrency=concurrency, context=context
        )
        held += opened
        await asyncio.sleep(settle)
        # Prove they are all still logged in before counting them.
        await asyncio.gather(*(c.ok(b"NOOP") for c in opened))
        after = rss_kib(pids)
    finally:
        if keep is None:
            await release(held)
    return MemoryResult(
        connections=len(opened),
        rss_before_kib=before,
        rss_after_kib=after,
        per_connection_kib=(after - before) / len(opened),
        usage=meter.stop(),
    )


# --- (d) NOOP latency ----------------------------------------------------------------


@dataclass(frozen=True)
class NoopResult:
    count: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    usage: Usage


async def measure_noop(
    target: Target,
    credentials: Credentials,
    *,
    count: int = 1000,
    warmup: int = 20,
    pids: Sequence[int] = (),
) -> NoopResult:
    """`count` NOOPs one after the other on one logged-in connection.

    No mailbox is selected, so the server does no mailbox check: the figure is
    the round trip through the protocol stack, not a directory scan."""
    samples: list[float] = []
    async with logged_in(target, credentials) as connection:
        for _ in range(warmup):
            await connection.ok(b"NOOP")
        meter = _Meter(pids)
        for _ in range(count):
            begin = time.perf_counter_ns()
            await connection.ok(b"NOOP")
            samples.append((time.perf_counter_ns() - begin) / 1e6)
        usage = meter.stop()
    samples.sort()
    return NoopResult(
        count=count,
        p50_ms=percentile(samples, 50),
        p99_ms=percentile(samples, 99),
        mean_ms=sum(samples) / len(samples) if samples else math.nan,
        usage=usage,
    )


# --- SMTP through the splice: NOOP and DATA ------------------------------------------


class SmtpConnection:
    """One SMTP submission connection, just enough for the splice figures."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, target: Target) -> SmtpConnection:
        context = target.ssl_context()
        reader, writer = await asyncio.open_connection(
            target.host,
            target.port,
            ssl=context,
            server_hostname=(target.server_hostname or target.host) if context else None,
            limit=_STREAM_LIMIT,
        )
        connection = cls(reader, writer)
        try:
            await connection.expect(220)
            await connection.command(b"EHLO bench.client", 250)
        except BaseException:
            connection.writer.transport.abort()
            raise
        return connection

    async def reply(self) -> int:
        """The code of one complete (possibly multi-line) reply."""
        while True:
            line = await self.reader.readline()
            if not line.endswith(b"\n"):
                raise BenchError("connection closed by the server")
            if line[3:4] != b"-":
                return int(line[:3])

    async def expect(self, code: int) -> None:
        got = await self.reply()
        if got != code:
            raise BenchError(f"expected an SMTP {code} reply, got {got}")

    async def command(self, line: bytes, code: int) -> None:
        self.writer.write(line + b"\r\n")
        await self.expect(code)

    async def close(self) -> None:
        with contextlib.suppress(BenchError, ConnectionError):
            await self.command(b"QUIT", 221)
        self.writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def smtp_logged_in(target: Target, credentials: Credentials) -> AsyncIterator[SmtpConnection]:
    connection = await SmtpConnection.open(target)
    try:
        await connection.command(b"AUTH PLAIN " + credentials.plain_initial_response(), 235)
        yield connection
    except BaseException:
        connection.writer.transport.abort()
        raise
    await connection.close()


def smtp_message(size: int) -> bytes:
    """A message of `size` octets in 78-octet CRLF lines (no dot-stuffing needed)."""
    header = b"Subject: bench\r\n\r\n"
    line = b"x" * 76 + b"\r\n"
    count, rest = divmod(max(size - len(header), 0), len(line))
    tail = b"y" * max(rest - 2, 0) + b"\r\n" if rest else b""
    return header + line * count + tail


@dataclass(frozen=True)
class SmtpDataResult:
    messages: int
    message_size: int
    bytes_sent: int
    mib_per_s: float  # message octets over the time of the timed transactions
    usage: Usage


async def measure_smtp_data(
    target: Target,
    credentials: Credentials,
    *,
    size: int,
    recipient: str,
    repeat: int = 3,
    duration: float = 0.0,
    warmup: int = 1,
    pids: Sequence[int] = (),
) -> SmtpDataResult:
    """MAIL, RCPT, DATA and a `size`-octet message, over one logged-in
    connection, `repeat` times and for at least `duration` seconds."""
    message = smtp_message(size)
    rcpt = f"RCPT TO:<{recipient}>".encode()

    async def send(connection: SmtpConnection) -> None:
        connection.writer.write(b"MAIL FROM:<bench@localhost>\r\n" + rcpt + b"\r\nDATA\r\n")
        for code in (250, 250, 354):
            await connection.expect(code)
        connection.writer.write(message + b".\r\n")
        await connection.writer.drain()
        await connection.expect(250)

    async with smtp_logged_in(target, credentials) as connection:
        for _ in range(warmup):
            await send(connection)
        sent = 0
        meter = _Meter(pids)
        deadline = meter.wall + duration
        while sent < repeat or time.perf_counter() < deadline:
            await send(connection)
            sent += 1
        usage = meter.stop()
    total = sent * len(message)
    return SmtpDataResult(
        messages=sent,
        message_size=len(message),
        bytes_sent=total,
        mib_per_s=total / usage.wall_s / 2**20 if usage.wall_s else 0.0,
        usage=usage,
    )


async def measure_smtp_noop(
    target: Target,
    credentials: Credentials,
    *,
    count: int = 1000,
    warmup: int = 20,
    pids: Sequence[int] = (),
) -> NoopResult:
    """`count` NOOPs one after the other on one authenticated SMTP connection."""
    samples: list[float] = []
    async with smtp_logged_in(target, credentials) as connection:
        for _ in range(warmup):
            await connection.command(b"NOOP", 250)
        meter = _Meter(pids)
        for _ in range(count):
            begin = time.perf_counter_ns()
            await connection.command(b"NOOP", 250)
            samples.append((time.perf_counter_ns() - begin) / 1e6)
        usage = meter.stop()
    samples.sort()
    return NoopResult(
        count=count,
        p50_ms=percentile(samples, 50),
        p99_ms=percentile(samples, 99),
        mean_ms=sum(samples) / len(samples) if samples else math.nan,
        usage=usage,
    )


# --- CLI -----------------------------------------------------------------------------


def result_json(result: object) -> dict[str, object]:
    data: dict[str, object] = asdict(result)  # type: ignore[call-overload]
    usage = getattr(result, "usage", None)
    if isinstance(usage, Usage):
        data["usage"] = {
            **asdict(usage),
            "client_load": round(usage.client_load, 3),
            "target_load": None if usage.target_load is None else round(usage.target_load, 3),
            "other_load": None if usage.other_load is None else round(usage.other_load, 3),
        }
    return data


def parse_target(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not host:port")
    return host.strip("[]"), int(port)


async def run(args: argparse.Namespace) -> object:
    host, port = args.target
    target = Target(host, port, tls=args.tls, ca_file=args.ca_file, protocol=args.protocol)
    if args.protocol == "pop3" and args.what == "fetch":
        raise SystemExit("--what fetch is IMAP only")
    credentials = Credentials(args.user, args.password)
    pids: list[int] = args.pid
    if args.what == "logins":
        duration = None if args.count is not None else (args.duration or 5.0)
        return await measure_logins(
            target,
            credentials,
            clients=args.clients,
            duration=duration,
            count=args.count,
            pids=pids,
        )
    if args.what == "fetch":
        return await measure_fetch(
            target,
            credentials,
            message=args.message,
            repeat=args.repeat,
            duration=args.duration or 0.0,
            pids=pids,
        )
    if args.what == "memory":
        if not pids:
            raise SystemExit("--what memory needs --pid (the target's process id)")
        return await measure_memory(
            target,
            credentials,
            pids=pids,
            connections=args.connections,
            concurrency=args.clients,
        )
    return await measure_noop(target, credentials, count=args.count or 1000, pids=pids)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.loadgen", description="IMAP load generator; prints JSON."
    )
    parser.add_argument("--target", type=parse_target, required=True, help="host:port")
    parser.add_argument("--what", choices=("logins", "fetch", "memory", "noop"), required=True)
    parser.add_argument("--tls", action="store_true", help="implicit TLS (IMAPS, POP3S)")
    parser.add_argument(
        "--protocol",
        choices=("imap", "pop3"),
        default="imap",
        help="pop3: AUTH PLAIN with an initial response (RFC 5034), QUIT; not for fetch",
    )
    parser.add_argument("--ca-file", help="CA certificate to verify the target with")
    parser.add_argument("--user", default=os.environ.get("BENCH_USER", "bench"))
    parser.add_argument(
        "--password",
        default=os.environ.get("BENCH_PASSWORD"),
        help="default: $BENCH_PASSWORD (keeps it out of the process list)",
    )
    parser.add_argument(
        "--pid",
        type=int,
        action="append",
        default=[],
        help="target process id for RSS and CPU time (repeatable)",
    )
    parser.add_argument(
        "--clients", type=int, default=8, help="concurrent clients (logins, memory)"
    )
    parser.add_argument(
        "--duration", type=float, help="seconds (logins: default 5; fetch: at least this long)"
    )
    parser.add_argument("--count", type=int, help="logins to do instead of a duration; NOOPs")
    parser.add_argument("--message", type=int, default=1, help="sequence number to FETCH")
    parser.add_argument("--repeat", type=int, default=5, help="timed FETCHes (at least)")
    parser.add_argument("--connections", type=int, default=100, help="held connections (memory)")
    args = parser.parse_args(argv)
    if args.password is None:
        parser.error("give --password or set BENCH_PASSWORD")
    try:
        result = asyncio.run(run(args))
    except (BenchError, OSError, ssl.SSLError) as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result_json(result), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
