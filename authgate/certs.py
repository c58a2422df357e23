"""Development certificates (trustme): a throw-away CA and a server
certificate for localhost, 127.0.0.1 and ::1. Never for production."""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_FILE = "demo-ca.pem"
CERT_FILE = "server.pem"
KEY_FILE = "server.key"
CRL_FILE = "demo-ca.crl"
NAMES = ("localhost", "127.0.0.1", "::1")
CA_ORGANIZATION = "authgate development CA"

# trustme's default leaf is valid from 2000 to 3000, which testssl.sh rates HIGH
# (cert_validityPeriod, ">= 10 years is way too long") and which would keep a
# leaked server.key usable forever. One year stays under the CA/Browser Forum's
# 398-day ceiling; the pair is remade once less than RENEW_BEFORE remains, so the
# demo never serves a certificate testssl.sh calls (nearly) expired (< 60 days
# is MEDIUM, < 30 HIGH), and once when it was made by an older authgate with
# trustme's default lifetime. The backdating absorbs clock skew between hosts.
LEAF_LIFETIME = datetime.timedelta(days=365)
LEAF_BACKDATE = datetime.timedelta(days=1)
RENEW_BEFORE = datetime.timedelta(days=60)


def ensure_dev_certificates(directory: Path, *, force: bool = False) -> Path:
    """Create the CA and server certificate in `directory` unless they exist.
    Our own certificate is also remade when it expires within RENEW_BEFORE or
    outlives LEAF_LIFETIME (with a new CA: trustme keeps the CA key in memory
    only, so clients must trust the new CA file).
    Returns the CA file clients should trust."""
    ca_path = directory / CA_FILE
    cert_path = directory / CERT_FILE
    key_path = directory / KEY_FILE
    now = datetime.datetime.now(datetime.UTC)
    if (
        not force
        and all(p.exists() for p in (ca_path, cert_path, key_path))
        and not _needs_renewal(cert_path, now)
    ):
        return ca_path
    import trustme  # only needed here; keeps `authgate run` start-up lean

    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name=CA_ORGANIZATION)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    crl_path = directory / CRL_FILE
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = _issue_leaf(ca_cert, ca_key, leaf_key, crl_path.resolve().as_uri(), now)
    _write(key_path, _pem_key(leaf_key), mode=0o600)
    _write(cert_path, leaf.public_bytes(serialization.Encoding.PEM) + ca.cert_pem.bytes())
    _write(ca_path, ca.cert_pem.bytes())
    _write(crl_path, _empty_crl(ca_cert, ca_key, now))
    return ca_path


def _issue_leaf(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    key: ec.EllipticCurvePrivateKey,
    crl_uri: str,
    now: datetime.datetime,
) -> x509.Certificate:
    """The server certificate: our names, one year, and a CRL distribution
    point. A certificate naming no CRL or OCSP address is rated HIGH by
    testssl.sh (cert_revocation); the CRL is a real one, signed and empty,
    written beside it, so a client that checks revocation can."""
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in NAMES if ip != "localhost"]
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - LEAF_BACKDATE)
        .not_valid_after(now + LEAF_LIFETIME)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .add_extension(
            x509.CRLDistributionPoints(
                [
                    x509.DistributionPoint(
                        [x509.UniformResourceIdentifier(crl_uri)], None, None, None
                    )
                ]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def _empty_crl(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    now: datetime.datetime,
) -> bytes:
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - LEAF_BACKDATE)
        .next_update(now + LEAF_LIFETIME)
        .sign(ca_key, hashes.SHA256())
    )
    return crl.public_bytes(serialization.Encoding.PEM)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _needs_renewal(cert_path: Path, now: datetime.datetime) -> bool:
    """True when `cert_path` was issued by our development CA and expires
    within RENEW_BEFORE or is valid for longer than we issue now. A certificate
    someone else put in the folder is never replaced; one we cannot read is
    left for the TLS loader to report."""
    try:
        leaf = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError):
        return False
    issuer_orgs = leaf.issuer.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    if [attr.value for attr in issuer_orgs] != [CA_ORGANIZATION]:
        return False
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    return leaf.not_valid_after_utc - now < RENEW_BEFORE or lifetime > LEAF_BACKDATE + LEAF_LIFETIME


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    # Write to a temporary name and rename, so a half-written file is never
    # picked up by a proxy starting at the same moment.
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)
