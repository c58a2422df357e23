"""CRAM-MD5 (RFC 2195): HMAC from stored pads, vectors, round trips, ordering."""

from __future__ import annotations

import hashlib
import hmac
import re
import smtplib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authgate.sasl.base import (
    NO_RESPONSE,
    Challenge,
    ClientAuthError,
    ClientContext,
    ClientCredentials,
    Failure,
    FailureReason,
    InitialResponse,
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
from authgate.sasl.cram_md5 import (
    CramMD5Client,
    CramMD5Server,
    _md5,
    cram_md5_digest,
    cram_md5_secret,
)
from authgate.testing.kit import Resolver, drive, store

RFC_CHALLENGE = b"<1896.697170952@postoffice.reston.mci.net>"
RFC_RESPONSE = b"tim b913a602c7eda7a495b4e6e7334d3890"

PASSWORDS = {"tim": "tanstaaftanstaaf", "zoë": "pässwörd 密码", "john doe": "pw with spaces"}
resolve = store(PASSWORDS, forms=[SecretForm.CRAM_MD5])
resolve_false_for_unknown = store(PASSWORDS, forms=[SecretForm.CRAM_MD5], unknown=False)


def client(username: str, password: str, authzid: str = "") -> CramMD5Client:
    return CramMD5Client(ClientCredentials(username, password, authzid), ClientContext())


def server(hostname: str = "mail.example.org") -> CramMD5Server:
    return CramMD5Server(ServerContext(hostname=hostname))


# ------------------------------------------------------------ HMAC / vectors


def test_rfc2195_vector_digest() -> None:
    digest = cram_md5_digest(cram_md5_secret("tanstaaftanstaaf"), RFC_CHALLENGE)
    assert digest.hex() == "b913a602c7eda7a495b4e6e7334d3890"


def test_rfc2195_vector_client() -> None:
    c = client("tim", "tanstaaftanstaaf")
    assert c.start() is None
    assert c.step(RFC_CHALLENGE) == RFC_RESPONSE


def test_curl_test_suite_vector() -> None:
    # curl's IMAP CRAM-MD5 test: user "user", password "secret".
    c = client("user", "secret")
    c.start()
    assert c.step(b"<1972.987654321@curl>") == b"user 7031725599fdbb5d412689aa323e3e0b"


def test_dovecot_stored_form() -> None:
    # `doveadm pw -s CRAM-MD5 -p password`: the outer (opad) state comes first.
    assert cram_md5_secret("password").hex() == (
        "9186d855e11eba527a7a52ca82b313e180d62234f0acc9051b527243d41e2740"
    )


@pytest.mark.parametrize("key_len", [0, 1, 55, 63, 64, 65, 128, 200])
@pytest.mark.parametrize("challenge_len", [0, 1, 55, 56, 63, 64, 65, 119, 120, 128, 300])
def test_block_boundaries_match_stdlib(key_len: int, challenge_len: int) -> None:
    password = "k" * key_len
    challenge = bytes(i % 251 for i in range(challenge_len))
    expected = hmac.new(password.encode(), challenge, "md5").digest()
    assert cram_md5_digest(cram_md5_secret(password), challenge) == expected


@given(st.text(max_size=100), st.binary(max_size=300))
def test_digest_matches_stdlib_hmac(password: str, challenge: bytes) -> None:
    expected = hmac.new(password.encode("utf-8"), challenge, "md5").digest()
    assert cram_md5_digest(cram_md5_secret(password), challenge) == expected


@given(st.binary(max_size=300))
def test_pure_md5_matches_hashlib(data: bytes) -> None:
    assert _md5(data) == hashlib.md5(data).digest()


@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_digest_rejects_wrong_secret_length(length: int) -> None:
    with pytest.raises(ValueError):
        cram_md5_digest(bytes(length), b"<1.2@host>")


# ----------------------------------------------------------------- server


def test_challenge_is_a_msg_id_on_our_hostname() -> None:
    outcome = server().start(NO_RESPONSE)
    assert isinstance(outcome, Challenge)
    assert re.fullmatch(rb"<[0-9]+\.[0-9]+@mail\.example\.org>", outcome.data)


def test_challenge_uses_the_context_random_source() -> None:
    ctx = ServerContext(hostname="mx", random=lambda n: bytes(range(n)))
    outcome = CramMD5Server(ctx).start(NO_RESPONSE)
    left = int.from_bytes(bytes(range(8)), "big")
    right = int.from_bytes(bytes(range(8, 16)), "big")
    assert outcome == Challenge(f"<{left}.{right}@mx>".encode())


def test_challenges_are_unique() -> None:
    challenges = set()
    for _ in range(50):
        outcome = server().start(NO_RESPONSE)
        assert isinstance(outcome, Challenge)
        challenges.add(outcome.data)
    assert len(challenges) == 50


def test_unusable_hostname_is_refused() -> None:
    with pytest.raises(ValueError):
        server("bad host>")


@pytest.mark.parametrize("initial", [b"", b"tim b913a602c7eda7a495b4e6e7334d3890"])
def test_initial_response_is_malformed(initial: bytes) -> None:
    srv = server()
    outcome = srv.start(initial)
    assert isinstance(outcome, Failure)
    assert outcome.reason is FailureReason.MALFORMED
    with pytest.raises(SaslProtocolError):
        srv.step(RFC_RESPONSE)


def test_lookup_asks_for_cram_md5_form() -> None:
    srv = server()
    srv.start(NO_RESPONSE)
    assert srv.step(RFC_RESPONSE) == Lookup(SecretLookup("tim", SecretForm.CRAM_MD5))


@pytest.mark.parametrize("initial_response", [True, False])
def test_round_trip(initial_response: bool) -> None:
    outcome = run_exchange(
        client("tim", "tanstaaftanstaaf"), server(), resolve, initial_response=initial_response
    )
    assert outcome == Success("tim", None)


@pytest.mark.parametrize("user", ["zoë", "john doe"])
def test_round_trip_unicode_and_spaces(user: str) -> None:
    assert run_exchange(client(user, PASSWORDS[user]), server(), resolve) == Success(user)


def test_authzid_equal_to_username_is_allowed() -> None:
    outcome = run_exchange(client("tim", "tanstaaftanstaaf", authzid="tim"), server(), resolve)
    assert outcome == Success("tim", None)


def test_client_refuses_authzid_it_cannot_send() -> None:
    with pytest.raises(ValueError):
        client("master", "pw", authzid="tim")


def test_wrong_password() -> None:
    outcome = run_exchange(client("tim", "tanstaaf"), server(), resolve)
    assert isinstance(outcome, Failure)
    assert outcome.reason is FailureReason.INVALID_CREDENTIALS


@pytest.mark.parametrize("resolver", [resolve, resolve_false_for_unknown])
def test_unknown_user(resolver: Resolver) -> None:
    outcome = run_exchange(client("mallory", "tanstaaftanstaaf"), server(), resolver)
    assert isinstance(outcome, Failure)
    assert outcome.reason is FailureReason.INVALID_CREDENTIALS


def test_python_smtplib_response_is_accepted() -> None:
    srv = server()
    challenge = srv.start(NO_RESPONSE)
    assert isinstance(challenge, Challenge)
    smtp = smtplib.SMTP(local_hostname="localhost")  # no host: does not connect
    smtp.user, smtp.password = "tim", "tanstaaftanstaaf"
    response = smtp.auth_cram_md5(challenge.data)
    outcome = srv.step(response.encode("ascii"))
    assert outcome == Lookup(SecretLookup("tim", SecretForm.CRAM_MD5))
    assert srv.resume(cram_md5_secret("tanstaaftanstaaf")) == Success("tim")


def _answer(srv: CramMD5Server, user: str, password: str) -> bytes:
    challenge = srv.start(NO_RESPONSE)
    assert isinstance(challenge, Challenge)
    digest = hmac.new(password.encode(), challenge.data, "md5").hexdigest()
    return f"{user} {digest}".encode()


def test_upper_case_digest_is_accepted() -> None:
    srv = server()
    response = _answer(srv, "tim", "tanstaaftanstaaf")
    user, digest = response.rsplit(b" ", 1)
    srv.step(user + b" " + digest.upper())
    assert srv.resume(cram_md5_secret("tanstaaftanstaaf")) == Success("tim")


def test_username_is_split_at_the_last_space() -> None:
    srv = server()
    response = _answer(srv, "john doe", "pw with spaces")
    assert srv.step(response) == Lookup(SecretLookup("john doe", SecretForm.CRAM_MD5))
    assert srv.resume(cram_md5_secret("pw with spaces")) == Success("john doe")


@pytest.mark.parametrize(
    "response",
    [
        b"",
        b"tim",
        b"timb913a602c7eda7a495b4e6e7334d3890",
        b" b913a602c7eda7a495b4e6e7334d3890",  # empty user name
        b"tim b913a602c7eda7a495b4e6e7334d389",  # 31 digits
        b"tim b913a602c7eda7a495b4e6e7334d38900",  # 33 digits
        b"tim g913a602c7eda7a495b4e6e7334d3890",  # not hex
        b"tim b913a602c7eda7a495b4e6e7334d3890 ",  # trailing space
        b"tim b913a602c7eda7a495b4e6e7334d3890\r\n",
        b"tim +913a602c7eda7a495b4e6e7334d3890",
        b"t\xffim b913a602c7eda7a495b4e6e7334d3890",  # invalid UTF-8
        b"t\x00im b913a602c7eda7a495b4e6e7334d3890",  # NUL
    ],
)
def test_malformed_responses(response: bytes) -> None:
    srv = server()
    srv.start(NO_RESPONSE)
    outcome = srv.step(response)
    assert isinstance(outcome, Failure)
    assert outcome.reason is FailureReason.MALFORMED
    assert "913a602" not in outcome.detail


@pytest.mark.parametrize("bad", [bytes(16), bytes(33), "tanstaaftanstaaf", True])
def test_wrong_secret_form_is_a_driver_bug(bad: LookupAnswer) -> None:
    srv = server()
    srv.start(NO_RESPONSE)
    srv.step(RFC_RESPONSE)
    with pytest.raises(SaslProtocolError):
        srv.resume(bad)


# ------------------------------------------------------------- hypothesis

user_names = st.text(min_size=1, max_size=20).filter(lambda s: "\x00" not in s)


@given(user_names, st.text(max_size=80))
def test_any_credentials_round_trip(username: str, password: str) -> None:
    def lookup(request: LookupRequest) -> LookupAnswer:
        assert request == SecretLookup(username, SecretForm.CRAM_MD5)
        return cram_md5_secret(password)

    assert run_exchange(client(username, password), server(), lookup) == Success(username)


@given(user_names, st.binary(min_size=16, max_size=16), st.booleans())
def test_response_parser(username: str, digest: bytes, upper: bool) -> None:
    hexdigest = digest.hex().upper() if upper else digest.hex()
    srv = server()
    srv.start(NO_RESPONSE)
    outcome = srv.step(f"{username} {hexdigest}".encode())
    assert outcome == Lookup(SecretLookup(username, SecretForm.CRAM_MD5))



cram_like = st.one_of(
    st.binary(max_size=60),
    st.tuples(st.binary(max_size=10), st.binary(min_size=16, max_size=16)).map(
        lambda t: t[0] + b" " + t[1].hex().encode()
    ),
)


@given(
    st.one_of(st.just(NO_RESPONSE), st.binary(max_size=40)),
    st.lists(cram_like, max_size=3),
    st.one_of(st.none(), st.just(False), st.binary(min_size=32, max_size=32)),
)
def test_random_input_never_crashes_or_succeeds(
    initial: InitialResponse, replies: list[bytes], answer: LookupAnswer
) -> None:
    srv = server()
    outcome = drive(srv, initial, replies, answer)
    # A random 32-byte secret matches a random digest with probability 2**-128.
    assert not isinstance(outcome, Success)
    if isinstance(outcome, Failure):
        with pytest.raises(SaslProtocolError):
            srv.step(RFC_RESPONSE)
    else:
        assert isinstance(outcome, Challenge) and not replies


# ------------------------------------------------------------------ order


def test_step_after_success_raises() -> None:
    srv = server()
    response = _answer(srv, "tim", "tanstaaftanstaaf")
    srv.step(response)
    assert srv.resume(cram_md5_secret("tanstaaftanstaaf")) == Success("tim")
    with pytest.raises(SaslProtocolError):
        srv.step(response)
    with pytest.raises(SaslProtocolError):
        srv.resume(cram_md5_secret("tanstaaftanstaaf"))


def test_step_after_failure_raises() -> None:
    srv = server()
    srv.start(NO_RESPONSE)
    assert isinstance(srv.step(b"garbage"), Failure)
    with pytest.raises(SaslProtocolError):
        srv.step(RFC_RESPONSE)


def test_out_of_order_calls_raise() -> None:
    srv = server()
    with pytest.raises(SaslProtocolError):
        srv.step(RFC_RESPONSE)
    with pytest.raises(SaslProtocolError):
        srv.resume(None)
    srv.start(NO_RESPONSE)
    with pytest.raises(SaslProtocolError):
        srv.start(NO_RESPONSE)
    with pytest.raises(SaslProtocolError):
        srv.resume(None)
    srv.step(RFC_RESPONSE)
    with pytest.raises(SaslProtocolError):
        srv.step(RFC_RESPONSE)


def test_replayed_response_fails_against_a_new_challenge() -> None:
    # The RFC's response is bound to the RFC's challenge, not to ours.
    srv = server()
    srv.start(NO_RESPONSE)
    srv.step(RFC_RESPONSE)
    outcome = srv.resume(cram_md5_secret("tanstaaftanstaaf"))
    assert isinstance(outcome, Failure)
    assert outcome.reason is FailureReason.INVALID_CREDENTIALS


# ----------------------------------------------------------------- client


def test_client_rejects_empty_and_second_challenge() -> None:
    c = client("tim", "tanstaaftanstaaf")
    c.start()
    with pytest.raises(ClientAuthError):
        c.step(b"")
    assert c.step(RFC_CHALLENGE) == RFC_RESPONSE
    with pytest.raises(ClientAuthError):
        c.step(RFC_CHALLENGE)


def test_client_out_of_order_and_additional_data() -> None:
    c = client("tim", "tanstaaftanstaaf")
    with pytest.raises(SaslProtocolError):
        c.step(RFC_CHALLENGE)
    c.start()
    with pytest.raises(SaslProtocolError):
        c.start()
    with pytest.raises(ClientAuthError):
        c.finish(b"extra")
    with pytest.raises(SaslProtocolError):
        c.finish(None)


@pytest.mark.parametrize("username", ["", "t\x00im"])
def test_client_rejects_unusable_username(username: str) -> None:
    with pytest.raises(ValueError):
        client(username, "pw")
