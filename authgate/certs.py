"""Development certificates (trustme): a throw-away CA and a server
certificate for localhost, 127.0.0.1 and ::1. Never for production."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

CA_FILE = "demo-ca.pem"
CERT_FILE = "server.pem"
KEY_FILE = "server.key"
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
    server = ca.issue_cert(*NAMES, not_before=now - LEAF_BACKDATE, not_after=now + LEAF_LIFETIME)
    _write(key_path, server.private_key_pem.bytes(), mode=0o600)
    _write(cert_path, b"".join(blob.bytes() for blob in server.cert_chain_pems))
    _write(ca_path, ca.cert_pem.bytes())
    return ca_path


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
