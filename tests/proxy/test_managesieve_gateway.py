"""ManageSieve through the whole gateway (embedded stack): the audit log
and the brute-force defence treat it as every other protocol, and the
driver's own goodbye lines are ManageSieve's BYE."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from authgate.testing.kit import audit_records
from authgate.testing.stack import ListenerSpec, Stack, embedded_stack

pytestmark = pytest.mark.asyncio

PASSWORD = "pw-sieve-gateway-1"
EXEMPT = "127.0.0.2"  # cleartext PLAIN is allowed from here
LAYOUT = (ListenerSpec("managesieve", "managesieve", "starttls"),)


@pytest_asyncio.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    extra = (
        f'[audit]\nfile = "{tmp_path / "audit.log"}"\n'
        "[defence]\nfailure_delay = 0\npenalties = []\nblock_after = 3\n"
    )
    async with embedded_stack(
        tmp_path,
        users={"alice": PASSWORD},
        security="require-secure-auth",
        exempt=[f"{EXEMPT}/32"],
        layout=LAYOUT,
        extra_config=extra,
    ) as running:
        yield running


async def session(stack: Stack, lines: list[bytes]) -> bytes:
    """Connect from the exempt address, read the greeting, send each line and
    read one reply line; everything read comes back."""
    endpoint = stack["managesieve"]
    reader, writer = await asyncio.open_connection(
        endpoint.host, endpoint.port, local_addr=(EXEMPT, 0)
    )
    seen = b""
    try:
        first = await asyncio.wait_for(reader.readline(), 10)
        seen += first
        if first.startswith(b'"'):
            while not (line := await asyncio.wait_for(reader.readline(), 10)).startswith(b"OK"):
                seen += line
            seen += line
        for command in lines:
            writer.write(command)
            seen += await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()
    return seen


def plain(password: str) -> bytes:
    message = base64.b64encode(f"\0alice\0{password}".encode())
    return b'AUTHENTICATE "PLAIN" "' + message + b'"\r\n'



async def test_failed_and_good_logins_are_audited(stack: Stack, tmp_path: Path) -> None:
    reply = await session(stack, [plain("guess"), plain(PASSWORD), b"LISTSCRIPTS\r\n"])
    assert b'NO "Authentication failed."\r\nOK "Logged in."\r\n' in reply
    # LISTSCRIPTS went to the backend: its answer (no scripts yet) is its OK.
    assert reply.endswith(b'OK "Listscripts completed."\r\n')
    (failed,) = await audit_records(tmp_path / "audit.log", "login-failed", 1)
    assert failed["user"] == "alice" and failed["mechanism"] == "PLAIN"
    assert failed["reason"] == "invalid-credentials"
    (login,) = await audit_records(tmp_path / "audit.log", "login", 1)
    assert login["user"] == "alice" and login["listener"] == "managesieve"
    assert PASSWORD not in (tmp_path / "audit.log").read_text()
    assert [r.user for r in stack.backends.sieve.logins] == ["alice"]


async def test_guessing_blocks_the_address_with_a_managesieve_bye(stack: Stack) -> None:
    # Three different wrong passwords (the same one again would count once).
    for attempt in range(3):
        await session(stack, [plain(f"guess-{attempt}")])
    # Blocked: the protocol's own goodbye instead of a greeting.
    reply = await session(stack, [])
    assert reply.startswith(b'BYE (TRYLATER) "Too many failed logins from your address')
    assert stack.backends.sieve.logins == []


async def test_unreachable_backend_gets_bye_trylater_instead_of_a_greeting(stack: Stack) -> None:
    # No client has connected yet, so no capability list is cached: the
    # greeting needs the backend's SIEVE list, and the backend is down.
    await stack.backends.sieve.close()
    reply = await session(stack, [])
    assert reply == b'BYE (TRYLATER) "Sieve server unavailable, try again later."\r\n'


async def test_unauthenticate_after_the_login_ends_the_session(
    stack: Stack, tmp_path: Path
) -> None:
    # A script whose text holds the words is data, and reaches the backend.
    script = b"# UNAUTHENTICATE\r\nkeep;\r\n"
    put = b'PUTSCRIPT "s" {%d+}\r\n%s\r\n' % (len(script), script)
    reply = await session(stack, [plain(PASSWORD), put, b"UNAUTHENTICATE\r\n"])
    assert b'OK "Putscript completed."\r\n' in reply
    assert reply.endswith(
        b'BYE "UNAUTHENTICATE, AUTHENTICATE and STARTTLS end the session here."\r\n'
    )
    stored = stack.mail_root / "alice" / "sieve" / "s.sieve"
    assert stored.read_bytes() == script
    (refused,) = await audit_records(tmp_path / "audit.log", "command-refused", 1)
    assert refused["command"] == "UNAUTHENTICATE"
