"""SASL EXTERNAL with TLS client certificates made by trustme, through the
gateway: curl --cert --key (IMAP, POP3), msmtp with tls_cert_file and auth
external; EXTERNAL is offered only with a verified certificate that maps to
a user; expired, unknown-CA and unmapped certificates are refused, and so
is an authzid naming somebody else. Mapping by SAN e-mail, and by
fingerprints listed in the users file."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import trustme

from authgate.client_certs import fingerprint
from authgate.credentials.store import UserStore
from authgate.testing.kit import installed
from authgate.testing.stack import ListenerSpec, Stack, embedded_stack

USER = "alice@example.org"
RCPT = "rcpt@example.test"
TIMEOUT = 20

pytestmark = pytest.mark.asyncio


class Certs:
    """The clients' CA and certificates, as files."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / "client-certs"
        self.dir.mkdir()
        self.ca = trustme.CA()
        self.ca_file = self.dir / "clients-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        now = datetime.datetime.now(datetime.UTC)
        self.alice = self._issue("alice", self.ca, USER, common_name="Alice")
        self.stranger = self._issue("stranger", self.ca, "nobody@example.org")
        self.expired = self._issue(
            "expired", self.ca, USER,
            not_before=now - datetime.timedelta(days=30), not_after=now - datetime.timedelta(days=1),
        )
        self.foreign = self._issue("foreign", trustme.CA(), USER)

    def _issue(self, name: str, ca: trustme.CA, *identities: str, **kwargs: object) -> tuple[Path, Path]:
        leaf = ca.issue_cert(*identities, **kwargs)  # type: ignore[arg-type]
        cert, key = self.dir / f"{name}.pem", self.dir / f"{name}.key"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        key.write_bytes(leaf.private_key_pem.bytes())
        return cert, key

    def der(self, pair: tuple[Path, Path]) -> bytes:
        return ssl.PEM_cert_to_DER_cert(pair[0].read_text().split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n")


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return Certs(tmp_path)


@pytest_asyncio.fixture
async def stack(tmp_path: Path, certs: Certs) -> AsyncIterator[Stack]:
    by_email = f'client_ca = "{certs.ca_file}"\nclient_cert = "optional"\n'
    by_print = by_email + 'client_cert_user = "fingerprint"\n'
    async with embedded_stack(
        tmp_path,
        users={USER: "Unused-Passw0rd-9", "rcpt": "Unused-Passw0rd-8"},
        security="require-secure-auth",
        mechanisms=["EXTERNAL", "PLAIN"],
        layout=(
            ListenerSpec("imaps", "imap", "implicit", extra=by_email),
            ListenerSpec("pop3s", "pop3", "implicit", extra=by_email),
            ListenerSpec("submission", "smtp", "starttls", extra=by_email),
            ListenerSpec("imaps-fp", "imap", "implicit", extra=by_print),
            ListenerSpec("imaps-plain", "imap", "implicit"),
        ),
        messages={USER: [b"Subject: seed\r\n\r\nhello\r\n"]},
        extra_config="[defence]\nfailure_delay = 0\npenalties = [0.05]\nblock_after = 50\n",
    ) as running:
        yield running


def curl(stack: Stack, listener: str, pair: tuple[Path, Path], authzid: str = USER) -> subprocess.CompletedProcess[str]:
    ep = stack[listener]
    scheme = {"imap": "imaps", "pop3": "pop3s"}[ep.protocol]
    args = [
        installed("curl"), "--silent", "--show-error", "--max-time", str(TIMEOUT),
        "--cacert", str(stack.ca_file), "--cert", str(pair[0]), "--key", str(pair[1]),
        "--login-options", "AUTH=EXTERNAL", "--user", f"{authzid}:",
        f"{scheme}://localhost:{ep.port}/",
    ]
    return subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT + 10, check=False)


@pytest.mark.parametrize("listener", ["imaps", "pop3s"])
async def test_curl_with_a_client_certificate(stack: Stack, certs: Certs, listener: str) -> None:
    done = await asyncio.to_thread(curl, stack, listener, certs.alice)
    assert done.returncode == 0, done.stderr
    if listener == "pop3s":
        assert done.stdout.startswith("1 "), done.stdout


@pytest.mark.parametrize("kind", ["expired", "foreign"])
async def test_bad_certificates_fail_the_handshake(stack: Stack, certs: Certs, kind: str) -> None:
    done = await asyncio.to_thread(curl, stack, "imaps", getattr(certs, kind))
    assert done.returncode in (35, 56), (done.returncode, done.stderr)  # TLS handshake / recv


async def test_unmapped_certificate_gets_no_external(stack: Stack, certs: Certs) -> None:
    done = await asyncio.to_thread(curl, stack, "imaps", certs.stranger)
    assert done.returncode != 0
    lines = await raw_external(stack, "imaps", certs.stranger, b"")
    assert b"AUTH=EXTERNAL" not in lines[0]
    assert lines[1].startswith(b"a NO"), lines


async def raw_external(stack: Stack, listener: str, pair: tuple[Path, Path] | None, authzid: bytes) -> list[bytes]:
    """(the CAPABILITY answer, the AUTHENTICATE EXTERNAL answer) over IMAPS."""
    ep = stack[listener]
    context = stack.ssl_context()
    if pair is not None:
        context.load_cert_chain(pair[0], pair[1])
    reader, writer = await asyncio.open_connection(ep.host, ep.port, ssl=context, server_hostname="localhost")
    try:
        await asyncio.wait_for(reader.readline(), TIMEOUT)
        writer.write(b"c CAPABILITY\r\n")
        capability = await asyncio.wait_for(reader.readline(), TIMEOUT)
        await asyncio.wait_for(reader.readline(), TIMEOUT)  # c OK
        writer.write(b"a AUTHENTICATE EXTERNAL " + (base64.b64encode(authzid) or b"=") + b"\r\n")
        return [capability, await asyncio.wait_for(reader.readline(), TIMEOUT)]
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


async def test_external_offered_only_with_a_certificate(stack: Stack, certs: Certs) -> None:
    with_cert = await raw_external(stack, "imaps", certs.alice, b"")
    assert b"AUTH=EXTERNAL" in with_cert[0] and with_cert[1].startswith(b"a OK"), with_cert
    without = await raw_external(stack, "imaps", None, b"")
    assert b"AUTH=EXTERNAL" not in without[0] and without[1].startswith(b"a NO"), without
    # A listener that asks for no certificates never offers it.
    plain = await raw_external(stack, "imaps-plain", certs.alice, b"")
    assert b"AUTH=EXTERNAL" not in plain[0]


async def test_authzid_of_another_user_refused(stack: Stack, certs: Certs) -> None:
    lines = await raw_external(stack, "imaps", certs.alice, b"rcpt")
    assert lines[1].startswith(b"a NO [AUTHORIZATIONFAILED]"), lines
    same = await raw_external(stack, "imaps", certs.alice, USER.encode())
    assert same[1].startswith(b"a OK"), same


async def test_fingerprint_mapping(stack: Stack, certs: Certs, tmp_path: Path) -> None:
    store = stack.gateway.runtime("imaps-fp").store
    assert isinstance(store, UserStore)
    before = await raw_external(stack, "imaps-fp", certs.stranger, b"")
    assert b"AUTH=EXTERNAL" not in before[0]
    # The users file lists the stranger's certificate under alice.
    text = (tmp_path / "users.toml").read_text().replace(
        f'[users."{USER}"]', f'[users."{USER}"]\ncert_fingerprints = ["{fingerprint(certs.der(certs.stranger))}"]'
    )
    loaded = UserStore.loads(text)
    user = loaded.user(USER)
    assert user is not None and user.cert_fingerprints
    store.set_user_secrets(USER, [s.encoded for s in user.secrets])
    with store._lock:  # the reload a SIGHUP would do, for this one user
        store._users[USER] = user
    after = await raw_external(stack, "imaps-fp", certs.stranger, b"")
    assert b"AUTH=EXTERNAL" in after[0] and after[1].startswith(b"a OK"), after


async def test_msmtp_tls_cert_file_auth_external(stack: Stack, certs: Certs) -> None:
    ep = stack["submission"]

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                installed("msmtp"), "--host=localhost", f"--port={ep.port}", f"--timeout={TIMEOUT}",
                "--domain=client.example.test", "--tls=on", "--tls-starttls=on",
                f"--tls-trust-file={stack.ca_file}", f"--tls-cert-file={certs.alice[0]}",
                f"--tls-key-file={certs.alice[1]}", "--auth=external", f"--user={USER}",
                f"--from={USER}", "--", RCPT,
            ],
            input="Subject: via msmtp\r\n\r\nhi\r\n", capture_output=True, text=True,
            timeout=TIMEOUT + 10, check=False,
        )

    done = await asyncio.to_thread(run)
    assert done.returncode == 0, done.stderr
