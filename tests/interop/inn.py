"""A real INN 2.7 news server (Debian `inn2`) on loopback, for the NNTP
interop tests.

Only the reader side runs: INN's `nnrpd` in daemon mode (`-D -f`) on a high
port, with its own `inn.conf` (named by the INNCONF environment variable),
`readers.conf`, active file, history, overview and tradspool articles under
one temporary directory. The spool is built without innd: the article file
is written into the tradspool tree and `makehistory -O` builds the history
and the overview from it, so nnrpd serves `local.test` with one article.

readers.conf authenticates AUTHINFO USER/PASS with `ckpasswd -f` against a
crypt(3) password file holding two accounts: the reader (relay mode: the
reader's own password reaches INN) and one proxy account (terminate mode:
authgate verifies the reader itself and logs in to INN as that account).

AUTHINFO SASL goes to Cyrus SASL, configured through SASL_CONF_PATH: our
own `INN.conf` (nnrpd's SASL application name) with a sasldb holding the
reader with the same password. readers.conf's first auth group, which
matches every host and only names a default user, gives nnrpd an auth
group to grant access from once a SASL login has set the user (without it
a SASL login succeeds and every group is then "502 Read access denied");
the access group lists the real accounts only, so that default user reads
nothing before a login.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from passlib.hash import sha512_crypt

from tests.netutil import HOST, free_port

INN_BIN = Path("/usr/lib/news/bin")
NNRPD = INN_BIN / "nnrpd"
MAKEHISTORY = INN_BIN / "makehistory"
SASLPASSWD2 = Path("/usr/sbin/saslpasswd2")
SASL_MECHANISMS = "PLAIN LOGIN CRAM-MD5 SCRAM-SHA-1 SCRAM-SHA-256"

GROUP = "local.test"
MESSAGE_ID = "<hello-through-authgate@authgate.test>"
SUBJECT = "Hello through authgate"
BODY = "An article read through authgate."
READER = ("reader", "reader-News-pw1")
PROXY = ("authgate-proxy", "proxy-News-pw1")

_ARTICLE = f"""Path: authgate.test!not-for-mail
From: reader@authgate.test
Newsgroups: {GROUP}
Subject: {SUBJECT}
Date: Wed, 02 Dec 2026 12:00:00 +0000
Message-ID: {MESSAGE_ID}
Xref: authgate.test {GROUP}:1

{BODY}
"""

# inn.conf keys that name directories: all of them under our temp dir.
_PATHS = {
    "pathetc": "etc",
    "pathdb": "db",
    "pathspool": "spool",
    "patharticles": "spool/articles",
    "pathoverview": "spool/overview",
    "pathtmp": "tmp",
    "pathincoming": "tmp",
    "pathoutgoing": "tmp",
    "patharchive": "tmp",
    "pathlog": "log",
    "pathrun": "run",
    "pathhttp": "http",
}


class InnMissing(AssertionError):
    """INN is not installed or did not start: the tests fail (never skip)."""


@dataclass
class InnInstance:
    root: Path
    port: int
    process: subprocess.Popen[bytes] = field(repr=False)

    @property
    def address(self) -> tuple[str, int]:
        return (HOST, self.port)

    def log_text(self) -> str:
        parts = []
        for path in [*sorted((self.root / "log").glob("*")), self.root / "nnrpd.out"]:
            if path.is_file():
                parts.append(f"== {path.name}\n" + path.read_text("utf-8", "replace")[-4000:])
        return "\n".join(parts)


def _inn_conf(root: Path, tls: bool) -> str:
    lines = []
    for line in Path("/etc/news/inn.conf").read_text().splitlines():
        key = line.partition(":")[0].strip()
        if key in _PATHS or key in ("domain", "port", "bindaddress", "pathhost"):
            continue
        lines.append(line)
    lines += [f"{key}: {root / sub}" for key, sub in _PATHS.items()]
    lines += ["domain: authgate.test", "pathhost: inn.authgate.test"]
    if tls:
        # nnrpd's STARTTLS (RFC 4642): authgate's backend connection uses it.
        lines += [f"tlscertfile: {root / 'etc/cert.pem'}", f"tlskeyfile: {root / 'etc/key.pem'}"]
    return "\n".join(lines) + "\n"


def _crypt(password: str) -> str:
    # 5000 rounds (the crypt(3) default), not passlib's 656000: ckpasswd
    # runs once per login and the tests log in often.
    return str(sha512_crypt.using(rounds=5000).hash(password))


def _build(root: Path, tls_files: tuple[Path, Path] | None) -> None:
    for sub in ("etc", "db", "spool/articles/local/test", "spool/overview", "tmp", "log",
                "run", "http"):  # fmt: skip
        (root / sub).mkdir(parents=True, exist_ok=True)
    etc = root / "etc"
    (etc / "inn.conf").write_text(_inn_conf(root, tls_files is not None))
    if tls_files is not None:
        cert, key = tls_files
        shutil.copyfile(cert, etc / "cert.pem")
        shutil.copyfile(key, etc / "key.pem")
        (etc / "key.pem").chmod(0o600)
    (etc / "storage.conf").write_text("method tradspool {\n    newsgroups: *\n    class: 0\n}\n")
    (etc / "passwd").write_text(
        "".join(f"{user}:{_crypt(password)}\n" for user, password in (READER, PROXY))
    )
    (etc / "readers.conf").write_text(
        f"""auth "anyone" {{
    hosts: "*"
    default: "<unauthenticated>"
}}
auth "accounts" {{
    hosts: "*"
    auth: "ckpasswd -f {etc / "passwd"}"
}}
access "accounts" {{
    users: "{READER[0]}, {PROXY[0]}"
    newsgroups: "*"
    access: R
}}
"""
    )
    sasl = root / "sasl"
    sasl.mkdir()
    (sasl / "INN.conf").write_text(
        "pwcheck_method: auxprop\nauxprop_plugin: sasldb\n"
        f"sasldb_path: {sasl / 'sasldb2'}\nmech_list: {SASL_MECHANISMS}\n"
    )
    made = subprocess.run(
        [str(SASLPASSWD2), "-f", str(sasl / "sasldb2"), "-a", "INN", "-c", "-p", READER[0]],
        input=READER[1].encode(),
        capture_output=True,
        timeout=30,
    )
    if made.returncode != 0:
        raise InnMissing(f"saslpasswd2 failed: {made.stderr.decode('utf-8', 'replace')}")
    (root / "db" / "active").write_text(f"{GROUP} 0000000001 0000000001 y\n")
    (root / "db" / "active.times").write_text("")
    (root / "db" / "newsgroups").write_text(f"{GROUP}\tauthgate's test group\n")
    (root / "spool/articles/local/test/1").write_text(_ARTICLE)
    # INN's programs run as user news when started as root: the tree is theirs.
    for directory, _, files in os.walk(root):
        for name in [directory, *(os.path.join(directory, f) for f in files)]:
            shutil.chown(name, "news", "news")
    env = {**os.environ, "INNCONF": str(etc / "inn.conf")}
    done = subprocess.run(
        [str(MAKEHISTORY), "-O", "-s", "100"], env=env, capture_output=True, timeout=60
    )
    if done.returncode != 0:
        raise InnMissing(f"makehistory failed: {done.stderr.decode('utf-8', 'replace')}")


def _wait_for_greeting(port: int, process: subprocess.Popen[bytes], deadline: float) -> None:
    last = ""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise InnMissing(f"nnrpd exited with status {process.returncode}")
        try:
            with socket.create_connection((HOST, port), timeout=2) as sock:
                greeting = sock.makefile("rb").readline()
                if greeting.startswith((b"200", b"201")):
                    sock.sendall(b"QUIT\r\n")
                    return
                last = greeting.decode("utf-8", "replace")
        except OSError as exc:
            last = str(exc)
        time.sleep(0.05)
    raise InnMissing(f"nnrpd did not greet on port {port}: {last}")


@contextlib.contextmanager
def start_inn(tls_files: tuple[Path, Path] | None = None) -> Iterator[InnInstance]:
    """nnrpd serving `local.test` (one article) on a loopback port; with
    `tls_files` (certificate chain, key), offering STARTTLS with them."""
    if not NNRPD.exists() or not MAKEHISTORY.exists():
        raise InnMissing("INN is not installed: apt-get install inn2 (./dev test does)")
    if not SASLPASSWD2.exists():
        raise InnMissing("saslpasswd2 is missing: apt-get install sasl2-bin (./dev test does)")
    root = Path(tempfile.mkdtemp(prefix="authgate-inn-"))
    root.chmod(0o755)  # nnrpd may drop to user news: it must reach its files
    process: subprocess.Popen[bytes] | None = None
    try:
        _build(root, tls_files)
        port = free_port()
        env = {
            **os.environ,
            "INNCONF": str(root / "etc" / "inn.conf"),
            "SASL_CONF_PATH": str(root / "sasl"),
        }
        with (root / "nnrpd.out").open("wb") as out:
            # -D: daemon (listens, forks a child per connection); -f: stay
            # in the foreground, so this process is the one we stop.
            process = subprocess.Popen(
                [str(NNRPD), "-D", "-f", "-b", HOST, "-p", str(port)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        instance = InnInstance(root, port, process)
        try:
            _wait_for_greeting(port, process, time.monotonic() + 20)
        except InnMissing as exc:
            raise InnMissing(f"{exc}\n{instance.log_text()}") from None
        yield instance
    finally:
        if process is not None and process.poll() is None:
            # The daemon and the children it forked for connections: its
            # own session, so one signal to its group reaches them all.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 15)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait(5)
        shutil.rmtree(root, ignore_errors=True)
