"""Transcripts: the exact bytes each way on every client connection of a
test stack, with the point where TLS started, and assertions a client
developer's test can make about them.

The recorder is a `Channel` subclass (the gateway's `channel_factory` makes
it), so it sees what the gateway's session and splice send and receive: the
plaintext on both sides of a STARTTLS, never the TLS records. Every chunk
is kept as it was written or received; `text()` renders them for a human
(and for the report section of a failing test).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from authgate.proxy.channel import Channel, Through

CLIENT: Literal["client"] = "client"
SERVER: Literal["server"] = "server"
Direction = Literal["client", "server"]

# Past this many bytes a transcript stops recording (and says so): a test
# that moves a large message must not hold it twice in memory.
MAX_RECORDED = 1024 * 1024

# The command a client asks for capabilities with, per protocol.
CAPABILITY_COMMANDS = {
    "imap": re.compile(rb"^\S+ CAPABILITY\s*$", re.I),
    "pop3": re.compile(rb"^CAPA\s*$", re.I),
    "smtp": re.compile(rb"^(EHLO|HELO|LHLO)\b", re.I),
    "managesieve": re.compile(rb"^CAPABILITY\s*$", re.I),
}
# The commands that only say goodbye: sending one after a refusal is stopping.
GOODBYE_COMMANDS = {
    "imap": re.compile(rb"^\S+ LOGOUT\s*$", re.I),
    "pop3": re.compile(rb"^QUIT\s*$", re.I),
    "smtp": re.compile(rb"^QUIT\s*$", re.I),
    "managesieve": re.compile(rb"^LOGOUT\s*$", re.I),
}
STARTTLS_COMMANDS = {
    "imap": re.compile(rb"^\S+ STARTTLS\s*$", re.I),
    "pop3": re.compile(rb"^STLS\s*$", re.I),
    "smtp": re.compile(rb"^STARTTLS\s*$", re.I),
    "managesieve": re.compile(rb"^STARTTLS\s*$", re.I),
}


@dataclass(frozen=True)
class Chunk:
    """Bytes one side sent, in the order they crossed, and whether they went
    inside TLS."""

    sender: Direction
    data: bytes
    tls: bool


class TranscriptAssertion(AssertionError):
    """A transcript assertion failed; the message carries the transcript."""


@dataclass
class Transcript:
    """One client connection to one listener of a stack."""

    listener: str
    protocol: str  # imap | pop3 | smtp | managesieve
    number: int  # 1 for the stack's first connection, and so on
    chunks: list[Chunk] = field(default_factory=list)
    tls: bool = False  # TLS has started (STARTTLS, or implicit from the first byte)
    implicit_tls: bool = False
    closed_by: Direction | None = None  # who closed first, when known
    truncated: bool = False
    _size: int = 0
    _ended: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    # ---------------------------------------------------------- recording

    def record(self, sender: Direction, data: bytes) -> None:
        if not data or self.truncated:
            return
        room = MAX_RECORDED - self._size
        if len(data) > room:
            self.truncated = True  # keep what fits: the start of a huge line says what it was
            data = data[:room]
            if not data:
                return
        self._size += len(data)
        self.chunks.append(Chunk(sender, bytes(data), self.tls))

    def mark_tls(self, *, implicit: bool = False) -> None:
        self.tls = True
        self.implicit_tls = implicit

    def mark_closed(self, by: Direction) -> None:
        if self.closed_by is None:
            self.closed_by = by

    def mark_ended(self) -> None:
        self._ended.set()

    @property
    def ended(self) -> bool:
        """The connection is gone."""
        return self._ended.is_set()

    async def wait_ended(self, timeout: float = 5.0) -> bool:
        """Wait (at most `timeout` s) for the connection to end; whether it did."""
        try:
            async with asyncio.timeout(timeout):
                await self._ended.wait()
        except TimeoutError:
            return False
        return True

    # ------------------------------------------------------------ reading

    def sent_by(self, sender: Direction, *, tls: bool | None = None) -> bytes:
        """Everything `sender` sent (tls False: before TLS; True: inside it)."""
        return b"".join(
            c.data for c in self.chunks if c.sender == sender and (tls is None or c.tls == tls)
        )

    def client_bytes(self, *, tls: bool | None = None) -> bytes:
        return self.sent_by(CLIENT, tls=tls)

    def server_bytes(self, *, tls: bool | None = None) -> bytes:
        return self.sent_by(SERVER, tls=tls)

    def lines(self, sender: Direction, *, tls: bool | None = None) -> list[bytes]:
        """`sender`'s lines without their line ends (a last unfinished line too)."""
        data = self.sent_by(sender, tls=tls)
        parts = data.split(b"\n")
        if parts and parts[-1] == b"":
            parts.pop()
        return [p.rstrip(b"\r") for p in parts]

    def client_lines(self, *, tls: bool | None = None) -> list[bytes]:
        return self.lines(CLIENT, tls=tls)

    def server_lines(self, *, tls: bool | None = None) -> list[bytes]:
        return self.lines(SERVER, tls=tls)

    def exchange(self) -> list[tuple[Direction, bytes, bool]]:
        """Every line in the order it crossed: (sender, line, inside TLS)."""
        out: list[tuple[Direction, bytes, bool]] = []
        pending: dict[Direction, bytes] = {CLIENT: b"", SERVER: b""}
        for chunk in self.chunks:
            data = pending[chunk.sender] + chunk.data
            *complete, rest = data.split(b"\n")
            pending[chunk.sender] = rest
            out += [(chunk.sender, line.rstrip(b"\r"), chunk.tls) for line in complete]
        out += [(sender, rest, self.tls) for sender, rest in pending.items() if rest]
        return out

    def text(self, *, width: int = 200) -> str:
        """The transcript for a human: C: and S: lines, TLS marked."""
        head = f"connection {self.number} to {self.listener} ({self.protocol})"
        if self.implicit_tls:
            head += ", implicit TLS"
        out = [head]
        in_tls = self.implicit_tls
        for sender, line, tls in self.exchange():
            if tls and not in_tls:
                out.append("--- TLS started ---")
                in_tls = True
            shown = repr(line)[2:-1]
            if len(shown) > width:
                shown = shown[:width] + f"... ({len(line)} bytes)"
            out.append(("C: " if sender == CLIENT else "S: ") + shown)
        if self.truncated:
            out.append(f"--- recording stopped at {MAX_RECORDED} bytes ---")
        if self.closed_by is not None:
            out.append(f"--- closed by the {self.closed_by} ---")
        return "\n".join(out)

    # --------------------------------------------------------- assertions

    def _fail(self, message: str) -> TranscriptAssertion:
        return TranscriptAssertion(f"{message}\n{self.text()}")

    def assert_tls_started(self) -> None:
        if not self.tls:
            raise self._fail("TLS never started on this connection")

    def assert_no_tls(self) -> None:
        if self.tls and not self.implicit_tls:
            raise self._fail("the client started TLS")

    def secret_before_tls(self, secret: str) -> bytes | None:
        """The first client line before TLS carrying `secret`: as typed,
        quoted (IMAP escapes), or inside base64 (AUTH PLAIN, AUTH LOGIN,
        an initial response); None when there is none."""
        if self.implicit_tls:
            return None
        raw = secret.encode()
        quoted = raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"')
        for line in self.client_lines(tls=False):
            if raw in line or quoted in line:
                return line
            for token in line.split():
                decoded = _b64(token.strip(b'"'))
                if decoded is not None and raw in decoded:
                    return line
        return None

    def assert_no_secret_before_tls(self, secret: str) -> None:
        """The password never crossed in the clear (raw, quoted, base64)."""
        line = self.secret_before_tls(secret)
        if line is not None:
            raise self._fail(f"the secret was sent before TLS: {line!r}")

    def client_commands_after(self, server_line: bytes | re.Pattern[bytes]) -> list[bytes]:
        """The client's lines after the first server line matching
        `server_line` (a substring, or a compiled pattern searched)."""
        match = _matcher(server_line)
        seen = False
        after: list[bytes] = []
        for sender, line, _ in self.exchange():
            if seen and sender == CLIENT:
                after.append(line)
            elif sender == SERVER and match(line):
                seen = True
        if not seen:
            raise self._fail(f"the server never said {server_line!r}")
        return after

    def assert_client_stopped_after(self, server_line: bytes | re.Pattern[bytes]) -> None:
        """After the server line matching `server_line` the client sent
        nothing but its protocol's goodbye (LOGOUT, QUIT)."""
        goodbye = GOODBYE_COMMANDS[self.protocol]
        more = [line for line in self.client_commands_after(server_line) if not goodbye.match(line)]
        if more:
            raise self._fail(
                f"the client carried on after {server_line!r}: sent {more[0]!r}"
                + (f" and {len(more) - 1} more line(s)" if len(more) > 1 else "")
            )

    def asked_capabilities(self, *, tls: bool) -> bool:
        command = CAPABILITY_COMMANDS[self.protocol]
        return any(command.match(line) for line in self.client_lines(tls=tls))

    def assert_reasked_capabilities_after_tls(self) -> None:
        """RFC 3207 section 4.2, RFC 2595 section 3.1 and 4, RFC 9051
        section 6.2.1: what the server said before TLS is forgotten and the
        capabilities are asked for again inside it."""
        self.assert_tls_started()
        if not self.asked_capabilities(tls=True):
            raise self._fail("the client did not ask for capabilities again after TLS")

    def sent_starttls(self) -> bool:
        command = STARTTLS_COMMANDS[self.protocol]
        return any(command.match(line) for line in self.client_lines(tls=False))


def _b64(token: bytes) -> bytes | None:
    token = token.strip()
    if len(token) < 4:
        return None
    try:
        return base64.b64decode(token, validate=True)
    except (binascii.Error, ValueError):
        return None


def _matcher(needle: bytes | re.Pattern[bytes]) -> Callable[[bytes], bool]:
    if isinstance(needle, re.Pattern):
        return lambda line: needle.search(line) is not None
    return lambda line: needle in line


class RecordingChannel(Channel):
    """A client-side channel that records everything into `transcript`."""

    def __init__(self, transcript: Transcript) -> None:
        super().__init__()
        self.transcript = transcript
        self._replaying = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._over_tls:
            self.transcript.mark_tls(implicit=True)

    def data_received(self, data: bytes) -> None:
        if not self._replaying:
            self.transcript.record(CLIENT, data)
        super().data_received(data)

    def eof_received(self) -> bool:
        self.transcript.mark_closed(CLIENT)
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transcript.mark_closed(CLIENT)
        super().connection_lost(exc)
        self.transcript.mark_ended()

    def forward_to(
        self,
        sink: Channel,
        *,
        half_close: bool = True,
        through: Through | None = None,
        ended: asyncio.Future[None] | None = None,
    ) -> None:
        # What forward_to hands on from our buffer was recorded on arrival.
        self._replaying = True
        try:
            super().forward_to(sink, half_close=half_close, through=through, ended=ended)
        finally:
            self._replaying = False

    def write(self, data: bytes) -> None:
        super().write(data)
        self.transcript.record(SERVER, data)

    def _splice_write(self, data: bytes) -> None:
        if self.transport is not None and not self._lost and not self._wrote_eof:
            self.transcript.record(SERVER, data)
        super()._splice_write(data)

    async def start_tls(
        self,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        timeout: float = 30.0,
    ) -> int:
        # Everything written from here on goes inside TLS.
        self.transcript.mark_tls()
        return await super().start_tls(
            context, server_side=server_side, server_hostname=server_hostname, timeout=timeout
        )

    def close(self) -> None:
        self.transcript.mark_closed(SERVER)
        super().close()

    def abort(self) -> None:
        self.transcript.mark_closed(SERVER)
        super().abort()


def render(transcripts: Iterable[Transcript]) -> str:
    return "\n\n".join(t.text() for t in transcripts)
