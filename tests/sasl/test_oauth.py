"""OAUTHBEARER (RFC 7628) and XOAUTH2: the message parsers and the server's
failure dance, with no network."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authgate.sasl import mechanism_info
from authgate.sasl.base import (
    NO_RESPONSE,
    STORE_UNAVAILABLE,
    Challenge,
    ClientContext,
    ClientCredentials,
    Failure,
    FailureReason,
    Lookup,
    LookupAnswer,
    LookupRequest,
    ServerContext,
    Success,
    TokenCheck,
    TokenVerdict,
    check_authzid,
    run_exchange,
)
from authgate.sasl.oauth import (
    MAX_TOKEN_OCTETS,
    OAuthBearerServer,
    OAuthMessage,
    XOAuth2Server,
    parse_oauthbearer,
    parse_xoauth2,
)

TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln"
CURL_STYLE = b"n,a=alice@example.org,\x01host=mail\x01port=143\x01auth=Bearer " + TOKEN.encode() + b"\x01\x01"


def resolver(verdict: TokenVerdict) -> object:
    def resolve(request: LookupRequest) -> LookupAnswer:
        assert isinstance(request, TokenCheck)
        return verdict

    return resolve


def test_parse_oauthbearer_as_curl_sends_it() -> None:
    parsed = parse_oauthbearer(CURL_STYLE)
    assert parsed == OAuthMessage("alice@example.org", TOKEN, (("host", "mail"), ("port", "143")))


def test_parse_oauthbearer_without_authzid_and_escapes() -> None:
    assert parse_oauthbearer(b"n,,\x01auth=Bearer abc\x01\x01") == OAuthMessage("", "abc")
    parsed = parse_oauthbearer(b"y,a=a=2Cb=3Dc,\x01auth=bearer   abc\x01\x01")
    assert isinstance(parsed, OAuthMessage) and parsed.user == "a,b=c"


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"\x01",
        b"n,a=alice\x01auth=Bearer abc\x01\x01",  # GS2 header not closed
        b"p=tls-unique,,\x01auth=Bearer abc\x01\x01",  # channel binding
        b"x,,\x01auth=Bearer abc\x01\x01",
        b"n,b=alice,\x01auth=Bearer abc\x01\x01",
        b"n,a=al=ice,\x01auth=Bearer abc\x01\x01",  # bad saslname escape
        b"n,,auth=Bearer abc\x01\x01",  # no kvsep after the header
        b"n,,\x01auth=Bearer abc\x01",  # not ended by kvsep kvsep
        b"n,,\x01\x01",  # no auth
        b"n,,\x01auth=Basic abc\x01\x01",
        b"n,,\x01auth=Bearer a b\x01\x01",
        b"n,,\x01auth=Bearer abc\x01auth=Bearer abd\x01\x01",
        b"n,,\x011=x\x01auth=Bearer abc\x01\x01",
        b"n,,\x01host=\x00\x01auth=Bearer abc\x01\x01",
    ],
)
def test_malformed_oauthbearer_refused_without_echo(message: bytes) -> None:
    parsed = parse_oauthbearer(message)
    assert isinstance(parsed, Failure) and parsed.reason is FailureReason.MALFORMED
    assert "abc" not in parsed.detail


def test_parse_xoauth2() -> None:
    assert parse_xoauth2(b"user=bob@example.org\x01auth=Bearer tok\x01\x01") == OAuthMessage(
        "bob@example.org", "tok"
    )
    for bad in (b"auth=Bearer tok\x01\x01", b"user=bob\x01auth=Bearer tok\x01", b"user=\x01auth=Bearer t\x01\x01"):
        assert isinstance(parse_xoauth2(bad), Failure)


def test_long_tokens_fit_and_too_long_ones_are_refused() -> None:
    long_token = "a" * 8192
    parsed = parse_oauthbearer(b"n,,\x01auth=Bearer " + long_token.encode() + b"\x01\x01")
    assert isinstance(parsed, OAuthMessage) and parsed.token == long_token
    huge = b"n,,\x01auth=Bearer " + b"a" * MAX_TOKEN_OCTETS + b"\x01\x01"
    assert isinstance(parse_oauthbearer(huge), Failure)


# A GS2 header and key-value pairs built from parts: the parser takes back
# exactly what was put in, and never raises on anything else.
_KEYS = st.from_regex(r"[A-Za-z]{1,8}", fullmatch=True).filter(lambda k: k != "auth")
_VALUES = st.from_regex(r"[\x21-\x7e \t]{0,20}", fullmatch=True)
_NAMES = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=20)
_TOKENS = st.from_regex(r"[A-Za-z0-9\-._~+/]{1,60}={0,2}", fullmatch=True)


@given(
    user=st.one_of(st.just(""), _NAMES),
    flag=st.sampled_from(["n", "y"]),
    pairs=st.lists(st.tuples(_KEYS, _VALUES), max_size=4),
    token=_TOKENS,
)
def test_oauthbearer_round_trip(user: str, flag: str, pairs: list[tuple[str, str]], token: str) -> None:
    escaped = user.replace("=", "=3D").replace(",", "=2C")
    header = f"{flag},{'a=' + escaped if user else ''},"
    body = "".join(f"{k}={v}\x01" for k, v in pairs) + f"auth=Bearer {token}\x01"
    parsed = parse_oauthbearer((header + "\x01" + body + "\x01").encode())
    assert parsed == OAuthMessage(user, token, tuple(pairs))


@given(st.binary(max_size=300))
def test_parsers_never_raise(data: bytes) -> None:
    for parse in (parse_oauthbearer, parse_xoauth2):
        result = parse(data)
        assert isinstance(result, OAuthMessage | Failure)


@given(st.binary(max_size=200))
def test_parsers_take_any_tail_after_a_valid_prefix(tail: bytes) -> None:
    result = parse_oauthbearer(b"n,,\x01auth=Bearer abc\x01" + tail)
    assert isinstance(result, OAuthMessage | Failure)


# ---------------------------------------------------------------- exchange


@pytest.mark.parametrize("name", ["OAUTHBEARER", "XOAUTH2"])
def test_client_against_server_success(name: str) -> None:
    info = mechanism_info(name)
    client = info.client(ClientCredentials("alice", TOKEN), ClientContext(hostname="mail"))
    server = info.server(ServerContext())
    outcome = run_exchange(client, server, resolver(TokenVerdict(True, "alice")))  # type: ignore[arg-type]
    assert outcome == Success("alice", "alice")
    assert isinstance(check_authzid(outcome), Success)


@pytest.mark.parametrize("name", ["OAUTHBEARER", "XOAUTH2"])
def test_without_initial_response(name: str) -> None:
    info = mechanism_info(name)
    client = info.client(ClientCredentials("alice", TOKEN), ClientContext())
    outcome = run_exchange(
        client, info.server(ServerContext()), resolver(TokenVerdict(True, "alice")), initial_response=False  # type: ignore[arg-type]
    )
    assert isinstance(outcome, Success)


def test_oauthbearer_failure_dance() -> None:
    server = OAuthBearerServer(ServerContext(oauth_scope="openid email", oauth_configuration="https://idp/.well-known/openid-configuration"))
    lookup = server.start(CURL_STYLE)
    assert isinstance(lookup, Lookup) and isinstance(lookup.request, TokenCheck)
    assert lookup.request.user == "alice@example.org" and lookup.request.token == TOKEN
    challenge = server.resume(TokenVerdict(False, None, "token expired"))
    assert isinstance(challenge, Challenge)
    assert json.loads(challenge.data) == {
        "status": "invalid_token",
        "scope": "openid email",
        "openid-configuration": "https://idp/.well-known/openid-configuration",
    }
    final = server.step(b"\x01")
    assert final == Failure(FailureReason.INVALID_CREDENTIALS, "token expired")


def test_oauthbearer_wrong_answer_to_the_error_still_fails() -> None:
    server = OAuthBearerServer(ServerContext())
    server.start(CURL_STYLE)
    server.resume(TokenVerdict(False, None, "bad JWT signature"))
    final = server.step(b"n,,\x01auth=Bearer again\x01\x01")
    assert isinstance(final, Failure)


def test_xoauth2_failure_dance() -> None:
    server = XOAuth2Server(ServerContext())
    server.start(NO_RESPONSE)
    server.step(b"user=bob\x01auth=Bearer tok\x01\x01")
    challenge = server.resume(TokenVerdict(False, None, "wrong aud"))
    assert isinstance(challenge, Challenge)
    assert json.loads(challenge.data) == {"status": "401", "schemes": "bearer"}
    assert server.step(b"") == Failure(FailureReason.INVALID_CREDENTIALS, "wrong aud")


def test_client_answers_error_challenge_and_fails() -> None:
    info = mechanism_info("OAUTHBEARER")
    client = info.client(ClientCredentials("alice", TOKEN), ClientContext())
    outcome = run_exchange(client, info.server(ServerContext()), resolver(TokenVerdict(False, None, "x")))  # type: ignore[arg-type]
    assert isinstance(outcome, Failure) and outcome.reason is FailureReason.INVALID_CREDENTIALS


def test_authzid_of_another_user_refused() -> None:
    server = OAuthBearerServer(ServerContext())
    server.start(b"n,a=mallory,\x01auth=Bearer tok\x01\x01")
    outcome = check_authzid(server.resume(TokenVerdict(True, "alice")))
    assert isinstance(outcome, Failure) and outcome.reason is FailureReason.AUTHZ_DENIED


def test_verifier_down_is_temporary() -> None:
    server = XOAuth2Server(ServerContext())
    server.start(b"user=bob\x01auth=Bearer tok\x01\x01")
    outcome = server.resume(STORE_UNAVAILABLE)
    assert isinstance(outcome, Failure) and outcome.reason is FailureReason.TEMPORARY


def test_token_never_in_repr() -> None:
    assert TOKEN not in repr(TokenCheck(TOKEN, "alice", "OAUTHBEARER"))


def test_registry_marks_them_cleartext_bearer() -> None:
    for name in ("OAUTHBEARER", "XOAUTH2"):
        info = mechanism_info(name)
        assert info.cleartext and info.bearer and not info.forms


def test_relay_mode_reads_the_named_user_for_the_lockout() -> None:
    from authgate.sasl.relayed import relayed_user

    assert relayed_user("OAUTHBEARER", 0, CURL_STYLE) == "alice@example.org"
    assert relayed_user("OAUTHBEARER", 0, b"n,,\x01auth=Bearer abc\x01\x01") is None
    assert relayed_user("XOAUTH2", 0, b"user=bob\x01auth=Bearer t\x01\x01") == "bob"
    assert relayed_user("XOAUTH2", 1, b"user=bob\x01auth=Bearer t\x01\x01") is None
