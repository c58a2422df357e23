"""What a client may be offered, and why a request is refused: pure functions.

Everything here is a function of its arguments (listener settings, client
address, TLS state, what the credential store can verify). No I/O, no
clock, no globals, so a mail client's negotiation can be unit-tested with no
network at all, and `authgate negotiate` prints exactly what a live
listener would do.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from authgate.sasl import MECHANISMS

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Security(enum.Enum):
    NONE = "none"
    REQUIRE_SECURE_AUTH = "require-secure-auth"
    REQUIRE_ENCRYPTED = "require-encrypted"


class Protocol(enum.Enum):
    SMTP = "smtp"
    IMAP = "imap"
    POP3 = "pop3"
    LDAP = "ldap"
    NNTP = "nntp"
    MANAGESIEVE = "managesieve"


class Refusal(enum.Enum):
    """Why a mechanism (or a cleartext login command) is refused.

    Each protocol maps these to its own reply, e.g. for SMTP:
    TLS_REQUIRED -> 530 5.7.0, MECHANISM_NEEDS_TLS -> 538 5.7.11,
    NOT_AVAILABLE -> 504 5.5.4; for IMAP both TLS reasons -> [PRIVACYREQUIRED].
    """

    NOT_AVAILABLE = "not-available"  # not enabled, unknown, or not verifiable by the store
    TLS_REQUIRED = "tls-required"  # require-encrypted: nothing authenticates before TLS
    MECHANISM_NEEDS_TLS = "mechanism-needs-tls"  # require-secure-auth: cleartext needs TLS
    CHANNEL_BINDING_UNAVAILABLE = "channel-binding-unavailable"  # *-PLUS outside TLS


class Withheld(enum.Enum):
    """Why a configured mechanism is not offered on this connection."""

    STORE_CANNOT_VERIFY = "the credential store cannot verify it"
    NEEDS_TLS = "cleartext mechanisms need TLS under require-secure-auth"
    TLS_REQUIRED = "require-encrypted: no authentication before TLS"
    CHANNEL_BINDING = "channel binding needs TLS"
    NO_CLIENT_CERT = "EXTERNAL needs a verified client certificate that maps to a user"

    @property
    def refusal(self) -> Refusal:
        return _WITHHELD_REFUSAL[self]


_WITHHELD_REFUSAL = {
    Withheld.STORE_CANNOT_VERIFY: Refusal.NOT_AVAILABLE,
    Withheld.NEEDS_TLS: Refusal.MECHANISM_NEEDS_TLS,
    Withheld.TLS_REQUIRED: Refusal.TLS_REQUIRED,
    Withheld.CHANNEL_BINDING: Refusal.CHANNEL_BINDING_UNAVAILABLE,
    Withheld.NO_CLIENT_CERT: Refusal.NOT_AVAILABLE,
}


@dataclass(frozen=True)
class ExemptNetworks:
    """Client ranges that may authenticate insecurely (treated as `none`)."""

    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> ExemptNetworks:
        """Parse CIDR strings; ValueError names the bad entry."""
        nets: list[IPNetwork] = []
        for entry in entries:
            try:
                # strict: "10.0.0.1/8" has host bits set and is almost always a typo.
                nets.append(ipaddress.ip_network(entry.strip(), strict=True))
            except ValueError as exc:
                raise ValueError(f"{entry!r} is not a network ({exc})") from None
        return cls(tuple(nets))

    def __contains__(self, address: object) -> bool:
        if not self.networks:
            return False
        if not isinstance(address, str | ipaddress.IPv4Address | ipaddress.IPv6Address):
            return False
        ip = client_ip(address)
        if ip is None:
            return False
        return any(ip in net for net in self.networks if net.version == ip.version)

    def __bool__(self) -> bool:
        return bool(self.networks)


def client_ip(address: str | IPAddress) -> IPAddress | None:
    """A client's address as an IP (an IPv6 zone dropped, an IPv4-mapped
    address unwrapped), or None when it is not an IP (a Unix socket, say)."""
    if not isinstance(address, str):
        return unmap(address)
    return _parsed_ip(address)


@functools.lru_cache(maxsize=4096)
def _parsed_ip(address: str) -> IPAddress | None:
    """client_ip of a text: a login asks it of the same few texts several
    times (session, policy, defence), and the addresses are immutable."""
    try:
        return unmap(ipaddress.ip_address(address.split("%", 1)[0]))
    except ValueError:
        return None


def unmap(address: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 client (::ffff:10.1.2.3, as a dual-stack socket
    reports IPv4 peers) is the IPv4 client it wraps."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@dataclass(frozen=True)
class ListenerPolicy:
    """The policy inputs that belong to a listener."""

    protocol: Protocol
    security: Security = Security.REQUIRE_SECURE_AUTH
    mechanisms: tuple[str, ...] = ("CRAM-MD5", "DIGEST-MD5", "NTLM", "LOGIN", "PLAIN")
    exempt: ExemptNetworks = field(default_factory=ExemptNetworks)
    # Port-25 style listener: other servers may hand us mail unauthenticated
    # and without TLS, whatever the policy says about authentication.
    server_to_server: bool = False
    # NTLM: also accept NTLMv1 and the NTLM2 session response (DES-based,
    # crackable from one captured exchange) from clients that send nothing
    # better. Never LM.
    allow_ntlm_legacy: bool = False


@dataclass(frozen=True)
class Decision:
    """What one connection state is offered."""

    offered: tuple[str, ...]  # SASL mechanisms to advertise, in the admin's order
    cleartext_login: bool  # IMAP LOGIN, POP3 USER/PASS
    tls_required: bool  # nothing may authenticate until TLS
    session_tls_required: bool  # no mail session at all until TLS
    exempt: bool
    effective: Security  # the policy applied (NONE for exempt clients)
    withheld: Mapping[str, Withheld]  # configured mechanisms not offered, and why

    @property
    def binds_channel(self) -> bool:
        """Whether a SCRAM exchange on this connection gets channel-binding
        data: exactly when a -PLUS mechanism is advertised (only ever inside
        TLS). RFC 5802 section 6: a client's "y" flag then means someone
        stripped the -PLUS mechanisms (refused); without one advertised it
        means "I could bind, you cannot" (accepted). The one place this is
        decided, whichever way TLS started."""
        return any(MECHANISMS[m].channel_binding for m in self.offered)

    def withhold(self, names: Iterable[str], reason: Withheld) -> Decision:
        """This decision with `names` taken out of the offer for `reason`
        (EXTERNAL on a connection without a usable client certificate)."""
        gone = {n for n in names if n in self.offered}
        if not gone:
            return self
        return replace(
            self,
            offered=tuple(m for m in self.offered if m not in gone),
            withheld={**self.withheld, **{n: reason for n in gone}},
        )

    def refusal(self, mechanism: str) -> Refusal | None:
        """Why a client's AUTH/AUTHENTICATE with `mechanism` must be refused,
        or None when it may go ahead."""
        name = mechanism.upper()
        if name in self.offered:
            return None
        reason = self.withheld.get(name)
        return reason.refusal if reason is not None else Refusal.NOT_AVAILABLE

    def login_refusal(self) -> Refusal | None:
        """Why IMAP LOGIN / POP3 USER+PASS must be refused, or None."""
        if self.cleartext_login:
            return None
        if self.tls_required:
            return Refusal.TLS_REQUIRED
        if Withheld.NEEDS_TLS in self.withheld.values():
            return Refusal.MECHANISM_NEEDS_TLS
        return Refusal.NOT_AVAILABLE

    def choose(self, client_mechanisms: Iterable[str]) -> str | None:
        """The mechanism used when the client supports `client_mechanisms`:
        the first in *our* (the admin's) order that both sides have."""
        theirs = {m.upper() for m in client_mechanisms}
        return next((m for m in self.offered if m in theirs), None)


def decide(
    listener: ListenerPolicy,
    client: IPAddress | str,
    *,
    tls: bool,
    verifiable: Iterable[str] | None = None,
) -> Decision:
    """The one policy function.

    `verifiable` is the set of mechanisms the credential store can verify for
    every user (None: no local store, e.g. relay mode without a declared
    storage form: anything goes). Cleartext mechanisms and login commands
    need TLS under require-secure-auth; under require-encrypted nothing may
    authenticate before TLS; exempt clients are treated as `none`.
    """
    exempt = client in listener.exempt
    effective = Security.NONE if exempt else listener.security
    can_verify = None if verifiable is None else {m.upper() for m in verifiable}

    tls_required = effective is Security.REQUIRE_ENCRYPTED and not tls
    cleartext_ok = tls or effective is Security.NONE

    offered: list[str] = []
    withheld: dict[str, Withheld] = {}
    for name in dict.fromkeys(m.upper() for m in listener.mechanisms):
        info = MECHANISMS.get(name)
        if info is None:
            continue  # config validation rejects unknown names; be safe anyway
        reason: Withheld | None = None
        if can_verify is not None and name not in can_verify:
            reason = Withheld.STORE_CANNOT_VERIFY
        elif tls_required:
            reason = Withheld.TLS_REQUIRED
        elif info.cleartext and not cleartext_ok:
            reason = Withheld.NEEDS_TLS
        elif info.channel_binding and not tls:
            reason = Withheld.CHANNEL_BINDING
        if reason is None:
            offered.append(name)
        else:
            withheld[name] = reason

    # IMAP LOGIN and POP3 USER/PASS carry the password like PLAIN does: they
    # are allowed exactly when a cleartext mechanism is, so an admin who
    # enables only challenge-response mechanisms disables them too.
    return Decision(
        offered=tuple(offered),
        cleartext_login=any(MECHANISMS[m].cleartext for m in offered),
        tls_required=tls_required,
        # SMTP: many servers cannot do TLS, so require-encrypted governs
        # authentication there, not unauthenticated server-to-server mail;
        # submission needs authentication anyway, so TLS follows from it.
        session_tls_required=tls_required and listener.protocol is not Protocol.SMTP,
        exempt=exempt,
        effective=effective,
        withheld=withheld,
    )


def choose_client_mechanism(
    server_offers: Iterable[str],
    preference: Sequence[str],
    usable: Iterable[str] | None = None,
) -> str | None:
    """Client side: the first mechanism of our preference that the server
    offers and that we hold a usable secret for."""
    offers = {m.upper() for m in server_offers}
    can_use = None if usable is None else {m.upper() for m in usable}
    for name in preference:
        upper = name.upper()
        if upper in offers and (can_use is None or upper in can_use):
            return upper
    return None
