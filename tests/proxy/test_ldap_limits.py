"""The LDAP listener's defence and limits with a real slapd behind it: a
blocked address, max_errors, the idle timeout, strict ALPN on LDAPS. Raw
BER from the test (authgate.protocols.ber builds it), so every byte the
listener answers is checked."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from authgate import config as config_mod
from authgate.certs import ensure_dev_certificates
from authgate.protocols import ber
from authgate.protocols.ldap import ResultCode
from authgate.proxy import proxy_protocol
from authgate.proxy.server import Gateway
from authgate.runner import start_gateway
from tests.ldap_server import SlapdInstance, start_slapd

pytestmark = pytest.mark.asyncio


@pytest.fixture(scope="module")
def slapd() -> Iterator[SlapdInstance]:
    with start_slapd() as instance:
        yield instance


@pytest_asyncio.fixture
async def gateway(tmp_path: Path, slapd: SlapdInstance) -> AsyncIterator[Gateway]:
    ensure_dev_certificates(tmp_path / "certs")
    path = tmp_path / "authgate.toml"
    path.write_text(
        f"""hostname = "localhost"
[policy]
security = "require-secure-auth"
mechanisms = ["PLAIN"]
[tls]
cert = "certs/server.pem"
key = "certs/server.key"
[limits]
idle_timeout = 1
max_errors = 2
[defence]
failure_delay = 0
penalties = []
block_after = 2
[[listeners]]
name = "ldap"
protocol = "ldap"
listen = "127.0.0.1:0"
tls = "implicit"
backend = "127.0.0.1:{slapd.ldap_port}"
[[listeners]]
name = "plain"
protocol = "ldap"
listen = "127.0.0.1:0"
backend = "127.0.0.1:{slapd.ldap_port}"
"""
    )
    running = await start_gateway(config_mod.load(path), None)
    try:
        yield running
    finally:
        await running.stop(drain=1)


def client_tls(tmp_path: Path, alpn: list[str] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(tmp_path / "certs" / "demo-ca.pem"))
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


def simple_bind(msgid: int, dn: str, password: str) -> bytes:
    body = ber.encode_int(3) + ber.encode(4, dn.encode()) + ber.encode(0x80, password.encode())
    return ber.message(msgid, ber.encode(ber.BIND_REQUEST, body))


async def read_message(reader: asyncio.StreamReader) -> ber.Message | None:
    """One LDAPMessage, or None at end of stream."""
    buffer = b""
    while True:
        header = ber.read_header(buffer)
        if header is not None and len(buffer) >= header.total:
            return ber.parse_message(buffer)
        need = 1 if header is None else header.total - len(buffer)
        try:
            buffer += await asyncio.wait_for(reader.readexactly(need), 10)
        except asyncio.IncompleteReadError:
            return None


def code(message: ber.Message | None) -> tuple[int, int, int] | None:
    if message is None:
        return None
    return message.message_id, message.op, ber.parse_result(message.body).code


async def test_failed_binds_block_the_address(
    gateway: Gateway, slapd: SlapdInstance, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two wrong passwords (slapd's 49) block 127.0.0.1: the next
    connection gets the notice of disconnection, even with the right
    password, and slapd sees no third bind."""
    host, port = gateway.addresses()["ldap"]
    for msgid in (1, 2):
        reader, writer = await asyncio.open_connection(host, port, ssl=client_tls(tmp_path))
        writer.write(simple_bind(msgid, slapd.dn("alice"), "wrong"))
        assert code(await read_message(reader)) == (msgid, ber.BIND_RESPONSE, 49)
        writer.close()
    mark = slapd.log_size()
    reader, writer = await asyncio.open_connection(host, port, ssl=client_tls(tmp_path))
    writer.write(simple_bind(3, slapd.dn("alice"), slapd.password("alice")))
    notice = await read_message(reader)
    assert code(notice) == (0, ber.EXTENDED_RESPONSE, ResultCode.UNAVAILABLE)
    assert notice is not None and b"Too many failed logins" in notice.body
    assert await read_message(reader) is None  # closed
    writer.close()
    await asyncio.sleep(0.2)
    assert slapd.binds(mark) == []
    # The login records fail2ban reads, as for every other listener.
    outcomes = [r.getMessage() for r in caplog.records if r.name == "authgate.login"]
    assert sum("outcome=failed listener=ldap" in m for m in outcomes) == 2
    assert any("outcome=blocked listener=ldap" in m for m in outcomes)
    assert all("wrong" not in m for m in outcomes)


async def test_max_errors_then_goodbye(gateway: Gateway, slapd: SlapdInstance) -> None:
    host, port = gateway.addresses()["plain"]
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(simple_bind(1, slapd.dn("bob"), "pw"))
    assert code(await read_message(reader)) == (1, ber.BIND_RESPONSE, 13)
    writer.write(simple_bind(2, slapd.dn("bob"), "pw"))
    assert code(await read_message(reader)) == (2, ber.BIND_RESPONSE, 13)
    notice = await read_message(reader)
    assert notice is not None and b"Too many errors" in notice.body
    assert await read_message(reader) is None
    writer.close()


async def test_idle_client_gets_a_notice(gateway: Gateway) -> None:
    host, port = gateway.addresses()["plain"]
    reader, writer = await asyncio.open_connection(host, port)
    notice = await read_message(reader)  # idle_timeout = 1
    assert code(notice) == (0, ber.EXTENDED_RESPONSE, ResultCode.UNAVAILABLE)
    assert notice is not None and b"Idle timeout" in notice.body
    writer.close()


async def test_malformed_ber_gets_protocol_error_and_close(gateway: Gateway) -> None:
    host, port = gateway.addresses()["plain"]
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"\x30\x80\x02\x01\x01")  # indefinite length
    notice = await read_message(reader)
    assert code(notice) == (0, ber.EXTENDED_RESPONSE, ResultCode.PROTOCOL_ERROR)
    assert await read_message(reader) is None
    writer.close()


async def test_ldaps_refuses_a_browser_alpn(gateway: Gateway, tmp_path: Path) -> None:
    host, port = gateway.addresses()["ldap"]
    with pytest.raises(ssl.SSLError, match=r"NO_APPLICATION_PROTOCOL|no application protocol"):
        _, writer = await asyncio.open_connection(
            host, port, ssl=client_tls(tmp_path, ["h2", "http/1.1"])
        )
        writer.close()
    _, writer = await asyncio.open_connection(host, port, ssl=client_tls(tmp_path, ["ldap"]))
    assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "ldap"
    writer.close()


@pytest_asyncio.fixture
async def balanced(tmp_path: Path, slapd: SlapdInstance) -> AsyncIterator[Gateway]:
    """An LDAP listener behind a load balancer (PROXY protocol from 127.0.0.1)."""
    path = tmp_path / "balanced.toml"
    path.write_text(
        f"""hostname = "localhost"
[policy]
security = "require-secure-auth"
mechanisms = ["PLAIN"]
exempt_networks = ["198.51.100.0/24"]
[defence]
failure_delay = 0
penalties = []
[[listeners]]
name = "ldap"
protocol = "ldap"
listen = "127.0.0.1:0"
backend = "127.0.0.1:{slapd.ldap_port}"
proxy_protocol = true
trusted_proxies = ["127.0.0.1/32"]
"""
    )
    running = await start_gateway(config_mod.load(path), None)
    try:
        yield running
    finally:
        await running.stop(drain=1)


@pytest.mark.parametrize(("client", "expected"), [("198.51.100.7", 0), ("203.0.113.9", 13)])
async def test_proxy_header_names_the_client_the_policy_judges(
    balanced: Gateway, slapd: SlapdInstance, client: str, expected: int
) -> None:
    """Behind a trusted balancer the PROXY header's address decides: an
    exempt one may bind in cleartext, another gets 13."""
    host, port = balanced.addresses()["ldap"]
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(proxy_protocol.build_v2((client, 40000), (host, port)))
    writer.write(simple_bind(1, slapd.dn("alice"), slapd.password("alice")))
    assert code(await read_message(reader)) == (1, ber.BIND_RESPONSE, expected)
    writer.close()


async def test_a_second_proxy_header_is_refused(balanced: Gateway) -> None:
    host, port = balanced.addresses()["ldap"]
    reader, writer = await asyncio.open_connection(host, port)
    header = proxy_protocol.build_v2(("198.51.100.7", 40000), (host, port))
    writer.write(header)
    await asyncio.sleep(0.1)  # the balancer's header is read on its own
    writer.write(header)
    assert await read_message(reader) is None  # closed, nothing said
    writer.close()


@pytest.fixture(scope="module")
def proxied_slapd() -> Iterator[SlapdInstance]:
    with start_slapd(proxied=True) as instance:
        yield instance


async def test_backend_is_told_the_client_address(
    tmp_path: Path, proxied_slapd: SlapdInstance
) -> None:
    """client_address = "proxy-v2" toward slapd's pldap:// listener: slapd
    logs the real client (127.0.0.2), not authgate."""
    path = tmp_path / "proxied.toml"
    path.write_text(
        f"""hostname = "localhost"
[policy]
security = "none"
[[listeners]]
name = "ldap"
protocol = "ldap"
listen = "127.0.0.1:0"
[listeners.backend]
address = "127.0.0.1:{proxied_slapd.proxied_port}"
client_address = "proxy-v2"
"""
    )
    gateway = await start_gateway(config_mod.load(path), None)
    try:
        host, port = gateway.addresses()["ldap"]
        mark = proxied_slapd.log_size()
        reader, writer = await asyncio.open_connection(host, port, local_addr=("127.0.0.2", 0))
        writer.write(simple_bind(1, proxied_slapd.dn("bob"), proxied_slapd.password("bob")))
        assert code(await read_message(reader)) == (1, ber.BIND_RESPONSE, 0)
        writer.close()
        proxied_slapd.wait_for_log(r"ACCEPT from IP=127\.0\.0\.2:", since=mark)
    finally:
        await gateway.stop(drain=1)


async def _gateway_for(tmp_path: Path, backend: str) -> Gateway:
    path = tmp_path / "backend.toml"
    path.write_text(
        f"""hostname = "localhost"
[policy]
security = "none"
[limits]
connect_timeout = 2
backend_timeout = 2
[[listeners]]
name = "ldap"
protocol = "ldap"
listen = "127.0.0.1:0"
[listeners.backend]
{backend}
"""
    )
    return await start_gateway(config_mod.load(path), None)


async def _bind_through(gateway: Gateway, slapd: SlapdInstance) -> ber.Message | None:
    host, port = gateway.addresses()["ldap"]
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(simple_bind(1, slapd.dn("bob"), slapd.password("bob")))
    try:
        return await read_message(reader)
    finally:
        writer.close()


async def test_starttls_toward_the_backend(tmp_path: Path, slapd: SlapdInstance) -> None:
    """tls = "starttls" toward slapd: LDAP StartTLS (the shared BER
    writer), then the client's bind inside that TLS."""
    mark = slapd.log_size()
    gateway = await _gateway_for(
        tmp_path,
        f'address = "127.0.0.1:{slapd.ldap_port}"\ntls = "starttls"\nca_file = "{slapd.ca_file}"',
    )
    try:
        assert code(await _bind_through(gateway, slapd)) == (1, ber.BIND_RESPONSE, 0)
    finally:
        await gateway.stop(drain=1)
    slapd.wait_for_log(r"EXT oid=1\.3\.6\.1\.4\.1\.1466\.20037", since=mark)
    slapd.wait_for_log(r"BIND dn=\"uid=bob", since=mark)


async def test_backend_down_is_a_notice_not_a_failed_login(
    tmp_path: Path, slapd: SlapdInstance
) -> None:
    from tests.netutil import free_port

    gateway = await _gateway_for(tmp_path, f'address = "127.0.0.1:{free_port()}"')
    try:
        notice = await _bind_through(gateway, slapd)
        assert code(notice) == (0, ber.EXTENDED_RESPONSE, ResultCode.UNAVAILABLE)
        assert gateway.guard.check("127.0.0.1").blocked is False
    finally:
        await gateway.stop(drain=1)


async def test_backend_starttls_response_injection_is_refused(
    tmp_path: Path, slapd: SlapdInstance, caplog: pytest.LogCaptureFixture
) -> None:
    """A backend that sends bytes behind its StartTLS response (response
    injection) is not used. (A hand-written hostile server: no real
    directory misbehaves this way on purpose.)"""
    seen: list[bytes] = []

    async def hostile(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.read(100))
        ok = ber.response(1, ber.EXTENDED_RESPONSE, 0, name=ber.STARTTLS_OID)
        writer.write(ok + ber.response(2, ber.BIND_RESPONSE, 0))  # the injected "answer"
        await writer.drain()
        await reader.read(100)
        writer.close()

    server = await asyncio.start_server(hostile, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    gateway = await _gateway_for(
        tmp_path, f'address = "127.0.0.1:{port}"\ntls = "starttls"\nverify = false'
    )
    try:
        notice = await _bind_through(gateway, slapd)
        assert code(notice) == (0, ber.EXTENDED_RESPONSE, ResultCode.UNAVAILABLE)
        assert seen and ber.parse_message(seen[0]).op == ber.EXTENDED_REQUEST
        assert any("data after its StartTLS response" in r.getMessage() for r in caplog.records)
    finally:
        await gateway.stop(drain=1)
        server.close()
        await server.wait_closed()


async def test_no_password_in_any_log_line(
    gateway: Gateway, slapd: SlapdInstance, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Right, wrong and refused binds, malformed input: the passwords never
    appear in a log record (all loggers, DEBUG)."""
    caplog.set_level(logging.DEBUG)
    right, wrong = slapd.password("carol"), "Wr0ng-Passw0rd-plugh"
    host = gateway.addresses()["ldap"][0]
    tls_port = gateway.addresses()["ldap"][1]
    plain_port = gateway.addresses()["plain"][1]
    for port, tls, password in (
        (tls_port, True, right),
        (tls_port, True, wrong),
        (plain_port, False, right),
    ):
        reader, writer = await asyncio.open_connection(
            host, port, ssl=client_tls(tmp_path) if tls else None
        )
        writer.write(simple_bind(1, slapd.dn("carol"), password))
        await read_message(reader)
        writer.close()
    reader, writer = await asyncio.open_connection(host, plain_port)
    writer.write(simple_bind(1, slapd.dn("carol"), wrong)[:-3] + b"\x30\x80")
    await asyncio.sleep(0.1)
    writer.close()
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "carol" in text  # the records are there ...
    assert right not in text and wrong not in text  # ... the passwords are not


async def test_locked_out_user_fails_like_a_wrong_password(
    tmp_path: Path, slapd: SlapdInstance
) -> None:
    """user_lockout_after = 1: after one wrong password for bob, his right
    password from another address gets 49 and never reaches slapd."""
    path = tmp_path / "lockout.toml"
    path.write_text(
        f"""hostname = "localhost"
[policy]
security = "none"
[defence]
failure_delay = 0
penalties = []
user_lockout_after = 1
[[listeners]]
name = "ldap"
protocol = "ldap"
listen = "127.0.0.1:0"
backend = "127.0.0.1:{slapd.ldap_port}"
"""
    )
    gateway = await start_gateway(config_mod.load(path), None)
    try:
        host, port = gateway.addresses()["ldap"]
        dn = slapd.dn("bob").replace("uid=", "UID=")  # respelt: the same user
        for source, password, expected in (
            ("127.0.0.3", "wrong", 49),
            ("127.0.0.4", slapd.password("bob"), 49),
        ):
            mark = slapd.log_size()
            reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
            writer.write(simple_bind(1, dn, password))
            assert code(await read_message(reader)) == (1, ber.BIND_RESPONSE, expected)
            writer.close()
        await asyncio.sleep(0.2)
        assert slapd.binds(mark) == []  # the right password never reached slapd
    finally:
        await gateway.stop(drain=1)


async def test_one_way_password_storage_drops_challenge_response_sasl(
    tmp_path: Path, slapd: SlapdInstance
) -> None:
    """The SHA-store adjustment: slapd keeps {SSHA}, which no
    challenge-response mechanism can use; password_storage = "one-way"
    says so, and a CRAM-MD5 SASL bind is then refused here (7) instead of
    failing at slapd."""
    mark = slapd.log_size()
    gateway = await _gateway_for(
        tmp_path, f'address = "127.0.0.1:{slapd.ldap_port}"\npassword_storage = "one-way"'
    )
    try:
        host, port = gateway.addresses()["ldap"]
        reader, writer = await asyncio.open_connection(host, port)
        sasl = ber.encode(0xA3, ber.encode(4, b"CRAM-MD5"))
        body = ber.encode_int(3) + ber.encode(4, b"") + sasl
        writer.write(ber.message(1, ber.encode(ber.BIND_REQUEST, body)))
        assert code(await read_message(reader)) == (
            1,
            ber.BIND_RESPONSE,
            ResultCode.AUTH_METHOD_NOT_SUPPORTED,
        )
        writer.close()
    finally:
        await gateway.stop(drain=1)
    await asyncio.sleep(0.2)
    assert slapd.operations(mark) == []
