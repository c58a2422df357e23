"""Strict ALPN on our TLS listeners (ALPACA, USENIX Security 2021).

A browser can be made to send an HTTPS request to a mail server that holds
a certificate for the same name; a lenient mail server then reads the HTTP
request as mail commands (cross-protocol attacks). Browsers always offer
ALPN ("http/1.1", "h2"); mail clients offer none, or their protocol's. So a
listener knows its protocol's ALPN identifiers and, as RFC 7301 section 3.2
requires of a server that supports none of the client's protocols, ends the
handshake with a fatal `no_application_protocol` alert. A client without
ALPN is served as before. nginx (since 1.21.0) and Exim do the same.

Python's ssl module selects ALPN with OpenSSL's select callback but, when
nothing matches, lets the handshake go on without ALPN: it has no way to
refuse. So the listening context also watches the ClientHello (the ssl
module's message callback) and, from the server-name callback, which
OpenSSL runs later while still processing that ClientHello, returns the
alert. The server-name callback then moves the connection to a twin
context without the message callback, so established sessions pay no
Python call per TLS record.

asyncio (and uvloop) throw away what OpenSSL queued for the peer when a
handshake fails, so the alert would never leave: the client would see a
bare close. `_AlertingSSLObject` (the context's documented
`sslobject_class` hook) turns the refusal into one more "want read", which
makes the event loop send the queued alert; the next handshake step (the
client's close, or anything it sends) raises the refusal.
"""

from __future__ import annotations

import logging
import ssl
import weakref
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("authgate.tls")

# IANA's "TLS Application-Layer Protocol Negotiation (ALPN) Protocol IDs"
# registry lists "imap" and "pop3" (reference RFC 2595). SMTP has no
# registered identifier; "smtp" is the one nginx and Exim use. NNTP has
# "nntp" (reading) and "nnsp" (transit) in the registry (RFC 8143): a
# reader gateway takes "nntp".
PROTOCOL_IDS: dict[str, tuple[str, ...]] = {
    "imap": ("imap",),
    "pop3": ("pop3",),
    "smtp": ("smtp",),
    "nntp": ("nntp",),
    # Registered by IANA with reference RFC 5804.
    "managesieve": ("managesieve",),
    # LDAP has no registered identifier either; "ldap" is the obvious one
    # (libldap and python-ldap send no ALPN at all, and are served).
    "ldap": ("ldap",),
}

NO_APPLICATION_PROTOCOL = 120  # RFC 7301 section 3.2 alert
_HANDSHAKE = 22  # TLS record content type
_CLIENT_HELLO = 1  # handshake message type
_ALPN_EXTENSION = 16


class ClientHelloError(ValueError):
    """Not a well-formed ClientHello message."""


class _Reader:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def take(self, n: int) -> bytes:
        if n > len(self._data) - self._pos:
            raise ClientHelloError("truncated")
        chunk = self._data[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def number(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def vector(self, length_size: int) -> bytes:
        return self.take(self.number(length_size))

    @property
    def done(self) -> bool:
        return self._pos == len(self._data)


def offered_protocols(message: bytes) -> tuple[bytes, ...] | None:
    """The ALPN protocol names of a ClientHello handshake message (with its
    4-byte header, as the ssl module's message callback gives it), in the
    client's order; None when it has no ALPN extension.

    RFC 8446 section 4.1.2 (RFC 5246 section 7.4.1.2 for TLS 1.2, where the
    extensions may be absent), RFC 7301 section 3.1. Raises ClientHelloError
    for anything malformed, including an empty list or name."""
    outer = _Reader(message)
    if outer.number(1) != _CLIENT_HELLO:
        raise ClientHelloError("not a ClientHello")
    hello = _Reader(outer.vector(3))
    if not outer.done:
        raise ClientHelloError("bytes after the ClientHello")
    hello.take(2 + 32)  # legacy_version, random
    hello.vector(1)  # legacy_session_id
    hello.vector(2)  # cipher_suites
    hello.vector(1)  # legacy_compression_methods
    if hello.done:
        return None  # TLS 1.2 without extensions
    extensions = _Reader(hello.vector(2))
    if not hello.done:
        raise ClientHelloError("bytes after the extensions")
    names: tuple[bytes, ...] | None = None
    while not extensions.done:
        kind = extensions.number(2)
        body = extensions.vector(2)
        if kind != _ALPN_EXTENSION:
            continue
        if names is not None:
            raise ClientHelloError("two ALPN extensions")
        names = _protocol_name_list(body)
    return names


def _protocol_name_list(body: bytes) -> tuple[bytes, ...]:
    outer = _Reader(body)
    entries = _Reader(outer.vector(2))
    if not outer.done:
        raise ClientHelloError("bytes after the ALPN list")
    names = []
    while not entries.done:
        name = entries.vector(1)
        if not name:
            raise ClientHelloError("empty ALPN protocol name")
        names.append(name)
    if not names:
        raise ClientHelloError("empty ALPN list")
    return tuple(names)


# What each connection's ClientHello offered: filled by the message
# callback, read by the server-name callback of the same handshake.
_MALFORMED: tuple[bytes, ...] = ()
_offers: weakref.WeakKeyDictionary[Any, tuple[bytes, ...] | None] = weakref.WeakKeyDictionary()
# Connections whose handshake we refused, until the alert is on its way.
_refusing: weakref.WeakSet[Any] = weakref.WeakSet()


class _AlertingSSLObject(ssl.SSLObject):
    _refusal: ssl.SSLError | None = None

    def do_handshake(self) -> None:
        if self._refusal is not None:
            raise self._refusal
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as exc:
            if self not in _refusing:
                raise
            _refusing.discard(self)
            self._refusal = exc
            raise ssl.SSLWantReadError("sending the alert") from None


class _Guard:
    def __init__(self, ids: Sequence[str], session: ssl.SSLContext) -> None:
        self.ids = frozenset(i.encode("ascii") for i in ids)
        self.names = ", ".join(ids)
        self.session = session

    def message(
        self, conn: Any, direction: str, version: Any, content_type: int, msg_type: int, data: bytes
    ) -> None:
        if direction != "read" or content_type != _HANDSHAKE or msg_type != _CLIENT_HELLO:
            return
        try:
            _offers[conn] = offered_protocols(data)
        except ClientHelloError:
            _offers[conn] = _MALFORMED  # OpenSSL refuses it too; never serve it

    def server_name(self, conn: Any, name: str | None, context: ssl.SSLContext) -> int | None:
        offered = _offers.get(conn)
        if offered is not None and self.ids.isdisjoint(offered):
            shown = ", ".join(n.decode("ascii", "replace") for n in offered[:8])
            log.info(
                "TLS handshake refused: the client offered ALPN [%s], none of [%s]",
                "".join(c if c.isprintable() else "?" for c in shown[:200]),
                self.names,
            )
            _refusing.add(conn)
            return NO_APPLICATION_PROTOCOL
        conn.context = self.session
        return None


def make_strict(
    context: ssl.SSLContext, ids: Sequence[str], session: ssl.SSLContext
) -> ssl.SSLContext:
    """Make `context` (a server context) refuse clients whose ALPN list has
    none of `ids`; handshakes continue on `session`, a context with the same
    certificate and the same `ids`. Returns `context`."""
    guard = _Guard(ids, session)
    context.set_alpn_protocols(list(ids))
    session.set_alpn_protocols(list(ids))
    # The message callback is private in the ssl module (since 3.8, used by
    # its own tests); there is no public way to see the ClientHello.
    setattr(context, "_msg_callback", guard.message)  # noqa: B010
    context.sni_callback = guard.server_name
    context.sslobject_class = _AlertingSSLObject
    return context
