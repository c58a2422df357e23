"""`authgate run` as a real process: SIGTERM drains, SIGHUP reloads."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from authgate.certs import ensure_dev_certificates
from authgate.credentials.store import UserStore, generate_secrets
from authgate.testing.backends import Backends, seed_mailbox, start_backends
from authgate.testing.stack import MASTER_USER, ListenerSpec, config_text

pytestmark = pytest.mark.asyncio

PASSWORD = "pw-run-test"
LAYOUT = (ListenerSpec("imap", "imap", "starttls"),)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Running:
    def __init__(self, tmp: Path, backends: Backends, port: int) -> None:
        self.tmp = tmp
        self.backends = backends
        self.port = port
        self.config = tmp / "authgate.toml"
        self.proc: asyncio.subprocess.Process | None = None
        self.stderr = bytearray()

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
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "authgate", "run", "-c", str(self.config),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
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


@pytest_asyncio.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    ensure_dev_certificates(tmp_path / "certs")
    seed_mailbox(tmp_path / "mail", "alice", [b"Subject: hi\r\n\r\nhello\r\n"])
    backends = await start_backends(tmp_path / "mail", {"alice": PASSWORD}, master=(MASTER_USER, "master-pw"))
    store = UserStore(realm="localhost")
    store.set_user_secrets("alice", generate_secrets("alice", PASSWORD, "localhost"))
    store.save(tmp_path / "users.toml")
    run = Running(tmp_path, backends, free_port())
    run.write_config("require-secure-auth", "[limits]\ndrain_timeout = 5\n")
    await run.start()
    try:
        yield run
    finally:
        if run.proc is not None and run.proc.returncode is None:
            run.proc.kill()
            await run.proc.wait()
        await backends.close()


async def imap_open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    return reader, writer, await asyncio.wait_for(reader.readline(), 10)


async def command(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tag: str, text: str) -> list[bytes]:
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
    """An authenticated session via CRAM-MD5 (allowed without TLS)."""
    import base64
    import hashlib
    import hmac

    reader, writer, _ = await imap_open(port)
    writer.write(b"a AUTHENTICATE CRAM-MD5\r\n")
    challenge = base64.b64decode((await reader.readline())[2:].strip())
    digest = hmac.new(PASSWORD.encode(), challenge, hashlib.md5).hexdigest()
    writer.write(base64.b64encode(f"alice {digest}".encode()) + b"\r\n")
    reply = await asyncio.wait_for(reader.readline(), 10)
    assert reply.startswith(b"a OK"), reply
    return reader, writer


async def test_sigterm_drains_then_exits_cleanly(running: Running) -> None:
    reader, writer = await logged_in_session(running.port)
    running.signal(signal.SIGTERM)
    await running.wait_for_log(b"stopping")
    # No new connections ...
    with pytest.raises(OSError):
        await imap_open(running.port)
    # ... but the established session still works until it ends.
    assert (await command(reader, writer, "b", "NOOP"))[-1].startswith(b"b OK")
    await command(reader, writer, "c", "LOGOUT")
    writer.close()
    assert running.proc is not None
    assert await asyncio.wait_for(running.proc.wait(), 15) == 0
    await running.wait_for_log(b"stopped")


async def test_sigterm_cuts_sessions_after_the_drain_time(running: Running) -> None:
    reader, writer = await logged_in_session(running.port)
    running.signal(signal.SIGTERM)
    assert running.proc is not None
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert await asyncio.wait_for(running.proc.wait(), 20) == 0
    assert loop.time() - start >= 4  # drain_timeout = 5 in the fixture's config
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_sighup_reloads_policy_keeps_sessions_and_rejects_bad_config(running: Running) -> None:
    reader, writer = await logged_in_session(running.port)
    _, w1, greeting = await imap_open(running.port)
    w1.close()
    assert b"AUTH=PLAIN" not in greeting and b"LOGINDISABLED" in greeting

    running.write_config("none")
    running.signal(signal.SIGHUP)
    await running.wait_for_log(b"reloaded")
    _, w2, greeting = await imap_open(running.port)
    w2.close()
    assert b"AUTH=PLAIN" in greeting and b"LOGINDISABLED" not in greeting
    assert (await command(reader, writer, "b", "NOOP"))[-1].startswith(b"b OK")  # old session lives

    running.config.write_text(running.config.read_text().replace('security = "none"', 'security = "nope"'))
    running.signal(signal.SIGHUP)
    await running.wait_for_log(b"reload failed")
    assert b"policy.security: 'nope'" in running.stderr
    _, w3, greeting = await imap_open(running.port)
    w3.close()
    assert b"AUTH=PLAIN" in greeting  # still the last good configuration
    assert (await command(reader, writer, "c", "NOOP"))[-1].startswith(b"c OK")
    writer.close()
