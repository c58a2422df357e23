"""No password, hash or SASL response in any log line or error reply.

Every mechanism runs through the proxy with a known password, right and
wrong, and every captured log record (all loggers, DEBUG) and every byte the
client received is scanned for the password, its base64 forms and the
SASL responses the client sent."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from authgate.sasl import mechanism_info
from authgate.sasl.base import ClientContext, ClientCredentials, client_step
from authgate.testing.stack import ListenerSpec, Stack, embedded_stack

PASSWORD = "Secr3t-Passw0rd-xyzzy"
WRONG = "Wr0ng-Passw0rd-plugh"
MECHANISMS = ["PLAIN", "LOGIN", "CRAM-MD5", "DIGEST-MD5", "NTLM", "SCRAM-SHA-1", "SCRAM-SHA-256"]

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with embedded_stack(
        tmp_path,
        users={"alice": PASSWORD},
        security="none",
        mechanisms=MECHANISMS,
        layout=(ListenerSpec("imap", "imap", "none"),),
    ) as running:
        yield running


async def authenticate(stack: Stack, name: str, password: str) -> tuple[bytes, list[bytes]]:
    """Run one AUTHENTICATE with our client mechanism over a raw socket.
    Returns everything the server sent and every response we sent."""
    ep = stack["imap"]
    reader, writer = await asyncio.open_connection(ep.host, ep.port)
    received = await reader.readline()
    client = mechanism_info(name).client(
        ClientCredentials("alice", password), ClientContext(service="imap", hostname="localhost")
    )
    sent: list[bytes] = []
    first = client.start()
    line = b"a AUTHENTICATE " + name.encode()
    if first is not None:
        line += b" " + (base64.b64encode(first) or b"=")
        sent.append(first)
    writer.write(line + b"\r\n")
    while True:
        reply = await asyncio.wait_for(reader.readline(), 10)
        received += reply
        if not reply.startswith(b"+"):
            break
        try:
            answer = client_step(client, base64.b64decode(reply[2:].strip()))
        except Exception:
            answer = None
        if answer is None:
            writer.write(b"*\r\n")
            continue
        sent.append(answer)
        writer.write(base64.b64encode(answer) + b"\r\n")
    writer.write(b"z LOGOUT\r\n")
    received += await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return received, sent


def forbidden(password: str, sent: list[bytes]) -> list[bytes]:
    pw = password.encode()
    needles = [pw, base64.b64encode(pw), pw.hex().encode(), password.encode("utf-16-le")]
    for blob in sent:
        if len(blob) >= 8:
            needles += [blob, base64.b64encode(blob)]
    # The base64 of the password at each of the three alignments
    for pad in (b"", b"x", b"xx"):
        encoded = base64.b64encode(pad + pw)
        needles.append(encoded[4 : len(encoded) - 4])
    return [n for n in needles if n]


@pytest.mark.parametrize("name", MECHANISMS)
async def test_no_secret_in_logs_or_replies(
    stack: Stack, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ok_received, ok_sent = await authenticate(stack, name, PASSWORD)
    bad_received, bad_sent = await authenticate(stack, name, WRONG)
    assert b"a OK" in ok_received, ok_received
    assert b"a NO" in bad_received, bad_received
    logs = "\n".join(
        record.getMessage() + " " + repr(record.args) + " " + str(record.exc_info or "")
        for record in caplog.records
    ).encode()
    assert logs, "nothing was logged: the scan would prove nothing"
    for password, sent in ((PASSWORD, ok_sent), (WRONG, bad_sent)):
        for needle in forbidden(password, sent):
            assert needle not in logs, f"{name}: a secret form appears in the logs"
            assert needle not in ok_received + bad_received, f"{name}: a secret form is echoed"
