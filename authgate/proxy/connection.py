"""What every client connection's driver shares: the mail sessions'
(authgate.proxy.session) and LDAP's (authgate.proxy.ldap_session).

Who the client is (a trusted balancer's PROXY header, else the peer), the
audit notes, the goodbye to a client silent too long before it
authenticates, the refusal of a PROXY header that was not ours to accept,
and how a connection's end is logged."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Iterator

from authgate.defence import Guard
from authgate.policy import IPAddress, client_ip
from authgate.proxy import proxy_protocol
from authgate.proxy.auditing import AuditTrail
from authgate.proxy.channel import Channel, ChannelClosed
from authgate.proxy.lograte import LogThrottle
from authgate.proxy.runtime import ListenerRuntime

log = logging.getLogger("authgate.session")


@contextlib.contextmanager
def connection_end_logged(tag: str) -> Iterator[None]:
    """Log how a connection ended, once, and never to the client: a
    timeout, a channel closed with our own text (a failed TLS handshake),
    a connection or TLS error by its class, anything else as our bug."""
    try:
        yield
    except TimeoutError:
        log.info("%s: timed out", tag)
    except ChannelClosed as exc:  # our own text (e.g. a failed TLS handshake)
        log.info("%s: connection ended: %s", tag, exc)
    except (ConnectionError, ssl.SSLError) as exc:
        log.info("%s: connection ended: %s", tag, exc.__class__.__name__)
    except Exception:
        # Our bug, not the client's: log it for us, close for them.
        log.exception("%s: internal error", tag)


class ClientConnection:
    """The client side of one connection, as every listener's driver keeps it."""

    # No per-instance dict for ClientSession, which adds __slots__ of its own.
    __slots__ = (
        "address",
        "audit",
        "client",
        "guard",
        "local",
        "notices",
        "peer",
        "runtime",
        "tag",
        "via_balancer",
    )

    runtime: ListenerRuntime
    guard: Guard
    audit: AuditTrail
    client: Channel
    notices: LogThrottle
    peer: tuple[str, int]
    via_balancer: bool
    address: IPAddress | str
    local: tuple[str, int]
    tag: str

    def __init__(
        self,
        runtime: ListenerRuntime,
        channel: Channel,
        guard: Guard,
        audit: AuditTrail,
        *,
        client: tuple[str, int] | None = None,
        notices: LogThrottle | None = None,
    ) -> None:
        self.runtime = runtime
        self.guard = guard
        self.audit = audit
        self.client = channel
        # Rate-limited warnings, shared by the gateway's sessions.
        self.notices = notices or LogThrottle()
        # The real client: from a trusted balancer's PROXY header, else the peer.
        self.peer = client or channel.peername()
        self.via_balancer = client is not None
        # Parsed once: the policy and the defence each ask about it.
        # (Not an IP, a Unix socket say: the text; policy and defence cope.)
        self.address = client_ip(self.peer[0]) or self.peer[0]
        self.local = channel.sockname()
        self.tag = f"{runtime.listener.name} {self.peer[0]}:{self.peer[1]}"

    def _note(self, event: str, **fields: str | int | None) -> None:
        self.audit.note(event, listener=self.runtime.listener.name, client=self.peer[0], **fields)

    async def _idle_goodbye(self) -> None:
        log.info("%s: timeout before authentication", self.tag)
        with contextlib.suppress(ChannelClosed):
            self.client.write(self.runtime.parts.goodbye)
            await asyncio.wait_for(self.client.drain(), 5)

    def _spoofed_header(self, data: bytes) -> bool:
        """A PROXY header from a peer that is not a trusted balancer would let
        anyone claim an exempt address: refuse the connection. Behind a
        balancer, whose own header was already read, a second one comes from
        the client: refused too."""
        if not self.runtime.listener.proxy_protocol:
            return False
        if not proxy_protocol.looks_like_header(data):
            return False
        if self.via_balancer:
            why = f"a second PROXY header (via trusted proxy {self.client.peername()[0]})"
        else:
            why = "a PROXY header from an address not in trusted_proxies"
        # A flood of these must not flood the log.
        kind = f"{self.runtime.listener.name}:proxy-header-spoofed"
        self.notices.warning(log, kind, "%s: refused, %s", self.tag, why)
        self._note("proxy-header-refused")
        return True
