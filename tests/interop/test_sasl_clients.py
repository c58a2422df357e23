"""Real SASL libraries against a real `authgate run` in front of the real
Dovecot (terminate mode: authgate verifies): what interop issue #11 found.

* DIGEST-MD5: Cyrus SASL (imtest/pop3test/smtptest), GNU SASL (msmtp, the
  gsasl command) and Authen::SASL (swaks) put the host they were told into
  digest-uri. authgate's hostname here is "mail.example.test", a name no
  client can reach; they connect by IP address (127.0.0.1, ::1: the
  listener's own address) and by a second name ("localhost", listed in
  `hostnames`), and must all log in, on every protocol and TLS mode.
* NTLM: Cyrus SASL, GNU SASL (msmtp, gsasl), fetchmail and Authen::NTLM
  (swaks) answer with NTLMv1 or the NTLM2 session response. Refused as too
  weak by default; let in on the listeners with `allow_ntlm_legacy = true`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.interop import matrix
from tests.interop.dovecot import DovecotInstance
from tests.interop.matrix import Login
from tests.netutil import free_ports

pytestmark = pytest.mark.interop

HOSTNAME = "mail.example.test"  # our name: unresolvable on purpose
SECOND_NAME = "localhost"  # configured in `hostnames`
USER = "plainuser"
PROTOCOLS = ("imap", "pop3", "smtp")
TLS_MODES = ("none", "starttls", "implicit")
MECHANISMS = ("DIGEST-MD5", "NTLM", "SCRAM-SHA-256", "CRAM-MD5", "LOGIN", "PLAIN")


@dataclass(frozen=True)
class ListenerDef:
    name: str
    protocol: str
    tls: str
    host: str = "127.0.0.1"
    extra: tuple[str, ...] = ()  # more lines for the [[listeners]] table
    policy: tuple[str, ...] = ()  # lines of its [listeners.policy] table


def listener_defs() -> list[ListenerDef]:
    defs = [ListenerDef(f"{p}-{t}", p, t) for p in PROTOCOLS for t in TLS_MODES]
    # The listener's own address in IPv6.
    defs += [ListenerDef(f"{p}-v6", p, "none", host="::1") for p in PROTOCOLS]
    # A listener whose own `hostnames` (empty) replaces the top-level list.
    defs.append(ListenerDef("imap-nonames", "imap", "none", extra=("hostnames = []",)))
    # The legacy NTLM switch, per listener (off at the top).
    defs += [
        ListenerDef(f"{p}-{t}-legacy", p, t, policy=("allow_ntlm_legacy = true",))
        for p in PROTOCOLS
        for t in TLS_MODES
    ]
    return defs


def render(
    defs: list[ListenerDef],
    ports: dict[str, int],
    dovecot: DovecotInstance,
    certs: Path,
    users_file: Path,
    master_file: Path,
) -> str:
    mechanisms = ", ".join(f'"{m}"' for m in MECHANISMS)
    lines = [
        "# Written by tests/interop/test_sasl_clients.py.",
        f'hostname = "{HOSTNAME}"',
        f'hostnames = ["{SECOND_NAME}"]',
        "",
        "[policy]",
        'security = "require-secure-auth"',
        f"mechanisms = [{mechanisms}]",
        "allow_ntlm_legacy = false",
        "",
        *matrix.common_sections(certs, users_file),
    ]
    backends = {"imap": dovecot.imap, "pop3": dovecot.pop3, "smtp": dovecot.submission}
    for d in defs:
        host = f"[{d.host}]" if ":" in d.host else d.host
        lines += [
            "[[listeners]]",
            f'name = "{d.name}"',
            f'protocol = "{d.protocol}"',
            f'listen = "{host}:{ports[d.name]}"',
            f'tls = "{d.tls}"',
            *d.extra,
            "[listeners.backend]",
            f'address = "127.0.0.1:{backends[d.protocol]}"',
            f'master_user = "{dovecot.master[0]}"',
            f'master_password_file = "{master_file}"',
        ]
        if d.policy:
            lines += ["[listeners.policy]", *d.policy]
        lines.append("")
    return "\n".join(lines)


@dataclass
class Running:
    gateway: matrix.Gateway
    defs: dict[str, ListenerDef]
    ca_file: Path
    workdir: Path

    def login(self, listener: str, host: str, mech: str, password: str) -> Login:
        d = self.defs[listener]
        return Login(
            protocol=d.protocol,
            host=host,
            port=self.gateway.ports[listener],
            tls=d.tls,
            mech=mech,
            user=USER,
            password=password,
            ca_file=self.ca_file,
            workdir=self.workdir,
        )


def start(workdir: Path, dovecot: DovecotInstance, defs: list[ListenerDef]) -> Running:
    """`authgate run` with `defs` on fresh ports (retried when a port picked
    free was taken before authgate bound it)."""
    authgate = matrix.authgate_binary()
    certs = workdir / "certs"
    ca_file = matrix.make_certs(authgate, certs)
    users_file = workdir / "users.toml"
    matrix.make_users_file(authgate, users_file, dovecot.users, realm=HOSTNAME)
    master_file = workdir / "master.secret"
    master_file.write_text(dovecot.master[1] + "\n")
    master_file.chmod(0o600)
    scratch = workdir / "scratch"
    scratch.mkdir()
    config_path = workdir / "authgate.toml"
    log_path = workdir / "authgate.log"
    for _ in range(3):
        ports = dict(zip((d.name for d in defs), free_ports(len(defs)), strict=True))
        config_path.write_text(render(defs, ports, dovecot, certs, users_file, master_file))
        gateway = matrix.Gateway.launch(authgate, "terminate", "sasl", config_path, log_path, ports)
        if matrix.wait_listening(gateway, {d.name: (d.host, ports[d.name]) for d in defs}, 20):
            return Running(gateway, {d.name: d for d in defs}, ca_file, scratch)
    raise AssertionError("authgate could not bind its ports in 3 attempts")


@pytest.fixture(scope="module")
def running(
    tmp_path_factory: pytest.TempPathFactory, dovecot: DovecotInstance
) -> Iterator[Running]:
    gw = start(tmp_path_factory.mktemp("sasl-clients"), dovecot, listener_defs())
    try:
        yield gw
    finally:
        died = gw.gateway.process.poll()
        status = gw.gateway.stop()
        assert died is None, gw.gateway.log_text()[-8000:]
        assert status == 0, gw.gateway.log_text()[-8000:]
        assert gw.gateway.crashes() == [], "\n".join(gw.gateway.crashes())


Runner = Callable[[Login], matrix.Attempt]


def explain(
    attempt: matrix.Attempt, gw: Running, mark: int, dovecot: DovecotInstance, since: int
) -> str:
    return (
        f"--- client ---\n{attempt.transcript[-5000:]}"
        f"\n--- authgate log ---\n{gw.gateway.log_text(mark)[-3000:]}"
        f"\n--- dovecot log ---\n{dovecot.log_text(since)[-2000:]}"
    )


def assert_logged_in(
    attempt: matrix.Attempt,
    login: Login,
    gw: Running,
    dovecot: DovecotInstance,
    marks: tuple[int, int],
) -> None:
    """The client got in, authgate verified it with `login.mech`, and
    Dovecot saw the master login for the user (terminate mode)."""
    mark, since = marks
    context = explain(attempt, gw, mark, dovecot, since)
    assert attempt.status == "ok", context
    # The login record (authgate.logs) names the user and the mechanism.
    assert f" user={USER} mechanism={login.mech} " in gw.gateway.log_text(mark), context
    dovecot.wait_for_log(rf"Master user logging in as {USER}\b", since=since)
    if login.protocol == "smtp" and attempt.msgid is not None:
        msgid = attempt.msgid
        relayed = dovecot.relay.wait_for(lambda m: msgid.encode() in m.data)
        assert relayed.rcpt_tos == (matrix.RCPT,), relayed


def marks(gw: Running, dovecot: DovecotInstance) -> tuple[int, int]:
    return gw.gateway.log_size(), dovecot.log_size()


# ------------------------------------------------------------ DIGEST-MD5

# (client, runner, protocols it speaks, TLS modes it can use)
DIGEST_CLIENTS: list[tuple[str, Runner, tuple[str, ...], tuple[str, ...]]] = [
    ("cyrus", matrix.run_cyrus, PROTOCOLS, TLS_MODES),
    ("msmtp", matrix.run_msmtp, ("smtp",), TLS_MODES),
    ("swaks", matrix.run_swaks, ("smtp",), TLS_MODES),
    ("gsasl", matrix.run_gsasl, ("imap", "smtp"), ("none", "starttls")),
]

DIGEST_CASES = [
    pytest.param(runner, f"{protocol}-{tls}", host, id=f"{name}-{protocol}-{tls}-{host}")
    for name, runner, protocols, modes in DIGEST_CLIENTS
    for protocol in protocols
    for tls in modes
    for host in ("127.0.0.1", SECOND_NAME)
] + [
    # The listener's own IPv6 address, as typed: "::1".
    pytest.param(runner, f"{protocol}-v6", "::1", id=f"{name}-{protocol}-v6-::1")
    for name, runner, protocols, _ in DIGEST_CLIENTS
    # gsasl --connect cannot take an IPv6 literal; swaks needs the Perl
    # module IO::Socket::INET6 for one (not installed; the others cover it).
    if name not in ("gsasl", "swaks")
    for protocol in protocols
]


@pytest.mark.parametrize(("runner", "listener", "host"), DIGEST_CASES)
def test_digest_md5_by_address_and_by_second_name(
    running: Running, dovecot: DovecotInstance, runner: Runner, listener: str, host: str
) -> None:
    login = running.login(listener, host, "DIGEST-MD5", dovecot.users[USER])
    before = marks(running, dovecot)
    attempt = runner(login)
    assert_logged_in(attempt, login, running, dovecot, before)
    assert "digest-uri-mismatch" not in running.gateway.log_text(before[0])


def test_digest_md5_name_not_ours_is_refused_as_a_mismatch(
    running: Running, dovecot: DovecotInstance
) -> None:
    """On the listener whose `hostnames = []`, "localhost" is no name of
    ours: imtest is refused, and the log names the host it used. Its
    address (127.0.0.1) still works there."""
    before = marks(running, dovecot)
    refused = matrix.run_cyrus(
        running.login("imap-nonames", SECOND_NAME, "DIGEST-MD5", dovecot.users[USER])
    )
    log = running.gateway.log_text(before[0])
    assert refused.status == "refused", explain(refused, running, before[0], dovecot, before[1])
    assert re.search(
        r"DIGEST-MD5 authentication failed: digest-uri-mismatch \(digest-uri "
        r"'imap/localhost' names a host that is not ours\)",
        log,
    ), log
    assert "Login: user=" not in dovecot.log_text(before[1])
    login = running.login("imap-nonames", "127.0.0.1", "DIGEST-MD5", dovecot.users[USER])
    before = marks(running, dovecot)
    assert_logged_in(matrix.run_cyrus(login), login, running, dovecot, before)


# ------------------------------------------------------------ NTLM legacy

NTLM_CLIENTS: list[tuple[str, Runner, tuple[str, ...], tuple[str, ...]]] = [
    ("cyrus", matrix.run_cyrus, PROTOCOLS, TLS_MODES),
    ("msmtp", matrix.run_msmtp, ("smtp",), TLS_MODES),
    ("gsasl", matrix.run_gsasl, ("imap", "smtp"), ("none", "starttls")),
    ("fetchmail", matrix.run_fetchmail, ("imap", "pop3"), TLS_MODES),
    ("swaks", matrix.run_swaks, ("smtp",), TLS_MODES),
]

NTLM_CASES = [
    pytest.param(runner, protocol, tls, id=f"{name}-{protocol}-{tls}")
    for name, runner, protocols, modes in NTLM_CLIENTS
    for protocol in protocols
    for tls in modes
]


@pytest.mark.parametrize(("runner", "protocol", "tls"), NTLM_CASES)
def test_legacy_ntlm_clients_need_the_switch(
    running: Running, dovecot: DovecotInstance, runner: Runner, protocol: str, tls: str
) -> None:
    password = dovecot.users[USER]
    # Off (the default): refused as too weak, never a login.
    before = marks(running, dovecot)
    # By name: fetchmail checks certificates by name only (NTLM does not care).
    refused = runner(running.login(f"{protocol}-{tls}", SECOND_NAME, "NTLM", password))
    log = running.gateway.log_text(before[0])
    context = explain(refused, running, before[0], dovecot, before[1])
    assert refused.status == "refused", context
    assert "NTLM authentication failed: too-weak" in log, context
    assert "allow_ntlm_legacy" in log, context
    assert "Login: user=" not in dovecot.log_text(before[1])
    # On for this listener: the same client logs in and reaches the mailbox.
    login = running.login(f"{protocol}-{tls}-legacy", SECOND_NAME, "NTLM", password)
    before = marks(running, dovecot)
    assert_logged_in(runner(login), login, running, dovecot, before)


@pytest.mark.parametrize(
    ("runner", "protocol"),
    [
        pytest.param(matrix.run_cyrus, "imap", id="cyrus-imap"),
        pytest.param(matrix.run_msmtp, "smtp", id="msmtp-smtp"),
        pytest.param(matrix.run_fetchmail, "pop3", id="fetchmail-pop3"),
        pytest.param(matrix.run_swaks, "smtp", id="swaks-smtp"),
    ],
)
def test_legacy_ntlm_still_checks_the_password(
    running: Running, dovecot: DovecotInstance, runner: Runner, protocol: str
) -> None:
    before = marks(running, dovecot)
    attempt = runner(running.login(f"{protocol}-none-legacy", SECOND_NAME, "NTLM", "wrong-pw"))
    log = running.gateway.log_text(before[0])
    assert attempt.status == "refused", explain(attempt, running, before[0], dovecot, before[1])
    assert "NTLM authentication failed as 'plainuser': invalid-credentials" in log, log
    assert "Login: user=" not in dovecot.log_text(before[1])
