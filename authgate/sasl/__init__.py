"""SASL mechanisms: one module each, a server and a client side, no I/O.

The registry below is the single place that knows every mechanism's name,
whether it sends the password in the clear, and which stored-secret forms
can verify it. Policy and the credential store read it; nothing else
hard-codes mechanism names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from authgate.sasl.base import (
    ClientContext,
    ClientCredentials,
    ClientMechanism,
    SecretForm,
    ServerContext,
    ServerMechanism,
)
from authgate.sasl.cram_md5 import CramMD5Client, CramMD5Server
from authgate.sasl.digest_md5 import DigestMD5Client, DigestMD5Server
from authgate.sasl.external import ExternalClient, ExternalServer
from authgate.sasl.login import LoginClient, LoginServer
from authgate.sasl.ntlm import NTLMClient, NTLMServer
from authgate.sasl.oauth import OAuthBearerClient, OAuthBearerServer, XOAuth2Client, XOAuth2Server
from authgate.sasl.plain import PlainClient, PlainServer
from authgate.sasl.scram import (
    ScramSHA1Client,
    ScramSHA1PlusClient,
    ScramSHA1PlusServer,
    ScramSHA1Server,
    ScramSHA256Client,
    ScramSHA256PlusClient,
    ScramSHA256PlusServer,
    ScramSHA256Server,
)


@dataclass(frozen=True)
class MechanismInfo:
    name: str
    server_class: Callable[[ServerContext], ServerMechanism]
    client_class: Callable[[ClientCredentials, ClientContext], ClientMechanism]
    # PLAIN and LOGIN carry the password itself: they need TLS under
    # require-secure-auth, and any verifiable hash can check them.
    cleartext: bool = False
    # Stored forms a server can verify this mechanism with (besides
    # plaintext, which serves everything). Empty for cleartext mechanisms.
    forms: frozenset[SecretForm] = frozenset()
    channel_binding: bool = False
    # Verified by the OAuth token verifier, not the credential store: a
    # bearer token is a cleartext credential (TLS under require-secure-auth).
    bearer: bool = False
    # Verified below SASL (EXTERNAL: a TLS client certificate), not by the store.
    external: bool = False

    def server(self, ctx: ServerContext) -> ServerMechanism:
        return self.server_class(ctx)

    def client(self, creds: ClientCredentials, ctx: ClientContext) -> ClientMechanism:
        return self.client_class(creds, ctx)


MECHANISMS: dict[str, MechanismInfo] = {
    info.name: info
    for info in (
        MechanismInfo("PLAIN", PlainServer, PlainClient, cleartext=True),
        MechanismInfo("LOGIN", LoginServer, LoginClient, cleartext=True),
        MechanismInfo(
            "CRAM-MD5", CramMD5Server, CramMD5Client, forms=frozenset({SecretForm.CRAM_MD5})
        ),
        MechanismInfo(
            "DIGEST-MD5",
            DigestMD5Server,
            DigestMD5Client,
            forms=frozenset({SecretForm.DIGEST_MD5}),
        ),
        MechanismInfo("NTLM", NTLMServer, NTLMClient, forms=frozenset({SecretForm.NT_HASH})),
        MechanismInfo(
            "SCRAM-SHA-1",
            ScramSHA1Server,
            ScramSHA1Client,
            forms=frozenset({SecretForm.SCRAM_SHA_1}),
        ),
        MechanismInfo(
            "SCRAM-SHA-256",
            ScramSHA256Server,
            ScramSHA256Client,
            forms=frozenset({SecretForm.SCRAM_SHA_256}),
        ),
        MechanismInfo(
            "SCRAM-SHA-1-PLUS",
            ScramSHA1PlusServer,
            ScramSHA1PlusClient,
            forms=frozenset({SecretForm.SCRAM_SHA_1}),
            channel_binding=True,
        ),
        MechanismInfo(
            "SCRAM-SHA-256-PLUS",
            ScramSHA256PlusServer,
            ScramSHA256PlusClient,
            forms=frozenset({SecretForm.SCRAM_SHA_256}),
            channel_binding=True,
        ),
        MechanismInfo(
            "OAUTHBEARER", OAuthBearerServer, OAuthBearerClient, cleartext=True, bearer=True
        ),
        MechanismInfo("XOAUTH2", XOAuth2Server, XOAuth2Client, cleartext=True, bearer=True),
        MechanismInfo("EXTERNAL", ExternalServer, ExternalClient, external=True),
    )
}

# The admin page's default order: challenge-response first.
DEFAULT_ORDER: tuple[str, ...] = ("CRAM-MD5", "DIGEST-MD5", "NTLM", "LOGIN", "PLAIN")


def mechanism_info(name: str) -> MechanismInfo:
    """Look a mechanism up by its (case-insensitive) name; KeyError if unknown."""
    return MECHANISMS[name.upper()]


def is_known(name: str) -> bool:
    return name.upper() in MECHANISMS
