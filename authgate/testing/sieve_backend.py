"""A small ManageSieve backend (RFC 5804) over the embedded store.

Commands: CAPABILITY, NOOP, LOGOUT, AUTHENTICATE "PLAIN" (initial response
or an empty challenge first; the master user may name another user as
authzid), and after login LISTSCRIPTS, PUTSCRIPT, GETSCRIPT, SETACTIVE,
DELETESCRIPT, HAVESPACE, CHECKSCRIPT. Scripts live in ``<user>/sieve/`` under
the store's root (``NAME.sieve``, the active one named in ``.active``), so a
test can look at what a client uploaded through authgate. Scripts are not
compiled: CHECKSCRIPT and PUTSCRIPT accept any UTF-8 text.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import ssl
from pathlib import Path

from authgate.protocols.common import LineBuffer, LineTooLong
from authgate.protocols.managesieve import (
    LogicalLines,
    SieveSyntaxError,
    Token,
    TokenKind,
    encode_string,
    parse_line,
)
from authgate.testing.maildir import Account, LoginRecord, MailStore, ServerHandle, serve_sessions

__all__ = ["CAPABILITIES", "SIEVE_EXTENSIONS", "script_dir", "start_sieve_backend"]

log = logging.getLogger(__name__)

SIEVE_EXTENSIONS = "fileinto reject envelope vacation"
CAPABILITIES = (
    ("IMPLEMENTATION", "authgate embedded sieve backend"),
    ("SASL", "PLAIN"),
    ("SIEVE", SIEVE_EXTENSIONS),
    ("NOTIFY", "mailto"),
    ("VERSION", "1.0"),
)
_LIMIT = 1024 * 1024  # the longest command, a script included
_NAME = re.compile(r"[^\x00-\x1f\x7f/\\.][^\x00-\x1f\x7f/\\]{0,127}")


def script_dir(store: MailStore, user: str) -> Path:
    return store.root / user / "sieve"


class _Quit(Exception):
    pass


class _Session:
    def __init__(
        self, store: MailStore, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.store = store
        self.reader = reader
        self.writer = writer
        self.buffer = LineBuffer(_LIMIT)
        self.lines = LogicalLines(self.buffer, _LIMIT)
        self.account: Account | None = None

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self, status: str, text: str, code: bytes = b"") -> None:
        code_part = b"(" + code + b") " if code else b""
        await self.send(status.encode() + b" " + code_part + encode_string(text.encode()) + b"\r\n")

    async def next_tokens(self) -> list[Token]:
        while True:
            try:
                raw = self.lines.next()
            except LineTooLong:
                await self.send(b'BYE "Line too long."\r\n')
                raise _Quit from None
            if raw is not None:
                try:
                    return parse_line(raw)
                except SieveSyntaxError:
                    return []
            chunk = await self.reader.read(65536)
            if not chunk:
                raise _Quit
            self.buffer.feed(chunk)

    def capabilities(self) -> bytes:
        lines = [
            encode_string(k.encode()) + b" " + encode_string(v.encode()) for k, v in CAPABILITIES
        ]
        return b"".join(line + b"\r\n" for line in lines)

    async def run(self) -> None:
        await self.send(self.capabilities() + b'OK "embedded sieve backend ready."\r\n')
        try:
            while True:
                tokens = await self.next_tokens()
                if not tokens or tokens[0].kind is not TokenKind.ATOM:
                    await self.reply("NO", "Syntax error.")
                    continue
                verb = tokens[0].value.upper().decode("ascii", "replace")
                args = tokens[1:]
                if any(t.kind is not TokenKind.STRING for t in args):
                    await self.reply("NO", "Syntax error.")
                    continue
                await self.dispatch(verb, [t.value for t in args])
        except _Quit:
            pass

    async def dispatch(self, verb: str, args: list[bytes]) -> None:
        if verb == "CAPABILITY":
            await self.send(self.capabilities() + b'OK "Capability completed."\r\n')
        elif verb == "NOOP":
            await self.reply("OK", "NOOP completed.")
        elif verb == "LOGOUT":
            await self.reply("OK", "Logout completed.")
            raise _Quit
        elif self.account is None:
            if verb == "AUTHENTICATE":
                await self.authenticate(args)
            else:
                await self.reply("NO", "Authenticate first.")
        else:
            await self.authenticated(verb, args)

    async def authenticate(self, args: list[bytes]) -> None:
        if not args or args[0].upper() != b"PLAIN" or len(args) > 2:
            await self.reply("NO", "Unsupported authentication mechanism.")
            return
        if len(args) == 2:
            encoded = args[1]
        else:
            await self.send(b'""\r\n')
            response = await self.next_tokens()
            if len(response) != 1 or response[0].kind is not TokenKind.STRING:
                await self.reply("NO", "Malformed authentication data.")
                return
            encoded = response[0].value
        if encoded == b"*":
            await self.reply("NO", "Authentication cancelled.")
            return
        try:
            parts = base64.b64decode(encoded, validate=True).split(b"\0")
            authzid, authcid, password = (p.decode("utf-8") for p in parts)
        except (binascii.Error, ValueError, UnicodeDecodeError):
            await self.reply("NO", "Malformed authentication data.")
            return
        account = self.store.check_plain(authzid, authcid, password)
        if account is None:
            await self.reply("NO", "Authentication failed.")
            return
        self.account = account
        self.store.record(LoginRecord("managesieve", "PLAIN", account.user, account.authcid))
        script_dir(self.store, account.user).mkdir(parents=True, exist_ok=True)
        await self.reply("OK", "Logged in.")

    def path(self, name: bytes) -> Path | None:
        assert self.account is not None
        try:
            text = name.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if not _NAME.fullmatch(text):
            return None
        return script_dir(self.store, self.account.user) / f"{text}.sieve"

    def active(self) -> str:
        assert self.account is not None
        marker = script_dir(self.store, self.account.user) / ".active"
        return marker.read_text("utf-8") if marker.exists() else ""

    async def authenticated(self, verb: str, args: list[bytes]) -> None:
        assert self.account is not None
        folder = script_dir(self.store, self.account.user)
        path = self.path(args[0]) if args else None
        if verb == "LISTSCRIPTS":
            active = self.active()
            out = bytearray()
            for found in sorted(folder.glob("*.sieve")):
                out += encode_string(found.stem.encode())
                out += b" ACTIVE\r\n" if found.stem == active else b"\r\n"
            await self.send(bytes(out) + b'OK "Listscripts completed."\r\n')
        elif verb in ("HAVESPACE", "CHECKSCRIPT"):
            await self.reply("OK", "Done.")
        elif verb == "SETACTIVE" and args == [b""]:
            (folder / ".active").unlink(missing_ok=True)
            await self.reply("OK", "Setactive completed.")
        elif path is None:
            await self.reply("NO", "Unknown command or bad arguments.")
        elif verb == "PUTSCRIPT" and len(args) == 2:
            path.write_bytes(args[1])
            await self.reply("OK", "Putscript completed.")
        elif verb in ("GETSCRIPT", "SETACTIVE", "DELETESCRIPT") and len(args) == 1:
            if not path.exists():
                await self.reply("NO", "Script does not exist.", b"NONEXISTENT")
            elif verb == "GETSCRIPT":
                script = encode_string(path.read_bytes())
                await self.send(script + b'\r\nOK "Getscript completed."\r\n')
            elif verb == "SETACTIVE":
                (folder / ".active").write_text(path.stem, "utf-8")
                await self.reply("OK", "Setactive completed.")
            elif path.stem == self.active():
                await self.reply("NO", "Script is active.", b"ACTIVE")
            else:
                path.unlink()
                await self.reply("OK", "Deletescript completed.")
        else:
            await self.reply("NO", "Unknown command or bad arguments.")


async def start_sieve_backend(
    store: MailStore,
    host: str = "127.0.0.1",
    port: int = 0,
    ssl_context: ssl.SSLContext | None = None,
) -> ServerHandle:
    """Start the ManageSieve backend on ``host:port`` (0: an ephemeral port)."""

    return await serve_sessions(
        lambda reader, writer: _Session(store, reader, writer).run(),
        log=log,
        name="ManageSieve",
        host=host,
        port=port,
        store=store,
        protocol="managesieve",
        ssl_context=ssl_context,
        limit=_LIMIT,
    )
