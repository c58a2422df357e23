"""OAUTHBEARER and XOAUTH2 through the gateway, with real clients and a
real identity provider (JWK set over HTTP on loopback):

- curl --oauth2-bearer on IMAP, POP3 and SMTP, both mechanisms;
- msmtp with auth oauthbearer and auth xoauth2;
- Python's imaplib.authenticate;
- an 8 KiB token through every protocol's line limit, POP3's included;
- expired, wrong-audience, wrong-issuer, alg none, wrong-key and tampered
  tokens refused, each counted by the defence (the address is blocked after
  exactly that many), and none of them in a log line.

Terminate mode: the gateway logs in to the embedded backends as the
token's user with the master credential.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import imaplib
import logging
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from authgate.testing.identity_provider import IdentityProvider
from authgate.testing.kit import installed
from authgate.testing.stack import ListenerSpec, Stack, embedded_stack

USER = "alice@example.org"
RCPT = "rcpt@example.test"
BAD_KINDS = ("expired", "wrong-aud", "wrong-iss", "alg-none", "wrong-key", "tampered")
TIMEOUT = 20

pytestmark = pytest.mark.asyncio


@pytest.fixture(scope="module")
def idp() -> Iterator[IdentityProvider]:
    with IdentityProvider() as provider:
        yield provider


@pytest_asyncio.fixture
async def stack(tmp_path: Path, idp: IdentityProvider) -> AsyncIterator[Stack]:
    oauth = (
        "[oauth]\n"
        f'jwks = "{idp.jwks_url}"\n'
        f'issuer = "{idp.issuer}"\n'
        f'audience = "{idp.audience}"\n'
        'scope = "openid email"\n'
        # Bad tokens from 127.0.0.7 are counted: the address is blocked
        # after exactly as many failures as there are kinds of bad token.
        "[defence]\nfailure_delay = 0\npenalties = [0.05]\n"
        f"block_after = {len(BAD_KINDS)}\nblock_window = 600\n"
    )
    async with embedded_stack(
        tmp_path,
        # The backend's recipient check reads the local part: "rcpt".
        users={USER: "Unused-Passw0rd-9", "rcpt": "Unused-Passw0rd-8"},
        security="none",
        mechanisms=["OAUTHBEARER", "XOAUTH2", "PLAIN"],
        layout=(
            ListenerSpec("imap", "imap", "none"),
            ListenerSpec("pop3", "pop3", "none"),
            ListenerSpec("submission", "smtp", "none"),
        ),
        messages={USER: [b"Subject: seed\r\n\r\nhello\r\n"]},
        extra_config=oauth,
    ) as running:
        yield running


def curl(stack: Stack, protocol: str, token: str, mechanism: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    ep = stack[{"imap": "imap", "pop3": "pop3", "smtp": "submission"}[protocol]]
    url = f"{protocol}://{ep.host}:{ep.port}/"
    # The token in a config file, not on the command line (ps would show it).
    config = tmp / f"curl-{protocol}-{mechanism}.conf"
    config.write_text(f'oauth2-bearer = "{token}"\n')
    args = [
        installed("curl"), "--silent", "--show-error", "--max-time", str(TIMEOUT),
        "--user", f"{USER}:", "--login-options", f"AUTH={mechanism}", "--config", str(config),
    ]
    if protocol == "smtp":
        mail = tmp / "mail.txt"
        mail.write_text("Subject: via curl\r\n\r\nhi\r\n")
        args += ["--mail-from", USER, "--mail-rcpt", RCPT, "--upload-file", str(mail)]
    return subprocess.run([*args, url], capture_output=True, text=True, timeout=TIMEOUT + 10, check=False)


@pytest.mark.parametrize("protocol", ["imap", "pop3", "smtp"])
@pytest.mark.parametrize("mechanism", ["OAUTHBEARER", "XOAUTH2"])
async def test_curl_oauth2_bearer(
    stack: Stack, idp: IdentityProvider, tmp_path: Path, protocol: str, mechanism: str
) -> None:
    token = idp.token(USER, alg="ES256")
    done = await asyncio.to_thread(curl, stack, protocol, token, mechanism, tmp_path)
    assert done.returncode == 0, done.stderr
    if protocol == "pop3":
        assert done.stdout.startswith("1 "), done.stdout  # the seed message listed
    refused = await asyncio.to_thread(curl, stack, protocol, idp.token(USER, lifetime=-600), mechanism, tmp_path)
    assert refused.returncode == 67, refused.stderr  # CURLE_LOGIN_DENIED


@pytest.mark.parametrize("protocol", ["imap", "pop3", "smtp"])
async def test_an_8_kib_token_fits_every_protocol(
    stack: Stack, idp: IdentityProvider, tmp_path: Path, protocol: str
) -> None:
    token = idp.token(USER, padding=8192)
    assert len(token) > 8192
    done = await asyncio.to_thread(curl, stack, protocol, token, "OAUTHBEARER", tmp_path)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("mechanism", ["oauthbearer", "xoauth2"])
async def test_msmtp(stack: Stack, idp: IdentityProvider, tmp_path: Path, mechanism: str) -> None:
    ep = stack["submission"]
    secret = tmp_path / "token"
    secret.touch(0o600)
    secret.write_text(idp.token(USER, alg="EdDSA") + "\n")

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                installed("msmtp"), f"--host={ep.host}", f"--port={ep.port}", f"--timeout={TIMEOUT}",
                "--domain=client.example.test", f"--auth={mechanism}", f"--user={USER}",
                f"--passwordeval=cat {secret}", f"--from={USER}", "--tls=off", "--",
                RCPT,
            ],
            input="Subject: via msmtp\r\n\r\nhi\r\n", capture_output=True, text=True,
            timeout=TIMEOUT + 10, check=False,
        )

    done = await asyncio.to_thread(run)
    assert done.returncode == 0, done.stderr


async def test_imaplib_authenticate(stack: Stack, idp: IdentityProvider) -> None:
    ep = stack["imap"]
    token = idp.token(USER, alg="RS256")

    def login(mechanism: str, message: bytes) -> str:
        with imaplib.IMAP4(ep.host, ep.port, timeout=TIMEOUT) as client:
            # imaplib sends no initial response: the message follows the
            # server's empty challenge; to the error challenge, the client
            # sends what the mechanism asks for (%x01, or empty for XOAUTH2).
            answers = iter([message, b"\x01" if mechanism == "OAUTHBEARER" else b""])
            try:
                typ, _ = client.authenticate(mechanism, lambda _challenge: next(answers))
            except imaplib.IMAP4.error as exc:
                return str(exc)
            client.select("INBOX")
            client.logout()
            return typ

    bearer = f"n,a={USER},\x01auth=Bearer {token}\x01\x01".encode()
    assert await asyncio.to_thread(login, "OAUTHBEARER", bearer) == "OK"
    xoauth2 = f"user={USER}\x01auth=Bearer {token}\x01\x01".encode()
    assert await asyncio.to_thread(login, "XOAUTH2", xoauth2) == "OK"
    wrong = f"n,a=bob@example.org,\x01auth=Bearer {token}\x01\x01".encode()
    # Another user named as authzid than the token's own: refused.
    assert "AUTHORIZATIONFAILED" in await asyncio.to_thread(login, "OAUTHBEARER", wrong)
    expired = idp.token(USER, lifetime=-600)
    bad = f"user={USER}\x01auth=Bearer {expired}\x01\x01".encode()
    assert "AUTHENTICATIONFAILED" in await asyncio.to_thread(login, "XOAUTH2", bad)


def bad_token(idp: IdentityProvider, kind: str) -> str:
    good = idp.token(USER)
    return {
        "expired": idp.token(USER, lifetime=-3600),
        "wrong-aud": idp.token(USER, aud="another-service"),
        "wrong-iss": idp.token(USER, iss="https://evil.test"),
        "alg-none": idp.unsigned(idp.claims(USER)),
        "wrong-key": idp.token(USER, key=idp.stranger),
        "tampered": idp.tampered(good, email="bob@example.org"),
    }[kind]


async def raw_oauthbearer(stack: Stack, token: str, source: str) -> list[bytes]:
    """One AUTHENTICATE OAUTHBEARER from `source`, through the failure dance;
    the lines the server sent after the greeting."""
    ep = stack["imap"]
    reader, writer = await asyncio.open_connection(ep.host, ep.port, local_addr=(source, 0))
    try:
        await asyncio.wait_for(reader.readline(), TIMEOUT)
        message = f"n,a={USER},\x01auth=Bearer {token}\x01\x01".encode()
        writer.write(b"a AUTHENTICATE OAUTHBEARER " + base64.b64encode(message) + b"\r\n")
        lines = [await asyncio.wait_for(reader.readline(), TIMEOUT)]
        if lines[0].startswith(b"+ "):
            writer.write(base64.b64encode(b"\x01") + b"\r\n")
            lines.append(await asyncio.wait_for(reader.readline(), TIMEOUT))
        return lines
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def test_bad_tokens_refused_counted_and_never_logged(
    stack: Stack, idp: IdentityProvider, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    source = "127.0.0.7"
    tokens = [bad_token(idp, kind) for kind in BAD_KINDS]
    for kind, token in zip(BAD_KINDS, tokens, strict=True):
        assert not stack.gateway.guard.check(source).blocked, kind
        lines = await raw_oauthbearer(stack, token, source)
        challenge = base64.b64decode(lines[0][2:].strip())
        assert b'"status":"invalid_token"' in challenge and b'"scope":"openid email"' in challenge, kind
        assert lines[1].startswith(b"a NO [AUTHENTICATIONFAILED]"), (kind, lines)
    # Each of them counted: blocked after exactly that many.
    assert stack.gateway.guard.check(source).blocked
    # Another address is not: a good token from it still logs in.
    good = await raw_oauthbearer(stack, idp.token(USER), "127.0.0.8")
    assert good[0].startswith(b"a OK"), good
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for token in tokens:
        for part in token.split("."):
            if len(part) > 16:
                assert part not in logged
    for reason in ("token expired", "wrong aud", "wrong iss", "'none'", "signature"):
        assert reason in logged, reason


async def at_error_challenge(
    stack: Stack, idp: IdentityProvider, source: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An IMAP connection from `source` that sent OAUTHBEARER a token signed
    with the wrong key and now stands at RFC 7628's error challenge."""
    ep = stack["imap"]
    reader, writer = await asyncio.open_connection(ep.host, ep.port, local_addr=(source, 0))
    await asyncio.wait_for(reader.readline(), TIMEOUT)
    message = f"n,,\x01auth=Bearer {bad_token(idp, 'wrong-key')}\x01\x01".encode()
    writer.write(b"a AUTHENTICATE OAUTHBEARER " + base64.b64encode(message) + b"\r\n")
    assert (await asyncio.wait_for(reader.readline(), TIMEOUT)).startswith(b"+ ")
    return reader, writer


async def test_a_cancelled_error_challenge_still_counts(stack: Stack, idp: IdentityProvider) -> None:
    """Cancelling RFC 7628's error challenge ("*") instead of answering it
    must not make guessing free."""
    source = "127.0.0.9"
    for _ in range(len(BAD_KINDS)):
        assert not stack.gateway.guard.check(source).blocked
        reader, writer = await at_error_challenge(stack, idp, source)
        writer.write(b"*\r\n")
        assert (await asyncio.wait_for(reader.readline(), TIMEOUT)).startswith(b"a BAD")
        writer.close()
    assert stack.gateway.guard.check(source).blocked


async def test_hanging_up_on_the_error_challenge_still_counts(
    stack: Stack, idp: IdentityProvider
) -> None:
    """Closing the connection instead of answering RFC 7628's error
    challenge must not make guessing free either."""
    source = "127.0.0.10"
    for _ in range(len(BAD_KINDS)):
        assert not stack.gateway.guard.check(source).blocked
        _, writer = await at_error_challenge(stack, idp, source)
        writer.close()
        for _ in range(200):  # bounded: until the gateway has closed its side
            if stack.gateway.connections_from(source) == 0:
                break
            await asyncio.sleep(0.02)
    assert stack.gateway.guard.check(source).blocked


async def test_introspection_through_the_gateway(
    tmp_path: Path, idp: IdentityProvider
) -> None:
    """[oauth] introspection_url: the provider is asked (RFC 7662); a token
    it revoked is refused, and a verdict is reused within cache_seconds."""
    oauth = (
        "[oauth]\n"
        f'introspection_url = "{idp.introspection_url}"\n'
        f'client_id = "{idp.client_id}"\n'
        f'client_secret = "{idp.client_secret}"\n'
        "cache_seconds = 60\n"
        "[defence]\nfailure_delay = 0\npenalties = [0.05]\n"
    )
    async with embedded_stack(
        tmp_path,
        users={USER: "Unused-Passw0rd-9"},
        security="none",
        mechanisms=["OAUTHBEARER", "XOAUTH2"],
        layout=(ListenerSpec("imap", "imap", "none"),),
        extra_config=oauth,
    ) as stack:
        token = idp.token(USER)
        asked = idp.requests.count("/introspect")
        for _ in range(2):
            done = await asyncio.to_thread(curl, stack, "imap", token, "XOAUTH2", tmp_path)
            assert done.returncode == 0, done.stderr
        assert idp.requests.count("/introspect") == asked + 1  # the second from the cache
        revoked = idp.token(USER)
        idp.revoke(revoked)
        refused = await asyncio.to_thread(curl, stack, "imap", revoked, "OAUTHBEARER", tmp_path)
        assert refused.returncode == 67, refused.stderr
