"""Warm backend connections: per backend member, a few connections already
made and greeted, so that a login does not wait for the backend's connect
and greeting (`warm_connections` on a backend).

A warm connection is a Channel whose greeting has arrived and sits unread
in the channel's buffer: the client machine a login builds at claim time
reads it as if it had just come, and sends everything else (ID, XCLIENT,
STARTTLS, the credentials) itself. Nothing about a client is ever sent on
a warm connection before a login claims it, and a claimed connection is
that login's alone: it is closed with its session, never given back.

Each pool runs `size` slots, one task each, and a slot holds at most one
connection: it connects, waits for the greeting, offers the connection,
and waits until a login claims it, it grows too old (`warm_max_age`, well
under the backend's own pre-login timeout), or the backend says something
more or hangs up while it waits (then it is closed: a backend that closes
idle connections is not handed to a client). After a claim the slot makes
the next connection at once: at most `size` connects run at a time. A
failed connect marks nothing (the logins' own connects and the health
checks do that) and the slot backs off; a member that is marked down
gets no new warm connections until it is up again.

Not for backends told the client's address in a PROXY v2 header (the
configuration refuses the pair): the header is the first thing on the
connection and names the client. Implicit TLS is pooled with its
handshake done: the handshake names only the backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import Final

from authgate.config import BackendSettings, TLSMode
from authgate.metrics import recorder
from authgate.proxy.channel import Channel, ChannelClosed, open_channel
from authgate.routing import Health

log = logging.getLogger("authgate.warm")

# What ended a warm connection's wait (the future's value; a byte, EOF or
# the loss of the connection resolves it with None: Channel.watch).
CLAIMED: Final = "claimed"
AGED: Final = "aged"
CLOSED: Final = "closed"

BACKOFF_FIRST = 0.5  # seconds after the first failed connect in a row
BACKOFF_MOST = 30.0
DOWN_POLL = 1.0  # how often a slot looks whether its marked-down member is up

_pause = asyncio.sleep  # a slot's waits (back-off, down member); tests count them


class _Idle:
    __slots__ = ("born", "channel", "done", "size")

    def __init__(self, channel: Channel, born: float, done: asyncio.Future[str | None]) -> None:
        self.channel = channel
        self.born = born
        self.done = done
        self.size = len(channel.buffered())  # the greeting's length


class WarmPool:
    """The warm connections of one backend member (one address)."""

    def __init__(
        self,
        member: BackendSettings,
        tls: ssl.SSLContext | None,
        *,
        connect_timeout: float,
        health: Health,
        loops_back: Callable[[tuple[str, int], tuple[str, int]], bool],
    ) -> None:
        self.member = member
        self.size = member.warm_connections
        self.max_age = member.warm_max_age
        self._tls = tls if member.tls is TLSMode.IMPLICIT else None
        self._timeout = connect_timeout
        self._health = health
        self._loops_back = loops_back  # routes.is_own: the far end is authgate itself
        self._label = str(member.address)
        self._idle: deque[_Idle] = deque()
        self._slots: set[asyncio.Task[None]] = set()
        self._closed = False
        self.backoff_first = BACKOFF_FIRST
        self.claimed = 0  # logins that got a warm connection

    def __repr__(self) -> str:
        return f"WarmPool({self._label}, {len(self._idle)}/{self.size} ready)"

    @property
    def ready(self) -> int:
        """Warm connections waiting for a login now."""
        return len(self._idle)

    def start(self) -> None:
        """Begin filling (on the running loop); again: nothing."""
        if self._slots or self._closed or self.size <= 0:
            return
        loop = asyncio.get_running_loop()
        for _ in range(self.size):
            self._slots.add(loop.create_task(self._slot()))

    def claim(self) -> Channel | None:
        """A greeted connection for a login, now, or None (connect as
        usual). Ones found closed, talked on or too old are dropped."""
        if not self._idle:
            if self._slots:
                recorder().warm_claim(self._label, "miss")
            return None
        now = asyncio.get_running_loop().time()
        while self._idle:
            entry = self._idle.popleft()
            channel = entry.channel
            fresh = now - entry.born < self.max_age
            if (
                fresh
                and not entry.done.done()
                and not channel.lost
                and not channel.peer_ended
                and len(channel.buffered()) == entry.size
            ):
                channel.watch(None)
                entry.done.set_result(CLAIMED)
                self.claimed += 1
                recorder().warm_claim(self._label, "hit")
                return channel
            recorder().warm_claim(self._label, "stale")
            channel.close()
            if not entry.done.done():
                entry.done.set_result(CLOSED)
        recorder().warm_claim(self._label, "miss")
        return None

    async def close(self) -> None:
        """Stop filling and close every warm connection not claimed."""
        self._closed = True
        slots, self._slots = self._slots, set()
        for task in slots:
            task.cancel()
        if slots:
            await asyncio.gather(*slots, return_exceptions=True)
        while self._idle:
            self._idle.popleft().channel.close()

    # ------------------------------------------------------------ a slot

    async def _slot(self) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            if failures:
                await _pause(min(BACKOFF_MOST, self.backoff_first * 2 ** (failures - 1)))
            while not self._health.is_up(self.member.address, time.monotonic()):
                await _pause(DOWN_POLL)
            try:
                channel = await self._open()
            except (OSError, TimeoutError, ssl.SSLError) as exc:
                failures += 1
                why = str(exc) or exc.__class__.__name__
                log.debug("warm connection to %s failed: %s", self._label, why)
                continue
            done: asyncio.Future[str | None] = loop.create_future()
            entry = _Idle(channel, loop.time(), done)
            channel.watch(done)  # a byte, EOF or loss while it waits
            timer = loop.call_later(self.max_age, _resolve, done, AGED)
            self._idle.append(entry)
            try:
                outcome = await done
            except BaseException:
                channel.close()  # (close() closes the idle ones too)
                raise
            finally:
                timer.cancel()
            if outcome == CLAIMED:
                failures = 0
                continue
            with contextlib.suppress(ValueError):
                self._idle.remove(entry)
            channel.close()
            if outcome == AGED:
                failures = 0
            else:
                # The backend talked or hung up while the connection
                # waited: it may be refusing idle connections; back off.
                failures += 1
                log.debug("warm connection to %s ended by the backend while idle", self._label)

    async def _open(self) -> Channel:
        """Connect (and the implicit TLS handshake), then wait for a whole
        greeting line; raises OSError / TimeoutError / ssl.SSLError."""
        member = self.member
        channel = await open_channel(
            member.address.host,
            member.address.port,
            ssl_context=self._tls,
            server_hostname=member.server_name or member.address.host,
            timeout=self._timeout,
        )
        try:
            if self._loops_back(channel.peername(), channel.sockname()):
                raise ChannelClosed("is authgate itself (one of its own listeners)")
            await _greeted(channel, self._timeout)
        except BaseException:
            channel.close()
            raise
        return channel


async def _greeted(channel: Channel, timeout: float) -> None:
    """Until the buffer ends a line (the greeting, or its last line)."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        while not channel.buffered().endswith(b"\n"):
            if channel.peer_ended or channel.lost:
                raise ChannelClosed("closed before its greeting")
            waiter: asyncio.Future[None] = loop.create_future()
            channel.watch(waiter)
            try:
                await waiter
            finally:
                channel.watch(None)


def _resolve(future: asyncio.Future[str | None], value: str) -> None:
    if not future.done():
        future.set_result(value)
