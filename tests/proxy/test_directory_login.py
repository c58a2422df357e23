"""Directory users through the proxy: an LDAP bind against a real slapd
verifies them, only PLAIN and LOGIN are offered, and a directory outage is
a temporary failure, never "wrong password"."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from authgate import audit
from authgate import config as config_mod
from authgate.certs import ensure_dev_certificates
from authgate.offers import load_store
from authgate.proxy.server import Gateway
from authgate.runner import start_gateway
from authgate.testing.backends import Backends, start_backends
from authgate.testing.stack import MASTER_USER
from tests.ldap_server import PEOPLE, SlapdInstance, start_slapd

pytestmark = pytest.mark.asyncio

USER = "dirk"
PASSWORD = "Dirk-LDAP-pw-1"


@pytest.fixture(scope="module")
def slapd() -> Iterator[SlapdInstance]:
    with start_slapd({USER: ("people", PASSWORD)}) as instance:
        yield instance


@pytest_asyncio.fixture
async def proxy(tmp_path: Path, slapd: SlapdInstance) -> AsyncIterator[tuple[Gateway, Backends]]:
    async for running in _proxy(tmp_path, slapd):
        yield running


CANONICAL_EXTRA = """user_lockout_after = 3
[audit]
file = "audit.log"
"""


@pytest_asyncio.fixture
async def audited_proxy(
    tmp_path: Path, slapd: SlapdInstance
) -> AsyncIterator[tuple[Gateway, Backends]]:
    """The proxy with an audit log and the per-user lockout on."""
    async for running in _proxy(tmp_path, slapd, CANONICAL_EXTRA):
        yield running


async def _proxy(
    tmp_path: Path, slapd: SlapdInstance, extra: str = ""
) -> AsyncIterator[tuple[Gateway, Backends]]:
    ensure_dev_certificates(tmp_path / "certs")
    backends = await start_backends(
        tmp_path / "mail", {USER: "unused"}, master=(MASTER_USER, "mpw")
    )
    path = tmp_path / "authgate.toml"
    path.write_text(
        f"""hostname = "localhost"
[policy]
security = "none"
mechanisms = ["CRAM-MD5", "LOGIN", "PLAIN"]
[directory]
url = "{slapd.ldaps_url}"
ca_file = "{slapd.ca_file}"
bind_dn_template = "uid={{user}},{PEOPLE}"
[[listeners]]
name = "imap"
protocol = "imap"
listen = "127.0.0.1:0"
[listeners.backend]
address = "127.0.0.1:{backends.imap.port}"
master_user = "{MASTER_USER}"
master_password = "mpw"
[defence]
failure_delay = 0
penalties = []
{extra}"""
    )
    config = config_mod.load(path)
    gateway = await start_gateway(config, load_store(config))
    try:
        yield gateway, backends
    finally:
        await gateway.stop(drain=1)
        await backends.close()


async def exchange(gateway: Gateway, *lines: str) -> list[bytes]:
    host, port = gateway.addresses()["imap"]
    reader, writer = await asyncio.open_connection(host, port)
    replies = [await asyncio.wait_for(reader.readline(), 10)]
    for i, line in enumerate(lines):
        writer.write(f"t{i} {line}\r\n".encode())
        while True:
            reply = await asyncio.wait_for(reader.readline(), 15)
            replies.append(reply)
            if reply.startswith(f"t{i} ".encode()) or not reply:
                break
    writer.close()
    return replies


async def test_directory_user_logs_in_with_an_ldap_bind(
    proxy: tuple[Gateway, Backends], slapd: SlapdInstance
) -> None:
    gateway, backends = proxy
    mark = slapd.log_size()
    replies = await exchange(gateway, f"LOGIN {USER} {PASSWORD}")
    assert replies[-1].startswith(b"t0 OK")
    assert backends.imap.logins[-1].user == USER
    assert any(USER in dn for dn in slapd.binds(mark))


async def test_only_cleartext_mechanisms_are_offered(proxy: tuple[Gateway, Backends]) -> None:
    gateway, _ = proxy
    greeting = (await exchange(gateway))[0]
    assert b"AUTH=PLAIN" in greeting and b"AUTH=LOGIN" in greeting
    assert b"AUTH=CRAM-MD5" not in greeting  # a directory reveals no secret to check it with


async def test_wrong_password_is_refused(proxy: tuple[Gateway, Backends]) -> None:
    gateway, _ = proxy
    replies = await exchange(gateway, f"LOGIN {USER} wrong-password")
    assert replies[-1].startswith(b"t0 NO [AUTHENTICATIONFAILED]")


async def test_directory_down_is_a_temporary_failure(
    proxy: tuple[Gateway, Backends], slapd: SlapdInstance
) -> None:
    gateway, _ = proxy
    slapd.stop()
    try:
        replies = await exchange(gateway, f"LOGIN {USER} {PASSWORD}")
        assert replies[-1].startswith(b"t0 NO [UNAVAILABLE]")
    finally:
        slapd.start()
    replies = await exchange(gateway, f"LOGIN {USER} {PASSWORD}")
    assert replies[-1].startswith(b"t0 OK")


# ------------------------------------------------ canonical directory names


def audit_records(tmp_path: Path) -> list[dict[str, object]]:
    return audit.read_log((tmp_path / "audit.log").read_bytes(), None, "audit.log").records


async def wait_for_audit(tmp_path: Path, count: int) -> list[dict[str, object]]:
    for _ in range(200):  # the trail writes in a worker thread
        if (tmp_path / "audit.log").exists() and len(audit_records(tmp_path)) >= count:
            break
        await asyncio.sleep(0.02)
    return audit_records(tmp_path)


async def test_directory_login_uses_the_entrys_own_name(
    audited_proxy: tuple[Gateway, Backends], slapd: SlapdInstance, tmp_path: Path
) -> None:
    """slapd binds "DIRK" (its uid matching ignores case): the session is
    the entry's uid, "dirk", toward the backend and in the audit log."""
    gateway, backends = audited_proxy
    replies = await exchange(gateway, f"LOGIN DIRK {PASSWORD}")
    assert replies[-1].startswith(b"t0 OK")
    login = backends.imap.logins[-1]
    assert (login.user, login.authcid) == (USER, MASTER_USER)
    (record,) = [r for r in await wait_for_audit(tmp_path, 1) if r["event"] == "login"]
    assert (record["user"], record["authcid"]) == (USER, USER)


@pytest.mark.parametrize(
    "typed",
    [f" {USER}", f"{USER} ", "ｄｉｒｋ", "di\u00adrk", "d\u200birk"],
    ids=["leading-space", "trailing-space", "full-width", "soft-hyphen", "zero-width-space"],
)
async def test_other_spellings_of_a_directory_name_are_refused_unbound(
    proxy: tuple[Gateway, Backends], slapd: SlapdInstance, typed: str
) -> None:
    """slapd would bind " dirk", "dirk " and "ｄｉｒｋ" as dirk (RFC 4518
    matching): refused before any bind, with the right password too."""
    gateway, backends = proxy
    before = len(backends.imap.logins)
    mark = slapd.log_size()
    replies = await exchange(gateway, f'LOGIN "{typed}" {PASSWORD}')
    assert replies[-1].startswith(b"t0 NO [AUTHENTICATIONFAILED]")
    assert len(backends.imap.logins) == before
    await asyncio.sleep(0.1)  # slapd logs a moment after answering
    assert slapd.binds(mark) == []


async def test_lockout_counts_every_spelling_as_the_one_user(
    audited_proxy: tuple[Gateway, Backends], tmp_path: Path
) -> None:
    """Wrong passwords as "DIRK", "Dirk" and "dİrk" (dotted capital I, which
    slapd folds to i) are three strikes against dirk: the lockout then
    refuses even the right password, whatever the spelling."""
    gateway, backends = audited_proxy
    for typed in ("DIRK", "Dirk", "dİrk"):
        replies = await exchange(gateway, f"LOGIN {typed} wrong-{typed}")
        assert replies[-1].startswith(b"t0 NO [AUTHENTICATIONFAILED]")
    for typed in (USER, "DIRK"):
        replies = await exchange(gateway, f"LOGIN {typed} {PASSWORD}")
        assert replies[-1].startswith(b"t0 NO [AUTHENTICATIONFAILED]"), typed
    assert backends.imap.logins == []
