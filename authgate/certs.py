"""Development certificates (trustme): a throw-away CA and a server
certificate for localhost, 127.0.0.1 and ::1. Never for production."""

from __future__ import annotations

import os
from pathlib import Path

CA_FILE = "demo-ca.pem"
CERT_FILE = "server.pem"
KEY_FILE = "server.key"
NAMES = ("localhost", "127.0.0.1", "::1")


def ensure_dev_certificates(directory: Path, *, force: bool = False) -> Path:
    """Create the CA and server certificate in `directory` unless they exist.
    Returns the CA file clients should trust."""
    ca_path = directory / CA_FILE
    cert_path = directory / CERT_FILE
    key_path = directory / KEY_FILE
    if not force and all(p.exists() for p in (ca_path, cert_path, key_path)):
        return ca_path
    import trustme  # only needed here; keeps `authgate run` start-up lean

    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="authgate development CA")
    server = ca.issue_cert(*NAMES)
    _write(key_path, server.private_key_pem.bytes(), mode=0o600)
    _write(cert_path, b"".join(blob.bytes() for blob in server.cert_chain_pems))
    _write(ca_path, ca.cert_pem.bytes())
    return ca_path


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    # Write to a temporary name and rename, so a half-written file is never
    # picked up by a proxy starting at the same moment.
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)
