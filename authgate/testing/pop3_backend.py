"""A small POP3 backend (RFC 1939, CAPA of RFC 2449, AUTH PLAIN of RFC 5034) over a Maildir.

Commands: CAPA, USER/PASS, AUTH PLAIN (initial response or ``+`` continuation), STAT,
LIST, UIDL, RETR, TOP, DELE, RSET, NOOP, QUIT.  Deletions happen at QUIT only (the
UPDATE state); a dropped connection deletes nothing.  One session per maildrop at a
time, as RFC 1939 section 8 expects ("-ERR [IN-USE]" otherwise, RFC 2449 section 8).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import ssl
from typing import BinaryIO

from authgate.testing.maildir import (
    Account,
    LineSession,
    LoginRecord,
    Maildir,
    MailStore,
    ServerHandle,
    SessionEnd,
    StoredMessage,
    parse_plain,
    serve_sessions,
)

__all__ = ["CAPABILITIES", "start_pop3_backend"]

log = logging.getLogger(__name__)

CAPABILITIES = ("USER", "SASL PLAIN", "UIDL", "TOP", "PIPELINING", "RESP-CODES", "AUTH-RESP-CODE")

_LINE_LIMIT = 8 * 1024
_CHUNK = 64 * 1024
_AUTH_FAILED = "-ERR [AUTH] Authentication failed."


def _unique_id(key: str) -> str:
    # RFC 1939 section 7: 1-70 characters in 0x21..0x7E.  Maildir keys are stable
    # across sessions, which is all UIDL needs; anything else is hashed.
    if 0 < len(key) <= 70 and all(0x21 <= ord(c) <= 0x7E for c in key):
        return key
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:64]


class _Session(LineSession):
    too_long = "-ERR Line too long"

    def __init__(
        self,
        store: MailStore,
        locks: set[str],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        super().__init__(reader, writer)
        self.store = store
        self.locks = locks
        self.pending_user: str | None = None
        self.account: Account | None = None
        self.box: Maildir | None = None
        self.messages: list[StoredMessage] = []
        self.deleted: set[int] = set()

    async def run(self) -> None:
        try:
            await self.serve("+OK ready", "-ERR Invalid UTF-8 in command")
        finally:
            if self.account is not None and self.box is not None:
                self.locks.discard(self.account.user)

    async def command(self, text: str) -> None:
        command, _, argument = text.partition(" ")
        await self.dispatch(command.upper(), argument)

    async def dispatch(self, command: str, argument: str) -> None:
        if command == "CAPA":
            await self.send("+OK Capability list follows")
            for capability in CAPABILITIES:
                await self.send(capability)
            await self.send(".")
        elif command == "QUIT":
            await self.quit()
        elif command == "NOOP":
            await self.send("+OK")
        elif self.box is None:
            await self.authorization(command, argument)
        else:
            await self.transaction(command, argument)

    # -- AUTHORIZATION state --

    async def authorization(self, command: str, argument: str) -> None:
        if command == "USER":
            if not argument:
                await self.send("-ERR USER needs a name")
                return
            # Always +OK: a -ERR here would tell who has an account.
            self.pending_user = argument
            await self.send("+OK")
        elif command == "PASS":
            user, self.pending_user = self.pending_user, None
            if user is None:
                await self.send("-ERR USER first")
                return
            await self.login(self.store.check_password(user, argument), "USER")
        elif command == "AUTH":
            await self.auth(argument)
        elif command in ("STAT", "LIST", "UIDL", "RETR", "TOP", "DELE", "RSET"):
            await self.send("-ERR Log in first")
        else:
            await self.send("-ERR Unknown command")

    async def auth(self, argument: str) -> None:
        mechanism, _, initial = argument.partition(" ")
        if not mechanism:
            # The pre-RFC 5034 listing form some clients still probe with.
            await self.send("+OK Mechanisms follow")
            await self.send("PLAIN")
            await self.send(".")
            return
        if mechanism.upper() != "PLAIN":
            await self.send("-ERR Unsupported authentication mechanism")
            return
        if initial:
            # RFC 5034 section 4: "=" is an empty initial response.
            encoded = b"" if initial == "=" else initial.encode("ascii", "replace")
        else:
            await self.send("+ ")
            encoded = await self.read_line()
            if encoded == b"*":
                await self.send("-ERR Authentication cancelled")
                return
        try:
            message = base64.b64decode(encoded, validate=True)
        except binascii.Error:
            await self.send("-ERR Invalid base64 in SASL response")
            return
        plain = parse_plain(message)
        await self.login(self.store.check_plain(*plain) if plain else None, "PLAIN")

    async def login(self, account: Account | None, mechanism: str) -> None:
        if account is None:
            await self.send(_AUTH_FAILED)
            return
        if account.user in self.locks:
            await self.send("-ERR [IN-USE] Mailbox is locked by another session.")
            return
        self.locks.add(account.user)
        self.account = account
        self.box = self.store.maildir(account.user)
        # The maildrop as of now: message numbers stay fixed for the session (RFC 1939 §5).
        self.messages = self.box.scan()
        self.store.record(LoginRecord("pop3", mechanism, account.user, account.authcid))
        await self.send("+OK Logged in.")

    # -- TRANSACTION state --

    def message_number(self, text: str) -> int | None:
        """The 1-based number of a live (not deleted) message, or None."""
        if not text.isdigit() or len(text) > 10:
            return None
        number = int(text)
        if not 1 <= number <= len(self.messages) or number in self.deleted:
            return None
        return number

    async def transaction(self, command: str, argument: str) -> None:
        args = argument.split()
        if command == "STAT":
            live = [m for i, m in enumerate(self.messages, 1) if i not in self.deleted]
            await self.send(f"+OK {len(live)} {sum(m.size for m in live)}")
        elif command in ("LIST", "UIDL"):
            await self.listing(command, args)
        elif command == "RETR":
            number = self.message_number(args[0]) if len(args) == 1 else None
            if number is None:
                await self.send("-ERR No such message")
                return
            await self.retrieve(number, None)
        elif command == "TOP":
            number = self.message_number(args[0]) if len(args) == 2 else None
            if number is None or not args[1].isdigit():
                await self.send("-ERR Usage: TOP <message> <lines>")
                return
            await self.retrieve(number, int(args[1]))
        elif command == "DELE":
            number = self.message_number(args[0]) if len(args) == 1 else None
            if number is None:
                await self.send("-ERR No such message")
                return
            self.deleted.add(number)
            await self.send(f"+OK Message {number} deleted")
        elif command == "RSET":
            self.deleted.clear()
            await self.send(f"+OK {len(self.messages)} messages")
        elif command in ("USER", "PASS", "AUTH"):
            await self.send("-ERR Already logged in")
        else:
            await self.send("-ERR Unknown command")

    async def listing(self, command: str, args: list[str]) -> None:
        def entry(number: int) -> str:
            message = self.messages[number - 1]
            value = str(message.size) if command == "LIST" else _unique_id(message.key)
            return f"{number} {value}"

        if args:
            number = self.message_number(args[0]) if len(args) == 1 else None
            if number is None:
                await self.send("-ERR No such message")
            else:
                await self.send(f"+OK {entry(number)}")
            return
        await self.send("+OK")
        for number in range(1, len(self.messages) + 1):
            if number not in self.deleted:
                self.writer.write(entry(number).encode() + b"\r\n")
        await self.send(".")

    async def retrieve(self, number: int, top_lines: int | None) -> None:
        assert self.box is not None
        message = self.messages[number - 1]
        try:
            f = self.box.open(message)
        except FileNotFoundError:
            await self.send("-ERR Message was removed by another client")
            return
        with f:
            if top_lines is None:
                await self.send(f"+OK {message.size} octets")
                await self.stream_stuffed(f)
            else:
                await self.send("+OK")
                await self.stream_top(f, top_lines)
        await self.send(".")

    async def stream_stuffed(self, f: BinaryIO) -> None:
        """Copy the message byte-stuffed (RFC 1939 section 3) without reading it whole.

        A line starting with "." gets another "."; a line start is either just after a
        LF or the start of a chunk that follows one, so chunk edges need no carry.
        """
        at_line_start = True
        last = b"\n"
        while chunk := f.read(_CHUNK):
            stuffed = chunk.replace(b"\n.", b"\n..")
            if at_line_start and stuffed.startswith(b"."):
                stuffed = b"." + stuffed
            self.writer.write(stuffed)
            await self.writer.drain()
            at_line_start = chunk.endswith(b"\n")
            last = chunk[-1:]
        if last != b"\n":
            # The terminating "." must start a line of its own.
            self.writer.write(b"\r\n")

    async def stream_top(self, f: BinaryIO, body_lines: int) -> None:
        """The header, the blank line and the first ``body_lines`` body lines (RFC 1939 §7)."""
        in_header = True
        last = b"\n"
        while line := f.readline():
            if not in_header:
                if body_lines <= 0:
                    break
                body_lines -= 1
            elif line in (b"\r\n", b"\n"):
                in_header = False
            self.writer.write(b"." + line if line.startswith(b".") else line)
            await self.writer.drain()
            last = line[-1:]
        if last != b"\n":
            self.writer.write(b"\r\n")  # the terminating "." must start a line

    # -- QUIT / UPDATE --

    async def quit(self) -> None:
        if self.box is not None:
            removed = 0
            for number in sorted(self.deleted):
                self.box.remove(self.messages[number - 1])
                removed += 1
            await self.send(f"+OK Logging out, {removed} messages deleted.")
        else:
            await self.send("+OK Logging out.")
        raise SessionEnd


async def start_pop3_backend(
    store: MailStore,
    host: str = "127.0.0.1",
    port: int = 0,
    ssl_context: ssl.SSLContext | None = None,
) -> ServerHandle:
    """Start the POP3 backend on ``host:port`` (0: an ephemeral port)."""
    locks: set[str] = set()  # users with an open POP3 session on this server

    return await serve_sessions(
        lambda reader, writer: _Session(store, locks, reader, writer).run(),
        log=log,
        name="POP3",
        host=host,
        port=port,
        store=store,
        protocol="pop3",
        ssl_context=ssl_context,
        limit=_LINE_LIMIT,
    )
