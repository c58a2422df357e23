"""SCRAM-SHA-1/256(-PLUS): RFC test vectors, interop with scramp, attacks."""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
from collections.abc import Callable
from functools import cache
from typing import NamedTuple

import pytest
import scramp
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st
from scramp.core import CBindData

from authgate.sasl import mechanism_info
from authgate.sasl.base import (
    NO_RESPONSE,
    Challenge,
    ClientAuthError,
    ClientContext,
    ClientCredentials,
    Derive,
    Failure,
    FailureReason,
    Lookup,
    LookupAnswer,
    LookupRequest,
    SaslProtocolError,
    ScramVerifier,
    SecretForm,
    SecretLookup,
    ServerContext,
    ServerMechanism,
    ServerOutcome,
    Success,
    client_step,
    run_exchange,
)
from authgate.sasl.scram import (
    MAX_CLIENT_ITERATIONS,
    MIN_ITERATIONS,
    ScramSHA1Client,
    ScramSHA1PlusClient,
    ScramSHA1PlusServer,
    ScramSHA1Server,
    ScramSHA256Client,
    ScramSHA256PlusClient,
    ScramSHA256PlusServer,
    ScramSHA256Server,
    format_dovecot,
    make_verifier,
    parse_dovecot,
    tls_server_end_point,
)
from authgate.testing import kit

ServerClass = type[ScramSHA1Server] | type[ScramSHA256Server]
ClientClass = type[ScramSHA1Client] | type[ScramSHA256Client]

# (mechanism name, server class, client class, hash, PLUS)
VARIANTS = [
    ("SCRAM-SHA-1", ScramSHA1Server, ScramSHA1Client, "sha1", False),
    ("SCRAM-SHA-256", ScramSHA256Server, ScramSHA256Client, "sha256", False),
    ("SCRAM-SHA-1-PLUS", ScramSHA1PlusServer, ScramSHA1PlusClient, "sha1", True),
    ("SCRAM-SHA-256-PLUS", ScramSHA256PlusServer, ScramSHA256PlusClient, "sha256", True),
]
FORMS = {"sha1": SecretForm.SCRAM_SHA_1, "sha256": SecretForm.SCRAM_SHA_256}
PASSWORD = "correct horse"


def _der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)


@cache
def rsa_cert_der() -> bytes:
    """A real certificate (sha256WithRSAEncryption) from a throwaway CA."""
    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    return _der(ca.issue_cert("localhost").cert_chain_pems[0].bytes())


@cache
def binding() -> tuple[str, bytes]:
    return ("tls-server-end-point", tls_server_end_point(rsa_cert_der()))


def verifier(hash_name: str, password: str = PASSWORD) -> ScramVerifier:
    return kit.scram_verifier(hash_name, password)


def resolver(users: dict[str, str]) -> Callable[[LookupRequest], LookupAnswer]:
    """A dict-backed credential store holding passwords, answering SCRAM lookups."""
    return kit.store(users, forms=[SecretForm.SCRAM_SHA_1, SecretForm.SCRAM_SHA_256])


def contexts(plus: bool) -> tuple[ServerContext, ClientContext]:
    if plus:
        return ServerContext(channel_binding=binding()), ClientContext(channel_binding=binding())
    return ServerContext(), ClientContext()


def to_verifier(server: ServerMechanism, first: bytes, answer: LookupAnswer) -> bytes:
    """Feed client-first and the store's answer; return the server-first."""
    outcome = server.start(first)
    assert isinstance(outcome, Lookup)
    outcome = server.resume(answer)
    assert isinstance(outcome, Challenge)
    return outcome.data


# ------------------------------------------------------------ RFC test vectors


class Vector(NamedTuple):
    salt: str
    cnonce: str
    snonce: str
    client_first: bytes
    server_first: bytes
    client_final: bytes
    server_final: bytes


RFC5802 = Vector(
    salt="QSXCR+Q6sek8bf92",
    cnonce="fyko+d2lbbFgONRv9qkxdawL",
    snonce="3rfcNHYJY1ZVvWVs7j",
    client_first=b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL",
    server_first=b"r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096",
    client_final=(
        b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts="
    ),
    server_final=b"v=rmF9pqV8S7suAoZWja4dJRkFsKQ=",
)
RFC7677 = Vector(
    salt="W22ZaJ0SNY7soEsUEjb6gQ==",
    cnonce="rOprNGfwEbeRWgbNEkqO",
    snonce="%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
    client_first=b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
    server_first=(
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    ),
    client_final=(
        b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    ),
    server_final=b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=",
)
VECTORS = [
    pytest.param(RFC5802, ScramSHA1Server, ScramSHA1Client, "sha1", id="RFC5802-SHA-1"),
    pytest.param(RFC7677, ScramSHA256Server, ScramSHA256Client, "sha256", id="RFC7677-SHA-256"),
]


@pytest.mark.parametrize(("vec", "server_cls", "client_cls", "hash_name"), VECTORS)
def test_rfc_vector_server(
    vec: Vector, server_cls: ServerClass, client_cls: ClientClass, hash_name: str
) -> None:
    stored = make_verifier("pencil", hash_name, 4096, base64.b64decode(vec.salt))
    server = server_cls(ServerContext(), nonce=vec.snonce)
    assert server.start(vec.client_first) == Lookup(SecretLookup("user", FORMS[hash_name]))
    assert server.resume(stored) == Challenge(vec.server_first)
    outcome = server.step(vec.client_final)
    assert outcome == Success("user", None, additional=vec.server_final)


@pytest.mark.parametrize(("vec", "server_cls", "client_cls", "hash_name"), VECTORS)
def test_rfc_vector_client(
    vec: Vector, server_cls: ServerClass, client_cls: ClientClass, hash_name: str
) -> None:
    client = client_cls(ClientCredentials("user", "pencil"), ClientContext(), nonce=vec.cnonce)
    assert client.start() == vec.client_first
    assert client_step(client, vec.server_first) == vec.client_final
    # SMTP style: the server-final arrives as additional data with success.
    client.finish(vec.server_final)


def test_rfc_vector_client_rejects_tampered_server_final() -> None:
    client = ScramSHA1Client(
        ClientCredentials("user", "pencil"), ClientContext(), nonce=RFC5802.cnonce
    )
    client.start()
    client_step(client, RFC5802.server_first)
    with pytest.raises(ClientAuthError, match="server signature"):
        client.finish(b"v=AAF9pqV8S7suAoZWja4dJRkFsKQ=")


def test_rfc_vector_verifier_matches_scramp() -> None:
    salt = base64.b64decode(RFC7677.salt)
    ours = make_verifier("pencil", "sha256", 4096, salt)
    s, stored, server_key, i = scramp.ScramMechanism("SCRAM-SHA-256").make_auth_info(
        "pencil", 4096, salt
    )
    assert (ours.salt, ours.stored_key, ours.server_key, ours.iterations) == (
        s,
        stored,
        server_key,
        i,
    )


# ------------------------------------------------------------ round trips


@pytest.mark.parametrize(("name", "server_cls", "client_cls", "hash_name", "plus"), VARIANTS)
@pytest.mark.parametrize("initial_response", [True, False])
def test_round_trip(
    name: str,
    server_cls: ServerClass,
    client_cls: ClientClass,
    hash_name: str,
    plus: bool,
    initial_response: bool,
) -> None:
    sctx, cctx = contexts(plus)
    server, client = server_cls(sctx), client_cls(ClientCredentials("alice", PASSWORD), cctx)
    assert server.name == client.name == name
    outcome = run_exchange(
        client, server, resolver({"alice": PASSWORD}), initial_response=initial_response
    )
    assert isinstance(outcome, Success)
    assert (outcome.authcid, outcome.authzid) == ("alice", None)
    assert outcome.additional is not None and outcome.additional.startswith(b"v=")


@pytest.mark.parametrize(("name", "server_cls", "client_cls", "hash_name", "plus"), VARIANTS)
def test_registry_builds_our_classes(
    name: str, server_cls: ServerClass, client_cls: ClientClass, hash_name: str, plus: bool
) -> None:
    info = mechanism_info(name)
    sctx, cctx = contexts(plus)
    assert type(info.server(sctx)) is server_cls
    assert type(info.client(ClientCredentials("a", "b"), cctx)) is client_cls
    assert info.channel_binding is plus


def test_start_without_initial_response_sends_empty_challenge() -> None:
    server = ScramSHA256Server(ServerContext())
    assert server.start(NO_RESPONSE) == Challenge(b"")
    outcome = server.step(b"n,,n=alice,r=abc")
    assert outcome == Lookup(SecretLookup("alice", SecretForm.SCRAM_SHA_256))


def test_empty_initial_response_is_malformed() -> None:
    outcome = ScramSHA256Server(ServerContext()).start(b"")
    assert isinstance(outcome, Failure) and outcome.reason is FailureReason.MALFORMED


def test_nonce_comes_from_ctx_random() -> None:
    def fixed(n: int) -> bytes:
        return b"\x01" * n

    client = ScramSHA256Client(ClientCredentials("a", "b"), ClientContext(random=fixed))
    expected = base64.b64encode(b"\x01" * 18)
    assert client.start() == b"n,,n=a,r=" + expected
    server = ScramSHA256Server(ServerContext(random=fixed))
    first = to_verifier(server, b"n,,n=a,r=xyz", verifier("sha256"))
    assert first.startswith(b"r=xyz" + expected + b",")


# ------------------------------------------------------------ interop with scramp


@pytest.mark.parametrize(("name", "server_cls", "client_cls", "hash_name", "plus"), VARIANTS)
def test_scramp_client_against_our_server(
    name: str, server_cls: ServerClass, client_cls: ClientClass, hash_name: str, plus: bool
) -> None:
    sctx, _ = contexts(plus)
    client = scramp.ScramClient(
        [name], "alice", PASSWORD, channel_binding=binding() if plus else None
    )
    server = server_cls(sctx)
    server_first = to_verifier(server, client.get_client_first().encode(), verifier(hash_name))
    client.set_server_first(server_first.decode())
    outcome = server.step(client.get_client_final().encode())
    assert isinstance(outcome, Success) and outcome.authcid == "alice"
    assert outcome.additional is not None
    client.set_server_final(outcome.additional.decode())  # raises if the signature is wrong


@pytest.mark.parametrize(("name", "server_cls", "client_cls", "hash_name", "plus"), VARIANTS)
def test_our_client_against_scramp_server(
    name: str, server_cls: ServerClass, client_cls: ClientClass, hash_name: str, plus: bool
) -> None:
    _, cctx = contexts(plus)
    mech = scramp.ScramMechanism(name)
    auth_info = mech.make_auth_info(PASSWORD)
    server = mech.make_server(lambda user: auth_info, channel_binding=binding() if plus else None)
    client = client_cls(ClientCredentials("alice", PASSWORD), cctx)
    server.set_client_first(client.start().decode())
    client_final = client_step(client, server.get_server_first().encode())
    server.set_client_final(client_final.decode())  # raises on a bad proof
    assert client_step(client, server.get_server_final().encode()) == b""  # IMAP style
    client.finish(None)


def test_scramp_client_with_wrong_password_fails_at_proof() -> None:
    client = scramp.ScramClient(["SCRAM-SHA-256"], "alice", "wrong")
    server = ScramSHA256Server(ServerContext())
    first = to_verifier(server, client.get_client_first().encode(), verifier("sha256"))
    client.set_server_first(first.decode())
    outcome = server.step(client.get_client_final().encode())
    assert outcome == Failure(FailureReason.INVALID_CREDENTIALS, "invalid credentials")


# ------------------------------------------------------------ authentication failures


@pytest.mark.parametrize(("name", "server_cls", "client_cls", "hash_name", "plus"), VARIANTS)
def test_wrong_password(
    name: str, server_cls: ServerClass, client_cls: ClientClass, hash_name: str, plus: bool
) -> None:
    sctx, cctx = contexts(plus)
    client = client_cls(ClientCredentials("alice", "not " + PASSWORD), cctx)
    outcome = run_exchange(client, server_cls(sctx), resolver({"alice": PASSWORD}))
    assert isinstance(outcome, Failure)
    assert outcome.reason is FailureReason.INVALID_CREDENTIALS
    assert PASSWORD not in outcome.detail
    with pytest.raises(ClientAuthError):  # the server never proved itself
        client.finish(None)


def _server_first_fields(data: bytes) -> tuple[str, bytes, int]:
    r, s, i = data.decode().split(",")
    return r[2:], base64.b64decode(s[2:], validate=True), int(i[2:])


def test_unknown_user_fails_only_at_the_proof() -> None:
    users = resolver({"alice": PASSWORD})
    outcomes = {}
    for user in ("alice", "mallory"):
        client = ScramSHA256Client(ClientCredentials(user, PASSWORD), ClientContext())
        server = ScramSHA256Server(ServerContext())
        outcome = server.start(client.start())
        assert isinstance(outcome, Lookup)
        outcome = server.resume(users(outcome.request))
        assert isinstance(outcome, Challenge)  # a normal-looking server-first
        nonce, salt, iterations = _server_first_fields(outcome.data)
        assert len(salt) == 16 and iterations == 4096 and len(nonce) == 48
        outcome = server.step(client_step(client, outcome.data))
        outcomes[user] = outcome
    assert isinstance(outcomes["alice"], Success)
    # Indistinguishable from a wrong password.
    assert outcomes["mallory"] == Failure(FailureReason.INVALID_CREDENTIALS, "invalid credentials")


def test_unknown_user_salt_is_stable_per_name_and_differs_between_names() -> None:
    """A real user's salt never changes between connections; a made-up one
    must not either, or two probes would reveal that the user is unknown."""

    def salt_for(user: str, unknown_user_key: bytes | None = None) -> bytes:
        server = ScramSHA1Server(ServerContext(), unknown_user_key=unknown_user_key)
        return _server_first_fields(to_verifier(server, f"n,,n={user},r=x".encode(), None))[1]

    assert salt_for("mallory") == salt_for("mallory")
    assert salt_for("mallory") != salt_for("trudy")
    assert salt_for("mallory", unknown_user_key=b"k" * 32) == salt_for(
        "mallory", unknown_user_key=b"k" * 32
    )
    assert salt_for("mallory", unknown_user_key=b"k" * 32) != salt_for("mallory")


def test_unknown_user_cannot_succeed_even_with_the_made_up_keys() -> None:
    """Even a proof that matches the made-up StoredKey must not log in."""
    server = ScramSHA1Server(ServerContext(), unknown_user_key=b"k" * 32)
    server.start(b"n,,n=ghost,r=abc")
    server.resume(None)
    made_up = server._verifier  # white-box: what the fake verifier holds
    assert made_up is not None
    # Nobody can invert H(ClientKey) == StoredKey, so plant a StoredKey whose
    # ClientKey we know and send a proof that is valid for it.
    client_key = b"\x07" * 20
    server._verifier = ScramVerifier(
        made_up.salt, made_up.iterations, hashlib.sha1(client_key).digest(), made_up.server_key
    )
    nonce = server._nonce
    without_proof = f"c=biws,r={nonce}"
    auth = f"n=ghost,r=abc,{server._server_first},{without_proof}".encode()
    signature = hmac.new(hashlib.sha1(client_key).digest(), auth, "sha1").digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    outcome = server.step(f"{without_proof},p={base64.b64encode(proof).decode()}".encode())
    assert outcome == Failure(FailureReason.INVALID_CREDENTIALS, "invalid credentials")


def test_verifier_for_the_wrong_hash_is_a_temporary_failure() -> None:
    server = ScramSHA256Server(ServerContext())
    server.start(b"n,,n=alice,r=abc")
    outcome = server.resume(verifier("sha1"))
    assert isinstance(outcome, Failure) and outcome.reason is FailureReason.TEMPORARY


def test_resume_with_a_non_verifier_is_a_driver_bug() -> None:
    server = ScramSHA256Server(ServerContext())
    server.start(b"n,,n=alice,r=abc")
    with pytest.raises(SaslProtocolError):
        server.resume("plaintext password")


# ------------------------------------------------------------ authorization identity


def test_authzid_equal_to_user_is_accepted() -> None:
    creds = ClientCredentials("alice", PASSWORD, authzid="alice")
    assert ScramSHA256Client(creds, ClientContext()).start().startswith(b"n,a=alice,")
    client = ScramSHA256Client(creds, ClientContext())
    outcome = run_exchange(
        client, ScramSHA256Server(ServerContext()), resolver({"alice": PASSWORD})
    )
    assert outcome == Success("alice", "alice", additional=client._server_final)


def test_authzid_other_than_user_is_refused() -> None:
    client = ScramSHA256Client(ClientCredentials("alice", PASSWORD, authzid="bob"), ClientContext())
    outcome = run_exchange(
        client, ScramSHA256Server(ServerContext()), resolver({"alice": PASSWORD})
    )
    assert isinstance(outcome, Failure) and outcome.reason is FailureReason.AUTHZ_DENIED


def test_names_with_comma_and_equals_are_escaped_both_ways() -> None:
    user = "we,ird=name"
    creds = ClientCredentials(user, PASSWORD, authzid=user)
    first = ScramSHA1Client(creds, ClientContext()).start()
    assert first.startswith(b"n,a=we=2Cird=3Dname,n=we=2Cird=3Dname,r=")
    client = ScramSHA1Client(creds, ClientContext())
    outcome = run_exchange(client, ScramSHA1Server(ServerContext()), resolver({user: PASSWORD}))
    assert isinstance(outcome, Success) and outcome.authcid == outcome.authzid == user


@pytest.mark.parametrize(
    ("raw", "prepared"),
    [("I\u00adX", "IX"), ("\u00aa", "a"), ("\u2168", "IX"), ("user", "user")],  # RFC 4013 sec. 3
)
def test_username_is_saslprepped(raw: str, prepared: str) -> None:
    outcome = ScramSHA256Server(ServerContext()).start(f"n,,n={raw},r=abc".encode())
    assert outcome == Lookup(SecretLookup(prepared, SecretForm.SCRAM_SHA_256))


# ------------------------------------------------------------ channel binding


def test_plus_with_wrong_binding_data_fails() -> None:
    server = ScramSHA256PlusServer(ServerContext(channel_binding=binding()))
    other = ("tls-server-end-point", hashlib.sha256(b"another certificate").digest())
    client = ScramSHA256PlusClient(
        ClientCredentials("alice", PASSWORD), ClientContext(channel_binding=other)
    )
    outcome = run_exchange(client, server, resolver({"alice": PASSWORD}))
    assert outcome == Failure(
        FailureReason.INVALID_CREDENTIALS, "channel binding data does not match"
    )


def test_plus_with_wrong_binding_type_is_malformed() -> None:
    server = ScramSHA256PlusServer(ServerContext(channel_binding=binding()))
    outcome = server.start(b"p=tls-unique,,n=alice,r=abc")
    assert isinstance(outcome, Failure) and outcome.reason is FailureReason.MALFORMED


@pytest.mark.parametrize("flag", [b"n", b"y"])
def test_plus_server_requires_p_flag(flag: bytes) -> None:
    server = ScramSHA1PlusServer(ServerContext(channel_binding=binding()))
    outcome = server.start(flag + b",,n=alice,r=abc")
    assert isinstance(outcome, Failure) and outcome.reason is FailureReason.MALFORMED


def test_plus_server_without_binding_data_fails_clearly() -> None:
    outcome = ScramSHA256PlusServer(ServerContext()).start(b"p=tls-server-end-point,,n=a,r=b")
    assert isinstance(outcome, Failure)
    assert outcome.reason is FailureReason.ENCRYPTION_REQUIRED
    assert "channel binding" in outcome.detail


def test_plus_client_without_binding_data_refuses_to_start() -> None:
    client = ScramSHA1PlusClient(ClientCredentials("a", "b"), ClientContext())
    with pytest.raises(ClientAuthError, match="channel binding"):
        client.start()


def test_downgrade_y_flag_refused_when_server_supports_plus() -> None:
    # Our non-PLUS client on a TLS connection sends "y": it could bind, but
    # (as it was told) the server cannot.
    creds, cctx = ClientCredentials("alice", PASSWORD), ClientContext(channel_binding=binding())
    assert ScramSHA256Client(creds, cctx).start().startswith(b"y,,")
    client = ScramSHA256Client(creds, cctx)
    server = ScramSHA256Server(ServerContext(channel_binding=binding()))
    outcome = run_exchange(client, server, resolver({"alice": PASSWORD}))
    assert isinstance(outcome, Failure)
    assert outcome.reason is FailureReason.INVALID_CREDENTIALS
    assert "downgrade" in outcome.detail


def test_y_flag_accepted_when_server_cannot_bind() -> None:
    client = ScramSHA256Client(
        ClientCredentials("alice", PASSWORD), ClientContext(channel_binding=binding())
    )
    outcome = run_exchange(
        client, ScramSHA256Server(ServerContext()), resolver({"alice": PASSWORD})
    )
    assert isinstance(outcome, Success)


def test_n_flag_accepted_when_server_supports_plus() -> None:
    client = ScramSHA256Client(ClientCredentials("alice", PASSWORD), ClientContext())
    server = ScramSHA256Server(ServerContext(channel_binding=binding()))
    assert isinstance(run_exchange(client, server, resolver({"alice": PASSWORD})), Success)


def test_p_flag_on_non_plus_mechanism_is_malformed() -> None:
    server = ScramSHA256Server(ServerContext(channel_binding=binding()))
    outcome = server.start(b"p=tls-server-end-point,,n=alice,r=abc")
    assert isinstance(outcome, Failure) and outcome.reason is FailureReason.MALFORMED


def test_tls_server_end_point_sha256_rsa_certificate() -> None:
    der = rsa_cert_der()
    assert x509.load_der_x509_certificate(der).signature_algorithm_oid.dotted_string == (
        "1.2.840.113549.1.1.11"  # sha256WithRSAEncryption
    )
    assert tls_server_end_point(der) == hashlib.sha256(der).digest()
    assert tls_server_end_point(der) == bytes(CBindData.from_der(der))  # scramp agrees


@pytest.mark.parametrize("last_byte", [5, 4], ids=["sha1WithRSA", "md5WithRSA"])
def test_tls_server_end_point_upgrades_md5_and_sha1_to_sha256(last_byte: int) -> None:
    # Rewrite the signature algorithm OID (same length) in both places; the
    # signature no longer verifies, which RFC 5929's hashing does not care about.
    oid_sha256_rsa = bytes.fromhex("06092a864886f70d01010b")
    der = rsa_cert_der().replace(oid_sha256_rsa, oid_sha256_rsa[:-1] + bytes([last_byte]))
    assert der != rsa_cert_der()
    assert tls_server_end_point(der) == hashlib.sha256(der).digest()


def _self_signed(
    key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey, algo: hashes.SHA384 | None
) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test")])
    start = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=1))
        .sign(key, algo)
    )
    return cert.public_bytes(Encoding.DER)


def test_tls_server_end_point_uses_sha384_for_ecdsa_sha384() -> None:
    der = _self_signed(ec.generate_private_key(ec.SECP384R1()), hashes.SHA384())
    assert tls_server_end_point(der) == hashlib.sha384(der).digest()


def test_tls_server_end_point_undefined_for_ed25519_and_garbage() -> None:
    with pytest.raises(ValueError, match="undefined"):
        tls_server_end_point(_self_signed(ed25519.Ed25519PrivateKey.generate(), None))
    with pytest.raises(ValueError):
        tls_server_end_point(b"not a certificate")


# ------------------------------------------------------------ malformed client messages


def _server_after_first(first: bytes = b"n,,n=alice,r=abc") -> tuple[ScramSHA256Server, str]:
    server = ScramSHA256Server(ServerContext(), nonce="SERVER")
    to_verifier(server, first, verifier("sha256"))
    return server, "abcSERVER"


@pytest.mark.parametrize(
    "first",
    [
        b"n,,",
        b"n,n=alice,r=abc",
        b"x,,n=alice,r=abc",
        b"n,b=bob,n=alice,r=abc",
        b"n,,m=ext,n=alice,r=abc",
        b"n,,r=abc,n=alice",
        b"n,,n=al=2Dice,r=abc",
        b"n,,n=al\x07ice,r=abc",
        b"n,,n=alice,r=a\x7fb",
        b"n,,n=alice,r=",
        b"n,,n=\xff,r=abc",
        b"n,,n=,r=abc",
    ],
)
def test_malformed_client_first(first: bytes) -> None:
    outcome = ScramSHA256Server(ServerContext()).start(first)
    assert isinstance(outcome, Failure) and outcome.reason is FailureReason.MALFORMED
    assert first.decode(errors="replace") not in outcome.detail


PROOF = base64.b64encode(b"\0" * 32).decode()


@pytest.mark.parametrize(
    "final",
    [
        f"c=biws,r=abcSERVER,p={PROOF[:-4]}",  # proof of the wrong length
        f"c=biws,r=abcSERVERX,p={PROOF}",  # nonce does not match
        f"c=eSws,r=abcSERVER,p={PROOF}",  # "y,," while the client said "n,,"
        f"c=bi!s,r=abcSERVER,p={PROOF}",  # not base64
        f"r=abcSERVER,c=biws,p={PROOF}",  # wrong order
        f"c=biws,r=abcSERVER,p={PROOF},x=1",  # proof not last
        "c=biws,r=abcSERVER",
        "",
    ],
)
def test_malformed_client_final(final: str) -> None:
    server, _ = _server_after_first()
    outcome = server.step(final.encode())
    assert isinstance(outcome, Failure) and outcome.reason is FailureReason.MALFORMED
    assert PROOF not in outcome.detail and "abcSERVER" not in outcome.detail


def test_client_final_extensions_are_covered_by_the_proof() -> None:
    """An unknown extension before p= is allowed and part of AuthMessage."""
    client = ScramSHA256Client(ClientCredentials("alice", PASSWORD), ClientContext())
    server = ScramSHA256Server(ServerContext())
    server_first = to_verifier(server, client.start(), verifier("sha256"))
    final = client_step(client, server_first)
    without_proof, proof = final.rsplit(b",p=", 1)
    outcome = server.step(without_proof + b",x=ext,p=" + proof)
    assert outcome == Failure(FailureReason.INVALID_CREDENTIALS, "invalid credentials")


# ------------------------------------------------------------ client-side checks


def _client_after_first(nonce: str = "abc") -> ScramSHA256Client:
    client = ScramSHA256Client(ClientCredentials("alice", PASSWORD), ClientContext(), nonce=nonce)
    client.start()
    return client


SALT = base64.b64encode(b"saltsaltsalt").decode()


@pytest.mark.parametrize(
    ("server_first", "match"),
    [
        (f"r=xyzDEF,s={SALT},i=4096", "nonce"),  # does not extend our nonce
        (f"r=abc,s={SALT},i=4096", "nonce"),  # adds nothing
        (f"r=abcDEF,s={SALT},i=4095", "iteration"),  # below RFC 5802's floor
        (f"r=abcDEF,s={SALT},i=04096", "iteration"),
        (f"r=abcDEF,s={SALT},i=99999999999", "iteration"),
        ("r=abcDEF,s=!!!!,i=4096", "base64"),
        (f"s={SALT},r=abcDEF,i=4096", "r=, s=, i="),
        ("e=other-error", "other-error"),
        ("e=\x01\x02", "unreadable"),
        (f"m=x,r=abcDEF,s={SALT},i=4096", "extension"),
    ],
)
def test_client_rejects_bad_server_first(server_first: str, match: str) -> None:
    with pytest.raises(ClientAuthError, match=match):
        _client_after_first().step(server_first.encode())


@pytest.mark.parametrize("count", [100_001, 10_000_000])
def test_client_refuses_more_iterations_than_the_cap(count: int) -> None:
    # A backend must not be able to make every login spin on PBKDF2: 100,000
    # is 25 times what Dovecot and Cyrus use (the old cap was 10 million).
    with pytest.raises(ClientAuthError, match=f"iteration count {count} is out of"):
        _client_after_first().step(f"r=abcDEF,s={SALT},i={count}".encode())


def test_client_hands_pbkdf2_to_the_driver() -> None:
    """server-first is answered with a Derive: the slow PBKDF2 at the
    server's count is the driver's to run (off the event loop); `finish`
    turns the key into client-final, once, in order."""
    client = _client_after_first()
    derive = client.step(f"r=abcDEF,s={SALT},i={MAX_CLIENT_ITERATIONS}".encode())
    assert isinstance(derive, Derive)
    assert (derive.hash_name, derive.salt, derive.iterations) == (
        "sha256",
        b"saltsaltsalt",
        MAX_CLIENT_ITERATIONS,
    )
    assert PASSWORD not in repr(derive)
    with pytest.raises(SaslProtocolError):
        client.step(b"v=AAAA")  # no challenge while the derivation is out
    with pytest.raises(SaslProtocolError):
        derive.finish(b"short")
    final = derive.finish(derive.compute())
    assert final.startswith(b"c=biws,r=abcDEF,p=")
    with pytest.raises(SaslProtocolError):
        derive.finish(derive.compute())  # once only


@given(st.text(alphabet="0123456789", min_size=1, max_size=12))
def test_client_iteration_count_parser(count: str) -> None:
    client = _client_after_first()
    try:
        outcome = client.step(f"r=abcDEF,s={SALT},i={count}".encode())
    except ClientAuthError:
        assert count.startswith("0") or not MIN_ITERATIONS <= int(count) <= MAX_CLIENT_ITERATIONS
    else:
        assert isinstance(outcome, Derive) and outcome.iterations == int(count)
        assert MIN_ITERATIONS <= outcome.iterations <= MAX_CLIENT_ITERATIONS


def test_client_rejects_server_error_in_server_final() -> None:
    client = _client_after_first()
    client_step(client, f"r=abcDEF,s={SALT},i=4096".encode())
    with pytest.raises(ClientAuthError, match="invalid-proof"):
        client_step(client, b"e=invalid-proof")


def test_client_finish_without_server_signature_fails() -> None:
    client = _client_after_first()
    client_step(client, f"r=abcDEF,s={SALT},i=4096".encode())
    with pytest.raises(ClientAuthError, match="without proving"):
        client.finish(None)


def test_client_finish_before_client_final_fails() -> None:
    client = _client_after_first()
    with pytest.raises(ClientAuthError):
        client.finish(b"v=AAAA")


def _verified_client() -> tuple[ScramSHA256Client, bytes]:
    client = ScramSHA256Client(ClientCredentials("alice", PASSWORD), ClientContext())
    server = ScramSHA256Server(ServerContext())
    final = client_step(client, to_verifier(server, client.start(), verifier("sha256")))
    outcome = server.step(final)
    assert isinstance(outcome, Success) and outcome.additional is not None
    return client, outcome.additional


def test_client_accepts_server_final_twice_only_if_identical() -> None:
    client, server_final = _verified_client()
    assert client_step(client, server_final) == b""
    client.finish(server_final)

    client, server_final = _verified_client()
    client_step(client, server_final)
    with pytest.raises(ClientAuthError, match="different"):
        client.finish(server_final[:-5] + b"AAAA=")


def test_client_wrong_server_signature_as_challenge() -> None:
    client, _ = _verified_client()
    with pytest.raises(ClientAuthError, match="server signature"):
        client_step(client, b"v=" + base64.b64encode(b"\0" * 32))


# ------------------------------------------------------------ call order


def test_server_out_of_order_calls_raise() -> None:
    server = ScramSHA256Server(ServerContext())
    with pytest.raises(SaslProtocolError):
        server.step(b"n,,n=a,r=b")
    with pytest.raises(SaslProtocolError):
        server.resume(None)
    server.start(b"n,,n=a,r=b")
    with pytest.raises(SaslProtocolError):
        server.start(b"n,,n=a,r=b")
    with pytest.raises(SaslProtocolError):
        server.step(b"c=biws")
    failed = ScramSHA256Server(ServerContext())
    failed.start(b"garbage")
    with pytest.raises(SaslProtocolError):
        failed.step(b"n,,n=a,r=b")


def test_client_out_of_order_calls_raise() -> None:
    client = ScramSHA256Client(ClientCredentials("a", "b"), ClientContext())
    with pytest.raises(SaslProtocolError):
        client_step(client, b"r=x")
    client.start()
    with pytest.raises(SaslProtocolError):
        client.start()
    with pytest.raises(ClientAuthError):
        client_step(client, b"garbage")
    with pytest.raises(SaslProtocolError):  # a failed client stays failed
        client_step(client, b"r=x")
    with pytest.raises(SaslProtocolError):
        client.finish(None)


# ------------------------------------------------------------ stored forms


@pytest.mark.parametrize("hash_name", ["sha1", "sha256"])
def test_dovecot_round_trip(hash_name: str) -> None:
    v = make_verifier("pencil", hash_name)
    text = format_dovecot(v)
    prefix = "{SCRAM-SHA-1}" if hash_name == "sha1" else "{SCRAM-SHA-256}"
    assert text.startswith(prefix + "4096,")
    assert parse_dovecot(text) == v
    bare = format_dovecot(v, scheme_prefix=False)
    assert bare == text.removeprefix(prefix)
    assert parse_dovecot(bare) == v
    assert parse_dovecot(bare, hash_name) == v


def test_dovecot_form_of_rfc5802_verifier() -> None:
    salt = base64.b64decode("QSXCR+Q6sek8bf92")
    v = make_verifier("pencil", "sha1", 4096, salt)
    # Fields in Dovecot's order: iterations, salt, StoredKey, ServerKey.
    fields = format_dovecot(v, scheme_prefix=False).split(",")
    assert fields[:2] == ["4096", "QSXCR+Q6sek8bf92"]
    assert base64.b64decode(fields[2]) == v.stored_key
    assert base64.b64decode(fields[3]) == v.server_key
    # A parsed Dovecot entry authenticates the RFC exchange.
    server = ScramSHA1Server(ServerContext(), nonce=RFC5802.snonce)
    server.start(RFC5802.client_first)
    assert server.resume(parse_dovecot("{scram-sha-1}" + ",".join(fields))) == Challenge(
        RFC5802.server_first
    )
    assert isinstance(server.step(RFC5802.client_final), Success)


SECRET_FIELD = "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"  # base64 of a 24-byte "secret"


@pytest.mark.parametrize(
    ("text", "hash_name"),
    [
        ("{SCRAM-SHA-256}4096,c2FsdA==," + SECRET_FIELD + "," + SECRET_FIELD, None),
        ("{SCRAM-SHA-512}4096,c2FsdA==,AAAA,AAAA", None),
        ("{PLAIN}" + SECRET_FIELD, None),
        ("4096,c2FsdA==," + SECRET_FIELD, None),
        ("4095,c2FsdA==," + "A" * 28 + "," + "A" * 28, None),
        ("x4096,c2FsdA==," + "A" * 28 + "," + "A" * 28, None),
        ("4096,,AAAA" + "A" * 24 + "," + "A" * 28, None),
        ("4096,c2FsdA==,!" + SECRET_FIELD + "," + SECRET_FIELD, None),
        ("4096,c2FsdA==," + "A" * 28 + "," + "A" * 44, None),  # lengths disagree
        ("4096,c2FsdA==," + "A" * 28 + "," + "A" * 28, "sha256"),  # SHA-1 keys
        ("{SCRAM-SHA-1}4096,c2FsdA==," + "A" * 28 + "," + "A" * 28, "sha256"),
        ("4096,c2FsdA==," + "A" * 28 + "," + "A" * 28, "md5"),
    ],
)
def test_parse_dovecot_errors_name_no_secret(text: str, hash_name: str | None) -> None:
    with pytest.raises(ValueError) as info:
        parse_dovecot(text, hash_name)
    assert SECRET_FIELD not in str(info.value)
    assert "c2VjcmV0" not in str(info.value)


def test_make_verifier_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="hash_name"):
        make_verifier("pencil", "md5")
    with pytest.raises(ValueError, match="iterations"):
        make_verifier("pencil", "sha256", 1000)
    with pytest.raises(ValueError, match="salt"):
        make_verifier("pencil", "sha256", salt=b"")
    with pytest.raises(ValueError, match="SASLprep") as info:
        make_verifier("pen\x07cil", "sha256")
    assert "pen" not in str(info.value)


def test_make_verifier_salts_randomly_and_applies_saslprep() -> None:
    assert make_verifier("pencil", "sha1").salt != make_verifier("pencil", "sha1").salt
    salt = b"0123456789abcdef"
    # RFC 4013: U+00AD (soft hyphen) maps to nothing.
    assert make_verifier("pen\u00adcil", "sha1", salt=salt) == make_verifier(
        "pencil", "sha1", salt=salt
    )


# ------------------------------------------------------------ property tests


server_classes = st.sampled_from([v[1] for v in VARIANTS])
client_classes = st.sampled_from([v[2] for v in VARIANTS])


def _server(cls: ServerClass) -> ServerMechanism:
    return cls(ServerContext(channel_binding=binding()))


def _drive(server: ServerMechanism, outcome: ServerOutcome, replies: list[bytes]) -> ServerOutcome:
    for reply in replies:
        if isinstance(outcome, Lookup):
            outcome = server.resume(verifier("sha1" if "SHA-1" in server.name else "sha256"))
        if not isinstance(outcome, Challenge):
            break
        outcome = server.step(reply)
    return outcome


@settings(max_examples=300, deadline=None)
@given(server_classes, st.binary(max_size=200), st.lists(st.binary(max_size=200), max_size=3))
def test_server_random_bytes_never_crash(
    cls: ServerClass, first: bytes, replies: list[bytes]
) -> None:
    server = _server(cls)
    outcome = _drive(server, server.start(first), replies)
    assert isinstance(outcome, Failure | Lookup | Challenge)


@settings(max_examples=300, deadline=None)
@given(
    server_classes,
    st.sampled_from([b"n,,", b"y,,", b"p=tls-server-end-point,,", b"n,a=u,"]),
    st.text(max_size=40),
    st.text(max_size=120),
)
def test_server_near_valid_messages_never_crash(
    cls: ServerClass, header: bytes, user: str, tail: str
) -> None:
    server = _server(cls)
    outcome = server.start(header + f"n={user},r=abc".encode())
    if isinstance(outcome, Lookup):
        assert isinstance(outcome.request, SecretLookup) and outcome.request.authcid
        outcome = server.resume(verifier("sha1" if "SHA-1" in server.name else "sha256"))
        assert isinstance(outcome, Challenge)
        nonce = outcome.data.split(b",")[0][2:].decode()
        outcome = server.step(f"c=biws,r={nonce},{tail}".encode(errors="surrogatepass"))
    assert isinstance(outcome, Failure)


@settings(max_examples=300, deadline=None)
@given(client_classes, st.binary(max_size=200), st.binary(max_size=200), st.binary(max_size=60))
def test_client_random_bytes_never_crash(
    cls: ClientClass, server_first: bytes, server_final: bytes, additional: bytes
) -> None:
    client = cls(ClientCredentials("alice", PASSWORD), ClientContext(channel_binding=binding()))
    client.start()
    try:
        client_step(client, server_first)
    except ClientAuthError:
        return
    with pytest.raises(ClientAuthError):
        client_step(client, server_final)


@settings(max_examples=200, deadline=None)
@given(
    client_classes,
    st.text(max_size=20),
    st.text(max_size=30),
    st.one_of(st.integers(-10, 9000).map(str), st.text(max_size=8)),
    st.binary(max_size=60),
)
def test_client_near_valid_server_messages_never_crash(
    cls: ClientClass, suffix: str, salt: str, count: str, additional: bytes
) -> None:
    client = cls(
        ClientCredentials("alice", PASSWORD), ClientContext(channel_binding=binding()), nonce="abc"
    )
    client.start()
    server_first = f"r=abc{suffix},s={salt},i={count}".encode(errors="surrogatepass")
    try:
        client_step(client, server_first)
    except ClientAuthError:
        return
    with pytest.raises(ClientAuthError):
        client.finish(additional)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200), st.sampled_from([None, "sha1", "sha256"]))
def test_parse_dovecot_never_crashes(text: str, hash_name: str | None) -> None:
    try:
        parsed = parse_dovecot(text, hash_name)
    except ValueError:
        return
    assert parse_dovecot(format_dovecot(parsed)) == parsed
