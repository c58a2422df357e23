"""LOGIN (draft-murchison-sasl-login): prompts, round trips, ordering."""

from __future__ import annotations

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
from authgate.sasl.login import PASSWORD_PROMPT, USERNAME_PROMPT, LoginClient, LoginServer
from authgate.testing.kit import Resolver, drive, store

resolve = store()
resolve_none_for_unknown = store(unknown=None)


def client(username: str, password: str, authzid: str = "") -> LoginClient:
    return LoginClient(ClientCredentials(username, password, authzid), ClientContext())


def server() -> LoginServer:
    return LoginServer(ServerContext())


# ------------------------------------------------------------ round trips


def test_prompts_in_order() -> None:
    srv = server()
    assert srv.start(NO_RESPONSE) == Challenge(b"Username:")
    assert srv.step(b"alice") == Challenge(b"Password:")
    assert srv.step(b"correct horse") == Lookup(PasswordCheck("alice", "correct horse"))
    assert srv.resume(True) == Success("alice", None)


def test_initial_response_is_the_username() -> None:
    srv = server()
    assert srv.start(b"alice") == Challenge(PASSWORD_PROMPT)
    assert srv.step(b"correct horse") == Lookup(PasswordCheck("alice", "correct horse"))
    assert srv.resume(True) == Success("alice", None)


def test_empty_initial_response_is_malformed() -> None:
    outcome = server().start(b"")
    assert isinstance(outcome, Failure)
    assert outcome.reason is FailureReason.MALFORMED


@pytest.mark.parametrize("initial_response", [True, False])
def test_round_trip(initial_response: bool) -> None:
    outcome = run_exchange(
        client("alice", "correct horse"), server(), resolve, initial_response=initial_response
    )
    assert outcome == Success("alice", None)


def test_unicode_round_trip() -> None:
    assert run_exchange(client("zoë", "pässwörd 密码"), server(), resolve) == Success("zoë")


def test_authzid_equal_to_username_is_allowed() -> None:
    outcome = run_exchange(client("alice", "correct horse", authzid="alice"), server(), resolve)
    assert outcome == Success("alice", None)


def test_client_refuses_authzid_it_cannot_send() -> None:
    # Dropping it would silently log in as the authcid instead.
    with pytest.raises(ValueError):
        client("master", "pw", authzid="alice")


def test_wrong_password() -> None:
    outcome = run_exchange(client("alice", "wrong"), server(), resolve)
    assert isinstance(outcome, Failure)
    assert outcome.reason is FailureReason.INVALID_CREDENTIALS


@pytest.mark.parametrize("resolver", [resolve, resolve_none_for_unknown])
def test_unknown_user(resolver: Resolver) -> None:
    outcome = run_exchange(client("mallory", "correct horse"), server(), resolver)
    assert isinstance(outcome, Failure)
    assert outcome.reason is FailureReason.INVALID_CREDENTIALS


@pytest.mark.parametrize(
    ("username", "password"),
    [
        (b"", b"s3cr3t-pw"),
        (b"al\xffice", b"s3cr3t-pw"),
        (b"al\x00ice", b"s3cr3t-pw"),
        (b"alice", b""),
        (b"alice", b"s3cr3t\xff-pw"),
        (b"alice", b"s3cr3t\x00-pw"),
    ],
)
def test_malformed_fields(username: bytes, password: bytes) -> None:
    srv = server()
    srv.start(NO_RESPONSE)
    outcome = srv.step(username)
    if isinstance(outcome, Challenge):
        outcome = srv.step(password)
    assert isinstance(outcome, Failure)
    assert outcome.reason is FailureReason.MALFORMED
    assert "s3cr3t" not in outcome.detail
    assert "alice" not in outcome.detail


# ------------------------------------------------------------- hypothesis

field = st.text(min_size=1, max_size=20).filter(lambda s: "\x00" not in s)


@given(field, field, st.booleans())
def test_any_credentials_round_trip(username: str, password: str, ir: bool) -> None:
    seen: list[LookupRequest] = []

    def lookup(request: LookupRequest) -> LookupAnswer:
        seen.append(request)
        return request == PasswordCheck(username, password)

    outcome = run_exchange(client(username, password), server(), lookup, initial_response=ir)
    assert outcome == Success(username)
    assert seen == [PasswordCheck(username, password)]



@given(
    st.one_of(st.just(NO_RESPONSE), st.binary(max_size=30)),
    st.lists(st.binary(max_size=30), max_size=4),
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
            srv.step(b"alice")
    else:
        # Ran out of replies while the server was still prompting.
        assert isinstance(outcome, Challenge)
        assert outcome.data in (USERNAME_PROMPT, PASSWORD_PROMPT)


@given(st.binary(), st.binary())
def test_client_answers_by_position_whatever_the_prompt(first: bytes, second: bytes) -> None:
    c = client("alice", "correct horse")
    assert c.start() is None
    assert c.step(first) == b"alice"
    assert c.step(second) == b"correct horse"
    with pytest.raises(ClientAuthError):
        c.step(b"Password:")


# ------------------------------------------------------------------ order


def test_step_after_success_raises() -> None:
    srv = server()
    srv.start(b"alice")
    srv.step(b"correct horse")
    assert isinstance(srv.resume(True), Success)
    with pytest.raises(SaslProtocolError):
        srv.step(b"alice")


def test_step_after_failure_raises() -> None:
    srv = server()
    srv.start(b"alice")
    srv.step(b"wrong")
    assert isinstance(srv.resume(False), Failure)
    with pytest.raises(SaslProtocolError):
        srv.step(b"alice")
    with pytest.raises(SaslProtocolError):
        srv.resume(True)


def test_out_of_order_calls_raise() -> None:
    srv = server()
    with pytest.raises(SaslProtocolError):
        srv.step(b"alice")
    srv.start(NO_RESPONSE)
    with pytest.raises(SaslProtocolError):
        srv.start(NO_RESPONSE)
    with pytest.raises(SaslProtocolError):
        srv.resume(True)
    srv.step(b"alice")
    srv.step(b"pw")
    with pytest.raises(SaslProtocolError):
        srv.step(b"pw")  # waiting for the lookup answer


def test_non_bool_answer_is_a_driver_bug() -> None:
    srv = server()
    srv.start(b"alice")
    srv.step(b"pw")
    with pytest.raises(SaslProtocolError):
        srv.resume("pw")


# ----------------------------------------------------------------- client


def test_client_out_of_order() -> None:
    c = client("alice", "pw")
    with pytest.raises(SaslProtocolError):
        c.step(USERNAME_PROMPT)
    with pytest.raises(SaslProtocolError):
        c.finish(None)
    c.start()
    with pytest.raises(SaslProtocolError):
        c.start()
    c.finish(None)
    with pytest.raises(SaslProtocolError):
        c.step(PASSWORD_PROMPT)


def test_client_rejects_additional_data_on_success() -> None:
    c = client("alice", "pw")
    c.start()
    with pytest.raises(ClientAuthError):
        c.finish(b"extra")


@pytest.mark.parametrize(("username", "password"), [("", "pw"), ("alice", ""), ("a\x00", "pw")])
def test_client_rejects_unusable_credentials(username: str, password: str) -> None:
    with pytest.raises(ValueError):
        client(username, password)


def test_password_over_the_cap_is_refused_before_any_lookup() -> None:
    srv = server()
    assert srv.start(b"alice") == Challenge(PASSWORD_PROMPT)
    outcome = srv.step(("é" * 513).encode())  # 1,026 octets
    assert outcome == Failure(FailureReason.TOO_LONG, "LOGIN password is longer than 1024 octets")
    srv = server()
    srv.start(b"alice")
    at_cap = "x" * MAX_PASSWORD_OCTETS
    assert srv.step(at_cap.encode()) == Lookup(PasswordCheck("alice", at_cap))


def test_a_store_verdict_names_the_user() -> None:
    srv = server()
    srv.start(b"ALICE")
    srv.step(b"pw")
    assert srv.resume(PasswordVerdict(True, "alice")) == Success("alice")
