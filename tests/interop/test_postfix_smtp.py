"""authgate in front of a real Postfix 3.7 (tests/postfix_server.py): the
backend learns the real client on port-25 pass-through (XCLIENT or PROXY
v2), so Postfix's default relay restrictions hold; a client spliced to
Postfix cannot send XCLIENT, XFORWARD, AUTH or STARTTLS of its own; and SMTP
smuggling payloads never make Postfix execute what follows a fake end of
data. Postfix's own log and its Maildirs are the proof."""

from __future__ import annotations

import asyncio
import base64
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from authgate import config as config_mod
from authgate.credentials.store import UserStore, generate_secrets
from authgate.offers import load_store
from authgate.proxy.server import Gateway
from authgate.runner import start_gateway
from tests.postfix_server import PostfixInstance, start_postfix

pytestmark = [pytest.mark.interop, pytest.mark.asyncio]

PASSWORD = "alice-Postfix-pw1"
HELO = "mx.client.example"


@pytest.fixture(scope="module")
def postfix() -> Iterator[PostfixInstance]:
    with start_postfix() as instance:
        yield instance


@pytest_asyncio.fixture
async def gateway(tmp_path: Path, postfix: PostfixInstance) -> AsyncIterator[Gateway]:
    store = UserStore(realm="gate.test")
    store.set_user_secrets("alice", generate_secrets("alice", PASSWORD, "gate.test"))
    store.save(tmp_path / "users.toml")
    ports = postfix.ports
    listeners = ""
    for name, port, forwarding in (
        ("mx-xclient", ports["xclient"], "xclient"),
        ("mx-proxy", ports["proxy"], "proxy-v2"),
        ("mx-unauthorised", ports["noxclient"], "xclient"),
    ):
        listeners += f"""
[[listeners]]
name = "{name}"
protocol = "smtp"
listen = "127.0.0.1:0"
submission = false
[listeners.backend]
address = "127.0.0.1:{port}"
client_address = "{forwarding}"
"""
    # Submission in terminate mode without a master user: authgate checks
    # alice's password, then tells Postfix XCLIENT ADDR=... LOGIN=alice.
    listeners += f"""
[[listeners]]
name = "submission"
protocol = "smtp"
listen = "127.0.0.1:0"
[listeners.backend]
address = "127.0.0.1:{ports["xclient"]}"
"""
    path = tmp_path / "authgate.toml"
    path.write_text(
        'hostname = "gate.test"\n'
        '[policy]\nsecurity = "none"\nmechanisms = ["PLAIN"]\n'
        '[users]\nfile = "users.toml"\n'
        "[limits]\nmax_errors = 10\n"
        "[defence]\nfailure_delay = 0\npenalties = []\n" + listeners
    )
    config = config_mod.load(path)
    running = await start_gateway(config, load_store(config))
    try:
        yield running
    finally:
        await running.stop(drain=1)


class Client:
    """A blocking SMTP client from a chosen loopback address that sends
    exactly the bytes it is given (smtplib would fix line endings)."""

    def __init__(self, address: tuple[str, int], source: str) -> None:
        self.sock = socket.create_connection(address, timeout=15, source_address=(source, 0))
        self.buffer = b""

    def reply(self) -> bytes:
        """One complete (possibly multi-line) reply."""
        lines = []
        while True:
            while b"\n" not in self.buffer:
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError(f"closed; got {b''.join(lines) + self.buffer!r}")
                self.buffer += data
            line, _, self.buffer = self.buffer.partition(b"\n")
            lines.append(line + b"\n")
            if line[3:4] != b"-":
                return b"".join(lines)

    def send(self, data: bytes, replies: int = 1) -> list[bytes]:
        self.sock.sendall(data)
        return [self.reply() for _ in range(replies)]

    def closed_after(self) -> bytes:
        """Whatever comes until the server closes the connection."""
        rest = self.buffer
        while data := self.sock.recv(65536):
            rest += data
        return rest

    def close(self) -> None:
        self.sock.close()


def plain(user: str, password: str) -> bytes:
    return base64.b64encode(f"\0{user}\0{password}".encode())


def mx_session(gateway: Gateway, listener: str, source: str) -> Client:
    client = Client(gateway.addresses()[listener], source)
    assert client.reply().startswith(b"220 gate.test")
    assert client.send(f"EHLO {HELO}\r\n".encode())[0].startswith(b"250-gate.test")
    return client


def submission_session(gateway: Gateway, source: str) -> Client:
    client = mx_session(gateway, "submission", source)
    reply = client.send(b"AUTH PLAIN " + plain("alice", PASSWORD) + b"\r\n")[0]
    assert reply.startswith(b"235 "), reply
    return client


# ------------------------------------------------- 1. the client's address


def relay_attempt(gateway: Gateway, listener: str, source: str) -> list[bytes]:
    client = mx_session(gateway, listener, source)
    try:
        return (
            client.send(b"MAIL FROM:<someone@client.example>\r\n", 1)
            + client.send(b"RCPT TO:<victim@example.net>\r\n", 1)
            + client.send(b"RCPT TO:<one@local.test>\r\n", 1)
            + client.send(b"DATA\r\n")
            + client.send(b"Subject: relay test\r\n\r\nhello\r\n.\r\n")
            + client.send(b"QUIT\r\n")
        )
    finally:
        client.close()


@pytest.mark.parametrize(
    ("listener", "source"), [("mx-xclient", "127.0.0.9"), ("mx-proxy", "127.0.0.10")]
)
async def test_passthrough_postfix_sees_the_client_and_refuses_relay(
    gateway: Gateway, postfix: PostfixInstance, listener: str, source: str
) -> None:
    assert postfix.postconf("mynetworks") == "127.0.0.1/32"  # authgate's address is trusted
    mark = postfix.log_size()
    before = len(postfix.mailbox("one"))
    mail, foreign, local, data, queued, bye = await asyncio.to_thread(
        relay_attempt, gateway, listener, source
    )
    assert mail.startswith(b"250 ")
    # defer_unauth_destination: 454 4.7.1 Relay access denied.
    assert foreign.startswith(b"454 4.7.1") and b"Relay access denied" in foreign, foreign
    assert local.startswith(b"250 ") and data.startswith(b"354 ") and queued.startswith(b"250 ")
    assert bye.startswith(b"221 ")
    line = postfix.wait_for_log(
        rf"NOQUEUE: reject: RCPT from unknown\[{source}\]: 454 4.7.1 <victim@example.net>: "
        rf"Relay access denied; .* proto=ESMTP helo=<{HELO}>",
        mark,
    )
    assert line
    postfix.wait_for_log(rf"client=unknown\[{source}\]", mark)
    postfix.wait_for_log(r"to=<one@local.test>, relay=virtual.*status=sent", mark)
    assert len(postfix.mailbox("one")) == before + 1
    assert "127.0.0.1]" not in postfix.session_stats(source, mark)  # sanity: the right session


async def test_passthrough_refused_when_the_backend_lacks_xclient(
    gateway: Gateway, postfix: PostfixInstance
) -> None:
    # Forwarding configured, backend not offering XCLIENT (127.0.0.1 not in
    # its smtpd_authorized_xclient_hosts): 421, never a silent fallback.
    mark = postfix.log_size()

    def attempt() -> tuple[bytes, bytes]:
        client = mx_session(gateway, "mx-unauthorised", "127.0.0.12")
        try:
            reply = client.send(b"MAIL FROM:<someone@client.example>\r\n")[0]
            return reply, client.closed_after()
        finally:
            client.close()

    reply, rest = await asyncio.to_thread(attempt)
    assert reply.startswith(b"421 4.3.0"), reply
    assert rest == b""
    # Postfix saw authgate's EHLO and nothing of the client's mail.
    stats = postfix.session_stats("127.0.0.1", mark)
    assert "mail=" not in stats and "rcpt=" not in stats


# ----------------------------------- 2. what a spliced client may not send


async def test_client_cannot_send_xclient_xforward_auth_or_starttls(
    gateway: Gateway, postfix: PostfixInstance
) -> None:
    source = "127.0.0.11"
    mark = postfix.log_size()

    def attempt() -> list[bytes]:
        client = submission_session(gateway, source)
        try:
            replies = []
            for line in (
                b"XCLIENT ADDR=192.0.2.66 LOGIN=bob\r\n",
                b"XFORWARD ADDR=192.0.2.66\r\n",
                b"AUTH PLAIN " + plain("bob", "guess") + b"\r\n",
                b"STARTTLS\r\n",
                b"xclient\tADDR=192.0.2.66\r\n",
                b"NOOP\r\n",
            ):
                replies += client.send(line)
            # Pipelined: the refusal comes after the replies owed before it.
            replies += client.send(
                b"MAIL FROM:<alice@local.test>\r\nRCPT TO:<nobody-here@local.test>\r\n"
                b"DATA\r\nXCLIENT ADDR=192.0.2.66\r\nQUIT\r\n",
                5,
            )
            return replies
        finally:
            client.close()

    replies = await asyncio.to_thread(attempt)
    codes = [r[:3] for r in replies]
    assert codes == [
        b"550",
        b"550",
        b"503",
        b"503",
        b"550",
        b"250",
        b"250",
        b"550",
        b"554",
        b"550",
        b"221",
    ], replies
    assert replies[0] == b"550 5.7.0 XCLIENT not permitted\r\n"
    assert b"Recipient address rejected" in replies[7]  # Postfix's own
    stats = postfix.session_stats(source, mark)
    # Only authgate's own XCLIENT (ADDR=127.0.0.11 LOGIN=alice) reached Postfix.
    assert "xclient=0/1" in stats.split(), stats
    for command in ("xforward=", "auth=", "starttls="):
        assert command not in stats, stats
    postfix.wait_for_log(r"connect from unknown\[127.0.0.1\]", mark)
    assert "192.0.2.66" not in postfix.log_text(mark)


# ----------------------------------------------------------- smuggling


SMUGGLED = (
    b"MAIL FROM:<evil@client.example>\r\nRCPT TO:<two@local.test>\r\nDATA\r\n"
    b"Subject: smuggled\r\n\r\nforged\r\n.\r\n"
)


@pytest.mark.parametrize("fake_end", [b"\n.\n", b"\n.\r\n", b"\r\n.\n"])
@pytest.mark.parametrize("listener", ["submission", "mx-xclient"])
async def test_smuggled_commands_never_run(
    gateway: Gateway, postfix: PostfixInstance, listener: str, fake_end: bytes
) -> None:
    # Postfix 3.7's defaults (smtpd_forbid_bare_newline = no) end a message
    # at each of these: without authgate's check the forged message would be
    # delivered to two@local.test.
    source = "127.0.0.13" if listener == "submission" else "127.0.0.14"
    mark = postfix.log_size()
    delivered_to_two = len(postfix.mailbox("two"))
    delivered_to_one = len(postfix.mailbox("one"))

    def attempt() -> tuple[list[bytes], bytes]:
        if listener == "submission":
            client = submission_session(gateway, source)
        else:
            client = mx_session(gateway, listener, source)
        try:
            replies = client.send(
                b"MAIL FROM:<a@client.example>\r\nRCPT TO:<one@local.test>\r\nDATA\r\n", 3
            )
            client.sock.sendall(b"Subject: one\r\n\r\nbody" + fake_end + SMUGGLED)
            return replies, client.closed_after()
        finally:
            client.close()

    replies, rest = await asyncio.to_thread(attempt)
    assert [r[:3] for r in replies] == [b"250", b"250", b"354"]
    assert rest == b"521 5.5.2 gate.test Error: bare <CR> or <LF> next to '.' in message data\r\n"
    stats = postfix.session_stats(source, mark)
    assert "data=0/1" in stats.split(), stats  # the message was never finished
    time.sleep(0.5)  # nothing is queued late: the session is over
    assert "two@local.test" not in postfix.log_text(mark)
    assert len(postfix.mailbox("two")) == delivered_to_two
    assert len(postfix.mailbox("one")) == delivered_to_one


async def test_bdat_chunk_is_data_not_commands(gateway: Gateway, postfix: PostfixInstance) -> None:
    source = "127.0.0.15"
    mark = postfix.log_size()
    before = len(postfix.mailbox("three"))
    chunk = b"Subject: chunked\r\n\r\nXCLIENT ADDR=192.0.2.66\r\n\n.\nRCPT TO:<two@local.test>\r\n"

    def attempt() -> list[bytes]:
        client = submission_session(gateway, source)
        try:
            return client.send(
                b"MAIL FROM:<alice@local.test>\r\nRCPT TO:<three@local.test>\r\n"
                + b"BDAT %d LAST\r\n" % len(chunk)
                + chunk
                + b"QUIT\r\n",
                4,
            )
        finally:
            client.close()

    replies = await asyncio.to_thread(attempt)
    assert [r[:3] for r in replies] == [b"250", b"250", b"250", b"221"], replies
    postfix.wait_for_log(r"to=<three@local.test>, relay=virtual.*status=sent", mark)
    messages = postfix.mailbox("three")
    assert len(messages) == before + 1
    assert "XCLIENT ADDR=192.0.2.66" in messages[-1].get_payload()
    assert "two@local.test" not in postfix.log_text(mark)
