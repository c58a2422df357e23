"""TLS client certificates: which listeners ask for them, and which user a
verified one stands for (SASL EXTERNAL, RFC 4422 appendix A).

On a listener:

```toml
[[listeners]]
tls = "implicit"                 # or "starttls"
client_ca = "clients-ca.pem"     # the CA that issues the users' certificates
client_cert = "optional"         # or "required": no certificate, no TLS
client_cert_user = "email"       # "email" (SAN rfc822Name), "cn" (subject
                                 # CN) or "fingerprint" (cert_fingerprints
                                 # listed per user in the users file)
```

The handshake verifies the certificate against `client_ca` (an expired,
not-yet-valid or unknown-CA certificate fails the handshake); only a
verified certificate that maps to a user makes EXTERNAL offered. Pure
functions: the certificate comes in as the ssl module gives it.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

__all__ = [
    "CertRequirement",
    "CertUserRule",
    "ClientCertSettings",
    "fingerprint",
    "normalise_fingerprint",
    "user_of_certificate",
]

_HEX: Final = re.compile(r"[0-9a-f]{64}")


class CertRequirement(enum.Enum):
    OPTIONAL = "optional"
    REQUIRED = "required"


class CertUserRule(enum.Enum):
    EMAIL = "email"
    CN = "cn"
    FINGERPRINT = "fingerprint"


@dataclass(frozen=True)
class ClientCertSettings:
    ca_file: Path
    requirement: CertRequirement = CertRequirement.OPTIONAL
    rule: CertUserRule = CertUserRule.EMAIL


def fingerprint(der: bytes) -> str:
    """The certificate's SHA-256 fingerprint, as the users file lists it."""
    return "sha256:" + hashlib.sha256(der).hexdigest()


def normalise_fingerprint(text: str) -> str | None:
    """"sha256:AB:CD:..." or plain hex, any case -> "sha256:abcd..."; None
    if it is not a SHA-256 fingerprint."""
    value = text.strip().lower()
    if value.startswith("sha256:"):
        value = value[len("sha256:") :]
    value = value.replace(":", "")
    return "sha256:" + value if _HEX.fullmatch(value) else None


def _printable(value: object) -> str | None:
    if isinstance(value, str) and value and value.isprintable() and len(value) <= 320:
        return value
    return None


def user_of_certificate(
    rule: CertUserRule,
    cert: dict[str, Any],
    der: bytes,
    by_fingerprint: Callable[[str], str | None],
) -> str | None:
    """The user a verified certificate (`getpeercert()` and its DER form)
    stands for under `rule`, or None. Exactly one candidate, or nobody: a
    certificate naming two e-mail addresses or CNs maps to no one."""
    if rule is CertUserRule.FINGERPRINT:
        return by_fingerprint(fingerprint(der))
    found: list[str] = []
    if rule is CertUserRule.EMAIL:
        for kind, value in cert.get("subjectAltName", ()):
            if kind == "email":
                found.append(value)
    else:
        for rdn in cert.get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    found.append(value)
    if len(found) != 1:
        return None
    return _printable(found[0])
