"""Firewall guidance: the port table, nftables and iptables output, warnings,
and the `ports` command, on the files in examples/ and small configs."""

from __future__ import annotations

import argparse
import ipaddress
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from authgate import config as config_mod
from authgate.commands.firewall import add_commands
from authgate.config import Config
from authgate.credentials.store import UserStore
from authgate.errors import UserError
from authgate.firewall import (
    Action,
    Origin,
    PortEntry,
    _is_broad,
    port_table,
    render_iptables,
    render_nft,
    render_table,
    warnings,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def summary(entries: list[PortEntry]) -> list[tuple[str, int, Action]]:
    return [(e.service, e.port, e.action) for e in entries]


def example(name: str) -> Config:
    return config_mod.load(EXAMPLES / f"{name}.toml")


HEAD = """
hostname = "mail.example.org"
[policy]
security = "{security}"
mechanisms = {mechanisms}
exempt_networks = {exempt}
[tls]
cert = "server.pem"
key = "server.key"
"""

LISTENER = """
[[listeners]]
name = "{name}"
protocol = "{protocol}"
listen = {listen}
tls = "{tls}"
submission = {submission}
[listeners.backend]
address = "{backend}"
mode = "relay"
{policy}
"""


def make_config(
    tmp_path: Path,
    *listeners: dict[str, str],
    security: str = "require-encrypted",
    mechanisms: str = '["CRAM-MD5", "LOGIN", "PLAIN"]',
    exempt: str = "[]",
) -> Config:
    text = HEAD.format(security=security, mechanisms=mechanisms, exempt=exempt)
    for i, item in enumerate(listeners):
        values = {
            "name": f"l{i}",
            "protocol": "imap",
            "listen": "0.0.0.0:143",
            "tls": "none",
            "submission": "true",
            "backend": "127.0.0.1:1143",
            "policy": "",
            **item,
        }
        if not values["listen"].startswith('["'):  # a TOML list as it is, else one string
            values["listen"] = f'"{values["listen"]}"'
        text += LISTENER.format(**values)
    path = tmp_path / "authgate.toml"
    path.write_text(text)
    return config_mod.load(path)


# ------------------------------------------------------------------ table


def test_table_for_the_sidecar_example() -> None:
    config = example("authgate")
    entries = port_table(config)
    # Backends are on loopback: nothing to close for them. IMAP on 143 sits
    # beside IMAPS on 993: only the office LAN (exempt) keeps 143.
    assert summary(entries) == [
        ("IMAP (imap)", 143, Action.EXEMPT_ONLY),
        ("IMAPS (imaps)", 993, Action.ALLOW),
        ("POP3S (pop3s)", 995, Action.ALLOW),
        ("submission (submission)", 587, Action.ALLOW),
        ("ManageSieve (sieve)", 4190, Action.ALLOW),
    ]
    why = {e.port: e.why for e in entries}
    assert why[993] == why[995] == "implicit TLS: encrypted from the first byte"
    # RFC 5804 has no implicit-TLS port to send Sieve clients to instead.
    assert why[4190].startswith("STARTTLS; require-secure-auth: passwords only after the upgrade")
    assert why[587] == (
        "STARTTLS; require-encrypted: nothing authenticates before TLS, so clients must upgrade"
    )
    assert why[143] == (
        "STARTTLS; use IMAPS (imaps) on 993: TLS from the first byte, as RFC 8314 prefers "
        "(STARTTLS upgrades have had injection and stripping bugs); "
        "exempt networks (192.168.0.0/16, fd00::/8) are treated as policy none"
    )
    assert [str(n) for n in entries[0].sources] == ["192.168.0.0/16", "fd00::/8"]
    assert warnings(config) == []


def test_table_uses_the_store_when_given() -> None:
    # sha-store.toml with a store whose users all have every form.
    config = example("sha-store")
    store = UserStore.load(EXAMPLES / "users.toml")
    (imap,) = port_table(config, store)
    assert "challenge-response (CRAM-MD5, DIGEST-MD5, NTLM) before it" in imap.why


def test_one_way_store_leaves_no_challenge_response() -> None:
    config = example("sha-store")
    assert config.users_file is not None
    store = UserStore.load(config.users_file)
    (imap,) = port_table(config, store)
    assert imap.action is Action.ALLOW
    assert imap.why == (
        "STARTTLS; require-secure-auth: passwords only after the upgrade; "
        "no IMAPS listener to send clients to instead"
    )


def mail_host(tmp_path: Path, *extra: dict[str, str], **kwargs: str) -> Config:
    """The issue's host: STARTTLS on 143 and 110 beside implicit TLS on 993
    and 995, submission on 587 and 465, and an MX on 25."""
    return make_config(
        tmp_path,
        {"name": "imap", "listen": "0.0.0.0:143", "tls": "starttls"},
        {"name": "imaps", "listen": "0.0.0.0:993", "tls": "implicit"},
        {"name": "pop3", "protocol": "pop3", "listen": "0.0.0.0:110", "tls": "starttls"},
        {"name": "pop3s", "protocol": "pop3", "listen": "0.0.0.0:995", "tls": "implicit"},
        {"name": "submission", "protocol": "smtp", "listen": "0.0.0.0:587", "tls": "starttls"},
        {"name": "smtps", "protocol": "smtp", "listen": "0.0.0.0:465", "tls": "implicit"},
        {"name": "mx", "protocol": "smtp", "listen": "0.0.0.0:25", "tls": "starttls",
         "submission": "false"},
        *extra,
        **kwargs,
    )  # fmt: skip


def test_starttls_beside_implicit_tls_is_denied_as_on_the_page(tmp_path: Path) -> None:
    entries = port_table(mail_host(tmp_path), include_standard=True)
    # The page's table, row for row, for the ports this host serves.
    assert summary(entries) == [
        ("IMAP (imap)", 143, Action.DENY),
        ("IMAPS (imaps)", 993, Action.ALLOW),
        ("POP3 (pop3)", 110, Action.DENY),
        ("POP3S (pop3s)", 995, Action.ALLOW),
        ("submission (submission)", 587, Action.ALLOW),
        ("SMTPS (smtps)", 465, Action.ALLOW),
        ("SMTP (mx)", 25, Action.ALLOW),
        ("NNTP", 119, Action.DENY),
        ("NNTPS", 563, Action.ALLOW),
        ("LDAP", 389, Action.DENY),
        ("LDAPS", 636, Action.ALLOW),
        ("HTTP", 80, Action.DENY),
        ("HTTPS", 443, Action.ALLOW),
    ]
    why = {e.port: e.why for e in entries}
    assert why[143] == (
        "STARTTLS; use IMAPS (imaps) on 993: TLS from the first byte, as RFC 8314 prefers "
        "(STARTTLS upgrades have had injection and stripping bugs)"
    )
    assert why[110].startswith("STARTTLS; use POP3S (pop3s) on 995: TLS from the first byte")
    # 587 stays open beside 465, as on the page.
    assert why[587].startswith("STARTTLS; require-encrypted: nothing authenticates before TLS")


def test_rules_follow_the_recommendation(tmp_path: Path) -> None:
    config = mail_host(tmp_path)
    entries = port_table(config)
    nft = render_nft(entries, config.path)
    assert nft_rules(nft) == [
        (None, (), None, None, (993, 995, 587, 465, 25), "accept"),
        (None, (), None, None, (143, 110), "drop"),
    ]
    nft_check(nft, tmp_path)
    commands = iptables_commands(render_iptables(entries, config.path))
    for tool in ("iptables", "ip6tables"):
        for port in (143, 110):
            assert [tool, "-A", "AUTHGATE", "-p", "tcp", "--dport", str(port), "-j", "DROP"] in (
                commands
            )
        assert [tool, "-A", "AUTHGATE", "-p", "tcp", "--dport", "993", "-j", "ACCEPT"] in commands


def test_starttls_beside_implicit_tls_keeps_the_exempt_networks(tmp_path: Path) -> None:
    config = mail_host(tmp_path, exempt='["192.168.0.0/16", "fd00::/8"]')
    imap, _, pop3 = port_table(config)[:3]
    assert imap.action is pop3.action is Action.EXEMPT_ONLY
    assert imap.why.endswith(
        "; exempt networks (192.168.0.0/16, fd00::/8) are treated as policy none"
    )
    nft = render_nft(port_table(config), config.path)
    assert nft_rules(nft)[:3] == [
        ("ip", ("192.168.0.0/16",), None, None, (143,), "accept"),
        ("ip6", ("fd00::/8",), None, None, (143,), "accept"),
        (None, (), None, None, (143,), "drop"),
    ]
    nft_check(nft, tmp_path)


@pytest.mark.parametrize("security", ["none", "require-secure-auth", "require-encrypted"])
def test_starttls_is_allowed_without_an_implicit_tls_listener_of_its_protocol(
    tmp_path: Path, security: str
) -> None:
    config = make_config(
        tmp_path,
        {"name": "imap", "listen": "0.0.0.0:143", "tls": "starttls"},
        {"name": "pop3", "protocol": "pop3", "listen": "0.0.0.0:110", "tls": "starttls"},
        # POP3S does not make IMAP's 143 redundant, nor does a loopback-only IMAPS.
        {"name": "pop3s", "protocol": "pop3", "listen": "0.0.0.0:995", "tls": "implicit"},
        {"name": "imaps-local", "listen": "127.0.0.1:993", "tls": "implicit"},
        security=security,
    )
    imap, pop3, _, local = port_table(config)
    assert imap.action is Action.ALLOW
    assert imap.why.endswith("; no IMAPS listener to send clients to instead")
    assert pop3.action is Action.DENY
    assert local.action is Action.LOCAL


def test_managesieve_row_on_4190(tmp_path: Path) -> None:
    # RFC 5804 has no implicit-TLS port: STARTTLS on 4190 is the one way in.
    config = make_config(
        tmp_path,
        {"name": "sieve", "protocol": "managesieve", "listen": "0.0.0.0:4190", "tls": "starttls"},
        security="require-secure-auth",
    )
    (entry,) = port_table(config)
    assert summary([entry]) == [("ManageSieve (sieve)", 4190, Action.ALLOW)]
    assert entry.why.startswith("STARTTLS; require-secure-auth: passwords only after the upgrade")
    assert "CRAM-MD5" in entry.why
    # Without TLS and with cleartext mechanisms only, it is closed like IMAP 143 would be.
    config = make_config(
        tmp_path,
        {"name": "sieve", "protocol": "managesieve", "listen": "0.0.0.0:4190"},
        security="none",
    )
    assert summary(port_table(config)) == [("ManageSieve (sieve)", 4190, Action.DENY)]


def test_cleartext_port_beside_implicit_tls_is_denied_too(tmp_path: Path) -> None:
    # Challenge-response only without TLS would be allowed on its own (see
    # above); beside IMAPS the mail itself belongs inside TLS.
    config = make_config(
        tmp_path,
        {"name": "imap", "listen": "0.0.0.0:143", "tls": "none"},
        {"name": "imaps", "listen": "0.0.0.0:993", "tls": "implicit"},
        security="require-secure-auth",
    )
    imap, _ = port_table(config)
    assert imap.action is Action.DENY
    assert imap.why.startswith("no TLS; use IMAPS (imaps) on 993: TLS from the first byte")


def test_a_listener_on_two_addresses_has_a_row_for_each(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        {"name": "imaps", "listen": '["0.0.0.0:993", "[::]:993"]', "tls": "implicit"},
        {"name": "imap", "listen": '["203.0.113.5:143", "[2001:db8::5]:143", "[::1]:10143"]',
         "tls": "starttls"},
        {"name": "pop3", "protocol": "pop3", "listen": '["127.0.0.1:110", "[::1]:110"]',
         "tls": "starttls"},
    )  # fmt: skip
    entries = port_table(config)
    assert [(e.service, e.host, e.port, e.action) for e in entries] == [
        ("IMAPS (imaps)", "0.0.0.0", 993, Action.ALLOW),
        ("IMAPS (imaps)", "::", 993, Action.ALLOW),
        ("IMAP (imap)", "203.0.113.5", 143, Action.DENY),
        ("IMAP (imap)", "2001:db8::5", 143, Action.DENY),
        ("IMAP (imap)", "::1", 10143, Action.LOCAL),
        ("POP3 (pop3)", "127.0.0.1", 110, Action.LOCAL),
        ("POP3 (pop3)", "::1", 110, Action.LOCAL),
    ]
    assert entries[2].why.startswith("STARTTLS; use IMAPS (imaps) on 993: ")
    nft = render_nft(entries, config.path)
    assert nft_rules(nft) == [
        (None, (), "ip", "203.0.113.5", (143,), "drop"),
        (None, (), "ip6", "2001:db8::5", (143,), "drop"),
        (None, (), None, None, (993,), "accept"),
    ]
    nft_check(nft, tmp_path)
    table = render_table(entries)
    assert "[2001:db8::5]" in table and "[::1]" in table
    assert warnings(make_config(tmp_path, {"listen": '["127.0.0.1:143", "[::1]:143"]'},
                                security="none")) == []  # fmt: skip
    (warning,) = warnings(
        make_config(tmp_path, {"listen": '["127.0.0.1:143", "[2001:db8::5]:143"]'}, security="none")
    )
    assert warning.startswith("listener l0 (imap on 127.0.0.1:143, [2001:db8::5]:143, tls none")


def test_table_for_the_relay_example() -> None:
    config = example("relay-postfix")
    entries = port_table(config)
    assert summary(entries) == [
        ("submission (submission)", 587, Action.ALLOW),
        ("SMTP (mx)", 25, Action.ALLOW),
    ]
    submission, mx = entries
    # The backend keeps one-way hashes: CRAM-MD5 is never offered.
    assert submission.why == "STARTTLS; require-secure-auth: passwords only after the upgrade"
    assert mx.why.startswith("mail from other servers (MX)")
    assert mx.host == "::" and mx.destination is None


def test_standard_services_only_with_all() -> None:
    config = example("authgate")
    assert all(e.origin is Origin.LISTENER for e in port_table(config))
    standard = [e for e in port_table(config, include_standard=True) if e.origin is Origin.STANDARD]
    assert [(e.service, e.port, e.action) for e in standard] == [
        ("NNTP", 119, Action.DENY),
        ("NNTPS", 563, Action.ALLOW),
        ("LDAP", 389, Action.DENY),
        ("LDAPS", 636, Action.ALLOW),
        ("HTTP", 80, Action.DENY),
        ("HTTPS", 443, Action.ALLOW),
    ]
    assert all(e.why.startswith("not served by authgate") for e in standard)


def test_nntp_rows_come_from_the_listeners_when_there_are_any(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        {"name": "news", "protocol": "nntp", "listen": "0.0.0.0:119", "tls": "starttls",
         "backend": "127.0.0.1:1119"},
        {"name": "newss", "protocol": "nntp", "listen": "0.0.0.0:563", "tls": "implicit",
         "backend": "127.0.0.1:1119"},
    )  # fmt: skip
    entries = port_table(config, include_standard=True)
    assert summary(entries) == [
        ("NNTP (news)", 119, Action.DENY),  # beside 563, as the page has it
        ("NNTPS (newss)", 563, Action.ALLOW),
        ("LDAP", 389, Action.DENY),
        ("LDAPS", 636, Action.ALLOW),
        ("HTTP", 80, Action.DENY),  # --all keeps what authgate does not serve
        ("HTTPS", 443, Action.ALLOW),
    ]
    assert entries[0].why.startswith("STARTTLS; use NNTPS (newss) on 563: TLS from the first")
    assert "the page's table prefers" in entries[0].why
    # An NNTP listener on another port replaces the standard rows too.
    other = make_config(
        tmp_path,
        {"name": "news", "protocol": "nntp", "listen": "0.0.0.0:10119", "tls": "starttls"},
    )
    services = [e.service for e in port_table(other, include_standard=True)]
    assert "NNTP" not in services and "NNTPS" not in services and "HTTP" in services


def test_plaintext_listeners_under_require_encrypted(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        {"name": "imap", "listen": "0.0.0.0:143"},
        {"name": "pop3", "protocol": "pop3", "listen": "0.0.0.0:110", "backend": "127.0.0.1:1110"},
        {"name": "imaps", "listen": "0.0.0.0:993", "tls": "implicit"},
    )
    entries = port_table(config)
    assert summary(entries) == [
        ("IMAP (imap)", 143, Action.DENY),
        ("POP3 (pop3)", 110, Action.DENY),
        ("IMAPS (imaps)", 993, Action.ALLOW),
    ]
    assert entries[0].why == (
        "no TLS and require-encrypted: clients outside the exempt networks "
        "cannot even open a session"
    )
    assert warnings(config) == []  # nobody can send a password in clear


def test_plaintext_listener_with_exempt_networks_is_limited_to_them(tmp_path: Path) -> None:
    exempt = '["192.168.0.0/16", "10.0.0.0/8", "10.1.0.0/16", "fd00::/8"]'
    config = make_config(tmp_path, {"listen": "0.0.0.0:110", "protocol": "pop3"}, exempt=exempt)
    (entry,) = port_table(config)
    assert entry.action is Action.EXEMPT_ONLY
    assert [str(n) for n in entry.sources] == [
        "192.168.0.0/16",
        "10.0.0.0/8",
        "10.1.0.0/16",
        "fd00::/8",
    ]
    assert "exempt networks (192.168.0.0/16, 10.0.0.0/8, 10.1.0.0/16, fd00::/8)" in entry.why


def test_plaintext_listener_with_policy_none_is_denied_and_warned(tmp_path: Path) -> None:
    config = make_config(tmp_path, {"listen": "203.0.113.5:143"}, security="none")
    (entry,) = port_table(config)
    assert entry.action is Action.DENY
    assert entry.destination == ipaddress.ip_address("203.0.113.5")
    assert "passwords would cross the network in clear" in entry.why
    (warning,) = warnings(config)
    assert warning.startswith("listener l0 (imap on 203.0.113.5:143, tls none, security none)")
    assert "accepts cleartext passwords without TLS from any client" in warning


def test_plaintext_listener_with_challenge_response_only_is_allowed(tmp_path: Path) -> None:
    config = make_config(tmp_path, {}, security="require-secure-auth")
    (entry,) = port_table(config)
    assert entry.action is Action.ALLOW
    assert "challenge-response only (CRAM-MD5)" in entry.why
    assert "mail itself is not encrypted" in entry.why


def test_plaintext_listener_with_only_cleartext_mechanisms_is_denied(tmp_path: Path) -> None:
    config = make_config(
        tmp_path, {}, security="require-secure-auth", mechanisms='["LOGIN", "PLAIN"]'
    )
    (entry,) = port_table(config)
    assert entry.action is Action.DENY
    assert "allows none of the enabled mechanisms without it" in entry.why


def test_server_to_server_smtp_is_always_allowed(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        {"protocol": "smtp", "listen": "0.0.0.0:25", "submission": "false"},
        {"protocol": "smtp", "listen": "0.0.0.0:2525", "submission": "false"},
        security="require-encrypted",
    )
    entries = port_table(config)
    assert summary(entries) == [("SMTP (l0)", 25, Action.ALLOW), ("SMTP (l1)", 2525, Action.ALLOW)]
    assert entries[0].why.startswith("mail from other servers (MX): they deliver unauthenticated")


def test_loopback_listeners_need_no_rule(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        {"listen": "127.0.0.1:10143"},
        {"listen": "[::1]:10144"},
        {"listen": "localhost:10145"},
        security="none",
    )
    assert [e.action for e in port_table(config)] == [Action.LOCAL] * 3
    assert warnings(config) == []


def test_backends_off_loopback_are_denied(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        {"name": "imap", "listen": "0.0.0.0:143", "tls": "starttls", "backend": "10.0.0.9:1143"},
        {"name": "imaps", "listen": "0.0.0.0:993", "tls": "implicit", "backend": "10.0.0.9:1143"},
        {"name": "pop3s", "listen": "0.0.0.0:995", "tls": "implicit", "backend": "[::1]:1110"},
        {"name": "smtps", "listen": "0.0.0.0:465", "tls": "implicit", "backend": "mx.internal:25"},
    )
    backends = [e for e in port_table(config) if e.origin is Origin.BACKEND]
    assert summary(backends) == [
        ("backend of imap, imaps", 1143, Action.DENY),
        ("backend of smtps", 25, Action.DENY),
    ]
    assert backends[0].why == "backend, reached by authgate only"
    assert backends[0].destination == ipaddress.ip_address("10.0.0.9")
    assert backends[1].destination is None and "host name mx.internal" in backends[1].why


def test_render_table_is_aligned() -> None:
    text = render_table(port_table(example("authgate"), include_standard=True))
    lines = text.splitlines()
    assert lines[0].split() == ["service", "port", "address", "action", "why"]
    column = lines[0].index("port")
    assert all(line[column:].split()[0].isdigit() for line in lines[1:])
    assert lines[1].startswith("IMAP (imap)") and "0.0.0.0" in lines[1]
    assert any(line.startswith("HTTPS ") and " any " in line for line in lines)


# ------------------------------------------------------------------ rules


def mixed_config(tmp_path: Path) -> Config:
    return make_config(
        tmp_path,
        {"name": "imaps", "listen": "0.0.0.0:993", "tls": "implicit"},
        {"name": "pop3s", "listen": "0.0.0.0:995", "tls": "implicit"},
        {"name": "pop3", "protocol": "pop3", "listen": "0.0.0.0:110"},
        {"name": "imap-v6", "listen": "[2001:db8::5]:143"},
        {"name": "local", "listen": "127.0.0.1:10143"},
        {
            "name": "backend",
            "listen": "0.0.0.0:4190",
            "tls": "implicit",
            "backend": "10.0.0.9:1143",
        },
        exempt='["192.168.0.0/16", "10.0.0.0/8", "10.1.0.0/16", "fd00::/8"]',
    )


NFT_RULE = re.compile(
    r"(?:(?P<sfam>ip6?) saddr \{ (?P<saddr>[^}]+) \} )?"
    r"(?:(?P<dfam>ip6?) daddr (?P<daddr>\S+) )?"
    r"tcp dport (?:\{ (?P<ports>[0-9, ]+) \}|(?P<port>[0-9]+)) (?P<verdict>accept|drop)"
)


Rule = tuple[str | None, tuple[str, ...], str | None, str | None, tuple[int, ...], str]


def nft_rules(text: str) -> list[Rule]:
    """The rule lines of our chain as (saddr family, saddr networks, daddr
    family, daddr, ports, verdict); fails on any line it does not know."""
    lines = [line.strip() for line in text.splitlines()]
    start = lines.index("chain input {")
    assert lines[start + 1] == "type filter hook input priority filter; policy accept;"
    assert lines[start + 2].startswith("#") and lines[start + 3] == 'iif "lo" accept'
    end = lines.index("}", start)
    rules: list[Rule] = []
    for line in lines[start + 4 : end]:
        if line.startswith("#"):
            continue
        match = NFT_RULE.fullmatch(line)
        assert match, f"unexpected nft line: {line!r}"
        ports = match["ports"] or match["port"]
        saddr = tuple(match["saddr"].split(", ")) if match["saddr"] else ()
        rules.append(
            (
                match["sfam"],
                saddr,
                match["dfam"],
                match["daddr"],
                tuple(int(p) for p in ports.split(", ")),
                match["verdict"],
            )
        )
    return rules


def test_nft_output_shape(tmp_path: Path) -> None:
    config = mixed_config(tmp_path)
    text = render_nft(port_table(config), config.path, warnings(config))
    assert text.count("{") == text.count("}")
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert lines[:3] == [
        "table inet authgate {}",
        "delete table inet authgate",
        "table inet authgate {",
    ]
    rules = nft_rules(text)
    assert rules == [
        # pop3: no TLS under require-encrypted: the exempt networks only
        # (10.1.0.0/16 merged into 10.0.0.0/8).
        ("ip", ("10.0.0.0/8", "192.168.0.0/16"), None, None, (110,), "accept"),
        ("ip6", ("fd00::/8",), None, None, (110,), "accept"),
        (None, (), None, None, (110,), "drop"),
        # imap-v6 on one IPv6 address: only the IPv6 exempt network applies.
        ("ip6", ("fd00::/8",), "ip6", "2001:db8::5", (143,), "accept"),
        (None, (), "ip6", "2001:db8::5", (143,), "drop"),
        (None, (), "ip", "10.0.0.9", (1143,), "drop"),
        (None, (), None, None, (993, 995, 4190), "accept"),
    ]
    # The loopback listener is a comment, never a rule.
    assert "# IMAP (local) on 127.0.0.1:10143: no rule (loopback)" in text
    assert "10143" not in "".join(
        line for line in text.splitlines() if not line.strip().startswith("#")
    )


def test_nft_output_for_the_examples_only_opens_their_ports() -> None:
    config = example("authgate")
    rules = nft_rules(render_nft(port_table(config), config.path))
    assert rules == [
        # 143 beside IMAPS 993: the office LAN only.
        ("ip", ("192.168.0.0/16",), None, None, (143,), "accept"),
        ("ip6", ("fd00::/8",), None, None, (143,), "accept"),
        (None, (), None, None, (143,), "drop"),
        (None, (), None, None, (993, 995, 587, 4190), "accept"),
    ]
    config = example("authgate")
    rules = nft_rules(render_nft(port_table(config, include_standard=True), config.path))
    assert [(r[4], r[5]) for r in rules] == [
        ((143,), "accept"),
        ((143,), "accept"),
        ((143,), "drop"),
        ((993, 995, 587, 4190, 563, 636, 443), "accept"),
        ((119, 389, 80), "drop"),
    ]


def nft_check(text: str, tmp_path: Path) -> None:
    nft = shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin")
    # A real parser, never skipped: ./dev test installs nftables.
    assert nft is not None, "nft not found: run ./dev test as root (Debian package nftables)"
    path = tmp_path / "rules.nft"
    path.write_text(text)
    result = subprocess.run(
        [nft, "-c", "-f", str(path)], capture_output=True, text=True, check=False
    )
    # Without CAP_NET_ADMIN nft cannot even check; that says nothing about our text.
    if "Operation not permitted" in result.stderr:
        return
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", ["authgate", "relay-postfix", "sha-store"])
def test_nft_accepts_the_examples(name: str, tmp_path: Path) -> None:
    config = example(name)
    nft_check(render_nft(port_table(config, include_standard=True), config.path), tmp_path)


def test_nft_accepts_the_mixed_config(tmp_path: Path) -> None:
    config = mixed_config(tmp_path)
    nft_check(render_nft(port_table(config), config.path, warnings(config)), tmp_path)


def test_names_cannot_inject_rules(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        {"name": "x\\ntcp dport 22 drop\\n", "listen": "0.0.0.0:993", "tls": "implicit"},
        {"name": "y\\u001b[31m", "listen": "0.0.0.0:143", "tls": "starttls"},
        security="none",
    )
    assert config.listeners[0].name == "x\ntcp dport 22 drop\n"
    entries = port_table(config)
    warns = warnings(config)
    assert len(warns) == 1 and "listener y?[31m " in warns[0]
    nft = render_nft(entries, config.path, warns)
    iptables = render_iptables(entries, config.path, warns)
    table = render_table(entries)
    for text in (nft, iptables, table, "\n".join(warns)):
        assert "\x1b" not in text
    # The name stays on its line: in a comment of the rule files, in a cell
    # of the table.
    assert "IMAPS (x?tcp dport 22 drop?)" in table
    for text in (nft, iptables):
        assert "x?tcp dport 22 drop?" in text
        rules = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
        assert not any(" 22 " in line or line.endswith(" 22") for line in rules)
    nft_check(nft, tmp_path)


def iptables_commands(text: str) -> list[list[str]]:
    lines = text.splitlines()
    assert lines[0] == "#!/bin/sh"
    commands = []
    for line in lines[1:]:
        if not line or line.startswith("#"):
            continue
        commands.append(shlex.split(line))
    return commands


def test_iptables_output_shape(tmp_path: Path) -> None:
    config = mixed_config(tmp_path)
    commands = iptables_commands(render_iptables(port_table(config), config.path))
    assert commands[0] == ["set", "-e"]
    chain_rules: dict[str, list[tuple[str | None, str | None, int, str]]] = {
        "iptables": [],
        "ip6tables": [],
    }
    for argv in commands[1:]:
        tool = argv[0]
        assert tool in chain_rules, argv
        if argv[1:3] != ["-A", "AUTHGATE"]:
            continue
        options = dict(zip(argv[3::2], argv[4::2], strict=True))
        if options == {"-i": "lo", "-j": "ACCEPT"}:
            continue
        assert options["-p"] == "tcp" and options["-j"] in ("ACCEPT", "DROP")
        version = 4 if tool == "iptables" else 6
        for key in ("-s", "-d"):
            if key in options:  # each address goes to the tool of its family
                assert ipaddress.ip_network(options[key]).version == version
        chain_rules[tool].append(
            (options.get("-s"), options.get("-d"), int(options["--dport"]), options["-j"])
        )
    assert chain_rules["iptables"] == [
        ("10.0.0.0/8", None, 110, "ACCEPT"),
        ("192.168.0.0/16", None, 110, "ACCEPT"),
        (None, None, 110, "DROP"),
        (None, "10.0.0.9", 1143, "DROP"),
        (None, None, 993, "ACCEPT"),
        (None, None, 995, "ACCEPT"),
        (None, None, 4190, "ACCEPT"),
    ]
    assert chain_rules["ip6tables"] == [
        ("fd00::/8", None, 110, "ACCEPT"),
        (None, None, 110, "DROP"),
        ("fd00::/8", "2001:db8::5", 143, "ACCEPT"),
        (None, "2001:db8::5", 143, "DROP"),
        (None, None, 993, "ACCEPT"),
        (None, None, 995, "ACCEPT"),
        (None, None, 4190, "ACCEPT"),
    ]
    text = render_iptables(port_table(config), config.path)
    for tool in ("iptables", "ip6tables"):
        # Re-running replaces the chain; INPUT jumps to it once, first.
        assert f"{tool} -N AUTHGATE 2>/dev/null || {tool} -F AUTHGATE" in text
        assert f"{tool} -A AUTHGATE -i lo -j ACCEPT" in text
        assert text.rstrip().splitlines()[-2 if tool == "iptables" else -1] == (
            f"{tool} -C INPUT -j AUTHGATE 2>/dev/null || {tool} -I INPUT 1 -j AUTHGATE"
        )


# --------------------------------------------------------------- warnings


@pytest.mark.parametrize(
    ("listener", "security", "exempt", "expected"),
    [
        ({"tls": "none"}, "none", "[]", ["accepts cleartext passwords without TLS"]),
        ({"tls": "starttls"}, "none", "[]", ["accepts cleartext passwords before STARTTLS"]),
        ({"tls": "implicit"}, "none", '["0.0.0.0/0"]', []),
        ({"tls": "none", "listen": "127.0.0.1:143"}, "none", "[]", []),
        ({"tls": "none"}, "require-secure-auth", "[]", []),
        ({"tls": "none"}, "require-encrypted", '["192.168.0.0/16", "fd00::/8"]', []),
        ({"tls": "starttls"}, "require-secure-auth", '["0.0.0.0/0"]', ["exempt network 0.0.0.0/0"]),
        ({"tls": "none"}, "require-encrypted", '["10.0.0.0/8", "::/0"]', ["exempt network ::/0"]),
        # Everyone is exempt, so everyone may send cleartext: said once.
        (
            {"tls": "none"},
            "require-encrypted",
            '["0.0.0.0/0", "::/0"]',
            ["exempt network 0.0.0.0/0, ::/0 spans much of the Internet"],
        ),
    ],
)
def test_warnings(
    tmp_path: Path, listener: dict[str, str], security: str, exempt: str, expected: list[str]
) -> None:
    config = make_config(tmp_path, listener, security=security, exempt=exempt)
    found = warnings(config)
    assert len(found) == len(expected), found
    for message, fragment in zip(found, expected, strict=True):
        assert fragment in message
        assert message.startswith("listener l0 (imap on ")


def test_broad_exemption_without_cleartext_mechanisms_is_harmless(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        {"tls": "none"},
        security="require-encrypted",
        mechanisms='["CRAM-MD5"]',
        exempt='["0.0.0.0/0"]',
    )
    assert warnings(config) == []


@pytest.mark.parametrize(
    ("network", "broad"),
    [
        ("0.0.0.0/0", True),
        ("::/0", True),
        ("0.0.0.0/1", True),
        ("44.0.0.0/8", True),
        ("2000::/3", True),
        ("10.0.0.0/8", False),
        ("192.168.0.0/16", False),
        ("fd00::/8", False),
        ("203.0.113.0/24", False),
        ("44.0.0.0/9", False),
        ("2001:db8::/32", False),
    ],
)
def test_what_counts_as_broad(network: str, broad: bool) -> None:
    assert _is_broad(ipaddress.ip_network(network)) is broad


# ---------------------------------------------------------------- command


def run_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="authgate")
    sub = parser.add_subparsers(dest="command", required=True)
    add_commands(sub)
    args = parser.parse_args(argv)
    status: int = args.func(args)
    return status


def test_ports_command_formats(capsys: pytest.CaptureFixture[str]) -> None:
    path = str(EXAMPLES / "authgate.toml")
    assert run_command(["ports", "-c", path]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["service", "port", "address", "action", "why"]
    assert "NNTP" not in out
    assert run_command(["ports", "-c", path, "--all"]) == 0
    assert "NNTPS" in capsys.readouterr().out
    assert run_command(["ports", "-c", path, "--format", "nft"]) == 0
    assert nft_rules(capsys.readouterr().out)[-1][4] == (993, 995, 587, 4190)
    assert run_command(["ports", "-c", path, "--format", "iptables"]) == 0
    out = capsys.readouterr().out
    assert "iptables -A AUTHGATE -p tcp --dport 993 -j ACCEPT" in out
    assert "iptables -A AUTHGATE -s 192.168.0.0/16 -p tcp --dport 143 -j ACCEPT" in out
    assert "iptables -A AUTHGATE -p tcp --dport 143 -j DROP" in out


def test_ports_command_prints_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = make_config(tmp_path, {"tls": "none"}, security="none")
    assert run_command(["ports", "-c", str(config.path)]) == 0
    out = capsys.readouterr().out
    assert "\nwarning: listener l0 (imap on 0.0.0.0:143" in out
    assert run_command(["ports", "-c", str(config.path), "--format", "nft"]) == 0
    assert "# warning: listener l0" in capsys.readouterr().out


def test_ports_command_bad_config_is_a_user_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('hostname = "x"\nlisteners = 3\n')
    with pytest.raises(UserError, match=r"bad\.toml: listeners: 3 is not a list"):
        run_command(["ports", "-c", str(bad)])


def test_ldap_rows_come_from_the_listeners(tmp_path: Path) -> None:
    """389 with StartTLS beside LDAPS on 636 is the page's `deny` (or open
    to the exempt networks); the standard LDAP rows give way to the
    listeners', and --all still lists HTTP as not served."""
    config = make_config(
        tmp_path,
        {"name": "ldap", "protocol": "ldap", "listen": "0.0.0.0:389", "tls": "starttls"},
        {"name": "ldaps", "protocol": "ldap", "listen": "0.0.0.0:636", "tls": "implicit"},
        security="require-secure-auth",
    )
    entries = port_table(config, include_standard=True)
    rows = summary(entries)
    assert rows[:2] == [("LDAP (ldap)", 389, Action.DENY), ("LDAPS (ldaps)", 636, Action.ALLOW)]
    assert ("LDAP", 389, Action.DENY) not in rows and ("LDAPS", 636, Action.ALLOW) not in rows
    assert ("HTTP", 80, Action.DENY) in rows and ("HTTPS", 443, Action.ALLOW) in rows
    why = {e.port: e.why for e in entries}
    assert why[389].startswith("STARTTLS; use LDAPS (ldaps) on 636: TLS from the first byte")
    assert "RFC 8314" not in why[389]  # a mail RFC: the page's table says it for LDAP
    http = next(e for e in entries if e.port == 80)
    assert http.origin is Origin.STANDARD
    # Alone, StartTLS on 389 is allowed under require-secure-auth.
    alone = make_config(
        tmp_path,
        {"name": "ldap", "protocol": "ldap", "listen": "0.0.0.0:389", "tls": "starttls"},
        security="require-secure-auth",
    )
    assert summary(port_table(alone)) == [("LDAP (ldap)", 389, Action.ALLOW)]
