"""A misbehaving backend never hangs a client, and leaks nothing.

The faulty backends are real TCP servers that misbehave on purpose:
refusing, silent, closing mid-login, rejecting the master login, dying
mid-session. The client always gets IMAP's temporary-failure reply or a
clean close, and file descriptors and tasks return to where they were."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from authgate import config as config_mod
from authgate.certs import ensure_dev_certificates
from authgate.credentials.store import UserStore, generate_secrets
from authgate.proxy.server import Gateway
from authgate.runner import start_gateway
from authgate.testing.stack import ListenerSpec, config_text
from tests.netutil import free_port

pytestmark = pytest.mark.asyncio

PASSWORD = "pw-faults"
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
GREETING = b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] fake ready\r\n"


async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()  # says nothing, ever
    writer.close()


async def close_mid_login(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(GREETING)
    await reader.readline()  # the AUTHENTICATE
    writer.close()


async def reject_master(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(GREETING)
    line = await reader.readline()
    tag = line.split(b" ", 1)[0]
    writer.write(tag + b" NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
    await writer.drain()
    await reader.read()
    writer.close()


async def die_mid_session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(GREETING)
    line = await reader.readline()
    tag = line.split(b" ", 1)[0]
    writer.write(tag + b" OK [CAPABILITY IMAP4rev1] Logged in\r\n")
    await writer.drain()
    await reader.readline()  # the first command after login: die instead of answering
    writer.transport.abort()


async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"\x16\x03\x01 this is not IMAP \xff\xfe\r\n" * 3)
    await writer.drain()
    await reader.read()
    writer.close()


@dataclass
class Setup:
    gateway: Gateway
    port: int
    backend_port: int


@contextlib.asynccontextmanager
async def gateway_to(tmp: Path, backend_port: int) -> AsyncIterator[Setup]:
    ensure_dev_certificates(tmp / "certs")
    store = UserStore(realm="localhost")
    store.set_user_secrets("alice", generate_secrets("alice", PASSWORD, "localhost", schemes=["PLAIN"]))
    store.save(tmp / "users.toml")
    path = tmp / "authgate.toml"
    path.write_text(
        config_text(
            host="127.0.0.1",
            layout=(ListenerSpec("imap", "imap", "none"),),
            certs=tmp / "certs",
            users_file=tmp / "users.toml",
            backend_ports={"imap": backend_port},
            master_password="master",
            security="none",
            mechanisms=["PLAIN"],
            exempt=[],
            extra="[limits]\nconnect_timeout = 1\nbackend_timeout = 1\nmax_connections_per_address = 1000\n",
        )
    )
    config = config_mod.load(path)
    gateway = await start_gateway(config, UserStore.load(tmp / "users.toml"))
    try:
        yield Setup(gateway, gateway.addresses()["imap"][1], backend_port)
    finally:
        await gateway.stop(drain=1)


@contextlib.asynccontextmanager
async def fake_backend(handler: Handler) -> AsyncIterator[int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def login(port: int) -> tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await asyncio.wait_for(reader.readline(), 5)
    writer.write(b"a LOGIN alice " + PASSWORD.encode() + b"\r\n")
    reply = await asyncio.wait_for(reader.readline(), 10)
    return reply, reader, writer


@pytest.mark.parametrize("handler", [refuse, silent, close_mid_login, reject_master, garbage])
async def test_login_gets_temporary_failure(tmp_path: Path, handler: Handler) -> None:
    async with fake_backend(handler) as port, gateway_to(tmp_path, port) as setup:
        reply, reader, writer = await login(setup.port)
        assert reply.startswith(b"a NO [UNAVAILABLE]"), reply
        # The session is still usable: the client may retry or log out.
        writer.write(b"b LOGOUT\r\n")
        rest = await asyncio.wait_for(reader.read(), 5)
        assert b"b OK" in rest
        writer.close()


async def test_unreachable_backend(tmp_path: Path) -> None:
    async with gateway_to(tmp_path, free_port()) as setup:
        reply, _, writer = await login(setup.port)
        writer.close()
        assert reply.startswith(b"a NO [UNAVAILABLE]")


async def test_backend_dying_mid_session_closes_the_client(tmp_path: Path) -> None:
    async with fake_backend(die_mid_session) as port, gateway_to(tmp_path, port) as setup:
        reply, reader, writer = await login(setup.port)
        assert reply.startswith(b"a OK")
        writer.write(b"b SELECT INBOX\r\n")
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_thousands_of_faulty_sessions_leak_nothing(tmp_path: Path) -> None:
    async with fake_backend(refuse) as port, gateway_to(tmp_path, port) as setup:
        await asyncio.sleep(0.1)
        fds, tasks = open_fds(), len(asyncio.all_tasks())

        async def one() -> None:
            reply, _, writer = await login(setup.port)
            assert reply.startswith(b"a NO [UNAVAILABLE]")
            writer.close()
            await writer.wait_closed()

        for _ in range(20):  # 2,000 sessions, 100 at a time
            await asyncio.gather(*(one() for _ in range(100)))
        for _ in range(100):  # let the server side finish closing
            if setup.gateway.session_count == 0 and open_fds() <= fds:
                break
            await asyncio.sleep(0.05)
        assert setup.gateway.session_count == 0
        assert open_fds() <= fds
        assert len(asyncio.all_tasks()) <= tasks
