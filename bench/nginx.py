"""The nginx mail proxy (Debian's nginx + libnginx-mod-mail) as a benchmark target.

`BenchNginx` writes an nginx.conf under its own prefix in a scratch folder and
runs `nginx -p <prefix> -c <conf>` in the foreground (`daemon off`, a master
and `worker_processes 1`), pinned to the CPUs given; it can restart it, so
that a memory reading starts from a fresh worker. Its mail servers: IMAP,
IMAPS and (given Dovecot's POP3 port) cleartext POP3.

nginx does not verify passwords itself: for every login it asks an
`auth_http` server, over HTTP, whether the user may log in and where the
backend is. Here that server is a second `server` in an `http` block of the
same nginx: a `map` on the user and password nginx sends (`Auth-User`,
`Auth-Pass`) picks the answer, and `add_header` + `return 204` send it. So
the auth lookup costs a loopback HTTP round trip inside the same worker (its
CPU is charged to nginx, as authgate's own password check is charged to
authgate), and no interpreter or database sits in the path.

The answer for a good password: `Auth-Status: OK`, the backend's address and
port, and `Auth-User`/`Auth-Pass` = `user*master` / the master password, so
nginx logs in to Dovecot with IMAP LOGIN as a master user (Dovecot's
`auth_master_user_separator = *`), as authgate does with SASL PLAIN and an
authzid: both proxies cost Dovecot the same master-user lookup. Anything else
gets `Auth-Status: Invalid login or password`.

Everything else is nginx's default (`proxy_buffer` 4k/8k, no session cache),
except the limits a benchmark needs: `worker_rlimit_nofile` (the inherited
hard limit) and `worker_connections` (half of it) for 2,000+ held sessions
(two connections each).
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from bench.dovecot import HOST, accepts, free_ports, greets, spawn, stop_session, wait_ready

NGINX_PATHS = ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
# Debian's dynamic modules (libnginx-mod-mail puts ngx_mail_module.so here).
MODULE_DIRS = ("/usr/lib/nginx/modules", "/usr/share/nginx/modules")
INSTALL_HINT = "apt-get install nginx libnginx-mod-mail (as root)"
STARTUP_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0


def descriptor_limit() -> int:
    """The hard RLIMIT_NOFILE nginx inherits: its worker (no longer root)
    cannot set `worker_rlimit_nofile` above it."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 65536 if hard == resource.RLIM_INFINITY else min(int(hard), 65536)


# What nginx's Auth-Pass may be matched against literally: nginx URL-escapes
# the password it sends, and a map key with `%`, quotes or spaces would need
# escaping of its own. The bench makes its own passwords; it keeps them plain.
_SAFE = re.compile(r"[A-Za-z0-9_.~-]+")


class NginxError(RuntimeError):
    """nginx could not be set up or started (the message carries its log)."""


def nginx_binary() -> str:
    path = shutil.which("nginx") or next((p for p in NGINX_PATHS if os.access(p, os.X_OK)), None)
    if path is None:
        raise NginxError(f"the nginx binary is missing: {INSTALL_HINT}")
    return path


def mail_module() -> Path:
    for folder in MODULE_DIRS:
        path = Path(folder, "ngx_mail_module.so")
        if path.exists():
            return path
    raise NginxError(f"ngx_mail_module.so is missing: {INSTALL_HINT}")


def nginx_version() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError, NginxError):
        out = subprocess.run([nginx_binary(), "-v"], capture_output=True, text=True, timeout=10)
        text = (out.stderr or out.stdout).strip()
        return text.removeprefix("nginx version: ") or "unknown"
    return "unknown"


@dataclass(frozen=True)
class AuthEntry:
    """One row of the auth_http table: the client's password, and what nginx
    should log in to the backend with."""

    password: str
    backend_user: str
    backend_password: str


@dataclass
class BenchNginx:
    root: Path  # nginx's prefix
    cert: Path
    key: Path
    backend_port: int  # Dovecot's cleartext IMAP
    table: dict[str, AuthEntry]
    cpus: set[int] | None = None
    backend_pop3_port: int = 0  # Dovecot's cleartext POP3 (0: no pop3 server block)
    imap: int = 0
    imaps: int = 0
    auth: int = 0
    pop3: int = 0
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def conf_path(self) -> Path:
        return self.root / "nginx.conf"

    @property
    def log_path(self) -> Path:
        return self.root / "error.log"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("nginx is not running")
        return self.process.pid

    def prepare(self, taken: set[int] | None = None) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        if not self.imap:
            self.imap, self.imaps, self.auth = free_ports(3, taken or ())
        if self.backend_pop3_port and not self.pop3:
            self.pop3 = free_ports(1, {*(taken or ()), self.imap, self.imaps, self.auth})[0]
        self.conf_path.write_text(self.render())

    def render(self) -> str:
        for user, entry in self.table.items():
            for value in (user, entry.password, entry.backend_user, entry.backend_password):
                if not _SAFE.fullmatch(value.replace("*", "")):
                    raise NginxError(f"{value!r}: the bench's auth table takes [A-Za-z0-9_.~-*]")
        status = "\n".join(f'    "{u}:{e.password}" "OK";' for u, e in self.table.items())
        users = "\n".join(f'    "{u}" "{e.backend_user}";' for u, e in self.table.items())
        passwords = "\n".join(f'    "{u}" "{e.backend_password}";' for u, e in self.table.items())
        root = self.root
        files = descriptor_limit()
        # One auth_http answer for both protocols: the backend's port by the
        # protocol nginx names in Auth-Protocol. POP3: nginx logs in to Dovecot
        # with USER/PASS as `user*master`, as it uses IMAP LOGIN for IMAP.
        pop3_port = f"        pop3 {self.backend_pop3_port};\n" if self.backend_pop3_port else ""
        pop3_server = (
            f"""    server {{
        listen {HOST}:{self.pop3};
        protocol pop3;
    }}
"""
            if self.backend_pop3_port
            else ""
        )
        return f"""\
# Written by bench/nginx.py.
load_module {mail_module()};
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile {files};
pid {root}/nginx.pid;
error_log {root}/error.log;

events {{
    worker_connections {files // 2};
}}

# The auth_http server: a table in maps, answered in the same worker.
http {{
    access_log off;
    client_body_temp_path {root}/client_body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;

    map "$http_auth_user:$http_auth_pass" $bench_auth_status {{
        default "Invalid login or password";
{status}
    }}
    map $http_auth_user $bench_backend_user {{
        default "";
{users}
    }}
    map $http_auth_user $bench_backend_pass {{
        default "";
{passwords}
    }}
    map $http_auth_protocol $bench_backend_port {{
        default {self.backend_port};
{pop3_port}    }}

    server {{
        listen {HOST}:{self.auth};
        location = /auth {{
            add_header Auth-Status $bench_auth_status;
            add_header Auth-Server {HOST};
            add_header Auth-Port $bench_backend_port;
            add_header Auth-User $bench_backend_user;
            add_header Auth-Pass $bench_backend_pass;
            return 204;
        }}
    }}
}}

mail {{
    server_name localhost;
    auth_http {HOST}:{self.auth}/auth;
    proxy_pass_error_message on;
    imap_auth plain;
    imap_capabilities IMAP4rev1 LITERAL+ SASL-IR ID ENABLE IDLE;
    # USER/PASS, AUTH PLAIN (with an initial response too) and AUTH LOGIN.
    pop3_auth plain;
    ssl_certificate {self.cert};
    ssl_certificate_key {self.key};

    server {{
        listen {HOST}:{self.imap};
        protocol imap;
    }}
    server {{
        listen {HOST}:{self.imaps} ssl;
        protocol imap;
    }}
{pop3_server}}}
"""

    def start(self, timeout: float = STARTUP_TIMEOUT) -> None:
        conf, log = str(self.conf_path), str(self.log_path)
        argv = [nginx_binary(), "-p", f"{self.root}/", "-c", conf, "-e", log]
        self.process = spawn(argv, self.root / "console.log", self.cpus)
        problem = wait_ready(
            self.process,
            lambda: (
                greets(self.imap)
                and accepts(self.imaps)
                and accepts(self.auth)
                and (not self.pop3 or greets(self.pop3, b"+OK"))
            ),
            timeout,
        )
        if problem is not None:
            self.stop()
            raise NginxError(f"nginx {problem}\n" + self.diagnostics())

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            stop_session(process, STOP_TIMEOUT)  # SIGTERM: fast shutdown, sessions cut

    def restart(self) -> None:
        self.stop()
        self.start()

    def diagnostics(self) -> str:
        parts = []
        for path in (self.root / "console.log", self.log_path):
            text = path.read_text("utf-8", "replace") if path.exists() else "(none)"
            parts.append(f"--- {path.name} ---\n{text[-4000:]}")
        return "\n".join(parts)

    def errors(self) -> list[str]:
        """[alert]/[crit]/[emerg]/[error] lines of the error log."""
        if not self.log_path.exists():
            return []
        lines = self.log_path.read_text("utf-8", "replace").splitlines()
        return [x for x in lines if re.search(r"\[(error|crit|alert|emerg)\]", x)]
