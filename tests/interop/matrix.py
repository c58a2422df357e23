"""The interoperability matrix: authgate (a real `authgate run` process) in
front of the real Dovecot, driven by real mail clients.

This module holds everything `test_matrix.py` needs that is not a test:

* the case list (protocol x mechanism x TLS x backend mode x policy x client
  address, one client per case, rotating so every client meets every
  mechanism it supports),
* the expectation, derived from `authgate.policy.decide` for the very
  listener policy authgate loads from the generated TOML,
* `Gateway`: one `authgate run` subprocess with nine listeners (IMAP, POP3,
  SMTP submission, each with tls none / starttls / implicit),
* one runner per client (curl, swaks, Cyrus imtest/pop3test/smtptest,
  Python's imaplib/poplib/smtplib, msmtp, fetchmail, gsasl), each returning
  "ok" only after the session reached the mailbox (IMAP SELECT + FETCH of
  the seed message, POP3 STAT + RETR, SMTP a message accepted) and
  "refused" only when the client saw an authentication refusal. The
  command-line clients' runners take a `Login` (host as the user would type
  it, port, TLS, mechanism, credentials), so other tests
  (test_sasl_clients.py) drive the very same command lines,
* the result table, printed at the end of the run and written to
  docs/interop.md.

Client addresses: 127.0.0.1 is an ordinary client, 127.0.0.2 is in the
exempt network.  curl (`--interface`), swaks (`--local-interface`) and the
Python clients bind their source address themselves.  The Cyrus tools cannot,
so for them `SourceForwarder` (a byte-for-byte TCP relay on loopback) opens
the connection to authgate from 127.0.0.2; TLS and SASL still run end to end
between the Cyrus tool and authgate.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import imaplib
import os
import platform
import poplib
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.interop import inn_notes, ldap_notes, oauth_notes, sieve_notes
from tests.interop.dovecot import AUTH_MECHANISMS as DOVECOT_AUTH_MECHANISMS
from tests.interop.dovecot import SEED_SUBJECT, DovecotInstance, free_port
from tests.logfile import AppendedLog

TIMEOUT = 10.0  # every client: connect, TLS, authenticate, prove the session
PROCESS_TIMEOUT = 20.0  # hard limit for a client subprocess (its own limit is 10 s)
HOSTNAME = "localhost"  # authgate's hostname: DIGEST-MD5 realm and digest-uri host
OUTSIDER = "127.0.0.1"
EXEMPT = "127.0.0.2"
EXEMPT_NETWORK = "127.0.0.2/32"
CYRUS_DIR = Path("/usr/lib/cyrus/bin")
INSTALL_HINT = (
    "run ./dev test as root: it installs curl, swaks, cyrus-clients, msmtp, fetchmail, gsasl"
)
RCPT = "rcpt@example.test"
REPO = Path(__file__).resolve().parents[2]
DOCS_PATH = REPO / "docs" / "interop.md"

MODES = ("terminate", "relay")
POLICIES = ("none", "require-secure-auth", "require-encrypted")
PROTOCOLS = ("imap", "pop3", "smtp")
SOURCES = (OUTSIDER, EXEMPT)

# How the client meets the listener: (listener tls, TLS active when it authenticates).
CONNECTIONS: dict[str, tuple[str, bool]] = {
    "none": ("none", False),  # listener without TLS
    "starttls-skipped": ("starttls", False),  # STARTTLS offered, the client does not use it
    "starttls": ("starttls", True),
    "implicit": ("implicit", True),
}

# Cleartext login commands, matrix names for them next to the SASL mechanisms.
LOGIN_COMMAND = "LOGIN-COMMAND"  # IMAP LOGIN
USER_PASS = "USER-PASS"  # POP3 USER + PASS
SASL = (
    "PLAIN",
    "LOGIN",
    "CRAM-MD5",
    "DIGEST-MD5",
    "NTLM",
    "SCRAM-SHA-1",
    "SCRAM-SHA-256",
    "SCRAM-SHA-1-PLUS",
    "SCRAM-SHA-256-PLUS",
)

# The order authgate offers them (policy.mechanisms). Debian's Dovecot has no
# NTLM, so the relay gateways do not configure it (nothing could verify it);
# nor do they configure SCRAM-*-PLUS, which is never relayed (the client's TLS
# session ends at authgate, so the backend could not check the binding).
MECHANISM_ORDER: dict[str, tuple[str, ...]] = {
    "terminate": (
        "SCRAM-SHA-256-PLUS",
        "SCRAM-SHA-1-PLUS",
        "SCRAM-SHA-256",
        "SCRAM-SHA-1",
        "CRAM-MD5",
        "DIGEST-MD5",
        "NTLM",
        "LOGIN",
        "PLAIN",
    ),
    "relay": ("SCRAM-SHA-256", "SCRAM-SHA-1", "CRAM-MD5", "DIGEST-MD5", "LOGIN", "PLAIN"),
}

# Which real clients can do what. The case generator rotates through each
# list, so every client meets each of its mechanisms in several cells.
CLIENTS: dict[str, dict[str, tuple[str, ...]]] = {
    "imap": {
        LOGIN_COMMAND: ("imaplib", "imtest"),
        "PLAIN": ("curl", "imtest", "imaplib"),
        # imtest's "-m login" is the IMAP LOGIN command, not the SASL mechanism.
        "LOGIN": ("curl", "imaplib"),
        "CRAM-MD5": ("curl", "imtest", "imaplib"),
        "DIGEST-MD5": ("curl", "imtest"),
        # curl answers with NTLMv2; Cyrus' NTLM plugin with NTLMv1, which
        # authgate takes only with `allow_ntlm_legacy` (the terminate
        # gateways have it; test_ntlmv1_clients_are_refused: not without).
        "NTLM": ("curl", "imtest"),
        "SCRAM-SHA-1": ("imtest",),
        "SCRAM-SHA-256": ("imtest",),
    },
    "pop3": {
        USER_PASS: ("poplib", "pop3test"),
        "PLAIN": ("curl", "pop3test"),
        "LOGIN": ("curl", "pop3test"),
        "CRAM-MD5": ("curl", "pop3test"),
        "DIGEST-MD5": ("curl", "pop3test"),
        "NTLM": ("curl", "pop3test"),
        "SCRAM-SHA-1": ("pop3test",),
        "SCRAM-SHA-256": ("pop3test",),
    },
    "smtp": {
        "PLAIN": ("curl", "swaks", "smtptest", "smtplib"),
        "LOGIN": ("curl", "swaks", "smtptest", "smtplib"),
        "CRAM-MD5": ("curl", "swaks", "smtptest", "smtplib"),
        "DIGEST-MD5": ("curl", "swaks", "smtptest"),
        # swaks' Authen::NTLM sends NTLMv1 too: see above.
        "NTLM": ("curl", "swaks", "smtptest"),
        "SCRAM-SHA-1": ("smtptest",),
        "SCRAM-SHA-256": ("smtptest",),
    },
}

# Relay mode: Dovecot answers DIGEST-MD5 with `algorithm="md5-sess"` (quoted);
# curl 7.88 compares the value with the quotes and cancels the exchange. That
# happens with Dovecot directly too (test_curl_digest_md5_dovecot_quirk), so
# curl is left out of the relayed DIGEST-MD5 cells; the other clients relay it.
RELAY_EXCLUDED = {("curl", "DIGEST-MD5")}

# msmtp, fetchmail and GNU SASL's gsasl are not in the rotation: each runs
# every mechanism it has, on every protocol and transport it supports, in
# every cell (backend mode x policy x connection x client address), and has a
# table of its own. They are quick (a run costs tens of milliseconds), so the
# full cross product stays affordable.
FULL_CLIENTS: dict[str, dict[str, tuple[str, ...]]] = {
    "msmtp": {
        "smtp": (
            "PLAIN",
            "LOGIN",
            "CRAM-MD5",
            "DIGEST-MD5",
            "NTLM",
            "SCRAM-SHA-1",
            "SCRAM-SHA-256",
        ),
    },
    # fetchmail's `auth password` is IMAP LOGIN / POP3 USER+PASS; it has no
    # SASL PLAIN, LOGIN, DIGEST-MD5 or SCRAM.
    "fetchmail": {
        "imap": (LOGIN_COMMAND, "CRAM-MD5", "NTLM"),
        "pop3": (USER_PASS, "CRAM-MD5", "NTLM"),
    },
    # gsasl speaks IMAP and SMTP only (no POP3). On TLS 1.3 it binds
    # SCRAM-*-PLUS to `tls-exporter` (RFC 9266)...
    "gsasl": {protocol: SASL for protocol in ("imap", "smtp")},
    # ...and held at TLS 1.2, to `tls-unique` (RFC 5929). It has no
    # `tls-server-end-point`.
    "gsasl-tls12": {
        protocol: ("SCRAM-SHA-1-PLUS", "SCRAM-SHA-256-PLUS") for protocol in ("imap", "smtp")
    },
}

# How each client can meet a listener (default: all four ways). gsasl has no
# implicit TLS; its TLS 1.2 variant only matters where there is TLS.
CLIENT_CONNECTIONS: dict[str, tuple[str, ...]] = {
    "gsasl": ("none", "starttls-skipped", "starttls"),
    "gsasl-tls12": ("starttls",),
}

# gsasl costs ~0.2 s a session through authgate (it writes each command in
# two packets, text then CRLF, and the CRLF waits for a delayed ACK): its
# cells take one client address each, alternating, instead of both.
ONE_SOURCE_PER_CELL = frozenset({"gsasl"})

# The channel binding each client puts in SCRAM-*-PLUS, and the ones authgate
# can check (RFC 5929 `tls-server-end-point`: the hash of its certificate).
CLIENT_CHANNEL_BINDING = {"gsasl": "tls-exporter", "gsasl-tls12": "tls-unique"}
AUTHGATE_CHANNEL_BINDINGS = ("tls-server-end-point",)

# Clients whose NTLM answer is NTLMv1 (or the NTLM2 session response), which
# authgate refuses as too weak unless the listener has `allow_ntlm_legacy`;
# curl sends NTLMv2.
NTLMV1_CLIENTS = frozenset(
    {"imtest", "pop3test", "smtptest", "swaks", "msmtp", "fetchmail", "gsasl"}
)
# The terminate gateways let NTLMv1 in (so every client shows its NTLM); one
# more gateway without the switch shows the default (a refusal).
NTLM_LEGACY = {"terminate": True, "relay": False}
STRICT_NTLM = "strict-ntlm"  # gateway flag: allow_ntlm_legacy left at its default

# Short names in the table.
CLIENT_ABBREV = {
    "curl": "curl",
    "swaks": "swaks",
    "imtest": "imtest",
    "pop3test": "pop3test",
    "smtptest": "smtptest",
    "imaplib": "imaplib",
    "poplib": "poplib",
    "smtplib": "smtplib",
    "msmtp": "msmtp",
    "fetchmail": "fetchmail",
    "gsasl": "gsasl",
    "gsasl-tls12": "gsasl (TLS 1.2)",
}


# ------------------------------------------------------------------ cases


@dataclass(frozen=True)
class Case:
    mode: str
    policy: str
    protocol: str
    conn: str
    source: str
    mech: str
    client: str
    user: str

    @property
    def gateway(self) -> str:
        return f"{self.mode}/{self.policy}"

    @property
    def listener_tls(self) -> str:
        return CONNECTIONS[self.conn][0]

    @property
    def listener(self) -> str:
        return f"{self.protocol}-{self.listener_tls}"

    @property
    def tls(self) -> bool:
        return CONNECTIONS[self.conn][1]

    @property
    def starttls(self) -> bool:
        return self.conn == "starttls"

    @property
    def implicit(self) -> bool:
        return self.conn == "implicit"

    @property
    def exempt(self) -> bool:
        return self.source == EXEMPT

    @property
    def key(self) -> tuple[str, str, str, str, str, str]:
        """Everything the expectation depends on (not the client)."""
        return (self.mode, self.policy, self.protocol, self.conn, self.source, self.mech)

    @property
    def id(self) -> str:
        return "-".join(
            (self.mode, self.policy, self.protocol, self.conn, self.source, self.mech, self.client)
        )


def mechanisms_for(mode: str, protocol: str) -> tuple[str, ...]:
    command = {"imap": (LOGIN_COMMAND,), "pop3": (USER_PASS,), "smtp": ()}[protocol]
    return command + tuple(m for m in SASL if m in MECHANISM_ORDER[mode])


def _users_for(mode: str, mech: str, users: tuple[str, ...]) -> tuple[str, ...]:
    """Who may log in with `mech`.

    terminate: authgate's users file holds every form for every user.
    relay: Dovecot verifies, and its stored forms limit the mechanisms:
    plainuser {PLAIN} serves all, cramuser {CRAM-MD5} also CRAM-MD5,
    shauser {SSHA512} only the cleartext ones.
    """
    if mode == "terminate" or mech in ("PLAIN", "LOGIN", LOGIN_COMMAND, USER_PASS):
        return users
    if mech == "CRAM-MD5":
        return tuple(u for u in users if u != "shauser")
    return ("plainuser",)


def _rotate(n: int, size: int) -> int:
    """Index of the n-th cell's client (or user) among `size`.

    Cells alternate between the two client addresses, so a plain `n % size`
    with an even size would pin each client to one address; shifting by one
    every second cell lets every client meet both.
    """
    if size % 2 == 0:
        n += n // len(SOURCES)
    return n % size


def all_cases(users: tuple[str, ...] = ("plainuser", "shauser", "cramuser")) -> list[Case]:
    cases: list[Case] = []
    for mode in MODES:
        for protocol in PROTOCOLS:
            for mech in mechanisms_for(mode, protocol):
                clients = tuple(
                    c
                    for c in CLIENTS[protocol].get(mech, ())
                    if not (mode == "relay" and (c, mech) in RELAY_EXCLUDED)
                )
                if not clients:
                    continue  # SCRAM-*-PLUS: only the FULL_CLIENTS have it
                who = _users_for(mode, mech, users)
                n = 0
                for policy in POLICIES:
                    for conn in CONNECTIONS:
                        for source in SOURCES:
                            cases.append(
                                Case(
                                    mode=mode,
                                    policy=policy,
                                    protocol=protocol,
                                    conn=conn,
                                    source=source,
                                    mech=mech,
                                    client=clients[_rotate(n, len(clients))],
                                    user=who[_rotate(n, len(who))],
                                )
                            )
                            n += 1
    return cases


def expectation(decision: object, mech: str) -> bool:
    """True when the policy lets `mech` (or a login command) authenticate."""
    from authgate.policy import Decision

    assert isinstance(decision, Decision)
    if mech in (LOGIN_COMMAND, USER_PASS):
        return decision.login_refusal() is None
    return decision.refusal(mech) is None


def connections_for(client: str) -> tuple[str, ...]:
    return CLIENT_CONNECTIONS.get(client, tuple(CONNECTIONS))


def client_cases(users: tuple[str, ...] = ("plainuser", "shauser", "cramuser")) -> list[Case]:
    """The FULL_CLIENTS' cells: every one of their mechanisms in every cell."""
    cases: list[Case] = []
    for client, protocols in FULL_CLIENTS.items():
        for mode in MODES:
            turn = 0  # ONE_SOURCE_PER_CELL: whose turn it is
            for protocol, mechs in protocols.items():
                for mech in mechs:
                    if mech not in mechanisms_for(mode, protocol):
                        continue
                    who = _users_for(mode, mech, users)
                    n = 0
                    for policy in POLICIES:
                        for conn in connections_for(client):
                            sources: tuple[str, ...] = SOURCES
                            if client in ONE_SOURCE_PER_CELL:
                                sources = (SOURCES[turn % len(SOURCES)],)
                                turn += 1
                            for source in sources:
                                cases.append(
                                    Case(
                                        mode,
                                        policy,
                                        protocol,
                                        conn,
                                        source,
                                        mech,
                                        client,
                                        who[_rotate(n, len(who))],
                                    )
                                )
                                n += 1
    return cases


def _rotation_clients() -> dict[str, dict[str, tuple[str, ...]]]:
    """client -> protocol -> mechanisms, for the clients of the rotation."""
    out: dict[str, dict[str, tuple[str, ...]]] = {}
    for protocol, by_mech in CLIENTS.items():
        for mech, clients in by_mech.items():
            for client in clients:
                have = out.setdefault(client, {}).get(protocol, ())
                out[client][protocol] = (*have, mech)
    return out


def every_client() -> dict[str, dict[str, tuple[str, ...]]]:
    return {**_rotation_clients(), **FULL_CLIENTS}


def baseline_cases() -> list[Case]:
    """Policy `none` from 127.0.0.1 for each rotation client, mechanism,
    protocol, connection and backend mode the rotation happened to leave out:
    with them every client has an authgate outcome beside its Dovecot one."""
    covered = {
        (c.mode, c.protocol, c.conn, c.mech, c.client) for c in all_cases() if c.policy == "none"
    }
    cases: list[Case] = []
    for client, protocols in _rotation_clients().items():
        for mode in MODES:
            for protocol, mechs in protocols.items():
                for mech in mechs:
                    if mech not in mechanisms_for(mode, protocol) or (
                        mode == "relay" and (client, mech) in RELAY_EXCLUDED
                    ):
                        continue
                    for conn in connections_for(client):
                        if (mode, protocol, conn, mech, client) not in covered:
                            cases.append(
                                Case(
                                    mode,
                                    "none",
                                    protocol,
                                    conn,
                                    OUTSIDER,
                                    mech,
                                    client,
                                    "plainuser",
                                )
                            )
    return cases


def client_limit(case: Case, policy: object) -> str | None:
    """Why `case.client` cannot log in through authgate with `case.mech`
    although the listener policy allows the mechanism; None when it can.

    `policy` is the listener policy authgate loaded: a switch it has (such
    as one letting NTLMv1 in) decides, not a guess.
    """
    legacy = bool(getattr(policy, "allow_ntlm_legacy", False))
    if case.mech == "NTLM" and case.client in NTLMV1_CLIENTS and not legacy:
        return "ntlmv1"
    binding = CLIENT_CHANNEL_BINDING.get(case.client)
    if case.mech.endswith("-PLUS") and binding not in AUTHGATE_CHANNEL_BINDINGS:
        return "channel-binding"
    return None


# -- straight against Dovecot

DIRECT = "direct"  # Case.mode of a cell without authgate

# What Dovecot 2.3.19 offers in tests/interop/dovecot.py (no NTLM, no -PLUS).
DOVECOT_MECHANISMS = frozenset(
    {m.upper() for m in DOVECOT_AUTH_MECHANISMS} | {LOGIN_COMMAND, USER_PASS}
)

# Where a client cannot log in to Dovecot although Dovecot offers the
# mechanism: (client, mechanism) -> the note that explains it.
DOVECOT_CLIENT_LIMITS: dict[tuple[str, str], str] = {
    ("curl", "DIGEST-MD5"): "curl-digest",
}


def direct_cases() -> list[Case]:
    """Every client, mechanism, protocol and connection, straight against
    Dovecot (plainuser, whose {PLAIN} password serves every mechanism)."""
    cases: list[Case] = []
    for client, protocols in every_client().items():
        for protocol, mechs in protocols.items():
            for mech in mechs:
                for conn in connections_for(client):
                    cases.append(
                        Case(DIRECT, "none", protocol, conn, OUTSIDER, mech, client, "plainuser")
                    )
    return cases


def direct_expectation(case: Case) -> bool:
    return case.mech in DOVECOT_MECHANISMS and (case.client, case.mech) not in DOVECOT_CLIENT_LIMITS


def every_case() -> list[Case]:
    return all_cases() + client_cases() + baseline_cases() + direct_cases()


# ----------------------------------------------------------- the binaries


def require_binary(name: str) -> str:
    """Path of a client program; a clear failure (never a skip) when missing."""
    if "/" in name:
        if os.access(name, os.X_OK):
            return name
        raise AssertionError(f"{name} is missing: {INSTALL_HINT}")
    path = shutil.which(name)
    if path is None:
        raise AssertionError(f"{name} is not installed: {INSTALL_HINT}")
    return path


def authgate_binary() -> str:
    """The project's own `authgate` (the editable install in .venv)."""
    local = REPO / ".venv" / "bin" / "authgate"
    return str(local) if os.access(local, os.X_OK) else require_binary("authgate")


def cyrus_tool(name: str) -> str:
    return require_binary(str(CYRUS_DIR / name))


def check_client_support() -> None:
    """What the matrix needs beyond the binaries: curl's SASL mechanisms and
    swaks' optional Perl modules (TLS, DIGEST-MD5)."""
    curl = require_binary("curl")
    features = subprocess.run(
        [curl, "-V"], capture_output=True, text=True, timeout=PROCESS_TIMEOUT, check=True
    ).stdout
    protocols = re.search(r"^Protocols: (.*)$", features, re.M)
    feats = re.search(r"^Features: (.*)$", features, re.M)
    assert protocols and feats, features
    missing = {"imap", "imaps", "pop3", "pop3s", "smtp", "smtps"} - set(protocols[1].split())
    assert not missing, f"curl lacks {sorted(missing)}: {features}"
    assert "NTLM" in feats[1].split(), f"curl is built without NTLM: {features}"
    swaks = require_binary("swaks")
    support = subprocess.run(
        [swaks, "--support"], capture_output=True, text=True, timeout=PROCESS_TIMEOUT
    )
    text = support.stdout + support.stderr
    for need, package in (
        ("TLS", "libnet-ssleay-perl"),
        ("AUTH DIGEST-MD5", "libauthen-sasl-perl"),
        ("AUTH CRAM-MD5", "perl (Digest::MD5)"),
        ("AUTH NTLM", "libauthen-ntlm-perl"),
    ):
        assert f"=== {need} supported" in text, (
            f"swaks cannot do {need}: install the Debian package {package}\n{text}"
        )
    for tool in ("imtest", "pop3test", "smtptest"):
        cyrus_tool(tool)
    for program in ("msmtp", "fetchmail", "stdbuf"):
        require_binary(program)
    mechs = subprocess.run(
        [require_binary("gsasl"), "--client-mechanisms"],
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
    ).stdout.split()
    missing_mechs = set(SASL) - set(mechs)
    assert not missing_mechs, f"gsasl lacks {sorted(missing_mechs)}: {mechs}"


def _first_line(args: list[str]) -> str:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=PROCESS_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    lines = (out.stdout + out.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"


def _deb_version(package: str) -> str:
    return _first_line(["dpkg-query", "-W", "-f", "${Version}", package])


def tool_versions() -> dict[str, str]:
    return {
        "Dovecot": _first_line(["dovecot", "--version"])
        if shutil.which("dovecot")
        else _first_line(["/usr/sbin/dovecot", "--version"]),
        "curl": _first_line(["curl", "--version"]),
        "swaks": _first_line(["swaks", "--version"]),
        "Cyrus imtest/pop3test/smtptest": "cyrus-clients "
        + _deb_version("cyrus-clients")
        + ", libsasl2 "
        + _deb_version("libsasl2-2"),
        "Python (imaplib, poplib, smtplib)": f"{platform.python_version()}, {ssl.OPENSSL_VERSION}",
        "msmtp": _first_line(["msmtp", "--version"]),
        # fetchmail's first line as root is a warning: the package version.
        "fetchmail": "fetchmail " + _deb_version("fetchmail"),
        "gsasl": _first_line(["gsasl", "--version"])
        + ", libgsasl "
        + _deb_version("libgsasl18")
        + ", libntlm "
        + _deb_version("libntlm0"),
    }


# ---------------------------------------------------------------- gateway


def listener_names() -> list[tuple[str, str, str]]:
    """(name, protocol, tls) of the nine listeners every gateway has."""
    return [(f"{p}-{t}", p, t) for p in PROTOCOLS for t in ("none", "starttls", "implicit")]


def render_config(
    *,
    mode: str,
    policy: str,
    ports: dict[str, int],
    backends: dict[str, int],
    certs: Path,
    users_file: Path | None,
    master: tuple[str, Path] | None,
    ntlm_legacy: bool = False,
) -> str:
    mechanisms = ", ".join(f'"{m}"' for m in MECHANISM_ORDER[mode])
    lines = [
        "# Written by tests/interop/matrix.py for one matrix gateway.",
        f'hostname = "{HOSTNAME}"',
        "",
        "[policy]",
        f'security = "{policy}"',
        f"mechanisms = [{mechanisms}]",
        f'exempt_networks = ["{EXEMPT_NETWORK}"]',
        *(["allow_ntlm_legacy = true"] if ntlm_legacy else []),
        "",
        *common_sections(certs, users_file),
    ]
    for name, protocol, tls in listener_names():
        lines += [
            "[[listeners]]",
            f'name = "{name}"',
            f'protocol = "{protocol}"',
            f'listen = "127.0.0.1:{ports[name]}"',
            f'tls = "{tls}"',
            "[listeners.backend]",
            f'address = "127.0.0.1:{backends[protocol]}"',
            f'mode = "{mode}"',
        ]
        if master is not None:
            lines += [f'master_user = "{master[0]}"', f'master_password_file = "{master[1]}"']
        lines.append("")
    return "\n".join(lines)


def common_sections(certs: Path, users_file: Path | None) -> list[str]:
    """The [defence], [tls] and (with a users file) [users] tables of an
    interop test's authgate configuration."""
    lines = [
        # The interop tests are about interoperability, not the brute-force
        # defence: wrong-password tests must not wait out its delays and penalties.
        "[defence]",
        "failure_delay = 0.0",
        "penalties = []",
        "",
        "[tls]",
        f'cert = "{certs / "server.pem"}"',
        f'key = "{certs / "server.key"}"',
        "",
    ]
    if users_file is not None:
        lines += ["[users]", f'file = "{users_file}"', ""]
    return lines


class GatewayDied(AssertionError):
    pass


@dataclass
class Gateway(AppendedLog):
    """One `authgate run` subprocess."""

    mode: str
    policy: str
    config_path: Path
    log_path: Path
    ports: dict[str, int]
    process: subprocess.Popen[bytes] = field(repr=False)
    # Cyrus tools from the exempt address: authgate port -> forwarder.
    forwarders: dict[int, SourceForwarder] = field(default_factory=dict, repr=False)

    @classmethod
    def launch(
        cls,
        authgate: str,
        mode: str,
        policy: str,
        config_path: Path,
        log_path: Path,
        ports: dict[str, int],
    ) -> Gateway:
        """`authgate run -c config_path`, its output into `log_path`."""
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [authgate, "run", "-c", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return cls(mode, policy, config_path, log_path, ports, process)

    def crashes(self) -> list[str]:
        """'internal error' and traceback lines in authgate's log."""
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return []
        lines = data.decode("utf-8", "replace").splitlines()
        return [x for x in lines if "internal error" in x or x.startswith("Traceback")]

    def forward(self, port: int) -> int:
        """A port on 127.0.0.1 that reaches `port` from the exempt address."""
        if port not in self.forwarders:
            self.forwarders[port] = SourceForwarder(("127.0.0.1", port), EXEMPT)
        return self.forwarders[port].port


    def assert_alive(self) -> None:
        rc = self.process.poll()
        if rc is not None:
            raise GatewayDied(
                f"authgate ({self.mode}/{self.policy}) died with status {rc}; its stderr:\n"
                + self.log_text()[-8000:]
            )

    def stop(self) -> int:
        """SIGTERM, then the exit status (killed after 15 s)."""
        for forwarder in self.forwarders.values():
            forwarder.close()
        self.forwarders.clear()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode


def start_gateway(
    *,
    authgate: str,
    mode: str,
    policy: str,
    workdir: Path,
    dovecot: DovecotInstance,
    certs: Path,
    users_file: Path | None,
    master_file: Path | None,
    ntlm_legacy: bool | None = None,
    startup_timeout: float = 20.0,
    attempts: int = 3,
) -> Gateway:
    """Start `authgate run` on nine fresh ports and wait until all accept.

    `ntlm_legacy`: `allow_ntlm_legacy` in the policy (default: NTLM_LEGACY
    for the mode). A port picked free can be taken by someone's ephemeral
    port before authgate binds it; that start (and only that) is retried on
    new ports.
    """
    for _ in range(attempts):
        gateway = _start_once(
            authgate=authgate,
            mode=mode,
            policy=policy,
            workdir=workdir,
            dovecot=dovecot,
            certs=certs,
            users_file=users_file,
            master_file=master_file,
            ntlm_legacy=NTLM_LEGACY[mode] if ntlm_legacy is None else ntlm_legacy,
            startup_timeout=startup_timeout,
        )
        if gateway is not None:
            return gateway
    raise AssertionError(f"authgate could not bind its ports in {attempts} attempts")


def _start_once(
    *,
    authgate: str,
    mode: str,
    policy: str,
    workdir: Path,
    dovecot: DovecotInstance,
    certs: Path,
    users_file: Path | None,
    master_file: Path | None,
    ntlm_legacy: bool,
    startup_timeout: float,
) -> Gateway | None:
    ports: dict[str, int] = {}
    taken = set(dovecot.ports.values()) | {dovecot.relay.port}
    for name, _, _ in listener_names():
        port = free_port()
        while port in taken:
            port = free_port()
        taken.add(port)
        ports[name] = port
    name = f"authgate-{mode}-{policy}" + ("" if ntlm_legacy == NTLM_LEGACY[mode] else "-ntlm")
    config_path = workdir / f"{name}.toml"
    config_path.write_text(
        render_config(
            mode=mode,
            policy=policy,
            ports=ports,
            backends={"imap": dovecot.imap, "pop3": dovecot.pop3, "smtp": dovecot.submission},
            certs=certs,
            users_file=users_file if mode == "terminate" else None,
            master=(dovecot.master[0], master_file)
            if mode == "terminate" and master_file is not None
            else None,
            ntlm_legacy=ntlm_legacy,
        )
    )
    gateway = Gateway.launch(authgate, mode, policy, config_path, workdir / f"{name}.log", ports)
    addresses = {name: ("127.0.0.1", port) for name, port in ports.items()}
    return gateway if wait_listening(gateway, addresses, startup_timeout) else None


def wait_listening(gateway: Gateway, addresses: dict[str, tuple[str, int]], timeout: float) -> bool:
    """Wait until authgate accepts on every listener's (host, port): True;
    False when it exited because a port was taken (start it again on
    others). A gateway that died otherwise, or is not listening after
    `timeout` seconds, fails the test (and is stopped)."""
    deadline = time.monotonic() + timeout
    pending = dict(addresses)
    while pending:
        if gateway.process.poll() is not None and "address already in use" in gateway.log_text():
            return False
        gateway.assert_alive()
        for name, address in list(pending.items()):
            with contextlib.suppress(OSError), socket.create_connection(address, timeout=0.5):
                del pending[name]
        if pending and time.monotonic() > deadline:
            gateway.stop()
            raise AssertionError(
                f"authgate did not listen on {sorted(pending)} within {timeout}s:\n"
                + gateway.log_text()[-8000:]
            )
        if pending:
            time.sleep(0.05)
    return True


def make_users_file(
    authgate: str, path: Path, users: dict[str, str], realm: str = HOSTNAME
) -> None:
    """The terminate-mode users file, written by `authgate passwd` itself."""
    for user, password in users.items():
        result = subprocess.run(
            [
                authgate,
                "passwd",
                user,
                "--users",
                str(path),
                "--realm",
                realm,
                "--password-stdin",
            ],
            input=password + "\n",
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, f"authgate passwd {user}: {result.stdout}{result.stderr}"


def make_certs(authgate: str, directory: Path) -> Path:
    result = subprocess.run(
        [authgate, "certs", "--dir", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    ca = directory / "demo-ca.pem"
    assert ca.exists() and (directory / "server.pem").exists(), result.stdout
    return ca


# ------------------------------------------------ source-address forwarder


class SourceForwarder:
    """Accept on 127.0.0.1:<port>, connect to `target` from `source`, and copy
    bytes both ways unchanged (for clients that cannot bind a source address).
    """

    def __init__(self, target: tuple[str, int], source: str) -> None:
        self.target = target
        self.source = source
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)
        self.port: int = self._server.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="forwarder")
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(
                    self.target, timeout=TIMEOUT, source_address=(self.source, 0)
                )
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            done = threading.Barrier(2, action=_closer(client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b, done), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, done: threading.Barrier) -> None:
        # Copy one direction, pass the half-close on, then wait for the other
        # direction (the barrier's action closes both sockets).
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
        with contextlib.suppress(threading.BrokenBarrierError):
            done.wait(timeout=PROCESS_TIMEOUT)

    def close(self) -> None:
        self._stop.set()
        self._server.close()
        self._thread.join(2)


def _closer(*socks: socket.socket) -> Callable[[], None]:
    def close() -> None:
        for sock in socks:
            sock.close()

    return close


# ----------------------------------------------------------------- clients


@dataclass
class Attempt:
    """What one client run showed.

    status: "ok" (authenticated AND the session reached the mailbox / the
    message was accepted), "refused" (a clean authentication refusal), or
    "error" (anything else: timeout, TLS failure, half a session...).
    """

    status: str
    transcript: str
    msgid: str | None = None


@dataclass(frozen=True)
class Login:
    """One run of a command-line client (Cyrus tools, swaks, msmtp,
    fetchmail, gsasl): where it connects, how, and as whom.

    `host` is the name or address as the user would type it: what the client
    puts into DIGEST-MD5's digest-uri and checks the certificate against.
    `tls` is what the client does: "none" (also on a STARTTLS listener it
    leaves unused), "starttls" or "implicit". `source`: the client address
    to connect from (None: the system's choice); a client that cannot bind
    it connects to `forward(port)` instead, which reaches `port` from there.
    """

    protocol: str  # imap | pop3 | smtp
    host: str
    port: int
    tls: str  # none | starttls | implicit
    mech: str  # a SASL mechanism, or LOGIN_COMMAND / USER_PASS
    user: str
    password: str
    ca_file: Path  # the CA that signed the server's certificate
    workdir: Path  # scratch space for message files and client configs
    subject: str = "authgate client test"  # of the message an SMTP client sends
    source: str | None = None
    forward: Callable[[int], int] | None = None

    def unbound_port(self) -> int:
        """The port for a client that cannot choose its source address."""
        if self.source is None:
            return self.port
        assert self.forward is not None, self
        return self.forward(self.port)

    def scratch(self, suffix: str = "") -> Path:
        """A fresh file name in `workdir`."""
        return self.workdir / f"{self.protocol}-{uuid.uuid4().hex}{suffix}"


@dataclass(frozen=True)
class Target:
    """Where and how a client connects for one case."""

    case: Case
    port: int  # authgate's listener port
    ca_file: Path
    password: str
    workdir: Path
    forward: Callable[[int], int]  # port that reaches `port` from the exempt address

    @property
    def user(self) -> str:
        return self.case.user

    def login(self) -> Login:
        case = self.case
        return Login(
            protocol=case.protocol,
            host=HOSTNAME,
            port=self.port,
            tls="implicit" if case.implicit else "starttls" if case.starttls else "none",
            mech=case.mech,
            user=case.user,
            password=self.password,
            ca_file=self.ca_file,
            workdir=self.workdir,
            subject=f"authgate matrix {case.id}",
            source=case.source if case.exempt else None,
            forward=self.forward,
        )


def _message(user: str, subject: str) -> tuple[str, bytes]:
    """A small message with a unique Message-ID (to find it at the relay)."""
    msgid = f"<interop-{uuid.uuid4().hex}@authgate.test>"
    body = (
        f"From: {user}@example.test\r\n"
        f"To: {RCPT}\r\n"
        f"Subject: {subject}\r\n"
        f"Message-ID: {msgid}\r\n"
        f"\r\n"
        f"Sent through authgate.\r\n"
    ).encode("ascii")
    return msgid, body


def make_message(case: Case) -> tuple[str, bytes]:
    return _message(case.user, f"authgate matrix {case.id}")


def _seed_seen(text: str, user: str) -> bool:
    # The seed message proves the session is in *this* user's mailbox.
    return f"Subject: {SEED_SUBJECT}" in text and f"Hello {user}," in text


def _run(args: list[str], *, stdin: bytes = b"") -> tuple[int | None, str]:
    try:
        result = subprocess.run(args, input=stdin, capture_output=True, timeout=PROCESS_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"") + (exc.stderr or b"")
        return None, f"$ {' '.join(args)}\n(timed out after {PROCESS_TIMEOUT}s)\n" + out.decode(
            "utf-8", "replace"
        )
    text = result.stdout.decode("utf-8", "replace") + result.stderr.decode("utf-8", "replace")
    return result.returncode, f"$ {' '.join(args)}\n(exit {result.returncode})\n{text}"


def _redact(text: str, password: str) -> str:
    return text.replace(password, "<password>")


# -- curl

CURLE_LOGIN_DENIED = 67
CURLE_SEND_ERROR = 55


def run_curl(t: Target) -> Attempt:
    case = t.case
    curl = require_binary("curl")
    scheme = case.protocol + ("s" if case.implicit else "")
    args = [
        curl,
        "-4",  # "localhost" only as 127.0.0.1 (authgate listens there)
        "-q",
        "--silent",
        "--show-error",
        "--max-time",
        str(int(TIMEOUT)),
        "--cacert",
        str(t.ca_file),
        "--user",
        f"{t.user}:{t.password}",
        "--login-options",
        f"AUTH={case.mech}",
    ]
    if case.starttls:
        args.append("--ssl-reqd")
    if case.exempt:
        args += ["--interface", case.source]
    msgid = None
    if case.protocol == "imap":
        args.append(f"{scheme}://{HOSTNAME}:{t.port}/INBOX;UID=1")
    elif case.protocol == "pop3":
        args.append(f"{scheme}://{HOSTNAME}:{t.port}/1")
    else:
        msgid, message = make_message(case)
        path = t.workdir / f"{uuid.uuid4().hex}.eml"
        path.write_bytes(message)
        args += [
            "--mail-from",
            f"{t.user}@example.test",
            "--mail-rcpt",
            RCPT,
            "--upload-file",
            str(path),
            f"{scheme}://{HOSTNAME}:{t.port}",
        ]
    rc, out = _run(args)
    out = _redact(out, t.password)
    if rc == 0 and (case.protocol == "smtp" or _seed_seen(out, t.user)):
        return Attempt("ok", out, msgid)
    if rc == CURLE_LOGIN_DENIED:
        return Attempt("refused", out, msgid)
    if case.protocol == "smtp" and rc == CURLE_SEND_ERROR and "MAIL failed: 530" in out:
        # No AUTH offered (TLS required first): curl goes on without
        # authenticating and authgate refuses the unauthenticated MAIL FROM.
        return Attempt("refused", out, msgid)
    return Attempt("error", out, msgid)


# -- swaks

SWAKS_AUTH_FAILED = 28  # swaks(1) EXIT CODES: "error in authentication"


def run_swaks(login: Login) -> Attempt:
    assert login.protocol == "smtp", login
    swaks = require_binary("swaks")
    msgid = f"<interop-{uuid.uuid4().hex}@authgate.test>"
    args = [
        swaks,
        "--server",
        f"{login.host}:{login.port}",
        "--timeout",
        str(int(TIMEOUT)),
        "--auth",
        login.mech,
        "--auth-user",
        login.user,
        "--auth-password",
        login.password,
        "--from",
        f"{login.user}@example.test",
        "--to",
        RCPT,
        "--header",
        f"Message-Id: {msgid}",
        "--header",
        f"Subject: {login.subject}",
        "--tls-verify",
        "--tls-ca-path",
        str(login.ca_file),
    ]
    if login.tls == "starttls":
        args.append("--tls")
    if login.tls == "implicit":
        args.append("--tls-on-connect")
    if login.source is not None:
        args += ["--local-interface", login.source]
    rc, out = _run(args)
    out = _redact(out, login.password)
    if rc == 0:
        return Attempt("ok", out, msgid)
    if rc == SWAKS_AUTH_FAILED:
        return Attempt("refused", out, msgid)
    return Attempt("error", out, msgid)


# -- Cyrus imtest / pop3test / smtptest

# What the Cyrus tools and gsasl send once logged in (no LOGOUT/QUIT: see
# run_cyrus), and how their output proves the session reached the mailbox.
_IMAP_SCRIPT = b"Z1 SELECT INBOX\r\nZ2 UID FETCH 1 BODY.PEEK[]\r\n"


def _imap_proven(out: str, user: str) -> bool:
    return re.search(r"^Z1 OK", out, re.M) is not None and _seed_seen(out, user)


def _smtp_script(login: Login) -> tuple[str, bytes]:
    """MAIL, RCPT and DATA with a fresh message: its Message-ID and the lines."""
    msgid, message = _message(login.user, login.subject)
    script = (
        f"MAIL FROM:<{login.user}@example.test>\r\nRCPT TO:<{RCPT}>\r\nDATA\r\n".encode()
        + message
        + b".\r\n"
    )
    return msgid, script


def run_cyrus(login: Login) -> Attempt:
    """The Cyrus tools print "Authenticated." on success and exit 0 either
    way; after authenticating they copy stdin to the server. They cannot
    choose their source address (SourceForwarder)."""
    tool = {"imap": "imtest", "pop3": "pop3test", "smtp": "smtptest"}[login.protocol]
    mech = {LOGIN_COMMAND: "login", USER_PASS: "user"}.get(login.mech, login.mech)
    port = login.unbound_port()
    # `-t ""`: STARTTLS without a client certificate; `-s`: implicit TLS.
    # Neither verifies the server certificate (the tools have no CA option).
    args = [cyrus_tool(tool), "-p", str(port), "-m", mech, "-a", login.user, "-w", login.password]
    if login.tls == "starttls":
        args += ["-t", ""]
    if login.tls == "implicit":
        args.append("-s")
    args.append(login.host)
    # No LOGOUT/QUIT in the scripts: at the end of stdin the tool sends its
    # own. A second one would reach Dovecot after it closed the connection,
    # and the reset that provokes can discard the last replies in flight.
    msgid = None
    if login.protocol == "imap":
        script = _IMAP_SCRIPT
    elif login.protocol == "pop3":
        script = b"STAT\r\nRETR 1\r\n"
    else:
        msgid, script = _smtp_script(login)
    rc, out = _run(args, stdin=script)
    out = _redact(out, login.password)
    authenticated = re.search(r"^Authenticated\.", out, re.M) is not None
    if rc == 0 and authenticated:
        if login.protocol == "imap":
            proven = _imap_proven(out, login.user)
        elif login.protocol == "pop3":
            # STAT: other interop tests may have delivered more mail; RETR 1 is the seed.
            proven = bool(re.search(r"^\+OK [1-9]\d* \d+", out, re.M)) and _seed_seen(
                out, login.user
            )
        else:
            proven = re.search(r"^250 2\.0\.0 .*\r?$", out, re.M) is not None
        return Attempt("ok" if proven else "error", out, msgid)
    # After a refusal the tools still copy their script to the server; a
    # server that hangs up after too many errors (authgate's max_errors)
    # can make that copy die of SIGPIPE: the refusal itself was clean.
    if rc in (0, -signal.SIGPIPE) and not authenticated and "Authentication failed" in out:
        return Attempt("refused", out, msgid)
    return Attempt("error", out, msgid)


# -- Python's imaplib / poplib / smtplib


def _connect(t: Target, context: ssl.SSLContext) -> socket.socket:
    case = t.case
    source = (case.source, 0) if case.exempt else None
    sock = socket.create_connection((HOSTNAME, t.port), TIMEOUT, source_address=source)
    if case.implicit:
        return context.wrap_socket(sock, server_hostname=HOSTNAME)
    return sock


class _IMAP(imaplib.IMAP4):
    def __init__(self, target: Target, context: ssl.SSLContext) -> None:
        self._target = target
        self._context = context
        super().__init__(HOSTNAME, target.port, timeout=TIMEOUT)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return _connect(self._target, self._context)


class _POP3(poplib.POP3):
    def __init__(self, target: Target, context: ssl.SSLContext) -> None:
        self._target = target
        self._context = context
        super().__init__(HOSTNAME, target.port, timeout=TIMEOUT)

    def _create_socket(self, timeout: float) -> socket.socket:
        return _connect(self._target, self._context)


def _context(t: Target) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(t.ca_file))


def run_imaplib(t: Target) -> Attempt:
    case = t.case
    context = _context(t)
    log: list[str] = []
    try:
        client = _IMAP(t, context)
    except (OSError, imaplib.IMAP4.error) as exc:
        return Attempt("error", f"connect: {exc!r}")
    try:
        log.append(f"capabilities: {' '.join(client.capabilities)}")
        if case.starttls:
            client.starttls(context)
        typ: str
        data: Any
        try:
            if case.mech == LOGIN_COMMAND:
                typ, data = client.login(t.user, t.password)
            elif case.mech == "PLAIN":
                typ, data = client.authenticate(
                    "PLAIN", lambda _: f"\0{t.user}\0{t.password}".encode()
                )
            elif case.mech == "LOGIN":
                answers = iter((t.user.encode(), t.password.encode()))
                typ, data = client.authenticate("LOGIN", lambda _: next(answers))
            elif case.mech == "CRAM-MD5":
                typ, data = client.login_cram_md5(t.user, t.password)
            else:
                raise AssertionError(f"imaplib has no {case.mech}")
        except imaplib.IMAP4.error as exc:
            log.append(f"authentication: {exc}")
            return Attempt("refused", "\n".join(log))
        log.append(f"authentication: {typ} {data!r}")
        typ, data = client.select("INBOX", readonly=True)
        log.append(f"SELECT: {typ} {data!r}")
        fetched: list[Any]
        typ, fetched = client.uid("FETCH", "1", "(BODY.PEEK[])")
        first = fetched[0] if fetched else None
        body = bytes(first[1]).decode("utf-8", "replace") if isinstance(first, tuple) else ""
        log.append(f"UID FETCH 1: {typ}\n{body}")
        ok = typ == "OK" and _seed_seen(body, t.user)
        return Attempt("ok" if ok else "error", "\n".join(log))
    except (OSError, imaplib.IMAP4.abort, imaplib.IMAP4.error, ssl.SSLError) as exc:
        log.append(f"error: {exc!r}")
        return Attempt("error", "\n".join(log))
    finally:
        with contextlib.suppress(Exception):
            client.logout()


def run_poplib(t: Target) -> Attempt:
    case = t.case
    assert case.mech == USER_PASS, case
    context = _context(t)
    log: list[str] = []
    try:
        client = _POP3(t, context)
    except (OSError, poplib.error_proto) as exc:
        return Attempt("error", f"connect: {exc!r}")
    try:
        log.append(f"greeting: {client.getwelcome()!r}")
        if case.starttls:
            log.append(f"STLS: {client.stls(context)!r}")
        try:
            log.append(f"USER: {client.user(t.user)!r}")
            log.append(f"PASS: {client.pass_(t.password)!r}")
        except poplib.error_proto as exc:
            log.append(f"authentication: {exc}")
            return Attempt("refused", "\n".join(log))
        count, size = client.stat()
        log.append(f"STAT: {count} {size}")
        _, lines, _ = client.retr(1)
        body = b"\r\n".join(lines).decode("utf-8", "replace")
        log.append(f"RETR 1:\n{body}")
        ok = count >= 1 and _seed_seen(body, t.user)
        return Attempt("ok" if ok else "error", "\n".join(log))
    except (OSError, poplib.error_proto, ssl.SSLError) as exc:
        log.append(f"error: {exc!r}")
        return Attempt("error", "\n".join(log))
    finally:
        with contextlib.suppress(Exception):
            client.quit()
        with contextlib.suppress(Exception):
            client.close()


def run_smtplib(t: Target) -> Attempt:
    case = t.case
    context = _context(t)
    source = (case.source, 0) if case.exempt else None
    msgid, message = make_message(case)
    log: list[str] = []
    try:
        if case.implicit:
            client: smtplib.SMTP = smtplib.SMTP_SSL(
                HOSTNAME, t.port, timeout=TIMEOUT, context=context, source_address=source
            )
        else:
            client = smtplib.SMTP(HOSTNAME, t.port, timeout=TIMEOUT, source_address=source)
    except (OSError, smtplib.SMTPException) as exc:
        return Attempt("error", f"connect: {exc!r}", msgid)
    try:
        code, reply = client.ehlo("client.example.test")
        log.append(f"EHLO: {code} {reply!r}")
        if case.starttls:
            log.append(f"STARTTLS: {client.starttls(context=context)!r}")
            log.append(f"EHLO: {client.ehlo('client.example.test')!r}")
        client.user, client.password = t.user, t.password
        try:
            # auth() sends AUTH even when the mechanism is not advertised,
            # so this also checks that authgate enforces, not just hides.
            if case.mech == "PLAIN":
                code, reply = client.auth("PLAIN", client.auth_plain)
            elif case.mech == "LOGIN":
                code, reply = client.auth("LOGIN", client.auth_login)
            elif case.mech == "CRAM-MD5":
                code, reply = client.auth("CRAM-MD5", client.auth_cram_md5)
            else:
                raise AssertionError(f"smtplib has no {case.mech}")
        except (smtplib.SMTPAuthenticationError, smtplib.SMTPNotSupportedError) as exc:
            log.append(f"AUTH {case.mech}: {exc!r}")
            return Attempt("refused", "\n".join(log), msgid)
        log.append(f"AUTH {case.mech}: {code} {reply!r}")
        refused = client.sendmail(f"{t.user}@example.test", [RCPT], message)
        log.append(f"sendmail: refused={refused!r}")
        return Attempt("ok" if not refused else "error", "\n".join(log), msgid)
    except (OSError, smtplib.SMTPException, ssl.SSLError) as exc:
        log.append(f"error: {exc!r}")
        return Attempt("error", "\n".join(log), msgid)
    finally:
        with contextlib.suppress(Exception):
            client.quit()
        with contextlib.suppress(Exception):
            client.close()


# -- msmtp (SMTP only)

# sysexits.h, as msmtp(1) uses them.
EX_UNAVAILABLE = 69  # "the server does not support authentication (method X)"
EX_NOPERM = 77  # "authentication failed (method X)"


def _secret_file(login: Login) -> Path:
    """The password in a 0600 file of its own (not on the command line)."""
    path = login.scratch(".secret")
    path.touch(0o600)
    path.write_text(login.password + "\n")
    return path


def run_msmtp(login: Login) -> Attempt:
    """msmtp exits 0 only after the server accepted the message; it binds
    its source address itself (`--source-ip`)."""
    assert login.protocol == "smtp", login
    msmtp = require_binary("msmtp")
    msgid, message = _message(login.user, login.subject)
    secret = _secret_file(login)
    args = [
        msmtp,
        # --host: command-line settings only, no configuration file.
        f"--host={login.host}",
        f"--port={login.port}",
        f"--timeout={int(TIMEOUT)}",
        "--domain=client.example.test",
        f"--auth={login.mech.lower()}",
        f"--user={login.user}",
        f"--passwordeval=cat {secret}",
        f"--from={login.user}@example.test",
        f"--tls={'off' if login.tls == 'none' else 'on'}",
        f"--tls-starttls={'on' if login.tls == 'starttls' else 'off'}",
        f"--tls-trust-file={login.ca_file}",
        "--debug",
    ]
    if login.source is not None:
        args.append(f"--source-ip={login.source}")
    args += ["--", RCPT]
    rc, out = _run(args, stdin=message)
    out = _redact(out, login.password)
    if rc == 0:
        return Attempt("ok", out, msgid)
    # A refusal of AUTH, or no such mechanism (or no AUTH at all) offered:
    # msmtp then stops before MAIL FROM.
    if rc == EX_NOPERM and "authentication failed" in out:
        return Attempt("refused", out, msgid)
    if rc == EX_UNAVAILABLE and "does not support authentication" in out:
        return Attempt("refused", out, msgid)
    return Attempt("error", out, msgid)


# -- fetchmail (IMAP and POP3)

FETCHMAIL_MAXFETCH = 13  # fetchmail(1) EXIT CODES: fetch limit reached
FETCHMAIL_AUTHFAIL = (
    3  # fetchmail(1) EXIT CODES: "an error was encountered when attempting to authenticate"
)
FETCHMAIL_AUTH = {
    LOGIN_COMMAND: "password",
    USER_PASS: "password",
    "CRAM-MD5": "cram-md5",
    "NTLM": "ntlm",
}


def run_fetchmail(login: Login) -> Attempt:
    """One poll from a 0600 rcfile: `keep` (the seed message stays on the
    server), `fetchall` + `fetchlimit 1` (message 1, the seed, every time),
    delivered by an MDA into a file of its own. fetchmail cannot choose its
    source address: from the exempt address it goes through SourceForwarder."""
    assert login.protocol in ("imap", "pop3"), login
    fetchmail = require_binary("fetchmail")
    run = login.scratch(".fetchmail")
    run.mkdir(mode=0o700)
    delivered = run / "delivered.eml"
    port = login.unbound_port()
    # Its certificate check compares names only: connect by a name, not an IP.
    if login.tls == "implicit":
        tls = f"ssl sslcertck sslcertfile '{login.ca_file}'"
    elif login.tls == "starttls":
        # An sslproto without `ssl`: STARTTLS (STLS) is required.
        tls = f"sslproto 'TLS1.2+' sslcertck sslcertfile '{login.ca_file}'"
    else:
        tls = "sslproto ''"  # no TLS, even where STARTTLS is offered
    rcfile = run / "fetchmailrc"
    rcfile.touch(0o600)  # fetchmail refuses an rcfile others can read
    rcfile.write_text(
        "set no syslog\n"
        f"poll {login.host} with proto {login.protocol.upper()} service {port}"
        f" auth {FETCHMAIL_AUTH[login.mech]} timeout {int(TIMEOUT)}\n"
        f'  user "{login.user}" there with password "{login.password}" is "nobody" here\n'
        f"  {tls} keep fetchall fetchlimit 1\n"
        f"  mda \"cat > '{delivered}'\"\n"
    )
    args = [
        fetchmail,
        "--verbose",
        "--nodetach",
        "-f",
        str(rcfile),
        "--idfile",
        str(run / "ids"),
        "--pidfile",
        str(run / "pid"),
    ]
    rc, out = _run(args)
    out = _redact(out, login.password)
    body = delivered.read_text("utf-8", "replace") if delivered.exists() else ""
    # 13 (PS_MAXFETCH): `fetchlimit 1` stopped it with more mail left, as
    # when earlier tests delivered to the same mailbox.
    if rc in (0, FETCHMAIL_MAXFETCH) and _seed_seen(body, login.user):
        return Attempt("ok", out + f"\n--- delivered ---\n{body}")
    if rc == FETCHMAIL_AUTHFAIL:
        return Attempt("refused", out)
    return Attempt("error", out)


# -- gsasl (GNU SASL's own client: IMAP and SMTP)

# The GnuTLS priority that keeps gsasl at TLS 1.2, where it binds SCRAM-*-PLUS
# to `tls-unique`; on TLS 1.3 it uses `tls-exporter` (RFC 9266).
GSASL_TLS12 = "NORMAL:-VERS-TLS1.3"


def _session(
    args: list[str],
    script: bytes,
    ready: Callable[[str], bool],
    done: Callable[[str], bool],
) -> tuple[int | None, str]:
    """Run a client that copies stdin to the server once it has logged in:
    write `script` once `ready(output)` (so no prompt of the client can
    swallow it), then keep stdin open until `done(output)` (or the client
    exits, or TIMEOUT passes): closing it earlier ends the session before
    the server's answers arrive."""
    try:
        process = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
    except OSError as exc:
        return None, f"$ {' '.join(args)}\n{exc!r}"
    assert process.stdin is not None and process.stdout is not None
    chunks: list[bytes] = []
    changed = threading.Condition()

    def read(stream: Any) -> None:
        while data := stream.read1(65536):
            with changed:
                chunks.append(data)
                changed.notify_all()
        with changed:
            changed.notify_all()

    reader = threading.Thread(target=read, args=(process.stdout,), daemon=True)
    reader.start()
    deadline = time.monotonic() + TIMEOUT
    written = False
    with changed:
        while process.poll() is None and reader.is_alive():
            out = b"".join(chunks).decode("utf-8", "replace")
            if not written and ready(out):
                with contextlib.suppress(OSError):
                    process.stdin.write(script)
                    process.stdin.flush()
                written = True
            if written and done(out):
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            changed.wait(min(remaining, 0.5))
    with contextlib.suppress(OSError):
        process.stdin.close()
    try:
        rc: int | None = process.wait(PROCESS_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)
        rc = None
    reader.join(5)
    text = b"".join(chunks).decode("utf-8", "replace")
    return rc, f"$ {' '.join(args)}\n(exit {rc})\n{text}"


def _smtp_data_reply(out: str) -> str | None:
    """The server's reply to the end of DATA (the first reply after 354)."""
    after = out.split("\n354 ", 1)
    if len(after) < 2:
        return None
    found = re.search(r"^(\d{3})[ -]", after[1].split("\n", 1)[-1], re.M)
    return found[1] if found else None


def run_gsasl(login: Login, *, tls12: bool = False) -> Attempt:
    """gsasl prints the whole exchange; after a successful authentication
    it copies stdin to the server and prints what comes back, so the same
    IMAP/SMTP script as the Cyrus tools proves the session. It has no
    implicit TLS and no POP3, and cannot bind a source address
    (SourceForwarder). `tls12`: held at TLS 1.2 (GSASL_TLS12)."""
    assert login.protocol in ("imap", "smtp") and login.tls != "implicit", login
    gsasl = require_binary("gsasl")
    port = login.unbound_port()
    args = [
        # gsasl reads stdin with getline() but waits for it with poll(): a
        # line left in stdio's buffer would wait for more input that never
        # comes. Unbuffered stdin (coreutils' stdbuf) sends every line.
        require_binary("stdbuf"),
        "-i0",
        gsasl,
        f"--{login.protocol}",
        f"--connect={login.host}:{port}",
        # The name it checks the certificate against and puts in digest-uri.
        f"--hostname={login.host}",
        "--mechanism",
        login.mech,
        "--authentication-id",
        login.user,
        "--password",
        login.password,
        # No realm of our own (NTLM and DIGEST-MD5 would ask for one).
        "--realm=",
        f"--x509-ca-file={login.ca_file}",
        "--starttls" if login.tls == "starttls" else "--no-starttls",
    ]
    if login.mech == "DIGEST-MD5":
        # gsasl asks for DIGEST-MD5's quality of protection (default
        # qop-int); only `auth` leaves the session spliceable.
        args.append("--quality-of-protection=qop-auth")
    if login.mech.startswith("SCRAM-") and not login.mech.endswith("-PLUS") and login.tls != "none":
        # gsasl 2.2.0 fails on its own (before sending anything) when it has
        # TLS channel-binding data but runs a non-PLUS SCRAM: it sets the
        # binding name with the 'y' flag, which its own validator rejects.
        args.append("--no-cb")
    if tls12:
        args.append(f"--priority={GSASL_TLS12}")
    msgid = None
    if login.protocol == "imap":
        script = _IMAP_SCRIPT

        def done(out: str) -> bool:
            return re.search(r"^Z2 (OK|NO|BAD)", out, re.M) is not None
    else:
        msgid, script = _smtp_script(login)

        def done(out: str) -> bool:
            return (
                _smtp_data_reply(out) is not None
                or re.search(
                    r"^[45]\d\d ", out.split("Client authentication finished", 1)[-1], re.M
                )
                is not None
            )

    rc, out = _session(args, script, lambda out: "Client authentication finished" in out, done)
    out = _redact(out, login.password)
    authenticated = "Client authentication finished" in out
    if rc == 0 and authenticated:
        if login.protocol == "imap":
            proven = _imap_proven(out, login.user)
        else:
            proven = _smtp_data_reply(out) == "250"
        return Attempt("ok" if proven else "error", out, msgid)
    if not authenticated:
        if rc == 0 and "Cannot find mechanism" in out:
            # The server offered no SASL mechanism at all (gsasl then exits 0).
            return Attempt("refused", out, msgid)
        # A refusal: the server's tagged NO (or BAD: RFC 9051 lets it end an
        # AUTHENTICATE whose data it cannot take) or SMTP 5xx to the
        # exchange; gsasl exits 1.
        imap = login.protocol == "imap"
        command = f". AUTHENTICATE {login.mech}" if imap else f"AUTH {login.mech}"
        exchange = out.partition(f"\n{command}")[2]
        if rc == 1 and imap and re.search(r"^\. (NO|BAD) ", exchange, re.M):
            return Attempt("refused", out, msgid)
        if rc == 1 and not imap and re.search(r"^5\d\d ", exchange, re.M):
            return Attempt("refused", out, msgid)
    return Attempt("error", out, msgid)


def _by_login(runner: Callable[[Login], Attempt]) -> Callable[[Target], Attempt]:
    """A command-line client's runner, told where to connect for a case."""
    return lambda t: runner(t.login())


RUNNERS: dict[str, Callable[[Target], Attempt]] = {
    "curl": run_curl,
    "swaks": _by_login(run_swaks),
    "imtest": _by_login(run_cyrus),
    "pop3test": _by_login(run_cyrus),
    "smtptest": _by_login(run_cyrus),
    "imaplib": run_imaplib,
    "poplib": run_poplib,
    "smtplib": run_smtplib,
    "msmtp": _by_login(run_msmtp),
    "fetchmail": _by_login(run_fetchmail),
    "gsasl": _by_login(run_gsasl),
    "gsasl-tls12": _by_login(functools.partial(run_gsasl, tls12=True)),
}


# ------------------------------------------------------- Dovecot's view


def dovecot_service(protocol: str) -> str:
    return {"imap": "imap", "pop3": "pop3", "smtp": "submission"}[protocol]


def backend_method(case: Case) -> str:
    """The method Dovecot logs for the backend login of a successful case.

    terminate: authgate's master login is SASL PLAIN. relay: the client's own
    mechanism, except that IMAP LOGIN and POP3 USER/PASS are relayed as PLAIN.
    """
    if case.mode == "terminate" or case.mech in (LOGIN_COMMAND, USER_PASS):
        return "PLAIN"
    return case.mech


def login_pattern(case: Case) -> str:
    return (
        rf"{dovecot_service(case.protocol)}-login: Info: Login: "
        rf"user=<{re.escape(case.user)}>, method={re.escape(backend_method(case))},"
    )


# ---------------------------------------------------------------- results


@dataclass
class Row:
    case: Case
    expected: bool
    hard_coded: bool
    observed: str = "not run"
    passed: bool = False


RESULTS: dict[str, Row] = {}
NOTES: dict[str, tuple[bool, str]] = {}  # the quirk tests: name -> (passed, what it showed)


def record(row: Row) -> None:
    RESULTS[row.case.id] = row


def complete() -> bool:
    """True when every matrix case ran (only then is docs/interop.md rewritten)."""
    return bool(RESULTS) and {c.id for c in every_case()} <= set(RESULTS)


def _cell(row: Row | None) -> str:
    if row is None:
        return "·"
    who = CLIENT_ABBREV[row.case.client]
    if not row.passed:
        want = "ok" if row.expected else "refusal"
        return f"**FAIL** {who} (wanted {want}, got {row.observed})"
    return f"{'✔' if row.expected else '✘'} {who}"


def counts() -> dict[str, int]:
    rows = list(RESULTS.values())
    return {
        "cases": len(rows),
        "passed": sum(r.passed for r in rows),
        "failed": sum(not r.passed for r in rows),
        "expected success": sum(r.expected for r in rows),
        "expected refusal": sum(not r.expected for r in rows),
        "hard-coded expectations": sum(r.hard_coded for r in rows),
    }


def summary_lines() -> list[str]:
    c = counts()
    lines = [
        f"{c['cases']} cases: {c['passed']} as expected, {c['failed']} not "
        f"({c['expected success']} expected logins, {c['expected refusal']} expected refusals; "
        f"{c['hard-coded expectations']} checked against hard-coded expectations)",
    ]
    by_client = Counter(r.case.client for r in RESULTS.values())
    lines.append("clients: " + ", ".join(f"{k} {v}" for k, v in sorted(by_client.items())))
    by_gateway: dict[str, Counter[str]] = {}
    for row in RESULTS.values():
        tally = by_gateway.setdefault(row.case.gateway, Counter())
        tally["ok" if row.expected else "refused"] += 1
        tally["failed"] += not row.passed
    for gateway, tally in sorted(by_gateway.items()):
        lines.append(
            f"  {gateway}: {tally['ok']} logins, {tally['refused']} refusals, "
            f"{tally['failed']} failed"
        )
    for name, (passed, what) in sorted(NOTES.items()):
        lines.append(f"  [{'ok' if passed else 'FAILED'}] {name}: {what}")
    return lines


def _columns() -> list[tuple[str, str]]:
    return [(conn, source) for conn in CONNECTIONS for source in SOURCES]


def table_lines() -> list[str]:
    """One Markdown table: a row per mode x policy x protocol x mechanism, a
    column per TLS situation x client address."""
    head = ["mode", "policy", "protocol", "mechanism"] + [
        f"{conn} {'.2 (exempt)' if source == EXEMPT else '.1'}" for conn, source in _columns()
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rotation = {c.id for c in all_cases()}
    index = {r.case.key: r for r in RESULTS.values() if r.case.id in rotation}
    for mode in MODES:
        for policy in POLICIES:
            for protocol in PROTOCOLS:
                for mech in mechanisms_for(mode, protocol):
                    cells = [
                        _cell(index.get((mode, policy, protocol, conn, source, mech)))
                        for conn, source in _columns()
                    ]
                    if all(cell == "·" for cell in cells):
                        continue
                    lines.append("| " + " | ".join([mode, policy, protocol, mech, *cells]) + " |")
    return lines


def client_table_lines() -> list[str]:
    """msmtp, fetchmail and gsasl: a row per client x mode x policy x
    protocol x mechanism, the same columns as the main table."""
    head = ["client", "mode", "policy", "protocol", "mechanism"] + [
        f"{conn} {'.2 (exempt)' if source == EXEMPT else '.1'}" for conn, source in _columns()
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    index = {r.case.id: r for r in RESULTS.values()}
    cases = client_cases()
    for client, protocols in FULL_CLIENTS.items():
        for mode in MODES:
            for policy in POLICIES:
                for protocol, mechs in protocols.items():
                    for mech in mechs:
                        mine = {
                            (c.conn, c.source): index.get(c.id)
                            for c in cases
                            if (c.client, c.mode, c.policy, c.protocol, c.mech)
                            == (client, mode, policy, protocol, mech)
                        }
                        if not mine:
                            continue
                        cells = []
                        for conn, source in _columns():
                            if conn not in connections_for(client):
                                cells.append("–")
                            elif (conn, source) not in mine:
                                cells.append("·")
                            else:
                                cells.append(_mark(mine[(conn, source)]))
                        lines.append(
                            "| "
                            + " | ".join(
                                [CLIENT_ABBREV[client], mode, policy, protocol, mech, *cells]
                            )
                            + " |"
                        )
    return lines


def _mark(row: Row | None) -> str:
    """✔ / ✘ as expected, **FAIL** otherwise, · when the cell did not run."""
    if row is None:
        return "·"
    if not row.passed:
        return f"**FAIL** (wanted {'ok' if row.expected else 'refusal'}, got {row.observed})"
    return "✔" if row.expected else "✘"


# Why a client's outcome straight against Dovecot differs from its outcome
# through authgate (policy `none`). Every difference the comparison table
# shows needs one of these (test_every_difference_from_dovecot_is_explained).
DIFFERENCE_NOTES: dict[str, str] = {
    "NTLM": "Debian's Dovecot 2.3.19 is built without NTLM (`auth_mechanisms = ntlm` stops its "
    "auth process: `Unknown authentication mechanism 'NTLM'`), so straight against Dovecot "
    "every NTLM login is refused and relay mode, where Dovecot verifies, does not offer NTLM. "
    "In terminate mode authgate verifies NTLM itself from the NT hash `authgate passwd` wrote.",
    "NTLMv1": "This client answers NTLM with NTLMv1 (or the NTLM2 session response), which "
    "authgate refuses as too weak by default; the matrix's terminate gateways set "
    "`allow_ntlm_legacy = true`, so here it logs in. Without the switch it is refused "
    "(test_ntlmv1_clients_are_refused). curl sends NTLMv2 and logs in either way.",
    "-PLUS": "Dovecot 2.3 has no SCRAM-*-PLUS (`Unknown authentication mechanism "
    "'SCRAM-SHA-256-PLUS'`; channel binding came with 2.4), so it refuses the mechanism. "
    "authgate offers -PLUS inside TLS only, and never in relay mode (the client's TLS ends at "
    "authgate, the backend could not check the binding). Outside TLS both refuse.",
    "binding": "gsasl binds SCRAM-*-PLUS to `tls-exporter` (RFC 9266) on TLS 1.3 and to "
    "`tls-unique` (RFC 5929) on TLS 1.2; authgate checks only `tls-server-end-point` (the hash "
    "of its certificate), so it refuses both (`unsupported channel binding type`, "
    "test_channel_bindings_authgate_cannot_check). gsasl has no `tls-server-end-point`. "
    "These cells turn to logins when authgate learns `tls-exporter`/`tls-unique`.",
    "curl-digest": "curl 7.88 cancels DIGEST-MD5 against Dovecot: Dovecot sends "
    '`algorithm="md5-sess"` quoted and curl compares the value with the quotes '
    "(test_curl_digest_md5_dovecot_quirk). authgate writes the token unquoted, as RFC 2831 "
    "section 2.1.1 has it, so curl logs in through authgate in terminate mode; the relayed "
    "cell is left out (Dovecot's challenge reaches curl unchanged).",
}


def difference_notes(client: str, mech: str) -> list[str]:
    """The DIFFERENCE_NOTES that explain this client's mechanism."""
    notes = []
    if mech == "NTLM":
        notes.append("NTLM")
        if client in NTLMV1_CLIENTS:
            notes.append("NTLMv1")
    if mech.endswith("-PLUS"):
        notes.append("-PLUS")
        if CLIENT_CHANNEL_BINDING.get(client) not in AUTHGATE_CHANNEL_BINDINGS:
            notes.append("binding")
    if (client, mech) in DOVECOT_CLIENT_LIMITS:
        notes.append(DOVECOT_CLIENT_LIMITS[(client, mech)])
    return notes


def _outcome(row: Row | None) -> str:
    if row is None:
        return "·"
    if not row.passed:
        return "**FAIL**"
    return "✔" if row.expected else "✘"


def _none_row(
    index: dict[tuple[str, str, str, str, str, str, str], Row],
    mode: str,
    key: tuple[str, str, str, str],
) -> Row | None:
    """The policy-`none` cell of `mode` for (protocol, conn, mech, client),
    from 127.0.0.1 if it ran, else from 127.0.0.2 (`none` treats both alike)."""
    protocol, conn, mech, client = key
    for source in SOURCES:
        row = index.get((mode, "none", protocol, conn, source, mech, client))
        if row is not None:
            return row
    return None


def comparison_rows() -> list[tuple[str, str, str, list[tuple[str, str, str]]]]:
    """(protocol, mechanism, client, [(Dovecot, terminate, relay) per
    connection]) for every client and mechanism, from the recorded results."""
    index = {(*r.case.key, r.case.client): r for r in RESULTS.values()}
    order = list(CLIENT_ABBREV)
    rows = []
    clients = every_client()
    for protocol in PROTOCOLS:
        command = {"imap": (LOGIN_COMMAND,), "pop3": (USER_PASS,), "smtp": ()}[protocol]
        for mech in command + SASL:
            for client in sorted(clients, key=order.index):
                if mech not in clients[client].get(protocol, ()):
                    continue
                cells = []
                for conn in CONNECTIONS:
                    if conn not in connections_for(client):
                        cells.append(("–", "–", "–"))
                        continue
                    key = (protocol, conn, mech, client)
                    direct = index.get((DIRECT, "none", protocol, conn, OUTSIDER, mech, client))
                    cells.append(
                        (
                            _outcome(direct),
                            _outcome(_none_row(index, "terminate", key)),
                            _outcome(_none_row(index, "relay", key)),
                        )
                    )
                rows.append((protocol, mech, client, cells))
    return rows


def differs(cells: list[tuple[str, str, str]]) -> bool:
    """Whether authgate's outcome (either mode, where it ran) is not Dovecot's."""
    marks = ("✔", "✘")
    return any(
        d in marks and other in marks and other != d for d, *others in cells for other in others
    )


def comparison_lines() -> list[str]:
    head = ["protocol", "mechanism", "client", *CONNECTIONS, "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for protocol, mech, client, cells in comparison_rows():
        why = ", ".join(difference_notes(client, mech))
        if differs(cells):
            why = f"**differs**: {why or 'unexplained'}"
        lines.append(
            "| "
            + " | ".join(
                [protocol, mech, CLIENT_ABBREV[client], *(" ".join(c) for c in cells), why]
            )
            + " |"
        )
    return lines


def _iter_docs(versions: dict[str, str]) -> Iterator[str]:
    today = datetime.date.today().isoformat()
    yield "# Interoperability: authgate in front of Dovecot, driven by real clients"
    yield ""
    yield (
        f"Generated on {today} by `tests/interop/test_matrix.py` "
        "(`.venv/bin/pytest tests/interop/test_matrix.py`); do not edit by hand."
    )
    yield ""
    yield "| software | version |"
    yield "|---|---|"
    for name, version in versions.items():
        yield f"| {name} | {version.replace('|', '/')} |"
    yield ""
    yield "## Set-up"
    yield ""
    yield (
        "* One real Dovecot (`tests/interop/dovecot.py`): IMAP, POP3 and submission on "
        "loopback; submission relays to a sink that records every message. Users "
        "`plainuser` ({PLAIN}), `shauser` ({SSHA512}), `cramuser` ({CRAM-MD5}) and the "
        "master user `authgate`."
    )
    yield (
        "* Six `authgate run` processes, one per backend mode x policy, each with nine "
        "listeners: IMAP, POP3 and SMTP submission, each with `tls = none`, `starttls` "
        "and `implicit` (a `trustme` CA made by `authgate certs`). Exempt network "
        f"`{EXEMPT_NETWORK}`; hostname `{HOSTNAME}`. (A seventh, terminate mode with "
        "`allow_ntlm_legacy` at its default, serves test_ntlmv1_clients_are_refused.)"
    )
    yield (
        "* **terminate**: authgate verifies against a users file written by "
        "`authgate passwd --password-stdin` (same passwords as Dovecot's), then logs in "
        "to Dovecot as the user with the master user (SASL PLAIN, authzid = user). "
        "Mechanisms offered: " + ", ".join(MECHANISM_ORDER["terminate"]) + "; "
        "`allow_ntlm_legacy = true`, so NTLMv1 clients show their NTLM too."
    )
    yield (
        "* **relay**: authgate enforces the policy and relays the SASL exchange; Dovecot "
        "verifies. Mechanisms offered: " + ", ".join(MECHANISM_ORDER["relay"]) + " "
        "(Debian's Dovecot has no NTLM and Dovecot 2.3 no SCRAM-*-PLUS, and -PLUS is never "
        "relayed: those are covered in terminate mode only)."
    )
    yield (
        "* **Straight against Dovecot** (`direct` cells, in the same run): every client, "
        "mechanism, protocol and connection once, as `plainuser`, from 127.0.0.1 (Dovecot "
        "has no policy here: `disable_plaintext_auth = no`). `none` goes to the Dovecot "
        "above (`ssl = no`); `starttls-skipped`, `starttls` and `implicit` to a second "
        "Dovecot with TLS (STARTTLS on the plain ports, imaps/pop3s/submissions)."
    )
    yield (
        "* A success counts only when the session reached the backend: IMAP `SELECT INBOX` "
        "and the seed message at UID 1 (curl fetches `INBOX;UID=1`, fetchmail delivers "
        "message 1 to a file), POP3 `STAT` + `RETR 1`, SMTP a message accepted and seen by "
        "the submission relay sink; and Dovecot logged the login (terminate: the master "
        "user logging in as the user). A refusal counts only when the client saw an "
        "authentication refusal (curl exit 67, swaks exit 28, Cyrus `Authentication "
        "failed`, msmtp exit 77 `authentication failed` or 69 `does not support "
        "authentication`, fetchmail exit 3 `AUTHFAIL`, gsasl's IMAP `NO`/`BAD` or SMTP 5xx "
        "to its exchange or `Cannot find mechanism` when none is offered, an IMAP `NO`, "
        "POP3 `-ERR`, SMTP 5xx) and Dovecot logged no login."
    )
    yield (
        "* The expected outcome of each cell through authgate is `authgate.policy.decide` "
        "for the listener policy authgate loaded from the generated TOML, less what the "
        "client cannot do although the policy allows it (`matrix.client_limit`: NTLMv1 "
        "where `allow_ntlm_legacy` is off, a channel binding authgate cannot check); "
        f"{counts()['hard-coded expectations']} cells are also checked against "
        "hard-coded expectations, so a bug in `decide` cannot make the matrix agree with "
        "itself. Straight against Dovecot: a login exactly when Dovecot offers the "
        "mechanism, bar the client quirks named below."
    )
    yield (
        "* Client address 127.0.0.2: curl `--interface`, swaks `--local-interface`, msmtp "
        "`--source-ip`, Python `source_address`. The Cyrus tools, fetchmail and gsasl "
        "cannot choose their source address: for them a byte-for-byte TCP forwarder on "
        "loopback opens the connection from 127.0.0.2 (TLS and SASL still run between the "
        "client and authgate)."
    )
    yield (
        "* Which client runs where: curl, swaks, the Cyrus tools and Python's clients take "
        "turns over the cells of the main table (one client per cell, every client on "
        "both addresses), and get a policy-`none` cell of their own wherever the rotation "
        "left a connection out, so each has an outcome beside Dovecot's. msmtp and "
        "fetchmail run every cell (every policy, connection and address). gsasl runs every "
        "policy and connection with one address per cell, alternating (both addresses for "
        "every mechanism): it costs about 0.2 s a session through authgate, five times "
        "the others, because it writes each command as two packets and the second waits "
        "for a delayed ACK."
    )
    yield ""
    yield "## Summary"
    yield ""
    for line in summary_lines():
        yield f"    {line}"
    yield ""
    yield "## authgate and Dovecot side by side"
    yield ""
    yield (
        "Each cell: straight against **Dovecot**, then through authgate in **terminate** "
        "mode, then in **relay** mode, all with policy `none` (so only the mechanism and the "
        "client decide). `✔` logged in and reached the mailbox, `✘` refused, `**FAIL**` not "
        "the expected outcome, `·` no such cell (relay mode offers no NTLM and no -PLUS, "
        "and leaves curl's DIGEST-MD5 out), `–` the client cannot connect that way "
        "(gsasl: no implicit TLS; its TLS 1.2 variant runs only where there is TLS). Where authgate's outcome differs from Dovecot's the "
        "last column says **differs** and names the reason; the notes are below the table "
        "(a note without **differs**: both refuse, for the reasons it gives)."
    )
    yield ""
    yield from comparison_lines()
    yield ""
    for name, text in DIFFERENCE_NOTES.items():
        yield f"* **{name}**: {text}"
    yield ""
    yield "## Findings and client quirks"
    yield ""
    yield from FINDINGS
    yield ""
    yield "## The matrix"
    yield ""
    yield (
        "`✔ client`: logged in and reached the mailbox, as expected. `✘ client`: refused, "
        "as the policy requires. `**FAIL**`: the observed outcome differs from the "
        "expected one. Columns: how the client meets the listener (`none`: a listener "
        "without TLS; `starttls-skipped`: a STARTTLS listener, the client does not use "
        "it; `starttls`: upgraded; `implicit`: implicit TLS) and the client address "
        "(`.1` = 127.0.0.1, `.2` = 127.0.0.2, exempt). `LOGIN-COMMAND` is IMAP `LOGIN`, "
        "`USER-PASS` POP3 `USER`/`PASS`."
    )
    yield ""
    yield from table_lines()
    yield ""
    yield "## msmtp, fetchmail and gsasl in every cell"
    yield ""
    yield (
        "The same columns, a row per client. `✔`/`✘` as expected, `·` a cell gsasl "
        "leaves to the other address, `–` a connection the client does not have. "
        "`gsasl (TLS 1.2)` is gsasl held at TLS 1.2 (`--priority=NORMAL:-VERS-TLS1.3`), "
        "where it binds -PLUS to `tls-unique` instead of `tls-exporter`."
    )
    yield ""
    yield from client_table_lines()
    yield ""
    yield from ldap_notes.section_lines()
    yield from inn_notes.section_lines()
    yield from sieve_notes.section_lines()
    yield from oauth_notes.section_lines()


FINDINGS: list[str] = [
    "* **DIGEST-MD5 relayed to Dovecot works**: the client computes its response over "
    '`digest-uri="<service>/localhost"` (the name it connected to) and the realm Dovecot '
    "announced; Dovecot 2.3.19 does not compare the digest-uri host with its own name and "
    "authgate passes the exchange through unchanged, so imtest, pop3test, smtptest, "
    "swaks, msmtp and gsasl log in. In terminate mode authgate itself checks that "
    f"digest-uri names one of its names (`hostname` = `{HOSTNAME}` here, `hostnames`, "
    "the listener's address).",
    "* **curl 7.88 cannot do DIGEST-MD5 with Dovecot** (directly or relayed): Dovecot "
    'sends `algorithm="md5-sess"` quoted, curl compares the value including the quotes '
    "and cancels (`*`). Through authgate in terminate mode curl's DIGEST-MD5 works, "
    "because authgate sends `algorithm=md5-sess` unquoted as RFC 2831 section 2.1.1 "
    "writes it. curl is therefore left out of the relayed DIGEST-MD5 cells "
    "(test_curl_digest_md5_dovecot_quirk).",
    "* **NTLMv1 clients need `allow_ntlm_legacy`**: the Cyrus SASL NTLM plugin (imtest, "
    "pop3test, smtptest), swaks' Authen::NTLM, GNU SASL's libntlm (msmtp, gsasl) and "
    "fetchmail's own NTLM send NTLMv1 responses; with the switch off (the default) "
    "authgate refuses them (`534 5.7.9 Authentication mechanism is too weak`, IMAP "
    "`NO [CANNOT]`, log `NTLM authentication failed: too-weak`), with it on (the matrix's "
    "terminate gateways) they log in. curl sends NTLMv2 and logs in either way "
    "(test_ntlmv1_clients_are_refused).",
    "* **gsasl 2.2.0 cannot run a plain SCRAM inside TLS** unless told `--no-cb`: with "
    "TLS it always has channel-binding data, and for SCRAM-SHA-1/-256 it then builds a "
    "client-first message with the flag `y` *and* a binding name, which its own "
    "validator rejects (`mechanism error: Error authenticating user`, nothing sent). "
    "The runner passes `--no-cb` for those; against Dovecot directly the same happens.",
    "* **gsasl's -PLUS** uses `tls-exporter` on TLS 1.3 and `tls-unique` on TLS 1.2 (no "
    "`tls-server-end-point`), so it cannot log in to authgate with -PLUS yet (note "
    "**binding** above). authgate answers the unknown binding type as malformed data "
    "(IMAP `BAD`, SMTP `501`), where RFC 5802 section 7 has the server error "
    "`e=unsupported-channel-binding-type`; the client sees the exchange refused either way.",
    "* **gsasl after login** copies stdin to the server, but reads it with `getline()` "
    "after `poll()`: lines left in stdio's buffer are never sent and end of input stops "
    "the session before the answers arrive. The runner gives it unbuffered stdin "
    "(`stdbuf -i0`), writes the IMAP/SMTP script only once it has logged in (its "
    "prompts, e.g. NTLM's and DIGEST-MD5's realm, would read the script: `--realm=` "
    "and `--quality-of-protection=qop-auth` answer them) and closes stdin when the last "
    "answer is in. gsasl has no implicit TLS and no POP3. In SMTP it understands only "
    "`334`, `235` and `535`: another refusal (`538 5.7.11` for PLAIN without TLS, `501`) "
    "it reports as `could not parse server data`, and a server offering no mechanism at "
    "all (IMAP `LOGINDISABLED` without `AUTH=`, EHLO without `AUTH`) as `Cannot find "
    "mechanism...` with exit 0; the runner counts both as the refusal they are.",
    "* **gsasl sessions are slow** (about 0.2 s through authgate against 0.05 s for "
    "curl): it writes each command line in two `write()`s, the text and then `CRLF`; "
    "with Nagle's algorithm the `CRLF` waits for the ACK of the text, which the "
    "receiving side delays (up to 40 ms) while it waits for the rest of the line. "
    "Against Dovecot directly the same stall shows once per session, through authgate "
    "about three times (strace: `recvfrom` waits of 40-50 ms).",
    "* **fetchmail 6.4.37 with `sslcertck` insists on a subject CommonName**: a "
    "certificate that names the server only in subjectAltName is refused (`Server name "
    "not specified in certificate!`). `authgate certs` writes CN=localhost; the test "
    "Dovecot's certificate has one too for that reason. fetchmail's `auth password` is "
    "IMAP `LOGIN` and POP3 `USER`/`PASS`: it has no SASL PLAIN, LOGIN, DIGEST-MD5 or "
    "SCRAM. `sslproto ''` keeps it off STARTTLS; an `sslproto` without `ssl` requires it.",
    "* **msmtp** checks the mechanism against the server's list before sending `AUTH`: a "
    "mechanism the policy withholds ends with `the server does not support "
    "authentication method` (exit 69) without a round trip; it never sends SCRAM-PLUS.",
    "* **imtest has no SASL LOGIN**: `imtest -m login` (any case) sends the IMAP LOGIN "
    "command; SASL LOGIN over IMAP is covered by curl, imaplib and gsasl.",
    "* **swaks** needs the Debian packages libnet-ssleay-perl (TLS), libauthen-sasl-perl "
    "(DIGEST-MD5) and libauthen-ntlm-perl (NTLM); with `--no-install-recommends` they "
    "are not pulled in.",
    "* The Cyrus tools do not verify the server certificate (they have no CA option and "
    "only print the verification error); curl, swaks (`--tls-verify`), msmtp "
    "(`--tls-trust-file`), fetchmail (`sslcertck`), gsasl (`--x509-ca-file`) and the "
    "Python clients verify it against the test CA and the name `localhost`.",
]


def write_docs(path: Path = DOCS_PATH) -> Path:
    text = "\n".join(_iter_docs(tool_versions()))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + ("" if text.endswith("\n") else "\n"), encoding="utf-8")
    return path
