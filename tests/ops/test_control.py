"""The control socket of a real `authgate run` with `workers = 2`, through
the real command line (`authgate status | sessions | block | unblock`), with
each worker's own brute-force state and with the Redis-shared one (a real
redis-server): sessions are summed over the workers, a block reaches every
worker, an unblock lifts it everywhere."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authgate.cli import main as cli_main
from authgate.commands.control import parse_duration
from authgate.proxy.control import BadRequest, parse_request
from authgate.testing.backends import Backends
from tests.ops.process import PASSWORD, Authgate, Imap, authgate_run, base_toml, listeners_toml
from tests.redis_server import RedisInstance, start_redis


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "authgate", *args], capture_output=True, text=True, timeout=60, check=False
    )


def cli_here(*args: str) -> subprocess.CompletedProcess[str]:
    """The same command line, run in this process (a fresh interpreter per
    command costs seconds on a loaded machine): `authgate.cli.main`."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli_main(list(args))
    return subprocess.CompletedProcess(args, status, out.getvalue(), err.getvalue())


async def acli(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(cli_here, *args)


async def is_blocked(port: int, local: str) -> bool:
    client = await Imap.open(port, local=local)
    client.close()
    return b"BYE" in client.greeting


@contextlib.contextmanager
def maybe_redis(shared: bool) -> Iterator[RedisInstance | None]:
    if not shared:
        yield None
        return
    with start_redis() as redis:
        yield redis


@pytest.mark.asyncio
@pytest.mark.parametrize("defence", ["per-worker", "redis"])
async def test_control_commands_over_two_workers(tmp_path: Path, defence: str) -> None:
    socket_path = tmp_path / "control.sock"
    (tmp_path / "defence.secret").write_text("a shared secret for the defence tests\n")

    with maybe_redis(defence == "redis") as redis:
        def make(tmp: Path, backends: Backends) -> str:
            shared = ""
            if redis is not None:
                shared = f'redis_url = "{redis.url}"\nsecret_file = "{tmp / "defence.secret"}"\n'
            text = base_toml(tmp, f'workers = 2\n[control]\nsocket = "{socket_path}"\n')
            return text + f"[defence]\nfailure_delay = 0\n{shared}" + listeners_toml(backends.imap.port, proxy=False)

        async with authgate_run(tmp_path, make, names=("imap",)) as gate:
            await run_commands(gate, tmp_path / "authgate.toml", socket_path)


async def run_commands(gate: Authgate, config: Path, socket_path: Path) -> None:
    for _ in range(200):
        if gate.log_text().count("control socket: ") == 2:
            break
        await asyncio.sleep(0.05)
    for number in (0, 1):
        mode = (socket_path.parent / f"control.sock.{number}").stat().st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    port = gate.ports["imap"]
    # Sessions from several addresses, so the kernel spreads them over both workers.
    logged_in = []
    for i in range(4):
        client = await Imap.open(port, local=f"127.0.3.{i + 1}")
        assert (await client.cram_md5("alice", PASSWORD)).startswith(b"c OK")
        logged_in.append(client)
    waiting = await Imap.open(port, local="127.0.3.20")  # not authenticated
    try:
        done = await acli("status", "-c", str(config), "--json")
        assert done.returncode == 0, done.stderr
        status = json.loads(done.stdout)
        assert status["workers"] == 2 and len(set(status["pids"])) == 2
        [imap] = status["listeners"]
        assert imap["name"] == "imap" and imap["sessions"] == 5
        assert status["backends"] == [
            {"backend": f"127.0.0.1:{gate.backends.imap.port}", "reachable": True, "error": None}
        ]
        done = await acli("sessions", "-c", str(config), "--listener", "imap", "--json")
        assert done.returncode == 0, done.stderr
        sessions = json.loads(done.stdout)
        assert sorted((s["client"], s["phase"], s["user"] or "") for s in sessions) == sorted([
            *((f"127.0.3.{i + 1}", "spliced", "alice") for i in range(4)),
            ("127.0.3.20", "preauth", ""),
        ])
        done = await acli("sessions", "-c", str(config), "--listener", "nothing", "--json")
        assert json.loads(done.stdout) == []

        # A block reaches every worker: none of many connections gets through.
        done = await acli("block", "127.0.3.9", "--for", "10m", "-c", str(config))
        assert done.returncode == 0 and "blocked 127.0.3.9/32 for 10m" in done.stdout, done.stderr
        assert all([await is_blocked(port, "127.0.3.9") for _ in range(8)])
        assert not await is_blocked(port, "127.0.3.10")
        status = json.loads((await acli("status", "-c", str(config), "--json")).stdout)
        [block] = status["blocks"]
        assert block["network"] == "127.0.3.9/32" and 590 <= block["seconds_left"] <= 600
        text = (await asyncio.to_thread(cli, "status", "-c", str(config))).stdout  # a real process too
        assert "127.0.3.9/32: 9m" in text and "imap" in text

        done = await acli("unblock", "127.0.3.9", "-c", str(config))
        assert done.returncode == 0 and "unblocked 127.0.3.9/32" in done.stdout
        assert not any([await is_blocked(port, "127.0.3.9") for _ in range(8)])
        assert json.loads((await acli("status", "-c", str(config), "--json")).stdout)["blocks"] == []
    finally:
        for client in [*logged_in, waiting]:
            client.close()


def test_cli_errors_are_plain(tmp_path: Path) -> None:
    done = cli("status", "--socket", str(tmp_path / "none.sock"))
    assert done.returncode == 2 and "no control socket (is authgate running?)" in done.stderr
    done = cli("block", "192.0.2.1", "--for", "forever", "--socket", str(tmp_path / "none.sock"))
    assert done.returncode == 2 and "--for" in done.stderr and "Traceback" not in done.stderr


def test_durations() -> None:
    assert parse_duration("600") == 600
    assert parse_duration("10m") == 600
    assert parse_duration("1h30m") == 5400
    assert parse_duration("2d") == 172800
    for bad in ("", "0", "10x", "m", "1.5h", "10 m", "400d", "-5"):
        with pytest.raises(ValueError):
            parse_duration(bad)


@given(st.text(max_size=20))
def test_duration_parser_never_crashes(text: str) -> None:
    try:
        seconds = parse_duration(text)
    except ValueError:
        return
    assert 1 <= seconds <= 366 * 86400


@given(st.binary(max_size=200) | st.builds(lambda d: json.dumps(d).encode(), st.dictionaries(
    st.sampled_from(["command", "address", "seconds", "listener"]),
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
)))
def test_request_parser_refuses_cleanly(line: bytes) -> None:
    try:
        request = parse_request(line)
    except BadRequest:
        return
    assert request["command"] in ("status", "sessions", "block", "unblock")
