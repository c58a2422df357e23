"""One LDAP client connection: the asyncio driver of the message-aware relay.

The other protocols have two phases (pre-authentication, then a byte
splice; authgate.proxy.session). LDAP has one: a client may bind again at
any time, so `authgate.protocols.ldap.LdapRelay` sees every message of the
session in both directions, and this driver carries out what it asks:

* writes to the client and to the backend (connecting lazily, on the first
  message to forward, with the backend's TLS and PROXY header as
  configured: `authgate.proxy.upstream.connect`, and LDAP StartTLS toward a
  `tls = "starttls"` backend, written with the shared BER module);
* the client's StartTLS handshake (`Channel.start_tls`, which drops
  whatever plaintext was buffered: CVE-2011-0411), after closing the
  backend connection, so that no bind from before TLS carries over;
* the brute-force defence (`authgate.defence.Guard`): the address is
  checked before each bind is forwarded and again when its answer comes
  back; a locked-out user's bind fails with 49 without reaching the
  backend; a backend's 49 counts as a failed login, delayed like one;
* the audit log (login, login-failed, blocked) and the limits: idle and
  pre-authentication timeouts until the first successful bind (an
  anonymous session stays under them), max_errors through the machine.

The policy (authgate.policy via the listener's offer), the defence, the
audit trail, the TLS contexts and the channel are the ones every other
listener uses.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time

from authgate.config import TLSMode
from authgate.defence import Guard
from authgate.logs import LoginRecord, Outcome, failure_outcome, log_login
from authgate.metrics import recorder
from authgate.policy import Decision
from authgate.protocols import ber
from authgate.protocols import ldap as ldap_proto
from authgate.protocols.base import StartTLS
from authgate.protocols.ldap import (
    Action,
    Bind,
    BindDone,
    BindRefused,
    Close,
    LdapRelay,
    LdapSettings,
    ResetBackend,
    ToBackend,
    ToClient,
)
from authgate.proxy.auditing import AuditTrail
from authgate.proxy.channel import Channel, ChannelClosed
from authgate.proxy.connection import ClientConnection, connection_end_logged
from authgate.proxy.lograte import LogThrottle
from authgate.proxy.runtime import ListenerRuntime
from authgate.proxy.upstream import connect

log = logging.getLogger("authgate.session")

# A StartTLS response is a few dozen octets.
_MAX_STARTTLS_RESPONSE = 16384


class BackendUnavailable(Exception):
    """The backend could not be reached or made ready (TLS)."""


class LdapSession(ClientConnection):
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
        super().__init__(runtime, channel, guard, audit, client=client, notices=notices)
        self.backend: Channel | None = None
        self._decisions: dict[bool, Decision] = {}
        self._backend_read: asyncio.Future[bytes] | None = None
        self._bound_once = False
        self.started = time.time()  # wall clock: shown by `authgate sessions`
        self.user: str | None = None  # bound as (the last successful bind)
        listener = runtime.listener
        self.machine = LdapRelay(
            LdapSettings(
                decide=self._decide,
                starttls_available=listener.tls is TLSMode.STARTTLS,
                tls_active=listener.tls is TLSMode.IMPLICIT,
                max_errors=runtime.limits.max_errors,
            )
        )

    def _decide(self, tls: bool) -> Decision:
        decision = self._decisions.get(tls)
        if decision is None:
            decision = self._decisions[tls] = self.runtime.offer.decide(self.address, tls=tls)
        return decision

    def describe(self) -> dict[str, str | int | None]:
        """What `authgate sessions` shows of this session."""
        return {
            "listener": self.runtime.listener.name,
            "client": self.peer[0],
            "client_port": self.peer[1],
            "user": self.user,
            "phase": "bound" if self.machine.authenticated else "anonymous",
            "since": int(self.started),
        }

    def _login_outcome(
        self, outcome: Outcome, *, user: str | None, mechanism: str | None, reason: str | None
    ) -> None:
        """The one login record of a bind's outcome (authgate.logs), as
        every other listener writes it (fail2ban reads these)."""
        name = self.runtime.listener.name
        recorder().login(name, mechanism or "-", outcome.value, reason or "", 0.0)
        tls = self.client.tls
        backend = self.runtime.listener.backend.address
        log_login(
            LoginRecord(
                outcome=outcome.value,
                listener=name,
                client=self.peer[0],
                client_port=self.peer[1],
                proxy=self.client.peername()[0] if self.via_balancer else None,
                user=user,
                mechanism=mechanism,
                tls=None if tls is None else tls.version(),
                reason=reason,
                backend=None if outcome is Outcome.REFUSED else str(backend),
                duration_ms=0,
            )
        )

    # ------------------------------------------------------------ main loop

    async def run(self) -> None:
        try:
            with connection_end_logged(self.tag):
                await self._serve()
        finally:
            if self._backend_read is not None:
                self._backend_read.cancel()
            self.client.close()
            if self.backend is not None:
                self.backend.close()

    async def _serve(self) -> None:
        if await self._blocked():
            return
        limits = self.runtime.limits
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limits.preauth_timeout
        first_read = True
        client_read: asyncio.Future[bytes] | None = None
        try:
            while True:
                if client_read is None:
                    timeout = None
                    if not self._bound_once:
                        timeout = min(limits.idle_timeout, deadline - loop.time())
                        if timeout <= 0:
                            await self._idle_goodbye()
                            return
                    client_read = asyncio.ensure_future(self.client.read(timeout=timeout))
                if self.backend is not None and self._backend_read is None:
                    self._backend_read = asyncio.ensure_future(self.backend.read())
                waiting = {f for f in (client_read, self._backend_read) if f is not None}
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                backend_read = self._backend_read
                if backend_read is not None and backend_read in done:
                    self._backend_read = None
                    data = backend_read.result()
                    if not data:
                        log.info("%s: backend closed the connection", self.tag)
                        return
                    if not await self._act(self.machine.receive_backend(data)):
                        return
                if client_read in done:
                    read, client_read = client_read, None
                    try:
                        data = read.result()
                    except TimeoutError:
                        if self._bound_once:
                            continue  # bound while this read waited: no timeout now
                        await self._idle_goodbye()
                        return
                    if not data:
                        log.info("%s: client closed the connection", self.tag)
                        return
                    if first_read and self._spoofed_header(data):
                        return
                    first_read = False
                    if not await self._act(self.machine.receive_client(data)):
                        return
                await self.client.drain()
        finally:
            if client_read is not None:
                client_read.cancel()

    async def _act(self, actions: list[Action]) -> bool:
        """Carry out the machine's actions in order; False: the session is over."""
        for action in actions:
            if isinstance(action, ToClient):
                self.client.write(action.data)
            elif isinstance(action, ToBackend):
                if not await self._to_backend(action.data):
                    return False
            elif isinstance(action, Bind):
                if await self._blocked():
                    return False
                if action.user is not None and self.guard.user_locked(action.user, self.address):
                    log.info("%s: user %r is locked out", self.tag, action.user)
                    self._note(
                        "login-failed",
                        user=action.user,
                        mechanism=action.mechanism,
                        reason="locked-out",
                    )
                    self._login_outcome(
                        Outcome.FAILED,
                        user=action.user,
                        mechanism=action.mechanism,
                        reason="locked-out",
                    )
                    if not await self._act(self.machine.bind_refused(action.message_id)):
                        return False
                    continue
                if not await self._to_backend(action.data):
                    return False
            elif isinstance(action, BindRefused):
                self._refused(action)
            elif isinstance(action, BindDone):
                if not await self._bind_done(action):
                    return False
            elif isinstance(action, ResetBackend):
                self._drop_backend()
            elif isinstance(action, StartTLS):
                await self._start_tls(action)
                # The machine asks for nothing after a handshake.
                self.machine.tls_started()
            elif isinstance(action, Close):
                log.info("%s: closing: %s", self.tag, action.reason)
                await self.client.drain()
                return False
            else:  # pragma: no cover - every action type is handled above
                raise RuntimeError(f"unhandled action {action!r}")
        return True

    # -------------------------------------------------------------- client

    async def _start_tls(self, event: StartTLS) -> None:
        context = self.runtime.server_tls
        if context is None:
            raise RuntimeError("StartTLS on a listener without TLS")
        dropped = event.discarded + await self.client.start_tls(
            context, server_side=True, timeout=self.runtime.limits.handshake_timeout
        )
        if dropped:
            log.warning(
                "%s: dropped %d bytes sent before the TLS handshake (STARTTLS injection?)",
                self.tag,
                dropped,
            )

    async def _blocked(self) -> bool:
        verdict = self.guard.check(self.address)
        if not verdict.blocked:
            return False
        log.info("%s: refused, address blocked for %.0fs more", self.tag, verdict.retry_after)
        self._note("blocked", retry_after=int(verdict.retry_after))
        recorder().blocked(self.runtime.listener.name)
        self._login_outcome(Outcome.BLOCKED, user=None, mechanism=None, reason="blocked")
        self.client.write(self.runtime.parts.blocked)
        await self.client.drain()
        return True

    # --------------------------------------------------------------- binds

    def _refused(self, action: BindRefused) -> None:
        who = f" as {action.user!r}" if action.user else ""
        log.info(
            "%s: %s bind refused%s: %s (result %d)",
            self.tag,
            action.mechanism,
            who,
            action.reason,
            action.code,
        )
        self._note(
            "login-failed", user=action.user, mechanism=action.mechanism, reason=action.reason
        )
        self._login_outcome(
            Outcome.REFUSED, user=action.user, mechanism=action.mechanism, reason=action.reason
        )

    async def _bind_done(self, done: BindDone) -> bool:
        if done.anonymous or done.code == ldap_proto.ResultCode.SASL_BIND_IN_PROGRESS:
            return True
        # Blocked while the backend checked (other connections guessing):
        # the blocked answer, for a right and a wrong password alike.
        if await self._blocked():
            return False
        if done.code == ldap_proto.ResultCode.SUCCESS:
            self._bound_once = True
            log.info("%s: authenticated %r via %s", self.tag, done.user, done.mechanism)
            if done.user is not None:
                self.guard.success(self.address, done.user)
            self._note("login", user=done.user, authcid=done.user, mechanism=done.mechanism)
            self.user = done.user or "?"
            self._login_outcome(Outcome.OK, user=done.user, mechanism=done.mechanism, reason=None)
            return True
        reason = "invalid-credentials" if done.guess else f"result-{done.code}"
        who = f" as {done.user!r}" if done.user else ""
        log.info("%s: %s bind failed%s: %s", self.tag, done.mechanism, who, reason)
        self._note("login-failed", user=done.user, mechanism=done.mechanism, reason=reason)
        self._login_outcome(
            failure_outcome(reason), user=done.user, mechanism=done.mechanism, reason=reason
        )
        if done.guess:
            delay = self.guard.failure(self.address, done.user, None)
            recorder().penalty(self.runtime.listener.name, delay)
            # Holds back this session's answer only (its BindResponse is the
            # next action); other sessions run on.
            await asyncio.sleep(delay)
        return True

    # ------------------------------------------------------------- backend

    async def _to_backend(self, data: bytes) -> bool:
        if self.backend is None:
            try:
                self.backend = await self._connect()
            except BackendUnavailable as exc:
                log.warning("%s: backend unavailable: %s", self.tag, exc)
                self.client.write(self.runtime.parts.unavailable)
                await self.client.drain()
                return False
        self.backend.write(data)
        await self.backend.drain()
        return True

    def _drop_backend(self) -> None:
        if self._backend_read is not None:
            self._backend_read.cancel()
            self._backend_read = None
        if self.backend is not None:
            self.backend.close()
            self.backend = None

    async def _connect(self) -> Channel:
        runtime = self.runtime
        backend = runtime.listener.backend
        timeout = runtime.limits.connect_timeout
        try:
            channel = await connect(
                backend, runtime.backend_tls, client=self.peer, local=self.local, timeout=timeout
            )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            raise BackendUnavailable(f"{backend.address}: {exc}") from None
        if backend.tls is TLSMode.STARTTLS:
            try:
                async with asyncio.timeout(runtime.limits.backend_timeout):
                    await self._backend_starttls(channel)
            except (TimeoutError, OSError, ssl.SSLError, ber.BerError) as exc:
                channel.close()
                raise BackendUnavailable(f"StartTLS with {backend.address}: {exc}") from None
        return channel

    async def _backend_starttls(self, channel: Channel) -> None:
        """LDAP StartTLS toward the backend. Bytes it sends after its
        response, before the handshake, are refused (response injection)."""
        context = self.runtime.backend_tls
        if context is None:
            raise ssl.SSLError("no TLS context for the backend")
        channel.write(ber.starttls_request())
        buffer = b""
        while True:
            data = await channel.read()
            if not data:
                raise ChannelClosed("backend closed the connection during StartTLS")
            buffer += data
            parsed = ber.split(buffer, _MAX_STARTTLS_RESPONSE)
            if parsed is not None:
                break
        if parsed[2]:
            raise ber.BerError("the backend sent data after its StartTLS response")
        code = ber.starttls_result(buffer)
        if code != 0:
            raise ber.BerError(f"the backend refused StartTLS (result code {code})")
        backend = self.runtime.listener.backend
        await channel.start_tls(
            context,
            server_side=False,
            server_hostname=backend.server_name or backend.address.host,
            timeout=self.runtime.limits.backend_timeout,
        )
