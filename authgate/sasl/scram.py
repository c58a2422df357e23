"""SCRAM-SHA-1 and SCRAM-SHA-256, with and without channel binding.

RFC 5802 (SCRAM, SHA-1), RFC 7677 (SHA-256), RFC 5929 section 4
(`tls-server-end-point` channel binding). One generic server and one
generic client, parameterised by hash and by PLUS-ness; the eight named
classes the registry imports only pick a variant.

Why the protocol state machine is ours and not scramp's `ScramServer` /
`ScramClient`: scramp refuses any authorization identity in the GS2 header
("n,a=alice,...") on both sides, and its server silently upgrades a
non-PLUS exchange to PLUS when the client sends "p=". We need the
authzid (it goes through `check_authzid`) and exact control over the
RFC 5802 section 6 channel-binding rules. The cryptography is four
stdlib calls (PBKDF2, HMAC, hash, XOR); SASLprep comes from scramp, and
scramp's own client and server are the independent implementation our
tests interoperate with.

Stored form: `ScramVerifier` (salt, iterations, StoredKey, ServerKey) as
RFC 5802 section 3 describes; `make_verifier`, `format_dovecot` and
`parse_dovecot` create and (de)serialise it in Dovecot's passdb form.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Final

from scramp.utils import ScramException, saslprep

from authgate.sasl.base import (
    NO_RESPONSE,
    Call,
    Challenge,
    ClientAuthError,
    ClientContext,
    ClientCredentials,
    Derive,
    Failure,
    FailureReason,
    InitialResponse,
    Lookup,
    LookupAnswer,
    SaslProtocolError,
    ScramVerifier,
    SecretForm,
    SecretLookup,
    ServerContext,
    ServerOutcome,
    Stage,
    Success,
    check_authzid,
    invalid,
)

__all__ = [
    "ScramSHA1Client",
    "ScramSHA1PlusClient",
    "ScramSHA1PlusServer",
    "ScramSHA1Server",
    "ScramSHA256Client",
    "ScramSHA256PlusClient",
    "ScramSHA256PlusServer",
    "ScramSHA256Server",
    "format_dovecot",
    "make_verifier",
    "parse_dovecot",
    "tls_server_end_point",
]

# RFC 5802 section 5.1 says the iteration count SHOULD be at least 4096;
# Dovecot uses the same floor and default (AUTH_SCRAM_MIN/DEFAULT_ITERATE_COUNT).
MIN_ITERATIONS: Final = 4096
DEFAULT_ITERATIONS: Final = 4096
# The most PBKDF2 iterations our client spends on a server's say-so (it runs
# in a worker thread, see `Derive`, but a hostile or misconfigured backend
# could still make every login cost seconds of it). Dovecot, Cyrus and
# PostgreSQL default to 4096 and Kafka refuses more than 16384; 100,000 is
# about 60 ms of SHA-1 (measured: 58 ms on this project's test machine).
MAX_CLIENT_ITERATIONS: Final = 100_000
# Dovecot stores the count as a C int.
MAX_STORED_ITERATIONS: Final = 2**31 - 1
SALT_BYTES: Final = 16  # what Dovecot generates
NONCE_BYTES: Final = 18  # 144 bits of entropy, 24 base64 characters, never a ","

_CBIND_NAME = re.compile(r"[A-Za-z0-9.-]+")
_SERVER_ERROR = re.compile(r"[A-Za-z0-9-]{1,64}")


@dataclass(frozen=True)
class _Variant:
    name: str
    hash_name: str  # hashlib name
    digest_size: int
    form: SecretForm
    plus: bool


_SHA1: Final = _Variant("SCRAM-SHA-1", "sha1", 20, SecretForm.SCRAM_SHA_1, False)
_SHA256: Final = _Variant("SCRAM-SHA-256", "sha256", 32, SecretForm.SCRAM_SHA_256, False)
_SHA1_PLUS: Final = _Variant("SCRAM-SHA-1-PLUS", "sha1", 20, SecretForm.SCRAM_SHA_1, True)
_SHA256_PLUS: Final = _Variant("SCRAM-SHA-256-PLUS", "sha256", 32, SecretForm.SCRAM_SHA_256, True)
_BY_HASH: Final = {"sha1": _SHA1, "sha256": _SHA256}
_DOVECOT_SCHEMES: Final = {"SCRAM-SHA-1": _SHA1, "SCRAM-SHA-256": _SHA256}


class _PeerError(Exception):
    """Bad data from the peer; the message is safe to log (never echoes it)."""

    def __init__(self, detail: str, reason: FailureReason = FailureReason.MALFORMED) -> None:
        super().__init__(detail)
        self.detail = detail
        self.reason = reason


# ------------------------------------------------------------ primitives


def _digest(variant: _Variant, data: bytes) -> bytes:
    return hashlib.new(variant.hash_name, data).digest()


def _hmac(variant: _Variant, key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, variant.hash_name).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _prep(text: str, what: str) -> str:
    """SASLprep (RFC 4013) as RFC 5802 section 5.1 asks for names and
    passwords. Raises ValueError naming `what`, never echoing the text."""
    try:
        prepared: str = saslprep(text)
    except ScramException as exc:
        raise ValueError(f"{what} is not allowed by SASLprep") from exc
    if not prepared:
        raise ValueError(f"{what} is empty after SASLprep")
    return prepared


def _keys(variant: _Variant, password: str, salt: bytes, iterations: int) -> tuple[bytes, ...]:
    """(ClientKey, StoredKey, ServerKey) per RFC 5802 section 3."""
    salted = hashlib.pbkdf2_hmac(
        variant.hash_name, _prep(password, "password").encode(), salt, iterations
    )
    client_key = _hmac(variant, salted, b"Client Key")
    return client_key, _digest(variant, client_key), _hmac(variant, salted, b"Server Key")


def _b64decode(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise _PeerError(f"{what} is not valid base64") from exc


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _new_nonce(random: Callable[[int], bytes] | None) -> str:
    # Base64 keeps the nonce within RFC 5802's printable set and free of ",".
    return _b64((random or os.urandom)(NONCE_BYTES))


def _check_nonce(nonce: str, what: str) -> None:
    # printable = %x21-2B / %x2D-7E (RFC 5802 section 7)
    if not nonce or not all("\x21" <= c <= "\x7e" and c != "," for c in nonce):
        raise _PeerError(f"{what} contains characters outside RFC 5802's printable set")


def _decode(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _PeerError(f"{what} is not UTF-8") from exc


def _attributes(text: str, what: str) -> list[tuple[str, str]]:
    """Split `a=v,b=w` into pairs. RFC 5802 section 7: attr-val is one ALPHA,
    "=", and a non-empty value; values never contain "," (saslname escapes it)."""
    pairs = []
    for part in text.split(","):
        if len(part) < 3 or part[1] != "=" or not (part[0].isascii() and part[0].isalpha()):
            raise _PeerError(f"{what} has a malformed attribute")
        pairs.append((part[0], part[2:]))
    return pairs


def _unescape_saslname(value: str, what: str) -> str:
    # RFC 5802 section 5.1: "=" may only appear as "=2C" (",") or "=3D" ("=").
    if re.search(r"=(?!2C|3D)", value):
        raise _PeerError(f"{what} contains a bad '=' escape")
    return value.replace("=2C", ",").replace("=3D", "=")


def _escape_saslname(value: str) -> str:
    return value.replace("=", "=3D").replace(",", "=2C")


# ------------------------------------------------------------ stored verifiers


def make_verifier(
    password: str,
    hash_name: str,
    iterations: int = DEFAULT_ITERATIONS,
    salt: bytes | None = None,
) -> ScramVerifier:
    """Derive what a SCRAM server stores (RFC 5802 section 3) from a password.

    `hash_name` is "sha1" or "sha256". The default of 4096 iterations is the
    RFC's floor and Dovecot's default, so verifiers move between the two;
    raise it for new deployments that need no Dovecot compatibility.
    """
    variant = _BY_HASH.get(hash_name)
    if variant is None:
        raise ValueError("hash_name must be 'sha1' or 'sha256'")
    if not MIN_ITERATIONS <= iterations <= MAX_STORED_ITERATIONS:
        raise ValueError(f"iterations must be between {MIN_ITERATIONS} and {MAX_STORED_ITERATIONS}")
    if salt is None:
        salt = os.urandom(SALT_BYTES)
    elif not salt:
        raise ValueError("salt must not be empty")
    _, stored_key, server_key = _keys(variant, password, salt, iterations)
    return ScramVerifier(salt, iterations, stored_key, server_key)


def _variant_of(verifier: ScramVerifier) -> _Variant:
    for variant in (_SHA1, _SHA256):
        if len(verifier.stored_key) == len(verifier.server_key) == variant.digest_size:
            return variant
    raise ValueError("verifier keys fit neither SHA-1 nor SHA-256")


def format_dovecot(verifier: ScramVerifier, *, scheme_prefix: bool = True) -> str:
    """Dovecot's passdb form: `{SCRAM-SHA-256}iterations,salt,StoredKey,ServerKey`
    with base64 fields (Dovecot's scram_generate). The hash is inferred from
    the key length; `scheme_prefix=False` leaves out the `{...}` part."""
    variant = _variant_of(verifier)
    body = ",".join(
        (
            str(verifier.iterations),
            _b64(verifier.salt),
            _b64(verifier.stored_key),
            _b64(verifier.server_key),
        )
    )
    return f"{{{variant.name}}}{body}" if scheme_prefix else body


def parse_dovecot(text: str, hash_name: str | None = None) -> ScramVerifier:
    """Read Dovecot's form back, with or without its `{SCRAM-SHA-*}` prefix.

    The hash comes from the prefix, else from `hash_name`, else from the key
    length. ValueError messages name the bad field, never its content.
    """
    expected = None if hash_name is None else _BY_HASH.get(hash_name)
    if hash_name is not None and expected is None:
        raise ValueError("hash_name must be 'sha1' or 'sha256'")
    text = text.strip()
    if text.startswith("{"):
        end = text.find("}")
        scheme = _DOVECOT_SCHEMES.get(text[1:end].upper()) if end > 0 else None
        if scheme is None:
            raise ValueError("not a {SCRAM-SHA-1} or {SCRAM-SHA-256} password")
        if expected is not None and scheme is not expected:
            raise ValueError("scheme prefix does not match the requested hash")
        expected, text = scheme, text[end + 1 :]
    fields = text.split(",")
    if len(fields) != 4:
        raise ValueError("SCRAM passdb entry must have four comma-separated fields")
    if not fields[0].isascii() or not fields[0].isdigit():
        raise ValueError("SCRAM iteration count is not a number")
    iterations = int(fields[0])
    if not MIN_ITERATIONS <= iterations <= MAX_STORED_ITERATIONS:
        raise ValueError("SCRAM iteration count is out of range")
    try:
        salt, stored_key, server_key = (
            _b64decode(field, name)
            for field, name in zip(fields[1:], ("salt", "StoredKey", "ServerKey"), strict=True)
        )
    except _PeerError as exc:
        raise ValueError(f"SCRAM {exc.detail}") from None
    if not salt:
        raise ValueError("SCRAM salt is empty")
    verifier = ScramVerifier(salt, iterations, stored_key, server_key)
    variant = _variant_of(verifier)  # key lengths must agree with each other
    if expected is not None and variant is not expected:
        raise ValueError("SCRAM key length does not match the hash")
    return verifier


# ------------------------------------------------------------ channel binding


def tls_server_end_point(cert_der: bytes) -> bytes:
    """RFC 5929 section 4.1: hash the server's DER certificate with the hash
    of its signature algorithm, MD5 and SHA-1 upgraded to SHA-256.
    ValueError when the certificate cannot be read or its signature uses no
    single hash (Ed25519/Ed448): RFC 5929 leaves that case undefined."""
    # Imported here: X.509 parsing costs ~40 ms of import, and only a
    # listener's set-up (and tests) ever reads a certificate.
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import hashes

    try:
        cert = x509.load_der_x509_certificate(cert_der)
        algorithm = cert.signature_hash_algorithm
    except UnsupportedAlgorithm as exc:
        raise ValueError("certificate signature algorithm is not supported") from exc
    if algorithm is None:
        raise ValueError("tls-server-end-point is undefined for signatures without a hash")
    if isinstance(algorithm, hashes.MD5 | hashes.SHA1):
        algorithm = hashes.SHA256()
    digest = hashes.Hash(algorithm)
    digest.update(cert_der)
    return digest.finalize()


# ------------------------------------------------------------ server

# RFC 5802 section 5.1: for an unknown user the server may answer with a
# made-up salt and carry on, failing only at the proof, so a probe cannot
# tell unknown users from wrong passwords. The made-up salt must be the
# same every time a name is asked for (a real user's salt does not change),
# so it cannot come from a per-connection random source; a constant key in
# the source would let anyone recompute it. Hence one random key per
# process: a probe would need a restart in between to see a difference.
_UNKNOWN_USER_KEY: Final = os.urandom(32)


# What a SCRAM server's step expects, in turn.
_CLIENT_FIRST = "client-first-message"
_CLIENT_FINAL = "client-final-message"


class _ScramServer:
    variant: ClassVar[_Variant]
    name: str

    def __init__(
        self,
        ctx: ServerContext,
        *,
        nonce: str | None = None,
        unknown_user_key: bytes | None = None,
    ) -> None:
        """`nonce` fixes our nonce part (RFC test vectors only).
        `unknown_user_key` replaces the per-process key for made-up salts,
        e.g. with a deployment secret that survives restarts."""
        self.name = self.variant.name
        self._ctx = ctx
        self._nonce_part = nonce if nonce is not None else _new_nonce(ctx.random)
        self._unknown_key = unknown_user_key or _UNKNOWN_USER_KEY
        self._stage = Stage(f"{self.name} server")
        self._gs2_header = ""
        self._cbind_data = b""
        self._authcid = ""
        self._authzid: str | None = None
        self._client_first_bare = ""
        self._nonce = ""
        self._server_first = ""
        self._verifier: ScramVerifier | None = None
        self._unknown_user = False

    # -- driver interface

    def start(self, initial: InitialResponse) -> ServerOutcome:
        self._stage.check(Call.START)
        if self.variant.plus and self._ctx.channel_binding is None:
            # PLUS must only be offered on TLS; the driver passed no binding data.
            return self._fail(
                Failure(
                    FailureReason.ENCRYPTION_REQUIRED,
                    f"{self.name} needs TLS channel binding data, and there is none",
                )
            )
        self._stage.expect(Call.STEP, what=_CLIENT_FIRST)
        if initial is NO_RESPONSE:
            return Challenge(b"")
        return self.step(initial)

    def step(self, response: bytes) -> ServerOutcome:
        self._stage.check(Call.STEP)
        if self._stage.awaits(_CLIENT_FIRST):
            return self._guard(self._client_first, response)
        return self._guard(self._client_final, response)

    def resume(self, answer: LookupAnswer) -> ServerOutcome:
        self._stage.check(Call.RESUME)
        if answer is None:
            self._unknown_user = True
            answer = self._made_up_verifier()
        elif not isinstance(answer, ScramVerifier):
            raise SaslProtocolError(f"{self.name} resumed with {type(answer).__name__}")
        elif not (
            len(answer.stored_key) == len(answer.server_key) == self.variant.digest_size
            and answer.salt
            and answer.iterations >= 1
        ):
            return self._fail(
                Failure(FailureReason.TEMPORARY, f"stored verifier does not fit {self.name}")
            )
        self._verifier = answer
        self._server_first = f"r={self._nonce},s={_b64(answer.salt)},i={answer.iterations}"
        self._stage.expect(Call.STEP, what=_CLIENT_FINAL)
        return Challenge(self._server_first.encode("ascii"))

    # -- internals

    def _fail(self, failure: Failure) -> Failure:
        self._stage.end()
        return failure

    def _guard(self, handler: Callable[[bytes], ServerOutcome], data: bytes) -> ServerOutcome:
        try:
            outcome = handler(data)
        except _PeerError as exc:
            return self._fail(Failure(exc.reason, exc.detail))
        if isinstance(outcome, Success | Failure):
            self._stage.end()
        return outcome

    def _client_first(self, data: bytes) -> ServerOutcome:
        text = _decode(data, "client-first-message")
        parts = text.split(",", 2)
        if len(parts) != 3:
            raise _PeerError("client-first-message lacks a GS2 header")
        flag, authzid, bare = parts
        self._check_cbind_flag(flag)
        if authzid:
            if not authzid.startswith("a=") or len(authzid) < 3:
                raise _PeerError("GS2 authzid is malformed")
            self._authzid = _unescape_saslname(authzid[2:], "authzid")
        self._gs2_header = f"{flag},{authzid},"

        attrs = _attributes(bare, "client-first-message")
        if attrs[0][0] == "m":
            # RFC 5802 section 5.1: a mandatory extension we do not know.
            raise _PeerError("mandatory SCRAM extension is not supported")
        if len(attrs) < 2 or attrs[0][0] != "n" or attrs[1][0] != "r":
            raise _PeerError("client-first-message must start with n= and r=")
        try:
            self._authcid = _prep(_unescape_saslname(attrs[0][1], "username"), "username")
        except ValueError as exc:
            raise _PeerError(str(exc)) from None
        _check_nonce(attrs[1][1], "client nonce")
        self._nonce = attrs[1][1] + self._nonce_part
        self._client_first_bare = bare
        self._stage.expect(Call.RESUME, what="the SCRAM verifier")
        return Lookup(SecretLookup(self._authcid, self.variant.form))

    def _check_cbind_flag(self, flag: str) -> None:
        binding = self._ctx.channel_binding
        if self.variant.plus:
            assert binding is not None  # checked in start()
            if not flag.startswith("p="):
                raise _PeerError(f"{self.name} requires the channel binding flag 'p='")
            if flag[2:] != binding[0]:
                raise _PeerError("unsupported channel binding type")
            self._cbind_data = binding[1]
        elif flag.startswith("p="):
            # The client wants channel binding but chose a non-PLUS mechanism.
            raise _PeerError(f"channel binding flag 'p=' is not valid with {self.name}")
        elif flag == "y":
            # RFC 5802 section 6: "y" means the client can bind but believes
            # we cannot; we can, so someone stripped the PLUS mechanisms
            # from our advertisement.
            if binding is not None:
                raise _PeerError(
                    "channel binding downgrade: client sent 'y' but the server supports PLUS",
                    FailureReason.INVALID_CREDENTIALS,
                )
        elif flag != "n":
            raise _PeerError("GS2 channel binding flag must be 'n', 'y' or 'p='")

    def _client_final(self, data: bytes) -> ServerOutcome:
        text = _decode(data, "client-final-message")
        attrs = _attributes(text, "client-final-message")
        if len(attrs) < 3 or attrs[0][0] != "c" or attrs[1][0] != "r" or attrs[-1][0] != "p":
            raise _PeerError("client-final-message must be c=, r=, ..., p=")
        cbind_input = _b64decode(attrs[0][1], "channel binding")
        header = self._gs2_header.encode()
        if cbind_input[: len(header)] != header:
            raise _PeerError("channel binding header differs from the GS2 header")
        expected_cb = self._cbind_data
        received_cb = cbind_input[len(header) :]
        if len(received_cb) != len(expected_cb) or not hmac.compare_digest(
            received_cb, expected_cb
        ):
            raise _PeerError(
                "channel binding data does not match", FailureReason.INVALID_CREDENTIALS
            )
        if attrs[1][1] != self._nonce:
            raise _PeerError("nonce does not match the server-first-message")
        proof = _b64decode(attrs[-1][1], "client proof")
        if len(proof) != self.variant.digest_size:
            raise _PeerError("client proof has the wrong length")

        verifier = self._verifier
        assert verifier is not None  # set before client-final is awaited
        without_proof = text[: len(text) - len(attrs[-1][1]) - 3]  # drop ",p=..."
        auth_message = ",".join((self._client_first_bare, self._server_first, without_proof))
        auth_bytes = auth_message.encode()
        # RFC 5802 section 3: ClientKey = proof XOR HMAC(StoredKey, AuthMessage);
        # the proof holds iff H(ClientKey) == StoredKey.
        client_key = _xor(proof, _hmac(self.variant, verifier.stored_key, auth_bytes))
        matches = hmac.compare_digest(_digest(self.variant, client_key), verifier.stored_key)
        if not matches or self._unknown_user:
            return invalid()
        signature = _hmac(self.variant, verifier.server_key, auth_bytes)
        return check_authzid(
            Success(
                self._authcid,
                self._authzid,
                additional=f"v={_b64(signature)}".encode("ascii"),
            )
        )

    def _made_up_verifier(self) -> ScramVerifier:
        def derive(label: str) -> bytes:
            msg = f"{label}\0{self.variant.hash_name}\0{self._authcid}".encode()
            return hmac.new(self._unknown_key, msg, "sha256").digest()

        size = self.variant.digest_size
        return ScramVerifier(
            salt=derive("salt")[:SALT_BYTES],
            iterations=DEFAULT_ITERATIONS,
            stored_key=derive("stored")[:size],
            server_key=derive("server")[:size],
        )


class ScramSHA1Server(_ScramServer):
    variant = _SHA1


class ScramSHA256Server(_ScramServer):
    variant = _SHA256


class ScramSHA1PlusServer(_ScramServer):
    variant = _SHA1_PLUS


class ScramSHA256PlusServer(_ScramServer):
    variant = _SHA256_PLUS


# ------------------------------------------------------------ client


# What a SCRAM client expects, in turn.
_SERVER_FIRST = "server-first-message"
_SERVER_FINAL = "server-final-message, as a challenge or with the success"
_VERIFIED = "the success (server-final checked)"


class _ScramClient:
    variant: ClassVar[_Variant]
    name: str

    def __init__(
        self, creds: ClientCredentials, ctx: ClientContext, *, nonce: str | None = None
    ) -> None:
        """`nonce` fixes our nonce (RFC test vectors only)."""
        self.name = self.variant.name
        self._creds = creds
        self._ctx = ctx
        self._cnonce = nonce if nonce is not None else _new_nonce(ctx.random)
        self._stage = Stage(f"{self.name} client")
        self._gs2_header = ""
        self._cbind_data = b""
        self._client_first_bare = ""
        self._server_first_text = ""
        self._nonce = ""
        self._server_final = b""
        self._server_signature = b""

    def start(self) -> bytes:
        self._stage.check(Call.START)
        self._stage.end()  # until everything below succeeded
        binding = self._ctx.channel_binding
        if self.variant.plus:
            if binding is None:
                raise ClientAuthError(f"{self.name} needs TLS channel binding data")
            if not _CBIND_NAME.fullmatch(binding[0]):
                raise ClientAuthError("channel binding type name is malformed")
            flag, self._cbind_data = f"p={binding[0]}", binding[1]
        else:
            # RFC 5802 section 6: "y" tells a server that does support binding
            # that the PLUS variants were stripped from its advertisement.
            flag = "n" if binding is None else "y"
        authzid = f"a={_escape_saslname(self._creds.authzid)}" if self._creds.authzid else ""
        try:
            username = _prep(self._creds.username, "username")
        except ValueError as exc:
            raise ClientAuthError(str(exc)) from None
        self._gs2_header = f"{flag},{authzid},"
        self._client_first_bare = f"n={_escape_saslname(username)},r={self._cnonce}"
        self._stage.expect(Call.STEP, Call.FINISH, what=_SERVER_FIRST)
        return (self._gs2_header + self._client_first_bare).encode()

    def step(self, challenge: bytes) -> bytes | Derive:
        """server-first: a `Derive` (SaltedPassword is PBKDF2 at the
        server's count), whose `finish` makes client-final; server-final
        sent as a challenge: checked, answered with nothing."""
        self._stage.check(Call.STEP)
        first = self._stage.awaits(_SERVER_FIRST)
        self._stage.end()  # until the message checked out
        try:
            reply = self._server_first(challenge) if first else self._verify_server_final(challenge)
        except _PeerError as exc:
            raise ClientAuthError(exc.detail) from None
        if first:
            self._stage.expect(Call.DERIVED, what="SaltedPassword")
        else:
            self._stage.expect(Call.FINISH, what=_VERIFIED)
        return reply

    def finish(self, additional: bytes | None) -> None:
        self._stage.check(Call.FINISH)
        final_due, verified = self._stage.awaits(_SERVER_FINAL), self._stage.awaits(_VERIFIED)
        self._stage.end()
        if final_due and additional is not None:
            try:
                self._verify_server_final(additional)
            except _PeerError as exc:
                raise ClientAuthError(exc.detail) from None
        elif verified and additional is not None:
            # Already checked as a challenge; the same data again is harmless,
            # anything else is the server contradicting itself.
            if not hmac.compare_digest(additional, self._server_final):
                raise ClientAuthError("server sent a second, different server-final-message")
        elif not verified:
            raise ClientAuthError("server reported success without proving it knows the password")

    def _server_first(self, data: bytes) -> Derive:
        text = _decode(data, "server-first-message")
        attrs = _attributes(text, "server-first-message")
        _raise_server_error(attrs)
        if attrs[0][0] == "m":
            raise _PeerError("server requires an unsupported SCRAM extension")
        if len(attrs) < 3 or [k for k, _ in attrs[:3]] != ["r", "s", "i"]:
            raise _PeerError("server-first-message must start with r=, s=, i=")
        nonce, salt_text, count = (v for _, v in attrs[:3])
        _check_nonce(nonce, "server nonce")
        if not nonce.startswith(self._cnonce) or len(nonce) <= len(self._cnonce):
            raise _PeerError("server nonce does not extend our nonce")
        salt = _b64decode(salt_text, "salt")
        if not salt:
            raise _PeerError("salt is empty")
        if not (count.isascii() and count.isdigit()) or count.startswith("0"):
            raise _PeerError("iteration count is not a number")
        iterations = int(count)
        if not MIN_ITERATIONS <= iterations <= MAX_CLIENT_ITERATIONS:
            # Below the floor, a captured proof is cheaper to crack offline;
            # above the cap, the server would make us spin.
            raise _PeerError(
                f"iteration count {iterations} is out of the accepted range "
                f"({MIN_ITERATIONS}..{MAX_CLIENT_ITERATIONS})"
            )
        try:
            password = _prep(self._creds.password, "password").encode()
        except ValueError as exc:
            raise _PeerError(str(exc)) from None
        self._server_first_text, self._nonce = text, nonce
        return Derive(self.variant.hash_name, password, salt, iterations, self._client_final)

    def _client_final(self, salted: bytes) -> bytes:
        """client-final-message from SaltedPassword (RFC 5802 section 3)."""
        self._stage.check(Call.DERIVED)
        if len(salted) != self.variant.digest_size:
            raise SaslProtocolError(f"{self.name}: the derived key has the wrong length")
        client_key = _hmac(self.variant, salted, b"Client Key")
        stored_key = _digest(self.variant, client_key)
        server_key = _hmac(self.variant, salted, b"Server Key")
        cbind = _b64(self._gs2_header.encode() + self._cbind_data)
        without_proof = f"c={cbind},r={self._nonce}"
        auth_message = ",".join(
            (self._client_first_bare, self._server_first_text, without_proof)
        ).encode()
        signature = _hmac(self.variant, stored_key, auth_message)
        self._server_signature = _hmac(self.variant, server_key, auth_message)
        proof = _xor(client_key, signature)
        self._stage.expect(Call.STEP, Call.FINISH, what=_SERVER_FINAL)
        return f"{without_proof},p={_b64(proof)}".encode("ascii")

    def _verify_server_final(self, data: bytes) -> bytes:
        text = _decode(data, "server-final-message")
        attrs = _attributes(text, "server-final-message")
        _raise_server_error(attrs)
        if attrs[0][0] != "v":
            raise _PeerError("server-final-message lacks the server signature")
        signature = _b64decode(attrs[0][1], "server signature")
        if len(signature) != len(self._server_signature) or not hmac.compare_digest(
            signature, self._server_signature
        ):
            raise _PeerError("server signature is wrong: the server does not know the password")
        self._server_final = data
        return b""


def _raise_server_error(attrs: list[tuple[str, str]]) -> None:
    if attrs[0][0] == "e":
        value = attrs[0][1]
        shown = value if _SERVER_ERROR.fullmatch(value) else "(unreadable)"
        raise _PeerError(f"server reported SCRAM error {shown}")


class ScramSHA1Client(_ScramClient):
    variant = _SHA1


class ScramSHA256Client(_ScramClient):
    variant = _SHA256


class ScramSHA1PlusClient(_ScramClient):
    variant = _SHA1_PLUS


class ScramSHA256PlusClient(_ScramClient):
    variant = _SHA256_PLUS
