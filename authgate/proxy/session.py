"""One client connection: drive the protocol machine, then splice.

Two phases, each a function that returns a value: `_preauth()` acts on the
machine's events (send, start TLS, resolve a credential lookup off the event
loop, log in to the backend) and returns a `Handover`, or None when the
session ends before one; `_splice(handover)` then connects the two sides.
The machine decides every byte of protocol text in the dialogue; the few
lines the driver says itself come from the protocol's module
(`ListenerRuntime.parts`).
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeAlias

from authgate.client_certs import user_of_certificate
from authgate.config import BackendSettings, ClientAddressForwarding, TLSMode
from authgate.credentials.base import CredentialsUnavailable
from authgate.credentials.store import UserStore
from authgate.defence import Guard
from authgate.logs import LoginRecord, Outcome, failure_outcome, log_login
from authgate.metrics import recorder
from authgate.password_policy import ExpiryState, expiry_status
from authgate.policy import Decision, Protocol, Withheld, client_ip
from authgate.protocols.base import (
    Authenticated,
    AuthFailed,
    BackendFailure,
    ClientSettings,
    Close,
    Event,
    LoggedIn,
    LoginFailed,
    RelayAuth,
    RelayChallenge,
    RelayResponse,
    Send,
    SessionSettings,
    Splice,
    StartTLS,
)
from authgate.protocols.managesieve import ManageSieveSpliceFilter
from authgate.protocols.smtp_splice import Refused, SmtpSpliceFilter, SpliceEnded
from authgate.proxy.auditing import AuditTrail
from authgate.proxy.channel import Channel
from authgate.proxy.connection import ClientConnection, connection_end_logged
from authgate.proxy.lograte import LogThrottle
from authgate.proxy.routes import ListenerRoutes, is_own
from authgate.proxy.runtime import ListenerRuntime
from authgate.proxy.splice import Handover, hand_over
from authgate.proxy.upstream import LoginStep, Upstream, connect
from authgate.routing import Backend, RoutingError, UserHints
from authgate.sasl.base import (
    NO_RESPONSE,
    STORE_UNAVAILABLE,
    ClientContext,
    ClientCredentials,
    FailureReason,
    InitialResponse,
    Lookup,
    LookupAnswer,
    LookupRequest,
    PasswordCheck,
    PasswordVerdict,
    ServerContext,
    TokenCheck,
    TokenVerdict,
    password_answer,
)
from authgate.sasl.relayed import relayed_user

log = logging.getLogger("authgate.session")

# Relay mode routing: mechanisms whose first client message names the user
# and answers a first challenge that does not depend on the backend, which
# we may then say ourselves before we know which backend to ask: PLAIN and
# SCRAM start with an empty challenge (RFC 4422 section 5: a client without
# an initial response gets one), LOGIN's is the fixed "Username:". CRAM-MD5,
# DIGEST-MD5 and NTLM name the user only in answer to the backend's own
# challenge (a nonce the answer is bound to): they go to the default backend.
@dataclass(frozen=True)
class Referral:
    """The user's backend is on another site: tell the client where
    (RFC 2221), connect nowhere."""

    url: str


HELD_FIRST_CHALLENGE: dict[str, bytes] = {
    "PLAIN": b"",
    "LOGIN": b"Username:",
    "SCRAM-SHA-1": b"",
    "SCRAM-SHA-256": b"",
}

# Relayed bearer-token mechanisms: the backend's challenge after the token is
# its refusal (see _relay_step).
BEARER_RELAYED = frozenset({"OAUTHBEARER", "XOAUTH2"})


# AuthFailed reasons that mean "wrong credentials": the ones a password
# guesser produces. Policy refusals, cancels, malformed input (capped by
# max_errors) and backend faults are not guesses.
GUESS_REASONS = frozenset(
    {FailureReason.INVALID_CREDENTIALS.value, FailureReason.AUTHZ_DENIED.value}
)

# What acting on one event leads to: the events to act on next (the hand-over
# among them, in place of the machine's Splice), or None: the session is over.
_Next: TypeAlias = Sequence[Event | Handover] | None


@functools.lru_cache(maxsize=256)  # a listener's few local addresses
def _digest_aliases(hostnames: tuple[str, ...], local: str) -> tuple[str, ...]:
    """The names a DIGEST-MD5 digest-uri may give for us: our hostname, our
    other names, or the address the client connected to (clients put there
    whatever they typed, an IP address included)."""
    local_ip = client_ip(local)
    if local_ip is None or local_ip.is_unspecified:
        return hostnames
    return (*hostnames, str(local_ip))


class ClientSession(ClientConnection):
    # One per connection: no per-instance dict (memory per held session).
    __slots__ = (
        "_aliases",
        "_app_password",
        "_attempt_started",
        "_backend_capabilities",
        "_backend_tried",
        "_decisions",
        "_external",
        "_fingerprint",
        "_member",
        "_relay_held",
        "_relay_mechanism",
        "_relay_messages",
        "_relay_user",
        "_secret_looked_up",
        "_token_refused",
        "machine",
        "started",
        "upstream",
        "user",
    )

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
        # Relay mode: the exchange being relayed, how many client messages
        # it has carried, and the user one of them named (relayed_user).
        self._relay_mechanism = ""
        self._relay_messages = 0
        self._relay_user: str | None = None
        # Terminate mode: a secret was looked up for the attempt in progress.
        self._secret_looked_up = False
        # The label of the app password the attempt in progress matched.
        self._app_password: str | None = None
        # The attempt in progress offered a bearer token that was refused.
        self._token_refused = False
        # The user of the TLS client certificate, once looked at (EXTERNAL).
        self._external: tuple[str | None] | None = None
        # (user, keyed hash of the password) of the last cleartext password
        # checked: lets the defence recognise a stale password sent again.
        self._fingerprint: tuple[str, bytes] | None = None
        # When the attempt in progress began (its first lookup or relayed
        # message): a login record's duration is authgate's part of it.
        self._attempt_started: float | None = None
        self.started = time.time()  # wall clock: shown by `authgate sessions`
        self.user: str | None = None  # once logged in
        self._backend_tried: str | None = None  # the backend the attempt involved
        self._decisions: dict[bool, Decision] = {}
        self._aliases = _digest_aliases(runtime.listener.hostnames, self.local[0])
        self.upstream: Upstream | None = None
        # What the backend announced, for a greeting that repeats it
        # (ProtocolParts.greeting_from_backend), read before start().
        self._backend_capabilities: tuple[str, ...] = ()
        # The backend and member the upstream connection went to.
        self._member: tuple[Backend, BackendSettings] | None = None
        # Relay mode: we said a mechanism's first challenge ourselves and
        # wait for the answer that names the user (HELD_FIRST_CHALLENGE).
        self._relay_held = False
        listener = runtime.listener
        limits = runtime.limits
        self.machine: Any = runtime.parts.server(
            SessionSettings(
                hostname=runtime.hostname,
                decide=self._decide,
                sasl_context=self._sasl_context,
                starttls_available=listener.tls is TLSMode.STARTTLS,
                tls_active=listener.tls is TLSMode.IMPLICIT,
                relay=runtime.relay,
                submission=listener.submission,
                max_line=runtime.max_line,
                max_errors=limits.max_errors,
                max_commands=limits.max_commands,
                backend_capabilities=lambda: self._backend_capabilities,
            )
        )

    def _decide(self, tls: bool) -> Decision:
        """The policy's answer for this client, with and without TLS (pure:
        computed once per session and TLS state)."""
        decision = self._decisions.get(tls)
        if decision is None:
            decision = self.runtime.offer.decide(self.address, tls=tls)
            if "EXTERNAL" in decision.offered and self._external_identity() is None:
                decision = decision.withhold(("EXTERNAL",), Withheld.NO_CLIENT_CERT)
            self._decisions[tls] = decision
        return decision

    def _external_identity(self) -> str | None:
        """The user this connection's verified TLS client certificate maps
        to (the handshake verified it against client_ca), or None."""
        settings = self.runtime.listener.client_cert
        tls = self.client.tls
        if settings is None or tls is None:
            return None
        if self._external is not None:
            return self._external[0]  # one handshake, one certificate
        cert, der = tls.getpeercert(), tls.getpeercert(binary_form=True)
        store = self.runtime.store
        by_fingerprint = getattr(store, "user_for_fingerprint", lambda _fp: None)
        user = None
        if cert and der is not None:
            user = user_of_certificate(settings.rule, cert, der, by_fingerprint)
        if user is not None and isinstance(store, UserStore) and user not in store:
            user = None  # names someone the users file does not know
        if user is None and cert:
            log.info("%s: client certificate maps to no user", self.tag)
        self._external = (user,)
        return user

    def _sasl_context(self, tls: bool) -> ServerContext:
        """What the mechanisms learn about this connection, for implicit TLS
        and after STARTTLS alike. Channel binding: see Decision.binds_channel
        (the machines get no binding data of their own)."""
        binding = self.runtime.channel_binding
        if not (tls and binding is not None and self._decide(tls).binds_channel):
            binding = None
        oauth = self.runtime.tokens.settings if self.runtime.tokens is not None else None
        return ServerContext(
            service=self.runtime.parts.sasl_service,
            hostname=self.runtime.hostname,
            aliases=self._aliases,
            channel_binding=None if binding is None else ("tls-server-end-point", binding),
            allow_ntlm_legacy=self.runtime.listener.policy.allow_ntlm_legacy,
            oauth_scope=oauth.scope if oauth is not None else "",
            oauth_configuration=oauth.openid_configuration if oauth is not None else "",
            external_identity=self._external_identity() if tls else None,
        )

    # ------------------------------------------------------------ main loop

    async def run(self) -> None:
        metrics = recorder()
        name = self.runtime.listener.name
        try:
            with connection_end_logged(self.tag):
                metrics.preauth_started(name)
                try:
                    handover = await self._preauth()
                finally:
                    metrics.preauth_ended(name)
                if handover is not None:
                    await self._splice(handover)
        finally:
            if self._token_refused:
                # A refused bearer token whose error challenge was never
                # answered (the client hung up or timed out): still a guess.
                self._token_refused = False
                log.info("%s: bearer token refused; error challenge left unanswered", self.tag)
                self.guard.failure(self.address, self._relay_user)
            self.client.close()
            if self.upstream is not None:
                self.upstream.close()

    async def _preauth(self) -> Handover | None:
        """Drive the machine until it hands the client over to the backend,
        or None: the session ended first (closed, refused, timed out)."""
        if await self._blocked():
            return None
        if self.runtime.parts.greeting_from_backend and not await self._ask_backend():
            return None
        limits = self.runtime.limits
        # time.monotonic(), a monotonic clock like loop.time(), without
        # get_running_loop()'s getpid() system call (CPython 3.11).
        deadline = time.monotonic() + limits.preauth_timeout
        queue: deque[Event | Handover] = deque(self.machine.start())
        first_read = True
        while True:
            while queue:
                item = queue.popleft()
                if isinstance(item, Handover):
                    return item
                step = await self._handle(item)
                if step is None:
                    return None
                queue.extend(step)
            await self.client.drain()
            # Idle timeout, and a cap on the whole pre-authentication phase
            # (a slow client trickling one byte a minute must not stay forever).
            wait = min(limits.idle_timeout, deadline - time.monotonic())
            try:
                if wait <= 0:
                    raise TimeoutError
                data = await self.client.read(timeout=wait)
            except TimeoutError:
                await self._idle_goodbye()
                return None
            if not data:
                log.info("%s: client closed before authenticating", self.tag)
                return None
            if first_read and self._spoofed_header(data):
                return None
            first_read = False
            # Mid-exchange with the user's secret at hand (SCRAM): this
            # message may carry the proof the machine checks at once.
            if self._secret_looked_up and await self._blocked():
                return None
            queue.extend(self.machine.receive_data(data))

    async def _handle(self, event: Event) -> _Next:
        if isinstance(event, Send):
            self.client.write(event.data)
            return []
        if isinstance(event, StartTLS):
            return await self._start_tls(event)
        # The address may have been blocked since this connection opened
        # (parallel connections guessing): asked again before every
        # credential is checked, and before any outcome is acted on, the
        # same way for a right and a wrong one (no oracle).
        checked = isinstance(event, Lookup | Authenticated | RelayAuth | RelayResponse)
        if checked and await self._blocked():
            return None
        if self._attempt_started is None and isinstance(event, Lookup | RelayAuth | Authenticated):
            self._attempt_started = time.monotonic()
        if isinstance(event, Lookup):
            return await self._lookup(event.request)
        if isinstance(event, Authenticated):
            return await self._login_as(event)
        if isinstance(event, RelayAuth):
            return await self._relay_start(event)
        if isinstance(event, RelayResponse):
            return await self._relay_respond(event)
        if isinstance(event, AuthFailed):
            return await self._auth_failed(event)
        if isinstance(event, Splice):
            # After a backend login the machine's Splice became a Handover
            # (_logged_in); one that comes here is SMTP's pass-through.
            if self.upstream is not None:
                raise RuntimeError("Splice without a hand-over after a backend login")
            return await self._pass_through(event)
        if isinstance(event, Close):
            await self.client.drain()
            return None
        raise RuntimeError(f"unhandled event {event!r}")

    async def _lookup(self, request: LookupRequest) -> list[Event]:
        if isinstance(request, TokenCheck):
            return await self._check_token(request)
        store = self.runtime.store
        if store is None:  # relay mode never verifies locally
            raise RuntimeError("credential lookup on a listener without a store")
        answer: LookupAnswer
        if isinstance(request, PasswordCheck):
            # App passwords may be limited to protocols; their use is
            # recorded with the client's address.
            # (Made anew, not dataclasses.replace: every password login does this.)
            protocol = self.runtime.listener.protocol.value
            request = PasswordCheck(
                request.authcid, request.password, protocol=protocol, client=self.peer[0]
            )
        if self.guard.user_locked(request.authcid, self.address):
            # A locked user fails like a wrong password: no oracle for guessers.
            log.info("%s: user %r is locked out", self.tag, request.authcid)
            answer = False if isinstance(request, PasswordCheck) else None
        else:
            try:
                answer = await store.aresolve(request)
            except CredentialsUnavailable as exc:
                log.warning("%s: credential store unavailable: %s", self.tag, exc)
                answer = STORE_UNAVAILABLE  # a temporary failure, not a wrong password
        if isinstance(answer, PasswordVerdict) and answer.identity is not None:
            # The store knows the user by another name than the one typed
            # (a directory's canonical uid): the lockout is that user's.
            identity = answer.identity
            if answer.valid and self.guard.user_locked(identity, self.address):
                log.info("%s: user %r is locked out", self.tag, identity)
                answer = PasswordVerdict(False, identity)
        self._app_password = None
        if isinstance(answer, PasswordVerdict) and answer.valid:
            self._app_password = answer.app_password
        if isinstance(request, PasswordCheck) and answer is not STORE_UNAVAILABLE:
            valid, canonical = password_answer(answer)
            if not valid:
                # Only a wrong password needs its keyed hash (a stale password
                # sent again counts once); a right one is never hashed here.
                # Under the name the failure will be reported with.
                user = canonical or request.authcid
                self._fingerprint = (user, self.guard.fingerprint(user, request.password))
        self._secret_looked_up = True  # until the attempt's outcome
        events: list[Event] = self.machine.resume(answer)
        return events

    async def _check_token(self, request: TokenCheck) -> list[Event]:
        """OAUTHBEARER / XOAUTH2: the token verifier answers, off the loop."""
        tokens = self.runtime.tokens
        if tokens is None:  # policy offers bearer mechanisms only with [oauth]
            raise RuntimeError("token check on a listener without a token verifier")
        answer: LookupAnswer
        if request.user and self.guard.user_locked(request.user, self.address):
            log.info("%s: user %r is locked out", self.tag, request.user)
            answer = TokenVerdict(False, None, "user locked out")
        else:
            answer = await tokens.averify(request)
        if isinstance(answer, TokenVerdict):
            if answer.valid and answer.user and self.guard.user_locked(answer.user, self.address):
                log.info("%s: user %r is locked out", self.tag, answer.user)
                answer = TokenVerdict(False, None, "user locked out")
            # A refused token is a failed guess even if the client then
            # cancels the RFC 7628 error challenge instead of answering it.
            self._token_refused = not answer.valid
        self._secret_looked_up = True
        events: list[Event] = self.machine.resume(answer)
        return events

    async def _blocked(self) -> bool:
        """Blocked address: the protocol's blocked answer, and True (the
        session is over)."""
        verdict = self.guard.check(self.address)
        if not verdict.blocked:
            return False
        log.info("%s: refused, address blocked for %.0fs more", self.tag, verdict.retry_after)
        self._note("blocked", retry_after=int(verdict.retry_after))
        recorder().blocked(self.runtime.listener.name)
        self._login_outcome(Outcome.BLOCKED, reason="address-blocked")
        self.client.write(self.runtime.parts.blocked)
        await self.client.drain()
        return True

    async def _auth_failed(self, event: AuthFailed) -> _Next:
        self._secret_looked_up = False
        # Relay mode: the machines know the user of PLAIN-like exchanges
        # only; the driver read it for the other mechanisms that name one.
        user = event.authcid or self._relay_user
        self._relay_user = None
        who = f" as {user!r}" if user else ""
        # The mechanism's reason when it says more than the reason's name
        # (the host a DIGEST-MD5 client named, say).
        said = event.detail and event.detail != event.reason.replace("-", " ")
        why = f" ({event.detail})" if said else ""
        log.info(
            "%s: %s authentication failed%s: %s%s",
            self.tag,
            event.mechanism,
            who,
            event.reason,
            why,
        )
        self._note("login-failed", user=user, mechanism=event.mechanism, reason=event.reason)
        self._login_outcome(
            failure_outcome(event.reason), user=user, mechanism=event.mechanism, reason=event.reason
        )
        token_refused, self._token_refused = self._token_refused, False
        if event.reason not in GUESS_REASONS and not token_refused:
            return []  # a refusal by policy, a cancel or a backend fault: not a guess
        # Blocked while this guess was being checked (by the address's
        # other connections): the blocked answer, as a right guess gets.
        if await self._blocked():
            return None
        fingerprint = None
        if self._fingerprint is not None and self._fingerprint[0] == user:
            fingerprint = self._fingerprint[1]
        self._fingerprint = None
        delay = self.guard.failure(self.address, user, fingerprint)
        if delay > 0:
            recorder().penalty(self.runtime.listener.name, delay)
        # Sleeping here holds back this session's reply only; other sessions
        # run on. Dovecot and Kerio do the same against password guessing.
        await asyncio.sleep(delay)
        return []

    def _spoofed_header(self, data: bytes) -> bool:
        """ClientConnection's refusal of a PROXY header, with the login
        record of a refused attempt."""
        if not super()._spoofed_header(data):
            return False
        self._login_outcome(Outcome.REFUSED, reason="proxy-header-refused")
        return True

    def describe(self) -> dict[str, str | int | None]:
        """What `authgate sessions` shows of this session."""
        return {
            "listener": self.runtime.listener.name,
            "client": self.peer[0],
            "client_port": self.peer[1],
            "user": self.user,
            "phase": "preauth" if self.user is None else "spliced",
            "since": int(self.started),
        }

    def _login_outcome(
        self,
        outcome: Outcome,
        *,
        user: str | None = None,
        mechanism: str | None = None,
        reason: str | None = None,
        app_password: str | None = None,
    ) -> None:
        """The one login record of an attempt's outcome (authgate.logs)."""
        now = time.monotonic()
        started = self._attempt_started
        self._attempt_started = None
        tls = self.client.tls
        backend, self._backend_tried = self._backend_tried, None
        duration = 0.0 if started is None else now - started
        recorder().login(
            self.runtime.listener.name, mechanism or "-", outcome.value, reason or "", duration
        )
        log_login(
            LoginRecord(
                outcome=outcome.value,
                listener=self.runtime.listener.name,
                client=self.peer[0],
                client_port=self.peer[1],
                proxy=self.client.peername()[0] if self.via_balancer else None,
                user=user,
                mechanism=mechanism,
                tls=None if tls is None else tls.version(),
                reason=reason,
                backend=backend,
                duration_ms=round(duration * 1000),
                app_password=app_password,
            )
        )

    def _password_expired(self, user: str) -> bool:
        if self.runtime.password_policy.expire_days is None:
            return False  # passwords never expire: nothing to look up
        store = self.runtime.store
        record = store.user(user) if store is not None else None
        if record is None:
            return False
        status = expiry_status(
            self.runtime.password_policy, record.password_changed, datetime.date.today()
        )
        return status.state is ExpiryState.EXPIRED

    async def _start_tls(self, event: StartTLS) -> list[Event]:
        context = self.runtime.server_tls
        if context is None:
            raise RuntimeError("machine asked for STARTTLS on a listener without TLS")
        # What the machine had buffered behind the STARTTLS line, and what
        # reached the channel before the handshake began: both thrown away.
        try:
            dropped = event.discarded + await self.client.start_tls(
                context, server_side=True, timeout=self.runtime.limits.handshake_timeout
            )
        except BaseException:
            recorder().tls_handshake(self.runtime.listener.name, ok=False)
            raise
        recorder().tls_handshake(self.runtime.listener.name, ok=True)
        if dropped:
            log.warning(
                "%s: dropped %d bytes sent before the TLS handshake (STARTTLS injection?)",
                self.tag,
                dropped,
            )
        # The policy's answer inside TLS is asked again: a client
        # certificate may have come with the handshake (EXTERNAL).
        self._decisions.pop(True, None)
        events: list[Event] = self.machine.tls_started()
        return events

    # -------------------------------------------------------------- backend

    def _routes(self) -> ListenerRoutes:
        routes = self.runtime.routes
        if routes is None:
            raise RuntimeError("listener runtime without routes")
        return routes

    def _hints(self, user: str | None) -> UserHints:
        """What the credential store says about `user`'s backend."""
        store = self.runtime.store
        if user is None or store is None:
            return UserHints()
        record = store.user(user)
        host = getattr(store, "backend_host", None)  # a directory (DirectoryStore)
        return UserHints(
            entry=record.backend if record is not None else None,
            directory_host=host(user) if host is not None else None,
        )

    async def _open_upstream(
        self,
        user: str | None,
        identity: str | None,
        *,
        adjust: Callable[[ClientSettings], ClientSettings] | None = None,
    ) -> Upstream | LoginFailed | Referral:
        """Connect to `user`'s backend (authgate.routing): a pool's members
        in the user's order, skipping the ones marked down; a failed
        connect marks a member down and tries the next. `identity`: log in
        as that user (terminate mode), None: relay or pass-through;
        `adjust`: changes to the client machine's settings."""
        runtime = self.runtime
        routes = self._routes()
        try:
            route = routes.route(user, self._hints(user), spread=str(self.peer[0]))
        except RoutingError as exc:
            log.warning("%s: no backend for %r: %s", self.tag, user, exc)
            return LoginFailed(BackendFailure.UNAVAILABLE, str(exc))
        if route.referral is not None:
            log.info("%s: %r is referred to %s", self.tag, user, route.referral)
            return Referral(route.referral)
        if not route.available:
            # A user pinned to a store that is down gets a temporary
            # failure, never another store (their mail is not there).
            log.warning(
                "%s: backend %s is down: %s gets a temporary failure",
                self.tag,
                route.backend.name,
                repr(user) if user else "the client",
            )
            return LoginFailed(BackendFailure.UNAVAILABLE, f"backend {route.backend.name} is down")
        prepared = routes.prepared_for(route.backend)
        failure = LoginFailed(BackendFailure.UNAVAILABLE, "no member answered")
        for member in route.candidates:
            self._backend_tried = str(member.address)
            # A warm connection (authgate.proxy.warm): connected and
            # greeted already, the greeting unread in its buffer.
            warm = routes.warm_pool(route.backend, member)
            channel = warm.claim() if warm is not None else None
            if channel is None:
                try:
                    channel = await connect(
                        member,
                        prepared.tls,
                        client=self.peer,
                        local=self.local,
                        timeout=runtime.limits.connect_timeout,
                    )
                except (OSError, TimeoutError, ssl.SSLError) as exc:
                    why = str(exc) or exc.__class__.__name__
                    log.warning("%s: backend %s unreachable: %s", self.tag, member.address, why)
                    recorder().backend_failure(str(member.address), "connect")
                    routes.mark_down(route.backend, member.address, why)
                    failure = LoginFailed(BackendFailure.UNAVAILABLE, why)
                    continue
            if is_own(channel.peername(), channel.sockname()):
                # A misconfiguration: the session would come back to us,
                # and round again. Refused, and the member is marked down.
                channel.close()
                why = "is authgate itself (one of its own listeners): refused, it would loop"
                log.error("%s: backend %s %s", self.tag, member.address, why)
                routes.mark_down(route.backend, member.address, why)
                failure = LoginFailed(BackendFailure.UNAVAILABLE, why)
                continue
            if user is not None and log.isEnabledFor(logging.DEBUG):
                log.debug("%s: %r goes to %s (%s)", self.tag, user, member.address, route.why)
            self._member = (route.backend, member)
            known = None
            if identity is not None and member.same_capabilities_each_connection:
                # Terminate mode: the list it answered lately.
                known = routes.capabilities.recall(route.backend.name, member.address)
            settings = self._client_settings(identity, member, prepared.master_password, known)
            if adjust is not None:
                settings = adjust(settings)
            return Upstream(
                channel,
                runtime.parts.client(settings),
                tls_context=prepared.tls,
                server_name=member.server_name or member.address.host,
                timeout=runtime.limits.backend_timeout,
            )
        return failure

    async def _ask_backend(self) -> bool:
        """Learn the backend's capabilities for our greeting (from the
        listener's cache, else from a connection that logs in to nothing).
        False: the backend cannot be reached; the client heard the
        protocol's unavailable line and the session is over."""
        capabilities = await self.runtime.greeting_cache.get(self._probe_backend)
        if capabilities is None:
            self.client.write(self.runtime.parts.unavailable)
            await self.client.drain()
            return False
        self._backend_capabilities = capabilities
        return True

    async def _probe_backend(self) -> tuple[str, ...] | None:
        upstream = await self._open_upstream(
            None, None, adjust=lambda s: replace(s, relay=False, capabilities_only=True)
        )
        if not isinstance(upstream, Upstream):  # (no user: never a referral)
            return None
        try:
            result = await upstream.advance()
        finally:
            upstream.close()
        if not isinstance(result, LoggedIn):
            detail = result.detail if isinstance(result, LoginFailed) else "unexpected challenge"
            log.warning("%s: backend capabilities unavailable: %s", self.tag, detail)
            return None
        return result.capabilities

    def _client_settings(
        self,
        identity: str | None,
        backend: BackendSettings,
        master_password: str | None,
        known_capabilities: tuple[str, ...] | None = None,
    ) -> ClientSettings:
        credentials = None
        xclient_login = None
        if identity is not None:
            if backend.master_user is not None:
                credentials = ClientCredentials(
                    backend.master_user, master_password or "", authzid=identity
                )
            else:
                xclient_login = identity  # SMTP: XCLIENT LOGIN= (Postfix)
        forwarding = backend.client_address
        return ClientSettings(
            hostname=self.runtime.hostname,
            starttls=backend.tls is TLSMode.STARTTLS,
            mechanisms=backend.mechanisms,
            credentials=credentials,
            sasl_context=ClientContext(
                service=self.runtime.parts.sasl_service,
                hostname=backend.server_name or backend.address.host,
            ),
            relay=identity is None,
            client_address=self.peer[0],
            client_port=self.peer[1],
            xclient_login=xclient_login,
            use_id=forwarding is ClientAddressForwarding.ID,
            use_xclient=forwarding is ClientAddressForwarding.XCLIENT,
            known_capabilities=known_capabilities,
        )

    async def _advance(self, upstream: Upstream, events: Sequence[Any] = ()) -> LoginStep:
        """Upstream.advance, and a backend that did not answer in time is
        marked down (passive health)."""
        step = await upstream.advance(events)
        if self._member is None:
            return step
        backend, member = self._member
        if upstream.timed_out:
            self._routes().mark_down(backend, member.address, "did not answer in time")
        elif isinstance(step, LoggedIn) and member.same_capabilities_each_connection:
            # A list a login went by. Not one a refused login asked for: a
            # list with no way in would then fail the next logins without a
            # word to the backend (and so without a second look at its list).
            learned = upstream.machine.learned_capabilities
            if learned is not None:
                self._routes().capabilities.learn(backend.name, member.address, learned)
        return step

    async def _login_as(self, event: Authenticated) -> _Next:
        self._secret_looked_up = False
        app, self._app_password = self._app_password, None
        # (No line of its own: the login record says who logged in, how,
        # and with which app password; one record per login.)
        self.guard.success(self.address, event.authcid)
        if self._password_expired(event.authcid):
            log.info("%s: password of %r has expired", self.tag, event.authcid)
            self._note("password-expired", user=event.authcid, mechanism=event.mechanism)
            expired: list[Event] = self.machine.backend_failed(BackendFailure.PASSWORD_EXPIRED)
            return expired
        self._note(
            "login",
            user=event.identity,
            authcid=event.authcid,
            mechanism=event.mechanism,
            app=app,  # the app password's label, never the secret
        )
        upstream = await self._open_upstream(event.identity, event.identity)
        if isinstance(upstream, Referral):
            referred: list[Event] = self.machine.referred(upstream.url.encode("ascii"))
            return referred
        if isinstance(upstream, LoginFailed):
            return self._backend_failed(upstream)
        result = await self._advance(upstream)
        if isinstance(result, LoggedIn):
            self.upstream = upstream
            self.user = event.identity
            self._login_outcome(
                Outcome.OK, user=event.identity, mechanism=event.mechanism, app_password=app
            )
            return self._logged_in(result, self.machine.backend_ready(result.capabilities))
        upstream.close()
        if isinstance(result, RelayChallenge):  # cannot happen in terminate mode
            result = LoginFailed(BackendFailure.REJECTED, "unexpected challenge")
        return self._backend_failed(result)

    def _backend_failed(self, failure: LoginFailed) -> list[Event]:
        log.warning(
            "%s: backend login failed (%s): %s", self.tag, failure.failure.value, failure.detail
        )
        if failure.failure is not BackendFailure.UNAVAILABLE:  # (counted at connect)
            member = self._member[1] if self._member is not None else self.runtime.listener.backend
            recorder().backend_failure(str(member.address), "login")
        events: list[Event] = self.machine.backend_failed(failure.failure)
        return events

    async def _relay_start(self, event: RelayAuth) -> _Next:
        self._relay_mechanism = event.mechanism
        self._relay_messages = 0
        # The member this connection relays to (routing), once there is one.
        member = self._member[1] if self._member is not None else self.runtime.listener.backend
        self._backend_tried = str(member.address)
        self._relay_user = None
        if isinstance(event.initial, bytes) and self._relay_user_locked(event.initial):
            return self._relay_refused()
        if self.upstream is None:
            first = HELD_FIRST_CHALLENGE.get(event.mechanism)
            if event.initial is NO_RESPONSE and first is not None and self._routes().per_user:
                # The user's name comes in the client's first message: say
                # the mechanism's first challenge ourselves, connect to
                # that user's backend when the answer names them.
                self._relay_held = True
                held: list[Event] = self.machine.relay_challenge(first)
                return held
            return await self._relay_connect(event.mechanism, event.initial)
        machine = self.upstream.machine
        return await self._relay_step(
            await self._advance(self.upstream, machine.authenticate(event.mechanism, event.initial))
        )

    async def _relay_connect(
        self, mechanism: str, initial: InitialResponse, *, answered: bytes | None = None
    ) -> _Next:
        """Connect to the relayed user's backend (or the default when the
        mechanism named nobody yet) and start the exchange there.
        `answered`: the client's answer to the first challenge we said
        ourselves, which the backend's own first challenge gets (LOGIN's
        user name: a LOGIN initial response is not understood everywhere)."""
        upstream = await self._open_upstream(self._relay_user, None)
        if isinstance(upstream, Referral):
            referred: list[Event] = self.machine.referred(upstream.url.encode("ascii"))
            return referred
        if isinstance(upstream, LoginFailed):
            return await self._relay_step(upstream)
        self.upstream = upstream
        step = await self._advance(upstream, upstream.machine.authenticate(mechanism, initial))
        if answered is not None and isinstance(step, RelayChallenge):
            step = await self._advance(upstream, upstream.machine.respond(answered))
        return await self._relay_step(step)

    async def _relay_respond(self, event: RelayResponse) -> _Next:
        if self._relay_held:
            # The answer to the challenge we said ourselves: the exchange
            # starts at the user's backend with it as the initial response.
            self._relay_held = False
            if event.data is None:  # cancelled or junk: the backend never hears of it
                refused: list[Event] = self.machine.relay_result(False)
                return refused
            if self._relay_user_locked(event.data):
                return self._relay_refused()
            if self._relay_mechanism == "LOGIN":
                return await self._relay_connect("LOGIN", NO_RESPONSE, answered=event.data)
            return await self._relay_connect(self._relay_mechanism, event.data)
        assert self.upstream is not None
        if event.data is not None and self._relay_user_locked(event.data):
            return self._relay_refused()
        return await self._relay_step(
            await self._advance(self.upstream, self.upstream.machine.respond(event.data))
        )

    def _relay_user_locked(self, message: bytes) -> bool:
        """Read the user from the client's next message, if it names one
        (authgate.sasl.relayed), and say whether that user is locked out:
        the message then never reaches the backend."""
        index = self._relay_messages
        self._relay_messages += 1
        if self._relay_user is None:
            self._relay_user = relayed_user(self._relay_mechanism, index, message)
            if self._relay_user is not None:
                return self.guard.user_locked(self._relay_user, self.address)
        return False

    def _relay_refused(self) -> list[Event]:
        """A locked user fails like a wrong password (no oracle for guessers),
        without a word to the backend; its exchange there, if begun, is dropped."""
        log.info("%s: user %r is locked out", self.tag, self._relay_user)
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None
        events: list[Event] = self.machine.relay_result(False, BackendFailure.INVALID_CREDENTIALS)
        return events

    async def _relay_step(self, step: LoginStep) -> _Next:
        events: list[Event]
        if isinstance(step, RelayChallenge):
            if self._relay_mechanism in BEARER_RELAYED and self._relay_messages > 0:
                # After the client's token, a bearer mechanism's only
                # challenge is the backend's error (RFC 7628 section 3.2.3;
                # XOAUTH2 alike): the token was refused, a failed guess even
                # if the client then cancels instead of answering.
                self._token_refused = True
            events = self.machine.relay_challenge(step.data)
        elif isinstance(step, LoggedIn):
            self._token_refused = False
            if await self._blocked():  # blocked while the backend checked
                return None
            events = self.machine.relay_result(True)
            if not any(isinstance(event, Splice) for event in events):
                # The client cancelled (or sent junk) while the backend
                # checked: the machine does not believe the backend's yes, so
                # that logged-in connection must not serve a later attempt.
                self._drop_upstream()
                return events
            if self._relay_user is not None:
                self.guard.success(self.address, self._relay_user)
            self.user = self._relay_user or "?"
            self._login_outcome(Outcome.OK, user=self._relay_user, mechanism=self._relay_mechanism)
            return self._logged_in(step, events)
        else:
            # The next attempt (real clients retry with another mechanism on
            # the same connection) starts on a fresh backend connection: a
            # client machine that saw a refusal is done.
            self._drop_upstream()
            events = self.machine.relay_result(False, step.failure)
        return events

    def _drop_upstream(self) -> None:
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None

    def _logged_in(self, login: LoggedIn, events: list[Event]) -> list[Event | Handover]:
        """The machine's answer to a backend login: its success reply, then
        Splice, which becomes the Handover that carries on what the backend
        sent behind its login reply."""
        return [
            self._handover(event, login, authenticated=True) if isinstance(event, Splice) else event
            for event in events
        ]

    def _handover(self, event: Splice, login: LoggedIn, *, authenticated: bool) -> Handover:
        assert self.upstream is not None
        guard: SmtpSpliceFilter | ManageSieveSpliceFilter | None = None
        if self.runtime.listener.protocol is Protocol.SMTP:
            guard = self._smtp_guard(authenticated, login.capabilities)
        elif self.runtime.listener.protocol is Protocol.MANAGESIEVE:
            # UNAUTHENTICATE and friends would log in again past the policy.
            guard = ManageSieveSpliceFilter(self.runtime.max_line)
        return Handover(
            self.client,
            self.upstream.channel,
            to_client=login.pending,
            to_backend=event.pending,
            guard=guard,
        )

    async def _pass_through(self, event: Splice) -> _Next:
        """SMTP server-to-server pass-through: connect, forward the client's
        address (PROXY header or XCLIENT), replay its EHLO. When the backend
        cannot be made ready, the client hears the protocol's unavailable
        line and the session is over."""
        upstream = await self._open_upstream(
            None, None, adjust=lambda s: replace(s, relay=False, replay=event.replay)
        )
        if not isinstance(upstream, Upstream):  # (no user: never a referral)
            self.client.write(self.runtime.parts.unavailable)
            return None
        self.upstream = upstream
        result = await self._advance(upstream)
        if not isinstance(result, LoggedIn):
            detail = result.detail if isinstance(result, LoginFailed) else "unexpected challenge"
            log.warning("%s: pass-through to the backend failed: %s", self.tag, detail)
            self.client.write(self.runtime.parts.unavailable)
            return None
        return [self._handover(event, result, authenticated=False)]

    async def _splice(self, handover: Handover) -> None:
        # Pre-authentication is over: what it needed (the protocol machine,
        # which holds a reference back to us, the policy decisions, the
        # backend's client machine) is not kept for the session's life;
        # the two connections are all a held session holds.
        self.machine = None
        self._decisions.clear()
        self.upstream = None
        try:
            counts = await hand_over(handover, self._guard_events)
        finally:
            handover.backend.close()  # (the client is closed by run())
        if counts is not None:
            log.info("%s: session ended (%d bytes up, %d down)", self.tag, *counts)
            recorder().spliced(self.runtime.listener.name, *counts)

    def _smtp_guard(self, authenticated: bool, keywords: Sequence[str]) -> SmtpSpliceFilter:
        # What the backend announced (its EHLO keywords) decides BDAT.
        chunking = any(k.split()[0].upper() == "CHUNKING" for k in keywords if k)
        return SmtpSpliceFilter(
            self.runtime.hostname,
            authenticated=authenticated,
            chunking=chunking,
            max_line=self.runtime.max_line,
            max_errors=self.runtime.limits.max_errors,
            errors=self.machine.errors,
        )

    def _guard_events(self, events: Sequence[object]) -> None:
        for event in events:
            if isinstance(event, Refused):
                log.warning(
                    "%s: refused %s from the client after the hand-over: %s",
                    self.tag,
                    event.command,
                    event.reply,
                )
                self._note("command-refused", command=event.command)
            elif isinstance(event, SpliceEnded):
                log.warning(
                    "%s: session ended by the %s filter: %s",
                    self.tag,
                    self.runtime.listener.protocol.value,
                    event.reason,
                )
