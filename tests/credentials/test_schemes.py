"""Stored-secret schemes: Dovecot-format vectors, verification, forms, errors."""

from __future__ import annotations

import base64
import hashlib
import hmac

import argon2
import bcrypt
import pytest
import scramp
from hypothesis import given, settings
from hypothesis import strategies as st
from passlib.hash import (
    htdigest,
    ldap_salted_sha1,
    ldap_salted_sha256,
    ldap_salted_sha512,
    ldap_sha1,
    md5_crypt,
    nthash,
    sha256_crypt,
    sha512_crypt,
)

from authgate.credentials.schemes import (
    SCHEMES,
    WRITABLE_SCHEMES,
    SchemeError,
    StoredSecret,
    hash_password,
    parse_secret,
)
from authgate.sasl.base import ScramVerifier, SecretForm
from authgate.sasl.cram_md5 import cram_md5_digest, cram_md5_secret
from authgate.sasl.digest_md5 import digest_ha1
from authgate.sasl.ntlm import nt_hash
from authgate.sasl.scram import make_verifier

PW = "password"
ALL = frozenset(SecretForm)

# A cheap argon2 so the tests stay fast; the parameters live in the hash.
_FAST_ARGON2 = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


def fast_argon2(password: str, kind: argon2.Type = argon2.Type.ID) -> str:
    hasher = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1, type=kind)
    name = "ARGON2ID" if kind is argon2.Type.ID else "ARGON2I"
    return f"{{{name}}}" + hasher.hash(password)


def scram_text(name: str, password: str, salt: bytes = b"0123456789abcdef", i: int = 4096) -> str:
    """Dovecot's SCRAM form built from RFC 5802 section 3's formulas directly."""
    h = "sha1" if name == "SCRAM-SHA-1" else "sha256"
    salted = hashlib.pbkdf2_hmac(h, password.encode(), salt, i)
    client_key = hmac.new(salted, b"Client Key", h).digest()
    stored_key = hashlib.new(h, client_key).digest()
    server_key = hmac.new(salted, b"Server Key", h).digest()
    fields = [str(i)] + [base64.b64encode(x).decode() for x in (salt, stored_key, server_key)]
    return f"{{{name}}}" + ",".join(fields)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ------------------------------------------------------------- literal vectors


# (secret text, password) pairs built outside our code: literals, passlib,
# bcrypt, argon2-cffi, hashlib by the published formulas.
SHA256_PASSWORD = "XohImNooBHFR0OVvjcYpJ3NgPQ1qq73WKhHvch0VQtg="  # base64(SHA256("password"))
VECTORS: list[tuple[str, str, str]] = [
    ("PLAIN", "{PLAIN}password", PW),
    ("PLAIN", "{CLEARTEXT}password", PW),
    ("PLAIN", "{PLAIN.B64}" + b64(b"password"), PW),
    ("SHA", "{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", PW),
    ("SHA", "{SHA1}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", PW),
    ("SHA", "{SHA}5baa61e4c9b93f3f0682250b6cf8331b7ee68fd8", PW),  # hex guessed by length
    ("SHA", ldap_sha1.hash(PW), PW),
    ("SSHA", ldap_salted_sha1.hash(PW), PW),
    ("SSHA", "{SSHA}" + b64(hashlib.sha1(b"passwordsalt").digest() + b"salt"), PW),
    ("SHA256", "{SHA256}" + SHA256_PASSWORD, PW),
    (
        "SHA256",
        "{SHA256.HEX}5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8",
        PW,
    ),
    ("SSHA256", ldap_salted_sha256.hash(PW), PW),
    ("SSHA256", "{SSHA256.HEX}" + (hashlib.sha256(b"passwordNaCl").digest() + b"NaCl").hex(), PW),
    ("SHA512", "{SHA512}" + b64(hashlib.sha512(b"password").digest()), PW),
    ("SSHA512", ldap_salted_sha512.hash(PW), PW),
    ("PLAIN-MD5", "{PLAIN-MD5}5f4dcc3b5aa765d61d8327deb882cf99", PW),
    ("LDAP-MD5", "{LDAP-MD5}X03MO1qnZdYdgyfeuILPmQ==", PW),
    ("SMD5", "{SMD5}" + b64(hashlib.md5(b"passwordab").digest() + b"ab"), PW),
    # Drepper's SHA-crypt specification, test vectors 1.
    (
        "SHA512-CRYPT",
        "{SHA512-CRYPT}$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI6"
        "8u4OTLiBFdcbYEdFCoEOfaS35inz1",
        "Hello world!",
    ),
    (
        "SHA256-CRYPT",
        "{SHA256-CRYPT}$5$saltstring$5B8vYYiY.CVt1RlTTf8KbXBH3hsxY/GNooZaBBGWEc5",
        "Hello world!",
    ),
    ("SHA512-CRYPT", "{SHA512-CRYPT}" + sha512_crypt.using(rounds=5000).hash(PW), PW),
    ("SHA256-CRYPT", "{SHA256-CRYPT}" + sha256_crypt.using(rounds=5000).hash(PW), PW),
    ("MD5-CRYPT", "{MD5-CRYPT}" + md5_crypt.hash(PW), PW),
    ("MD5-CRYPT", "{MD5-CRYPT}$1$sRN7MKRJ$XfbAXBpoOphTIhBRZuPAl.", PW),
    ("MD5-CRYPT", "{MD5}" + md5_crypt.hash(PW), PW),  # Dovecot's alias
    ("CRYPT", "{CRYPT}" + sha512_crypt.using(rounds=5000).hash(PW), PW),
    # crypt_blowfish's wrapper.c vector, with the $2y$ Dovecot writes.
    ("BLF-CRYPT", "{BLF-CRYPT}$2y$05$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW", "U*U"),
    ("BLF-CRYPT", "{BLF-CRYPT}$2a$05$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW", "U*U"),
    ("BLF-CRYPT", "{BLF-CRYPT}" + bcrypt.hashpw(b"password", bcrypt.gensalt(4)).decode(), PW),
    ("CRYPT", "{CRYPT}$2y$05$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW", "U*U"),
    ("ARGON2ID", fast_argon2(PW), PW),
    ("ARGON2I", fast_argon2(PW, argon2.Type.I), PW),
    (
        "PBKDF2",
        "{PBKDF2}$1$abcdefghijklmnop$5000$"
        + hashlib.pbkdf2_hmac("sha1", b"password", b"abcdefghijklmnop", 5000).hex(),
        PW,
    ),
    ("CRAM-MD5", "{CRAM-MD5}" + cram_md5_secret(PW).hex(), PW),
    ("DIGEST-MD5", "{DIGEST-MD5}" + htdigest.hash(PW, "alice", "example.org"), PW),
    ("NTLM", "{NTLM}8846f7eaee8fb117ad06bdd830b7586c", PW),
    ("NTLM", "{NTLM}" + nthash.hash(PW), PW),
    ("NTLM", "{NTLM}" + b64(bytes.fromhex("8846f7eaee8fb117ad06bdd830b7586c")), PW),
    ("SCRAM-SHA-1", scram_text("SCRAM-SHA-1", PW), PW),
    ("SCRAM-SHA-256", scram_text("SCRAM-SHA-256", PW), PW),
]


@pytest.mark.parametrize(("scheme", "text", "password"), VECTORS)
def test_vector_parses_and_verifies(scheme: str, text: str, password: str) -> None:
    secret = parse_secret(text, username="alice", realm="example.org")
    assert secret.scheme == scheme
    assert secret.encoded == text
    assert secret.can_verify_password
    assert secret.verify_password(password)
    assert not secret.verify_password(password + "x")
    assert not secret.verify_password(password[:-1])
    assert not secret.verify_password("")


def test_scheme_names_are_case_insensitive() -> None:
    secret = parse_secret("{sha}W6ph5Mm5Pz8GgiULbPgzG37mj9g=")
    assert secret.scheme == "SHA"
    assert secret.verify_password(PW)


def test_scram_vector_agrees_with_scramp() -> None:
    salt, stored, server, i = scramp.ScramMechanism("SCRAM-SHA-256").make_auth_info(
        "pencil", iteration_count=4096, salt=b"W22ZaJ0SNY7soEsUEjb6gQ"
    )
    text = f"{{SCRAM-SHA-256}}{i},{b64(salt)},{b64(stored)},{b64(server)}"
    secret = parse_secret(text)
    assert secret.verify_password("pencil")
    assert not secret.verify_password("pencil2")
    assert secret.secret_for(SecretForm.SCRAM_SHA_256, username="user") == ScramVerifier(
        salt, 4096, stored, server
    )


def test_cram_md5_secret_answers_rfc_2195_example() -> None:
    # RFC 2195 section 2: the example exchange.
    secret = parse_secret("{CRAM-MD5}" + cram_md5_secret("tanstaaftanstaaf").hex())
    raw = secret.secret_for(SecretForm.CRAM_MD5, username="tim")
    assert isinstance(raw, bytes)
    challenge = b"<1896.697170952@postoffice.reston.mci.net>"
    assert cram_md5_digest(raw, challenge).hex() == "b913a602c7eda7a495b4e6e7334d3890"


def test_bcrypt_looks_at_72_bytes_like_crypt_blowfish() -> None:
    long_password = "a" * 72
    text = "{BLF-CRYPT}" + bcrypt.hashpw(long_password.encode(), bcrypt.gensalt(4)).decode()
    secret = parse_secret(text)
    assert secret.verify_password(long_password + "ignored")
    assert not secret.verify_password("a" * 71)


def test_weird_passwords_are_wrong_not_errors() -> None:
    for text, _ in [(t, p) for (_, t, p) in VECTORS]:
        secret = parse_secret(text, username="alice", realm="example.org")
        for odd in ("\x00", "pass\x00word", "\ud800", "x" * 5000, "\u0007"):
            assert secret.verify_password(odd) is False


# ------------------------------------------------------------- forms


@pytest.mark.parametrize(
    ("text", "forms"),
    [
        ("{PLAIN}password", ALL),
        ("{CRAM-MD5}" + cram_md5_secret(PW).hex(), {SecretForm.CRAM_MD5}),
        ("{DIGEST-MD5}" + htdigest.hash(PW, "alice", "r"), {SecretForm.DIGEST_MD5}),
        ("{NTLM}8846f7eaee8fb117ad06bdd830b7586c", {SecretForm.NT_HASH}),
        (scram_text("SCRAM-SHA-1", PW), {SecretForm.SCRAM_SHA_1}),
        (scram_text("SCRAM-SHA-256", PW), {SecretForm.SCRAM_SHA_256}),
        ("{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", set()),
        (ldap_salted_sha512.hash(PW), set()),
        ("{SHA512-CRYPT}" + sha512_crypt.using(rounds=5000).hash(PW), set()),
        (fast_argon2(PW), set()),
    ],
)
def test_forms(text: str, forms: set[SecretForm]) -> None:
    assert parse_secret(text).forms() == forms


def test_plaintext_derives_every_form() -> None:
    secret = parse_secret("{PLAIN}password")
    kw = {"username": "alice", "realm": "example.org"}
    assert secret.secret_for(SecretForm.PLAINTEXT, **kw) == PW
    assert secret.secret_for(SecretForm.CRAM_MD5, **kw) == cram_md5_secret(PW)
    assert secret.secret_for(SecretForm.DIGEST_MD5, **kw) == bytes.fromhex(
        htdigest.hash(PW, "alice", "example.org")
    )
    assert secret.secret_for(SecretForm.NT_HASH, **kw) == bytes.fromhex(
        "8846f7eaee8fb117ad06bdd830b7586c"
    )
    for form, name in ((SecretForm.SCRAM_SHA_1, "sha1"), (SecretForm.SCRAM_SHA_256, "sha256")):
        verifier = secret.secret_for(form, **kw)
        assert isinstance(verifier, ScramVerifier)
        again = make_verifier(PW, name, verifier.iterations, verifier.salt)
        assert (again.stored_key, again.server_key) == (verifier.stored_key, verifier.server_key)


def test_stored_forms_answer_only_their_own_form() -> None:
    ntlm = parse_secret("{NTLM}8846f7eaee8fb117ad06bdd830b7586c")
    assert ntlm.secret_for(SecretForm.NT_HASH, username="a") == nt_hash(PW)
    for form in set(SecretForm) - {SecretForm.NT_HASH}:
        assert ntlm.secret_for(form, username="a", realm="r") is None
    sha = parse_secret("{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=")
    assert all(sha.secret_for(f, username="a") is None for f in SecretForm)


def test_digest_md5_is_bound_to_user_and_realm() -> None:
    text = "{DIGEST-MD5}" + digest_ha1("alice", "example.org", PW).hex()
    unbound = parse_secret(text)
    assert not unbound.can_verify_password
    assert not unbound.verify_password(PW)
    bound = parse_secret(text, username="alice", realm="example.org")
    assert bound.verify_password(PW)
    assert bound.secret_for(SecretForm.DIGEST_MD5, username="alice", realm="example.org") == (
        digest_ha1("alice", "example.org", PW)
    )
    assert bound.secret_for(SecretForm.DIGEST_MD5, username="alice", realm="other") is None
    assert bound.secret_for(SecretForm.DIGEST_MD5, username="bob", realm="example.org") is None
    # The same HA1 bound to another realm is another user's password.
    assert not parse_secret(text, username="alice", realm="other").verify_password(PW)


# ------------------------------------------------------------- privacy


def test_repr_and_str_hide_the_secret() -> None:
    for text in ("{PLAIN}hunter2-hunter2", scram_text("SCRAM-SHA-256", "hunter2-hunter2")):
        secret = parse_secret(text)
        for shown in (repr(secret), str(secret)):
            assert "hunter2" not in shown
            assert text[text.index("}") + 1 :][:12] not in shown
            assert secret.scheme in shown


SECRETISH = "Zm9vYmFyYmF6cXV4cXV1eA"  # a distinctive value that must never be echoed


@pytest.mark.parametrize(
    "text",
    [
        "{SHA}" + SECRETISH,
        "{SSHA256}" + SECRETISH + "!",
        "{SHA512-CRYPT}$6$" + SECRETISH + "$$",
        "{BLF-CRYPT}$2y$05$" + SECRETISH,
        "{ARGON2ID}$argon2id$v=19$m=8,t=1,p=1$" + SECRETISH,
        "{ARGON2I}$argon2id$v=19$m=8,t=1,p=1$" + SECRETISH,
        "{PBKDF2}$1$" + SECRETISH,
        "{CRAM-MD5}" + SECRETISH,
        "{DIGEST-MD5}" + SECRETISH,
        "{NTLM}" + SECRETISH,
        "{SCRAM-SHA-256}4096," + SECRETISH,
        "{SCRAM-SHA-1}" + scram_text("SCRAM-SHA-256", SECRETISH).split("}", 1)[1],
        "{CRYPT}" + SECRETISH,
        "{PLAIN.HEX}" + SECRETISH,
    ],
)
def test_errors_name_the_scheme_never_the_value(text: str) -> None:
    with pytest.raises(SchemeError) as info:
        parse_secret(text)
    message = str(info.value)
    assert SECRETISH not in message
    scheme = text[1 : text.index("}")].upper()
    assert "{" + scheme + "}" in message


def test_unknown_scheme_is_named() -> None:
    with pytest.raises(SchemeError, match=r"^unknown scheme \{FOO\}$"):
        parse_secret("{FOO}" + SECRETISH)


@pytest.mark.parametrize("text", [SECRETISH, "{" + SECRETISH, "{not a scheme}x", "{}x", "{ü}x"])
def test_missing_or_odd_prefix(text: str) -> None:
    with pytest.raises(SchemeError) as info:
        parse_secret(text)
    assert SECRETISH not in str(info.value)
    assert "not a scheme" not in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        "{SHA}" + b64(b"x" * 19),  # wrong digest length
        "{SSHA}" + b64(b"x" * 20),  # a digest without salt
        "{NTLM}" + "0" * 31,
        "{CRAM-MD5}" + "0" * 62,
        "{SHA256.HEX}" + "zz" * 32,
        "{SHA.FOO}W6ph5Mm5Pz8GgiULbPgzG37mj9g=",
        "{ARGON2ID.HEX}abcd",
        "{ARGON2ID}" + _FAST_ARGON2.hash(PW).replace("m=8", "m=99999999"),
        "{ARGON2I}" + _FAST_ARGON2.hash(PW),  # an argon2id hash labelled argon2i
        "{SHA512-CRYPT}" + md5_crypt.hash(PW),
        "{BLF-CRYPT}$2y$03$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW",
        "{PBKDF2}$1$salt$0$" + "0" * 40,
        "{SCRAM-SHA-256}" + scram_text("SCRAM-SHA-1", PW).split("}", 1)[1],  # key length
        "{SCRAM-SHA-1}1,c2FsdA==," + b64(b"k" * 20) + "," + b64(b"k" * 20),  # iterations
        "{CRYPT}abcdefghijklm",  # traditional DES crypt
        "{PLAIN.B64}" + b64(b"\xff\xfe"),
        "{PLAIN}",  # an empty password would accept an empty password
        "{PLAIN.B64}",
    ],
)
def test_malformed_values(text: str) -> None:
    with pytest.raises(SchemeError):
        parse_secret(text)


# ------------------------------------------------------------- fuzzing

_PREFIXES = ["{" + name + "}" for name in SCHEMES] + [
    "{CLEARTEXT}",
    "{SHA.HEX}",
    "{SSHA512.B64}",
    "{PLAIN.BASE64}",
    "{CRYPT}$6$",
    "{CRYPT}$2y$",
    "{SHA512-CRYPT}$6$rounds=",
    "{BLF-CRYPT}$2y$05$",
    "{ARGON2ID}$argon2id$v=19$",
    "{ARGON2I}$argon2i$v=19$m=",
    "{PBKDF2}$1$",
    "{SCRAM-SHA-1}4096,",
    "{SCRAM-SHA-256}",
]


def _parses_or_scheme_error(text: str) -> None:
    try:
        secret = parse_secret(text, username="u", realm="r")
    except SchemeError:
        return
    assert isinstance(secret, StoredSecret)
    assert secret.encoded == text
    assert secret.scheme in SCHEMES


@settings(max_examples=400)
@given(st.text())
def test_random_text_parses_or_raises_scheme_error(text: str) -> None:
    _parses_or_scheme_error(text)


@settings(max_examples=600)
@given(st.sampled_from(_PREFIXES), st.text(alphabet=st.characters(codec="utf-8")))
def test_random_values_after_each_prefix(prefix: str, tail: str) -> None:
    _parses_or_scheme_error(prefix + tail)


@settings(max_examples=300)
@given(
    st.sampled_from(["{SHA}", "{SSHA}", "{NTLM}", "{CRAM-MD5}", "{SCRAM-SHA-1}4096,"]),
    st.text(alphabet="ABCDEFabcdef0123456789+/=,$."),
)
def test_random_base64_and_hex_values(prefix: str, tail: str) -> None:
    _parses_or_scheme_error(prefix + tail)


# ------------------------------------------------------------- writing


@pytest.mark.parametrize("scheme", sorted(WRITABLE_SCHEMES))
def test_hash_password_round_trips(scheme: str) -> None:
    text = hash_password("pässword", scheme, username="alice", realm="example.org")
    assert text.startswith("{" + scheme + "}")
    secret = parse_secret(text, username="alice", realm="example.org")
    assert secret.scheme == scheme
    assert secret.verify_password("pässword")
    assert not secret.verify_password("password")


def test_hash_password_is_salted() -> None:
    for scheme in ("SSHA512", "SCRAM-SHA-256", "PBKDF2"):
        assert hash_password(PW, scheme) != hash_password(PW, scheme)


def test_written_formats_match_dovecot() -> None:
    assert hash_password(PW, "NTLM") == "{NTLM}8846f7eaee8fb117ad06bdd830b7586c"
    assert hash_password(PW, "DIGEST-MD5", username="user", realm="realm") == (
        "{DIGEST-MD5}" + htdigest.hash(PW, "user", "realm")
    )
    assert hash_password(PW, "BLF-CRYPT").startswith("{BLF-CRYPT}$2y$12$")
    assert hash_password(PW, "ARGON2ID").startswith("{ARGON2ID}$argon2id$v=19$")
    raw = base64.b64decode(hash_password(PW, "SSHA512")[len("{SSHA512}") :])
    assert hashlib.sha512(PW.encode() + raw[64:]).digest() == raw[:64]
    assert hash_password(PW, "SCRAM-SHA-256").startswith("{SCRAM-SHA-256}4096,")


@pytest.mark.parametrize("scheme", ["SHA", "SHA256", "SSHA", "MD5-CRYPT", "PLAIN-MD5", "CRYPT"])
def test_weak_schemes_are_never_written(scheme: str) -> None:
    with pytest.raises(SchemeError, match="never written"):
        hash_password(PW, scheme)


def test_hash_password_refusals() -> None:
    with pytest.raises(SchemeError, match="unknown scheme"):
        hash_password(PW, "FOO")
    with pytest.raises(SchemeError, match="realm"):
        hash_password(PW, "DIGEST-MD5", username="alice")
    with pytest.raises(SchemeError, match="72 bytes"):
        hash_password("x" * 73, "BLF-CRYPT")


def test_secret_properties() -> None:
    assert parse_secret("{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=").weak
    assert not parse_secret(fast_argon2(PW)).weak
    assert parse_secret("{NTLM}8846f7eaee8fb117ad06bdd830b7586c").password_equivalent
    assert parse_secret("{PLAIN}x").password_equivalent
    assert not parse_secret(scram_text("SCRAM-SHA-256", PW)).password_equivalent


# ------------------------------------------------------------- imitation


@pytest.mark.parametrize(("scheme", "text", "password"), VECTORS)
def test_imitation_has_same_scheme_and_never_matches(scheme: str, text: str, password: str) -> None:
    secret = parse_secret(text, username="alice", realm="example.org")
    fake = secret.imitation()
    assert fake.scheme == secret.scheme
    assert fake.can_verify_password
    assert not fake.verify_password(password)
    assert fake.forms() == secret.forms()


def test_imitation_keeps_the_cost() -> None:
    argon = parse_secret(fast_argon2(PW)).imitation()
    assert isinstance(argon.payload, str)
    params = argon2.extract_parameters(argon.payload)
    assert (params.time_cost, params.memory_cost, params.parallelism) == (1, 8, 1)
    crypt = parse_secret("{SHA512-CRYPT}" + sha512_crypt.using(rounds=12345).hash(PW))
    assert "rounds=12345$" in str(crypt.imitation().payload)
    blf = parse_secret("{BLF-CRYPT}$2y$05$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW")
    assert str(blf.imitation().payload).startswith("$2b$05$")
    scram = parse_secret(scram_text("SCRAM-SHA-1", PW, i=5000)).imitation()
    assert isinstance(scram.payload, ScramVerifier)
    assert scram.payload.iterations == 5000
