"""The pytest plugin (authgate.testing.plugin), driven the way its users drive it.

Each test writes a small test file into a pytester folder and runs pytest on
it with plugin autoload off and only `-p pytest_asyncio.plugin -p authgate`,
so the plugin is loaded through its `pytest11` entry point name, under strict
asyncio mode and --strict-markers (an unregistered marker would be an error).
The outer tests assert the inner outcomes and messages. The README example
runs in a subprocess, exactly as a user's pytest would; the rest in-process,
which is several times faster.
"""

from __future__ import annotations

import importlib
import re
import sys
import textwrap
from pathlib import Path
from typing import Protocol

import pytest
import trustme  # noqa: F401

# In-process runs put sys.modules back afterwards, so whatever an inner run
# imported is imported afresh by the next one, and cryptography's Rust
# bindings do not survive that ("curve must be an EllipticCurve instance").
# Importing the stack's dependencies here keeps one copy for every run.
import authgate.testing.stack  # noqa: F401

pytest_plugins = ["pytester"]

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Testing your mail client with the pytest plugin"

INI = """
[pytest]
asyncio_mode = strict
asyncio_default_fixture_loop_scope = function
addopts = --strict-markers -p no:cacheprovider
"""

# Shared by the inner test files: imaplib with a chosen source address.
CLIENTS = """
import asyncio
import imaplib
import poplib
import smtplib
import socket

import pytest

from authgate.config import ConfigError


class IMAP(imaplib.IMAP4):
    def __init__(self, endpoint, source="127.0.0.1"):
        self._source = source
        super().__init__(endpoint.host, endpoint.port, timeout=10)

    def _create_socket(self, timeout):
        return socket.create_connection(
            (self.host, self.port), timeout, source_address=(self._source, 0)
        )


def imap_login(endpoint, user, password, source="127.0.0.1"):
    with IMAP(endpoint, source) as client:
        typ, _ = client.login(user, password)
        return typ
"""


class Runner(Protocol):
    def __call__(self, source: str, *, subprocess: bool = False) -> pytest.RunResult: ...


@pytest.fixture
def run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Runner:
    """Write `source` as test_inner.py and run pytest on it."""
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    pytester.makeini(INI)

    def runner(source: str, *, subprocess: bool = False) -> pytest.RunResult:
        pytester.makepyfile(test_inner=source)
        # Loading pytest-asyncio first lets pytest rewrite its asserts before
        # authgate's plugin imports it (else: PytestAssertRewriteWarning).
        args = ("-p", "pytest_asyncio.plugin", "-p", "authgate", "-rA")
        if subprocess:
            return pytester.runpytest_subprocess(*args, timeout=120)
        return pytester.runpytest_inprocess(*args)

    return runner


def readme_example() -> str:
    """The python block of the README's plugin section, byte for byte."""
    text = README.read_text(encoding="utf-8")
    assert text.count(SECTION + "\n") == 1, "README lost the plugin section"
    section = text.split(SECTION + "\n", 1)[1].split("\n## ", 1)[0]
    blocks: list[str] = re.findall(r"^```python\n(.*?)^```$", section, re.S | re.M)
    assert len(blocks) == 1, "the plugin section should hold exactly one python example"
    return blocks[0]


def test_readme_example_passes_verbatim(run: Runner) -> None:
    example = readme_example()
    tests = re.findall(r"^async def (test_\w+)", example, re.M)
    assert len(tests) >= 3
    result = run(example, subprocess=True)
    result.assert_outcomes(passed=len(tests))
    # every test of the example ran, none was skipped or deselected
    for name in tests:
        result.stdout.fnmatch_lines([f"PASSED test_inner.py::{name}"])


def test_readme_section_sits_before_testing_and_development() -> None:
    text = README.read_text(encoding="utf-8")
    assert text.index(SECTION) < text.index("## Testing and development")


def test_marker_changes_the_policy(run: Runner) -> None:
    source = CLIENTS + textwrap.dedent("""
        @pytest.mark.asyncio
        async def test_default_refuses_cleartext_login(authgate):
            with pytest.raises(imaplib.IMAP4.error, match="PRIVACYREQUIRED"):
                await asyncio.to_thread(
                    imap_login, authgate["imap"], "alice", authgate.users["alice"]
                )
            assert authgate.backends.imap.logins == []


        @pytest.mark.asyncio
        @pytest.mark.authgate(security="none")
        async def test_none_accepts_cleartext_login(authgate):
            typ = await asyncio.to_thread(
                imap_login, authgate["imap"], "alice", authgate.users["alice"]
            )
            assert typ == "OK"
            assert [r.user for r in authgate.backends.imap.logins] == ["alice"]


        @pytest.mark.authgate(security="none", users={"dave": "dave-pw"})
        class TestClassMarker:
            @pytest.mark.asyncio
            async def test_class_marker_applies(self, authgate):
                assert authgate.users == {"dave": "dave-pw"}
                typ = await asyncio.to_thread(imap_login, authgate["imap"], "dave", "dave-pw")
                assert typ == "OK"

            @pytest.mark.asyncio
            @pytest.mark.authgate(security="require-encrypted")
            async def test_closest_marker_wins(self, authgate):
                # the function's marker replaces the class's: default users again
                assert list(authgate.users) == ["alice"]
                with pytest.raises(imaplib.IMAP4.error):
                    await asyncio.to_thread(
                        imap_login, authgate["imap"], "alice", authgate.users["alice"]
                    )
    """)
    result = run(source)
    result.assert_outcomes(passed=4)


def test_factory_exempt_address_gets_plain_without_tls(run: Runner) -> None:
    source = CLIENTS + textwrap.dedent("""
        MESSAGE = b"Subject: for carol\\r\\n\\r\\nhi carol\\r\\n"
        SEEN = []


        def session(endpoint, source):
            with IMAP(endpoint, source) as client:
                caps = list(client.capabilities)
                if "AUTH=PLAIN" not in caps:
                    return caps, None
                client.authenticate("PLAIN", lambda _: b"\\0carol\\0carol-pw")
                client.select("INBOX")
                _, data = client.fetch("1", "(BODY.PEEK[])")
                return caps, data[0][1]


        @pytest.mark.asyncio
        async def test_exempt_address(authgate_factory):
            stack = await authgate_factory(
                security="require-secure-auth",
                mechanisms=["CRAM-MD5", "PLAIN"],
                exempt=["127.0.0.2/32"],
                users={"carol": "carol-pw"},
                messages={"carol": [MESSAGE]},
            )
            strict = await authgate_factory(exempt=[], users={"carol": "carol-pw"})
            SEEN.extend([stack, strict])

            caps, message = await asyncio.to_thread(session, stack["imap"], "127.0.0.2")
            assert "AUTH=PLAIN" in caps and "LOGINDISABLED" not in caps
            assert "STARTTLS" in caps
            assert message == MESSAGE
            assert stack.backends.imap.logins[-1].user == "carol"

            # the same client from a non-exempt address, or without the exemption
            caps, _ = await asyncio.to_thread(session, stack["imap"], "127.0.0.1")
            assert "AUTH=PLAIN" not in caps and "AUTH=CRAM-MD5" in caps
            caps, _ = await asyncio.to_thread(session, strict["imap"], "127.0.0.2")
            assert "AUTH=PLAIN" not in caps and "LOGINDISABLED" in caps

            # two stacks, distinct ports, one CA for the session
            assert stack["imap"].port != strict["imap"].port
            assert stack.ca_file == strict.ca_file
            assert stack.config_file.parent != strict.config_file.parent


        def test_stacks_were_stopped_at_teardown():
            assert len(SEEN) == 2
            for stack in SEEN:
                for endpoint in stack.endpoints.values():
                    with pytest.raises(ConnectionRefusedError):
                        socket.create_connection((endpoint.host, endpoint.port), timeout=5)
                backend = stack.backends.imap
                with pytest.raises(ConnectionRefusedError):
                    socket.create_connection((backend.host, backend.port), timeout=5)
    """)
    result = run(source)
    result.assert_outcomes(passed=2)


def test_mistakes_fail_early_with_clear_errors(run: Runner) -> None:
    source = CLIENTS + textwrap.dedent("""
        @pytest.mark.asyncio
        @pytest.mark.authgate(mechanisms=["PLAIN", "SHA-NOPE"])
        async def test_bad_mechanism(authgate):
            pass


        @pytest.mark.asyncio
        @pytest.mark.authgate(securty="none")
        async def test_misspelt_keyword(authgate):
            pass


        @pytest.mark.asyncio
        @pytest.mark.authgate(exempt=["10.0.0.0/33"])
        async def test_bad_network(authgate):
            pass


        def test_sync_test(authgate):
            pass


        @pytest.mark.asyncio
        async def test_factory_raises_config_error(authgate_factory):
            with pytest.raises(ConfigError, match="'strict' is not one of none"):
                await authgate_factory(security="strict")
            with pytest.raises(ConfigError, match="'md4' is not a mechanism"):
                await authgate_factory(mechanisms=["md4"])
            with pytest.raises(TypeError, match="list of strings"):
                await authgate_factory(mechanisms="PLAIN")
            with pytest.raises(ValueError, match="'bob', who is not a user"):
                await authgate_factory(users={"alice": "pw"}, messages={"bob": [b"x"]})
    """)
    result = run(source)
    result.assert_outcomes(passed=1, errors=4)
    out = result.stdout.str()
    assert (
        "@pytest.mark.authgate on test_bad_mechanism: policy.mechanisms[1]: "
        "'SHA-NOPE' is not a mechanism (" in out
    )
    assert "@pytest.mark.authgate on test_misspelt_keyword: unknown argument 'securty'" in out
    assert "'10.0.0.0/33' is not a network" in out
    assert "test_sync_test: authgate stacks serve on the asyncio event loop" in out
    # reported as a clean message, not a traceback through the plugin
    assert "During handling of the above exception" not in out
    assert "plugin.py" not in out


def test_wrong_password_is_a_failure_the_test_can_assert(run: Runner) -> None:
    # One failed login per stack: authgate stalls every failed-auth reply
    # (brute-force defence), so each costs seconds.
    source = CLIENTS + textwrap.dedent("""
        def pop3_login(stack, password):
            endpoint = stack["pop3s"]
            client = poplib.POP3_SSL(
                endpoint.host, endpoint.port, context=stack.ssl_context(), timeout=30
            )
            try:
                client.user("alice")
                return client.pass_(password)
            finally:
                client.close()


        def smtp_login(stack, password, context):
            endpoint = stack["submission"]
            # No `with`: QUIT after a refused login may meet a closed session.
            client = smtplib.SMTP(endpoint.host, endpoint.port, timeout=30)
            try:
                client.starttls(context=context)
                return client.login("alice", password)
            finally:
                client.close()


        @pytest.mark.asyncio
        # PLAIN only, so that smtplib makes one attempt, not one per mechanism.
        @pytest.mark.authgate(mechanisms=["PLAIN"])
        async def test_expects_refusal(authgate, authgate_ssl_context):
            with pytest.raises(smtplib.SMTPAuthenticationError) as info:
                await asyncio.to_thread(smtp_login, authgate, "wrong", authgate_ssl_context)
            assert info.value.smtp_code == 535
            assert authgate.backends.smtp.logins == []
            # the right password still works afterwards
            code, _ = await asyncio.to_thread(
                smtp_login, authgate, authgate.users["alice"], authgate_ssl_context
            )
            assert code == 235


        @pytest.mark.asyncio
        async def test_client_with_a_stale_password(authgate):
            await asyncio.to_thread(pop3_login, authgate, "stale-pw")
    """)
    result = run(source)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "E   * poplib.error_proto: b'-ERR [[]AUTH[]] *",
            "FAILED test_inner.py::test_client_with_a_stale_password*",
        ]
    )


def test_without_pytest_asyncio_the_plugin_registers_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # None in sys.modules makes `import pytest_asyncio` raise ImportError.
    monkeypatch.setitem(sys.modules, "pytest_asyncio", None)
    monkeypatch.delitem(sys.modules, "authgate.testing.plugin")
    bare = importlib.import_module("authgate.testing.plugin")
    assert bare.HAVE_PYTEST_ASYNCIO is False
    registered = {name for name in vars(bare) if name.startswith(("pytest_", "authgate"))}
    assert registered == set()
    # what stays importable for annotations and helpers
    assert bare.welcome_message("alice").startswith(b"From: ")
    assert hasattr(bare, "AuthgateFactory")


def test_with_pytest_asyncio_the_plugin_registers_fixtures_and_marker() -> None:
    plugin = importlib.import_module("authgate.testing.plugin")
    assert plugin.HAVE_PYTEST_ASYNCIO is True
    for name in (
        "authgate",
        "authgate_factory",
        "authgate_ssl_context",
        "authgate_certs_dir",
        "pytest_configure",
    ):
        assert callable(getattr(plugin, name)), name


def test_allow_ntlm_legacy_keyword(run: Runner) -> None:
    """Marker and factory take the policy key of that name; a wrong type is
    the config loader's own error."""
    source = CLIENTS + textwrap.dedent("""
        from authgate import config


        def legacy(stack):
            return [x.policy.allow_ntlm_legacy for x in config.load(stack.config_file).listeners]


        @pytest.mark.asyncio
        @pytest.mark.authgate(allow_ntlm_legacy=True)
        async def test_marker_turns_it_on(authgate):
            assert set(legacy(authgate)) == {True}


        @pytest.mark.asyncio
        async def test_off_by_default(authgate_factory):
            assert set(legacy(await authgate_factory())) == {False}
            assert set(legacy(await authgate_factory(allow_ntlm_legacy=True))) == {True}
            with pytest.raises(ConfigError, match="allow_ntlm_legacy: 'yes' is not a boolean"):
                await authgate_factory(allow_ntlm_legacy="yes")
    """)
    result = run(source)
    result.assert_outcomes(passed=2)


def test_managesieve_listener(run: Runner) -> None:
    """The stack's `managesieve` listener (STARTTLS only, as RFC 5804 has
    it) in front of the embedded ManageSieve backend, with sievelib."""
    source = textwrap.dedent("""
        import asyncio

        import pytest
        from sievelib.managesieve import Client

        SCRIPT = 'require "vacation";\\r\\nvacation "away";\\r\\n'


        def upload(endpoint, password, starttls):
            client = Client(endpoint.host, endpoint.port, srvhostname="localhost")
            if not client.connect("alice", password, starttls=starttls, authmech="PLAIN"):
                return None, client.get_sasl_mechanisms()
            assert client.putscript("vacation", SCRIPT)
            assert client.setactive("vacation")
            active, _ = client.listscripts()
            client.logout()
            return active, client.get_sieve_capabilities()


        @pytest.mark.asyncio
        @pytest.mark.filterwarnings("ignore:Credentials are sent over an unencrypted")
        async def test_sieve_script_through_authgate(authgate, monkeypatch):
            monkeypatch.setenv("SSL_CERT_FILE", str(authgate.ca_file))
            endpoint = authgate["managesieve"]
            password = authgate.users["alice"]
            # require-secure-auth: no PLAIN before STARTTLS from 127.0.0.1.
            active, mechanisms = await asyncio.to_thread(upload, endpoint, password, False)
            assert active is None and "PLAIN" not in mechanisms
            active, sieve = await asyncio.to_thread(upload, endpoint, password, True)
            assert active == "vacation"
            assert "vacation" in sieve  # the backend's SIEVE list, in authgate's greeting
            assert [r.user for r in authgate.backends.sieve.logins] == ["alice"]
            stored = authgate.mail_root / "alice" / "sieve" / "vacation.sieve"
            assert stored.read_bytes() == SCRIPT.encode()
    """)
    result = run(source)
    result.assert_outcomes(passed=1)


def test_nntp_listeners_read_the_welcome_message_as_an_article(run: Runner) -> None:
    source = textwrap.dedent("""
        import asyncio
        import socket
        import warnings

        import pytest

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # nntplib: PEP 594
            import nntplib


        class Reader(nntplib.NNTP):
            source = "127.0.0.1"

            def _create_socket(self, timeout):
                return socket.create_connection(
                    (self.host, self.port), timeout, source_address=(self.source, 0)
                )


        def read(endpoint, password, context=None, source="127.0.0.1"):
            Reader.source = source
            if endpoint.tls == "implicit":
                client = nntplib.NNTP_SSL(endpoint.host, endpoint.port, ssl_context=context)
            else:
                client = Reader(endpoint.host, endpoint.port, timeout=10)
            with client:
                if context is not None and endpoint.tls == "starttls":
                    client.starttls(context)
                client.login("alice", password, usenetrc=False)
                _, count, first, _, name = client.group("inbox")
                _, info = client.article(first)
                return name, count, b"\\r\\n".join(info.lines)


        @pytest.mark.asyncio
        async def test_nntp(authgate, authgate_ssl_context):
            password = authgate.users["alice"]
            for name in ("nntp", "nntps"):
                group, count, article = await asyncio.to_thread(
                    read, authgate[name], password, authgate_ssl_context
                )
                assert (group, count) == ("inbox", 1) and b"Subject: Welcome" in article
            login = authgate.backends.nntp.logins[-1]
            assert (login.user, login.authcid, login.mechanism) == ("alice", "authgate", "PLAIN")
            # Cleartext AUTHINFO USER from a non-exempt address: 483, the
            # backend never asked; from the exempt 127.0.0.2 it reads.
            with pytest.raises(nntplib.NNTPTemporaryError, match=r"^483 "):
                await asyncio.to_thread(read, authgate["nntp"], password)
            assert len(authgate.backends.nntp.logins) == 2
            _, _, article = await asyncio.to_thread(
                read, authgate["nntp"], password, None, "127.0.0.2"
            )
            assert b"Subject: Welcome" in article
    """)
    result = run(source)
    result.assert_outcomes(passed=1)
