"""Listeners: accept connections and run a ClientSession for each."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import socket
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from authgate.config import Address, TLSMode
from authgate.defence import DefenceSettings, Guard
from authgate.metrics import recorder
from authgate.policy import Protocol
from authgate.proxy import proxy_protocol
from authgate.proxy.auditing import AuditTrail
from authgate.proxy.channel import Channel, handshake_failure
from authgate.proxy.ldap_session import LdapSession
from authgate.proxy.lograte import LogThrottle
from authgate.proxy.routes import OWN_SOCKETS, check_targets, run_checks
from authgate.proxy.routes import own_address as _own
from authgate.proxy.runtime import ListenerRuntime
from authgate.proxy.session import ClientSession
from authgate.proxy.tls import tune_tls_buffers
from authgate.proxy.warm import WarmPool

log = logging.getLogger("authgate")


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
ACCEPT_BATCH = 64  # accept() calls per readiness event, so one listener cannot hog the loop
# Out of descriptors (or kernel memory), a listener stops accepting this
# long and tries again; the connections wait in the kernel's queue meanwhile.
ACCEPT_PAUSE = 0.1
PROXY_HEADER_TIMEOUT = 5.0
# accept() failing for lack of resources: pause, the shortage is not ours to fix.
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


@dataclass(slots=True)
class _Connection:
    """An accepted socket and the places it is counted until it ends."""

    sock: socket.socket
    listener: str = ""  # its listener's name (for the metrics)
    keys: list[str] = field(default_factory=list)  # per-address counts it holds
    # Given to an asyncio transport, which closes it from then on.
    handed: bool = False


class _Listener:
    """A listener's sockets and authgate's own accept loop.

    asyncio's `create_server` would not do: it calls the protocol only after
    the TLS handshake (so handshake-pending connections escape every cap),
    and out of descriptors it logs each failed accept() with a traceback,
    thousands of lines a second. Here the Gateway admits or refuses each
    connection the moment it is accepted, and an accept() that fails for
    lack of resources pauses the listener briefly, with one warning per
    interval, while established sessions carry on."""

    def __init__(self, gateway: Gateway, name: str, *, reuse_port: bool = False) -> None:
        self._gateway = gateway
        self._name = name
        self._reuse_port = reuse_port
        self.sockets: list[socket.socket] = []
        self._resume: asyncio.TimerHandle | None = None
        self._closed = False

    async def start(self, addresses: Iterable[Address]) -> None:
        """Bind every address (a host name may give several sockets), all
        of them or none."""
        loop = asyncio.get_running_loop()
        seen = set()
        try:
            for entry in addresses:
                # Port 0 after the first address: the port the first socket got.
                port = entry.port or (self.sockets[0].getsockname()[1] if self.sockets else 0)
                infos = await loop.getaddrinfo(
                    entry.host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
                )
                for family, kind, proto, _, address in infos:
                    if (family, address) in seen:
                        continue
                    seen.add((family, address))
                    self.sockets.append(_bound(family, kind, proto, address, self._reuse_port))
        except BaseException:
            self.close()
            raise
        OWN_SOCKETS.update(_own(sock) for sock in self.sockets)  # loop safety
        self._watch()

    def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in self.sockets:
            loop.add_reader(sock.fileno(), self._accept, sock, loop)

    def _unwatch(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in self.sockets:
            if sock.fileno() >= 0:
                loop.remove_reader(sock.fileno())

    def _accept(self, listening: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, peer = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client gave up while it waited in the queue
            except OSError as exc:
                self._accept_failed(exc)
                return
            self._gateway._admit(self._name, sock, peer, loop)

    def _accept_failed(self, exc: OSError) -> None:
        notices = self._gateway.notices
        if exc.errno not in _RESOURCE_ERRNOS:
            # A network error of one queued connection (Linux reports some
            # on accept): that connection is lost, the next may be fine.
            notices.warning(log, f"{self._name}:accept", "%s: accept failed: %s", self._name, exc)
            return
        notices.warning(
            log,
            f"{self._name}:accept-resources",
            "%s: cannot accept (%s): new connections wait, established sessions go on",
            self._name,
            exc.strerror or exc,
        )
        self._unwatch()
        self._resume = asyncio.get_running_loop().call_later(ACCEPT_PAUSE, self._resumed)

    def _resumed(self) -> None:
        self._resume = None
        if not self._closed:
            self._watch()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._resume is not None:
            self._resume.cancel()
        else:
            with contextlib.suppress(RuntimeError):  # no loop: never started
                self._unwatch()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                OWN_SOCKETS.discard(_own(sock))
            sock.close()

    async def wait_closed(self) -> None:
        return


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
        self._checks: asyncio.Future[None] | None = None  # active backend health checks
        self._servers: dict[str, _Listener] = {}
        # One task per accepted connection, from accept() to the end.
        self._sessions: set[asyncio.Task[None]] = set()
        self._per_address: dict[str, int] = {}  # defence key -> connections
        # Warnings a flood could repeat without end go through this.
        self.notices = LogThrottle()
        # The sessions being served, for `authgate sessions` (control socket).
        self.live_sessions: set[Any] = set()
        # Makes the client-side channel of each accepted connection, by
        # listener name. The pytest plugin swaps in a Channel subclass that
        # records transcripts and plays hostile-server scenarios
        # (authgate.testing.transcripts, authgate.testing.scenarios).
        self.channel_factory: Callable[[str], Channel] = _plain_channel

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
        self._start_checks()
        self._start_warm()
        self.audit.start()

    def _start_warm(self) -> None:
        """Fill the warm connections of the runtimes in force."""
        for pool in self._warm_pools():
            pool.start()

    def _warm_pools(self) -> list[WarmPool]:
        """Every warm pool of the runtimes in force."""
        return _unique_pools(self._runtimes.values())

    def _start_checks(self) -> None:
        """Active backend health checks (authgate.proxy.routes), for the
        runtimes in force: restarted by a reload."""
        if self._checks is not None:
            self._checks.cancel()
        routes = [rt.routes for rt in self._runtimes.values() if rt.routes is not None]
        targets = check_targets(routes)
        self._checks = None
        if targets:
            timeout = next(iter(self._runtimes.values())).limits.connect_timeout
            self._checks = asyncio.ensure_future(run_checks(targets, timeout))

    async def _prune_forever(self) -> None:
        while True:
            await asyncio.sleep(60)
            self.guard.prune()

    async def _listen(self, runtime: ListenerRuntime) -> None:
        listener = runtime.listener
        server = _Listener(self, listener.name, reuse_port=self.reuse_port)
        await server.start(listener.listen)
        self._servers[listener.name] = server
        log.info(
            "listening: %s (%s, tls %s) on %s -> %s (%s)",
            listener.name,
            listener.protocol.value,
            listener.tls.value,
            ", ".join(_fmt(s.getsockname()) for s in server.sockets),
            listener.backend.address,
            listener.backend.mode.value,
        )

    async def reload(self, runtimes: Iterable[ListenerRuntime], defence: DefenceSettings) -> None:
        """Apply a new configuration: same listeners swap settings in place;
        removed ones stop listening; new ones start. Failure counters and
        blocks survive (a reload must not pardon an attacker).

        All or nothing: when a new or moved listener cannot bind, the ones
        this reload opened are closed again, the ones it stopped listen
        where they were, and the error is raised with every listener on its
        old sockets and settings."""
        fresh = {rt.listener.name: rt for rt in runtimes}
        old = dict(self._runtimes)
        stop = [n for n in old if n not in fresh or not _same_socket(old[n], fresh[n])]
        start = [n for n in fresh if n not in old or n in stop]
        # To listen again where they were if this fails: the ports really
        # bound (port 0 in the config would pick new ones).
        stopped = {name: self._bound_runtime(old[name]) for name in stop}
        # Stopped first: a listener that changes only its TLS mode or PROXY
        # setting binds the very addresses it held.
        for name in stop:
            self._servers.pop(name).close()
            del self._runtimes[name]
        try:
            for name in start:
                self._runtimes[name] = fresh[name]
                await self._listen(fresh[name])
        except BaseException:
            await self._roll_back(start, stopped)
            raise
        for name in stop:
            log.info("listener %s stopped (removed or moved)", name)
        self.guard.settings = defence
        self._runtimes.update(fresh)
        self._start_checks()
        # The old configuration's warm connections are closed (sessions
        # still running on it find none and connect themselves); the new
        # one's are made.
        self._start_warm()
        kept = {id(pool) for pool in self._warm_pools()}
        retired = _unique_pools(old.values())
        await asyncio.gather(*(pool.close() for pool in retired if id(pool) not in kept))

    def _bound_runtime(self, runtime: ListenerRuntime) -> ListenerRuntime:
        """`runtime` with its listener's addresses as its sockets are bound."""
        sockets = self.all_addresses()[runtime.listener.name]
        bound = tuple(Address(host, port) for host, port in sockets)
        return dataclasses.replace(
            runtime, listener=dataclasses.replace(runtime.listener, listen=bound)
        )

    async def _roll_back(self, started: list[str], stopped: dict[str, ListenerRuntime]) -> None:
        for name in started:
            server = self._servers.pop(name, None)
            if server is not None:
                server.close()
            self._runtimes.pop(name, None)
        for name, runtime in stopped.items():
            self._runtimes[name] = runtime
            try:
                await self._listen(runtime)
            except OSError as exc:  # its addresses were taken meanwhile
                del self._runtimes[name]
                log.error("listener %s could not listen again after a failed reload: %s", name, exc)

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

    # ------------------------------------------------------------ connections
    #
    # Every connection is counted from accept() until it ends, through the
    # TLS handshake and the PROXY header: a handshake that never finishes
    # holds a slot like any session, and gives it back when it fails or
    # times out. The per-address key is the brute-force defence's grouping
    # (IPv4 exact, IPv6 by its /ipv6_prefix, IPv4-mapped unwrapped): one
    # IPv6 host owns a whole /64 and could otherwise open 50 connections
    # from each of its addresses.
    #
    # Behind a load balancer the peer is the balancer, whose own address is
    # never capped per address (it carries everyone's connections); its
    # connections count toward max_connections from accept() on, a header
    # must come within PROXY_HEADER_TIMEOUT, and then the client it names is
    # counted and capped like a direct client. A peer on such a listener
    # that is not a trusted balancer is a direct client, capped at accept().

    def _admit(
        self, name: str, sock: socket.socket, peer: Any, loop: asyncio.AbstractEventLoop
    ) -> None:
        """A connection just accepted: serve it (a task on `loop`, the one
        accepting), or refuse it over a cap."""
        sock.setblocking(False)
        runtime = self._runtimes[name]
        listener = runtime.listener
        host = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        balancer = listener.proxy_protocol and host in listener.trusted_proxies
        key = None if balancer else self.guard.address_key(host)
        if len(self._sessions) >= runtime.limits.max_connections:
            self._refuse(runtime, sock, host, "too many connections")
            return
        if key is not None and self._over_address_cap(runtime, key):
            self._refuse(runtime, sock, host, "too many connections from this address")
            return
        connection = _Connection(sock, listener=name)
        if key is not None:
            self._count(connection, key)
        metrics = recorder()
        metrics.connection_accepted(name)
        metrics.session_started(name)
        task = loop.create_task(self._serve(runtime, connection, host, balancer))
        self._sessions.add(task)
        task.add_done_callback(lambda t: self._session_done(t, connection))

    def _over_address_cap(self, runtime: ListenerRuntime, key: str) -> bool:
        return self._per_address.get(key, 0) >= runtime.limits.max_connections_per_address

    def _count(self, connection: _Connection, key: str) -> None:
        self._per_address[key] = self._per_address.get(key, 0) + 1
        connection.keys.append(key)

    def _refuse(self, runtime: ListenerRuntime, sock: socket.socket, host: str, why: str) -> None:
        """Over a limit: on a plaintext start, the protocol's temporary-failure
        greeting, not a silent reset, so well-behaved clients back off and
        retry. Before a TLS handshake there is no way to say anything: close."""
        name = runtime.listener.name
        self.notices.warning(log, f"{name}:{why}", "%s %s: refused, %s", name, host, why)
        recorder().connection_refused(name, why.replace(" ", "-"))
        if runtime.listener.tls is not TLSMode.IMPLICIT:
            # A fresh socket's send buffer is empty: this short line fits.
            with contextlib.suppress(OSError):
                sock.send(runtime.parts.busy)
        sock.close()

    async def _serve(
        self, runtime: ListenerRuntime, connection: _Connection, host: str, balancer: bool
    ) -> None:
        listener = runtime.listener
        implicit = listener.tls is TLSMode.IMPLICIT and runtime.server_tls is not None
        sock = connection.sock
        client = None
        try:
            if balancer:
                header = await self._proxy_header(runtime, sock, host)
                if header is None:
                    return
                # LOCAL (the balancer's health check) names nobody: the peer itself.
                client = header.source
                if client is not None:
                    key = self.guard.address_key(client[0])
                    if self._over_address_cap(runtime, key):
                        why = "too many connections from this address"
                        self._refuse(runtime, sock, client[0], why)
                        return
                    self._count(connection, key)
            # (On a plaintext start the session sees a spoofed header itself.)
            elif (
                listener.proxy_protocol
                and implicit
                and not await self._no_header_before_tls(runtime, sock, host)
            ):
                return
            connection.handed = True
            # Made here, not taken from the call's result: uvloop returns its
            # own SSLProtocol there on TLS connections.
            channel = self.channel_factory(listener.name)
            try:
                await asyncio.get_running_loop().connect_accepted_socket(
                    lambda: channel,
                    sock,
                    ssl=runtime.server_tls if implicit else None,
                    ssl_handshake_timeout=runtime.limits.handshake_timeout if implicit else None,
                )
            except (OSError, ssl.SSLError) as exc:
                # Our channel never saw the connection: end it by hand.
                channel.handshake_failed(exc)
                why = handshake_failure(exc) if implicit else str(exc)
                log.info("%s %s: connection failed: %s", listener.name, host, why)
                if implicit:
                    recorder().tls_handshake(listener.name, ok=False)
                return
            if implicit:
                recorder().tls_handshake(listener.name, ok=True)
            # LDAP binds again at any time: a message-aware relay for the
            # whole session instead of pre-authentication and a splice.
            factory = LdapSession if listener.protocol is Protocol.LDAP else ClientSession
            session = factory(
                runtime, channel, self.guard, self.audit, client=client, notices=self.notices
            )
            self.live_sessions.add(session)
            try:
                await session.run()
            finally:
                self.live_sessions.discard(session)
        finally:
            if not connection.handed:
                sock.close()

    async def _proxy_header(
        self, runtime: ListenerRuntime, sock: socket.socket, host: str
    ) -> proxy_protocol.ProxiedAddress | None:
        """The header a trusted balancer sends first, read byte-exactly
        (whatever follows is the client's: on implicit TLS, its ClientHello);
        None, with a warning, when it does not come or is not valid."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(PROXY_HEADER_TIMEOUT):
                return await proxy_protocol.read_header(lambda n: loop.sock_recv(sock, n))
        except (TimeoutError, OSError, proxy_protocol.ProxyHeaderError) as exc:
            name = runtime.listener.name
            self.notices.warning(
                log,
                f"{name}:proxy-header-missing",
                "%s %s: refused, bad or missing PROXY header from a trusted proxy: %s",
                name,
                host,
                str(exc) or type(exc).__name__,
            )
            return None

    async def _no_header_before_tls(
        self, runtime: ListenerRuntime, sock: socket.socket, host: str
    ) -> bool:
        """An implicit-TLS PROXY listener, a peer that is not a trusted
        balancer: True if it starts with something other than a PROXY header
        (looked at without taking it, so the handshake gets every byte)."""
        name = runtime.listener.name
        first = await _first_bytes(sock, runtime.limits.handshake_timeout)
        if not first:
            log.info("%s %s: connection failed: nothing sent before the handshake", name, host)
            return False
        if not proxy_protocol.looks_like_header(first):
            return True
        self.notices.warning(
            log,
            f"{name}:proxy-header-spoofed",
            "%s %s: refused, PROXY header from an address not in trusted_proxies",
            name,
            host,
        )
        self.audit.note("proxy-header-refused", listener=name, client=host)
        return False

    def _session_done(self, task: asyncio.Task[None], connection: _Connection) -> None:
        self._sessions.discard(task)
        recorder().session_ended(connection.listener)
        for key in connection.keys:
            left = self._per_address.get(key, 1) - 1
            if left > 0:
                self._per_address[key] = left
            else:
                self._per_address.pop(key, None)
        connection.keys.clear()
        if not connection.handed:  # cancelled before it began
            connection.sock.close()
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("internal error serving a connection", exc_info=exc)

    def connections_from(self, address: str) -> int:
        """Connections counted against `address`'s per-address cap (its
        defence group), handshakes and PROXY headers still pending included."""
        return self._per_address.get(self.guard.address_key(address), 0)

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    async def stop(self, drain: float = 10.0) -> None:
        """Stop accepting; give sessions `drain` seconds, then cancel them."""
        if self._pruner is not None:
            self._pruner.cancel()
        if self._checks is not None:
            self._checks.cancel()
        for server in self._servers.values():
            server.close()
        await asyncio.gather(*(pool.close() for pool in self._warm_pools()))
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


def _unique_pools(runtimes: Iterable[ListenerRuntime]) -> list[WarmPool]:
    """The warm pools of `runtimes`, each once (the listeners of one build
    share their backends' pools)."""
    return list(dict.fromkeys(pool for runtime in runtimes for pool in runtime.warm_pools()))


def _plain_channel(listener: str) -> Channel:
    return Channel()


async def _first_bytes(sock: socket.socket, timeout: float) -> bytes:
    """The first bytes the peer sent, left in the socket (MSG_PEEK) so the
    TLS handshake still gets every one; b"" if none came within `timeout`
    or the peer closed."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    fd = sock.fileno()

    def readable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, readable)
    try:
        async with asyncio.timeout(timeout):
            await ready
    except TimeoutError:
        return b""
    finally:
        loop.remove_reader(fd)
    try:
        return sock.recv(len(proxy_protocol.V2_SIGNATURE), socket.MSG_PEEK)
    except OSError:
        return b""


def _bound(family: int, kind: int, proto: int, address: Any, reuse_port: bool) -> socket.socket:
    """A listening, non-blocking socket on `address`."""
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # As asyncio does: [::]:143 takes IPv6 only, so 0.0.0.0:143 can
            # be bound beside it.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            reason = (exc.strerror or str(exc)).lower()
            text = f"error while attempting to bind on address {address!r}: {reason}"
            raise OSError(exc.errno, text) from None
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _fmt(sockname: tuple[str, int] | tuple[str, int, int, int]) -> str:
    host, port = sockname[0], sockname[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
