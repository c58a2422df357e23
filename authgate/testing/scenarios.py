"""Hostile-server scenarios for the pytest plugin: deliberate misbehaviour
of authgate's server side, while the rest of the stack stays real.

A scenario is chosen per test (`@pytest.mark.authgate(scenario="...")` or
`authgate_factory(scenario=...)`). Most are a *lens* on the client-side
byte stream of every connection: a `Channel` subclass that rewrites what
the real server machine writes (capability lists, the greeting, SASL
challenges), answers some client commands itself (STARTTLS, the login),
delays or drops the connection. The protocol machines are not touched. The
bad-certificate scenarios instead serve a bad certificate (made with
trustme) through the gateway's ordinary TLS settings.

Each scenario says what a safe client must do and where that rule comes
from. The STARTTLS rows follow the "NO STARTTLS" study (Poddebniak,
Ising, Böck, Schinzel: "Why TLS is better without STARTTLS: A Security
Analysis of STARTTLS in the Email Context", USENIX Security 2021, and its
EAST test toolkit), the RFCs named, and RFC 8314
(use implicit TLS; a client configured for TLS never falls back).

The lens works on the pre-authentication dialogue only; after the hand-over
to the backend the splice carries bytes untouched (and still recorded).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime
import re
import secrets
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from authgate.proxy.channel import Channel, Through
from authgate.testing.transcripts import RecordingChannel, Transcript

# Capability token a scenario adds, so a test can tell the fake list from the real.
TAMPERED = "X-AUTHGATE-TAMPERED"
INJECTED = "X-AUTHGATE-INJECTED"
REFERRAL_HOST = "referral.invalid"  # RFC 6761: never resolves
MAX_ANSWERED = 50  # reads in a row the lens may answer itself before closing
ALERT_TEXT = "authgate hostile scenario: this alert text must be shown to the user"


@dataclass(frozen=True)
class ScenarioOptions:
    """Knobs of the scenarios that have one (`scenario_options={...}`)."""

    delay: float = 0.3  # slow-auth: seconds before each answer in the login exchange
    line_bytes: int = 1_100_000  # oversized-line: length of the greeting line

    @classmethod
    def parse(cls, origin: str, options: Mapping[str, object] | None) -> ScenarioOptions:
        if options is None:
            return cls()
        if not isinstance(options, Mapping):
            raise TypeError(f"{origin}: scenario_options must be a mapping")
        known = {f.name: f.type for f in fields(cls)}
        values: dict[str, object] = {}
        for key, value in options.items():
            if key not in known:
                raise ValueError(
                    f"{origin}: scenario_options: unknown option {key!r} "
                    f"(expected: {', '.join(known)})"
                )
            if key == "delay":
                if not isinstance(value, int | float) or isinstance(value, bool):
                    raise TypeError(f"{origin}: scenario_options: delay must be a number")
                if not 0 <= value <= 60:
                    raise ValueError(f"{origin}: scenario_options: delay must be 0 to 60 seconds")
            if key == "line_bytes":
                if not isinstance(value, int) or isinstance(value, bool):
                    raise TypeError(f"{origin}: scenario_options: line_bytes must be an int")
                if not 1 <= value <= 64 * 1024 * 1024:
                    raise ValueError(f"{origin}: scenario_options: line_bytes must be 1 to 64 MiB")
            values[key] = value
        return cls(**values)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Scenario:
    name: str
    misbehaviour: str  # what the server does wrong
    safe_client: str  # what a safe client must do
    reference: str  # the RFC or study behind the rule
    protocols: frozenset[str] = frozenset({"imap", "pop3", "smtp"})
    certificate: str | None = None  # bad-certificate kind


ALL = frozenset({"imap", "pop3", "smtp"})

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "strip-starttls",
            "STARTTLS is not advertised (nor LOGINDISABLED), and a STARTTLS command is "
            "answered as an unknown command: what an attacker on the path does.",
            "A client configured to use TLS stops before sending any credential; it never "
            "falls back to plaintext.",
            "RFC 3207 sections 4.1 and 6, RFC 2595 section 2.2, RFC 8314 (no fallback to "
            "cleartext); NO STARTTLS (USENIX Security 2021): STARTTLS stripping",
        ),
        Scenario(
            "strip-starttls-refused",
            "STARTTLS is advertised but refused with the protocol's temporary error "
            "(IMAP NO [UNAVAILABLE], POP3 -ERR [SYS/TEMP], SMTP 454).",
            "The client stops (it may retry later); it never carries on in plaintext.",
            "RFC 3207 section 4 (454), RFC 5530 UNAVAILABLE, RFC 3206 SYS/TEMP, RFC 8314; "
            "NO STARTTLS: STARTTLS stripping",
        ),
        Scenario(
            "inject-after-starttls",
            "Plaintext responses are appended to the STARTTLS reply in the same segment: a "
            f"fake capability list and a fake tagged OK (IMAP, naming {INJECTED}), a fake "
            "+OK (POP3), a fake 250 EHLO reply (SMTP).",
            "The client throws away whatever it buffered before the handshake (or fails), "
            "and takes no answer from those bytes: it asks again inside TLS.",
            "RFC 3207 section 4.2, RFC 2595 section 3.1, RFC 9051 section 6.2.1; "
            "CVE-2011-0411 (the server side), CVE-2021-22947 (curl); NO STARTTLS: response "
            "injection",
        ),
        Scenario(
            "preauth",
            "The IMAP greeting is * PREAUTH: the connection is already authenticated, so "
            "STARTTLS can no longer be used.",
            "A client that requires TLS closes the connection (it does not use the session "
            "unencrypted).",
            "RFC 9051 sections 7.1.4 and 6.2.1, RFC 8314; NO STARTTLS: the IMAP PREAUTH downgrade",
            protocols=frozenset({"imap"}),
        ),
        Scenario(
            "tamper-capabilities",
            f"Before TLS the capability list is weaker than after: no SASL mechanism, no "
            f"LOGINDISABLED, and a marker {TAMPERED}; inside TLS the real list.",
            "The client forgets the pre-TLS list and asks for capabilities again inside "
            "TLS, and authenticates from that list.",
            "RFC 3207 section 4.2, RFC 2595 sections 3.1 and 4, RFC 9051 section 6.2.1; "
            "NO STARTTLS: capability tampering",
        ),
        Scenario(
            "tamper-capabilities-stale",
            "Inside TLS the capability answer is the stale pre-TLS list (STARTTLS still "
            "offered, cleartext mechanisms missing, IMAP LOGINDISABLED).",
            "The client does not start TLS a second time and does not leave TLS; failing "
            "to log in is safe.",
            "RFC 3207 section 4.2, RFC 9051 section 6.2.1; NO STARTTLS: capability tampering",
        ),
        Scenario(
            "cleartext-only-mechanisms",
            "Before TLS only PLAIN and LOGIN are offered (no LOGINDISABLED), as a downgrade; "
            "STARTTLS stays advertised.",
            "The client sends no password before TLS: it starts TLS first (or refuses).",
            "RFC 4954 section 4, RFC 9051 sections 6.2.2 and 6.2.3, RFC 2595 section 2.2, RFC 8314",
        ),
        Scenario(
            "bad-certificate-expired",
            "The server certificate (from the CA the client trusts) expired yesterday.",
            "The client aborts the handshake and sends nothing more.",
            "RFC 5280 section 4.1.2.5, RFC 8314 section 4.3, RFC 7817",
            certificate="expired",
        ),
        Scenario(
            "bad-certificate-wrong-host",
            "The server certificate (from the trusted CA) names another host, wrong.example.",
            "The client aborts the handshake: the name must match what it connected to.",
            "RFC 6125, RFC 7817 section 3, RFC 8314",
            certificate="wrong-host",
        ),
        Scenario(
            "bad-certificate-unknown-ca",
            "The server certificate names the right host but comes from a CA the client "
            "does not trust.",
            "The client aborts the handshake.",
            "RFC 5280 section 6, RFC 7817, RFC 8314",
            certificate="unknown-ca",
        ),
        Scenario(
            "bad-certificate-self-signed",
            "The server certificate is self-signed for the right host.",
            "The client aborts the handshake (unless the user pinned that certificate).",
            "RFC 5280 section 6, RFC 7817, RFC 8314",
            certificate="self-signed",
        ),
        Scenario(
            "bad-server-proof",
            "The server's proof is wrong: the SCRAM server-final message carries a wrong "
            "v=, the DIGEST-MD5 rspauth is wrong (CRAM-MD5, PLAIN, LOGIN have no proof).",
            "The client fails the authentication (cancels, or drops the connection) and "
            "does not use the session: the server did not prove it knows the secret.",
            "RFC 5802 section 5 and 9 (v=), RFC 2831 section 2.1.3 (rspauth), RFC 4422 section 3.6",
        ),
        Scenario(
            "temporary-failure",
            "Every login attempt is refused as a temporary failure (IMAP NO [UNAVAILABLE], "
            "POP3 -ERR [SYS/TEMP], SMTP 454 4.7.0).",
            "The client reports a temporary error: it does not treat the password as wrong, "
            "and does not retry with a weaker mechanism or without TLS.",
            "RFC 4954 section 6 (454), RFC 5530 UNAVAILABLE, RFC 3206 SYS/TEMP, RFC 2449",
        ),
        Scenario(
            "disconnect-mid-sasl",
            "The server closes the connection without an answer when the client's first "
            "credential-carrying message of the login arrives.",
            "The client reports an error (not a success), does not hang, and does not "
            "resend the credential over a weaker channel.",
            "RFC 4422 section 3 (an exchange ends with an outcome), RFC 8314",
        ),
        Scenario(
            "slow-auth",
            "Every answer in the login exchange is held back `delay` seconds "
            "(scenario_options={'delay': ...}, default 0.3).",
            "The client waits for the answer within its own timeout, and on timing out "
            "reports an error rather than assuming success.",
            "RFC 5321 section 4.5.3.2 (timeouts), RFC 9051 section 5.4 (autologout timer)",
        ),
        Scenario(
            "oversized-line",
            "The greeting is one line of `line_bytes` bytes "
            "(scenario_options={'line_bytes': ...}, default 1,100,000).",
            "The client reads at most a bounded line: it fails cleanly (or accepts a line it "
            "has room for), without growing its memory without end or crashing.",
            "RFC 5321 section 4.5.3.1.5 (512-octet reply lines), RFC 2449 section 4 (512), "
            "RFC 7162 section 4 (IMAP line lengths, 8192 octets)",
        ),
        Scenario(
            "alert-and-referral",
            f"An untagged * OK [ALERT] follows the IMAP greeting, and the login is answered "
            f"NO [REFERRAL imap://user;AUTH=*@{REFERRAL_HOST}/].",
            "The client shows the ALERT text to the user; it does not follow the referral "
            "on its own, and never sends the credentials to the referred host.",
            "RFC 9051 section 7.1 (ALERT MUST be presented), RFC 2221 (login referrals "
            "and their security considerations)",
            protocols=frozenset({"imap"}),
        ),
    )
}


def get(origin: str, name: object) -> Scenario:
    """The scenario called `name`, or a ValueError listing the names."""
    if not isinstance(name, str) or name not in SCENARIOS:
        raise ValueError(
            f"{origin}: scenario {name!r} is not one of: {', '.join(sorted(SCENARIOS))}"
        )
    return SCENARIOS[name]


# ------------------------------------------------------------ capabilities


def _to_tokens(protocol: str, lines: list[str]) -> list[str]:
    """POP3 CAPA lines or SMTP EHLO keyword lines as IMAP-like tokens:
    STARTTLS, AUTH=<mechanism>, and the other lines as they are."""
    out: list[str] = []
    for line in lines:
        word, _, rest = line.partition(" ")
        if protocol == "pop3" and word.upper() == "STLS":
            out.append("STARTTLS")
        elif word.upper() == ("SASL" if protocol == "pop3" else "AUTH"):
            out += [f"AUTH={m}" for m in rest.split()]
        else:
            out.append(line)
    return out


def _from_tokens(protocol: str, tokens: list[str]) -> list[str]:
    lines: list[str] = []
    mechanisms = [t[5:] for t in tokens if t.upper().startswith("AUTH=")]
    placed = False
    for token in tokens:
        if token.upper().startswith("AUTH="):
            if not placed and mechanisms:
                lines.append(("SASL " if protocol == "pop3" else "AUTH ") + " ".join(mechanisms))
                placed = True
        elif token == "STARTTLS" and protocol == "pop3":  # noqa: S105 - a capability
            lines.append("STLS")
        else:
            lines.append(token)
    return lines


Edit = Callable[[list[str]], list[str]]


def weaker(tokens: list[str]) -> list[str]:
    return [t for t in tokens if not t.upper().startswith("AUTH=") and t != "LOGINDISABLED"] + [
        TAMPERED
    ]


def cleartext_only(tokens: list[str]) -> list[str]:
    kept = [t for t in tokens if not t.upper().startswith("AUTH=") and t != "LOGINDISABLED"]
    return [*kept, "AUTH=PLAIN", "AUTH=LOGIN"]


def no_starttls(tokens: list[str]) -> list[str]:
    return [t for t in tokens if t not in ("STARTTLS", "LOGINDISABLED")]


IMAP_CAPS = re.compile(rb"^(\* CAPABILITY )(.*)$|(\[CAPABILITY )([^\]]*)(\])", re.I)


def edit_capabilities(protocol: str, data: bytes, edit: Edit, *, reply_to: str) -> bytes:
    """Apply `edit` to every capability list in `data`, one write of the
    server: IMAP `* CAPABILITY` lines and `[CAPABILITY]` codes anywhere; a
    POP3 CAPA reply or an SMTP EHLO reply when that is what `reply_to` asked."""
    lines = data.split(b"\r\n")
    if protocol == "imap":

        def imap_line(line: bytes) -> bytes:
            def sub(m: re.Match[bytes]) -> bytes:
                if m.group(1) is not None:
                    tokens = m.group(2).decode("ascii", "replace").split()
                    return m.group(1) + " ".join(edit(tokens)).encode()
                tokens = m.group(4).decode("ascii", "replace").split()
                return m.group(3) + " ".join(edit(tokens)).encode() + m.group(5)

            return IMAP_CAPS.sub(sub, line)

        return b"\r\n".join(imap_line(line) for line in lines)
    if protocol == "pop3" and reply_to == "CAPA" and data.startswith(b"+OK"):
        try:
            end = lines.index(b".")
        except ValueError:
            return data
        body = [line.decode("ascii", "replace") for line in lines[1:end]]
        new = [line.encode() for line in _from_tokens("pop3", edit(_to_tokens("pop3", body)))]
        return b"\r\n".join([lines[0], *new, *lines[end:]])
    if protocol == "smtp" and reply_to in ("EHLO", "LHLO") and data.startswith(b"250"):
        replies = [line for line in lines if line]
        if len(replies) < 1 or not all(re.match(rb"^250[- ]", r) for r in replies):
            return data
        first = replies[0][4:]
        keywords = [r[4:].decode("ascii", "replace") for r in replies[1:]]
        kept = _from_tokens("smtp", edit(_to_tokens("smtp", keywords)))
        texts = [first, *(k.encode() for k in kept)]
        out = [b"250-" + t for t in texts[:-1]] + [b"250 " + texts[-1]]
        return b"\r\n".join(out) + b"\r\n"
    return data


# ------------------------------------------------------------------- lens


@dataclass
class Intercept:
    """What the lens makes of client bytes: what the machine gets, what the
    lens answers itself, whether to wait first or close instead."""

    to_machine: bytes = b""
    reply: bytes = b""
    delay: float = 0.0
    close: bool = False


LOGIN_VERBS = {
    "imap": {"AUTHENTICATE", "LOGIN"},
    "pop3": {"AUTH", "PASS", "APOP"},
    "smtp": {"AUTH"},
}
STARTTLS_VERBS = {"imap": "STARTTLS", "pop3": "STLS", "smtp": "STARTTLS"}
CAPABILITY_VERBS = {"imap": {"CAPABILITY"}, "pop3": {"CAPA"}, "smtp": {"EHLO", "LHLO"}}


def next_tag(tag: bytes) -> bytes:
    """The tag a client counting up would use next (A0041 -> A0042)."""
    m = re.match(rb"^(.*?)(\d+)$", tag)
    if m is None:
        return tag + b"1"
    digits = m.group(2)
    return m.group(1) + str(int(digits) + 1).zfill(len(digits)).encode()


@dataclass
class Lens:
    """One connection's misbehaviour: sees the client's lines and the
    server's writes, in the pre-authentication dialogue."""

    scenario: Scenario
    protocol: str
    options: ScenarioOptions = field(default_factory=ScenarioOptions)
    tls: bool = False
    _held: bytes = b""  # an unfinished client line
    command: str = ""  # the verb of the client's last command
    tag: bytes = b""
    sasl: bool = False  # inside a SASL exchange: client lines are responses
    login_started: bool = False
    greeted: bool = False
    starttls_pending: bool = False
    pre_tls_caps: bytes | None = None

    @property
    def active(self) -> bool:
        return self.protocol in self.scenario.protocols and self.scenario.certificate is None

    # -------------------------------------------------------- client side

    def take_held(self) -> bytes:
        held, self._held = self._held, b""
        return held

    def from_client(self, data: bytes) -> Intercept:
        if not self.active:
            return Intercept(to_machine=data)
        data = self._held + data
        *lines, self._held = data.split(b"\n")
        out = Intercept()
        for raw in lines:
            raw += b"\n"
            step = self._client_line(raw)
            out.to_machine += step.to_machine
            out.reply += step.reply
            out.delay = max(out.delay, step.delay)
            if step.close:
                out.close = True
                break
        return out

    def _client_line(self, raw: bytes) -> Intercept:
        line = raw.rstrip(b"\r\n")
        name = self.scenario.name
        if self.sasl:
            # A response in a SASL exchange (or its cancel).
            if name == "disconnect-mid-sasl":
                return Intercept(close=True)
            if name == "slow-auth":
                return Intercept(to_machine=raw, delay=self.options.delay)
            return Intercept(to_machine=raw)
        words = line.split()
        if self.protocol == "imap":
            self.tag = words[0] if words else b""
            words = words[1:]
        verb = words[0].decode("ascii", "replace").upper() if words else ""
        self.command = verb
        if verb == STARTTLS_VERBS[self.protocol] and not self.tls:
            if name == "strip-starttls":
                return Intercept(reply=self._unknown_command())
            if name == "strip-starttls-refused":
                return Intercept(reply=self._temporary("TLS not available"))
            if name == "inject-after-starttls":
                self.starttls_pending = True
        login = verb in LOGIN_VERBS[self.protocol] and (
            verb != "AUTH" or len(words) > 1  # POP3 "AUTH" alone lists mechanisms
        )
        if login:
            self.login_started = True
            carries = len(words) > 2 or verb in ("LOGIN", "PASS", "APOP")
            if name == "temporary-failure":
                return Intercept(reply=self._temporary("temporary authentication failure"))
            if name == "alert-and-referral":
                user = words[1].strip(b'"').decode("ascii", "replace") if verb == "LOGIN" else ""
                who = f"{user};AUTH=*@" if user else ""
                return Intercept(
                    reply=self.tag
                    + f" NO [REFERRAL imap://{who}{REFERRAL_HOST}/] Try another server\r\n".encode()
                )
            if name == "disconnect-mid-sasl" and carries:
                return Intercept(close=True)
            if verb in ("AUTHENTICATE", "AUTH"):
                self.sasl = True
            if name == "slow-auth":
                return Intercept(to_machine=raw, delay=self.options.delay)
        return Intercept(to_machine=raw)

    def _unknown_command(self) -> bytes:
        if self.protocol == "imap":
            return self.tag + b" BAD Unknown command\r\n"
        if self.protocol == "pop3":
            return b"-ERR Unknown command\r\n"
        return b"502 5.5.1 Unknown command\r\n"

    def _temporary(self, text: str) -> bytes:
        if self.protocol == "imap":
            return self.tag + f" NO [UNAVAILABLE] {text[0].upper() + text[1:]}\r\n".encode()
        if self.protocol == "pop3":
            return f"-ERR [SYS/TEMP] {text[0].upper() + text[1:]}\r\n".encode()
        return f"454 4.7.0 {text[0].upper() + text[1:]}\r\n".encode()

    # -------------------------------------------------------- server side

    def to_client(self, data: bytes) -> bytes:
        if not self.active:
            return data
        name = self.scenario.name
        if not self.greeted:
            self.greeted = True
            data = self._greeting(data)
        edit = self._capability_edit()
        if edit is not None:
            data = edit_capabilities(self.protocol, data, edit, reply_to=self.command)
        if name == "tamper-capabilities-stale":
            data = self._stale(data)
        if self.sasl:
            if name == "bad-server-proof":
                data = self._wrong_proof(data)
            if self._ends_exchange(data):
                self.sasl = False
        if self.starttls_pending:
            self.starttls_pending = False
            data += self._injection()
        return data

    def _greeting(self, data: bytes) -> bytes:
        name = self.scenario.name
        if name == "preauth" and data.startswith(b"* OK"):
            return b"* PREAUTH" + data[4:]
        if name == "oversized-line":
            head = {"imap": b"* OK ", "pop3": b"+OK ", "smtp": b"220 "}[self.protocol]
            return head + b"x" * max(0, self.options.line_bytes - len(head) - 2) + b"\r\n"
        if name == "alert-and-referral":
            return data + f"* OK [ALERT] {ALERT_TEXT}\r\n".encode()
        return data

    def _capability_edit(self) -> Edit | None:
        if self.tls:
            return None
        return {
            "strip-starttls": no_starttls,
            "tamper-capabilities": weaker,
            "cleartext-only-mechanisms": cleartext_only,
        }.get(self.scenario.name)

    def _stale(self, data: bytes) -> bytes:
        """Keep the last pre-TLS capability answer; repeat it inside TLS."""
        if self.command not in CAPABILITY_VERBS[self.protocol]:
            return data
        if self.protocol == "imap":
            lines = data.split(b"\r\n")
            caps = [line for line in lines if line.upper().startswith(b"* CAPABILITY ")]
            if not caps:
                return data
            if not self.tls:
                self.pre_tls_caps = caps[0]
                return data
            if self.pre_tls_caps is None:
                return data
            stale = self.pre_tls_caps
            return b"\r\n".join(
                stale if line.upper().startswith(b"* CAPABILITY ") else line for line in lines
            )
        if not self.tls:
            self.pre_tls_caps = data
            return data
        return self.pre_tls_caps if self.pre_tls_caps is not None else data

    def _wrong_proof(self, data: bytes) -> bytes:
        prefix = b"334 " if self.protocol == "smtp" else b"+ "
        lines = data.split(b"\r\n")
        for i, line in enumerate(lines):
            if not line.startswith(prefix):
                continue
            try:
                decoded = base64.b64decode(line[len(prefix) :], validate=True)
            except (binascii.Error, ValueError):
                continue
            if decoded.startswith(b"v="):
                fake = b"v=" + base64.b64encode(secrets.token_bytes(32))
            elif decoded.startswith(b"rspauth="):
                fake = b"rspauth=" + secrets.token_hex(16).encode()
            else:
                continue
            lines[i] = prefix + base64.b64encode(fake)
        return b"\r\n".join(lines)

    def _ends_exchange(self, data: bytes) -> bool:
        """The server's write finishes the SASL exchange (not a challenge)."""
        for line in data.split(b"\r\n"):
            if not line:
                continue
            if self.protocol == "smtp":
                if not line.startswith(b"334"):
                    return True
            elif self.protocol == "pop3":
                if line.startswith((b"+OK", b"-ERR")):
                    return True
            elif self.tag and line.startswith(self.tag + b" "):
                return True
        return False

    def _injection(self) -> bytes:
        if self.protocol == "imap":
            caps = f"IMAP4rev1 AUTH=PLAIN {INJECTED}"
            return (
                f"* CAPABILITY {caps}\r\n".encode()
                + next_tag(self.tag)
                + f" OK [CAPABILITY {caps}] injected before TLS\r\n".encode()
            )
        if self.protocol == "pop3":
            return f"+OK {INJECTED}\r\n".encode()
        return f"250-{INJECTED}\r\n250 AUTH PLAIN\r\n".encode()


class ScenarioChannel(RecordingChannel):
    """A recording client channel that plays a scenario through a `Lens`."""

    def __init__(self, transcript: Transcript, lens: Lens) -> None:
        super().__init__(transcript)
        self.lens = lens
        self._rounds = 0  # reads in a row that gave the machine nothing

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.lens.tls = self._over_tls

    async def read(self, timeout: float | None = None) -> bytes:
        # Bounded: each round waits at most `timeout`, and a round ends with
        # bytes for the machine, the end of the stream, or a close; a client
        # whose lines the lens keeps answering itself is closed after
        # MAX_ANSWERED rounds (the session's own deadline sees only our rounds).
        while True:
            data = await super().read(timeout)
            if not data:
                return data
            self._rounds += 1
            if self._rounds > MAX_ANSWERED:
                self.close()
                return b""
            step = self.lens.from_client(data)
            if step.reply:
                RecordingChannel.write(self, step.reply)
            if step.delay:
                await asyncio.sleep(step.delay)
            if step.close:
                self.close()
                return b""
            if step.to_machine:
                self._rounds = 0
                return step.to_machine

    def write(self, data: bytes) -> None:
        super().write(self.lens.to_client(data))

    def forward_to(
        self,
        sink: Channel,
        *,
        half_close: bool = True,
        through: Through | None = None,
        ended: asyncio.Future[None] | None = None,
    ) -> None:
        # An unfinished line the lens held goes on with the rest.
        held = self.lens.take_held()
        if held:
            self._buf[:0] = held
        super().forward_to(sink, half_close=half_close, through=through, ended=ended)

    async def start_tls(
        self,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        timeout: float = 30.0,
    ) -> int:
        self.lens.tls = True
        held = len(self.lens.take_held())  # plaintext behind STARTTLS: dropped too
        dropped = await super().start_tls(
            context, server_side=server_side, server_hostname=server_hostname, timeout=timeout
        )
        return dropped + held


# ----------------------------------------------------------- certificates


def write_bad_certificate(kind: str, directory: Path) -> tuple[Path, Path, Path]:
    """A server certificate that is wrong in the way `kind` says, and the CA
    the client is told to trust: (cert, key, trusted CA file)."""
    import trustme
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    trusted = trustme.CA(organization_name="authgate scenario CA (trusted)")
    now = datetime.datetime.now(datetime.UTC)
    names = ("localhost", "127.0.0.1", "::1")
    cert_pem: bytes
    key_pem: bytes
    if kind == "expired":
        leaf = trusted.issue_cert(
            *names,
            not_before=now - datetime.timedelta(days=30),
            not_after=now - datetime.timedelta(days=1),
        )
    elif kind == "wrong-host":
        leaf = trusted.issue_cert("wrong.example")
    elif kind == "unknown-ca":
        leaf = trustme.CA(organization_name="authgate scenario CA (unknown)").issue_cert(*names)
    elif kind == "self-signed":
        import ipaddress

        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
        alt: list[x509.GeneralName] = [x509.DNSName("localhost")]
        alt += [x509.IPAddress(ipaddress.ip_address(a)) for a in names[1:]]
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .sign(key, hashes.SHA256())
        )
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        leaf = None
    else:
        raise ValueError(f"unknown certificate kind {kind!r}")
    if leaf is not None:
        cert_pem = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
        key_pem = leaf.private_key_pem.bytes()
    cert_file, key_file, ca_file = (
        directory / "server.pem",
        directory / "server.key",
        directory / "trusted-ca.pem",
    )
    cert_file.write_bytes(cert_pem)
    key_file.write_bytes(key_pem)
    key_file.chmod(0o600)
    ca_file.write_bytes(trusted.cert_pem.bytes())
    return cert_file, key_file, ca_file
