"""asyncio's per-connection TLS buffer is shrunk when the gateway starts."""

from __future__ import annotations

import asyncio.sslproto

from authgate.proxy.tls import TLS_READ_BUFFER, tune_tls_buffers


def test_tls_read_buffer_is_small() -> None:
    tune_tls_buffers()
    assert asyncio.sslproto.SSLProtocol.max_size == TLS_READ_BUFFER == 8 * 1024
