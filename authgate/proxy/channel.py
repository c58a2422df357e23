"""A byte channel over an asyncio transport, with a buffer we own.

asyncio's StreamReader keeps bytes it has buffered across
`StreamWriter.start_tls()`, so plaintext pipelined behind STARTTLS could be
read back as if it had arrived inside TLS (CVE-2011-0411). Owning the buffer
lets `start_tls()` drop those bytes at the exact moment the handshake
starts. The channel also gives the splice back-pressure in both directions:
reading pauses while the buffer is over its high-water mark, and `drain()`
waits while the transport's write buffer is full.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from typing import Any, cast

HIGH_WATER = 256 * 1024  # pause reading from the peer above this many buffered bytes

# A splice filter for one direction: what was received -> (bytes for the
# sink, bytes back to the source, close both sides).
Through = Callable[[bytes], tuple[bytes, bytes, bool]]


class ChannelClosed(ConnectionError):
    """The peer closed or reset the connection."""


class Channel(asyncio.Protocol):
    # Two per session (client and backend side): no per-instance dict.
    __slots__ = (
        "_buf",
        "_data_waiter",
        "_drain_waiters",
        "_eof",
        "_eof_deferred",
        "_half_close",
        "_held",
        "_lost",
        "_over_tls",
        "_paused_reading",
        "_sink",
        "_source",
        "_through",
        "_write_paused",
        "_wrote_eof",
        "defer_eof",
        "ended",
        "forwarded",
        "transport",
    )

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._eof = False
        self._lost = False
        self._paused_reading = False
        self._over_tls = False
        self._data_waiter: asyncio.Future[Any] | None = None
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        # Splice: bytes go straight to `_sink` from data_received (no task,
        # no future per chunk); `_source` is the channel feeding us, paused
        # while our transport's write buffer is full.
        self._sink: Channel | None = None
        self._source: Channel | None = None
        self._half_close = True
        # A filtered splice (SMTP): what we receive passes `_through` first.
        self._through: Through | None = None
        self._held = False  # reading paused: the filter holds much of our input
        # True while the filter still holds input of ours for the sink: our
        # EOF must not overtake it.
        self.defer_eof: Callable[[], bool] | None = None
        self._eof_deferred = False
        self._wrote_eof = False
        self.ended: asyncio.Future[None] | None = None  # made by forward_to
        self.forwarded = 0

    # -------------------------------------------------- asyncio.Protocol side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        # Implicit TLS: asyncio hands us the TLS transport once the handshake is done.
        self._over_tls = transport.get_extra_info("sslcontext") is not None

    def data_received(self, data: bytes) -> None:
        sink = self._sink
        if sink is not None:
            self.forwarded += len(data)
            through = self._through
            if through is None:
                sink._splice_write(data)
                return
            data, back, close = through(data)
            if data:
                sink._splice_write(data)
            if back:
                self._splice_write(back)
            if close:
                sink.close()
                self.close()
            elif sink._eof_deferred:
                sink._pass_eof()  # what the filter held for us has gone out
            return
        self._buf += data
        if len(self._buf) > HIGH_WATER and not self._paused_reading and self.transport:
            self._paused_reading = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        if self._sink is not None:
            if self._half_close:
                self._eof_deferred = True
                self._pass_eof()
            self._end()
        # Keep a plain TCP transport open for writing: a half-closed client may
        # still be waiting for the rest of the backend's answer. (TLS has no
        # half-close in asyncio; returning True there only draws a warning.)
        return not self._over_tls

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._eof = True
        self._wake()
        self._end()
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    def pause_writing(self) -> None:
        self._write_paused = True
        source = self._source
        if source is not None and source.transport is not None and not source._lost:
            source.transport.pause_reading()  # back-pressure across the splice

    def resume_writing(self) -> None:
        self._write_paused = False
        source = self._source
        if (
            source is not None
            and source.transport is not None
            and not source._lost
            and not source._held
        ):
            source.transport.resume_reading()
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    def forward_to(
        self,
        sink: Channel,
        *,
        half_close: bool = True,
        through: Through | None = None,
        ended: asyncio.Future[None] | None = None,
    ) -> None:
        """From now on, hand every byte received straight to `sink`
        (after what is already buffered), through the filter `through` if
        given. `ended` (made here unless given: the splice shares one
        between both directions) resolves at our EOF or when the connection
        is lost; at our EOF `sink` is half-closed too, unless `half_close`
        is False (the caller closes it anyway: one shutdown() the fewer)."""
        self.ended = ended if ended is not None else asyncio.get_running_loop().create_future()
        self._half_close = half_close
        self._through = through
        self._sink = sink
        if self._buf:
            pending = bytes(self._buf)
            self._buf.clear()
            self.data_received(pending)
        sink._source = self
        if self._paused_reading and self.transport is not None and not self._lost:
            self._paused_reading = False
            if not self._held:
                self.transport.resume_reading()
        if self._eof:
            if half_close:
                self._eof_deferred = True
                self._pass_eof()
            self._end()

    def _end(self) -> None:
        if self.ended is not None and not self.ended.done():
            self.ended.set_result(None)

    def _splice_write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not self._lost and not self._wrote_eof:
            transport.write(data)

    def _pass_eof(self) -> None:
        """Half-close the sink after our EOF, unless the filter still holds
        input of ours for it (then the next filtered write calls again)."""
        if self._sink is None or (self.defer_eof is not None and self.defer_eof()):
            return
        self._eof_deferred = False
        self._sink.write_eof()

    def hold(self) -> None:
        """Stop reading: a splice filter holds much of our input already."""
        if not self._held:
            self._held = True
            if self.transport is not None and not self._lost:
                self.transport.pause_reading()

    def release(self) -> None:
        """The filter holds little of our input again: read on."""
        if self._held:
            self._held = False
            sink = self._sink
            sink_full = sink is not None and sink._write_paused
            if self.transport is not None and not self._lost and not sink_full:
                self.transport.resume_reading()

    def _wake(self) -> None:
        if self._data_waiter is not None and not self._data_waiter.done():
            self._data_waiter.set_result(None)

    # ----------------------------------------------------------- our side

    @property
    def lost(self) -> bool:
        """The connection is gone (not merely half-closed)."""
        return self._lost

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._buf

    @property
    def peer_ended(self) -> bool:
        """The peer has ended its side (bytes it sent before may still be
        buffered)."""
        return self._eof

    def buffered(self) -> bytes:
        """What has arrived and not been read yet (a copy; left in place)."""
        return bytes(self._buf)

    def watch(self, waiter: asyncio.Future[Any] | None) -> None:
        """Resolve `waiter` at the next byte, EOF or loss of the connection,
        without reading anything (None: stop). For a connection nobody
        reads yet (a warm backend connection, authgate.proxy.warm); read()
        replaces it with its own waiter."""
        self._data_waiter = waiter

    async def read(self, timeout: float | None = None) -> bytes:
        """Everything buffered (at least one byte), or b"" at end of stream.
        TimeoutError after `timeout` seconds without a byte (a timer on the
        one future we wait on: cheaper than asyncio.wait_for's task)."""
        while not self._buf:
            if self._eof:
                return b""
            loop = asyncio.get_running_loop()
            waiter = self._data_waiter = loop.create_future()
            timer = None if timeout is None else loop.call_later(timeout, _expire, waiter)
            try:
                await waiter
            finally:
                self._data_waiter = None
                if timer is not None:
                    timer.cancel()
        data = bytes(self._buf)
        self._buf.clear()
        if self._paused_reading and self.transport is not None and not self._lost:
            self._paused_reading = False
            self.transport.resume_reading()
        return data

    def write(self, data: bytes) -> None:
        if self.transport is None or self._lost or self.transport.is_closing():
            raise ChannelClosed("connection closed")
        self.transport.write(data)

    async def drain(self) -> None:
        if self._lost:
            raise ChannelClosed("connection closed")
        if self._write_paused:
            waiter = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(waiter)
            await waiter
            if self._lost:
                raise ChannelClosed("connection closed")

    def can_write_eof(self) -> bool:
        return (
            self.transport is not None
            and not self._lost
            and not self.transport.is_closing()
            and self.transport.can_write_eof()
        )

    def write_eof(self) -> None:
        if self.can_write_eof():
            assert self.transport is not None
            self._wrote_eof = True
            # The peer may already be gone (ENOTCONN): nothing left to tell it.
            with contextlib.suppress(OSError):
                self.transport.write_eof()

    async def start_tls(
        self,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        timeout: float = 30.0,
    ) -> int:
        """Run the TLS handshake on this connection. Returns how many
        plaintext bytes were buffered and thrown away (they arrived before
        the handshake and must never be executed)."""
        if self.transport is None or self._lost:
            raise ChannelClosed("connection closed")
        await self.drain()
        discarded = len(self._buf)
        self._buf.clear()
        loop = asyncio.get_running_loop()
        try:
            new_transport = await loop.start_tls(
                self.transport,
                self,
                context,
                server_side=server_side,
                server_hostname=server_hostname,
                ssl_handshake_timeout=timeout,
            )
        except BaseException as exc:
            self.handshake_failed(exc)
            if isinstance(exc, ConnectionError) and not isinstance(exc, ChannelClosed):
                # asyncio's SSLProtocol raises a bare ConnectionResetError
                # (no text) when the peer closes mid-handshake.
                raise ChannelClosed(handshake_failure(exc)) from None
            raise
        if new_transport is None:
            self.handshake_failed(None)
            raise ChannelClosed("connection closed during the TLS handshake")
        self.transport = new_transport
        self._over_tls = True
        return discarded

    def handshake_failed(self, exc: BaseException | None) -> None:
        """The TLS handshake on our connection failed (or the peer closed
        during it): end this channel as if the connection were lost.
        asyncio's SSLProtocol tells its app protocol nothing when the
        connection ends before the handshake completes (no connection_made
        on an implicit-TLS accept, no connection_lost after a failed
        start_tls), so without this the channel's waiters, `ended` and
        `lost` would never learn the peer is gone."""
        if not self._lost:
            self.connection_lost(exc if isinstance(exc, Exception) else None)

    @property
    def tls(self) -> ssl.SSLObject | None:
        if self.transport is None:
            return None
        obj = self.transport.get_extra_info("ssl_object")
        return cast(ssl.SSLObject | None, obj)

    def peername(self) -> tuple[str, int]:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        if not peer:
            return ("0.0.0.0", 0)  # noqa: S104 - a placeholder address, not a bind
        return (str(peer[0]), int(peer[1]))

    def sockname(self) -> tuple[str, int]:
        sock = self.transport.get_extra_info("sockname") if self.transport else None
        if not sock:
            return ("0.0.0.0", 0)  # noqa: S104
        return (str(sock[0]), int(sock[1]))

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def handshake_failure(exc: BaseException) -> str:
    """A log text for a failed TLS handshake: the exception's own text,
    or what a bare ConnectionError from asyncio means (the peer closed)."""
    text = str(exc)
    if text:
        return f"TLS handshake failed: {text}"
    if isinstance(exc, ConnectionError):
        return "TLS handshake failed: the peer closed the connection"
    return f"TLS handshake failed: {type(exc).__name__}"


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


async def open_channel(
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    timeout: float = 10.0,
) -> Channel:
    """Connect to host:port (optionally implicit TLS) within `timeout`."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        _, protocol = await loop.create_connection(
            Channel,
            host,
            port,
            ssl=ssl_context,
            server_hostname=server_hostname if ssl_context else None,
            ssl_handshake_timeout=timeout if ssl_context else None,
        )
    return protocol
