"""The least a login proxy written in Python can do: a bound for authgate.

    python -m bench.instructions --bound [--protocol pop3]    # counted by callgrind

Serves one listener on uvloop with nothing but protocol callbacks: the
greeting; the client's AUTHENTICATE PLAIN / AUTH PLAIN with an initial
response, compared with one user's password; a connection to the backend,
its greeting and the same master-user PLAIN login authgate makes (the
user as authzid); the tagged OK / +OK to the client; then each side's
bytes written straight to the other. No policy, defence, limits, logging,
timeouts, TLS or error handling: a malformed line ends the connection.
What authgate spends per login beyond this figure is authgate's own work,
not the interpreter's or the event loop's floor.

Not a server for anything but this measurement. The settings come as a
JSON file: `command()` writes one and gives the command line that serves it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import sys
from pathlib import Path
from typing import cast

import uvloop


def command(
    settings_file: Path,
    *,
    protocol: str,
    listen: int,
    backend: int,
    user: str,
    password: str,
    master: str,
    master_password: str,
) -> list[str]:
    """Write the settings to `settings_file`; the command that serves them
    (run it from the repository root, where `bench` is a package)."""
    settings = {
        "protocol": protocol,
        "listen": listen,
        "backend": backend,
        "user": user,
        "password": password,
        "master": master,
        "master_password": master_password,
    }
    settings_file.write_text(json.dumps(settings))
    return [sys.executable, "-m", "bench.bound", str(settings_file)]


class Settings:
    def __init__(self, raw: dict[str, str | int]) -> None:
        self.imap = raw["protocol"] == "imap"
        self.listen = int(raw["listen"])
        self.backend = int(raw["backend"])
        self.user = str(raw["user"]).encode()
        self.password = str(raw["password"]).encode()
        master = f"{raw['user']}\0{raw['master']}\0{raw['master_password']}"
        token = base64.b64encode(master.encode())
        command = b"x AUTHENTICATE PLAIN " if self.imap else b"AUTH PLAIN "
        self.backend_login = command + token + b"\r\n"


class Backend(asyncio.Protocol):
    def __init__(self, front: Front, settings: Settings) -> None:
        self.front = front
        self.settings = settings
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.greeted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's: not a subclass
        if self.front.gone:
            transport.close()  # the client left while we connected

    def data_received(self, data: bytes) -> None:
        front = self.front
        if front.backend is self:
            front.write(data)
            return
        self.buffer += data
        while b"\r\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            if not self.greeted:
                self.greeted = True
                self.write(self.settings.backend_login)
            elif line.startswith((b"x OK", b"+OK")):
                front.spliced(self)
                if self.buffer:
                    front.write(self.buffer)
                return
            elif line.startswith((b"x NO", b"x BAD", b"-ERR")):
                front.close()  # the master login was refused
                return

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.front.close()


class Front(asyncio.Protocol):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.transport: asyncio.Transport | None = None
        self.backend: Backend | None = None
        self.buffer = b""
        self.tag = b""
        self.connecting: asyncio.Task[object] | None = None
        self.gone = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.write(b"* OK ready\r\n" if self.settings.imap else b"+OK ready\r\n")

    def data_received(self, data: bytes) -> None:
        if self.backend is not None:
            self.backend.write(data)
            return
        self.buffer += data
        if self.connecting is not None or b"\r\n" not in self.buffer:
            return  # (held until the splice)
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        words = line.split(b" ")
        self.tag = words[0] if self.settings.imap else b""
        _, user, password = base64.b64decode(words[-1]).split(b"\0")
        if user != self.settings.user or password != self.settings.password:
            self.write(self.tag + b" NO refused\r\n" if self.settings.imap else b"-ERR refused\r\n")
            return
        loop = asyncio.get_running_loop()
        self.connecting = loop.create_task(
            loop.create_connection(
                lambda: Backend(self, self.settings), "127.0.0.1", self.settings.backend
            )
        )
        self.connecting.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task[object]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.close()  # no backend

    def spliced(self, backend: Backend) -> None:
        self.backend = backend
        self.write(self.tag + b" OK logged in\r\n" if self.settings.imap else b"+OK\r\n")
        if self.buffer:
            backend.write(self.buffer)  # what the client sent on meanwhile
            self.buffer = b""

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        if self.backend is not None and self.backend.transport is not None:
            self.backend.transport.close()


async def serve(settings: Settings) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Front(settings), "127.0.0.1", settings.listen)
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> int:
    settings = Settings(json.loads(Path(argv[0]).read_text()))
    # SIGINT ends a measurement (cProfile writes its file then).
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
