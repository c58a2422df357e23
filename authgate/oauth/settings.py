"""[oauth] settings: how bearer tokens are verified.

```toml
[oauth]
# Either: verify JWTs here, against the identity provider's keys
jwks = "https://idp.example.org/.well-known/jwks.json"   # or a file path
issuer = "https://idp.example.org"
audience = ["mail.example.org"]
algorithms = ["RS256", "ES256", "EdDSA", "Ed25519"]   # never "none" or HS256
user_claim = "email"                       # the claim naming the mail user
leeway = 30                                # clock skew allowed for exp, nbf, iat
jwks_refresh = 300                         # seconds a fetched key set is kept
# Or: ask the identity provider (RFC 7662 token introspection)
introspection_url = "https://idp.example.org/oauth2/introspect"
client_id = "authgate"
client_secret_file = "introspection.secret"
cache_seconds = 60                         # a verdict is reused this long at most
# Both: what the OAUTHBEARER error challenge tells the client
scope = "openid email"
openid_configuration = "https://idp.example.org/.well-known/openid-configuration"
```

http:// URLs are accepted for loopback addresses only: a key set or an
introspection answer that an attacker on the path can change would let
them sign in as anyone.
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Final

from authgate.settings import Range, Table, number

__all__ = ["ALGORITHMS", "OAuthSettings", "parse_oauth"]

ALGORITHMS: Final = ("RS256", "ES256", "EdDSA", "Ed25519")
# What may be asked for: asymmetric signatures only. A shared-secret HS256
# key would have to sit on every mail gateway, and "none" is no signature.
ALLOWED: Final = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA", "Ed25519"}
)


@dataclass(frozen=True)
class OAuthSettings:
    jwks: str | None = None  # an https URL, or a file path
    issuer: str | None = None
    audience: tuple[str, ...] = ()
    algorithms: tuple[str, ...] = ALGORITHMS
    user_claim: str = "email"
    leeway: int = 30
    jwks_refresh: int = 300
    introspection_url: str | None = None
    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)
    client_secret_file: Path | None = None
    cache_seconds: int = 60
    timeout: float = 5.0
    ca_file: Path | None = None  # trust for the identity provider's https
    scope: str = ""
    openid_configuration: str = ""

    RANGES: ClassVar[dict[str, Range]] = {
        "leeway": Range(0, 300, integer=True),
        "jwks_refresh": Range(10, 86400, integer=True),
        "cache_seconds": Range(0, 3600, integer=True),
        "timeout": Range(0, 60, open_low=True),
    }

    @property
    def introspection(self) -> bool:
        return self.introspection_url is not None


def _url_problem(url: str) -> str | None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return None
    if parts.scheme == "http" and parts.hostname:
        host = parts.hostname
        try:
            if host == "localhost" or ipaddress.ip_address(host).is_loopback:
                return None
        except ValueError:
            pass
        return "http:// is accepted for loopback addresses only: use https://"
    return "is not an https:// URL"


def parse_oauth(data: Mapping[str, Any], source: Path) -> OAuthSettings:
    table = Table(data, "oauth", source)
    jwks = table.get("jwks", str, "") or None
    introspection_url = table.get("introspection_url", str, "") or None
    if (jwks is None) == (introspection_url is None):
        raise table.error("jwks", "give jwks (verify JWTs here) or introspection_url, one of them")
    if jwks is not None and "://" in jwks:
        problem = _url_problem(jwks)
        if problem:
            raise table.error("jwks", f"{jwks!r} {problem}")
    elif jwks is not None:
        path = table.path_value("jwks")
        assert path is not None
        jwks = str(path)
    if introspection_url is not None:
        problem = _url_problem(introspection_url)
        if problem:
            raise table.error("introspection_url", f"{introspection_url!r} {problem}")
    issuer = table.get("issuer", str, "") or None
    audience: tuple[str, ...] = ()
    if isinstance(table.data.get("audience"), str):
        audience = (table.get("audience", str, ""),)
    elif table.has("audience"):
        audience = table.strings("audience", ())
    if jwks is not None:
        # Without them any token the provider ever signed, for any service,
        # would open the mailbox (RFC 8725 section 3.8, 3.9).
        if issuer is None:
            raise table.error("issuer", "is required with jwks")
        if not audience:
            raise table.error("audience", "is required with jwks")
    algorithms = table.strings("algorithms", ALGORITHMS)
    for i, alg in enumerate(algorithms):
        if alg not in ALLOWED:
            allowed = ", ".join(sorted(ALLOWED))
            raise table.error(f"algorithms[{i}]", f"{alg!r} is not allowed (one of {allowed})")
    if not algorithms:
        raise table.error("algorithms", "lists no algorithm")
    values: dict[str, Any] = {}
    for key, bounds in OAuthSettings.RANGES.items():
        if table.has(key):
            values[key] = number(table, key, bounds)
    client_id = table.get("client_id", str, "") or None
    client_secret = table.get("client_secret", str, "") or None
    client_secret_file = table.path_value("client_secret_file")
    if introspection_url is not None and client_id is None:
        raise table.error("client_id", "is required with introspection_url")
    if client_secret is not None and client_secret_file is not None:
        raise table.error("client_secret", "give client_secret or client_secret_file, not both")
    settings = OAuthSettings(
        jwks=jwks,
        issuer=issuer,
        audience=audience,
        algorithms=algorithms,
        user_claim=table.get("user_claim", str, "email"),
        introspection_url=introspection_url,
        client_id=client_id,
        client_secret=client_secret,
        client_secret_file=client_secret_file,
        ca_file=table.path_value("ca_file"),
        scope=table.get("scope", str, ""),
        openid_configuration=table.get("openid_configuration", str, ""),
        **values,
    )
    table.finish()
    return settings
