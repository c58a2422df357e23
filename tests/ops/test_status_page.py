"""The status page (`/` on the metrics listener) of a real `authgate run`,
loaded in a real headless Chromium (Debian chromium): the DOM lists the
listeners with their four policy cells and the block this test caused, a
hostile user name in the audit events stays text, and nothing outside the
page is loaded. The screenshot is kept in test-artefacts/status-page.png
(or $AUTHGATE_TEST_ARTEFACTS)."""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest

from authgate.config import Address
from authgate.defence import DefenceSettings
from authgate.proxy.admin import AdminServer
from authgate.proxy.server import Gateway
from authgate.testing.backends import Backends
from tests.ops.http import http_get
from tests.ops.process import Imap, authgate_run, base_toml, listeners_toml
from tests.ops.scenario import WRONG

ROOT = Path(__file__).resolve().parents[2]
ARTEFACTS = Path(os.environ.get("AUTHGATE_TEST_ARTEFACTS", ROOT / "test-artefacts"))
HOSTILE = "<img src=x onerror=alert(1)>"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
)


def chromium(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("chromium")
    assert binary, "chromium is missing: install Debian's chromium (./dev test does)"
    with tempfile.TemporaryDirectory(prefix="authgate-chromium-") as profile:
        return subprocess.run(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True, text=True, timeout=120, check=False,
        )


class Dom(HTMLParser):
    """The elements Chromium serialised, as (tag, attributes) and their text."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


@pytest.mark.asyncio
async def test_status_page_in_chromium(tmp_path: Path) -> None:
    def make(tmp: Path, backends: Backends) -> str:
        text = base_toml(tmp, '[metrics]\nlisten = "127.0.0.1:0"\n').replace(
            "[policy]\n", '[policy]\nexempt_networks = ["10.9.0.0/16"]\n'
        )
        defence = "[defence]\nfailure_delay = 0\npenalties = [0]\nblock_after = 2\nblock_for = 3600\n"
        return text + defence + listeners_toml(backends.imap.port)

    async with authgate_run(tmp_path, make) as gate:
        text = await gate.wait_log("metrics: listening on ")
        port = int(text.split("metrics: listening on ", 1)[1].split()[0].rsplit(":", 1)[1])
        # A guesser gets blocked; a hostile user name reaches the audit events.
        client = await Imap.open(gate.ports["imap"], local="127.0.4.9")
        assert (await client.command("r", f'LOGIN "{HOSTILE}" {WRONG}'))[-1].startswith(b"r NO")
        for _ in range(2):
            assert (await client.cram_md5("alice", WRONG)).startswith(b"c NO")
        client.close()
        assert b"BYE" in (await Imap.open(gate.ports["imap"], local="127.0.4.9")).greeting

        status, headers, _ = await http_get("127.0.0.1", port, "/")
        assert status == 200 and headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in headers["content-security-policy"]
        url = f"http://127.0.0.1:{port}/"
        dumped = await asyncio.to_thread(chromium, "--dump-dom", url)
        assert dumped.returncode == 0, dumped.stderr[-2000:]
        dom = Dom()
        dom.feed(dumped.stdout)
        listeners = {a.get("data-name") for t, a in dom.elements if t == "tr" and a.get("class") == "listener"}
        assert listeners == {"imap", "balanced"}
        blocks = {a.get("data-network") for t, a in dom.elements if t == "tr" and a.get("class") == "block"}
        assert blocks == {"127.0.4.9/32"}
        assert any(t == "svg" and a.get("id") == "activity" for t, a in dom.elements)
        assert sum(1 for t, a in dom.elements if t == "polyline") == 2
        logins = next(a for t, a in dom.elements if t == "polyline" and a.get("class") == "logins")
        assert len(set(str(logins["points"]).split())) > 1  # this minute's 3 attempts show
        # The policy cells: require-secure-auth outside, CRAM-MD5 only before TLS; exempt: all.
        text = " ".join(dom.text)
        assert "CRAM-MD5 LOGIN PLAIN login command" in text  # inside TLS, and exempt
        assert "not exempt, no TLS" in text
        # The hostile user name is text in the events, never an element.
        assert HOSTILE in text
        assert not any(t == "img" for t, _ in dom.elements)
        assert not any(t in ("script", "link", "iframe") for t, _ in dom.elements)

        ARTEFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTEFACTS / "status-page.png"
        shot.unlink(missing_ok=True)
        done = await asyncio.to_thread(chromium, f"--screenshot={shot}", "--window-size=1400,1300", url)
        assert done.returncode == 0, done.stderr[-2000:]
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


@pytest.mark.asyncio
async def test_who_may_see_the_page() -> None:
    gateway = Gateway([], DefenceSettings())
    open_page = AdminServer(gateway, None, Address("127.0.0.1", 0))
    assert open_page.authorized("127.0.0.1", {}) is None
    assert open_page.authorized("::1", {}) is None
    refused = open_page.authorized("192.0.2.5", {})
    assert refused is not None and refused.status == 403
    locked = AdminServer(gateway, None, Address("127.0.0.1", 0), status_password="s3cret")
    missing = locked.authorized("127.0.0.1", {})
    assert missing is not None and missing.status == 401 and "WWW-Authenticate" in missing.headers
    def basic(pw: str) -> dict[str, str]:
        return {"authorization": "Basic " + base64.b64encode(f"admin:{pw}".encode()).decode()}
    wrong = locked.authorized("192.0.2.5", basic("nope"))
    assert wrong is not None and wrong.status == 401
    assert locked.authorized("192.0.2.5", basic("s3cret")) is None
    garbage = locked.authorized("127.0.0.1", {"authorization": "Basic ***"})
    assert garbage is not None and garbage.status == 401
