"""[directory] settings: where the directory is, how to find a user's entry."""

from __future__ import annotations

import ipaddress
import re
import ssl
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Final

import ldap  # type: ignore[import-untyped,unused-ignore]
import ldap.dn  # type: ignore[import-untyped,unused-ignore]

from authgate.credentials.directory.names import USER_PLACEHOLDER
from authgate.settings import Problem, Range, Table

# RFC 4512 section 1.4: an attribute description is a descr or a numericoid.
_ATTRIBUTE: Final = re.compile(r"[A-Za-z][A-Za-z0-9-]{0,63}|[0-9]+(\.[0-9]+)+")
DEFAULT_PORTS: Final = {"ldap": 389, "ldaps": 636}


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
    # The attribute that names the user's mail host (authgate.routing: its
    # value goes through [routing] hosts to a backend); None: not read.
    backend_attribute: str | None = None

    # What a configuration may set. Built in code, a timeout need only be
    # positive (the check below).
    RANGES: ClassVar[Mapping[str, Range]] = {
        "connect_timeout": Range(0, 600, open_low=True),
        "timeout": Range(0, 600, open_low=True),
        "pool_size": Range(1, 64, integer=True),
    }

    def __post_init__(self) -> None:
        try:
            endpoint = parse_url(self.url)
        except ValueError as exc:
            raise Problem("url", str(exc)) from None
        if endpoint.scheme == "ldaps" and self.starttls:
            raise Problem("starttls", "ldaps:// is already TLS: drop starttls or use ldap://")
        plain = endpoint.scheme == "ldap" and not self.starttls
        if plain and not self.allow_insecure:
            raise Problem(
                "url",
                f"{self.url!r} would send passwords unencrypted: use ldaps://, or "
                "ldap:// with starttls = true",
            )
        if plain and not endpoint.loopback:
            raise Problem(
                "allow_insecure",
                f"unencrypted LDAP is allowed to a loopback host only, not {endpoint.host!r}",
            )
        if self.allow_insecure and not plain:
            raise Problem("allow_insecure", "only means something for plain ldap://")
        if (self.bind_dn_template is None) == (self.search_base is None):
            raise Problem(
                "bind_dn_template", "give either bind_dn_template or search_base (not both)"
            )
        if self.bind_dn_template is not None:
            self._check_template(self.bind_dn_template)
            if self.bind_dn is not None or self.bind_password is not None:
                raise Problem("bind_dn", "is only used for a search (search_base)")
        else:
            assert self.search_base is not None
            problem = _dn_problem(self.search_base)
            if problem:
                raise Problem("search_base", problem)
            problem = _filter_problem(self.search_filter)
            if problem:
                raise Problem("search_filter", problem)
            self._check_service_account()
        for key in ("connect_timeout", "timeout"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise Problem(key, f"{value!r} is not a positive number of seconds")
        pool = self.RANGES["pool_size"]
        if not pool.is_kind(self.pool_size) or not pool.contains(self.pool_size):
            raise Problem(
                "pool_size", f"{self.pool_size!r} is not between {pool.low:g} and {pool.high:g}"
            )
        if self.canonical_attribute is not None and not _ATTRIBUTE.fullmatch(
            self.canonical_attribute
        ):
            raise Problem(
                "canonical_attribute",
                f"{self.canonical_attribute!r} is not an attribute name (such as uid)",
            )
        if self.backend_attribute is not None and not _ATTRIBUTE.fullmatch(
            self.backend_attribute
        ):
            raise Problem(
                "backend_attribute",
                f"{self.backend_attribute!r} is not an attribute name (such as mailHost)",
            )

    def _check_template(self, template: str) -> None:
        if template.count(USER_PLACEHOLDER) != 1:
            raise Problem("bind_dn_template", f"must contain {USER_PLACEHOLDER} once")
        problem = _dn_problem(template.replace(USER_PLACEHOLDER, "x"))
        if problem:
            raise Problem("bind_dn_template", problem)

    def _check_service_account(self) -> None:
        if self.bind_dn is None:
            if self.bind_password is not None:
                raise Problem("bind_password", "given without bind_dn")
            return
        problem = _dn_problem(self.bind_dn)
        if problem:
            raise Problem("bind_dn", problem)
        # An empty password would make the service bind an unauthenticated
        # (anonymous) one that some servers report as a success.
        if not self.bind_password:
            raise Problem("bind_password", "is required with bind_dn (and must not be empty)")

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


def parse_directory(
    table: Mapping[str, Any], source: str | Path, where: str = "directory"
) -> DirectorySettings:
    """A ``[directory]`` TOML table -> DirectorySettings; ConfigError naming
    the file and key path (``authgate.toml: directory.url: ...``). Relative
    paths (``ca_file``, ``bind_password_file``) are resolved against the
    file's folder. The bind password is never echoed in an error."""
    path = Path(source)
    t = Table(table, where, path)
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
    backend_attribute = t.get("backend_attribute", str, "") or None
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
            backend_attribute=backend_attribute,
        )
    except Problem as exc:
        raise t.error(exc.key, exc.message) from None


_TIMEOUTS: Final = {"connect_timeout": 5.0, "timeout": 10.0}


def _seconds(table: Table, key: str, default: float) -> float:
    table.used.add(key)
    value = table.data.get(key, default)
    bounds = DirectorySettings.RANGES[key]
    if not bounds.is_kind(value) or not bounds.contains(value):
        raise table.error(key, f"{value!r} is not a number of seconds (0 < s <= {bounds.high:g})")
    return float(value)
