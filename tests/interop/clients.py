"""Real mail clients, one function each, told exactly where to connect.

The matrix runners (tests/interop/matrix.py) always connect by
`matrix.HOSTNAME`; these take the host as the user would type it, because
what a client was told is what it puts into DIGEST-MD5's digest-uri (and
what it checks the certificate against). Each runs one login and proves
the session reached the mailbox (IMAP: SELECT and the seed message; POP3:
RETR of the seed message; SMTP: the message accepted), returning a
`matrix.Attempt` ("ok", "refused" for a clean authentication refusal, or
"error").

Clients: Cyrus imtest/pop3test/smtptest (libsasl2), msmtp and the gsasl
command (GNU SASL), swaks (Perl Authen::SASL, Authen::NTLM) and fetchmail
(its own NTLM). Each needs its program installed and fails (never skips)
when it is missing.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

from tests.interop.matrix import (
    PROCESS_TIMEOUT,
    RCPT,
    TIMEOUT,
    Attempt,
    _redact,
    _run,
    _seed_seen,
    cyrus_tool,
    require_binary,
)


@dataclass(frozen=True)
class Login:
    """One login: where the client connects, how, and as whom."""

    protocol: str  # imap | pop3 | smtp
    host: str  # as the user typed it: digest-uri host and certificate name
    port: int
    tls: str  # none | starttls | implicit
    mech: str  # SASL mechanism name, e.g. "DIGEST-MD5"
    user: str
    password: str
    ca_file: Path  # the CA that signed authgate's certificate
    workdir: Path  # scratch space for message files and client configs

    def scratch(self, suffix: str) -> Path:
        """A fresh file name in `workdir`."""
        return self.workdir / f"{self.protocol}-{uuid.uuid4().hex}{suffix}"


def message(login: Login) -> tuple[str, bytes]:
    """A small message with a unique Message-ID (to find it at the relay)."""
    msgid = f"<clients-{uuid.uuid4().hex}@authgate.test>"
    body = (
        f"From: {login.user}@example.test\r\n"
        f"To: {RCPT}\r\n"
        f"Subject: authgate client test ({login.mech})\r\n"
        f"Message-ID: {msgid}\r\n"
        f"\r\n"
        f"Sent through authgate.\r\n"
    ).encode("ascii")
    return msgid, body


# -- Cyrus imtest / pop3test / smtptest (libsasl2)


def cyrus(login: Login) -> Attempt:
    """imtest, pop3test or smtptest. They print "Authenticated." on success
    and copy stdin to the server afterwards; they cannot verify the server's
    certificate (no CA option)."""
    tool = {"imap": "imtest", "pop3": "pop3test", "smtp": "smtptest"}[login.protocol]
    args = [
        cyrus_tool(tool),
        "-p",
        str(login.port),
        "-m",
        login.mech,
        "-a",
        login.user,
        "-w",
        login.password,
    ]
    if login.tls == "starttls":
        args += ["-t", ""]  # STARTTLS, no client certificate
    elif login.tls == "implicit":
        args.append("-s")
    args.append(login.host)
    msgid = None
    # No LOGOUT/QUIT: the tool sends its own at the end of stdin.
    if login.protocol == "imap":
        script = b"Z1 SELECT INBOX\r\nZ2 UID FETCH 1 BODY.PEEK[]\r\n"
    elif login.protocol == "pop3":
        script = b"RETR 1\r\n"
    else:
        msgid, body = message(login)
        script = (
            f"MAIL FROM:<{login.user}@example.test>\r\nRCPT TO:<{RCPT}>\r\nDATA\r\n".encode()
            + body
            + b".\r\n"
        )
    rc, out = _run(args, stdin=script)
    out = _redact(out, login.password)
    authenticated = re.search(r"^Authenticated\.", out, re.M) is not None
    if rc == 0 and authenticated:
        if login.protocol == "imap":
            proven = bool(re.search(r"^Z1 OK", out, re.M)) and _seed_seen(out, login.user)
        elif login.protocol == "pop3":
            proven = _seed_seen(out, login.user)
        else:
            proven = re.search(r"^250 2\.0\.0 .*\r?$", out, re.M) is not None
        return Attempt("ok" if proven else "error", out, msgid)
    # A server that hangs up after the refusal can make the tool's copy of
    # its script die of SIGPIPE: the refusal itself was clean.
    if rc in (0, -signal.SIGPIPE) and not authenticated and "Authentication failed" in out:
        return Attempt("refused", out, msgid)
    return Attempt("error", out, msgid)


# -- msmtp (GNU SASL)

MSMTP_EX_NOPERM = 77  # sysexits.h: msmtp's "authentication failed"


def msmtp(login: Login) -> Attempt:
    assert login.protocol == "smtp", login
    binary = require_binary("msmtp")
    config = login.scratch(".msmtprc")  # an empty file: no system or user config
    config.write_text("")
    config.chmod(0o600)
    secret = login.scratch(".pw")
    secret.write_text(login.password + "\n")
    secret.chmod(0o600)
    msgid, body = message(login)
    args = [
        binary,
        f"--file={config}",
        f"--host={login.host}",
        f"--port={login.port}",
        f"--auth={login.mech.lower()}",
        f"--user={login.user}",
        f"--passwordeval=cat {secret}",
        f"--tls={'off' if login.tls == 'none' else 'on'}",
        f"--tls-starttls={'on' if login.tls == 'starttls' else 'off'}",
        f"--tls-trust-file={login.ca_file}",
        f"--timeout={int(TIMEOUT)}",
        "--domain=client.example.test",
        f"--from={login.user}@example.test",
        "--debug",
        "--",
        RCPT,
    ]
    rc, out = _run(args, stdin=body)
    out = _redact(out, login.password)
    if rc == 0:
        return Attempt("ok", out, msgid)
    if rc == MSMTP_EX_NOPERM and "authentication failed" in out.lower():
        return Attempt("refused", out, msgid)
    return Attempt("error", out, msgid)


# -- the gsasl command (GNU SASL)



def gsasl(login: Login) -> Attempt:
    """`gsasl --imap` / `--smtp`: authenticates, nothing more (the command
    has no mailbox step). STARTTLS only (no implicit TLS); it verifies the
    certificate and, inside TLS, offers its own channel binding (a SCRAM
    client-first "y,," when the server advertises no -PLUS)."""
    assert login.protocol in ("imap", "smtp") and login.tls != "implicit", login
    binary = require_binary("gsasl")
    args = [
        binary,
        f"--{login.protocol}",
        f"--connect={login.host}:{login.port}",
        f"--hostname={login.host}",
        "--mechanism",
        login.mech,
        "--authentication-id",
        login.user,
        "--password",
        login.password,
        "--quality-of-protection=qop-auth",
        f"--x509-ca-file={login.ca_file}",
        "--verbose",
    ]
    args.append("--starttls" if login.tls == "starttls" else "--no-starttls")
    rc, out = _run(args)
    out = _redact(out, login.password)
    if rc == 0:
        return Attempt("ok", out)
    # A refusal: exit 1 after the server's NO / 5xx reply.
    refusal = re.search(r"^(\. NO |5\d\d )", out, re.M)
    if rc == 1 and refusal:
        return Attempt("refused", out)
    return Attempt("error", out)


# -- swaks (Authen::SASL, Authen::NTLM)

SWAKS_AUTH_FAILED = 28  # swaks(1): "error in authentication"


def swaks(login: Login) -> Attempt:
    assert login.protocol == "smtp", login
    binary = require_binary("swaks")
    msgid = f"<clients-{uuid.uuid4().hex}@authgate.test>"
    args = [
        binary,
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
        "--tls-verify",
        "--tls-ca-path",
        str(login.ca_file),
    ]
    if login.tls == "starttls":
        args.append("--tls")
    elif login.tls == "implicit":
        args.append("--tls-on-connect")
    rc, out = _run(args)
    out = _redact(out, login.password)
    if rc == 0:
        return Attempt("ok", out, msgid)
    if rc == SWAKS_AUTH_FAILED:
        return Attempt("refused", out, msgid)
    return Attempt("error", out, msgid)


# -- fetchmail (its own NTLM and CRAM-MD5; no DIGEST-MD5)

FETCHMAIL_AUTHFAIL = 3  # fetchmail(1) EXIT CODES: "an authentication failure"


def fetchmail(login: Login) -> Attempt:
    """Fetch (and keep) the mailbox into a file: "ok" only when the seed
    message arrived there."""
    assert login.protocol in ("imap", "pop3"), login
    binary = require_binary("fetchmail")
    home = login.scratch(".fetchmail")
    home.mkdir(mode=0o700)
    delivered = home / "delivered"
    rc_file = home / "fetchmailrc"
    # fetchmail tries STARTTLS on its own unless sslproto is empty. Its
    # certificate check compares names only: connect by a name, not an IP.
    ssl = 'sslproto ""'
    if login.tls == "implicit":
        ssl = "ssl"
    elif login.tls == "starttls":
        ssl = "sslproto TLS1.2+"
    if login.tls != "none":
        ssl += f' sslcertck sslcertfile "{login.ca_file}"'
    rc_file.write_text(
        f'poll "{login.host}" service {login.port} protocol {login.protocol.upper()}'
        f" auth {login.mech.lower()} timeout {int(TIMEOUT)}\n"
        f'  user "{login.user}" password "{login.password}"\n'
        f'  keep fetchall {ssl} mda "cat >> {delivered}"\n'
    )
    rc_file.chmod(0o600)
    args = [binary, "-f", str(rc_file), "--nodetach", "--verbose", "--idfile", str(home / "ids")]
    env = {**os.environ, "FETCHMAILHOME": str(home), "HOME": str(home)}
    try:
        result = subprocess.run(args, capture_output=True, timeout=PROCESS_TIMEOUT, env=env)
    except subprocess.TimeoutExpired as exc:
        out = ((exc.stdout or b"") + (exc.stderr or b"")).decode("utf-8", "replace")
        return Attempt("error", _redact(f"$ fetchmail (timed out)\n{out}", login.password))
    out = (result.stdout + result.stderr).decode("utf-8", "replace")
    out = _redact(f"$ {' '.join(args)}\n(exit {result.returncode})\n{out}", login.password)
    mail = delivered.read_text(errors="replace") if delivered.exists() else ""
    if result.returncode == 0 and _seed_seen(mail, login.user):
        return Attempt("ok", out + "\n--- delivered ---\n" + mail[:2000])
    if result.returncode == FETCHMAIL_AUTHFAIL:
        return Attempt("refused", out)
    return Attempt("error", out)
