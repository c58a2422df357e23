"""Scale-out behind a real HAProxy: two `authgate run` instances, one Redis.

HAProxy (TCP mode, roundrobin, `send-proxy-v2`) spreads clients over the two
instances; each instance trusts only haproxy's address for the PROXY header
and shares its brute-force state through redis-server. Clients connect from
distinct 127.0.0.x sources, so each instance can tell them apart only
through the header. What must hold for an operator who scales out:

1. the policy judges the real client, not the balancer (exempt address or
   not), with and without TLS in between;
2. a block earned by guessing through one instance holds on the other;
3. a crashed instance takes only its own sessions with it;
4. without Redis both instances go on serving on local state, and say so.

The examples/ pair (haproxy.cfg + scaleout.toml) is checked by haproxy and
by authgate's own loader, and must agree on ports. The last two tests pin
bugs of the PROXY listener found on the way (accepting after EMFILE, a
connection reset before accept).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import redis

from authgate import config as config_mod
from authgate.credentials.store import UserStore, generate_secrets
from authgate.defence_redis import DEFAULT_PREFIX, decode_record
from authgate.proxy.proxy_protocol import build_v2
from authgate.testing.kit import eventually
from tests.redis_server import RedisServerError, find_redis_server
from tests.scaleout.cluster import (
    BLOCKED_GREETING,
    EXEMPT_CLIENT,
    HOST,
    PASSWORD,
    Cluster,
    HaproxyError,
    Imap,
    Instance,
    find_haproxy,
    imap_connect,
    scaled_out,
)

pytestmark = pytest.mark.interop

EXAMPLES = Path(__file__).resolve().parent.parent.parent / "examples"
OUTSIDER = "127.0.0.8"  # not exempt: require-secure-auth applies
ATTACKER = "127.0.0.9"
USER_SOURCE = "127.0.0.10"  # a well-behaved client
BLOCK_AFTER = 4  # [defence] block_after in the instances' configuration


@pytest_asyncio.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    try:
        haproxy = find_haproxy()
        find_redis_server()
    except (HaproxyError, RedisServerError) as exc:
        pytest.fail(str(exc))
    try:
        async with scaled_out(tmp_path, haproxy) as running:
            try:
                yield running
            finally:
                # Shown only when the test failed ("Captured stdout teardown").
                print(running.logs())
    except (HaproxyError, RedisServerError) as exc:
        pytest.fail(str(exc))


# What a session logs of a refused login, after its "LISTENER HOST:PORT: " tag.
SESSION_EVENT = "{listener} {host}:{port}: .*{event}"
# The login record of alice's login (authgate.logs): it names the client's
# address and port as fields.
ALICE_LOGGED_IN = "login outcome=ok listener={listener} client={host} client_port={port} .*user=alice "


async def port_owner(
    cluster: Cluster, listener: str, client: Imap, event: str = "", shape: str = SESSION_EVENT
) -> str:
    """The instance whose log names this client's own address and port (in
    the line `shape`, with `event`): the PROXY header carried both through
    haproxy."""
    host, port = client.source
    pattern = shape.format(listener=listener, host=re.escape(host), port=port, event=event)
    loop = asyncio.get_running_loop()
    end = loop.time() + 10
    while True:  # the log reaches us through a pipe: give it a moment
        owners = [inst.name for inst in cluster.instances if inst.lines(pattern)]
        if owners or loop.time() > end:
            assert len(owners) == 1, f"{pattern!r} logged by {owners}\n{cluster.logs()}"
            return owners[0]
        await asyncio.sleep(0.05)


async def login(cluster: Cluster, source: str) -> tuple[Imap, str]:
    """A logged-in, INBOX-selected session through haproxy; and its instance."""
    client = await imap_connect(cluster.frontends["imap"], source)
    assert (await client.cram_md5("a", PASSWORD)).startswith(b"a OK"), client.greeting
    assert (await client.command("s", "SELECT INBOX"))[-1].startswith(b"s OK")
    return client, await port_owner(cluster, "imap", client, shape=ALICE_LOGGED_IN)


async def guess_until_blocked(cluster: Cluster, source: str) -> int:
    """Wrong passwords, one connection each, until the greeting says blocked;
    the number of failed logins it took."""
    failures = 0
    for attempt in range(3 * BLOCK_AFTER):
        client = await imap_connect(cluster.frontends["imap"], source)
        try:
            if client.greeting.startswith(BLOCKED_GREETING):
                return failures
            reply = await client.cram_md5("g", f"wrong-{attempt}")
            assert reply.startswith(b"g NO [AUTHENTICATIONFAILED]"), reply
            failures += 1
        finally:
            client.close()
    raise AssertionError(f"{source} never blocked after {failures} failures\n{cluster.logs()}")


async def blocked_everywhere(cluster: Cluster, source: str, count: int = 4) -> None:
    """`count` new connections in a row through haproxy (roundrobin: both
    instances) all get the blocked greeting, on both listeners."""
    for listener in ("imap",) * count + ("imaps",):
        context = cluster.ssl_context() if listener == "imaps" else None
        client = await imap_connect(cluster.frontends[listener], source, ssl_context=context)
        client.close()
        assert client.greeting.startswith(BLOCKED_GREETING), (listener, client.greeting)


def refusals(cluster: Cluster, source: str) -> dict[str, int]:
    pattern = f"imap {re.escape(source)}:\\d+: refused, address blocked"
    return {inst.name: len(inst.lines(pattern)) for inst in cluster.instances}


# ------------------------------------------------------------ 1. who is the client


@pytest.mark.asyncio
async def test_the_policy_judges_the_client_haproxy_names(cluster: Cluster) -> None:
    owners: dict[str, set[str]] = {EXEMPT_CLIENT: set(), OUTSIDER: set()}
    # Two of each in a row: roundrobin sends each client to both instances.
    for source in (EXEMPT_CLIENT, EXEMPT_CLIENT, OUTSIDER, OUTSIDER):
        client = await imap_connect(cluster.frontends["imap"], source)
        reply = (await client.command("l", f"LOGIN alice {PASSWORD}"))[-1]
        if source == EXEMPT_CLIENT:
            # Cleartext from the exempt network: PLAIN offered, LOGIN accepted.
            assert b"AUTH=PLAIN" in client.greeting and b"LOGINDISABLED" not in client.greeting
            assert reply.startswith(b"l OK"), reply
            shape, event = ALICE_LOGGED_IN, ""
        else:
            # Same balancer, same listener, another client: require-secure-auth.
            assert b"AUTH=PLAIN" not in client.greeting and b"LOGINDISABLED" in client.greeting
            assert reply.startswith(b"l NO [PRIVACYREQUIRED]"), reply
            shape, event = SESSION_EVENT, "authentication failed as 'alice': mechanism-needs-tls"
        owners[source].add(await port_owner(cluster, "imap", client, event, shape))
        client.close()
    assert owners == {EXEMPT_CLIENT: {"a", "b"}, OUTSIDER: {"a", "b"}}


async def smtp_auth_offer(cluster: Cluster, source: str) -> list[str]:
    """The AUTH mechanisms EHLO offers `source` through haproxy's submission frontend."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(HOST, cluster.frontends["submission"], local_addr=(source, 0)),
        10,
    )
    try:
        assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"220 ")
        writer.write(b"EHLO client.example\r\n")
        offered: list[str] = []
        while True:
            line = await asyncio.wait_for(reader.readline(), 10)
            assert line.startswith(b"250"), line
            if line[4:].upper().startswith(b"AUTH "):
                offered = line[9:].decode().split()
            if line.startswith(b"250 "):
                return offered
    finally:
        writer.close()


@pytest.mark.asyncio
async def test_submission_behind_haproxy_judges_the_real_client(cluster: Cluster) -> None:
    # examples/haproxy.cfg's SMTP health check (greeting, QUIT) passes.
    assert await cluster.haproxy.server_states("authgate_submission") == {"a": "UP", "b": "UP"}
    for source in (EXEMPT_CLIENT, EXEMPT_CLIENT, OUTSIDER, OUTSIDER):
        offered = await smtp_auth_offer(cluster, source)
        assert offered == (
            ["CRAM-MD5", "LOGIN", "PLAIN"] if source == EXEMPT_CLIENT else ["CRAM-MD5"]
        )
    for instance in cluster.instances:  # roundrobin: both instances saw both clients
        for source in (EXEMPT_CLIENT, OUTSIDER):
            await instance.wait_for_line(f"submission {re.escape(source)}:\\d+: ")


@pytest.mark.asyncio
async def test_implicit_tls_passes_through_haproxy_after_the_header(cluster: Cluster) -> None:
    owners = set()
    for _round in range(2):
        client = await imap_connect(
            cluster.frontends["imaps"], OUTSIDER, ssl_context=cluster.ssl_context()
        )
        # authgate, not haproxy, terminates TLS: inside it the outsider may use PLAIN.
        assert client.writer.get_extra_info("peercert") is not None
        assert b"AUTH=PLAIN" in client.greeting and b"LOGINDISABLED" not in client.greeting
        assert (await client.command("l", f"LOGIN alice {PASSWORD}"))[-1].startswith(b"l OK")
        fetched = await client.command("f", "EXAMINE INBOX")
        assert fetched[-1].startswith(b"f OK")
        owners.add(await port_owner(cluster, "imaps", client, shape=ALICE_LOGGED_IN))
        client.close()
    assert owners == {"a", "b"}
    # haproxy's TLS health checks (PROXY v2 LOCAL, then a TLS handshake) pass too.
    assert await cluster.haproxy.server_states("authgate_imaps") == {"a": "UP", "b": "UP"}


# ------------------------------------------------------------ 2. one block for all


@pytest.mark.asyncio
async def test_a_block_earned_on_one_instance_holds_on_the_other(cluster: Cluster) -> None:
    # Exactly block_after failures, although roundrobin gave each instance
    # only half of them: the instances counted together.
    assert await guess_until_blocked(cluster, ATTACKER) == BLOCK_AFTER
    failed = f"imap {re.escape(ATTACKER)}:\\d+: CRAM-MD5 authentication failed as 'alice'"

    def per_instance() -> dict[str, int]:
        return {inst.name: len(inst.lines(failed)) for inst in cluster.instances}

    half = BLOCK_AFTER // 2
    await eventually(lambda: per_instance() == {"a": half, "b": half}, per_instance)

    await blocked_everywhere(cluster, ATTACKER)  # 4 in a row: 2 on each instance
    await eventually(lambda: min(refusals(cluster, ATTACKER).values()) >= 2, cluster.logs)

    # The shared record: in Redis, blocking, with a TTL that lets Redis clean up.
    client = redis.Redis.from_url(cluster.redis.url)
    try:
        key = f"{DEFAULT_PREFIX}a:{ATTACKER}/32"
        raw = client.get(key)
        assert isinstance(raw, bytes), client.keys(f"{DEFAULT_PREFIX}*")
        record = decode_record(raw)
        assert record is not None and record.until > time.time() + 250  # block_for = 300
        assert 0 < client.pttl(key) <= 301_000
    finally:
        client.close()

    # The block is the attacker's, not the balancer's: others still log in.
    for _round in range(2):
        session, _owner = await login(cluster, USER_SOURCE)
        session.close()


# ------------------------------------------------------------ 3. a crash


@pytest.mark.asyncio
async def test_killing_one_instance_loses_only_its_own_sessions(cluster: Cluster) -> None:
    sessions = [await login(cluster, USER_SOURCE) for _ in range(6)]
    held = {name: [s for s, owner in sessions if owner == name] for name in ("a", "b")}
    assert len(held["a"]) == 3 and len(held["b"]) == 3, {k: len(v) for k, v in held.items()}

    await cluster["a"].kill()

    for i, survivor in enumerate(held["b"]):
        assert (await survivor.command(f"n{i}", "NOOP"))[-1].startswith(f"n{i} OK".encode())
        reply = await survivor.command(f"f{i}", "FETCH 1 (BODY.PEEK[])")
        assert reply[-1].startswith(f"f{i} OK".encode()) and b"scaled out" in b"".join(reply)
    for lost in held["a"]:
        assert await lost.closed()  # haproxy passed on the crash: no hanging client

    # New clients right away: haproxy's retries and redispatch cover the
    # moments before the health check notices, then the check takes "a" out.
    for _ in range(4):
        client, owner = await login(cluster, USER_SOURCE)
        assert owner == "b"
        client.close()
    loop = asyncio.get_running_loop()
    end = loop.time() + 5
    while (states := await cluster.haproxy.server_states("authgate_imap"))["a"] != "DOWN":
        assert loop.time() < end, states
        await asyncio.sleep(0.1)
    assert states["b"] == "UP"
    for survivor in held["b"]:
        assert (await survivor.command("z", "NOOP"))[-1].startswith(b"z OK")
        survivor.close()


# ------------------------------------------------------------ 4. Redis down


@pytest.mark.asyncio
async def test_without_redis_both_instances_serve_on_local_state(cluster: Cluster) -> None:
    # A block both instances have seen (each checked the blocked address).
    assert await guess_until_blocked(cluster, ATTACKER) == BLOCK_AFTER
    await blocked_everywhere(cluster, ATTACKER)
    await eventually(lambda: min(refusals(cluster, ATTACKER).values()) >= 2, cluster.logs)
    before = refusals(cluster, ATTACKER)

    cluster.redis.kill()

    owners = set()
    for _round in range(4):
        client, owner = await login(cluster, USER_SOURCE)
        owners.add(owner)
        client.close()
    assert owners == {"a", "b"}
    unreachable = f"Redis at {cluster.redis.url} unreachable: using local brute-force state"
    for instance in cluster.instances:
        await instance.wait_for_log(unreachable.encode())
        assert instance.alive

    # The outage pardons nobody: each instance kept the block it had read.
    await blocked_everywhere(cluster, ATTACKER)
    await eventually(
        lambda: all(n > before[k] for k, n in refusals(cluster, ATTACKER).items()),
        cluster.logs,
    )
    # And a wrong password is still just a wrong password.
    client = await imap_connect(cluster.frontends["imap"], "127.0.0.11")
    assert (await client.cram_md5("w", "wrong")).startswith(b"w NO [AUTHENTICATIONFAILED]")
    client.close()


# ------------------------------------------------------------ the examples


def test_examples_haproxy_cfg_is_valid_and_matches_scaleout_toml(tmp_path: Path) -> None:
    try:
        binary = find_haproxy()
    except HaproxyError as exc:
        pytest.fail(str(exc))
    result = subprocess.run(
        [binary, "-c", "-f", str(EXAMPLES / "haproxy.cfg")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr

    # authgate's loader on the example (with the files it names, in a copy).
    for name in ("scaleout.toml", "users.toml", "master.secret"):
        shutil.copy(EXAMPLES / name, tmp_path / name)
    (tmp_path / "defence.secret").write_text("a-secret-of-at-least-16-bytes\n")
    config = config_mod.load(tmp_path / "scaleout.toml")
    assert config.shared_defence is not None
    assert config.shared_defence.redis_url.startswith("redis://")

    text = (EXAMPLES / "haproxy.cfg").read_text()
    active = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    defaults = re.search(r"^\s*default-server\s+(.*)$", active, re.MULTILINE)
    servers = re.findall(r"^\s*server\s+\S+\s+([\d.]+):(\d+)\s*(.*)$", active, re.MULTILINE)
    assert servers, "no server lines in examples/haproxy.cfg"
    listen_ports = {address.port for listener in config.listeners for address in listener.listen}
    for _host, port, options in servers:
        effective = ((defaults[1] if defaults else "") + " " + options).split()
        assert "send-proxy-v2" in effective and "check" in effective, effective
        assert int(port) in listen_ports, (port, listen_ports)
    for listener in config.listeners:
        assert listener.proxy_protocol, listener.name
        assert listener.trusted_proxies.networks, listener.name


# ------------------------------------------------------------ bugs found on the way
#
# Both concern the PROXY listener alone (authgate/proxy/server.py,
# _ProxiedServer), so these tests talk to one instance the way haproxy does,
# from the trusted 127.0.0.1, without haproxy itself.


@contextlib.asynccontextmanager
async def lone_proxied_instance(root: Path, nofile: int | None = None) -> AsyncIterator[Instance]:
    """One `authgate run` with a single PROXY listener; nobody authenticates,
    so the backend address is never dialled."""
    store = UserStore(realm="localhost")
    store.set_user_secrets("alice", generate_secrets("alice", PASSWORD, "localhost"))
    store.save(root / "users.toml")
    config = root / "lone.toml"
    config.write_text(
        f"""hostname = "localhost"
[users]
file = "users.toml"
[[listeners]]
name = "imap"
protocol = "imap"
listen = "{HOST}:0"
proxy_protocol = true
trusted_proxies = ["{HOST}/32"]
[listeners.backend]
address = "{HOST}:9"
master_user = "authgate"
master_password = "unused"
"""
    )
    instance = Instance("lone", config, listeners=("imap",), nofile=nofile)
    try:
        try:
            await instance.start()
        except AssertionError as exc:
            # Not the bug under test: must not count as the expected failure.
            raise RuntimeError(f"authgate did not start: {exc}") from None
        yield instance
    finally:
        print(instance.log)  # shown when the test fails
        await instance.stop()


async def greeting_with_header(port: int, timeout: float) -> bytes:
    """What a balancer's connection gets (b"" if nothing within `timeout`)."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(build_v2((EXEMPT_CLIENT, 40000), (HOST, port)))
        return await asyncio.wait_for(reader.readline(), timeout)
    except TimeoutError:
        return b""
    finally:
        writer.close()


@pytest.mark.asyncio
async def test_proxy_listener_accepts_again_after_running_out_of_descriptors(
    tmp_path: Path,
) -> None:
    limit = 128
    async with lone_proxied_instance(tmp_path, nofile=limit) as instance:
        port = instance.ports["imap"]
        # The balancer opens more connections than the process has descriptors
        # (a flood through haproxy); none has sent its header yet.
        flood = [socket.create_connection((HOST, port)) for _ in range(limit + 16)]
        await asyncio.sleep(1)
        for sock in flood:
            sock.close()  # every held descriptor is freed again
        await asyncio.sleep(1)
        greeting = await greeting_with_header(port, timeout=3)
        assert greeting.startswith(b"* OK"), greeting


@pytest.mark.asyncio
async def test_proxy_listener_shrugs_off_a_connection_reset_before_accept(
    tmp_path: Path,
) -> None:
    async with lone_proxied_instance(tmp_path) as instance:
        port = instance.ports["imap"]
        instance.signal(signal.SIGSTOP)  # hold the connections in the accept queue
        try:
            for _ in range(3):
                sock = socket.create_connection((HOST, port))
                # SO_LINGER 0: close() sends RST, as an impatient client or balancer does.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
        finally:
            instance.signal(signal.SIGCONT)
        # The listener lives on either way; the log tells the difference.
        assert (await greeting_with_header(port, timeout=5)).startswith(b"* OK")
        await asyncio.sleep(0.5)
        assert "Traceback" not in instance.log
        assert "exception was never retrieved" not in instance.log
