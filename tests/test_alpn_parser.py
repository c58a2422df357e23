"""The ClientHello ALPN parser behind strict ALPN (authgate.proxy.alpn):
real ClientHellos from Python's ssl (TLS 1.2 and 1.3, with and without
ALPN), generated ones, truncations and random bytes."""

from __future__ import annotations

import ssl
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authgate.proxy.alpn import ClientHelloError, offered_protocols


def real_client_hello(alpn: list[str] | None, version: ssl.TLSVersion) -> bytes:
    """The ClientHello message Python's ssl sends (without the record header)."""
    ctx = ssl.create_default_context()
    ctx.maximum_version = version
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="mail.example.org")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    record = outgoing.read()
    assert record[0] == 22  # one handshake record
    length = int.from_bytes(record[3:5], "big")
    assert len(record) == 5 + length
    return record[5:]


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
@pytest.mark.parametrize(
    "alpn", [None, ["imap"], ["h2", "http/1.1"], ["http/1.1", "imap", "pop3", "smtp"]]
)
def test_real_client_hellos(alpn: list[str] | None, version: ssl.TLSVersion) -> None:
    expected = None if alpn is None else tuple(a.encode() for a in alpn)
    assert offered_protocols(real_client_hello(alpn, version)) == expected


def vector(length_size: int, data: bytes) -> bytes:
    return len(data).to_bytes(length_size, "big") + data


@st.composite
def client_hellos(draw: st.DrawFn) -> tuple[bytes, tuple[bytes, ...] | None]:
    """A ClientHello built field by field, and the ALPN names it offers."""
    names = draw(st.none() | st.lists(st.binary(min_size=1, max_size=255), min_size=1, max_size=6))
    others = draw(
        st.lists(
            st.tuples(st.integers(0, 0xFFFF).filter(lambda t: t != 16), st.binary(max_size=40)),
            max_size=6,
        )
    )
    extensions = [struct.pack("!H", kind) + vector(2, body) for kind, body in others]
    if names is not None:
        alpn = vector(2, b"".join(vector(1, n) for n in names))
        where = draw(st.integers(0, len(extensions)))
        extensions.insert(where, struct.pack("!H", 16) + vector(2, alpn))
    body = (
        b"\x03\x03"
        + draw(st.binary(min_size=32, max_size=32))
        + vector(1, draw(st.binary(max_size=32)))
        + vector(2, draw(st.binary(min_size=2, max_size=60)))
        + vector(1, b"\x00")
    )
    # TLS 1.2 allows a ClientHello without any extensions block.
    if extensions or draw(st.booleans()):
        body += vector(2, b"".join(extensions))
    return b"\x01" + vector(3, body), names if names is None else tuple(names)


@settings(max_examples=300)
@given(client_hellos())
def test_generated_client_hellos(case: tuple[bytes, tuple[bytes, ...] | None]) -> None:
    message, names = case
    assert offered_protocols(message) == names


@settings(max_examples=300)
@given(client_hellos(), st.data())
def test_truncated_or_extended_client_hellos_are_refused(
    case: tuple[bytes, tuple[bytes, ...] | None], data: st.DataObject
) -> None:
    message, _ = case
    cut = data.draw(st.integers(0, len(message) - 1))
    with pytest.raises(ClientHelloError):
        offered_protocols(message[:cut])
    with pytest.raises(ClientHelloError):
        offered_protocols(message + data.draw(st.binary(min_size=1, max_size=8)))


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_random_bytes_give_a_result_or_client_hello_error(data: bytes) -> None:
    try:
        result = offered_protocols(data)
    except ClientHelloError:
        return
    assert result is None or (result and all(result))


@pytest.mark.parametrize(
    "alpn",
    [
        vector(2, b""),  # an empty list (RFC 7301: at least one name)
        vector(2, vector(1, b"")),  # an empty name
        vector(2, vector(1, b"imap")) + b"x",  # junk after the list
        vector(2, b"\x05imap"),  # a name longer than the list
    ],
)
def test_malformed_alpn_extensions_are_refused(alpn: bytes) -> None:
    body = b"\x03\x03" + bytes(32) + vector(1, b"") + vector(2, b"\x13\x01") + vector(1, b"\x00")
    body += vector(2, struct.pack("!H", 16) + vector(2, alpn))
    with pytest.raises(ClientHelloError):
        offered_protocols(b"\x01" + vector(3, body))


def test_two_alpn_extensions_are_refused() -> None:
    alpn = struct.pack("!H", 16) + vector(2, vector(2, vector(1, b"imap")))
    body = b"\x03\x03" + bytes(32) + vector(1, b"") + vector(2, b"\x13\x01") + vector(1, b"\x00")
    body += vector(2, alpn + alpn)
    with pytest.raises(ClientHelloError):
        offered_protocols(b"\x01" + vector(3, body))
