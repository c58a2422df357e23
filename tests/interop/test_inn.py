"""authgate in front of a real INN 2.7 (tests/interop/inn.py), driven by two
real news readers: Python's nntplib and Perl's Net::NNTP.

Each proof reads the article of `local.test` through authgate: relay mode
(the reader's AUTHINFO USER/PASS reaches INN, whose readers.conf checks it)
and terminate mode (authgate checks the reader, then logs in to INN with its
one proxy account), in the clear from the exempt address, with STARTTLS and
with implicit TLS (563's role); and the policy's refusal, 483, from a
non-exempt address in the clear, with INN never asked.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import socket
import ssl
import subprocess
import warnings
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from authgate import config as config_mod
from authgate.certs import ensure_dev_certificates
from authgate.credentials.store import UserStore, generate_secrets
from authgate.offers import load_store
from authgate.protocols import nntp
from authgate.proxy.server import Gateway
from authgate.runner import start_gateway
from authgate.sasl.base import ClientContext, ClientCredentials, client_step
from authgate.sasl.scram import ScramSHA256Client
from tests.interop import inn_notes
from tests.interop.inn import (
    BODY,
    GROUP,
    MESSAGE_ID,
    PROXY,
    READER,
    SUBJECT,
    InnInstance,
    start_inn,
)

with warnings.catch_warnings():
    # nntplib is deprecated (PEP 594, gone in 3.13), but 3.11 has it and it
    # is a real news reader.
    warnings.simplefilter("ignore", DeprecationWarning)
    import nntplib

pytestmark = [pytest.mark.interop, pytest.mark.asyncio]

WRONG_CA = "/etc/ssl/certs/ca-certificates.crt"  # public CAs: none signed INN's certificate
EXEMPT = "127.0.0.2"
NOT_EXEMPT = "127.0.0.1"
USER, PASSWORD = READER


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The CA (with authgate's certificate beside it) and the users file,
    made once for the module: Argon2 and a CA per test would cost more than
    the tests."""
    root = tmp_path_factory.mktemp("inn-gate")
    ca = ensure_dev_certificates(root / "certs")
    store = UserStore(realm="localhost")
    store.set_user_secrets(USER, generate_secrets(USER, PASSWORD, "localhost"))
    store.save(root / "users.toml")
    return ca, root / "users.toml"


@pytest.fixture(scope="module")
def inn(files: tuple[Path, Path]) -> Iterator[InnInstance]:
    certs = files[0].parent  # INN's STARTTLS shows authgate's dev certificate too
    with start_inn((certs / "server.pem", certs / "server.key")) as instance:
        yield instance


@dataclass
class Setup:
    gateway: Gateway
    ca_file: Path
    inn: InnInstance

    def address(self, listener: str) -> tuple[str, int]:
        return self.gateway.addresses()[listener]

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))


@pytest_asyncio.fixture
async def setup(
    tmp_path: Path, inn: InnInstance, files: tuple[Path, Path]
) -> AsyncIterator[Setup]:
    ca, users = files
    listeners = ""
    for mode in ("relay", "terminate"):
        for tls in ("starttls", "implicit"):
            listeners += f"""
[[listeners]]
name = "{mode}-{tls}"
protocol = "nntp"
listen = "127.0.0.1:0"
tls = "{tls}"
[listeners.backend]
address = "127.0.0.1:{inn.port}"
mode = "{mode}"
"""
            if mode == "terminate":
                # INN has no master users: one proxy account in readers.conf.
                listeners += f'master_user = "{PROXY[0]}"\nmaster_password = "{PROXY[1]}"\n'
    for mode, trusted in (("relay", ca), ("terminate", ca), ("relay", WRONG_CA)):
        # authgate to INN with STARTTLS, INN's certificate checked with our
        # CA (or with public CAs, which do not know it).
        name = f"{mode}-backend-tls" if trusted == ca else f"{mode}-backend-wrong-ca"
        listeners += f"""
[[listeners]]
name = "{name}"
protocol = "nntp"
listen = "127.0.0.1:0"
[listeners.backend]
address = "127.0.0.1:{inn.port}"
mode = "{mode}"
tls = "starttls"
ca_file = "{trusted}"
"""
        if mode == "terminate":
            listeners += f'master_user = "{PROXY[0]}"\nmaster_password = "{PROXY[1]}"\n'
    path = tmp_path / "authgate.toml"
    path.write_text(
        'hostname = "localhost"\n'
        '[policy]\nsecurity = "require-secure-auth"\nmechanisms = ["SCRAM-SHA-256", "CRAM-MD5", "PLAIN"]\n'
        f'exempt_networks = ["{EXEMPT}/32"]\n'
        f'[users]\nfile = "{users}"\n'
        f'[tls]\ncert = "{ca.parent / "server.pem"}"\nkey = "{ca.parent / "server.key"}"\n'
        "[defence]\nfailure_delay = 0\npenalties = []\n" + listeners
    )
    config = config_mod.load(path)
    running = await start_gateway(config, load_store(config))
    try:
        yield Setup(running, ca, inn)
    finally:
        await running.stop(drain=1)


# ------------------------------------------------------------------ nntplib


class _FromAddress(nntplib.NNTP):
    """nntplib's reader from a chosen loopback address."""

    source = NOT_EXEMPT

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout, (self.source, 0))


def _reader(source: str) -> type[nntplib.NNTP]:
    return type("Reader", (_FromAddress,), {"source": source})


def nntplib_read(
    address: tuple[str, int], *, source: str, tls: str, context: ssl.SSLContext
) -> tuple[str, list[bytes]]:
    """Log in with nntplib and read article 1 of the group: (the GROUP
    reply's group name, the article's lines)."""
    host, port = address
    if tls == "implicit":
        client: nntplib.NNTP = nntplib.NNTP_SSL(host, port, ssl_context=context, timeout=15)
    else:
        client = _reader(source)(host, port, timeout=15)
    with client:
        if tls == "starttls":
            assert "STARTTLS" in client.getcapabilities()
            client.starttls(context)  # asks CAPABILITIES again (RFC 4642)
            assert "STARTTLS" not in client.getcapabilities()
        client.login(USER, PASSWORD, usenetrc=False)
        _, _, _, _, name = client.group(GROUP)
        _, info = client.article(1)
        return name, info.lines


@pytest.mark.parametrize("mode", ["relay", "terminate"])
@pytest.mark.parametrize(
    ("tls", "source"),
    [("none", EXEMPT), ("starttls", NOT_EXEMPT), ("implicit", NOT_EXEMPT)],
)
async def test_nntplib_reads_an_article(setup: Setup, mode: str, tls: str, source: str) -> None:
    listener = f"{mode}-{'implicit' if tls == 'implicit' else 'starttls'}"
    name, lines = await asyncio.to_thread(
        nntplib_read, setup.address(listener), source=source, tls=tls, context=setup.context()
    )
    assert name == GROUP
    assert f"Message-ID: {MESSAGE_ID}".encode() in lines
    assert f"Subject: {SUBJECT}".encode() in lines and BODY.encode() in lines


@pytest.mark.parametrize("mode", ["relay", "terminate"])
async def test_nntplib_cleartext_from_a_non_exempt_address_is_483(
    setup: Setup, mode: str
) -> None:
    def attempt() -> str:
        host, port = setup.address(f"{mode}-starttls")
        with _reader(NOT_EXEMPT)(host, port, timeout=15) as client:
            caps = client.getcapabilities()
            assert caps.get("AUTHINFO") == ["SASL"]
            assert caps.get("SASL") == ["SCRAM-SHA-256", "CRAM-MD5"]
            with pytest.raises(nntplib.NNTPTemporaryError) as refused:
                client.login(USER, PASSWORD, usenetrc=False)
            # Reader commands still need a login.
            with pytest.raises(nntplib.NNTPTemporaryError, match=r"^480"):
                client.group(GROUP)
            return str(refused.value)

    assert (await asyncio.to_thread(attempt)).startswith("483 ")


@pytest.mark.parametrize("mode", ["relay", "terminate"])
async def test_nntplib_reads_through_starttls_toward_inn(setup: Setup, mode: str) -> None:
    # The reader in the clear from the exempt address; authgate to INN
    # with STARTTLS (RFC 4642), capabilities asked again inside TLS.
    name, lines = await asyncio.to_thread(
        nntplib_read, setup.address(f"{mode}-backend-tls"), source=EXEMPT, tls="none",
        context=setup.context(),
    )  # fmt: skip
    assert name == GROUP and BODY.encode() in lines


async def test_inn_certificate_not_trusted_is_no_login(setup: Setup) -> None:
    def attempt() -> str:
        host, port = setup.address("relay-backend-wrong-ca")
        with _reader(EXEMPT)(host, port, timeout=15) as client:
            with pytest.raises(nntplib.NNTPTemporaryError) as refused:
                client.login(USER, PASSWORD, usenetrc=False)
            return str(refused.value)

    # The handshake with INN failed verification: a temporary failure (403),
    # and the reader's password never went to INN in the clear.
    assert (await asyncio.to_thread(attempt)).startswith("403 ")


async def test_nntplib_wrong_password_is_481(setup: Setup) -> None:
    def attempt() -> str:
        host, port = setup.address("relay-starttls")
        with _reader(EXEMPT)(host, port, timeout=15) as client:
            with pytest.raises(nntplib.NNTPTemporaryError) as refused:  # any 4xx
                client.login(USER, "not-" + PASSWORD, usenetrc=False)
            return str(refused.value)

    # INN said no (relay mode): authgate passes its verdict on as 481.
    assert (await asyncio.to_thread(attempt)).startswith("481 ")


# ---------------------------------------------------------------- Net::NNTP

_PERL = r"""
use strict; use warnings;
use Net::NNTP;
my ($host, $port, $tls, $source, $ca, $user, $pass, $group) = @ARGV;
my %ssl = (SSL_ca_file => $ca, SSL_verifycn_name => 'localhost');
my $nntp = Net::NNTP->new(Host => $host, Port => $port, LocalAddr => $source, Timeout => 15,
    ($tls eq 'implicit' ? (SSL => 1, %ssl) : ())) or die "connect: $@\n";
if ($tls eq 'starttls') { $nntp->starttls(%ssl) or die "starttls: " . $nntp->message; }
$nntp->authinfo($user, $pass) or die "authinfo: " . $nntp->code . " " . $nntp->message;
$nntp->group($group) or die "group: " . $nntp->message;
my $article = $nntp->article(1) or die "article: " . $nntp->message;
print @$article;
$nntp->quit;
"""


def perl_read(
    address: tuple[str, int], *, source: str, tls: str, ca_file: Path, password: str = PASSWORD
) -> subprocess.CompletedProcess[str]:
    host, port = address
    return subprocess.run(
        ["perl", "-e", _PERL, host, str(port), tls, source, str(ca_file), USER, password, GROUP],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("mode", ["relay", "terminate"])
@pytest.mark.parametrize(
    ("tls", "source"),
    [("none", EXEMPT), ("starttls", NOT_EXEMPT), ("implicit", NOT_EXEMPT)],
)
async def test_net_nntp_reads_an_article(setup: Setup, mode: str, tls: str, source: str) -> None:
    listener = f"{mode}-{'implicit' if tls == 'implicit' else 'starttls'}"
    done = await asyncio.to_thread(
        perl_read, setup.address(listener), source=source, tls=tls, ca_file=setup.ca_file
    )
    assert done.returncode == 0, done.stderr
    assert f"Message-ID: {MESSAGE_ID}" in done.stdout and BODY in done.stdout


async def test_net_nntp_cleartext_from_a_non_exempt_address_is_483(setup: Setup) -> None:
    done = await asyncio.to_thread(
        perl_read, setup.address("terminate-starttls"), source=NOT_EXEMPT, tls="none",
        ca_file=setup.ca_file,
    )  # fmt: skip
    assert done.returncode != 0 and done.stderr.startswith("authinfo: 483 "), done.stderr


# ----------------------------------------------------- AUTHINFO SASL, by hand


def sasl_read(
    address: tuple[str, int], source: str, mechanism: str, *, relay: bool
) -> list[bytes]:
    """Neither reader speaks AUTHINFO SASL: a few lines of our own (the
    mechanism's client side is authgate's, the server side INN's Cyrus SASL
    in relay mode), then GROUP and ARTICLE."""
    with socket.create_connection(address, timeout=15, source_address=(source, 0)) as sock:
        stream = sock.makefile("rwb")

        def command(line: bytes) -> bytes:
            stream.write(line + b"\r\n")
            stream.flush()
            return stream.readline()

        def decoded(reply: bytes) -> bytes:
            text = reply[4:].strip()
            return b"" if text == b"=" else base64.b64decode(text)

        assert stream.readline().startswith(b"200 ")
        if mechanism == "PLAIN":
            # With the initial response (RFC 4643 section 2.4.2).
            initial = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())
            reply = command(b"AUTHINFO SASL PLAIN " + initial)
        elif mechanism == "CRAM-MD5":
            challenge = command(b"AUTHINFO SASL CRAM-MD5")
            assert challenge.startswith(b"383 "), challenge
            digest = hmac.new(PASSWORD.encode(), decoded(challenge), hashlib.md5).hexdigest()
            reply = command(base64.b64encode(f"{USER} {digest}".encode()))
        else:
            client = ScramSHA256Client(ClientCredentials(USER, PASSWORD), ClientContext())
            first = base64.b64encode(client.start() or b"")
            server_first = command(b"AUTHINFO SASL SCRAM-SHA-256 " + first)
            assert server_first.startswith(b"383 "), server_first
            final = command(base64.b64encode(client_step(client, decoded(server_first))))
            # authgate sends SCRAM's server-final in its 283 (terminate), or
            # INN's 283 data as one more 383 that takes "=" (relay).
            assert final.startswith(b"383 " if relay else b"283 "), final
            if relay:
                assert client_step(client, decoded(final)) == b""
                reply = command(b"=")
            else:
                client.finish(decoded(final))
                reply = b"281 " + final[4:]
        assert reply.startswith(b"281 "), reply
        assert command(b"GROUP " + GROUP.encode()).startswith(b"211 ")
        assert command(b"ARTICLE 1").startswith(b"220 ")
        lines = []
        while (line := stream.readline()) not in (b".\r\n", b""):
            lines.append(line.rstrip(b"\r\n"))
        command(b"QUIT")
        return lines


@pytest.mark.parametrize("mechanism", ["PLAIN", "CRAM-MD5", "SCRAM-SHA-256"])
@pytest.mark.parametrize("mode", ["relay", "terminate"])
async def test_authinfo_sasl_reads_an_article(setup: Setup, mode: str, mechanism: str) -> None:
    # Relay: PLAIN reaches INN as AUTHINFO USER/PASS (readers.conf checks
    # it), CRAM-MD5 and SCRAM as AUTHINFO SASL (INN's Cyrus SASL checks
    # them; SCRAM's server-final in INN's 283 is passed on as a 383).
    # Terminate: authgate checks each itself and logs in as the proxy.
    address = setup.address(f"{mode}-starttls")
    lines = await asyncio.to_thread(
        sasl_read, address, EXEMPT, mechanism, relay=mode == "relay"
    )
    assert f"Message-ID: {MESSAGE_ID}".encode() in lines


# ------------------------------------------------------- STARTTLS injection


@pytest.mark.parametrize("mode", ["relay", "terminate"])
async def test_starttls_injection_never_runs_inside_tls(
    setup: Setup, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    """CVE-2011-0411 against NNTP: a login pipelined behind STARTTLS in the
    same segment is dropped, not run once TLS is up (nor relayed to INN)."""
    caplog.set_level(logging.INFO, logger="authgate")
    injected = f"AUTHINFO USER {USER}\r\nAUTHINFO PASS {PASSWORD}\r\nGROUP {GROUP}\r\n".encode()
    host, port = setup.address(f"{mode}-starttls")
    reader, writer = await asyncio.open_connection(host, port, local_addr=(NOT_EXEMPT, 0))
    try:
        assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"200 ")
        writer.write(b"STARTTLS\r\n" + injected)  # one write: one segment on loopback
        assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"382 ")
        await writer.start_tls(setup.context(), server_hostname="localhost")
        # Had the injected lines run, GROUP would be 211 and PASS a second
        # login; authgate never saw a USER inside TLS, so PASS is out of
        # sequence, and the reader is still not logged in.
        writer.write(f"AUTHINFO PASS {PASSWORD}\r\nGROUP {GROUP}\r\n".encode())
        replies = [await asyncio.wait_for(reader.readline(), 10) for _ in range(2)]
        assert [r[:4] for r in replies] == [b"482 ", b"480 "], replies
        # The same login sent inside TLS works: the session is usable.
        writer.write(f"AUTHINFO USER {USER}\r\nAUTHINFO PASS {PASSWORD}\r\nGROUP {GROUP}\r\n".encode())
        replies = [await asyncio.wait_for(reader.readline(), 10) for _ in range(3)]
        assert [r[:4] for r in replies] == [b"381 ", b"281 ", b"211 "], replies
    finally:
        writer.close()
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "STARTTLS injection" in r.getMessage()
    ]
    assert len(warnings) == 1 and f"dropped {len(injected)} bytes" in warnings[0], warnings


async def test_docs_interop_has_the_nntp_section() -> None:
    """docs/interop.md is generated by the matrix run; its NNTP part is the
    text of tests/interop/inn_notes.py (the version line aside)."""
    docs = (Path(__file__).parents[2] / "docs" / "interop.md").read_text(encoding="utf-8")
    assert "\n".join(inn_notes.SECTION[2:]) in docs
    assert inn_notes.SECTION[0] in docs


@pytest.mark.parametrize("mode", ["relay", "terminate"])
async def test_starttls_after_login_reaches_inn_which_refuses_it(setup: Setup, mode: str) -> None:
    """NO STARTTLS's "STARTTLS after AUTH": once logged in, the session is
    INN's; INN refuses STARTTLS after authentication (RFC 4642 section
    2.2.2) and the session goes on in the clear, unchanged."""
    host, port = setup.address(f"{mode}-starttls")
    reader, writer = await asyncio.open_connection(host, port, local_addr=(EXEMPT, 0))
    try:
        assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"200 ")
        writer.write(f"AUTHINFO USER {USER}\r\nAUTHINFO PASS {PASSWORD}\r\n".encode())
        replies = [await asyncio.wait_for(reader.readline(), 10) for _ in range(2)]
        assert [r[:4] for r in replies] == [b"381 ", b"281 "], replies
        writer.write(b"STARTTLS\r\n")
        refused = await asyncio.wait_for(reader.readline(), 10)
        assert refused.startswith(b"502 "), refused
        # INN's answer: authgate's machine handed over and answers nothing now.
        assert refused.rstrip() not in (nntp.ERR_TLS_ACTIVE.encode(), nntp.ERR_NO_STARTTLS.encode())
        writer.write(f"GROUP {GROUP}\r\n".encode())
        assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"211 ")
    finally:
        writer.close()
