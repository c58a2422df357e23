"""The admin page's features working together in a real `authgate run`:
secret files encrypted at rest, the audit log, and password expiry at login."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from authgate.credentials.store import UserStore, generate_secrets
from tests.proxy.running import Running, authgate_process, command, imap_open

pytestmark = pytest.mark.asyncio

ADMIN = "admin-password-for-tests"
FRESH_PW = "Fresh-Password-1"
OLD_PW = "Stale-Password-2"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AUTHGATE_TEST_SCRYPT_LOG2N": "12"}  # fast KDF, tests only
    return subprocess.run(
        [sys.executable, "-m", "authgate", *args], capture_output=True, text=True, timeout=120, env=env, check=False
    )


async def login(port: int, user: str, password: str) -> bytes:
    reader, writer, _ = await imap_open(port)
    reply = (await command(reader, writer, "a", f"LOGIN {user} {password}"))[-1]
    writer.close()
    return reply


async def test_encrypted_store_audit_log_and_expiry(tmp_path: Path) -> None:
    async with authgate_process(tmp_path, security="none") as run:
        assert run.proc is not None
        # Two more users: one fresh, one whose password is 100 days old.
        store = UserStore.load(tmp_path / "users.toml")
        today = datetime.date.today()
        store.set_user_secrets("fresh", generate_secrets("fresh", FRESH_PW, "localhost"), password_changed=today)
        store.set_user_secrets(
            "stale", generate_secrets("stale", OLD_PW, "localhost"), password_changed=today - datetime.timedelta(days=100)
        )
        store.save()
        run.backends.store.users.update({"fresh": FRESH_PW, "stale": OLD_PW})
        run.proc.terminate()
        await run.proc.wait()

        config = run.config
        config.write_text(
            config.read_text() + '[password_policy]\nexpire_days = 90\n[audit]\nfile = "audit.log"\n'
        )
        (tmp_path / "admin.pw").write_text(ADMIN + "\n")
        users_before = (tmp_path / "users.toml").read_bytes()
        result = cli("encrypt", "-c", str(config), "--password-file", str(tmp_path / "admin.pw"))
        assert result.returncode == 0, result.stderr
        assert (tmp_path / "users.toml").read_bytes() != users_before
        assert b"fresh" not in (tmp_path / "users.toml").read_bytes()

        # Without the password the proxy refuses to start, with a clear message.
        locked = cli("check", "-c", str(config))
        assert locked.returncode == 2 and "password" in locked.stderr and "Traceback" not in locked.stderr

        restarted = Running(tmp_path, run.backends, run.port)
        restarted.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "authgate", "run", "-c", str(config), "--password-file", str(tmp_path / "admin.pw"),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "AUTHGATE_TEST_SCRYPT_LOG2N": "12"},
        )
        restarted._pump = asyncio.ensure_future(restarted._read_stderr())
        try:
            await restarted.wait_for_log(b"listening: imap")
            assert (await login(run.port, "fresh", FRESH_PW)).startswith(b"a OK")
            assert (await login(run.port, "stale", OLD_PW)).startswith(b"a NO [EXPIRED]")
            assert (await login(run.port, "fresh", "wrong-one")).startswith(b"a NO [AUTHENTICATIONFAILED]")
        finally:
            restarted.proc.terminate()
            assert await restarted.proc.wait() == 0

        log = cli("log", "-c", str(config), "--password-file", str(tmp_path / "admin.pw"), "--json")
        assert log.returncode == 0, log.stderr
        records = [json.loads(line) for line in log.stdout.splitlines()]
        events = [(r["event"], r.get("user")) for r in records]
        assert ("login", "fresh") in events
        assert ("password-expired", "stale") in events
        assert ("login-failed", "fresh") in events
        for secret in (FRESH_PW, OLD_PW, "wrong-one", ADMIN):
            assert secret not in log.stdout
        assert b"fresh" not in (tmp_path / "audit.log").read_bytes()  # sealed record by record
