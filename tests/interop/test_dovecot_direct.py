"""Real clients against the test Dovecot directly (no authgate in between).

These prove the harness in `tests/interop/dovecot.py`: every listener, user,
password scheme, the master user, the PROXY-protocol and ID trust settings,
delivery into a Maildir and relaying from submission work with stock clients
(imaplib, poplib, smtplib, curl, Cyrus imtest).  The through-authgate matrix is
built on the same fixtures.
"""

from __future__ import annotations

import imaplib
import os
import poplib
import re
import shutil
import smtplib
import socket
import ssl
import stat
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from authgate.proxy.proxy_protocol import build_v2
from tests.interop import dovecot as harness
from tests.interop.dovecot import SEED_SUBJECT, DovecotError, DovecotInstance, start_dovecot

pytestmark = pytest.mark.interop

TIMEOUT = 10.0
FAKE_CLIENT = "127.0.0.9"
IMTEST = "/usr/lib/cyrus/bin/imtest"


# -- helpers -----------------------------------------------------------------


def make_message(user: str, tag: str) -> tuple[str, bytes]:
    """A message with a unique Message-ID, in wire form (CRLF)."""
    msgid = f"<{tag}-{uuid.uuid4().hex}@authgate.test>"
    body = (
        f"From: sender@example.test\r\n"
        f"To: {user}@example.test\r\n"
        f"Subject: {tag}\r\n"
        f"Message-ID: {msgid}\r\n"
        f"\r\n"
        f"Body of {tag} for {user}.\r\n"
        f".leading dot line\r\n"
    ).encode("ascii")
    return msgid, body


def imap_uids_for(client: imaplib.IMAP4, msgid: str) -> list[bytes]:
    typ, data = client.uid("SEARCH", "HEADER", "Message-ID", f'"{msgid}"')
    assert typ == "OK", data
    assert data[0] is not None
    return bytes(data[0]).split()


def imap_fetch_body(client: imaplib.IMAP4, uid: bytes) -> bytes:
    typ, data = client.uid("FETCH", uid.decode(), "(BODY.PEEK[])")
    assert typ == "OK", data
    part = data[0]
    assert isinstance(part, tuple), data
    return bytes(part[1])


def plain_response(authzid: str, authcid: str, password: str) -> bytes:
    # RFC 4616: authzid NUL authcid NUL passwd
    return f"{authzid}\0{authcid}\0{password}".encode()


class ProxiedIMAP4(imaplib.IMAP4):
    """imaplib that sends a PROXY header before the IMAP conversation."""

    def __init__(self, host: str, port: int, header: bytes) -> None:
        self._proxy_header = header
        super().__init__(host, port, timeout=TIMEOUT)

    def open(self, host: str = "", port: int = 143, timeout: float | None = None) -> None:
        # open() connects; __init__ reads the greeting right after it.
        super().open(host, port, timeout)
        self.sock.sendall(self._proxy_header)


# poplib and smtplib have no public hook between connect and greeting, so these
# override the (stable, long-standing) private socket factories.
class ProxiedPOP3(poplib.POP3):
    def __init__(self, host: str, port: int, header: bytes) -> None:
        self._proxy_header = header
        super().__init__(host, port, timeout=TIMEOUT)

    def _create_socket(self, timeout: float) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout)
        sock.sendall(self._proxy_header)
        return sock


class ProxiedSMTP(smtplib.SMTP):
    def __init__(self, host: str, port: int, header: bytes) -> None:
        self._proxy_header = header
        super().__init__(host, port, timeout=TIMEOUT)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = socket.create_connection((host, port), timeout)
        sock.sendall(self._proxy_header)
        return sock


def tls_port(instance: DovecotInstance, name: str) -> int:
    port = instance.ports.get(name)
    assert port is not None, f"{name} is only set on the TLS instance"
    return port


def login_line(service: str, user: str, method: str, rip: str) -> str:
    """Regex for Dovecot's default login log line (login_log_format_elements)."""
    return (
        rf"{service}-login: Info: Login: user=<{re.escape(user)}>, "
        rf"method={method}, rip={re.escape(rip)}, lip=127\.0\.0\.1,"
    )


# -- the harness itself ------------------------------------------------------


def test_config_is_self_contained_and_loopback_only(dovecot: DovecotInstance) -> None:
    text = dovecot.conf_path.read_text()
    assert "!include" not in text
    assert "/etc/dovecot" not in text
    # doveconf -a expands the compiled-in defaults too: no listener may be
    # left on a well-known port (143/993/110/995/587) or on a wildcard address.
    result = subprocess.run(
        ["doveconf", "-c", str(dovecot.conf_path), "-a"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    )
    listening: set[int] = set()
    in_listener = False
    for line in result.stdout.splitlines():
        stripped = line.strip()
        if stripped.startswith("inet_listener "):
            in_listener, address = True, None
        elif in_listener and stripped.startswith("address ="):
            address = stripped.split("=", 1)[1].strip()
        elif in_listener and stripped.startswith("port ="):
            port = int(stripped.split("=", 1)[1])
            if port:
                assert address in ("127.0.0.1", ""), line
                listening.add(port)
        elif in_listener and stripped == "}":
            in_listener = False
    assert re.search(r"^listen = 127\.0\.0\.1$", result.stdout, re.M)
    assert listening == set(dovecot.ports.values())
    assert set(dovecot.ports) == {
        "imap",
        "pop3",
        "submission",
        "imap_haproxy",
        "pop3_haproxy",
        "submission_haproxy",
    }


def test_password_schemes_verify_with_doveadm(dovecot: DovecotInstance) -> None:
    """Our {SSHA512} and {CRAM-MD5} generators agree with Dovecot's own."""
    conf = str(dovecot.conf_path)
    password = "Zürich pass 1"
    stored = harness.ssha512(password)
    ok = subprocess.run(
        ["doveadm", "-c", conf, "pw", "-t", stored, "-p", password],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert ok.returncode == 0 and "(verified)" in ok.stdout, ok.stdout + ok.stderr
    bad = subprocess.run(
        ["doveadm", "-c", conf, "pw", "-t", stored, "-p", password + "x"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert bad.returncode != 0
    # CRAM-MD5's stored form is unsalted, so Dovecot's output must match exactly.
    cram = subprocess.run(
        ["doveadm", "-c", conf, "pw", "-s", "CRAM-MD5", "-p", password],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    )
    assert cram.stdout.strip() == harness.cram_md5_hash(password)


def test_deliver_writes_into_new_owned_by_mail_user(dovecot: DovecotInstance) -> None:
    _, message = make_message("shauser", "ownership")
    path = dovecot.deliver("shauser", message.replace(b"\r\n", b"\n"))
    st = path.stat()
    assert path.parent == dovecot.maildir("shauser") / "new"
    assert (st.st_uid, st.st_gid) == (dovecot.mail_uid, dovecot.mail_gid)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert path.read_bytes() == message  # bare LFs became CRLF
    with pytest.raises(KeyError):
        dovecot.deliver("nosuchuser", message)


def test_start_and_stop_clean_up() -> None:
    with start_dovecot() as instance:
        root, process, port = instance.root, instance.process, instance.imap
        assert process is not None and process.poll() is None
        assert root.is_dir()
    assert process.poll() is not None
    assert not root.exists()
    with pytest.raises(OSError):
        socket.create_connection((harness.HOST, port), timeout=1).close()


def test_startup_failure_reports_dovecots_complaint() -> None:
    with (
        pytest.raises(
            DovecotError, match=r"(?s)exited with status.*authgate_no_such_setting"
        ) as exc,
        start_dovecot(extra_config="authgate_no_such_setting = yes\n"),
    ):
        pass
    # doveconf names the config file: its directory is gone again.
    found = re.search(r"(/tmp/authgate-dovecot-[^/\s]+)/etc/dovecot\.conf", str(exc.value))
    assert found, exc.value
    assert not Path(found.group(1)).exists()


def test_missing_binary_fails_with_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(harness, "DOVECOT_BIN", "authgate-no-such-dovecot")
    monkeypatch.setattr(harness, "DOVECOT_PATHS", ("/nonexistent/sbin/dovecot",))
    with pytest.raises(DovecotError, match=r"run \./dev test as root"), start_dovecot():
        pass


# -- IMAP ---------------------------------------------------------------------


@pytest.mark.parametrize("user", sorted(harness.DEFAULT_USERS))
def test_imap_login_each_scheme(dovecot: DovecotInstance, user: str) -> None:
    """plainuser {PLAIN}, shauser {SSHA512}, cramuser {CRAM-MD5} all log in."""
    with imaplib.IMAP4(dovecot.host, dovecot.imap, timeout=TIMEOUT) as client:
        typ, _ = client.login(user, dovecot.users[user])
        assert typ == "OK"
        selected, data = client.select("INBOX", readonly=True)
        assert selected == "OK" and int(data[0] or b"0") >= 1
        # The seed message is every user's UID 1.
        body = imap_fetch_body(client, b"1")
        assert f"Subject: {SEED_SUBJECT}".encode() in body
        assert f"Hello {user},".encode() in body


def test_imap_login_select_fetch_delivered(dovecot: DovecotInstance) -> None:
    msgid, message = make_message("plainuser", "imap-fetch")
    dovecot.deliver("plainuser", message)
    with imaplib.IMAP4(dovecot.host, dovecot.imap, timeout=TIMEOUT) as client:
        client.login("plainuser", dovecot.users["plainuser"])
        typ, _ = client.select("INBOX")
        assert typ == "OK"
        uids = imap_uids_for(client, msgid)
        assert len(uids) == 1
        assert imap_fetch_body(client, uids[0]) == message


@pytest.mark.parametrize(
    ("user", "password"),
    [
        ("plainuser", "wrong-password"),
        ("shauser", harness.DEFAULT_USERS["plainuser"]),  # someone else's password
        ("nosuchuser", "whatever"),
        # The master password is not a password for the master user's own mailbox
        # login either: master passdbs only authorize logins *as someone else*.
        (harness.MASTER_USER[0], harness.MASTER_USER[1]),
    ],
)
def test_imap_wrong_credentials_get_no(dovecot: DovecotInstance, user: str, password: str) -> None:
    mark = dovecot.log_size()
    with imaplib.IMAP4(dovecot.host, dovecot.imap, timeout=TIMEOUT) as client:
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            client.login(user, password)
        assert client.state == "NONAUTH"
    assert "Login: user=" not in dovecot.log_text(mark)


def test_no_auth_penalty_after_a_failure(dovecot: DovecotInstance) -> None:
    """anvil's per-IP penalty is off: a good login right after a bad one from
    the same address is not held back (2.3.19 would wait 4 s)."""
    with imaplib.IMAP4(dovecot.host, dovecot.imap, timeout=TIMEOUT) as client:
        with pytest.raises(imaplib.IMAP4.error):
            client.login("plainuser", "wrong-password")
        started = time.monotonic()
        assert client.login("plainuser", dovecot.users["plainuser"])[0] == "OK"
        assert time.monotonic() - started < 2.0


def test_imap_authenticate_plain_master_user(dovecot: DovecotInstance) -> None:
    msgid, message = make_message("plainuser", "master-login")
    dovecot.deliver("plainuser", message)
    mark = dovecot.log_size()
    master, master_pw = dovecot.master
    with imaplib.IMAP4(dovecot.host, dovecot.imap, timeout=TIMEOUT) as client:
        typ, _ = client.authenticate(
            "PLAIN", lambda _challenge: plain_response("plainuser", master, master_pw)
        )
        assert typ == "OK"
        client.select("INBOX", readonly=True)
        # Landed in plainuser's mailbox: the message only plainuser got is there.
        assert len(imap_uids_for(client, msgid)) == 1
    dovecot.wait_for_log(r"Master user logging in as plainuser", since=mark)
    dovecot.wait_for_log(login_line("imap", "plainuser", "PLAIN", "127.0.0.1"), since=mark)
    dovecot.wait_for_log(r"imap\(plainuser\)<\d+><[^>]+>: Info: Disconnected", since=mark)


@pytest.mark.parametrize(
    ("authzid", "password"),
    [
        ("plainuser", "not-the-master-password"),
        # pass = yes: the target must exist in the normal passdb.
        ("nosuchuser", harness.MASTER_USER[1]),
    ],
)
def test_imap_master_user_refused(dovecot: DovecotInstance, authzid: str, password: str) -> None:
    master = dovecot.master[0]
    with imaplib.IMAP4(dovecot.host, dovecot.imap, timeout=TIMEOUT) as client:
        with pytest.raises(imaplib.IMAP4.error, match=r"AUTHENTICATIONFAILED|AUTHORIZATIONFAILED"):
            client.authenticate("PLAIN", lambda _c: plain_response(authzid, master, password))
        assert client.state == "NONAUTH"


def test_imap_cram_md5(dovecot: DovecotInstance) -> None:
    with imaplib.IMAP4(dovecot.host, dovecot.imap, timeout=TIMEOUT) as client:
        assert "AUTH=CRAM-MD5" in client.capabilities
        typ, _ = client.login_cram_md5("cramuser", dovecot.users["cramuser"])
        assert typ == "OK"
        client.select("INBOX", readonly=True)
        assert b"Hello cramuser," in imap_fetch_body(client, b"1")
    # An {SSHA512} hash cannot produce the HMAC key CRAM-MD5 needs.
    for user, password in (("shauser", dovecot.users["shauser"]), ("cramuser", "wrong")):
        with imaplib.IMAP4(dovecot.host, dovecot.imap, timeout=TIMEOUT) as client:
            with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
                client.login_cram_md5(user, password)
            assert client.state == "NONAUTH"


def test_imap_mechanisms_advertised(dovecot: DovecotInstance) -> None:
    with imaplib.IMAP4(dovecot.host, dovecot.imap, timeout=TIMEOUT) as client:
        offered = {c.removeprefix("AUTH=") for c in client.capabilities if c.startswith("AUTH=")}
    assert offered == {m.upper() for m in harness.AUTH_MECHANISMS}


def test_imap_id_x_originating_ip_is_trusted(dovecot: DovecotInstance) -> None:
    """login_trusted_networks: Dovecot believes the ID-forwarded client address."""
    mark = dovecot.log_size()
    with imaplib.IMAP4(dovecot.host, dovecot.imap, timeout=TIMEOUT) as client:
        typ, _ = client.xatom("ID", '("x-originating-ip" "127.0.0.7" "x-originating-port" "4242")')
        assert typ == "OK"
        client.login("plainuser", dovecot.users["plainuser"])
    dovecot.wait_for_log(login_line("imap", "plainuser", "PLAIN", "127.0.0.7"), since=mark)


# -- PROXY protocol listeners ------------------------------------------------


def test_haproxy_v2_imap(dovecot: DovecotInstance) -> None:
    mark = dovecot.log_size()
    header = build_v2((FAKE_CLIENT, 40001), (dovecot.host, dovecot.imap_haproxy))
    with ProxiedIMAP4(dovecot.host, dovecot.imap_haproxy, header) as client:
        assert client.login("plainuser", dovecot.users["plainuser"])[0] == "OK"
        assert client.select("INBOX", readonly=True)[0] == "OK"
        assert SEED_SUBJECT.encode() in imap_fetch_body(client, b"1")
    dovecot.wait_for_log(login_line("imap", "plainuser", "PLAIN", FAKE_CLIENT), since=mark)


def test_haproxy_v2_pop3(dovecot: DovecotInstance) -> None:
    mark = dovecot.log_size()
    header = build_v2((FAKE_CLIENT, 40002), (dovecot.host, dovecot.pop3_haproxy))
    client = ProxiedPOP3(dovecot.host, dovecot.pop3_haproxy, header)
    try:
        client.user("cramuser")
        assert client.pass_(dovecot.users["cramuser"]).startswith(b"+OK")
        count, _size = client.stat()
        assert count >= 1
    finally:
        client.quit()
    dovecot.wait_for_log(login_line("pop3", "cramuser", "PLAIN", FAKE_CLIENT), since=mark)


def test_haproxy_v2_submission(dovecot: DovecotInstance) -> None:
    mark = dovecot.log_size()
    header = build_v2((FAKE_CLIENT, 40003), (dovecot.host, dovecot.submission_haproxy))
    with ProxiedSMTP(dovecot.host, dovecot.submission_haproxy, header) as client:
        client.ehlo("client.example.test")
        client.user, client.password = "shauser", dovecot.users["shauser"]
        code, _ = client.auth("PLAIN", client.auth_plain)
        assert code == 235
    dovecot.wait_for_log(login_line("submission", "shauser", "PLAIN", FAKE_CLIENT), since=mark)


def test_haproxy_listener_requires_header(dovecot: DovecotInstance) -> None:
    """A haproxy = yes listener never treats plain IMAP as a session."""
    mark = dovecot.log_size()
    received = b""
    with socket.create_connection((dovecot.host, dovecot.imap_haproxy), timeout=TIMEOUT) as sock:
        sock.sendall(b"a1 CAPABILITY\r\n")
        try:
            while chunk := sock.recv(4096):
                received += chunk
        except ConnectionResetError:
            pass  # Dovecot drops it, possibly with our bytes unread: RST
    assert b"* OK" not in received
    dovecot.wait_for_log(r"imap-login: Error: haproxy: .*Failed to read valid HAproxy data", mark)


# -- POP3 ---------------------------------------------------------------------


def test_pop3_user_pass_stat_retr(dovecot: DovecotInstance) -> None:
    msgid, message = make_message("plainuser", "pop3-retr")
    dovecot.deliver("plainuser", message)
    client = poplib.POP3(dovecot.host, dovecot.pop3, timeout=TIMEOUT)
    try:
        client.user("plainuser")
        assert client.pass_(dovecot.users["plainuser"]).startswith(b"+OK")
        count, total = client.stat()
        assert count >= 2  # the seed and this one
        # POP3 numbers messages in UID order, so the newest delivery is last.
        _, listing, _ = client.list()
        sizes = {int(n): int(s) for n, s in (line.split() for line in listing)}
        assert sum(sizes.values()) == total
        assert sizes[count] == len(message)
        _, lines, _ = client.retr(count)
        assert b"\r\n".join(lines) + b"\r\n" == message  # dot-unstuffed by poplib
        assert f"Message-ID: {msgid}".encode() in lines
    finally:
        client.quit()


def test_pop3_wrong_password(dovecot: DovecotInstance) -> None:
    client = poplib.POP3(dovecot.host, dovecot.pop3, timeout=TIMEOUT)
    try:
        client.user("plainuser")
        with pytest.raises(poplib.error_proto, match="Authentication failed"):
            client.pass_("wrong-password")
    finally:
        client.close()


# -- submission ----------------------------------------------------------------


def test_submission_auth_plain_relays_to_sink(dovecot: DovecotInstance) -> None:
    msgid, message = make_message("shauser", "submission")
    with smtplib.SMTP(dovecot.host, dovecot.submission, timeout=TIMEOUT) as client:
        client.ehlo("client.example.test")
        assert "PLAIN" in client.esmtp_features["auth"].split()
        client.user, client.password = "plainuser", dovecot.users["plainuser"]
        code, _ = client.auth("PLAIN", client.auth_plain)
        assert code == 235
        refused = client.sendmail("plainuser@example.test", ["shauser@example.test"], message)
        assert refused == {}
    relayed = dovecot.relay.wait_for(lambda m: msgid.encode() in m.data)
    assert relayed.mail_from == "plainuser@example.test"
    assert relayed.rcpt_tos == ("shauser@example.test",)
    # Dovecot prepends its Received: header, the rest arrives byte for byte.
    assert relayed.data.startswith(b"Received: ")
    assert relayed.data.endswith(message)


def test_submission_requires_auth_and_rejects_bad_password(dovecot: DovecotInstance) -> None:
    with smtplib.SMTP(dovecot.host, dovecot.submission, timeout=TIMEOUT) as client:
        client.ehlo("client.example.test")
        with pytest.raises(smtplib.SMTPSenderRefused):
            client.sendmail(
                "plainuser@example.test", ["x@example.test"], b"Subject: x\r\n\r\nx\r\n"
            )
        client.user, client.password = "plainuser", "wrong-password"
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.auth("PLAIN", client.auth_plain)


# -- curl and Cyrus imtest ---------------------------------------------------


def test_curl_fetches_uid_1(dovecot: DovecotInstance) -> None:
    curl = shutil.which("curl")
    assert curl, "curl is missing: run ./dev test as root to install it"
    url = f"imap://{dovecot.host}:{dovecot.imap}/INBOX;UID=1"
    ok = subprocess.run(
        [
            curl,
            "-q",
            "--silent",
            "--show-error",
            "--max-time",
            "10",
            "--user",
            f"plainuser:{dovecot.users['plainuser']}",
            url,
        ],
        capture_output=True,
        timeout=15,
    )
    assert ok.returncode == 0, ok.stderr
    assert f"Subject: {SEED_SUBJECT}".encode() in ok.stdout
    assert b"Hello plainuser," in ok.stdout
    bad = subprocess.run(
        [curl, "-q", "--silent", "--max-time", "10", "--user", "plainuser:wrong-password", url],
        capture_output=True,
        timeout=15,
    )
    assert bad.returncode == 67  # CURLE_LOGIN_DENIED
    assert SEED_SUBJECT.encode() not in bad.stdout


def run_imtest(
    dovecot: DovecotInstance,
    mech: str,
    authcid: str,
    password: str,
    authzid: str | None = None,
    script: str = "",
) -> str:
    assert os.access(IMTEST, os.X_OK), (
        f"{IMTEST} is missing: run ./dev test as root (cyrus-clients)"
    )
    # No -t / -s: imtest would insist on STARTTLS or imaps; ssl = no here.
    args = [IMTEST, "-p", str(dovecot.imap), "-m", mech, "-a", authcid, "-w", password]
    if authzid is not None:
        args += ["-u", authzid]
    args.append(dovecot.host)
    # After authenticating imtest relays stdin to the server; EOF ends it.
    result = subprocess.run(
        args,
        input=(script + "Z9 LOGOUT\r\n").encode(),
        capture_output=True,
        timeout=15,
    )
    return result.stdout.decode("utf-8", "replace") + result.stderr.decode("utf-8", "replace")


@pytest.mark.parametrize(
    ("mech", "authcid", "authzid", "owner"),
    [
        ("PLAIN", "plainuser", None, "plainuser"),
        ("PLAIN", harness.MASTER_USER[0], "plainuser", "plainuser"),
        ("CRAM-MD5", "cramuser", None, "cramuser"),
        ("SCRAM-SHA-256", "plainuser", None, "plainuser"),
        ("login", "shauser", None, "shauser"),  # imtest's name for the LOGIN command
    ],
)
def test_imtest_logs_in(
    dovecot: DovecotInstance, mech: str, authcid: str, authzid: str | None, owner: str
) -> None:
    msgid, message = make_message(owner, f"imtest-{mech}")
    dovecot.deliver(owner, message)
    password = dovecot.master[1] if authcid == dovecot.master[0] else dovecot.users[authcid]
    out = run_imtest(
        dovecot,
        mech,
        authcid,
        password,
        authzid,
        script=f'Z1 SELECT INBOX\r\nZ2 UID SEARCH HEADER Message-ID "{msgid}"\r\n',
    )
    assert "Authenticated." in out, out
    assert "Z1 OK" in out, out
    # The search finds the message only the intended mailbox received.
    assert re.search(r"^\* SEARCH \d+\s*$", out, re.M), out


def test_imtest_wrong_password(dovecot: DovecotInstance) -> None:
    out = run_imtest(dovecot, "PLAIN", "plainuser", "wrong-password")
    assert "Authentication failed" in out, out
    assert "Authenticated." not in out


# -- TLS variant ----------------------------------------------------------------


def test_tls_instance_ports(dovecot_tls: DovecotInstance) -> None:
    assert dovecot_tls.tls
    assert {"imaps", "pop3s", "submissions"} <= set(dovecot_tls.ports)


def test_tls_imap_implicit_and_starttls(dovecot_tls: DovecotInstance) -> None:
    ctx = dovecot_tls.client_ssl_context()
    # Certificate is for "localhost" and 127.0.0.1; hostname checking is on.
    with imaplib.IMAP4_SSL(
        dovecot_tls.host, tls_port(dovecot_tls, "imaps"), ssl_context=ctx, timeout=TIMEOUT
    ) as client:
        assert client.login("shauser", dovecot_tls.users["shauser"])[0] == "OK"
        assert isinstance(client.sock, ssl.SSLSocket)
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
    with imaplib.IMAP4("localhost", dovecot_tls.imap, timeout=TIMEOUT) as client:
        assert "STARTTLS" in client.capabilities
        assert client.starttls(ssl_context=ctx)[0] == "OK"
        assert client.login("plainuser", dovecot_tls.users["plainuser"])[0] == "OK"
        client.select("INBOX", readonly=True)
        assert SEED_SUBJECT.encode() in imap_fetch_body(client, b"1")


def test_tls_untrusted_client_is_refused_by_verification(dovecot_tls: DovecotInstance) -> None:
    """The client must verify against the instance's CA, not some system CA."""
    ctx = ssl.create_default_context()
    with pytest.raises(ssl.SSLCertVerificationError):
        imaplib.IMAP4_SSL(
            dovecot_tls.host, tls_port(dovecot_tls, "imaps"), ssl_context=ctx, timeout=TIMEOUT
        )


def test_tls_pop3_and_submission(dovecot_tls: DovecotInstance) -> None:
    ctx = dovecot_tls.client_ssl_context()
    pop = poplib.POP3_SSL(
        dovecot_tls.host, tls_port(dovecot_tls, "pop3s"), context=ctx, timeout=TIMEOUT
    )
    try:
        pop.user("cramuser")
        assert pop.pass_(dovecot_tls.users["cramuser"]).startswith(b"+OK")
    finally:
        pop.quit()
    starttls_pop = poplib.POP3(dovecot_tls.host, dovecot_tls.pop3, timeout=TIMEOUT)
    try:
        assert starttls_pop.stls(context=ctx).startswith(b"+OK")
        starttls_pop.user("plainuser")
        assert starttls_pop.pass_(dovecot_tls.users["plainuser"]).startswith(b"+OK")
    finally:
        starttls_pop.quit()

    msgid, message = make_message("cramuser", "submission-tls")
    with smtplib.SMTP(dovecot_tls.host, dovecot_tls.submission, timeout=TIMEOUT) as client:
        client.ehlo("client.example.test")
        assert client.has_extn("starttls")
        client.starttls(context=ctx)
        client.ehlo("client.example.test")
        client.login("plainuser", dovecot_tls.users["plainuser"])
        client.sendmail("plainuser@example.test", ["cramuser@example.test"], message)
    with smtplib.SMTP_SSL(
        dovecot_tls.host, tls_port(dovecot_tls, "submissions"), context=ctx, timeout=TIMEOUT
    ) as client:
        client.login("shauser", dovecot_tls.users["shauser"])
    assert dovecot_tls.relay.wait_for(lambda m: msgid.encode() in m.data).rcpt_tos == (
        "cramuser@example.test",
    )


def test_log_text_reads_from_offset(dovecot: DovecotInstance) -> None:
    mark = dovecot.log_size()
    with imaplib.IMAP4(dovecot.host, dovecot.imap, timeout=TIMEOUT) as client:
        client.login("shauser", dovecot.users["shauser"])
    dovecot.wait_for_log(login_line("imap", "shauser", "PLAIN", "127.0.0.1"), since=mark)
    assert "starting up" not in dovecot.log_text(mark)
    assert "starting up" in dovecot.log_text()
    with pytest.raises(AssertionError, match="no match"):
        dovecot.wait_for_log("this line is never logged", since=mark, timeout=0.2)
