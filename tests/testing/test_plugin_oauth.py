"""The plugin's OAuth and client-certificate fixtures, as a client
developer would use them: a token from `authgate_identity_provider`, a
certificate from `authgate_client_ca`, Python's imaplib as the client."""

from __future__ import annotations

import asyncio
import imaplib

import pytest

from authgate.testing.client_ca import ClientCA
from authgate.testing.identity_provider import IdentityProvider
from authgate.testing.stack import Stack

pytestmark = pytest.mark.asyncio


def capabilities_and_login(
    stack: Stack, mechanism: str, message: bytes, cert: tuple[str, str] | None = None
) -> tuple[tuple[str, ...], str]:
    ep = stack["imaps"]
    context = stack.ssl_context()
    if cert is not None:
        context.load_cert_chain(*cert)
    with imaplib.IMAP4_SSL(ep.host, ep.port, ssl_context=context, timeout=20) as client:
        caps = client.capabilities
        # To the error challenge: %x01 (OAUTHBEARER) or empty (XOAUTH2).
        answers = iter([message, b"\x01" if mechanism == "OAUTHBEARER" else b""])
        try:
            typ, _ = client.authenticate(mechanism, lambda _challenge: next(answers))
        except imaplib.IMAP4.error as exc:
            return caps, str(exc)
        return caps, typ


@pytest.mark.authgate(oauth=True, client_certs=True)
async def test_oauth_token_and_client_certificate_fixtures(
    authgate: Stack, authgate_identity_provider: IdentityProvider, authgate_client_ca: ClientCA
) -> None:
    token = authgate_identity_provider.token("alice")
    message = f"n,a=alice,\x01auth=Bearer {token}\x01\x01".encode()
    caps, result = await asyncio.to_thread(capabilities_and_login, authgate, "OAUTHBEARER", message)
    assert "AUTH=OAUTHBEARER" in caps and "AUTH=XOAUTH2" in caps and "AUTH=EXTERNAL" not in caps
    assert result == "OK"
    expired = authgate_identity_provider.token("alice", lifetime=-600)
    refused = f"user=alice\x01auth=Bearer {expired}\x01\x01".encode()
    _, result = await asyncio.to_thread(capabilities_and_login, authgate, "XOAUTH2", refused)
    assert "AUTHENTICATIONFAILED" in result
    cert, key = authgate_client_ca.issue("alice")
    caps, result = await asyncio.to_thread(
        capabilities_and_login, authgate, "EXTERNAL", b"", (str(cert), str(key))
    )
    assert "AUTH=EXTERNAL" in caps and result == "OK"


async def test_without_them_no_bearer_or_external(authgate: Stack) -> None:
    caps, _ = await asyncio.to_thread(capabilities_and_login, authgate, "PLAIN", b"\0alice\0x")
    assert not {"AUTH=OAUTHBEARER", "AUTH=XOAUTH2", "AUTH=EXTERNAL"} & set(caps)
