"""Relay mode with bearer tokens: authgate passes OAUTHBEARER and XOAUTH2
through to a real Dovecot 2.3 that verifies each token itself (its `oauth2`
passdb asks the test identity provider's RFC 7662 introspection endpoint,
on loopback, with HTTP Basic client credentials).

authgate has no [oauth] section here: it verifies nothing, it enforces the
policy, relays the exchange (the initial response, Dovecot's JSON error
challenge, the client's answer to it) and counts the backend's verdict.

- curl --oauth2-bearer (IMAP, POP3, SMTP submission) and Python's
  imaplib.authenticate log in with a valid token and read the mailbox (or
  send a message Dovecot relays to its sink);
- an invalid token (unknown, expired, revoked: each one Dovecot asked the
  provider about) is refused by Dovecot; the client gets RFC 7628's error
  challenge and then the protocol's failure reply, and authgate's defence
  counts it: the address is blocked after exactly `block_after` of them, and
  then a good token from it never reaches Dovecot;
- no token in authgate's log records.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import imaplib
import logging
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from authgate import config as config_mod
from authgate.proxy.server import Gateway
from authgate.runner import start_gateway
from authgate.testing.identity_provider import IdentityProvider
from tests.interop import oauth_notes
from tests.interop.dovecot import SEED_SUBJECT, DovecotInstance, OAuth2Passdb, start_dovecot

# One provider, one Dovecot and one gateway for the module, on its event loop.
pytestmark = [pytest.mark.interop, pytest.mark.asyncio(loop_scope="module")]

USER = "alice@example.org"
RCPT = "rcpt@example.test"
TIMEOUT = 20
BLOCK_AFTER = 3


def binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:  # a missing client fails the test, never skips it
        pytest.fail(f"{name} is not installed: run ./dev test as root (it installs curl)")
    return found


@pytest.fixture(scope="module")
def idp() -> Iterator[IdentityProvider]:
    with IdentityProvider() as provider:
        yield provider


@pytest.fixture(scope="module")
def dovecot_oauth(idp: IdentityProvider) -> Iterator[DovecotInstance]:
    """Dovecot with the opt-in oauth2 passdb (introspection at `idp`)."""
    credentials = f"{idp.client_id}:{idp.client_secret}@"
    url = idp.introspection_url.replace("http://", "http://" + credentials, 1)
    with start_dovecot(oauth2=OAuth2Passdb(introspection_url=url, users=(USER,))) as instance:
        yield instance


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(
    tmp_path_factory: pytest.TempPathFactory, dovecot_oauth: DovecotInstance
) -> AsyncIterator[Gateway]:
    tmp_path = tmp_path_factory.mktemp("oauth-relay")
    listeners = ""
    for name, protocol, port in (
        ("imap", "imap", dovecot_oauth.imap),
        ("pop3", "pop3", dovecot_oauth.pop3),
        ("submission", "smtp", dovecot_oauth.submission),
    ):
        listeners += f"""
[[listeners]]
name = "{name}"
protocol = "{protocol}"
listen = "127.0.0.1:0"
tls = "none"
[listeners.backend]
address = "127.0.0.1:{port}"
mode = "relay"
"""
    path = tmp_path / "authgate.toml"
    path.write_text(
        'hostname = "localhost"\n'
        # Loopback clients, no TLS: the policy's TLS rule for bearer tokens
        # is tested elsewhere; here the backend's verdict is what matters.
        '[policy]\nsecurity = "none"\nmechanisms = ["OAUTHBEARER", "XOAUTH2"]\n'
        "[defence]\nfailure_delay = 0\npenalties = [0.05]\n"
        f"block_after = {BLOCK_AFTER}\nblock_window = 600\n" + listeners
    )
    config = config_mod.load(path)
    running = await start_gateway(config, None)
    try:
        yield running
    finally:
        await running.stop(drain=1)


def address(gateway: Gateway, listener: str) -> tuple[str, int]:
    host, port = gateway.addresses()[listener][:2]
    return str(host), int(port)


def curl(
    gateway: Gateway, protocol: str, token: str, mechanism: str, tmp: Path, source: str
) -> subprocess.CompletedProcess[str]:
    host, port = address(gateway, {"imap": "imap", "pop3": "pop3", "smtp": "submission"}[protocol])
    # A path selects the mailbox (IMAP: fetch UID 1's subject; POP3: list).
    url = f"{protocol}://{host}:{port}/"
    if protocol == "imap":
        url += "INBOX/;UID=1;SECTION=HEADER.FIELDS%20(SUBJECT)"
    # The token in a config file, not on the command line (ps would show it).
    config = tmp / f"curl-{protocol}-{mechanism}.conf"
    config.write_text(f'oauth2-bearer = "{token}"\n')
    args = [
        binary("curl"), "--silent", "--show-error", "--max-time", str(TIMEOUT),
        "--user", f"{USER}:", "--login-options", f"AUTH={mechanism}", "--config", str(config),
        "--interface", source,
    ]  # fmt: skip
    if protocol == "smtp":
        mail = tmp / "mail.txt"
        mail.write_text(f"Subject: relayed {mechanism}\r\n\r\nhi\r\n")
        args += ["--mail-from", USER, "--mail-rcpt", RCPT, "--upload-file", str(mail)]
    return subprocess.run(
        [*args, url], capture_output=True, text=True, timeout=TIMEOUT + 10, check=False
    )


def message(mechanism: str, token: str) -> bytes:
    if mechanism == "OAUTHBEARER":
        return f"n,a={USER},\x01auth=Bearer {token}\x01\x01".encode()
    return f"user={USER}\x01auth=Bearer {token}\x01\x01".encode()


CURL_SOURCES = {
    (protocol, mechanism): 11 + i
    for i, (protocol, mechanism) in enumerate(
        (p, m) for p in ("imap", "pop3", "smtp") for m in ("OAUTHBEARER", "XOAUTH2")
    )
}


@pytest.mark.parametrize("protocol", ["imap", "pop3", "smtp"])
@pytest.mark.parametrize("mechanism", ["OAUTHBEARER", "XOAUTH2"])
async def test_curl_oauth2_bearer_relayed_to_dovecot(
    gateway: Gateway,
    idp: IdentityProvider,
    dovecot_oauth: DovecotInstance,
    tmp_path: Path,
    protocol: str,
    mechanism: str,
) -> None:
    # Its own client address: the refusals of one case never block another.
    source = f"127.0.0.{CURL_SOURCES[(protocol, mechanism)]}"
    asked = idp.requests.count("/introspect")
    done = await asyncio.to_thread(
        curl, gateway, protocol, idp.token(USER), mechanism, tmp_path, source
    )
    assert done.returncode == 0, done.stderr
    assert idp.requests.count("/introspect") == asked + 1  # Dovecot verified it
    if protocol == "imap":
        assert SEED_SUBJECT in done.stdout, done.stdout
    elif protocol == "pop3":
        assert done.stdout.startswith("1 "), done.stdout  # the seed message listed
    else:
        sent = dovecot_oauth.relay.wait_for(lambda m: f"relayed {mechanism}".encode() in m.data)
        assert sent.rcpt_tos == (RCPT,)
    revoked = idp.token(USER)
    idp.revoke(revoked)
    refused = await asyncio.to_thread(
        curl, gateway, protocol, revoked, mechanism, tmp_path, source
    )
    assert refused.returncode == 67, refused.stderr  # CURLE_LOGIN_DENIED
    assert idp.requests.count("/introspect") == asked + 2


class FromAddress(imaplib.IMAP4):
    """imaplib connecting from 127.0.0.21 (its own address for the defence)."""

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout, ("127.0.0.21", 0))


async def test_imaplib_authenticate_relayed(gateway: Gateway, idp: IdentityProvider) -> None:
    host, port = address(gateway, "imap")

    def login(mechanism: str, token: str) -> tuple[str, list[bytes]]:
        """(the tagged result or the error, the challenges the client saw)."""
        seen: list[bytes] = []
        # imaplib sends no initial response: the message follows the empty
        # challenge; the error challenge is answered as the mechanism asks.
        answers = iter([message(mechanism, token), b"\x01" if mechanism == "OAUTHBEARER" else b""])

        def respond(challenge: bytes) -> bytes:
            seen.append(challenge)
            return next(answers)

        with FromAddress(host, port, timeout=TIMEOUT) as client:
            try:
                typ, _ = client.authenticate(mechanism, respond)
            except imaplib.IMAP4.error as exc:
                return str(exc), seen
            status, data = client.select("INBOX", readonly=True)
            assert (status, data) == ("OK", [b"1"])
            _, fetched = client.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            assert SEED_SUBJECT.encode() in fetched[0][1]  # type: ignore[index]
            client.logout()
            return typ, seen

    for mechanism in ("OAUTHBEARER", "XOAUTH2"):
        typ, seen = await asyncio.to_thread(login, mechanism, idp.token(USER, alg="ES256"))
        assert typ == "OK", (mechanism, typ)
        assert seen == [b""]
    refused, seen = await asyncio.to_thread(login, "OAUTHBEARER", "not-a-token-it-issued")
    assert "AUTHENTICATIONFAILED" in refused
    assert seen == [b"", b'{"status":"invalid_token"}']  # Dovecot's, relayed
    refused, seen = await asyncio.to_thread(login, "XOAUTH2", idp.token(USER, lifetime=-600))
    assert "AUTHENTICATIONFAILED" in refused
    assert seen[1].startswith(b'{"status":"401"')


async def raw_authenticate(
    gateway: Gateway, mechanism: str, token: str, source: str
) -> list[bytes]:
    """One IMAP AUTHENTICATE with an initial response from `source`, through
    the failure dance; the lines the server sent after the greeting."""
    host, port = address(gateway, "imap")
    reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
    try:
        await asyncio.wait_for(reader.readline(), TIMEOUT)
        initial = base64.b64encode(message(mechanism, token))
        writer.write(b"a AUTHENTICATE " + mechanism.encode() + b" " + initial + b"\r\n")
        lines = [await asyncio.wait_for(reader.readline(), TIMEOUT)]
        if lines[0].startswith(b"+ "):
            answer = b"\x01" if mechanism == "OAUTHBEARER" else b""
            writer.write(base64.b64encode(answer) + b"\r\n")
            lines.append(await asyncio.wait_for(reader.readline(), TIMEOUT))
        return lines
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def test_refused_tokens_reach_the_client_are_counted_and_never_logged(
    gateway: Gateway, idp: IdentityProvider, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    source = "127.0.0.31"
    revoked = idp.token(USER)
    idp.revoke(revoked)
    bad = [
        ("OAUTHBEARER", "never-issued-by-the-provider"),
        ("XOAUTH2", idp.token(USER, lifetime=-600)),
        ("OAUTHBEARER", revoked),
    ]
    assert len(bad) == BLOCK_AFTER
    for mechanism, token in bad:
        assert not gateway.guard.check(source).blocked, mechanism
        asked = idp.requests.count("/introspect")
        lines = await raw_authenticate(gateway, mechanism, token, source)
        assert idp.requests.count("/introspect") == asked + 1  # Dovecot decided
        assert lines[0].startswith(b"+ "), lines
        challenge = base64.b64decode(lines[0][2:].strip())
        status = b'"status":"invalid_token"' if mechanism == "OAUTHBEARER" else b'"status":"401"'
        assert status in challenge, challenge
        assert lines[1].startswith(b"a NO [AUTHENTICATIONFAILED]"), lines
    # Each refusal counted: blocked after exactly that many ...
    assert gateway.guard.check(source).blocked
    # ... and then a good token from that address never reaches Dovecot.
    asked = idp.requests.count("/introspect")
    good = idp.token(USER)
    blocked = await raw_authenticate(gateway, "OAUTHBEARER", good, source)
    assert not blocked[-1].startswith(b"a OK"), blocked
    assert idp.requests.count("/introspect") == asked
    # Another address is not blocked: the same token logs in from it.
    ok = await raw_authenticate(gateway, "XOAUTH2", good, "127.0.0.32")
    assert ok[0].startswith(b"a OK"), ok
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert logged  # the gateway did log these logins and refusals
    for token in (*(t for _, t in bad), good):
        for part in token.split("."):
            if len(part) > 16:
                assert part not in logged
        for form in (message("OAUTHBEARER", token), message("XOAUTH2", token)):
            assert base64.b64encode(form).decode()[:24] not in logged



# Dovecot 2.3.19 takes a SASL message of up to 8188 base64 octets (its auth
# protocol's line limit; measured on imap, pop3 and submission).
DOVECOT_MAX_SASL = 8188
IMAP_COMMAND = b"a AUTHENTICATE OAUTHBEARER "


def token_for_line(idp: IdentityProvider, low: int, high: int) -> str:
    """A token whose base64 OAUTHBEARER message is `low` < length <= `high`."""
    padding = 4000
    for _ in range(200):
        token = idp.token(USER, padding=padding)
        size = len(base64.b64encode(message("OAUTHBEARER", token)))
        if low < size <= high:
            return token
        padding += 1 if size <= low else -1
    raise AssertionError(f"no padding gives a message of {low}..{high} octets")


async def test_a_long_token_is_relayed_past_the_default_line_limit(
    gateway: Gateway, idp: IdentityProvider, dovecot_oauth: DovecotInstance
) -> None:
    """A relay listener offering bearer mechanisms reads command lines as
    long as a terminating one does (tokens run to many KiB), though it has
    no [oauth] verifier.  Before the fix it kept the default 8192-octet
    limit and answered this login "malformed" without asking Dovecot."""
    limit = 8192  # [limits] max_line's default
    token = token_for_line(idp, limit - len(IMAP_COMMAND), DOVECOT_MAX_SASL)
    initial = base64.b64encode(message("OAUTHBEARER", token))
    assert len(IMAP_COMMAND + initial) > limit  # without its CRLF
    # Dovecot takes it directly ...
    reader, writer = await asyncio.open_connection(dovecot_oauth.host, dovecot_oauth.imap)
    try:
        await asyncio.wait_for(reader.readline(), TIMEOUT)
        writer.write(IMAP_COMMAND + initial + b"\r\n")
        direct = await asyncio.wait_for(reader.readline(), TIMEOUT)
        assert direct.startswith(b"a OK"), direct
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    # ... and through the gateway, on the same one line.
    through = await raw_authenticate(gateway, "OAUTHBEARER", token, "127.0.0.41")
    assert through[0].startswith(b"a OK"), through


async def smtp_auth_with_initial_response(host: str, port: int, mechanism: str, token: str) -> bytes:
    """EHLO, then AUTH with the whole message on the command line (as msmtp
    and Thunderbird send it); the reply to AUTH."""
    reader, writer = await asyncio.open_connection(host, port, local_addr=("127.0.0.51", 0))
    try:
        await asyncio.wait_for(reader.readline(), TIMEOUT)
        writer.write(b"EHLO client.example.test\r\n")
        for _ in range(50):
            if (await asyncio.wait_for(reader.readline(), TIMEOUT)).startswith(b"250 "):
                break
        initial = base64.b64encode(message(mechanism, token))
        writer.write(b"AUTH " + mechanism.encode() + b" " + initial + b"\r\n")
        return await asyncio.wait_for(reader.readline(), TIMEOUT)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@pytest.mark.parametrize("mechanism", ["OAUTHBEARER", "XOAUTH2"])
async def test_smtp_initial_response_with_a_token_reaches_dovecot(
    gateway: Gateway, idp: IdentityProvider, dovecot_oauth: DovecotInstance, mechanism: str
) -> None:
    """A token of the size big providers issue (about 1.2 KiB; 1.6 KiB of
    base64) on the AUTH line: Dovecot 2.3.19's submission-login refuses AUTH
    lines past about 1 KiB ("500 5.5.2 Line too long", though RFC 4954 allows
    12288), so authgate sends a long initial response after the empty 334
    instead. Before, the client got 535 and the defence counted a failure
    Dovecot never decided."""
    token = idp.token(USER, padding=400)
    assert len(base64.b64encode(message(mechanism, token))) > 1100
    direct = await smtp_auth_with_initial_response(
        dovecot_oauth.host, dovecot_oauth.submission, mechanism, token
    )
    assert direct.startswith(b"500 "), direct  # Dovecot's own limit, directly
    host, port = address(gateway, "submission")
    through = await smtp_auth_with_initial_response(host, port, mechanism, token)
    assert through.startswith(b"235 "), through


@pytest.mark.parametrize("mechanism", ["oauthbearer", "xoauth2"])
async def test_msmtp_relayed_to_dovecot(
    gateway: Gateway, idp: IdentityProvider, dovecot_oauth: DovecotInstance,
    tmp_path: Path, mechanism: str,
) -> None:  # fmt: skip
    host, port = address(gateway, "submission")
    secret = tmp_path / "token"
    secret.touch(0o600)
    secret.write_text(idp.token(USER, alg="ES256") + "\n")

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                binary("msmtp"), f"--host={host}", f"--port={port}", f"--timeout={TIMEOUT}",
                "--domain=client.example.test", f"--auth={mechanism}", f"--user={USER}",
                f"--passwordeval=cat {secret}", f"--from={USER}", "--tls=off", "--",
                RCPT,
            ],
            input=f"Subject: msmtp {mechanism}\r\n\r\nhi\r\n", capture_output=True, text=True,
            timeout=TIMEOUT + 10, check=False,
        )  # fmt: skip

    done = await asyncio.to_thread(run)
    assert done.returncode == 0, done.stderr
    dovecot_oauth.relay.wait_for(lambda m: f"msmtp {mechanism}".encode() in m.data)


@pytest.mark.parametrize("ending", ["cancel", "hang-up"])
@pytest.mark.parametrize("mechanism", ["OAUTHBEARER", "XOAUTH2"])
async def test_a_cancelled_error_challenge_still_counts_in_relay_mode(
    gateway: Gateway, idp: IdentityProvider, mechanism: str, ending: str
) -> None:
    """Dovecot's error challenge says the token was refused; a client that
    cancels it ("*", RFC 3501) or hangs up instead of answering must not
    guess for free."""
    number = 61 + 2 * ["OAUTHBEARER", "XOAUTH2"].index(mechanism) + ["cancel", "hang-up"].index(ending)
    source = f"127.0.0.{number}"
    host, port = address(gateway, "imap")
    for _ in range(BLOCK_AFTER):
        assert not gateway.guard.check(source).blocked
        reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
        try:
            await asyncio.wait_for(reader.readline(), TIMEOUT)
            initial = base64.b64encode(message(mechanism, "never-issued-by-the-provider"))
            writer.write(b"a AUTHENTICATE " + mechanism.encode() + b" " + initial + b"\r\n")
            assert (await asyncio.wait_for(reader.readline(), TIMEOUT)).startswith(b"+ ")
            if ending == "cancel":
                writer.write(b"*\r\n")
                reply = await asyncio.wait_for(reader.readline(), TIMEOUT)
                assert reply.startswith((b"a BAD", b"a NO")), reply
            else:
                writer.close()
                await gateway_saw_the_end(gateway, source)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    assert gateway.guard.check(source).blocked


async def gateway_saw_the_end(gateway: Gateway, source: str) -> None:
    """Wait (bounded) until the gateway has closed `source`'s connection."""
    for _ in range(200):
        if gateway.connections_from(source) == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the gateway still has a connection from {source}")


def test_docs_interop_md_has_the_section() -> None:
    """docs/interop.md carries tests/interop/oauth_notes.py's text (the
    version line aside): a change there needs the file updated too."""
    docs = (Path(__file__).resolve().parents[2] / "docs" / "interop.md").read_text("utf-8")
    assert oauth_notes.SECTION[0] in docs
    assert "\n".join(oauth_notes.SECTION[2:]) in docs
