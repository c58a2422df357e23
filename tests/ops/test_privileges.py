"""Privilege drop, as root: `authgate run` binds a port below 1024, then
serves as `nobody`, and logins still work after a SIGHUP reload (which
re-reads the config, the users file and the certificates as nobody). As
root without `user` it refuses to start unless told."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from authgate.privileges import ROOT_ENV
from authgate.testing.backends import Backends
from tests.ops.process import PASSWORD, Imap, authgate_run, base_toml

pytestmark = pytest.mark.asyncio

NOT_TOLD = {ROOT_ENV: "0"}  # the suite's conftest says "stay root"; these tests do not


@pytest.fixture(autouse=True)
def _as_root() -> None:
    assert os.geteuid() == 0, "the privilege drop tests run as root (as the suite does)"


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder nobody may enter (pytest's own tmp folders are root's, 0700)."""
    path = Path(tempfile.mkdtemp(prefix="authgate-privileges-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def privileged_port() -> int:
    for port in range(700, 1000):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below 1024 on 127.0.0.1")


def open_to_nobody(tmp: Path) -> None:
    """What an operator does for user = "nobody": the key readable by its
    group, the rest world-readable."""
    nogroup = grp.getgrnam("nogroup").gr_gid
    for path in [tmp, tmp / "certs", *tmp.rglob("*")]:
        if path.is_dir():
            path.chmod(0o755)
        else:
            path.chmod(0o644)
    key = tmp / "certs/server.key"
    os.chown(key, 0, nogroup)
    key.chmod(0o640)


def proc_ids(pid: int) -> tuple[list[int], list[int]]:
    uid = gid = ""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            uid = line
        elif line.startswith("Gid:"):
            gid = line
    return [int(x) for x in uid.split()[1:]], [int(x) for x in gid.split()[1:]]


def listener(port: int, backend_port: int) -> str:
    return f"""
[[listeners]]
name = "imap"
protocol = "imap"
listen = "127.0.0.1:{port}"
tls = "starttls"
[listeners.backend]
address = "127.0.0.1:{backend_port}"
master_user = "authgate"
master_password = "master-pw"
"""


async def login_ok(port: int) -> None:
    client = await Imap.open(port)
    assert (await client.cram_md5("alice", PASSWORD)).startswith(b"c OK")
    assert (await client.command("s", "SELECT INBOX"))[-1].startswith(b"s OK")
    client.close()


async def test_binds_as_root_then_serves_as_nobody_and_reloads(shared_dir: Path) -> None:
    port = privileged_port()

    def make(tmp: Path, backends: Backends) -> str:
        open_to_nobody(tmp)
        return base_toml(tmp, 'user = "nobody"') + listener(port, backends.imap.port)

    async with authgate_run(shared_dir, make, names=("imap",), env=NOT_TOLD) as gate:
        assert gate.ports["imap"] == port
        await gate.wait_log("serving as user nobody")
        assert gate.proc is not None
        nobody = 65534
        uids, gids = proc_ids(gate.proc.pid)
        assert uids == [nobody] * 4 and gids == [nobody] * 4  # real, effective, saved, fs
        await login_ok(port)
        since = gate.log_size()
        gate.proc.send_signal(signal.SIGHUP)
        await gate.wait_log("reloaded: 1 listener(s)", since)
        await login_ok(port)
        assert proc_ids(gate.proc.pid)[0] == [nobody] * 4


async def test_refuses_when_the_user_could_not_reload(shared_dir: Path) -> None:
    def make(tmp: Path, backends: Backends) -> str:
        open_to_nobody(tmp)
        (tmp / "users.toml").chmod(0o600)  # root's only: a reload as nobody would fail
        return base_toml(tmp, 'user = "nobody"') + listener(0, backends.imap.port)

    async with authgate_run(shared_dir, make, names=("imap",), env=NOT_TOLD) as gate:
        assert gate.proc is not None
        # Bound (as root), then refused: the drop's check found the file.
        assert await asyncio.to_thread(gate.proc.wait, 30) == 2
        log = gate.log_text()
    assert "user 'nobody' cannot read" in log and "users.toml" in log
    assert "Traceback" not in log


def run_briefly(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "authgate", "run", "-c", str(config)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **env},
    )
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "", err)


async def test_root_without_user_is_refused_unless_told(tmp_path: Path) -> None:
    config = tmp_path / "authgate.toml"
    config.write_text(
        '[[listeners]]\nname = "imap"\nprotocol = "imap"\nlisten = "127.0.0.1:0"\n'
        '[listeners.backend]\naddress = "127.0.0.1:1"\nmode = "relay"\n'
    )
    done = await asyncio.to_thread(run_briefly, config, NOT_TOLD)
    assert done.returncode == 2
    assert "refusing to run as root" in done.stderr and "Traceback" not in done.stderr
    # run_as_root = true: told so in the config.
    config.write_text("run_as_root = true\n" + config.read_text())
    proc = subprocess.Popen(
        [sys.executable, "-m", "authgate", "run", "-c", str(config)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={**os.environ, **NOT_TOLD},
    )
    try:
        assert proc.stderr is not None
        for _ in range(200):
            line = await asyncio.to_thread(proc.stderr.readline)
            if b"listening: imap" in line or not line:
                break
        assert b"listening: imap" in line
    finally:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(20)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
