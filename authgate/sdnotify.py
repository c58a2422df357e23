"""systemd's readiness protocol (sd_notify(3)), written out: one datagram
of `KEY=VALUE` lines to the Unix socket named by $NOTIFY_SOCKET (a path, or
`@name` in the abstract namespace). No socket set: every call does nothing,
so authgate behaves the same outside systemd.

Messages authgate sends: `READY=1` once every port is bound (and the
privileges dropped), `RELOADING=1` (with MONOTONIC_USEC) when a SIGHUP
reload begins and `READY=1` when it ends, `STOPPING=1` when it starts
draining, `WATCHDOG=1` from the event loop every half of $WATCHDOG_USEC (a
loop that stops turning stops the pings, and systemd restarts the
service), and `STATUS=...` lines a `systemctl status` shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from typing import Final

__all__ = ["Notifier", "SupervisorRelay", "WorkerReport", "watchdog_interval"]

NOTIFY_ENV: Final = "NOTIFY_SOCKET"


def _address(raw: str) -> str | None:
    if raw.startswith("@"):
        return "\0" + raw[1:]  # abstract namespace
    if raw.startswith("/"):
        return raw
    return None  # (vsock addresses are not for us)


class _Watchdog:
    """The watchdog pings of Notifier and WorkerReport: `_ping` every
    `interval` seconds from the running loop, until `stop_watchdog`."""

    _watchdog: asyncio.Task[None] | None = None

    def _ping(self) -> None:
        raise NotImplementedError

    def _start_pings(self, interval: float) -> None:
        self._watchdog = asyncio.ensure_future(self._ping_forever(interval))

    async def _ping_forever(self, interval: float) -> None:
        while True:
            self._ping()
            await asyncio.sleep(interval)

    async def stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None


class Notifier(_Watchdog):
    """Sends to $NOTIFY_SOCKET as it was when made (None: off)."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = _address(env.get(NOTIFY_ENV, ""))
        self._watchdog: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """One datagram; False when off or systemd is not listening."""
        if self.address is None:
            return False
        data = ("\n".join(lines) + "\n").encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self.address)
                sock.sendall(data)
        except OSError:
            return False
        return True

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")

    def reloaded(self) -> None:
        self.ready("reloaded")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping: draining sessions")

    def start_watchdog(self, interval: float | None) -> None:
        """Ping every `interval` seconds from the running loop."""
        if self.address is None or interval is None or self._watchdog is not None:
            return
        self._start_pings(interval)

    def _ping(self) -> None:
        self.send("WATCHDOG=1")


def watchdog_interval(environ: dict[str, str] | None = None) -> float | None:
    """Half of $WATCHDOG_USEC, in seconds, when the watchdog is for this
    process ($WATCHDOG_PID unset or ours); None otherwise."""
    env = os.environ if environ is None else environ
    raw = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not raw.isdigit() or int(raw) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(raw) / 2_000_000


class WorkerReport(_Watchdog):
    """A worker's side of `workers = N`: the same calls as Notifier, written
    as lines ("R 0", "L 0", "W 0": ready, reloaded, alive) to a pipe the
    supervisor reads (SupervisorRelay), which tells systemd once every
    worker has said so: only the main process may notify by default."""

    enabled = True

    def __init__(self, fd: int, number: int, interval: float | None) -> None:
        self._fd = fd
        self._number = number
        self._interval = interval
        self._watchdog: asyncio.Task[None] | None = None

    def _say(self, kind: str) -> None:
        with contextlib.suppress(OSError):
            os.write(self._fd, f"{kind} {self._number}\n".encode())

    def ready(self, status: str) -> None:
        self._say("R")

    def reloading(self) -> None:
        pass  # the supervisor said RELOADING=1 when it forwarded SIGHUP

    def reloaded(self) -> None:
        self._say("L")

    def stopping(self) -> None:
        pass  # (the supervisor's)

    def start_watchdog(self, interval: float | None) -> None:
        if self._interval is not None and self._watchdog is None:
            self._start_pings(self._interval)

    def _ping(self) -> None:
        self._say("W")


class SupervisorRelay:
    """The supervisor's side: READY=1 when every worker is ready (and again
    when every worker has reloaded), WATCHDOG=1 while every worker pings."""

    def __init__(self, notifier: Notifier, workers: int, interval: float | None) -> None:
        import threading

        self.notifier = notifier
        self.workers = workers
        self.interval = interval
        self.read_fd, self.write_fd = os.pipe()
        self._lock = threading.Lock()
        self._ready: set[int] = set()
        self._reloaded: set[int] = set()
        self._pinged: dict[int, float] = {}
        self._said_ready = False
        self._reloading = False
        threading.Thread(target=self._read, name="sd-notify", daemon=True).start()
        if interval is not None:
            threading.Thread(target=self._watch, name="sd-watchdog", daemon=True).start()

    def reloading(self) -> None:
        with self._lock:
            self._reloading = True
            self._reloaded.clear()
        self.notifier.reloading()

    def _read(self) -> None:
        buffer = b""
        while chunk := os.read(self.read_fd, 4096):
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                kind, _, number = line.decode("ascii", "replace").partition(" ")
                if number.isdigit():
                    self._heard(kind, int(number))

    def _heard(self, kind: str, number: int) -> None:
        say = None
        with self._lock:
            if kind == "R":
                self._ready.add(number)
                if not self._said_ready and len(self._ready) >= self.workers:
                    self._said_ready = True
                    say = f"{self.workers} workers serving"
            elif kind == "L" and self._reloading:
                self._reloaded.add(number)
                if len(self._reloaded) >= self.workers:
                    self._reloading = False
                    say = "reloaded"
            elif kind == "W":
                self._pinged[number] = time.monotonic()
        if say is not None:
            self.notifier.ready(say)

    def _watch(self) -> None:
        assert self.interval is not None
        while True:
            time.sleep(self.interval)
            now = time.monotonic()
            with self._lock:
                alive = len(self._pinged) >= self.workers and all(
                    now - t < 2 * self.interval for t in self._pinged.values()
                )
            if alive:
                self.notifier.send("WATCHDOG=1")
