"""A throw-away CA for TLS client certificates (SASL EXTERNAL), for tests:

    ca = ClientCA(folder)
    cert, key = ca.issue("alice@example.org")          # SAN e-mail, CN too
    cert, key = ca.issue("alice@example.org", expired=True)

`ca.ca_file` is what a listener's `client_ca` names. Made with trustme.
"""

from __future__ import annotations

import datetime
import re
from pathlib import Path

import trustme

__all__ = ["ClientCA"]


class ClientCA:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._ca = trustme.CA(organization_name="authgate test clients")
        self.ca_file = folder / "clients-ca.pem"
        self._ca.cert_pem.write_to_path(str(self.ca_file))
        self._count = 0

    def issue(self, user: str, *, expired: bool = False) -> tuple[Path, Path]:
        """(certificate file, key file) for `user`: an e-mail address goes
        into the SAN (and the CN), another name into the CN only."""
        now = datetime.datetime.now(datetime.UTC)
        not_before = now - datetime.timedelta(days=30) if expired else None
        not_after = now - datetime.timedelta(days=1) if expired else None
        identities = (user,) if "@" in user else ("client.invalid",)
        leaf = self._ca.issue_cert(
            *identities, common_name=user, not_before=not_before, not_after=not_after
        )
        self._count += 1
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", user) + f"-{self._count}"
        cert, key = self.folder / f"{stem}.pem", self.folder / f"{stem}.key"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        key.write_bytes(leaf.private_key_pem.bytes())
        key.chmod(0o600)
        return cert, key
