"""The gateway, limit and splice tests run on both event loops authgate
can serve on (`event_loop` in the config): asyncio's and uvloop's."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest
import uvloop

# Modules whose every test runs once per loop; the others use asyncio's only.
BOTH_LOOPS = {"test_gateway", "test_limits", "test_splice", "test_dual_stack", "test_alpn", "test_tls_eof"}


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    module = getattr(item, "module", None)
    if module is not None and module.__name__.rpartition(".")[2] in BOTH_LOOPS:
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}  # one factory: test ids unchanged
