"""pytest plugin: authgate in front of embedded IMAP/POP3/SMTP/ManageSieve backends, per test.

Registered through the ``pytest11`` entry point ``authgate`` (disable with
``-p no:authgate``). Fixtures:

``authgate_factory``
    ``stack = await authgate_factory(security=..., mechanisms=[...], exempt=[...],
    users={...}, messages={...})`` starts a stack on ephemeral 127.0.0.1 ports;
    every stack started is stopped when the test ends.
``authgate``
    A stack with the factory's defaults (require-secure-auth, every mechanism,
    exempt 127.0.0.2/32, user alice with a random password in
    ``stack.users["alice"]``, one welcome message), changed per test with
    ``@pytest.mark.authgate(...)`` (same keywords as the factory).

Every stack records a transcript of each client connection
(``stack.transcripts``, authgate.testing.transcripts); a failing test's
report shows them. ``scenario="..."`` makes the stack's server side
misbehave on purpose (authgate.testing.scenarios: STARTTLS stripping,
response injection, PREAUTH, bad certificates, ...), for testing how a
client copes with a hostile server.
``authgate_ssl_context``
    A client ``ssl.SSLContext`` trusting the stack's CA.
``authgate_identity_provider``
    Session-scoped OAuth 2.0 identity provider on loopback
    (authgate.testing.identity_provider): ``.token("alice")`` is a valid
    bearer token, ``.token("alice", lifetime=-60)`` an expired one, and so
    on. A stack started with ``oauth=True`` verifies its tokens and offers
    OAUTHBEARER and XOAUTH2.
``authgate_client_ca``
    Session-scoped CA for TLS client certificates
    (authgate.testing.client_ca): ``cert, key = authgate_client_ca.issue("alice")``.
    A stack started with ``client_certs=True`` asks every listener's clients
    for one (optional), maps its CN or e-mail to the user and offers EXTERNAL.
``authgate_certs_dir``
    Session-scoped folder holding the throw-away CA and server certificate;
    override it to use your own.

The stack serves on the event loop, which runs only while an async test
awaits: tests must be ``async def`` (marked ``asyncio`` in strict mode) and
run blocking clients (imaplib, poplib, smtplib, sievelib) with ``asyncio.to_thread``.

Importing this module stays light: authgate's proxy and the backends are
imported only when a fixture is used, because the entry point loads the
plugin into every pytest run of an environment where authgate is installed.
Without pytest-asyncio the plugin registers nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import re
import secrets
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pytest

if TYPE_CHECKING:
    import ssl

    from authgate.testing.client_ca import ClientCA
    from authgate.testing.identity_provider import IdentityProvider
    from authgate.testing.stack import Stack

try:
    import pytest_asyncio
except ImportError:  # authgate installed without its [test] extra
    HAVE_PYTEST_ASYNCIO = False
else:
    HAVE_PYTEST_ASYNCIO = True

DEFAULT_USER = "alice"
DEFAULT_SECURITY = "require-secure-auth"
DEFAULT_EXEMPT: tuple[str, ...] = ("127.0.0.2/32",)
HOST = "127.0.0.1"
MARKER = "authgate"
MARKER_KEYWORDS = (
    "security",
    "mechanisms",
    "exempt",
    "users",
    "messages",
    "brute_force_delays",
    "allow_ntlm_legacy",
    "scenario",
    "scenario_options",
    "ldap_backend",
    "oauth",
    "client_certs",
)
MARKER_HELP = (
    "authgate(security='require-secure-auth', mechanisms=[...], exempt=['127.0.0.2/32'], "
    "users={'alice': 'pw'}, messages={'alice': [b'...']}, allow_ntlm_legacy=False, "
    "scenario='strip-starttls', scenario_options={'delay': 0.3}, ldap_backend='127.0.0.1:389'): "
    "settings of the `authgate` fixture's stack for this test (scenario: a hostile-server "
    "scenario, see authgate.testing.scenarios; ldap_backend: a directory the `ldap` and "
    "`ldaps` listeners relay to)"
)


def welcome_message(user: str) -> bytes:
    """The message every user's INBOX holds when no `messages` are given."""
    return (
        b"From: authgate test <postmaster@localhost>\r\n"
        b"To: " + user.encode() + b"@localhost\r\n"
        b"Subject: Welcome\r\n"
        b"Message-ID: <welcome." + user.encode() + b"@authgate.test>\r\n"
        b"\r\n"
        b"Hello " + user.encode() + b", this came through authgate.\r\n"
    )


class AuthgateFactory(Protocol):
    """The type of the `authgate_factory` fixture, for annotating tests."""

    async def __call__(
        self,
        *,
        security: str = DEFAULT_SECURITY,
        mechanisms: Sequence[str] | None = None,
        exempt: Sequence[str] = DEFAULT_EXEMPT,
        users: Mapping[str, str] | None = None,
        messages: Mapping[str, Sequence[bytes]] | None = None,
        brute_force_delays: bool = False,
        allow_ntlm_legacy: bool = False,
        scenario: str | None = None,
        scenario_options: Mapping[str, object] | None = None,
        ldap_backend: str | None = None,
    ) -> Stack: ...


def check_policy(
    origin: str,
    security: str,
    mechanisms: Sequence[str] | None,
    exempt: Sequence[str],
    allow_ntlm_legacy: bool = False,
) -> None:
    """Validate the policy arguments before anything starts, with the config
    loader's own messages (ConfigError), so a typo fails in milliseconds and
    reads like the same mistake in an operator's TOML file."""
    from authgate import config as config_mod

    # A bare string would be iterated letter by letter and give a baffling
    # "'P' is not a mechanism".
    for name, value in (("mechanisms", mechanisms), ("exempt", exempt)):
        if isinstance(value, str | bytes):
            raise TypeError(f"{origin}: {name} must be a list of strings, not {value!r}")
    policy: dict[str, Any] = {
        "security": security,
        "exempt_networks": list(exempt),
        "allow_ntlm_legacy": allow_ntlm_legacy,
    }
    if mechanisms is not None:
        policy["mechanisms"] = list(mechanisms)
    config_mod.from_dict({"policy": policy}, Path(origin))


def check_accounts(
    origin: str, users: Mapping[str, str], messages: Mapping[str, Sequence[bytes]]
) -> None:
    if not isinstance(users, Mapping) or not users:
        raise TypeError(f"{origin}: users must be a non-empty mapping of user name to password")
    for user, password in users.items():
        if not isinstance(user, str) or not user or not isinstance(password, str):
            raise TypeError(f"{origin}: users: {user!r} needs a str name and a str password")
    for user, items in messages.items():
        if user not in users:
            known = ", ".join(map(repr, users))
            raise ValueError(f"{origin}: messages for {user!r}, who is not a user ({known})")
        if isinstance(items, bytes | str) or not all(isinstance(m, bytes) for m in items):
            raise TypeError(f"{origin}: messages[{user!r}] must be a list of bytes messages")


def resolve_settings(
    origin: str,
    *,
    security: str = DEFAULT_SECURITY,
    mechanisms: Sequence[str] | None = None,
    exempt: Sequence[str] = DEFAULT_EXEMPT,
    users: Mapping[str, str] | None = None,
    messages: Mapping[str, Sequence[bytes]] | None = None,
    brute_force_delays: bool = False,
    allow_ntlm_legacy: bool = False,
    scenario: str | None = None,
    scenario_options: Mapping[str, object] | None = None,
    ldap_backend: str | None = None,
    oauth: bool = False,
    client_certs: bool = False,
) -> dict[str, Any]:
    """Check every argument and fill in the defaults: the keyword arguments
    for `embedded_stack` (mechanisms None: every mechanism the stack serves).

    Test stacks answer a failed login at once; `brute_force_delays=True`
    keeps the real defence (a 2 s failure delay, growing per address), for
    testing how a client copes with it. `allow_ntlm_legacy=True` lets an
    NTLMv1 or NTLM2-session-response client in (the config key of that name).
    `scenario` names a hostile-server scenario (authgate.testing.scenarios),
    `scenario_options` its knobs (delay, line_bytes). `oauth=True`: tokens
    of the `authgate_identity_provider` log in (OAUTHBEARER, XOAUTH2);
    `client_certs=True`: certificates of `authgate_client_ca` (EXTERNAL)."""
    for name, value in (("oauth", oauth), ("client_certs", client_certs)):
        if not isinstance(value, bool):
            raise TypeError(f"{origin}: {name} must be True or False, not {value!r}")
    check_policy(origin, security, mechanisms, exempt, allow_ntlm_legacy)
    if scenario is not None or scenario_options is not None:
        from authgate.testing import scenarios

        if scenario is not None:
            scenarios.get(origin, scenario)
        scenarios.ScenarioOptions.parse(origin, scenario_options)
    if users is None:
        users = {DEFAULT_USER: secrets.token_urlsafe(12)}
    if messages is None:
        messages = {user: [welcome_message(user)] for user in users}
    check_accounts(origin, users, messages)
    if ldap_backend is not None:
        from authgate.config import parse_address

        if not isinstance(ldap_backend, str):
            raise TypeError(f"{origin}: ldap_backend must be 'host:port', not {ldap_backend!r}")
        try:
            parse_address(ldap_backend)
        except ValueError as exc:
            raise ValueError(f"{origin}: ldap_backend: {exc}") from None
    return {
        "security": security,
        "mechanisms": mechanisms,
        "exempt": exempt,
        "users": users,
        "messages": messages,
        "extra_config": "" if brute_force_delays else NO_DELAYS,
        "allow_ntlm_legacy": allow_ntlm_legacy,
        "scenario": scenario,
        "scenario_options": scenario_options,
        "ldap_backend": ldap_backend,
        "oauth": oauth,
        "client_certs": client_certs,
    }


NO_DELAYS = "[defence]\nfailure_delay = 0\npenalties = []\n"


def is_async_test(function: Callable[..., object] | None) -> bool | None:
    """Whether the test is a coroutine function (None: cannot tell)."""
    if function is None:
        return None
    # hypothesis wraps the test in a sync function; the async original is inner_test.
    inner = getattr(getattr(function, "hypothesis", None), "inner_test", function)
    return inspect.iscoroutinefunction(inner)


# The stacks a test started, for its report.
STACKS = pytest.StashKey[list["Stack"]]()
# A failing test's report shows at most this many connections (the latest).
REPORT_CONNECTIONS = 20
REPORT_SECTION = "authgate transcripts"


def transcripts_section(stacks: Sequence[Stack]) -> str | None:
    """The report section of a failing test: its stacks' transcripts."""
    from authgate.testing.transcripts import render

    transcripts = [t for stack in stacks for t in stack.transcripts]
    if not transcripts:
        return None
    shown = transcripts[-REPORT_CONNECTIONS:]
    text = render(shown)
    if len(shown) < len(transcripts):
        text = f"(the last {len(shown)} of {len(transcripts)} connections)\n\n" + text
    return text


TRANSCRIPTS_OPTION = "--authgate-transcripts"


def write_artefact(folder: Path, nodeid: str, text: str) -> Path:
    """DIR/<test id, made a file name>.txt, for CI to keep as an artefact."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid).strip("_")[:200] or "test"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.txt"
    path.write_text(text + "\n", encoding="utf-8")
    return path


if HAVE_PYTEST_ASYNCIO:

    def pytest_addoption(parser: pytest.Parser) -> None:
        parser.addoption(
            TRANSCRIPTS_OPTION,
            metavar="DIR",
            default=None,
            help="authgate: also write the transcripts of each failing test to DIR/<test>.txt",
        )

    def pytest_configure(config: pytest.Config) -> None:
        config.addinivalue_line("markers", MARKER_HELP)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        """A failing test's report gets a section with the transcripts of
        every connection its stacks saw (pytest prints it under the failure,
        and --junitxml keeps it in system-out)."""
        report: pytest.TestReport = yield
        if report.when == "call" and report.failed:
            stacks: list[Stack] = item.stash.get(STACKS, [])
            section = transcripts_section(stacks)
            if section is not None:
                report.sections.append((REPORT_SECTION, section))
                folder = item.config.getoption(TRANSCRIPTS_OPTION)
                if folder:
                    write_artefact(Path(folder), item.nodeid, section)
        return report

    @pytest.fixture(scope="session")
    def authgate_certs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
        """The CA and server certificate, made once per session rather than
        per stack: generating keys for every test would add up."""
        from authgate.certs import ensure_dev_certificates

        directory = tmp_path_factory.mktemp("authgate-certs")
        ensure_dev_certificates(directory)
        return directory

    @pytest_asyncio.fixture
    async def authgate_factory(
        request: pytest.FixtureRequest,
        tmp_path_factory: pytest.TempPathFactory,
        authgate_certs_dir: Path,
    ) -> AsyncIterator[AuthgateFactory]:
        """Start authgate stacks; all are stopped when the test ends."""
        if is_async_test(getattr(request, "function", None)) is False:
            # A sync test runs while the loop is stopped: the stack would accept
            # connections and never answer, and the client would hang until
            # its timeout. Say so instead.
            pytest.fail(
                f"{request.node.name}: authgate stacks serve on the asyncio event loop, "
                "which only runs while an async test awaits. Write the test as "
                "`async def` (with @pytest.mark.asyncio in strict mode) and run blocking "
                "clients with `await asyncio.to_thread(...)`.",
                pytrace=False,
            )
        from authgate.testing.stack import ALL_MECHANISMS, STANDARD_LAYOUT, embedded_stack

        # The report hook below prints these stacks' transcripts when the test fails.
        stacks: list[Stack] = []
        request.node.stash[STACKS] = stacks
        async with contextlib.AsyncExitStack() as running:

            async def start(
                *,
                security: str = DEFAULT_SECURITY,
                mechanisms: Sequence[str] | None = None,
                exempt: Sequence[str] = DEFAULT_EXEMPT,
                users: Mapping[str, str] | None = None,
                messages: Mapping[str, Sequence[bytes]] | None = None,
                brute_force_delays: bool = False,
                allow_ntlm_legacy: bool = False,
                scenario: str | None = None,
                scenario_options: Mapping[str, object] | None = None,
                ldap_backend: str | None = None,
                oauth: bool = False,
                client_certs: bool = False,
            ) -> Stack:
                settings = resolve_settings(
                    "authgate_factory",
                    security=security,
                    mechanisms=mechanisms,
                    exempt=exempt,
                    users=users,
                    messages=messages,
                    brute_force_delays=brute_force_delays,
                    allow_ntlm_legacy=allow_ntlm_legacy,
                    scenario=scenario,
                    scenario_options=scenario_options,
                    ldap_backend=ldap_backend,
                    oauth=oauth,
                    client_certs=client_certs,
                )
                extra_mechanisms: list[str] = []
                if settings.pop("oauth"):
                    idp = request.getfixturevalue("authgate_identity_provider")
                    settings["extra_config"] += (
                        f'[oauth]\njwks = "{idp.jwks_url}"\nissuer = "{idp.issuer}"\n'
                        f'audience = "{idp.audience}"\nuser_claim = "email"\n'
                    )
                    extra_mechanisms += ["OAUTHBEARER", "XOAUTH2"]
                if settings.pop("client_certs"):
                    ca = request.getfixturevalue("authgate_client_ca")
                    keys = f'client_ca = "{ca.ca_file}"\nclient_cert_user = "cn"\n'
                    settings["layout"] = tuple(
                        dataclasses.replace(spec, extra=keys) for spec in STANDARD_LAYOUT
                    )
                    extra_mechanisms.append("EXTERNAL")
                if settings["mechanisms"] is None:
                    settings["mechanisms"] = (*extra_mechanisms, *ALL_MECHANISMS)
                workdir = tmp_path_factory.mktemp("authgate")
                stack = await running.enter_async_context(
                    embedded_stack(
                        workdir, host=HOST, certs_dir=authgate_certs_dir, record=True, **settings
                    )
                )
                stacks.append(stack)
                return stack

            yield start

    @pytest_asyncio.fixture
    async def authgate(request: pytest.FixtureRequest, authgate_factory: AuthgateFactory) -> Stack:
        """A running stack: the factory's defaults, or @pytest.mark.authgate(...)."""
        from authgate.config import ConfigError

        marker = request.node.get_closest_marker(MARKER)
        if marker is None:
            return await authgate_factory()
        where = f"@pytest.mark.authgate on {request.node.name}"
        if marker.args:
            pytest.fail(
                f"{where}: takes keyword arguments only ({', '.join(MARKER_KEYWORDS)})",
                pytrace=False,
            )
        unknown = sorted(set(marker.kwargs) - set(MARKER_KEYWORDS))
        if unknown:
            pytest.fail(
                f"{where}: unknown argument {unknown[0]!r} "
                f"(expected: {', '.join(MARKER_KEYWORDS)})",
                pytrace=False,
            )
        # Resolve here, not in the factory, so that a mistake names the marker
        # and reads as a test-definition error rather than a traceback.
        try:
            resolve_settings(where, **marker.kwargs)
        except (ConfigError, TypeError, ValueError) as exc:
            raise pytest.fail.Exception(str(exc), pytrace=False) from None
        return await authgate_factory(**marker.kwargs)

    @pytest.fixture
    def authgate_ssl_context(authgate: Stack) -> ssl.SSLContext:
        """A client TLS context trusting the `authgate` stack's CA."""
        return authgate.ssl_context()

    @pytest.fixture(scope="session")
    def authgate_identity_provider() -> Iterator[IdentityProvider]:
        """An OAuth 2.0 identity provider (JWK set, introspection) on loopback."""
        from authgate.testing.identity_provider import IdentityProvider

        with IdentityProvider(host=HOST) as provider:
            yield provider

    @pytest.fixture(scope="session")
    def authgate_client_ca(tmp_path_factory: pytest.TempPathFactory) -> ClientCA:
        """A CA for TLS client certificates (EXTERNAL)."""
        from authgate.testing.client_ca import ClientCA

        return ClientCA(tmp_path_factory.mktemp("authgate-client-ca"))
