"""Firewall guidance: which ports of a config to open, and why.

The admin page this project re-creates gives a fixed table (allow SMTP 25,
SMTPS 465, submission 587, POP3S 995, IMAPS 993, ...; deny POP3 110, IMAP
143, ...): the cleartext ports are closed because a password could cross the
network in clear there. authgate decides that per listener instead, from its
TLS mode and its effective policy:

- implicit TLS: allow, everything is encrypted from the first byte;
- IMAP or POP3 with STARTTLS (or without TLS) beside an implicit-TLS
  listener of the same protocol: deny, or allow only from the exempt
  networks; clients belong on the implicit-TLS port, as the page says
  ("allow the secured version"), as RFC 8314 prefers (sections 3.1 for
  POP, 3.2 for IMAP; 4.1 phases out cleartext access), and as the
  STARTTLS studies argue (NO STARTTLS, USENIX Security 2021: injection and
  stripping bugs in the upgrade itself);
- STARTTLS otherwise: allow, clients upgrade; the policy says whether
  anything may authenticate before they do;
- no TLS: allow only when clients outside the exempt networks can log in
  without sending a password in clear (challenge-response under
  require-secure-auth); otherwise allow only from the exempt networks, or
  deny;
- SMTP as the page has it: submission 587 with STARTTLS stays allowed
  beside 465 (RFC 8314 section 3.3: as safe when both sides insist on
  TLS), and a server-to-server listener (port 25) is allowed, other
  servers must reach it, many without TLS.

A listener on several addresses (`listen = ["0.0.0.0:143", "[::]:143"]`)
gets one entry per address.

Backends on non-loopback addresses are listed as "deny": only authgate
should reach them. `authgate ports` prints the table, or nftables or
iptables rules that use nothing but the config's ports and addresses.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from authgate.config import BackendMode, Config, Listener, TLSMode
from authgate.credentials.base import CredentialStore
from authgate.offers import listener_offer
from authgate.policy import (
    Decision,
    ExemptNetworks,
    IPAddress,
    IPNetwork,
    ListenerPolicy,
    Protocol,
    Security,
    decide,
    unmap,
)
from authgate.sasl import MECHANISMS

__all__ = [
    "Action",
    "PortEntry",
    "port_table",
    "render_iptables",
    "render_nft",
    "render_table",
    "warnings",
]


class Action(enum.Enum):
    ALLOW = "allow"
    EXEMPT_ONLY = "allow only from exempt networks"
    DENY = "deny"
    LOCAL = "no rule (loopback)"


class Origin(enum.Enum):
    LISTENER = "listener"
    BACKEND = "backend"
    STANDARD = "standard"  # a well-known service authgate does not serve


@dataclass(frozen=True)
class PortEntry:
    service: str
    port: int
    action: Action
    why: str
    origin: Origin
    host: str | None = None  # as configured; None: any address
    # The one local address a rule must match (`ip daddr`); None: any.
    destination: IPAddress | None = None
    sources: tuple[IPNetwork, ...] = ()  # EXEMPT_ONLY: who may connect


# The seed's table, for the services authgate does not serve (with --all).
# The mail services come from the config's listeners instead, and so do
# NNTP and LDAP rows once the config has a listener of that protocol.
_STANDARD: Final[tuple[tuple[str, int, Action, str], ...]] = (
    ("NNTP", 119, Action.DENY, "cleartext news; clients use NNTPS 563"),
    ("NNTPS", 563, Action.ALLOW, "news over implicit TLS"),
    ("LDAP", 389, Action.DENY, "cleartext directory binds; clients use LDAPS 636"),
    ("LDAPS", 636, Action.ALLOW, "directory over implicit TLS"),
    ("HTTP", 80, Action.DENY, "cleartext web logins; clients use HTTPS 443"),
    ("HTTPS", 443, Action.ALLOW, "web over implicit TLS"),
)
# The standard rows a listener of the protocol serves instead (HTTP: none).
_STANDARD_PROTOCOL: Final = {
    "NNTP": Protocol.NNTP,
    "NNTPS": Protocol.NNTP,
    "LDAP": Protocol.LDAP,
    "LDAPS": Protocol.LDAP,
}

# Ranges that are never "the Internet": an exemption inside them is a LAN
# decision. Our own list because ipaddress's is_private calls 0.0.0.0/0
# private on Python 3.11 (it checks the first and last address only).
_LOCAL_RANGES: Final[tuple[IPNetwork, ...]] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "fc00::/7",
        "fe80::/10",
        "::1/128",
    )
)
# An exempt network of public addresses this large (a /8 of IPv4, 2^112 of
# IPv6) is no office LAN; it is a mistake such as 0.0.0.0/0.
_BROAD_PREFIX: Final = {4: 8, 6: 16}


# ---------------------------------------------------------------- helpers


def _clean(text: str) -> str:
    """Config strings (listener names, host names) go into terminal output,
    nft files and shell scripts: no control characters, so no line breaks
    that would turn a comment into a rule."""
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def _ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


def _is_loopback(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    address = _ip(host)
    return address is not None and unmap(address).is_loopback


def _destination(host: str) -> IPAddress | None:
    """A specific address to match, or None for a wildcard or a host name
    (which we do not resolve: the rule then covers the port on every
    address)."""
    address = _ip(host)
    if address is None or address.is_unspecified:
        return None
    return unmap(address)


def _show_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _is_broad(network: IPNetwork) -> bool:
    if any(_within(network, local) for local in _LOCAL_RANGES):
        return False
    return network.prefixlen <= _BROAD_PREFIX[network.version]


def _within(network: IPNetwork, outer: IPNetwork) -> bool:
    if isinstance(network, ipaddress.IPv4Network) and isinstance(outer, ipaddress.IPv4Network):
        return network.subnet_of(outer)
    if isinstance(network, ipaddress.IPv6Network) and isinstance(outer, ipaddress.IPv6Network):
        return network.subnet_of(outer)
    return False


def _everyone_exempt(exempt: ExemptNetworks) -> bool:
    return {4, 6} <= {n.version for n in exempt.networks if n.prefixlen == 0}


Verifiable = tuple[str, ...] | None


def _verifiable(listener: Listener, store: CredentialStore | None, realm: str) -> Verifiable:
    """The mechanisms the listener can verify (as `authgate check` computes
    them); None when that depends on a users file we were not given."""
    if listener.backend.mode is BackendMode.RELAY or store is not None:
        return listener_offer(listener, store, realm).verifiable
    return None


def _outsider(policy: ListenerPolicy, verifiable: Verifiable) -> Decision:
    """What a client outside the exempt networks gets before TLS. The
    decision depends only on whether the client is exempt, so an empty
    exempt list and any address stand for every outsider."""
    security = Security.NONE if _everyone_exempt(policy.exempt) else policy.security
    plain = dataclasses.replace(policy, exempt=ExemptNetworks(), security=security)
    return decide(plain, "192.0.2.1", tls=False, verifiable=verifiable)


# How the page (and RFC 5804) spell a service whose name is not just its
# protocol's in capitals.
_SERVICE_NAMES: Final = {Protocol.MANAGESIEVE: "ManageSieve"}


def _label(listener: Listener) -> str:
    implicit = listener.tls is TLSMode.IMPLICIT
    name = _SERVICE_NAMES.get(listener.protocol, listener.protocol.value.upper())
    label = name + ("S" if implicit else "")
    if listener.protocol is Protocol.SMTP and listener.submission and not implicit:
        label = "submission"
    elif listener.protocol is Protocol.SMTP and not listener.submission:
        label = "SMTP"  # server-to-server, whatever its TLS mode
    return f"{label} ({_clean(listener.name)})"


def _challenge_response(decision: Decision) -> str:
    names = [m for m in decision.offered if not MECHANISMS[m].cleartext]
    return ", ".join(names)


def _reachable(listener: Listener) -> bool:
    """Listens on at least one address other than loopback."""
    return not all(_is_loopback(address.host) for address in listener.listen)


def _outside_ports(listener: Listener) -> str:
    ports = dict.fromkeys(str(a.port) for a in listener.listen if not _is_loopback(a.host))
    return ", ".join(ports)


# The protocols whose cleartext/STARTTLS port the page denies when the
# implicit-TLS one is open (IMAP 143 vs 993, POP3 110 vs 995, LDAP 389 vs
# 636: the page denies 389 and allows 636).
_SECURED_VERSION: Final = {
    Protocol.IMAP: "IMAPS",
    Protocol.POP3: "POP3S",
    Protocol.LDAP: "LDAPS",
    Protocol.NNTP: "NNTPS",  # the page denies 119 and allows 563
}


def _secured_versions(listeners: Sequence[Listener]) -> dict[Protocol, list[Listener]]:
    """The reachable implicit-TLS listeners of each mail-access protocol."""
    found: dict[Protocol, list[Listener]] = {}
    for listener in listeners:
        if (
            listener.protocol in _SECURED_VERSION
            and listener.tls is TLSMode.IMPLICIT
            and _reachable(listener)
        ):
            found.setdefault(listener.protocol, []).append(listener)
    return found


# ------------------------------------------------------------------ table


def _listener_entries(
    listener: Listener, verifiable: Verifiable, secured: Sequence[Listener]
) -> list[PortEntry]:
    """One entry per address of the listener; `secured` are the reachable
    implicit-TLS listeners of its protocol (IMAP and POP3 only)."""
    decided = _listener_entry(listener, verifiable, secured)
    entries = []
    for address in listener.listen:
        entry = dataclasses.replace(
            decided, port=address.port, host=address.host, destination=_destination(address.host)
        )
        if _is_loopback(address.host):
            entry = dataclasses.replace(
                entry,
                action=Action.LOCAL,
                why="listens on loopback only: not reachable from outside",
                sources=(),
            )
        entries.append(entry)
    return entries


def _listener_entry(
    listener: Listener, verifiable: Verifiable, secured: Sequence[Listener]
) -> PortEntry:
    """The verdict for the listener's reachable addresses (address fields
    filled in by the caller)."""
    base = PortEntry(
        service=_label(listener),
        port=0,
        action=Action.ALLOW,
        why="",
        origin=Origin.LISTENER,
    )
    policy = listener.policy
    outsider = _outsider(policy, verifiable)
    # The policy outsiders get: `none` when the exempt networks cover everyone.
    security = outsider.effective.value
    no_session = outsider.session_tls_required
    if listener.tls is TLSMode.IMPLICIT:
        return dataclasses.replace(base, why="implicit TLS: encrypted from the first byte")

    if secured and not (listener.tls is TLSMode.NONE and not _allowed_without_tls(outsider)):
        # The same protocol is served with implicit TLS: send clients there.
        # (A cleartext listener that would be denied anyway keeps its reason.)
        where = " and ".join(f"{_label(x)} on {_outside_ports(x)}" for x in secured)
        starttls = listener.tls is TLSMode.STARTTLS
        # RFC 8314 is about mail; for LDAP and NNTP the admin page's own table says so.
        page = listener.protocol in (Protocol.LDAP, Protocol.NNTP)
        prefers = "the page's table" if page else "RFC 8314"
        why = (
            f"{'STARTTLS' if starttls else 'no TLS'}; use {where}: TLS from the first byte, "
            f"as {prefers} prefers"
        )
        if starttls:
            why += " (STARTTLS upgrades have had injection and stripping bugs)"
        return _deny_or_exempt(base, policy, why)

    if listener.tls is TLSMode.STARTTLS:
        if policy.server_to_server:
            why = "mail from other servers (MX), STARTTLS offered; many servers cannot do TLS"
            if outsider.cleartext_login:
                why += "; but AUTH accepts cleartext passwords before STARTTLS (see warnings)"
        elif outsider.cleartext_login:
            why = (
                f"STARTTLS, but security {security!r} accepts cleartext passwords "
                "before the upgrade (see warnings)"
            )
        elif outsider.tls_required:
            nothing = "no session and no login" if no_session else "nothing authenticates"
            why = f"STARTTLS; {security}: {nothing} before TLS, so clients must upgrade"
        else:
            why = f"STARTTLS; {security}: passwords only after the upgrade"
            if mechs := _challenge_response(outsider):
                why += f", challenge-response ({mechs}) before it"
        if secured_version := _SECURED_VERSION.get(listener.protocol):
            why += f"; no {secured_version} listener to send clients to instead"
        return dataclasses.replace(base, why=why)

    # No TLS at all on this listener.
    if policy.server_to_server:
        why = "mail from other servers (MX): they deliver unauthenticated, many without TLS"
        if outsider.cleartext_login:
            why += "; but AUTH accepts cleartext passwords (see warnings)"
        return dataclasses.replace(base, why=why)
    if outsider.cleartext_login:
        reason = f"no TLS and security {security!r}: passwords would cross the network in clear"
    elif outsider.tls_required:
        nothing = "cannot even open a session" if no_session else "cannot authenticate"
        reason = f"no TLS and {security}: clients outside the exempt networks {nothing}"
    elif not outsider.offered:
        reason = (
            f"no TLS, and {security} allows none of the enabled mechanisms without it: "
            "clients outside the exempt networks cannot authenticate"
        )
    else:
        mechs = _challenge_response(outsider)
        why = (
            f"no TLS; {security}: outside clients log in by challenge-response only "
            f"({mechs}), never with a cleartext password; mail itself is not encrypted"
        )
        return dataclasses.replace(base, why=why)
    return _deny_or_exempt(base, policy, reason)


def _allowed_without_tls(outsider: Decision) -> bool:
    """A listener without TLS that outsiders may use: they can log in, and
    never with a cleartext password (challenge-response only)."""
    return not outsider.cleartext_login and not outsider.tls_required and bool(outsider.offered)


def _deny_or_exempt(base: PortEntry, policy: ListenerPolicy, reason: str) -> PortEntry:
    """Deny; but the exempt networks keep the port (they are treated as
    policy none: the admin let them in without TLS)."""
    if not policy.exempt:
        return dataclasses.replace(base, action=Action.DENY, why=reason)
    nets = ", ".join(str(n) for n in policy.exempt.networks)
    return dataclasses.replace(
        base,
        action=Action.EXEMPT_ONLY,
        why=f"{reason}; exempt networks ({nets}) are treated as policy none",
        sources=policy.exempt.networks,
    )


def _backend_entries(listeners: Sequence[Listener]) -> list[PortEntry]:
    users: dict[tuple[str, int], list[str]] = {}
    for listener in listeners:
        address = listener.backend.address
        if _is_loopback(address.host):
            continue
        users.setdefault((address.host, address.port), []).append(_clean(listener.name))
    entries = []
    for (host, port), names in users.items():
        why = "backend, reached by authgate only"
        if _destination(host) is None:
            why += f" (host name {_clean(host)}: the rule matches the port on every address)"
        entries.append(
            PortEntry(
                service=f"backend of {', '.join(names)}",
                port=port,
                action=Action.DENY,
                why=why,
                origin=Origin.BACKEND,
                host=host,
                destination=_destination(host),
            )
        )
    return entries


def port_table(
    config: Config, store: CredentialStore | None = None, *, include_standard: bool = False
) -> list[PortEntry]:
    """One entry per listener address, then the backends on non-loopback addresses,
    then (include_standard) the seed's non-mail services whose ports the
    config does not use. With the users `store`, mechanisms it cannot
    verify count as not offered (as in `authgate check`)."""
    secured = _secured_versions(config.listeners)
    entries = [
        entry
        for listener in config.listeners
        for entry in _listener_entries(
            listener,
            _verifiable(listener, store, config.hostname),
            secured.get(listener.protocol, []),
        )
    ]
    entries += _backend_entries(config.listeners)
    if include_standard:
        used = {e.port for e in entries}
        served = {listener.protocol for listener in config.listeners}
        for service, port, action, why in _STANDARD:
            if port not in used and _STANDARD_PROTOCOL.get(service) not in served:
                entries.append(
                    PortEntry(
                        service, port, action, f"not served by authgate: {why}", Origin.STANDARD
                    )
                )
    return entries


def render_table(entries: Sequence[PortEntry]) -> str:
    header = ("service", "port", "address", "action", "why")
    rows = [header] + [
        (
            e.service,
            str(e.port),
            "any" if e.host is None else _clean(_show_host(e.host)),
            e.action.value,
            e.why,
        )
        for e in entries
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ rules

Verdict = Literal["accept", "drop"]


@dataclass(frozen=True)
class _Rule:
    verdict: Verdict
    ports: tuple[int, ...]
    family: int | None = None  # 4 or 6; None: both
    sources: tuple[IPNetwork, ...] = ()  # all of `family`
    destination: IPAddress | None = None
    comments: tuple[str, ...] = ()


def _comment(entry: PortEntry) -> str:
    where = "any" if entry.host is None else _clean(_show_host(entry.host))
    return f"{entry.service} on {where}:{entry.port}: {entry.action.value}: {entry.why}"


def _collapse(networks: Iterable[IPNetwork], version: int) -> tuple[IPNetwork, ...]:
    # Overlapping elements (10.0.0.0/8 and 10.1.0.0/16) in an interval set
    # fail with "conflicting intervals" on some nft releases; merged, they
    # also make fewer iptables rules.
    if version == 4:
        v4 = [n for n in networks if isinstance(n, ipaddress.IPv4Network)]
        return tuple(ipaddress.collapse_addresses(v4))
    v6 = [n for n in networks if isinstance(n, ipaddress.IPv6Network)]
    return tuple(ipaddress.collapse_addresses(v6))


def _rules(entries: Sequence[PortEntry]) -> tuple[list[_Rule], list[str]]:
    """The rules in the order they must be checked: rules naming addresses
    first, then the grouped accepts, then the grouped drops. Also the
    comments of entries that need no rule."""
    specific: list[_Rule] = []
    accepts: list[PortEntry] = []
    drops: list[PortEntry] = []
    notes: list[str] = []
    for entry in entries:
        if entry.action is Action.LOCAL:
            notes.append(_comment(entry))
            continue
        dest = entry.destination
        family = dest.version if dest is not None else None
        comment: tuple[str, ...] = (_comment(entry),)
        if entry.action is Action.EXEMPT_ONLY:
            for version in (4, 6):
                nets = _collapse(entry.sources, version)
                if nets and family in (None, version):
                    specific.append(_Rule("accept", (entry.port,), version, nets, dest, comment))
                    comment = ()
            specific.append(_Rule("drop", (entry.port,), family, (), dest, comment))
        elif dest is not None:
            verdict: Verdict = "accept" if entry.action is Action.ALLOW else "drop"
            specific.append(_Rule(verdict, (entry.port,), family, (), dest, comment))
        else:
            (accepts if entry.action is Action.ALLOW else drops).append(entry)
    groups: tuple[tuple[Verdict, list[PortEntry]], ...] = (("accept", accepts), ("drop", drops))
    grouped = [
        _Rule(
            verdict,
            tuple(dict.fromkeys(e.port for e in group)),
            comments=tuple(_comment(e) for e in group),
        )
        for verdict, group in groups
        if group
    ]
    return specific + grouped, notes


def _header(source: Path, warns: Sequence[str], load: str) -> list[str]:
    lines = [
        f"# Firewall rules for authgate, from {_clean(str(source))} (`authgate ports`).",
        "# They cover only that config's ports; everything else is left to your other rules.",
        f"# {load}",
    ]
    lines += [f"# warning: {_clean(w)}" for w in warns]
    return lines


def render_nft(entries: Sequence[PortEntry], source: Path, warns: Sequence[str] = ()) -> str:
    """An nftables file for `nft -f`: its own table, replaced on each load.
    An accept in one table does not override a drop in another: if another
    table drops by default, open the allowed ports there too."""
    rules, notes = _rules(entries)
    lines = _header(source, warns, "Load with: nft -f FILE (re-loading replaces the table).")
    lines.append("# An accept here does not override a drop in another table: open them there too.")
    lines += [
        # Creating the table first makes the delete succeed on the first load.
        "table inet authgate {}",
        "delete table inet authgate",
        "table inet authgate {",
        "    chain input {",
        "        type filter hook input priority filter; policy accept;",
        "        # authgate reaches its backends and local clients reach authgate over loopback",
        '        iif "lo" accept',
    ]
    lines += [f"        # {note}" for note in notes]
    for rule in rules:
        lines += [f"        # {c}" for c in rule.comments]
        parts: list[str] = []
        ip = "ip" if rule.family == 4 else "ip6"
        if rule.sources:
            parts.append(f"{ip} saddr {{ {', '.join(str(n) for n in rule.sources)} }}")
        if rule.destination is not None:
            parts.append(f"{ip} daddr {rule.destination}")
        ports = ", ".join(str(p) for p in rule.ports)
        parts.append(f"tcp dport {{ {ports} }}" if len(rule.ports) > 1 else f"tcp dport {ports}")
        parts.append(rule.verdict)
        lines.append("        " + " ".join(parts))
    lines += ["    }", "}"]
    return "\n".join(lines) + "\n"


def render_iptables(entries: Sequence[PortEntry], source: Path, warns: Sequence[str] = ()) -> str:
    """A shell script of iptables and ip6tables commands filling a chain
    AUTHGATE that INPUT jumps to first; running it again replaces the
    chain's rules."""
    rules, notes = _rules(entries)
    lines = ["#!/bin/sh"]
    lines += _header(source, warns, "Run as root: sh FILE (running it again replaces the rules).")
    lines += ["set -e"]
    tools = {4: "iptables", 6: "ip6tables"}
    for tool in tools.values():
        lines.append(f"{tool} -N AUTHGATE 2>/dev/null || {tool} -F AUTHGATE")
    lines.append("# authgate reaches its backends and local clients reach authgate over loopback")
    lines += [f"{tool} -A AUTHGATE -i lo -j ACCEPT" for tool in tools.values()]
    lines += [f"# {note}" for note in notes]
    target = {"accept": "ACCEPT", "drop": "DROP"}
    for rule in rules:
        lines += [f"# {c}" for c in rule.comments]
        versions = (4, 6) if rule.family is None else (rule.family,)
        for version in versions:
            tool = tools[version]
            sources: Sequence[IPNetwork | None] = rule.sources or (None,)
            for source_net in sources:
                for port in rule.ports:
                    args = [tool, "-A", "AUTHGATE"]
                    if source_net is not None:
                        args += ["-s", str(source_net)]
                    if rule.destination is not None:
                        args += ["-d", str(rule.destination)]
                    args += ["-p", "tcp", "--dport", str(port), "-j", target[rule.verdict]]
                    lines.append(" ".join(args))
    for tool in tools.values():
        lines.append(f"{tool} -C INPUT -j AUTHGATE 2>/dev/null || {tool} -I INPUT 1 -j AUTHGATE")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------- warnings


def warnings(config: Config, store: CredentialStore | None = None) -> list[str]:
    """Listeners that would take cleartext passwords from the network: on a
    non-loopback address, without implicit TLS, from clients outside the
    exempt networks or from exempt networks that span the Internet."""
    found: list[str] = []
    for listener in config.listeners:
        if not _reachable(listener) or listener.tls is TLSMode.IMPLICIT:
            continue
        policy = listener.policy
        verifiable = _verifiable(listener, store, config.hostname)
        where = (
            f"listener {_clean(listener.name)} ({listener.protocol.value} on "
            f"{_clean(listener.listen_text)}, tls {listener.tls.value}, "
            f"security {policy.security.value})"
        )
        if not _everyone_exempt(policy.exempt) and _outsider(policy, verifiable).cleartext_login:
            before = "before STARTTLS" if listener.tls is TLSMode.STARTTLS else "without TLS"
            found.append(
                f"{where} accepts cleartext passwords {before} from any client: use "
                "security 'require-secure-auth' or 'require-encrypted'"
            )
        broad = [n for n in policy.exempt.networks if _is_broad(n)]
        # Exempt clients are treated as policy `none`: they get the cleartext
        # mechanisms without TLS, if any are enabled.
        if (
            broad
            and decide(
                policy, broad[0].network_address, tls=False, verifiable=verifiable
            ).cleartext_login
        ):
            nets = ", ".join(str(n) for n in broad)
            found.append(
                f"{where}: exempt network {nets} spans much of the Internet; clients there "
                "may send cleartext passwords without TLS"
            )
    return found
