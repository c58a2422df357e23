"""A real Dovecot on loopback, tuned as a benchmark backend.

`BenchDovecot` writes a self-contained dovecot.conf (nothing read from
/etc/dovecot) under a scratch folder, delivers the bench user's messages into
a Maildir, runs `dovecot -F -c <conf>` in the foreground (pinned to the CPUs
given) and can restart it, so that a memory reading starts from fresh
processes. It needs root: the master drops to `dovenull` for the login
processes, `dovecot` for auth and the mail user (`nobody`) for imap, so the
tree is created with the owners those processes need.

Unlike tests/interop/dovecot.py (which exercises every protocol and
mechanism), this one serves IMAP (cleartext and IMAPS) and cleartext POP3
only, and is set up so that Dovecot is not what limits a proxy in front of it:

* `{PLAIN}` passwords in a passwd-file: a login costs no hashing;
* login processes in "high-performance" mode (`service_count = 0`): one
  long-lived imap-login process accepts every connection instead of a fork
  per connection; `process_min_avail = 1` since the servers share one core;
* imap processes reused too (`service imap { service_count = 0 }`, a few
  kept ready; pop3 the same way): still one session per process at a time,
  but a login no longer pays for a fork, an exec and a settings fetch. All users share one
  uid (static userdb), which is what makes reuse possible. Measured on the
  bench machine: 8.5 ms of Dovecot CPU per login without, 1.2-1.4 ms with;
* limits raised for 2,000+ held sessions: every IMAP session is an imap
  process of its own (`service imap { client_limit = 1 }`, the default;
  `restart(imap_client_limit=...)` changes it, see there), and the
  connections all log in as one user, so `mail_max_userip_connections`
  (10 by default) must go too;
* no stats-writer connections (`stats_writer_socket_path =`), no auth
  penalty (anvil's penalty socket `mode = 0`: auth skips the penalty when it
  cannot connect) and `auth_failure_delay = 0`;
* a master user (`master = yes`, `pass = yes`) for authgate's SASL PLAIN
  login with an authzid, and `auth_master_user_separator = *` so that a
  proxy which only knows IMAP LOGIN (nginx) can log in as `user*master`.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
DOVECOT_PATHS = ("/usr/sbin/dovecot", "/usr/local/sbin/dovecot")
INSTALL_HINT = "apt-get install dovecot-core dovecot-imapd dovecot-pop3d (as root)"
STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
# Held sessions this Dovecot must take at once: the memory figure holds 2,000
# through one target while the others sit idle; room for twice that.
MAX_SESSIONS = 5000
# POP3 sessions at once: the POP3 logins/s figure's clients (32 by default).
POP3_SESSIONS = 1000

_BARE_LF = re.compile(rb"(?<!\r)\n")


class DovecotError(RuntimeError):
    """Dovecot could not be set up or started (the message carries its log)."""


def dovecot_binary() -> str:
    path = shutil.which("dovecot") or next(
        (p for p in DOVECOT_PATHS if os.access(p, os.X_OK)), None
    )
    if path is None:
        raise DovecotError(f"the dovecot binary is missing: {INSTALL_HINT}")
    if os.geteuid() != 0:
        raise DovecotError("Dovecot must be started as root (it drops privileges itself)")
    return path


def dovecot_version() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            [dovecot_binary(), "--version"], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "unknown"
    return "unknown"


def free_ports(count: int, taken: Iterable[int] = ()) -> list[int]:
    """`count` distinct TCP ports on 127.0.0.1 that nobody listens on now."""
    ports: list[int] = []
    avoid = set(taken)
    while len(ports) < count:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port: int = sock.getsockname()[1]
        if port not in avoid:
            avoid.add(port)
            ports.append(port)
    return ports


def greets(port: int, prefix: bytes = b"* OK", timeout: float = 2.0) -> bool:
    """True once a listener on `port` sends a greeting starting with `prefix`.

    Dovecot's master binds the listeners before any login process runs, and a
    login process holds its greeting back until it is connected to auth: a
    greeting, not an accepted connect, means logins will be served."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            data = b""
            while b"\n" not in data and len(data) < 4096:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
            return data.startswith(prefix)
    except OSError:
        return False


def accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def pin(cpus: set[int] | None) -> None:
    """preexec_fn: run the child (and everything it forks) on `cpus`."""
    if cpus:
        os.sched_setaffinity(0, cpus)


def spawn(
    argv: Sequence[str],
    log: Path,
    cpus: set[int] | None,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a server in a session of its own (so `stop_session` reaches its
    children), pinned to `cpus`, its output appended to `log`; `env`: the
    whole environment (default: this process's)."""
    with log.open("ab") as out:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=None if env is None else dict(env),
            start_new_session=True,
            preexec_fn=lambda: pin(cpus),
        )


def wait_ready(
    process: subprocess.Popen[bytes], ready: Callable[[], bool], timeout: float
) -> str | None:
    """Poll `ready` until it holds (None) or the server exits or `timeout`
    passes (the reason, e.g. "exited with status 89")."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            return f"exited with status {process.returncode}"
        if time.monotonic() > deadline:
            return f"did not listen within {timeout}s"
        time.sleep(0.05)
    return None


def stop_session(process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM, then SIGKILL for the whole session after `timeout`; a
    straggler of the session must not keep a port either."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def _mkdir(path: Path, mode: int, uid: int = 0, gid: int = 0) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, gid)
    path.chmod(mode)
    return path


@dataclass
class BenchDovecot:
    """One private Dovecot: IMAP on `imap`, IMAPS on `imaps`, `users` with
    {PLAIN} passwords, `master` = (user, password)."""

    root: Path
    users: dict[str, str]
    master: tuple[str, str]
    cert: Path
    key: Path
    cpus: set[int] | None = None
    mail_user: str = "nobody"
    # Sessions one imap process serves at once. 1 is Dovecot's default and
    # what its documentation recommends (a process blocked on disk I/O would
    # stall every session it serves); see `restart`.
    imap_client_limit: int = 1
    imap: int = 0
    imaps: int = 0
    pop3: int = 0
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def conf_path(self) -> Path:
        return self.root / "etc" / "dovecot.conf"

    @property
    def log_path(self) -> Path:
        return self.root / "log" / "dovecot.log"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("Dovecot is not running")
        return self.process.pid

    def maildir(self, user: str) -> Path:
        return self.root / "home" / user / "Maildir"

    # -- set-up ---------------------------------------------------------------

    def prepare(self, messages: dict[str, Sequence[bytes]]) -> None:
        """Folders, password files, Maildirs with `messages` (in order) and the
        config. Call once, before `start`."""
        uid, gid = self._mail_ids()
        dovecot_gid = _group_id("dovecot")
        _mkdir(self.root, 0o755)
        for sub in ("etc", "log", "state", "run", "home"):
            _mkdir(self.root / sub, 0o755)
        for user in self.users:
            home = _mkdir(self.root / "home" / user, 0o700, uid, gid)
            maildir = _mkdir(home / "Maildir", 0o700, uid, gid)
            for sub in ("cur", "new", "tmp"):
                _mkdir(maildir / sub, 0o700, uid, gid)
            for number, message in enumerate(messages.get(user, ()), start=1):
                _deliver(maildir, message, number, uid, gid)
        # Readable by the auth process (group dovecot), by nobody else.
        for name, entries in (
            ("users.passwd", self.users),
            ("master.passwd", {self.master[0]: self.master[1]}),
        ):
            path = self.root / "etc" / name
            path.write_text("".join(f"{u}:{{PLAIN}}{p}\n" for u, p in entries.items()))
            os.chown(path, 0, dovecot_gid)
            path.chmod(0o640)
        if not self.imap:
            self.imap, self.imaps, self.pop3 = free_ports(3)
        self.conf_path.write_text(self.render())

    def _mail_ids(self) -> tuple[int, int]:
        pw = pwd.getpwnam(self.mail_user)
        return pw.pw_uid, pw.pw_gid

    def render(self) -> str:
        uid, gid = self._mail_ids()
        root = self.root
        return f"""\
# Written by bench/dovecot.py: self-contained, nothing is included.
protocols = imap pop3
listen = {HOST}
base_dir = {root}/run
state_dir = {root}/state
instance_name = bench-{root.name}
log_path = {root}/log/dovecot.log
info_log_path = {root}/log/dovecot.log
log_timestamp = "%Y-%m-%d %H:%M:%S "
stats_writer_socket_path =

ssl = yes
ssl_cert = <{self.cert}
ssl_key = <{self.key}
ssl_min_protocol = TLSv1.2

hostname = localhost
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_master_user_separator = *
auth_failure_delay = 0

passdb {{
  driver = passwd-file
  master = yes
  pass = yes
  args = scheme=PLAIN {root}/etc/master.passwd
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {root}/etc/users.passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={root}/home/%u
}}
first_valid_uid = 1
first_valid_gid = 1
mail_location = maildir:~/Maildir
mail_fsync = never

default_process_limit = {MAX_SESSIONS}
default_client_limit = {MAX_SESSIONS * 4}
default_vsz_limit = 1G
protocol imap {{
  mail_max_userip_connections = {MAX_SESSIONS * 2}
}}
protocol pop3 {{
  mail_max_userip_connections = {MAX_SESSIONS * 2}
}}

service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service imap-login {{
  service_count = 0
  process_min_avail = 1
  client_limit = {MAX_SESSIONS * 2}
  inet_listener imap {{
    address = {HOST}
    port = {self.imap}
  }}
  inet_listener imaps {{
    address = {HOST}
    port = {self.imaps}
    ssl = yes
  }}
}}
service imap {{
  process_limit = {MAX_SESSIONS}
  client_limit = {self.imap_client_limit}
  service_count = 0
  process_min_avail = 4
}}
# POP3 serves logins only (no held sessions): small process limits, so that
# auth's client_limit (default_client_limit) still covers every process that
# may connect to it, and Dovecot does not warn.
service pop3-login {{
  service_count = 0
  process_min_avail = 1
  process_limit = 4
  client_limit = {MAX_SESSIONS * 2}
  inet_listener pop3 {{
    address = {HOST}
    port = {self.pop3}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
service pop3 {{
  process_limit = {POP3_SESSIONS}
  service_count = 0
  process_min_avail = 4
}}
"""

    # -- run --------------------------------------------------------------------

    def start(self, timeout: float = STARTUP_TIMEOUT) -> None:
        argv = [dovecot_binary(), "-F", "-c", str(self.conf_path)]
        self.process = spawn(argv, self.root / "log" / "console.log", self.cpus)
        problem = wait_ready(
            self.process,
            lambda: greets(self.imap) and accepts(self.imaps) and greets(self.pop3, b"+OK"),
            timeout,
        )
        if problem is not None:
            self.stop()
            raise DovecotError(f"dovecot {problem}\n" + self.diagnostics())

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            stop_session(process)

    def restart(self, imap_client_limit: int | None = None) -> None:
        """Stop and start again: fresh processes, none idle. With
        `imap_client_limit`, from then on one imap process serves that many
        sessions at once.

        Why a benchmark wants more than 1 at times: idle imap processes all
        wait on the one listening socket and, evidently, each new session
        wakes them all (a thundering herd): after 2,000 held sessions were
        released, about 1,100 of the 2,000 idle imap processes pinned to one
        CPU were runnable at once and the load average passed 1,000. Holding
        2,000 sessions through a proxy with 100 sessions per imap process
        needs 20 processes instead, and no fork per session."""
        if imap_client_limit is not None and imap_client_limit != self.imap_client_limit:
            self.imap_client_limit = imap_client_limit
            self.conf_path.write_text(self.render())
        self.stop()
        self.start()

    def diagnostics(self) -> str:
        parts = []
        for path in (self.root / "log" / "console.log", self.log_path):
            text = path.read_text("utf-8", "replace") if path.exists() else "(none)"
            parts.append(f"--- {path.name} ---\n{text[-4000:]}")
        return "\n".join(parts)

    def warnings(self) -> list[str]:
        """Warning/Error/Fatal lines of the log (config limits Dovecot disliked)."""
        if not self.log_path.exists():
            return []
        lines = self.log_path.read_text("utf-8", "replace").splitlines()
        # A restart (between memory readings) logs "Killed with signal 15".
        return [
            x
            for x in lines
            if re.search(r"\b(Warning|Error|Fatal|Panic):", x) and "Killed with signal" not in x
        ]


def _group_id(name: str) -> int:
    import grp

    try:
        return grp.getgrnam(name).gr_gid
    except KeyError as exc:
        raise DovecotError(f"system group {name!r} is missing: {INSTALL_HINT}") from exc


def _deliver(maildir: Path, message: bytes, number: int, uid: int, gid: int) -> None:
    """Into new/ the maildir(5) way (tmp/, then rename), owned by the mail user,
    with CRLF line ends so that RFC822.SIZE is the file's size. The names sort
    in delivery order, so message `number` gets sequence number `number`."""
    name = f"{int(time.time())}.M{number:06d}P{os.getpid()}.bench"
    tmp = maildir / "tmp" / name
    tmp.write_bytes(_BARE_LF.sub(b"\r\n", message))
    os.chown(tmp, uid, gid)
    tmp.chmod(0o600)
    tmp.rename(maildir / "new" / name)
