"""Listeners: accept connections and run a ClientSession for each."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Iterable

from authgate.config import TLSMode
from authgate.defence import DefenceSettings, Guard
from authgate.policy import client_ip
from authgate.proxy import proxy_protocol
from authgate.proxy.auditing import AuditTrail
from authgate.proxy.channel import Channel
from authgate.proxy.runtime import ListenerRuntime
from authgate.proxy.session import ClientSession
from authgate.proxy.tls import tune_tls_buffers

log = logging.getLogger("authgate")


class _Accepted(Channel):
    """A client connection; starts its session once connected (after the
    handshake, on implicit-TLS listeners)."""

    def __init__(self, gateway: Gateway, name: str, client: tuple[str, int] | None = None) -> None:
        super().__init__()
        self._gateway = gateway
        self._name = name
        self.client = client  # the real client, when a PROXY header named it

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio already sets TCP_NODELAY on every TCP transport, so small
        # lockstep replies are never held back by Nagle (nginx's mail proxy is).
        super().connection_made(transport)
        self._gateway._start_session(self._gateway.runtime(self._name), self)


def _same_socket(a: ListenerRuntime, b: ListenerRuntime) -> bool:
    """Whether a reload can keep `a`'s sockets for `b`: the same addresses
    (all of them, in order: port 0 after the first means the first's port),
    the same TLS mode and the same PROXY protocol setting (the accept path
    differs: a listener must never start or stop reading headers in place)."""
    return (
        a.listener.listen == b.listener.listen
        and a.listener.tls is b.listener.tls
        and a.listener.proxy_protocol == b.listener.proxy_protocol
    )


# Bursts of connects (mail clients polling at the full minute) must not
# overflow the accept queue; the kernel caps this at net.core.somaxconn.
BACKLOG = 4096
PROXY_HEADER_TIMEOUT = 5.0
ACCEPT_RETRY_DELAY = 0.1


class _ProxiedServer:
    """A listener behind a TCP load balancer (PROXY protocol).

    Accepts on a plain socket and reads the header from trusted balancers
    byte-exactly, before asyncio (and TLS, on implicit-TLS listeners) sees
    the connection: whatever follows the header is the client's."""

    def __init__(
        self,
        gateway: Gateway,
        name: str,
        ssl_context: ssl.SSLContext | None,
        *,
        reuse_port: bool = False,
    ) -> None:
        self._reuse_port = reuse_port
        self._gateway = gateway
        self._name = name
        self._ssl = ssl_context
        self.sockets: list[socket.socket] = []
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPV6_V6ONLY (dualstack_ipv6=False sets it): [::]:143 takes IPv6
        # only, so 0.0.0.0:143 can be bound beside it, as asyncio's servers do.
        sock = socket.create_server(
            (host, port),
            family=family,
            backlog=BACKLOG,
            reuse_port=self._reuse_port,
            dualstack_ipv6=False,
        )
        sock.setblocking(False)
        self.sockets = [sock]
        self._task = asyncio.ensure_future(self._accept_forever(sock))

    async def _accept_forever(self, listening: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(listening)
            except OSError as exc:
                # Out of descriptors (EMFILE/ENFILE) in a flood, or a client
                # gone before accept: wait a moment and go on accepting, as
                # asyncio's own servers do; never let the listener die.
                log.warning("%s: accept failed: %s", self._name, exc)
                await asyncio.sleep(ACCEPT_RETRY_DELAY)
                continue
            task = asyncio.ensure_future(self._hand_over(sock))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _hand_over(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        runtime = self._gateway.runtime(self._name)
        try:
            peer = sock.getpeername()
        except OSError:  # reset while waiting to be accepted
            sock.close()
            return
        client = None
        if peer[0] in runtime.listener.trusted_proxies:
            try:
                async with asyncio.timeout(PROXY_HEADER_TIMEOUT):
                    header = await proxy_protocol.read_header(lambda n: loop.sock_recv(sock, n))
            except (TimeoutError, OSError, proxy_protocol.ProxyHeaderError) as exc:
                log.warning("%s %s: bad or missing PROXY header: %s", self._name, peer[0], exc)
                sock.close()
                return
            # LOCAL (the balancer's health check) names nobody: the peer itself.
            client = header.source
        try:
            await loop.connect_accepted_socket(
                lambda: _Accepted(self._gateway, self._name, client),
                sock,
                ssl=self._ssl,
                ssl_handshake_timeout=runtime.limits.handshake_timeout if self._ssl else None,
            )
        except (OSError, ssl.SSLError) as exc:
            log.info("%s %s: connection failed: %s", self._name, peer[0], exc)
            sock.close()

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for task in self._pending:
            task.cancel()
        for sock in self.sockets:
            sock.close()

    async def wait_closed(self) -> None:
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


Server = asyncio.Server | _ProxiedServer


class _Listening:
    """One listener's servers, one per configured address: the listener
    keeps one name (logs, audit, backend, limits) across all its sockets."""

    def __init__(self, servers: list[Server]) -> None:
        self.servers = servers

    @property
    def sockets(self) -> list[socket.socket]:
        return [sock for server in self.servers for sock in server.sockets]

    def close(self) -> None:
        for server in self.servers:
            server.close()

    async def wait_closed(self) -> None:
        for server in self.servers:
            await server.wait_closed()


class Gateway:
    """All listeners of one configuration.

    `reload()` swaps in new settings (config, users, certificates) for new
    connections; sessions already running keep the settings they began with.
    """

    def __init__(
        self,
        runtimes: Iterable[ListenerRuntime],
        defence: DefenceSettings,
        audit: AuditTrail | None = None,
        guard: Guard | None = None,
        *,
        reuse_port: bool = False,
    ) -> None:
        # Several worker processes bind the same ports; the kernel spreads
        # new connections over them (SO_REUSEPORT).
        self.reuse_port = reuse_port
        self.audit = audit or AuditTrail(None)
        self._runtimes: dict[str, ListenerRuntime] = {rt.listener.name: rt for rt in runtimes}
        # One brute-force guard for all listeners, kept across reloads.
        self.guard = guard or Guard(defence)
        self._pruner: asyncio.Task[None] | None = None
        self._servers: dict[str, _Listening] = {}
        self._sessions: set[asyncio.Task[None]] = set()
        self._per_address: dict[str, int] = {}

    @property
    def runtimes(self) -> list[ListenerRuntime]:
        return list(self._runtimes.values())

    def runtime(self, name: str) -> ListenerRuntime:
        return self._runtimes[name]

    async def start(self) -> None:
        tune_tls_buffers()
        for runtime in self._runtimes.values():
            await self._listen(runtime)
        self._pruner = asyncio.ensure_future(self._prune_forever())
        self.audit.start()

    async def _prune_forever(self) -> None:
        while True:
            await asyncio.sleep(60)
            self.guard.prune()

    async def _listen(self, runtime: ListenerRuntime) -> None:
        loop = asyncio.get_running_loop()
        listener = runtime.listener
        name = listener.name
        ssl_context = None
        if listener.tls is TLSMode.IMPLICIT and runtime.server_tls is not None:
            ssl_context = runtime.server_tls

            # A reload brings a new certificate: pick the listener's current
            # context at each handshake, so the socket never has to close.
            def current_context(
                obj: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext
            ) -> None:
                fresh = self._runtimes[name].server_tls
                if fresh is not None and fresh is not obj.context:
                    obj.context = fresh

            ssl_context.sni_callback = current_context
        servers: list[Server] = []
        try:
            for address in listener.listen:
                # Port 0 after the first address: the port the first socket got.
                port = address.port or (servers[0].sockets[0].getsockname()[1] if servers else 0)
                server: Server
                if listener.proxy_protocol:
                    server = _ProxiedServer(self, name, ssl_context, reuse_port=self.reuse_port)
                    await server.start(address.host, port)
                else:
                    server = await loop.create_server(
                        lambda: _Accepted(self, name),
                        address.host,
                        port,
                        ssl=ssl_context,
                        ssl_handshake_timeout=(
                            runtime.limits.handshake_timeout if ssl_context else None
                        ),
                        reuse_address=True,
                        reuse_port=self.reuse_port or None,
                        backlog=BACKLOG,
                    )
                servers.append(server)
        except BaseException:
            for server in servers:  # all of a listener's sockets, or none
                server.close()
            raise
        server_group = self._servers[name] = _Listening(servers)
        log.info(
            "listening: %s (%s, tls %s) on %s -> %s (%s)",
            name,
            listener.protocol.value,
            listener.tls.value,
            ", ".join(_fmt(s.getsockname()) for s in server_group.sockets),
            listener.backend.address,
            listener.backend.mode.value,
        )

    async def reload(self, runtimes: Iterable[ListenerRuntime], defence: DefenceSettings) -> None:
        """Apply a new configuration: same listeners swap settings in place;
        removed ones stop listening; new ones start. Failure counters and
        blocks survive (a reload must not pardon an attacker)."""
        self.guard.settings = defence
        fresh = {rt.listener.name: rt for rt in runtimes}
        for name in list(self._runtimes):
            if name not in fresh or not _same_socket(self._runtimes[name], fresh[name]):
                server = self._servers.pop(name)
                server.close()
                del self._runtimes[name]
                log.info("listener %s stopped (removed or moved)", name)
        for name, runtime in fresh.items():
            if name in self._runtimes:
                self._runtimes[name] = runtime
            else:
                self._runtimes[name] = runtime
                await self._listen(runtime)

    def addresses(self) -> dict[str, tuple[str, int]]:
        """Listener name -> bound (host, port) of its first socket: ports
        may have been 0. `all_addresses()` has every socket."""
        return {name: addresses[0] for name, addresses in self.all_addresses().items()}

    def all_addresses(self) -> dict[str, list[tuple[str, int]]]:
        """Listener name -> bound (host, port) of each of its sockets, in
        the order of its `listen` addresses."""
        return {
            name: [(s.getsockname()[0], s.getsockname()[1]) for s in server.sockets]
            for name, server in self._servers.items()
        }

    def _start_session(self, runtime: ListenerRuntime, channel: Channel) -> None:
        limits = runtime.limits
        client = channel.client if isinstance(channel, _Accepted) else None
        address = unmap_text((client or channel.peername())[0])
        per_address = self._per_address.get(address, 0)
        if len(self._sessions) >= limits.max_connections or (
            per_address >= limits.max_connections_per_address
        ):
            # Over a limit: the protocol's temporary-failure greeting, not a
            # silent reset, so well-behaved clients back off and retry.
            log.warning(
                "%s %s: refused, %s",
                runtime.listener.name,
                address,
                "too many connections"
                if per_address < limits.max_connections_per_address
                else "too many connections from this address",
            )
            with contextlib.suppress(ConnectionError):
                channel.write(runtime.parts.busy)
            channel.close()
            return
        self._per_address[address] = per_address + 1
        task = asyncio.ensure_future(
            ClientSession(runtime, channel, self.guard, self.audit, client=client).run()
        )
        self._sessions.add(task)
        task.add_done_callback(lambda t: self._session_done(t, address))

    def _session_done(self, task: asyncio.Task[None], address: str) -> None:
        self._sessions.discard(task)
        left = self._per_address.get(address, 1) - 1
        if left > 0:
            self._per_address[address] = left
        else:
            self._per_address.pop(address, None)

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    async def stop(self, drain: float = 10.0) -> None:
        """Stop accepting; give sessions `drain` seconds, then cancel them."""
        if self._pruner is not None:
            self._pruner.cancel()
        for server in self._servers.values():
            server.close()
        if self._sessions:
            _, pending = await asyncio.wait(set(self._sessions), timeout=drain)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        for server in self._servers.values():
            await server.wait_closed()
        await self.audit.close()
        self._servers.clear()


def _fmt(sockname: tuple[str, int] | tuple[str, int, int, int]) -> str:
    host, port = sockname[0], sockname[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def unmap_text(address: str) -> str:
    """One key per client: ::ffff:10.1.2.3 and 10.1.2.3 are the same host."""
    ip = client_ip(address)
    return address if ip is None else str(ip)
