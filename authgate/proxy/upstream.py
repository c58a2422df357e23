"""The backend side: connect, tell it the client's address, log in.

The protocol text lives in the client machines (authgate.protocols); this
module only moves their bytes, runs TLS handshakes they ask for, and runs
the key derivations they ask for (SCRAM's PBKDF2) in a worker thread.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Iterable

from authgate.config import BackendSettings, ClientAddressForwarding, TLSMode
from authgate.protocols.base import (
    BackendFailure,
    ClientEvent,
    ClientMachine,
    LoggedIn,
    LoginFailed,
    RelayChallenge,
    Send,
    StartTLS,
)
from authgate.proxy.channel import Channel, ChannelClosed, open_channel
from authgate.proxy.proxy_protocol import build_v2
from authgate.sasl.base import Derive

LoginStep = LoggedIn | LoginFailed | RelayChallenge


async def connect(
    settings: BackendSettings,
    tls_context: ssl.SSLContext | None,
    *,
    client: tuple[str, int],
    local: tuple[str, int],
    timeout: float,
) -> Channel:
    """Open the backend connection (implicit TLS if configured) and send the
    PROXY v2 header first when the backend expects one."""
    implicit = settings.tls is TLSMode.IMPLICIT
    channel = await open_channel(
        settings.address.host,
        settings.address.port,
        ssl_context=tls_context if implicit else None,
        server_hostname=settings.server_name or settings.address.host,
        timeout=timeout,
    )
    if settings.client_address is ClientAddressForwarding.PROXY_V2:
        channel.write(build_v2(client, local))
    return channel


class Upstream:
    """A backend connection driven by a client machine."""

    __slots__ = ("_server_name", "_timeout", "_tls_context", "channel", "machine", "timed_out")

    def __init__(
        self,
        channel: Channel,
        machine: ClientMachine,
        *,
        tls_context: ssl.SSLContext | None,
        server_name: str,
        timeout: float,
    ) -> None:
        self.channel = channel
        self.machine = machine
        self._tls_context = tls_context
        self._server_name = server_name
        self._timeout = timeout
        # The last advance() ended because the backend did not answer in
        # time (passive health marks the member down).
        self.timed_out = False

    async def advance(self, events: Iterable[ClientEvent] = ()) -> LoginStep:
        """Act on the machine's events and feed it the backend's bytes until it
        has a result: logged in, failed, or (relay mode) a challenge. All of
        it within the backend timeout: each wait for the backend gets what
        is left of it (a timer on the one future waited on, not an
        asyncio.timeout per call: every login makes this call)."""
        queue: deque[ClientEvent] = deque(events)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        try:
            while True:
                while queue:
                    event = queue.popleft()
                    if isinstance(event, Send):
                        self.channel.write(event.data)
                    elif isinstance(event, StartTLS | Derive):
                        async with asyncio.timeout_at(deadline):
                            queue.extend(await self._act(event))
                    else:
                        return event
                data = await self.channel.read(timeout=deadline - loop.time())
                if not data:
                    return self.machine.connection_ended("backend closed the connection")
                queue.extend(self.machine.receive_data(data))
        except TimeoutError:
            self.timed_out = True
            return LoginFailed(BackendFailure.UNAVAILABLE, "backend did not answer in time")
        except (ChannelClosed, ConnectionError, ssl.SSLError) as exc:
            return self.machine.connection_ended(f"backend connection failed: {exc}")

    async def _act(self, event: StartTLS | Derive) -> list[ClientEvent]:
        """The two events that take a while: a TLS handshake, a key derivation."""
        if isinstance(event, StartTLS):
            await self._start_tls()
            return self.machine.tls_started()
        # PBKDF2 at the backend's iteration count: never on the event loop
        # (hashlib releases the GIL).
        key = await asyncio.to_thread(event.compute)
        return self.machine.derived(key)

    async def _start_tls(self) -> None:
        if self._tls_context is None:
            raise ChannelClosed("backend STARTTLS without a TLS context")
        # Anything the backend sent before the handshake is dropped by the
        # channel (response injection, the mirror image of CVE-2011-0411).
        await self.channel.start_tls(
            self._tls_context,
            server_side=False,
            server_hostname=self._server_name,
            timeout=self._timeout,
        )

    def close(self) -> None:
        self.channel.close()
