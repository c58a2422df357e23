"""A small NNTP reader backend (RFC 3977, AUTHINFO of RFC 4643) over a Maildir.

Each user reads one newsgroup, ``inbox``: the messages of their Maildir,
numbered from 1 in delivery order. Commands: CAPABILITIES, MODE READER,
AUTHINFO USER/PASS, AUTHINFO SASL PLAIN (initial response or a ``383 =``
continuation; an authzid only for the master user, as authgate's terminate
mode logs in), GROUP, LISTGROUP, LIST [ACTIVE], ARTICLE/HEAD/BODY/STAT by
number, NEXT, LAST, DATE, QUIT. Reader commands before a login get 480.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import ssl
import time

from authgate.testing.maildir import (
    Account,
    LineSession,
    LoginRecord,
    MailStore,
    ServerHandle,
    SessionEnd,
    StoredMessage,
    parse_plain,
    serve_sessions,
)

__all__ = ["GROUP", "start_nntp_backend"]

log = logging.getLogger(__name__)

GROUP = "inbox"
_LINE_LIMIT = 8 * 1024
_READER = frozenset(
    {"GROUP", "LISTGROUP", "LIST", "ARTICLE", "HEAD", "BODY", "STAT", "NEXT", "LAST", "DATE"}
)


class _Session(LineSession):
    too_long = "501 Line too long"

    def __init__(
        self, store: MailStore, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        super().__init__(reader, writer)
        self.store = store
        self.pending_user: str | None = None
        self.account: Account | None = None
        self.messages: list[StoredMessage] = []
        self.current = 0  # the current article number (0: none selected)
        self.selected = False

    async def run(self) -> None:
        await self.serve(
            "200 NNTP backend ready, posting prohibited", "501 Invalid UTF-8 in command"
        )

    async def command(self, text: str) -> None:
        command, _, argument = text.strip().partition(" ")
        await self.dispatch(command.upper(), argument.strip())

    async def dispatch(self, command: str, argument: str) -> None:
        if command == "CAPABILITIES":
            caps = ["VERSION 2", "READER", "LIST ACTIVE"]
            if self.account is None:
                # SASL only: authgate's terminate mode then logs in with its
                # master user and the reader as authzid.
                caps += ["AUTHINFO SASL", "SASL PLAIN"]
            await self.send("101 Capability list:")
            for cap in caps:
                await self.send(cap)
            await self.send(".")
        elif command == "MODE" and argument.upper() == "READER":
            await self.send("201 Reader mode, posting prohibited")
        elif command == "QUIT":
            await self.send("205 Bye")
            raise SessionEnd
        elif command == "AUTHINFO":
            await self.authinfo(argument)
        elif command in _READER:
            if self.account is None:
                await self.send("480 Authentication required")
            else:
                await self.reader_command(command, argument)
        else:
            await self.send("500 Unknown command")

    # -- authentication --

    async def authinfo(self, argument: str) -> None:
        if self.account is not None:
            await self.send("502 Already authenticated")
            return
        sub, _, rest = argument.partition(" ")
        sub = sub.upper()
        if sub == "USER" and rest:
            self.pending_user = rest
            await self.send("381 Password required")
        elif sub == "PASS" and rest:
            user, self.pending_user = self.pending_user, None
            if user is None:
                await self.send("482 Authentication commands issued out of sequence")
                return
            await self.login(self.store.check_password(user, rest), "AUTHINFO-USER")
        elif sub == "SASL" and rest:
            await self.sasl(rest)
        else:
            await self.send("501 Syntax error")

    async def sasl(self, argument: str) -> None:
        mechanism, _, initial = argument.partition(" ")
        if mechanism.upper() != "PLAIN":
            await self.send("503 Mechanism not recognized")
            return
        if initial:
            encoded = initial.encode("ascii", "replace")
        else:
            await self.send("383 =")
            encoded = await self.read_line()
            if encoded == b"*":
                await self.send("481 Authentication cancelled")
                return
        try:
            message = b"" if encoded == b"=" else base64.b64decode(encoded, validate=True)
        except binascii.Error:
            await self.send("504 Invalid base64")
            return
        plain = parse_plain(message)
        await self.login(self.store.check_plain(*plain) if plain else None, "PLAIN")

    async def login(self, account: Account | None, mechanism: str) -> None:
        if account is None:
            await self.send("481 Authentication failed")
            return
        self.account = account
        self.store.record(LoginRecord("nntp", mechanism, account.user, account.authcid))
        await self.send("281 Authentication accepted")

    # -- reading --

    def _scan(self) -> None:
        assert self.account is not None
        self.messages = self.store.maildir(self.account.user).scan()

    def _range(self) -> str:
        count = len(self.messages)
        return f"{count} {1 if count else 0} {count}"

    async def reader_command(self, command: str, argument: str) -> None:
        if command == "DATE":
            await self.send("111 " + time.strftime("%Y%m%d%H%M%S", time.gmtime()))
        elif command == "LIST":
            if argument and argument.upper() != "ACTIVE":
                await self.send("503 Only LIST ACTIVE here")
                return
            self._scan()
            count = len(self.messages)
            await self.send("215 List of newsgroups follows")
            await self.send(f"{GROUP} {count} {1 if count else 0} n")
            await self.send(".")
        elif command in ("GROUP", "LISTGROUP"):
            name = argument.split()[0] if argument else (GROUP if self.selected else "")
            if name != GROUP:
                await self.send("411 No such newsgroup")
                return
            self._scan()
            self.selected = True
            self.current = 1 if self.messages else 0
            await self.send(f"211 {self._range()} {GROUP}")
            if command == "LISTGROUP":
                for number in range(1, len(self.messages) + 1):
                    await self.send(str(number))
                await self.send(".")
        elif not self.selected:
            await self.send("412 No newsgroup selected")
        elif command in ("NEXT", "LAST"):
            step = 1 if command == "NEXT" else -1
            target = self.current + step
            if self.current == 0 or not 1 <= target <= len(self.messages):
                await self.send(f"42{1 if step == 1 else 2} No {command.lower()} article")
                return
            self.current = target
            await self.send(f"223 {target} <{target}@{GROUP}> selected")
        else:
            await self.article(command, argument)

    async def article(self, command: str, argument: str) -> None:
        if argument:
            if not argument.isdigit() or len(argument) > 10:
                await self.send("430 No article with that message-id")
                return
            number = int(argument)
        else:
            number = self.current
        if not 1 <= number <= len(self.messages):
            await self.send("423 No article with that number" if argument else "420 No current")
            return
        self.current = number
        codes = {"ARTICLE": 220, "HEAD": 221, "BODY": 222, "STAT": 223}
        await self.send(f"{codes[command]} {number} <{number}@{GROUP}>")
        if command == "STAT":
            return
        assert self.account is not None
        box = self.store.maildir(self.account.user)
        try:
            with box.open(self.messages[number - 1]) as f:
                data = f.read()
        except FileNotFoundError:
            data = b"\r\n"
        head, _, body = data.replace(b"\r\n", b"\n").partition(b"\n\n")
        parts = {"ARTICLE": head + b"\n\n" + body, "HEAD": head, "BODY": body}[command]
        if parts.endswith(b"\n"):
            parts = parts[:-1]  # the last line's end, not an empty line
        for line in parts.split(b"\n"):
            # RFC 3977 section 3.1.1: dot-stuffing.
            self.writer.write((b"." + line if line.startswith(b".") else line) + b"\r\n")
        await self.send(".")


async def start_nntp_backend(
    store: MailStore,
    host: str = "127.0.0.1",
    port: int = 0,
    ssl_context: ssl.SSLContext | None = None,
) -> ServerHandle:
    """Start the NNTP backend on ``host:port`` (0: an ephemeral port)."""

    return await serve_sessions(
        lambda reader, writer: _Session(store, reader, writer).run(),
        log=log,
        name="NNTP",
        host=host,
        port=port,
        store=store,
        protocol="nntp",
        ssl_context=ssl_context,
        limit=_LINE_LIMIT,
    )
