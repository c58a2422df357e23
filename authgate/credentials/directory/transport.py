"""The connection under libldap: StartTLS by hand (BER, from the one BER
module authgate.protocols.ber), and the relay that carries libldap's
plaintext through Python's TLS."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from collections.abc import Sequence
from typing import Final

from authgate.credentials.directory.errors import DirectoryUnavailable
from authgate.credentials.directory.settings import Endpoint
from authgate.protocols import ber

# A StartTLS response is a few dozen bytes; anything near this is not one.
_MAX_STARTTLS_RESPONSE: Final = 16384


def _start_tls(sock: socket.socket, endpoint: Endpoint, timeout: float) -> None:
    """Ask for StartTLS on a fresh connection; raise unless the server agrees.

    Bytes the server sends after its response, before our handshake, are an
    injection attempt (the STARTTLS response-injection class, CVE-2011-0411
    in reverse): refused, never handed to the TLS layer or to libldap."""
    sock.settimeout(timeout)
    sock.sendall(ber.starttls_request())
    buffer = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            raise DirectoryUnavailable(f"{endpoint} closed the connection during StartTLS")
        buffer += chunk
        try:
            parsed = ber.split(buffer, _MAX_STARTTLS_RESPONSE)
        except ber.BerError as exc:
            raise DirectoryUnavailable(f"{endpoint}: bad StartTLS response ({exc})") from None
        if parsed is not None:
            break
    if parsed[2]:
        raise DirectoryUnavailable(f"{endpoint} sent data after its StartTLS response")
    try:
        code = ber.starttls_result(buffer)
    except ber.BerError as exc:
        raise DirectoryUnavailable(f"{endpoint}: bad StartTLS response ({exc})") from None
    if code != 0:
        raise DirectoryUnavailable(f"{endpoint} refused StartTLS (result code {code})")


class _Relay:
    """libldap's plaintext, carried over a socketpair into a TLS connection
    that Python's ssl made (see the module docstring for why)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.closed = threading.Event()

    async def start(
        self, tls: tuple[asyncio.StreamReader, asyncio.StreamWriter], outer: socket.socket
    ) -> None:
        local = await asyncio.open_connection(sock=outer)
        self._writers = [tls[1], local[1]]
        pipes = [
            asyncio.create_task(self._pipe(tls[0], local[1])),
            asyncio.create_task(self._pipe(local[0], tls[1])),
        ]
        self._tasks = [*pipes, asyncio.create_task(self._watch(pipes))]

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            with contextlib.suppress(OSError, ssl.SSLError, asyncio.IncompleteReadError):
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
        finally:
            # Graceful: what is buffered (libldap's UnbindRequest) goes out
            # first, then TLS close_notify.
            writer.close()

    async def _watch(self, pipes: Sequence[asyncio.Task[None]]) -> None:
        # Either side ending ends both: libldap sees EOF when the server
        # goes, the server sees the connection close when libldap unbinds.
        await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        self.closed.set()
        for writer in self._writers:
            writer.close()

    def _abort(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        for task in self._tasks:
            task.cancel()
        self.closed.set()

    def abort(self) -> None:
        """Drop both connections now (from any thread)."""
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            self._loop.call_soon_threadsafe(self._abort)
