"""The stage guard every mechanism shares: a call out of order raises a
StageError that names the call the exchange expected."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from authgate.sasl import MECHANISMS, MechanismInfo
from authgate.sasl.base import (
    NO_RESPONSE,
    Call,
    ClientContext,
    ClientCredentials,
    ClientMechanism,
    Derive,
    Lookup,
    SaslProtocolError,
    ServerContext,
    ServerMechanism,
    Stage,
    StageError,
    Success,
    run_exchange,
)
from authgate.sasl.scram import ScramSHA256Client, ScramSHA256Server
from authgate.testing.kit import bearer_token, store, to_first_lookup

BINDING = ("tls-server-end-point", b"\x07" * 32)
ALL = sorted(MECHANISMS)


def machines(info: MechanismInfo) -> tuple[ServerMechanism, ClientMechanism]:
    binding = BINDING if info.channel_binding else None
    # EXTERNAL's identity comes from a client certificate, below SASL.
    external = "alice" if info.external else None
    server = info.server(ServerContext(channel_binding=binding, external_identity=external))
    password = bearer_token("correct horse") if info.bearer else "correct horse"
    client = info.client(
        ClientCredentials("alice", password), ClientContext(channel_binding=binding)
    )
    return server, client


def refused(
    call: Call, expected: tuple[Call, ...], excinfo: pytest.ExceptionInfo[StageError]
) -> None:
    assert excinfo.value.call is call
    assert excinfo.value.expected == expected
    message = str(excinfo.value)
    if expected:
        for name in expected:
            assert f"expected {name.value}" in message or f"or {name.value}" in message
    else:
        assert "after the exchange ended" in message


def test_the_error_names_the_expected_call() -> None:
    stage = Stage("X server")
    with pytest.raises(
        StageError, match=r"^X server: step\(\) called out of order, expected start\(\)$"
    ):
        stage.check(Call.STEP)
    stage.expect(Call.STEP, Call.FINISH, what="the challenge")
    stage.check(Call.FINISH)
    with pytest.raises(
        StageError,
        match=r"resume\(\) called out of order, expected step\(\) or finish\(\) \(the challenge\)",
    ):
        stage.check(Call.RESUME)
    stage.end()
    assert stage.ended and not stage.awaits("the challenge")
    with pytest.raises(StageError, match=r"start\(\) called after the exchange ended"):
        stage.check(Call.START)
    assert issubclass(StageError, SaslProtocolError)


@pytest.mark.parametrize("name", ALL)
def test_server_step_or_resume_before_start(name: str) -> None:
    server, _ = machines(MECHANISMS[name])
    with pytest.raises(StageError) as excinfo:
        server.step(b"")
    refused(Call.STEP, (Call.START,), excinfo)
    with pytest.raises(StageError) as excinfo:
        server.resume(None)
    refused(Call.RESUME, (Call.START,), excinfo)


# EXTERNAL asks no store: it has no lookup to be out.
@pytest.mark.parametrize("name", [n for n in ALL if not MECHANISMS[n].external])
def test_server_step_while_a_lookup_is_out(name: str) -> None:
    server, client = machines(MECHANISMS[name])
    _, outcome = to_first_lookup(client, server)
    assert isinstance(outcome, Lookup)
    with pytest.raises(StageError) as excinfo:
        server.step(b"")
    refused(Call.STEP, (Call.RESUME,), excinfo)
    with pytest.raises(StageError) as excinfo:
        server.start(NO_RESPONSE)
    refused(Call.START, (Call.RESUME,), excinfo)


@pytest.mark.parametrize("name", ALL)
def test_every_call_after_the_exchange_ended(name: str) -> None:
    server, client = machines(MECHANISMS[name])
    assert isinstance(run_exchange(client, server, store()), Success)
    pokes: list[tuple[Call, Callable[[], object]]] = [
        (Call.START, lambda: server.start(NO_RESPONSE)),
        (Call.STEP, lambda: server.step(b"")),
        (Call.RESUME, lambda: server.resume(True)),
    ]
    for call, poke in pokes:
        with pytest.raises(StageError) as excinfo:
            poke()
        refused(call, (), excinfo)


@pytest.mark.parametrize("name", ALL)
def test_client_step_or_finish_before_start(name: str) -> None:
    _, client = machines(MECHANISMS[name])
    with pytest.raises(StageError) as excinfo:
        client.step(b"")
    refused(Call.STEP, (Call.START,), excinfo)
    with pytest.raises(StageError) as excinfo:
        client.finish(None)
    refused(Call.FINISH, (Call.START,), excinfo)


# NTLM's client may be told of the success twice: it has nothing to check,
# and test_ntlm pins that a second finish() passes.
@pytest.mark.parametrize("name", [n for n in ALL if n != "NTLM"])
def test_client_calls_after_its_finish(name: str) -> None:
    server, client = machines(MECHANISMS[name])
    assert isinstance(run_exchange(client, server, store()), Success)
    with pytest.raises(StageError) as excinfo:
        client.finish(None)
    refused(Call.FINISH, (), excinfo)
    with pytest.raises(StageError) as excinfo:
        client.start()
    refused(Call.START, (), excinfo)


def test_scram_client_waits_for_its_derivation() -> None:
    client = ScramSHA256Client(ClientCredentials("alice", "correct horse"), ClientContext())
    server = ScramSHA256Server(ServerContext())
    outcome = server.start(client.start())
    assert isinstance(outcome, Lookup)
    challenge = server.resume(store()(outcome.request))
    derive = client.step(challenge.data)  # type: ignore[union-attr]
    assert isinstance(derive, Derive)
    pokes: list[tuple[Call, Callable[[], object]]] = [
        (Call.STEP, lambda: client.step(b"v=AAAA")),
        (Call.FINISH, lambda: client.finish(None)),
    ]
    for call, poke in pokes:
        with pytest.raises(StageError, match=r"expected Derive\.finish\(\)") as excinfo:
            poke()
        refused(call, (Call.DERIVED,), excinfo)
    final = derive.run()
    with pytest.raises(StageError) as excinfo:
        derive.run()  # once only
    refused(Call.DERIVED, (Call.STEP, Call.FINISH), excinfo)
    outcome = server.step(final)
    assert isinstance(outcome, Success)
    client.finish(outcome.additional)
