"""SMTP server-to-server pass-through (port 25 listeners).

A client that sends MAIL FROM without authenticating is handed to the
backend unchanged. The backend has not seen the client's EHLO yet, so the
driver replays it there and swallows the backend's greeting and EHLO reply
(the client already had ours); everything after goes through the splice.
"""

from __future__ import annotations

import asyncio
import re

from authgate.proxy.channel import Channel

_LAST_LINE = re.compile(rb"^(\d{3})(?: [^\r\n]*)?\r?$")


async def _read_reply(channel: Channel, buffer: bytearray) -> int | None:
    """Read one complete (possibly multi-line) SMTP reply; its code or None."""
    while True:
        while (end := buffer.find(b"\n")) >= 0:
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            match = _LAST_LINE.match(line)
            if match:
                return int(match.group(1))
            if not re.match(rb"^\d{3}-", line):
                return None
        if len(buffer) > 65536:
            return None
        data = await channel.read()
        if not data:
            return None
        buffer += data


async def swallow_smtp_replies(channel: Channel, replay: tuple[bytes, ...], timeout: float) -> bool:
    """Consume the greeting, send each `replay` line and consume its reply.
    True when every reply was a success (2xx)."""
    buffer = bytearray()
    try:
        async with asyncio.timeout(timeout):
            code = await _read_reply(channel, buffer)
            if code is None or code // 100 != 2:
                return False
            for line in replay:
                channel.write(line)
                code = await _read_reply(channel, buffer)
                if code is None or code // 100 != 2:
                    return False
    except TimeoutError:
        return False
    # Nothing may be left: the backend speaks only when spoken to here.
    return not buffer
