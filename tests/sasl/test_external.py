"""EXTERNAL (RFC 4422 appendix A) and the certificate-to-user rules."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authgate.client_certs import (
    CertUserRule,
    fingerprint,
    normalise_fingerprint,
    user_of_certificate,
)
from authgate.errors import ConfigError
from authgate.sasl.base import (
    NO_RESPONSE,
    Challenge,
    Failure,
    FailureReason,
    ServerContext,
    Success,
    check_authzid,
)
from authgate.sasl.external import ExternalServer

CERT = {
    "subject": ((("commonName", "Alice"),),),
    "subjectAltName": (("email", "alice@example.org"), ("DNS", "client.example.org")),
}


def test_success_with_and_without_authzid() -> None:
    ctx = ServerContext(external_identity="alice@example.org")
    assert ExternalServer(ctx).start(b"") == Success("alice@example.org", None)
    assert check_authzid(ExternalServer(ctx).start(b"alice@example.org")) == Success(
        "alice@example.org", "alice@example.org"
    )
    server = ExternalServer(ctx)
    assert server.start(NO_RESPONSE) == Challenge(b"")
    assert server.step(b"") == Success("alice@example.org", None)


def test_other_authzid_and_no_certificate_refused() -> None:
    ctx = ServerContext(external_identity="alice@example.org")
    outcome = check_authzid(ExternalServer(ctx).start(b"bob"))
    assert isinstance(outcome, Failure) and outcome.reason is FailureReason.AUTHZ_DENIED
    none = ExternalServer(ServerContext()).start(b"")
    assert isinstance(none, Failure) and none.reason is FailureReason.INVALID_CREDENTIALS
    bad = ExternalServer(ctx).start(b"\xff")
    assert isinstance(bad, Failure) and bad.reason is FailureReason.MALFORMED


def test_mapping_rules() -> None:
    def nobody(_fp: str) -> str | None:
        return None

    assert user_of_certificate(CertUserRule.EMAIL, CERT, b"der", nobody) == "alice@example.org"
    assert user_of_certificate(CertUserRule.CN, CERT, b"der", nobody) == "Alice"
    two = {"subjectAltName": (("email", "a@x"), ("email", "b@x"))}
    assert user_of_certificate(CertUserRule.EMAIL, two, b"der", nobody) is None
    assert user_of_certificate(CertUserRule.EMAIL, {}, b"der", nobody) is None
    known = {fingerprint(b"der"): "carol"}
    assert user_of_certificate(CertUserRule.FINGERPRINT, CERT, b"der", known.get) == "carol"
    assert user_of_certificate(CertUserRule.FINGERPRINT, CERT, b"other", known.get) is None


def test_fingerprint_spellings() -> None:
    plain = fingerprint(b"x")
    colons = "SHA256:" + ":".join(plain[7:][i : i + 2].upper() for i in range(0, 64, 2))
    assert normalise_fingerprint(colons) == plain
    assert normalise_fingerprint(plain[7:]) == plain
    assert normalise_fingerprint("sha1:abcd") is None


@given(st.text(max_size=120))
def test_fingerprint_parser_never_raises(text: str) -> None:
    result = normalise_fingerprint(text)
    assert result is None or (result.startswith("sha256:") and len(result) == 71)


def test_config(tmp_path: Path) -> None:
    from authgate.config import load

    base = """
[users]
file = "users.toml"
[tls]
cert = "c.pem"
key = "k.pem"
[[listeners]]
name = "imaps"
protocol = "imap"
listen = "127.0.0.1:1993"
tls = "{tls}"
{extra}
[listeners.backend]
address = "127.0.0.1:2143"
master_user = "authgate"
master_password = "x"
"""
    path = tmp_path / "authgate.toml"
    path.write_text(base.format(tls="implicit", extra='client_ca = "ca.pem"\nclient_cert = "required"\nclient_cert_user = "cn"'))
    listener = load(path).listeners[0]
    assert listener.client_cert is not None and listener.client_cert.ca_file == tmp_path / "ca.pem"
    for tls, extra, problem in [
        ("none", 'client_ca = "ca.pem"', "need tls"),
        ("implicit", 'client_cert = "required"', "needs client_ca"),
        ("implicit", 'client_ca = "ca.pem"\nclient_cert = "sometimes"', "not one of"),
    ]:
        path.write_text(base.format(tls=tls, extra=extra))
        with pytest.raises(ConfigError, match=problem):
            load(path)
