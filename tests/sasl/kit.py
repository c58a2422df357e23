"""The SASL tests' shared kit: a store made of a dict of passwords that
answers any lookup the way the credential store would, machines built
from their class with default contexts, and a synchronous drive to the
first lookup.

(The protocol tests have their own kit in tests/kit.py; this one is
about mechanisms alone.)
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from functools import cache

from authgate.sasl.base import (
    NO_RESPONSE,
    Challenge,
    ClientMechanism,
    InitialResponse,
    Lookup,
    LookupAnswer,
    LookupRequest,
    PasswordCheck,
    ScramVerifier,
    SecretForm,
    SecretLookup,
    ServerMechanism,
    ServerOutcome,
    client_step,
)
from authgate.sasl.cram_md5 import cram_md5_secret
from authgate.sasl.digest_md5 import digest_ha1
from authgate.sasl.ntlm import nt_hash
from authgate.sasl.scram import make_verifier

Resolver = Callable[[LookupRequest], LookupAnswer]

# The users most tests log in as: an ASCII one and one whose name and
# password need UTF-8 (and, for DIGEST-MD5, the ISO 8859-1 rule).
PASSWORDS = {"alice": "correct horse", "zoë": "pässwörd 密码"}

# A fixed salt keeps SCRAM verifiers cacheable and tests repeatable.
SCRAM_SALT = b"0123456789abcdef"


@cache
def scram_verifier(hash_name: str, password: str) -> ScramVerifier:
    return make_verifier(password, hash_name, salt=SCRAM_SALT)


def secret(form: SecretForm, password: str, authcid: str = "", realm: str = "") -> LookupAnswer:
    """`password` in the stored `form` a SecretLookup asks for."""
    if form is SecretForm.CRAM_MD5:
        return cram_md5_secret(password)
    if form is SecretForm.DIGEST_MD5:
        return digest_ha1(authcid, realm, password)
    if form is SecretForm.NT_HASH:
        return nt_hash(password)
    if form is SecretForm.SCRAM_SHA_1:
        return scram_verifier("sha1", password)
    if form is SecretForm.SCRAM_SHA_256:
        return scram_verifier("sha256", password)
    return password


class _AsTheStore(enum.Enum):
    AS_THE_STORE = "as the store"


def store(
    passwords: dict[str, str] = PASSWORDS,
    *,
    forms: Iterable[SecretForm] | None = None,
    unknown: LookupAnswer | _AsTheStore = _AsTheStore.AS_THE_STORE,
    seen: list[LookupRequest] | None = None,
) -> Resolver:
    """A dict-backed store: a PasswordCheck is answered True or False, a
    SecretLookup with the password in the form asked for (with `forms`
    given, only secret lookups in one of them are expected). An unknown user gets what the credential
    store answers (False to a password check, None to a secret lookup)
    unless `unknown` says otherwise. Each request goes to `seen` if given."""
    allowed = None if forms is None else frozenset(forms)

    def resolve(request: LookupRequest) -> LookupAnswer:
        if seen is not None:
            seen.append(request)
        if allowed is not None:  # a secret lookup, and only in these forms
            assert isinstance(request, SecretLookup), request
            assert request.form in allowed, request.form
        password = passwords.get(request.authcid)
        if password is None and unknown is not _AsTheStore.AS_THE_STORE:
            return unknown
        if isinstance(request, PasswordCheck):
            return password == request.password
        if password is None:
            return None
        return secret(request.form, password, request.authcid, request.realm)

    return resolve


def drive(
    server: ServerMechanism,
    initial: InitialResponse,
    replies: Iterable[bytes],
    answer: LookupAnswer,
) -> ServerOutcome:
    """Feed a server an initial response, then `replies` to its challenges,
    and `answer` to every lookup, until it ends or the replies run out."""
    outcome = server.start(initial)
    pending = iter(replies)
    while True:
        if isinstance(outcome, Lookup):
            outcome = server.resume(answer)
        elif isinstance(outcome, Challenge):
            reply = next(pending, None)
            if reply is None:
                return outcome
            outcome = server.step(reply)
        else:
            return outcome


def to_first_lookup(
    client: ClientMechanism, server: ServerMechanism
) -> tuple[list[bytes], ServerOutcome]:
    """Run a client against a server up to the server's first lookup (or
    its end): the client's messages and the server's outcome then."""
    messages: list[bytes] = []
    first = client.start()
    if first is not None:
        messages.append(first)
    outcome = server.start(NO_RESPONSE if first is None else first)
    while isinstance(outcome, Challenge):
        message = client_step(client, outcome.data)
        messages.append(message)
        outcome = server.step(message)
    return messages, outcome
