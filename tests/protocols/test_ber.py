"""The BER reader and writers (authgate.protocols.ber): known encodings,
refusals of what LDAP never sends, and hypothesis round trips."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authgate.protocols import ber

# ldapwhoami -x -D cn=a -w pw, as libldap 2.5 writes it (four-octet lengths).
LIBLDAP_BIND = bytes.fromhex(
    "3084 00000016 020101 6084 0000000d 020103 0404 636e3d61 8002 7077".replace(" ", "")
)


def test_libldap_bind_with_non_minimal_lengths() -> None:
    message = ber.parse_message(LIBLDAP_BIND)
    assert (message.message_id, message.op, message.controls) == (1, ber.BIND_REQUEST, False)
    bind = ber.parse_bind(message.body)
    assert bind == ber.SimpleBind(3, b"cn=a", b"pw")


def test_sasl_bind_without_and_with_credentials() -> None:
    sasl = ber.encode(0xA3, ber.encode(4, b"PLAIN"))
    body = ber.encode_int(3) + ber.encode(4, b"") + sasl
    assert ber.parse_bind(body) == ber.SaslBind(3, b"", "PLAIN", None)
    sasl = ber.encode(0xA3, ber.encode(4, b"PLAIN") + ber.encode(4, b""))
    body = ber.encode_int(3) + ber.encode(4, b"") + sasl
    assert ber.parse_bind(body) == ber.SaslBind(3, b"", "PLAIN", b"")


def test_starttls_request_and_response() -> None:
    request = ber.parse_message(ber.starttls_request(7))
    assert request.message_id == 7 and request.op == ber.EXTENDED_REQUEST
    assert ber.parse_extended_name(request.body) == ber.STARTTLS_OID
    answer = ber.response(7, ber.EXTENDED_RESPONSE, 0, name=ber.STARTTLS_OID)
    assert ber.starttls_result(answer, 7) == 0
    with pytest.raises(ber.BerError):
        ber.starttls_result(answer, 1)
    with pytest.raises(ber.BerError):  # a notice of disconnection is no answer
        ber.starttls_result(ber.notice_of_disconnection(52, "bye"), 1)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x30\x80\x02\x01\x01\x00\x00", "indefinite"),
        (b"\x30\x85\x00\x00\x00\x00\x05", "overlong"),
        (b"\x30\xff", "reserved"),
        (b"\x3f\x01\x00", "high tag"),
        (b"\x30\x84\x7f\xff\xff\xff", "over the limit"),
    ],
)
def test_refused_lengths(data: bytes, why: str) -> None:
    reader = ber.MessageReader(limit=1000)
    reader.feed(data)
    with pytest.raises(ber.BerError, match=why):
        reader.next()


def test_limit_is_enforced_from_the_header_alone() -> None:
    reader = ber.MessageReader(limit=100)
    reader.feed(b"\x30\x82\x01\x00")  # 256 octets announced, none sent
    with pytest.raises(ber.BerError, match="limit"):
        reader.next()


def test_incomplete_then_complete() -> None:
    reader = ber.MessageReader(limit=1000)
    whole = ber.starttls_request(3) + ber.starttls_request(4)
    for byte in whole[:-1]:
        reader.feed(bytes((byte,)))
    assert reader.next() is not None
    assert reader.next() is None
    reader.feed(whole[-1:])
    second = reader.next()
    assert second is not None and second.message_id == 4 and reader.buffered == 0


@pytest.mark.parametrize(
    "raw",
    [
        ber.encode(0x31, ber.encode_int(1) + ber.encode(0x42, b"")),  # SET, not SEQUENCE
        ber.encode(0x30, ber.encode_int(1)),  # no protocolOp
        ber.encode(0x30, ber.encode(4, b"\x01") + ber.encode(0x42, b"")),  # ID not INTEGER
        ber.encode(0x30, ber.encode_int(-1) + ber.encode(0x42, b"")),  # negative ID
        ber.encode(0x30, ber.encode_int(2**31) + ber.encode(0x42, b"")),  # over maxInt
        ber.encode(0x30, ber.encode_int(1) + ber.encode(0x42, b"") + b"\x04\x00"),  # not controls
        ber.encode(0x30, ber.encode_int(1) + b"\x42\x05"),  # truncated inner element
    ],
)
def test_malformed_envelopes(raw: bytes) -> None:
    with pytest.raises(ber.BerError):
        ber.parse_message(raw)


@given(st.integers(min_value=0, max_value=ber.MAX_INT), st.binary(max_size=70000))
def test_round_trip(message_id: int, payload: bytes) -> None:
    raw = ber.message(message_id, ber.encode(0x63, ber.encode(4, payload)))
    reader = ber.MessageReader(limit=len(raw))
    reader.feed(raw)
    message = reader.next()
    assert message is not None
    assert (message.raw, message.message_id, message.op) == (raw, message_id, 0x63)
    assert list(ber.elements(message.body)) == [(4, payload)]


@given(st.integers(min_value=-(2**31), max_value=2**31 - 1))
def test_integers(value: int) -> None:
    tag, content, rest = ber.split(ber.encode_int(value)) or (0, b"", b"x")
    assert tag == ber.INTEGER and not rest
    assert ber.decode_int(content, low=-(2**31)) == value


@given(st.binary(max_size=300), st.lists(st.integers(min_value=1, max_value=50), max_size=10))
def test_reader_never_raises_anything_but_ber_error(data: bytes, cuts: list[int]) -> None:
    """Random bytes in random pieces: messages, None, or BerError."""
    reader = ber.MessageReader(limit=200)
    pieces, rest = [], data
    for cut in cuts:
        pieces.append(rest[:cut])
        rest = rest[cut:]
    pieces.append(rest)
    for piece in pieces:
        reader.feed(piece)
        try:
            while (message := reader.next()) is not None:
                assert len(message.raw) <= 200 + 6
                for parse in (ber.parse_bind, ber.parse_extended_name, ber.parse_result):
                    with contextlib.suppress(ber.BerError):
                        parse(message.body)
        except ber.BerError:
            return
