"""Proof with real software: authgate as a real process in front of the real
Dovecot, driven by curl, swaks, Cyrus imtest/pop3test/smtptest and Python's
imaplib/poplib/smtplib.

Every cell of protocol x mechanism x TLS x backend mode x policy x client
address is one test (see tests/interop/matrix.py for the case list and the
clients). The expected outcome comes from `authgate.policy.decide` for the
listener policy authgate itself loads from the generated TOML, and a handful
of key cells are pinned by hand (KEY_EXPECTATIONS) so a bug in `decide`
cannot make the matrix agree with itself. One `authgate run` process serves
all cases of a (backend mode, policy) pair; the table is printed at the end of
the run and written to docs/interop.md (tests/interop/conftest.py).
"""

from __future__ import annotations

import dataclasses
import functools
import imaplib
import poplib
import smtplib
import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from authgate import config as config_mod
from authgate.policy import decide
from tests.interop import matrix
from tests.interop.dovecot import SEED_SUBJECT, DovecotInstance
from tests.interop.matrix import (
    EXEMPT,
    LOGIN_COMMAND,
    OUTSIDER,
    USER_PASS,
    Case,
    Gateway,
    Row,
    SourceForwarder,
    Target,
)

pytestmark = pytest.mark.interop

CASES = matrix.all_cases()
# msmtp, fetchmail and gsasl in every cell, and the rotation's clients where
# the rotation left them without a policy-`none` cell (their outcome beside
# Dovecot's in the comparison table).
GATEWAY_CASES = CASES + matrix.client_cases() + matrix.baseline_cases()
DIRECT_CASES = matrix.direct_cases()

# Pinned by hand from README's policy table, independent of `decide`:
# (mode, policy, protocol, connection, client address, mechanism) -> login allowed.
KEY_EXPECTATIONS: dict[tuple[str, str, str, str, str, str], bool] = {
    # require-secure-auth without TLS: challenge-response yes, cleartext no...
    ("terminate", "require-secure-auth", "imap", "none", OUTSIDER, "PLAIN"): False,
    ("terminate", "require-secure-auth", "imap", "none", OUTSIDER, LOGIN_COMMAND): False,
    ("terminate", "require-secure-auth", "imap", "none", OUTSIDER, "CRAM-MD5"): True,
    ("terminate", "require-secure-auth", "smtp", "none", OUTSIDER, "NTLM"): True,
    ("relay", "require-secure-auth", "smtp", "starttls-skipped", OUTSIDER, "LOGIN"): False,
    ("relay", "require-secure-auth", "smtp", "starttls-skipped", OUTSIDER, "DIGEST-MD5"): True,
    ("relay", "require-secure-auth", "pop3", "none", OUTSIDER, "SCRAM-SHA-1"): True,
    # ...except from the exempt network, and inside TLS.
    ("terminate", "require-secure-auth", "imap", "none", EXEMPT, "PLAIN"): True,
    ("terminate", "require-secure-auth", "imap", "starttls", OUTSIDER, LOGIN_COMMAND): True,
    ("relay", "require-secure-auth", "pop3", "starttls-skipped", OUTSIDER, USER_PASS): False,
    # require-encrypted: nothing before TLS, everything inside it, exempt as `none`.
    ("terminate", "require-encrypted", "pop3", "none", OUTSIDER, "SCRAM-SHA-256"): False,
    ("relay", "require-encrypted", "smtp", "starttls-skipped", OUTSIDER, "CRAM-MD5"): False,
    ("relay", "require-encrypted", "smtp", "starttls-skipped", EXEMPT, "PLAIN"): True,
    ("relay", "require-encrypted", "pop3", "implicit", OUTSIDER, USER_PASS): True,
    ("terminate", "require-encrypted", "imap", "starttls", OUTSIDER, "NTLM"): True,
    ("terminate", "require-encrypted", "imap", "none", EXEMPT, LOGIN_COMMAND): True,
    # none: everything everywhere.
    ("terminate", "none", "pop3", "none", OUTSIDER, USER_PASS): True,
    ("relay", "none", "imap", "starttls-skipped", OUTSIDER, "PLAIN"): True,
}


# ----------------------------------------------------------------- fixtures


class Assets:
    """What every gateway shares: the authgate binary, certificates, the
    terminate-mode users file and master password, the forwarders."""

    def __init__(self, root: Path, dovecot: DovecotInstance) -> None:
        self.authgate = matrix.authgate_binary()
        self.root = root
        self.certs = root / "certs"
        self.ca_file = matrix.make_certs(self.authgate, self.certs)
        self.users_file = root / "users.toml"
        matrix.make_users_file(self.authgate, self.users_file, dovecot.users)
        self.master_file = root / "master.secret"
        self.master_file.write_text(dovecot.master[1] + "\n")
        self.master_file.chmod(0o600)
        self.messages = root / "messages"
        self.messages.mkdir()


@pytest.fixture(scope="session")
def matrix_assets(tmp_path_factory: pytest.TempPathFactory, dovecot: DovecotInstance) -> Assets:
    matrix.check_client_support()
    return Assets(tmp_path_factory.mktemp("matrix"), dovecot)


@pytest.fixture(scope="module")
def gateway(
    request: pytest.FixtureRequest, matrix_assets: Assets, dovecot: DovecotInstance
) -> Iterator[Gateway]:
    """One `authgate run` per (backend mode, policy): request.param is
    "mode/policy", or "mode/policy/strict-ntlm" for one with
    `allow_ntlm_legacy` left at its default (off)."""
    mode, policy, *flags = str(request.param).split("/")
    gw = matrix.start_gateway(
        ntlm_legacy=False if matrix.STRICT_NTLM in flags else None,
        authgate=matrix_assets.authgate,
        mode=mode,
        policy=policy,
        workdir=matrix_assets.root,
        dovecot=dovecot,
        certs=matrix_assets.certs,
        users_file=matrix_assets.users_file,
        master_file=matrix_assets.master_file,
    )
    try:
        yield gw
    finally:
        died_before = gw.process.poll()
        status = gw.stop()
        assert died_before is None, (
            f"authgate ({request.param}) had died with status {died_before}:\n"
            + gw.log_text()[-8000:]
        )
        assert status == 0, (
            f"authgate ({request.param}) exited {status} on SIGTERM:\n" + gw.log_text()[-8000:]
        )
        # A session that hit a bug is logged and closed, which a client may
        # not notice: the log must show none (bar known bugs provoked on purpose).
        crashes = gw.crashes()
        assert crashes == [], f"authgate ({request.param}) logged internal errors:\n" + "\n".join(
            crashes
        )


@functools.cache
def _loaded(config_path: Path) -> config_mod.Config:
    return config_mod.load(config_path)


def derived_expectation(gw: Gateway, case: Case) -> tuple[bool, str | None]:
    """What `decide` says for the policy authgate loaded from this gateway's
    file, and what keeps the client out although the policy lets it in
    (matrix.client_limit: NTLMv1, a channel binding authgate cannot check)."""
    listener = _loaded(gw.config_path).listener(case.listener)
    assert listener.policy.mechanisms == matrix.MECHANISM_ORDER[case.mode]
    verifiable = listener.policy.mechanisms if case.mode == "terminate" else None
    decision = decide(listener.policy, case.source, tls=case.tls, verifiable=verifiable)
    allowed = matrix.expectation(decision, case.mech)
    limit = matrix.client_limit(case, listener.policy) if allowed else None
    return allowed and limit is None, limit


def target_for(gw: Gateway, case: Case, assets: Assets, dovecot: DovecotInstance) -> Target:
    return Target(
        case=case,
        port=gw.ports[case.listener],
        ca_file=assets.ca_file,
        password=dovecot.users[case.user],
        workdir=assets.messages,
        forward=gw.forward,
    )


# ------------------------------------------------------------- the matrix


@pytest.mark.parametrize(
    ("gateway", "case"),
    [pytest.param(c.gateway, c, id=c.id) for c in GATEWAY_CASES],
    indirect=["gateway"],
    # Module scope for the gateway parameter: pytest then runs each gateway's
    # cases together and starts every `authgate run` exactly once.
    scope="module",
)
def test_matrix(
    gateway: Gateway, case: Case, dovecot: DovecotInstance, matrix_assets: Assets
) -> None:
    derived, limit = derived_expectation(gateway, case)
    # The hand-pinned cells are about the policy: they hold for a client
    # only when nothing but the policy decides (no client_limit).
    pinned = KEY_EXPECTATIONS.get(case.key) if limit is None else None
    expected = derived if pinned is None else pinned
    row = Row(case, expected, hard_coded=pinned is not None)
    matrix.record(row)

    gateway.assert_alive()
    dovecot_mark, gateway_mark = dovecot.log_size(), gateway.log_size()
    attempt = matrix.RUNNERS[case.client](target_for(gateway, case, matrix_assets, dovecot))
    row.observed = attempt.status
    gateway.assert_alive()

    def context() -> str:
        return (
            f"{case.client} as {case.user} ({'expected login' if expected else 'expected refusal'})"
            f"\n--- client ---\n{attempt.transcript[-6000:]}"
            f"\n--- authgate log ---\n{gateway.log_text(gateway_mark)[-4000:]}"
            f"\n--- dovecot log ---\n{dovecot.log_text(dovecot_mark)[-3000:]}"
        )

    verify_outcome(case, expected, attempt, dovecot, dovecot_mark, context)
    row.passed = True


def verify_outcome(
    case: Case,
    expected: bool,
    attempt: matrix.Attempt,
    dovecot: DovecotInstance,
    dovecot_mark: int,
    context: Callable[[], str],
) -> None:
    """The client's verdict, and Dovecot's side of it."""
    if expected:
        assert attempt.status == "ok", context()
        # Dovecot saw the login for this user, with the method authgate used.
        dovecot.wait_for_log(matrix.login_pattern(case), since=dovecot_mark)
        if case.mode == "terminate":
            dovecot.wait_for_log(rf"Master user logging in as {case.user}\b", since=dovecot_mark)
        if case.protocol == "smtp":
            msgid = attempt.msgid
            assert msgid is not None
            relayed = dovecot.relay.wait_for(lambda m: msgid.encode() in m.data)
            assert relayed.mail_from == f"{case.user}@example.test", relayed
            assert relayed.rcpt_tos == (matrix.RCPT,), relayed
    else:
        assert attempt.status == "refused", context()
        assert "Login: user=" not in dovecot.log_text(dovecot_mark), context()
        if case.protocol == "smtp" and attempt.msgid is not None:
            assert not any(attempt.msgid.encode() in m.data for m in dovecot.relay.messages)


# ------------------------------------------------- straight against Dovecot


class DirectAssets:
    """The TLS Dovecot's CA on disk, and a folder for the clients' files."""

    def __init__(self, root: Path, dovecot_tls: DovecotInstance) -> None:
        assert dovecot_tls.ca_pem is not None
        self.ca_file = root / "dovecot-ca.pem"
        self.ca_file.write_bytes(dovecot_tls.ca_pem)
        self.messages = root / "messages"
        self.messages.mkdir()


@pytest.fixture(scope="session")
def direct_assets(
    tmp_path_factory: pytest.TempPathFactory, dovecot_tls: DovecotInstance
) -> DirectAssets:
    return DirectAssets(tmp_path_factory.mktemp("direct"), dovecot_tls)


def direct_port(case: Case, dovecot: DovecotInstance, dovecot_tls: DovecotInstance) -> int:
    """`none`: the Dovecot without TLS; STARTTLS (used or not) and implicit
    TLS: the Dovecot with TLS."""
    service = matrix.dovecot_service(case.protocol)
    if case.conn == "none":
        return int(getattr(dovecot, service))
    if case.implicit:
        return int(getattr(dovecot_tls, service + "s"))
    return int(getattr(dovecot_tls, service))


def _no_forwarder(port: int) -> int:
    raise AssertionError("the direct cells all connect from 127.0.0.1")


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in DIRECT_CASES])
def test_direct(
    case: Case,
    dovecot: DovecotInstance,
    dovecot_tls: DovecotInstance,
    direct_assets: DirectAssets,
) -> None:
    """The same clients, mechanisms and transports straight against Dovecot:
    the record shows where authgate's outcome differs from Dovecot's."""
    expected = matrix.direct_expectation(case)
    row = Row(case, expected, hard_coded=False)
    matrix.record(row)
    instance = dovecot if case.conn == "none" else dovecot_tls
    mark = instance.log_size()
    target = Target(
        case=case,
        port=direct_port(case, dovecot, dovecot_tls),
        ca_file=direct_assets.ca_file,
        password=instance.users[case.user],
        workdir=direct_assets.messages,
        forward=_no_forwarder,
    )
    attempt = matrix.RUNNERS[case.client](target)
    row.observed = attempt.status

    def context() -> str:
        return (
            f"{case.client} as {case.user} straight to Dovecot "
            f"({'expected login' if expected else 'expected refusal'})"
            f"\n--- client ---\n{attempt.transcript[-6000:]}"
            f"\n--- dovecot log ---\n{instance.log_text(mark)[-3000:]}"
        )

    verify_outcome(case, expected, attempt, instance, mark, context)
    row.passed = True


# ------------------------------------------------- the matrix's own checks


def test_case_list_covers_the_matrix() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    keys = {c.key for c in CASES}
    assert len(keys) == len(CASES)  # one client per cell
    for mode in matrix.MODES:
        for protocol in matrix.PROTOCOLS:
            mechs = matrix.mechanisms_for(mode, protocol)
            assert ("NTLM" in mechs) == (mode == "terminate")
            assert ("SCRAM-SHA-256-PLUS" in mechs) == (mode == "terminate")
            for mech in mechs:
                if mech not in matrix.CLIENTS[protocol]:
                    continue  # -PLUS: only gsasl (test_client_cells_cover_every_transport)
                cells = [c for c in CASES if (c.mode, c.protocol, c.mech) == (mode, protocol, mech)]
                assert len(cells) == len(matrix.POLICIES) * len(matrix.CONNECTIONS) * 2
                # Every client listed for this mechanism really gets cells.
                listed = set(matrix.CLIENTS[protocol][mech]) - (
                    {c for c, m in matrix.RELAY_EXCLUDED if m == mech} if mode == "relay" else set()
                )
                assert {c.client for c in cells} == listed
                # ...from both client addresses.
                for client in listed:
                    assert {c.source for c in cells if c.client == client} == set(matrix.SOURCES), (
                        mode,
                        protocol,
                        mech,
                        client,
                    )
    # Every pinned cell is a real cell.
    assert set(KEY_EXPECTATIONS) <= keys


def test_client_cells_cover_every_transport() -> None:
    """msmtp, fetchmail and gsasl: every mechanism they list, on every
    protocol and connection they support, under every policy and in both
    backend modes (where the mode has the mechanism), from both addresses;
    and straight against Dovecot, like every other client."""
    cells = matrix.client_cases()
    ids = [c.id for c in GATEWAY_CASES + DIRECT_CASES]
    assert len(ids) == len(set(ids))
    for client, protocols in matrix.FULL_CLIENTS.items():
        for protocol, mechs in protocols.items():
            for mech in mechs:
                for mode in matrix.MODES:
                    mine = [
                        c
                        for c in cells
                        if (c.client, c.protocol, c.mech, c.mode) == (client, protocol, mech, mode)
                    ]
                    if mech not in matrix.mechanisms_for(mode, protocol):
                        assert mine == []
                        continue
                    for policy in matrix.POLICIES:
                        conns = {c.conn for c in mine if c.policy == policy}
                        assert conns == set(matrix.connections_for(client)), (
                            client,
                            mech,
                            mode,
                            policy,
                        )
                    assert {c.source for c in mine} == set(matrix.SOURCES), (client, mech, mode)
                direct = {
                    c.conn
                    for c in DIRECT_CASES
                    if (c.client, c.protocol, c.mech) == (client, protocol, mech)
                }
                assert direct == set(matrix.connections_for(client)), (client, protocol, mech)
    # gsasl has no implicit TLS; everyone else meets every listener kind.
    assert "implicit" not in {c.conn for c in cells if c.client.startswith("gsasl")}
    assert {c.conn for c in cells if c.client == "msmtp"} == set(matrix.CONNECTIONS)


def test_every_client_has_an_authgate_outcome_beside_dovecots() -> None:
    """For the comparison table: each direct cell has policy-`none` cells
    through authgate in both modes (where the mode offers the mechanism)."""
    through = {
        (c.mode, c.protocol, c.conn, c.mech, c.client) for c in GATEWAY_CASES if c.policy == "none"
    }
    missing = []
    for c in DIRECT_CASES:
        for mode in matrix.MODES:
            if c.mech not in matrix.mechanisms_for(mode, c.protocol):
                continue
            if mode == "relay" and (c.client, c.mech) in matrix.RELAY_EXCLUDED:
                continue
            if (mode, c.protocol, c.conn, c.mech, c.client) not in through:
                missing.append((mode, c.protocol, c.conn, c.mech, c.client))
    assert missing == []


def _write_configs(tmp_path: Path) -> dict[str, Path]:
    """The gateways' TOML ("mode/policy" -> file), as start_gateway writes it."""
    (tmp_path / "master.secret").write_text("x\n")
    paths = {}
    for mode in matrix.MODES:
        for policy in matrix.POLICIES:
            path = tmp_path / f"{mode}-{policy}.toml"
            path.write_text(
                matrix.render_config(
                    mode=mode,
                    policy=policy,
                    ports={
                        name: 10000 + i for i, (name, _, _) in enumerate(matrix.listener_names())
                    },
                    backends={"imap": 1, "pop3": 2, "smtp": 3},
                    certs=tmp_path,
                    users_file=tmp_path / "users.toml" if mode == "terminate" else None,
                    master=("authgate", tmp_path / "master.secret")
                    if mode == "terminate"
                    else None,
                    ntlm_legacy=matrix.NTLM_LEGACY[mode],
                )
            )
            paths[f"{mode}/{policy}"] = path
    return paths


def test_key_expectations_match_policy_decide(tmp_path: Path) -> None:
    """The hand-pinned cells agree with `decide` on the generated configs."""
    _write_configs(tmp_path)
    disagree = []
    for key, pinned in KEY_EXPECTATIONS.items():
        mode, policy, protocol, conn, source, mech = key
        case = Case(mode, policy, protocol, conn, source, mech, "curl", "plainuser")
        listener = config_mod.load(tmp_path / f"{mode}-{policy}.toml").listener(case.listener)
        verifiable = listener.policy.mechanisms if mode == "terminate" else None
        got = matrix.expectation(
            decide(listener.policy, source, tls=case.tls, verifiable=verifiable), mech
        )
        if got != pinned:
            disagree.append((key, pinned, got))
    assert disagree == []


def test_every_difference_from_dovecot_is_explained(tmp_path: Path) -> None:
    """Where a client's expected outcome through authgate (policy `none`,
    either mode) is not its expected outcome straight against Dovecot,
    docs/interop.md must say why (matrix.DIFFERENCE_NOTES)."""
    paths = _write_configs(tmp_path)
    unexplained, explained = [], set()
    for direct in DIRECT_CASES:
        for mode in matrix.MODES:
            if direct.mech not in matrix.mechanisms_for(mode, direct.protocol) or (
                mode == "relay" and (direct.client, direct.mech) in matrix.RELAY_EXCLUDED
            ):
                continue
            case = dataclasses.replace(direct, mode=mode)
            listener = config_mod.load(paths[f"{mode}/none"]).listener(case.listener)
            verifiable = listener.policy.mechanisms if mode == "terminate" else None
            decision = decide(listener.policy, OUTSIDER, tls=case.tls, verifiable=verifiable)
            through = matrix.expectation(decision, case.mech) and (
                matrix.client_limit(case, listener.policy) is None
            )
            if through == matrix.direct_expectation(direct):
                continue
            notes = matrix.difference_notes(case.client, case.mech)
            if not notes:
                unexplained.append((mode, case.protocol, case.conn, case.mech, case.client))
            explained.update(notes)
    assert unexplained == []
    assert explained <= set(matrix.DIFFERENCE_NOTES)
    # No note is there for nothing: each is about some client's mechanism.
    used = {n for c in DIRECT_CASES for n in matrix.difference_notes(c.client, c.mech)}
    assert used == set(matrix.DIFFERENCE_NOTES)


@pytest.mark.parametrize(
    "gateway", ["terminate/require-encrypted", "relay/require-encrypted"], indirect=True
)
@pytest.mark.parametrize("protocol", matrix.PROTOCOLS)
def test_wrong_password_is_refused(
    gateway: Gateway, dovecot: DovecotInstance, matrix_assets: Assets, protocol: str
) -> None:
    """The matrix only proves that the policy refuses; here the verifier does:
    authgate's users file (terminate) or Dovecot (relay) says no, the client
    sees an authentication failure and no backend session starts."""
    case = Case(
        gateway.mode, gateway.policy, protocol, "implicit", OUTSIDER, "PLAIN", "curl", "shauser"
    )
    mark = dovecot.log_size()
    target = target_for(gateway, case, matrix_assets, dovecot)
    wrong = Target(
        case=case,
        port=target.port,
        ca_file=target.ca_file,
        password=dovecot.users["plainuser"],  # someone else's password
        workdir=target.workdir,
        forward=target.forward,
    )
    attempt = matrix.run_curl(wrong)
    assert attempt.status == "refused", attempt.transcript
    assert "Login: user=" not in dovecot.log_text(mark)
    if gateway.mode == "relay":
        # Dovecot itself turned the password down.
        dovecot.wait_for_log(r"auth: .*shauser.*(Password mismatch|password mismatch)", since=mark)
    if attempt.msgid is not None:
        assert not any(attempt.msgid.encode() in m.data for m in dovecot.relay.messages)


def _imap_retry(t: Target, password: str) -> str:
    context = ssl.create_default_context(cafile=str(t.ca_file))
    with imaplib.IMAP4_SSL(
        matrix.HOSTNAME, t.port, ssl_context=context, timeout=matrix.TIMEOUT
    ) as client:
        # shauser's {SSHA512} cannot serve CRAM-MD5: Dovecot refuses it...
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            client.login_cram_md5(t.user, password)
        # ...and a client falls back to a cleartext login inside TLS.
        assert client.login(t.user, password)[0] == "OK"
        client.select("INBOX", readonly=True)
        _, data = client.uid("FETCH", "1", "(BODY.PEEK[])")
        first = data[0]
        assert isinstance(first, tuple)
        return bytes(first[1]).decode("utf-8", "replace")


def _pop3_retry(t: Target, password: str) -> str:
    context = ssl.create_default_context(cafile=str(t.ca_file))
    client = poplib.POP3_SSL(matrix.HOSTNAME, t.port, context=context, timeout=matrix.TIMEOUT)
    try:
        client.user(t.user)
        with pytest.raises(poplib.error_proto, match="AUTH"):
            client.pass_("not-" + password)
        client.user(t.user)
        assert client.pass_(password).startswith(b"+OK")
        _, lines, _ = client.retr(1)
        return b"\r\n".join(lines).decode("utf-8", "replace")
    finally:
        client.quit()


def _smtp_retry(t: Target, password: str) -> str:
    context = ssl.create_default_context(cafile=str(t.ca_file))
    msgid, message = matrix.make_message(t.case)
    with smtplib.SMTP_SSL(
        matrix.HOSTNAME, t.port, context=context, timeout=matrix.TIMEOUT
    ) as client:
        client.ehlo("client.example.test")
        # smtplib.login() tries CRAM-MD5, then PLAIN, then LOGIN on the same
        # connection until one works; Dovecot refuses CRAM-MD5 for shauser.
        client.login(t.user, password)
        client.sendmail(f"{t.user}@example.test", [matrix.RCPT], message)
    return msgid


@pytest.mark.parametrize("gateway", ["relay/none"], indirect=True)
@pytest.mark.parametrize(
    "protocol",
    ["imap", "pop3", "smtp"],
)
def test_relay_retry_after_refused_authentication(
    gateway: Gateway, dovecot: DovecotInstance, matrix_assets: Assets, protocol: str
) -> None:
    """A refused relayed authentication must leave the connection usable, as
    it does against Dovecot directly: real clients retry with another
    mechanism (smtplib.login) or another password on the same connection."""
    case = Case("relay", "none", protocol, "implicit", OUTSIDER, "PLAIN", "smtplib", "shauser")
    target = target_for(gateway, case, matrix_assets, dovecot)
    password = dovecot.users["shauser"]
    mark = gateway.log_size()
    worked = False
    try:
        if protocol == "smtp":
            msgid = _smtp_retry(target, password)
            dovecot.relay.wait_for(lambda m: msgid.encode() in m.data)
        else:
            body = (_imap_retry if protocol == "imap" else _pop3_retry)(target, password)
            assert f"Subject: {SEED_SUBJECT}" in body and "Hello shauser," in body
        worked = True
    finally:
        text = gateway.log_text(mark)
        _note(
            f"relay: retry after a refused authentication ({protocol})",
            worked,
            "the retry on the same connection logs in"
            if worked
            else "authgate drops the connection (internal error)",
        )
    assert "internal error" not in text, text


# ------------------------------------------------------- quirks, on record


def _note(name: str, passed: bool, what: str) -> None:
    matrix.NOTES[name] = (passed, what)


@pytest.mark.parametrize("gateway", ["relay/none"], indirect=True)
def test_curl_digest_md5_dovecot_quirk(
    gateway: Gateway, dovecot: DovecotInstance, matrix_assets: Assets
) -> None:
    """curl 7.88 cancels DIGEST-MD5 against Dovecot itself (quoted algorithm),
    so the same refusal through relay mode is not authgate's doing; against
    authgate in terminate mode curl's DIGEST-MD5 works (matrix cells)."""
    curl = matrix.require_binary("curl")
    direct = Case("relay", "none", "imap", "none", OUTSIDER, "DIGEST-MD5", "curl", "plainuser")
    rc, out = matrix._run(
        [
            curl,
            "-4",
            "-q",
            "-v",
            "--max-time",
            "10",
            "--user",
            f"plainuser:{dovecot.users['plainuser']}",
            "--login-options",
            "AUTH=DIGEST-MD5",
            f"imap://{matrix.HOSTNAME}:{dovecot.imap}/INBOX;UID=1",
        ]
    )
    assert rc == matrix.CURLE_LOGIN_DENIED, out
    assert 'algorithm="md5-sess"' in _decoded_challenges(out), out
    relayed = matrix.run_curl(target_for(gateway, direct, matrix_assets, dovecot))
    assert relayed.status == "refused", relayed.transcript
    assert "Authentication cancelled" in relayed.transcript, relayed.transcript
    assert SEED_SUBJECT not in relayed.transcript
    _note(
        "curl DIGEST-MD5 vs Dovecot",
        True,
        "curl cancels on Dovecot's quoted algorithm, directly (exit 67) and relayed (exit 67)",
    )


def _decoded_challenges(verbose: str) -> str:
    import base64
    import binascii

    out = []
    for line in verbose.splitlines():
        if line.startswith("< + "):
            try:
                out.append(base64.b64decode(line[4:].strip()).decode("latin-1"))
            except (binascii.Error, ValueError):
                continue
    return "\n".join(out)


@pytest.mark.parametrize("gateway", ["terminate/none/" + matrix.STRICT_NTLM], indirect=True)
@pytest.mark.parametrize(
    ("client", "protocol"),
    [
        ("imtest", "imap"),
        ("pop3test", "pop3"),
        ("smtptest", "smtp"),
        ("swaks", "smtp"),
        ("msmtp", "smtp"),
        ("fetchmail", "imap"),
        ("fetchmail", "pop3"),
        ("gsasl", "imap"),
        ("gsasl", "smtp"),
    ],
)
def test_ntlmv1_clients_are_refused(
    gateway: Gateway,
    dovecot: DovecotInstance,
    matrix_assets: Assets,
    client: str,
    protocol: str,
) -> None:
    """Cyrus' NTLM plugin, swaks' Authen::NTLM, GNU SASL (msmtp, gsasl) and
    fetchmail answer with NTLMv1, which authgate refuses as too weak unless
    the listener has `allow_ntlm_legacy` (the matrix's terminate gateways
    have it, and there these clients log in; curl's NTLMv2 logs in either way)."""
    case = Case("terminate", "none", protocol, "none", OUTSIDER, "NTLM", client, "plainuser")
    mark = gateway.log_size()
    dovecot_mark = dovecot.log_size()
    attempt = matrix.RUNNERS[client](target_for(gateway, case, matrix_assets, dovecot))
    assert attempt.status == "refused", attempt.transcript
    assert "NTLM authentication failed: too-weak" in gateway.log_text(mark), gateway.log_text(mark)
    assert "Login: user=" not in dovecot.log_text(dovecot_mark)
    _note(f"{client} NTLM ({protocol})", True, "NTLMv1 response refused as too weak")


@pytest.mark.parametrize("gateway", ["terminate/none"], indirect=True)
@pytest.mark.parametrize(("client", "binding"), list(matrix.CLIENT_CHANNEL_BINDING.items()))
@pytest.mark.parametrize("protocol", ["imap", "smtp"])
def test_channel_bindings_authgate_cannot_check(
    gateway: Gateway,
    dovecot: DovecotInstance,
    matrix_assets: Assets,
    client: str,
    binding: str,
    protocol: str,
) -> None:
    """gsasl binds SCRAM-*-PLUS to `tls-exporter` on TLS 1.3 and to
    `tls-unique` on TLS 1.2; authgate checks only `tls-server-end-point`, so
    it refuses both and says why (the -PLUS cells of gsasl in the matrix)."""
    assert binding not in matrix.AUTHGATE_CHANNEL_BINDINGS
    case = Case(
        "terminate",
        "none",
        protocol,
        "starttls",
        OUTSIDER,
        "SCRAM-SHA-256-PLUS",
        client,
        "plainuser",
    )
    mark, dovecot_mark = gateway.log_size(), dovecot.log_size()
    attempt = matrix.RUNNERS[client](target_for(gateway, case, matrix_assets, dovecot))
    assert attempt.status == "refused", attempt.transcript
    # The client-first message names the binding: GS2 header "p=<type>,,".
    assert f"p={binding},," in _decoded_lines(attempt.transcript), attempt.transcript
    log = gateway.log_text(mark)
    assert "SCRAM-SHA-256-PLUS authentication failed" in log, log
    assert "unsupported channel binding type" in log, log
    assert "Login: user=" not in dovecot.log_text(dovecot_mark)
    _note(f"{client} SCRAM-SHA-256-PLUS ({protocol})", True, f"{binding} binding refused")


def _decoded_lines(transcript: str) -> str:
    """Every line of a transcript that is base64 (a SASL message), decoded."""
    import base64
    import binascii

    out = []
    for line in transcript.splitlines():
        try:
            out.append(base64.b64decode(line.strip(), validate=True).decode("latin-1"))
        except (binascii.Error, ValueError):
            continue
    return "\n".join(out)


def test_forwarder_presents_the_exempt_address() -> None:
    """The Cyrus tools reach authgate through SourceForwarder: the server side
    must see 127.0.0.2, and bytes must pass unchanged both ways."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        forwarder = SourceForwarder(server.getsockname()[:2], EXEMPT)
        try:
            with socket.create_connection(("127.0.0.1", forwarder.port), timeout=5) as client:
                conn, peer = server.accept()
                with conn:
                    assert peer[0] == EXEMPT
                    client.sendall(b"a1 CAPABILITY\r\n")
                    assert conn.recv(100) == b"a1 CAPABILITY\r\n"
                    conn.sendall(b"* OK\r\n")
                    assert client.recv(100) == b"* OK\r\n"
        finally:
            forwarder.close()


def test_gateway_that_dies_is_reported_with_its_stderr(
    tmp_path: Path, dovecot: DovecotInstance
) -> None:
    """The harness's own failure path: authgate exiting at start-up (here: no
    certificate) fails with its exit status and what it printed."""
    with pytest.raises(
        matrix.GatewayDied, match=r"(?s)died with status 2.*authgate: .*server\.pem"
    ):
        matrix.start_gateway(
            authgate=matrix.authgate_binary(),
            mode="relay",
            policy="none",
            workdir=tmp_path,
            dovecot=dovecot,
            certs=tmp_path / "no-such-certs",
            users_file=None,
            master_file=None,
        )
