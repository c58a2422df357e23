"""One login record per outcome, from a real `authgate run`: the fields are
fixed and the same in text and JSON; behind PROXY `client` is the real
client and `proxy` the balancer; no password ever appears. The log these
tests write is also what the fail2ban filter is checked against
(test_fail2ban.py)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from authgate import config as config_mod
from authgate.errors import ConfigError
from authgate.logs import LOGIN_FIELDS, TEXT_FORMAT, JsonFormatter, LogFormat, TextFormatter
from tests.ops.process import PASSWORD, Authgate
from tests.ops.scenario import FAKE_USER, WRONG


def login_records(text: str) -> list[dict[str, object]]:
    return [r for r in map(json.loads, text.splitlines()) if r.get("event") == "login"]


@pytest.mark.asyncio(loop_scope="session")
async def test_json_records_have_the_fixed_fields(json_log: tuple[Authgate, str]) -> None:
    _, text = json_log
    records = login_records(text)
    for record in records:
        assert set(LOGIN_FIELDS) <= set(record), record
        assert record["logger"] == "authgate.login"
    outcomes = {(r["client"], r["outcome"], r["reason"]) for r in records}
    for client in ("127.0.0.2", "203.0.113.7", "2001:db8::7", "::1"):
        assert (client, "failed", "invalid-credentials") in outcomes
        assert any(c == client and o == "refused" for c, o, _ in outcomes), client
        assert any(c == client and o == "blocked" for c, o, _ in outcomes), client
    ok = [r for r in records if r["outcome"] == "ok"]
    assert {r["client"] for r in ok} == {"127.0.0.9", "198.51.100.9", "::1"}
    for r in ok:
        assert r["user"] == "alice" and r["mechanism"] == "CRAM-MD5"
        assert r["backend"] is not None and str(r["backend"]).startswith("127.0.0.1:")
        assert isinstance(r["duration_ms"], int)
    behind = [r for r in records if r["listener"] == "balanced"]
    assert behind and all(r["proxy"] == "127.0.0.1" for r in behind)
    assert all(r["proxy"] is None for r in records if r["listener"] == "imap")
    # Every line of the log is one JSON object.
    assert all(line.startswith("{") for line in text.splitlines())


@pytest.mark.asyncio(loop_scope="session")
async def test_text_records_one_line_each(text_log: tuple[Authgate, str]) -> None:
    _, text = text_log
    lines = [line for line in text.splitlines() if line.split(" ")[3:4] == ["authgate.login:"]]
    assert len(lines) == 3 + 4 * 4  # 3 logins; per attacker a refusal, 2 failures, a block
    for line in lines:
        if FAKE_USER[:2] in line:  # the quoted user name has spaces of its own
            assert json.dumps(FAKE_USER) in line
            continue
        names = [part.split("=", 1)[0] for part in line.split(" login ", 1)[1].split(" ")]
        assert tuple(names) == LOGIN_FIELDS, line


@pytest.mark.asyncio(loop_scope="session")
async def test_no_password_in_either_log(
    text_log: tuple[Authgate, str], json_log: tuple[Authgate, str]
) -> None:
    for _, text in (text_log, json_log):
        assert PASSWORD not in text and WRONG not in text


def test_log_settings_are_validated(tmp_path: Path) -> None:
    path = tmp_path / "authgate.toml"
    path.write_text('log_format = "xml"\n[users]\nfile = "u.toml"\n')
    with pytest.raises(ConfigError, match=r"log_format: 'xml' is not one of text \| json"):
        config_mod.load(path)
    path.write_text('log_format = "json"\nlog_level = "warning"\n[users]\nfile = "u.toml"\n')
    config = config_mod.load(path)
    assert config.log_format is LogFormat.JSON and config.log_level.number == logging.WARNING


def test_json_formatter_keeps_a_traceback_on_one_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("authgate", logging.ERROR, __file__, 1, "bad %s", ("x",), sys.exc_info())
    line = JsonFormatter().format(record)
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["message"] == "bad x" and "ValueError: boom" in parsed["traceback"]


def test_text_formatter_writes_what_the_standard_formatter_writes() -> None:
    # TextFormatter is TEXT_FORMAT put together by hand, with each second's
    # time text made once: the same lines, across seconds, with a traceback.
    ours, standard = TextFormatter(), logging.Formatter(TEXT_FORMAT)
    try:
        raise ValueError("boom")
    except ValueError:
        failed = sys.exc_info()
    start = 1_765_000_000.0
    for offset, exc_info in ((0.0, None), (0.25, None), (0.999, failed), (1.0, None), (61.5, None)):
        record = logging.LogRecord("authgate.login", logging.WARNING, "", 0, "%s", ("a b",), exc_info)
        record.created = start + offset
        record.msecs = (record.created - int(record.created)) * 1000
        twin = logging.makeLogRecord(record.__dict__)
        twin.exc_text = None
        assert ours.format(record) == standard.format(twin)
    assert ours.formatTime(record, "%H") == standard.formatTime(record, "%H")
