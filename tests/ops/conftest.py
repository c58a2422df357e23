"""The operations tests' shared processes: one `authgate run` per log
format, exercised once (tests.ops.test_login_records.exercise), read by
the login-record and the fail2ban tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.ops.process import Authgate, authgate_run, base_toml, listeners_toml
from tests.ops.scenario import exercise

DEFENCE = """
[defence]
failure_delay = 0
penalties = [0]
block_after = 2
block_window = 600
block_for = 600
"""


async def _run(tmp: Path, fmt: str) -> AsyncIterator[tuple[Authgate, str]]:
    def make(tmp: Path, backends: object) -> str:
        return base_toml(tmp, f'log_format = "{fmt}"') + DEFENCE + listeners_toml(
            backends.imap.port  # type: ignore[attr-defined]
        )

    async with authgate_run(tmp, make) as gate:
        await exercise(gate)
        # The last record: the block of ::1.
        await gate.wait_log("outcome=blocked listener=imap client=::1 ")
        yield gate, gate.log_text()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def text_log(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[Authgate, str]]:
    async for item in _run(tmp_path_factory.mktemp("text"), "text"):
        yield item


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def json_log(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[Authgate, str]]:
    async for item in _run(tmp_path_factory.mktemp("json"), "json"):
        yield item


