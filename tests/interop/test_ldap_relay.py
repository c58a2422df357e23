"""LDAP through authgate, toward a real slapd, with real clients: OpenLDAP's
ldapwhoami and ldapsearch (Debian ldap-utils) and python-ldap.

The listeners: `ldap` (StartTLS offered, policy require-secure-auth, exempt
127.0.0.2/32) and `ldaps` (implicit TLS), relaying to the slapd of
tests/ldap_server.py. Every case is checked at both ends: what the client
got, and whether slapd saw the bind at all (its `-d stats` log).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import ldap
import pytest
import pytest_asyncio

from authgate import audit
from authgate import config as config_mod
from authgate.certs import ensure_dev_certificates
from authgate.protocols import ber
from authgate.proxy.server import Gateway
from authgate.runner import start_gateway
from tests.interop import ldap_notes
from tests.ldap_server import STAFF, SUFFIX, SlapdInstance, start_slapd

pytestmark = [pytest.mark.asyncio, pytest.mark.interop]

EXEMPT = "127.0.0.2"
TOOLS_HINT = "install ldap-utils (./dev test does, as root)"


@pytest.fixture(scope="module")
def slapd() -> Iterator[SlapdInstance]:
    with start_slapd() as instance:
        yield instance


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("ldap-certs")
    ensure_dev_certificates(directory)
    return directory


CONFIG = """hostname = "localhost"
[policy]
security = "require-secure-auth"
mechanisms = {mechanisms}
exempt_networks = ["{exempt}/32"]
[tls]
cert = "{certs}/server.pem"
key = "{certs}/server.key"
[defence]
failure_delay = 0
penalties = []
[audit]
file = "audit.log"
[[listeners]]
name = "ldap"
protocol = "ldap"
listen = "127.0.0.1:0"
tls = "starttls"
backend = "127.0.0.1:{ldap_port}"
[[listeners]]
name = "ldaps"
protocol = "ldap"
listen = "127.0.0.1:0"
tls = "implicit"
[listeners.backend]
address = "127.0.0.1:{ldaps_port}"
tls = "implicit"
ca_file = "{ca}"
"""


@pytest_asyncio.fixture
async def gateway(tmp_path: Path, slapd: SlapdInstance, certs: Path) -> AsyncIterator[Gateway]:
    path = tmp_path / "authgate.toml"
    path.write_text(
        CONFIG.format(
            mechanisms='["CRAM-MD5", "PLAIN"]',
            exempt=EXEMPT,
            certs=certs,
            ldap_port=slapd.ldap_port,
            ldaps_port=slapd.ldaps_port,
            ca=slapd.ca_file,
        )
    )
    running = await start_gateway(config_mod.load(path), None)
    try:
        yield running
    finally:
        await running.stop(drain=1)


def url(gateway: Gateway, name: str = "ldap") -> str:
    host, port = gateway.addresses()[name]
    scheme = "ldaps" if name == "ldaps" else "ldap"
    return f"{scheme}://{host}:{port}"


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise AssertionError(f"{name} not found: {TOOLS_HINT}")
    return found


async def run_tool(certs: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "LDAPTLS_CACERT": str(certs / "demo-ca.pem"),
        "LDAPTLS_REQCERT": "demand",
        # (not LDAPNOINIT: it would turn off these LDAPTLS_ variables too)
    }
    return await asyncio.to_thread(
        subprocess.run, [tool(args[0]), *args[1:]], capture_output=True, text=True, env=env,
        timeout=30, check=False,
    )  # fmt: skip


def audit_records(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "audit.log"
    if not path.exists():
        return []
    return list(audit.read_log(path.read_bytes(), None, "audit.log").records)


async def wait_for_audit(tmp_path: Path, event: str) -> list[dict[str, Any]]:
    for _ in range(250):  # the trail writes in a worker thread
        records = [r for r in audit_records(tmp_path) if r["event"] == event]
        if records:
            return records
        await asyncio.sleep(0.02)
    return []


# ---------------------------------------------------------- ldap-utils


async def test_ldapwhoami_starttls_bind_succeeds(
    gateway: Gateway, slapd: SlapdInstance, certs: Path, tmp_path: Path
) -> None:
    mark = slapd.log_size()
    dn = slapd.dn("alice")
    done = await run_tool(
        certs,
        "ldapwhoami",
        "-H",
        url(gateway),
        "-ZZ",
        "-x",
        "-D",
        dn,
        "-w",
        slapd.password("alice"),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"dn:{dn}"
    slapd.wait_for_log(r'BIND dn="uid=alice', since=mark)
    (login,) = await wait_for_audit(tmp_path, "login")
    assert (login["user"], login["mechanism"]) == (dn, "SIMPLE")


async def test_ldapsearch_through_starttls_reads_the_directory(
    gateway: Gateway, slapd: SlapdInstance, certs: Path
) -> None:
    """ou=people is readable by bound users only: the entries prove the
    bind and the search both went through."""
    done = await run_tool(
        certs, "ldapsearch", "-H", url(gateway), "-ZZ", "-x", "-LLL",
        "-D", slapd.dn("alice"), "-w", slapd.password("alice"),
        "-b", f"ou=people,{SUFFIX}", "(uid=bob)", "uid",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"dn: {slapd.dn('bob')}" in done.stdout and "uid: bob" in done.stdout


async def test_cleartext_simple_bind_from_non_exempt_gets_13(
    gateway: Gateway, slapd: SlapdInstance, certs: Path, tmp_path: Path
) -> None:
    mark = slapd.log_size()
    done = await run_tool(
        certs, "ldapwhoami", "-H", url(gateway), "-x",
        "-D", slapd.dn("alice"), "-w", slapd.password("alice"),
    )  # fmt: skip
    assert done.returncode == 13, done.stderr
    assert "Confidentiality required (13)" in done.stderr
    assert slapd.binds(mark) == []  # never reached the directory
    (failed,) = await wait_for_audit(tmp_path, "login-failed")
    assert failed["reason"] == "mechanism-needs-tls"


async def test_ldaps_listener(gateway: Gateway, slapd: SlapdInstance, certs: Path) -> None:
    done = await run_tool(
        certs, "ldapwhoami", "-H", url(gateway, "ldaps"), "-x",
        "-D", slapd.dn("carol"), "-w", slapd.password("carol"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"dn:{slapd.dn('carol')}"


async def test_sasl_mechanisms_are_filtered(
    gateway: Gateway, slapd: SlapdInstance, certs: Path
) -> None:
    """DIGEST-MD5 is not in the policy's list: 7 from authgate, slapd never
    sees it. CRAM-MD5 is: the exchange goes to slapd, which answers itself."""
    mark = slapd.log_size()
    refused = await run_tool(
        certs, "ldapwhoami", "-H", url(gateway), "-Y", "DIGEST-MD5", "-U", "alice",
        "-w", slapd.password("alice"),
    )  # fmt: skip
    assert refused.returncode == 7, refused.stderr
    assert "Authentication method not supported (7)" in refused.stderr
    assert slapd.operations(mark) == []
    allowed = await run_tool(
        certs, "ldapwhoami", "-H", url(gateway), "-Y", "CRAM-MD5", "-U", "alice",
        "-w", slapd.password("alice"),
    )  # fmt: skip
    slapd.wait_for_log(r"BIND dn=\"\" method=163", since=mark)
    # slapd's own answer, relayed: its SASL has no secret for alice (this
    # test slapd keeps only {SSHA} hashes, which CRAM-MD5 cannot use).
    assert allowed.returncode == 49, allowed.stderr
    assert "SASL(-13): user not found" in allowed.stderr


# ------------------------------------------------------------ python-ldap


def _connect(gateway: Gateway, source: str | None = None, name: str = "ldap") -> Any:
    """A python-ldap connection; from `source` through a socket bound there
    (python-ldap's `fileno`: libldap has no source-address option)."""
    ldap.set_option(ldap.OPT_X_TLS_REQUIRE_CERT, ldap.OPT_X_TLS_DEMAND)
    if source is None:
        conn = ldap.initialize(url(gateway, name))
    else:
        host, port = gateway.addresses()[name]
        sock = socket.create_connection((host, port), timeout=10, source_address=(source, 0))
        conn = ldap.initialize(url(gateway, name), fileno=sock.detach())
    conn.set_option(ldap.OPT_NETWORK_TIMEOUT, 10)
    conn.set_option(ldap.OPT_TIMEOUT, 10)
    conn.protocol_version = 3
    return conn


def _tls(conn: Any, certs: Path) -> None:
    conn.set_option(ldap.OPT_X_TLS_CACERTFILE, str(certs / "demo-ca.pem"))
    conn.set_option(ldap.OPT_X_TLS_NEWCTX, 0)
    conn.start_tls_s()


async def test_python_ldap_exempt_address_binds_in_cleartext(
    gateway: Gateway, slapd: SlapdInstance
) -> None:
    def session() -> str:
        conn = _connect(gateway, EXEMPT)
        try:
            conn.simple_bind_s(slapd.dn("alice"), slapd.password("alice"))
            return str(conn.whoami_s())
        finally:
            conn.unbind_s()

    assert await asyncio.to_thread(session) == f"dn:{slapd.dn('alice')}"


async def test_python_ldap_rebind_later_in_the_session_is_policed(
    gateway: Gateway, slapd: SlapdInstance, certs: Path
) -> None:
    """Anonymous bind and search (allowed without TLS), then a simple bind
    with a password on the same cleartext connection: 13; the session goes
    on, and the same bind after StartTLS works."""

    def session(certs_dir: Path) -> tuple[int, int, str]:
        conn = _connect(gateway)
        try:
            conn.simple_bind_s("", "")
            found = conn.search_s(STAFF, ldap.SCOPE_ONELEVEL, "(uid=carol)", ["uid"])
            with pytest.raises(ldap.CONFIDENTIALITY_REQUIRED):
                conn.simple_bind_s(slapd.dn("bob"), slapd.password("bob"))
            again = conn.search_s(STAFF, ldap.SCOPE_ONELEVEL, "(uid=carol)", ["uid"])
            _tls(conn, certs_dir)
            conn.simple_bind_s(slapd.dn("bob"), slapd.password("bob"))
            return len(found), len(again), str(conn.whoami_s())
        finally:
            conn.unbind_s()

    mark = slapd.log_size()
    assert await asyncio.to_thread(session, certs) == (1, 1, f"dn:{slapd.dn('bob')}")
    binds = slapd.binds(mark)
    assert binds.count(slapd.dn("bob")) == 1  # the refused one never reached slapd


async def test_python_ldap_wrong_password_counts_as_a_failed_login(
    gateway: Gateway, slapd: SlapdInstance, certs: Path, tmp_path: Path
) -> None:
    def session(certs_dir: Path) -> None:
        conn = _connect(gateway)
        try:
            _tls(conn, certs_dir)
            with pytest.raises(ldap.INVALID_CREDENTIALS):
                conn.simple_bind_s(slapd.dn("alice"), "not-the-password")
        finally:
            conn.unbind_s()

    await asyncio.to_thread(session, certs)
    (failed,) = await wait_for_audit(tmp_path, "login-failed")
    assert (failed["user"], failed["reason"]) == (slapd.dn("alice"), "invalid-credentials")


# ------------------------------------------------------ StartTLS injection


async def _read_message(reader: asyncio.StreamReader) -> ber.Message:
    """One whole LDAPMessage from the stream."""
    buffer = b""
    while True:
        header = ber.read_header(buffer)
        if header is not None and len(buffer) >= header.total:
            assert len(buffer) == header.total, "more than one message in this read"
            return ber.parse_message(buffer)
        need = 1 if header is None else header.total - len(buffer)
        buffer += await asyncio.wait_for(reader.readexactly(need), 10)


async def test_bytes_after_starttls_are_never_executed_inside_tls(
    gateway: Gateway, slapd: SlapdInstance, certs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """StartTLS and a bind in one segment: authgate answers StartTLS, drops
    the bind (it never reaches slapd), and inside TLS the session is
    anonymous (Who am I? says nobody)."""
    mark = slapd.log_size()
    host, port = gateway.addresses()["ldap"]
    reader, writer = await asyncio.open_connection(host, port)
    injected = ber.message(
        2,
        ber.encode(
            ber.BIND_REQUEST,
            ber.encode_int(3)
            + ber.encode(4, slapd.dn("carol").encode())
            + ber.encode(0x80, slapd.password("carol").encode()),
        ),
    )
    writer.write(ber.starttls_request(1) + injected)  # one write: one segment on loopback
    answer = await _read_message(reader)
    assert (answer.message_id, answer.op, ber.parse_result(answer.body).code) == (
        1,
        ber.EXTENDED_RESPONSE,
        0,
    )
    context = ssl.create_default_context(cafile=str(certs / "demo-ca.pem"))
    await writer.start_tls(context, server_hostname="localhost")
    whoami_oid = b"1.3.6.1.4.1.4203.1.11.3"
    writer.write(ber.message(3, ber.encode(ber.EXTENDED_REQUEST, ber.encode(0x80, whoami_oid))))
    reply = await _read_message(reader)
    assert reply.message_id == 3 and ber.parse_result(reply.body).code == 0
    # RFC 4532: the authzId is the responseValue [11]; absent or empty: anonymous.
    values = [content for tag, content in ber.elements(reply.body) if tag == 0x8B]
    assert values in ([], [b""])
    writer.close()
    await asyncio.sleep(0.2)  # slapd logs a moment after answering
    assert slapd.binds(mark) == []
    assert any(
        "dropped" in r.getMessage() and "STARTTLS injection" in r.getMessage()
        for r in caplog.records
    )


async def test_docs_interop_has_the_ldap_section() -> None:
    """docs/interop.md is generated by the matrix run; its LDAP part is the
    text of tests/interop/ldap_notes.py (the version line aside)."""
    docs = (Path(__file__).parents[2] / "docs" / "interop.md").read_text(encoding="utf-8")
    assert "\n".join(ldap_notes.SECTION[2:]) in docs
    assert ldap_notes.SECTION[0] in docs


# ---------------------------------------------------------- pytest plugin


async def test_plugin_stack_relays_ldap_to_a_given_directory(
    authgate_factory: Any, slapd: SlapdInstance
) -> None:
    """`ldap_backend=` gives a plugin stack `ldap` and `ldaps` listeners
    under the stack's policy (here the default, require-secure-auth)."""
    stack = await authgate_factory(ldap_backend=f"127.0.0.1:{slapd.ldap_port}")
    endpoint = stack["ldap"]

    def session() -> tuple[str, str]:
        ldap.set_option(ldap.OPT_X_TLS_REQUIRE_CERT, ldap.OPT_X_TLS_DEMAND)
        conn = ldap.initialize(f"ldap://{endpoint.host}:{endpoint.port}")
        conn.set_option(ldap.OPT_NETWORK_TIMEOUT, 10)
        try:
            try:
                conn.simple_bind_s(slapd.dn("alice"), slapd.password("alice"))
                refused = "bound"
            except ldap.CONFIDENTIALITY_REQUIRED:
                refused = "13"
            conn.set_option(ldap.OPT_X_TLS_CACERTFILE, str(stack.ca_file))
            conn.set_option(ldap.OPT_X_TLS_NEWCTX, 0)
            conn.start_tls_s()
            conn.simple_bind_s(slapd.dn("alice"), slapd.password("alice"))
            return refused, str(conn.whoami_s())
        finally:
            conn.unbind_s()

    assert await asyncio.to_thread(session) == ("13", f"dn:{slapd.dn('alice')}")
    assert stack["ldaps"].protocol == "ldap"
    assert await stack.settled()
    assert stack.last_transcript("ldap").listener == "ldap"
