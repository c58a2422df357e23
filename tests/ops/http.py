"""A bare HTTP/1.0 GET over a real socket (the metrics listener's clients
are scrapers and probes; no client library needed)."""

from __future__ import annotations

import asyncio


async def http_get(host: str, port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n{extra}\r\n".encode())
    data = await asyncio.wait_for(reader.read(), 20)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    fields = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), fields, body
