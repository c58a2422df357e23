"""NTLM ([MS-NLMP]): spec vectors, strict parsing, legacy switch, pyspnego interop."""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import spnego
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spnego._ntlm_raw.messages import Challenge as SpnegoChallenge

from authgate.sasl import mechanism_info
from authgate.sasl._md4 import md4
from authgate.sasl._ntlm_messages import (
    AvId,
    Flag,
    NTLMFormatError,
    build_authenticate,
    build_challenge,
    build_negotiate,
    encode_av_pairs,
    parse_authenticate,
    parse_av_pairs,
    parse_challenge,
    parse_negotiate,
)
from authgate.sasl.base import (
    NO_RESPONSE,
    Challenge,
    ClientAuthError,
    ClientContext,
    ClientCredentials,
    Failure,
    FailureReason,
    Lookup,
    LookupRequest,
    SaslProtocolError,
    SecretForm,
    SecretLookup,
    ServerContext,
    ServerOutcome,
    Success,
    run_exchange,
)
from authgate.sasl.ntlm import (
    NTLMClient,
    NTLMServer,
    desl,
    nt_hash,
    ntlm2_session_response,
    ntlmv1_response,
    ntlmv2_proof,
    ntowfv2,
)
from authgate.testing.kit import store

# ---------------------------------------------------------------- [MS-NLMP] 4.2 vectors

SPEC_USER = "User"
SPEC_DOMAIN = "Domain"
SPEC_PASSWORD = "Password"
SERVER_CHALLENGE = bytes.fromhex("0123456789abcdef")
CLIENT_CHALLENGE = b"\xaa" * 8
SPEC_NT_HASH = bytes.fromhex("a4f49c406510bdcab6824ee7c30fd852")
# 4.2.2.2.1 / 4.2.2.2.2: NTLMv1 responses (LM_KEY and ESS not set).
SPEC_V1_NT_RESPONSE = bytes.fromhex("67c43011f30298a2ad35ece64f16331c44bdbed927841f94")
SPEC_V1_LM_RESPONSE = bytes.fromhex("98def7b87f88aa5dafe2df779688a172def11c7d5ccdef13")
# 4.2.3.2.2: NTLMv1 with extended session security (NTLM2 session response).
SPEC_NTLM2_NT_RESPONSE = bytes.fromhex("7537f803ae367128ca458204bde7caf81e97ed2683267232")
# 4.2.4.1.1 / 4.2.4.2.1 / 4.2.4.2.2
SPEC_NTOWFV2 = bytes.fromhex("0c868a403bfd7a93a3001ef22ef02e3f")
SPEC_NTPROOFSTR = bytes.fromhex("68cd0ab851e51c96aabc927bebef6a1c")
SPEC_LMV2_RESPONSE = bytes.fromhex("86c35097ac9cec102554764a57cccc19") + CLIENT_CHALLENGE
# 4.2.4: AV pairs MsvAvNbDomainName "Domain", MsvAvNbComputerName "Server", MsvAvEOL.
SPEC_AV_PAIRS = bytes.fromhex(
    "02000c0044006f006d00610069006e0001000c0053006500720076006500720000000000"
)
# The NTLMv2_CLIENT_CHALLENGE ("temp") of 4.2.4.1.3 with Time = 0.
SPEC_V2_BLOB = (
    b"\x01\x01" + b"\x00" * 6 + b"\x00" * 8 + CLIENT_CHALLENGE + b"\x00" * 4 + SPEC_AV_PAIRS
) + b"\x00" * 4
# 4.2.4.3: the CHALLENGE_MESSAGE (flags e28a8233, with Version, TargetName "Server").
SPEC_V2_CHALLENGE = bytes.fromhex(
    "4e544c4d53535000020000000c000c003800000033828ae2"
    "0123456789abcdef0000000000000000240024004400000006007017000000 0f"
    "53006500720076006500720002000c0044006f006d00610069006e00"
    "01000c0053006500720076006500720000000000".replace(" ", "")
)

USERS = {
    SPEC_USER: SPEC_PASSWORD,
    "alice": "correct horse",
    "bob": "hunter2",
    "jürgen": "pässwörd 密码",
    "straße": "weiß",
}
FLAG_BITS = [int(f) for f in Flag]


resolve = store(USERS, forms=[SecretForm.NT_HASH])


def fixed(value: bytes) -> Callable[[int], bytes]:
    def random(n: int) -> bytes:
        assert n == len(value)
        return value

    return random


def spec_server(*, legacy: bool = False, timestamp: int | None = None) -> NTLMServer:
    ctx = ServerContext(
        hostname="server.example", allow_ntlm_legacy=legacy, random=fixed(SERVER_CHALLENGE)
    )
    return NTLMServer(ctx, timestamp=timestamp)


def negotiate(flags: int = Flag.UNICODE | Flag.NTLM) -> bytes:
    return build_negotiate(int(flags))


def to_authenticate(server: NTLMServer, flags: int = Flag.UNICODE | Flag.NTLM) -> Challenge:
    outcome = server.start(negotiate(flags))
    assert isinstance(outcome, Challenge)
    return outcome


def authenticate(
    nt: bytes,
    lm: bytes = b"",
    *,
    user: str = SPEC_USER,
    domain: str = SPEC_DOMAIN,
    flags: int = Flag.UNICODE | Flag.NTLM,
) -> bytes:
    encoding = "utf-16-le" if flags & Flag.UNICODE else "latin-1"
    return build_authenticate(
        int(flags),
        lm,
        nt,
        domain.encode(encoding),
        user.encode(encoding),
        "COMPUTER".encode(encoding),
    )


def finish(server: NTLMServer, outcome: ServerOutcome) -> ServerOutcome:
    """Resolve a Lookup (if any) the way the protocol layer would."""
    if isinstance(outcome, Lookup):
        return server.resume(resolve(outcome.request))
    return outcome


def server_verdict(message: bytes, *, legacy: bool = False) -> ServerOutcome:
    server = spec_server(legacy=legacy)
    to_authenticate(server, Flag.UNICODE | Flag.NTLM | Flag.EXTENDED_SESSIONSECURITY)
    return finish(server, server.step(message))


# ---------------------------------------------------------------- MD4 and hashes


@pytest.mark.parametrize(
    ("data", "digest"),
    [  # RFC 1320 appendix A.5
        (b"", "31d6cfe0d16ae931b73c59d7e0c089c0"),
        (b"a", "bde52cb31de33e46245e05fbdbd6fb24"),
        (b"abc", "a448017aaf21d8525fc10ae87aa6729d"),
        (b"message digest", "d9130a8164549fe818874806e1c7014b"),
        (b"abcdefghijklmnopqrstuvwxyz", "d79e1c308aa5bbcdeea8ed63df412da9"),
        (
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
            "043f8582f241db351ce627e153e7f0e4",
        ),
        (b"1234567890" * 8, "e33b4ddc9c38f2199c3e7b164fcc0536"),
    ],
)
def test_md4_rfc1320_vectors(data: bytes, digest: str) -> None:
    assert md4(data).hex() == digest


@given(st.binary(max_size=300))
def test_md4_matches_an_independent_implementation(data: bytes) -> None:
    passlib_md4 = pytest.importorskip("passlib.crypto._md4").md4
    assert md4(data) == passlib_md4(data).digest()


def test_nt_hash_spec_vector() -> None:
    assert nt_hash(SPEC_PASSWORD) == SPEC_NT_HASH
    assert nt_hash("") == bytes.fromhex("31d6cfe0d16ae931b73c59d7e0c089c0")


def test_nt_hash_falls_back_when_openssl_lacks_md4(monkeypatch: pytest.MonkeyPatch) -> None:
    real_new = hashlib.new

    def no_md4(name: str, data: bytes = b"", **kwargs: Any) -> Any:
        if name.lower() == "md4":
            raise ValueError("unsupported hash type md4")
        return real_new(name, data, **kwargs)

    monkeypatch.setattr(hashlib, "new", no_md4)
    assert nt_hash(SPEC_PASSWORD) == SPEC_NT_HASH


def test_ntlmv2_spec_vectors() -> None:
    key = ntowfv2(SPEC_NT_HASH, SPEC_USER, SPEC_DOMAIN)
    assert key == SPEC_NTOWFV2
    assert ntlmv2_proof(key, SERVER_CHALLENGE, SPEC_V2_BLOB) == SPEC_NTPROOFSTR
    # The user name is upper-cased, the domain is not (section 3.3.2).
    assert ntowfv2(SPEC_NT_HASH, "USER", SPEC_DOMAIN) == SPEC_NTOWFV2
    assert ntowfv2(SPEC_NT_HASH, SPEC_USER, "DOMAIN") != SPEC_NTOWFV2


def test_ntowfv2_upper_cases_one_character_at_a_time() -> None:
    # Python's "ß".upper() is "SS"; Windows keeps "ß".
    expected = hmac.new(nt_hash("pw"), "STRAßE".encode("utf-16-le"), "md5").digest()
    assert ntowfv2(nt_hash("pw"), "straße", "") == expected


def test_ntlmv1_spec_vectors() -> None:
    assert ntlmv1_response(SPEC_NT_HASH, SERVER_CHALLENGE) == SPEC_V1_NT_RESPONSE
    assert desl(SPEC_NT_HASH, SERVER_CHALLENGE) == SPEC_V1_NT_RESPONSE
    assert (
        ntlm2_session_response(SPEC_NT_HASH, SERVER_CHALLENGE, CLIENT_CHALLENGE)
        == SPEC_NTLM2_NT_RESPONSE
    )


# ---------------------------------------------------------------- our client, spec vectors


def test_client_reproduces_the_spec_v2_authenticate() -> None:
    client = NTLMClient(
        ClientCredentials(f"{SPEC_DOMAIN}\\{SPEC_USER}", SPEC_PASSWORD),
        ClientContext(random=fixed(CLIENT_CHALLENGE)),
    )
    first = client.start()
    assert parse_negotiate(first).flags & Flag.UNICODE
    auth = parse_authenticate(client.step(SPEC_V2_CHALLENGE))
    assert auth.user == SPEC_USER
    assert auth.domain == SPEC_DOMAIN
    assert auth.nt_response == SPEC_NTPROOFSTR + SPEC_V2_BLOB
    # No MsvAvTimestamp in the spec's TargetInfo: an LMv2 response is sent.
    assert auth.lm_response == SPEC_LMV2_RESPONSE
    assert auth.flags & Flag.UNICODE
    assert not auth.flags & (Flag.KEY_EXCH | Flag.SIGN | Flag.SEAL | Flag.VERSION)
    client.finish(None)


def test_server_accepts_the_spec_v2_response() -> None:
    server = spec_server()
    to_authenticate(server)
    lookup = server.step(authenticate(SPEC_NTPROOFSTR + SPEC_V2_BLOB, SPEC_LMV2_RESPONSE))
    assert lookup == Lookup(SecretLookup(SPEC_USER, SecretForm.NT_HASH))
    # The identity is the bare user name: no domain anywhere.
    assert server.resume(SPEC_NT_HASH) == Success(authcid=SPEC_USER, authzid=None)


def test_server_binds_the_v2_proof_to_the_domain_in_the_message() -> None:
    message = authenticate(SPEC_NTPROOFSTR + SPEC_V2_BLOB, domain="OTHER")
    outcome = server_verdict(message)
    assert isinstance(outcome, Failure)
    assert outcome.reason is FailureReason.INVALID_CREDENTIALS


def test_server_rejects_a_tampered_v2_blob() -> None:
    blob = bytearray(SPEC_V2_BLOB)
    blob[20] ^= 1  # one bit of the client challenge
    outcome = server_verdict(authenticate(SPEC_NTPROOFSTR + bytes(blob)))
    assert outcome == Failure(FailureReason.INVALID_CREDENTIALS, "invalid credentials")


def test_server_rejects_the_right_proof_for_another_challenge() -> None:
    ctx = ServerContext(random=fixed(b"\x11" * 8))
    server = NTLMServer(ctx)
    to_authenticate(server)
    outcome = finish(server, server.step(authenticate(SPEC_NTPROOFSTR + SPEC_V2_BLOB)))
    assert isinstance(outcome, Failure)
    assert outcome.reason is FailureReason.INVALID_CREDENTIALS


# ---------------------------------------------------------------- legacy responses

NTLM2_FLAGS = Flag.UNICODE | Flag.NTLM | Flag.EXTENDED_SESSIONSECURITY


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(authenticate(SPEC_V1_NT_RESPONSE, SPEC_V1_LM_RESPONSE), id="ntlmv1"),
        pytest.param(
            authenticate(
                SPEC_NTLM2_NT_RESPONSE, CLIENT_CHALLENGE + b"\x00" * 16, flags=NTLM2_FLAGS
            ),
            id="ntlm2-session",
        ),
    ],
)
def test_legacy_responses_need_the_switch(message: bytes) -> None:
    refused = server_verdict(message)
    assert isinstance(refused, Failure)
    assert refused.reason is FailureReason.TOO_WEAK
    assert "allow_ntlm_legacy" in refused.detail and "off" in refused.detail
    assert server_verdict(message, legacy=True) == Success(authcid=SPEC_USER)


def test_legacy_refusal_happens_before_any_lookup() -> None:
    server = spec_server()
    to_authenticate(server)
    outcome = server.step(authenticate(SPEC_V1_NT_RESPONSE))
    assert isinstance(outcome, Failure)
    with pytest.raises(SaslProtocolError):
        server.resume(SPEC_NT_HASH)


def test_ntlm2_session_needs_both_sides_to_agree_on_ess() -> None:
    # Without ESS in AUTHENTICATE the response is read as plain NTLMv1: wrong.
    message = authenticate(SPEC_NTLM2_NT_RESPONSE, CLIENT_CHALLENGE + b"\x00" * 16)
    outcome = server_verdict(message, legacy=True)
    assert isinstance(outcome, Failure)
    assert outcome.reason is FailureReason.INVALID_CREDENTIALS


def test_ntlm2_session_without_client_challenge_is_malformed() -> None:
    outcome = server_verdict(authenticate(SPEC_NTLM2_NT_RESPONSE, flags=NTLM2_FLAGS), legacy=True)
    assert isinstance(outcome, Failure)
    assert outcome.reason is FailureReason.MALFORMED


@pytest.mark.parametrize("legacy", [False, True])
def test_lm_only_is_never_accepted(legacy: bool) -> None:
    outcome = server_verdict(authenticate(b"", SPEC_V1_LM_RESPONSE), legacy=legacy)
    assert isinstance(outcome, Failure)
    assert outcome.reason is FailureReason.TOO_WEAK
    assert "LM" in outcome.detail


def test_a_correct_lm_response_does_not_rescue_a_wrong_nt_response() -> None:
    wrong_nt = bytes(24)
    outcome = server_verdict(authenticate(wrong_nt, SPEC_V1_LM_RESPONSE), legacy=True)
    assert isinstance(outcome, Failure)
    assert outcome.reason is FailureReason.INVALID_CREDENTIALS


def test_ntlmv1_with_wrong_password_fails_even_with_the_switch() -> None:
    server = spec_server(legacy=True)
    to_authenticate(server)
    outcome = server.step(authenticate(SPEC_V1_NT_RESPONSE))
    assert isinstance(outcome, Lookup)
    result = server.resume(nt_hash("not the password"))
    assert isinstance(result, Failure)
    assert result.reason is FailureReason.INVALID_CREDENTIALS


# ---------------------------------------------------------------- our client vs our server


def exchange(
    username: str,
    password: str,
    *,
    initial_response: bool = True,
    lookups: list[LookupRequest] | None = None,
) -> ServerOutcome:
    client = NTLMClient(ClientCredentials(username, password), ClientContext())
    server = NTLMServer(ServerContext(hostname="mx.example.org"))
    recording = store(USERS, forms=[SecretForm.NT_HASH], seen=lookups)
    return run_exchange(client, server, recording, initial_response=initial_response)


@pytest.mark.parametrize("initial_response", [True, False])
@pytest.mark.parametrize("user", ["alice", "jürgen", "straße"])
def test_round_trip_success(user: str, initial_response: bool) -> None:
    lookups: list[LookupRequest] = []
    outcome = exchange(user, USERS[user], initial_response=initial_response, lookups=lookups)
    assert outcome == Success(authcid=user)
    assert lookups == [SecretLookup(user, SecretForm.NT_HASH)]


def test_round_trip_with_domain_keeps_the_domain_out_of_the_identity() -> None:
    lookups: list[LookupRequest] = []
    outcome = exchange("EXAMPLE\\bob", USERS["bob"], lookups=lookups)
    assert outcome == Success(authcid="bob")
    assert lookups == [SecretLookup("bob", SecretForm.NT_HASH)]


def test_round_trip_wrong_password() -> None:
    outcome = exchange("alice", "Correct horse")
    assert isinstance(outcome, Failure)
    assert outcome.reason is FailureReason.INVALID_CREDENTIALS
    assert "Correct horse" not in outcome.detail
    assert nt_hash(USERS["alice"]).hex() not in outcome.detail


def test_round_trip_unknown_user() -> None:
    outcome = exchange("mallory", "whatever")
    assert isinstance(outcome, Failure)
    assert outcome.reason is FailureReason.INVALID_CREDENTIALS


def test_registry_builds_our_classes() -> None:
    info = mechanism_info("ntlm")
    assert isinstance(info.server(ServerContext()), NTLMServer)
    assert isinstance(info.client(ClientCredentials("a", "b"), ClientContext()), NTLMClient)
    assert info.forms == frozenset({SecretForm.NT_HASH})


# ---------------------------------------------------------------- the CHALLENGE we send


def test_challenge_contents() -> None:
    server = spec_server()
    challenge = parse_challenge(to_authenticate(server).data)
    assert challenge.server_challenge == SERVER_CHALLENGE
    for flag in (Flag.UNICODE, Flag.NTLM, Flag.REQUEST_TARGET, Flag.TARGET_INFO):
        assert challenge.flags & flag
    for flag in (Flag.OEM, Flag.EXTENDED_SESSIONSECURITY, Flag.KEY_EXCH, Flag.SIGN, Flag.LM_KEY):
        assert not challenge.flags & flag
    assert challenge.target_name == "SERVER".encode("utf-16-le")
    info = dict(challenge.target_info)
    assert info[AvId.NB_COMPUTER_NAME] == "SERVER".encode("utf-16-le")
    assert info[AvId.NB_DOMAIN_NAME] == "SERVER".encode("utf-16-le")
    assert info[AvId.DNS_COMPUTER_NAME] == "server.example".encode("utf-16-le")
    assert AvId.TIMESTAMP not in info


def test_challenge_parsed_by_pyspnego() -> None:
    server = spec_server(timestamp=133_000_000_000_000_000)
    data = to_authenticate(server, Flag.UNICODE | Flag.EXTENDED_SESSIONSECURITY).data
    theirs = SpnegoChallenge.unpack(data)
    assert theirs.server_challenge == SERVER_CHALLENGE
    assert theirs.target_name == "SERVER"
    assert theirs.flags & Flag.EXTENDED_SESSIONSECURITY
    assert theirs.target_info is not None
    stamp = theirs.target_info[AvId.TIMESTAMP].pack()
    assert stamp == struct.pack("<Q", 133_000_000_000_000_000)


def test_oem_client_gets_oem_and_can_authenticate() -> None:
    server = spec_server()
    challenge = parse_challenge(to_authenticate(server, Flag.OEM | Flag.NTLM).data)
    assert challenge.flags & Flag.OEM and not challenge.flags & Flag.UNICODE
    assert challenge.target_name == b"SERVER"
    message = authenticate(
        SPEC_NTPROOFSTR + SPEC_V2_BLOB, flags=Flag.OEM | Flag.NTLM
    )  # user/domain in latin-1
    assert finish(server, server.step(message)) == Success(authcid=SPEC_USER)


# ---------------------------------------------------------------- strict parsing (server)


def test_empty_initial_response_is_malformed() -> None:
    outcome = spec_server().start(b"")
    assert isinstance(outcome, Failure)
    assert outcome.reason is FailureReason.MALFORMED


def test_old_16_byte_negotiate_is_accepted() -> None:
    short = b"NTLMSSP\x00" + struct.pack("<II", 1, Flag.UNICODE | Flag.NTLM)
    assert isinstance(spec_server().start(short), Challenge)


@pytest.mark.parametrize(
    "message",
    [
        b"NTLMSSP\x00" + struct.pack("<II", 3, 0) + bytes(16),  # wrong type
        b"NTLMSSQ\x00" + struct.pack("<II", 1, 0) + bytes(16),  # wrong signature
        b"NTLMSSP\x00\x01\x00\x00",  # truncated
        # OEM_DOMAIN_SUPPLIED with a domain far outside the message
        b"NTLMSSP\x00"
        + struct.pack("<II", 1, Flag.OEM | Flag.OEM_DOMAIN_SUPPLIED)
        + struct.pack("<HHI", 0xFFFF, 0xFFFF, 0xFFFFFFFF)
        + bytes(8),
        # ... or announced in a 16-byte message
        b"NTLMSSP\x00" + struct.pack("<II", 1, Flag.OEM_WORKSTATION_SUPPLIED),
    ],
)
def test_bad_negotiate_is_malformed(message: bytes) -> None:
    outcome = spec_server().start(message)
    assert isinstance(outcome, Failure)
    assert outcome.reason is FailureReason.MALFORMED


VALID_AUTH = authenticate(SPEC_NTPROOFSTR + SPEC_V2_BLOB, SPEC_LMV2_RESPONSE)
FIELD_OFFSETS = [12, 20, 28, 36, 44, 52]


def with_field(message: bytes, field: int, length: int, offset: int) -> bytes:
    return message[:field] + struct.pack("<HHI", length, length, offset) + message[field + 8 :]


@pytest.mark.parametrize("field", FIELD_OFFSETS)
@pytest.mark.parametrize(
    ("length", "offset"),
    [
        (0xFFFF, 0xFFFFFFFF),  # huge offset and length
        (1, 0xFFFFFFFF),  # huge offset
        (0xFFFF, 64),  # huge length
        (1, len(VALID_AUTH)),  # one past the end
        (8, 8),  # into the fixed header
    ],
)
def test_out_of_bounds_fields_are_malformed(field: int, length: int, offset: int) -> None:
    outcome = server_verdict(with_field(VALID_AUTH, field, length, offset))
    assert isinstance(outcome, Failure)
    assert outcome.reason is FailureReason.MALFORMED


def test_the_valid_authenticate_used_by_the_mutation_tests_succeeds() -> None:
    assert server_verdict(VALID_AUTH) == Success(authcid=SPEC_USER)


def test_authenticate_shorter_than_its_header_is_malformed() -> None:
    outcome = server_verdict(VALID_AUTH[:63])
    assert isinstance(outcome, Failure)
    assert outcome.reason is FailureReason.MALFORMED


def test_odd_length_unicode_user_is_malformed() -> None:
    message = build_authenticate(
        int(Flag.UNICODE), b"", SPEC_NTPROOFSTR + SPEC_V2_BLOB, b"", b"abc", b""
    )
    outcome = server_verdict(message)
    assert isinstance(outcome, Failure)
    assert outcome.reason is FailureReason.MALFORMED


@pytest.mark.parametrize("nt_len", [1, 16, 23, 25, 43])
def test_impossible_nt_response_lengths_are_malformed(nt_len: int) -> None:
    outcome = server_verdict(authenticate(bytes(nt_len)), legacy=True)
    assert isinstance(outcome, Failure)
    assert outcome.reason is FailureReason.MALFORMED


def test_anonymous_is_invalid_credentials() -> None:
    message = authenticate(b"", b"\x00", user="", domain="", flags=Flag.UNICODE | Flag.ANONYMOUS)
    outcome = server_verdict(message, legacy=True)
    assert isinstance(outcome, Failure)
    assert outcome.reason is FailureReason.INVALID_CREDENTIALS
    assert "anonymous" in outcome.detail


def test_server_out_of_order_calls() -> None:
    server = spec_server()
    with pytest.raises(SaslProtocolError):
        server.step(negotiate())
    with pytest.raises(SaslProtocolError):
        server.resume(None)
    assert server.start(NO_RESPONSE) == Challenge(b"")
    with pytest.raises(SaslProtocolError):
        server.start(NO_RESPONSE)
    with pytest.raises(SaslProtocolError):
        server.resume(None)
    assert isinstance(server.step(negotiate()), Challenge)
    lookup = server.step(VALID_AUTH)
    assert isinstance(lookup, Lookup)
    with pytest.raises(SaslProtocolError):
        server.step(VALID_AUTH)
    assert isinstance(server.resume(SPEC_NT_HASH), Success)
    with pytest.raises(SaslProtocolError):
        server.step(VALID_AUTH)
    with pytest.raises(SaslProtocolError):
        server.resume(SPEC_NT_HASH)


def test_store_answer_of_the_wrong_kind_is_a_bug() -> None:
    server = spec_server()
    to_authenticate(server)
    assert isinstance(server.step(VALID_AUTH), Lookup)
    with pytest.raises(SaslProtocolError):
        server.resume(SPEC_PASSWORD)


# ---------------------------------------------------------------- hypothesis (server)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def run_authenticate(message: bytes, legacy: bool) -> ServerOutcome:
    """Never raises: that is the property under test."""
    server = spec_server(legacy=legacy)
    to_authenticate(server, NTLM2_FLAGS)
    return finish(server, server.step(message))


@FUZZ
@given(st.binary(max_size=400), st.booleans())
def test_random_negotiate_never_crashes(data: bytes, prefixed: bool) -> None:
    if prefixed:
        data = b"NTLMSSP\x00\x01\x00\x00\x00" + data
    outcome = spec_server().start(data)
    assert isinstance(outcome, Challenge | Failure)
    if isinstance(outcome, Failure):
        assert outcome.reason is FailureReason.MALFORMED


@FUZZ
@given(st.binary(max_size=400), st.booleans(), st.booleans())
def test_random_authenticate_fails_cleanly(data: bytes, prefixed: bool, legacy: bool) -> None:
    if prefixed:
        data = b"NTLMSSP\x00\x03\x00\x00\x00" + data
    outcome = run_authenticate(data, legacy)
    assert isinstance(outcome, Failure)


@st.composite
def mutated_authenticate(draw: st.DrawFn) -> bytes:
    message = bytearray(VALID_AUTH)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["field", "byte", "truncate", "append"]))
        if kind == "field":
            field = draw(st.sampled_from(FIELD_OFFSETS))
            length = draw(st.integers(0, 0xFFFF))
            maxlen = draw(st.integers(0, 0xFFFF))
            offset = draw(st.one_of(st.integers(0, 0xFFFFFFFF), st.integers(0, len(message) + 4)))
            message[field : field + 8] = struct.pack("<HHI", length, maxlen, offset)
        elif kind == "byte" and message:
            pos = draw(st.integers(0, len(message) - 1))
            message[pos] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del message[draw(st.integers(0, len(message))) :]
        else:
            message += draw(st.binary(max_size=64))
    return bytes(message)


@FUZZ
@given(mutated_authenticate(), st.booleans())
def test_mutated_authenticate_never_crashes(message: bytes, legacy: bool) -> None:
    outcome = run_authenticate(message, legacy)
    if isinstance(outcome, Success):
        # Only mutations that leave the proven parts intact (e.g. the
        # workstation, the flags) may still succeed, and only as this user.
        assert outcome == Success(authcid=SPEC_USER)
    else:
        assert isinstance(outcome, Failure)


# ---------------------------------------------------------------- strict parsing (client)


def client() -> NTLMClient:
    ntlm = NTLMClient(ClientCredentials("alice", USERS["alice"]), ClientContext())
    ntlm.start()
    return ntlm


def server_challenge(
    flags: int = Flag.UNICODE | Flag.NTLM | Flag.TARGET_INFO,
    target_info: tuple[tuple[int, bytes], ...] = ((AvId.NB_COMPUTER_NAME, b"S\x00"),),
) -> bytes:
    return build_challenge(int(flags), SERVER_CHALLENGE, b"S\x00", target_info)


def raw_challenge(target_info_raw: bytes, flags: int = Flag.UNICODE | Flag.TARGET_INFO) -> bytes:
    return (
        b"NTLMSSP\x00"
        + struct.pack("<I", 2)
        + struct.pack("<HHI", 0, 0, 48)
        + struct.pack("<I", flags)
        + SERVER_CHALLENGE
        + bytes(8)
        + struct.pack("<HHI", len(target_info_raw), len(target_info_raw), 48)
        + target_info_raw
    )


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(SPEC_V2_CHALLENGE[:47], id="truncated"),
        pytest.param(b"NTLMSSP\x00\x01" + SPEC_V2_CHALLENGE[9:], id="wrong-type"),
        pytest.param(SPEC_V2_CHALLENGE[:48], id="version-flag-without-version"),
        pytest.param(with_field(SPEC_V2_CHALLENGE, 40, 0xFFFF, 0xFFFFFFFF), id="huge-target-info"),
        pytest.param(with_field(SPEC_V2_CHALLENGE, 12, 12, 20), id="target-name-in-header"),
        pytest.param(raw_challenge(b"\x01\x00\x10\x00abc"), id="av-pair-overrun"),
        pytest.param(raw_challenge(b"\x01\x00"), id="av-pair-truncated"),
        pytest.param(raw_challenge(b"\x00\x00\x02\x00\x00\x00"), id="eol-with-value"),
        pytest.param(raw_challenge(b"\x07\x00\x04\x00abcd\x00\x00\x00\x00"), id="short-timestamp"),
        pytest.param(raw_challenge(b"\x00\x00\x00\x00", flags=Flag.TARGET_INFO), id="no-charset"),
    ],
)
def test_client_rejects_malformed_challenges(data: bytes) -> None:
    with pytest.raises(ClientAuthError):
        client().step(data)


def test_client_accepts_target_info_without_eol() -> None:
    auth = parse_authenticate(client().step(raw_challenge(b"\x01\x00\x02\x00S\x00")))
    blob_pairs = auth.nt_response[16 + 28 :]
    assert blob_pairs == encode_av_pairs(((AvId.NB_COMPUTER_NAME, b"S\x00"),)) + b"\x00" * 4


def test_client_echoes_the_server_timestamp_and_sends_no_lm() -> None:
    stamp = 0x01D9_0000_1234_5678
    info = ((AvId.NB_COMPUTER_NAME, b"S\x00"), (AvId.TIMESTAMP, struct.pack("<Q", stamp)))
    auth = parse_authenticate(client().step(server_challenge(target_info=info)))
    assert struct.unpack_from("<Q", auth.nt_response, 16 + 8)[0] == stamp
    assert auth.lm_response == bytes(24)


def test_client_uses_its_timestamp_argument_without_server_time() -> None:
    ntlm = NTLMClient(ClientCredentials("a", "b"), ClientContext(), timestamp=12345)
    ntlm.start()
    auth = parse_authenticate(ntlm.step(server_challenge()))
    assert struct.unpack_from("<Q", auth.nt_response, 16 + 8)[0] == 12345
    assert len(auth.lm_response) == 24 and auth.lm_response != bytes(24)


def test_client_speaks_oem_when_the_server_chooses_it() -> None:
    ntlm = NTLMClient(ClientCredentials("DOM\\jürgen", "pw"), ClientContext())
    ntlm.start()
    data = ntlm.step(server_challenge(flags=Flag.OEM | Flag.NTLM | Flag.TARGET_INFO))
    auth = parse_authenticate(data)
    assert auth.flags & Flag.OEM and not auth.flags & Flag.UNICODE
    assert (auth.domain, auth.user) == ("DOM", "jürgen")
    assert "jürgen".encode("latin-1") in data


def test_client_refuses_oem_for_names_latin1_cannot_carry() -> None:
    ntlm = NTLMClient(ClientCredentials("用户", "pw"), ClientContext())
    ntlm.start()
    with pytest.raises(ClientAuthError):
        ntlm.step(server_challenge(flags=Flag.OEM | Flag.NTLM))


def test_client_refuses_target_info_too_big_to_echo() -> None:
    huge = ((AvId.DNS_TREE_NAME, b"x" * 65500),)
    with pytest.raises(ClientAuthError):
        client().step(server_challenge(target_info=huge))


def test_client_out_of_order_calls() -> None:
    ntlm = NTLMClient(ClientCredentials("alice", "pw"), ClientContext())
    with pytest.raises(SaslProtocolError):
        ntlm.step(server_challenge())
    with pytest.raises(SaslProtocolError):
        ntlm.finish(None)
    ntlm.start()
    with pytest.raises(SaslProtocolError):
        ntlm.start()
    # A server claiming success before it saw our proof.
    with pytest.raises(ClientAuthError):
        ntlm.finish(None)
    ntlm.step(server_challenge())
    with pytest.raises(ClientAuthError):
        ntlm.step(server_challenge())
    ntlm.finish(None)
    ntlm.finish(b"")


def test_client_refuses_an_authzid() -> None:
    with pytest.raises(ValueError, match="authorization identity"):
        NTLMClient(ClientCredentials("alice", "pw", authzid="bob"), ClientContext())
    NTLMClient(ClientCredentials("alice", "pw", authzid="alice"), ClientContext())


@FUZZ
@given(st.binary(max_size=400), st.booleans())
def test_client_random_challenge_raises_client_auth_error(data: bytes, prefixed: bool) -> None:
    if prefixed:
        data = b"NTLMSSP\x00\x02\x00\x00\x00" + data
    try:
        reply = client().step(data)
    except ClientAuthError:
        return
    # Hypothesis may stumble on a well-formed message: then the reply must
    # be a well-formed AUTHENTICATE.
    assert parse_authenticate(reply).user == "alice"


@st.composite
def mutated_challenge(draw: st.DrawFn) -> bytes:
    message = bytearray(
        server_challenge(
            target_info=((AvId.NB_COMPUTER_NAME, b"S\x00"), (AvId.TIMESTAMP, bytes(8)))
        )
    )
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["field", "byte", "truncate", "append"]))
        if kind == "field":
            field = draw(st.sampled_from([12, 40]))
            message[field : field + 8] = struct.pack(
                "<HHI",
                draw(st.integers(0, 0xFFFF)),
                draw(st.integers(0, 0xFFFF)),
                draw(st.one_of(st.integers(0, 0xFFFFFFFF), st.integers(0, len(message) + 4))),
            )
        elif kind == "byte" and message:
            pos = draw(st.integers(0, len(message) - 1))
            message[pos] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del message[draw(st.integers(0, len(message))) :]
        else:
            message += draw(st.binary(max_size=64))
    return bytes(message)


@FUZZ
@given(mutated_challenge())
def test_client_mutated_challenge_never_crashes(data: bytes) -> None:
    try:
        reply = client().step(data)
    except ClientAuthError:
        return
    assert parse_authenticate(reply).user == "alice"


@given(st.lists(st.tuples(st.integers(1, 0xFFFF), st.binary(max_size=40)), max_size=6))
def test_av_pairs_round_trip(pairs: list[tuple[int, bytes]]) -> None:
    assert parse_av_pairs(encode_av_pairs(tuple(pairs))) == tuple(pairs)


def test_encode_av_pairs_refuses_an_inner_eol() -> None:
    with pytest.raises(NTLMFormatError):
        encode_av_pairs(((AvId.EOL, b""),))


# ---------------------------------------------------------------- pyspnego interop


def spnego_to_our_server(username: str, password: str, server: NTLMServer) -> ServerOutcome:
    """Drive pyspnego's NTLM initiator against our server."""
    theirs = spnego.client(username, password, hostname="mx.example.org", protocol="ntlm")
    first = theirs.step()
    assert first is not None
    outcome = server.start(first)
    assert isinstance(outcome, Challenge), outcome
    reply = theirs.step(outcome.data)
    assert reply is not None
    outcome = server.step(reply)
    return finish(server, outcome)


@pytest.mark.parametrize("timestamp", [None, 133_000_000_000_000_000])
@pytest.mark.parametrize(
    ("username", "identity"), [("alice", "alice"), ("EXAMPLE\\bob", "bob"), ("jürgen", "jürgen")]
)
def test_pyspnego_client_against_our_server(
    username: str, identity: str, timestamp: int | None
) -> None:
    # With a server timestamp pyspnego adds a MIC and Version and sends Z(24)
    # as LM response: we must still verify the NTLMv2 proof.
    server = NTLMServer(ServerContext(hostname="mx.example.org"), timestamp=timestamp)
    outcome = spnego_to_our_server(username, USERS[identity], server)
    assert outcome == Success(authcid=identity)


def test_pyspnego_client_wrong_password() -> None:
    server = NTLMServer(ServerContext())
    outcome = spnego_to_our_server("alice", "wrong", server)
    assert isinstance(outcome, Failure)
    assert outcome.reason is FailureReason.INVALID_CREDENTIALS


@pytest.mark.parametrize(
    "lm_compat_level",
    [
        pytest.param("0", id="ntlmv1-with-lm"),
        pytest.param("1", id="ntlm2-session"),
        pytest.param("2", id="ntlm2-session-no-lm"),
    ],
)
def test_pyspnego_legacy_client_needs_the_switch(
    monkeypatch: pytest.MonkeyPatch, lm_compat_level: str
) -> None:
    # pyspnego follows Windows' LmCompatibilityLevel: below 3 it sends
    # NTLMv1 (level 0, no ESS) or the NTLM2 session response (ESS).
    monkeypatch.setenv("LM_COMPAT_LEVEL", lm_compat_level)
    refused = spnego_to_our_server("alice", USERS["alice"], NTLMServer(ServerContext()))
    assert isinstance(refused, Failure)
    assert refused.reason is FailureReason.TOO_WEAK
    legacy = NTLMServer(ServerContext(allow_ntlm_legacy=True))
    assert spnego_to_our_server("alice", USERS["alice"], legacy) == Success(authcid="alice")
    legacy = NTLMServer(ServerContext(allow_ntlm_legacy=True))
    wrong = spnego_to_our_server("alice", "wrong", legacy)
    assert isinstance(wrong, Failure)
    assert wrong.reason is FailureReason.INVALID_CREDENTIALS


@pytest.fixture
def spnego_user_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # pyspnego's acceptor reads DOMAIN:USER:PASSWORD lines from NTLM_USER_FILE.
    path = tmp_path / "ntlm-users"
    path.write_text("EXAMPLE:bob:hunter2\n:alice:correct horse\n", encoding="utf-8")
    monkeypatch.setenv("NTLM_USER_FILE", str(path))
    yield


@pytest.mark.usefixtures("spnego_user_file")
@pytest.mark.parametrize(
    ("username", "principal"), [("alice", "alice"), ("EXAMPLE\\bob", "EXAMPLE\\bob")]
)
def test_our_client_against_pyspnego_server(username: str, principal: str) -> None:
    theirs = spnego.server(protocol="ntlm")
    ours = NTLMClient(
        ClientCredentials(username, USERS[principal.rpartition("\\")[2]]), ClientContext()
    )
    challenge = theirs.step(ours.start())
    assert challenge is not None
    # pyspnego sends MsvAvTimestamp: our blob must carry exactly that time.
    target_info = SpnegoChallenge.unpack(challenge).target_info
    assert target_info is not None
    server_time = target_info[AvId.TIMESTAMP].pack()
    reply = ours.step(challenge)
    assert theirs.step(reply) is None
    assert theirs.complete
    assert theirs.client_principal == principal
    auth = parse_authenticate(reply)
    assert auth.nt_response[24:32] == server_time
    ours.finish(None)


@pytest.mark.usefixtures("spnego_user_file")
def test_our_client_wrong_password_refused_by_pyspnego() -> None:
    theirs = spnego.server(protocol="ntlm")
    ours = NTLMClient(ClientCredentials("alice", "wrong"), ClientContext())
    challenge = theirs.step(ours.start())
    assert challenge is not None
    with pytest.raises(spnego.exceptions.SpnegoError):
        theirs.step(ours.step(challenge))
    assert not theirs.complete
