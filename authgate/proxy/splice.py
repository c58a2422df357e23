"""The authenticated session: bytes both ways until either side is done.

Each channel hands what it receives straight to the other from its
data_received callback (no task and no future per chunk); a full write
buffer on one side pauses reading on the other, so memory stays bounded.
"""

from __future__ import annotations

import asyncio
import contextlib

from authgate.proxy.channel import Channel, ChannelClosed


async def splice(client: Channel, backend: Channel, *, linger: float = 30.0) -> tuple[int, int]:
    """Run both directions. When the backend ends, the session is over; when
    the client ends first (a half-close after QUIT, say), the backend gets
    `linger` seconds to finish its answer. Then both connections are closed.
    Returns (bytes client->backend, bytes backend->client)."""
    # The backend's end is the session's: the client is closed right after
    # (close() sends what is buffered, then the FIN), so no half-close there.
    for source, sink, half_close in ((client, backend, True), (backend, client, False)):
        with contextlib.suppress(ChannelClosed):
            source.forward_to(sink, half_close=half_close)
    client_ended, backend_ended = client.ended, backend.ended
    assert client_ended is not None and backend_ended is not None
    try:
        await asyncio.wait({client_ended, backend_ended}, return_when=asyncio.FIRST_COMPLETED)
        if not backend_ended.done() and not client.lost:
            # The client half-closed: let the backend finish its answer.
            await asyncio.wait({backend_ended}, timeout=linger)
    finally:
        client.close()
        backend.close()
    return client.forwarded, backend.forwarded
