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
