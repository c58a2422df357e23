"""An HTTP request sent to a mail port (ALPACA, 2021; nginx CVE-2021-3618):
on every listener -- implicit TLS (993/995/465 here: imaps, pop3s, smtps)
and plaintext (143/110/587: imap, pop3, submission) -- authgate answers the
first `max_errors` lines with its own error replies, then says goodbye and
closes. Nothing of the request is reflected: not its path, not a header
value, not its body -- the reflection attack needs the reply to carry
attacker-chosen HTML. IMAP echoes a command's tag by design, so a tag is
only echoed when it is of the plain form real clients use (letters, digits,
"-", "." and "_", as nginx accepts): an HTTP method is, a header name with
its colon or a line of HTML is not.

The client here sends no ALPN (a browser would, and is stopped during the
handshake: test_alpn.py): this is the fallback when ALPN is not there."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from authgate.testing.stack import STANDARD_LAYOUT, Stack, embedded_stack

pytestmark = pytest.mark.asyncio

PASSWORD = "pw-cross-protocol-1"
MARKERS = (b"ALPACA", b"alpaca", b"<script", b"Mozilla", b"localhost:")
BODY = (
    b"<script>alert`1`</script> NOOP\r\n"
    b"<img/src=x/onerror=alert`2`> LOGIN alpaca alpaca\r\n"
    b"a'alpaca'b NOOP\r\n"
)
GOODBYE = {"imap": b"* BYE ", "pop3": b"-ERR ", "smtp": b"421 ", "nntp": b"400 "}
LISTENERS = {
    "imaps": "imap",
    "pop3s": "pop3",
    "smtps": "smtp",
    "imap": "imap",
    "pop3": "pop3",
    "submission": "smtp",
    "nntps": "nntp",
    "nntp": "nntp",
}


def http_request(port: int, body: bytes = BODY) -> bytes:
    return (
        b"POST /ALPACA-path/<script>alert(1)</script>?q=alpaca HTTP/1.1\r\n"
        b"Host: localhost:%d\r\n"
        b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) ALPACA/1.0\r\n"
        b"Accept: text/html,*/*;q=0.8\r\n"
        b"Cookie: session=ALPACA-secret-cookie\r\n"
        b"Content-Type: text/plain\r\n"
        b"Content-Length: %d\r\n"
        b"Origin: https://alpaca.example\r\n"
        b"\r\n" % (port, len(body))
    ) + body


@pytest_asyncio.fixture
async def stack(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Stack]:
    marker = request.node.get_closest_marker("limits")
    extra = "[limits]\n" + "".join(
        f"{k} = {v}\n" for k, v in (marker.kwargs if marker else {}).items()
    )
    async with embedded_stack(
        tmp_path,
        users={"alice": PASSWORD},
        security="none",
        layout=STANDARD_LAYOUT,
        extra_config=extra,
    ) as running:
        yield running


async def send_and_read_all(stack: Stack, name: str, data: bytes) -> tuple[bytes, bytes]:
    """(greeting, everything after it until authgate closes the connection)."""
    ep = stack[name]
    context = None
    if ep.tls == "implicit":
        context = ssl.create_default_context(cafile=str(stack.ca_file))
    reader, writer = await asyncio.open_connection(
        ep.host, ep.port, ssl=context, server_hostname="localhost" if context else None
    )
    try:
        greeting = await asyncio.wait_for(reader.readline(), 10)
        writer.write(data)
        rest = await asyncio.wait_for(reader.read(), 10)  # b"" only once closed
        return greeting, rest
    finally:
        writer.close()


def reply_lines(protocol: str, data: bytes) -> list[bytes]:
    lines = data.split(b"\r\n")
    assert lines[-1] == b"", data  # whole lines only
    return lines[:-1]


@pytest.mark.parametrize("name", sorted(LISTENERS))
async def test_http_request_ends_in_goodbye_after_max_errors(stack: Stack, name: str) -> None:
    protocol = LISTENERS[name]
    greeting, rest = await send_and_read_all(stack, name, http_request(stack[name].port))
    openers = {"imap": b"* OK ", "pop3": b"+OK ", "smtp": b"220 ", "nntp": b"200 "}
    assert greeting.startswith(openers[protocol])
    lines = reply_lines(protocol, rest)
    # max_errors = 3 (the default): three error replies, then the goodbye.
    assert len(lines) == 4, lines
    assert lines[-1].startswith(GOODBYE[protocol]) and b"Too many errors" in lines[-1], lines
    for marker in MARKERS:
        assert marker not in rest, (marker, rest)
    assert len(rest) < 300, rest


@pytest.mark.limits(max_errors=40)
@pytest.mark.parametrize("name", sorted(LISTENERS))
async def test_no_part_of_the_request_is_reflected_even_with_many_errors_allowed(
    stack: Stack, name: str
) -> None:
    """With max_errors raised, the body (HTML an attacker chose) is read as
    commands too: still never reflected. The request ends with the
    protocol's goodbye command, so the server closes."""
    protocol = LISTENERS[name]
    quit_command = {
        "imap": b"z LOGOUT\r\n",
        "pop3": b"QUIT\r\n",
        "smtp": b"QUIT\r\n",
        "nntp": b"QUIT\r\n",
    }[protocol]
    _, rest = await send_and_read_all(
        stack, name, http_request(stack[name].port, BODY + quit_command)
    )
    for marker in MARKERS:
        assert marker not in rest, (marker, rest)
    if protocol == "imap":
        # Only tags of the plain form are echoed: the method, the final LOGOUT.
        tagged = {
            line.split(b" ", 1)[0]
            for line in reply_lines(protocol, rest)
            if not line.startswith(b"* ")
        }
        assert tagged == {b"POST", b"z"}, rest
