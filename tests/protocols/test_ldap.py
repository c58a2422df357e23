"""The LDAP relay machine (authgate.protocols.ldap), with no network: the
policy applied to every bind, StartTLS, and what passes unchanged."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authgate.policy import ExemptNetworks, ListenerPolicy, Protocol, Security, decide
from authgate.protocols import ber
from authgate.protocols.base import ProtocolStateError, StartTLS
from authgate.protocols.ldap import (
    MAX_REQUEST_ANONYMOUS,
    Action,
    Bind,
    BindDone,
    BindRefused,
    Close,
    LdapRelay,
    LdapSettings,
    ResetBackend,
    ResultCode,
    ToBackend,
    ToClient,
)

MECHS = ("CRAM-MD5", "PLAIN", "LOGIN")


def relay(
    security: Security = Security.REQUIRE_SECURE_AUTH,
    *,
    client: str = "127.0.0.9",
    tls: bool = False,
    starttls: bool = True,
    mechanisms: tuple[str, ...] = MECHS,
    max_errors: int = 3,
) -> LdapRelay:
    policy = ListenerPolicy(
        protocol=Protocol.LDAP,
        security=security,
        mechanisms=mechanisms,
        exempt=ExemptNetworks.parse(["127.0.0.2/32"]),
    )
    return LdapRelay(
        LdapSettings(
            decide=lambda t: decide(policy, client, tls=t),
            starttls_available=starttls,
            tls_active=tls,
            max_errors=max_errors,
        )
    )


def simple_bind(msgid: int, dn: bytes, password: bytes) -> bytes:
    body = ber.encode_int(3) + ber.encode(4, dn) + ber.encode(0x80, password)
    return ber.message(msgid, ber.encode(ber.BIND_REQUEST, body))


def sasl_bind(msgid: int, mechanism: str, credentials: bytes | None = None) -> bytes:
    sasl = ber.encode(4, mechanism.encode())
    if credentials is not None:
        sasl += ber.encode(4, credentials)
    body = ber.encode_int(3) + ber.encode(4, b"") + ber.encode(0xA3, sasl)
    return ber.message(msgid, ber.encode(ber.BIND_REQUEST, body))


def search(msgid: int) -> bytes:
    return ber.message(msgid, ber.encode(0x63, ber.encode(4, b"dc=example,dc=org")))


def unbind(msgid: int) -> bytes:
    return ber.message(msgid, ber.encode(ber.UNBIND_REQUEST, b""))


def bind_response(msgid: int, code: int) -> bytes:
    return ber.response(msgid, ber.BIND_RESPONSE, code)


def replies(actions: list[Action]) -> list[tuple[int, int, int]]:
    """(messageID, op, resultCode) of what went to the client."""
    out = []
    for action in actions:
        if isinstance(action, ToClient):
            message = ber.parse_message(action.data)
            out.append((message.message_id, message.op, ber.parse_result(message.body).code))
    return out


def test_cleartext_simple_bind_from_non_exempt_gets_13() -> None:
    machine = relay()
    out = machine.receive_client(simple_bind(1, b"uid=alice", b"secret"))
    assert replies(out) == [(1, ber.BIND_RESPONSE, 13)]
    assert not any(isinstance(a, ToBackend | Bind) for a in out)
    refused = [a for a in out if isinstance(a, BindRefused)]
    assert refused == [
        BindRefused(
            "uid=alice", "SIMPLE", ResultCode.CONFIDENTIALITY_REQUIRED, "mechanism-needs-tls"
        )
    ]


def test_cleartext_simple_bind_from_exempt_is_forwarded() -> None:
    machine = relay(client="127.0.0.2")
    raw = simple_bind(1, b"uid=alice", b"secret")
    assert machine.receive_client(raw) == [Bind(1, "uid=alice", "SIMPLE", raw)]
    out = machine.receive_backend(bind_response(1, 0))
    assert out == [BindDone(1, "uid=alice", "SIMPLE", 0, False), ToClient(bind_response(1, 0))]
    assert machine.authenticated


def test_simple_bind_inside_tls_is_forwarded_and_49_is_a_guess() -> None:
    machine = relay(tls=True)
    raw = simple_bind(2, b"uid=alice", b"wrong")
    assert machine.receive_client(raw) == [Bind(2, "uid=alice", "SIMPLE", raw)]
    out = machine.receive_backend(bind_response(2, 49))
    assert isinstance(out[0], BindDone) and out[0].guess
    assert out[1] == ToClient(bind_response(2, 49))
    assert machine.errors == 1 and not machine.authenticated


def test_rebind_is_policed_whatever_came_before() -> None:
    """A successful CRAM-MD5 bind without TLS, then a simple bind with a
    password on the same cleartext connection: refused with 13."""
    machine = relay()
    machine.receive_client(sasl_bind(1, "CRAM-MD5", b"alice 0123456789abcdef"))
    machine.receive_backend(bind_response(1, 0))
    assert machine.authenticated
    out = machine.receive_client(search(2) + simple_bind(3, b"uid=b", b"pw"))
    assert out[0] == ToBackend(search(2))
    assert replies(out) == [(3, ber.BIND_RESPONSE, 13)]
    assert not machine.authenticated  # a bind in progress: anonymous (RFC 4511 4.2.1)


def test_anonymous_and_unauthenticated_binds() -> None:
    machine = relay()
    anonymous = simple_bind(1, b"", b"")
    assert machine.receive_client(anonymous) == [ToBackend(anonymous)]
    out = machine.receive_client(simple_bind(2, b"uid=alice", b""))
    assert replies(out) == [(2, ber.BIND_RESPONSE, 53)]


def test_require_encrypted_refuses_everything_but_starttls() -> None:
    machine = relay(Security.REQUIRE_ENCRYPTED)
    out = machine.receive_client(search(1) + simple_bind(2, b"", b""))
    assert replies(out) == [(1, ber.SEARCH_RESULT_DONE, 13), (2, ber.BIND_RESPONSE, 13)]
    out = machine.receive_client(ber.starttls_request(3))
    assert replies(out) == [(3, ber.EXTENDED_RESPONSE, 0)]
    assert isinstance(out[-1], StartTLS)
    machine.tls_started()
    assert machine.receive_client(search(4)) == [ToBackend(search(4))]


def test_simple_bind_without_cleartext_mechanisms_is_8() -> None:
    machine = relay(tls=True, mechanisms=("CRAM-MD5",))
    out = machine.receive_client(simple_bind(1, b"uid=a", b"pw"))
    assert replies(out) == [(1, ber.BIND_RESPONSE, 8)]


def test_sasl_mechanisms_are_filtered() -> None:
    machine = relay()
    out = machine.receive_client(sasl_bind(1, "DIGEST-MD5"))
    assert replies(out) == [(1, ber.BIND_RESPONSE, 7)]
    out = machine.receive_client(sasl_bind(2, "PLAIN", b"\0alice\0pw"))
    assert replies(out) == [(2, ber.BIND_RESPONSE, 13)]  # cleartext before TLS
    raw = sasl_bind(3, "CRAM-MD5")
    assert machine.receive_client(raw) == [Bind(3, None, "CRAM-MD5", raw)]
    out = machine.receive_backend(bind_response(3, 14))
    assert isinstance(out[0], BindDone) and out[0].code == 14
    raw = sasl_bind(4, "CRAM-MD5", b"alice 0123456789abcdef")
    assert machine.receive_client(raw) == [Bind(4, "alice", "CRAM-MD5", raw)]


def test_starttls_injection_is_discarded() -> None:
    machine = relay()
    injected = simple_bind(2, b"uid=attacker", b"pw")
    out = machine.receive_client(ber.starttls_request(1) + injected)
    assert replies(out) == [(1, ber.EXTENDED_RESPONSE, 0)]
    assert ResetBackend() in out
    assert out[-1] == StartTLS(len(injected))
    assert not any(isinstance(a, ToBackend | Bind) for a in out)
    with pytest.raises(ProtocolStateError):
        machine.receive_client(search(3))
    assert machine.tls_started() == []
    assert machine.receive_client(search(3)) == [ToBackend(search(3))]


def test_starttls_refusals() -> None:
    assert replies(relay(starttls=False).receive_client(ber.starttls_request(1))) == [
        (1, ber.EXTENDED_RESPONSE, 2)
    ]
    assert replies(relay(tls=True).receive_client(ber.starttls_request(1))) == [
        (1, ber.EXTENDED_RESPONSE, 1)
    ]
    machine = relay()
    machine.receive_client(search(1))
    assert replies(machine.receive_client(ber.starttls_request(2))) == [
        (2, ber.EXTENDED_RESPONSE, 1)
    ]
    machine.receive_backend(ber.response(1, ber.SEARCH_RESULT_DONE, 0))
    assert isinstance(machine.receive_client(ber.starttls_request(3))[-1], StartTLS)


def test_max_errors_ends_the_session() -> None:
    machine = relay(max_errors=2)
    machine.receive_client(simple_bind(1, b"uid=a", b"pw"))
    out = machine.receive_client(simple_bind(2, b"uid=a", b"pw"))
    assert isinstance(out[-1], Close)
    assert machine.receive_client(search(3)) == []


@pytest.mark.parametrize(
    "data",
    [
        b"\x30\x80\x02\x01\x01",  # indefinite length
        b"\x30\x85\x00\x00\x00\x01\x00",  # overlong length
        b"\x04\x01x",  # not a SEQUENCE
        ber.message(1, ber.encode(0x61, b"")),  # a response from the client
        ber.message(0, ber.encode(0x42, b"")),  # messageID 0
        ber.message(1, ber.encode(0x60, b"\x02\x01\x03")),  # truncated BindRequest
        b"\x30\x84\x00\x10\x00\x00",  # over the pre-bind size limit
    ],
)
def test_malformed_input_gets_a_notice_and_close(data: bytes) -> None:
    out = relay().receive_client(data)
    assert isinstance(out[-1], Close)
    notice = ber.parse_message(out[0].data) if isinstance(out[0], ToClient) else None
    assert notice is not None and notice.message_id == 0
    assert ber.parse_result(notice.body).code == ResultCode.PROTOCOL_ERROR


def test_limit_grows_after_a_bind() -> None:
    machine = relay(tls=True)
    machine.receive_client(simple_bind(1, b"uid=a", b"pw"))
    machine.receive_backend(bind_response(1, 0))
    big = ber.message(2, ber.encode(0x68, ber.encode(4, b"x" * MAX_REQUEST_ANONYMOUS)))
    assert machine.receive_client(big) == [ToBackend(big)]


def test_backend_bytes_pass_unchanged_in_any_pieces() -> None:
    machine = relay(tls=True)
    machine.receive_client(search(1))
    entry = ber.message(1, ber.encode(ber.SEARCH_RESULT_ENTRY, ber.encode(4, b"uid=a")))
    done = ber.response(1, ber.SEARCH_RESULT_DONE, 0)
    stream = entry + done
    got = b""
    for i in range(0, len(stream), 3):
        got += b"".join(
            a.data for a in machine.receive_backend(stream[i : i + 3]) if isinstance(a, ToClient)
        )
    assert got == stream


def test_unbind_is_forwarded_then_close() -> None:
    machine = relay()
    machine.receive_client(search(4))
    assert machine.receive_client(unbind(5)) == [ToBackend(unbind(5)), Close("client unbound")]
    # Nothing forwarded yet: no backend connection just for the goodbye.
    assert relay().receive_client(unbind(5)) == [Close("client unbound")]


def test_bind_refused_by_the_driver_answers_49() -> None:
    machine = relay(tls=True)
    machine.receive_client(simple_bind(1, b"uid=a", b"pw"))
    assert replies(machine.bind_refused(1)) == [(1, ber.BIND_RESPONSE, 49)]
    assert machine.receive_backend(bind_response(1, 0)) == [ToClient(bind_response(1, 0))]
    assert not machine.authenticated  # a late answer to a refused bind is not a login


requests = st.sampled_from(
    [
        simple_bind(1, b"uid=a", b"pw"),
        simple_bind(2, b"", b""),
        sasl_bind(3, "PLAIN", b"\0a\0b"),
        sasl_bind(4, "CRAM-MD5"),
        search(5),
        ber.starttls_request(6),
        unbind(7),
    ]
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.one_of(requests, st.binary(max_size=20)), max_size=8),
    st.lists(st.integers(min_value=1, max_value=40), max_size=8),
    st.booleans(),
)
def test_random_sessions_keep_the_contract(
    pieces: list[bytes], cuts: list[int], exempt: bool
) -> None:
    """Valid requests and junk cut anywhere: only actions come back; nothing
    goes to the backend after StartTLS or Close; no cleartext password
    from a non-exempt client is ever forwarded."""
    machine = relay(client="127.0.0.2" if exempt else "127.0.0.9")
    stream = b"".join(pieces)
    chunks, rest = [], stream
    for cut in cuts:
        chunks.append(rest[:cut])
        rest = rest[cut:]
    chunks.append(rest)
    for chunk in chunks:
        out = machine.receive_client(chunk)
        for i, action in enumerate(out):
            if isinstance(action, Bind) and action.mechanism in ("SIMPLE", "PLAIN"):
                assert exempt or machine.tls
            if isinstance(action, StartTLS | Close):
                assert i == len(out) - 1
        if out and isinstance(out[-1], StartTLS):
            machine.tls_started()
        if out and isinstance(out[-1], Close):
            assert machine.receive_client(b"\x30\x03\x02\x01\x01") == []
            break


@pytest.mark.parametrize(
    ("raw", "name"),
    [
        (b"uid=alice,ou=people,dc=example,dc=org", "uid=alice,ou=people,dc=example,dc=org"),
        (b"UID=alice , OU = people;dc=example,DC=org", "uid=alice,ou=people,dc=example,dc=org"),
        (b"cn=o'hara\\, jr,dc=x", "cn=o'hara\\, jr,dc=x"),
        (b"", None),
    ],
)
def test_bind_names_one_user_however_spelled(raw: bytes, name: str | None) -> None:
    from authgate.protocols.ldap import bind_name

    assert bind_name(raw) == name
