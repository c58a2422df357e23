"""TLS contexts, made once per listener (making one per connection is slow)."""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import ssl
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from authgate.client_certs import CertRequirement, ClientCertSettings
from authgate.proxy.alpn import make_strict

# asyncio's TLS transport gives every connection a 256 KiB receive buffer
# (SSLProtocol.max_size, CPython 3.11+): ~290 KiB of RSS per idle IMAPS
# client, measured. A TLS record carries at most 16 KiB of plaintext; an
# 8 KiB buffer reads one in two calls. Measured with bench.compare --quick,
# same idle machine: 16 KiB -> 52.8 KiB per TLS connection, 281/398 MiB/s
# TLS FETCH (1/10 MiB); 8 KiB -> 40.4 KiB, 261/357 MiB/s. 8 KiB keeps us
# within 2x the nginx mail proxy's memory per TLS session (docs/performance.md)
# at a cost of about a tenth of bulk TLS throughput, still above nginx's.
TLS_READ_BUFFER = 8 * 1024
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"
# TLS 1.3 session tickets sent after each full handshake (OpenSSL's default
# is 2). Each costs the server about 180,000 instructions (the session
# encoded, encrypted and MACed, one more record): 3 % of an IMAPS login
# (bench.instructions --tls: 6,056,826 -> 5,874,209 per login for 2 -> 1).
# One is enough to resume: OpenSSL's stateless tickets may be used again,
# so a client that opens several connections resumes each with it.
TLS13_TICKETS = 1


def tune_tls_buffers() -> None:
    """Shrink asyncio's per-connection TLS read buffer (process-wide)."""
    sslproto = getattr(asyncio, "sslproto", None)
    protocol = getattr(sslproto, "SSLProtocol", None)
    if protocol is not None and getattr(protocol, "max_size", 0) > TLS_READ_BUFFER:
        protocol.max_size = TLS_READ_BUFFER


class TLSConfigError(Exception):
    """Certificate or key cannot be used; a user-caused problem."""


def server_context(
    cert: Path,
    key: Path,
    *,
    alpn: Sequence[str] = (),
    client_cert: ClientCertSettings | None = None,
) -> ssl.SSLContext:
    """TLS 1.2 or newer, the ssl module's secure defaults, our certificate.
    With `alpn` (the listener protocol's identifiers), a client that offers
    ALPN without any of them is refused (authgate.proxy.alpn). With
    `client_cert`, a client certificate is asked for (or required) and
    verified against its CA: a bad one fails the handshake."""
    ctx = _server_context(cert, key, client_cert)
    if alpn:
        make_strict(ctx, alpn, session=_server_context(cert, key, client_cert))
    return ctx


def _server_context(
    cert: Path, key: Path, client_cert: ClientCertSettings | None = None
) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    if client_cert is not None:
        try:
            ctx.load_verify_locations(cafile=str(client_cert.ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise TLSConfigError(f"cannot load client_ca {client_cert.ca_file}: {exc}") from None
        required = client_cert.requirement is CertRequirement.REQUIRED
        ctx.verify_mode = ssl.CERT_REQUIRED if required else ssl.CERT_OPTIONAL
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # TLS 1.2: forward-secret AEAD suites only (Mozilla's "intermediate"
    # profile). The CBC suites Python would also offer draw testssl.sh's
    # LUCKY13 and "average cipher list" findings and no current mail client
    # needs them. TLS 1.3 suites are not affected by set_ciphers.
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.num_tickets = TLS13_TICKETS
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"cannot load certificate {cert} / key {key}: {exc}") from None
    return ctx


def client_context(*, ca_file: Path | None, verify: bool) -> ssl.SSLContext:
    """For connections to backends: verified against `ca_file` (or the system
    store) unless the admin turned verification off."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise TLSConfigError(f"cannot load CA file {ca_file}: {exc}") from None
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def leaf_certificate_der(cert: Path) -> bytes:
    """The first certificate of a PEM chain, DER-encoded (for channel binding)."""
    try:
        certs = x509.load_pem_x509_certificates(cert.read_bytes())
    except (OSError, ValueError) as exc:
        raise TLSConfigError(f"cannot read certificate {cert}: {exc}") from None
    return certs[0].public_bytes(Encoding.DER)
