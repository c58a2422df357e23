"""Reading the log a server under test appends to, from an offset, so a test
sees only the lines it caused (Dovecot, Postfix and `authgate run` alike)."""

from __future__ import annotations

from pathlib import Path


class AppendedLog:
    """For classes with a `log_path` (a field or a property)."""

    log_path: Path

    def log_size(self) -> int:
        """The log's length now: the offset to read from later."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_text(self, since: int = 0) -> str:
        """The log from offset `since` on ("" before the server wrote any)."""
        try:
            with self.log_path.open("rb") as handle:
                handle.seek(since)
                return handle.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""
