"""`authgate run`: the proxy in the foreground until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

from authgate.config import Config
from authgate.credentials.store import UserStore
from authgate.proxy.runtime import build_runtime
from authgate.proxy.server import Gateway

log = logging.getLogger("authgate")


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # aiosmtpd (the embedded demo backend) logs every SMTP command at INFO.
    logging.getLogger("mail.log").setLevel(max(level, logging.WARNING))


async def start_gateway(config: Config, store: UserStore | None) -> Gateway:
    gateway = Gateway(build_runtime(config, store))
    await gateway.start()
    return gateway


async def wait_for_stop_signal() -> None:
    """Return on the first SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)


async def serve(config: Config, store: UserStore | None, *, drain: float = 10.0) -> None:
    gateway = await start_gateway(config, store)
    await wait_for_stop_signal()
    log.info("stopping: no new connections; %d session(s) draining", gateway.session_count)
    await gateway.stop(drain=drain)
    log.info("stopped")
