"""Python's imaplib, poplib, smtplib, curl and GNU SASL's gsasl against every hostile-server
scenario (tests/testing/hostile_clients.py drives them and judges each
run). Cells measured unsafe are asserted unsafe, every other cell safe:
docs/clients.md, generated from the same runs, stays true."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from authgate.testing import scenarios
from authgate.testing.stack import Stack
from tests.testing import hostile_clients


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """One stack for the scenarios that only rewrite the dialogue
    (Stack.play switches them); the bad-certificate ones start their own."""
    async with hostile_clients.start_stack(tmp_path_factory.mktemp("hostile")) as stack:
        yield stack


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("scenario", list(scenarios.SCENARIOS))
async def test_real_clients_against(scenario: str, tmp_path: Path, shared_stack: Stack) -> None:
    runs = await hostile_clients.run_scenario(scenario, tmp_path, shared_stack)
    expected = {
        client
        for client, (protocol, _) in hostile_clients.CLIENTS.items()
        if protocol in scenarios.SCENARIOS[scenario].protocols
    }
    assert {run.client for run in runs} == expected
    for run in runs:
        safe, note = hostile_clients.verdict(run)
        where = f"{run.client} in {scenario}: {note}; {run.result.detail}"
        if (scenario, run.client) in hostile_clients.EXPECTED_UNSAFE:
            assert safe is False, (
                "no longer unsafe (update EXPECTED_UNSAFE, docs/clients.md): " + where
            )
        else:
            assert safe is not False, where
            # the password never crossed in the clear, whatever the client did
            for transcript in run.transcripts:
                transcript.assert_no_secret_before_tls(hostile_clients.PASSWORD)


def test_docs_table_is_the_measured_one() -> None:
    """docs/clients.md names every scenario and every unsafe cell."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "clients.md").read_text()
    for name in scenarios.SCENARIOS:
        assert f"| `{name}` |" in text, name
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    unsafe = sum(row.count("**UNSAFE**") for row in rows)
    assert unsafe == len(hostile_clients.EXPECTED_UNSAFE)
