"""A scaled-out authgate on loopback: a real HAProxy in front of two
`authgate run` processes that share their brute-force state in a real
redis-server, with the embedded IMAP backend in the test process.

    client 127.0.0.x --> haproxy 127.0.0.1:P (TCP mode, roundrobin, send-proxy-v2)
                           |--> authgate "a" (proxy_protocol, trusted 127.0.0.1/32) --+
                           '--> authgate "b" (same configuration)                   --+--> IMAP backend
                                        '------ [defence] redis_url ------> redis-server

Clients connect from distinct loopback sources (Linux routes all of
127.0.0.0/8 to lo), so the PROXY header is the only way an instance can
learn who the client is: every instance's own peer is haproxy at 127.0.0.1.

HAProxy and redis-server are required: a missing binary fails the tests
with an install hint rather than skipping them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import re
import resource
import secrets
import shutil
import signal
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from authgate.certs import ensure_dev_certificates
from authgate.credentials.store import UserStore, generate_secrets
from authgate.testing.backends import Backends, seed_mailbox, start_backends
from authgate.testing.stack import MASTER_USER
from tests.netutil import free_ports
from tests.redis_server import RedisInstance, start_redis

HOST = "127.0.0.1"  # haproxy, the instances and the backend: also the balancer's address
EXEMPT_CLIENT = "127.0.0.7"  # in exempt_networks: cleartext allowed
USER = "alice"
PASSWORD = "Scale-out-pw-1"
HAPROXY_PATHS = ("/usr/sbin/haproxy", "/usr/bin/haproxy", "/usr/local/sbin/haproxy")
HAPROXY_HINT = "run ./dev test as root to install haproxy (Debian package haproxy)"
STARTUP_TIMEOUT = 20.0
IO_TIMEOUT = 10.0
BLOCKED_GREETING = b"* BYE [UNAVAILABLE] Too many failed logins from your address"
# (name, protocol, tls): every one behind the PROXY header. IMAP without TLS
# (the policy shows), IMAP over implicit TLS (the header comes before the
# handshake) and SMTP submission (examples/haproxy.cfg's SMTP health check).
LISTENERS = (
    ("imap", "imap", "none"),
    ("imaps", "imap", "implicit"),
    ("submission", "smtp", "starttls"),
)


class HaproxyError(RuntimeError):
    """haproxy could not be found or started (the message says why)."""


def find_haproxy() -> str:
    for path in HAPROXY_PATHS:
        if os.access(path, os.X_OK):
            return path
    found = shutil.which("haproxy")
    if found:
        return found
    raise HaproxyError(f"haproxy not found ({', '.join(HAPROXY_PATHS)}): {HAPROXY_HINT}")


# ------------------------------------------------------------------ authgate


def instance_config(
    *,
    certs: Path,
    users_file: Path,
    backend_ports: dict[str, int],
    master_file: Path,
    redis_url: str,
    secret_file: Path,
) -> str:
    """One instance's TOML: what examples/scaleout.toml says, on loopback,
    with defence numbers small enough for a test (no delays, block after 4)."""
    listeners = ""
    for name, protocol, tls in LISTENERS:
        listeners += f"""
[[listeners]]
name = "{name}"
protocol = "{protocol}"
listen = "{HOST}:0"
tls = "{tls}"
proxy_protocol = true
trusted_proxies = ["{HOST}/32"]
[listeners.backend]
address = "{HOST}:{backend_ports[protocol]}"
master_user = "{MASTER_USER}"
master_password_file = "{master_file}"
"""
    return f"""hostname = "localhost"
[policy]
security = "require-secure-auth"
mechanisms = ["CRAM-MD5", "LOGIN", "PLAIN"]
exempt_networks = ["{EXEMPT_CLIENT}/32"]
[tls]
cert = "{certs / "server.pem"}"
key = "{certs / "server.key"}"
[users]
file = "{users_file}"
[limits]
drain_timeout = 1
[defence]
failure_delay = 0
penalties = []
block_after = 4
block_window = 60
block_for = 300
redis_url = "{redis_url}"
secret_file = "{secret_file}"
{listeners}"""


_LISTENING = re.compile(rb"listening: (\w+) \(\w+, tls \w+\) on 127\.0\.0\.1:(\d+)")


@dataclass
class Instance:
    """One `authgate run` process; its log (stderr) is kept for assertions."""

    name: str
    config: Path
    listeners: tuple[str, ...] = tuple(name for name, _, _ in LISTENERS)
    nofile: int | None = None  # a hard RLIMIT_NOFILE for the process (authgate raises soft to hard)
    proc: asyncio.subprocess.Process | None = None
    stderr: bytearray = field(default_factory=bytearray)
    ports: dict[str, int] = field(default_factory=dict)
    _pump: asyncio.Task[None] | None = None

    async def start(self) -> None:
        limit = self.nofile

        def limit_files() -> None:
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "authgate", "run", "-c", str(self.config),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=limit_files if limit is not None else None,
        )  # fmt: skip
        self._pump = asyncio.ensure_future(self._read_stderr())
        for listener in self.listeners:
            await self.wait_for_log(f"listening: {listener} ".encode(), STARTUP_TIMEOUT)
        self.ports = {m[1].decode(): int(m[2]) for m in _LISTENING.finditer(self.stderr)}
        assert set(self.ports) == set(self.listeners), self.log

    async def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while chunk := await self.proc.stderr.read(4096):
            self.stderr += chunk

    @property
    def log(self) -> str:
        return self.stderr.decode(errors="replace")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def wait_for_log(self, needle: bytes, timeout: float = IO_TIMEOUT) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while needle not in self.stderr:
            if loop.time() > end or not self.alive:
                raise AssertionError(f"{self.name}: {needle!r} not logged; log:\n{self.log}")
            await asyncio.sleep(0.05)

    def lines(self, pattern: str) -> list[str]:
        return [line for line in self.log.splitlines() if re.search(pattern, line)]

    async def wait_for_line(self, pattern: str, timeout: float = IO_TIMEOUT) -> str:
        """The first log line matching `pattern` (the log arrives through a pipe)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while not (found := self.lines(pattern)):
            if loop.time() > end:
                raise AssertionError(f"{self.name}: no line matches {pattern!r}; log:\n{self.log}")
            await asyncio.sleep(0.05)
        return found[0]

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    async def kill(self) -> None:
        """SIGKILL: a crash, no draining."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def stop(self) -> None:
        if self.alive:
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                await self.kill()
        if self._pump is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pump, 5)


# ------------------------------------------------------------------ haproxy


def haproxy_config(
    *, frontends: dict[str, int], instances: list[Instance], ca_file: Path, stats: Path
) -> str:
    """examples/haproxy.cfg's shape on loopback: TCP mode, roundrobin (so
    sequential connections alternate, which the tests rely on), PROXY v2 to
    every server, health checks every 500 ms that take a server out after
    one failure, and retries + redispatch for connections to a dead one."""
    imap_check = """    option tcp-check
    tcp-check expect string "* OK"
    tcp-check send "h LOGOUT\\r\\n"
    tcp-check expect string "h OK"
"""
    smtp_check = """    option tcp-check
    tcp-check expect string "220 "
    tcp-check send "QUIT\\r\\n"
    tcp-check expect string "221 "
"""
    text = f"""global
    maxconn 512
    stats socket {stats} mode 600 level admin

defaults
    mode tcp
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    timeout check 1s
    retries 3
    option redispatch 1
    default-server send-proxy-v2 check inter 500ms fall 1 rise 1
"""
    for name, protocol, tls in LISTENERS:
        text += f"""
frontend {name}
    bind {HOST}:{frontends[name]}
    default_backend authgate_{name}

backend authgate_{name}
    balance roundrobin
{imap_check if protocol == "imap" else smtp_check}"""
        for inst in instances:
            text += f"    server {inst.name} {HOST}:{inst.ports[name]}"
            if tls == "implicit":
                text += (
                    f" check-ssl verify required ca-file {ca_file}"
                    " check-sni localhost verifyhost localhost"
                )
            text += "\n"
    return text


@dataclass
class Haproxy:
    binary: str
    config: Path
    stats: Path
    log_file: Path
    proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        check = await asyncio.create_subprocess_exec(
            self.binary, "-c", "-f", str(self.config),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await check.communicate()
        if check.returncode != 0:
            raise HaproxyError(
                f"haproxy -c rejected {self.config}:\n{out.decode(errors='replace')}"
            )
        with self.log_file.open("wb") as log:
            # -db: foreground, no daemon; the test owns the process.
            self.proc = await asyncio.create_subprocess_exec(
                self.binary, "-f", str(self.config), "-db",
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        loop = asyncio.get_running_loop()
        end = loop.time() + STARTUP_TIMEOUT
        while True:
            # The stats socket appears once haproxy has bound everything.
            with contextlib.suppress(OSError):
                if "Name: HAProxy" in await self.command("show info"):
                    return
            if self.proc.returncode is not None or loop.time() > end:
                raise HaproxyError(f"haproxy did not start:\n{self.log}")
            await asyncio.sleep(0.05)

    @property
    def log(self) -> str:
        try:
            return self.log_file.read_text("utf-8", "replace")
        except FileNotFoundError:
            return ""

    async def command(self, text: str) -> str:
        """One command on the stats socket (the runtime API)."""
        reader, writer = await asyncio.open_unix_connection(str(self.stats))
        try:
            writer.write(text.encode() + b"\n")
            return (await asyncio.wait_for(reader.read(), IO_TIMEOUT)).decode(errors="replace")
        finally:
            writer.close()

    async def server_states(self, backend: str) -> dict[str, str]:
        """Server name -> "UP" / "DOWN" ... as haproxy's health checks see it."""
        out = await self.command("show stat")
        states = {}
        for line in out.splitlines():
            cols = line.split(",")
            if len(cols) > 17 and cols[0] == backend and cols[1] not in ("FRONTEND", "BACKEND"):
                states[cols[1]] = cols[17]
        return states

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


# ------------------------------------------------------------------ the whole


@dataclass
class Cluster:
    root: Path
    backends: Backends
    redis: RedisInstance
    instances: list[Instance]
    haproxy: Haproxy
    frontends: dict[str, int]
    ca_file: Path

    def __getitem__(self, name: str) -> Instance:
        return next(inst for inst in self.instances if inst.name == name)

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def logs(self) -> str:
        parts = [f"--- authgate {inst.name} ---\n{inst.log}" for inst in self.instances]
        parts.append(f"--- haproxy ---\n{self.haproxy.log}")
        return "\n".join(parts)


@contextlib.asynccontextmanager
async def scaled_out(root: Path, haproxy_binary: str) -> AsyncIterator[Cluster]:
    """Redis, the backend, two authgate instances, then haproxy in front;
    all stopped (in reverse) at the end."""
    certs = root / "certs"
    ca_file = ensure_dev_certificates(certs)
    master_password = secrets.token_urlsafe(18)
    master_file = root / "master.secret"
    master_file.write_text(master_password)
    secret_file = root / "defence.secret"  # the fingerprint key every instance shares
    secret_file.write_text(secrets.token_urlsafe(24))
    store = UserStore(realm="localhost")
    store.set_user_secrets(USER, generate_secrets(USER, PASSWORD, "localhost"))
    users_file = root / "users.toml"
    store.save(users_file)
    seed_mailbox(root / "mail", USER, [b"Subject: scaled out\r\n\r\nhello\r\n"])
    with start_redis() as redis:
        backends = await start_backends(
            root / "mail", {USER: PASSWORD}, master=(MASTER_USER, master_password), host=HOST
        )
        instances: list[Instance] = []
        haproxy: Haproxy | None = None
        try:
            for name in ("a", "b"):
                config = root / f"authgate-{name}.toml"
                config.write_text(
                    instance_config(
                        certs=certs,
                        users_file=users_file,
                        backend_ports={"imap": backends.imap.port, "smtp": backends.smtp.port},
                        master_file=master_file,
                        redis_url=redis.url,
                        secret_file=secret_file,
                    )
                )
                instances.append(Instance(name, config))
            await asyncio.gather(*(instance.start() for instance in instances))
            for instance in instances:
                # Each instance tries Redis once at start-up, bounded by 100 ms:
                # on a loaded machine that can miss, and the instance then counts
                # alone (until its 5 s retry), which the tests would misread.
                if b"unreachable: using local brute-force state" in instance.stderr:
                    await instance.wait_for_log(b"is back: using shared", STARTUP_TIMEOUT)
            frontends = dict(
                zip((n for n, _, _ in LISTENERS), free_ports(len(LISTENERS)), strict=True)
            )
            haproxy_cfg = root / "haproxy.cfg"
            haproxy_cfg.write_text(
                haproxy_config(
                    frontends=frontends,
                    instances=instances,
                    ca_file=ca_file,
                    stats=root / "haproxy.sock",
                )
            )
            haproxy = Haproxy(
                haproxy_binary, haproxy_cfg, root / "haproxy.sock", root / "haproxy.log"
            )
            await haproxy.start()
            yield Cluster(root, backends, redis, instances, haproxy, frontends, ca_file)
        finally:
            if haproxy is not None:
                await haproxy.stop()
            for instance in instances:
                await instance.stop()
            await backends.close()


# ------------------------------------------------------------------ clients


@dataclass
class Imap:
    """A raw IMAP client connection (asyncio streams: the backend and the
    test share the event loop, so nothing here may block)."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    greeting: bytes
    source: tuple[str, int]  # our address as the instances should see it

    async def command(self, tag: str, text: str) -> list[bytes]:
        self.writer.write(f"{tag} {text}\r\n".encode())
        return await self.until_tagged(tag)

    async def until_tagged(self, tag: str) -> list[bytes]:
        lines: list[bytes] = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), IO_TIMEOUT)
            if not line:
                raise ConnectionError(f"closed after {lines!r}")
            lines.append(line)
            if line.startswith(tag.encode() + b" "):
                return lines

    async def cram_md5(self, tag: str, password: str, user: str = USER) -> bytes:
        """AUTHENTICATE CRAM-MD5 (challenge-response: allowed without TLS
        from any address); the tagged reply."""
        self.writer.write(f"{tag} AUTHENTICATE CRAM-MD5\r\n".encode())
        line = await asyncio.wait_for(self.reader.readline(), IO_TIMEOUT)
        assert line.startswith(b"+ "), line
        challenge = base64.b64decode(line[2:].strip())
        digest = hmac.new(password.encode(), challenge, hashlib.md5).hexdigest()
        self.writer.write(base64.b64encode(f"{user} {digest}".encode()) + b"\r\n")
        return (await self.until_tagged(tag))[-1]

    async def closed(self) -> bool:
        """True once the other side has closed (EOF or reset)."""
        try:
            return await asyncio.wait_for(self.reader.read(), IO_TIMEOUT) == b""
        except ConnectionError:
            return True

    def close(self) -> None:
        self.writer.close()


async def imap_connect(
    port: int, source: str, *, ssl_context: ssl.SSLContext | None = None
) -> Imap:
    """Connect to 127.0.0.1:port from `source` (a 127.0.0.x address) and read the greeting."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(
            HOST,
            port,
            local_addr=(source, 0),
            ssl=ssl_context,
            server_hostname="localhost" if ssl_context else None,
        ),
        IO_TIMEOUT,
    )
    # Before the greeting: a refused client's transport is gone right after it.
    host, local_port = writer.get_extra_info("sockname")[:2]
    greeting = await asyncio.wait_for(reader.readline(), IO_TIMEOUT)
    return Imap(reader, writer, greeting, (host, local_port))
