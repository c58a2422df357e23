"""A listener's routing at connection time: the router's inputs prepared
once (TLS contexts and master passwords per backend, the routing table
file read), and the process's health record of backend addresses.

The choice itself is authgate.routing's (pure); this module gives it the
clock and the health record, and keeps the log lines about health.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from authgate.atrest.envelope import Keyring, open_secret_file
from authgate.config import Address, BackendSettings, Config, Listener, TLSMode
from authgate.credentials.base import CredentialStore
from authgate.errors import ConfigError
from authgate.proxy import tls as tls_mod
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
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    wildcard = "0.0.0.0" if ip.version == 4 else "::"  # noqa: S104 (compared, not bound)
    local_here = ip.is_loopback or host == str(local[0])
    return local_here and (wildcard, port) in OWN_SOCKETS


@dataclass(frozen=True)
class PreparedBackend:
    """What connecting to one backend's members needs, made at start-up."""

    tls: ssl.SSLContext | None
    master_password: str | None = field(default=None, repr=False)


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

    @property
    def per_user(self) -> bool:
        """Can a user go anywhere but the default? (Else relay mode need not
        wait for the user's name before it connects.)"""
        return bool(self.backends) or self.default.pool(self.protocol)

    def route(self, user: str | None, hints: UserHints | None = None) -> Route:
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
        )

    def prepared_for(self, backend: Backend) -> PreparedBackend:
        return self.prepared[backend.name]

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
) -> ListenerRoutes:
    """`cache`: prepared named backends, shared by the listeners of one build."""
    prepared: dict[str, PreparedBackend] = {}
    for name, backend in config.backends.items():
        if name not in cache:
            cache[name] = _prepare(backend.settings_any(), keyring)
        prepared[name] = cache[name]
    default = listener.route_default
    if default.name not in prepared:
        prepared[default.name] = _prepare(listener.backend, keyring)
    return ListenerRoutes(
        protocol=listener.protocol.value,
        default=default,
        backends=config.backends,
        table=table,
        hosts=config.routing.hosts,
        down_for=config.routing.down_for,
        prepared=prepared,
    )
