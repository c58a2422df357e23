"""The embedded mail servers authgate sits in front of in the demo and the pytest plugin.

These are *backends*, not authgate: small IMAP, POP3, SMTP, ManageSieve and NNTP
servers sharing one store, good enough for real clients (imaplib, poplib, smtplib,
curl, sievelib, nntplib).

    backends = await start_backends(root, {"alice": "pw"}, master=("authgate", "mpw"))
    ...  # backends.imap.port, .pop3.port, .smtp.port, .sieve.port, .nntp.port
    await backends.close()
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from authgate.testing.imap_backend import start_imap_backend
from authgate.testing.maildir import (
    Account,
    LoginRecord,
    Maildir,
    MailStore,
    ServerHandle,
    StoredMessage,
    seed_mailbox,
)
from authgate.testing.nntp_backend import start_nntp_backend
from authgate.testing.pop3_backend import start_pop3_backend
from authgate.testing.sieve_backend import start_sieve_backend
from authgate.testing.smtp_backend import start_smtp_backend

__all__ = [
    "Account",
    "Backends",
    "LoginRecord",
    "MailStore",
    "Maildir",
    "ServerHandle",
    "StoredMessage",
    "seed_mailbox",
    "start_backends",
    "start_imap_backend",
    "start_nntp_backend",
    "start_pop3_backend",
    "start_sieve_backend",
    "start_smtp_backend",
]


@dataclass
class Backends:
    """The running backends over one store."""

    store: MailStore
    imap: ServerHandle
    pop3: ServerHandle
    smtp: ServerHandle
    sieve: ServerHandle
    nntp: ServerHandle

    async def close(self) -> None:
        await asyncio.gather(
            self.imap.close(),
            self.pop3.close(),
            self.smtp.close(),
            self.sieve.close(),
            self.nntp.close(),
        )


async def start_backends(
    root: Path,
    users: dict[str, str],
    master: tuple[str, str] | None = None,
    host: str = "127.0.0.1",
) -> Backends:
    """Start IMAP, POP3, SMTP, ManageSieve and NNTP backends on ephemeral ports of ``host``.

    ``users`` maps user names to plaintext passwords; ``master`` is an optional
    (name, password) allowed to log in as any user with SASL PLAIN authzid.
    Every user's Maildir is created under ``root`` if missing.
    """
    store = MailStore(root, users, master)
    for user in users:
        store.maildir(user)
    started: list[ServerHandle] = []
    try:
        for start in (
            start_imap_backend,
            start_pop3_backend,
            start_smtp_backend,
            start_sieve_backend,
            start_nntp_backend,
        ):
            started.append(await start(store, host))
    except BaseException:
        for handle in started:
            await handle.close()
        raise
    imap, pop3, smtp, sieve, nntp = started
    return Backends(store=store, imap=imap, pop3=pop3, smtp=smtp, sieve=sieve, nntp=nntp)
