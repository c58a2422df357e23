"""Everything a listener needs at connection time, prepared once at start-up
(TLS contexts, channel-binding data, the store's offer), so that accepting a
connection does no file I/O and no expensive set-up."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from authgate.atrest.envelope import Keyring, open_secret_file
from authgate.config import Address, BackendMode, Config, Limits, Listener, TLSMode
from authgate.credentials.base import CredentialStore
from authgate.oauth.verifier import TokenVerifier
from authgate.offers import ListenerOffer, listener_offer
from authgate.password_policy import PasswordPolicy
from authgate.policy import Protocol
from authgate.protocols import imap, ldap, managesieve, nntp, pop3, smtp
from authgate.proxy import alpn
from authgate.proxy import tls as tls_mod
from authgate.proxy.routes import (
    ListenerRoutes,
    PreparedBackend,
    build_routes,
    check_user_entries,
    load_table,
)
from authgate.proxy.routes import read_master_password as read_master_password  # re-exported
from authgate.proxy.warm import WarmPool
from authgate.sasl import MECHANISMS
from authgate.sasl.oauth import MAX_TOKEN_OCTETS

# The longest OAUTHBEARER / XOAUTH2 message (authgate.sasl.oauth), base64,
# with room for the command around it.
BEARER_LINE = 4 * MAX_TOKEN_OCTETS // 3 + 1024


@dataclass(frozen=True)
class ProtocolParts:
    """What the driver takes from a protocol's module: its machines and the
    lines it says itself, outside the dialogue, before closing."""

    server: Callable[..., Any]
    client: Callable[..., Any]
    sasl_service: str  # GSSAPI service name (DIGEST-MD5 digest-uri), RFC 2831
    busy: bytes  # the protocol's "try again later" greeting, when over a connection limit
    goodbye: bytes  # said to a client that stayed silent too long before authenticating
    blocked: bytes  # greeting for an address blocked by the brute-force defence
    unavailable: bytes  # the backend could not be made ready for a hand-over
    # The shortest command line the protocol must accept, whatever the
    # configured max_line says (SMTP: RFC 4954's 12288-octet AUTH line).
    min_line: int = 0
    # The greeting lists capabilities the backend has (ManageSieve's
    # "SIEVE"): the driver asks the backend before greeting a client.
    greeting_from_backend: bool = False


PROTOCOL_PARTS: dict[Protocol, ProtocolParts] = {
    Protocol.SMTP: ProtocolParts(
        server=smtp.SmtpServer,
        client=smtp.SmtpClient,
        sasl_service="smtp",
        busy=smtp.BYE_BUSY,
        goodbye=smtp.BYE_IDLE,
        blocked=smtp.BYE_BLOCKED,
        unavailable=smtp.BYE_UNAVAILABLE,
        min_line=smtp.AUTH_LINE_LIMIT,
    ),
    Protocol.IMAP: ProtocolParts(
        server=imap.ImapServer,
        client=imap.ImapClient,
        sasl_service="imap",
        busy=imap.BYE_BUSY,
        goodbye=imap.BYE_IDLE,
        blocked=imap.BYE_BLOCKED,
        unavailable=imap.BYE_UNAVAILABLE,
    ),
    Protocol.POP3: ProtocolParts(
        server=pop3.Pop3Server,
        client=pop3.Pop3Client,
        sasl_service="pop",
        busy=pop3.BYE_BUSY,
        goodbye=pop3.BYE_IDLE,
        blocked=pop3.BYE_BLOCKED,
        unavailable=pop3.BYE_UNAVAILABLE,
    ),
    Protocol.NNTP: ProtocolParts(
        server=nntp.NntpServer,
        client=nntp.NntpClient,
        sasl_service="nntp",  # the GSSAPI service name INN's nnrpd uses too
        busy=nntp.BYE_BUSY,
        goodbye=nntp.BYE_IDLE,
        blocked=nntp.BYE_BLOCKED,
        unavailable=nntp.BYE_UNAVAILABLE,
    ),
    Protocol.MANAGESIEVE: ProtocolParts(
        server=managesieve.ManageSieveServer,
        client=managesieve.ManageSieveClient,
        # RFC 5804 section 2.1: the GSSAPI service name is "sieve".
        sasl_service="sieve",
        busy=managesieve.BYE_BUSY,
        goodbye=managesieve.BYE_IDLE,
        blocked=managesieve.BYE_BLOCKED,
        unavailable=managesieve.BYE_UNAVAILABLE,
        greeting_from_backend=True,
    ),
    # LDAP is one message-aware relay for the whole session
    # (authgate.proxy.ldap_session), not a pre-authentication machine and
    # a backend login: these factories make its relay and refuse the other.
    Protocol.LDAP: ProtocolParts(
        server=ldap.LdapRelay,
        client=ldap.no_client_machine,
        sasl_service="ldap",
        busy=ldap.BYE_BUSY,
        goodbye=ldap.BYE_IDLE,
        blocked=ldap.BYE_BLOCKED,
        unavailable=ldap.BYE_UNAVAILABLE,
    ),
}


class GreetingCache:
    """What the backend announces, for a greeting that repeats part of it
    (ManageSieve's "SIEVE" list, RFC 5804 section 1.7): asked once and kept
    for `ttl` seconds, so a client's connection does not cost a backend
    connection of its own before it authenticates. A failed ask is not
    kept: the next client asks again."""

    def __init__(self, ttl: float = 60.0) -> None:
        self.ttl = ttl
        self._value: tuple[str, ...] | None = None
        self._expires = 0.0
        self._lock = asyncio.Lock()

    async def get(
        self, ask: Callable[[], Awaitable[tuple[str, ...] | None]]
    ) -> tuple[str, ...] | None:
        loop = asyncio.get_running_loop()
        if self._value is not None and loop.time() < self._expires:
            return self._value
        # One ask at a time: the clients that arrive meanwhile wait for it.
        async with self._lock:
            if self._value is not None and loop.time() < self._expires:
                return self._value
            value = await ask()
            if value is not None:
                self._value, self._expires = value, loop.time() + self.ttl
            return value


@dataclass(frozen=True)
class ListenerRuntime:
    listener: Listener
    hostname: str
    offer: ListenerOffer
    store: CredentialStore | None
    parts: ProtocolParts
    server_tls: ssl.SSLContext | None  # for STARTTLS and implicit TLS
    channel_binding: bytes | None  # RFC 5929 tls-server-end-point of our certificate
    backend_tls: ssl.SSLContext | None
    limits: Limits
    password_policy: PasswordPolicy
    master_password: str | None = field(default=None, repr=False)
    greeting_cache: GreetingCache = field(default_factory=GreetingCache, repr=False, compare=False)
    # [oauth]: verifies OAUTHBEARER / XOAUTH2 tokens (None: not configured).
    tokens: TokenVerifier | None = None
    # Where users go: the default backend, named backends, the routing table.
    routes: ListenerRoutes | None = None

    def warm_pools(self) -> list[WarmPool]:
        """The warm connections this listener's logins may claim."""
        return [] if self.routes is None else list(self.routes.warm.values())

    @property
    def relay(self) -> bool:
        return self.listener.backend.mode is BackendMode.RELAY

    @property
    def max_line(self) -> int:
        """The longest command line this listener's sessions read."""
        longest = max(self.limits.max_line, self.parts.min_line)
        # Bearer tokens are offered when the [oauth] verifier checks them,
        # or in relay mode, where the backend does (and no verifier is set).
        verified = self.tokens is not None or self.relay
        if verified and any(MECHANISMS[m].bearer for m in self.offer.verifiable):
            # A bearer token runs to many KiB (RFC 7628 sets no limit): a
            # 16 KiB OAUTHBEARER message, base64, on one command line.
            longest = max(longest, BEARER_LINE)
        return longest


def build_runtime(
    config: Config, store: CredentialStore | None, keyring: Keyring | None = None
) -> list[ListenerRuntime]:
    """Prepare every listener; raises TLSConfigError for unusable certificates."""
    from authgate.sasl.scram import tls_server_end_point

    cert, key = config.tls.cert, config.tls.key
    binding: bytes | None = None
    if cert is not None and key is not None:
        binding = tls_server_end_point(tls_mod.leaf_certificate_der(cert))
    tokens = None
    if config.oauth is not None:
        tokens = TokenVerifier.from_settings(
            config.oauth, lambda p: open_secret_file(p, keyring).decode("utf-8")
        )
    runtimes = []
    table = load_table(config)
    check_user_entries(config, store)
    prepared: dict[str, PreparedBackend] = {}
    pools: dict[tuple[str, Address], WarmPool] = {}  # warm connections, one set per member
    # One context per protocol: each knows its protocol's ALPN identifiers.
    contexts: dict[Protocol, ssl.SSLContext] = {}
    for listener in config.listeners:
        server_tls = None
        if listener.tls is not TLSMode.NONE and cert is not None and key is not None:
            ids = alpn.PROTOCOL_IDS[listener.protocol.value]
            if listener.client_cert is not None:
                # Its own context: it asks for client certificates.
                server_tls = tls_mod.server_context(
                    cert, key, alpn=ids, client_cert=listener.client_cert
                )
            else:
                server_tls = contexts.get(listener.protocol)
            if server_tls is None:
                server_tls = contexts[listener.protocol] = tls_mod.server_context(
                    cert, key, alpn=ids
                )
        routes = build_routes(config, listener, table, keyring, prepared, pools)
        default = routes.prepared_for(listener.route_default)
        runtimes.append(
            ListenerRuntime(
                listener=listener,
                hostname=config.hostname,
                offer=listener_offer(listener, store, config.hostname, oauth=tokens is not None),
                store=store,
                parts=PROTOCOL_PARTS[listener.protocol],
                server_tls=server_tls,
                channel_binding=binding,
                backend_tls=default.tls,
                limits=config.limits,
                password_policy=config.password_policy,
                master_password=default.master_password,
                tokens=tokens,
                routes=routes,
            )
        )
    return runtimes
