"""Strict ALPN on TLS listeners (ALPACA): a client whose ALPN list has none
of the listener protocol's identifiers ("imap", "pop3", "smtp") gets a
fatal no_application_protocol alert and no session; a client without ALPN
(every mail client we know, curl for imaps/pop3s/smtps) is served, and one
that offers ours gets it selected. Real clients: Python's ssl and curl
(which offers "h2,http/1.1" for https:// -- the browser's view of the
attack). Runs on asyncio's and uvloop's event loops (conftest)."""

from __future__ import annotations

import asyncio
import logging
import shutil
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from authgate import config as config_mod
from authgate.certs import ensure_dev_certificates
from authgate.runner import load_runtime
from authgate.testing.stack import STANDARD_LAYOUT, Stack, embedded_stack

pytestmark = pytest.mark.asyncio

PASSWORD = "pw-alpn-test-1"
OWN = {"imaps": "imap", "pop3s": "pop3", "smtps": "smtp", "nntps": "nntp", "imap": "imap"}
GREETING = {"imaps": b"* OK ", "pop3s": b"+OK ", "smtps": b"220 ", "nntps": b"200 "}
REFUSED = "no application protocol"


@pytest_asyncio.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with embedded_stack(
        tmp_path, users={"alice": PASSWORD}, security="none", layout=STANDARD_LAYOUT
    ) as running:
        yield running


async def handshake(
    stack: Stack, name: str, alpn: list[str] | None, ca: Path | None = None
) -> tuple[str | None, bytes]:
    """Implicit TLS with `alpn` offered: (selected protocol, greeting)."""
    ep = stack[name]
    ctx = ssl.create_default_context(cafile=str(ca or stack.ca_file))
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(ep.host, ep.port, ssl=ctx, server_hostname="localhost"), 10
    )
    try:
        selected = writer.get_extra_info("ssl_object").selected_alpn_protocol()
        return selected, await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()


def other_mail_ids(name: str) -> list[str]:
    return [i for i in ("imap", "pop3", "smtp", "nntp") if i != OWN[name]]


@pytest.mark.parametrize("name", ["imaps", "pop3s", "smtps", "nntps"])
async def test_foreign_alpn_is_refused_with_the_alert(
    stack: Stack, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="authgate")
    sessions = len(stack.gateway._sessions)
    for offer in (["http/1.1"], ["h2", "http/1.1"], other_mail_ids(name)):
        with pytest.raises(ssl.SSLError, match=REFUSED):
            await handshake(stack, name, offer)
    # Nothing is left of the refused connections (no session ever began:
    # the client got the alert instead of a greeting).
    for _ in range(100):
        if len(stack.gateway._sessions) == sessions:
            break
        await asyncio.sleep(0.05)
    assert len(stack.gateway._sessions) == sessions
    refusals = [r.getMessage() for r in caplog.records if "TLS handshake refused" in r.getMessage()]
    assert len(refusals) == 3 and "[h2, http/1.1]" in refusals[1], refusals


@pytest.mark.parametrize("name", ["imaps", "pop3s", "smtps", "nntps"])
async def test_own_alpn_is_selected_and_no_alpn_is_served(stack: Stack, name: str) -> None:
    own = OWN[name]
    selected, greeting = await handshake(stack, name, [own])
    assert selected == own and greeting.startswith(GREETING[name])
    selected, greeting = await handshake(stack, name, ["http/1.1", *other_mail_ids(name), own])
    assert selected == own and greeting.startswith(GREETING[name])
    selected, greeting = await handshake(stack, name, None)
    assert selected is None and greeting.startswith(GREETING[name])


async def test_starttls_is_strict_too(stack: Stack) -> None:
    ep = stack["imap"]
    for offer, refused in ((["http/1.1"], True), (["imap"], False), (None, False)):
        reader, writer = await asyncio.open_connection(ep.host, ep.port)
        try:
            await reader.readline()
            writer.write(b"a STARTTLS\r\n")
            assert (await reader.readline()).startswith(b"a OK")
            ctx = stack.ssl_context()
            if offer is not None:
                ctx.set_alpn_protocols(offer)
            if refused:
                with pytest.raises(ssl.SSLError, match=REFUSED):
                    await writer.start_tls(ctx, server_hostname="localhost")
                continue
            await writer.start_tls(ctx, server_hostname="localhost")
            writer.write(b"b NOOP\r\n")
            assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"b OK")
        finally:
            writer.close()


async def curl(*args: str, data: bytes | None = None) -> tuple[int, str]:
    assert shutil.which("curl"), "curl is needed (./dev installs it)"
    proc = await asyncio.create_subprocess_exec(
        "curl",
        "-sS",
        "-v",
        "--max-time",
        "20",
        *args,
        stdin=asyncio.subprocess.DEVNULL if data is None else asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate(data)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


@pytest.mark.parametrize("name", ["imaps", "pop3s", "smtps", "nntps"])
async def test_curl_https_to_a_mail_port_is_refused(stack: Stack, name: str) -> None:
    """What a browser would do (ALPACA): an HTTPS request, ALPN h2/http1.1."""
    ep = stack[name]
    code, out = await curl("--cacert", str(stack.ca_file), f"https://localhost:{ep.port}/")
    assert code == 35, out  # CURLE_SSL_CONNECT_ERROR
    assert "ALPN: offers h2,http/1.1" in out and REFUSED in out, out
    assert "GET /" not in out


@pytest.mark.parametrize(
    ("name", "url"),
    [
        ("imaps", "imaps://localhost:{}/"),
        ("pop3s", "pop3s://localhost:{}/"),
        ("smtps", "smtps://localhost:{}"),
    ],
)
async def test_curl_mail_clients_offer_no_alpn_and_are_served(
    stack: Stack, name: str, url: str
) -> None:
    args = ["--cacert", str(stack.ca_file), "-u", f"alice:{PASSWORD}", url.format(stack[name].port)]
    data = None
    if name == "smtps":
        args += ["--mail-from", "alice@localhost", "--mail-rcpt", "alice@localhost", "-T", "-"]
        data = b"Subject: alpn\r\n\r\nhello\r\n"
    code, out = await curl(*args, data=data)
    assert code == 0, out
    assert "ALPN" not in out, out  # curl offers none for mail protocols


async def test_reload_swaps_the_certificate_and_stays_strict(stack: Stack, tmp_path: Path) -> None:
    old_ca = stack.ca_file
    new_ca = ensure_dev_certificates(tmp_path / "new-certs")
    text = stack.config_file.read_text()
    old_certs = str(old_ca.parent)
    assert old_certs in text
    stack.config_file.write_text(text.replace(old_certs, str(new_ca.parent)))
    config, runtimes = load_runtime(stack.config_file, None)
    assert isinstance(config, config_mod.Config)
    await stack.gateway.reload(runtimes, config.defence)
    # The listening socket is the same; new handshakes show the new certificate.
    selected, greeting = await handshake(stack, "imaps", ["imap"], ca=new_ca)
    assert selected == "imap" and greeting.startswith(b"* OK ")
    with pytest.raises(ssl.SSLCertVerificationError):
        await handshake(stack, "imaps", None, ca=old_ca)
    with pytest.raises(ssl.SSLError, match=REFUSED):
        await handshake(stack, "imaps", ["http/1.1"], ca=new_ca)
