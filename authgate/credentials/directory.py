"""Directory users, verified by an LDAP simple bind (RFC 4513 section 5.1.3).

A directory answers one question: is this the user's password? It reveals
no secret, so only PLAIN and LOGIN can be offered for its users
(`DirectoryStore.offerable`), like a store of one-way hashes.

Two ways to find the user's entry:

* a DN template, ``uid={user},ou=people,dc=example,dc=org``: the name is
  escaped as an RDN attribute value (RFC 4514 section 2.4) and the server is
  asked to bind as that DN with the password;
* a search, ``(uid={user})`` under a base: the name is escaped as a filter
  assertion value (RFC 4515 section 3), exactly one entry must match, and
  its DN is bound with the password. The search runs anonymously or bound
  as a service account (``bind_dn``).

Client library: **python-ldap** (the maintained binding of OpenLDAP's own
libldap), called from worker threads: `Directory.verify` blocks by design,
the proxy already runs it off the event loop (`DirectoryStore.aresolve`),
and libldap is the most exercised LDAP client there is. `bonsai` is
asyncio-native but its event-loop integration buys nothing behind a thread
pool, and it is a smaller project. Neither ships a Linux wheel on PyPI:
both compile against libldap, so a fresh Debian machine needs
``libldap2-dev libsasl2-dev`` (and gcc and the Python headers, which the
machine image has) before ``pip install python-ldap``. The pure-Python
`ldap3` would install anywhere but has had no release since 2021.

TLS is done by Python's `ssl` module, not by libldap. Two reasons, both
observed with Debian 12's libldap 2.5.13: its implicit-TLS (``ldaps://``)
handshake ignores ``LDAP_OPT_NETWORK_TIMEOUT`` (a server that accepts the
TCP connection and never answers hangs the calling thread for good), and a
python-ldap connection cannot be touched from a second thread while a call
is in progress (the C extension aborts the process), so no watchdog can cut
the hang short. So a connection is made here: TCP connect with a timeout,
StartTLS by hand when asked for, the TLS handshake with a timeout, all in
Python with the same certificate checks as every other TLS connection
authgate makes (`ssl.create_default_context`, host name checked, TLS 1.2 or
newer). libldap then speaks plain LDAP over a private socketpair, and a
background event loop relays it through the TLS connection. Every phase has
a deadline: libldap's own operation timeout covers the rest.

Security notes, each handled below:

* An empty password is an "unauthenticated bind" (RFC 4513 section 5.1.2):
  servers that allow it report *success* for any existing DN. `verify`
  answers False without contacting the server.
* User names with control characters (NUL included) are refused before
  any escaping: no legitimate directory name has them.
* The directory matches names loosely (RFC 4518: case, NFKC, spaces):
  slapd binds "ALICE", " alice", "alice " and full-width "ａｌｉｃｅ" as
  alice. So a name the directory would read as another spelling is refused
  unless the difference is case (`_username_problem`), and the session's
  identity is the entry's own name, its `canonical_attribute` (uid by
  default) as the directory returns it: that is what the backend, the
  audit log and the lockout see (`PasswordVerdict`).
* Referrals are never chased (a referral would send the password to
  another server).
* A connection that was bound as a user is never used to search for
  anyone else: the search pool holds only connections bound as the service
  account (or anonymous); user binds go through a separate pool of
  connections that bind and, with a DN template, read the bound user's own
  entry for its canonical name (a base-scope read of that one DN).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import secrets
import socket
import ssl
import threading
import unicodedata
import urllib.parse
from collections.abc import Callable, Coroutine, Mapping, Sequence
from concurrent.futures import Executor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

import ldap  # type: ignore[import-untyped,unused-ignore]
import ldap.dn  # type: ignore[import-untyped,unused-ignore]

from authgate.config import _Table
from authgate.credentials.base import CredentialsUnavailable
from authgate.credentials.store import DIRECTORY_REASON, StoreOffer
from authgate.sasl.base import (
    LookupAnswer,
    LookupRequest,
    PasswordCheck,
    PasswordVerdict,
    SecretLookup,
)

__all__ = [
    "Directory",
    "DirectorySettings",
    "DirectoryStore",
    "DirectoryUnavailable",
    "escape_dn_value",
    "escape_filter_value",
    "parse_directory",
]

T = TypeVar("T")

USER_PLACEHOLDER: Final = "{user}"
# RFC 4512 section 1.4: an attribute description is a descr or a numericoid.
_ATTRIBUTE: Final = re.compile(r"[A-Za-z][A-Za-z0-9-]{0,63}|[0-9]+(\.[0-9]+)+")
MAX_USERNAME_LENGTH: Final = 256
DEFAULT_PORTS: Final = {"ldap": 389, "ldaps": 636}

# RFC 4511 section 4.14.1: the StartTLS extended request's OID.
_STARTTLS_OID: Final = b"1.3.6.1.4.1.1466.20037"
# A StartTLS response is a few dozen bytes; anything near this is not one.
_MAX_STARTTLS_RESPONSE: Final = 16384

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


class DirectoryUnavailable(CredentialsUnavailable):
    """The directory could not answer (down, timed out, misconfigured). The
    proxy maps it to a temporary failure (SMTP 454 4.7.0, IMAP
    NO [UNAVAILABLE], POP3 -ERR [SYS/TEMP]). The message never contains a
    password."""


# ------------------------------------------------------------- escaping


def escape_dn_value(value: str) -> str:
    """`value` as an RDN attribute value (RFC 4514 section 2.4).

    Escaped with a backslash: ``" + , ; < > \\ =``, a leading space or
    ``#``, a trailing space (``=`` need not be, RFC 4514 allows it and it
    keeps a value from looking like a second AVA to lax parsers). NUL and
    other control characters are hex-escaped per UTF-8 byte (``\\00``)."""
    out: list[str] = []
    last = len(value) - 1
    for i, ch in enumerate(value):
        if ch in '"+,;<>\\=' or (i == 0 and ch in " #") or (i == last and ch == " "):
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append("".join(f"\\{b:02x}" for b in ch.encode("utf-8")))
        else:
            out.append(ch)
    return "".join(out)


def escape_filter_value(value: str) -> str:
    """`value` as a filter assertion value (RFC 4515 section 3): ``*``,
    ``(``, ``)``, ``\\`` and NUL become ``\\2a``, ``\\28``, ``\\29``,
    ``\\5c``, ``\\00``; other control characters are hex-escaped too."""
    out: list[str] = []
    for ch in value:
        if ch in "*()\\" or ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append("".join(f"\\{b:02x}" for b in ch.encode("utf-8")))
        else:
            out.append(ch)
    return "".join(out)


def _plain_name(name: str) -> bool:
    """Non-empty, not too long, no control characters (Cc, NUL included) or
    lone surrogates (Cs, not encodable)."""
    if not name or len(name) > MAX_USERNAME_LENGTH:
        return False
    return not any(unicodedata.category(ch) in ("Cc", "Cs") for ch in name)


# RFC 4518 section 2.2 maps these to nothing before comparing: "al\u00adice"
# may match "alice". (Format characters, category Cf, are refused anyway.)
_MAPPED_TO_NOTHING: Final = frozenset(
    "\u034f\u180b\u180c\u180d\ufffc" + "".join(chr(c) for c in range(0xFE00, 0xFE10))
)


def _username_problem(name: str) -> str | None:
    """Why the directory must not be asked about `name`, or None.

    Directory matching rules (caseIgnoreMatch, RFC 4518) ignore leading and
    trailing spaces, fold runs of spaces and compatibility forms (NFKC) and
    drop some characters: slapd binds " alice", "alice " and "ａｌｉｃｅ" as
    alice. Such spellings would give one user many names (for the lockout,
    the audit log, the backend), and no one types them on purpose. Case is
    left alone: the directory folds it and the canonical name replaces it."""
    if not _plain_name(name):
        return "empty, too long or with a control character"
    if name != name.strip(" ") or "  " in name:
        return "leading, trailing or repeated spaces"
    if unicodedata.normalize("NFKC", name) != name:
        return "not in NFKC form (compatibility or width variants)"
    for ch in name:
        category = unicodedata.category(ch)
        if category in ("Cf", "Co", "Cn", "Zl", "Zp") or (category == "Zs" and ch != " "):
            return "an invisible, unassigned or non-ASCII space character"
        if ch in _MAPPED_TO_NOTHING:
            return "a character the directory ignores"
    return None


def _fold(name: str) -> str:
    return unicodedata.normalize("NFKC", name).casefold()


def _canonical_name(values: Sequence[bytes], typed: str) -> str | None:
    """The user's name from the entry's canonical attribute: its only value,
    or among several the one that is `typed` but for case. None when there
    is no such single value."""
    names: list[str] = []
    for value in values:
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if _plain_name(text):
            names.append(text)
    if len(names) == 1:
        return names[0]
    matches = [n for n in names if _fold(n) == _fold(typed)]
    return matches[0] if len(matches) == 1 else None


def _attribute_values(entry: Mapping[str, Sequence[bytes]], attribute: str) -> list[bytes]:
    # Attribute descriptions are case-insensitive (RFC 4512 section 2.5).
    wanted = attribute.lower()
    return [v for name, values in entry.items() if name.lower() == wanted for v in values]


def _password_ok(password: str) -> bool:
    # Empty: an unauthenticated bind, which permissive servers report as a
    # success (RFC 4513 section 5.1.2). Lone surrogates cannot be sent.
    return bool(password) and not any(unicodedata.category(ch) == "Cs" for ch in password)


# ------------------------------------------------------------- settings


class _Problem(ValueError):
    """A settings problem, with the key it is about (for the config path)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


@dataclass(frozen=True)
class Endpoint:
    scheme: str  # "ldap" | "ldaps"
    host: str  # without IPv6 brackets
    port: int

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def loopback(self) -> bool:
        if self.host.lower() == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        return f"{self.scheme}://{self.netloc}"


def parse_url(url: str) -> Endpoint:
    """``ldap://host[:port]`` or ``ldaps://host[:port]``; ValueError otherwise.
    An LDAP URL's DN, attributes, scope and filter parts (RFC 4516) are not
    accepted: the settings say those explicitly."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError(f"{url!r} is not an ldap:// or ldaps:// URL")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{url!r}: only scheme://host[:port] is accepted")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{url!r}: credentials do not belong in the URL")
    host = parts.hostname
    if not host:
        raise ValueError(f"{url!r} has no host")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{url!r} has no valid port") from None
    if port == 0:
        raise ValueError(f"{url!r} has no valid port")
    return Endpoint(scheme, host, port if port is not None else DEFAULT_PORTS[scheme])


def _filter_problem(text: str) -> str | None:
    if USER_PLACEHOLDER not in text:
        return f"must contain {USER_PLACEHOLDER}"
    if not (text.startswith("(") and text.endswith(")")):
        return "must be a parenthesised filter such as (uid={user})"
    depth = 0
    for ch in text.replace("\\\\", "").replace("\\(", "").replace("\\)", ""):
        depth += (ch == "(") - (ch == ")")
        if depth < 0:
            return "has unbalanced parentheses"
    return "has unbalanced parentheses" if depth else None


def _dn_problem(text: str) -> str | None:
    try:
        parsed = ldap.dn.str2dn(text)
    except ldap.DECODING_ERROR:
        return "is not a DN (RFC 4514)"
    return None if parsed else "must not be empty"


@dataclass(frozen=True)
class DirectorySettings:
    """How to reach the directory and find a user's entry. Validated on
    construction (ValueError naming the key)."""

    url: str
    starttls: bool = False
    ca_file: Path | None = None  # None: the system trust store
    # Plain ldap:// without StartTLS: only to a loopback host, and only when
    # the admin says so (the password would cross the wire in the clear).
    allow_insecure: bool = False
    bind_dn_template: str | None = None
    search_base: str | None = None
    search_filter: str = "(uid={user})"
    bind_dn: str | None = None  # the search's service account; None: anonymous
    bind_password: str | None = field(default=None, repr=False)
    connect_timeout: float = 5.0
    timeout: float = 10.0  # TLS handshake, StartTLS and each LDAP operation
    pool_size: int = 4  # connections per pool (search, bind), busy or idle
    # The attribute whose value names the user once bound (see
    # `identity_attribute`); None: the template's {user} attribute, else uid.
    canonical_attribute: str | None = None

    def __post_init__(self) -> None:
        try:
            endpoint = parse_url(self.url)
        except ValueError as exc:
            raise _Problem("url", str(exc)) from None
        if endpoint.scheme == "ldaps" and self.starttls:
            raise _Problem("starttls", "ldaps:// is already TLS: drop starttls or use ldap://")
        plain = endpoint.scheme == "ldap" and not self.starttls
        if plain and not self.allow_insecure:
            raise _Problem(
                "url",
                f"{self.url!r} would send passwords unencrypted: use ldaps://, or "
                "ldap:// with starttls = true",
            )
        if plain and not endpoint.loopback:
            raise _Problem(
                "allow_insecure",
                f"unencrypted LDAP is allowed to a loopback host only, not {endpoint.host!r}",
            )
        if self.allow_insecure and not plain:
            raise _Problem("allow_insecure", "only means something for plain ldap://")
        if (self.bind_dn_template is None) == (self.search_base is None):
            raise _Problem(
                "bind_dn_template", "give either bind_dn_template or search_base (not both)"
            )
        if self.bind_dn_template is not None:
            self._check_template(self.bind_dn_template)
            if self.bind_dn is not None or self.bind_password is not None:
                raise _Problem("bind_dn", "is only used for a search (search_base)")
        else:
            assert self.search_base is not None
            problem = _dn_problem(self.search_base)
            if problem:
                raise _Problem("search_base", problem)
            problem = _filter_problem(self.search_filter)
            if problem:
                raise _Problem("search_filter", problem)
            self._check_service_account()
        for key in ("connect_timeout", "timeout"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise _Problem(key, f"{value!r} is not a positive number of seconds")
        if isinstance(self.pool_size, bool) or not 1 <= self.pool_size <= 64:
            raise _Problem("pool_size", f"{self.pool_size!r} is not between 1 and 64")
        if self.canonical_attribute is not None and not _ATTRIBUTE.fullmatch(
            self.canonical_attribute
        ):
            raise _Problem(
                "canonical_attribute",
                f"{self.canonical_attribute!r} is not an attribute name (such as uid)",
            )

    def _check_template(self, template: str) -> None:
        if template.count(USER_PLACEHOLDER) != 1:
            raise _Problem("bind_dn_template", f"must contain {USER_PLACEHOLDER} once")
        problem = _dn_problem(template.replace(USER_PLACEHOLDER, "x"))
        if problem:
            raise _Problem("bind_dn_template", problem)

    def _check_service_account(self) -> None:
        if self.bind_dn is None:
            if self.bind_password is not None:
                raise _Problem("bind_password", "given without bind_dn")
            return
        problem = _dn_problem(self.bind_dn)
        if problem:
            raise _Problem("bind_dn", problem)
        # An empty password would make the service bind an unauthenticated
        # (anonymous) one that some servers report as a success.
        if not self.bind_password:
            raise _Problem("bind_password", "is required with bind_dn (and must not be empty)")

    @property
    def endpoint(self) -> Endpoint:
        return parse_url(self.url)

    @property
    def identity_attribute(self) -> str:
        """The attribute whose value is the user's name once bound: the
        configured one, else the template's {user} attribute (``uid`` in
        ``uid={user},ou=people,...``), else ``uid``."""
        if self.canonical_attribute is not None:
            return self.canonical_attribute
        if self.bind_dn_template is not None:
            marker = "authgate-user-placeholder"
            parsed = ldap.dn.str2dn(self.bind_dn_template.replace(USER_PLACEHOLDER, marker))
            for rdn in parsed:
                for attribute, value, _ in rdn:
                    if value == marker:
                        return str(attribute)
        return "uid"

    @property
    def tls(self) -> bool:
        return self.endpoint.scheme == "ldaps" or self.starttls


_KEYS: Final = (
    "url",
    "starttls",
    "ca_file",
    "allow_insecure",
    "bind_dn_template",
    "search_base",
    "search_filter",
    "bind_dn",
    "bind_password",
    "bind_password_file",
    "connect_timeout",
    "timeout",
    "pool_size",
    "canonical_attribute",
)


def parse_directory(
    table: Mapping[str, Any], source: str | Path, where: str = "directory"
) -> DirectorySettings:
    """A ``[directory]`` TOML table -> DirectorySettings; ConfigError naming
    the file and key path (``authgate.toml: directory.url: ...``). Relative
    paths (``ca_file``, ``bind_password_file``) are resolved against the
    file's folder. The bind password is never echoed in an error."""
    path = Path(source)
    t = _Table(table, where, path)
    url = t.require("url", str)
    starttls = t.get("starttls", bool, False)
    allow_insecure = t.get("allow_insecure", bool, False)
    ca_file = t.path_value("ca_file")
    if ca_file is not None:
        try:
            ssl.create_default_context(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            message = getattr(exc, "strerror", None) or exc.__class__.__name__
            raise t.error("ca_file", f"cannot load {str(ca_file)!r}: {message}") from None
    template = t.get("bind_dn_template", str, "") or None
    search_base = t.get("search_base", str, "") or None
    search_filter = t.get("search_filter", str, "(uid={user})")
    bind_dn = t.get("bind_dn", str, "") or None
    t.used.add("bind_password")
    bind_password = table.get("bind_password")
    if bind_password is not None and not isinstance(bind_password, str):
        raise t.error("bind_password", "is not a string")
    password_file = t.path_value("bind_password_file")
    if password_file is not None:
        if bind_password is not None:
            raise t.error("bind_password_file", "give bind_password or the file, not both")
        try:
            bind_password = password_file.read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            message = getattr(exc, "strerror", None) or exc.__class__.__name__
            raise t.error("bind_password_file", f"cannot read {password_file}: {message}") from None
    timeouts = {key: _seconds(t, key, default) for key, default in _TIMEOUTS.items()}
    pool_size = t.get("pool_size", int, 4)
    canonical_attribute = t.get("canonical_attribute", str, "") or None
    t.finish()
    try:
        return DirectorySettings(
            url=url,
            starttls=starttls,
            ca_file=ca_file,
            allow_insecure=allow_insecure,
            bind_dn_template=template,
            search_base=search_base,
            search_filter=search_filter,
            bind_dn=bind_dn,
            bind_password=bind_password,
            connect_timeout=timeouts["connect_timeout"],
            timeout=timeouts["timeout"],
            pool_size=pool_size,
            canonical_attribute=canonical_attribute,
        )
    except _Problem as exc:
        raise t.error(exc.key, exc.message) from None


_TIMEOUTS: Final = {"connect_timeout": 5.0, "timeout": 10.0}


def _seconds(table: _Table, key: str, default: float) -> float:
    table.used.add(key)
    value = table.data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 600:
        raise table.error(key, f"{value!r} is not a number of seconds (0 < s <= 600)")
    return float(value)


# ------------------------------------------------------------ transport


def _ber(tag: int, content: bytes) -> bytes:
    """One BER element with a definite length (RFC 4511 section 5.1)."""
    n = len(content)
    if n < 0x80:
        return bytes((tag, n)) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(size))) + size + content


def _ber_split(data: bytes) -> tuple[int, bytes, bytes] | None:
    """(tag, content, rest) of the first element, or None if incomplete.
    ValueError on what LDAP never sends (indefinite or huge lengths)."""
    if len(data) < 2:
        return None
    tag, first = data[0], data[1]
    if first < 0x80:
        start, length = 2, first
    else:
        count = first & 0x7F
        if count == 0 or count > 4:
            raise ValueError("unsupported BER length")
        if len(data) < 2 + count:
            return None
        start, length = 2 + count, int.from_bytes(data[2 : 2 + count], "big")
    if start + length > _MAX_STARTTLS_RESPONSE:
        raise ValueError("message too long")
    if len(data) < start + length:
        return None
    return tag, data[start : start + length], data[start + length :]


def _starttls_request() -> bytes:
    # LDAPMessage { messageID 1, extendedReq [APPLICATION 23] { requestName [0] OID } }
    return _ber(0x30, _ber(0x02, b"\x01") + _ber(0x77, _ber(0x80, _STARTTLS_OID)))


def _starttls_result(message: bytes) -> int:
    """The resultCode of a StartTLS response (RFC 4511 section 4.14.2);
    ValueError when the message is anything else (e.g. a notice of
    disconnection, messageID 0)."""
    outer = _ber_split(message)
    if outer is None or outer[0] != 0x30:
        raise ValueError("not an LDAPMessage")
    msgid = _ber_split(outer[1])
    if msgid is None or msgid[0] != 0x02 or msgid[1] != b"\x01":
        raise ValueError("not the answer to our request")
    op = _ber_split(msgid[2])
    if op is None or op[0] != 0x78:  # extendedResp [APPLICATION 24]
        raise ValueError("not an extended response")
    code = _ber_split(op[1])
    if code is None or code[0] != 0x0A or not 1 <= len(code[1]) <= 4:
        raise ValueError("no result code")
    return int.from_bytes(code[1], "big")


def _start_tls(sock: socket.socket, endpoint: Endpoint, timeout: float) -> None:
    """Ask for StartTLS on a fresh connection; raise unless the server agrees.

    Bytes the server sends after its response, before our handshake, are an
    injection attempt (the STARTTLS response-injection class, CVE-2011-0411
    in reverse): refused, never handed to the TLS layer or to libldap."""
    sock.settimeout(timeout)
    sock.sendall(_starttls_request())
    buffer = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            raise DirectoryUnavailable(f"{endpoint} closed the connection during StartTLS")
        buffer += chunk
        try:
            parsed = _ber_split(buffer)
        except ValueError as exc:
            raise DirectoryUnavailable(f"{endpoint}: bad StartTLS response ({exc})") from None
        if parsed is not None:
            break
    if parsed[2]:
        raise DirectoryUnavailable(f"{endpoint} sent data after its StartTLS response")
    try:
        code = _starttls_result(buffer)
    except ValueError as exc:
        raise DirectoryUnavailable(f"{endpoint}: bad StartTLS response ({exc})") from None
    if code != 0:
        raise DirectoryUnavailable(f"{endpoint} refused StartTLS (result code {code})")


class _Relay:
    """libldap's plaintext, carried over a socketpair into a TLS connection
    that Python's ssl made (see the module docstring for why)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.closed = threading.Event()

    async def start(
        self, tls: tuple[asyncio.StreamReader, asyncio.StreamWriter], outer: socket.socket
    ) -> None:
        local = await asyncio.open_connection(sock=outer)
        self._writers = [tls[1], local[1]]
        pipes = [
            asyncio.create_task(self._pipe(tls[0], local[1])),
            asyncio.create_task(self._pipe(local[0], tls[1])),
        ]
        self._tasks = [*pipes, asyncio.create_task(self._watch(pipes))]

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            with contextlib.suppress(OSError, ssl.SSLError, asyncio.IncompleteReadError):
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
        finally:
            # Graceful: what is buffered (libldap's UnbindRequest) goes out
            # first, then TLS close_notify.
            writer.close()

    async def _watch(self, pipes: Sequence[asyncio.Task[None]]) -> None:
        # Either side ending ends both: libldap sees EOF when the server
        # goes, the server sees the connection close when libldap unbinds.
        await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        self.closed.set()
        for writer in self._writers:
            writer.close()

    def _abort(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        for task in self._tasks:
            task.cancel()
        self.closed.set()

    def abort(self) -> None:
        """Drop both connections now (from any thread)."""
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            self._loop.call_soon_threadsafe(self._abort)


class _LoopThread:
    """A private event loop in a daemon thread, for the TLS relays."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                self._thread = threading.Thread(target=run, name="authgate-ldap-tls", daemon=True)
                self._thread.start()
                ready.wait()
                self._loop = loop
            return self._loop

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop())
        try:
            return future.result(timeout)
        except FutureTimeout:
            future.cancel()
            raise TimeoutError from None

    def call_soon(self, callback: Callable[[], object]) -> None:
        """Run `callback` in the loop's thread (now, if there is no loop)."""
        with self._lock:
            loop = self._loop
        if loop is None:
            callback()
            return
        try:
            loop.call_soon_threadsafe(callback)
        except RuntimeError:  # closed meanwhile: nobody else uses the sockets
            callback()

    def close(self) -> None:
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return

        async def shutdown() -> None:
            # Relays of just-unbound connections are still forwarding the
            # UnbindRequest: give them a moment, then cut the rest.
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            if tasks:
                _, pending = await asyncio.wait(tasks, timeout=1.0)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
            loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), loop)
        thread.join(5)
        if not thread.is_alive():
            loop.close()


class _Connection:
    """One libldap connection (and its TLS relay, when there is one)."""

    def __init__(self, conn: Any, relay: _Relay | None) -> None:
        self.ldap = conn
        self.relay = relay
        self.reused = False

    def alive(self) -> bool:
        return self.relay is None or not self.relay.closed.is_set()

    def close(self) -> None:
        # Unbinding closes libldap's end of the socketpair; the relay then
        # forwards the UnbindRequest and closes the TLS connection itself.
        with contextlib.suppress(ldap.LDAPError):
            self.ldap.unbind_s()


class _Pool:
    """At most `size` connections of one kind, busy or idle; idle ones are
    reused. Callers wait up to `wait` seconds for a free slot."""

    def __init__(self, name: str, opener: Callable[[], _Connection], size: int, wait: float):
        self._name = name
        self._open = opener
        self._size = size
        self._wait = wait
        self._slots = threading.BoundedSemaphore(size)
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    def acquire(self) -> _Connection:
        if not self._slots.acquire(timeout=self._wait):
            raise DirectoryUnavailable(f"all {self._size} {self._name} connections are busy")
        try:
            while True:
                with self._lock:
                    conn = self._idle.pop() if self._idle else None
                if conn is None:
                    return self._open()
                if conn.alive():
                    conn.reused = True
                    return conn
                conn.close()
        except BaseException:
            self._slots.release()
            raise

    def release(self, conn: _Connection) -> None:
        with self._lock:
            keep = not self._closed and conn.alive()
            if keep:
                self._idle.append(conn)
        if not keep:
            conn.close()
        self._slots.release()

    def discard(self, conn: _Connection, *, lost: bool = False) -> None:
        """Close a connection that failed. `lost`: the server dropped it, so
        the idle ones (as old or older) are most likely gone too."""
        conn.close()
        if lost:
            with self._lock:
                idle, self._idle = self._idle, []
            for other in idle:
                other.close()
        self._slots.release()

    def idle(self) -> int:
        with self._lock:
            return len(self._idle)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _describe(exc: BaseException) -> str:
    """An LDAP error in words, from libldap's description only (its `info`
    may echo request data)."""
    if isinstance(exc, ldap.LDAPError) and exc.args and isinstance(exc.args[0], dict):
        desc = exc.args[0].get("desc")
        if isinstance(desc, str):
            return desc
    return exc.__class__.__name__


# ------------------------------------------------------------ directory


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
        if settings.bind_dn_template is not None:
            dn = settings.bind_dn_template.replace(USER_PLACEHOLDER, escape_dn_value(username))
            values = self._bind(dn, password, read=attribute)
            if values is None:
                return PasswordVerdict(False)
            return PasswordVerdict(True, self._identity(dn, values, username))
        found = self._find(username, attribute)
        if found is None:
            assert settings.search_base is not None
            self._bind(f"{self._decoy},{settings.search_base}", password)
            return PasswordVerdict(False)
        dn, values = found
        if self._bind(dn, password) is None:
            return PasswordVerdict(False, _canonical_name(values, username))
        return PasswordVerdict(True, self._identity(dn, values, username))

    def _identity(self, dn: str, values: Sequence[bytes], typed: str) -> str:
        name = _canonical_name(values, typed)
        if name is None:
            attribute = self.settings.identity_attribute
            raise DirectoryUnavailable(
                f"{self._endpoint}: {dn!r} has no single {attribute!r} value to name the user "
                "by (readable by the user, or set [directory] canonical_attribute)"
            )
        return name

    def _bind(self, dn: str, password: str, *, read: str | None = None) -> list[bytes] | None:
        """Bind as `dn`: None when the password is refused, else the values
        of attribute `read` of the entry, read as the user just bound ([]
        when not asked for, or not readable)."""
        for attempt in (1, 2):
            conn = self._bind_pool.acquire()
            values: list[bytes] = []
            try:
                conn.ldap.simple_bind_s(dn, password)
                if read is not None:
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

    def _read_own(self, conn: _Connection, dn: str, attribute: str) -> list[bytes]:
        """`attribute` of entry `dn`, on a connection bound as that entry."""
        try:
            results = conn.ldap.search_ext_s(
                dn,
                ldap.SCOPE_BASE,
                "(objectClass=*)",
                [attribute],
                sizelimit=1,
                timeout=self.settings.timeout,
            )
        except (ldap.NO_SUCH_OBJECT, ldap.INSUFFICIENT_ACCESS):
            return []  # hidden from the user by the ACLs: no name (_identity says so)
        entries = [attrs for found, attrs in results if isinstance(found, str)]
        return _attribute_values(entries[0], attribute) if len(entries) == 1 else []

    def _find(self, username: str, attribute: str) -> tuple[str, list[bytes]] | None:
        """The one entry the search filter finds for `username`: its DN and
        the values of `attribute`; None for no entry or several."""
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
                    [attribute],
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
            return dn, _attribute_values(attrs, attribute)
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


# ---------------------------------------------------------------- store


class DirectoryStore:
    """Answers SASL lookups from a Directory, with the surface the proxy
    uses on a UserStore: `resolve`, `aresolve`, `offerable`, `realm`.

    A PasswordCheck is a bind; a SecretLookup gets None (a directory reveals
    no secret), which is why `offerable` keeps only PLAIN and LOGIN.
    `resolve` raises DirectoryUnavailable when the directory cannot answer."""

    def __init__(self, directory: Directory, *, executor: Executor | None = None) -> None:
        self.directory = directory
        self._executor = executor

    @property
    def realm(self) -> str | None:
        return None

    def __len__(self) -> int:
        # The users live in the directory: there is no list to count.
        return 0

    def user(self, name: str) -> None:
        """No local record: a directory's own policy governs expiry."""
        return None

    def resolve(self, request: LookupRequest) -> LookupAnswer:
        if isinstance(request, PasswordCheck):
            return self.directory.authenticate(request.authcid, request.password)
        if isinstance(request, SecretLookup):
            return None
        raise TypeError(f"not a lookup request: {type(request).__name__}")

    async def aresolve(
        self, request: LookupRequest, *, executor: Executor | None = None
    ) -> LookupAnswer:
        """`resolve` in a worker thread: a bind is a network round trip."""
        chosen = executor or self._executor
        if chosen is None:
            return await asyncio.to_thread(self.resolve, request)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(chosen, self.resolve, request)

    def offerable(self, order: Sequence[str], *, realm: str | None = None) -> StoreOffer:
        return StoreOffer.password_only(order, DIRECTORY_REASON)

    def close(self) -> None:
        self.directory.close()
