"""BER as LDAP uses it (RFC 4511 section 5.1), both ways: a reader for the
LDAPMessage envelope and writers for the few messages authgate says itself.

One module for everything in authgate that speaks LDAP on the wire: the
LDAP listener's relay (authgate.protocols.ldap) and the directory client's
StartTLS (authgate.credentials.directory.transport).

What the reader accepts is what RFC 4511 section 5.1 allows a sender:
definite lengths only, low tag numbers only (every LDAP tag is below 31).
It accepts long-form lengths that are not minimal (libldap always writes
four length octets: `84 00 00 00 0c`), up to four of them, and refuses:

* the indefinite form (`80`), which LDAP forbids;
* the reserved `ff` and a length of more than four octets ("overlong");
* a length past the reader's limit, *as soon as the header says so*, before
  any of the content has been buffered: a client cannot make us hold a
  gigabyte by announcing one.

Pure functions and one small buffering class; no I/O. `BerError` (a
ValueError) is the only exception, and its text is safe to log: it never
quotes the input.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final


class BerError(ValueError):
    """Bytes that are not the BER an LDAP peer may send."""


# Universal tags.
BOOLEAN: Final = 0x01
INTEGER: Final = 0x02
OCTET_STRING: Final = 0x04
ENUMERATED: Final = 0x0A
SEQUENCE: Final = 0x30

MAX_LENGTH_OCTETS: Final = 4
# RFC 4511 section 4.1.1: MessageID ::= INTEGER (0 .. maxInt), maxInt 2^31-1.
MAX_INT: Final = 2**31 - 1


@dataclass(frozen=True)
class Header:
    """The identifier and length octets of one element."""

    tag: int
    size: int  # octets of identifier + length
    length: int  # octets of content

    @property
    def total(self) -> int:
        return self.size + self.length


def read_header(
    data: bytes | bytearray, offset: int = 0, limit: int | None = None
) -> Header | None:
    """The header of the element at `offset`, or None when more bytes are
    needed to know it. BerError for what LDAP never sends, and for a
    content length over `limit`."""
    if len(data) - offset < 2:
        return None
    tag = data[offset]
    if tag & 0x1F == 0x1F:
        raise BerError("high tag number form (not used by LDAP)")
    first = data[offset + 1]
    if first < 0x80:
        size, length = 2, first
    elif first == 0x80:
        raise BerError("indefinite length (RFC 4511 section 5.1 forbids it)")
    elif first == 0xFF:
        raise BerError("reserved length octet 0xff")
    else:
        count = first & 0x7F
        if count > MAX_LENGTH_OCTETS:
            raise BerError(f"overlong length ({count} length octets, at most 4)")
        if len(data) - offset < 2 + count:
            return None
        size = 2 + count
        length = int.from_bytes(data[offset + 2 : offset + size], "big")
    if limit is not None and length > limit:
        raise BerError(f"element of {length} octets is over the limit of {limit}")
    return Header(tag, size, length)


def split(data: bytes, limit: int | None = None) -> tuple[int, bytes, bytes] | None:
    """(tag, content, rest) of the first element, or None if incomplete."""
    header = read_header(data, 0, limit)
    if header is None or len(data) < header.total:
        return None
    return header.tag, data[header.size : header.total], data[header.total :]


def elements(content: bytes) -> Iterator[tuple[int, bytes]]:
    """The (tag, content) of each element in a constructed element's content;
    BerError when the content does not divide exactly into elements."""
    offset = 0
    while offset < len(content):
        header = read_header(content, offset)
        if header is None or offset + header.total > len(content):
            raise BerError("truncated element")
        yield header.tag, content[offset + header.size : offset + header.total]
        offset += header.total


def decode_int(content: bytes, *, low: int = 0, high: int = MAX_INT) -> int:
    """An INTEGER or ENUMERATED value (two's complement), within [low, high]."""
    if not 1 <= len(content) <= 5:
        raise BerError("integer of unusual size")
    value = int.from_bytes(content, "big", signed=True)
    if not low <= value <= high:
        raise BerError("integer out of range")
    return value


def encode(tag: int, content: bytes) -> bytes:
    """One element with a definite length (minimal form)."""
    n = len(content)
    if n < 0x80:
        return bytes((tag, n)) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(size))) + size + content


def encode_int(value: int, tag: int = INTEGER) -> bytes:
    """An INTEGER (or ENUMERATED, with its tag) in the fewest octets."""
    size = max(1, (value.bit_length() + 8) // 8)
    return encode(tag, value.to_bytes(size, "big", signed=True))


# ------------------------------------------------------------ LDAPMessage


@dataclass(frozen=True)
class Message:
    """One LDAPMessage (RFC 4511 section 4.1.1), as received.

    `raw` is the message exactly as it arrived (it is what the relay
    forwards: framing and encoding untouched); `op` and `body` are the
    protocolOp's tag and content; `controls` whether any were attached."""

    raw: bytes
    message_id: int
    op: int
    body: bytes
    controls: bool


def parse_message(raw: bytes) -> Message:
    """The envelope of one complete LDAPMessage (`raw` holds exactly one)."""
    parsed = split(raw)
    if parsed is None or parsed[2]:
        raise BerError("not exactly one element")
    tag, content, _ = parsed
    if tag != SEQUENCE:
        raise BerError("an LDAPMessage is a SEQUENCE")
    parts = list(elements(content))
    if not 2 <= len(parts) <= 3:
        raise BerError("an LDAPMessage has a messageID, a protocolOp and optional controls")
    (id_tag, id_content), (op, body) = parts[0], parts[1]
    if id_tag != INTEGER:
        raise BerError("messageID is not an INTEGER")
    message_id = decode_int(id_content)
    if len(parts) == 3 and parts[2][0] != 0xA0:
        raise BerError("unexpected element after the protocolOp")
    return Message(raw, message_id, op, body, controls=len(parts) == 3)


class MessageReader:
    """LDAPMessages out of a byte stream, each at most `limit` octets of
    content (changeable between messages: `limit` is an attribute)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        self._buf += data

    def discard(self) -> int:
        """Drop what is buffered (STARTTLS injection); returns how much."""
        n = len(self._buf)
        self._buf.clear()
        return n

    def next(self) -> Message | None:
        """The next complete message, or None until more bytes arrive.
        BerError for a malformed stream (its framing is lost: close it)."""
        header = read_header(self._buf, 0, self.limit)
        if header is None:
            return None
        if header.tag != SEQUENCE:
            raise BerError("an LDAPMessage is a SEQUENCE")
        if len(self._buf) < header.total:
            return None
        raw = bytes(self._buf[: header.total])
        del self._buf[: header.total]
        return parse_message(raw)


def message(message_id: int, op: bytes) -> bytes:
    """An LDAPMessage around an encoded protocolOp."""
    return encode(SEQUENCE, encode_int(message_id) + op)


# --------------------------------------------------------------- requests


@dataclass(frozen=True)
class SimpleBind:
    version: int
    name: bytes
    password: bytes


@dataclass(frozen=True)
class SaslBind:
    version: int
    name: bytes
    mechanism: str
    credentials: bytes | None  # None: absent (not the same as empty)


BIND_REQUEST: Final = 0x60  # [APPLICATION 0] constructed
BIND_RESPONSE: Final = 0x61
UNBIND_REQUEST: Final = 0x42  # [APPLICATION 2] primitive (NULL)
SEARCH_RESULT_ENTRY: Final = 0x64
SEARCH_RESULT_DONE: Final = 0x65
ABANDON_REQUEST: Final = 0x50  # [APPLICATION 16] primitive (MessageID)
SEARCH_RESULT_REFERENCE: Final = 0x73
EXTENDED_REQUEST: Final = 0x77
EXTENDED_RESPONSE: Final = 0x78
INTERMEDIATE_RESPONSE: Final = 0x79

# The response each request gets (RFC 4511 section 4.2 to 4.12, 4.14):
# what authgate answers a request it refuses without forwarding.
RESPONSE_TO: Final[dict[int, int]] = {
    BIND_REQUEST: BIND_RESPONSE,
    0x63: SEARCH_RESULT_DONE,  # searchRequest
    0x66: 0x67,  # modifyRequest -> modifyResponse
    0x68: 0x69,  # addRequest -> addResponse
    0x4A: 0x6B,  # delRequest -> delResponse
    0x6C: 0x6D,  # modDNRequest -> modDNResponse
    0x6E: 0x6F,  # compareRequest -> compareResponse
    EXTENDED_REQUEST: EXTENDED_RESPONSE,
}
# Responses after which more may follow for the same request.
NOT_FINAL: Final = frozenset({SEARCH_RESULT_ENTRY, SEARCH_RESULT_REFERENCE, INTERMEDIATE_RESPONSE})

STARTTLS_OID: Final = "1.3.6.1.4.1.1466.20037"  # RFC 4511 section 4.14.1
NOTICE_OF_DISCONNECTION_OID: Final = "1.3.6.1.4.1.1466.20036"  # section 4.4.1


def parse_bind(body: bytes) -> SimpleBind | SaslBind:
    """A BindRequest's content (RFC 4511 section 4.2)."""
    parts = list(elements(body))
    if len(parts) != 3 or parts[0][0] != INTEGER or parts[1][0] != OCTET_STRING:
        raise BerError("a BindRequest is version, name, authentication")
    version = decode_int(parts[0][1], low=1, high=127)
    name = parts[1][1]
    tag, auth = parts[2]
    if tag == 0x80:  # simple [0] OCTET STRING
        return SimpleBind(version, name, auth)
    if tag == 0xA3:  # sasl [3] SaslCredentials
        sasl = list(elements(auth))
        if not 1 <= len(sasl) <= 2 or any(t != OCTET_STRING for t, _ in sasl):
            raise BerError("SaslCredentials is mechanism [, credentials]")
        try:
            mechanism = sasl[0][1].decode("ascii")
        except UnicodeDecodeError:
            raise BerError("SASL mechanism name is not ASCII") from None
        credentials = sasl[1][1] if len(sasl) == 2 else None
        return SaslBind(version, name, mechanism, credentials)
    raise BerError("unknown authentication choice")


def parse_extended_name(body: bytes) -> str:
    """An ExtendedRequest's requestName (RFC 4511 section 4.12)."""
    parts = list(elements(body))
    if not 1 <= len(parts) <= 2 or parts[0][0] != 0x80:
        raise BerError("an ExtendedRequest starts with requestName [0]")
    if len(parts) == 2 and parts[1][0] != 0x81:
        raise BerError("an ExtendedRequest's value is [1]")
    try:
        return parts[0][1].decode("ascii")
    except UnicodeDecodeError:
        raise BerError("requestName is not an OID") from None


def starttls_request(message_id: int = 1) -> bytes:
    """The StartTLS ExtendedRequest (a client's)."""
    return message(message_id, encode(EXTENDED_REQUEST, encode(0x80, STARTTLS_OID.encode())))


# -------------------------------------------------------------- responses


@dataclass(frozen=True)
class Result:
    """The LDAPResult part of a response (RFC 4511 section 4.1.9)."""

    code: int
    matched_dn: bytes
    diagnostic: bytes


def parse_result(body: bytes) -> Result:
    """The resultCode, matchedDN and diagnosticMessage at the start of a
    response's content (what follows them is left alone)."""
    parts = list(elements(body))
    if len(parts) < 3 or parts[0][0] != ENUMERATED:
        raise BerError("a response starts with resultCode, matchedDN, diagnosticMessage")
    if parts[1][0] != OCTET_STRING or parts[2][0] != OCTET_STRING:
        raise BerError("matchedDN and diagnosticMessage are OCTET STRINGs")
    return Result(decode_int(parts[0][1]), parts[1][1], parts[2][1])


def response(
    message_id: int, op: int, code: int, diagnostic: str = "", *, name: str | None = None
) -> bytes:
    """A response with an LDAPResult: `op` its [APPLICATION n] tag; `name`
    an ExtendedResponse's responseName [10]."""
    content = (
        encode_int(code, ENUMERATED)
        + encode(OCTET_STRING, b"")
        + encode(OCTET_STRING, diagnostic.encode("utf-8"))
    )
    if name is not None:
        content += encode(0x8A, name.encode("ascii"))
    return message(message_id, encode(op, content))


def notice_of_disconnection(code: int, diagnostic: str) -> bytes:
    """The unsolicited notification a server sends before it closes
    (RFC 4511 section 4.4.1): messageID 0, the notice's OID."""
    return response(0, EXTENDED_RESPONSE, code, diagnostic, name=NOTICE_OF_DISCONNECTION_OID)


def starttls_result(raw: bytes, message_id: int = 1) -> int:
    """The resultCode of the StartTLS response `raw` (one whole message),
    ValueError (BerError) when it is anything else, e.g. a notice of
    disconnection (messageID 0)."""
    parsed = parse_message(raw)
    if parsed.message_id != message_id:
        raise BerError("not the answer to our request")
    if parsed.op != EXTENDED_RESPONSE:
        raise BerError("not an extended response")
    return parse_result(parsed.body).code
