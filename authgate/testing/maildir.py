"""Maildir store, accounts and the small server handle shared by the embedded backends.

The backends (IMAP, POP3, SMTP) are the mail servers authgate sits in front of in
``authgate demo`` and in the pytest plugin; they are *not* authgate.  They share one
:class:`MailStore`: a root directory holding ``<root>/<user>/Maildir/{cur,new,tmp}``,
a dict of users to plaintext passwords and an optional master user.

Messages are stored in wire form, every line ending in CRLF (RFC 5322 section 2.1),
so that a message's file size *is* its RFC822.SIZE / POP3 size and the servers can
stream the file as it is.  Bare LFs are turned into CRLF when a message is added.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import mailbox
import os
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "Account",
    "LineSession",
    "LoginRecord",
    "MailStore",
    "Maildir",
    "ServerHandle",
    "SessionEnd",
    "StoredMessage",
    "UidRegistry",
    "parse_plain",
    "seed_mailbox",
    "serve_sessions",
    "serve_streams",
    "to_crlf",
]

# Maildir "info" flags (https://cr.yp.to/proto/maildir.html, "2," experimental
# semantics): the letters must appear in ASCII order in the file name.
SEEN = "S"
REPLIED = "R"
FLAGGED = "F"
TRASHED = "T"
DRAFT = "D"
PASSED = "P"

_BARE_LF = re.compile(rb"(?<!\r)\n")
# Python's mailbox.Maildir names files "<sec>.M<usec>P<pid>Q<counter>.<host>";
# microseconds are not zero-padded, so a plain string sort is not delivery order.
_KEY_ORDER = re.compile(r"(\d+)\.(?:M(\d+))?(?:P\d+)?(?:Q(\d+))?")


def to_crlf(data: bytes) -> bytes:
    """Return ``data`` with every bare LF turned into CRLF (existing CRLFs kept)."""
    return _BARE_LF.sub(b"\r\n", data)


def _delivery_order(key: str) -> tuple[int, int, int, str]:
    match = _KEY_ORDER.match(key)
    if match is None:
        return (0, 0, 0, key)
    sec, usec, count = match.groups()
    return (int(sec), int(usec or 0), int(count or 0), key)


@dataclass(frozen=True)
class StoredMessage:
    """One message file as found on disk."""

    key: str  # the unique part of the file name, before ":2,"
    path: Path
    flags: str  # Maildir info flag letters, sorted
    size: int
    mtime: float

    @property
    def is_new(self) -> bool:
        """True while the message sits in ``new/`` (never seen by any MUA: IMAP \\Recent)."""
        return self.path.parent.name == "new"


class Maildir:
    """One user's Maildir: delivery through :class:`mailbox.Maildir`, listing by scanning.

    ``mailbox.Maildir`` does the tmp -> new delivery with unique names.  Listing and
    flag changes go straight to the directory because its table of contents is cached
    for two seconds (too stale for a server that other processes deliver into) and
    Python < 3.13 can only change flags by rewriting the whole message.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        # create=True makes the Maildir itself and cur/new/tmp (not its parents).
        self._box = mailbox.Maildir(path, create=True)
        self._colon = self._box.colon

    def add(self, data: bytes, flags: str = "") -> str:
        """Deliver ``data`` (converted to CRLF lines) and return its key."""
        key = self._box.add(to_crlf(data))
        if flags:
            message = self.locate(key)
            if message is not None:
                self.set_flags(message, flags)
        return key

    def scan(self) -> list[StoredMessage]:
        """All messages in ``new/`` and ``cur/``, in delivery order."""
        found: list[StoredMessage] = []
        for subdir in ("new", "cur"):
            found.extend(self._scan_dir(subdir))
        found.sort(key=lambda m: _delivery_order(m.key))
        return found

    def _scan_dir(self, subdir: str) -> Iterator[StoredMessage]:
        directory = self.path / subdir
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue  # the Maildir spec reserves dot files
                try:
                    if not entry.is_file():
                        continue
                    st = entry.stat()
                except FileNotFoundError:
                    continue  # renamed or removed by someone else meanwhile
                key, _, info = entry.name.partition(self._colon)
                flags = info[2:] if info.startswith("2,") else ""
                yield StoredMessage(
                    key=key,
                    path=Path(entry.path),
                    flags="".join(sorted(flags)),
                    size=st.st_size,
                    mtime=st.st_mtime,
                )

    def locate(self, key: str) -> StoredMessage | None:
        """Find the current file of ``key`` (its name changes with its flags)."""
        for subdir in ("cur", "new"):
            for message in self._scan_dir(subdir):
                if message.key == key:
                    return message
        return None

    def set_flags(self, message: StoredMessage, flags: str) -> StoredMessage:
        """Rename the message to carry ``flags``; a message with info lives in ``cur/``.

        Raises FileNotFoundError when the message is gone.
        """
        flags = "".join(sorted(set(flags)))
        current = message if message.path.exists() else self.locate(message.key)
        if current is None:
            raise FileNotFoundError(message.key)
        target = self.path / "cur" / f"{current.key}{self._colon}2,{flags}"
        if target != current.path:
            os.rename(current.path, target)
        return StoredMessage(current.key, target, flags, current.size, current.mtime)

    def open(self, message: StoredMessage) -> BinaryIO:
        """Open the message for reading, following a rename done by another session."""
        try:
            return message.path.open("rb")
        except FileNotFoundError:
            current = self.locate(message.key)
            if current is None:
                raise
            return current.path.open("rb")

    def remove(self, message: StoredMessage) -> None:
        """Delete the message; a message already gone is not an error."""
        current = message if message.path.exists() else self.locate(message.key)
        if current is not None:
            with contextlib.suppress(FileNotFoundError):
                current.path.unlink()


class UidRegistry:
    """IMAP UIDs of one mailbox (RFC 3501 section 2.3.1.1), kept in memory.

    UIDs are assigned in delivery order the first time a message is seen and never
    reused while the store lives.  A new store (process restart) starts a new
    UIDVALIDITY, which is what the RFC requires when UIDs cannot be kept.
    """

    def __init__(self, uidvalidity: int) -> None:
        self.uidvalidity = uidvalidity
        self.uidnext = 1
        self._uids: dict[str, int] = {}

    def assign(self, messages: Iterable[StoredMessage]) -> list[tuple[int, StoredMessage]]:
        """Return ``(uid, message)`` pairs sorted by UID, giving new messages new UIDs."""
        pairs: list[tuple[int, StoredMessage]] = []
        for message in messages:
            uid = self._uids.get(message.key)
            if uid is None:
                uid = self._uids[message.key] = self.uidnext
                self.uidnext += 1
            pairs.append((uid, message))
        pairs.sort(key=lambda pair: pair[0])
        return pairs


@dataclass(frozen=True)
class Account:
    """Who logged in: ``user`` is the mailbox, ``authcid`` the identity whose password
    was checked (the master user's name for a master login)."""

    user: str
    authcid: str

    @property
    def via_master(self) -> bool:
        return self.user != self.authcid


@dataclass(frozen=True)
class LoginRecord:
    """A successful login as seen by a backend, for tests to assert on (no secrets)."""

    protocol: str  # "imap", "pop3", "smtp" or "nntp"
    mechanism: str  # "LOGIN" (IMAP), "USER" (POP3), "AUTHINFO-USER" (NNTP), or SASL
    user: str
    authcid: str
    client_id: dict[str, str | None] | None = None  # IMAP ID parameters sent before login


def _same_secret(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


class MailStore:
    """Users, the optional master user and their Maildirs under ``root``."""

    def __init__(
        self,
        root: Path,
        users: dict[str, str],
        master: tuple[str, str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.users = dict(users)
        self.master = master
        self.logins: list[LoginRecord] = []
        self._maildirs: dict[str, Maildir] = {}
        self._uids: dict[str, UidRegistry] = {}
        # Seconds since the epoch: grows across restarts, fits the 32-bit nz-number.
        self._uidvalidity = int(time.time())

    def maildir(self, user: str) -> Maildir:
        if user not in self.users:
            raise KeyError(user)
        box = self._maildirs.get(user)
        if box is None:
            box = self._maildirs[user] = Maildir(self.root / user / "Maildir")
        return box

    def uids(self, user: str) -> UidRegistry:
        registry = self._uids.get(user)
        if registry is None:
            registry = self._uids[user] = UidRegistry(self._uidvalidity)
        return registry

    def check_password(self, user: str, password: str) -> Account | None:
        """A plain login: ``user`` with their own password."""
        expected = self.users.get(user)
        # Compare against something even for unknown users, so both paths do the work.
        matched = _same_secret(password, expected if expected is not None else "\x00")
        if expected is None or not matched:
            return None
        return Account(user=user, authcid=user)

    def check_plain(self, authzid: str, authcid: str, password: str) -> Account | None:
        """SASL PLAIN (RFC 4616 section 2): log in as ``authzid`` (or ``authcid`` if empty).

        An authzid different from the authcid is only honoured for the master user,
        the way Dovecot master users and Cyrus proxy authorization work.
        """
        if not authzid or authzid == authcid:
            return self.check_password(authcid, password)
        if self.master is None or authzid not in self.users:
            return None
        master_name, master_password = self.master
        name_ok = _same_secret(authcid, master_name)
        password_ok = _same_secret(password, master_password)
        if not (name_ok and password_ok):
            return None
        return Account(user=authzid, authcid=authcid)

    def record(self, record: LoginRecord) -> None:
        self.logins.append(record)


def parse_plain(message: bytes) -> tuple[str, str, str] | None:
    """Split a PLAIN message ``authzid NUL authcid NUL passwd`` (RFC 4616 section 2)."""
    parts = message.split(b"\x00")
    if len(parts) != 3 or not parts[1] or not parts[2]:
        return None
    try:
        authzid, authcid, password = (part.decode("utf-8") for part in parts)
    except UnicodeDecodeError:
        return None
    return authzid, authcid, password


def seed_mailbox(root: Path, user: str, messages: Iterable[bytes | str]) -> list[str]:
    """Drop ``messages`` into ``<root>/<user>/Maildir/new`` in order; return their keys.

    Strings are encoded as UTF-8; line endings are normalised to CRLF.
    """
    box = Maildir(Path(root) / user / "Maildir")
    keys: list[str] = []
    for message in messages:
        data = message.encode("utf-8") if isinstance(message, str) else message
        keys.append(box.add(data))
    return keys


# --- Shared server plumbing -------------------------------------------------------


@dataclass
class ServerHandle:
    """A running backend: where it listens and how to stop it."""

    host: str
    port: int
    protocol: str  # "imap", "pop3", "smtp" or "nntp"
    store: MailStore
    _close: Callable[[], Awaitable[None]] = field(repr=False)
    _closed: bool = field(default=False, repr=False)

    @property
    def logins(self) -> list[LoginRecord]:
        """Successful logins on this server, oldest first."""
        return [r for r in self.store.logins if r.protocol == self.protocol]

    async def close(self) -> None:
        """Stop listening and end the open sessions (idempotent)."""
        if self._closed:
            return
        self._closed = True
        await self._close()


StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def serve_streams(
    handler: StreamHandler,
    *,
    host: str,
    port: int,
    store: MailStore,
    protocol: str,
    ssl_context: ssl.SSLContext | None = None,
    limit: int = 64 * 1024,
) -> ServerHandle:
    """Run ``handler`` per connection; closing the handle also ends open sessions.

    Without the session bookkeeping a test's event loop would be torn down with
    handler tasks still parked in ``readline()``.
    """
    sessions: set[asyncio.Task[None]] = set()

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        sessions.add(task)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away; nothing to report to anyone
        finally:
            sessions.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    server = await asyncio.start_server(session, host, port, ssl=ssl_context, limit=limit)
    bound_port = server.sockets[0].getsockname()[1]

    async def close() -> None:
        server.close()
        for task in list(sessions):
            task.cancel()
        if sessions:
            await asyncio.gather(*sessions, return_exceptions=True)
        await server.wait_closed()

    return ServerHandle(host=host, port=bound_port, protocol=protocol, store=store, _close=close)


class SessionEnd(Exception):
    """Ends an embedded backend's session: QUIT, end of file, a line too long."""


class LineSession:
    """The line I/O the NNTP and POP3 backends share: a reply is one line, a
    command one CRLF-ended line (no literals), read up to the stream limit.

    A subclass names ``too_long`` (the reply to a line over the limit, after
    which the session ends) and handles each decoded line in ``command``."""

    too_long: str

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, line: str) -> None:
        self.writer.write(line.encode("utf-8") + b"\r\n")
        await self.writer.drain()

    async def read_line(self) -> bytes:
        try:
            line = await self.reader.readline()
        except ValueError:  # over the stream limit; asyncio discarded the data
            await self.send(self.too_long)
            raise SessionEnd from None
        if not line.endswith(b"\n"):
            raise SessionEnd  # EOF
        return line.rstrip(b"\r\n")

    async def serve(self, greeting: str, bad_utf8: str) -> None:
        """Send ``greeting``, then handle command lines until the session ends;
        a line that is not UTF-8 gets ``bad_utf8`` and the session goes on."""
        await self.send(greeting)
        try:
            while True:
                line = await self.read_line()
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError:
                    await self.send(bad_utf8)
                    continue
                await self.command(text)
        except SessionEnd:
            pass

    async def command(self, text: str) -> None:
        raise NotImplementedError


async def serve_sessions(
    session: StreamHandler,
    *,
    log: logging.Logger,
    name: str,
    host: str,
    port: int,
    store: MailStore,
    protocol: str,
    ssl_context: ssl.SSLContext | None = None,
    limit: int = 64 * 1024,
) -> ServerHandle:
    """``serve_streams`` for an embedded backend's ``session``: a bug in one
    session is logged on ``log`` ("<name> backend session failed") and ends
    only that session, never the server."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await session(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            raise  # the client went away: serve_streams handles that quietly
        except Exception:
            log.exception("%s backend session failed", name)

    return await serve_streams(
        handle,
        host=host,
        port=port,
        store=store,
        protocol=protocol,
        ssl_context=ssl_context,
        limit=limit,
    )
