"""Warnings an attacker can cause, rate-limited so a flood cannot fill the disk.

A refused connection, a bad PROXY header or a failed accept() is worth a
warning, but each costs the sender one connect: logged every time, a single
host writes megabytes a second. `LogThrottle` lets one line per kind through
per interval and counts the rest into the next line that gets through.
Kinds are a small fixed set (listener name + reason), never an address, so
the throttle's own memory is bounded too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

LOG_INTERVAL = 10.0  # seconds between two warnings of one kind


class LogThrottle:
    def __init__(
        self, interval: float = LOG_INTERVAL, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = interval
        self._clock = clock
        # kind -> [time the next line may be written, lines held back since the last]
        self._kinds: dict[str, list[float]] = {}

    def warning(self, logger: logging.Logger, kind: str, message: str, *args: object) -> bool:
        """Log `message % args` at WARNING unless a line of `kind` was written
        less than `interval` seconds ago; True if it was written."""
        now = self._clock()
        entry = self._kinds.get(kind)
        if entry is not None and now < entry[0]:
            entry[1] += 1
            return False
        held = int(entry[1]) if entry is not None else 0
        if held:
            message += " (%d more like it since the previous such line)"
            args = (*args, held)
        logger.warning(message, *args)
        self._kinds[kind] = [now + self.interval, 0]
        return True
