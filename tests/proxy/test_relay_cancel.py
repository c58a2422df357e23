"""Relay mode: a client that cancels (`*`) while the backend checks is not
logged in, even when the backend says yes anyway, and its next attempt on
the same connection starts on a fresh backend connection.

The backend here is a scripted loopback server: a real Dovecot answers a
cancel with NO, so a backend that accepts one is a fault we cannot cause
with it."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import pytest

from authgate import config as config_mod
from authgate.runner import start_gateway

pytestmark = pytest.mark.asyncio

PLAIN = base64.b64encode(b"\0alice\0pw")


async def test_a_backend_yes_after_the_clients_cancel_is_dropped(tmp_path: Path) -> None:
    connections: list[list[bytes]] = []

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen: list[bytes] = []
        connections.append(seen)
        writer.write(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] ready\r\n")
        while line := await reader.readline():
            seen.append(line)
            tag, _, command = line.rstrip(b"\r\n").partition(b" ")
            if command.upper() == b"CAPABILITY":
                writer.write(b"* CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN\r\n" + tag + b" OK\r\n")
            elif command.upper() == b"AUTHENTICATE PLAIN":
                writer.write(b"+ \r\n")  # no initial response: ask for it
                await reader.readline()  # the client's "*", relayed
                writer.write(tag + b" OK a buggy backend logs a cancel in\r\n")
            elif command.upper().startswith(b"AUTHENTICATE PLAIN "):
                writer.write(tag + b" OK [CAPABILITY IMAP4rev1] Logged in\r\n")
            else:
                writer.write(tag + b" OK done\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(backend, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    path = tmp_path / "authgate.toml"
    path.write_text(
        f"""hostname = "localhost"
[policy]
security = "none"
mechanisms = ["PLAIN"]
[defence]
failure_delay = 0
[[listeners]]
name = "imap"
protocol = "imap"
listen = "127.0.0.1:0"
[listeners.backend]
address = "127.0.0.1:{port}"
mode = "relay"
"""
    )
    gateway = await start_gateway(config_mod.load(path), None)
    try:
        reader, writer = await asyncio.open_connection(*gateway.addresses()["imap"])

        async def say(line: bytes) -> bytes:
            writer.write(line + b"\r\n")
            return await asyncio.wait_for(reader.readline(), 10)

        assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"* OK")
        assert await say(b"a AUTHENTICATE PLAIN") == b"+ \r\n"
        assert (await say(b"*")).startswith(b"a BAD")  # cancelled: not logged in
        # The retry gets its own backend connection and logs in there.
        assert (await say(b"b AUTHENTICATE PLAIN " + PLAIN)).startswith(b"b OK")
        assert len(connections) == 2
        writer.close()
    finally:
        await gateway.stop(drain=1)
        server.close()
