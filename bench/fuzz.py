"""A bounded, in-process fuzz run of the sans-IO protocol machines.

    python -m bench.fuzz --seconds 60 [--seed N] [--crash-dir DIR]
    python -m bench.fuzz --replay DIR/crash-....json

The corpus is recorded, not written by hand: for every protocol (SMTP, IMAP,
POP3, NNTP, ManageSieve) and SASL mechanism, our client machine logs in to our server machine
(with and without STARTTLS) and we keep the bytes each side sent. A few
hand-written sessions add what our clients never send (IMAP LOGIN with
literals, POP3 USER/PASS, NNTP AUTHINFO USER/PASS and MODE READER, SMTP
server-to-server MAIL, ManageSieve literals and pipelined SASL strings, ...).

Each fuzz input is a recorded session mutated at random (bit flips, bytes
inserted or removed, words replaced, truncation, huge lines, NULs,
non-UTF-8, broken base64, wrong literal sizes, chunks re-cut at random
points, pieces of other sessions spliced in), fed either to a fresh server machine (the client's
bytes) or to a fresh client machine (the backend's bytes). A driver answers
every callback the machine asks for the way the proxy would, but with
random verdicts: lookups get the store's real answer or a random one of the
right type, the backend login succeeds or fails, relay challenges and
results are random.

The machines' own randomness (nonces, NTLM challenges) comes from a fixed
source, so a replayed client response still matches the server's challenge
and mutations reach the late stages of each mechanism.

Counted per input: a *crash* is any exception escaping a machine (or a
broken invariant: an event of the wrong type, a `Send` of 64 KiB or more, a
waiting event that is not the last of its batch, output after `Close`); a
*hang* is an input that takes longer than `--hang-limit` (1 s). The first
input of each distinct crash is saved as JSON to the crash directory;
`--replay` runs one again and prints its traceback.

Pure Python and `random`: no atheris or other fuzzing engine needed.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import hashlib
import itertools
import json
import random
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

import authgate
from authgate.policy import ListenerPolicy, Security, decide
from authgate.policy import Protocol as MailProtocol
from authgate.protocols import ber
from authgate.protocols import ldap as ldap_proto
from authgate.protocols.base import (
    Authenticated,
    BackendFailure,
    ClientEvent,
    ClientMachine,
    ClientSettings,
    Close,
    Event,
    LoggedIn,
    LoginFailed,
    RelayAuth,
    RelayChallenge,
    RelayResponse,
    Send,
    ServerMachine,
    SessionSettings,
    Splice,
    StartTLS,
)
from authgate.protocols.imap import ImapClient, ImapServer
from authgate.protocols.managesieve import ManageSieveClient, ManageSieveServer
from authgate.protocols.nntp import NntpClient, NntpServer
from authgate.protocols.pop3 import Pop3Client, Pop3Server
from authgate.protocols.smtp import SmtpClient, SmtpServer
from authgate.sasl import MECHANISMS, mechanism_info
from authgate.sasl.base import (
    NO_RESPONSE,
    ClientAuthError,
    ClientContext,
    ClientCredentials,
    ClientMechanism,
    Derive,
    InitialResponse,
    Lookup,
    LookupAnswer,
    LookupRequest,
    PasswordCheck,
    SaslProtocolError,
    ScramVerifier,
    SecretForm,
    ServerContext,
    TokenCheck,
    TokenVerdict,
    client_step,
)
from authgate.testing.kit import (
    PASSWORDS,
    SECRET_SIZES,
    InvariantError,
    ServerDriver,
    b64,
    check_client_batch,
    plain,
    resolve,
)

HOST = "mail.example.test"
GATEWAY = "gw.example.test"
CLIENT_IP = "198.51.100.7"
CREDENTIALS = ClientCredentials("alice", PASSWORDS["alice"])
# Stand-in for the tls-server-end-point hash of a certificate (RFC 5929).
BINDING = hashlib.sha256(b"authgate fuzz certificate").digest()
SERVICES = {
    "smtp": "smtp",
    "imap": "imap",
    "pop3": "pop",
    "nntp": "nntp",
    "managesieve": "sieve",
}
POLICY = {
    "smtp": MailProtocol.SMTP,
    "imap": MailProtocol.IMAP,
    "pop3": MailProtocol.POP3,
    "nntp": MailProtocol.NNTP,
    "managesieve": MailProtocol.MANAGESIEVE,
}
ALL_MECHANISMS = tuple(MECHANISMS)
BACKEND_CAPABILITIES = ("IMAP4rev1", "IDLE", "UIDPLUS")

MAX_INPUT = 256 * 1024  # mutated inputs are cut to this size
MAX_CALLBACKS = 200  # driver callbacks per input (relay loops end here)
HANG_LIMIT = 1.0

SERVERS: dict[str, Callable[[SessionSettings], ServerMachine]] = {
    "smtp": SmtpServer,
    "imap": ImapServer,
    "pop3": Pop3Server,
    "nntp": NntpServer,
    "managesieve": ManageSieveServer,
}
CLIENTS: dict[str, Callable[[ClientSettings], ClientMachine]] = {
    "smtp": SmtpClient,
    "imap": ImapClient,
    "pop3": Pop3Client,
    "nntp": NntpClient,
    "managesieve": ManageSieveClient,
}


class Hang(BaseException):
    """Raised by the time guard. A BaseException, so that no `except
    Exception` in the code under test can swallow it."""


# ------------------------------------------------------------------ helpers


def fixed_random(label: str) -> Callable[[int], bytes]:
    """A deterministic stand-in for os.urandom: the same bytes every call, so
    a recorded session replays against a fresh machine."""

    def draw(size: int) -> bytes:
        return hashlib.shake_256(label.encode()).digest(size)

    return draw


def random_answer(request: LookupRequest, rng: random.Random) -> LookupAnswer:
    """A random answer of the type the request asks for (a store that is
    wrong about the user, but not a broken driver)."""
    if isinstance(request, PasswordCheck):
        return rng.random() < 0.5
    if isinstance(request, TokenCheck):  # no scenario has a bearer mechanism yet (_scenarios)
        valid = rng.random() < 0.5
        return TokenVerdict(valid, rng.choice([request.user, "someone-else", None]))
    if rng.random() < 0.2:
        return None
    form = request.form
    if form is SecretForm.PLAINTEXT:
        return "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randrange(12)))
    size = SECRET_SIZES[form]
    if form in (SecretForm.SCRAM_SHA_1, SecretForm.SCRAM_SHA_256):
        key_size = size if rng.random() < 0.8 else rng.choice([0, size - 1, size + 1])
        return ScramVerifier(
            salt=rng.randbytes(rng.choice([0, 1, 16, 64])),
            iterations=rng.choice([0, 1, 4096, 100_000, 2**31 - 1]),
            stored_key=rng.randbytes(key_size),
            server_key=rng.randbytes(key_size),
        )
    return rng.randbytes(size)


# ------------------------------------------------------------- settings


@dataclass(frozen=True)
class Variant:
    """The knobs of one server or client machine besides its input."""

    protocol: str
    mechanisms: tuple[str, ...] = ("PLAIN",)  # client preference / relay mechanism
    starttls: bool = False
    server_mechanisms: tuple[str, ...] = ALL_MECHANISMS
    security: str = Security.NONE.value
    relay: bool = False
    submission: bool = True
    max_line: int = 8192
    max_errors: int = 5
    tls_active: bool = False
    # SMTP client: forward the address with XCLIENT (which then must be
    # offered: only hand-written backends do; our own server does not).
    xclient: bool = False


def server_settings(variant: Variant) -> SessionSettings:
    listener = ListenerPolicy(
        POLICY[variant.protocol], Security(variant.security), variant.server_mechanisms
    )
    plain = ServerContext(
        service=SERVICES[variant.protocol], hostname=HOST, random=fixed_random("server")
    )
    bound = replace(plain, channel_binding=("tls-server-end-point", BINDING))

    def context(tls: bool) -> ServerContext:
        # As the proxy's session decides it: binding data only with -PLUS offered.
        return bound if tls and decide(listener, CLIENT_IP, tls=tls).binds_channel else plain

    return SessionSettings(
        hostname=HOST,
        decide=lambda tls: decide(listener, CLIENT_IP, tls=tls),
        sasl_context=context,
        starttls_available=True,
        tls_active=variant.tls_active,
        relay=variant.relay,
        submission=variant.submission,
        max_line=variant.max_line,
        max_errors=variant.max_errors,
    )


def _client_context(variant: Variant) -> ClientContext:
    plus = any(mechanism_info(m).channel_binding for m in variant.mechanisms if m in MECHANISMS)
    return ClientContext(
        service=SERVICES[variant.protocol],
        hostname=HOST,
        channel_binding=("tls-server-end-point", BINDING) if plus else None,
        random=fixed_random("client"),
    )


def client_settings(variant: Variant) -> ClientSettings:
    return ClientSettings(
        hostname=GATEWAY,
        starttls=variant.starttls,
        mechanisms=variant.mechanisms,
        credentials=None if variant.relay else CREDENTIALS,
        sasl_context=_client_context(variant),
        relay=variant.relay,
        client_address=CLIENT_IP,
        client_port=40001,
        use_id=True,
        use_xclient=variant.xclient,
        max_line=max(variant.max_line, 512),
    )


# --------------------------------------------------------------- corpus


@dataclass
class Recording:
    """One session: what the client sent the server and the other way."""

    variant: Variant
    to_server: list[bytes] = field(default_factory=list)
    to_client: list[bytes] = field(default_factory=list)
    logged_in: bool = False
    hand_written: bool = False


def record(variant: Variant) -> Recording:
    """Run our client machine against our server machine and keep the bytes."""
    server = SERVERS[variant.protocol](server_settings(variant))
    client = CLIENTS[variant.protocol](client_settings(variant))
    rec = Recording(variant)
    queue: collections.deque[tuple[str, Event | ClientEvent]] = collections.deque(
        ("server", e) for e in server.start()
    )
    waiting_tls: set[str] = set()
    spliced = False
    for _ in range(1000):
        if not queue:
            break
        side, event = queue.popleft()
        if side == "server":
            if isinstance(event, Send):
                rec.to_client.append(event.data)
                queue.extend(("client", e) for e in client.receive_data(event.data))
            elif isinstance(event, Lookup):
                queue.extend(("server", e) for e in server.resume(resolve(event.request)))
            elif isinstance(event, Authenticated):
                queue.extend(("server", e) for e in server.backend_ready(BACKEND_CAPABILITIES))
            elif isinstance(event, Splice):
                spliced = True
            elif isinstance(event, Close):
                break
        elif isinstance(event, Send):
            if spliced:
                # Only POP3's client talks after login (CAPA): a backend's answer.
                reply = b"+OK\r\nTOP\r\nUIDL\r\n.\r\n"
                rec.to_client.append(reply)
                queue.extend(("client", e) for e in client.receive_data(reply))
            else:
                rec.to_server.append(event.data)
                queue.extend(("server", e) for e in server.receive_data(event.data))
        elif isinstance(event, Derive):
            queue.extend(("client", e) for e in client.derived(event.compute()))
        elif isinstance(event, LoggedIn):
            rec.logged_in = True
            break
        elif isinstance(event, LoginFailed):
            break
        if isinstance(event, StartTLS):
            waiting_tls.add(side)
            if waiting_tls == {"server", "client"}:
                waiting_tls.clear()
                queue.extend(("server", e) for e in server.tls_started())
                queue.extend(("client", e) for e in client.tls_started())
    return rec


def _scenarios() -> list[Variant]:
    out: list[Variant] = []
    for protocol in SERVERS:
        for name, info in MECHANISMS.items():
            if info.bearer or info.external:
                # Verified by a token verifier or a client certificate, not
                # the kit's store: no recorded login (tests/sasl/test_oauth.py
                # and test_external.py fuzz their parsers).
                continue
            for starttls in (False, True):
                if info.channel_binding and not starttls:
                    continue  # *-PLUS exists only inside TLS
                security = Security.REQUIRE_SECURE_AUTH if starttls else Security.NONE
                out.append(Variant(protocol, (name,), starttls, security=security.value))
    # POP3 USER/PASS: the backend offers no SASL mechanism the client may use.
    out.append(Variant("pop3", ("LOGIN",), server_mechanisms=("CRAM-MD5", "PLAIN")))
    return out


def _hand_written() -> list[Recording]:
    """Sessions our client machines never produce."""
    secret = PASSWORDS["alice"].encode()
    ir = plain("alice", PASSWORDS["alice"])
    user, password = b64("alice"), b64(secret)
    smtp = [
        [b"EHLO client.example\r\n", b"AUTH PLAIN " + ir + b"\r\n"],
        [b"EHLO c\r\nAUTH LOGIN\r\n", user + b"\r\n", password + b"\r\n"],
        [b"EHLO c\r\n", b"AUTH PLAIN =\r\n", b"*\r\n", b"AUTH LOGIN " + user + b"\r\n"],
        [b"HELO c\r\n", b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n"],
        [
            b"EHLO c\r\n",
            b"NOOP\r\nRSET\r\nHELP\r\nVRFY x\r\nEXPN y\r\nRCPT TO:<x>\r\n",
            b"QUIT\r\n",
        ],
        [b"EHLO c\r\n", b"STARTTLS\r\nEHLO injected\r\n", b"EHLO c\r\n", b"AUTH PLAIN\r\n"],
    ]
    imap = [
        [b"a1 CAPABILITY\r\n", b'a2 LOGIN alice "%s"\r\n' % secret],
        [b"a1 LOGIN {5}\r\n", b"alice {%d}\r\n" % len(secret), secret + b"\r\n"],
        [b"a1 LOGIN {5+}\r\nalice {%d+}\r\n%s\r\n" % (len(secret), secret)],
        [
            b'a1 ID ("name" "x" "version" NIL)\r\n',
            b"a2 NOOP\r\n",
            b"a3 AUTHENTICATE PLAIN\r\n",
            ir + b"\r\n",
        ],
        [b"a1 AUTHENTICATE PLAIN " + ir + b"\r\n"],
        [b"a1 AUTHENTICATE LOGIN\r\n", user + b"\r\n", password + b"\r\n"],
        [b"a1 STARTTLS\r\na2 LOGIN x y\r\n", b"a3 CAPABILITY\r\n", b"a4 LOGOUT\r\n"],
        [b"a1 LOGIN {99999999}\r\n", b"a2 LOGIN {20+}\r\n" + b"x" * 20 + b" y\r\n"],
        [b'a1 ID ("name" {3}\r\n', b"abc)\r\n", b"a2 ID NIL\r\n"],
    ]
    pop3 = [
        [b"CAPA\r\n", b"USER alice\r\n", b"PASS " + secret + b"\r\n"],
        [b"AUTH\r\n", b"AUTH PLAIN\r\n", ir + b"\r\n"],
        [b"AUTH PLAIN " + ir + b"\r\n"],
        [
            b"STLS\r\nUSER injected\r\n",
            b"CAPA\r\n",
            b"AUTH LOGIN " + user + b"\r\n",
            password + b"\r\n",
        ],
        [b"STAT\r\nLIST\r\nNOOP\r\n", b"USER alice\r\nPASS " + secret + b"\r\n", b"QUIT\r\n"],
    ]
    nntp = [
        [b"CAPABILITIES\r\n", b"AUTHINFO USER alice\r\n", b"AUTHINFO PASS " + secret + b"\r\n"],
        [b"MODE READER\r\n", b"AUTHINFO SASL PLAIN\r\n", ir + b"\r\n"],
        [b"AUTHINFO SASL PLAIN " + ir + b"\r\n"],
        [b"AUTHINFO SASL LOGIN =\r\n", b"=\r\n", b"*\r\n", b"AUTHINFO PASS x\r\n"],
        [
            b"STARTTLS\r\nAUTHINFO USER injected\r\n",
            b"CAPABILITIES\r\n",
            b"AUTHINFO SASL LOGIN " + user + b"\r\n",
            password + b"\r\n",
        ],
        [b"GROUP local.test\r\nARTICLE 1\r\nHELP\r\n", b"AUTHINFO USER alice\r\n", b"QUIT\r\n"],
    ]
    literal = b"{%d+}\r\n%s" % (len(ir), ir)
    managesieve = [
        [b"CAPABILITY\r\n", b'AUTHENTICATE "PLAIN" "' + ir + b'"\r\n'],
        [b"AUTHENTICATE {5+}\r\nPLAIN " + literal + b"\r\n"],
        [b'AUTHENTICATE "LOGIN"\r\n"' + user + b'"\r\n"' + password + b'"\r\n'],
        [b'AUTHENTICATE "PLAIN"\r\n', literal + b"\r\n"],
        [b'AUTHENTICATE "PLAIN" ""\r\n', b'"*"\r\n', b'NOOP "tag"\r\n'],
        [
            b'STARTTLS\r\nAUTHENTICATE "PLAIN" "' + ir + b'"\r\n',
            b"CAPABILITY\r\n",
            b'AUTHENTICATE "PLAIN" "' + ir + b'"\r\n',
        ],
        [b'LISTSCRIPTS\r\nPUTSCRIPT "s" {4+}\r\nkeep\r\n', b"LOGOUT\r\n"],
        [b"NOOP {99999999+}\r\n", b'AUTHENTICATE "PLAIN" {3}\r\nabc\r\n'],
    ]
    out = [Recording(Variant("smtp"), to_server=s) for s in smtp]
    out += [Recording(Variant("imap"), to_server=s) for s in imap]
    out += [Recording(Variant("pop3"), to_server=s) for s in pop3]
    out += [Recording(Variant("nntp"), to_server=s) for s in nntp]
    out += [Recording(Variant("managesieve"), to_server=s) for s in managesieve]
    # Backend replies our servers never send.
    smtp_xclient = Variant("smtp", ("PLAIN",), xclient=True)
    out.append(
        Recording(
            smtp_xclient,
            to_client=[
                b"220 b ESMTP\r\n",
                b"250-b\r\n250-XCLIENT ADDR PORT LOGIN NAME\r\n250 AUTH=PLAIN LOGIN\r\n",
                b"220 b ESMTP\r\n",
                b"250-b\r\n250 AUTH PLAIN\r\n",
                b"235 2.7.0 ok\r\n",
            ],
        )
    )
    out.append(
        Recording(
            Variant("imap", ("PLAIN",)),
            to_client=[
                b"* OK hi\r\n",
                b"* CAPABILITY IMAP4rev1 AUTH=PLAIN ID\r\na1 OK done\r\n",
                b'* ID ("name" {5}\r\nhello)\r\na2 OK\r\n',
                b"+ \r\n",
                b"a3 OK done\r\n",
                b"* CAPABILITY IMAP4rev1 IDLE\r\na4 OK\r\n",
            ],
        )
    )
    out.append(
        Recording(
            Variant("pop3", ("PLAIN",)),
            to_client=[b"+OK hi\r\n", b"-ERR what\r\n", b"+OK\r\n", b"+OK in\r\n", b"-ERR\r\n"],
        )
    )
    out.append(
        Recording(
            Variant("nntp", ("PLAIN",)),
            to_client=[
                b"200 hi\r\n",
                b"101 caps\r\nVERSION 2\r\nMODE-READER\r\n.\r\n",
                b"201 reader\r\n",
                b"101 caps\r\nVERSION 2\r\nAUTHINFO SASL\r\nSASL PLAIN\r\n..x\r\n.\r\n",
                b"383 =\r\n",
                b"283 =\r\n",
            ],
        )
    )
    out.append(
        Recording(
            Variant("managesieve", ("PLAIN",), starttls=True),
            to_client=[
                b'"IMPLEMENTATION" {7}\r\nDovecot\r\n"SASL" "PLAIN"\r\n"STARTTLS"\r\nOK\r\n',
                b'OK "go"\r\n',
                b'"SIEVE" "fileinto"\r\n"SASL" "PLAIN SCRAM-SHA-1"\r\nOK (X-FOO "a" 1) "tls"\r\n',
                b"{0}\r\n\r\n",
                b'OK (SASL "") "in"\r\n',
            ],
        )
    )
    for rec in out:
        rec.hand_written = True
    return out


@dataclass
class Corpus:
    server: list[Recording]  # sessions with client->server bytes
    client: list[Recording]  # sessions with backend->client bytes
    failed: list[Variant]  # recorded sessions that did not log in (a harness bug)


@functools.cache
def build_corpus() -> Corpus:
    recorded = [record(v) for v in _scenarios()]
    extra = _hand_written()
    sessions = recorded + extra
    return Corpus(
        server=[r for r in sessions if r.to_server],
        client=[r for r in sessions if r.to_client],
        failed=[r.variant for r in recorded if not r.logged_in],
    )


# ------------------------------------------------------------- mutation

_TOKENS = (
    b"\x00",
    b"\xff",
    b"\xc3\x28",  # invalid UTF-8 sequence
    b"\xed\xa0\x80",  # UTF-8 encoded surrogate
    b"\r",
    b"\n",
    b"\r\n",
    b" ",
    b"*",
    b"=",
    b"+",
    b"-",
    b'"',
    b"\\",
    b"(",
    b")",
    b"[",
    b"]",
    b"{0}\r\n",
    b"{1}\r\n",
    b"{5+}\r\n",
    b"{4294967296}\r\n",
    b"{99999999999999999999}\r\n",
    b"AUTH PLAIN\r\n",
    b"AUTHENTICATE SCRAM-SHA-256\r\n",
    b"a9 LOGIN a b\r\n",
    b"STARTTLS\r\n",
    b"STLS\r\n",
    b"EHLO x\r\n",
    b"+OK\r\n",
    b"-ERR [SYS/TEMP] x\r\n",
    b"334 \r\n",
    b"+ \r\n",
    b"235 ok\r\n",
    b"250-",
    b"a1 OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] x\r\n",
)
# Whole words to put in place of a command's verb or argument.
WORDS = (
    b"",
    b"\x00",
    b"a\x00b",
    b"\xff",
    b"\xc3\x28",
    b"\xed\xa0\x80",
    b"caf\xc3\xa9",
    b"=",
    b"*",
    b"+",
    b"{0}",
    b"{5+}",
    b"()",
    b'"',
    b'"\\"',
    b"NIL",
    b"A" * 300,
    b"-1",
    b"99999999999999999999",
    b"\t",
    b"\x7f",
)
_NUMBERS = (b"0", b"1", b"-1", b"00", b"65536", b"4294967296", b"9" * 25, b"1e9")
_BASE64_RUN = re.compile(rb"[A-Za-z0-9+/]{4,}={0,2}")
_DIGITS = re.compile(rb"[0-9]+")


class Mutator:
    """Random, structure-aware-enough mutations of a list of chunks."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    # -- byte level

    def _flip(self, data: bytes) -> bytes:
        if not data:
            return data
        i = self.rng.randrange(len(data))
        return data[:i] + bytes([data[i] ^ (1 << self.rng.randrange(8))]) + data[i + 1 :]

    def _set(self, data: bytes) -> bytes:
        if not data:
            return data
        i = self.rng.randrange(len(data))
        value = self.rng.choice([0, 0x0A, 0x0D, 0x20, 0x7F, 0x80, 0xFF, self.rng.randrange(256)])
        return data[:i] + bytes([value]) + data[i + 1 :]

    def _insert(self, data: bytes) -> bytes:
        i = self.rng.randrange(len(data) + 1)
        token = self.rng.choice(_TOKENS)
        if self.rng.random() < 0.3:
            token = self.rng.randbytes(self.rng.randrange(1, 16))
        return data[:i] + token + data[i:]

    def _delete(self, data: bytes) -> bytes:
        if not data:
            return data
        i = self.rng.randrange(len(data))
        j = min(len(data), i + self.rng.choice([1, 1, 2, 4, 16, len(data)]))
        return data[:i] + data[j:]

    def _duplicate(self, data: bytes) -> bytes:
        if not data:
            return data
        i = self.rng.randrange(len(data))
        j = min(len(data), i + self.rng.randrange(1, 64))
        return data[:j] + data[i:j] * self.rng.choice([1, 2, 10]) + data[j:]

    def _truncate(self, data: bytes) -> bytes:
        return data[: self.rng.randrange(len(data) + 1)]

    def _huge(self, data: bytes) -> bytes:
        # Around the line limits (8192 server, 65536 client, the small
        # variants) and a bit over them.
        size = self.rng.choice([510, 511, 512, 513, 8190, 8191, 8192, 8193, 12300, 65537, 70000])
        i = self.rng.randrange(len(data) + 1)
        return data[:i] + self.rng.choice([b"A", b"=", b"\x00", b" "]) * size + data[i:]

    def _base64(self, data: bytes) -> bytes:
        runs = list(_BASE64_RUN.finditer(data))
        if not runs:
            return self._insert(data)
        run = self.rng.choice(runs)
        i = self.rng.randrange(run.start(), run.end())
        how = self.rng.randrange(4)
        if how == 0:  # an invalid character
            return (
                data[:i]
                + self.rng.choice([b"!", b"-", b"_", b".", b"\x00", b"\xff"])
                + data[i + 1 :]
            )
        if how == 1:  # wrong length / padding
            return data[:i] + data[i + 1 :]
        if how == 2:
            return data[: run.end()] + b"=" + data[run.end() :]
        return data[:i] + b" " + data[i:]  # embedded space

    def _number(self, data: bytes) -> bytes:
        numbers = list(_DIGITS.finditer(data))
        if not numbers:
            return self._insert(data)
        match = self.rng.choice(numbers)
        value = int(match.group()[:30])
        new = self.rng.choice([*_NUMBERS, str(value + 1).encode(), str(max(0, value - 1)).encode()])
        return data[: match.start()] + new + data[match.end() :]

    def _word(self, data: bytes) -> bytes:
        """Replace (or add) one space-separated word of a line."""
        line_end = len(data.rstrip(b"\r\n"))
        words = data[:line_end].split(b" ")
        i = self.rng.randrange(len(words) + 1)
        word = self.rng.choice(WORDS)
        if i == len(words) or self.rng.random() < 0.3:
            words.insert(i, word)
        else:
            words[i] = word
        return b" ".join(words) + data[line_end:]

    def _case(self, data: bytes) -> bytes:
        return data.swapcase() if self.rng.random() < 0.5 else data.lower()

    def _line_ends(self, data: bytes) -> bytes:
        return data.replace(b"\r\n", self.rng.choice([b"\n", b"\r", b"\r\r\n", b"\n\r"]))

    def mutate_bytes(self, data: bytes) -> bytes:
        ops = (
            self._flip,
            self._set,
            self._insert,
            self._insert,
            self._word,
            self._word,
            self._word,
            self._delete,
            self._duplicate,
            self._truncate,
            self._huge,
            self._base64,
            self._base64,
            self._number,
            self._number,
            self._case,
            self._line_ends,
        )
        return self.rng.choice(ops)(data)

    # -- chunk level

    def mutate(self, chunks: list[bytes], donors: Sequence[Sequence[bytes]]) -> list[bytes]:
        chunks = list(chunks) or [b""]
        for _ in range(self.rng.choice([1, 1, 1, 2, 2, 3, 4, 8])):
            chunks = self._mutate_once(chunks, donors) or [b""]
        total, out = 0, []
        for chunk in chunks:
            out.append(chunk[: MAX_INPUT - total])
            total += len(out[-1])
        return out

    def _mutate_once(self, chunks: list[bytes], donors: Sequence[Sequence[bytes]]) -> list[bytes]:
        rng = self.rng
        i = rng.randrange(len(chunks))
        op = rng.randrange(12)
        if op <= 3 or op >= 10:
            chunks[i] = self.mutate_bytes(chunks[i])
        elif op == 4:  # split a chunk (pipelining cut at a random point)
            cut = rng.randrange(len(chunks[i]) + 1)
            chunks[i : i + 1] = [chunks[i][:cut], chunks[i][cut:]]
        elif op == 5 and len(chunks) > 1:  # merge two chunks (pipelined)
            j = min(i + 1, len(chunks) - 1)
            chunks[i : j + 1] = [b"".join(chunks[i : j + 1])]
        elif op == 6:  # re-cut the whole stream
            stream = b"".join(chunks)
            cuts = sorted(rng.randrange(len(stream) + 1) for _ in range(rng.randrange(1, 12)))
            bounds = [0, *cuts, len(stream)]
            chunks = [stream[a:b] for a, b in itertools.pairwise(bounds)]
        elif op == 7:  # drop, duplicate or swap
            how = rng.randrange(3)
            if how == 0:
                del chunks[i]
            elif how == 1:
                chunks.insert(i, chunks[i])
            else:
                j = rng.randrange(len(chunks))
                chunks[i], chunks[j] = chunks[j], chunks[i]
        elif op == 8 and donors:  # splice in a piece of another session
            donor = rng.choice(donors)
            if donor:
                chunks.insert(i, rng.choice(donor))
        else:  # truncate the session
            chunks = chunks[: i + 1]
            chunks[i] = self._truncate(chunks[i])
        return chunks


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True)
class FuzzInput:
    target: str  # "server" or "client"
    variant: Variant
    seed: int  # the driver's random choices
    chunks: tuple[bytes, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "variant": asdict(self.variant),
            "seed": self.seed,
            "chunks": [c.hex() for c in self.chunks],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FuzzInput:
        raw = dict(data["variant"])
        for key in ("mechanisms", "server_mechanisms"):
            raw[key] = tuple(raw[key])
        return cls(
            target=data["target"],
            variant=Variant(**raw),
            seed=int(data["seed"]),
            chunks=tuple(bytes.fromhex(c) for c in data["chunks"]),
        )


def run_server_input(inp: FuzzInput) -> list[Event]:
    """Feed the chunks to a fresh server machine, answering its callbacks
    through the kit's ServerDriver (which checks every batch against the
    driver contract). Returns every event the machine emitted."""
    rng = random.Random(inp.seed)
    machine = SERVERS[inp.variant.protocol](server_settings(inp.variant))
    callbacks = 0
    relay_mech: ClientMechanism | None = None

    def lookup(request: LookupRequest) -> LookupAnswer:
        return resolve(request) if rng.random() < 0.75 else random_answer(request, rng)

    def backend(server: ServerMachine, event: Authenticated) -> list[Event]:
        if rng.random() < 0.6:
            caps = rng.sample(["IMAP4rev1", "IDLE", "a]b", "\r\n", "X" * 100, ""], 3)
            return server.backend_ready(caps)
        return server.backend_failed(rng.choice(list(BackendFailure)))

    def relay(server: ServerMachine, event: RelayAuth | RelayResponse) -> list[Event]:
        nonlocal callbacks, relay_mech
        callbacks += 1
        if isinstance(event, RelayAuth):
            relay_mech = _relay_client(event.mechanism, inp.variant)
        return _relay_verdict(server, rng, relay_mech, callbacks)

    driver = ServerDriver(machine, store=lookup, tls=True, backend=backend, relay=relay)
    for chunk in inp.chunks:
        if driver.finished:
            break
        driver.send(chunk)
    return driver.events


def _relay_client(name: str, variant: Variant) -> ClientMechanism | None:
    """A backend-side stand-in to produce plausible relay challenges."""
    try:
        return mechanism_info(name).client(CREDENTIALS, _client_context(variant))
    except (KeyError, ValueError):
        return None


def _relay_verdict(
    machine: ServerMachine, rng: random.Random, mech: ClientMechanism | None, callbacks: int
) -> list[Event]:
    roll = rng.random()
    if callbacks < MAX_CALLBACKS and roll < 0.45:
        data = rng.randbytes(rng.randrange(64))
        if mech is not None and rng.random() < 0.5:
            # Not a real backend challenge, but bytes of the right shape.
            data = rng.choice([b"", b"r=abc,s=c2FsdA==,i=4096", b'realm="x",nonce="y"', data])
        return machine.relay_challenge(data)
    if roll < 0.7:
        return machine.relay_result(True)
    if roll < 0.75 and isinstance(machine, ImapServer):
        # IMAP lets a driver that knows the backend's capabilities finish
        # a relayed login with backend_ready() instead.
        return machine.backend_ready(["IMAP4rev1", "IDLE"])
    failure = rng.choice([None, *BackendFailure])
    return machine.relay_result(False, failure)


def run_client_input(inp: FuzzInput) -> list[ClientEvent]:
    """Feed backend bytes to a fresh client machine, answering its callbacks.
    Returns every event the machine emitted."""
    rng = random.Random(inp.seed)
    seen: list[ClientEvent] = []
    variant = inp.variant
    client = CLIENTS[variant.protocol](client_settings(variant))
    logged_in = False
    failed = False
    relay_mech: ClientMechanism | None = None

    def drive(events: list[ClientEvent]) -> None:
        nonlocal logged_in, failed
        check_client_batch(events)
        seen.extend(events)
        if any(isinstance(e, LoginFailed) for e in events):
            failed = True  # a RelayChallenge before it is moot
        for event in events:
            if isinstance(event, StartTLS):
                drive(client.tls_started())
            elif isinstance(event, Derive):
                drive(client.derived(event.compute()))
            elif isinstance(event, RelayChallenge) and not failed:
                answer: bytes | None = rng.randbytes(rng.randrange(40))
                if relay_mech is not None and rng.random() < 0.8:
                    try:
                        answer = client_step(relay_mech, event.data)
                    except (ClientAuthError, SaslProtocolError):
                        answer = None
                elif rng.random() < 0.3:
                    answer = None
                drive(client.respond(answer))
            elif isinstance(event, LoggedIn):
                logged_in = True

    if variant.relay:
        name = variant.mechanisms[0]
        initial: InitialResponse = NO_RESPONSE
        if name in MECHANISMS:
            relay_mech = mechanism_info(name).client(CREDENTIALS, _client_context(variant))
            first = relay_mech.start()
            initial = NO_RESPONSE if first is None else first
        drive(client.authenticate(name, initial))
    for chunk in inp.chunks:
        if logged_in:
            break  # the driver splices now
        events = client.receive_data(chunk)
        if failed and events:
            raise InvariantError(f"client events after LoginFailed: {events!r}")
        drive(events)
    return seen


# ------------------------------------------------------------------ LDAP
#
# LDAP is a relay for the whole session (authgate.protocols.ldap), not a
# server machine and a client machine: its target is "ldap". The inputs
# are hand-written sessions (BER built with the one BER module) mutated
# like the others; the driver answers every message it forwards with a
# random backend response (bind results 0, 14, 49, search entries, junk).


def _ldap_simple(msgid: int, dn: bytes, password: bytes) -> bytes:
    body = ber.encode_int(3) + ber.encode(4, dn) + ber.encode(0x80, password)
    return ber.message(msgid, ber.encode(ber.BIND_REQUEST, body))


def _ldap_sasl(msgid: int, mechanism: bytes, credentials: bytes | None = None) -> bytes:
    sasl = ber.encode(4, mechanism) + (b"" if credentials is None else ber.encode(4, credentials))
    body = ber.encode_int(3) + ber.encode(4, b"") + ber.encode(0xA3, sasl)
    return ber.message(msgid, ber.encode(ber.BIND_REQUEST, body))


def _ldap_search(msgid: int) -> bytes:
    return ber.message(msgid, ber.encode(0x63, ber.encode(4, b"dc=example,dc=org")))


def ldap_sessions() -> list[Recording]:
    """Client sessions for the LDAP relay (each chunk one client write)."""
    alice = b"uid=alice,ou=people,dc=example,dc=org"
    password = PASSWORDS["alice"].encode()
    unbind = ber.message(9, ber.encode(ber.UNBIND_REQUEST, b""))
    abandon = ber.message(8, ber.encode(ber.ABANDON_REQUEST, b"\x03"))
    whoami = ber.message(
        7, ber.encode(ber.EXTENDED_REQUEST, ber.encode(0x80, b"1.3.6.1.4.1.4203.1.11.3"))
    )
    sessions = [
        [ber.starttls_request(1), _ldap_simple(2, alice, password), _ldap_search(3), unbind],
        [_ldap_simple(1, b"", b""), _ldap_search(2), _ldap_simple(3, alice, password)],
        [_ldap_sasl(1, b"CRAM-MD5"), _ldap_sasl(2, b"CRAM-MD5", b"alice 0123456789abcdef")],
        [_ldap_sasl(1, b"PLAIN", b"\0alice\0" + password), whoami, unbind],
        [ber.starttls_request(1) + _ldap_simple(2, alice, password), _ldap_search(3)],
        [_ldap_search(1) + _ldap_search(2) + abandon, _ldap_simple(4, alice, b""), whoami],
        [
            _ldap_sasl(1, b"DIGEST-MD5"),
            _ldap_sasl(2, b"SCRAM-SHA-256-PLUS", b"p=tls-unique,,n=a,r=x"),
        ],
    ]
    return [
        Recording(Variant("ldap", security=security.value), to_server=chunks, hand_written=True)
        for chunks in sessions
        for security in Security
    ]


def _ldap_backend_answer(rng: random.Random, data: bytes) -> bytes:
    """A random backend response to the forwarded message `data`."""
    try:
        sent = ber.parse_message(data)
    except ber.BerError:
        return rng.randbytes(rng.randrange(20))
    msgid = sent.message_id if rng.random() < 0.9 else rng.randrange(5)
    roll = rng.random()
    if sent.op == ber.BIND_REQUEST or roll < 0.2:
        code = rng.choice([0, 0, 14, 49, 49, 53, 7])
        answer = ber.response(msgid, ber.BIND_RESPONSE, code)
    elif roll < 0.5:
        entry = ber.message(msgid, ber.encode(ber.SEARCH_RESULT_ENTRY, ber.encode(4, b"uid=a")))
        answer = entry + ber.response(msgid, ber.SEARCH_RESULT_DONE, 0)
    else:
        answer = ber.response(msgid, ber.RESPONSE_TO.get(sent.op, ber.EXTENDED_RESPONSE), 0)
    if rng.random() < 0.1:
        answer = Mutator(rng).mutate_bytes(answer)
    return answer


_LDAP_ACTIONS = (
    ldap_proto.ToClient,
    ldap_proto.ToBackend,
    ldap_proto.Bind,
    ldap_proto.BindRefused,
    ldap_proto.BindDone,
    ldap_proto.ResetBackend,
    StartTLS,
    ldap_proto.Close,
)


def run_ldap_input(inp: FuzzInput) -> list[Any]:
    """Feed the chunks to a fresh LDAP relay, answering every forwarded
    message from a random backend. Invariants: only actions; StartTLS and
    Close end their batch; nothing after Close; a simple bind or PLAIN is
    forwarded without TLS only when the policy allows cleartext."""
    rng = random.Random(inp.seed)
    variant = inp.variant
    policy = ListenerPolicy(
        MailProtocol.LDAP, Security(variant.security), variant.server_mechanisms
    )
    machine = ldap_proto.LdapRelay(
        ldap_proto.LdapSettings(
            decide=lambda tls: decide(policy, "192.0.2.1", tls=tls),
            starttls_available=not variant.tls_active,
            tls_active=variant.tls_active,
            max_errors=variant.max_errors,
        )
    )
    seen: list[Any] = []
    closed = False

    def check(actions: list[Any]) -> None:
        nonlocal closed
        if closed and actions:
            raise InvariantError(f"actions after Close: {actions!r}")
        for i, action in enumerate(actions):
            if not isinstance(action, _LDAP_ACTIONS):
                raise InvariantError(f"not an LDAP action: {action!r}")
            if isinstance(action, StartTLS | ldap_proto.Close) and i != len(actions) - 1:
                raise InvariantError(f"{action!r} is not the last of its batch")
            cleartext = isinstance(action, ldap_proto.Bind) and action.mechanism in (
                "SIMPLE",
                "PLAIN",
            )
            if cleartext and not machine.settings.decide(machine.tls).cleartext_login:
                raise InvariantError(f"cleartext bind forwarded against the policy: {action!r}")
        seen.extend(actions)
        if actions and isinstance(actions[-1], ldap_proto.Close):
            closed = True

    for chunk in inp.chunks:
        if closed:
            break
        queue = [machine.receive_client(chunk)]
        while queue and not closed:
            actions = queue.pop(0)
            check(actions)
            for action in actions:
                if isinstance(action, ldap_proto.Bind) and rng.random() < 0.1:
                    queue.append(machine.bind_refused(action.message_id))
                elif isinstance(action, ldap_proto.ToBackend | ldap_proto.Bind):
                    queue.append(machine.receive_backend(_ldap_backend_answer(rng, action.data)))
                elif isinstance(action, StartTLS):
                    queue.append(machine.tls_started())
    return seen


def run_input(inp: FuzzInput) -> Sequence[Any]:
    if inp.target == "ldap":
        return run_ldap_input(inp)
    if inp.target == "server":
        return run_server_input(inp)
    return run_client_input(inp)


# ----------------------------------------------------------- generation


def make_input(corpus: Corpus, rng: random.Random) -> FuzzInput:
    mutator = Mutator(rng)
    if rng.random() < 0.15:
        return make_ldap_input(mutator, rng)
    target = "server" if rng.random() < 0.6 else "client"
    pool = corpus.server if target == "server" else corpus.client
    # Recorded sessions vary the mechanism, hand-written ones the commands:
    # give the few hand-written ones a fair share.
    hand = [r for r in pool if r.hand_written] if rng.random() < 0.3 else []
    rec = rng.choice(hand or pool)
    chunks = list(rec.to_server if target == "server" else rec.to_client)
    donors = [r.to_server if target == "server" else r.to_client for r in pool]
    roll = rng.random()
    if roll < 0.03:
        chunks = [rng.randbytes(rng.randrange(200)) for _ in range(rng.randrange(1, 6))]
    elif roll > 0.05:  # a few replay the recording as it is
        chunks = mutator.mutate(chunks, donors)
    variant = rec.variant
    knobs: dict[str, Any] = {}
    if target == "server":
        if rng.random() < 0.5:
            knobs["security"] = rng.choice(list(Security)).value
        knobs["relay"] = rng.random() < 0.3
        knobs["submission"] = rng.random() < 0.8
        knobs["tls_active"] = rng.random() < 0.1
        if rng.random() < 0.2:
            knobs["server_mechanisms"] = tuple(rng.sample(ALL_MECHANISMS, rng.randrange(1, 5)))
    else:
        knobs["relay"] = rng.random() < 0.3
        if rng.random() < 0.2:
            knobs["starttls"] = not variant.starttls
    knobs["max_line"] = rng.choice([8192, 8192, 8192, 512])
    knobs["max_errors"] = rng.choice([3, 5, 20])
    return FuzzInput(target, replace(variant, **knobs), rng.getrandbits(32), tuple(chunks))


def make_ldap_input(mutator: Mutator, rng: random.Random) -> FuzzInput:
    pool = LDAP_CORPUS
    rec = rng.choice(pool)
    chunks = list(rec.to_server)
    if rng.random() > 0.05:
        chunks = mutator.mutate(chunks, [r.to_server for r in pool])
    knobs: dict[str, Any] = {
        "tls_active": rng.random() < 0.1,
        "max_errors": rng.choice([3, 5, 20]),
    }
    if rng.random() < 0.3:
        knobs["server_mechanisms"] = tuple(rng.sample(ALL_MECHANISMS, rng.randrange(1, 5)))
    return FuzzInput("ldap", replace(rec.variant, **knobs), rng.getrandbits(32), tuple(chunks))


LDAP_CORPUS = ldap_sessions()


# --------------------------------------------------------------- running


@contextlib.contextmanager
def _alarm_handler() -> Iterator[bool]:
    """Install a SIGALRM handler raising Hang, when this thread can."""
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield False
        return

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise Hang

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        yield True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Outcome:
    kind: str  # "ok", "crash", "hang"
    seconds: float
    error: str = ""
    signature: str = ""


_PACKAGE_DIR = str(Path(authgate.__file__).resolve().parent)


def _signature(exc: BaseException) -> str:
    """Type and innermost authgate/bench frame: one entry per distinct bug."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if f.filename.startswith(_PACKAGE_DIR)] or frames
    where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"
    return f"{type(exc).__name__} at {where}"


def execute(inp: FuzzInput, *, hang_limit: float, alarm: bool) -> Outcome:
    start = time.perf_counter()
    try:
        try:
            if alarm:
                signal.setitimer(signal.ITIMER_REAL, hang_limit)
            run_input(inp)
        finally:
            if alarm:
                signal.setitimer(signal.ITIMER_REAL, 0)
    except Hang:
        return Outcome("hang", time.perf_counter() - start, "exceeded the time limit", "hang")
    except Exception as exc:
        text = "".join(traceback.format_exception(exc))
        return Outcome("crash", time.perf_counter() - start, text, _signature(exc))
    elapsed = time.perf_counter() - start
    if elapsed > hang_limit:
        return Outcome("hang", elapsed, f"took {elapsed:.2f} s", "hang")
    return Outcome("ok", elapsed)


@dataclass
class Stats:
    inputs: int = 0
    crashes: int = 0
    hangs: int = 0
    seconds: float = 0.0
    seed: int = 0
    by_target: collections.Counter[str] = field(default_factory=collections.Counter)
    signatures: collections.Counter[str] = field(default_factory=collections.Counter)
    saved: list[Path] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.inputs / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        return f"{self.inputs} inputs, {self.crashes} crashes, {self.hangs} hangs"


def _save(inp: FuzzInput, outcome: Outcome, key: str, crash_dir: Path) -> Path:
    crash_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    path = crash_dir / f"{outcome.kind}-{digest}.json"
    record_ = inp.to_json() | {"kind": outcome.kind, "signature": outcome.signature}
    record_["error"] = outcome.error
    path.write_text(json.dumps(record_, indent=1))
    return path


def run(
    seconds: float,
    *,
    seed: int | None = None,
    crash_dir: Path = Path("fuzz-crashes"),
    hang_limit: float = HANG_LIMIT,
    max_inputs: int | None = None,
) -> Stats:
    """Fuzz for `seconds` (and at most `max_inputs` inputs)."""
    seed = random.SystemRandom().getrandbits(32) if seed is None else seed
    rng = random.Random(seed)
    corpus = build_corpus()
    stats = Stats(seed=seed)
    begin = time.perf_counter()
    deadline = begin + seconds
    with _alarm_handler() as alarm:
        while time.perf_counter() < deadline:
            if max_inputs is not None and stats.inputs >= max_inputs:
                break
            inp = make_input(corpus, rng)
            outcome = execute(inp, hang_limit=hang_limit, alarm=alarm)
            stats.inputs += 1
            stats.by_target[inp.target] += 1
            if outcome.kind == "ok":
                continue
            if outcome.kind == "crash":
                stats.crashes += 1
            else:
                stats.hangs += 1
            key = f"{inp.target} {inp.variant.protocol}: {outcome.signature}"
            if not stats.signatures[key]:
                stats.saved.append(_save(inp, outcome, key, crash_dir))
            stats.signatures[key] += 1
    stats.seconds = time.perf_counter() - begin
    return stats


def replay(path: Path, hang_limit: float = HANG_LIMIT) -> int:
    inp = FuzzInput.from_json(json.loads(path.read_text()))
    with _alarm_handler() as alarm:
        outcome = execute(inp, hang_limit=hang_limit, alarm=alarm)
    print(f"{inp.target} {inp.variant.protocol}: {outcome.kind} in {outcome.seconds:.3f} s")
    if outcome.error:
        print(outcome.error)
    return 0 if outcome.kind == "ok" else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fuzz", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to run (60)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument("--crash-dir", type=Path, default=Path("fuzz-crashes"))
    parser.add_argument("--hang-limit", type=float, default=HANG_LIMIT, help="seconds (1.0)")
    parser.add_argument("--max-inputs", type=int, default=None)
    parser.add_argument("--replay", type=Path, help="run one saved input and show its error")
    args = parser.parse_args(argv)
    if args.replay is not None:
        return replay(args.replay, args.hang_limit)
    stats = run(
        args.seconds,
        seed=args.seed,
        crash_dir=args.crash_dir,
        hang_limit=args.hang_limit,
        max_inputs=args.max_inputs,
    )
    print(stats.summary())
    targets = ", ".join(f"{n} {t}" for t, n in sorted(stats.by_target.items()))
    print(f"{stats.rate:.0f} inputs/s over {stats.seconds:.1f} s ({targets}), seed {stats.seed}")
    for key, count in stats.signatures.most_common():
        print(f"  {count:6d}  {key}")
    for path in stats.saved:
        print(f"  saved {path}")
    return 1 if stats.crashes or stats.hangs else 0


if __name__ == "__main__":
    sys.exit(main())
