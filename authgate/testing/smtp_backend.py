"""A small SMTP submission backend on aiosmtpd that delivers into the users' Maildirs.

AUTH PLAIN and LOGIN are offered without TLS (authgate terminates TLS in front of it)
and required before MAIL.  The recipient's local part names the user; unknown users
are rejected with 550.  Messages are stored exactly as received (after the SMTP dot
un-stuffing aiosmtpd does), with no trace headers added.

aiosmtpd's own PLAIN drops the authzid, so PLAIN is re-implemented here to support
master logins: authzid = the user, authcid/password = the master user's.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import ssl
import warnings
import weakref
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from authgate.testing.maildir import (
    Account,
    LoginRecord,
    MailStore,
    ServerHandle,
    parse_plain,
)

__all__ = ["start_smtp_backend"]

log = logging.getLogger(__name__)

_AUTH_INVALID = "535 5.7.8 Authentication credentials invalid"
# aiosmtpd log lines this backend triggers by design, once per connection or login.
_EXPECTED_WARNINGS = frozenset(
    {
        # Plaintext AUTH is the point: the backend sits behind authgate on loopback.
        "auth_required == True but auth_require_tls == False",
        # aiosmtpd itself sets the deprecated attribute after every successful AUTH.
        "Session.login_data is deprecated and will be removed in version 2.0",
    }
)


class _QuietNoTlsWarning(logging.Filter):
    """Drop aiosmtpd's warnings that are expected here; they would flood the demo's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() not in _EXPECTED_WARNINGS


def _install_log_filter() -> None:
    logger = logging.getLogger("mail.log")
    if not any(isinstance(f, _QuietNoTlsWarning) for f in logger.filters):
        logger.addFilter(_QuietNoTlsWarning())


def _local_part(address: str) -> str:
    local = address.rpartition("@")[0] if "@" in address else address
    if len(local) >= 2 and local.startswith('"') and local.endswith('"'):
        # A quoted local part (RFC 5321 section 4.1.2): drop quotes and backslashes.
        inner, out, escaped = local[1:-1], [], False
        for c in inner:
            if c == "\\" and not escaped:
                escaped = True
                continue
            out.append(c)
            escaped = False
        local = "".join(out)
    return local


class _SubmissionSMTP(SMTP):
    """aiosmtpd's SMTP with a PLAIN that keeps the authzid (RFC 4616 section 2)."""

    def __init__(self, store: MailStore, *args: Any, **kwargs: Any) -> None:
        self.store = store
        super().__init__(*args, **kwargs)

    def login_result(self, account: Account | None, mechanism: str) -> AuthResult:
        if account is None:
            return AuthResult(success=False, handled=False, message=_AUTH_INVALID)
        self.store.record(LoginRecord("smtp", mechanism, account.user, account.authcid))
        return AuthResult(success=True, auth_data=account)

    # aiosmtpd finds mechanisms by the "auth_" prefix; this replaces its own PLAIN.
    async def auth_PLAIN(self, _: object, args: list[str]) -> AuthResult:
        if len(args) == 1:
            response = await self.challenge_auth("")  # "334 " and read the reply
            if not isinstance(response, bytes):
                return AuthResult(success=False, handled=True)  # "*" or bad base64
        else:
            try:
                # RFC 4954 section 4: "=" is an empty initial response.
                response = b"" if args[1] == "=" else base64.b64decode(args[1], validate=True)
            except (binascii.Error, ValueError):
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        plain = parse_plain(response)
        if plain is None:
            await self.push("501 5.5.2 Malformed PLAIN response")
            return AuthResult(success=False, handled=True)
        return self.login_result(self.store.check_plain(*plain), "PLAIN")


def _authenticator(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
) -> AuthResult:
    """aiosmtpd's callback for its built-in LOGIN mechanism."""
    assert isinstance(server, _SubmissionSMTP)
    if not isinstance(auth_data, LoginPassword):
        return AuthResult(success=False, handled=False)
    try:
        user = auth_data.login.decode("utf-8")
        password = auth_data.password.decode("utf-8")
    except UnicodeDecodeError:
        return server.login_result(None, mechanism)
    return server.login_result(server.store.check_password(user, password), mechanism)


class _DeliveryHandler:
    """aiosmtpd handler: accept local users as recipients, deliver to their Maildirs."""

    def __init__(self, store: MailStore) -> None:
        self.store = store

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if _local_part(address) not in self.store.users:
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content
        assert isinstance(content, bytes)
        users = dict.fromkeys(_local_part(rcpt) for rcpt in envelope.rcpt_tos)
        for user in users:
            self.store.maildir(user).add(content)
        return f"250 2.0.0 OK: delivered to {len(users)} mailbox(es)"


async def start_smtp_backend(
    store: MailStore,
    host: str = "127.0.0.1",
    port: int = 0,
    ssl_context: ssl.SSLContext | None = None,
    hostname: str = "localhost",
) -> ServerHandle:
    """Start the SMTP submission backend on ``host:port`` (0: an ephemeral port)."""
    _install_log_filter()
    loop = asyncio.get_running_loop()
    handler = _DeliveryHandler(store)
    protocols: weakref.WeakSet[_SubmissionSMTP] = weakref.WeakSet()

    def factory() -> _SubmissionSMTP:
        with warnings.catch_warnings():
            # aiosmtpd warns that AUTH without TLS is risky: deliberate here (see above).
            warnings.filterwarnings("ignore", message="Requiring AUTH while not requiring TLS")
            protocol = _SubmissionSMTP(
                store,
                handler,
                hostname=hostname,
                enable_SMTPUTF8=True,
                auth_required=True,
                auth_require_tls=False,
                authenticator=_authenticator,
                loop=loop,
            )
        protocols.add(protocol)
        return protocol

    server = await loop.create_server(factory, host, port, ssl=ssl_context)
    bound_port = server.sockets[0].getsockname()[1]

    async def close() -> None:
        server.close()
        handlers = []
        for protocol in list(protocols):
            if protocol.transport is not None:
                protocol.transport.close()
            task = getattr(protocol, "_handler_coroutine", None)
            if task is not None:
                handlers.append(task)
        # connection_lost cancels aiosmtpd's per-connection task; wait for that so no
        # task outlives the test's event loop.
        if handlers:
            await asyncio.wait(handlers, timeout=5)
        await server.wait_closed()

    return ServerHandle(host=host, port=bound_port, protocol="smtp", store=store, _close=close)
