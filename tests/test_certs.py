"""Development certificates: the right names, a sane lifetime, renewed in time."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509

from authgate.certs import CA_FILE, CERT_FILE, LEAF_LIFETIME, ensure_dev_certificates


def leaf(directory: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificates((directory / CERT_FILE).read_bytes())[0]


def test_names_and_lifetime(tmp_path: Path) -> None:
    assert ensure_dev_certificates(tmp_path) == tmp_path / CA_FILE
    cert = leaf(tmp_path)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")} <= set(
        names.get_values_for_type(x509.IPAddress)
    )
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime <= LEAF_LIFETIME + datetime.timedelta(days=2)  # testssl.sh: no HIGH for validity
    assert (tmp_path / "server.key").stat().st_mode & 0o077 == 0


def test_kept_while_valid_and_remade_when_forced(tmp_path: Path) -> None:
    ensure_dev_certificates(tmp_path)
    first = (tmp_path / CERT_FILE).read_bytes()
    ensure_dev_certificates(tmp_path)
    assert (tmp_path / CERT_FILE).read_bytes() == first
    ensure_dev_certificates(tmp_path, force=True)
    assert (tmp_path / CERT_FILE).read_bytes() != first


def test_leaf_names_a_real_signed_crl(tmp_path: Path) -> None:
    ca_path = ensure_dev_certificates(tmp_path)
    cert = leaf(tmp_path)
    points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    uri = points[0].full_name[0].value
    assert uri == (tmp_path / "demo-ca.crl").resolve().as_uri()
    crl = x509.load_pem_x509_crl((tmp_path / "demo-ca.crl").read_bytes())
    ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    assert len(crl) == 0 and crl.issuer == cert.issuer


def test_tls12_offers_only_forward_secret_aead_suites(tmp_path: Path) -> None:
    from authgate.proxy.tls import server_context

    ensure_dev_certificates(tmp_path)
    ctx = server_context(tmp_path / CERT_FILE, tmp_path / "server.key")
    tls12 = [c for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12
    assert all(c["aead"] and c["kea"] in ("kx-ecdhe", "kx-dhe") for c in tls12)
