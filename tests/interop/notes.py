"""What the `*_notes.py` modules (the docs/interop.md sections written after
the mail matrix) share: reading a program's version, and putting the version
line under a section's heading."""

from __future__ import annotations

import subprocess


def program_version(command: list[str]) -> str:
    """The first line `command` prints (stdout, else stderr), or why there is none."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "not installed"
    first = (done.stdout or done.stderr).strip().splitlines()
    return first[0].strip() if first else "unknown"


def with_versions(section: list[str], versions: str) -> list[str]:
    """`section` (a heading, a blank line, then the text) with `versions` as
    its own paragraph after the heading, and a blank line at the end."""
    return [*section[:2], versions, "", *section[2:], ""]
