"""PLAIN (RFC 4616): server parsing, client/server round trips, ordering."""

from __future__ import annotations

import smtplib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authgate.sasl.base import (
    MAX_PASSWORD_OCTETS,
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
    PasswordCheck,
    PasswordVerdict,
    SaslProtocolError,
    ServerContext,
    Success,
    run_exchange,
)
from authgate.sasl.plain import PlainClient, PlainServer
from authgate.testing.kit import Resolver, drive, store

resolve = store()
resolve_none_for_unknown = store(unknown=None)


def client(username: str, password: str, authzid: str = "") -> PlainClient:
    return PlainClient(ClientCredentials(username, password, authzid), ClientContext())


def server() -> PlainServer:
    return PlainServer(ServerContext())


# ------------------------------------------------------------ round trips


@pytest.mark.parametrize("initial_response", [True, False])
def test_round_trip(initial_response: bool) -> None:
    outcome = run_exchange(
        client("alice", "correct horse"),
        server(),
        resolve,
        initial_response=initial_response,
    )
    assert outcome == Success("alice", None)


def test_without_initial_response_server_sends_empty_challenge() -> None:
    srv = server()
    assert srv.start(NO_RESPONSE) == Challenge(b"")
    outcome = srv.step(b"\x00alice\x00correct horse")
    assert outcome == Lookup(PasswordCheck("alice", "correct horse"))
    assert srv.resume(True) == Success("alice", None)


def test_lookup_carries_authcid_and_password() -> None:
    outcome = server().start(b"admin\x00alice\x00correct horse")
    assert isinstance(outcome, Lookup)
    assert outcome.request == PasswordCheck("alice", "correct horse")


def test_unicode_round_trip() -> None:
    outcome = run_exchange(client("zoë", "pässwörd 密码"), server(), resolve)
    assert outcome == Success("zoë", None)


def test_authzid_equal_to_authcid_is_accepted() -> None:
    outcome = run_exchange(client("alice", "correct horse", authzid="alice"), server(), resolve)
    assert outcome == Success("alice", "alice")
    assert isinstance(outcome, Success) and outcome.identity == "alice"


def test_authzid_for_another_user_is_denied() -> None:
    outcome = run_exchange(client("alice", "correct horse", authzid="bob"), server(), resolve)
    assert isinstance(outcome, Failure)
    assert outcome.reason is FailureReason.AUTHZ_DENIED


def test_wrong_password() -> None:
    outcome = run_exchange(client("alice", "wrong"), server(), resolve)
    assert outcome == Failure(FailureReason.INVALID_CREDENTIALS, "invalid credentials")


@pytest.mark.parametrize("resolver", [resolve, resolve_none_for_unknown])
def test_unknown_user(resolver: Resolver) -> None:
    outcome = run_exchange(client("mallory", "correct horse"), server(), resolver)
    assert isinstance(outcome, Failure)
    assert outcome.reason is FailureReason.INVALID_CREDENTIALS


def test_python_smtplib_plain_is_accepted() -> None:
    smtp = smtplib.SMTP(local_hostname="localhost")  # no host: does not connect
    smtp.user, smtp.password = "alice", "correct horse"
    message = smtp.auth_plain().encode("utf-8")
    srv = server()
    assert srv.start(message) == Lookup(PasswordCheck("alice", "correct horse"))
    assert srv.resume(True) == Success("alice", None)


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "message",
    [
        b"",  # empty initial response is a malformed message, not "send a challenge"
        b"alice",
        b"\x00alice",
        b"\x00alice\x00",  # empty password
        b"\x00\x00s3cr3t-pw",  # empty authcid
        b"\x00alice\x00s3cr3t-pw\x00",  # four fields
        b"a\x00b\x00s3cr3t-pw\x00d",
        b"\x00al\xffice\x00s3cr3t-pw",  # invalid UTF-8
        b"\x00alice\x00s3cr3t-pw\xc3",  # truncated UTF-8 sequence
    ],
)
def test_malformed_messages(message: bytes) -> None:
    outcome = server().start(message)
    assert isinstance(outcome, Failure)
    assert outcome.reason is FailureReason.MALFORMED
    assert "s3cr3t" not in outcome.detail
    assert "alice" not in outcome.detail


def test_malformed_reply_after_empty_challenge() -> None:
    srv = server()
    srv.start(NO_RESPONSE)
    outcome = srv.step(b"no separators")
    assert isinstance(outcome, Failure)
    assert outcome.reason is FailureReason.MALFORMED


def _is_valid_plain(message: bytes) -> bool:
    """An independent statement of RFC 4616's grammar."""
    if message.count(b"\x00") != 2:
        return False
    try:
        message.decode("utf-8")
    except UnicodeDecodeError:
        return False
    _, authcid, passwd = message.split(b"\x00")
    return bool(authcid) and bool(passwd)


plain_like = st.one_of(
    st.binary(max_size=40),
    st.lists(st.binary(max_size=12), min_size=1, max_size=5).map(b"\x00".join),
    st.lists(st.text(max_size=8), min_size=1, max_size=5).map(
        lambda parts: "\x00".join(parts).encode("utf-8")
    ),
)


@given(plain_like)
def test_parser_matches_grammar(message: bytes) -> None:
    outcome = server().start(message)
    if _is_valid_plain(message):
        assert isinstance(outcome, Lookup)
        assert isinstance(outcome.request, PasswordCheck)
        _, authcid, passwd = message.decode("utf-8").split("\x00")
        assert outcome.request == PasswordCheck(authcid, passwd)
    else:
        assert isinstance(outcome, Failure)
        assert outcome.reason is FailureReason.MALFORMED


field = st.text(min_size=1, max_size=20).filter(lambda s: "\x00" not in s)


@given(field, field)
def test_any_credentials_round_trip(username: str, password: str) -> None:
    users = {username: password}
    seen: list[LookupRequest] = []

    def lookup(request: LookupRequest) -> LookupAnswer:
        seen.append(request)
        assert isinstance(request, PasswordCheck)
        return users.get(request.authcid) == request.password

    outcome = run_exchange(client(username, password), server(), lookup)
    assert outcome == Success(username, None)
    assert seen == [PasswordCheck(username, password)]



@given(
    st.one_of(st.just(NO_RESPONSE), plain_like),
    st.lists(plain_like, max_size=4),
    st.sampled_from([False, None]),
)
def test_random_input_never_crashes_or_succeeds(
    initial: InitialResponse, replies: list[bytes], answer: LookupAnswer
) -> None:
    srv = server()
    outcome = drive(srv, initial, replies, answer)
    assert not isinstance(outcome, Success)
    if isinstance(outcome, Failure):
        with pytest.raises(SaslProtocolError):
            srv.step(b"\x00alice\x00correct horse")


# ------------------------------------------------------------------ order


def test_step_after_success_raises() -> None:
    srv = server()
    srv.start(b"\x00alice\x00correct horse")
    assert isinstance(srv.resume(True), Success)
    with pytest.raises(SaslProtocolError):
        srv.step(b"\x00alice\x00correct horse")
    with pytest.raises(SaslProtocolError):
        srv.resume(True)


def test_step_after_failure_raises() -> None:
    srv = server()
    assert isinstance(srv.start(b"garbage"), Failure)
    with pytest.raises(SaslProtocolError):
        srv.step(b"\x00alice\x00correct horse")


def test_out_of_order_calls_raise() -> None:
    srv = server()
    with pytest.raises(SaslProtocolError):
        srv.step(b"\x00alice\x00correct horse")
    with pytest.raises(SaslProtocolError):
        srv.resume(True)
    srv.start(NO_RESPONSE)
    with pytest.raises(SaslProtocolError):
        srv.start(NO_RESPONSE)
    with pytest.raises(SaslProtocolError):
        srv.resume(True)  # no lookup pending yet
    srv.step(b"\x00alice\x00correct horse")
    with pytest.raises(SaslProtocolError):
        srv.step(b"\x00alice\x00correct horse")  # lookup pending


def test_non_bool_answer_is_a_driver_bug() -> None:
    srv = server()
    srv.start(b"\x00alice\x00correct horse")
    with pytest.raises(SaslProtocolError):
        srv.resume(b"correct horse")


# ----------------------------------------------------------------- client


def test_client_message_layout() -> None:
    assert client("alice", "pw", authzid="admin").start() == b"admin\x00alice\x00pw"
    assert client("zoë", "密").start() == "\x00zoë\x00密".encode()


def test_client_answers_one_empty_challenge() -> None:
    c = client("alice", "pw")
    c.start()
    assert c.step(b"") == b"\x00alice\x00pw"
    with pytest.raises(ClientAuthError):
        c.step(b"")


def test_client_rejects_non_empty_challenge() -> None:
    c = client("alice", "pw")
    c.start()
    with pytest.raises(ClientAuthError):
        c.step(b"unexpected")


def test_client_rejects_additional_data_on_success() -> None:
    c = client("alice", "pw")
    c.start()
    with pytest.raises(ClientAuthError):
        c.finish(b"surprise")


def test_client_finish_without_data() -> None:
    c = client("alice", "pw")
    c.start()
    c.finish(None)
    with pytest.raises(SaslProtocolError):
        c.finish(None)


def test_client_out_of_order() -> None:
    c = client("alice", "pw")
    with pytest.raises(SaslProtocolError):
        c.step(b"")
    c.start()
    with pytest.raises(SaslProtocolError):
        c.start()


@pytest.mark.parametrize(
    ("username", "password", "authzid"),
    [("al\x00ice", "pw", ""), ("alice", "p\x00w", ""), ("alice", "pw", "a\x00"), ("", "pw", "")],
)
def test_client_rejects_unencodable_credentials(username: str, password: str, authzid: str) -> None:
    with pytest.raises(ValueError):
        client(username, password, authzid)


def test_client_rejects_empty_password() -> None:
    with pytest.raises(ValueError):
        client("alice", "")


# ------------------------------------------------------------ password length


def test_password_over_the_cap_is_refused_before_any_lookup() -> None:
    # Octets, not characters: 513 "é" are 1,026 octets of UTF-8.
    over = "é" * 513
    outcome = server().start(f"\0alice\0{over}".encode())
    assert outcome == Failure(FailureReason.TOO_LONG, "PLAIN password is longer than 1024 octets")
    at_cap = "x" * MAX_PASSWORD_OCTETS
    assert server().start(f"\0alice\0{at_cap}".encode()) == Lookup(PasswordCheck("alice", at_cap))


@given(
    st.integers(min_value=MAX_PASSWORD_OCTETS - 8, max_value=MAX_PASSWORD_OCTETS + 8),
    st.sampled_from(["a", "é", "密", "😀"]),
)
def test_the_cap_counts_utf8_octets(octets: int, char: str) -> None:
    width = len(char.encode())
    password = (char * (octets // width + 1)).encode()[: octets - octets % width]
    outcome = server().start(b"\0alice\0" + password)
    if len(password) <= MAX_PASSWORD_OCTETS:
        assert isinstance(outcome, Lookup)
    else:
        assert isinstance(outcome, Failure) and outcome.reason is FailureReason.TOO_LONG


# ------------------------------------------------------------ canonical names


def test_a_store_verdict_names_the_user() -> None:
    """A directory binds "ALICE" to uid alice: the success is alice's, and
    an authzid equal to what was typed is alice acting as herself."""
    for message, authzid in ((b"\0ALICE\0pw", None), (b"ALICE\0ALICE\0pw", "alice")):
        srv = server()
        srv.start(message)
        assert srv.resume(PasswordVerdict(True, "alice")) == Success("alice", authzid)
    srv = server()
    srv.start(b"bob\0ALICE\0pw")
    refused = srv.resume(PasswordVerdict(True, "alice"))
    assert isinstance(refused, Failure) and refused.reason is FailureReason.AUTHZ_DENIED
    srv = server()
    srv.start(b"\0ALICE\0pw")
    assert srv.resume(PasswordVerdict(False, "alice")) == Failure(
        FailureReason.INVALID_CREDENTIALS, "invalid credentials"
    )
