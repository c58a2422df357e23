"""The proxy's side of the audit log: sessions note events without
blocking; one worker appends them in order, off the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque

from authgate.audit import AuditLog

log = logging.getLogger("authgate.audit")

QUEUE_LIMIT = 10_000  # events waiting to be written; beyond it they are counted and dropped
RECENT = 50  # the last events kept in memory for the status page, with or without a log


class AuditTrail:
    """Non-blocking front of an AuditLog (or of nothing, when none is set)."""

    def __init__(self, audit_log: AuditLog | None) -> None:
        self._log = audit_log
        self._queue: asyncio.Queue[tuple[str, dict[str, str | int | None]]] = asyncio.Queue(
            QUEUE_LIMIT
        )
        self._worker: asyncio.Task[None] | None = None
        self.dropped = 0
        # (time, event, fields), newest last: what the status page shows.
        self.counts: dict[str, int] = {}  # events noted, by name
        self.recent: deque[tuple[float, str, dict[str, str | int | None]]] = deque(maxlen=RECENT)

    def start(self) -> None:
        if self._log is not None and self._worker is None:
            self._worker = asyncio.ensure_future(self._write_forever())

    def note(self, event: str, **fields: str | int | None) -> None:
        self.recent.append((time.time(), event, fields))
        self.counts[event] = self.counts.get(event, 0) + 1
        if self._log is None:
            return
        try:
            self._queue.put_nowait((event, fields))
        except asyncio.QueueFull:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.error("audit log is not keeping up: %d event(s) dropped", self.dropped)

    async def _write_forever(self) -> None:
        assert self._log is not None
        while True:
            event, fields = await self._queue.get()
            try:
                await asyncio.to_thread(self._log.record, event, **fields)
            except Exception as exc:  # a full disk must not stop authentication
                log.error("cannot write the audit log: %s", exc)
            finally:
                self._queue.task_done()

    async def close(self) -> None:
        """Write what is queued (a few seconds at most), then stop."""
        if self._worker is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), 5)
        self._worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._worker
        self._worker = None
