"""Listeners: accept connections and run a ClientSession for each."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterable

from authgate.config import TLSMode
from authgate.proxy.channel import Channel
from authgate.proxy.runtime import ListenerRuntime
from authgate.proxy.session import ClientSession

log = logging.getLogger("authgate")


class _Accepted(Channel):
    """A client connection; starts its session once connected (after the
    handshake, on implicit-TLS listeners)."""

    def __init__(self, gateway: Gateway, runtime: ListenerRuntime) -> None:
        super().__init__()
        self._gateway = gateway
        self._runtime = runtime

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Replies are small and lockstep: never hold them back (Nagle).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._gateway._start_session(self._runtime, self)


class Gateway:
    """All listeners of one configuration."""

    def __init__(self, runtimes: Iterable[ListenerRuntime]) -> None:
        self.runtimes = list(runtimes)
        self._servers: list[asyncio.Server] = []
        self._sessions: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for runtime in self.runtimes:
            listener = runtime.listener
            implicit = listener.tls is TLSMode.IMPLICIT
            server = await loop.create_server(
                lambda rt=runtime: _Accepted(self, rt),
                listener.listen.host,
                listener.listen.port,
                ssl=runtime.server_tls if implicit else None,
                ssl_handshake_timeout=runtime.limits.handshake_timeout if implicit else None,
                reuse_address=True,
            )
            self._servers.append(server)
            log.info(
                "listening: %s (%s, tls %s) on %s -> %s (%s)",
                listener.name,
                listener.protocol.value,
                listener.tls.value,
                ", ".join(_fmt(s.getsockname()) for s in server.sockets),
                listener.backend.address,
                listener.backend.mode.value,
            )

    def addresses(self) -> dict[str, tuple[str, int]]:
        """Listener name -> bound (host, port): ports may have been 0."""
        result = {}
        for runtime, server in zip(self.runtimes, self._servers, strict=True):
            host, port = server.sockets[0].getsockname()[:2]
            result[runtime.listener.name] = (host, port)
        return result

    def _start_session(self, runtime: ListenerRuntime, channel: Channel) -> None:
        task = asyncio.ensure_future(ClientSession(runtime, channel).run())
        self._sessions.add(task)
        task.add_done_callback(self._sessions.discard)

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    async def stop(self, drain: float = 10.0) -> None:
        """Stop accepting; give sessions `drain` seconds, then cancel them."""
        for server in self._servers:
            server.close()
        if self._sessions:
            _, pending = await asyncio.wait(set(self._sessions), timeout=drain)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()


def _fmt(sockname: tuple[str, int] | tuple[str, int, int, int]) -> str:
    host, port = sockname[0], sockname[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
