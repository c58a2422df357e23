"""[metrics]: /metrics, /healthz and /readyz of a real `authgate run`,
scraped over HTTP; with `workers = 2` every scrape sees every worker's
counts (whichever worker answers it)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from authgate.metrics import METRIC_NAMES
from authgate.testing.backends import Backends
from tests.netutil import free_port
from tests.ops.http import http_get
from tests.ops.process import PASSWORD, Imap, authgate_run, base_toml, listeners_toml
from tests.ops.scenario import WRONG

pytestmark = pytest.mark.asyncio

DEFENCE = "[defence]\nfailure_delay = 0\npenalties = [0.01]\nblock_after = 50\n"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


async def settled_readyz(port: int) -> tuple[int, bytes]:
    """/readyz once the first backend probes have answered."""
    for _ in range(100):
        status, _, body = await http_get("127.0.0.1", port, "/readyz")
        if b"not reached yet" not in body:
            return status, body
        await asyncio.sleep(0.05)
    raise AssertionError(f"/readyz never settled: {body!r}")


async def test_metrics_add_up_over_two_workers(tmp_path: Path) -> None:
    port = free_port()

    def make(tmp: Path, backends: Backends) -> str:
        extra = f'workers = 2\n[metrics]\nlisten = "127.0.0.1:{port}"\n'
        return base_toml(tmp, extra) + DEFENCE + listeners_toml(backends.imap.port, proxy=False)

    async with authgate_run(tmp_path, make, names=("imap",)) as gate:
        await gate.wait_log("2 workers started")
        for _ in range(200):  # each worker binds the metrics port too (SO_REUSEPORT)
            if gate.log_text().count("metrics: listening on") == 2:
                break
            await asyncio.sleep(0.05)
        status, _, body = await http_get("127.0.0.1", port, "/healthz")
        assert (status, body) == (200, b"ok\n")
        assert await settled_readyz(port) == (200, b"ready\n")
        imap = gate.ports["imap"]
        # Spread over the workers by the kernel (SO_REUSEPORT): 8 logins, 5 wrong passwords.
        for i in range(8):
            client = await Imap.open(imap, local=f"127.0.1.{i + 1}")
            assert (await client.cram_md5("alice", PASSWORD)).startswith(b"c OK")
            assert (await client.command("s", "SELECT INBOX"))[-1].startswith(b"s OK")
            await client.command("l", "LOGOUT")
            client.close()
        for i in range(5):
            client = await Imap.open(imap, local=f"127.0.2.{i + 1}")
            assert (await client.cram_md5("alice", WRONG)).startswith(b"c NO")
            reply = await client.command("r", f"LOGIN alice {WRONG}")  # cleartext before TLS: refused
            assert reply[-1].startswith(b"r NO")
            client.close()
        await gate.wait_log("session ended (")
        # Every scrape, whichever worker answers, counts all of them.
        for _ in range(6):
            status, headers, body = await http_get("127.0.0.1", port, "/metrics")
            assert status == 200 and headers["content-type"].startswith("text/plain")
            found = samples(body.decode())
            assert value(found, "authgate_logins_total", listener="imap", mechanism="CRAM-MD5", outcome="ok") == 8
            assert value(found, "authgate_logins_total", listener="imap", mechanism="CRAM-MD5", outcome="failed") == 5
            assert value(found, "authgate_logins_total", listener="imap", mechanism="LOGIN-COMMAND", outcome="refused") == 5
            assert value(found, "authgate_policy_refusals_total", listener="imap", reason="mechanism-needs-tls") == 5
            assert value(found, "authgate_connections_accepted_total", listener="imap") == 13
            assert value(found, "authgate_defence_penalties_total", listener="imap") == 5
            assert value(found, "authgate_login_duration_seconds_count", listener="imap") == 18
            assert value(found, "authgate_spliced_bytes_total", listener="imap", direction="up") > 0


async def test_readyz_names_an_unreachable_backend(tmp_path: Path) -> None:
    dead = free_port()  # nothing listens there

    def make(tmp: Path, backends: Backends) -> str:
        text = base_toml(tmp, '[metrics]\nlisten = "127.0.0.1:0"\n') + listeners_toml(backends.imap.port, proxy=False)
        return text + text.split("[[listeners]]", 1)[1].join(["[[listeners]]", ""]).replace(
            'name = "imap"', 'name = "broken"').replace(f"127.0.0.1:{backends.imap.port}", f"127.0.0.1:{dead}").replace(
            'listen = ["127.0.0.1:0", "[::1]:0"]', 'listen = "127.0.0.1:0"')

    async with authgate_run(tmp_path, make, names=("imap", "broken")) as gate:
        text = await gate.wait_log("metrics: listening on ")
        port = int(text.split("metrics: listening on ", 1)[1].split()[0].rsplit(":", 1)[1])
        status, body = await settled_readyz(port)
        assert status == 503
        assert f"backend 127.0.0.1:{dead} unreachable" in body.decode()
        assert f"127.0.0.1:{gate.backends.imap.port}" not in body.decode()  # that one answers
        status, _, _ = await http_get("127.0.0.1", port, "/nothing")
        assert status == 404
        # A login inside STARTTLS: its record names the TLS version.
        client = await Imap.open(gate.ports["imap"], local="127.0.5.1")
        await client.starttls()
        assert (await client.command("a", f"LOGIN alice {PASSWORD}"))[-1].startswith(b"a OK")
        client.close()
        await gate.wait_log("outcome=ok listener=imap client=127.0.5.1 ")
        assert "mechanism=LOGIN-COMMAND tls=TLSv1.3 reason=- backend=127.0.0.1:" in gate.log_text()
        # A login whose backend is down: an error, with the backend named.
        client = await Imap.open(gate.ports["broken"], local="127.0.5.2")
        assert (await client.cram_md5("alice", PASSWORD)).startswith(b"c NO")
        client.close()
        await gate.wait_log(
            "outcome=error listener=broken client=127.0.5.2 client_port="
        )
        assert f"reason=backend-unavailable backend=127.0.0.1:{dead} " in gate.log_text()
        # With workers = 1 the counts are in-process: the scrape works too.
        status, _, body = await http_get("127.0.0.1", port, "/metrics")
        assert status == 200
        # Every metric is declared (HELP and TYPE), counted or not yet.
        names = {family.name for family in text_string_to_metric_families(body.decode())}
        for name in METRIC_NAMES:
            assert name.removesuffix("_total") in names, name
        found = samples(body.decode())
        assert value(found, "authgate_tls_handshakes_total", listener="imap", result="ok") == 1
        assert value(found, "authgate_backend_failures_total", backend=f"127.0.0.1:{dead}", stage="connect") == 1
        assert value(found, "authgate_logins_total", listener="broken", mechanism="CRAM-MD5", outcome="error") == 1
