"""A real OpenLDAP slapd (Debian 12: 2.5.13) on loopback for the directory tests.

`start_slapd()` writes a throw-away `slapd.conf` (still supported by 2.5 with
`-f`; no cn=config database is needed for a test server), loads the suffix
`dc=example,dc=org` with `slapadd` while the server is down, then runs
`slapd -d stats` in the foreground on two ephemeral 127.0.0.1 ports: one
`ldap://` (StartTLS offered) and one `ldaps://`.  The certificate comes from
a trustme CA made for this instance; `ca_file` is its PEM.  Stopping sends
SIGTERM and removes the directory.

Choices that the tests depend on:

* `allow bind_anon_dn`: the server accepts an "unauthenticated bind" (a DN
  with an empty password, RFC 4513 section 5.1.2) as an anonymous bind, as
  many real servers do.  That makes the hole the client must close
  observable: a naive client would see such a bind succeed.
* `ou=people` is readable by authenticated users only (the search service
  account, `cn=search`); `ou=staff` is readable anonymously.  So a search
  without the service bind finds nobody under `ou=people`.
* `uid=twin` exists twice (`ou=people` and `ou=staff`): a subtree search from
  the suffix finds two entries.
* One user's uid holds DN-special characters (`o'hara, jr+#1`), so a DN
  template that forgets RFC 4514 escaping fails to log them in.
* `-d stats` logs every connection (`ACCEPT`), bind (`BIND dn=...`) and
  search (`SRCH base=...`) with its `conn=N`; `connections()`, `binds()` and
  `operations()` read them back.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import trustme

from tests.logfile import AppendedLog
from tests.netutil import free_ports

HOST = "127.0.0.1"
SUFFIX = "dc=example,dc=org"
PEOPLE = f"ou=people,{SUFFIX}"
STAFF = f"ou=staff,{SUFFIX}"
ROOT_DN = f"cn=admin,{SUFFIX}"
SERVICE_DN = f"cn=search,{SUFFIX}"
SERVICE_PASSWORD = "search-Secret-0"
SPECIAL_UID = "o'hara, jr+#1"

SLAPD_PATHS = ("/usr/sbin/slapd", "/usr/local/sbin/slapd", "/usr/local/libexec/slapd")
SLAPADD_PATHS = ("/usr/sbin/slapadd", "/usr/local/sbin/slapadd")
MODULE_PATHS = (
    "/usr/lib/ldap",
    "/usr/lib/x86_64-linux-gnu/ldap",
    "/usr/lib/aarch64-linux-gnu/ldap",
)
SCHEMA_PATHS = ("/etc/ldap/schema", "/etc/openldap/schema", "/usr/local/etc/openldap/schema")
INSTALL_HINT = "run ./dev test as root to install slapd (Debian package slapd)"

# uid -> (ou, password).  Passwords differ so a mix-up shows as a failure.
DEFAULT_USERS: dict[str, tuple[str, str]] = {
    "alice": ("people", "alice-Secret-1"),
    "bob": ("people", "bob-Secret-2"),
    SPECIAL_UID: ("people", "ohara-Secret-3"),
    "carol": ("staff", "carol-Secret-4"),
    "twin": ("people", "twin-Secret-5"),
}
# The second `twin`, same password: only the entry count tells them apart.
TWIN_STAFF_PASSWORD = DEFAULT_USERS["twin"][1]

STARTUP_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0


class SlapdError(RuntimeError):
    """slapd could not be set up or started (the message carries its log)."""


def ssha(password: str, salt: bytes | None = None) -> str:
    """`{SSHA}`: base64(SHA-1(password + salt) + salt), as slapd verifies it."""
    salt = secrets.token_bytes(8) if salt is None else salt
    digest = hashlib.sha1(password.encode("utf-8") + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode("ascii")


def escape_rdn_value(value: str) -> str:
    """RFC 4514 section 2.4 escaping, for building the fixture's own LDIF
    (independent of the code under test)."""
    out = []
    for i, ch in enumerate(value):
        if ch in '"+,;<>\\=' or (i == 0 and ch in " #") or (i == len(value) - 1 and ch == " "):
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def user_dn(uid: str, ou: str = "people") -> str:
    return f"uid={escape_rdn_value(uid)},ou={ou},{SUFFIX}"


def _find(candidates: tuple[str, ...], what: str) -> str:
    for path in candidates:
        if os.path.exists(path):
            return path
    found = shutil.which(os.path.basename(candidates[0]))
    if found:
        return found
    raise SlapdError(f"{what} not found ({', '.join(candidates)}): {INSTALL_HINT}")


@dataclass
class SlapdInstance(AppendedLog):
    """A running slapd: where it listens, who can bind, and its log."""

    root: Path
    ldap_port: int
    ldaps_port: int
    ca_file: Path
    users: dict[str, tuple[str, str]]
    log_path: Path
    conf_path: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    # A third listener that expects a PROXY header first (slapd 2.5's
    # pldap://), for authgate's client_address = "proxy-v2"; 0: none.
    proxied_port: int = 0

    # -- addresses

    @property
    def ldap_url(self) -> str:
        return f"ldap://{HOST}:{self.ldap_port}"

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://{HOST}:{self.ldaps_port}"

    def password(self, uid: str) -> str:
        return self.users[uid][1]

    def dn(self, uid: str) -> str:
        return user_dn(uid, self.users[uid][0])

    # -- the log (log_size, log_text: AppendedLog)

    def wait_for_log(self, pattern: str, since: int = 0, timeout: float = 5.0) -> re.Match[str]:
        """slapd writes its log a moment after answering: wait for a line."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern, re.MULTILINE)
        while True:
            match = regex.search(self.log_text(since))
            if match:
                return match
            if time.monotonic() > deadline:
                tail = self.log_text(since)[-3000:]
                raise AssertionError(f"slapd log has no {pattern!r} after {timeout}s:\n{tail}")
            time.sleep(0.02)

    def connections(self, since: int = 0) -> int:
        """How many TCP connections slapd accepted since the mark."""
        return len(re.findall(r"\bACCEPT from IP=", self.log_text(since)))

    def binds(self, since: int = 0) -> list[str]:
        """The DNs of the BIND operations since the mark (as slapd logs them)."""
        return re.findall(r'\bBIND dn="([^"]*)" method=', self.log_text(since))

    def operations(self, since: int = 0) -> list[tuple[int, str, str]]:
        """(conn, "BIND" | "SRCH", dn or base) in log order since the mark."""
        result: list[tuple[int, str, str]] = []
        for match in re.finditer(
            r'conn=(\d+) op=\d+ (BIND dn|SRCH base)="([^"]*)" (?:method|scope)=',
            self.log_text(since),
        ):
            result.append((int(match[1]), match[2].split()[0], match[3]))
        return result

    # -- life cycle

    def start(self) -> None:
        slapd = _find(SLAPD_PATHS, "slapd")
        urls = f"{self.ldap_url}/ {self.ldaps_url}/"
        if self.proxied_port:
            urls += f" pldap://{HOST}:{self.proxied_port}/"
        log = self.log_path.open("ab")
        try:
            # -d stats: stay in the foreground and log connections and
            # operations to stderr.  Running as whoever we are (root in
            # `./dev test`, but nothing here needs it).
            self.process = subprocess.Popen(
                [slapd, "-d", "stats", "-f", str(self.conf_path), "-h", urls],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        pending = {self.ldap_port, self.ldaps_port} | ({self.proxied_port} - {0})
        while pending:
            if self.process.poll() is not None:
                raise SlapdError(
                    f"slapd exited with status {self.process.returncode}:\n{self.log_text()[-4000:]}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise SlapdError(f"slapd did not listen within {STARTUP_TIMEOUT}s")
            for port in list(pending):
                with contextlib.suppress(OSError), socket.create_connection((HOST, port), 0.2):
                    pending.discard(port)
            if pending:
                time.sleep(0.05)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)

    def restart(self) -> None:
        """Stop and start again on the same ports (established connections die)."""
        self.stop()
        self.start()


def _ldif(
    users: dict[str, tuple[str, str]], attributes: dict[str, dict[str, str]] | None = None
) -> str:
    entries = [
        f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example\n",
        f"dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people\n",
        f"dn: {STAFF}\nobjectClass: organizationalUnit\nou: staff\n",
        f"dn: {SERVICE_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\n"
        f"cn: search\nuserPassword: {ssha(SERVICE_PASSWORD)}\n",
    ]
    pairs = [(uid, ou, pw) for uid, (ou, pw) in users.items()]
    if users.get("twin", ("", ""))[0] == "people":
        pairs.append(("twin", "staff", TWIN_STAFF_PASSWORD))
    for uid, ou, password in pairs:
        # Values that are not plain ASCII-safe go base64 (RFC 2849 "::").
        uid_b64 = base64.b64encode(uid.encode("utf-8")).decode("ascii")
        dn_b64 = base64.b64encode(user_dn(uid, ou).encode("utf-8")).decode("ascii")
        more = "".join(f"{k}: {v}\n" for k, v in (attributes or {}).get(uid, {}).items())
        entries.append(
            f"dn:: {dn_b64}\nobjectClass: inetOrgPerson\nuid:: {uid_b64}\n"
            f"cn:: {uid_b64}\nsn: User\nuserPassword: {ssha(password)}\n{more}"
        )
    return "\n".join(entries)


def _config(root: Path, modules: str, schema: str, root_password: str) -> str:
    return f"""\
# authgate test slapd: loopback only, thrown away after the run.
include {schema}/core.schema
include {schema}/cosine.schema
include {schema}/inetorgperson.schema
modulepath {modules}
moduleload back_mdb
pidfile {root}/slapd.pid
argsfile {root}/slapd.args

TLSCACertificateFile {root}/ca.pem
TLSCertificateFile {root}/server.pem
TLSCertificateKeyFile {root}/server.key

# Accept "unauthenticated binds" (DN + empty password) as anonymous, as
# permissive servers do (RFC 4513 section 5.1.2): the client must refuse them.
allow bind_anon_dn

database mdb
maxsize 16777216
suffix "{SUFFIX}"
rootdn "{ROOT_DN}"
rootpw {ssha(root_password)}
directory {root}/data

access to attrs=userPassword
    by anonymous auth
    by self read
    by * none
access to dn.subtree="{PEOPLE}"
    by users read
    by * none
access to *
    by * read
"""


@contextlib.contextmanager
def start_slapd(
    users: dict[str, tuple[str, str]] | None = None,
    *,
    proxied: bool = False,
    attributes: dict[str, dict[str, str]] | None = None,
) -> Iterator[SlapdInstance]:
    """A running slapd on ephemeral loopback ports; stopped and removed on exit.
    `proxied`: also a pldap:// listener (PROXY header first) on `proxied_port`.
    `attributes`: more inetOrgPerson attributes per user ({"bob": {"departmentNumber": "x"}})."""
    slapd = _find(SLAPD_PATHS, "slapd")
    slapadd = _find(SLAPADD_PATHS, "slapadd")
    del slapd
    modules = _find(MODULE_PATHS, "the slapd module directory")
    schema = _find(SCHEMA_PATHS, "the OpenLDAP schema directory")
    users = dict(DEFAULT_USERS if users is None else users)
    root = Path(tempfile.mkdtemp(prefix="authgate-slapd-"))
    instance: SlapdInstance | None = None
    try:
        (root / "data").mkdir()
        ca = trustme.CA()
        cert = ca.issue_cert(HOST, "localhost")
        ca.cert_pem.write_to_path(str(root / "ca.pem"))
        cert.private_key_pem.write_to_path(str(root / "server.key"))
        cert.cert_chain_pems[0].write_to_path(str(root / "server.pem"))
        for extra in cert.cert_chain_pems[1:]:
            extra.write_to_path(str(root / "server.pem"), append=True)
        conf = root / "slapd.conf"
        conf.write_text(_config(root, modules, schema, secrets.token_urlsafe(16)))
        ldif = root / "data.ldif"
        ldif.write_text(_ldif(users, attributes), encoding="utf-8")
        loaded = subprocess.run(
            [slapadd, "-f", str(conf), "-l", str(ldif)],
            capture_output=True,
            text=True,
            check=False,
        )
        if loaded.returncode != 0:
            raise SlapdError(f"slapadd failed ({loaded.returncode}):\n{loaded.stderr[-4000:]}")
        for attempt in range(5):
            ldap_port, ldaps_port, proxied_port = free_ports(3)
            instance = SlapdInstance(
                root=root,
                ldap_port=ldap_port,
                ldaps_port=ldaps_port,
                ca_file=root / "ca.pem",
                users=users,
                log_path=root / "slapd.log",
                conf_path=conf,
                proxied_port=proxied_port if proxied else 0,
            )
            try:
                instance.start()
                break
            except SlapdError:
                # Another process took one of the ports between probe and bind.
                if attempt == 4 or "Address already in use" not in instance.log_text():
                    raise
        assert instance is not None
        yield instance
    finally:
        if instance is not None:
            instance.stop()
        shutil.rmtree(root, ignore_errors=True)
