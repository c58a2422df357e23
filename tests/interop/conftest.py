"""Fixtures for the interop tests: a real Dovecot on loopback.

`dovecot` (plain, `ssl = no`) and `dovecot_tls` (`ssl = yes` with a trustme
certificate: STARTTLS on the plain ports plus implicit-TLS ports) are
session-scoped and synchronous: each costs a fraction of a second to start.
When Dovecot is missing or cannot start, the fixture errors (never skips) with
the reason and Dovecot's own log.

A failing test that used one of them gets the part of Dovecot's log written
during that test attached to its report ("dovecot log" section).
"""

from __future__ import annotations

from collections.abc import Generator, Iterator

import pytest

from tests.interop.dovecot import DovecotInstance, start_dovecot

_MARKS = pytest.StashKey[dict[str, tuple[DovecotInstance, int]]]()


@pytest.fixture(scope="session")
def dovecot() -> Iterator[DovecotInstance]:
    """A running Dovecot without TLS (imap/pop3/submission + haproxy listeners)."""
    with start_dovecot() as instance:
        yield instance


@pytest.fixture(scope="session")
def dovecot_tls() -> Iterator[DovecotInstance]:
    """A running Dovecot with TLS: STARTTLS on imap/pop3/submission, and
    implicit TLS on imaps/pop3s/submissions; `client_ssl_context()` trusts it."""
    with start_dovecot(tls=True) as instance:
        yield instance


@pytest.fixture(scope="session")
def dovecot_sieve() -> Iterator[DovecotInstance]:
    """A running Dovecot with TLS and ManageSieve (dovecot-managesieved):
    `sieve` offers STARTTLS, `sieve_haproxy` takes a PROXY header."""
    with start_dovecot(tls=True, sieve=True) as instance:
        yield instance


@pytest.fixture(autouse=True)
def _dovecot_log_mark(request: pytest.FixtureRequest) -> None:
    # Only for tests that use an instance: never start Dovecot just for this.
    marks: dict[str, tuple[DovecotInstance, int]] = {}
    for name in ("dovecot", "dovecot_tls", "dovecot_sieve", "dovecot_oauth"):
        if name in request.fixturenames:
            instance: DovecotInstance = request.getfixturevalue(name)
            marks[name] = (instance, instance.log_size())
    request.node.stash[_MARKS] = marks


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call" and report.failed:
        for name, (instance, since) in item.stash.get(_MARKS, {}).items():
            text = instance.log_text(since)
            report.sections.append((f"{name} log", text[-8000:] or "(empty)"))
    return report


# -- the interop matrix (tests/interop/test_matrix.py) --------------------------


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the matrix after a run that executed any of it; rewrite
    docs/interop.md only when every cell ran (a `-k` subset must not replace
    the committed table with a partial one)."""
    from tests.interop import matrix

    if not matrix.RESULTS:
        return
    terminalreporter.write_sep("=", "authgate interop matrix")
    for line in matrix.table_lines():
        terminalreporter.write_line(line)
    terminalreporter.write_line("")
    for line in matrix.summary_lines():
        terminalreporter.write_line(line)
    if matrix.complete():
        path = matrix.write_docs()
        terminalreporter.write_line(f"matrix written to {path}")
    else:
        terminalreporter.write_line(
            f"partial run ({len(matrix.RESULTS)} of {len(matrix.all_cases())} cells): "
            f"{matrix.DOCS_PATH} left unchanged"
        )
