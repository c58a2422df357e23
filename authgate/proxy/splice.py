"""The authenticated session: bytes both ways until either side is done."""

from __future__ import annotations

import asyncio
import contextlib

from authgate.proxy.channel import Channel, ChannelClosed


async def _pump(source: Channel, sink: Channel) -> int:
    """Copy until `source` ends; pass the half-close on. Returns bytes moved."""
    moved = 0
    try:
        while True:
            data = await source.read()
            if not data:
                break
            sink.write(data)
            moved += len(data)
            # Back-pressure: never read faster than the other side takes it.
            await sink.drain()
    except (ChannelClosed, ConnectionError):
        pass
    sink.write_eof()
    return moved


async def splice(client: Channel, backend: Channel, *, linger: float = 30.0) -> tuple[int, int]:
    """Run both directions. When one direction ends, the other gets `linger`
    seconds to finish (a client that half-closes after QUIT still receives
    the backend's goodbye); then both connections are closed.
    Returns (bytes client->backend, bytes backend->client)."""
    up = asyncio.ensure_future(_pump(client, backend))
    down = asyncio.ensure_future(_pump(backend, client))
    try:
        done, pending = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        if pending:
            # If the backend ended, the session is over: don't wait for the client.
            wait = 0.0 if down in done else linger
            await asyncio.wait(pending, timeout=wait)
    finally:
        for task in (up, down):
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        client.close()
        backend.close()
    return (
        up.result() if up.done() and not up.cancelled() else 0,
        down.result() if down.done() and not down.cancelled() else 0,
    )
