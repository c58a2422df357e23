"""The README's first command: `authgate demo` starts, and every curl
command it prints behaves as printed (real curl, real TLS)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.interop

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if shutil.which("curl") is None:
        pytest.fail("curl is missing: run ./dev test as root to install it")
    certs = tmp_path_factory.mktemp("demo-certs")
    proc = subprocess.Popen(
        [sys.executable, "-m", "authgate", "demo", "--certs", str(certs)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    printed = ""
    deadline = time.monotonic() + 60
    while "Stop with Ctrl-C." not in printed:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            pytest.fail(f"the demo exited: {proc.stderr.read() if proc.stderr else ''}")
        printed += line
        assert time.monotonic() < deadline, "the demo did not start in time"
    try:
        yield printed
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0


def commands(printed: str) -> list[tuple[str, str]]:
    """(comment, shell command) for every numbered example the demo prints."""
    found = []
    for block in re.split(r"\n\s*\n", printed):
        lines = block.strip().splitlines()
        if not lines or not re.match(r"# \d\.", lines[0]):
            continue
        shell = "\n".join(lines[1:])
        for part in re.split(r"\n(?=\s*(?:curl|printf))", shell):
            found.append((lines[0], part.strip()))
    return found


def run(command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "CURL_HOME": "/nonexistent"},
    )


def test_demo_prints_the_layout(demo: str) -> None:
    for port in ("10143", "10993", "10110", "10995", "10587", "10465", "14190"):
        assert port in demo
    assert "alice-demo-pw" in demo and "127.0.0.2/32" in demo


def test_every_printed_curl_command_behaves_as_printed(demo: str) -> None:
    examples = commands(demo)
    assert len(examples) >= 7
    for comment, command in examples:
        result = run(command)
        if "refused" in comment:
            assert result.returncode == 67, (command, result.stderr)  # CURLE_LOGIN_DENIED
            continue
        assert "accepted" in comment
        assert result.returncode == 0, (command, result.stderr)
        if "UID=1" in command or "pop3s://" in command:
            assert "Welcome to the authgate demo" in result.stdout, command
        if "lists INBOX" in comment or "exempt address" in comment:
            assert "INBOX" in result.stdout, command
