"""A listener's routing at connection time: the router's inputs prepared
once (TLS contexts and master passwords per backend, the routing table
file read), and the process's health record of backend addresses.

The choice itself is authgate.routing's (pure); this module gives it the
clock and the health record, and keeps the log lines about health.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from authgate.atrest.envelope import Keyring, open_secret_file
from authgate.config import Address, BackendSettings, Config, Listener, TLSMode
from authgate.credentials.base import CredentialStore
from authgate.errors import ConfigError
from authgate.proxy import tls as tls_mod
from authgate.proxy.channel import ChannelClosed, open_channel
from authgate.proxy.warm import WarmPool
from authgate.routing import Backend, Health, Route, RouteTable, TableError, UserHints, choose
from authgate.routing import parse_table as parse_route_table

log = logging.getLogger("authgate.routing")

# One record per process: every listener, and every reload, sees the same
# state of an address (a reload must not forget that a store is down).
HEALTH = Health()

# (host, port) of every socket this process listens on: a backend
# connection that lands on one of them is authgate itself (loop safety).
OWN_SOCKETS: set[tuple[str, int]] = set()


def own_address(sock: socket.socket) -> tuple[str, int]:
    name = sock.getsockname()
    return str(name[0]), int(name[1])


def is_own(peer: tuple[str, int], local: tuple[str, int]) -> bool:
    """Is the far end of a connection we opened one of our own listeners?
    (A listener on a wildcard address takes connections to any address of
    this machine: to loopback, or to the address we connected from.)"""
    host, port = str(peer[0]), int(peer[1])
    if (host, port) in OWN_SOCKETS:
        return True
    facts = _host_facts(host)
    if facts is None:
        return False
    wildcard, loopback = facts
    return (loopback or host == str(local[0])) and (wildcard, port) in OWN_SOCKETS


@functools.lru_cache(maxsize=256)  # a backend connection's far end: a few hosts
def _host_facts(host: str) -> tuple[str, bool] | None:
    """The wildcard address of `host`'s family and whether it is loopback
    (an IPv4-mapped IPv6 address counts as IPv4), or None: not an IP."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    wildcard = "0.0.0.0" if ip.version == 4 else "::"  # noqa: S104 (compared, not bound)
    return wildcard, ip.is_loopback


@dataclass(frozen=True)
class PreparedBackend:
    """What connecting to one backend's members needs, made at start-up."""

    tls: ssl.SSLContext | None
    master_password: str | None = field(default=None, repr=False)


# How long a backend's capability list is gone by without asking again
# (POP3 terminate mode: the CAPA round trip of every login saved). Short:
# a backend reconfigured meanwhile costs at most a refused login's re-ask.
CAPABILITIES_KEPT_FOR = 60.0


class CapabilityMemory:
    """The capability lists backend members answered lately, by (backend
    name, member address): bounded by the configuration (one list per
    member), forgotten at a reload (new routes, new memory)."""

    __slots__ = ("_clock", "_kept_for", "_lists")

    def __init__(
        self,
        kept_for: float = CAPABILITIES_KEPT_FOR,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._kept_for = kept_for
        self._clock = clock
        self._lists: dict[tuple[str, Address], tuple[float, tuple[str, ...]]] = {}

    def recall(self, backend: str, address: Address) -> tuple[str, ...] | None:
        found = self._lists.get((backend, address))
        if found is None or found[0] <= self._clock():
            return None
        return found[1]

    def learn(self, backend: str, address: Address, capabilities: tuple[str, ...]) -> None:
        self._lists[(backend, address)] = (self._clock() + self._kept_for, capabilities)

    def __len__(self) -> int:
        """How many members' lists are held (fresh or not)."""
        return len(self._lists)


@dataclass(frozen=True)
class ListenerRoutes:
    protocol: str
    default: Backend
    backends: Mapping[str, Backend]
    table: RouteTable | None
    hosts: Mapping[str, str]
    down_for: float
    prepared: Mapping[str, PreparedBackend]
    health: Health = HEALTH
    pool_health_check: float = 10.0  # [routing] pool_health_check (0: off)
    # (backend name, member address) -> its warm connections
    # (`warm_connections`), shared by the listeners of one build.
    warm: Mapping[tuple[str, Address], WarmPool] = field(default_factory=dict)
    capabilities: CapabilityMemory = field(default_factory=CapabilityMemory)

    @property
    def per_user(self) -> bool:
        """Can a user go anywhere but the default? (Else relay mode need not
        wait for the user's name before it connects.)"""
        return bool(self.backends) or self.default.pool(self.protocol)

    def route(
        self, user: str | None, hints: UserHints | None = None, *, spread: str = ""
    ) -> Route:
        """Raises routing.RoutingError when a per-user choice names nothing usable."""
        return choose(
            user,
            self.protocol,
            self.default,
            self.backends,
            hints=hints or UserHints(),
            table=self.table,
            hosts=self.hosts,
            health=self.health,
            now=time.monotonic(),
            spread=spread,
        )

    def prepared_for(self, backend: Backend) -> PreparedBackend:
        return self.prepared[backend.name]

    def warm_pool(self, backend: Backend, member: BackendSettings) -> WarmPool | None:
        """The member's warm connections, if it keeps any."""
        if not self.warm:
            return None
        return self.warm.get((backend.name, member.address))

    def mark_down(self, backend: Backend, address: Address, why: str) -> None:
        """Passive health: a failed connect or a timeout."""
        if self.health.mark_down(address, time.monotonic(), self.down_for, why):
            log.warning(
                "backend %s member %s marked down for %.0fs: %s",
                backend.name,
                address,
                self.down_for,
                why,
            )

    def mark_up(self, backend: Backend, address: Address) -> None:
        if self.health.mark_up(address):
            log.info("backend %s member %s is up again", backend.name, address)


def _prepare(backend: BackendSettings, keyring: Keyring | None) -> PreparedBackend:
    context = None
    if backend.tls is not TLSMode.NONE:
        context = tls_mod.client_context(ca_file=backend.ca_file, verify=backend.verify)
    return PreparedBackend(tls=context, master_password=read_master_password(backend, keyring))


def read_master_password(backend: BackendSettings, keyring: Keyring | None) -> str | None:
    """Inline, or from `master_password_file` (which may be encrypted at rest)."""
    if backend.master_password_file is None:
        return backend.master_password
    data = open_secret_file(backend.master_password_file, keyring)
    return data.decode("utf-8").rstrip("\r\n")


def load_table(config: Config) -> RouteTable | None:
    """[routing] table, read now (at start and on every SIGHUP)."""
    path = config.routing.table
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the routing table: {exc}") from None
    try:
        return parse_route_table(text, str(path), list(config.backends))
    except TableError as exc:
        raise ConfigError(str(exc)) from None


def check_user_entries(config: Config, store: CredentialStore | None) -> None:
    """Every users file `backend = "..."` names a [backends] entry."""
    names = getattr(store, "names", None)
    if store is None or names is None:
        return
    for name in names():
        record = store.user(name)
        wanted = record.backend if record is not None else None
        if wanted is not None and wanted not in config.backends:
            have = ", ".join(sorted(config.backends)) or "none"
            raise ConfigError(
                f"users file: users.{name!r}.backend: {wanted!r} is not a "
                f"[backends] name in {config.path} (have: {have})"
            )


def build_routes(
    config: Config,
    listener: Listener,
    table: RouteTable | None,
    keyring: Keyring | None,
    cache: dict[str, PreparedBackend],
    pools: dict[tuple[str, Address], WarmPool] | None = None,
) -> ListenerRoutes:
    """`cache`: prepared named backends, and `pools`: warm connections,
    shared by the listeners of one build."""
    prepared: dict[str, PreparedBackend] = {}
    for name, backend in config.backends.items():
        if name not in cache:
            if backend.all_members():
                cache[name] = _prepare(backend.settings_any(), keyring)
            else:  # a referral only: never connected to
                cache[name] = PreparedBackend(tls=None)
        prepared[name] = cache[name]
    default = listener.route_default
    if default.name not in prepared:
        prepared[default.name] = _prepare(listener.backend, keyring)
    backends = (default, *config.backends.values())
    warm = _warm_pools(listener, backends, prepared, config, {} if pools is None else pools)
    return ListenerRoutes(
        protocol=listener.protocol.value,
        default=default,
        backends=config.backends,
        table=table,
        hosts=config.routing.hosts,
        down_for=config.routing.down_for,
        prepared=prepared,
        pool_health_check=config.routing.pool_health_check,
        warm=warm,
    )


def _warm_pools(
    listener: Listener,
    backends: Sequence[Backend],
    prepared: Mapping[str, PreparedBackend],
    config: Config,
    pools: dict[tuple[str, Address], WarmPool],
) -> dict[tuple[str, Address], WarmPool]:
    """The warm connections of the members this listener may connect to
    (none for LDAP: a directory says nothing first, there is no greeting
    to wait for; the configuration refuses them with PROXY v2)."""
    found: dict[tuple[str, Address], WarmPool] = {}
    if listener.protocol.value in SILENT_PROTOCOLS:
        return found
    for backend in backends:
        for member in backend.members_for(listener.protocol.value):
            if member.warm_connections <= 0:
                continue
            key = (backend.name, member.address)
            pool = pools.get(key)
            if pool is None:
                pool = pools[key] = WarmPool(
                    member,
                    prepared[backend.name].tls,
                    connect_timeout=config.limits.connect_timeout,
                    health=HEALTH,
                    loops_back=is_own,
                )
            found[key] = pool
    return found


# ------------------------------------------------------------ active checks

# A greeting that says the server is ready, per protocol (RFC 9051 7.1,
# RFC 1939 4, RFC 5321 4.2, RFC 3977 5.1). ManageSieve greets with its
# capability list and LDAP says nothing first: a connect is all we ask.
READY_GREETINGS: dict[str, tuple[bytes, ...]] = {
    "imap": (b"* OK", b"* PREAUTH"),
    "pop3": (b"+OK",),
    "smtp": (b"220",),
    "nntp": (b"200", b"201"),
}
SILENT_PROTOCOLS = frozenset({"ldap"})


@dataclass(frozen=True)
class CheckTarget:
    routes: ListenerRoutes  # whose health record, down_for and TLS it uses
    backend: Backend
    member: BackendSettings
    interval: float


def check_targets(all_routes: Sequence[ListenerRoutes]) -> list[CheckTarget]:
    """Every (backend, address) a listener may connect to whose check is on:
    a backend's `health_check`, else [routing] pool_health_check for a pool
    and off for a single address. Each address once."""
    found: dict[str, CheckTarget] = {}
    for routes in all_routes:
        pool_interval = routes.pool_health_check
        for backend in (routes.default, *routes.backends.values()):
            members = backend.members_for(routes.protocol)
            interval = backend.health_check
            if interval < 0:
                interval = pool_interval if len(members) > 1 else 0.0
            if interval <= 0:
                continue
            for member in members:
                key = f"{routes.protocol} {member.address}"
                found.setdefault(key, CheckTarget(routes, backend, member, interval))
    return list(found.values())


async def check_once(target: CheckTarget, timeout: float) -> str | None:
    """Connect and read the greeting: None when ready, else why not."""
    protocol = target.routes.protocol
    member = target.member
    prepared = target.routes.prepared_for(target.backend)
    implicit = member.tls is TLSMode.IMPLICIT
    try:
        channel = await open_channel(
            member.address.host,
            member.address.port,
            ssl_context=prepared.tls if implicit else None,
            server_hostname=member.server_name or member.address.host,
            timeout=timeout,
        )
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        return f"health check: {str(exc) or exc.__class__.__name__}"
    try:
        if protocol in SILENT_PROTOCOLS:
            return None
        try:
            greeting = await channel.read(timeout=timeout)
        except (OSError, TimeoutError, ChannelClosed) as exc:
            return f"health check: no greeting ({str(exc) or exc.__class__.__name__})"
        ready = READY_GREETINGS.get(protocol)
        if not greeting:
            return "health check: closed without a greeting"
        if ready is not None and not greeting.startswith(ready):
            first = greeting.split(b"\r\n", 1)[0][:80].decode("ascii", "replace")
            return f"health check: not ready ({first!r})"
        return None
    finally:
        channel.close()


async def run_checks(targets: Sequence[CheckTarget], timeout: float) -> None:
    """Check every target at its interval until cancelled. Passive marks
    expire on their own; an active check also marks an address up at once
    when it answers again."""

    async def loop(target: CheckTarget) -> None:
        while True:
            why = await check_once(target, timeout)
            if why is None:
                target.routes.mark_up(target.backend, target.member.address)
            else:
                target.routes.mark_down(target.backend, target.member.address, why)
            await asyncio.sleep(target.interval)

    if targets:
        await asyncio.gather(*(loop(t) for t in targets))
