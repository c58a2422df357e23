"""DIGEST-MD5 (RFC 2831): vectors, client against server, strict parsing."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from passlib.hash import htdigest

from authgate.sasl import digest_md5 as dm
from authgate.sasl.base import (
    NO_RESPONSE,
    Challenge,
    ClientAuthError,
    ClientContext,
    ClientCredentials,
    Failure,
    FailureReason,
    Lookup,
    LookupAnswer,
    LookupRequest,
    SaslProtocolError,
    SecretForm,
    SecretLookup,
    ServerContext,
    Success,
    run_exchange,
)
from authgate.sasl.digest_md5 import (
    DigestMD5Client,
    DigestMD5Server,
    DigestResponse,
    DirectiveSyntaxError,
    digest_ha1,
    format_directives,
    parse_digest_response,
    parse_directives,
)
from authgate.testing import kit

HOST = "mail.example.org"
SCTX = ServerContext(service="imap", hostname=HOST)
CCTX = ClientContext(service="imap", hostname=HOST)
PASSWORDS = {"alice": "wonderland", "bob": "builder"}


# ------------------------------------------------------------ helpers


def md5(data: bytes) -> bytes:
    return hashlib.md5(data).digest()


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def store(
    passwords: dict[str, str], seen: list[LookupRequest] | None = None
) -> Callable[[LookupRequest], LookupAnswer]:
    """A dict-backed store answering DIGEST-MD5 lookups with HA1."""
    return kit.store(passwords, forms=[SecretForm.DIGEST_MD5], seen=seen)


def raw_store(ha1_by_user: dict[str, bytes]) -> Callable[[LookupRequest], LookupAnswer]:
    """A store holding precomputed HA1 values (computed by the test itself)."""

    def resolve(request: LookupRequest) -> LookupAnswer:
        assert isinstance(request, SecretLookup)
        return ha1_by_user.get(request.authcid)

    return resolve


def exchange(
    username: str = "alice",
    password: str = "wonderland",
    authzid: str = "",
    passwords: dict[str, str] = PASSWORDS,
) -> object:
    client = DigestMD5Client(ClientCredentials(username, password, authzid), CCTX)
    return run_exchange(client, DigestMD5Server(SCTX), store(passwords))


def started_server(ctx: ServerContext = SCTX) -> tuple[DigestMD5Server, bytes]:
    server = DigestMD5Server(ctx)
    outcome = server.start(NO_RESPONSE)
    assert isinstance(outcome, Challenge)
    nonce = re.search(rb'nonce="([^"]*)"', outcome.data)
    assert nonce is not None
    return server, nonce.group(1)


def build_response(
    nonce: bytes,
    *,
    username: str = "alice",
    password: str = "wonderland",
    realm: str | None = HOST,
    cnonce: str = "Y2xpZW50IG5vbmNl",
    nc: str = "00000001",
    qop: str | None = "auth",
    digest_uri: str = f"imap/{HOST}",
    authzid: str | None = None,
    omit: tuple[str, ...] = (),
    extra: str = "",
    ha1: bytes | None = None,
) -> bytes:
    """A digest-response written out by hand, with a digest that is correct
    for whatever values were chosen: a rejection then comes from the check
    under test, not from the digest."""
    if ha1 is None:
        ha1 = md5(f"{username}:{realm or ''}:{password}".encode())
    a1 = ha1 + f":{nonce.decode()}:{cnonce}".encode()
    if authzid:
        a1 += f":{authzid}".encode()
    a2 = f"AUTHENTICATE:{digest_uri}".encode()
    qop_value = (qop or "auth").strip('"')
    kd = f"{md5_hex(a1)}:{nonce.decode()}:{nc}:{cnonce}:{qop_value}:{md5_hex(a2)}"
    fields = {
        "charset": "utf-8",
        "username": f'"{username}"',
        "realm": f'"{realm}"' if realm is not None else None,
        "nonce": f'"{nonce.decode()}"',
        "nc": nc,
        "cnonce": f'"{cnonce}"',
        "digest-uri": f'"{digest_uri}"',
        "response": md5_hex(kd.encode()),
        "qop": qop,
        "authzid": f'"{authzid}"' if authzid is not None else None,
    }
    parts = [f"{k}={v}" for k, v in fields.items() if v is not None and k not in omit]
    return (",".join(parts) + extra).encode()


def failure_of(outcome: object, reason: FailureReason) -> Failure:
    assert isinstance(outcome, Failure), outcome
    assert outcome.reason is reason, outcome
    return outcome


# ------------------------------------------------------------ RFC 2831 section 4

RFC_CHALLENGE = (
    b'realm="elwood.innosoft.com",nonce="OA6MG9tEQGm2hh",qop="auth",'
    b"algorithm=md5-sess,charset=utf-8"
)
RFC_RESPONSE = (
    b'charset=utf-8,username="chris",realm="elwood.innosoft.com",'
    b'nonce="OA6MG9tEQGm2hh",nc=00000001,cnonce="OA6MHXh6VqTrRk",'
    b'digest-uri="imap/elwood.innosoft.com",'
    b"response=d388dad90d4bbd760a152321f2143af7,qop=auth"
)
RFC_RSPAUTH = b"rspauth=ea40f60335c427b5527b84dbabcdfffd"
RFC_HOST = "elwood.innosoft.com"


@pytest.mark.pure_python  # patches _fresh_nonce
def test_rfc2831_example_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dm, "_fresh_nonce", lambda random: b"OA6MG9tEQGm2hh")
    server = DigestMD5Server(ServerContext(service="imap", hostname=RFC_HOST))
    challenge = server.start(NO_RESPONSE)
    assert isinstance(challenge, Challenge)
    assert b'nonce="OA6MG9tEQGm2hh"' in challenge.data
    assert b'realm="elwood.innosoft.com"' in challenge.data

    lookup = server.step(RFC_RESPONSE)
    assert lookup == Lookup(SecretLookup("chris", SecretForm.DIGEST_MD5, realm=RFC_HOST))
    rspauth = server.resume(digest_ha1("chris", RFC_HOST, "secret"))
    assert rspauth == Challenge(RFC_RSPAUTH)
    assert server.step(b"") == Success("chris", None, additional=None)


@pytest.mark.pure_python  # patches _fresh_nonce
def test_rfc2831_example_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dm, "_fresh_nonce", lambda random: b"OA6MHXh6VqTrRk")
    client = DigestMD5Client(
        ClientCredentials("chris", "secret"), ClientContext(service="imap", hostname=RFC_HOST)
    )
    assert client.start() is None
    response = dict(parse_directives(client.step(RFC_CHALLENGE)))
    assert response == dict(parse_directives(RFC_RESPONSE))
    assert client.step(RFC_RSPAUTH) == b""
    client.finish(None)


@pytest.mark.pure_python  # patches _fresh_nonce
def test_rfc2831_example_wrong_password_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dm, "_fresh_nonce", lambda random: b"OA6MG9tEQGm2hh")
    server = DigestMD5Server(ServerContext(service="imap", hostname=RFC_HOST))
    server.start(NO_RESPONSE)
    assert isinstance(server.step(RFC_RESPONSE), Lookup)
    failure_of(
        server.resume(digest_ha1("chris", RFC_HOST, "Secret")), FailureReason.INVALID_CREDENTIALS
    )


# ------------------------------------------------------------ the challenge


def test_challenge_has_unquoted_md5_sess_and_only_auth() -> None:
    outcome = DigestMD5Server(SCTX).start(NO_RESPONSE)
    assert isinstance(outcome, Challenge)
    # curl 7.88 cancels on algorithm="md5-sess": the RFC grammar says token.
    assert re.search(rb"(^|,)algorithm=md5-sess(,|$)", outcome.data)
    assert b'algorithm="' not in outcome.data
    fields = dict(parse_directives(outcome.data))
    assert fields["qop"] == b"auth"
    assert fields["charset"] == b"utf-8"
    assert fields["realm"] == HOST.encode()
    assert len(parse_directives(outcome.data)) == 5


def test_nonce_is_fresh_and_carries_enough_randomness() -> None:
    _, first = started_server()
    _, second = started_server()
    assert first != second
    assert len(base64.b64decode(first, validate=True)) >= 16


def test_nonce_comes_from_the_context_random_source() -> None:
    requested: list[int] = []

    def random(n: int) -> bytes:
        requested.append(n)
        return bytes(range(n))

    _, nonce = started_server(ServerContext(hostname=HOST, random=random))
    assert requested and requested[0] >= 16
    assert base64.b64decode(nonce) == bytes(range(requested[0]))


def test_realm_comes_from_context_or_hostname() -> None:
    outcome = DigestMD5Server(ServerContext(hostname=HOST, realm="Example")).start(NO_RESPONSE)
    assert isinstance(outcome, Challenge)
    assert dict(parse_directives(outcome.data))["realm"] == b"Example"


def test_realm_with_control_characters_is_a_configuration_error() -> None:
    with pytest.raises(ValueError):
        DigestMD5Server(ServerContext(hostname=HOST, realm="bad\nrealm"))


@pytest.mark.parametrize("initial", [b"", b'username="alice"'])
def test_initial_response_is_refused(initial: bytes) -> None:
    failure_of(DigestMD5Server(SCTX).start(initial), FailureReason.MALFORMED)


# ------------------------------------------------------------ client against server


def test_round_trip_success_and_lookup_realm() -> None:
    seen: list[LookupRequest] = []
    client = DigestMD5Client(ClientCredentials("alice", "wonderland"), CCTX)
    outcome = run_exchange(client, DigestMD5Server(SCTX), store(PASSWORDS, seen))
    assert outcome == Success("alice", None, additional=None)
    assert seen == [SecretLookup("alice", SecretForm.DIGEST_MD5, realm=HOST)]


def test_round_trip_wrong_password() -> None:
    failure_of(exchange(password="wonderlant"), FailureReason.INVALID_CREDENTIALS)


def test_unknown_user_fails_like_a_wrong_password() -> None:
    wrong = failure_of(exchange(password="nope"), FailureReason.INVALID_CREDENTIALS)
    unknown = failure_of(exchange(username="mallory"), FailureReason.INVALID_CREDENTIALS)
    assert wrong == unknown
    assert "nope" not in wrong.detail


def test_unknown_user_cannot_match_the_stand_in_secret() -> None:
    # With a predictable random source the stand-in HA1 used for unknown
    # users is predictable too; a response made with it must still fail.
    ctx = ServerContext(hostname=HOST, random=lambda n: b"\x00" * n)
    server, nonce = started_server(ctx)
    assert isinstance(server.step(build_response(nonce, ha1=b"\x00" * 16)), Lookup)
    failure_of(server.resume(None), FailureReason.INVALID_CREDENTIALS)


def test_authzid_equal_to_user_is_accepted() -> None:
    assert exchange(authzid="alice") == Success("alice", "alice", additional=None)


def test_authzid_for_another_user_is_denied() -> None:
    failure_of(exchange(authzid="bob"), FailureReason.AUTHZ_DENIED)


def test_authzid_is_bound_into_the_digest() -> None:
    server, nonce = started_server()
    # Digest made without authzid, authzid added afterwards: must not verify.
    tampered = build_response(nonce) + b',authzid="alice"'
    assert isinstance(server.step(tampered), Lookup)
    failure_of(
        server.resume(store(PASSWORDS)(SecretLookup("alice", SecretForm.DIGEST_MD5, HOST))),
        FailureReason.INVALID_CREDENTIALS,
    )


def test_non_ascii_user_round_trip() -> None:
    users = {"jürgen€": "pässwörd"}
    assert exchange("jürgen€", "pässwörd", passwords=users) == Success("jürgen€", None)


def test_captured_response_cannot_be_replayed() -> None:
    client = DigestMD5Client(ClientCredentials("alice", "wonderland"), CCTX)
    client.start()
    first_server = DigestMD5Server(SCTX)
    first = first_server.start(NO_RESPONSE)
    assert isinstance(first, Challenge)
    captured = client.step(first.data)
    assert isinstance(first_server.step(captured), Lookup)

    # A new exchange has a new nonce: the captured response names the old one.
    replay_server = DigestMD5Server(SCTX)
    replay_server.start(NO_RESPONSE)
    failure_of(replay_server.step(captured), FailureReason.INVALID_CREDENTIALS)
    # And the old exchange takes no second response.
    with pytest.raises(SaslProtocolError):
        first_server.step(captured)


def test_same_nonce_random_source_still_needs_the_right_password() -> None:
    fixed = ServerContext(hostname=HOST, random=lambda n: b"\x01" * n)
    server, nonce = started_server(fixed)
    assert isinstance(server.step(build_response(nonce, password="guess")), Lookup)
    failure_of(
        server.resume(digest_ha1("alice", HOST, "wonderland")), FailureReason.INVALID_CREDENTIALS
    )


# ------------------------------------------------------------ server parsing


def test_hand_written_response_is_accepted() -> None:
    # Guards the helper the negative tests below rely on.
    server, nonce = started_server()
    assert isinstance(server.step(build_response(nonce)), Lookup)
    assert isinstance(server.resume(digest_ha1("alice", HOST, "wonderland")), Challenge)
    assert server.step(b"") == Success("alice", None)


@pytest.mark.parametrize(
    "extra",
    [
        ',username="bob"',
        ',nonce="another"',
        ",nc=00000001",
        ",qop=auth",
        ",Response=0123456789abcdef0123456789abcdef",
        ',x-unknown="1",x-unknown="2"',
    ],
)
def test_duplicate_directive_is_malformed(extra: str) -> None:
    server, nonce = started_server()
    failure_of(server.step(build_response(nonce, extra=extra)), FailureReason.MALFORMED)


@pytest.mark.parametrize("name", ["username", "nonce", "cnonce", "nc", "digest-uri", "response"])
def test_missing_required_directive_is_malformed(name: str) -> None:
    server, nonce = started_server()
    outcome = failure_of(server.step(build_response(nonce, omit=(name,))), FailureReason.MALFORMED)
    assert name in outcome.detail


def test_unknown_directives_are_ignored() -> None:
    server, nonce = started_server()
    response = build_response(nonce, extra=',maxbuf=65536,x-future="yes",cipher=rc4')
    assert isinstance(server.step(response), Lookup)


@pytest.mark.parametrize("nc", ["00000002", "00000000", "ffffffff"])
def test_nonce_count_other_than_one_is_refused(nc: str) -> None:
    server, nonce = started_server()
    failure_of(server.step(build_response(nonce, nc=nc)), FailureReason.INVALID_CREDENTIALS)


@pytest.mark.parametrize("nc", ["1", "000000001", "0000000g", '""'])
def test_malformed_nonce_count(nc: str) -> None:
    server, nonce = started_server()
    failure_of(server.step(build_response(nonce, nc=nc)), FailureReason.MALFORMED)


@pytest.mark.parametrize(
    "uri", ["smtp/" + HOST, "IMAP/" + HOST, "imap/other.example.org", "imap/localhost"]
)
def test_digest_uri_for_another_service_or_host_is_refused(uri: str) -> None:
    server, nonce = started_server()
    outcome = server.step(build_response(nonce, digest_uri=uri))
    # Its own reason, decided before any secret is looked up (not a guess),
    # and the detail names what the client sent, for the log.
    failure = failure_of(outcome, FailureReason.DIGEST_URI_MISMATCH)
    assert repr(uri) in failure.detail
    what = "service" if uri.split("/")[1] == HOST else "host"
    assert f"names {'another service' if what == 'service' else 'a host that is not ours'}" in (
        failure.detail
    )


# Our other names and the listener's addresses, as the session passes them.
ALIASES = ("localhost", "imap.example.net.", "127.0.0.1", "::1", "2001:DB8::25")
ALIAS_CTX = ServerContext(service="imap", hostname=HOST, aliases=ALIASES)


@pytest.mark.parametrize(
    "uri",
    [
        f"imap/{HOST}",
        "imap/localhost",
        "imap/LocalHost",
        "imap/localhost.",  # a trailing dot (a fully qualified name) is the same name
        f"imap/{HOST.upper()}.",
        "imap/imap.example.net",  # configured with its dot, sent without
        "imap/127.0.0.1",
        "imap/::1",
        "imap/[::1]",  # the URI form of an IPv6 literal (RFC 3986)
        "imap/[0:0:0:0:0:0:0:1]",
        "imap/::ffff:127.0.0.1",  # IPv4-mapped: the IPv4 address
        "imap/[2001:db8::25]",
        "imap/2001:db8:0::25%eth0",  # a zone means nothing to us
        "imap/localhost/example.org",  # serv-name is free
    ],
)
def test_digest_uri_may_name_any_of_our_names_and_addresses(uri: str) -> None:
    server, nonce = started_server(ALIAS_CTX)
    assert isinstance(server.step(build_response(nonce, digest_uri=uri)), Lookup)
    assert isinstance(server.resume(digest_ha1("alice", HOST, "wonderland")), Challenge)
    assert server.step(b"") == Success("alice", None)


@pytest.mark.parametrize(
    "uri",
    [
        "imap/other.example.org",
        "imap/127.0.0.2",
        "imap/[127.0.0.1]",  # brackets are for IPv6 only: not a host
        "imap/::2",
        "imap/localhost..",
        "imap/localhost:143",  # a port is not part of the host
        "imap/local host",
        "imap/imap.example.net.evil.example",
        "smtp/localhost",  # one of our names, but another service
        "pop/127.0.0.1",
    ],
)
def test_digest_uri_outside_our_names_is_a_mismatch(uri: str) -> None:
    server, nonce = started_server(ALIAS_CTX)
    failure = failure_of(
        server.step(build_response(nonce, digest_uri=uri)), FailureReason.DIGEST_URI_MISMATCH
    )
    assert repr(uri) in failure.detail


def test_client_using_another_of_our_names_logs_in() -> None:
    """What Cyrus SASL, GNU SASL and Authen::SASL do: the name they were
    given goes into digest-uri; the realm still comes from our challenge."""
    client = DigestMD5Client(
        ClientCredentials("alice", "wonderland"),
        ClientContext(service="imap", hostname="LOCALHOST"),
    )
    seen: list[LookupRequest] = []
    assert run_exchange(client, DigestMD5Server(ALIAS_CTX), store(PASSWORDS, seen)) == Success(
        "alice", None
    )
    assert seen == [SecretLookup("alice", SecretForm.DIGEST_MD5, realm=HOST)]


def test_mismatch_detail_is_one_printable_line_of_bounded_length() -> None:
    server, nonce = started_server()
    uri = "imap/" + "\u00e9" * 300
    failure = failure_of(
        server.step(build_response(nonce, digest_uri=uri)), FailureReason.DIGEST_URI_MISMATCH
    )
    assert failure.detail.isprintable() and len(failure.detail) < 200


@given(st.ip_addresses())
def test_digest_uri_host_compares_addresses_by_value(address: object) -> None:
    text = str(address)
    key = dm.digest_uri_host(text)
    assert dm.digest_uri_host(key) == key  # idempotent
    if ":" in text:
        exploded = address.exploded  # type: ignore[attr-defined]
        assert dm.digest_uri_host(f"[{text}]") == key
        assert dm.digest_uri_host(exploded.upper()) == key
        assert dm.digest_uri_host(f"[{exploded}%lo]") == key
    else:
        assert key == text
        assert dm.digest_uri_host(f"[{text}]") != key
        assert dm.digest_uri_host(f"::ffff:{text}") == key


_LABEL = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,10}[A-Za-z0-9])?", fullmatch=True)


@given(st.lists(_LABEL, min_size=1, max_size=4).map(".".join), st.booleans())
def test_digest_uri_host_names_ignore_case_and_one_final_dot(name: str, dot: bool) -> None:
    key = dm.digest_uri_host(name)
    sent = name.swapcase() + ("." if dot else "")
    if key == name.lower():  # a name, not something that parses as an address
        assert dm.digest_uri_host(sent) == key
        assert dm.digest_uri_host(name + "..") != key
        assert dm.digest_uri_host(key) == key


@given(st.text(max_size=40))
def test_digest_uri_host_never_fails_and_is_idempotent(text: str) -> None:
    key = dm.digest_uri_host(text)
    assert isinstance(key, str)
    assert dm.digest_uri_host(key) == key or text.endswith("..")


@pytest.mark.parametrize("uri", ["imap/MAIL.Example.ORG", f"imap/{HOST}/example.org"])
def test_digest_uri_host_case_and_serv_name_are_accepted(uri: str) -> None:
    server, nonce = started_server()
    assert isinstance(server.step(build_response(nonce, digest_uri=uri)), Lookup)
    assert isinstance(server.resume(digest_ha1("alice", HOST, "wonderland")), Challenge)


@pytest.mark.parametrize("uri", ["imap", f"/{HOST}", "imap/", f"imap/{HOST}/x/y"])
def test_malformed_digest_uri(uri: str) -> None:
    server, nonce = started_server()
    failure_of(server.step(build_response(nonce, digest_uri=uri)), FailureReason.MALFORMED)


@pytest.mark.parametrize("service", ["smtp", "pop"])
def test_digest_uri_service_follows_context(service: str) -> None:
    ctx = ServerContext(service=service, hostname=HOST)
    server, nonce = started_server(ctx)
    uri = f"{service}/{HOST}"
    assert isinstance(server.step(build_response(nonce, digest_uri=uri)), Lookup)
    # and the client side builds the same digest-uri
    client = DigestMD5Client(
        ClientCredentials("alice", "wonderland"), ClientContext(service=service, hostname=HOST)
    )
    result = run_exchange(client, DigestMD5Server(ctx), store(PASSWORDS))
    assert result == Success("alice", None)


def test_wrong_nonce_is_refused() -> None:
    server, nonce = started_server()
    other = base64.b64encode(b"\x00" * 24)
    assert other != nonce
    failure_of(server.step(build_response(other)), FailureReason.INVALID_CREDENTIALS)


@pytest.mark.parametrize("qop", ["auth-int", "auth-conf", "AUTH-INT", '"auth-int"', "none"])
def test_qop_other_than_auth_is_refused(qop: str) -> None:
    server, nonce = started_server()
    failure_of(server.step(build_response(nonce, qop=qop)), FailureReason.MALFORMED)


@pytest.mark.parametrize("qop", [None, '"auth"', "AUTH"])
def test_qop_absent_or_quoted_means_auth(qop: str | None) -> None:
    server, nonce = started_server()
    assert isinstance(server.step(build_response(nonce, qop=qop)), Lookup)
    assert isinstance(server.resume(digest_ha1("alice", HOST, "wonderland")), Challenge)


def test_realm_not_offered_is_refused() -> None:
    server, nonce = started_server()
    outcome = server.step(build_response(nonce, realm="elsewhere.example"))
    failure_of(outcome, FailureReason.INVALID_CREDENTIALS)


def test_absent_realm_means_empty_realm() -> None:
    server, nonce = started_server()
    outcome = server.step(build_response(nonce, realm=None))
    assert outcome == Lookup(SecretLookup("alice", SecretForm.DIGEST_MD5, realm=""))
    assert isinstance(server.resume(digest_ha1("alice", "", "wonderland")), Challenge)


def test_charset_other_than_utf8_is_refused() -> None:
    server, nonce = started_server()
    response = build_response(nonce, omit=("charset",), extra=",charset=iso-8859-1")
    failure_of(server.step(response), FailureReason.MALFORMED)


def test_without_charset_values_are_iso_8859_1() -> None:
    server, nonce = started_server()
    response = build_response(nonce, omit=("charset",)).replace(b"alice", b"jos\xe9")
    outcome = server.step(response)
    assert isinstance(outcome, Lookup)
    assert isinstance(outcome.request, SecretLookup)
    assert outcome.request.authcid == "josé"


def test_invalid_utf8_is_malformed() -> None:
    server, nonce = started_server()
    response = build_response(nonce).replace(b"alice", b"\xff\xfe")
    failure_of(server.step(response), FailureReason.MALFORMED)


@pytest.mark.parametrize("bad", ["0123", "z" * 32, "0" * 33])
def test_malformed_response_value(bad: str) -> None:
    server, nonce = started_server()
    response = re.sub(rb"response=[0-9a-f]{32}", f"response={bad}".encode(), build_response(nonce))
    failure_of(server.step(response), FailureReason.MALFORMED)


def test_uppercase_response_hex_is_accepted() -> None:
    server, nonce = started_server()
    response = re.sub(
        rb"response=([0-9a-f]{32})",
        lambda m: b"response=" + m.group(1).upper(),
        build_response(nonce),
    )
    assert isinstance(server.step(response), Lookup)
    assert isinstance(server.resume(digest_ha1("alice", HOST, "wonderland")), Challenge)


def test_oversized_response_is_malformed() -> None:
    server, nonce = started_server()
    response = build_response(nonce, extra=',x-pad="' + "a" * 4096 + '"')
    failure_of(server.step(response), FailureReason.MALFORMED)


def test_non_empty_reply_to_rspauth_is_malformed() -> None:
    server, nonce = started_server()
    server.step(build_response(nonce))
    assert isinstance(server.resume(digest_ha1("alice", HOST, "wonderland")), Challenge)
    failure_of(server.step(b"rspauth=1"), FailureReason.MALFORMED)


def test_failure_detail_never_echoes_the_response() -> None:
    server, nonce = started_server()
    response = build_response(nonce, password="hunter2")
    server.step(response)
    outcome = failure_of(
        server.resume(digest_ha1("alice", HOST, "wonderland")), FailureReason.INVALID_CREDENTIALS
    )
    digest = dict(parse_directives(response))["response"].decode()
    assert digest not in outcome.detail and nonce.decode() not in outcome.detail


# ------------------------------------------------------------ server state machine


def test_step_before_start_is_a_driver_bug() -> None:
    with pytest.raises(SaslProtocolError):
        DigestMD5Server(SCTX).step(b"")


def test_second_exchange_on_same_object_is_a_driver_bug() -> None:
    server = DigestMD5Server(SCTX)
    client = DigestMD5Client(ClientCredentials("alice", "wonderland"), CCTX)
    assert run_exchange(client, server, store(PASSWORDS)) == Success("alice", None)
    with pytest.raises(SaslProtocolError):
        server.start(NO_RESPONSE)
    with pytest.raises(SaslProtocolError):
        server.step(b"")


def test_resume_out_of_order_is_a_driver_bug() -> None:
    server, _ = started_server()
    with pytest.raises(SaslProtocolError):
        server.resume(None)


def test_resume_with_wrong_answer_type_is_a_driver_bug() -> None:
    server, nonce = started_server()
    server.step(build_response(nonce))
    with pytest.raises(SaslProtocolError):
        server.resume("wonderland")


def test_step_after_failure_is_a_driver_bug() -> None:
    server, nonce = started_server()
    failure_of(server.step(b"garbage"), FailureReason.MALFORMED)
    with pytest.raises(SaslProtocolError):
        server.step(build_response(nonce))


# ------------------------------------------------------------ client


def client_answer(challenge: bytes, ctx: ClientContext = CCTX, **creds: str) -> dict[str, bytes]:
    client = DigestMD5Client(
        ClientCredentials(
            creds.get("username", "alice"), creds.get("password", "pw"), creds.get("authzid", "")
        ),
        ctx,
    )
    client.start()
    return dict(parse_directives(client.step(challenge)))


@pytest.mark.parametrize("algorithm", [b"algorithm=md5-sess", b'algorithm="md5-sess"'])
def test_client_accepts_quoted_and_unquoted_algorithm(algorithm: bytes) -> None:
    answer = client_answer(b'realm="r",nonce="abc",qop="auth",charset=utf-8,' + algorithm)
    assert answer["nonce"] == b"abc"
    assert answer["digest-uri"] == f"imap/{HOST}".encode()
    assert answer["nc"] == b"00000001"
    assert answer["qop"] == b"auth"


@pytest.mark.parametrize(
    "challenge",
    [
        b'realm="r",nonce="abc",qop="auth",charset=utf-8,algorithm=md5',
        b'realm="r",nonce="abc",qop="auth",charset=utf-8',
        b'realm="r",nonce="abc",qop="auth-int",charset=utf-8,algorithm=md5-sess',
        b'realm="r",nonce="abc",qop="auth-conf,auth-int",algorithm=md5-sess',
        b'realm="r",qop="auth",charset=utf-8,algorithm=md5-sess',
        b'realm="r",nonce="",qop="auth",algorithm=md5-sess',
        b'realm="r",nonce="a",nonce="b",qop="auth",algorithm=md5-sess',
        b'realm="r",nonce="a",qop="auth",algorithm=md5-sess,algorithm=md5-sess',
        b'realm="r",nonce="a",qop="auth",charset=iso-8859-1,algorithm=md5-sess',
        b'realm="r",nonce="a,qop="auth",algorithm=md5-sess',
        b"x" * 2048,
    ],
)
def test_client_rejects_bad_challenges(challenge: bytes) -> None:
    client = DigestMD5Client(ClientCredentials("alice", "pw"), CCTX)
    client.start()
    with pytest.raises(ClientAuthError):
        client.step(challenge)


def test_client_accepts_qop_list_and_absent_qop() -> None:
    listed = client_answer(b'nonce="n",qop="auth-int, auth",algorithm=md5-sess,charset=utf-8')
    absent = client_answer(b'nonce="n",algorithm=md5-sess,charset=utf-8')
    assert listed["qop"] == absent["qop"] == b"auth"


def test_client_picks_realm_matching_hostname_else_first() -> None:
    both = b'realm="first",realm="MAIL.example.org",nonce="n",algorithm=md5-sess,charset=utf-8'
    assert client_answer(both)["realm"] == b"MAIL.example.org"
    other = b'realm="first",realm="second",nonce="n",algorithm=md5-sess,charset=utf-8'
    assert client_answer(other)["realm"] == b"first"
    none = client_answer(b'nonce="n",algorithm=md5-sess,charset=utf-8')
    assert "realm" not in none


def test_client_sends_authzid_only_when_given() -> None:
    challenge = b'realm="r",nonce="n",algorithm=md5-sess,charset=utf-8'
    assert "authzid" not in client_answer(challenge)
    assert client_answer(challenge, authzid="boss")["authzid"] == b"boss"


def test_client_escapes_quotes_in_username() -> None:
    answer = client_answer(b'nonce="n",algorithm=md5-sess,charset=utf-8', username='a"b\\c')
    assert answer["username"] == b'a"b\\c'


def test_client_without_server_charset_uses_iso_8859_1() -> None:
    challenge = b'realm="r",nonce="n",algorithm=md5-sess'
    answer = client_answer(challenge, username="josé")
    assert "charset" not in answer
    assert answer["username"] == b"jos\xe9"
    with pytest.raises(ClientAuthError):
        client_answer(challenge, username="€uro")


def test_client_cnonce_comes_from_context_random() -> None:
    ctx = ClientContext(hostname=HOST, random=lambda n: b"\x07" * n)
    answer = client_answer(b'nonce="n",algorithm=md5-sess,charset=utf-8', ctx)
    assert base64.b64decode(answer["cnonce"]) == b"\x07" * 24


@pytest.mark.pure_python  # patches _fresh_nonce
def test_client_rejects_wrong_rspauth(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dm, "_fresh_nonce", lambda random: b"OA6MHXh6VqTrRk")
    client = DigestMD5Client(
        ClientCredentials("chris", "secret"), ClientContext(service="imap", hostname=RFC_HOST)
    )
    client.start()
    client.step(RFC_CHALLENGE)
    with pytest.raises(ClientAuthError):
        client.step(b"rspauth=ea40f60335c427b5527b84dbabcdfffe")


@pytest.mark.pure_python  # patches _fresh_nonce
@pytest.mark.parametrize(
    "rspauth",
    [b"", b"rspauth=", b"rspauth=xyz", b"other=1", RFC_RSPAUTH + b"," + RFC_RSPAUTH, b'"'],
)
def test_client_rejects_malformed_rspauth(monkeypatch: pytest.MonkeyPatch, rspauth: bytes) -> None:
    monkeypatch.setattr(dm, "_fresh_nonce", lambda random: b"OA6MHXh6VqTrRk")
    client = DigestMD5Client(
        ClientCredentials("chris", "secret"), ClientContext(service="imap", hostname=RFC_HOST)
    )
    client.start()
    client.step(RFC_CHALLENGE)
    with pytest.raises(ClientAuthError):
        client.step(rspauth)


def test_client_finish_without_rspauth_fails() -> None:
    client = DigestMD5Client(ClientCredentials("alice", "pw"), CCTX)
    client.start()
    client.step(b'nonce="n",algorithm=md5-sess,charset=utf-8')
    with pytest.raises(ClientAuthError):
        client.finish(None)


@pytest.mark.pure_python  # patches _fresh_nonce
def test_client_accepts_rspauth_as_additional_data(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dm, "_fresh_nonce", lambda random: b"OA6MHXh6VqTrRk")
    client = DigestMD5Client(
        ClientCredentials("chris", "secret"), ClientContext(service="imap", hostname=RFC_HOST)
    )
    client.start()
    client.step(RFC_CHALLENGE)
    client.finish(RFC_RSPAUTH)


@pytest.mark.pure_python  # patches _fresh_nonce
def test_client_rejects_challenge_after_rspauth(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dm, "_fresh_nonce", lambda random: b"OA6MHXh6VqTrRk")
    client = DigestMD5Client(
        ClientCredentials("chris", "secret"), ClientContext(service="imap", hostname=RFC_HOST)
    )
    client.start()
    client.step(RFC_CHALLENGE)
    client.step(RFC_RSPAUTH)
    with pytest.raises(ClientAuthError):
        client.step(RFC_CHALLENGE)


def test_client_out_of_order_is_a_driver_bug() -> None:
    client = DigestMD5Client(ClientCredentials("alice", "pw"), CCTX)
    with pytest.raises(SaslProtocolError):
        client.step(b"")
    assert client.start() is None
    with pytest.raises(SaslProtocolError):
        client.start()


# ------------------------------------------------------------ ISO 8859-1 rule


def test_ha1_matches_passlib_htdigest_for_ascii() -> None:
    assert digest_ha1("chris", RFC_HOST, "secret").hex() == htdigest.hash(
        "secret", "chris", RFC_HOST
    )


def test_ha1_uses_iso_8859_1_when_representable() -> None:
    assert digest_ha1("user", "realm", "café") == md5(b"user:realm:caf\xe9")


def test_ha1_uses_utf8_when_not_representable() -> None:
    assert digest_ha1("user", "realm", "€uro") == md5("user:realm:€uro".encode())


def test_ha1_converts_each_string_on_its_own() -> None:
    # Cyrus SASL's DigestCalcSecret: user name latin-1, password UTF-8 here.
    assert digest_ha1("josé", "realm", "€") == md5(b"jos\xe9:realm:" + "€".encode())


def test_latin1_password_round_trip_uses_latin1_hash() -> None:
    client = DigestMD5Client(ClientCredentials("alice", "café"), CCTX)
    latin1_store = raw_store({"alice": md5(f"alice:{HOST}:".encode() + b"caf\xe9")})
    assert run_exchange(client, DigestMD5Server(SCTX), latin1_store) == Success("alice", None)
    # A store that hashed the UTF-8 bytes would not match what the client did.
    client = DigestMD5Client(ClientCredentials("alice", "café"), CCTX)
    utf8_store = raw_store({"alice": md5(f"alice:{HOST}:café".encode())})
    failure_of(
        run_exchange(client, DigestMD5Server(SCTX), utf8_store), FailureReason.INVALID_CREDENTIALS
    )


def test_euro_password_round_trip_uses_utf8_hash() -> None:
    client = DigestMD5Client(ClientCredentials("alice", "€uro"), CCTX)
    utf8_store = raw_store({"alice": md5(f"alice:{HOST}:€uro".encode())})
    assert run_exchange(client, DigestMD5Server(SCTX), utf8_store) == Success("alice", None)


# ------------------------------------------------------------ tokenizer


def test_tokenizer_handles_escapes_whitespace_and_null_elements() -> None:
    data = b' , Key = "quoted\\"string" ,,\tother=tok\r\n ,empty="" , '
    assert parse_directives(data) == [
        ("key", b'quoted"string'),
        ("other", b"tok"),
        ("empty", b""),
    ]


@pytest.mark.parametrize(
    "data",
    [
        b'a="unterminated',
        b'a="ends in backslash\\',
        b"a",
        b"a b=c",
        b"a=",
        b"=b",
        b"a=b c=d",
        b'a="x"y',
        b'a="ctl\x01"',
        b'a="nl\ninside"',
        b'a="\\\x00"',
        b"a=b\r\n",
        b"a=x/y",
    ],
)
def test_tokenizer_rejects_bad_syntax(data: bytes) -> None:
    with pytest.raises(DirectiveSyntaxError):
        parse_directives(data)


def test_formatter_refuses_what_it_cannot_represent() -> None:
    with pytest.raises(ValueError):
        format_directives([("a", b"needs quoting", False)])
    with pytest.raises(ValueError):
        format_directives([("a", b"ctl\x00", True)])
    with pytest.raises(ValueError):
        format_directives([("bad name", b"x", True)])


_TOKEN_ALPHABET = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
tokens = st.text(alphabet=_TOKEN_ALPHABET, min_size=1, max_size=12)
# TEXT without CTLs (HT allowed), including quotes, backslashes and 8-bit bytes.
quotable = st.binary(max_size=40).map(
    lambda b: bytes(c for c in b if c == 0x09 or (c >= 0x20 and c != 0x7F))
)


@st.composite
def directive_lists(draw: st.DrawFn) -> list[tuple[str, bytes, bool]]:
    items = []
    for _ in range(draw(st.integers(0, 8))):
        name = draw(tokens)
        if draw(st.booleans()):
            items.append((name, draw(quotable), True))
        else:
            items.append((name, draw(tokens).encode(), False))
    return items


@given(directive_lists())
def test_tokenizer_round_trips_formatted_lists(items: list[tuple[str, bytes, bool]]) -> None:
    parsed = parse_directives(format_directives(items))
    assert parsed == [(name.lower(), value) for name, value, _ in items]


lws = st.sampled_from(["", " ", "\t", "  ", "\r\n ", "\r\n\t "]).map(str.encode)


@given(st.data(), directive_lists())
def test_tokenizer_tolerates_any_legal_spacing(
    data: st.DataObject, items: list[tuple[str, bytes, bool]]
) -> None:
    # Serialised here by hand, independently of format_directives, with
    # random LWS around every word and random null elements.
    out = data.draw(lws)
    for index, (name, value, quoted) in enumerate(items):
        if index:
            out += b"," + data.draw(lws)
        for _ in range(data.draw(st.integers(0, 2))):
            out += b"," + data.draw(lws)
        if quoted:
            body = b"".join(
                b"\\" + bytes([c])
                if c in b'"\\' or (c < 0x7F and data.draw(st.booleans()) and c != 0x09)
                else bytes([c])
                for c in value
            )
            rendered = b'"' + body + b'"'
        else:
            rendered = value
        out += name.encode() + data.draw(lws) + b"=" + data.draw(lws) + rendered + data.draw(lws)
    out += data.draw(st.sampled_from([b"", b",", b", ,"]))
    assert parse_directives(out) == [(name.lower(), value) for name, value, _ in items]


# ------------------------------------------------------------ robustness


@given(st.binary(max_size=600))
def test_random_digest_response_ends_in_failure(data: bytes) -> None:
    server, _ = started_server()
    assert isinstance(server.step(data), Failure)


_NAMES = [
    "username",
    "realm",
    "nonce",
    "cnonce",
    "nc",
    "qop",
    "digest-uri",
    "response",
    "charset",
    "authzid",
    "maxbuf",
    "x",
]


@settings(max_examples=300)
@given(st.lists(st.tuples(st.sampled_from(_NAMES), st.binary(max_size=40)), max_size=14))
def test_random_directive_soup_never_crashes(pairs: list[tuple[str, bytes]]) -> None:
    server, nonce = started_server()
    items = [(n, nonce if n == "nonce" and v[:1] == b"n" else v, True) for n, v in pairs]
    cleaned = [(n, bytes(c for c in v if c >= 0x20 and c != 0x7F), q) for n, v, q in items]
    outcome = server.step(format_directives(cleaned))
    assert isinstance(outcome, Failure | Lookup)
    if isinstance(outcome, Lookup):
        final = server.resume(digest_ha1("alice", HOST, "wonderland"))
        assert isinstance(final, Failure)


@given(st.binary(max_size=200))
def test_random_reply_to_rspauth_never_crashes(data: bytes) -> None:
    server, nonce = started_server()
    server.step(build_response(nonce))
    assert isinstance(server.resume(digest_ha1("alice", HOST, "wonderland")), Challenge)
    outcome = server.step(data)
    assert isinstance(outcome, Failure if data else Success)


@given(st.binary(max_size=600))
def test_random_challenge_gives_client_auth_error_or_answer(data: bytes) -> None:
    client = DigestMD5Client(ClientCredentials("alice", "pw"), CCTX)
    client.start()
    try:
        answer = client.step(data)
    except ClientAuthError:
        return
    assert isinstance(parse_directives(answer), list)


@given(st.binary(max_size=200))
def test_random_rspauth_gives_client_auth_error(data: bytes) -> None:
    client = DigestMD5Client(ClientCredentials("alice", "pw"), CCTX)
    client.start()
    client.step(b'nonce="n",algorithm=md5-sess,charset=utf-8')
    with pytest.raises(ClientAuthError):
        client.step(data)


# ------------------------------------------------------------ parse_digest_response

_TEXT = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x2FF, blacklist_characters="\x7f"),
    max_size=20,
)
_HEX = "0123456789abcdefABCDEF"


@st.composite
def digest_responses(draw: st.DrawFn) -> tuple[dict[str, bytes | None], bytes]:
    """A well-formed digest-response in any directive order, and the
    values written into it (None: the optional directive left out)."""
    values: dict[str, bytes | None] = {
        "username": draw(_TEXT.filter(bool)).encode(),
        "realm": draw(st.none() | _TEXT.map(str.encode)),
        "nonce": draw(quotable),
        "cnonce": draw(quotable.filter(bool)),
        "nc": draw(st.text(_HEX, min_size=8, max_size=8)).encode(),
        "qop": draw(st.none() | st.sampled_from([b"auth", b"AUTH", b"Auth"])),
        "digest-uri": "/".join(
            draw(st.lists(_TEXT.filter(lambda t: bool(t) and "/" not in t), min_size=2, max_size=3))
        ).encode(),
        "response": draw(st.text(_HEX, min_size=32, max_size=32)).encode(),
        "authzid": draw(st.none() | _TEXT.filter(bool).map(str.encode)),
    }
    unquoted = {"nc", "qop", "response"}
    items = [("charset", b"utf-8", False)]
    items += [(name, value, name not in unquoted) for name, value in values.items() if value is not None]
    return values, format_directives(draw(st.permutations(items)))


@settings(max_examples=300)
@given(digest_responses())
def test_parse_reads_back_every_directive(case: tuple[dict[str, bytes | None], bytes]) -> None:
    values, data = case
    parsed = parse_digest_response(data)
    assert isinstance(parsed, DigestResponse), parsed
    assert parsed.username.encode() == values["username"]
    assert parsed.realm == (None if values["realm"] is None else values["realm"].decode())
    assert (parsed.nonce, parsed.cnonce, parsed.nc) == (
        values["nonce"],
        values["cnonce"],
        values["nc"],
    )
    assert parsed.qop == (values["qop"] or b"auth")
    assert parsed.digest_uri_raw == values["digest-uri"]
    assert parsed.digest_uri == parsed.digest_uri_raw.decode()
    assert parsed.response == values["response"].lower()  # type: ignore[union-attr]
    assert parsed.authzid_raw == values["authzid"]
    assert (parsed.service, parsed.host) == tuple(parsed.digest_uri.split("/")[:2])


@given(digest_responses(), st.sampled_from(sorted(dm._RESPONSE_DIRECTIVES)))
def test_parse_refuses_any_directive_twice(
    case: tuple[dict[str, bytes | None], bytes], name: str
) -> None:
    values, data = case
    assume(name == "charset" or values.get(name) is not None)
    twice = data + b"," + format_directives([(name, b"x", True)])
    failure = failure_of(parse_digest_response(twice), FailureReason.MALFORMED)
    assert failure.detail == f"duplicate directive ({name})"


@given(digest_responses(), st.sampled_from(dm._REQUIRED_IN_RESPONSE))
def test_parse_refuses_a_missing_required_directive(
    case: tuple[dict[str, bytes | None], bytes], name: str
) -> None:
    _, data = case
    kept = [(n, v, True) for n, v in parse_directives(data) if n != name]
    failure = failure_of(parse_digest_response(format_directives(kept)), FailureReason.MALFORMED)
    assert failure.detail == f"missing directive {name}"


@settings(max_examples=300)
@given(st.binary(max_size=600) | digest_responses().map(lambda case: case[1]))
def test_parse_is_total(data: bytes) -> None:
    parsed = parse_digest_response(data)
    assert isinstance(parsed, DigestResponse) or parsed.reason is FailureReason.MALFORMED


@given(
    digest_responses(),
    st.sampled_from(
        [("nc", b"0000000x"), ("response", b"z" * 32), ("qop", b"auth-int"), ("charset", b"latin1")]
    ),
)
def test_parse_failures_quote_no_value(
    case: tuple[dict[str, bytes | None], bytes], broken: tuple[str, bytes]
) -> None:
    values, data = case
    name, bad = broken
    items = [(n, bad if n == name else v, True) for n, v in parse_directives(data)]
    if name not in dict(parse_directives(data)):
        items.append((name, bad, True))
    failure = failure_of(parse_digest_response(format_directives(items)), FailureReason.MALFORMED)
    for value in (*values.values(), bad):
        if value is not None and len(value) >= 8:
            assert value.decode("latin-1") not in failure.detail


@settings(max_examples=300)
@given(st.binary(max_size=300) | digest_responses().map(lambda case: case[1]))
def test_server_step_is_parse_then_check(data: bytes) -> None:
    # A grammar failure is the server's answer as it stands; a response that
    # parses is judged against the exchange, never called malformed.
    server, _ = started_server()
    outcome = server.step(data)
    parsed = parse_digest_response(data)
    if isinstance(parsed, Failure):
        assert outcome == parsed
    elif isinstance(outcome, Failure):
        assert outcome.reason in (
            FailureReason.INVALID_CREDENTIALS,
            FailureReason.DIGEST_URI_MISMATCH,
        )
    else:
        assert outcome == Lookup(
            SecretLookup(parsed.username, SecretForm.DIGEST_MD5, realm=parsed.realm or "")
        )
