"""authgate in front of the embedded backends, in-process.

One piece with two users: `authgate demo` (fixed ports, the dev CA in
certs/) and the pytest plugin (ephemeral ports, a throw-away CA). The
gateway is configured through a real TOML file and users file, so what runs
here is what an operator's files would run.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import secrets
import ssl
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from authgate import config as config_mod
from authgate.certs import ensure_dev_certificates
from authgate.credentials.store import UserStore, generate_secrets
from authgate.proxy.channel import Channel
from authgate.proxy.server import Gateway
from authgate.runner import start_gateway, verification_pool
from authgate.testing import scenarios
from authgate.testing.backends import Backends, seed_mailbox, start_backends
from authgate.testing.transcripts import RecordingChannel, Transcript

MASTER_USER = "authgate"
ALL_MECHANISMS = ("SCRAM-SHA-256", "CRAM-MD5", "DIGEST-MD5", "NTLM", "LOGIN", "PLAIN")


@dataclass(frozen=True)
class ListenerSpec:
    name: str
    protocol: str  # smtp | imap | pop3 | managesieve | nntp | ldap
    tls: str  # none | starttls | implicit
    port: int = 0  # 0: ephemeral
    # More keys of this [[listeners]] table, TOML lines (client_ca = "...").
    extra: str = ""


# One STARTTLS and one implicit-TLS listener per protocol (ManageSieve: STARTTLS only).
STANDARD_LAYOUT = (
    ListenerSpec("imap", "imap", "starttls"),
    ListenerSpec("imaps", "imap", "implicit"),
    ListenerSpec("pop3", "pop3", "starttls"),
    ListenerSpec("pop3s", "pop3", "implicit"),
    ListenerSpec("submission", "smtp", "starttls"),
    ListenerSpec("smtps", "smtp", "implicit"),
    # RFC 5804 has STARTTLS only.
    ListenerSpec("managesieve", "managesieve", "starttls"),
    ListenerSpec("nntp", "nntp", "starttls"),
    ListenerSpec("nntps", "nntp", "implicit"),
)


# Added when the stack is given a directory (`ldap_backend`): there is no
# embedded LDAP server, so LDAP listeners relay to the caller's.
LDAP_LAYOUT = (
    ListenerSpec("ldap", "ldap", "starttls"),
    ListenerSpec("ldaps", "ldap", "implicit"),
)


@dataclass(frozen=True)
class Endpoint:
    name: str
    protocol: str
    tls: str
    host: str
    port: int


@dataclass
class Stack:
    """A running gateway and its backends."""

    gateway: Gateway
    endpoints: dict[str, Endpoint]
    ca_file: Path
    config_file: Path
    users: dict[str, str]
    mail_root: Path
    backends: Backends
    # One per client connection, in the order they were accepted (recording
    # stacks only: the plugin's).
    transcripts: list[Transcript] = field(default_factory=list)
    scenario: scenarios.Scenario | None = None  # the hostile-server scenario played
    recording: bool = False

    def play(
        self, scenario: str | None, scenario_options: Mapping[str, object] | None = None
    ) -> None:
        """Play another scenario (None: the honest server) on connections
        made from now on, without a new stack. The bad-certificate
        scenarios change the server's certificate and need a stack of their
        own (the factory's `scenario=`); a stack started with one cannot
        switch."""
        chosen = None if scenario is None else scenarios.get("Stack.play", scenario)
        options = scenarios.ScenarioOptions.parse("Stack.play", scenario_options)
        certificate = self.scenario.certificate if self.scenario is not None else None
        if (chosen is not None and chosen.certificate is not None) or certificate is not None:
            raise ValueError(
                "Stack.play: the bad-certificate scenarios need a stack of their own "
                "(authgate_factory(scenario=...))"
            )
        if not self.recording:
            raise ValueError("Stack.play: this stack does not record (record=True)")
        self.scenario = chosen
        self.gateway.channel_factory = recording_factory(self, chosen, options)

    def __getitem__(self, name: str) -> Endpoint:
        return self.endpoints[name]

    def transcripts_of(self, listener: str) -> list[Transcript]:
        """The transcripts of one listener's connections."""
        if listener not in self.endpoints:
            raise KeyError(f"no listener {listener!r} (have: {', '.join(self.endpoints)})")
        return [t for t in self.transcripts if t.listener == listener]

    def last_transcript(self, listener: str | None = None) -> Transcript:
        """The latest connection's transcript (of `listener`, if named)."""
        found = self.transcripts if listener is None else self.transcripts_of(listener)
        if not found:
            raise LookupError(f"no connection was made to {listener or 'the stack'}")
        return found[-1]

    async def settled(self, timeout: float = 5.0) -> bool:
        """Wait (at most `timeout` s in all) until every recorded
        connection has ended, so that a transcript holds the client's last
        bytes; whether they all did."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for transcript in list(self.transcripts):
            if not await transcript.wait_ended(max(0.0, deadline - loop.time())):
                return False
        return True

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts the stack's CA."""
        return ssl.create_default_context(cafile=str(self.ca_file))


def config_text(
    *,
    host: str,
    layout: Sequence[ListenerSpec],
    certs: Path,
    users_file: Path,
    backend_ports: Mapping[str, int],
    master_password: str,
    security: str,
    mechanisms: Sequence[str],
    exempt: Sequence[str],
    extra: str = "",
    allow_ntlm_legacy: bool = False,
    ldap_backend: str | None = None,
) -> str:
    """The TOML an operator would write for this layout; `extra` is appended
    (more top-level tables, e.g. "[limits]\nidle_timeout = 5").
    `ldap_backend` ("host:port"): where LDAP listeners relay to."""

    def q(value: object) -> str:
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'

    def qlist(values: Sequence[str]) -> str:
        return "[" + ", ".join(q(v) for v in values) + "]"

    lines = [
        'hostname = "localhost"',
        "[policy]",
        f"security = {q(security)}",
        f"mechanisms = {qlist(mechanisms)}",
        f"exempt_networks = {qlist(exempt)}",
        f"allow_ntlm_legacy = {'true' if allow_ntlm_legacy else 'false'}",
        "[tls]",
        f"cert = {q(certs / 'server.pem')}",
        f"key = {q(certs / 'server.key')}",
        "[users]",
        f"file = {q(users_file)}",
    ]
    for spec in layout:
        lines += [
            "[[listeners]]",
            f"name = {q(spec.name)}",
            f"protocol = {q(spec.protocol)}",
            f"listen = {q(f'{host}:{spec.port}')}",
            f"tls = {q(spec.tls)}",
            *([spec.extra.strip()] if spec.extra.strip() else []),
            "[listeners.backend]",
        ]
        if spec.protocol == "ldap":
            # Relayed: the directory checks each bind (no master user).
            lines += [f"address = {q(ldap_backend)}", 'mode = "relay"']
            continue
        lines += [
            f"address = {q(f'{host}:{backend_ports[spec.protocol]}')}",
            f"master_user = {q(MASTER_USER)}",
            f"master_password = {q(master_password)}",
        ]
    return "\n".join(lines) + "\n" + extra


@contextlib.asynccontextmanager
async def embedded_stack(
    workdir: Path,
    *,
    users: Mapping[str, str],
    security: str = "require-secure-auth",
    mechanisms: Sequence[str] = ALL_MECHANISMS,
    exempt: Sequence[str] = (),
    layout: Sequence[ListenerSpec] = STANDARD_LAYOUT,
    host: str = "127.0.0.1",
    certs_dir: Path | None = None,
    messages: Mapping[str, Sequence[bytes]] | None = None,
    extra_config: str = "",
    allow_ntlm_legacy: bool = False,
    record: bool = False,
    scenario: str | None = None,
    scenario_options: Mapping[str, object] | None = None,
    ldap_backend: str | None = None,
) -> AsyncIterator[Stack]:
    """Start backends and authgate; stop both on exit. `record`: keep a
    transcript of every client connection (`Stack.transcripts`).
    `ldap_backend` ("host:port" of a directory server, e.g. a test slapd):
    add the `ldap` (StartTLS) and `ldaps` listeners, relaying to it.
    `scenario`: a hostile-server scenario (authgate.testing.scenarios) on
    every listener, recorded."""
    chosen = None if scenario is None else scenarios.get("embedded_stack", scenario)
    if ldap_backend is not None:
        layout = (*layout, *(spec for spec in LDAP_LAYOUT if spec not in layout))
    options = scenarios.ScenarioOptions.parse("embedded_stack", scenario_options)
    workdir.mkdir(parents=True, exist_ok=True)
    if chosen is not None and chosen.certificate is not None:
        # The client is told to trust ca_file; the server shows a bad certificate.
        certs = (workdir / "scenario-certs").resolve()
        _, _, ca_file = await asyncio.to_thread(
            scenarios.write_bad_certificate, chosen.certificate, certs
        )
    else:
        certs = (certs_dir or workdir / "certs").resolve()
        ca_file = ensure_dev_certificates(certs)
    mail_root = workdir / "mail"
    for user in users:
        seed_mailbox(mail_root, user, list((messages or {}).get(user, ())))
    master_password = secrets.token_urlsafe(18)
    backends = await start_backends(
        mail_root, dict(users), master=(MASTER_USER, master_password), host=host
    )
    try:
        store = UserStore(realm="localhost")
        for user, password in users.items():
            secrets_of = await asyncio.to_thread(user_secrets, user, password)
            store.set_user_secrets(user, list(secrets_of))
        users_file = workdir / "users.toml"
        store.save(users_file)
        config_file = workdir / "authgate.toml"
        config_file.write_text(
            config_text(
                host=host,
                layout=layout,
                certs=certs,
                users_file=users_file,
                backend_ports={
                    "imap": backends.imap.port,
                    "pop3": backends.pop3.port,
                    "smtp": backends.smtp.port,
                    "managesieve": backends.sieve.port,
                    "nntp": backends.nntp.port,
                },
                master_password=master_password,
                security=security,
                mechanisms=mechanisms,
                exempt=exempt,
                extra=extra_config,
                allow_ntlm_legacy=allow_ntlm_legacy,
                ldap_backend=ldap_backend,
            )
        )
        config = config_mod.load(config_file)
        # Off the loop, like a reload: loading builds the decoy secrets.
        store = await asyncio.to_thread(UserStore.load, users_file, executor=verification_pool())
        gateway = await start_gateway(config, store)
        try:
            bound = gateway.addresses()
            endpoints = {
                spec.name: Endpoint(spec.name, spec.protocol, spec.tls, *bound[spec.name])
                for spec in layout
            }
            stack = Stack(
                gateway, endpoints, ca_file, config_file, dict(users), mail_root, backends
            )
            stack.scenario = chosen
            if record or chosen is not None:
                gateway.channel_factory = recording_factory(stack, chosen, options)
                stack.recording = True
            yield stack
        finally:
            await gateway.stop(drain=1.0)
    finally:
        await backends.close()


@functools.lru_cache(maxsize=64)
def user_secrets(user: str, password: str) -> tuple[str, ...]:
    """The stored secrets of a test user, made once per process for each
    user and password: an Argon2 hash costs most of a stack's start."""
    return tuple(generate_secrets(user, password, "localhost"))


def recording_factory(
    stack: Stack,
    scenario: scenarios.Scenario | None = None,
    options: scenarios.ScenarioOptions | None = None,
) -> Callable[[str], Channel]:
    """The gateway's channel factory for a recording stack (playing
    `scenario`, when it is one that rewrites the dialogue)."""

    def make(listener: str) -> Channel:
        protocol = stack.endpoints[listener].protocol
        transcript = Transcript(listener, protocol, number=len(stack.transcripts) + 1)
        stack.transcripts.append(transcript)
        if scenario is None or scenario.certificate is not None:
            return RecordingChannel(transcript)
        lens = scenarios.Lens(scenario, protocol, options or scenarios.ScenarioOptions())
        return scenarios.ScenarioChannel(transcript, lens)

    return make
