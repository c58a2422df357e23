"""bench.bound, the least a Python login proxy does, really logs in: its
instruction count is a bound for authgate's only while it makes the same
logins (the client's password checked, the master login to the backend,
then a splice). Correctness only, never speed."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from authgate.testing.backends import start_backends
from bench import bound
from bench.instructions import free_port, login, wait_listening

REPO = Path(__file__).resolve().parents[2]
USER, PASSWORD, MASTER, MASTER_PASSWORD = "bob", "bob-pw", "authgate", "master-pw"


@pytest.mark.asyncio
@pytest.mark.parametrize("protocol", ["imap", "pop3"])
async def test_bound_logs_in_through_a_master_login_and_splices(
    tmp_path: Path, protocol: str
) -> None:
    backends = await start_backends(
        tmp_path / "mail", {USER: PASSWORD}, master=(MASTER, MASTER_PASSWORD)
    )
    port = free_port()
    serving = bound.command(
        tmp_path / "bound.json",
        protocol=protocol,
        listen=port,
        backend=backends.imap.port if protocol == "imap" else backends.pop3.port,
        user=USER,
        password=PASSWORD,
        master=MASTER,
        master_password=MASTER_PASSWORD,
    )
    proc = subprocess.Popen(serving, cwd=REPO)
    try:
        await wait_listening(port, proc, 30)
        # A login, then LOGOUT / QUIT answered by the backend through the
        # splice, which then closes: `login` reads to the end.
        async with asyncio.timeout(10):
            await login(protocol, port, USER, PASSWORD)
            with pytest.raises(RuntimeError, match="login refused"):
                await login(protocol, port, USER, "wrong")
    finally:
        proc.terminate()
        proc.wait(10)
        await backends.close()
