"""The SMTP splice filter: what a client may send the backend after the
hand-over, where DATA ends, and in which order replies come back.

Two model backends read what the filter forwards: a strict one (CRLF lines,
the message ends at CRLF "." CRLF) and a lax one (CR, LF or CRLF end a line,
a "." line ends the message: the SMTP smuggling receivers). Whatever the
client sends, in whatever chunks, both must see the same commands."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authgate.protocols.smtp_splice import FilterOutput, Refused, SmtpSpliceFilter, SpliceEnded

HOST = "gate.example"
FORBIDDEN = {b"XCLIENT", b"XFORWARD", b"AUTH", b"STARTTLS"}


# ----------------------------------------------------------- model backends


class StrictBackend:
    """An SMTP server that frames strictly: one reply per CRLF command line,
    354 to DATA (or a refusal), the message ends at CRLF "." CRLF, BDAT
    chunks are read by count."""

    def __init__(self, refuse_data: bool = False) -> None:
        self.refuse_data = refuse_data
        self.buf = bytearray()
        self.mode = "command"
        self.chunk = 0
        self.commands: list[bytes] = []
        self.messages: list[bytes] = []

    def feed(self, data: bytes) -> bytes:
        self.buf += data
        out: list[bytes] = []
        while True:
            if self.mode == "command":
                end = self.buf.find(b"\r\n")
                if end < 0:
                    break
                line = bytes(self.buf[:end])
                del self.buf[: end + 2]
                out.append(self.command(line))
            elif self.mode == "data":
                end = (b"\r\n" + self.buf).find(b"\r\n.\r\n")
                if end < 0:
                    break
                self.messages.append(bytes(self.buf[:end]))
                del self.buf[: end + 3]
                self.mode = "command"
                out.append(b"250 2.0.0 queued\r\n")
            else:
                take = min(self.chunk, len(self.buf))
                del self.buf[:take]
                self.chunk -= take
                if self.chunk:
                    break
                self.mode = "command"
                out.append(b"250 2.0.0 chunk\r\n")
        return b"".join(out)

    def command(self, line: bytes) -> bytes:
        self.commands.append(line)
        words = line.split()
        verb = words[0].upper() if words else b""
        if verb == b"DATA":
            if self.refuse_data:
                return b"554 5.5.1 No valid recipients\r\n"
            self.mode = "data"
            return b"354 End data with <CR><LF>.<CR><LF>\r\n"
        if verb == b"BDAT":
            self.chunk = int(words[1])
            if self.chunk:
                self.mode = "bdat"
                return b""  # answered once the chunk is in
            return b"250 2.0.0 chunk\r\n"
        if verb == b"EHLO":
            return b"250-backend.example\r\n250-PIPELINING\r\n250 CHUNKING\r\n"
        return b"250 2.0.0 Ok\r\n"


def lax_view(stream: bytes) -> tuple[list[bytes], list[bytes]]:
    """(commands, messages) as a lax receiver sees a forwarded stream: any of
    CR, LF or CRLF ends a line and a "." line ends a message. BDAT chunks are
    read by count, as every CHUNKING server does."""
    commands: list[bytes] = []
    messages: list[bytes] = []
    pos = 0
    in_data = False
    message: list[bytes] = []
    while pos < len(stream):
        match = re.compile(rb"\r\n|\r|\n").search(stream, pos)
        if match is None:
            break
        line, pos = stream[pos : match.start()], match.end()
        if in_data:
            if line == b".":
                messages.append(b"".join(m + b"\n" for m in message))
                in_data, message = False, []
            else:
                message.append(line)
            continue
        commands.append(line)
        words = line.split()
        verb = words[0].upper() if words else b""
        if verb == b"DATA":
            in_data = True
        elif verb == b"BDAT":
            pos += int(words[1])
    return commands, messages


# -------------------------------------------------------------- a session


@dataclass
class Session:
    """The filter between a client (fed in the chunks given) and a strict
    backend, the backend's replies fed back in chunks too."""

    guard: SmtpSpliceFilter
    backend: StrictBackend
    reply_chunk: int = 0  # 0: backend replies whole
    forwarded: bytearray = field(default_factory=bytearray)
    to_client: bytearray = field(default_factory=bytearray)
    events: list[object] = field(default_factory=list)
    closed: bool = False

    def take(self, out: FilterOutput) -> bytes:
        self.to_client += out.to_client
        self.events += out.events
        self.closed |= out.close
        return out.to_backend

    def pump(self, up: bytes) -> None:
        while up:
            self.forwarded += up  # written even when the filter closes
            if self.closed:
                break
            replies = self.backend.feed(up)
            up = b""
            for piece in split_every(replies, self.reply_chunk):
                up += self.take(self.guard.from_backend(piece))

    def client(self, chunks: Iterable[bytes]) -> Session:
        for chunk in chunks:
            if self.closed:
                break
            self.pump(self.take(self.guard.from_client(chunk)))
        return self

    @property
    def transcript(self) -> tuple[bytes, bytes, list[object], bool]:
        return bytes(self.forwarded), bytes(self.to_client), self.events, self.closed


def split_every(data: bytes, size: int) -> list[bytes]:
    if not data:
        return []
    if size <= 0:
        return [data]
    return [data[i : i + size] for i in range(0, len(data), size)]


def run(
    stream: bytes,
    cuts: Sequence[int] = (),
    *,
    reply_chunk: int = 0,
    refuse_data: bool = False,
    authenticated: bool = True,
    chunking: bool = True,
    max_errors: int = 1000,
    max_line: int = 200,
) -> Session:
    guard = SmtpSpliceFilter(
        HOST,
        authenticated=authenticated,
        chunking=chunking,
        max_line=max_line,
        max_errors=max_errors,
    )
    session = Session(guard, StrictBackend(refuse_data), reply_chunk)
    points = sorted({c for c in cuts if 0 < c < len(stream)})
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    return session.client(p for p in pieces if p)


def refused(session: Session) -> list[str]:
    return [e.reply.split()[0] for e in session.events if isinstance(e, Refused)]


# ------------------------------------------------------------- examples


def test_plain_commands_pass_unchanged() -> None:
    stream = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nNOOP\r\nRSET\r\nQUIT\r\n"
    session = run(stream)
    assert session.forwarded == stream
    assert session.to_client == b"250 2.0.0 Ok\r\n" * 5
    assert session.events == []


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"XCLIENT ADDR=192.0.2.1 LOGIN=root\r\n", "550"),
        (b"xclient addr=192.0.2.1\r\n", "550"),
        (b"XCLIENT\tADDR=192.0.2.1\r\n", "550"),  # TAB separates words too
        (b"  XCLIENT ADDR=192.0.2.1\r\n", "550"),
        (b"XFORWARD ADDR=192.0.2.1\r\n", "550"),
        (b"AUTH PLAIN AGJvYgBzZWNyZXQ=\r\n", "503"),
        (b"STARTTLS\r\n", "503"),
        (b"XCLIENT\x0bADDR=192.0.2.1\r\n", "500"),  # a control character
        (b"XCLIENT\x00\r\n", "500"),
        (b"NOOP\n", "500"),  # bare LF ends the line
        (b"NOOP\rXCLIENT ADDR=192.0.2.1\r\n", "500"),  # bare CR inside
    ],
)
def test_forbidden_and_malformed_lines_are_refused(line: bytes, code: str) -> None:
    session = run(line + b"NOOP\r\n")
    assert session.forwarded == b"NOOP\r\n"
    assert refused(session) == [code]
    assert session.to_client.startswith(code.encode())
    assert session.to_client.endswith(b"250 2.0.0 Ok\r\n")


def test_auth_reply_names_the_situation() -> None:
    after_login = run(b"AUTH PLAIN x\r\n")
    passed_through = run(b"AUTH PLAIN x\r\n", authenticated=False)
    assert after_login.to_client == b"503 5.5.1 Already authenticated\r\n"
    assert passed_through.to_client.startswith(b"503 5.5.1 AUTH is not available")


def test_refusal_waits_for_replies_owed() -> None:
    # RFC 2920: replies in command order; ours must not overtake the backend's.
    stream = b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nXCLIENT ADDR=1.2.3.4\r\nRCPT TO:<c@z>\r\n"
    session = run(stream, reply_chunk=3)
    assert session.forwarded == b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nRCPT TO:<c@z>\r\n"
    assert session.to_client == (
        b"250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n550 5.7.0 XCLIENT not permitted\r\n250 2.0.0 Ok\r\n"
    )


def test_refusal_comes_after_a_multiline_reply() -> None:
    session = run(b"EHLO c\r\nSTARTTLS\r\n", reply_chunk=5)
    assert session.to_client == (
        b"250-backend.example\r\n250-PIPELINING\r\n250 CHUNKING\r\n"
        b"503 5.5.1 STARTTLS is not available now\r\n"
    )


def test_too_many_errors_close_the_session() -> None:
    session = run(b"XCLIENT A=1\r\nXFORWARD A=1\r\nNOOP\r\n", max_errors=2)
    assert session.closed and session.forwarded == b""
    assert session.to_client == (
        b"550 5.7.0 XCLIENT not permitted\r\n550 5.7.0 XFORWARD not permitted\r\n"
        b"421 4.7.0 gate.example Too many errors\r\n"
    )


def test_errors_before_the_handover_count() -> None:
    guard = SmtpSpliceFilter(HOST, authenticated=True, chunking=True, max_errors=3, errors=2)
    out = guard.from_client(b"STARTTLS\r\n")
    assert out.close and out.to_client.endswith(b"421 4.7.0 gate.example Too many errors\r\n")


def test_message_passes_and_commands_follow() -> None:
    message = b"Subject: hi\r\n\r\n..dot-stuffed\r\nXCLIENT ADDR=1.2.3.4\r\n"
    stream = b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n" + message + b".\r\nNOOP\r\n"
    session = run(stream)
    assert session.forwarded == stream  # an XCLIENT line inside a message is text
    assert session.backend.messages == [message]
    assert session.backend.commands[-1] == b"NOOP"
    assert session.events == []


def test_refused_data_means_the_next_lines_are_commands() -> None:
    # The backend refuses DATA: what follows is commands, and an XCLIENT
    # among them must not pass as message text.
    stream = b"RCPT TO:<nobody@y>\r\nDATA\r\nXCLIENT ADDR=1.2.3.4\r\nNOOP\r\n"
    session = run(stream, refuse_data=True)
    assert session.forwarded == b"RCPT TO:<nobody@y>\r\nDATA\r\nNOOP\r\n"
    assert refused(session) == ["550"]
    assert session.to_client == (
        b"250 2.0.0 Ok\r\n554 5.5.1 No valid recipients\r\n"
        b"550 5.7.0 XCLIENT not permitted\r\n250 2.0.0 Ok\r\n"
    )


def test_input_after_data_is_held_until_354() -> None:
    guard = SmtpSpliceFilter(HOST, authenticated=True, chunking=True)
    out = guard.from_client(b"DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n")
    assert out.to_backend == b"DATA\r\n" and guard.held > 0
    out = guard.from_backend(b"354 go\r\n")
    assert out.to_client == b"354 go\r\n"
    assert out.to_backend == b"Subject: x\r\n\r\nbody\r\n.\r\n" and guard.held == 0


@pytest.mark.parametrize(
    "fake_end",
    [
        b"\n.\n",  # CVE-2023-51764 (Postfix), -51765 (Sendmail)
        b"\n.\r\n",  # CVE-2023-51766 (Exim), Exchange
        b"\r.\r\n",
        b"\r\n.\r",  # a CR not followed by LF after the dot
        b"\r\n.\n",
        b"\r.\r",
    ],
)
@pytest.mark.parametrize("at_start", [False, True])
def test_smuggling_ends_the_session(fake_end: bytes, at_start: bool) -> None:
    smuggled = b"MAIL FROM:<evil@x>\r\nRCPT TO:<victim@y>\r\nDATA\r\nforged\r\n.\r\n"
    body = b"" if at_start else b"Subject: hi\r\n\r\nbody"
    if at_start:
        fake_end = fake_end.lstrip(b"\r\n") if fake_end.startswith(b"\r\n") else fake_end
    stream = b"DATA\r\n" + body + fake_end + b"X" + smuggled + b"\r\n.\r\n"
    session = run(stream)
    assert session.closed
    assert session.to_client.endswith(
        b"521 5.5.2 gate.example Error: bare <CR> or <LF> next to '.' in message data\r\n"
    )
    assert b"evil" not in session.forwarded
    assert lax_view(bytes(session.forwarded))[0] == [b"DATA"]
    assert isinstance(session.events[-1], SpliceEnded)


def test_bare_line_ends_elsewhere_in_a_message_pass() -> None:
    message = b"a\nb\rc\r\n.x\n..\r\n"
    session = run(b"DATA\r\n" + message + b".\r\n")
    assert not session.closed and session.backend.messages == [message]


def test_empty_message() -> None:
    session = run(b"DATA\r\n.\r\nNOOP\r\n")
    assert session.backend.messages == [b""] and session.backend.commands == [b"DATA", b"NOOP"]


def test_bdat_chunks_are_counted() -> None:
    chunk = b"XCLIENT ADDR=1.2.3.4\r\n\n.\n"  # octets, not commands
    stream = b"BDAT %d\r\n" % len(chunk) + chunk + b"BDAT 0 LAST\r\nNOOP\r\n"
    session = run(stream)
    assert session.forwarded == stream and session.events == []
    assert session.backend.commands == [b"BDAT %d" % len(chunk), b"BDAT 0 LAST", b"NOOP"]


@pytest.mark.parametrize(
    ("line", "chunking", "code"),
    [
        (b"BDAT 5\r\n", False, "502"),
        (b"BDAT\r\n", True, "501"),
        (b"BDAT -5\r\n", True, "501"),
        (b"BDAT 5 LAST extra\r\n", True, "501"),
        (b"BDAT 0x10\r\n", True, "501"),
    ],
)
def test_bdat_refusals(line: bytes, chunking: bool, code: str) -> None:
    # The refused BDAT's would-be chunk is read as commands: the backend,
    # which never saw the BDAT, reads it so too.
    session = run(line + b"NOOP\r\n", chunking=chunking)
    assert session.forwarded == b"NOOP\r\n" and refused(session) == [code]


def test_long_line_ends_the_session_after_owed_replies() -> None:
    guard = SmtpSpliceFilter(HOST, authenticated=True, chunking=True, max_line=100)
    out = guard.from_client(b"NOOP\r\n" + b"x" * 200)
    assert out.to_backend == b"NOOP\r\n" and out.to_client == b"" and not out.close
    out = guard.from_backend(b"250 ok\r\n")
    assert out.to_client == b"250 ok\r\n500 5.5.2 Line too long\r\n" and out.close


def test_client_without_waiting_for_354() -> None:
    # A client that sends everything at once (not RFC 2920, but common in
    # scripts) still has its message delivered whole.
    stream = b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\nhello\r\n.\r\nQUIT\r\n"
    session = run(stream)
    assert session.forwarded == stream and session.backend.messages == [b"hello\r\n"]


# ------------------------------------------------------------ properties

WORDS = [
    b"NOOP",
    b"RSET",
    b"MAIL FROM:<a@x>",
    b"RCPT TO:<b@y>",
    b"EHLO c.example",
    b"HELP",
    b"XCLIENT ADDR=1.2.3.4",
    b"xforward\tNAME=x",
    b"Auth PLAIN AA==",
    b"STARTTLS",
    b"DATA",
    b"",
    b"  NOOP",
    b"VRFY .",
]
message_octets = st.binary(max_size=60) | st.lists(
    st.sampled_from([b"\r\n", b"\n", b"\r", b".", b"..", b"x", b"XCLIENT ADDR=9.9.9.9", b" "]),
    max_size=25,
).map(b"".join)


@st.composite
def client_streams(draw: st.DrawFn) -> bytes:
    parts: list[bytes] = []
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.integers(0, 9))
        if kind <= 5:
            ending = draw(st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r"]))
            parts.append(draw(st.sampled_from(WORDS)) + ending)
        elif kind <= 7:
            parts.append(b"DATA\r\n" + draw(message_octets) + b"\r\n.\r\n")
        elif kind == 8:
            chunk = draw(message_octets)
            parts.append(b"BDAT %d\r\n" % len(chunk) + chunk)
        else:
            parts.append(draw(st.binary(max_size=20)))
    return b"".join(parts)


cut_points = st.lists(st.integers(1, 400), max_size=30)
property_settings = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@property_settings
@given(
    stream=client_streams(), cuts=cut_points, reply_chunk=st.integers(0, 7), refuse=st.booleans()
)
def test_chunking_never_changes_the_outcome(
    stream: bytes, cuts: list[int], reply_chunk: int, refuse: bool
) -> None:
    whole = run(stream, refuse_data=refuse)
    chunked = run(stream, cuts, reply_chunk=reply_chunk, refuse_data=refuse)
    assert chunked.transcript == whole.transcript


@property_settings
@given(stream=client_streams(), cuts=cut_points, refuse=st.booleans())
def test_strict_and_lax_backends_agree_and_see_nothing_forbidden(
    stream: bytes, cuts: list[int], refuse: bool
) -> None:
    session = run(stream, cuts, refuse_data=refuse)
    strict = session.backend
    forwarded = bytes(session.forwarded)
    if not refuse:
        lax_commands, lax_messages = lax_view(forwarded)
        assert lax_commands == strict.commands
        # The lax receiver also splits a message at its bare CRs and LFs: the
        # messages may differ in line endings, never in where they end.
        assert [normal(m) for m in lax_messages] == [normal(m) for m in strict.messages]
    for line in strict.commands:
        words = line.split()
        assert not words or words[0].upper() not in FORBIDDEN
        assert b"\r" not in line and b"\n" not in line


@property_settings
@given(
    body=message_octets,
    fake_end=st.sampled_from([b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\rX", b"\r\n.\n", b"\r.\n"]),
    cuts=cut_points,
)
def test_smuggling_is_always_refused(body: bytes, fake_end: bytes, cuts: list[int]) -> None:
    stream = (
        b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n"
        + body
        + fake_end
        + b"MAIL FROM:<evil@x>\r\nRCPT TO:<victim@y>\r\nDATA\r\nforged\r\n.\r\n"
    )
    session = run(stream, cuts)
    lax_commands, _ = lax_view(bytes(session.forwarded))
    assert lax_commands == session.backend.commands
    if (b"\r\n" + body + fake_end).find(b"\r\n.\r\n") < 0:
        # No real end of data before the fake one: the session ends there,
        # and nothing after it reaches the backend.
        assert session.closed
        assert b"evil" not in session.forwarded
        assert session.backend.commands == [b"MAIL FROM:<a@x>", b"RCPT TO:<b@y>", b"DATA"]


def normal(message: bytes) -> bytes:
    return re.sub(rb"\r\n|\r|\n", b"\n", message)
