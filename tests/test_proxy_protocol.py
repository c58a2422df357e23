"""PROXY protocol v1/v2 parser and v2 builder (haproxy doc/proxy-protocol.txt):
the spec's examples, round trips, incremental feeding and hostile bytes."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authgate.proxy.proxy_protocol import (
    V1_MAX,
    V1_PREFIX,
    V2_SIGNATURE,
    ProxiedAddress,
    ProxyHeaderError,
    build_v2,
    parse,
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
PAYLOAD = b"EHLO client.example\r\n"  # what the proxied client says first
MAX_V6 = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"


def v2_header(ver_cmd: int, family: int, body: bytes) -> bytes:
    """A v2 header made by hand, field by field (spec section 2.2)."""
    return V2_SIGNATURE + bytes([ver_cmd, family]) + struct.pack("!H", len(body)) + body


def tlv(kind: int, value: bytes) -> bytes:
    # Spec section 2.2.7: type (1 byte), length (2 bytes, network order), value.
    return bytes([kind]) + struct.pack("!H", len(value)) + value


# The spec's TLV types: ALPN 0x01, AUTHORITY 0x02, CRC32C 0x03, NOOP 0x04,
# UNIQUE_ID 0x05, SSL 0x20 (with its sub-TLVs), NETNS 0x30.
TLVS = (
    tlv(0x01, b"h2")
    + tlv(0x02, b"mail.example.test")
    + tlv(0x04, b"\0" * 3)
    + tlv(0x05, b"conn-1234")
    + tlv(0x20, b"\x01" + b"\0\0\0\0" + tlv(0x21, b"TLSv1.3"))
)


# ============================================================ v1 examples


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        # The spec's example line (section 2.1).
        (
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
            ProxiedAddress(("192.168.0.1", 56324), ("192.168.0.11", 443)),
        ),
        # Its worst cases for each family.
        (
            b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
            ProxiedAddress(("255.255.255.255", 65535), ("255.255.255.255", 65535)),
        ),
        (
            f"PROXY TCP6 {MAX_V6} {MAX_V6} 65535 65535\r\n".encode(),
            ProxiedAddress((MAX_V6, 65535), (MAX_V6, 65535)),
        ),
        (
            b"PROXY TCP6 2001:db8::1 ::1 0 25\r\n",
            ProxiedAddress(("2001:db8::1", 0), ("::1", 25)),
        ),
        (b"PROXY UNKNOWN\r\n", ProxiedAddress(None, None)),
        # "the receiver must ignore anything presented before the CRLF".
        (
            f"PROXY UNKNOWN {MAX_V6} {MAX_V6} 65535 65535\r\n".encode(),
            ProxiedAddress(None, None),
        ),
    ],
)
def test_v1_spec_examples(line: bytes, expected: ProxiedAddress) -> None:
    assert parse(line) == (expected, len(line))
    # What follows the header is the client's, not the header's.
    assert parse(line + PAYLOAD) == (expected, len(line))


def test_v1_longest_line_is_107_bytes() -> None:
    # Section 2.1: 107 characters including CRLF is the most a sender emits.
    longest = f"PROXY UNKNOWN {MAX_V6} {MAX_V6} 65535 65535\r\n".encode()
    assert len(longest) == V1_MAX == 107
    assert parse(longest) == (ProxiedAddress(None, None), 107)
    one_more = longest[:-2] + b"0\r\n"
    with pytest.raises(ProxyHeaderError):
        parse(one_more)


@pytest.mark.parametrize("size", [V1_MAX, V1_MAX + 1, 200, 5000])
def test_v1_oversized_line_without_crlf_is_rejected_early(size: int) -> None:
    # A peer that never sends CRLF must not make us buffer forever.
    data = (V1_PREFIX + b"UNKNOWN " + b"A" * size)[:size]
    with pytest.raises(ProxyHeaderError, match="too long"):
        parse(data)
    # One byte short of the limit still waits for more.
    assert parse(data[: V1_MAX - 1]) is None


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324\r\n",  # a field missing
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443 x\r\n",  # one too many
        b"PROXY TCP4  192.168.0.1 192.168.0.11 56324 443\r\n",  # double space
        b"PROXY TCP5 192.168.0.1 192.168.0.11 56324 443\r\n",
        b"PROXY tcp4 192.168.0.1 192.168.0.11 56324 443\r\n",
        b"PROXY TCP4 ::1 ::1 56324 443\r\n",  # family mismatch
        b"PROXY TCP6 192.168.0.1 192.168.0.11 56324 443\r\n",
        b"PROXY TCP4 192.168.0.1 ::1 56324 443\r\n",
        b"PROXY TCP4 192.168.0.256 192.168.0.11 56324 443\r\n",
        b"PROXY TCP4 192.168.000.1 192.168.0.11 56324 443\r\n",  # leading zeros
        b"PROXY TCP4 192.168.0.1 192.168.0.11 056324 443\r\n",
        b"PROXY TCP4 192.168.0.1 192.168.0.11 65536 443\r\n",
        b"PROXY TCP4 192.168.0.1 192.168.0.11 -1 443\r\n",
        b"PROXY TCP4 192.168.0.1 192.168.0.11 +1 443\r\n",
        b"PROXY TCP4 192.168.0.1 192.168.0.11 0x50 443\r\n",
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443 \r\n",
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 4\xc3\xa9\r\n",  # not ASCII
        b"PROXY \r\n",
        b"PROXY\r\n",
        b"proxy TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
        b"EHLO client.example\r\n",  # no header at all
    ],
)
def test_v1_malformed_lines_are_rejected(line: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse(line)


# ============================================================ v2 examples


def test_v2_tcp4_by_hand() -> None:
    body = bytes([192, 0, 2, 1, 198, 51, 100, 7]) + struct.pack("!HH", 40001, 993)
    header = v2_header(0x21, 0x11, body)
    expected = ProxiedAddress(("192.0.2.1", 40001), ("198.51.100.7", 993))
    assert parse(header + PAYLOAD) == (expected, 28)
    assert build_v2(("192.0.2.1", 40001), ("198.51.100.7", 993)) == header


def test_v2_tcp6_by_hand() -> None:
    src, dst = ipaddress.IPv6Address("2001:db8::7"), ipaddress.IPv6Address("2001:db8::25")
    body = src.packed + dst.packed + struct.pack("!HH", 65535, 0)
    header = v2_header(0x21, 0x21, body)
    expected = ProxiedAddress(("2001:db8::7", 65535), ("2001:db8::25", 0))
    assert parse(header) == (expected, 52)
    assert build_v2(("2001:db8::7", 65535), ("2001:db8::25", 0)) == header


@pytest.mark.parametrize(
    ("family", "addresses", "expected"),
    [
        (
            0x11,
            bytes([10, 0, 0, 1, 10, 0, 0, 2]) + struct.pack("!HH", 1, 2),
            ProxiedAddress(("10.0.0.1", 1), ("10.0.0.2", 2)),
        ),
        (
            0x21,
            ipaddress.IPv6Address("::1").packed * 2 + struct.pack("!HH", 3, 4),
            ProxiedAddress(("::1", 3), ("::1", 4)),
        ),
    ],
)
def test_v2_proxy_with_tlvs_appended(
    family: int, addresses: bytes, expected: ProxiedAddress
) -> None:
    # Section 2.2: the length covers the addresses *and* the TLVs after
    # them; a receiver that only wants addresses skips the rest.
    header = v2_header(0x21, family, addresses + TLVS)
    assert parse(header + PAYLOAD) == (expected, len(header))
    for cut in range(len(header)):
        assert parse(header[:cut]) is None


@pytest.mark.parametrize(
    "body_family",
    [
        (b"", 0x00),
        (TLVS, 0x00),
        # LOCAL ignores the address block, whatever the family says.
        (bytes(12) + TLVS, 0x11),
        (bytes(36), 0x21),
        (b"junk", 0x31),
        (b"", 0xFF),
    ],
)
def test_v2_local_is_accepted_without_addresses(body_family: tuple[bytes, int]) -> None:
    # Section 2.2: LOCAL (the balancer's own health check) -- "the receiver
    # must accept this connection as valid and must use the real connection
    # endpoints and discard the protocol block including the family".
    body, family = body_family
    header = v2_header(0x20, family, body)
    assert parse(header + PAYLOAD) == (ProxiedAddress(None, None), len(header))


def test_v2_proxy_unspec_family_carries_no_addresses() -> None:
    header = v2_header(0x21, 0x00, TLVS)
    assert parse(header) == (ProxiedAddress(None, None), len(header))


@pytest.mark.parametrize(
    ("ver_cmd", "family", "body", "message"),
    [
        (0x11, 0x11, bytes(12), "version or command"),  # version 1 in a v2 frame
        (0x31, 0x11, bytes(12), "version or command"),
        (0x22, 0x11, bytes(12), "version or command"),  # command 2 is undefined
        (0x2F, 0x11, bytes(12), "version or command"),
        (0x21, 0x12, bytes(12), "family"),  # UDP over IPv4: not for a TCP listener
        (0x21, 0x22, bytes(36), "family"),  # UDP over IPv6
        (0x21, 0x31, bytes(216), "family"),  # AF_UNIX stream
        (0x21, 0x32, bytes(216), "family"),
        (0x21, 0x13, bytes(12), "family"),  # transport 3 is undefined
        (0x21, 0x41, bytes(12), "family"),  # address family 4 is undefined
        (0x21, 0xFF, bytes(12), "family"),
        (0x21, 0x11, bytes(11), "too short"),
        (0x21, 0x21, bytes(35), "too short"),
        (0x21, 0x11, b"", "too short"),
    ],
)
def test_v2_bad_headers_are_rejected(ver_cmd: int, family: int, body: bytes, message: str) -> None:
    with pytest.raises(ProxyHeaderError, match=message):
        parse(v2_header(ver_cmd, family, body))


def test_v2_bad_version_is_rejected_before_the_body_arrives() -> None:
    # Only the 16-byte fixed part is needed to refuse: no waiting for a
    # body of up to 64 KiB that will be refused anyway.
    fixed = v2_header(0x11, 0x11, bytes(12))[:16]
    with pytest.raises(ProxyHeaderError):
        parse(fixed)


def test_v2_waits_for_a_declared_body() -> None:
    header = V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", 65535)
    assert parse(header) is None
    assert parse(header + bytes(65534)) is None
    result = parse(header + bytes(65535) + PAYLOAD)
    assert result == (ProxiedAddress(("0.0.0.0", 0), ("0.0.0.0", 0)), 16 + 65535)


@pytest.mark.parametrize(
    "data",
    [
        V2_SIGNATURE[:11] + b"X",  # signature broken in its last byte
        b"\r\n\r\n\x00\r\nQUIT\r",
        b"\r\nX",
        b"\r\r",
    ],
)
def test_v2_broken_signature_is_rejected(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse(data)


@pytest.mark.parametrize("data", [b"", b"P", b"PROXY", b"\r", b"\r\n", V2_SIGNATURE])
def test_prefixes_of_either_version_need_more(data: bytes) -> None:
    assert parse(data) is None


def test_build_v2_drops_ipv6_zone() -> None:
    header = build_v2(("fe80::1%eth0", 1), ("fe80::2", 2))
    assert parse(header) == (ProxiedAddress(("fe80::1", 1), ("fe80::2", 2)), 52)


# ============================================================= hypothesis

ports = st.integers(min_value=0, max_value=65535)


@settings(max_examples=150)
@given(st.ip_addresses(v=4), ports, st.ip_addresses(v=4), ports)
def test_v2_round_trip_ipv4(
    src: ipaddress.IPv4Address, sport: int, dst: ipaddress.IPv4Address, dport: int
) -> None:
    header = build_v2((str(src), sport), (str(dst), dport))
    assert len(header) == 28
    assert parse(header) == (ProxiedAddress((str(src), sport), (str(dst), dport)), 28)


@settings(max_examples=150)
@given(st.ip_addresses(v=6), ports, st.ip_addresses(v=6), ports)
def test_v2_round_trip_ipv6(
    src: ipaddress.IPv6Address, sport: int, dst: ipaddress.IPv6Address, dport: int
) -> None:
    header = build_v2((str(src), sport), (str(dst), dport))
    assert len(header) == 52
    assert parse(header) == (ProxiedAddress((str(src), sport), (str(dst), dport)), 52)


@settings(max_examples=150)
@given(
    st.ip_addresses(v=4), ports, st.ip_addresses(v=6), ports, st.booleans(), st.binary(max_size=40)
)
def test_v2_round_trip_maps_mixed_families_to_ipv6(
    v4: ipaddress.IPv4Address,
    port4: int,
    v6: ipaddress.IPv6Address,
    port6: int,
    v4_is_source: bool,
    payload: bytes,
) -> None:
    # An IPv4 client on a dual-stack (IPv6) listener, or the reverse: v2
    # cannot mix families, so the IPv4 side travels as ::ffff:a.b.c.d.
    src, dst = ((str(v4), port4), (str(v6), port6))
    if not v4_is_source:
        src, dst = dst, src
    header = build_v2(src, dst)
    assert header[13] == 0x21  # TCP over IPv6
    result = parse(header + payload)
    assert result is not None
    got, length = result
    assert length == len(header) == 52
    assert got.source is not None and got.destination is not None
    for (text, port), (sent_text, sent_port) in ((got.source, src), (got.destination, dst)):
        parsed = ipaddress.IPv6Address(text)
        sent = ipaddress.ip_address(sent_text)
        assert port == sent_port
        if sent.version == 4:
            assert parsed.ipv4_mapped == sent
        else:
            assert parsed == sent


def _v1_line(src: IPAddress, sport: int, dst: IPAddress, dport: int) -> bytes:
    family = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {family} {src} {dst} {sport} {dport}\r\n".encode()


def _header(draw: st.DrawFn) -> tuple[bytes, ProxiedAddress]:
    """A valid v1 or v2 header and what it says."""
    src: IPAddress
    dst: IPAddress
    if draw(st.booleans()):
        src, dst = draw(st.ip_addresses(v=4)), draw(st.ip_addresses(v=4))
    else:
        src, dst = draw(st.ip_addresses(v=6)), draw(st.ip_addresses(v=6))
    sport, dport = draw(ports), draw(ports)
    expected = ProxiedAddress((str(src), sport), (str(dst), dport))
    kind = draw(st.sampled_from(["v1", "v2", "v2-tlv", "local", "unknown"]))
    if kind == "v1":
        return _v1_line(src, sport, dst, dport), expected
    if kind == "unknown":
        return b"PROXY UNKNOWN\r\n", ProxiedAddress(None, None)
    if kind == "local":
        return v2_header(0x20, 0x00, draw(st.binary(max_size=30))), ProxiedAddress(None, None)
    header = build_v2((str(src), sport), (str(dst), dport))
    if kind == "v2-tlv":
        extra = draw(st.binary(max_size=60))
        body = header[16:] + extra
        header = header[:14] + struct.pack("!H", len(body)) + body
    return header, expected


valid_headers = st.composite(_header)()


@settings(max_examples=150)
@given(valid_headers, st.binary(max_size=30), st.data())
def test_incremental_feeding(
    header_expected: tuple[bytes, ProxiedAddress], payload: bytes, data: st.DataObject
) -> None:
    header, expected = header_expected
    # Every proper prefix asks for more (never raises), and the whole header
    # parses the same way whatever follows it.
    for cut in range(len(header)):
        assert parse(header[:cut]) is None, header[:cut]
    assert parse(header) == (expected, len(header))
    assert parse(header + payload) == (expected, len(header))
    # A reader accumulating arbitrary chunks gets the answer exactly when
    # the last header byte arrives.
    buffer = b""
    stream = header + payload
    while True:
        step = data.draw(st.integers(min_value=1, max_value=20))
        buffer, stream = buffer + stream[:step], stream[step:]
        result = parse(buffer)
        if len(buffer) < len(header):
            assert result is None
        else:
            assert result == (expected, len(header))
            break


def _outcome(data: bytes) -> tuple[ProxiedAddress, int] | str | None:
    try:
        result = parse(data)
    except ProxyHeaderError:
        return "error"
    if result is not None:
        addresses, length = result
        assert isinstance(addresses, ProxiedAddress)
        assert 0 < length <= len(data)
        # What we report is well formed: an address and a 16-bit port.
        for endpoint in (addresses.source, addresses.destination):
            if endpoint is not None:
                ipaddress.ip_address(endpoint[0].split("%", 1)[0])
                assert 0 <= endpoint[1] <= 65535
    return result


hostile = st.one_of(
    st.binary(max_size=200),
    st.binary(max_size=150).map(lambda b: V1_PREFIX + b),
    st.binary(max_size=80).map(lambda b: b"PROXY TCP4 " + b),
    st.binary(max_size=80).map(lambda b: b"PROXY TCP6 " + b),
    st.binary(max_size=80).map(lambda b: V2_SIGNATURE + b),
    st.tuples(st.integers(0, 255), st.integers(0, 255), st.binary(max_size=80)).map(
        lambda t: v2_header(t[0], t[1], t[2])
    ),
    st.tuples(st.integers(0, 255), st.integers(0, 255), st.binary(max_size=80)).map(
        lambda t: V2_SIGNATURE + bytes(t[:2]) + struct.pack("!H", len(t[2]) + 3) + t[2]
    ),
)


@settings(max_examples=400)
@given(hostile)
def test_hostile_bytes_give_a_result_none_or_header_error(data: bytes) -> None:
    # Anything else (IndexError, struct.error, UnicodeError, ValueError
    # from ipaddress...) would escape the reader and kill the connection
    # handler instead of refusing the header.
    _outcome(data)


@settings(max_examples=200)
@given(valid_headers, st.integers(min_value=0), st.integers(min_value=1, max_value=255))
def test_mutated_valid_headers(
    header_expected: tuple[bytes, ProxiedAddress], where: int, xor: int
) -> None:
    header, _ = header_expected
    i = where % len(header)
    mutated = header[:i] + bytes([header[i] ^ xor]) + header[i + 1 :]
    _outcome(mutated)
    _outcome(mutated[: where % (len(mutated) + 1)])
