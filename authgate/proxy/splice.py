"""The authenticated session: bytes both ways until either side is done.

Pre-authentication ends with a `Handover` (both connections, the bytes each
side is still owed, the guard if the protocol has one); `hand_over()` takes
it from there.

Each channel hands what it receives straight to the other from its
data_received callback (no task and no future per chunk); a full write
buffer on one side pauses reading on the other, so memory stays bounded.

A `Guard` (SMTP: `authgate.protocols.smtp_splice`) sees both directions in
those same callbacks: it passes the client's bytes on, refuses some
commands with replies of its own, and may hold client input until the
backend has answered; while it holds more than `HIGH_WATER` octets the
client is not read.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from authgate.proxy.channel import HIGH_WATER, Channel, ChannelClosed, Through


class GuardOutput(Protocol):
    @property
    def to_backend(self) -> bytes: ...

    @property
    def to_client(self) -> bytes: ...

    @property
    def events(self) -> Sequence[Any]: ...

    @property
    def close(self) -> bool: ...


class Guard(Protocol):
    """A sans-IO filter of one spliced session (both directions)."""

    @property
    def held(self) -> int: ...

    def from_client(self, data: bytes) -> GuardOutput: ...

    def from_backend(self, data: bytes) -> GuardOutput: ...


def guarded(
    guard: Guard, client: Channel, report: Callable[[Sequence[Any]], None]
) -> tuple[Through, Through]:
    """The two `Through` functions (client->backend, backend->client) that
    run `guard` in the splice callbacks; `report` gets its events."""

    def upstream(data: bytes) -> tuple[bytes, bytes, bool]:
        out = guard.from_client(data)
        if out.events:
            report(out.events)
        if guard.held > HIGH_WATER:
            client.hold()
        return out.to_backend, out.to_client, out.close

    def downstream(data: bytes) -> tuple[bytes, bytes, bool]:
        out = guard.from_backend(data)
        if out.events:
            report(out.events)
        if guard.held <= HIGH_WATER:
            client.release()
        return out.to_client, out.to_backend, out.close

    client.defer_eof = lambda: guard.held > 0
    return upstream, downstream


async def splice(
    client: Channel,
    backend: Channel,
    *,
    linger: float = 30.0,
    through: tuple[Through, Through] | None = None,
) -> tuple[int, int]:
    """Run both directions. When the backend ends, the session is over; when
    the client ends first (a half-close after QUIT, say), the backend gets
    `linger` seconds to finish its answer. Then both connections are closed.
    `through` filters (client->backend, backend->client), from `guarded()`.
    Returns (bytes client->backend, bytes backend->client)."""
    up, down = through if through is not None else (None, None)
    loop = asyncio.get_running_loop()
    # One future for both directions: whichever side ends first resolves
    # it (fewer objects per held session than a future each and a wait()).
    either: asyncio.Future[None] = loop.create_future()
    # The backend's end is the session's: the client is closed right after
    # (close() sends what is buffered, then the FIN), so no half-close there.
    for source, sink, half_close, filter_ in (
        (client, backend, True, up),
        (backend, client, False, down),
    ):
        with contextlib.suppress(ChannelClosed):
            source.forward_to(sink, half_close=half_close, through=filter_, ended=either)
    try:
        await either
        if not (backend.peer_ended or client.lost):
            # The client half-closed: let the backend finish its answer.
            backend.ended = lingering = loop.create_future()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(linger):
                    await lingering
    finally:
        client.close()
        backend.close()
    return client.forwarded, backend.forwarded


@dataclass(frozen=True, slots=True)
class Handover:
    """What pre-authentication hands to the splice (wsproto's trailing_data,
    both ways): the two connections and the bytes each side is owed, that
    is what the backend sent behind its login reply (`to_client`) and what
    the client pipelined behind its last command (`to_backend`). `guard`,
    when the protocol has one, sees every byte of both directions, these
    owed bytes first."""

    client: Channel
    backend: Channel
    to_client: bytes = b""
    to_backend: bytes = b""
    guard: Guard | None = None


async def hand_over(
    handover: Handover, report: Callable[[Sequence[Any]], None]
) -> tuple[int, int] | None:
    """Deliver what each side is owed, then `splice()`; `report` gets the
    guard's events. Returns the splice's byte counts, or None when the guard
    ended the session on the owed bytes alone (its last words are sent)."""
    client, backend = handover.client, handover.backend
    to_client, to_backend = handover.to_client, handover.to_backend
    through = None
    if handover.guard is not None:
        guard = handover.guard
        through = guarded(guard, client, report)
        down = guard.from_backend(to_client)
        up = guard.from_client(to_backend)
        report([*down.events, *up.events])
        to_client = down.to_client + up.to_client
        to_backend = down.to_backend + up.to_backend
        if down.close or up.close:
            client.write(to_client)
            with contextlib.suppress(ChannelClosed):
                await client.drain()
            return None
    if to_client:
        client.write(to_client)
    if to_backend:
        backend.write(to_backend)
    with contextlib.suppress(ChannelClosed):
        await client.drain()
    return await splice(client, backend, through=through)
