"""The connection under libldap: StartTLS by hand (BER), and the relay
that carries libldap's plaintext through Python's TLS."""

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

# RFC 4511 section 4.14.1: the StartTLS extended request's OID.
_STARTTLS_OID: Final = b"1.3.6.1.4.1.1466.20037"
# A StartTLS response is a few dozen bytes; anything near this is not one.
_MAX_STARTTLS_RESPONSE: Final = 16384


def _ber(tag: int, content: bytes) -> bytes:
    """One BER element with a definite length (RFC 4511 section 5.1)."""
    n = len(content)
    if n < 0x80:
        return bytes((tag, n)) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(size))) + size + content


def _ber_split(data: bytes) -> tuple[int, bytes, bytes] | None:
    """(tag, content, rest) of the first element, or None if incomplete.
    ValueError on what LDAP never sends (indefinite or huge lengths)."""
    if len(data) < 2:
        return None
    tag, first = data[0], data[1]
    if first < 0x80:
        start, length = 2, first
    else:
        count = first & 0x7F
        if count == 0 or count > 4:
            raise ValueError("unsupported BER length")
        if len(data) < 2 + count:
            return None
        start, length = 2 + count, int.from_bytes(data[2 : 2 + count], "big")
    if start + length > _MAX_STARTTLS_RESPONSE:
        raise ValueError("message too long")
    if len(data) < start + length:
        return None
    return tag, data[start : start + length], data[start + length :]


def _starttls_request() -> bytes:
    # LDAPMessage { messageID 1, extendedReq [APPLICATION 23] { requestName [0] OID } }
    return _ber(0x30, _ber(0x02, b"\x01") + _ber(0x77, _ber(0x80, _STARTTLS_OID)))


def _starttls_result(message: bytes) -> int:
    """The resultCode of a StartTLS response (RFC 4511 section 4.14.2);
    ValueError when the message is anything else (e.g. a notice of
    disconnection, messageID 0)."""
    outer = _ber_split(message)
    if outer is None or outer[0] != 0x30:
        raise ValueError("not an LDAPMessage")
    msgid = _ber_split(outer[1])
    if msgid is None or msgid[0] != 0x02 or msgid[1] != b"\x01":
        raise ValueError("not the answer to our request")
    op = _ber_split(msgid[2])
    if op is None or op[0] != 0x78:  # extendedResp [APPLICATION 24]
        raise ValueError("not an extended response")
    code = _ber_split(op[1])
    if code is None or code[0] != 0x0A or not 1 <= len(code[1]) <= 4:
        raise ValueError("no result code")
    return int.from_bytes(code[1], "big")


def _start_tls(sock: socket.socket, endpoint: Endpoint, timeout: float) -> None:
    """Ask for StartTLS on a fresh connection; raise unless the server agrees.

    Bytes the server sends after its response, before our handshake, are an
    injection attempt (the STARTTLS response-injection class, CVE-2011-0411
    in reverse): refused, never handed to the TLS layer or to libldap."""
    sock.settimeout(timeout)
    sock.sendall(_starttls_request())
    buffer = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            raise DirectoryUnavailable(f"{endpoint} closed the connection during StartTLS")
        buffer += chunk
        try:
            parsed = _ber_split(buffer)
        except ValueError as exc:
            raise DirectoryUnavailable(f"{endpoint}: bad StartTLS response ({exc})") from None
        if parsed is not None:
            break
    if parsed[2]:
        raise DirectoryUnavailable(f"{endpoint} sent data after its StartTLS response")
    try:
        code = _starttls_result(buffer)
    except ValueError as exc:
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
