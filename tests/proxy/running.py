"""A real `authgate run` process in front of the embedded backends."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import resource
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio

from authgate.certs import ensure_dev_certificates
from authgate.credentials.store import UserStore, generate_secrets
from authgate.testing.backends import Backends, seed_mailbox, start_backends
from authgate.testing.stack import MASTER_USER, ListenerSpec, config_text
from tests.netutil import free_port

PASSWORD = "pw-run-test"
class Running:
    def __init__(self, tmp: Path, backends: Backends, port: int) -> None:
        self.tmp = tmp
        self.backends = backends
        self.port = port
        self.config = tmp / "authgate.toml"
        self.proc: asyncio.subprocess.Process | None = None
        self.stderr = bytearray()
        self.open_files: int | None = None  # RLIMIT_NOFILE (soft and hard) of the process

    def write_config(self, security: str, extra: str = "") -> None:
        text = config_text(
            host="127.0.0.1",
            layout=(ListenerSpec("imap", "imap", "starttls", self.port),),
            certs=self.tmp / "certs",
            users_file=self.tmp / "users.toml",
            backend_ports={"imap": self.backends.imap.port},
            master_password="master-pw",
            security=security,
            mechanisms=["CRAM-MD5", "LOGIN", "PLAIN"],
            exempt=[],
            extra=extra,
        )
        self.config.write_text(text)

    async def start(self) -> None:
        limit = self.open_files

        def limit_descriptors() -> None:
            if limit is not None:  # hard too: `authgate run` raises soft to hard
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "authgate", "run", "-c", str(self.config),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            preexec_fn=limit_descriptors,
        )
        self._pump = asyncio.ensure_future(self._read_stderr())
        await self.wait_for_log(b"listening: imap")

    async def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while chunk := await self.proc.stderr.read(4096):
            self.stderr += chunk

    async def wait_for_log(self, needle: bytes, timeout: float = 20) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while needle not in self.stderr:
            if loop.time() > end or (self.proc is not None and self.proc.returncode is not None):
                raise AssertionError(f"{needle!r} not logged; stderr:\n{self.stderr.decode(errors='replace')}")
            await asyncio.sleep(0.05)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)


@contextlib.asynccontextmanager
async def authgate_process(
    tmp: Path,
    *,
    security: str = "require-secure-auth",
    limits: str = "drain_timeout = 5",
    event_loop: str | None = None,
    open_files: int | None = None,
) -> AsyncIterator[Running]:
    """`authgate run` in a subprocess in front of in-process embedded backends."""
    ensure_dev_certificates(tmp / "certs")
    seed_mailbox(tmp / "mail", "alice", [b"Subject: hi\r\n\r\nhello\r\n"])
    backends = await start_backends(tmp / "mail", {"alice": PASSWORD}, master=(MASTER_USER, "master-pw"))
    store = UserStore(realm="localhost")
    store.set_user_secrets("alice", generate_secrets("alice", PASSWORD, "localhost"))
    store.save(tmp / "users.toml")
    run = Running(tmp, backends, free_port())
    run.open_files = open_files
    run.write_config(security, f"[limits]\n{limits}\n")
    if event_loop is not None:  # None: the default, uvloop where installed
        run.config.write_text(f'event_loop = "{event_loop}"\n' + run.config.read_text())
    try:
        await run.start()
        yield run
    finally:
        if run.proc is not None and run.proc.returncode is None:
            run.proc.kill()
            await run.proc.wait()
        await backends.close()


@pytest_asyncio.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    async with authgate_process(tmp_path) as run:
        yield run


async def imap_open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    return reader, writer, await asyncio.wait_for(reader.readline(), 10)


async def command(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tag: str, text: str
) -> list[bytes]:
    writer.write(f"{tag} {text}\r\n".encode())
    lines = []
    while True:
        line = await asyncio.wait_for(reader.readline(), 10)
        if not line:
            raise ConnectionError("closed")
        lines.append(line)
        if line.startswith(tag.encode() + b" "):
            return lines


async def logged_in_session(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An authenticated IMAP session via CRAM-MD5 (allowed without TLS)."""
    reader, writer, _ = await imap_open(port)
    writer.write(b"a AUTHENTICATE CRAM-MD5\r\n")
    challenge = base64.b64decode((await reader.readline())[2:].strip())
    digest = hmac.new(PASSWORD.encode(), challenge, hashlib.md5).hexdigest()
    writer.write(base64.b64encode(f"alice {digest}".encode()) + b"\r\n")
    reply = await asyncio.wait_for(reader.readline(), 10)
    assert reply.startswith(b"a OK"), reply
    return reader, writer
