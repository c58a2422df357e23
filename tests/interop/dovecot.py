"""A real Dovecot (Debian 12: 2.3.19) on loopback for the interop tests.

`start_dovecot()` writes a self-contained dovecot.conf (no `!include`, nothing
read from /etc/dovecot) into a fresh directory under /tmp, starts
`dovecot -F -c <conf>` in the foreground, waits until every listener accepts
connections (and the plain ones send their greeting) and yields a
`DovecotInstance` describing it.  It needs root: Dovecot's master drops to
`dovenull` for the login processes, to `dovecot` for auth and to the mail user
(`nobody`) for imap/pop3/submission, so every path they touch is created with
the owner and mode that process needs.

Submission relays to a tiny aiosmtpd sink (`RelaySink`) started on loopback in
a background thread, so a test can assert that a message sent through
Dovecot's submission service arrived.

Config quirks met with 2.3.19 (each is handled below):

* The compiled-in defaults declare `imaps`/`pop3s` listeners on 993/995 and
  `listen = *, ::`; the default listeners are switched off by name with
  `port = 0` and `listen` is narrowed to 127.0.0.1, or a run would grab (or
  fail on) the well-known ports.  (`submissions` is not a compiled default.)
* `ssl` must be set: the plain instance says `ssl = no`; the TLS one needs
  only `ssl_cert`/`ssl_key` (no `ssl_dh` in 2.3 with the default ciphers).
* `login_trusted_networks` does not exempt a client from anvil's auth penalty
  in 2.3.19 (the login process never sends `no-penalty`): a good login from
  127.0.0.1 right after a bad one waits 4 s.  Auth skips the penalty when it
  cannot connect to anvil's `anvil-auth-penalty` socket, so that socket gets
  `mode = 0` (pass `auth_penalty=True` to keep the real behaviour).
* `auth_failure_delay = 0` still answers a failure after ~0.5 s: auth flushes
  delayed failures on a 500 ms timer.
* Login services run with `service_count = 0` and `process_min_avail = 1`:
  with the default (one process per connection) a login process forked just
  before SIGTERM blocks shutdown for ~5 s (it waits on its settings or on the
  stats-writer handshake); `stats_writer_socket_path =` is empty for the same
  reason.  Shutdown then takes ~1 s.
* With `pass = yes` on the master passdb, the *target* user must also exist in
  the normal passdb: a master login for an unknown user fails.
* `first_valid_uid` defaults to 500; it is lowered to 1 so any system user can
  be the mail user.
* The mail user's home and Maildir are created (and owned by that user) before
  start-up; the seed message each user has at UID 1 is dropped in then.
* Opt-in `oauth2=OAuth2Passdb(...)`: OAUTHBEARER and XOAUTH2 are added to
  `auth_mechanisms` and a `driver = oauth2` passdb, limited to those two
  mechanisms and placed first, verifies each token by RFC 7662 introspection
  (`introspection_mode = post`; the client credentials ride in the URL's
  userinfo, which 2.3 sends as HTTP Basic).  2.3.19 also has
  `introspection_mode = local` but its JWT validation reads keys from a dict,
  not a JWKS URL, so introspection is what is tested.  A token's mail user
  gets a home and Maildir but no password in users.passwd.
"""

from __future__ import annotations

import base64
import contextlib
import grp
import hashlib
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from authgate.sasl.cram_md5 import cram_md5_secret
from tests.logfile import AppendedLog
from tests.netutil import free_port

HOST = "127.0.0.1"
DOVECOT_BIN = "dovecot"
DOVECOT_PATHS = ("/usr/sbin/dovecot", "/usr/local/sbin/dovecot")
INSTALL_HINT = (
    "run ./dev test as root to install Dovecot (dovecot-core, dovecot-imapd, dovecot-pop3d,"
    " dovecot-submissiond, dovecot-managesieved, dovecot-sieve)"
)

# Every mechanism Dovecot 2.3.19 offers that the gateway may want to exercise
# against a real backend.  All of them are built into that version's auth
# process (no extra package needed); GSSAPI/NTLM/OTP are left out on purpose.
AUTH_MECHANISMS = ("plain", "login", "cram-md5", "digest-md5", "scram-sha-1", "scram-sha-256")

# Passwords are deliberately not identical so a mix-up shows as a failed login.
DEFAULT_USERS: dict[str, str] = {
    "plainuser": "plain-Secret-1",
    "shauser": "sha-Secret-2",
    "cramuser": "cram-Secret-3",
}
MASTER_USER = ("authgate", "master-Secret-0")

# Subject of the message every user finds at UID 1 (delivered before Dovecot
# starts, so it is the first and only message Dovecot's first sync sees).
SEED_SUBJECT = "authgate interop seed"

STARTUP_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


class DovecotError(RuntimeError):
    """Dovecot could not be set up or started (message carries its logs)."""


def ssha512(password: str, salt: bytes | None = None) -> str:
    """Dovecot's ``{SSHA512}`` form: base64(SHA-512(password + salt) + salt)."""
    salt = secrets.token_bytes(8) if salt is None else salt
    digest = hashlib.sha512(password.encode("utf-8") + salt).digest()
    return "{SSHA512}" + base64.b64encode(digest + salt).decode("ascii")


def cram_md5_hash(password: str) -> str:
    """Dovecot's ``{CRAM-MD5}`` form: hex of the two precomputed HMAC-MD5 states."""
    return "{CRAM-MD5}" + cram_md5_secret(password).hex()


@dataclass(frozen=True)
class OAuth2Passdb:
    """Dovecot verifies bearer tokens itself (opt-in, see the module text)."""

    # RFC 7662 endpoint with the client credentials as userinfo:
    # http://client_id:client_secret@127.0.0.1:PORT/introspect
    introspection_url: str
    # Mail users who log in with tokens (home and Maildir made, no password).
    users: tuple[str, ...]
    # The introspection answer's field that must equal the login user.
    username_attribute: str = "email"


def oauth2_conf(oauth2: OAuth2Passdb) -> str:
    """The `args` file of the oauth2 passdb (dovecot-oauth2.conf.ext form)."""
    return (
        "# Written by tests/interop/dovecot.py\n"
        "introspection_mode = post\n"
        f"introspection_url = {oauth2.introspection_url}\n"
        # No tokeninfo_url: introspection is the only check.
        "force_introspection = yes\n"
        f"username_attribute = {oauth2.username_attribute}\n"
        "active_attribute = active\n"
        "active_value = true\n"
        "timeout_msecs = 5000\n"
    )


# -- relay sink --------------------------------------------------------------


@dataclass(frozen=True)
class RelayedMessage:
    """One message Dovecot's submission service relayed to the sink."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes


class RelaySink:
    """An aiosmtpd server on loopback that keeps every message it is given.

    Dovecot's submission service needs a relay MTA; this one accepts anything
    and records it.  aiosmtpd runs its own event loop in a background thread
    (its `Controller`), so the recorded list is guarded by a condition.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self._messages: list[RelayedMessage] = []
        self._cond = threading.Condition()
        self._controller: Any = None

    # aiosmtpd handler hook: called once per completed DATA.
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        content = envelope.original_content or envelope.content or b""
        if isinstance(content, str):
            content = content.encode("utf-8")
        message = RelayedMessage(
            mail_from=str(envelope.mail_from),
            rcpt_tos=tuple(str(r) for r in envelope.rcpt_tos),
            data=bytes(content),
        )
        with self._cond:
            self._messages.append(message)
            self._cond.notify_all()
        return "250 OK queued by authgate test sink"

    def start(self) -> None:
        from aiosmtpd.controller import Controller

        self._controller = Controller(self, hostname=HOST, port=self.port, ready_timeout=10)
        self._controller.start()

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    @property
    def messages(self) -> list[RelayedMessage]:
        with self._cond:
            return list(self._messages)

    def wait_for(
        self, predicate: Callable[[RelayedMessage], bool], timeout: float = 10.0
    ) -> RelayedMessage:
        """The first recorded message matching `predicate`, waiting up to `timeout`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for message in self._messages:
                    if predicate(message):
                        return message
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"relay sink got no matching message in {timeout}s "
                        f"({len(self._messages)} message(s) recorded)"
                    )
                self._cond.wait(remaining)


# -- the instance ------------------------------------------------------------


@dataclass
class DovecotInstance(AppendedLog):
    """A running Dovecot: where it listens, who can log in, and its files."""

    root: Path
    conf_path: Path
    log_path: Path
    imap: int
    pop3: int
    submission: int
    imap_haproxy: int
    pop3_haproxy: int
    submission_haproxy: int
    users: dict[str, str]
    master: tuple[str, str]
    relay: RelaySink
    mail_uid: int
    mail_gid: int
    host: str = HOST
    # TLS variant only: implicit-TLS ports (the plain ports then offer STARTTLS)
    # and the PEM of the CA that signed Dovecot's certificate for "localhost"
    # and 127.0.0.1.
    imaps: int | None = None
    pop3s: int | None = None
    submissions: int | None = None
    # With `sieve=True` (dovecot-managesieved): ManageSieve, plain (STARTTLS
    # in the TLS variant) and behind haproxy.
    sieve: int | None = None
    sieve_haproxy: int | None = None
    ca_pem: bytes | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def tls(self) -> bool:
        return self.ca_pem is not None

    def home(self, user: str) -> Path:
        return self.root / "home" / user

    def maildir(self, user: str) -> Path:
        return self.home(user) / "Maildir"


    def wait_for_log(self, pattern: str, since: int = 0, timeout: float = 5.0) -> re.Match[str]:
        """Wait until the log (from `since`) matches the regex `pattern`.

        Login processes hand their lines to Dovecot's log process over a pipe,
        so a line can land shortly after the client already saw the reply.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.log_text(since))
            if match:
                return match
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"Dovecot log has no match for {pattern!r} after {timeout}s:\n"
                    + self.log_text(since)[-4000:]
                )
            time.sleep(0.05)

    def deliver(self, user: str, message: bytes) -> Path:
        """Drop `message` into `user`'s Maildir/new the way an MDA would.

        Written to tmp/ then renamed into new/ (the Maildir rule that readers
        never see a partial file), owned by the mail user.  Bare LFs are
        turned into CRLF so sizes match what IMAP/POP3 report.
        """
        if user not in self.users:
            raise KeyError(f"unknown Dovecot user {user!r}")
        return _deliver(self.maildir(user), message, self.mail_uid, self.mail_gid)

    def client_ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts this instance's CA (TLS variant only)."""
        if self.ca_pem is None:
            raise RuntimeError("this Dovecot instance was started without TLS")
        ctx = ssl.create_default_context(cadata=self.ca_pem.decode("ascii"))
        return ctx

    @property
    def ports(self) -> dict[str, int]:
        names = [
            "imap",
            "pop3",
            "submission",
            "imap_haproxy",
            "pop3_haproxy",
            "submission_haproxy",
            "imaps",
            "pop3s",
            "submissions",
            "sieve",
            "sieve_haproxy",
        ]
        result = {}
        for name in names:
            value = getattr(self, name)
            if value is not None:
                result[name] = value
        return result


_BARE_LF = re.compile(rb"(?<!\r)\n")
_delivery_counter = 0
_delivery_lock = threading.Lock()


def _deliver(maildir: Path, message: bytes, uid: int, gid: int) -> Path:
    global _delivery_counter
    with _delivery_lock:
        _delivery_counter += 1
        counter = _delivery_counter
    now = time.time()
    # <sec>.M<usec>P<pid>Q<n>.<host>: unique per delivery (maildir(5)).
    name = f"{int(now)}.M{int(now % 1 * 1_000_000)}P{os.getpid()}Q{counter}.authgate-test"
    tmp = maildir / "tmp" / name
    tmp.write_bytes(_BARE_LF.sub(b"\r\n", message))
    os.chown(tmp, uid, gid)
    tmp.chmod(0o600)
    final = maildir / "new" / name
    tmp.rename(final)
    return final


def seed_message(user: str) -> bytes:
    """The message every user has at UID 1."""
    return (
        f"From: seed@example.test\r\n"
        f"To: {user}@example.test\r\n"
        f"Subject: {SEED_SUBJECT}\r\n"
        f"Message-ID: <seed-{user}@authgate.test>\r\n"
        f"\r\n"
        f"Hello {user}, this is the seed message.\r\n"
    ).encode("ascii")


# -- configuration -----------------------------------------------------------


def _listener(name: str, port: int, *, haproxy: bool = False, tls: bool = False) -> str:
    lines = [f"  inet_listener {name} {{", f"    address = {HOST}", f"    port = {port}"]
    if haproxy:
        lines.append("    haproxy = yes")
    if tls:
        lines.append("    ssl = yes")
    lines.append("  }")
    return "\n".join(lines)


def _disabled_listener(name: str) -> str:
    # The compiled-in defaults declare imaps/pop3s on 993/995; port 0 turns a
    # listener off (it must be overridden by the same name).
    return f"  inet_listener {name} {{\n    port = 0\n  }}"


def render_config(
    *,
    root: Path,
    ports: dict[str, int],
    relay_port: int,
    mail_uid: int,
    mail_gid: int,
    tls_files: tuple[Path, Path] | None,
    debug: bool,
    auth_penalty: bool,
    extra_config: str = "",
    oauth2_args: Path | None = None,
) -> str:
    """The full dovecot.conf text for an instance rooted at `root` (with
    ManageSieve when `ports` has a "sieve" entry)."""
    tls = tls_files is not None
    if tls:
        assert tls_files is not None
        cert, key = tls_files
        ssl_block = f"ssl = yes\nssl_cert = <{cert}\nssl_key = <{key}\nssl_min_protocol = TLSv1.2"
    else:
        ssl_block = "ssl = no"

    imap_listeners = [
        _listener("imap", ports["imap"]),
        _listener("imap_haproxy", ports["imap_haproxy"], haproxy=True),
    ]
    pop3_listeners = [
        _listener("pop3", ports["pop3"]),
        _listener("pop3_haproxy", ports["pop3_haproxy"], haproxy=True),
    ]
    sub_listeners = [
        _listener("submission", ports["submission"]),
        _listener("submission_haproxy", ports["submission_haproxy"], haproxy=True),
    ]
    if tls:
        imap_listeners.append(_listener("imaps", ports["imaps"], tls=True))
        pop3_listeners.append(_listener("pop3s", ports["pop3s"], tls=True))
        sub_listeners.append(_listener("submissions", ports["submissions"], tls=True))
    else:
        imap_listeners.append(_disabled_listener("imaps"))
        pop3_listeners.append(_disabled_listener("pop3s"))

    debug_block = "auth_debug = yes\nmail_debug = yes\n" if debug else ""
    # anvil's auth penalty (2, 4, 8, 15 s per source IP) is NOT lifted by
    # login_trusted_networks in 2.3.19: a good login from 127.0.0.1 right after
    # a bad one waits 4 s.  Auth disables the penalty when it cannot connect to
    # anvil's penalty socket, which `mode = 0` ensures.
    penalty_block = (
        ""
        if auth_penalty
        else "service anvil {\n  unix_listener anvil-auth-penalty {\n    mode = 0\n  }\n}\n"
    )
    # One long-lived login process per protocol, started with the master
    # ("high-performance" mode).  With the default service_count = 1 a fresh
    # login process is forked after every connection, and one that is still
    # reading its settings when SIGTERM arrives blocks shutdown for ~5 s.
    login_tuning = "  service_count = 0\n  process_min_avail = 1"
    nl = "\n"
    protocols = "imap pop3 submission"
    # Without ManageSieve, the package's compiled-in listener on 4190 is
    # switched off all the same: nothing of this instance on a well-known port.
    sieve_block = "service managesieve-login {\n  inet_listener sieve {\n    port = 0\n  }\n}\n"
    if "sieve" in ports:
        # Pigeonhole's ManageSieve; scripts live in the user's home, the
        # active one is the ~/.dovecot.sieve symlink (Debian's default form).
        protocols += " sieve"
        sieve_listeners = [
            _listener("sieve", ports["sieve"]),
            _listener("sieve_haproxy", ports["sieve_haproxy"], haproxy=True),
        ]
        sieve_block = (
            f"service managesieve-login {{\n{login_tuning}\n{nl.join(sieve_listeners)}\n}}\n"
            "plugin {\n  sieve = file:~/sieve;active=~/.dovecot.sieve\n}\n"
        )
    mechanisms = " ".join(AUTH_MECHANISMS)
    oauth2_block = ""
    if oauth2_args is not None:
        mechanisms += " oauthbearer xoauth2"
        # First, and only for the bearer mechanisms: a token is never
        # compared with a password in users.passwd, and a refused one stops here.
        oauth2_block = (
            "passdb {\n  driver = oauth2\n  mechanisms = oauthbearer xoauth2\n"
            f"  args = {oauth2_args}\n  result_failure = return-fail\n}}\n"
        )
    return f"""\
# Written by tests/interop/dovecot.py: self-contained, nothing is included.
protocols = {protocols}
listen = {HOST}
base_dir = {root}/run
state_dir = {root}/state
instance_name = {root.name}

log_path = {root}/log/dovecot.log
info_log_path = {root}/log/dovecot.log
debug_log_path = {root}/log/dovecot.log
log_timestamp = "%Y-%m-%d %H:%M:%S "
auth_verbose = yes
verbose_proctitle = yes
# No stats process connections: at SIGTERM, login processes started moments
# earlier otherwise wait 5 s for a stats-writer handshake that never comes.
stats_writer_socket_path =
{debug_block}
{ssl_block}

hostname = localhost
login_greeting = authgate-test Dovecot ready.
# authgate applies the plaintext policy; Dovecot is reached over loopback only.
disable_plaintext_auth = no
auth_mechanisms = {mechanisms}
# Trusted: IMAP ID x-originating-ip / XCLIENT-style forwarding is honoured.
login_trusted_networks = 127.0.0.0/8 ::1
haproxy_trusted_networks = 127.0.0.0/8
# The gateway enforces failure delays itself; a 2 s backend delay on every
# wrong password would only slow the suite down.
auth_failure_delay = 0

{oauth2_block}passdb {{
  driver = passwd-file
  master = yes
  # pass = yes: the target user must also exist in the normal passdb below.
  pass = yes
  args = scheme=PLAIN {root}/etc/master.passwd
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {root}/etc/users.passwd
}}
userdb {{
  driver = static
  args = uid={mail_uid} gid={mail_gid} home={root}/home/%u
}}
first_valid_uid = 1
first_valid_gid = 1
mail_location = maildir:~/Maildir

submission_host = localhost
submission_relay_host = {HOST}
submission_relay_port = {relay_port}
submission_relay_trusted = yes

{penalty_block}service imap-login {{
{login_tuning}
{nl.join(imap_listeners)}
}}
service pop3-login {{
{login_tuning}
{nl.join(pop3_listeners)}
}}
service submission-login {{
{login_tuning}
{nl.join(sub_listeners)}
}}
{sieve_block}{extra_config}
"""


def _passwd_lines(entries: dict[str, str]) -> str:
    return "".join(f"{user}:{stored}\n" for user, stored in entries.items())


def stored_passwords(users: dict[str, str]) -> dict[str, str]:
    """users.passwd entries: each user's scheme is picked by name prefix.

    `shauser*` -> {SSHA512}, `cramuser*` -> {CRAM-MD5}, anyone else -> {PLAIN}.
    """
    out = {}
    for user, password in users.items():
        if user.startswith("shauser"):
            out[user] = ssha512(password)
        elif user.startswith("cramuser"):
            out[user] = cram_md5_hash(password)
        else:
            out[user] = "{PLAIN}" + password
    return out


# -- start / stop ------------------------------------------------------------


def _dovecot_binary() -> str:
    # /usr/sbin is not on every PATH (e.g. a non-login root shell in CI).
    path = shutil.which(DOVECOT_BIN) or next(
        (p for p in DOVECOT_PATHS if os.access(p, os.X_OK)), None
    )
    if path is None:
        raise DovecotError(f"the dovecot binary is missing: {INSTALL_HINT}")
    if os.geteuid() != 0:
        raise DovecotError(f"Dovecot must be started as root here: {INSTALL_HINT}")
    return path


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


# What each plain listener says first once its login process is up.
_GREETINGS = {
    "imap": b"* OK",
    "pop3": b"+OK",
    "submission": b"220 ",
    "sieve": b'"IMPLEMENTATION"',
}


def _greets(port: int, prefix: bytes) -> bool:
    """True when the listener sends its greeting.

    The master binds every listener before any login process runs, and a login
    process holds its greeting back until it has a connection to auth, so a
    greeting (not just an accepted connect) means logins will be served.
    """
    try:
        with socket.create_connection((HOST, port), timeout=2.0) as sock:
            data = b""
            while b"\n" not in data and len(data) < 4096:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
            return data.startswith(prefix)
    except OSError:
        return False


def _mkdir(path: Path, mode: int, uid: int = 0, gid: int = 0) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, gid)
    path.chmod(mode)
    return path


@contextlib.contextmanager
def start_dovecot(
    *,
    tls: bool = False,
    users: dict[str, str] | None = None,
    master: tuple[str, str] = MASTER_USER,
    mail_user: str = "nobody",
    debug: bool = False,
    auth_penalty: bool = False,
    extra_config: str = "",
    startup_timeout: float = STARTUP_TIMEOUT,
    sieve: bool = False,
    oauth2: OAuth2Passdb | None = None,
) -> Iterator[DovecotInstance]:
    """Run a private Dovecot for the duration of the `with` block.

    `extra_config` is appended to the generated dovecot.conf (later settings
    win), for a test that needs one more knob.  Raises `DovecotError` (with
    Dovecot's console output and log) when it is missing or cannot start.
    """
    binary = _dovecot_binary()
    users = dict(DEFAULT_USERS if users is None else users)
    pw = pwd.getpwnam(mail_user)
    mail_uid, mail_gid = pw.pw_uid, pw.pw_gid
    try:
        dovecot_gid = grp.getgrnam("dovecot").gr_gid
    except KeyError as exc:
        raise DovecotError(f"system group 'dovecot' is missing: {INSTALL_HINT}") from exc

    # Not pytest's tmp_path: that is 0700 root, and the login (dovenull), auth
    # (dovecot) and mail (nobody) processes all need to traverse this tree.
    root = Path(tempfile.mkdtemp(prefix="authgate-dovecot-", dir="/tmp"))
    relay = RelaySink()
    process: subprocess.Popen[bytes] | None = None
    try:
        root.chmod(0o755)
        for sub in ("etc", "log", "state"):
            _mkdir(root / sub, 0o755)
        # base_dir: Dovecot's master fixes up ownership of its own sockets.
        _mkdir(root / "run", 0o755)
        _mkdir(root / "home", 0o755)
        token_users = oauth2.users if oauth2 is not None else ()
        for user in (*users, *token_users):
            home = _mkdir(root / "home" / user, 0o700, mail_uid, mail_gid)
            maildir = _mkdir(home / "Maildir", 0o700, mail_uid, mail_gid)
            for sub in ("cur", "new", "tmp"):
                _mkdir(maildir / sub, 0o700, mail_uid, mail_gid)
            _deliver(maildir, seed_message(user), mail_uid, mail_gid)

        # Readable by the auth process (runs as dovecot), by nobody else.
        for name, entries in (
            ("users.passwd", stored_passwords(users)),
            ("master.passwd", {master[0]: "{PLAIN}" + master[1]}),
        ):
            path = root / "etc" / name
            path.write_text(_passwd_lines(entries))
            os.chown(path, 0, dovecot_gid)
            path.chmod(0o640)
        oauth2_args: Path | None = None
        if oauth2 is not None:
            # Holds the introspection client secret: auth (group dovecot) only.
            oauth2_args = root / "etc" / "oauth2.conf.ext"
            oauth2_args.write_text(oauth2_conf(oauth2))
            os.chown(oauth2_args, 0, dovecot_gid)
            oauth2_args.chmod(0o640)

        port_names = [
            "imap",
            "pop3",
            "submission",
            "imap_haproxy",
            "pop3_haproxy",
            "submission_haproxy",
        ]
        if tls:
            port_names += ["imaps", "pop3s", "submissions"]
        if sieve:
            port_names += ["sieve", "sieve_haproxy"]
        ports: dict[str, int] = {}
        while len(ports) < len(port_names):
            port = free_port()
            if port not in ports.values() and port != relay.port:
                ports[port_names[len(ports)]] = port

        ca_pem: bytes | None = None
        tls_files: tuple[Path, Path] | None = None
        if tls:
            import trustme

            ca = trustme.CA()
            # A subject CN besides the subjectAltName: fetchmail 6.4 with
            # `sslcertck` refuses a certificate whose subject has no CN.
            leaf = ca.issue_cert("localhost", HOST, common_name="localhost")
            cert_path, key_path = root / "etc" / "cert.pem", root / "etc" / "key.pem"
            cert_path.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
            leaf.private_key_pem.write_to_path(str(key_path))
            key_path.chmod(0o600)  # read by the config process, which runs as root
            ca_pem = ca.cert_pem.bytes()
            tls_files = (cert_path, key_path)

        conf_path = root / "etc" / "dovecot.conf"
        conf_path.write_text(
            render_config(
                root=root,
                ports=ports,
                relay_port=relay.port,
                mail_uid=mail_uid,
                mail_gid=mail_gid,
                tls_files=tls_files,
                debug=debug,
                auth_penalty=auth_penalty,
                extra_config=extra_config,
                oauth2_args=oauth2_args,
            )
        )

        relay.start()
        console = (root / "log" / "console.log").open("wb")
        try:
            process = subprocess.Popen(
                [binary, "-F", "-c", str(conf_path)],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            console.close()

        instance = DovecotInstance(
            root=root,
            conf_path=conf_path,
            log_path=root / "log" / "dovecot.log",
            users=users,
            master=master,
            relay=relay,
            mail_uid=mail_uid,
            mail_gid=mail_gid,
            imap=ports["imap"],
            pop3=ports["pop3"],
            submission=ports["submission"],
            imap_haproxy=ports["imap_haproxy"],
            pop3_haproxy=ports["pop3_haproxy"],
            submission_haproxy=ports["submission_haproxy"],
            imaps=ports.get("imaps"),
            pop3s=ports.get("pop3s"),
            submissions=ports.get("submissions"),
            sieve=ports.get("sieve"),
            sieve_haproxy=ports.get("sieve_haproxy"),
            ca_pem=ca_pem,
            process=process,
        )
        _wait_ready(instance, process, startup_timeout)
        yield instance
    finally:
        if process is not None:
            _stop(process)
        relay.stop()
        shutil.rmtree(root, ignore_errors=True)


def _diagnostics(root: Path) -> str:
    parts = []
    for name in ("console.log", "dovecot.log"):
        path = root / "log" / name
        text = path.read_text("utf-8", "replace") if path.exists() else "(none)"
        parts.append(f"--- {name} ---\n{text[-6000:]}")
    return "\n".join(parts)


def _wait_ready(
    instance: DovecotInstance, process: subprocess.Popen[bytes], timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    pending = dict(instance.ports)
    while pending:
        if process.poll() is not None:
            raise DovecotError(
                f"dovecot exited with status {process.returncode} during start-up\n"
                + _diagnostics(instance.root)
            )
        for name, port in list(pending.items()):
            greeting = _GREETINGS.get(name)
            if _greets(port, greeting) if greeting else _accepts(port):
                del pending[name]
        if not pending:
            return
        if time.monotonic() >= deadline:
            raise DovecotError(
                f"dovecot did not listen on {sorted(pending)} within {timeout}s\n"
                + _diagnostics(instance.root)
            )
        time.sleep(0.05)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        # The master did not exit: kill its whole session (it and its children).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(STOP_TIMEOUT)
