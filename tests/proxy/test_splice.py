"""The splice moves every byte in order, and a slow reader on one side
pauses the other side instead of piling data up in authgate."""

from __future__ import annotations

import asyncio
import hashlib
import socket

import pytest

from authgate.protocols.smtp_splice import Refused, SmtpSpliceFilter, SpliceEnded
from authgate.proxy.channel import Channel
from authgate.proxy.splice import Handover, hand_over, splice

pytestmark = pytest.mark.asyncio

TOTAL = 32 * 1024 * 1024


async def channel_for(sock: socket.socket) -> Channel:
    _, protocol = await asyncio.get_running_loop().connect_accepted_socket(Channel, sock)
    return protocol


async def test_slow_reader_back_pressure_and_integrity() -> None:
    client_app, client_proxy = socket.socketpair()
    backend_proxy, backend_app = socket.socketpair()
    client = await channel_for(client_proxy)
    backend = await channel_for(backend_proxy)
    spliced = asyncio.ensure_future(splice(client, backend, linger=5))

    # Keep both stream pairs referenced: a collected StreamWriter closes its socket.
    reader, client_writer = await asyncio.open_connection(sock=client_app)
    backend_reader, writer = await asyncio.open_connection(sock=backend_app)
    sent = hashlib.sha256()

    async def blast() -> None:
        block = bytes(range(256)) * 256  # 64 KiB
        for i in range(TOTAL // len(block)):
            chunk = block[i % 256 :] + block[: i % 256]
            sent.update(chunk)
            writer.write(chunk)
            await writer.drain()
        writer.close()

    blaster = asyncio.ensure_future(blast())
    # The client reads nothing for a while: authgate must stop reading too.
    peak = 0
    for _ in range(20):
        await asyncio.sleep(0.05)
        assert client.transport is not None
        peak = max(peak, client.transport.get_write_buffer_size())
    assert not blaster.done()  # the backend is held back, not buffered into us
    assert peak < 2 * 1024 * 1024

    received = hashlib.sha256()
    count = 0
    while chunk := await reader.read(1 << 20):
        received.update(chunk)
        count += len(chunk)
    await blaster
    up, down = await asyncio.wait_for(spliced, 10)
    assert count == TOTAL and down == TOTAL and up == 0
    assert received.digest() == sent.digest()
    client_writer.close()
    assert backend_reader.at_eof() or not await backend_reader.read()


async def test_runs_on_the_loop_its_id_names(request: pytest.FixtureRequest) -> None:
    # tests/proxy/conftest.py runs this module on asyncio's loop and on
    # uvloop's: make sure the second really is uvloop.
    loop_module = type(asyncio.get_running_loop()).__module__
    assert loop_module.startswith("uvloop") == ("[uvloop]" in request.node.name)


async def stream_for(sock: socket.socket) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(sock=sock)


async def test_hand_over_delivers_what_each_side_is_owed_first() -> None:
    client_app, client_proxy = socket.socketpair()
    backend_proxy, backend_app = socket.socketpair()
    client = await channel_for(client_proxy)
    backend = await channel_for(backend_proxy)
    handover = Handover(client, backend, to_client=b"* 1 EXISTS\r\n", to_backend=b"a NOOP\r\n")
    spliced = asyncio.ensure_future(hand_over(handover, lambda events: None))
    client_reader, client_writer = await stream_for(client_app)
    backend_reader, backend_writer = await stream_for(backend_app)
    client_writer.write(b"b LOGOUT\r\n")
    backend_writer.write(b"a OK done\r\n")
    expected_up = b"a NOOP\r\nb LOGOUT\r\n"
    expected_down = b"* 1 EXISTS\r\na OK done\r\n"
    assert await asyncio.wait_for(backend_reader.readexactly(len(expected_up)), 10) == expected_up
    assert await asyncio.wait_for(client_reader.readexactly(len(expected_down)), 10) == (
        expected_down
    )
    backend_writer.close()
    counts = await asyncio.wait_for(spliced, 10)
    # The splice counts what it moved; the owed bytes were delivered before it.
    assert counts == (len(b"b LOGOUT\r\n"), len(b"a OK done\r\n"))
    assert await asyncio.wait_for(client_reader.read(), 10) == b""
    client_writer.close()


async def test_hand_over_guard_sees_the_owed_bytes_and_may_end_there() -> None:
    client_app, client_proxy = socket.socketpair()
    backend_proxy, backend_app = socket.socketpair()
    client = await channel_for(client_proxy)
    backend = await channel_for(backend_proxy)
    # One error already made before the hand-over: the pipelined XCLIENT is
    # the last one allowed.
    guard = SmtpSpliceFilter(
        "gate.example", authenticated=True, chunking=False, max_errors=2, errors=1
    )
    handover = Handover(client, backend, to_backend=b"XCLIENT ADDR=1.2.3.4\r\n", guard=guard)
    reported: list[object] = []
    counts = await asyncio.wait_for(hand_over(handover, reported.extend), 10)
    assert counts is None  # never spliced
    assert [type(event) for event in reported] == [Refused, SpliceEnded]
    client.close()
    backend.close()
    client_reader, client_writer = await stream_for(client_app)
    backend_reader, backend_writer = await stream_for(backend_app)
    said = await asyncio.wait_for(client_reader.read(), 10)
    assert said == (
        b"550 5.7.0 XCLIENT not permitted\r\n421 4.7.0 gate.example Too many errors\r\n"
    )
    assert await asyncio.wait_for(backend_reader.read(), 10) == b""  # the backend got nothing
    client_writer.close()
    backend_writer.close()
