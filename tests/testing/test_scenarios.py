"""Every hostile-server scenario of the plugin misbehaves as documented
(authgate.testing.scenarios), shown with a small line client of our own
over real sockets and the stack's transcripts; and a stack without a
scenario is the honest one."""

from __future__ import annotations

import asyncio
import base64
import datetime
import imaplib
import re
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from cryptography import x509

from authgate.sasl.base import ClientAuthError, ClientContext, ClientCredentials, Derive
from authgate.sasl.digest_md5 import DigestMD5Client
from authgate.sasl.scram import ScramSHA256Client
from authgate.testing import scenarios
from authgate.testing.plugin import NO_DELAYS, AuthgateFactory
from authgate.testing.scenarios import INJECTED, TAMPERED, ScenarioChannel
from authgate.testing.stack import Endpoint, Stack, embedded_stack
from authgate.testing.transcripts import RecordingChannel

pytest_plugins = ["pytester"]

PASSWORD = "Scenario-pw-1"
USERS = {"alice": PASSWORD}
PROTOCOLS = ("imap", "pop3", "smtp")
LISTENER = {"imap": "imap", "pop3": "pop3", "smtp": "submission"}
STARTTLS = {"imap": b"a1 STARTTLS", "pop3": b"STLS", "smtp": b"STARTTLS"}
CAPS = {"imap": b"c1 CAPABILITY", "pop3": b"CAPA", "smtp": b"EHLO client.test"}
TIMEOUT = 10


class LineClient:
    """A minimal client: send a line, read one reply (IMAP: to the tag;
    POP3: one line, or to "." after CAPA; SMTP: to the last NNN line)."""

    def __init__(self, protocol: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.protocol = protocol
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, endpoint: Endpoint) -> tuple[LineClient, bytes]:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(endpoint.host, endpoint.port, limit=4 * 1024 * 1024), TIMEOUT
        )
        client = cls(endpoint.protocol, reader, writer)
        greeting = await client.reply(greeting=True)
        return client, greeting

    async def line(self) -> bytes:
        data = await asyncio.wait_for(self.reader.readline(), TIMEOUT)
        if not data:
            raise ConnectionError("closed")
        return data

    async def reply(self, command: bytes = b"", *, greeting: bool = False) -> bytes:
        out = b""
        while True:
            line = await self.line()
            out += line
            if self.protocol == "imap":
                tag = command.split(b" ", 1)[0] if command else b"*"
                if greeting or line.startswith(tag + b" ") or line.startswith(b"+ "):
                    return out
            elif self.protocol == "pop3":
                multi = command.upper() == b"CAPA" and out.startswith(b"+OK")
                if not multi or line == b".\r\n":
                    return out
            elif line[3:4] == b" ":
                return out

    async def ask(self, command: bytes) -> bytes:
        self.writer.write(command + b"\r\n")
        return await self.reply(command)

    async def starttls(self, context: ssl.SSLContext) -> bytes:
        answer = await self.ask(STARTTLS[self.protocol])
        await asyncio.wait_for(self.writer.start_tls(context, server_hostname="localhost"), 10)
        return answer

    def close(self) -> None:
        self.writer.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """One recording stack for the dialogue scenarios (Stack.play switches
    them): a stack per test would cost a second each."""
    async with embedded_stack(
        tmp_path_factory.mktemp("scenarios"),
        users=USERS,
        extra_config=NO_DELAYS,
        record=True,
    ) as stack:
        yield stack


def on(stack: Stack, scenario: str | None, **options: object) -> Stack:
    stack.play(scenario, options.get("scenario_options"))  # type: ignore[arg-type]
    return stack


async def stack_for(factory: AuthgateFactory, scenario: str | None, **kw: object) -> Stack:
    return await factory(scenario=scenario, users=USERS, **kw)  # type: ignore[arg-type]


async def caps_across_starttls(stack: Stack, protocol: str) -> tuple[bytes, bytes, bytes]:
    """Greet `protocol`'s listener, ask its capabilities, STARTTLS, ask
    again: the greeting and the two answers, before and inside TLS."""
    client, greeting = await LineClient.open(stack[LISTENER[protocol]])
    before = await client.ask(CAPS[protocol])
    await client.starttls(stack.ssl_context())
    after = await client.ask(CAPS[protocol])
    client.close()
    return greeting, before, after


# ------------------------------------------------------------ no scenario


@pytest.mark.asyncio
async def test_stack_without_scenario_is_the_honest_server(
    authgate_factory: AuthgateFactory,
) -> None:
    stack = await stack_for(authgate_factory, None)
    for protocol in PROTOCOLS:
        assert stack.scenario is None
        assert type(stack.gateway.channel_factory(LISTENER[protocol])) is RecordingChannel
        stack.transcripts.clear()  # the factory call above made one
        greeting, before, after = await caps_across_starttls(stack, protocol)
        assert await stack.settled()
        assert b"STARTTLS" in before or b"STLS" in before
        assert b"PLAIN" not in before and b"PLAIN" in after  # require-secure-auth
        for marker in (TAMPERED.encode(), INJECTED.encode(), b"PREAUTH", b"ALERT"):
            assert marker not in greeting + before + after
        transcript = stack.last_transcript()
        # one write per reply, nothing appended to the STARTTLS answer
        assert transcript.server_lines(tls=False)[-1] in (
            b"a1 OK Begin TLS negotiation now",
            b"+OK Begin TLS negotiation",
            b"220 2.0.0 Ready to start TLS",
        )
        assert transcript.server_bytes(tls=True) == after


@pytest.mark.asyncio
async def test_scenario_names_and_options_are_checked(authgate_factory: AuthgateFactory) -> None:
    with pytest.raises(ValueError, match="scenario 'strip-tls' is not one of: alert-and-referral"):
        await authgate_factory(scenario="strip-tls")
    with pytest.raises(ValueError, match="unknown option 'dalay'"):
        await authgate_factory(scenario="slow-auth", scenario_options={"dalay": 1})
    with pytest.raises(ValueError, match="delay must be 0 to 60"):
        await authgate_factory(scenario="slow-auth", scenario_options={"delay": 600})
    with pytest.raises(TypeError, match="line_bytes must be an int"):
        await authgate_factory(scenario="oversized-line", scenario_options={"line_bytes": "big"})
    # every scenario documents the safe behaviour and its source
    for scenario in scenarios.SCENARIOS.values():
        assert scenario.misbehaviour and scenario.safe_client and scenario.reference
        assert "RFC" in scenario.reference


@pytest.mark.asyncio
@pytest.mark.authgate(scenario="preauth", users=USERS)
async def test_marker_chooses_the_scenario(authgate: Stack) -> None:
    assert authgate.scenario is not None and authgate.scenario.name == "preauth"
    client, greeting = await LineClient.open(authgate["imap"])
    client.close()
    assert greeting.startswith(b"* PREAUTH [CAPABILITY IMAP4rev1 ")


# --------------------------------------------------------------- STARTTLS


@pytest.mark.asyncio(loop_scope="module")
async def test_strip_starttls(shared: Stack) -> None:
    stack = on(shared, "strip-starttls")
    for protocol in PROTOCOLS:
        client, greeting = await LineClient.open(stack[LISTENER[protocol]])
        caps = await client.ask(CAPS[protocol])
        refused = await client.ask(STARTTLS[protocol])
        client.close()
        for text in (greeting, caps):
            assert b"STARTTLS" not in text and b"STLS" not in text and b"LOGINDISABLED" not in text
        assert (
            refused
            == {
                "imap": b"a1 BAD Unknown command\r\n",
                "pop3": b"-ERR Unknown command\r\n",
                "smtp": b"502 5.5.1 Unknown command\r\n",
            }[protocol]
        )
        assert await stack.settled()
        assert not stack.last_transcript().tls


@pytest.mark.asyncio(loop_scope="module")
async def test_strip_starttls_refused(shared: Stack) -> None:
    stack = on(shared, "strip-starttls-refused")
    for protocol in PROTOCOLS:
        client, _ = await LineClient.open(stack[LISTENER[protocol]])
        caps = await client.ask(CAPS[protocol])
        refused = await client.ask(STARTTLS[protocol])
        # the session goes on in plaintext: the refusal was a temporary one
        again = await client.ask(CAPS[protocol])
        client.close()
        assert b"STARTTLS" in caps or b"STLS" in caps
        assert (
            refused
            == {
                "imap": b"a1 NO [UNAVAILABLE] TLS not available\r\n",
                "pop3": b"-ERR [SYS/TEMP] TLS not available\r\n",
                "smtp": b"454 4.7.0 TLS not available\r\n",
            }[protocol]
        )
        assert again == caps


@pytest.mark.asyncio(loop_scope="module")
async def test_inject_after_starttls(shared: Stack) -> None:
    stack = on(shared, "inject-after-starttls")
    for protocol in PROTOCOLS:
        client, _ = await LineClient.open(stack[LISTENER[protocol]])
        client.writer.write(STARTTLS[protocol] + b"\r\n")
        answer = await client.line()
        # the injected plaintext is already there, behind the real reply
        injected = await client.line()
        client.close()
        assert answer.startswith((b"a1 OK", b"+OK", b"220 "))
        assert {
            "imap": injected == f"* CAPABILITY IMAP4rev1 AUTH=PLAIN {INJECTED}\r\n".encode(),
            "pop3": injected == f"+OK {INJECTED}\r\n".encode(),
            "smtp": injected == f"250-{INJECTED}\r\n".encode(),
        }[protocol]
        assert await stack.settled()
        transcript = stack.last_transcript()
        # written in one piece with the STARTTLS reply: one segment
        reply = [c for c in transcript.chunks if c.sender == "server" and c.data.startswith(answer)]
        assert len(reply) == 1 and INJECTED.encode() in reply[0].data
        if protocol == "imap":
            assert reply[0].data.endswith(
                b"a2 OK [CAPABILITY IMAP4rev1 AUTH=PLAIN " + INJECTED.encode() + b"] "
                b"injected before TLS\r\n"
            )


def test_next_tag_counts_up() -> None:
    assert scenarios.next_tag(b"A0041") == b"A0042"
    assert scenarios.next_tag(b"PGPK9") == b"PGPK10"
    assert scenarios.next_tag(b"x") == b"x1"


@pytest.mark.asyncio(loop_scope="module")
async def test_preauth_is_imap_only(shared: Stack) -> None:
    stack = on(shared, "preauth")
    for protocol in ("pop3", "smtp"):
        client, greeting = await LineClient.open(stack[LISTENER[protocol]])
        client.close()
        assert greeting.startswith((b"+OK ", b"220 "))


# ----------------------------------------------------------- capabilities


@pytest.mark.asyncio(loop_scope="module")
async def test_tamper_capabilities(shared: Stack) -> None:
    stack = on(shared, "tamper-capabilities")
    for protocol in PROTOCOLS:
        greeting, before, after = await caps_across_starttls(stack, protocol)
        assert TAMPERED.encode() in before
        assert not re.search(rb"AUTH=|^SASL |^250[- ]AUTH ", before, re.M)
        assert TAMPERED.encode() not in after and b"PLAIN" in after
        if protocol == "imap":
            assert TAMPERED.encode() in greeting  # the greeting's [CAPABILITY] code too


@pytest.mark.asyncio(loop_scope="module")
async def test_tamper_capabilities_stale(shared: Stack) -> None:
    stack = on(shared, "tamper-capabilities-stale")
    for protocol in PROTOCOLS:
        _, before, after = await caps_across_starttls(stack, protocol)
        if protocol == "imap":
            stale = [line for line in before.splitlines() if line.startswith(b"* CAPABILITY")]
            assert after.splitlines()[0] == stale[0]
            assert b"STARTTLS" in after and b"LOGINDISABLED" in after
        else:
            assert after == before and (b"STARTTLS" in after or b"STLS" in after)
        assert b"PLAIN" not in after


@pytest.mark.asyncio(loop_scope="module")
async def test_cleartext_only_mechanisms(shared: Stack) -> None:
    stack = on(shared, "cleartext-only-mechanisms")
    for protocol in PROTOCOLS:
        _, before, after = await caps_across_starttls(stack, protocol)
        mechanisms = {
            "imap": b"AUTH=PLAIN AUTH=LOGIN",
            "pop3": b"SASL PLAIN LOGIN\r\n",
            "smtp": b"AUTH PLAIN LOGIN\r\n",
        }[protocol]
        assert mechanisms in before
        assert b"LOGINDISABLED" not in before and b"SCRAM" not in before
        assert b"STARTTLS" in before or b"STLS" in before
        assert b"SCRAM-SHA-256" in after  # inside TLS: the real list


# ----------------------------------------------------------- certificates


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("kind", "error"),
    [
        ("expired", "certificate has expired"),
        ("wrong-host", "Hostname mismatch"),
        ("unknown-ca", "unable to get local issuer certificate"),
        ("self-signed", "self-signed certificate"),
    ],
)
async def test_bad_certificate(authgate_factory: AuthgateFactory, kind: str, error: str) -> None:
    stack = await stack_for(authgate_factory, f"bad-certificate-{kind}")
    # implicit TLS: the handshake fails against the CA the client trusts
    endpoint = stack["imaps"]
    with pytest.raises(ssl.SSLCertVerificationError, match=error):
        await asyncio.wait_for(
            asyncio.open_connection(
                endpoint.host, endpoint.port, ssl=stack.ssl_context(), server_hostname="localhost"
            ),
            TIMEOUT,
        )
    # what the certificate is, read without verifying
    loose = ssl.create_default_context()
    loose.check_hostname = False
    loose.verify_mode = ssl.CERT_NONE
    _, writer = await asyncio.open_connection(endpoint.host, endpoint.port, ssl=loose)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    cert = x509.load_der_x509_certificate(der)
    trusted = x509.load_pem_x509_certificate(stack.ca_file.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    now = datetime.datetime.now(datetime.UTC)
    if kind == "expired":
        assert cert.not_valid_after_utc < now and cert.issuer == trusted.subject
    elif kind == "wrong-host":
        assert names.get_values_for_type(x509.DNSName) == ["wrong.example"]
        assert cert.issuer == trusted.subject
    elif kind == "unknown-ca":
        assert cert.issuer != trusted.subject and "localhost" in names.get_values_for_type(
            x509.DNSName
        )
    else:
        assert cert.issuer == cert.subject
    # STARTTLS fails the same way
    client, _ = await LineClient.open(stack["imap"])
    with pytest.raises(ssl.SSLCertVerificationError, match=error):
        await client.starttls(stack.ssl_context())
    client.close()


# ------------------------------------------------------------------ login


async def imap_sasl(client: LineClient, mechanism: str, machine: object) -> list[bytes]:
    """Run AUTHENTICATE with one of our client machines; returns the
    server's lines. Raises the machine's ClientAuthError."""
    lines = [await client.ask(b"a2 AUTHENTICATE " + mechanism.encode())]
    start = machine.start()
    if start is not None:
        lines = [await client.ask(base64.b64encode(start))]
    while lines[-1].startswith(b"+ "):
        challenge = base64.b64decode(lines[-1][2:].strip())
        answer = machine.step(challenge)
        if isinstance(answer, Derive):
            answer = answer.finish(await asyncio.to_thread(answer.compute))
        client.writer.write(base64.b64encode(answer) + b"\r\n")
        lines.append(await client.reply(b"a2"))
    return lines


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize(
    ("mechanism", "make", "error"),
    [
        ("SCRAM-SHA-256", ScramSHA256Client, "server signature is wrong"),
        ("DIGEST-MD5", DigestMD5Client, "rspauth"),
    ],
)
async def test_bad_server_proof(shared: Stack, mechanism: str, make: type, error: str) -> None:
    creds = ClientCredentials("alice", PASSWORD)
    for scenario in (None, "bad-server-proof"):
        stack = on(shared, scenario)
        client, _ = await LineClient.open(stack["imap"])
        await client.starttls(stack.ssl_context())
        machine = make(creds, ClientContext(service="imap", hostname="localhost"))
        if scenario is None:  # the honest server proves itself
            lines = await imap_sasl(client, mechanism, machine)
            assert lines[-1].startswith(b"a2 OK")
        else:
            with pytest.raises(ClientAuthError, match=error):
                await imap_sasl(client, mechanism, machine)
        client.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_temporary_failure(shared: Stack) -> None:
    stack = on(shared, "temporary-failure")
    logins = [
        len(b.logins) for b in (stack.backends.imap, stack.backends.pop3, stack.backends.smtp)
    ]
    for protocol in PROTOCOLS:
        client, _ = await LineClient.open(stack[LISTENER[protocol]])
        await client.starttls(stack.ssl_context())
        plain = base64.b64encode(b"\0alice\0" + PASSWORD.encode())
        command = {
            "imap": b"a2 AUTHENTICATE PLAIN " + plain,
            "pop3": b"AUTH PLAIN " + plain,
            "smtp": b"AUTH PLAIN " + plain,
        }[protocol]
        if protocol == "smtp":
            await client.ask(CAPS["smtp"])
        answer = await client.ask(command)
        client.close()
        assert (
            answer
            == {
                "imap": b"a2 NO [UNAVAILABLE] Temporary authentication failure\r\n",
                "pop3": b"-ERR [SYS/TEMP] Temporary authentication failure\r\n",
                "smtp": b"454 4.7.0 Temporary authentication failure\r\n",
            }[protocol]
        )
    # nobody reached a backend
    assert [len(b.logins) for b in (stack.backends.imap, stack.backends.pop3)] == logins[:2]
    assert len(stack.backends.smtp.logins) == logins[2]


@pytest.mark.asyncio(loop_scope="module")
async def test_disconnect_mid_sasl(shared: Stack) -> None:
    stack = on(shared, "disconnect-mid-sasl")
    for protocol in PROTOCOLS:
        client, _ = await LineClient.open(stack[LISTENER[protocol]])
        await client.starttls(stack.ssl_context())
        if protocol == "smtp":
            await client.ask(CAPS["smtp"])
        start = {"imap": b"a2 AUTHENTICATE PLAIN", "pop3": b"AUTH PLAIN", "smtp": b"AUTH PLAIN"}
        challenge = await client.ask(start[protocol])
        assert challenge.startswith((b"+ ", b"334 "))  # the exchange began
        client.writer.write(base64.b64encode(b"\0alice\0" + PASSWORD.encode()) + b"\r\n")
        assert await asyncio.wait_for(client.reader.read(), TIMEOUT) == b""  # closed, no answer
        client.close()
        assert await stack.settled()
        assert stack.last_transcript().closed_by == "server"


@pytest.mark.asyncio(loop_scope="module")
async def test_slow_auth_holds_each_login_answer(shared: Stack) -> None:
    delay = 0.2
    stack = on(shared, "slow-auth", scenario_options={"delay": delay})
    client, _ = await LineClient.open(stack["imap"])
    loop = asyncio.get_running_loop()
    await client.starttls(stack.ssl_context())
    began = loop.time()
    answer = await client.ask(b'a2 LOGIN alice "' + PASSWORD.encode() + b'"')
    slow = loop.time() - began
    client.close()
    assert answer.startswith(b"a2 OK")
    # asyncio.sleep never wakes early: a lower bound, no upper one asserted
    assert slow >= delay


@pytest.mark.asyncio(loop_scope="module")
async def test_oversized_line(shared: Stack) -> None:
    stack = on(shared, "oversized-line", scenario_options={"line_bytes": 70_000})
    for protocol in PROTOCOLS:
        client, greeting = await LineClient.open(stack[LISTENER[protocol]])
        client.close()
        assert len(greeting) == 70_000 and greeting.endswith(b"xxx\r\n")
        assert greeting.count(b"\r\n") == 1


@pytest.mark.asyncio(loop_scope="module")
async def test_oversized_line_default_outgrows_imaplib(shared: Stack) -> None:
    stack = on(shared, "oversized-line")
    endpoint = stack["imap"]

    def connect() -> None:
        imaplib.IMAP4(endpoint.host, endpoint.port, timeout=TIMEOUT)

    with pytest.raises(imaplib.IMAP4.error, match="got more than 1000000 bytes"):
        await asyncio.to_thread(connect)
    assert await stack.settled()
    transcript = stack.last_transcript()
    assert transcript.truncated  # a line longer than the recorder keeps
    assert transcript.server_bytes().startswith(b"* OK xxxx")


@pytest.mark.asyncio(loop_scope="module")
async def test_alert_and_referral(shared: Stack) -> None:
    stack = on(shared, "alert-and-referral")
    logins = len(stack.backends.imap.logins)
    client, greeting = await LineClient.open(stack["imap"])
    alert = await client.line()
    await client.starttls(stack.ssl_context())
    answer = await client.ask(b'a2 LOGIN alice "' + PASSWORD.encode() + b'"')
    client.close()
    assert greeting.startswith(b"* OK [CAPABILITY")
    assert alert == f"* OK [ALERT] {scenarios.ALERT_TEXT}\r\n".encode()
    assert (
        answer == b"a2 NO [REFERRAL imap://alice;AUTH=*@referral.invalid/] Try another server\r\n"
    )
    assert len(stack.backends.imap.logins) == logins


def test_scenario_channel_is_used_for_lens_scenarios() -> None:
    assert issubclass(ScenarioChannel, RecordingChannel)
    kinds = {s.name: s.certificate for s in scenarios.SCENARIOS.values()}
    assert {k for k, v in kinds.items() if v} == {
        "bad-certificate-expired",
        "bad-certificate-wrong-host",
        "bad-certificate-unknown-ca",
        "bad-certificate-self-signed",
    }


README = Path(__file__).resolve().parents[2] / "README.md"
HOSTILE_SECTION = "## Testing your mail client against a hostile server"


def hostile_section() -> str:
    text = README.read_text(encoding="utf-8")
    assert text.count(HOSTILE_SECTION + "\n") == 1, "README lost the hostile-server section"
    return text.split(HOSTILE_SECTION + "\n", 1)[1].split("\n## ", 1)[0]


def test_readme_lists_every_scenario() -> None:
    section = hostile_section()
    for name in scenarios.SCENARIOS:
        assert f"| `{name}`" in section, name


def test_readme_hostile_example_passes_verbatim(pytester: pytest.Pytester) -> None:
    blocks = re.findall(r"^```python\n(.*?)^```$", hostile_section(), re.S | re.M)
    assert len(blocks) == 1
    tests = re.findall(r"^async def (test_\w+)", blocks[0], re.M)
    pytester.makeini(
        "[pytest]\nasyncio_mode = strict\nasyncio_default_fixture_loop_scope = function\n"
        "addopts = --strict-markers -p no:cacheprovider\n"
    )
    pytester.makepyfile(test_inner=blocks[0])
    result = pytester.runpytest_inprocess("-rA")
    result.assert_outcomes(passed=len(tests))


@pytest.mark.asyncio(loop_scope="module")
async def test_a_client_the_lens_keeps_answering_is_closed(shared: Stack) -> None:
    """strip-starttls answers STARTTLS itself; a client repeating it forever
    is closed after MAX_ANSWERED rounds (the session's deadline cannot see them)."""
    stack = on(shared, "strip-starttls")
    client, _ = await LineClient.open(stack["pop3"])
    answers = 0
    with pytest.raises(ConnectionError):
        for _ in range(scenarios.MAX_ANSWERED + 5):
            assert await client.ask(b"STLS") == b"-ERR Unknown command\r\n"
            answers += 1
    client.close()
    assert answers == scenarios.MAX_ANSWERED


@pytest.mark.asyncio
async def test_play_switches_the_scenario_for_new_connections(
    authgate_factory: AuthgateFactory,
) -> None:
    stack = await stack_for(authgate_factory, None)
    stack.play("preauth")
    first, greeting = await LineClient.open(stack["imap"])
    stack.play(None)
    second, honest = await LineClient.open(stack["imap"])
    # the connection made under preauth keeps its lens
    assert (await first.ask(b"n NOOP")).endswith(b"n OK NOOP completed\r\n")
    first.close()
    second.close()
    assert greeting.startswith(b"* PREAUTH") and honest.startswith(b"* OK")
    assert stack.scenario is None
    with pytest.raises(ValueError, match="need a stack of their own"):
        stack.play("bad-certificate-expired")
    with pytest.raises(ValueError, match="is not one of"):
        stack.play("preauht")
