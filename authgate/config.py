"""TOML configuration -> frozen, validated settings.

Every error names the file, the key path and the bad value, e.g.
``authgate.toml: listeners[1].policy.exempt_networks[0]: '10.0.0.0/33' is not
a network``, and unknown keys are errors (a typo must not silently weaken
the policy). Relative paths are resolved against the file's folder.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from authgate.client_certs import CertRequirement, CertUserRule, ClientCertSettings
from authgate.defence import DefenceSettings
from authgate.errors import ConfigError as ConfigError  # re-exported: callers catch it here
from authgate.logs import LogFormat, LogLevel
from authgate.oauth.settings import OAuthSettings, parse_oauth
from authgate.password_policy import PasswordPolicy, parse_policy
from authgate.policy import ExemptNetworks, ListenerPolicy, Protocol, Security
from authgate.privileges import RunAs
from authgate.routing import Backend
from authgate.sasl import DEFAULT_ORDER, MECHANISMS
from authgate.settings import Range, Table, number

if TYPE_CHECKING:
    from authgate.credentials.directory import DirectorySettings

# RFC 1123 host names; our name goes into greetings, EHLO and digest-uri.
_HOSTNAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)


class TLSMode(enum.Enum):
    NONE = "none"
    STARTTLS = "starttls"
    IMPLICIT = "implicit"


class BackendMode(enum.Enum):
    # authgate verifies against its own store, then logs in to the backend as
    # the user with a master credential (or XCLIENT) and splices.
    TERMINATE = "terminate"
    # authgate enforces the policy and relays the SASL exchange; the backend verifies.
    RELAY = "relay"


class ClientAddressForwarding(enum.Enum):
    NONE = "none"
    PROXY_V2 = "proxy-v2"  # HAProxy PROXY protocol v2 header before anything else
    XCLIENT = "xclient"  # SMTP XCLIENT ADDR= (Postfix)
    ID = "id"  # IMAP ID ("x-originating-ip" ...) (Dovecot login_trusted_networks)


class EventLoop(enum.Enum):
    """The event loop `authgate run` serves on."""

    ASYNCIO = "asyncio"  # the standard library's
    UVLOOP = "uvloop"  # libuv's (the default where installed): less CPU per event


@functools.cache
def uvloop_usable() -> bool:
    """uvloop imports here: installed, and built for this interpreter and
    C library (a wheel for another one is found but fails to import)."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def default_event_loop() -> EventLoop:
    """uvloop where it works (a dependency everywhere but Windows),
    asyncio's own loop otherwise: a third fewer instructions per login
    (docs/performance.md) is worth having without asking for it."""
    return EventLoop.UVLOOP if uvloop_usable() else EventLoop.ASYNCIO


class PasswordStorage(enum.Enum):
    """How a relay-mode backend keeps passwords: one-way hashes cannot serve
    challenge-response mechanisms, so those are not offered."""

    UNKNOWN = "unknown"
    PLAINTEXT_EQUIVALENT = "plaintext-equivalent"
    ONE_WAY = "one-way"


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class TLSSettings:
    cert: Path | None = None
    key: Path | None = None


@dataclass(frozen=True)
class BackendSettings:
    address: Address
    mode: BackendMode = BackendMode.TERMINATE
    tls: TLSMode = TLSMode.NONE
    ca_file: Path | None = None  # None: the system trust store
    verify: bool = True
    server_name: str | None = None  # SNI and certificate name; defaults to the host
    master_user: str | None = None
    master_password: str | None = field(default=None, repr=False)
    # Read when the proxy starts (it may be encrypted at rest: see atrest).
    master_password_file: Path | None = None
    client_address: ClientAddressForwarding = ClientAddressForwarding.NONE
    mechanisms: tuple[str, ...] = ("PLAIN",)  # our preference when logging in to it
    password_storage: PasswordStorage = PasswordStorage.UNKNOWN
    # Connections kept connected and greeted, ready for the next login
    # (authgate.proxy.warm); 0: none, every login connects.
    warm_connections: int = 0
    # Seconds a warm connection may wait for a login, then it is closed and
    # made again: well under the backend's own pre-login timeout (INN's
    # nnrpd waits 10 s for a first command, Postfix under stress 10 s,
    # Dovecot's login processes 3 minutes).
    warm_max_age: float = 5.0

    RANGES: ClassVar[Mapping[str, Range]] = {
        "warm_connections": Range(0, 64, integer=True),
        "warm_max_age": Range(1, 120),
    }

    @property
    def same_capabilities_each_connection(self) -> bool:
        """Whether one connection's capability list holds for the next (see
        authgate.proxy.routes.CapabilityMemory). Not behind a PROXY header:
        it gives each connection its client's address, and the backend may
        offer each another list (Dovecot's login_trusted_networks decides
        whether cleartext mechanisms are offered)."""
        return self.client_address is not ClientAddressForwarding.PROXY_V2


@dataclass(frozen=True)
class Listener:
    name: str
    protocol: Protocol
    # One listener may listen on several sockets (IPv4 and IPv6 on one
    # port: ["0.0.0.0:143", "[::]:143"]), with one name, one backend and one
    # set of statistics. Port 0 after the first address means "the port the
    # first socket got".
    listen: tuple[Address, ...]
    tls: TLSMode
    backend: BackendSettings
    policy: ListenerPolicy
    # SMTP submission refuses MAIL FROM before AUTH; a server-to-server
    # listener (port 25) passes unauthenticated mail through instead.
    submission: bool = True
    # Behind a TCP load balancer: connections from `trusted_proxies` start
    # with a PROXY v1/v2 header naming the real client, whom the policy,
    # the exempt networks and the brute-force defence then judge.
    proxy_protocol: bool = False
    trusted_proxies: ExemptNetworks = field(default_factory=ExemptNetworks)
    # Our other names and addresses (besides `hostname` and the address a
    # client connected to): a DIGEST-MD5 digest-uri may name any of them.
    hostnames: tuple[str, ...] = ()
    # The backend (or pool) users go to without a per-user choice: a
    # [backends] entry, or the listener's own `backend` (then `backend`
    # above is its only member). The listener's mode is this backend's.
    default_backend: Backend | None = None
    # TLS client certificates (SASL EXTERNAL): None asks for none.
    client_cert: ClientCertSettings | None = None

    @property
    def route_default(self) -> Backend:
        if self.default_backend is not None:
            return self.default_backend
        return Backend(name=f"{self.name}.backend", members=(self.backend,), named=False)

    def default_members(self) -> tuple[BackendSettings, ...]:
        return self.route_default.members_for(self.protocol.value)

    @property
    def listen_text(self) -> str:
        """The addresses as configured, for messages: "0.0.0.0:143, [::]:143"."""
        return ", ".join(str(address) for address in self.listen)


@dataclass(frozen=True)
class RoutingSettings:
    """[routing]: where users go besides their listener's default backend
    (authgate.routing)."""

    # user/domain -> backend name (TOML), re-read on SIGHUP.
    table: Path | None = None
    # The directory attribute's host names -> backend names.
    hosts: Mapping[str, str] = field(default_factory=dict)
    # How long a failed connect or a timeout marks an address down.
    down_for: float = 30.0
    # Seconds between active checks (connect, read the greeting) of each
    # pool member; 0: off. Single backends: `health_check` on the backend.
    pool_health_check: float = 10.0

    RANGES: ClassVar[Mapping[str, Range]] = {
        "down_for": Range(1, 3600),
        "pool_health_check": Range(0, 3600),
    }


@dataclass(frozen=True)
class Limits:
    """[limits]: what one client may cost before it has authenticated."""

    idle_timeout: float = 60.0  # client silence before authentication
    preauth_timeout: float = 300.0  # total time to authenticate
    handshake_timeout: float = 30.0  # client TLS handshake
    max_line: int = 8192  # longest command line (SMTP AUTH lines: at least 12288)
    max_errors: int = 3  # bad commands + failed authentications, then goodbye
    max_commands: int = 100  # commands before authentication
    max_connections: int = 10000  # all listeners together
    max_connections_per_address: int = 50
    connect_timeout: float = 10.0  # backend connect (and implicit TLS handshake)
    backend_timeout: float = 30.0  # backend login exchange
    drain_timeout: float = 10.0  # on SIGTERM, sessions get this long to finish

    RANGES: ClassVar[Mapping[str, Range]] = {
        "idle_timeout": Range(1, 86400),
        "preauth_timeout": Range(1, 86400),
        "handshake_timeout": Range(1, 600),
        "max_line": Range(1024, 1 << 20, integer=True),
        "max_errors": Range(1, 1000, integer=True),
        "max_commands": Range(1, 100000, integer=True),
        "max_connections": Range(1, 10_000_000, integer=True),
        "max_connections_per_address": Range(1, 10_000_000, integer=True),
        "connect_timeout": Range(0.1, 600),
        "backend_timeout": Range(0.1, 3600),
        "drain_timeout": Range(0, 3600),
    }


def _limits(table: Table | None) -> Limits:
    if table is None:
        return Limits()
    values: dict[str, float | int] = {}
    for name, bounds in Limits.RANGES.items():
        if table.has(name):
            values[name] = number(table, name, bounds)
    table.finish()
    return Limits(**values)  # type: ignore[arg-type]


def _defence(table: Table | None) -> tuple[DefenceSettings, SharedDefence | None]:
    """[defence]: failure delay, escalating penalties, address blocks, the
    optional per-user lockout (off unless user_lockout_after is set), and
    optionally state shared in Redis."""
    if table is None:
        return DefenceSettings(), None
    shared = None
    redis_url = table.get("redis_url", str, "")
    secret_file = table.path_value("secret_file")
    if redis_url:
        if not redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise table.error("redis_url", f"{redis_url!r} is not a redis:// URL")
        if secret_file is None:
            raise table.error(
                "secret_file",
                "redis_url needs a secret shared by every instance (16+ bytes in a file), "
                "to recognise a stale password across instances",
            )
        if not secret_file.is_file():
            raise table.error("secret_file", f"{str(secret_file)!r} is not a file")
        shared = SharedDefence(redis_url, secret_file)
    values: dict[str, object] = {}
    for name, bounds in DefenceSettings.RANGES.items():
        if table.has(name):
            values[name] = number(table, name, bounds)
    if table.has("penalties"):
        raw = table.get("penalties", list, [])
        delay = DefenceSettings.PENALTY
        for i, item in enumerate(raw):
            if not delay.is_kind(item) or not delay.contains(item):
                raise table.error(
                    "penalties",
                    f"[{i}]: {item!r} is not a delay in {delay.low:g}..{delay.high:g} seconds",
                )
        values["penalties"] = tuple(float(x) for x in raw)
    if table.has("trusted_networks"):
        values["trusted"] = _networks(table, "trusted_networks")
    table.finish()
    return DefenceSettings(**values), shared  # type: ignore[arg-type]


@dataclass(frozen=True)
class SharedDefence:
    """[defence] redis_url + secret_file: brute-force state shared by every
    instance behind a load balancer (authgate.defence_redis)."""

    redis_url: str
    secret_file: Path  # the fingerprint key every instance shares (16+ bytes)


@dataclass(frozen=True)
class ControlSettings:
    """[control] socket: the Unix socket of `authgate status` and friends."""

    socket: Path | None = None


def _control(table: Table | None) -> ControlSettings:
    if table is None:
        return ControlSettings()
    path = table.path_value("socket")
    table.finish()
    return ControlSettings(socket=path)


@dataclass(frozen=True)
class MetricsSettings:
    """[metrics]: the HTTP listener for /metrics, /healthz, /readyz and the
    status page (off unless `listen` is set)."""

    listen: Address | None = None
    # The status page's password (HTTP Basic); without one, loopback only.
    status_password_file: Path | None = None


def _metrics(table: Table | None) -> MetricsSettings:
    if table is None:
        return MetricsSettings()
    raw = table.get("listen", str, "")
    listen = None
    if raw:
        try:
            listen = parse_address(raw)
        except ValueError as exc:
            raise table.error("listen", str(exc)) from None
    password_file = table.path_value("status_password_file")
    table.finish()
    return MetricsSettings(listen=listen, status_password_file=password_file)


@dataclass(frozen=True)
class Config:
    path: Path
    hostname: str
    tls: TLSSettings
    users_file: Path | None
    listeners: tuple[Listener, ...]
    audit_file: Path | None = None  # [audit] file: append-only log of authentications
    # [directory]: users verified by an LDAP bind instead of a users file.
    directory: DirectorySettings | None = None
    # [oauth]: how OAUTHBEARER / XOAUTH2 bearer tokens are verified.
    oauth: OAuthSettings | None = None
    limits: Limits = field(default_factory=Limits)
    defence: DefenceSettings = field(default_factory=DefenceSettings)
    shared_defence: SharedDefence | None = None
    # Processes sharing the listeners (SO_REUSEPORT): one event loop each.
    workers: int = 1
    event_loop: EventLoop = field(default_factory=default_event_loop)
    password_policy: PasswordPolicy = field(default_factory=PasswordPolicy)
    # Top-level `hostnames`: the default for every listener (Listener.hostnames).
    hostnames: tuple[str, ...] = ()
    # [backends.NAME]: named backends and pools, for listeners and routing.
    backends: Mapping[str, Backend] = field(default_factory=dict)
    routing: RoutingSettings = field(default_factory=RoutingSettings)
    # authgate's own log on stderr (authgate.logs); a change takes a restart.
    log_format: LogFormat = LogFormat.TEXT
    log_level: LogLevel = LogLevel.INFO
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    control: ControlSettings = field(default_factory=ControlSettings)
    # user / group / run_as_root: whom `authgate run` serves as (privileges.py).
    run_as: RunAs = field(default_factory=RunAs)

    RANGES: ClassVar[Mapping[str, Range]] = {"workers": Range(1, 256, integer=True)}

    def listener(self, name: str) -> Listener:
        for listener in self.listeners:
            if listener.name == name:
                return listener
        names = ", ".join(x.name for x in self.listeners) or "none"
        raise ConfigError(f"{self.path}: no listener named {name!r} (have: {names})")


# ----------------------------------------------------------------- reading


def parse_address(text: str, *, default_host: str | None = None) -> Address:
    """'127.0.0.1:143', '[::1]:143', 'localhost:143' -> Address; ValueError otherwise."""
    host: str
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r} is not host:port ([v6]:port for IPv6)")
        ipaddress.IPv6Address(host.split("%", 1)[0])
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            if default_host is None:
                raise ValueError(f"{text!r} is not host:port")
            host, port_text = default_host, text
        if ":" in host:
            raise ValueError(f"{text!r}: write IPv6 addresses as [addr]:port")
    if not host:
        raise ValueError(f"{text!r} has no host")
    # Port 0 (an ephemeral port chosen at bind time) is for tests and tools.
    if not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise ValueError(f"{text!r} has no valid port (0-65535)")
    return Address(host, int(port_text))


# The fixed-port addresses earlier listeners bind, with where each was
# given ("listeners[0].listen[1]"), to name it when a later one collides.
_Bound = list[tuple[Address, str]]


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None  # a host name: not resolved here


def _collision(address: Address, other: Address) -> str | None:
    """Why `address` cannot be bound beside `other`: "" for the same socket
    ('[0::0]:143' is '[::]:143'), why not for an address beside its
    family's wildcard on the same port (the bind would fail), else None.
    IPv6 sockets are IPV6_V6ONLY, so 0.0.0.0 and :: never collide."""
    if address.port != other.port:
        return None
    a, b = _ip(address.host), _ip(other.host)
    if a is None or b is None:
        same = address.host.lower().rstrip(".") == other.host.lower().rstrip(".")
        return "" if same else None
    if a == b:
        return ""
    if a.version != b.version or not (a.is_unspecified or b.is_unspecified):
        return None
    wildcard = a if a.is_unspecified else b
    return f"{wildcard} takes port {address.port} on every IPv{a.version} address"


def _listen(table: Table, bound: _Bound) -> tuple[Address, ...]:
    """`listen`: "host:port", or a list of them for one listener on several
    sockets (IPv4 and IPv6: ["0.0.0.0:143", "[::]:143"]). An address given
    twice, here or by another listener, is an error; so is a specific
    address beside its family's wildcard on the same port. Port 0 (tests,
    tools) after the first address means the port the first socket got.
    Adds this listener's fixed-port addresses to `bound`."""
    if not table.has("listen"):
        raise table.error("listen", "is required")
    raw = table.data["listen"]
    table.used.add("listen")
    items: list[tuple[str, object]]
    if isinstance(raw, str):
        items = [(table.where("listen"), raw)]
    elif isinstance(raw, list):
        if not raw:
            raise table.error("listen", "is an empty list: give at least one host:port")
        items = [(f"{table.where('listen')}[{i}]", item) for i, item in enumerate(raw)]
    else:
        raise table.error("listen", f"{raw!r} is not a host:port string or a list of them")
    addresses: list[Address] = []
    mine: _Bound = []  # as bound: port 0 after the first is the first's port
    for where, item in items:
        if not isinstance(item, str):
            raise ConfigError(f"{table.source}: {where}: {item!r} is not a string")
        try:
            address = parse_address(item)
        except ValueError as exc:
            raise ConfigError(f"{table.source}: {where}: {exc}") from None
        effective = address
        if not address.port and addresses:
            effective = Address(address.host, addresses[0].port)
        for earlier, _ in mine:
            why = _collision(effective, earlier)
            if why is not None:
                problem = f"overlaps {str(earlier)!r}: {why}" if why else "is listed twice"
                raise ConfigError(f"{table.source}: {where}: {item!r} {problem}")
        for other, other_where in bound if effective.port else ():
            why = _collision(effective, other)
            if why is not None:
                problem = (
                    f"overlaps {str(other)!r} ({other_where}): {why}"
                    if why
                    else f"is already used by {other_where.partition('.')[0]}"
                )
                raise ConfigError(f"{table.source}: {where}: {str(effective)!r} {problem}")
        mine.append((effective, where))
        addresses.append(address)
    bound.extend(entry for entry in mine if entry[0].port)
    return tuple(addresses)


def _mechanisms(table: Table, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    names = table.strings(key, default)
    seen: list[str] = []
    for i, name in enumerate(names):
        upper = name.upper()
        if upper not in MECHANISMS:
            known = ", ".join(MECHANISMS)
            raise ConfigError(
                f"{table.source}: {table.where(key)}[{i}]: {name!r} is not a mechanism ({known})"
            )
        if upper in seen:
            raise ConfigError(f"{table.source}: {table.where(key)}[{i}]: {name!r} is listed twice")
        seen.append(upper)
    return tuple(seen)


def _workers(root: Table) -> int:
    """`workers = N` or "auto" (one per core)."""
    if not root.has("workers"):
        return 1
    raw = root.data["workers"]
    if raw == "auto":
        root.used.add("workers")
        return os.cpu_count() or 1
    return int(number(root, "workers", Config.RANGES["workers"]))


def _networks(table: Table, key: str) -> ExemptNetworks:
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for i, entry in enumerate(table.strings(key, ())):
        try:
            nets.extend(ExemptNetworks.parse([entry]).networks)
        except ValueError:
            raise ConfigError(
                f"{table.source}: {table.where(key)}[{i}]: "
                f"{entry!r} is not a network (CIDR such as 192.168.0.0/16 or fd00::/8)"
            ) from None
    return ExemptNetworks(tuple(nets))


def _is_host(text: str) -> bool:
    """A DNS host name, an IP address, or an IPv6 address in brackets."""
    if _HOSTNAME.fullmatch(text):
        return True
    inner = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        address = ipaddress.ip_address(inner)
    except ValueError:
        return False
    return inner == text or address.version == 6


def _hostnames(table: Table, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    names = table.strings(key, default)
    for i, name in enumerate(names):
        if not _is_host(name):
            raise ConfigError(
                f"{table.source}: {table.where(key)}[{i}]: {name!r} is not a DNS host name "
                "or an IP address"
            )
    return names


def _policy(table: Table | None, base: ListenerPolicy) -> ListenerPolicy:
    if table is None:
        return base
    security = table.choice("security", Security, base.security)
    mechanisms = _mechanisms(table, "mechanisms", base.mechanisms)
    exempt = base.exempt
    if table.has("exempt_networks"):
        exempt = _networks(table, "exempt_networks")
    allow_ntlm_legacy = table.get("allow_ntlm_legacy", bool, base.allow_ntlm_legacy)
    table.finish()
    return ListenerPolicy(
        protocol=base.protocol,
        security=security,
        mechanisms=mechanisms,
        exempt=exempt,
        server_to_server=base.server_to_server,
        allow_ntlm_legacy=allow_ntlm_legacy,
    )


def _address(table: Table, key: str) -> Address:
    raw = table.require(key, str)
    try:
        return parse_address(raw)
    except ValueError as exc:
        raise table.error(key, str(exc)) from None


def _default_mode(protocol: Protocol) -> BackendMode:
    """LDAP is only ever relayed (see _check_backend)."""
    return BackendMode.RELAY if protocol is Protocol.LDAP else BackendMode.TERMINATE


def _backend_settings(
    table: Table, address: Address, default_mode: BackendMode = BackendMode.TERMINATE
) -> BackendSettings:
    """The keys every backend has (a listener's own, or a [backends] entry);
    the protocol-specific checks are _check_backend's."""
    master_user = table.get("master_user", str, "") or None
    master_password = table.get("master_password", str, "") or None
    password_file = table.path_value("master_password_file")
    if password_file is not None:
        if master_password is not None:
            raise table.error("master_password_file", "give master_password or the file, not both")
        if not password_file.is_file():
            raise table.error("master_password_file", f"{str(password_file)!r} is not a file")
    warm: dict[str, Any] = {}
    for name, bounds in BackendSettings.RANGES.items():
        if table.has(name):
            warm[name] = number(table, name, bounds)
    return BackendSettings(
        address=address,
        mode=table.choice("mode", BackendMode, default_mode),
        tls=table.choice("tls", TLSMode, TLSMode.NONE),
        ca_file=table.path_value("ca_file"),
        verify=table.get("verify", bool, True),
        server_name=table.get("server_name", str, "") or None,
        master_user=master_user,
        master_password=master_password,
        master_password_file=password_file,
        client_address=table.choice(
            "client_address", ClientAddressForwarding, ClientAddressForwarding.NONE
        ),
        mechanisms=_mechanisms(table, "mechanisms", ("PLAIN",)),
        password_storage=table.choice("password_storage", PasswordStorage, PasswordStorage.UNKNOWN),
        **warm,
    )


def _check_backend(
    where: Table, key: str | None, settings: BackendSettings, protocol: Protocol
) -> None:
    """What a backend must have to serve a listener of `protocol`. `key`:
    where to point (a listener's `backend = "name"`), or None: the keys of
    the listener's own backend table."""
    forwarding = settings.client_address
    named = "[backends] entry: client_address " if key else ""
    if forwarding is ClientAddressForwarding.XCLIENT and protocol is not Protocol.SMTP:
        raise where.error(key or "client_address", f"{named}'xclient' is an SMTP extension")
    if forwarding is ClientAddressForwarding.ID and protocol is not Protocol.IMAP:
        raise where.error(key or "client_address", f"{named}'id' is an IMAP extension")
    if settings.warm_connections and forwarding is ClientAddressForwarding.PROXY_V2:
        raise where.error(
            key or "warm_connections",
            f"{'[backends] entry: ' if key else ''}warm connections are made before "
            "their client comes, and a PROXY v2 header names the client: "
            "use warm_connections = 0 with client_address = 'proxy-v2'",
        )
    terminate = settings.mode is BackendMode.TERMINATE
    if terminate and protocol is Protocol.LDAP:
        raise where.error(
            key or "mode",
            "terminate mode does not apply to LDAP: the directory verifies each bind itself "
            "and has no master-user login to act as the user; use mode = 'relay' "
            "(authgate polices every bind and relays it)",
        )
    if terminate and settings.master_user is None and protocol is not Protocol.SMTP:
        raise where.error(
            key or "master_user",
            "terminate mode logs in to the backend as the user with a master credential: "
            "set master_user and master_password (or use mode = 'relay')",
        )


def _backend_addresses(table: Table, key: str) -> list[Address]:
    """`key` = "host:port" or a pool, a list of them."""
    raw = table.data[key]
    items = [raw] if isinstance(raw, str) else table.strings(key, ())
    table.used.add(key)
    if not items:
        raise table.error(key, "is an empty list: give at least one host:port")
    addresses: list[Address] = []
    for i, item in enumerate(items):
        where = key if isinstance(raw, str) else f"{key}[{i}]"
        try:
            address = parse_address(item)
        except ValueError as exc:
            raise table.error(where, str(exc)) from None
        if address in addresses:
            raise table.error(where, f"{item!r} is listed twice")
        if not address.port:
            raise table.error(where, "a backend needs a real port, not 0")
        addresses.append(address)
    return addresses


# [backends.NAME] referral: an RFC 5092 IMAP URL of a server (no user part:
# authgate puts the user's name in).
_REFERRAL = re.compile(r"imap://[A-Za-z0-9.-]+(:[0-9]{1,5})?/")

# [backends.NAME] per-protocol addresses: one store, one port per protocol.
_PROTOCOL_KEYS = tuple(p.value for p in Protocol)


def _named_backend(table: Table) -> Backend:
    """[backends.NAME]: `address = "host:port"`, or a pool, `addresses =
    [...]`, and/or per protocol `imap`, `pop3`, `smtp` (a string or a list)."""
    name = table.path.rpartition(".")[2]
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"{table.source}: {table.path}: name it with letters, digits, - and _")
    if table.has("address") and table.has("addresses"):
        raise table.error("addresses", "give address or addresses, not both")
    generic: list[Address] = []
    for key in ("address", "addresses"):
        if table.has(key):
            if key == "address" and not isinstance(table.data[key], str):
                raise table.error(key, f"{table.data[key]!r} is not a host:port string")
            generic = _backend_addresses(table, key)
    per_protocol = {key: _backend_addresses(table, key) for key in _PROTOCOL_KEYS if table.has(key)}
    referral = table.get("referral", str, "") or None
    if referral is not None and not _REFERRAL.fullmatch(referral):
        raise table.error(
            "referral", f"{referral!r} is not an imap://host[:port]/ URL (RFC 2221 referral)"
        )
    if not generic and not per_protocol and referral is None:
        raise table.error(
            "address",
            'is required: address = "host:port", a pool addresses = [...], '
            "or per protocol (imap, pop3, smtp, ...)",
        )
    interval = float(
        number(table, "health_check", Range(0, 3600)) if table.has("health_check") else -1
    )
    if generic:
        first = generic[0]
    elif per_protocol:
        first = next(iter(per_protocol.values()))[0]
    else:  # only a referral: settings that are never connected to
        first = Address("referral.invalid", 143)
    settings = _backend_settings(table, first)
    table.finish()
    return Backend(
        name=name,
        members=tuple(replace(settings, address=a) for a in generic),
        per_protocol={
            key: tuple(replace(settings, address=a) for a in addresses)
            for key, addresses in per_protocol.items()
        },
        health_check=interval,
        referral=referral,
    )


def _backends(root: Table) -> dict[str, Backend]:
    table = root.table("backends")
    if table is None:
        return {}
    found: dict[str, Backend] = {}
    for name in table.data:
        entry = table.table(name)
        if entry is None:
            raise table.error(name, "is not a table (use [backends.NAME])")
        found[name] = _named_backend(entry)
    table.finish()
    return found


def _routing(root: Table, backends: Mapping[str, Backend]) -> RoutingSettings:
    table = root.table("routing")
    if table is None:
        return RoutingSettings()
    path = table.path_value("table")
    if path is not None and not path.is_file():
        raise table.error("table", f"{str(path)!r} is not a file")
    hosts: dict[str, str] = {}
    hosts_table = table.table("hosts")
    if hosts_table is not None:
        for host, name in hosts_table.data.items():
            if not isinstance(name, str) or name not in backends:
                have = ", ".join(sorted(backends)) or "none"
                raise hosts_table.error(host, f"{name!r} is not a [backends] name (have: {have})")
            hosts[host.lower().rstrip(".")] = name
            hosts_table.used.add(host)
    values: dict[str, float] = {}
    for name, bounds in RoutingSettings.RANGES.items():
        if table.has(name):
            values[name] = float(number(table, name, bounds))
    table.finish()
    return RoutingSettings(table=path, hosts=hosts, **values)


def _backend(
    listener: Table, protocol: Protocol, backends: Mapping[str, Backend]
) -> tuple[BackendSettings, Backend | None]:
    """A listener's `backend`: a [backends] name, "host:port", or a table.
    The listener's `mode`, when given, overrides the backend's (one store
    may be fronted by a terminate and a relay listener)."""
    if not listener.has("backend"):
        raise listener.error("backend", "is required")
    mode: BackendMode | None = None
    if listener.has("mode"):
        mode = listener.choice("mode", BackendMode, BackendMode.TERMINATE)
        if not isinstance(listener.data["backend"], str):
            raise listener.error("mode", "give mode in the backend table, or backend = \"name\"")
    raw = listener.data["backend"]
    if isinstance(raw, str):
        listener.used.add("backend")
        named = backends.get(raw)
        if named is not None:
            members = named.members_for(protocol.value)
            if not members:
                raise listener.error(
                    "backend", f"backends.{raw} has no address for {protocol.value}"
                )
            if mode is not None:
                members = tuple(replace(m, mode=mode) for m in members)
            for member in members:
                _check_backend(listener, "backend", member, protocol)
            return members[0], named
        try:
            address = parse_address(raw)
        except ValueError as exc:
            have = ", ".join(sorted(backends)) or "none"
            raise listener.error(
                "backend",
                f"{raw!r} is neither a [backends] name (have: {have}) nor host:port ({exc})",
            ) from None
        return BackendSettings(address=address, mode=mode or _default_mode(protocol)), None
    table = listener.table("backend")
    assert table is not None
    settings = _backend_settings(table, _address(table, "address"), _default_mode(protocol))
    table.finish()
    _check_backend(table, None, settings, protocol)
    return settings, None


def _listener(
    table: Table,
    base: ListenerPolicy,
    bound: _Bound,
    hostnames: tuple[str, ...],
    backends: Mapping[str, Backend],
) -> Listener:
    name = table.require("name", str)
    if not table.has("protocol"):
        raise table.error(
            "protocol", "is required (smtp | imap | pop3 | nntp | managesieve | ldap)"
        )
    protocol = table.choice("protocol", Protocol, Protocol.IMAP)
    submission = table.get("submission", bool, protocol is Protocol.SMTP)
    defaults = ListenerPolicy(
        protocol=protocol,
        security=base.security,
        mechanisms=base.mechanisms,
        exempt=base.exempt,
        server_to_server=protocol is Protocol.SMTP and not submission,
        allow_ntlm_legacy=base.allow_ntlm_legacy,
    )
    listen = _listen(table, bound)
    tls = table.choice("tls", TLSMode, TLSMode.NONE)
    backend, default_backend = _backend(table, protocol, backends)
    listener = Listener(
        name=name,
        protocol=protocol,
        listen=listen,
        tls=tls,
        backend=backend,
        default_backend=default_backend,
        policy=_policy(table.table("policy"), defaults),
        submission=submission,
        proxy_protocol=table.get("proxy_protocol", bool, False),
        trusted_proxies=_networks(table, "trusted_proxies"),
        # The listener's list replaces the top-level one, like policy keys.
        hostnames=_hostnames(table, "hostnames", hostnames),
        client_cert=_client_cert(table, tls),
    )
    table.finish()
    if listener.proxy_protocol and not listener.trusted_proxies:
        raise table.error(
            "trusted_proxies",
            "proxy_protocol needs the load balancers' addresses: only they may send the header",
        )
    return listener


def _client_cert(table: Table, tls: TLSMode) -> ClientCertSettings | None:
    ca_file = table.path_value("client_ca")
    requirement = table.choice("client_cert", CertRequirement, CertRequirement.OPTIONAL)
    rule = table.choice("client_cert_user", CertUserRule, CertUserRule.EMAIL)
    if ca_file is None:
        for key in ("client_cert", "client_cert_user"):
            if table.has(key):
                raise table.error(key, "needs client_ca (the CA of the clients' certificates)")
        return None
    if tls is TLSMode.NONE:
        raise table.error("client_ca", 'client certificates need tls = "starttls" or "implicit"')
    return ClientCertSettings(ca_file, requirement, rule)


def load(path: str | Path) -> Config:
    """Read and validate a config file; ConfigError on any problem."""
    source = Path(path)
    try:
        data = tomllib.loads(source.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    return from_dict(data, source)


def from_dict(data: Mapping[str, Any], source: Path) -> Config:
    root = Table(data, "", source)
    base = _policy(
        root.table("policy"),
        ListenerPolicy(protocol=Protocol.IMAP, mechanisms=DEFAULT_ORDER),
    )
    tls_table = root.table("tls")
    tls = TLSSettings()
    if tls_table is not None:
        tls = TLSSettings(cert=tls_table.path_value("cert"), key=tls_table.path_value("key"))
        tls_table.finish()
    audit_table = root.table("audit")
    audit_file = None
    if audit_table is not None:
        audit_file = audit_table.path_value("file")
        audit_table.finish()
    directory = None
    if root.has("directory") and root.has("users"):
        raise root.error("directory", "give [users] or [directory], not both")
    if root.has("directory"):
        directory_table = root.table("directory")
        assert directory_table is not None
        # Imported only when configured: python-ldap is an optional extra.
        from authgate.credentials.directory import parse_directory

        directory = parse_directory(directory_table.data, source)
    oauth = None
    oauth_table = root.table("oauth")
    if oauth_table is not None:
        oauth = parse_oauth(oauth_table.data, source)
    users_table = root.table("users")
    users_file = None
    if users_table is not None:
        users_file = users_table.path_value("file")
        users_table.finish()
    limits = _limits(root.table("limits"))
    defence, shared_defence = _defence(root.table("defence"))
    password_policy = PasswordPolicy()
    if root.has("password_policy"):
        policy_table = root.table("password_policy")
        assert policy_table is not None
        password_policy = parse_policy(policy_table.data, source)
    hostnames = _hostnames(root, "hostnames", ())
    backends = _backends(root)
    routing = _routing(root, backends)
    raw_listeners = root.get("listeners", list, [])
    listeners: list[Listener] = []
    bound: _Bound = []
    for i, item in enumerate(raw_listeners):
        where = f"listeners[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{source}: {where}: is not a table (use [[listeners]])")
        listeners.append(_listener(Table(item, where, source), base, bound, hostnames, backends))
    workers = _workers(root)
    event_loop = root.choice("event_loop", EventLoop, default_event_loop())
    log_format = root.choice("log_format", LogFormat, LogFormat.TEXT)
    log_level = root.choice("log_level", LogLevel, LogLevel.INFO)
    metrics = _metrics(root.table("metrics"))
    control = _control(root.table("control"))
    run_as = RunAs(
        user=root.get("user", str, "") or None,
        group=root.get("group", str, "") or None,
        run_as_root=root.get("run_as_root", bool, False),
    )
    if run_as.group is not None and run_as.user is None:
        raise root.error("group", "needs user as well")
    if event_loop is EventLoop.UVLOOP and not uvloop_usable():
        raise root.error(
            "event_loop",
            "'uvloop' needs the uvloop package, built for this Python: pip install uvloop",
        )
    hostname = root.get("hostname", str, "localhost")
    if not _HOSTNAME.fullmatch(hostname):
        raise root.error(
            "hostname", f"{hostname!r} is not a DNS host name (ASCII letters, digits, - and .)"
        )
    root.finish()
    _check_unique(listeners, source, "name", lambda x: x.name)
    for i, listener in enumerate(listeners):
        if listener.backend.mode is BackendMode.TERMINATE and users_file is None and not directory:
            raise ConfigError(
                f"{source}: listeners[{i}].backend.mode: terminate mode verifies users "
                "itself: set [users] file or [directory] (or use mode = 'relay')"
            )
        if listener.tls is not TLSMode.NONE and (tls.cert is None or tls.key is None):
            raise ConfigError(
                f"{source}: listeners[{i}].tls: {listener.tls.value!r} needs [tls] cert and key"
            )
    return Config(
        path=source,
        hostname=hostname,
        tls=tls,
        users_file=users_file,
        listeners=tuple(listeners),
        audit_file=audit_file,
        directory=directory,
        oauth=oauth,
        limits=limits,
        defence=defence,
        shared_defence=shared_defence,
        workers=workers,
        event_loop=event_loop,
        password_policy=password_policy,
        hostnames=hostnames,
        backends=backends,
        routing=routing,
        log_format=log_format,
        log_level=log_level,
        metrics=metrics,
        control=control,
        run_as=run_as,
    )


def _is_us(backend: Address, bound: _Bound) -> str | None:
    """Where a listener binds the address `backend` connects to, if it does
    (a backend that is authgate itself would recurse). Host names are not
    resolved here; the driver also refuses a connection that lands on one
    of its own sockets (authgate.proxy.loop)."""
    host = "127.0.0.1" if backend.host.lower() == "localhost" else backend.host
    target = _ip(host)
    for address, where in bound:
        if address.port != backend.port:
            continue
        mine = _ip(address.host)
        if mine is None or target is None:
            if address.host.lower() == backend.host.lower():
                return where
            continue
        if mine == target:
            return where
        if (
            mine.is_unspecified
            and mine.version == target.version
            and (target.is_loopback or target.is_unspecified)
        ):
            return where
    return None


def loops(config: Config) -> list[str]:
    """Backends that are one of our own listeners (a session would loop
    back into the gateway), as messages for `authgate check`. The driver
    also refuses such a connection when it is made (authgate.proxy.routes)."""
    bound: _Bound = []
    for i, listener in enumerate(config.listeners):
        bound.extend(
            (address, f"listeners[{i}].listen") for address in listener.listen if address.port
        )
    found: list[str] = []
    for i, listener in enumerate(config.listeners):
        if listener.default_backend is not None:
            continue  # a [backends] entry: below
        for member in listener.default_members():
            where = _is_us(member.address, bound)
            if where is not None:
                found.append(
                    f"listeners[{i}].backend: {str(member.address)!r} is authgate itself "
                    f"({where}): a session would loop back into the gateway"
                )
    for name, backend in config.backends.items():
        for _protocol, member in backend.all_members():
            where = _is_us(member.address, bound)
            if where is not None:
                found.append(
                    f"backends.{name}: {str(member.address)!r} is authgate itself "
                    f"({where}): a session would loop back into the gateway"
                )
    return found


def _check_unique(
    listeners: list[Listener], source: Path, key: str, value: Callable[[Listener], str | None]
) -> None:
    seen: dict[str, int] = {}
    for i, listener in enumerate(listeners):
        v = value(listener)
        if v is None:
            continue
        if v in seen:
            raise ConfigError(
                f"{source}: listeners[{i}].{key}: {v!r} is already used by listeners[{seen[v]}]"
            )
        seen[v] = i
