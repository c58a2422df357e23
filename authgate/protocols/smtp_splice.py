"""The SMTP splice after authentication (or port-25 pass-through): every
byte from the client goes to the backend unchanged, except the commands that
would let the client speak with authgate's authority. Sans-IO: bytes in,
bytes out, no sockets.

    guard = SmtpSpliceFilter(hostname, authenticated=True, chunking=True, ...)
    out = guard.from_client(data)    # out.to_backend, out.to_client, out.events, out.close
    out = guard.from_backend(data)   # the same four

The driver writes `to_backend` to the backend and `to_client` to the
client, in that call's order, and closes both sides when `close` is set.
`from_backend` passes the backend's bytes on unchanged (its `to_client`),
with authgate's own replies put in where they belong.

Why a filter at all: the backend trusts authgate's connection (Postfix
`smtpd_authorized_xclient_hosts`), so a client whose bytes reached it
unfiltered could send XCLIENT or XFORWARD and become any user from any
address, AUTH again (as someone else, or with a mechanism the listener's
policy forbids), or STARTTLS with the backend instead of authgate.

Choices, with their reasons:

* Refused, with a reply of authgate's own, never forwarded: XCLIENT and
  XFORWARD (550 5.7.0: Postfix's own "insufficient authorization" class),
  AUTH (503 5.5.1: RFC 4954 section 4, a second AUTH after a successful one
  is refused with 503; on a pass-through session AUTH would bypass the
  listener's policy), STARTTLS (503 5.5.1: TLS is authgate's business and
  was settled before the splice). Each counts toward `max_errors`, as
  before authentication (the count goes on from there); at the limit the
  refusal is followed by "421 4.7.0 Too many errors" and the session ends.

* Framing is authgate's, and strict, so every backend agrees with it: a
  command line ends with CRLF; a line with a bare CR or LF, NUL or any
  other control character but TAB is refused (500 5.5.2) and not
  forwarded. What is forwarded is therefore a sequence of clean CRLF lines
  that no backend can split differently (SMTP smuggling and Postfix's
  `smtpd_forbid_bare_newline` are about exactly this disagreement). The
  verb is the first token after splitting on ASCII whitespace, compared
  case-insensitively, so "XCLIENT\\tADDR=" is XCLIENT here as it is for
  Postfix. A command line longer than `max_line` ends the session
  ("500 5.5.2 Line too long", RFC 5321 section 4.5.3.1.4).

* DATA (RFC 5321 section 4.1.1.4): whether the bytes after it are message
  or commands is decided by the backend's reply, not guessed: after
  forwarding DATA, the client's further bytes are held (not forwarded, not
  interpreted) until the backend has answered everything it owes; a 354
  starts the message, anything else leaves us in command mode. RFC 2920
  section 3.1 puts DATA last in a pipelined group and has the client wait
  for the 354 before sending the message, so a compliant client never has
  anything held. A filter that assumed DATA succeeded would treat the
  commands of a client whose DATA was refused (no valid recipients, say) as
  message text and forward them unfiltered: an XCLIENT smuggled that way
  reaches the backend as a command.

* The message ends at CRLF "." CRLF and nowhere else. Any dot line framed
  by anything else (<LF>.<LF>, <LF>.<CR><LF>, <CR>.<CR><LF>, <CR><LF>.<CR>
  without LF: CVE-2023-51764/-51765/-51766) is a message some backend would
  end early while another reads on, so the session is ended instead:
  "521 5.5.2 ... bare <CR> or <LF> next to '.'" (Postfix's reply to bare
  newlines), both connections closed without the end of data, so the
  backend discards the message and executes nothing after the fake end.
  The bytes of such a sequence are held back at a chunk boundary until the
  next chunk decides, so the backend never receives a prefix of one. Bare
  CR or LF elsewhere in a message is passed on: only the dot line is
  ambiguous.

* BDAT (RFC 3030): the chunk's octets are counted, not parsed, and always
  follow the command; Postfix reads and discards a chunk whose BDAT it
  refuses (checked with Postfix 3.7), so the count stays in step. BDAT is
  refused (502 5.5.1) unless the backend announced CHUNKING; its arguments
  must be exactly "size [LAST]" (501 5.5.4 otherwise): without a size we
  agree on, we could not find the end of the chunk.

* Ordering (RFC 2920 section 3.1: replies come in the order of the
  commands): a reply of authgate's own is never sent before the replies the
  backend still owes for commands pipelined ahead of it. The filter counts
  the commands it forwarded and the backend's final reply lines (a
  "250-" line continues a reply); a refused command and everything after it
  are held until that count reaches zero, then authgate's reply goes out
  right behind the backend's last owed reply and the held bytes are
  processed. Holding is rare (a client pipelining a command we refuse), and
  the driver stops reading from the client while much is held.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

__all__ = ["FilterOutput", "Refused", "SmtpSpliceFilter", "SpliceEnded"]

CR, LF, DOT = 0x0D, 0x0A, 0x2E
CRLF = b"\r\n"

# Control characters other than TAB in a command line (its CRLF excluded).
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# RFC 3030 section 2: bdat-cmd = "BDAT" SP chunk-size [ SP end-marker ] CRLF
_BDAT = re.compile(rb"BDAT[ \t]+([0-9]{1,18})(?:[ \t]+LAST)?[ \t]*\r\n", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Refused:
    """A command authgate answered itself instead of forwarding it."""

    command: str  # the verb, or what was wrong with the line (never client text)
    reply: str  # authgate's reply, without CRLF


@dataclass(frozen=True, slots=True)
class SpliceEnded:
    """The filter ended the session (smuggling, too many errors, a line too long)."""

    reason: str


FilterEvent = Refused | SpliceEnded


@dataclass(slots=True)
class FilterOutput:
    to_backend: bytes = b""
    to_client: bytes = b""
    events: list[FilterEvent] = field(default_factory=list)
    close: bool = False


_NOTHING = FilterOutput()


class _Mode(enum.Enum):
    COMMAND = "command"
    DATA = "data"  # inside a DATA message, after the backend's 354
    BDAT = "bdat"  # inside a BDAT chunk
    CLOSED = "closed"


class SmtpSpliceFilter:
    """Client-to-backend filter of one spliced SMTP session (see the module
    docstring for what it refuses and why)."""

    def __init__(
        self,
        hostname: str,
        *,
        authenticated: bool,
        chunking: bool,
        max_line: int = 12288,
        max_errors: int = 3,
        errors: int = 0,
    ) -> None:
        self._hostname = hostname
        self._authenticated = authenticated
        self._chunking = chunking
        self._max_line = max_line
        self._max_errors = max_errors
        self._errors = errors
        self._mode = _Mode.COMMAND
        self._in = bytearray()  # client bytes not yet forwarded or refused
        self._owed = 0  # replies the backend owes for what we forwarded
        self._waiting = False  # hold client input until `_owed` is zero
        self._data_sent = False  # the last command forwarded was DATA
        self._last_code = b""  # code of the backend's last final reply line
        self._head = bytearray()  # first octets of the backend's current line
        self._prev = LF  # message mode: the last octet forwarded
        self._data_start = False  # message mode: nothing of the message seen yet
        self._chunk = 0  # BDAT mode: octets of the chunk still to come
        self._too_long = False

    # ------------------------------------------------------------ driver API

    @property
    def held(self) -> int:
        """Client octets held back (the driver pauses reading above a limit)."""
        return len(self._in)

    @property
    def closed(self) -> bool:
        return self._mode is _Mode.CLOSED

    def from_client(self, data: bytes) -> FilterOutput:
        mode = self._mode
        if mode is _Mode.CLOSED:
            return _NOTHING
        if mode is _Mode.BDAT and not self._in and len(data) <= self._chunk:
            # The common case inside a chunk: pass it on without a copy.
            self._chunk -= len(data)
            if not self._chunk:
                self._mode = _Mode.COMMAND
            return FilterOutput(to_backend=data)
        if mode is _Mode.DATA and not self._in:
            # The common case inside a message: scan it in place.
            verdict, end = self._scan_message(data)
            if verdict is _Scan.MORE and end == len(data):
                if end:
                    self._prev = data[end - 1]
                    self._data_start = False
                return FilterOutput(to_backend=data)
        if self._too_long:
            return _NOTHING  # the session ends once the backend has answered
        self._in += data
        out = FilterOutput()
        forward: list[bytes] = []
        replies: list[bytes] = []
        self._run(forward, replies, out)
        out.to_backend = b"".join(forward)
        out.to_client = b"".join(replies)
        return out

    def from_backend(self, data: bytes) -> FilterOutput:
        if self._mode is _Mode.CLOSED:
            return _NOTHING
        resume_at = self._count_replies(data)
        if resume_at is None:
            return FilterOutput(to_client=data)
        # The backend has answered everything it owed: authgate's own
        # replies go right after its last one, then the held input runs.
        self._waiting = False
        if self._data_sent:
            self._data_sent = False
            if self._last_code == b"354":
                self._enter_data()
        out = FilterOutput()
        forward: list[bytes] = []
        replies: list[bytes] = []
        if self._too_long:
            self._end(replies, out, "500 5.5.2 Line too long", "command line too long")
        else:
            self._run(forward, replies, out)
        out.to_backend = b"".join(forward)
        out.to_client = data[:resume_at] + b"".join(replies) + data[resume_at:]
        return out

    # --------------------------------------------------------- backend side

    def _count_replies(self, data: bytes) -> int | None:
        """Count the final reply lines in `data`; the offset just after the
        one that paid off the last owed reply while input is held, else None."""
        resume_at = None
        head = self._head
        pos, end = 0, len(data)
        while pos < end:
            newline = data.find(b"\n", pos)
            stop = end if newline < 0 else newline + 1
            if len(head) < 4:
                head += data[pos : min(stop, pos + 4 - len(head))]
            if newline < 0:
                break
            pos = stop
            # RFC 5321 section 4.2.1: "250-" continues a reply, "250 " ends it.
            final = head[3:4] != b"-"
            code = bytes(head[:3])
            head.clear()
            if final and self._owed:
                self._owed -= 1
                self._last_code = code
                if not self._owed and self._waiting and resume_at is None:
                    resume_at = pos
        return resume_at

    # ---------------------------------------------------------- client side

    def _run(self, forward: list[bytes], replies: list[bytes], out: FilterOutput) -> None:
        """Process held client input until it runs out or must wait."""
        while self._in and not self._waiting:
            mode = self._mode
            if mode is _Mode.COMMAND:
                if not self._command(forward, replies, out):
                    return
            elif mode is _Mode.DATA:
                if not self._message(forward, replies, out):
                    return
            elif mode is _Mode.BDAT:
                take = min(self._chunk, len(self._in))
                forward.append(bytes(self._in[:take]))
                del self._in[:take]
                self._chunk -= take
                if not self._chunk:
                    self._mode = _Mode.COMMAND
            else:
                return

    def _command(self, forward: list[bytes], replies: list[bytes], out: FilterOutput) -> bool:
        """Handle the next command line; False when more input is needed or
        the session must wait or end."""
        buf = self._in
        newline = buf.find(b"\n", 0, self._max_line + 2)
        if newline < 0:
            if len(buf) <= self._max_line + 1:
                return False  # the rest of the line has not arrived yet
            # Keep nothing of it: the session ends once the backend has
            # answered what it owes (our reply must come after those).
            buf.clear()
            self._too_long = True
            if self._owed:
                self._waiting = True
            else:
                self._end(replies, out, "500 5.5.2 Line too long", "command line too long")
            return False
        line = bytes(buf[: newline + 1])
        if not line.endswith(CRLF) or _CONTROL.search(line, 0, len(line) - 2):
            return self._refuse(
                replies,
                out,
                "500 5.5.2 Bare <CR> or <LF>, or a control character, in command",
                "malformed line",
            )
        words = line.split(None, 1)
        verb = words[0].upper() if words else b""
        refusal = self._refusal(verb, line)
        if refusal is not None:
            return self._refuse(replies, out, refusal, verb.decode("ascii", "replace"))
        del buf[: newline + 1]
        forward.append(line)
        self._owed += 1
        if verb == b"DATA":
            # Whether a message follows is the backend's decision (354).
            self._data_sent = True
            self._waiting = True
            return False
        if verb == b"BDAT":
            match = _BDAT.fullmatch(line)
            assert match is not None  # checked by _refusal
            self._chunk = int(match.group(1))
            if self._chunk:
                self._mode = _Mode.BDAT
        return True

    def _refusal(self, verb: bytes, line: bytes) -> str | None:
        if verb in (b"XCLIENT", b"XFORWARD"):
            return f"550 5.7.0 {verb.decode()} not permitted"
        if verb == b"AUTH":
            if self._authenticated:
                return "503 5.5.1 Already authenticated"
            return "503 5.5.1 AUTH is not available in a mail transaction passed through"
        if verb == b"STARTTLS":
            return "503 5.5.1 STARTTLS is not available now"
        if verb == b"BDAT":
            if not self._chunking:
                return "502 5.5.1 BDAT not available"
            if _BDAT.fullmatch(line) is None:
                return "501 5.5.4 Syntax: BDAT chunk-size [LAST]"
        return None

    def _refuse(self, replies: list[bytes], out: FilterOutput, reply: str, command: str) -> bool:
        if self._owed:
            # Earlier pipelined commands are still unanswered: wait for them.
            self._waiting = True
            return False
        newline = self._in.find(b"\n")
        del self._in[: newline + 1]
        self._errors += 1
        out.events.append(Refused(command, reply))
        replies.append(reply.encode("ascii") + CRLF)
        if self._errors >= self._max_errors:
            self._end(
                replies, out, f"421 4.7.0 {self._hostname} Too many errors", "too many errors"
            )
            return False
        return True

    def _end(self, replies: list[bytes], out: FilterOutput, reply: str, reason: str) -> None:
        self._mode = _Mode.CLOSED
        self._in.clear()
        replies.append(reply.encode("ascii") + CRLF)
        out.events.append(SpliceEnded(reason))
        out.close = True

    # -------------------------------------------------------------- message

    def _enter_data(self) -> None:
        self._mode = _Mode.DATA
        self._data_start = True
        self._prev = LF  # the DATA line's LF (a CRLF: command lines are strict)

    def _message(self, forward: list[bytes], replies: list[bytes], out: FilterOutput) -> bool:
        """Forward held message octets up to the end of data; False when more
        input is needed or the session ends."""
        buf = self._in
        verdict, end = self._scan_message(buf)
        if end:
            forward.append(bytes(buf[:end]))
            self._prev = buf[end - 1]
            self._data_start = False
            del buf[:end]
        if verdict is _Scan.END:
            self._end_of_data()
            return True
        if verdict is _Scan.SMUGGLED:
            # What came before is forwarded (the backend cannot tell where
            # the message ended from it); the message is never finished.
            self._smuggled(replies, out)
        return False

    def _scan_message(self, buf: bytes | bytearray) -> tuple[_Scan, int]:
        """Where the message in `buf` may be forwarded up to: (MORE, n) to
        forward n octets and hold the rest until more arrive, (END, n) when
        the end of data ends at n, (SMUGGLED, n) when an ambiguous dot line
        starts at n (the n octets before it are plain message text).
        Changes nothing."""
        size = len(buf)
        if self._data_start and size and buf[0] == DOT:
            # The message's first line follows the DATA line's CRLF.
            if size < 3:
                return _Scan.MORE, 0
            if buf[1:3] == CRLF:
                return _Scan.END, 3
            if buf[1] in (CR, LF):
                return _Scan.SMUGGLED, 0
        # Every candidate is a line-ending octet followed by a dot. A chunk
        # without any dot (base64: most octets of a large message) is told
        # at memchr speed; two-octet searches cost some 50 µs per 64 KiB.
        lf = cr = at = -1
        if DOT in buf:
            lf, cr = buf.find(b"\n."), buf.find(b"\r.")
        while lf >= 0 or cr >= 0:
            at = lf if cr < 0 or 0 <= lf < cr else cr
            if at + 2 >= size:
                break
            after = buf[at + 2]
            if after != CR and after != LF:
                # "..", ". x": dot-stuffing or text, not a dot line. Only the
                # search that found it moves on (the other one stands).
                if at == lf:
                    lf = buf.find(b"\n.", at + 1)
                else:
                    cr = buf.find(b"\r.", at + 1)
                at = -1
                continue
            before = buf[at - 1] if at else self._prev
            if buf[at] != LF or before != CR or after != CR:
                return _Scan.SMUGGLED, at
            if at + 3 >= size:
                return _Scan.MORE, at  # CRLF "." CR: wait for the LF
            if buf[at + 3] != LF:
                return _Scan.SMUGGLED, at  # CRLF "." CR without LF
            return _Scan.END, at + 4
        if at >= 0:
            return _Scan.MORE, at  # a line end and a dot at the very end
        # Hold back a final line-ending octet: a dot may follow.
        if size and buf[size - 1] in (CR, LF):
            return _Scan.MORE, size - 1
        return _Scan.MORE, size

    def _end_of_data(self) -> None:
        self._mode = _Mode.COMMAND
        self._owed += 1  # the reply to the whole message

    def _smuggled(self, replies: list[bytes], out: FilterOutput) -> None:
        self._end(
            replies,
            out,
            f"521 5.5.2 {self._hostname} Error: bare <CR> or <LF> next to '.' in message data",
            "bare CR or LF next to a dot line in DATA (SMTP smuggling?)",
        )


class _Scan(enum.Enum):
    MORE = "more"
    END = "end"
    SMUGGLED = "smuggled"
