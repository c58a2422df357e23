"""A real redis-server (Debian 12: 7.0) on loopback for the shared-defence tests.

`start_redis()` runs `redis-server` in the foreground on an ephemeral
127.0.0.1 port with no persistence (`--save "" --appendonly no`), in a
throw-away directory, and stops it at the end. The instance can be killed
(SIGKILL: a crash), frozen (SIGSTOP: a hung server whose kernel still accepts
connections, so clients see timeouts, not refusals), thawed, and started
again on the same port, which is what the outage tests need.

The binary is required: a missing one fails the tests with an install
hint rather than skipping them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.netutil import free_port

HOST = "127.0.0.1"
REDIS_PATHS = ("/usr/bin/redis-server", "/usr/local/bin/redis-server", "/usr/sbin/redis-server")
INSTALL_HINT = "run ./dev test as root to install redis-server (Debian package redis-server)"
STARTUP_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


class RedisServerError(RuntimeError):
    """redis-server could not be found or started (the message says why)."""


def find_redis_server() -> str:
    for path in REDIS_PATHS:
        if os.access(path, os.X_OK):
            return path
    found = shutil.which("redis-server")
    if found:
        return found
    raise RedisServerError(f"redis-server not found ({', '.join(REDIS_PATHS)}): {INSTALL_HINT}")


def _ping(port: int, timeout: float = 0.5) -> bool:
    """A raw RESP PING, independent of the client library under test."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class RedisInstance:
    binary: str
    root: Path
    port: int
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.root / "redis.log"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text("utf-8", "replace")
        except FileNotFoundError:
            return ""

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        if self.running:
            raise RedisServerError("redis-server is already running")
        command = [
            self.binary,
            "--port", str(self.port),
            "--bind", HOST,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.root),
            "--daemonize", "no",
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not _ping(self.port):
            if self.process.poll() is not None:
                raise RedisServerError(
                    f"redis-server exited with {self.process.returncode}:\n{self.log_text()[-3000:]}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RedisServerError(
                    f"redis-server did not answer within {STARTUP_TIMEOUT}s:\n"
                    f"{self.log_text()[-3000:]}"
                )
            time.sleep(0.02)

    def _signal(self, signum: int) -> None:
        if self.process is None or self.process.poll() is not None:
            raise RedisServerError("redis-server is not running")
        self.process.send_signal(signum)

    def kill(self) -> None:
        """Crash it (SIGKILL): connections reset, the port refuses."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGCONT)  # a frozen process must die too
            self.process.kill()
        self.process.wait(timeout=STOP_TIMEOUT)
        self.process = None

    def freeze(self) -> None:
        """Hang it (SIGSTOP): the kernel still accepts connections, nothing answers."""
        self._signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self._signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT)
        self.process = None

    def restart(self) -> None:
        """Start again on the same port: an empty Redis (nothing persisted)."""
        self.stop()
        self.start()


@contextlib.contextmanager
def start_redis() -> Iterator[RedisInstance]:
    binary = find_redis_server()
    root = Path(tempfile.mkdtemp(prefix="authgate-redis-"))
    instance = RedisInstance(binary=binary, root=root, port=free_port())
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()
        shutil.rmtree(root, ignore_errors=True)
