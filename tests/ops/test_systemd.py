"""examples/systemd/authgate.service passes `systemd-analyze verify`, and a
real `authgate run` speaks the notify protocol to a test NOTIFY_SOCKET:
READY=1 once bound, RELOADING=1 then READY=1 around a SIGHUP, WATCHDOG=1
while the loop turns, STOPPING=1 on SIGTERM; with workers = 2 the
supervisor says READY=1 (as MAINPID) only when both workers are serving."""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from authgate.testing.backends import Backends
from tests.ops.process import authgate_run, base_toml, listeners_toml

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "examples/systemd/authgate.service"


def test_unit_file_verifies(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is missing (Debian: systemd)"
    authgate = shutil.which("authgate") or str(ROOT / ".venv/bin/authgate")
    unit = tmp_path / "authgate.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/authgate", authgate))
    done = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    text = UNIT.read_text()
    for line in ("Type=notify", "WatchdogSec=", "ProtectSystem=strict", "NoNewPrivileges=yes",
                 "CapabilityBoundingSet=CAP_NET_BIND_SERVICE", "ExecReload=/bin/kill -HUP $MAINPID"):
        assert line in text, line


class NotifySocket:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []

    def _receive(self, seconds: float) -> None:
        for _ in range(int(seconds / 0.2)):
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines() if line))
            return

    async def wait_for(self, key: str, value: str | None = None, *, after: int = 0, seconds: float = 30) -> dict[str, str]:
        """The first message from index `after` on with key (=value)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while True:
            for message in self.messages[after:]:
                if key in message and (value is None or message[key] == value):
                    return message
            assert loop.time() < end, f"no {key}={value} in {self.messages}"
            await asyncio.to_thread(self._receive, 1.0)

    def close(self) -> None:
        self.sock.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("workers", [1, 2])
async def test_notify_protocol(tmp_path: Path, workers: int) -> None:
    notify = NotifySocket(tmp_path / "notify.sock")

    def make(tmp: Path, backends: Backends) -> str:
        return base_toml(tmp, f"workers = {workers}") + listeners_toml(backends.imap.port, proxy=False)

    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"}
    try:
        async with authgate_run(tmp_path, make, names=("imap",), env=env) as gate:
            assert gate.proc is not None
            ready = await notify.wait_for("READY", "1")
            assert ready["MAINPID"] == str(gate.proc.pid)
            if workers == 2:
                assert ready["STATUS"] == "2 workers serving"
                assert gate.log_text().count("listening: imap") == 2  # both bound before READY
            await notify.wait_for("WATCHDOG", "1")
            mark = len(notify.messages)
            gate.proc.send_signal(signal.SIGHUP)
            reloading = await notify.wait_for("RELOADING", "1", after=mark)
            assert int(reloading["MONOTONIC_USEC"]) > 0
            after = notify.messages.index(reloading)
            again = await notify.wait_for("READY", "1", after=after)
            assert again["STATUS"] == "reloaded"
            assert gate.log_text().count("reloaded: 1 listener(s)") == workers
            gate.proc.send_signal(signal.SIGTERM)
            await notify.wait_for("STOPPING", "1", after=after)
            assert await asyncio.to_thread(gate.proc.wait, 30) == 0
    finally:
        notify.close()
