"""HAProxy PROXY protocol v1/v2 (haproxy's doc/proxy-protocol.txt): tell a
backend the real client address (Dovecot `haproxy_trusted_networks`, Postfix
`smtpd_upstream_proxy_protocol`), and read it from a trusted load balancer.

Pure functions: bytes in, addresses out.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX = 107  # longest v1 line including CRLF (spec section 2.1)


class ProxyHeaderError(ValueError):
    """Not a valid PROXY header."""


@dataclass(frozen=True)
class ProxiedAddress:
    """The addresses a PROXY header carries (None for LOCAL/UNKNOWN)."""

    source: tuple[str, int] | None
    destination: tuple[str, int] | None


def build_v2(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A PROXY v2 header for a TCP connection from source to destination."""
    src = ipaddress.ip_address(source[0].split("%", 1)[0])
    dst = ipaddress.ip_address(destination[0].split("%", 1)[0])
    if src.version != dst.version:
        # An IPv4 client on an IPv6 listener (or the reverse): map to IPv6.
        src, dst = _as_v6(src), _as_v6(dst)
    family = 0x11 if src.version == 4 else 0x21  # TCP over IPv4 / IPv6
    body = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body


def _as_v6(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    if isinstance(addr, ipaddress.IPv6Address):
        return addr
    return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + addr.packed)


def parse(data: bytes) -> tuple[ProxiedAddress, int] | None:
    """Parse a PROXY v1 or v2 header at the start of `data`.

    Returns (addresses, header length), or None when more bytes are needed.
    Raises ProxyHeaderError when `data` cannot start a valid header.
    """
    if data[: len(V2_SIGNATURE)] == V2_SIGNATURE[: len(data)] and data[:1] == b"\r":
        return _parse_v2(data)
    if data[: len(V1_PREFIX)] == V1_PREFIX[: len(data)]:
        return _parse_v1(data)
    raise ProxyHeaderError("no PROXY header")


def _parse_v1(data: bytes) -> tuple[ProxiedAddress, int] | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyHeaderError("PROXY v1 line too long")
        return None
    try:
        fields = data[:end].decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise ProxyHeaderError("PROXY v1 line is not ASCII") from None
    if len(fields) >= 2 and fields[1] == "UNKNOWN":
        return ProxiedAddress(None, None), end + 2
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("malformed PROXY v1 line")
    version = 4 if fields[1] == "TCP4" else 6
    try:
        src, dst = ipaddress.ip_address(fields[2]), ipaddress.ip_address(fields[3])
        sport, dport = _port(fields[4]), _port(fields[5])
    except ValueError:
        raise ProxyHeaderError("malformed PROXY v1 address") from None
    if src.version != version or dst.version != version:
        raise ProxyHeaderError("PROXY v1 address family mismatch")
    return ProxiedAddress((str(src), sport), (str(dst), dport)), end + 2


def _port(text: str) -> int:
    # v1 ports are plain decimal without leading zeros, 0-65535.
    if not text.isdigit() or (len(text) > 1 and text[0] == "0") or int(text) > 65535:
        raise ValueError(text)
    return int(text)


def _parse_v2(data: bytes) -> tuple[ProxiedAddress, int] | None:
    if len(data) < 16:
        return None
    if data[:12] != V2_SIGNATURE:
        raise ProxyHeaderError("bad PROXY v2 signature")
    ver_cmd, family = data[12], data[13]
    (length,) = struct.unpack("!H", data[14:16])
    if ver_cmd >> 4 != 2 or ver_cmd & 0x0F not in (0, 1):
        raise ProxyHeaderError("unsupported PROXY v2 version or command")
    if len(data) < 16 + length:
        return None
    body = data[16 : 16 + length]
    total = 16 + length
    if ver_cmd & 0x0F == 0:  # LOCAL: the balancer's own health check
        return ProxiedAddress(None, None), total
    if family == 0x11:  # TCP over IPv4
        size, build = 12, ipaddress.IPv4Address
    elif family == 0x21:  # TCP over IPv6
        size, build = 36, ipaddress.IPv6Address  # type: ignore[assignment]
    elif family == 0x00:
        return ProxiedAddress(None, None), total
    else:
        raise ProxyHeaderError("unsupported PROXY v2 address family")
    if length < size:
        raise ProxyHeaderError("PROXY v2 address block too short")
    half = (size - 4) // 2
    src = build(body[:half])
    dst = build(body[half : 2 * half])
    sport, dport = struct.unpack("!HH", body[2 * half : size])
    return ProxiedAddress((str(src), sport), (str(dst), dport)), total


async def read_header(recv: Callable[[int], Awaitable[bytes]]) -> ProxiedAddress:
    """Read one PROXY header with `recv(n)` (up to n bytes, b"" at EOF),
    never a byte past it: what follows belongs to the client (for an
    implicit-TLS listener, its ClientHello)."""

    async def exactly(count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = await recv(count - len(data))
            if not chunk:
                raise ProxyHeaderError("connection closed inside the PROXY header")
            data += chunk
        return data

    data = await exactly(1)
    if data == b"\r":  # v2: a 16-byte preamble that carries the length
        data += await exactly(15)
        if data[:12] != V2_SIGNATURE:
            raise ProxyHeaderError("bad PROXY v2 signature")
        data += await exactly(struct.unpack("!H", data[14:16])[0])
    elif data == b"P":  # v1: one line
        while not data.endswith(b"\r\n"):
            if len(data) >= V1_MAX:
                raise ProxyHeaderError("PROXY v1 line too long")
            data += await exactly(1)
    else:
        raise ProxyHeaderError("no PROXY header")
    result = parse(data)
    if result is None or result[1] != len(data):
        raise ProxyHeaderError("malformed PROXY header")
    return result[0]


def looks_like_header(data: bytes) -> bool:
    """Does `data` start like a PROXY header (from a peer not allowed one)?"""
    # The v2 signature opens with CR LF CR LF NUL: no mail command does.
    return data.startswith(V1_PREFIX) or data.startswith(V2_SIGNATURE[:5])
