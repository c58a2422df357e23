"""Values authgate writes into commands toward a backend (nginx
CVE-2026-28753: CR/LF from a DNS answer injected into XCLIENT): whatever
the input, no CR, LF or NUL reaches the wire except the command's own final
CRLF, only printable ASCII is written, and lengths are bounded.

Covered: SMTP XCLIENT (`xtext`, `_xclient_address`, and the whole command
the client machine sends), the IMAP ID command with x-originating-ip/-port,
and the PROXY v2 header (binary, fixed size, no TLVs)."""

from __future__ import annotations

import ipaddress
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authgate.protocols.base import ClientSettings, Send
from authgate.protocols.imap import ImapClient
from authgate.protocols.smtp import SmtpClient, _xclient_address, xtext
from authgate.proxy.proxy_protocol import V2_SIGNATURE, build_v2, parse
from authgate.sasl.base import ClientCredentials

# Hostile text: anything, with the dangerous characters made likely, and
# sometimes much longer than any real address.
DANGEROUS = st.sampled_from(
    ["\r", "\n", "\0", "\r\n", " ", '"', "\\", "+", "=", "(", ")", "é", "\u2028"]
)
HOSTILE = st.one_of(
    st.text(),
    st.lists(st.one_of(DANGEROUS, st.text(max_size=8)), max_size=40).map("".join),
    st.ip_addresses()
    .map(str)
    .flatmap(lambda ip: st.tuples(st.just(ip), st.text()).map(lambda t: t[0] + t[1])),
    st.integers(1000, 20000).map(lambda n: "1" * n),
)
ADDRESS = st.one_of(HOSTILE, st.ip_addresses().map(str))
PORT = st.one_of(st.none(), st.integers(0, 65535))
# One command line as a client machine sends it: printable ASCII, CRLF last.
COMMAND_LINE = re.compile(rb"[\x20-\x7e]*\r\n")


def xtext_decode(text: str) -> bytes:
    """RFC 3461 section 4, the other way round (for the round trip)."""
    out = bytearray()
    i = 0
    while i < len(text):
        if text[i] == "+":
            out.append(int(text[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(ord(text[i]))
            i += 1
    return bytes(out)


def sent(events: list[object]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Send))


# ---------------------------------------------------------------- XCLIENT


@settings(max_examples=300)
@given(HOSTILE)
def test_xtext_writes_only_xchars_and_round_trips(value: str) -> None:
    encoded = xtext(value)
    # RFC 3461 xchar: "!" to "~" except "+" and "="; those and all else as +XX.
    assert re.fullmatch(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})*", encoded), encoded
    assert xtext_decode(encoded) == value.encode("utf-8")


@settings(max_examples=300)
@given(ADDRESS)
def test_xclient_address_is_an_ip_or_unavailable(address: str) -> None:
    value = _xclient_address(address)
    assert len(value) <= len("IPV6:") + 39  # the longest IPv6 text form
    if value != "[UNAVAILABLE]":
        ipaddress.ip_address(value.removeprefix("IPV6:"))  # raises if not
    assert xtext(value) == value or value.startswith("[")  # nothing to escape in an IP


@settings(max_examples=300)
@given(ADDRESS, PORT, st.one_of(st.none(), HOSTILE.filter(bool)))
def test_xclient_command_is_one_clean_line(
    address: str, port: int | None, login: str | None
) -> None:
    client = SmtpClient(
        ClientSettings(
            hostname="gw.example",
            client_address=address,
            client_port=port,
            use_xclient=True,
            xclient_login=login,
            credentials=None if login else ClientCredentials("master", "pw", "alice"),
        )
    )
    client.receive_data(b"220 backend ESMTP\r\n")
    line = sent(
        client.receive_data(
            b"250-backend\r\n250-XCLIENT ADDR PORT LOGIN NAME HELO\r\n250 AUTH PLAIN\r\n"
        )
    )
    if not line.startswith(b"XCLIENT "):
        return  # nothing to tell (no port, no login, no address): no XCLIENT
    assert COMMAND_LINE.fullmatch(line), line
    for attribute in line[len(b"XCLIENT ") : -2].split(b" "):
        name, _, value = attribute.partition(b"=")
        if name in (b"ADDR", b"PORT"):
            assert len(value) <= 44, attribute  # an address or a port, nothing more
        else:
            # An identity is never cut short: the backend would log in someone else.
            assert name == b"LOGIN" and login is not None
            assert xtext_decode(value.decode("ascii")) == login.encode("utf-8")


# ------------------------------------------------------------------ IMAP ID


ID_GREETING = b"* OK [CAPABILITY IMAP4rev1 ID SASL-IR AUTH=PLAIN] backend ready\r\n"
# RFC 2971: ("x-originating-ip" "<ip>" ["x-originating-port" "<port>"]).
ID_COMMAND = re.compile(
    rb'a1 ID \("x-originating-ip" "([0-9A-Fa-f.:]{2,45})"(?: "x-originating-port" "([0-9]{1,5})")?\)\r\n'
)


@settings(max_examples=300)
@given(ADDRESS, PORT)
def test_imap_id_carries_only_an_ip_and_a_port(address: str, port: int | None) -> None:
    client = ImapClient(
        ClientSettings(
            hostname="gw.example",
            client_address=address,
            client_port=port,
            use_id=True,
            credentials=ClientCredentials("master", "pw", "alice"),
        )
    )
    line = sent(client.receive_data(ID_GREETING))
    assert COMMAND_LINE.fullmatch(line), line
    if not line.startswith(b"a1 ID "):
        # Not an IP address: no ID at all rather than an unchecked value.
        assert line.startswith(b"a1 AUTHENTICATE ")
        assert _not_an_ip(address)
        return
    match = ID_COMMAND.fullmatch(line)
    assert match is not None, line
    ipaddress.ip_address(match.group(1).decode())
    assert match.group(2) == (None if port is None else str(port).encode())


def _not_an_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return True
    return False


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("192.0.2.7", b"192.0.2.7"),
        ("::ffff:192.0.2.7", b"192.0.2.7"),  # a dual-stack socket's IPv4 peer
        ("2001:DB8:0:0:0:0:0:7", b"2001:db8::7"),
        ("fe80::1%eth0", b"fe80::1"),
        ("fe80::1%\r\na2 LOGIN x y", b"fe80::1"),
    ],
)
def test_imap_id_writes_the_canonical_address(address: str, expected: bytes) -> None:
    client = ImapClient(
        ClientSettings(
            hostname="gw",
            client_address=address,
            use_id=True,
            credentials=ClientCredentials("m", "p"),
        )
    )
    assert (
        sent(client.receive_data(ID_GREETING))
        == b'a1 ID ("x-originating-ip" "' + expected + b'")\r\n'
    )


# ---------------------------------------------------------------- PROXY v2


@settings(max_examples=300)
@given(ADDRESS, st.integers(0, 65535), st.ip_addresses().map(str), st.integers(0, 65535))
def test_proxy_v2_header_is_fixed_size_or_refused(
    source: str, sport: int, local: str, dport: int
) -> None:
    try:
        header = build_v2((source, sport), (local, dport))
    except ValueError:
        # Not an IP address: refused, nothing written.
        assert _not_an_ip(source)
        return
    # Signature, version/command, family, length, then only the addresses:
    # 12 bytes (IPv4) or 36 (IPv6), never a TLV carrying anyone's text.
    assert header.startswith(V2_SIGNATURE)
    assert len(header) in (16 + 12, 16 + 36)
    parsed = parse(header)
    assert parsed is not None and parsed[1] == len(header)
    addresses = parsed[0]
    assert addresses.source is not None and addresses.source[1] == sport
    src = ipaddress.ip_address(addresses.source[0])
    claimed = ipaddress.ip_address(source.split("%", 1)[0])
    assert src == claimed or getattr(src, "ipv4_mapped", None) == claimed


@settings(max_examples=300)
@given(ADDRESS, PORT, st.one_of(st.binary(max_size=60), st.binary(min_size=90, max_size=600)))
def test_xclient_helo_of_a_pass_through_client_is_clean_and_capped(
    address: str, port: int | None, helo: bytes
) -> None:
    """Pass-through (port 25): HELO= carries the name the client gave in its
    EHLO, whatever bytes those were; NAME= is never looked up."""
    client = SmtpClient(
        ClientSettings(
            hostname="gw.example",
            client_address=address,
            client_port=port,
            use_xclient=True,
            relay=True,
            replay=(b"EHLO " + helo + b"\r\n",),
        )
    )
    client.receive_data(b"220 backend ESMTP\r\n")
    line = sent(client.receive_data(b"250-backend\r\n250 XCLIENT ADDR PORT NAME HELO PROTO\r\n"))
    assert line.startswith(b"XCLIENT "), line
    assert COMMAND_LINE.fullmatch(line), line
    assert len(line) <= 512  # SMTP's command line limit (RFC 5321 section 4.5.3.1.4)
    values = dict(a.partition(b"=")[::2] for a in line[len(b"XCLIENT ") : -2].split(b" "))
    assert values[b"NAME"] == b"[UNAVAILABLE]"
    given_name = helo.rstrip(b"\r\n")  # what a line can carry
    assert (
        values[b"HELO"] == b"[UNAVAILABLE]" or xtext_decode(values[b"HELO"].decode()) == given_name
    )
