"""A real `authgate run` process for the operations tests: its own config
(text written here, as an operator would), its stderr in a file (the log
fail2ban reads), the embedded backends in this process."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import re
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from authgate.certs import ensure_dev_certificates
from authgate.credentials.store import UserStore, generate_secrets
from authgate.proxy.proxy_protocol import build_v2
from authgate.testing.backends import Backends, seed_mailbox, start_backends
from authgate.testing.stack import MASTER_USER
from tests.logfile import AppendedLog

PASSWORD = "Ops-pw-1"
BALANCER = "127.0.0.1"
_LISTENING = re.compile(rb"listening: (\S+) \(.*?\) on (.*?) -> ")


def listeners_toml(imap_port: int, *, proxy: bool = True) -> str:
    """An IMAP listener on 127.0.0.1 and ::1 (same port), and one behind a
    PROXY-protocol balancer at BALANCER."""
    text = f"""
[[listeners]]
name = "imap"
protocol = "imap"
listen = ["127.0.0.1:0", "[::1]:0"]
tls = "starttls"
[listeners.backend]
address = "127.0.0.1:{imap_port}"
master_user = "{MASTER_USER}"
master_password = "master-pw"
"""
    if proxy:
        text += f"""
[[listeners]]
name = "balanced"
protocol = "imap"
listen = "127.0.0.1:0"
tls = "starttls"
proxy_protocol = true
trusted_proxies = ["{BALANCER}/32"]
[listeners.backend]
address = "127.0.0.1:{imap_port}"
master_user = "{MASTER_USER}"
master_password = "master-pw"
"""
    return text


@dataclass
class Authgate(AppendedLog):
    tmp: Path
    backends: Backends
    config: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    ports: dict[str, int] = field(default_factory=dict)

    def start(self, *, env: dict[str, str] | None = None, wait_for: str = "listening: imap") -> None:
        since = self.log_size()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "authgate", "run", "-c", str(self.config)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                env={**os.environ, **(env or {})},
            )
        self.since_start = since

    async def wait_log(self, needle: str, since: int = 0, timeout: float = 20) -> str:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while needle not in (text := self.log_text(since)):
            assert self.proc is not None
            if loop.time() > end or self.proc.poll() is not None:
                raise AssertionError(f"{needle!r} not logged:\n{text}")
            await asyncio.sleep(0.05)
        return text

    async def ready(self, names: tuple[str, ...]) -> None:
        for name in names:
            await self.wait_log(f"listening: {name} ", self.since_start)
        for match in _LISTENING.finditer(self.log_text(self.since_start).encode()):
            self.ports[match[1].decode()] = int(match[2].split(b",")[0].rsplit(b":", 1)[1])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.asynccontextmanager
async def authgate_run(
    tmp: Path,
    make_config: Callable[[Path, Backends], str],
    *,
    names: tuple[str, ...] = ("imap", "balanced"),
    env: dict[str, str] | None = None,
) -> AsyncIterator[Authgate]:
    """`make_config(tmp, backends)` gives the TOML; the process is stopped on exit."""
    ensure_dev_certificates(tmp / "certs")
    seed_mailbox(tmp / "mail", "alice", [b"Subject: hi\r\n\r\nhello\r\n"])
    backends = await start_backends(tmp / "mail", {"alice": PASSWORD}, master=(MASTER_USER, "master-pw"))
    store = UserStore(realm="localhost")
    store.set_user_secrets("alice", generate_secrets("alice", PASSWORD, "localhost"))
    store.save(tmp / "users.toml")
    config = tmp / "authgate.toml"
    config.write_text(make_config(tmp, backends))
    gate = Authgate(tmp, backends, config, tmp / "authgate.log")
    try:
        gate.start(env=env)
        await gate.ready(names)
        yield gate
    finally:
        gate.stop()
        await backends.close()


def base_toml(tmp: Path, extra: str = "") -> str:
    return f"""hostname = "localhost"
{extra}
[policy]
security = "require-secure-auth"
mechanisms = ["CRAM-MD5", "LOGIN", "PLAIN"]
[tls]
cert = "{tmp / 'certs/server.pem'}"
key = "{tmp / 'certs/server.key'}"
[users]
file = "{tmp / 'users.toml'}"
[limits]
drain_timeout = 2
idle_timeout = 10
max_errors = 5
"""


# ------------------------------------------------------------------ a client


class Imap:
    """A bare IMAP client over a real socket, from a chosen local address,
    optionally through a PROXY v2 header naming another client."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.greeting = b""

    @classmethod
    async def open(
        cls,
        port: int,
        *,
        host: str = "127.0.0.1",
        local: str | None = None,
        real: tuple[str, int] | None = None,
    ) -> Imap:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, local_addr=(local, 0) if local else None), 10
        )
        client = cls(reader, writer)
        if real is not None:
            sockname = writer.get_extra_info("sockname")
            writer.write(build_v2(real, (sockname[0], port)))
        client.greeting = await asyncio.wait_for(reader.readline(), 10)
        return client

    async def command(self, tag: str, text: str) -> list[bytes]:
        self.writer.write(f"{tag} {text}\r\n".encode())
        lines = []
        for _ in range(100):
            line = await asyncio.wait_for(self.reader.readline(), 20)
            if not line:
                break
            lines.append(line)
            if line.startswith(tag.encode() + b" "):
                break
        return lines

    async def cram_md5(self, user: str, password: str) -> bytes:
        """The tagged reply (b"" when the server closed)."""
        self.writer.write(b"c AUTHENTICATE CRAM-MD5\r\n")
        line = await asyncio.wait_for(self.reader.readline(), 20)
        if not line.startswith(b"+ "):
            return line
        challenge = base64.b64decode(line[2:].strip())
        digest = hmac.new(password.encode(), challenge, hashlib.md5).hexdigest()
        self.writer.write(base64.b64encode(f"{user} {digest}".encode()) + b"\r\n")
        return await asyncio.wait_for(self.reader.readline(), 20)

    async def starttls(self) -> None:
        """STARTTLS (the dev certificate is not checked: the test is about
        what authgate records, not about trust)."""
        reply = await self.command("t", "STARTTLS")
        assert reply[-1].startswith(b"t OK"), reply
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        await asyncio.wait_for(self.writer.start_tls(context), 10)

    def close(self) -> None:
        self.writer.close()
