"""A real Postfix (Debian 12: 3.7) on loopback for the SMTP tests.

`start_postfix()` writes a self-contained main.cf and master.cf into a fresh
folder under /tmp (`config_directory`, `queue_directory`, `data_directory`,
the mail store and `maillog_file` all live there), runs `postfix check`
(which creates the queue directories with Postfix's own owners and modes),
then `postfix start-fg` in the foreground, waits until every smtpd service
greets, and yields a `PostfixInstance`. `postfix stop` ends it. It needs root
(Postfix's master starts as root and drops to `mail_owner`); without root or
without Postfix it raises `PostfixError` (tests fail, never skip).

What the instance is:

* the defaults a fresh Postfix 3.6+ has (`compatibility_level = 3.6`):
  `smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated,
  defer_unauth_destination`, `mynetworks_style = host`, so `mynetworks` is
  127.0.0.1/32 (and this machine's own addresses) and 127.0.0.9 is outside;
* `smtpd_authorized_xclient_hosts = 127.0.0.1`: authgate may send XCLIENT;
* mail for one@, two@ and three@local.test goes to a Maildir each under
  `mail/` (virtual(8), an `inline:` map: virtual(8) refuses regexp
  substitutions; run as `mail_owner`); other local parts are refused
  (550 5.1.1); nothing is ever sent out (`default_transport = error:`);
* three smtpd services (`ports`): "xclient" (XCLIENT allowed), "noxclient"
  (`smtpd_authorized_xclient_hosts` empty: XCLIENT not offered) and "proxy"
  (`smtpd_upstream_proxy_protocol = haproxy`: a PROXY header first);
* the SMTP session statistics Postfix logs at "disconnect from ..." (ehlo=1
  xclient=0/1 ...) say which commands reached it.

Quirks met with 3.7.11 (handled below): `maillog_file` must match
`maillog_file_prefixes`; `postfix check` reports its errors only to syslog
or a terminal, so a failed start shows the maillog and the output of
`postfix check` run once more; the folder must be traversable by the
`postfix` user (mkdtemp makes it 0700).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from pathlib import Path

from tests.logfile import AppendedLog
from tests.netutil import HOST, free_ports

POSTFIX = "/usr/sbin/postfix"
INSTALL_HINT = "run ./dev test as root to install it (Debian package postfix)"
STARTUP_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0
LOCAL_DOMAIN = "local.test"
MAILBOXES = ("one", "two", "three")  # user@local.test, each a Maildir under mail/
SERVICES = {
    "xclient": "",
    "noxclient": "-o smtpd_authorized_xclient_hosts=",
    "proxy": "-o smtpd_upstream_proxy_protocol=haproxy",
}

# The daemons a delivery to a local Maildir needs (Debian's master.cf,
# nothing chrooted: the paths are ours). postlogd writes maillog_file.
_MASTER_CF = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixError(RuntimeError):
    """Postfix could not be found or started (the message says why)."""


@dataclass
class PostfixInstance(AppendedLog):
    root: Path
    ports: dict[str, int]
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def config_dir(self) -> Path:
        return self.root / "conf"

    @property
    def log_path(self) -> Path:
        return self.root / "maillog"

    def wait_for_log(self, pattern: str, since: int = 0, timeout: float = 15.0) -> re.Match[str]:
        """The first match of `pattern` in the log written after `since`."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.log_text(since))
            if match is not None:
                return match
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"Postfix never logged {pattern!r}; its log since then:\n"
                    f"{self.log_text(since)[-4000:]}"
                )
            time.sleep(0.05)

    def session_stats(self, client: str, since: int = 0, timeout: float = 15.0) -> str:
        """The command counts Postfix logs when `client`'s session ends
        ("ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5")."""
        pattern = rf"disconnect from \S+\[{re.escape(client)}\] (.*)"
        return self.wait_for_log(pattern, since, timeout).group(1)

    def mailbox(self, user: str) -> list[Message]:
        """The messages delivered to user@local.test, oldest first."""
        maildir = self.root / "mail" / user
        files = [p for sub in ("new", "cur") for p in (maildir / sub).glob("*") if p.is_file()]
        return [message_from_bytes(p.read_bytes()) for p in sorted(files)]

    def postconf(self, name: str) -> str:
        result = subprocess.run(
            ["/usr/sbin/postconf", "-c", str(self.config_dir), "-h", name],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
        return result.stdout.strip()

    # ----------------------------------------------------------- lifecycle

    def _postfix(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [POSTFIX, "-c", str(self.config_dir), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self) -> None:
        check = self._postfix("check")
        if check.returncode != 0:
            raise PostfixError(f"postfix check failed:\n{self._diagnosis(check)}")
        output = (self.root / "postfix.out").open("wb")
        self.process = subprocess.Popen(
            [POSTFIX, "-c", str(self.config_dir), "start-fg"],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        output.close()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        waiting = dict(self.ports)
        while waiting:
            for name, port in list(waiting.items()):
                if _greets(port, proxy=name == "proxy"):
                    del waiting[name]
            if not waiting:
                break
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise PostfixError(
                    f"Postfix did not start (services still silent: {sorted(waiting)}):\n"
                    f"{(self.root / 'postfix.out').read_text(errors='replace')[-2000:]}\n"
                    f"{self.log_text()[-3000:]}"
                )
            time.sleep(0.05)

    def _diagnosis(self, result: subprocess.CompletedProcess[str]) -> str:
        return f"{result.stdout}{result.stderr}\n{self.log_text()[-3000:]}".strip()

    def stop(self) -> None:
        if self.process is None:
            return
        self._postfix("stop", timeout=STOP_TIMEOUT)
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT)
        self.process = None


def _greets(port: int, *, proxy: bool) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1) as sock:
            if proxy:
                # A PROXY v1 header (Postfix takes only TCP4/TCP6), then the greeting.
                sock.sendall(f"PROXY TCP4 {HOST} {HOST} 1 {port}\r\n".encode())
            return sock.recv(512).startswith(b"220 ")
    except OSError:
        return False


def _main_cf(root: Path, owner: pwd.struct_passwd) -> str:
    return f"""\
compatibility_level = 3.6
config_directory = {root}/conf
queue_directory = {root}/queue
data_directory = {root}/data
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
mail_owner = {owner.pw_name}
myhostname = postfix.test
mydomain = test
myorigin = $myhostname
mydestination =
inet_interfaces = {HOST}
inet_protocols = ipv4
smtpd_banner = $myhostname ESMTP Postfix
smtpd_authorized_xclient_hosts = {HOST}
# No reverse lookups: the client's name is whatever XCLIENT says (or unknown).
smtpd_peername_lookup = no
smtp_dns_support_level = disabled
alias_maps =
alias_database =
biff = no
readme_directory = no
# Nothing leaves this Postfix: relayed mail would bounce at once.
default_transport = error:tests never relay
relay_transport = error:tests never relay
virtual_mailbox_domains = {LOCAL_DOMAIN}
virtual_mailbox_base = {root}/mail
virtual_mailbox_maps = inline:{{ {", ".join(f"{u}@{LOCAL_DOMAIN}={u}/" for u in MAILBOXES)} }}
virtual_minimum_uid = 1
virtual_uid_maps = static:{owner.pw_uid}
virtual_gid_maps = static:{owner.pw_gid}
"""


@contextlib.contextmanager
def start_postfix() -> Iterator[PostfixInstance]:
    if not os.access(POSTFIX, os.X_OK):
        raise PostfixError(f"{POSTFIX} not found: {INSTALL_HINT}")
    if os.geteuid() != 0:
        raise PostfixError("Postfix's master must start as root: run the tests as root")
    try:
        owner = pwd.getpwnam("postfix")
    except KeyError:
        raise PostfixError(f"no 'postfix' user: {INSTALL_HINT}") from None
    root = Path(tempfile.mkdtemp(prefix="authgate-postfix-"))
    root.chmod(0o755)  # the daemons run as mail_owner and chdir into the queue
    ports = dict(zip(SERVICES, free_ports(len(SERVICES)), strict=True))
    instance = PostfixInstance(root=root, ports=ports)
    try:
        (root / "conf").mkdir()
        (root / "queue").mkdir()  # `postfix check` makes what is inside
        for name in ("data", "mail"):
            (root / name).mkdir()
            os.chown(root / name, owner.pw_uid, owner.pw_gid)
        (root / "conf" / "main.cf").write_text(_main_cf(root, owner))
        services = "".join(
            f"{HOST}:{ports[name]} inet n - n - - smtpd {options}\n"
            for name, options in SERVICES.items()
        )
        (root / "conf" / "master.cf").write_text(services + _MASTER_CF)
        instance.start()
        yield instance
    finally:
        instance.stop()
        shutil.rmtree(root, ignore_errors=True)
