"""`Directory`: verifies a password by binding to the directory."""

from __future__ import annotations

import asyncio
import secrets
import socket
import ssl
import threading
from collections.abc import Mapping, Sequence

import ldap  # type: ignore[import-untyped,unused-ignore]

from authgate.credentials.directory.errors import DirectoryUnavailable, _describe
from authgate.credentials.directory.names import (
    USER_PLACEHOLDER,
    _attribute_values,
    _canonical_name,
    _password_ok,
    _username_problem,
    escape_dn_value,
    escape_filter_value,
)
from authgate.credentials.directory.pool import _Connection, _LoopThread, _Pool
from authgate.credentials.directory.settings import DirectorySettings
from authgate.credentials.directory.transport import _Relay, _start_tls
from authgate.sasl.base import PasswordVerdict

# Bind results that mean "not this password for this entry" (answer False).
# Everything else is a failure of the directory (DirectoryUnavailable).
_REFUSED_BIND = (
    ldap.INVALID_CREDENTIALS,  # 49: wrong password or no such entry
    ldap.INVALID_DN_SYNTAX,  # 34: cannot happen with escaping, but is the user's
    ldap.NO_SUCH_OBJECT,  # 32: some servers say this for an unknown DN
    ldap.UNWILLING_TO_PERFORM,  # 53: e.g. an account locked by a password policy
    ldap.INAPPROPRIATE_AUTH,  # 48: the entry has no password
    ldap.CONSTRAINT_VIOLATION,  # 19: password-policy refusals on some servers
)
# Errors that mean the connection itself is gone: worth one retry on a fresh
# connection when the failed one came from the pool (an idle connection the
# server closed).
_CONNECTION_LOST = (ldap.SERVER_DOWN, ldap.CONNECT_ERROR)
# backend_attribute values kept for the router (one per recent user).
_MAX_HOSTS = 100_000


class Directory:
    """Verifies passwords by binding to an LDAP directory.

    `verify` blocks (network round trips): call it from a worker thread.
    Thread-safe; connections are pooled. Close it when done."""

    def __init__(self, settings: DirectorySettings) -> None:
        self.settings = settings
        self._endpoint = settings.endpoint
        self._loops = _LoopThread()
        self._ssl: ssl.SSLContext | None = None
        if settings.tls:
            if settings.ca_file is not None:
                context = ssl.create_default_context(cafile=str(settings.ca_file))
            else:
                context = ssl.create_default_context()
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            self._ssl = context
        wait = settings.connect_timeout + settings.timeout
        self._search_pool = _Pool("search", self._open_search, settings.pool_size, wait)
        self._bind_pool = _Pool("bind", self._open, settings.pool_size, wait)
        # Bound instead of a real entry when a search finds no single user,
        # so that an unknown name costs what a wrong password costs.
        self._decoy = f"cn=authgate-no-such-user-{secrets.token_hex(8)}"
        # backend_attribute values of users who logged in (`backend_host`).
        self._hosts: dict[str, str | None] = {}
        self._hosts_lock = threading.Lock()

    def __enter__(self) -> Directory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._search_pool.close()
        self._bind_pool.close()
        self._loops.close()

    # -- verifying

    def verify(self, username: str, password: str) -> bool:
        """True when `password` is `username`'s password. Raises
        DirectoryUnavailable when the directory cannot tell."""
        return self.authenticate(username, password).valid

    def authenticate(self, username: str, password: str) -> PasswordVerdict:
        """Whether `password` is `username`'s password, and the user's
        canonical name (the entry's `identity_attribute`) when the directory
        told it: always after a successful bind, and after a failed one
        when a search found the entry. Raises DirectoryUnavailable when the
        directory cannot tell, or has no single name for a bound entry."""
        if not _password_ok(password) or _username_problem(username) is not None:
            return PasswordVerdict(False)
        settings = self.settings
        attribute = settings.identity_attribute
        wanted = [attribute]
        if settings.backend_attribute is not None:
            wanted.append(settings.backend_attribute)
        if settings.bind_dn_template is not None:
            dn = settings.bind_dn_template.replace(USER_PLACEHOLDER, escape_dn_value(username))
            entry = self._bind(dn, password, read=wanted)
            if entry is None:
                return PasswordVerdict(False)
            identity = self._identity(dn, _attribute_values(entry, attribute), username)
            self._note_host(identity, entry)
            return PasswordVerdict(True, identity)
        found = self._find(username, wanted)
        if found is None:
            assert settings.search_base is not None
            self._bind(f"{self._decoy},{settings.search_base}", password)
            return PasswordVerdict(False)
        dn, entry = found
        values = _attribute_values(entry, attribute)
        if self._bind(dn, password) is None:
            return PasswordVerdict(False, _canonical_name(values, username))
        identity = self._identity(dn, values, username)
        self._note_host(identity, entry)
        return PasswordVerdict(True, identity)

    def _note_host(self, identity: str, entry: Mapping[str, Sequence[bytes]]) -> None:
        """Keep the backend attribute's value of a user who just logged in,
        for the router (`backend_host`). Bounded: the oldest go first."""
        attribute = self.settings.backend_attribute
        if attribute is None:
            return
        values = _attribute_values(entry, attribute)
        host = None
        if len(values) == 1:
            try:
                host = values[0].decode("utf-8")
            except UnicodeDecodeError:
                host = None
        with self._hosts_lock:
            self._hosts.pop(identity, None)
            self._hosts[identity] = host
            while len(self._hosts) > _MAX_HOSTS:
                self._hosts.pop(next(iter(self._hosts)))

    def backend_host(self, identity: str) -> str | None:
        """The backend attribute's value for a user verified by this
        directory (None: not configured, no single value, or not seen)."""
        with self._hosts_lock:
            return self._hosts.get(identity)

    def _identity(self, dn: str, values: Sequence[bytes], typed: str) -> str:
        name = _canonical_name(values, typed)
        if name is None:
            attribute = self.settings.identity_attribute
            raise DirectoryUnavailable(
                f"{self._endpoint}: {dn!r} has no single {attribute!r} value to name the user "
                "by (readable by the user, or set [directory] canonical_attribute)"
            )
        return name

    def _bind(
        self, dn: str, password: str, *, read: Sequence[str] = ()
    ) -> dict[str, list[bytes]] | None:
        """Bind as `dn`: None when the password is refused, else the
        attributes `read` of the entry, read as the user just bound ({}
        when not asked for, or not readable)."""
        for attempt in (1, 2):
            conn = self._bind_pool.acquire()
            values: dict[str, list[bytes]] = {}
            try:
                conn.ldap.simple_bind_s(dn, password)
                if read:
                    values = self._read_own(conn, dn, read)
            except _REFUSED_BIND:
                self._bind_pool.release(conn)
                return None
            except _CONNECTION_LOST as exc:
                self._bind_pool.discard(conn, lost=True)
                if conn.reused and attempt == 1:
                    continue  # an idle connection the server had closed
                raise DirectoryUnavailable(
                    f"{self._endpoint}: bind failed: {_describe(exc)}"
                ) from None
            except ldap.LDAPError as exc:
                self._bind_pool.discard(conn)
                raise DirectoryUnavailable(
                    f"{self._endpoint}: bind failed: {_describe(exc)}"
                ) from None
            except BaseException:
                self._bind_pool.discard(conn)
                raise
            self._bind_pool.release(conn)
            return values
        raise AssertionError("unreachable")

    def _read_own(
        self, conn: _Connection, dn: str, attributes: Sequence[str]
    ) -> dict[str, list[bytes]]:
        """`attributes` of entry `dn`, on a connection bound as that entry."""
        try:
            results = conn.ldap.search_ext_s(
                dn,
                ldap.SCOPE_BASE,
                "(objectClass=*)",
                list(attributes),
                sizelimit=1,
                timeout=self.settings.timeout,
            )
        except (ldap.NO_SUCH_OBJECT, ldap.INSUFFICIENT_ACCESS):
            return {}  # hidden from the user by the ACLs: no name (_identity says so)
        entries = [attrs for found, attrs in results if isinstance(found, str)]
        return dict(entries[0]) if len(entries) == 1 else {}

    def _find(
        self, username: str, attributes: Sequence[str]
    ) -> tuple[str, dict[str, list[bytes]]] | None:
        """The one entry the search filter finds for `username`: its DN and
        its `attributes`; None for no entry or several."""
        settings = self.settings
        assert settings.search_base is not None
        query = settings.search_filter.replace(USER_PLACEHOLDER, escape_filter_value(username))
        for attempt in (1, 2):
            conn = self._search_pool.acquire()
            try:
                # Only the canonical attribute; sizelimit 2: enough to tell
                # one entry from several.
                results = conn.ldap.search_ext_s(
                    settings.search_base,
                    ldap.SCOPE_SUBTREE,
                    query,
                    list(attributes),
                    sizelimit=2,
                    timeout=settings.timeout,
                )
            except ldap.SIZELIMIT_EXCEEDED:
                self._search_pool.release(conn)
                return None
            except ldap.NO_SUCH_OBJECT:
                self._search_pool.release(conn)
                raise DirectoryUnavailable(
                    f"{self._endpoint}: search base {settings.search_base!r} does not exist"
                ) from None
            except _CONNECTION_LOST as exc:
                self._search_pool.discard(conn, lost=True)
                if conn.reused and attempt == 1:
                    continue
                raise DirectoryUnavailable(
                    f"{self._endpoint}: search failed: {_describe(exc)}"
                ) from None
            except ldap.LDAPError as exc:
                self._search_pool.discard(conn)
                raise DirectoryUnavailable(
                    f"{self._endpoint}: search failed: {_describe(exc)}"
                ) from None
            except BaseException:
                self._search_pool.discard(conn)
                raise
            self._search_pool.release(conn)
            # Search references (referrals) come back with dn None: ignored.
            entries = [(dn, attrs) for dn, attrs in results if isinstance(dn, str)]
            if len(entries) != 1:
                return None
            dn, attrs = entries[0]
            return dn, dict(attrs)
        raise AssertionError("unreachable")

    # -- connections

    def _open_search(self) -> _Connection:
        conn = self._open()
        settings = self.settings
        if settings.bind_dn is None:
            return conn
        try:
            conn.ldap.simple_bind_s(settings.bind_dn, settings.bind_password)
        except ldap.LDAPError as exc:
            conn.close()
            if isinstance(exc, _REFUSED_BIND):
                raise DirectoryUnavailable(
                    f"{self._endpoint}: the search account's bind was refused "
                    f"({_describe(exc)}): check bind_dn and bind_password"
                ) from None
            raise DirectoryUnavailable(
                f"{self._endpoint}: search account bind failed: {_describe(exc)}"
            ) from None
        return conn

    def _open(self) -> _Connection:
        fd, relay = self._connect()
        try:
            conn = ldap.initialize(f"ldap://{self._endpoint.netloc}", fileno=fd)
            conn.set_option(ldap.OPT_PROTOCOL_VERSION, ldap.VERSION3)
            # Chasing a referral would send the password to another server.
            conn.set_option(ldap.OPT_REFERRALS, 0)
            conn.set_option(ldap.OPT_TIMEOUT, self.settings.timeout)
            conn.set_option(ldap.OPT_NETWORK_TIMEOUT, self.settings.connect_timeout)
            conn.timeout = self.settings.timeout
        except ldap.LDAPError as exc:
            if relay is not None:
                relay.abort()
            raise DirectoryUnavailable(f"{self._endpoint}: {_describe(exc)}") from None
        return _Connection(conn, relay)

    def _connect(self) -> tuple[int, _Relay | None]:
        """A connected descriptor for libldap: the TCP socket itself for
        plain LDAP, else one end of a socketpair relayed through TLS."""
        endpoint, settings = self._endpoint, self.settings
        try:
            sock = socket.create_connection(
                (endpoint.host, endpoint.port), timeout=settings.connect_timeout
            )
        except OSError as exc:
            reason = exc.strerror or exc.__class__.__name__
            raise DirectoryUnavailable(f"cannot connect to {endpoint}: {reason}") from None
        # Once the loop has the sockets, only the loop closes them: closing
        # a descriptor its selector still watches could hit a reused number.
        owned: list[socket.socket] = [sock]
        handed: list[socket.socket] = []

        def cleanup() -> None:
            for item in owned:
                item.close()
            for item in handed:
                self._loops.call_soon(item.close)

        try:
            if self._ssl is None:
                sock.settimeout(None)
                return sock.detach(), None
            if settings.starttls:
                _start_tls(sock, endpoint, settings.timeout)
            sock.setblocking(False)
            inner, outer = socket.socketpair()
            owned, handed = [inner], [sock, outer]
            relay = self._loops.run(self._start_relay(sock, outer, self._ssl), settings.timeout + 1)
            return inner.detach(), relay
        except DirectoryUnavailable:
            cleanup()
            raise
        except ssl.SSLCertVerificationError as exc:
            cleanup()
            reason = exc.verify_message or "certificate not trusted"
            raise DirectoryUnavailable(f"{endpoint}: TLS certificate refused: {reason}") from None
        except (OSError, TimeoutError) as exc:
            cleanup()
            reason = getattr(exc, "strerror", None) or str(exc) or exc.__class__.__name__
            raise DirectoryUnavailable(f"{endpoint}: TLS set-up failed: {reason}") from None
        except BaseException:
            cleanup()
            raise

    async def _start_relay(
        self, sock: socket.socket, outer: socket.socket, context: ssl.SSLContext
    ) -> _Relay:
        tls = await asyncio.open_connection(
            sock=sock,
            ssl=context,
            server_hostname=self._endpoint.host,
            ssl_handshake_timeout=self.settings.timeout,
        )
        relay = _Relay(asyncio.get_running_loop())
        try:
            await relay.start(tls, outer)
        except BaseException:
            tls[1].transport.abort()
            raise
        return relay

    # -- for tests and `authgate check`

    def idle_connections(self) -> dict[str, int]:
        return {"search": self._search_pool.idle(), "bind": self._bind_pool.idle()}
