"""The benchmark target: authgate (terminate mode) in front of the embedded backends.

    python -m bench.serve --workdir DIR [--sizes 1048576,10485760] [--stdin]

Runs in a process of its own so that the load generator's CPU time is not
charged to the servers, and vice versa. Prints one JSON line on stdout once
everything listens (endpoints, credentials, the pids whose RSS and CPU time
belong to the target), then serves until SIGTERM/SIGINT (or, with --stdin,
until stdin reaches EOF). With AUTHGATE_BENCH_METRICS=1 in the environment
the metrics are counted ([metrics] on), to measure what they cost; with
AUTHGATE_BENCH_ROUTING=1 the users go through per-user routing (a named
backend at the same address, chosen by a routing table of 10,000 users),
to measure what routing costs the login path against the single backend.

Three users with the same password, differing in what authgate stores for
them: ``bench`` only ``{SSHA512}`` (a cheap salted hash: its logins show what
the proxy itself costs), ``bench-default`` the secrets `authgate passwd`
writes by default (whichever of them authgate checks a password with), and
``bench-argon2`` only ``{ARGON2ID}`` (a deliberately slow hash, as pasted from
a Dovecot passwd-file). The embedded backend checks plaintext passwords, so
direct logins never pay for a hash. ``bench``'s INBOX holds one message of
each ``--sizes`` size, in that order.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import secrets
import signal
import sys
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from authgate.credentials.schemes import hash_password
from authgate.credentials.store import UserStore
from authgate.testing.stack import ListenerSpec, Stack, embedded_stack

USER = "bench"  # {SSHA512} only: its logins show the proxy's cost, not a slow hash
DEFAULT_USER = "bench-default"  # every form `authgate passwd` writes
ARGON2_USER = "bench-argon2"  # {ARGON2ID} only

# Cleartext and implicit TLS; policy `none` lets PLAIN through on both.
LAYOUT = (
    ListenerSpec("imap", "imap", "none"),
    ListenerSpec("imaps", "imap", "implicit"),
    ListenerSpec("submission", "smtp", "none"),
    ListenerSpec("smtps", "smtp", "implicit"),
)


def make_message(size: int, label: str) -> bytes:
    """A well-formed message of exactly `size` octets (CRLF lines of 78 octets)."""
    header = (
        f"From: bench@localhost\r\nTo: {USER}@localhost\r\n"
        f"Subject: bench {label}\r\nMessage-ID: <{label}@bench.localhost>\r\n\r\n"
    ).encode("ascii")
    if size < len(header) + 2:
        raise ValueError(f"a message needs at least {len(header) + 2} octets")
    line = b"x" * 76 + b"\r\n"
    count, rest = divmod(size - len(header), len(line))
    if rest == 1:  # no room for a CRLF after one octet: stretch the last line instead
        count, rest = count - 1, rest + len(line)
    body = line * count + (b"y" * (rest - 2) + b"\r\n" if rest else b"")
    data = header + body
    assert len(data) == size
    return data


def raise_fd_limit() -> None:
    """Held connections cost three descriptors each in the target (client side,
    backend side, backend's own accept): lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass
class BenchStack:
    stack: Stack
    password: str  # both users'
    sizes: list[int]  # of the messages in USER's INBOX, in sequence order

    def describe(self) -> dict[str, Any]:
        """What a load generator needs, as JSON-able data."""
        stack = self.stack
        imap = stack.backends.imap
        smtp = stack.backends.smtp
        return {
            "pids": [os.getpid()],
            "user": USER,
            "default_user": DEFAULT_USER,
            "argon2_user": ARGON2_USER,
            "password": self.password,
            "ca_file": str(stack.ca_file),
            "sizes": self.sizes,
            "targets": {
                "direct": {"host": imap.host, "port": imap.port, "tls": False},
                "authgate": {"host": stack["imap"].host, "port": stack["imap"].port, "tls": False},
                "authgate-tls": {
                    "host": stack["imaps"].host,
                    "port": stack["imaps"].port,
                    "tls": True,
                },
            },
            # The SMTP splice (authgate's SMTP filter on the client's side).
            "smtp_targets": {
                "direct": {"host": smtp.host, "port": smtp.port, "tls": False},
                "authgate": {
                    "host": stack["submission"].host,
                    "port": stack["submission"].port,
                    "tls": False,
                },
                "authgate-tls": {
                    "host": stack["smtps"].host,
                    "port": stack["smtps"].port,
                    "tls": True,
                },
            },
        }


@contextlib.asynccontextmanager
async def bench_stack(
    workdir: Path, *, sizes: Sequence[int], certs: Path | None = None
) -> AsyncIterator[BenchStack]:
    """authgate in front of the embedded backends, set up for benchmarks: policy
    `none`, PLAIN only, USER's INBOX seeded with one message of each size."""
    password = secrets.token_urlsafe(12)
    messages = [make_message(size, f"m{i}-{size}") for i, size in enumerate(sizes, start=1)]
    async with embedded_stack(
        workdir,
        users={USER: password, DEFAULT_USER: password, ARGON2_USER: password},
        security="none",
        mechanisms=("PLAIN",),
        layout=LAYOUT,
        certs_dir=certs,
        messages={USER: messages},
    ) as stack:
        # embedded_stack writes every form `authgate passwd` would; narrow
        # two users down to one scheme. All listeners share this one store.
        store = stack.gateway.runtimes[0].store
        if not isinstance(store, UserStore):
            raise RuntimeError(f"expected the stack's users file store, got {store!r}")
        store.set_user_secrets(USER, [hash_password(password, "SSHA512")])
        store.set_user_secrets(ARGON2_USER, [hash_password(password, "ARGON2ID")])
        if os.environ.get("AUTHGATE_BENCH_ROUTING") == "1":
            await route_users(stack, store)
        yield BenchStack(stack, password, list(sizes))


ROUTED_USERS = 10_000  # routing table entries besides the bench users


async def route_users(stack: Stack, store: UserStore) -> None:
    """Reload the stack with per-user routing: every listener keeps its own
    backend as the default, and a routing table of ROUTED_USERS users (the
    bench users among them) sends them to the named backend `store`, the
    same embedded servers. Each login then asks the users file, the table
    and the rendezvous order before it connects."""
    from authgate import config as config_mod
    from authgate.proxy.runtime import build_runtime

    backends = stack.backends
    table = stack.config_file.parent / "routes.toml"
    names = [f"user{i}@example.org" for i in range(ROUTED_USERS)]
    names += [USER, DEFAULT_USER, ARGON2_USER]
    table.write_text("[users]\n" + "".join(f'"{name}" = "store"\n' for name in names))
    master = stack.gateway.runtimes[0]
    text = stack.config_file.read_text() + (
        f'[routing]\ntable = "{table}"\n'
        "[backends.store]\n"
        f'imap = "{backends.imap.host}:{backends.imap.port}"\n'
        f'smtp = "{backends.smtp.host}:{backends.smtp.port}"\n'
        f'master_user = "{master.listener.backend.master_user}"\n'
        f'master_password = "{master.master_password}"\n'
    )
    stack.config_file.write_text(text)
    config = config_mod.load(stack.config_file)
    await stack.gateway.reload(build_runtime(config, store), config.defence)


async def wait_for_stop(*, watch_stdin: bool) -> None:
    """Return on SIGTERM/SIGINT, or with `watch_stdin` when stdin reaches EOF
    (the parent closed the pipe, or went away)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def watch() -> None:
        # A thread of its own: parked in the default executor it would take a
        # worker away from the password hashing authgate runs there.
        with contextlib.suppress(OSError, ValueError):
            sys.stdin.buffer.read()
        loop.call_soon_threadsafe(stop.set)

    if watch_stdin:
        threading.Thread(target=watch, name="stdin-watch", daemon=True).start()
    await stop.wait()


async def serve(workdir: Path, certs: Path | None, sizes: list[int], watch_stdin: bool) -> None:
    async with bench_stack(workdir, sizes=sizes, certs=certs) as running:
        print(json.dumps(running.describe()), flush=True)
        await wait_for_stop(watch_stdin=watch_stdin)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.serve", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--workdir", type=Path, required=True, help="scratch folder (Maildir, config)"
    )
    parser.add_argument(
        "--certs", type=Path, help="certificate folder to reuse (default: in workdir)"
    )
    parser.add_argument(
        "--sizes",
        default="1048576,10485760",
        help="comma-separated sizes of the messages to seed, in order (default: 1 MiB, 10 MiB)",
    )
    parser.add_argument(
        "--stdin",
        action="store_true",
        help="also stop when stdin reaches EOF (for a parent process holding a pipe)",
    )
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if os.environ.get("AUTHGATE_BENCH_METRICS") == "1":
        # What [metrics] costs the login path: every session counts, as
        # under `authgate run` with [metrics] listen (nobody scrapes here).
        from authgate import metrics

        metrics.enable()
    raise_fd_limit()
    asyncio.run(serve(args.workdir, args.certs, sizes, args.stdin))
    return 0


if __name__ == "__main__":
    sys.exit(main())
