"""Pieces every protocol machine shares: line framing, strict base64, and
running one SASL exchange (RFC 4422) on top of the mechanism step machines.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from authgate.sasl import mechanism_info
from authgate.sasl.base import (
    NO_RESPONSE,
    STORE_UNAVAILABLE,
    Challenge,
    Failure,
    FailureReason,
    InitialResponse,
    Lookup,
    LookupAnswer,
    ServerContext,
    ServerMechanism,
    ServerOutcome,
    Success,
    check_authzid,
)


class LineTooLong(Exception):
    """A line exceeded the limit; the machine answers and closes."""


class LineBuffer:
    """Splits received bytes into lines, with a hard length limit.

    Lines end with LF (a bare LF is accepted, as most servers do; the CR is
    stripped). Bytes after the last complete line stay buffered and can be
    taken whole (`take_rest`) for the splice, or dropped (`clear`) at STARTTLS.
    """

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_line(self) -> bytes | None:
        """The next complete line without its line ending, or None.
        Raises LineTooLong once the buffered line passes the limit."""
        end = self._buf.find(b"\n", 0, self.max_line + 2)
        if end < 0:
            if len(self._buf) > self.max_line + 1:
                raise LineTooLong
            return None
        line = bytes(self._buf[:end])
        del self._buf[: end + 1]
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > self.max_line:
            raise LineTooLong
        return line

    def take_rest(self) -> bytes:
        rest = bytes(self._buf)
        self._buf.clear()
        return rest

    def clear(self) -> None:
        self._buf.clear()

    def __len__(self) -> int:
        return len(self._buf)


def b64decode_strict(text: bytes) -> bytes | None:
    """RFC 4648 base64 without line breaks or junk; None when malformed."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def b64encode(data: bytes) -> bytes:
    return base64.b64encode(data)


def decode_initial(initial: bytes | None) -> InitialResponse | Failure:
    """An initial response as the client sent it on its AUTH line: None (no
    response), "=" (an empty one: RFC 4954 section 4, RFC 5034 section 4,
    RFC 4959 section 3), "*" (cancelled) or base64."""
    if initial is None:
        return NO_RESPONSE
    if initial == b"=":
        return b""
    if initial == b"*":
        return Failure(FailureReason.CANCELLED, "client cancelled")
    decoded = b64decode_strict(initial)
    if decoded is None:
        return Failure(FailureReason.MALFORMED, "initial response is not base64")
    return decoded


@dataclass(frozen=True)
class SendChallenge:
    """Send this challenge (raw bytes; the protocol base64-encodes it)."""

    data: bytes


ExchangeStep = SendChallenge | Lookup | Success | Failure


class SaslExchange:
    """One AUTH/AUTHENTICATE exchange: base64 and cancellation around a
    server mechanism. The protocol machine turns each step into its reply."""

    def __init__(self, name: str, ctx: ServerContext) -> None:
        self.name = name.upper()
        self._mech: ServerMechanism = mechanism_info(self.name).server(ctx)
        self.done = False

    def start(self, initial: bytes | None) -> ExchangeStep:
        """`initial`: the base64 initial response as sent ("=" means empty),
        or None when the client sent none."""
        first = decode_initial(initial)
        if isinstance(first, Failure):
            return self._finish(first)
        return self._translate(self._mech.start(first))

    def respond(self, line: bytes) -> ExchangeStep:
        """The client's reply line to a challenge."""
        if line.strip() == b"*":
            return self._finish(Failure(FailureReason.CANCELLED, "client cancelled"))
        decoded = b64decode_strict(line.strip())
        if decoded is None:
            return self._finish(Failure(FailureReason.MALFORMED, "response is not base64"))
        return self._translate(self._mech.step(decoded))

    def resume(self, answer: LookupAnswer) -> ExchangeStep:
        if answer is STORE_UNAVAILABLE:
            return self._finish(Failure(FailureReason.TEMPORARY, "credential store unavailable"))
        return self._translate(self._mech.resume(answer))

    def _translate(self, outcome: ServerOutcome) -> ExchangeStep:
        if isinstance(outcome, Challenge):
            return SendChallenge(outcome.data)
        if isinstance(outcome, Lookup):
            return outcome
        return self._finish(check_authzid(outcome))

    def _finish(self, outcome: ServerOutcome) -> ExchangeStep:
        self.done = True
        assert isinstance(outcome, Success | Failure)
        return outcome


def plain_message(username: str, password: str, authzid: str = "") -> bytes:
    """RFC 4616 message: used to relay IMAP LOGIN / POP3 USER+PASS as PLAIN."""
    return f"{authzid}\0{username}\0{password}".encode()
