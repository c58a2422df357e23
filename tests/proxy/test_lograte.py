"""LogThrottle: one warning per kind per interval, the rest counted."""

from __future__ import annotations

import logging

import pytest

from authgate.proxy.lograte import LogThrottle

log = logging.getLogger("authgate.test-lograte")


def test_one_line_per_kind_per_interval_and_the_rest_counted(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    throttle = LogThrottle(10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger=log.name):
        assert throttle.warning(log, "imap:cap", "refused %s", "192.0.2.1")
        for _ in range(500):
            assert not throttle.warning(log, "imap:cap", "refused %s", "192.0.2.1")
        assert throttle.warning(log, "pop3:cap", "refused %s", "192.0.2.2")  # another kind
        now[0] += 10.0
        assert throttle.warning(log, "imap:cap", "refused %s", "192.0.2.3")
        now[0] += 30.0
        assert throttle.warning(log, "imap:cap", "refused %s", "192.0.2.4")
    assert [r.getMessage() for r in caplog.records] == [
        "refused 192.0.2.1",
        "refused 192.0.2.2",
        "refused 192.0.2.3 (500 more like it since the previous such line)",
        "refused 192.0.2.4",
    ]
