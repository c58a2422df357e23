"""NTLM message encoding and strict decoding ([MS-NLMP] section 2.2).

Every NTLM message starts with the signature ``NTLMSSP\\0`` and a 32-bit
message type; variable-length data lives in a payload addressed by
8-byte "security buffer" fields (16-bit length, 16-bit maximum length,
32-bit offset from the start of the message). A peer controls all three
numbers, so every field is checked against the message length before a
byte is read; the maximum length is ignored, as section 2.2.1.1 requires
("MUST be ignored on receipt").

Decoding errors raise `NTLMFormatError`; the mechanisms in
`authgate.sasl.ntlm` turn it into a MALFORMED failure (server) or a
`ClientAuthError` (client). No cryptography here.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

__all__ = [
    "SIGNATURE",
    "AuthenticateMessage",
    "AvId",
    "ChallengeMessage",
    "Flag",
    "NTLMFormatError",
    "NegotiateMessage",
    "build_authenticate",
    "build_challenge",
    "build_negotiate",
    "decode_text",
    "encode_av_pairs",
    "encode_text",
    "parse_authenticate",
    "parse_av_pairs",
    "parse_challenge",
    "parse_negotiate",
]

SIGNATURE = b"NTLMSSP\x00"

_NEGOTIATE = 1
_CHALLENGE = 2
_AUTHENTICATE = 3

# Fixed-part sizes. Section 2.2.1.1: very old clients send a 16-byte
# NEGOTIATE (signature, type, flags) without the domain/workstation fields.
_NEGOTIATE_MIN = 16
_NEGOTIATE_HEADER = 32
# Section 2.2.1.2: up to and including TargetInfoFields; the Version field
# (8 more bytes) is only meaningful when NEGOTIATE_VERSION is set.
_CHALLENGE_HEADER = 48
_CHALLENGE_HEADER_WITH_VERSION = 56
# Section 2.2.1.3: up to and including NegotiateFlags. Version and MIC
# follow only when the client uses them; we need neither (see ntlm.py).
_AUTHENTICATE_HEADER = 64

_U16_MAX = 0xFFFF


class NTLMFormatError(ValueError):
    """A peer's NTLM message does not follow [MS-NLMP] section 2.2."""


class Flag(enum.IntFlag):
    """NegotiateFlags ([MS-NLMP] section 2.2.2.5)."""

    UNICODE = 0x00000001
    OEM = 0x00000002
    REQUEST_TARGET = 0x00000004
    SIGN = 0x00000010
    SEAL = 0x00000020
    DATAGRAM = 0x00000040
    LM_KEY = 0x00000080
    NTLM = 0x00000200
    ANONYMOUS = 0x00000800
    OEM_DOMAIN_SUPPLIED = 0x00001000
    OEM_WORKSTATION_SUPPLIED = 0x00002000
    ALWAYS_SIGN = 0x00008000
    TARGET_TYPE_DOMAIN = 0x00010000
    TARGET_TYPE_SERVER = 0x00020000
    EXTENDED_SESSIONSECURITY = 0x00080000
    IDENTIFY = 0x00100000
    REQUEST_NON_NT_SESSION_KEY = 0x00400000
    TARGET_INFO = 0x00800000
    VERSION = 0x02000000
    KEY_128 = 0x20000000
    KEY_EXCH = 0x40000000
    KEY_56 = 0x80000000


class AvId(enum.IntEnum):
    """AV_PAIR identifiers ([MS-NLMP] section 2.2.2.1)."""

    EOL = 0x0000
    NB_COMPUTER_NAME = 0x0001
    NB_DOMAIN_NAME = 0x0002
    DNS_COMPUTER_NAME = 0x0003
    DNS_DOMAIN_NAME = 0x0004
    DNS_TREE_NAME = 0x0005
    FLAGS = 0x0006
    TIMESTAMP = 0x0007
    SINGLE_HOST = 0x0008
    TARGET_NAME = 0x0009
    CHANNEL_BINDINGS = 0x000A


AvPairs = tuple[tuple[int, bytes], ...]


@dataclass(frozen=True)
class NegotiateMessage:
    flags: int


@dataclass(frozen=True)
class ChallengeMessage:
    flags: int
    server_challenge: bytes
    target_name: bytes  # raw, in the encoding `flags` selects
    target_info: AvPairs  # without the terminating MsvAvEOL


@dataclass(frozen=True)
class AuthenticateMessage:
    flags: int
    lm_response: bytes = field(repr=False)
    nt_response: bytes = field(repr=False)
    domain: str
    user: str
    workstation: str


# ---------------------------------------------------------------- helpers


def _u16(data: bytes, offset: int) -> int:
    value: int = struct.unpack_from("<H", data, offset)[0]
    return value


def _u32(data: bytes, offset: int) -> int:
    value: int = struct.unpack_from("<I", data, offset)[0]
    return value


def _check_header(data: bytes, message_type: int, minimum: int, what: str) -> None:
    if len(data) < minimum:
        raise NTLMFormatError(f"{what} message too short")
    if data[:8] != SIGNATURE:
        raise NTLMFormatError(f"{what} message lacks the NTLMSSP signature")
    if _u32(data, 8) != message_type:
        raise NTLMFormatError(f"expected an NTLM {what} message (type {message_type})")


def _buffer(data: bytes, field_offset: int, header_len: int, what: str) -> bytes:
    """The payload bytes a security-buffer field points at, bounds-checked."""
    length = _u16(data, field_offset)
    offset = _u32(data, field_offset + 4)
    if length == 0:
        # Empty fields carry arbitrary offsets in the wild (often 0).
        return b""
    # A field must point into the payload, not back into the fixed header
    # (which would let a peer alias, e.g., the flags as a user name).
    if offset < header_len or offset + length > len(data):
        raise NTLMFormatError(f"{what} field points outside the message")
    return data[offset : offset + length]


def decode_text(raw: bytes, unicode: bool, what: str) -> str:
    """Text fields are UTF-16LE when NEGOTIATE_UNICODE is negotiated, else in
    the client's OEM code page, which we cannot know: latin-1 keeps every
    byte and is what ASCII-only legacy clients send in practice."""
    if not unicode:
        return raw.decode("latin-1")
    if len(raw) % 2:
        raise NTLMFormatError(f"{what} has an odd UTF-16 length")
    try:
        return raw.decode("utf-16-le")
    except UnicodeDecodeError:
        raise NTLMFormatError(f"{what} is not valid UTF-16") from None


def encode_text(text: str, unicode: bool, what: str) -> bytes:
    try:
        return text.encode("utf-16-le" if unicode else "latin-1")
    except UnicodeEncodeError:
        raise NTLMFormatError(f"{what} cannot be sent in the OEM character set") from None


class _Payload:
    """Collects payload fields behind a fixed header of known size."""

    def __init__(self, header_len: int) -> None:
        self._offset = header_len
        self._parts: list[bytes] = []

    def add(self, value: bytes, what: str) -> bytes:
        """Append `value` and return its 8-byte security-buffer field."""
        if len(value) > _U16_MAX:
            raise NTLMFormatError(f"{what} is too long for an NTLM message")
        fields = struct.pack("<HHI", len(value), len(value), self._offset)
        self._parts.append(value)
        self._offset += len(value)
        return fields

    def data(self) -> bytes:
        return b"".join(self._parts)


# ---------------------------------------------------------------- AV pairs


def parse_av_pairs(data: bytes) -> AvPairs:
    """Decode an AV_PAIR list (section 2.2.2.1) up to MsvAvEOL.

    A list that ends exactly at the end of the buffer without MsvAvEOL is
    accepted (some servers omit it); a pair running past the end is not.
    """
    pairs: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(data):
        if pos + 4 > len(data):
            raise NTLMFormatError("truncated AV_PAIR header in TargetInfo")
        av_id, av_len = struct.unpack_from("<HH", data, pos)
        pos += 4
        if pos + av_len > len(data):
            raise NTLMFormatError("AV_PAIR runs past the end of TargetInfo")
        if av_id == AvId.EOL:
            if av_len:
                raise NTLMFormatError("MsvAvEOL with a non-empty value")
            break
        pairs.append((av_id, data[pos : pos + av_len]))
        pos += av_len
    return tuple(pairs)


def encode_av_pairs(pairs: AvPairs) -> bytes:
    """Encode `pairs` and the terminating MsvAvEOL."""
    out = bytearray()
    for av_id, value in pairs:
        if av_id == AvId.EOL:
            raise NTLMFormatError("MsvAvEOL inside an AV_PAIR list")
        if len(value) > _U16_MAX:
            raise NTLMFormatError("AV_PAIR value too long")
        out += struct.pack("<HH", av_id, len(value)) + value
    out += struct.pack("<HH", AvId.EOL, 0)
    return bytes(out)


# ---------------------------------------------------------------- NEGOTIATE


def parse_negotiate(data: bytes) -> NegotiateMessage:
    _check_header(data, _NEGOTIATE, _NEGOTIATE_MIN, "NEGOTIATE")
    flags = _u32(data, 12)
    # The domain and workstation fields are only meaningful when their
    # "supplied" flags are set (section 2.2.1.1); we do not use them, but a
    # message that announces them must carry them within bounds.
    for flag, offset, what in (
        (Flag.OEM_DOMAIN_SUPPLIED, 16, "DomainName"),
        (Flag.OEM_WORKSTATION_SUPPLIED, 24, "Workstation"),
    ):
        if flags & flag:
            if len(data) < _NEGOTIATE_HEADER:
                raise NTLMFormatError(f"NEGOTIATE announces {what} but lacks its field")
            _buffer(data, offset, _NEGOTIATE_HEADER, what)
    return NegotiateMessage(flags=flags)


def build_negotiate(flags: int) -> bytes:
    # Empty domain and workstation fields pointing just past the header.
    empty = struct.pack("<HHI", 0, 0, _NEGOTIATE_HEADER)
    return SIGNATURE + struct.pack("<II", _NEGOTIATE, flags) + empty + empty


# ---------------------------------------------------------------- CHALLENGE


def parse_challenge(data: bytes) -> ChallengeMessage:
    _check_header(data, _CHALLENGE, _CHALLENGE_HEADER, "CHALLENGE")
    flags = _u32(data, 20)
    header_len = _CHALLENGE_HEADER
    if flags & Flag.VERSION:
        if len(data) < _CHALLENGE_HEADER_WITH_VERSION:
            raise NTLMFormatError("CHALLENGE sets NEGOTIATE_VERSION but lacks the Version field")
        header_len = _CHALLENGE_HEADER_WITH_VERSION
    target_name = _buffer(data, 12, header_len, "TargetName")
    target_info_raw = _buffer(data, 40, header_len, "TargetInfo")
    return ChallengeMessage(
        flags=flags,
        server_challenge=data[24:32],
        target_name=target_name,
        target_info=parse_av_pairs(target_info_raw),
    )


def build_challenge(
    flags: int, server_challenge: bytes, target_name: bytes, target_info: AvPairs
) -> bytes:
    if len(server_challenge) != 8:
        raise ValueError("the server challenge is 8 bytes")
    # The Version field is always laid out (zeros unless NEGOTIATE_VERSION,
    # which we do not set): clients that ignore the flag and assume a
    # 56-byte header still find the payload where they expect it.
    payload = _Payload(_CHALLENGE_HEADER_WITH_VERSION)
    target_name_fields = payload.add(target_name, "TargetName")
    target_info_fields = payload.add(encode_av_pairs(target_info), "TargetInfo")
    return (
        SIGNATURE
        + struct.pack("<I", _CHALLENGE)
        + target_name_fields
        + struct.pack("<I", flags)
        + server_challenge
        + b"\x00" * 8  # Reserved
        + target_info_fields
        + b"\x00" * 8  # Version
        + payload.data()
    )


# ---------------------------------------------------------------- AUTHENTICATE


def parse_authenticate(data: bytes) -> AuthenticateMessage:
    _check_header(data, _AUTHENTICATE, _AUTHENTICATE_HEADER, "AUTHENTICATE")
    flags = _u32(data, 60)
    # Check every field, including the two we do not use, so that a message
    # with a wild field is refused as a whole.
    lm = _buffer(data, 12, _AUTHENTICATE_HEADER, "LmChallengeResponse")
    nt = _buffer(data, 20, _AUTHENTICATE_HEADER, "NtChallengeResponse")
    domain_raw = _buffer(data, 28, _AUTHENTICATE_HEADER, "DomainName")
    user_raw = _buffer(data, 36, _AUTHENTICATE_HEADER, "UserName")
    workstation_raw = _buffer(data, 44, _AUTHENTICATE_HEADER, "Workstation")
    _buffer(data, 52, _AUTHENTICATE_HEADER, "EncryptedRandomSessionKey")
    unicode = bool(flags & Flag.UNICODE)
    return AuthenticateMessage(
        flags=flags,
        lm_response=lm,
        nt_response=nt,
        domain=decode_text(domain_raw, unicode, "DomainName"),
        user=decode_text(user_raw, unicode, "UserName"),
        workstation=decode_text(workstation_raw, unicode, "Workstation"),
    )


def build_authenticate(
    flags: int,
    lm_response: bytes,
    nt_response: bytes,
    domain: bytes,
    user: bytes,
    workstation: bytes,
) -> bytes:
    """An AUTHENTICATE message with a 64-byte header: no Version, no MIC,
    no EncryptedRandomSessionKey (we negotiate neither KEY_EXCH nor VERSION)."""
    payload = _Payload(_AUTHENTICATE_HEADER)
    fields = (
        payload.add(lm_response, "LmChallengeResponse")
        + payload.add(nt_response, "NtChallengeResponse")
        + payload.add(domain, "DomainName")
        + payload.add(user, "UserName")
        + payload.add(workstation, "Workstation")
        + payload.add(b"", "EncryptedRandomSessionKey")
    )
    return (
        SIGNATURE
        + struct.pack("<I", _AUTHENTICATE)
        + fields
        + struct.pack("<I", flags)
        + payload.data()
    )
