"""SASL mechanisms: one module each, a server and a client side, no I/O.

The registry below is the single place that knows every mechanism's name,
whether it sends the password in the clear, and which stored-secret forms
can verify it. Policy and the credential store read it; nothing else
hard-codes mechanism names.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from authgate.sasl.base import (
    ClientContext,
    ClientCredentials,
    ClientMechanism,
    SecretForm,
    ServerContext,
    ServerMechanism,
)


@dataclass(frozen=True)
class MechanismInfo:
    name: str
    module: str  # authgate.sasl.<module>
    server_class: str
    client_class: str
    # PLAIN and LOGIN carry the password itself: they need TLS under
    # require-secure-auth, and any verifiable hash can check them.
    cleartext: bool
    # Stored forms a server can verify this mechanism with (besides
    # plaintext, which serves everything). Empty for cleartext mechanisms.
    forms: frozenset[SecretForm] = frozenset()
    channel_binding: bool = False

    def server(self, ctx: ServerContext) -> ServerMechanism:
        cls = getattr(importlib.import_module(f"authgate.sasl.{self.module}"), self.server_class)
        server: ServerMechanism = cls(ctx)
        return server

    def client(self, creds: ClientCredentials, ctx: ClientContext) -> ClientMechanism:
        cls = getattr(importlib.import_module(f"authgate.sasl.{self.module}"), self.client_class)
        client: ClientMechanism = cls(creds, ctx)
        return client


def _info(
    name: str,
    module: str,
    prefix: str,
    *,
    cleartext: bool = False,
    forms: tuple[SecretForm, ...] = (),
    channel_binding: bool = False,
) -> MechanismInfo:
    return MechanismInfo(
        name=name,
        module=module,
        server_class=f"{prefix}Server",
        client_class=f"{prefix}Client",
        cleartext=cleartext,
        forms=frozenset(forms),
        channel_binding=channel_binding,
    )


MECHANISMS: dict[str, MechanismInfo] = {
    info.name: info
    for info in (
        _info("PLAIN", "plain", "Plain", cleartext=True),
        _info("LOGIN", "login", "Login", cleartext=True),
        _info("CRAM-MD5", "cram_md5", "CramMD5", forms=(SecretForm.CRAM_MD5,)),
        _info("DIGEST-MD5", "digest_md5", "DigestMD5", forms=(SecretForm.DIGEST_MD5,)),
        _info("NTLM", "ntlm", "NTLM", forms=(SecretForm.NT_HASH,)),
        _info("SCRAM-SHA-1", "scram", "ScramSHA1", forms=(SecretForm.SCRAM_SHA_1,)),
        _info("SCRAM-SHA-256", "scram", "ScramSHA256", forms=(SecretForm.SCRAM_SHA_256,)),
        _info(
            "SCRAM-SHA-1-PLUS",
            "scram",
            "ScramSHA1Plus",
            forms=(SecretForm.SCRAM_SHA_1,),
            channel_binding=True,
        ),
        _info(
            "SCRAM-SHA-256-PLUS",
            "scram",
            "ScramSHA256Plus",
            forms=(SecretForm.SCRAM_SHA_256,),
            channel_binding=True,
        ),
    )
}

# The admin page's default order: challenge-response first.
DEFAULT_ORDER: tuple[str, ...] = ("CRAM-MD5", "DIGEST-MD5", "NTLM", "LOGIN", "PLAIN")


def mechanism(name: str) -> MechanismInfo:
    """Look a mechanism up by its (case-insensitive) name; KeyError if unknown."""
    return MECHANISMS[name.upper()]


def is_known(name: str) -> bool:
    return name.upper() in MECHANISMS
