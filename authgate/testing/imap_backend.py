"""A small IMAP4rev1 backend (RFC 3501 subset) over a Maildir, for the demo and tests.

Supported: CAPABILITY, NOOP, LOGOUT, ID (RFC 2971), LOGIN, AUTHENTICATE PLAIN with
SASL-IR (RFC 4959) or a continuation, LIST/LSUB, STATUS, SELECT/EXAMINE of INBOX,
FETCH / UID FETCH (FLAGS, UID, INTERNALDATE, RFC822.SIZE, RFC822, RFC822.HEADER,
RFC822.TEXT, BODY[] / BODY[HEADER] / BODY[TEXT] and their .PEEK forms, partial
``<o.n>``, FAST), STORE / UID STORE of the system flags, EXPUNGE, CHECK, CLOSE and
UNSELECT (RFC 3691).  No SEARCH, COPY, APPEND or folders other than INBOX.

A login with SASL PLAIN whose authzid names a user and whose authcid/password are the
master user's logs in as that user (Dovecot master users).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import ssl
import time
from dataclasses import dataclass
from typing import BinaryIO, TypeAlias

from authgate.testing.maildir import (
    DRAFT,
    FLAGGED,
    REPLIED,
    SEEN,
    TRASHED,
    Account,
    LoginRecord,
    Maildir,
    MailStore,
    ServerHandle,
    StoredMessage,
    parse_plain,
    serve_sessions,
)

__all__ = ["POST_LOGIN_CAPABILITIES", "PRE_LOGIN_CAPABILITIES", "start_imap_backend"]

log = logging.getLogger(__name__)

PRE_LOGIN_CAPABILITIES = "IMAP4rev1 SASL-IR AUTH=PLAIN ID"
POST_LOGIN_CAPABILITIES = "IMAP4rev1 ID UNSELECT"

_LINE_LIMIT = 64 * 1024
# Largest literal accepted in a command: before login only credentials travel.
_LITERAL_LIMIT_PRE_AUTH = 8 * 1024
_LITERAL_LIMIT = 1024 * 1024
_CHUNK = 64 * 1024

# IMAP system flags <-> Maildir info letters (\Recent is per session, never stored).
_FLAG_LETTERS = {
    "\\SEEN": SEEN,
    "\\ANSWERED": REPLIED,
    "\\FLAGGED": FLAGGED,
    "\\DELETED": TRASHED,
    "\\DRAFT": DRAFT,
}
_LETTER_FLAGS = {
    SEEN: "\\Seen",
    REPLIED: "\\Answered",
    FLAGGED: "\\Flagged",
    TRASHED: "\\Deleted",
    DRAFT: "\\Draft",
}
_SYSTEM_FLAGS = "\\Answered \\Flagged \\Deleted \\Seen \\Draft"

_LITERAL_AT_END = re.compile(rb"\{(\d{1,10})(\+?)\}\r?\n\Z")
_LITERAL = re.compile(rb"\{(\d{1,10})\+?\}\r\n")
_BODY_ITEM = re.compile(r"BODY(\.PEEK)?\[([A-Z0-9.]*)\](?:<(\d{1,10})\.(\d{1,10})>)?\Z")
_SEQ_RANGE = re.compile(r"(\d{1,10}|\*)(?::(\d{1,10}|\*))?\Z")
_TAG = re.compile(r"[\x21-\x7e]+\Z")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

Token: TypeAlias = "str | bytes | list[Token]"  # noqa: S105 (not a password)
"""An atom (str, may carry a ``[...]`` section), a string (bytes) or a list."""


class _Bad(Exception):
    """The command is malformed: answer BAD with this text."""


class _No(Exception):
    """The command is well formed but fails: answer NO with this text."""


class _Disconnect(Exception):
    """End the session (after LOGOUT or on an unrecoverable input error)."""


# --- Parsing ------------------------------------------------------------------------


def _tokenize(line: bytes) -> list[Token]:
    """Tokenize one command (literals already inlined as ``{n}\\r\\n<n bytes>``)."""
    stack: list[list[Token]] = [[]]
    i, n = 0, len(line)
    while i < n:
        c = line[i : i + 1]
        if c == b" ":
            i += 1
        elif c == b"(":
            child: list[Token] = []
            stack[-1].append(child)
            stack.append(child)
            i += 1
        elif c == b")":
            if len(stack) == 1:
                raise _Bad("Unbalanced parenthesis")
            stack.pop()
            i += 1
        elif c == b'"':
            value, i = _quoted(line, i + 1)
            stack[-1].append(value)
        elif c == b"{":
            match = _LITERAL.match(line, i)
            if match is None:
                raise _Bad("Malformed literal")
            start = match.end()
            end = start + int(match.group(1))
            if end > n:
                raise _Bad("Truncated literal")
            stack[-1].append(line[start:end])
            i = end
        else:
            atom, i = _atom(line, i)
            stack[-1].append(atom)
    if len(stack) != 1:
        raise _Bad("Unbalanced parenthesis")
    return stack[0]


def _quoted(line: bytes, i: int) -> tuple[bytes, int]:
    out = bytearray()
    while i < len(line):
        c = line[i]
        if c == 0x22:  # closing quote
            return bytes(out), i + 1
        if c == 0x5C:  # backslash: only \" and \\ are valid quoted-specials
            if i + 1 >= len(line) or line[i + 1] not in b'"\\':
                raise _Bad("Invalid escape in quoted string")
            i += 1
            c = line[i]
        elif c in b"\r\n":
            raise _Bad("Line break in quoted string")
        out.append(c)
        i += 1
    raise _Bad("Unterminated quoted string")


def _atom(line: bytes, i: int) -> tuple[str, int]:
    # An atom runs to SP or a parenthesis, except that a fetch section such as
    # BODY[HEADER.FIELDS (From)] keeps its bracketed part, spaces and all.
    start, depth = i, 0
    while i < len(line):
        c = line[i : i + 1]
        if c == b"[":
            depth += 1
        elif c == b"]":
            depth = max(depth - 1, 0)
        elif depth == 0 and c in b" ()":
            break
        elif depth == 0 and (c in b'"{' or line[i] < 0x21 or line[i] > 0x7E):
            raise _Bad("Invalid character in atom")
        i += 1
    try:
        return line[start:i].decode("ascii"), i
    except UnicodeDecodeError:
        raise _Bad("Invalid character in atom") from None


def _astring(token: Token) -> str:
    """An astring (atom or string) as text; strings must be UTF-8."""
    if isinstance(token, str):
        return token
    if isinstance(token, bytes):
        try:
            return token.decode("utf-8")
        except UnicodeDecodeError:
            raise _Bad("String is not UTF-8") from None
    raise _Bad("Expected a string, got a list")


def _nstring(token: Token) -> str | None:
    if isinstance(token, str) and token.upper() == "NIL":
        return None
    return _astring(token)


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _sequence_numbers(text: str, *, count: int, uids: list[int] | None) -> list[int]:
    """Resolve a sequence set to sequence numbers (1-based, ascending).

    With ``uids`` (UID commands) the set is of UIDs and ``*`` is the highest UID in
    use; numbers without a message are ignored (RFC 3501 section 6.4.8).  Without, the
    set is of sequence numbers, each of which must exist.
    """
    ranges: list[tuple[int, int]] = []
    for part in text.split(","):
        match = _SEQ_RANGE.match(part)
        if match is None:
            raise _Bad("Invalid sequence set")
        first, last = match.group(1), match.group(2) or match.group(1)
        if any(v != "*" and int(v) == 0 for v in (first, last)):
            raise _Bad("Invalid sequence set")  # nz-number (RFC 3501 section 9)
        # In an empty mailbox a UID "*" matches nothing: "UID FETCH 1:*" is fine there.
        highest = count if uids is None else (uids[-1] if uids else 0)
        a, b = (highest if v == "*" else int(v) for v in (first, last))
        if uids is None and not 1 <= min(a, b) <= max(a, b) <= count:
            raise _Bad("Invalid sequence set")
        ranges.append((min(a, b), max(a, b)))
    values = uids if uids is not None else range(1, count + 1)
    return [
        seq
        for seq, value in enumerate(values, start=1)
        if any(lo <= value <= hi for lo, hi in ranges)
    ]


def _internaldate(mtime: float) -> str:
    t = time.gmtime(mtime)
    month = _MONTHS[t.tm_mon - 1]
    clock = f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
    return f'"{t.tm_mday:02d}-{month}-{t.tm_year:04d} {clock} +0000"'


def _header_length(f: BinaryIO) -> int:
    """Octets of the header including the blank line that ends it (RFC 3501 6.4.5)."""
    f.seek(0)
    first = f.read(2)
    if first == b"\r\n":
        return 2  # no header fields at all: the header is just the empty line
    f.seek(0)
    offset, tail = 0, b""
    while chunk := f.read(_CHUNK):
        data = tail + chunk
        found = data.find(b"\r\n\r\n")
        if found >= 0:
            return offset - len(tail) + found + 4
        tail = data[-3:]
        offset += len(chunk)
    return offset  # no blank line: the whole message is header


# --- The session ----------------------------------------------------------------------


@dataclass
class _Message:
    uid: int
    stored: StoredMessage
    recent: bool


@dataclass
class _FetchItem:
    name: str  # the item name as it appears in the response
    kind: str  # FLAGS, UID, INTERNALDATE, RFC822.SIZE or SECTION
    section: str = ""  # "", HEADER or TEXT
    partial: tuple[int, int] | None = None
    sets_seen: bool = False


_Part: TypeAlias = "bytes | tuple[int, int]"
"""A piece of a FETCH response: bytes, or an (offset, length) range of the message file."""


class _Session:
    def __init__(
        self, store: MailStore, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.store = store
        self.reader = reader
        self.writer = writer
        self.account: Account | None = None
        self.client_id: dict[str, str | None] | None = None
        self.box: Maildir | None = None
        self.read_only = False
        self.messages: list[_Message] = []

    # -- I/O --

    async def send(self, line: str | bytes) -> None:
        data = line.encode("utf-8") if isinstance(line, str) else line
        self.writer.write(data + b"\r\n")
        await self.writer.drain()

    async def read_line(self) -> bytes:
        try:
            line = await self.reader.readline()
        except ValueError:  # longer than the stream limit; the data is discarded
            await self.send("* BYE Line too long")
            raise _Disconnect from None
        if not line.endswith(b"\n"):
            raise _Disconnect  # EOF
        return line

    async def read_command(self) -> bytes:
        """One command with its literals inlined (RFC 3501 section 4.3)."""
        parts: list[bytes] = []
        total = 0
        limit = _LITERAL_LIMIT if self.account else _LITERAL_LIMIT_PRE_AUTH
        while True:
            line = await self.read_line()
            match = _LITERAL_AT_END.search(line)
            if match is None:
                parts.append(line.rstrip(b"\r\n"))
                return b"".join(parts)
            size = int(match.group(1))
            # Count the lines too, or a chain of {0} literals would grow forever.
            total += size + len(line)
            if total > limit:
                await self.send("* BYE Literal too large")
                raise _Disconnect
            parts.append(line[: match.end(2) + 1] + b"\r\n")
            if not match.group(2):  # synchronizing literal: ask for the data
                await self.send("+ Ready for literal data")
            parts.append(await self.reader.readexactly(size))

    # -- main loop --

    async def run(self) -> None:
        await self.send(f"* OK [CAPABILITY {PRE_LOGIN_CAPABILITIES}] ready")
        try:
            while True:
                await self.one_command()
        except _Disconnect:
            pass

    async def one_command(self) -> None:
        raw = await self.read_command()
        if not raw.strip():
            return
        tag = "*"
        try:
            tokens = _tokenize(raw)
            if not tokens or not isinstance(tokens[0], str) or not _TAG.match(tokens[0]):
                raise _Bad("Missing or invalid tag")
            if "+" in tokens[0]:
                raise _Bad("Invalid tag")
            tag = tokens[0]
            if len(tokens) < 2 or not isinstance(tokens[1], str):
                raise _Bad("Missing command")
            command = tokens[1].upper()
            await self.dispatch(tag, command, tokens[2:])
        except _Bad as exc:
            await self.send(f"{tag} BAD {exc}")
        except _No as exc:
            await self.send(f"{tag} NO {exc}")

    async def dispatch(self, tag: str, command: str, args: list[Token]) -> None:
        any_state = {
            "CAPABILITY": self.cmd_capability,
            "NOOP": self.cmd_noop,
            "LOGOUT": self.cmd_logout,
            "ID": self.cmd_id,
        }
        not_authenticated = {"LOGIN": self.cmd_login, "AUTHENTICATE": self.cmd_authenticate}
        authenticated = {
            "SELECT": self.cmd_select,
            "EXAMINE": self.cmd_select,
            "LIST": self.cmd_list,
            "LSUB": self.cmd_list,
            "STATUS": self.cmd_status,
        }
        selected = {
            "FETCH": self.cmd_fetch,
            "STORE": self.cmd_store,
            "UID": self.cmd_uid,
            "EXPUNGE": self.cmd_expunge,
            "CHECK": self.cmd_check,
            "CLOSE": self.cmd_close,
            "UNSELECT": self.cmd_unselect,
        }
        unsupported = {
            "CREATE", "DELETE", "RENAME", "SUBSCRIBE", "UNSUBSCRIBE", "APPEND", "SEARCH",
            "COPY", "STARTTLS", "IDLE",
        }  # fmt: skip
        if command in any_state:
            await any_state[command](tag, command, args)
        elif command in not_authenticated:
            if self.account is not None:
                raise _Bad("Already logged in")
            await not_authenticated[command](tag, command, args)
        elif command in authenticated:
            self.require_auth()
            await authenticated[command](tag, command, args)
        elif command in selected:
            self.require_auth()
            if self.box is None:
                raise _Bad("No mailbox selected")
            await selected[command](tag, command, args)
        elif command in unsupported:
            raise _No(f"[CANNOT] {command} is not supported by this test backend")
        else:
            raise _Bad("Unknown command")

    def require_auth(self) -> None:
        if self.account is None:
            raise _Bad("Log in first")

    # -- any state --

    async def cmd_capability(self, tag: str, command: str, args: list[Token]) -> None:
        caps = POST_LOGIN_CAPABILITIES if self.account else PRE_LOGIN_CAPABILITIES
        await self.send(f"* CAPABILITY {caps}")
        await self.send(f"{tag} OK CAPABILITY completed")

    async def cmd_noop(self, tag: str, command: str, args: list[Token]) -> None:
        if self.box is not None:
            await self.sync()
        await self.send(f"{tag} OK {command} completed")

    async def cmd_logout(self, tag: str, command: str, args: list[Token]) -> None:
        await self.send("* BYE Logging out")
        await self.send(f"{tag} OK LOGOUT completed")
        raise _Disconnect

    async def cmd_id(self, tag: str, command: str, args: list[Token]) -> None:
        # RFC 2971: ID NIL or a list of field/value pairs; remembered for LoginRecord
        # so tests can check e.g. the x-originating-ip authgate forwards.
        if len(args) != 1:
            raise _Bad("ID takes one argument")
        params = args[0]
        if isinstance(params, list):
            if len(params) % 2:
                raise _Bad("ID list must hold field/value pairs")
            fields: dict[str, str | None] = {}
            for key, value in zip(params[::2], params[1::2], strict=True):
                if not isinstance(key, bytes):
                    raise _Bad("ID field names are strings")
                fields[_astring(key)] = _nstring(value)
            self.client_id = fields
        elif not (isinstance(params, str) and params.upper() == "NIL"):
            raise _Bad("ID takes NIL or a list")
        await self.send('* ID ("name" "authgate-test-imap")')
        await self.send(f"{tag} OK ID completed")

    # -- not authenticated --

    async def cmd_login(self, tag: str, command: str, args: list[Token]) -> None:
        if len(args) != 2:
            raise _Bad("LOGIN takes a user name and a password")
        user, password = _astring(args[0]), _astring(args[1])
        account = self.store.check_password(user, password)
        await self.finish_login(tag, account, "LOGIN")

    async def cmd_authenticate(self, tag: str, command: str, args: list[Token]) -> None:
        if not 1 <= len(args) <= 2 or not all(isinstance(a, str) for a in args):
            raise _Bad("AUTHENTICATE takes a mechanism and an optional initial response")
        mechanism = _astring(args[0]).upper()
        if mechanism != "PLAIN":
            raise _No("Unsupported authentication mechanism")
        if len(args) == 2:
            # RFC 4959: "=" stands for an empty initial response.
            encoded = _astring(args[1]).encode("ascii")
            encoded = b"" if encoded == b"=" else encoded
        else:
            await self.send("+ ")
            encoded = (await self.read_line()).rstrip(b"\r\n")
            if encoded == b"*":
                # RFC 3501 section 6.2.2: a cancelled exchange gets a tagged BAD.
                raise _Bad("Authentication cancelled")
        try:
            message = base64.b64decode(encoded, validate=True)
        except binascii.Error:
            raise _Bad("Invalid base64 in SASL response") from None
        plain = parse_plain(message)
        account = self.store.check_plain(*plain) if plain else None
        await self.finish_login(tag, account, "PLAIN")

    async def finish_login(self, tag: str, account: Account | None, mechanism: str) -> None:
        if account is None:
            # RFC 5530 response code; the text never says which part was wrong.
            raise _No("[AUTHENTICATIONFAILED] Authentication failed.")
        self.account = account
        self.store.record(
            LoginRecord("imap", mechanism, account.user, account.authcid, self.client_id)
        )
        await self.send(f"{tag} OK [CAPABILITY {POST_LOGIN_CAPABILITIES}] Logged in")

    # -- authenticated --

    def mailbox_name(self, token: Token) -> str:
        name = _astring(token)
        if name.upper() != "INBOX":
            raise _No("[NONEXISTENT] Mailbox does not exist (only INBOX here)")
        return "INBOX"

    async def cmd_select(self, tag: str, command: str, args: list[Token]) -> None:
        if len(args) != 1:
            raise _Bad(f"{command} takes a mailbox name")
        # A SELECT deselects the current mailbox even when it fails (RFC 3501 6.3.1).
        self.box, self.messages = None, []
        self.mailbox_name(args[0])
        assert self.account is not None
        box = self.store.maildir(self.account.user)
        read_only = command == "EXAMINE"
        messages = []
        for uid, stored in self.store.uids(self.account.user).assign(box.scan()):
            recent = stored.is_new
            if recent and not read_only:
                stored = self.claim(box, stored)
            messages.append(_Message(uid, stored, recent))
        self.box, self.read_only, self.messages = box, read_only, messages
        registry = self.store.uids(self.account.user)
        await self.send(f"* FLAGS ({_SYSTEM_FLAGS})")
        permanent = "" if read_only else _SYSTEM_FLAGS
        await self.send(f"* OK [PERMANENTFLAGS ({permanent})] Flags permitted")
        await self.send(f"* {len(messages)} EXISTS")
        await self.send(f"* {sum(m.recent for m in messages)} RECENT")
        unseen = next((i for i, m in enumerate(messages, 1) if SEEN not in m.stored.flags), 0)
        if unseen:
            await self.send(f"* OK [UNSEEN {unseen}] First unseen message")
        await self.send(f"* OK [UIDVALIDITY {registry.uidvalidity}] UIDs valid")
        await self.send(f"* OK [UIDNEXT {registry.uidnext}] Predicted next UID")
        mode = "READ-ONLY" if read_only else "READ-WRITE"
        await self.send(f"{tag} OK [{mode}] {command} completed")

    @staticmethod
    def claim(box: Maildir, stored: StoredMessage) -> StoredMessage:
        """Move a message from new/ to cur/: it is now known to a client (Maildir spec)."""
        try:
            return box.set_flags(stored, stored.flags)
        except FileNotFoundError:
            return stored  # gone meanwhile; the next sync reports the expunge

    async def cmd_list(self, tag: str, command: str, args: list[Token]) -> None:
        if len(args) != 2:
            raise _Bad(f"{command} takes a reference and a pattern")
        reference, pattern = _astring(args[0]), _astring(args[1])
        if command == "LIST" and not pattern:
            # An empty pattern asks for the hierarchy delimiter (RFC 3501 6.3.8).
            await self.send('* LIST (\\Noselect) "/" ""')
        else:
            regex = "".join(
                "[^/]*" if c == "%" else ".*" if c == "*" else re.escape(c)
                for c in reference + pattern
            )
            if re.fullmatch(regex, "INBOX", re.IGNORECASE):
                await self.send(f'* {command} () "/" INBOX')
        await self.send(f"{tag} OK {command} completed")

    async def cmd_status(self, tag: str, command: str, args: list[Token]) -> None:
        if len(args) != 2 or not isinstance(args[1], list):
            raise _Bad("STATUS takes a mailbox and a list of items")
        self.mailbox_name(args[0])
        assert self.account is not None
        box = self.store.maildir(self.account.user)
        registry = self.store.uids(self.account.user)
        messages = [stored for _, stored in registry.assign(box.scan())]
        values = {
            "MESSAGES": len(messages),
            "RECENT": sum(m.is_new for m in messages),
            "UIDNEXT": registry.uidnext,
            "UIDVALIDITY": registry.uidvalidity,
            "UNSEEN": sum(SEEN not in m.flags for m in messages),
        }
        out = []
        for item in args[1]:
            name = item.upper() if isinstance(item, str) else ""
            if name not in values:
                raise _Bad("Unknown STATUS item")
            out.append(f"{name} {values[name]}")
        await self.send(f"* STATUS INBOX ({' '.join(out)})")
        await self.send(f"{tag} OK STATUS completed")

    # -- selected --

    def flag_list(self, message: _Message) -> str:
        flags = [_LETTER_FLAGS[c] for c in message.stored.flags if c in _LETTER_FLAGS]
        if message.recent:
            flags.append("\\Recent")
        return "(" + " ".join(flags) + ")"

    async def sync(self) -> None:
        """Report what changed on disk since the last look (other sessions, deliveries)."""
        assert self.box is not None and self.account is not None
        on_disk = {stored.key: stored for stored in self.box.scan()}
        for seq in range(len(self.messages), 0, -1):
            # Descending, so each EXPUNGE's number is still valid when it is sent.
            message = self.messages[seq - 1]
            if message.stored.key not in on_disk:
                del self.messages[seq - 1]
                await self.send(f"* {seq} EXPUNGE")
        known = {m.stored.key for m in self.messages}
        for seq, message in enumerate(self.messages, start=1):
            current = on_disk[message.stored.key]
            changed = current.flags != message.stored.flags
            message.stored = current
            if changed:
                await self.send(f"* {seq} FETCH (FLAGS {self.flag_list(message)})")
        registry = self.store.uids(self.account.user)
        added = 0
        for uid, stored in registry.assign(on_disk.values()):
            if stored.key in known:
                continue
            recent = stored.is_new
            if recent and not self.read_only:
                stored = self.claim(self.box, stored)
            self.messages.append(_Message(uid, stored, recent))
            added += 1
        if added:
            await self.send(f"* {len(self.messages)} EXISTS")
            await self.send(f"* {sum(m.recent for m in self.messages)} RECENT")

    async def cmd_check(self, tag: str, command: str, args: list[Token]) -> None:
        await self.sync()
        await self.send(f"{tag} OK CHECK completed")

    async def cmd_close(self, tag: str, command: str, args: list[Token]) -> None:
        # CLOSE expunges silently (no untagged EXPUNGE) unless read-only (6.4.2).
        if not self.read_only:
            assert self.box is not None
            for message in self.messages:
                if TRASHED in message.stored.flags:
                    self.box.remove(message.stored)
        self.box, self.messages = None, []
        await self.send(f"{tag} OK CLOSE completed")

    async def cmd_unselect(self, tag: str, command: str, args: list[Token]) -> None:
        self.box, self.messages = None, []
        await self.send(f"{tag} OK UNSELECT completed")

    async def cmd_expunge(self, tag: str, command: str, args: list[Token]) -> None:
        if self.read_only:
            raise _No("[READ-ONLY] Mailbox is read-only")
        assert self.box is not None
        for seq in range(len(self.messages), 0, -1):
            message = self.messages[seq - 1]
            if TRASHED in message.stored.flags:
                self.box.remove(message.stored)
                del self.messages[seq - 1]
                await self.send(f"* {seq} EXPUNGE")
        await self.send(f"{tag} OK EXPUNGE completed")

    async def cmd_uid(self, tag: str, command: str, args: list[Token]) -> None:
        if not args or not isinstance(args[0], str):
            raise _Bad("UID needs a command")
        sub = args[0].upper()
        if sub == "FETCH":
            await self.fetch(tag, args[1:], by_uid=True)
        elif sub == "STORE":
            await self.store_flags(tag, args[1:], by_uid=True)
        elif sub in ("SEARCH", "COPY"):
            raise _No(f"[CANNOT] UID {sub} is not supported by this test backend")
        else:
            raise _Bad("Unknown UID command")

    async def cmd_fetch(self, tag: str, command: str, args: list[Token]) -> None:
        await self.fetch(tag, args, by_uid=False)

    async def cmd_store(self, tag: str, command: str, args: list[Token]) -> None:
        await self.store_flags(tag, args, by_uid=False)

    def resolve_set(self, token: Token, by_uid: bool) -> list[int]:
        if not isinstance(token, str):
            raise _Bad("Invalid sequence set")
        uids = [m.uid for m in self.messages] if by_uid else None
        return _sequence_numbers(token, count=len(self.messages), uids=uids)

    # FETCH

    @staticmethod
    def parse_fetch_items(token: Token, by_uid: bool) -> list[_FetchItem]:
        names = token if isinstance(token, list) else [token]
        if not names:
            raise _Bad("Empty FETCH item list")
        items: list[_FetchItem] = []
        for name in names:
            if not isinstance(name, str):
                raise _Bad("Invalid FETCH item")
            upper = name.upper()
            if upper == "FAST" and not isinstance(token, list):
                items += [
                    _FetchItem("FLAGS", "FLAGS"),
                    _FetchItem("INTERNALDATE", "INTERNALDATE"),
                    _FetchItem("RFC822.SIZE", "RFC822.SIZE"),
                ]
            elif upper in ("FLAGS", "UID", "INTERNALDATE", "RFC822.SIZE"):
                items.append(_FetchItem(upper, upper))
            elif upper in ("RFC822", "RFC822.TEXT", "RFC822.HEADER"):
                part = {"RFC822": "", "RFC822.TEXT": "TEXT", "RFC822.HEADER": "HEADER"}[upper]
                # RFC822.HEADER is the same as BODY.PEEK[HEADER]: it does not set \Seen.
                sets_seen = upper != "RFC822.HEADER"
                items.append(_FetchItem(upper, "SECTION", part, None, sets_seen))
            elif match := _BODY_ITEM.match(upper):
                peek, section, origin, length = match.groups()
                if section not in ("", "HEADER", "TEXT"):
                    raise _Bad(f"Unsupported section BODY[{section}]")
                partial = (int(origin), int(length)) if origin is not None else None
                label = f"BODY[{section}]" + (f"<{origin}>" if origin is not None else "")
                items.append(_FetchItem(label, "SECTION", section, partial, not peek))
            else:
                raise _Bad(f"Unsupported FETCH item {name}")
        if by_uid and not any(item.kind == "UID" for item in items):
            # UID FETCH responses always carry the UID (RFC 3501 section 6.4.8).
            items.insert(0, _FetchItem("UID", "UID"))
        return items

    async def fetch(self, tag: str, args: list[Token], *, by_uid: bool) -> None:
        if len(args) != 2:
            raise _Bad("FETCH takes a sequence set and items")
        sequence = self.resolve_set(args[0], by_uid)
        items = self.parse_fetch_items(args[1], by_uid)
        marks_seen = not self.read_only and any(item.sets_seen for item in items)
        if marks_seen and not any(item.kind == "FLAGS" for item in items):
            # When the implicit \Seen changes the flags they SHOULD be sent (6.4.5).
            items.append(_FetchItem("FLAGS", "FLAGS"))
        missing = False
        for seq in sequence:
            message = self.messages[seq - 1]
            try:
                await self.fetch_one(seq, message, items, marks_seen)
            except FileNotFoundError:
                missing = True  # removed by another session since our last sync
        if missing:
            raise _No("[EXPUNGEISSUED] Some messages were expunged meanwhile")
        await self.send(f"{tag} OK FETCH completed")

    async def fetch_one(
        self, seq: int, message: _Message, items: list[_FetchItem], marks_seen: bool
    ) -> None:
        assert self.box is not None
        if marks_seen and SEEN not in message.stored.flags:
            message.stored = self.box.set_flags(message.stored, message.stored.flags + SEEN)
        needs_file = any(item.kind == "SECTION" for item in items)
        f = self.box.open(message.stored) if needs_file else None
        try:
            parts: list[_Part] = [f"* {seq} FETCH (".encode()]
            header_length: int | None = None
            size = message.stored.size
            for index, item in enumerate(items):
                if index:
                    parts.append(b" ")
                if item.kind == "FLAGS":
                    parts.append(f"FLAGS {self.flag_list(message)}".encode())
                elif item.kind == "UID":
                    parts.append(f"UID {message.uid}".encode())
                elif item.kind == "INTERNALDATE":
                    parts.append(f"INTERNALDATE {_internaldate(message.stored.mtime)}".encode())
                elif item.kind == "RFC822.SIZE":
                    parts.append(f"RFC822.SIZE {size}".encode())
                else:
                    assert f is not None
                    start, length = 0, size
                    if item.section:
                        if header_length is None:
                            header_length = _header_length(f)
                        if item.section == "HEADER":
                            length = header_length
                        else:
                            start, length = header_length, size - header_length
                    if item.partial is not None:
                        origin = min(item.partial[0], length)
                        start, length = start + origin, min(item.partial[1], length - origin)
                    parts.append(f"{item.name} {{{length}}}\r\n".encode())
                    parts.append((start, length))
            parts.append(b")\r\n")
            await self.write_parts(parts, f)
        finally:
            if f is not None:
                f.close()

    async def write_parts(self, parts: list[_Part], f: BinaryIO | None) -> None:
        """Write a FETCH response, copying message ranges in chunks (no big buffers)."""
        for part in parts:
            if isinstance(part, bytes):
                self.writer.write(part)
                continue
            assert f is not None
            start, remaining = part
            f.seek(start)
            while remaining > 0:
                chunk = f.read(min(_CHUNK, remaining))
                if not chunk:
                    # The file shrank under us: we promised {length} octets, so the
                    # only honest way out is to drop the connection.
                    raise _Disconnect
                remaining -= len(chunk)
                self.writer.write(chunk)
                await self.writer.drain()
        await self.writer.drain()

    # STORE

    async def store_flags(self, tag: str, args: list[Token], *, by_uid: bool) -> None:
        if len(args) < 3 or not isinstance(args[1], str):
            raise _Bad("STORE takes a sequence set, an item and flags")
        sequence = self.resolve_set(args[0], by_uid)
        item = args[1].upper()
        match = re.fullmatch(r"([+-]?)FLAGS(\.SILENT)?", item)
        if match is None:
            raise _Bad("Unknown STORE item")
        mode, silent = match.group(1), bool(match.group(2))
        flag_tokens = args[2] if len(args) == 3 and isinstance(args[2], list) else args[2:]
        letters = set()
        for flag in flag_tokens:
            if not isinstance(flag, str):
                raise _Bad("Invalid flag")
            upper = flag.upper()
            if upper in _FLAG_LETTERS:
                letters.add(_FLAG_LETTERS[upper])
            elif upper.startswith("\\"):
                # \Recent cannot be stored; other \-names are not flags at all.
                raise _Bad(f"Invalid flag {flag}")
            # Keywords are not in PERMANENTFLAGS: ignoring them is allowed (6.4.6).
        if self.read_only:
            raise _No("[READ-ONLY] Mailbox is read-only")
        assert self.box is not None
        missing = False
        for seq in sequence:
            message = self.messages[seq - 1]
            old = set(message.stored.flags)
            new = letters if not mode else old | letters if mode == "+" else old - letters
            try:
                if new != old:
                    message.stored = self.box.set_flags(message.stored, "".join(new))
            except FileNotFoundError:
                missing = True
                continue
            if not silent:
                uid = f"UID {message.uid} " if by_uid else ""
                await self.send(f"* {seq} FETCH ({uid}FLAGS {self.flag_list(message)})")
        if missing:
            raise _No("[EXPUNGEISSUED] Some messages were expunged meanwhile")
        await self.send(f"{tag} OK STORE completed")


async def start_imap_backend(
    store: MailStore,
    host: str = "127.0.0.1",
    port: int = 0,
    ssl_context: ssl.SSLContext | None = None,
) -> ServerHandle:
    """Start the IMAP backend on ``host:port`` (0: an ephemeral port)."""

    return await serve_sessions(
        lambda reader, writer: _Session(store, reader, writer).run(),
        log=log,
        name="IMAP",
        host=host,
        port=port,
        store=store,
        protocol="imap",
        ssl_context=ssl_context,
        limit=_LINE_LIMIT,
    )
