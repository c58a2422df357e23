"""The shipped fail2ban filter (examples/fail2ban/filter.d/authgate.conf),
run by the real `fail2ban-regex` over logs a real `authgate run` wrote
(tests/ops/conftest.py): every failed login, policy refusal and block is
found with the real client's address (IPv4, IPv6, behind PROXY); no login
is; a user name dressed up as a record's fields bans nobody."""

from __future__ import annotations

import collections
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.ops.process import Authgate
from tests.ops.scenario import INJECTED

ROOT = Path(__file__).resolve().parents[2]
FILTER = ROOT / "examples/fail2ban/filter.d/authgate.conf"
JAIL = ROOT / "examples/fail2ban/jail.d/authgate.conf"
ATTACKERS = {"127.0.0.2", "203.0.113.7", "2001:db8::7", "::1"}


def fail2ban_regex(log: Path) -> collections.Counter[str]:
    """The addresses fail2ban would count, one per matched line."""
    tool = shutil.which("fail2ban-regex")
    assert tool, "fail2ban-regex is missing: install Debian's fail2ban (./dev test does)"
    out = subprocess.run(
        [tool, "--raw", "-o", "ip", str(log), str(FILTER)],
        capture_output=True, text=True, timeout=60, check=True,
    )
    return collections.Counter(out.stdout.split())


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("form", ["text", "json"])
async def test_filter_finds_every_failure_and_no_login(
    form: str, text_log: tuple[Authgate, str], json_log: tuple[Authgate, str]
) -> None:
    gate, _ = text_log if form == "text" else json_log
    found = fail2ban_regex(gate.log_path)
    # Per attacker: a refusal, two wrong passwords, a block.
    assert found == {address: 4 for address in ATTACKERS}
    assert INJECTED not in found
    # The logins (127.0.0.9, the PROXY client 198.51.100.9, and ::1 before
    # it was blocked) are in the log and were not matched.
    text = gate.log_text()
    assert "outcome=ok listener=imap client=127.0.0.9 " in text
    assert "outcome=ok listener=balanced client=198.51.100.9 " in text
    assert "outcome=ok listener=imap client=::1 " in text


def test_jail_names_the_filter() -> None:
    text = JAIL.read_text()
    assert "filter   = authgate" in text and "[authgate]" in text
