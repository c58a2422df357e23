"""ManageSieve through authgate to a real Dovecot (dovecot-managesieved),
with real clients: sieve-connect (Debian) and sievelib (Python).

Proof of a spliced session: a script uploaded, listed and activated through
authgate is in the user's home on the Dovecot side, and is the active one.
Terminate mode logs in to Dovecot as the master user (PLAIN with the user
as authzid); relay mode passes the client's SASL through, over STARTTLS to
Dovecot. The policy is require-secure-auth: cleartext PLAIN from an address
outside the exempt network and without TLS is refused with ENCRYPT-NEEDED.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from authgate import config as config_mod
from authgate.credentials.store import UserStore, generate_secrets
from authgate.offers import load_store
from authgate.proxy.server import Gateway
from authgate.runner import start_gateway
from tests.interop import sieve_notes
from tests.interop.dovecot import DovecotInstance

# One gateway for the module (its start-up dominates otherwise), on the
# module's event loop.
pytestmark = [pytest.mark.interop, pytest.mark.asyncio(loop_scope="module")]

USER = "plainuser"
EXEMPT = "127.0.0.77"  # the exempt network's one address
# sieve-connect and sievelib connect from 127.0.0.1: outside the exempt network.
SCRIPT = 'require ["fileinto"];\r\nif header :contains "subject" "authgate" {\r\n  fileinto "INBOX";\r\n}\r\n'
SIEVE_CONNECT = "sieve-connect"


@dataclass(frozen=True)
class Certs:
    ca: Path
    cert: Path
    key: Path


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Certs]:
    import trustme

    root = tmp_path_factory.mktemp("sieve-certs")
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1", common_name="localhost")
    paths = Certs(root / "ca.pem", root / "server.pem", root / "server.key")
    ca.cert_pem.write_to_path(str(paths.ca))
    paths.cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(paths.key))
    yield paths


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(
    tmp_path_factory: pytest.TempPathFactory, dovecot_sieve: DovecotInstance, certs: Certs
) -> AsyncIterator[Gateway]:
    tmp_path = tmp_path_factory.mktemp("sieve-gateway")
    store = UserStore(realm="localhost")
    store.set_user_secrets(USER, generate_secrets(USER, dovecot_sieve.users[USER], "localhost"))
    store.save(tmp_path / "users.toml")
    dovecot_ca = tmp_path / "dovecot-ca.pem"
    assert dovecot_sieve.ca_pem is not None
    dovecot_ca.write_bytes(dovecot_sieve.ca_pem)
    master, master_pw = dovecot_sieve.master
    path = tmp_path / "authgate.toml"
    path.write_text(
        f"""hostname = "localhost"
[policy]
security = "require-secure-auth"
exempt_networks = ["{EXEMPT}/32"]
mechanisms = ["SCRAM-SHA-256", "PLAIN", "LOGIN"]
[users]
file = "users.toml"
[tls]
cert = "{certs.cert}"
key = "{certs.key}"
[defence]
failure_delay = 0
penalties = []

[[listeners]]
name = "sieve"
protocol = "managesieve"
listen = "127.0.0.1:0"
tls = "starttls"
[listeners.backend]
address = "127.0.0.1:{dovecot_sieve.sieve_haproxy}"
master_user = "{master}"
master_password = "{master_pw}"
client_address = "proxy-v2"

[[listeners]]
name = "sieve-relay"
protocol = "managesieve"
listen = "127.0.0.1:0"
tls = "starttls"
[listeners.backend]
address = "127.0.0.1:{dovecot_sieve.sieve}"
mode = "relay"
tls = "starttls"
ca_file = "{dovecot_ca}"
server_name = "localhost"
"""
    )
    config = config_mod.load(path)
    running = await start_gateway(config, load_store(config))
    try:
        yield running
    finally:
        await running.stop(drain=1)


def script_dir(dovecot: DovecotInstance) -> Path:
    return dovecot.home(USER) / "sieve"


def active_script(dovecot: DovecotInstance) -> str | None:
    """The name of the user's active script on the Dovecot side."""
    link = dovecot.home(USER) / ".dovecot.sieve"
    if not link.is_symlink():
        return None
    return Path(os.readlink(link)).name.removesuffix(".sieve")


def clear_scripts(dovecot: DovecotInstance) -> None:
    link = dovecot.home(USER) / ".dovecot.sieve"
    if link.is_symlink():
        link.unlink()
    shutil.rmtree(script_dir(dovecot), ignore_errors=True)


# ------------------------------------------------------------ sieve-connect


def run_sieve_connect(port: int, ca: Path, commands: str, password: str, workdir: Path) -> str:
    if shutil.which(SIEVE_CONNECT) is None:
        raise AssertionError(
            "sieve-connect is missing: ./dev test installs it (Debian sieve-connect)"
        )
    exec_file = workdir / "commands"
    exec_file.write_text(commands)
    result = subprocess.run(
        [
            SIEVE_CONNECT,
            "--4",
            "--server",
            "localhost",
            "--port",
            str(port),
            "--user",
            USER,
            "--authmech",
            "PLAIN",
            "--passwordfd",
            "0",
            "--tlscafile",
            str(ca),
            "--exec",
            str(exec_file),
        ],
        input=password + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        cwd=workdir,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


@pytest.mark.parametrize("listener", ["sieve", "sieve-relay"])
async def test_sieve_connect_uploads_lists_and_activates_through_starttls(
    gateway: Gateway, dovecot_sieve: DovecotInstance, certs: Certs, tmp_path: Path, listener: str
) -> None:
    clear_scripts(dovecot_sieve)
    local = tmp_path / "filter.sieve"
    local.write_text(SCRIPT)
    mark = dovecot_sieve.log_size()
    _, port = gateway.addresses()[listener]
    commands = f"put {local} authgate-filter\nlist\nactivate authgate-filter\nlist\n"
    output = await asyncio.to_thread(
        run_sieve_connect, port, certs.ca, commands, dovecot_sieve.users[USER], tmp_path
    )
    assert "authgate-filter" in output
    stored = script_dir(dovecot_sieve) / "authgate-filter.sieve"
    assert stored.read_text().replace("\r\n", "\n") == SCRIPT.replace("\r\n", "\n")
    assert active_script(dovecot_sieve) == "authgate-filter"
    # Dovecot saw the login for the user, from the real client (terminate:
    # PROXY v2; relay: authgate's own address, which is the same here).
    await asyncio.to_thread(
        dovecot_sieve.wait_for_log,
        rf"managesieve-login: Info: Login: user=<{USER}>, method=PLAIN, rip=127\.0\.0\.1",
        mark,
    )
    # Terminate mode logs in as the master user; relay mode as the user.
    master = f"Master user logging in as {USER}" in dovecot_sieve.log_text(mark)
    assert master is (listener == "sieve")


# ----------------------------------------------------------------- sievelib


def sievelib_session(
    port: int, ca: Path, password: str, mechanism: str = "PLAIN"
) -> tuple[bool, list[str], str | None]:
    from sievelib.managesieve import Client

    os.environ["SSL_CERT_FILE"] = str(ca)  # sievelib trusts the default store
    try:
        client = Client("127.0.0.1", port, srvhostname="localhost")
        # sievelib sends LOGIN's two responses right behind the command,
        # before any challenge: pipelined SASL strings.
        if not client.connect(USER, password, starttls=True, authmech=mechanism):
            return False, [], client.errmsg.decode()
        try:
            assert client.putscript("via-sievelib", SCRIPT)
            assert client.setactive("via-sievelib")
            active, others = client.listscripts()
        finally:
            client.logout()
    finally:
        del os.environ["SSL_CERT_FILE"]
    return True, [*others, active], active


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
@pytest.mark.parametrize("listener", ["sieve-relay", "sieve"])
async def test_sievelib_puts_and_activates_a_script(
    gateway: Gateway, dovecot_sieve: DovecotInstance, certs: Certs, listener: str, mechanism: str
) -> None:
    clear_scripts(dovecot_sieve)
    _, port = gateway.addresses()[listener]
    mark = dovecot_sieve.log_size()
    ok, names, active = await asyncio.to_thread(
        sievelib_session, port, certs.ca, dovecot_sieve.users[USER], mechanism
    )
    assert ok, active
    assert active == "via-sievelib" and "via-sievelib" in names
    assert (script_dir(dovecot_sieve) / "via-sievelib.sieve").exists()
    assert active_script(dovecot_sieve) == "via-sievelib"
    # Relay mode hands Dovecot the client's own mechanism; terminate mode
    # logs in with the master user's PLAIN whatever the client used.
    method = mechanism if listener == "sieve-relay" else "PLAIN"
    await asyncio.to_thread(
        dovecot_sieve.wait_for_log,
        rf"managesieve-login: Info: Login: user=<{USER}>, method={method},",
        mark,
    )


def sievelib_cleartext(port: int, password: str) -> tuple[bool, str, list[str]]:
    from sievelib.managesieve import Client

    client = Client("127.0.0.1", port)
    try:
        ok = client.connect(USER, password, starttls=False, authmech="PLAIN")
    except Exception as exc:  # sievelib raises when PLAIN is not offered at all
        return False, str(exc), []
    return ok, client.errmsg.decode(), client.get_sasl_mechanisms()


@pytest.mark.parametrize("listener", ["sieve", "sieve-relay"])
@pytest.mark.filterwarnings("ignore:Credentials are sent over an unencrypted connection")
async def test_cleartext_plain_from_outside_without_tls_is_refused(
    gateway: Gateway, dovecot_sieve: DovecotInstance, listener: str
) -> None:
    _, port = gateway.addresses()[listener]
    mark = dovecot_sieve.log_size()
    ok, detail, mechanisms = await asyncio.to_thread(
        sievelib_cleartext, port, dovecot_sieve.users[USER]
    )
    assert not ok
    # PLAIN is not even offered before TLS, so sievelib finds no mechanism.
    assert "No suitable mechanism found" in detail
    assert "PLAIN" not in mechanisms
    # And a client that sends it anyway gets the RFC 5804 code.
    reply = await asyncio.to_thread(raw_plain_login, port, "127.0.0.1", dovecot_sieve.users[USER])
    assert reply.startswith(b"NO (ENCRYPT-NEEDED) "), reply
    assert "managesieve-login: Login" not in dovecot_sieve.log_text(mark)


def raw_plain_login(port: int, source: str, password: str) -> bytes:
    """AUTHENTICATE "PLAIN" with a {n+} literal, no TLS, from `source`."""
    initial = base64.b64encode(f"\0{USER}\0{password}".encode())
    with socket.create_connection(
        ("127.0.0.1", port), timeout=15, source_address=(source, 0)
    ) as sock:
        greeting = b""
        while not greeting.endswith(b"\r\n") or b"\r\nOK " not in b"\r\n" + greeting:
            chunk = sock.recv(4096)
            if not chunk:
                break
            greeting += chunk
        sock.sendall(b'AUTHENTICATE "PLAIN" {%d+}\r\n%s\r\n' % (len(initial), initial))
        reply = sock.recv(4096)
        if reply.startswith(b"OK"):
            sock.sendall(b"LISTSCRIPTS\r\n")
            reply += sock.recv(4096)
        return reply


@pytest.mark.parametrize("listener", ["sieve", "sieve-relay"])
async def test_exempt_address_may_use_plain_without_tls(
    gateway: Gateway, dovecot_sieve: DovecotInstance, listener: str
) -> None:
    _, port = gateway.addresses()[listener]
    reply = await asyncio.to_thread(raw_plain_login, port, EXEMPT, dovecot_sieve.users[USER])
    assert reply.startswith(b'OK "Logged in."\r\n'), reply
    # LISTSCRIPTS went to Dovecot: its answer ends with its own OK.
    assert reply.endswith(b'OK "Listscripts completed."\r\n'), reply


async def test_greeting_carries_dovecots_sieve_capability(gateway: Gateway) -> None:
    _, port = gateway.addresses()["sieve"]

    def greeting() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
            data = b""
            while b"\r\nOK " not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
            return data

    data = await asyncio.to_thread(greeting)
    assert data.startswith(b'"IMPLEMENTATION" "authgate"\r\n')
    assert b'"SIEVE" "fileinto reject envelope' in data
    assert b'"SASL" "SCRAM-SHA-256"\r\n' in data  # PLAIN withheld before TLS
    assert b'"STARTTLS"\r\n' in data
    assert b"XCLIENT" not in data  # Dovecot's, not ours to offer


async def test_docs_interop_holds_the_managesieve_section() -> None:
    """docs/interop.md (written by the matrix generator) carries the fixed
    text of tests/interop/sieve_notes.py (the version line aside)."""
    docs = (Path(__file__).resolve().parents[2] / "docs" / "interop.md").read_text()
    assert "\n".join(sieve_notes.SECTION[2:]) in docs
    assert sieve_notes.SECTION[0] in docs


def starttls_with_injection(port: int, ca: Path, password: str) -> tuple[bytes, bytes]:
    """STARTTLS with a PLAIN login pipelined behind it in one segment, then
    LISTSCRIPTS inside TLS: what came after the handshake, before and after
    LISTSCRIPTS was sent."""
    import ssl

    initial = base64.b64encode(f"\0{USER}\0{password}".encode())
    injected = b'AUTHENTICATE "PLAIN" "' + initial + b'"\r\n'
    with socket.create_connection(("127.0.0.1", port), timeout=15) as raw:
        data = b""
        while b"\r\nOK " not in b"\r\n" + data:
            data += raw.recv(4096)
        raw.sendall(b"STARTTLS\r\n" + injected)
        reply = b""
        while not reply.endswith(b"\r\n"):
            reply += raw.recv(1)
        assert reply.startswith(b"OK "), reply
        context = ssl.create_default_context(cafile=str(ca))
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            after = b""
            while b'OK "TLS negotiation successful."\r\n' not in after:
                after += tls.recv(4096)
            tls.sendall(b"LISTSCRIPTS\r\n")
            answer = tls.recv(4096)
    return after, answer


@pytest.mark.parametrize("listener", ["sieve", "sieve-relay"])
async def test_starttls_injection_never_reaches_dovecot(
    gateway: Gateway, dovecot_sieve: DovecotInstance, certs: Certs, listener: str
) -> None:
    _, port = gateway.addresses()[listener]
    mark = dovecot_sieve.log_size()
    after, answer = await asyncio.to_thread(
        starttls_with_injection, port, certs.ca, dovecot_sieve.users[USER]
    )
    # Inside TLS: only the capability list; the pipelined login was not run.
    assert after.endswith(b'OK "TLS negotiation successful."\r\n') and b"Logged in" not in after
    assert answer == b'NO "Authenticate first."\r\n'
    assert "managesieve-login: Info: Login" not in dovecot_sieve.log_text(mark)


def our_client_against_dovecot(port: int, ca_pem: bytes, mechanism: str, password: str) -> object:
    """authgate's ManageSieve client machine, driven over a blocking socket,
    logging in to Dovecot directly with `mechanism` (STARTTLS first)."""
    import ssl

    from authgate.protocols.base import ClientSettings, LoggedIn, LoginFailed, Send, StartTLS
    from authgate.protocols.managesieve import ManageSieveClient
    from authgate.sasl.base import ClientContext, ClientCredentials, Derive

    machine = ManageSieveClient(
        ClientSettings(
            hostname="gw",
            starttls=True,
            mechanisms=(mechanism,),
            credentials=ClientCredentials(USER, password),
            sasl_context=ClientContext(service="sieve", hostname="localhost"),
        )
    )
    context = ssl.create_default_context(cadata=ca_pem.decode())
    sock: socket.socket = socket.create_connection(("127.0.0.1", port), timeout=15)
    try:
        events = list(machine.receive_data(sock.recv(65536)))
        for _ in range(50):
            pending, events = events, []
            for event in pending:
                if isinstance(event, Send):
                    sock.sendall(event.data)
                elif isinstance(event, StartTLS):
                    sock = context.wrap_socket(sock, server_hostname="localhost")
                    events += machine.tls_started()
                elif isinstance(event, Derive):
                    events += machine.derived(event.compute())
                elif isinstance(event, LoggedIn | LoginFailed):
                    return event
            if not events:
                events = list(machine.receive_data(sock.recv(65536)))
        raise AssertionError("no login result")
    finally:
        sock.close()


@pytest.mark.parametrize("mechanism", ["PLAIN", "CRAM-MD5", "DIGEST-MD5", "SCRAM-SHA-256"])
async def test_our_client_logs_in_to_dovecot_directly(
    dovecot_sieve: DovecotInstance, mechanism: str
) -> None:
    """The client machine terminate and relay mode use, against the real
    server: STARTTLS with the capability list Dovecot re-sends unasked, the
    challenges as strings, and SCRAM's server signature checked."""
    from authgate.protocols.base import LoggedIn

    assert dovecot_sieve.sieve is not None and dovecot_sieve.ca_pem is not None
    result = await asyncio.to_thread(
        our_client_against_dovecot,
        dovecot_sieve.sieve,
        dovecot_sieve.ca_pem,
        mechanism,
        dovecot_sieve.users[USER],
    )
    assert isinstance(result, LoggedIn), result
