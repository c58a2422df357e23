"""The control socket ([control] socket): a Unix socket, mode 0600, where
`authgate status | sessions | block | unblock` reach a running authgate.

One request per connection: one JSON object on one line (at most 4 KiB),
answered by one JSON object on one line:

    {"command": "status"}
    {"command": "sessions", "listener": "imap"}           (listener optional)
    {"command": "block", "address": "203.0.113.7", "seconds": 600}
    {"command": "unblock", "address": "203.0.113.7"}

Answers carry `"ok": true` and the data, or `"ok": false, "error": "..."`.
With `workers = N` each worker listens on `<socket>.<number>` and the
command-line side asks every one of them and adds the answers up; blocks go
to every worker (each has its own brute-force state, unless [defence]
redis_url shares it, when any one would do).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import ipaddress
import json
import logging
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, TypeVar

from authgate.defence import MemoryState
from authgate.proxy.admin import BackendProbe
from authgate.proxy.server import Gateway

log = logging.getLogger("authgate.control")

T = TypeVar("T")

REQUEST_LIMIT: Final = 4096
REQUEST_TIMEOUT: Final = 5.0
MAX_BLOCK_SECONDS: Final = 366 * 86400
COMMANDS: Final = ("status", "sessions", "block", "unblock")


class BadRequest(ValueError):
    """A request the control socket refuses (its message is the answer)."""


def parse_request(line: bytes) -> dict[str, Any]:
    """The request on one line, checked; BadRequest otherwise."""
    try:
        request = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the request is not JSON") from None
    if not isinstance(request, dict):
        raise BadRequest("the request is not a JSON object")
    command = request.get("command")
    if command not in COMMANDS:
        raise BadRequest(f"unknown command (have: {', '.join(COMMANDS)})")
    if command in ("block", "unblock"):
        address = request.get("address")
        if not isinstance(address, str):
            raise BadRequest("address: give an IP address")
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise BadRequest(f"address: {address[:64]!r} is not an IP address") from None
    if command == "block":
        seconds = request.get("seconds")
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            raise BadRequest("seconds: give a number")
        if not 1 <= seconds <= MAX_BLOCK_SECONDS:
            raise BadRequest(f"seconds: {seconds!r} is outside 1..{MAX_BLOCK_SECONDS}")
    listener = request.get("listener")
    if listener is not None and not isinstance(listener, str):
        raise BadRequest("listener: give a listener name")
    return request


def socket_paths(path: Path, workers: int) -> list[Path]:
    """Where each serving process listens: the path itself, or one per worker."""
    if workers == 1:
        return [path]
    return [path.with_name(f"{path.name}.{number}") for number in range(workers)]


class ControlServer:
    def __init__(self, gateway: Gateway, path: Path) -> None:
        self.gateway = gateway
        self.path = path
        self.started = time.time()
        self._server: asyncio.base_events.Server | None = None

    async def start(self, owner: tuple[int, int] | None = None) -> None:
        """Listen (replacing a stale socket a crash left); mode 0600, owned
        by `owner` (uid, gid) when given, so the user authgate drops to can
        still reach it after a restart of its own."""
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                self.path.unlink()
        old = os.umask(0o177)  # born 0600: no moment when others could connect
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(self.path), limit=REQUEST_LIMIT
            )
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        if owner is not None:
            os.chown(self.path, *owner)
        log.info("control socket: %s", self.path)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
            with contextlib.suppress(OSError):  # (a root-owned folder after the drop)
                self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                line = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT)
            except (ValueError, asyncio.LimitOverrunError):
                line = b""
                answer: dict[str, Any] = {"ok": False, "error": "the request is too long"}
            else:
                answer = await self.answer(line)
            writer.write(json.dumps(answer, separators=(",", ":")).encode() + b"\n")
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()

    async def answer(self, line: bytes) -> dict[str, Any]:
        try:
            request = parse_request(line)
        except BadRequest as exc:
            return {"ok": False, "error": str(exc)}
        command = request["command"]
        guard = self.gateway.guard
        try:
            if command == "status":
                return {"ok": True, **await self.status()}
            if command == "sessions":
                return {"ok": True, "sessions": self.sessions(request.get("listener"))}
            if command == "block":
                seconds = float(request["seconds"])
                # Off the loop: with Redis these are network round trips.
                key = await self._guard(guard.block, request["address"], seconds)
                log.warning("control: blocked %s for %.0fs", key[2:], seconds)
                self.gateway.audit.note("operator-block", client=key[2:], seconds=int(seconds))
                return {"ok": True, "network": key[2:], "seconds": seconds}
            key, was = await self._guard(guard.unblock, request["address"])
            log.warning("control: unblocked %s", key[2:])
            self.gateway.audit.note("operator-unblock", client=key[2:])
            return {"ok": True, "network": key[2:], "was_blocked": was}
        except Exception:  # our bug: logged, a plain answer to the operator
            log.exception("control: %s failed", command)
            return {"ok": False, "error": f"{command} failed: see authgate's log"}

    async def _guard(self, call: Callable[..., T], *args: Any) -> T:
        """In-memory state is the event loop's (no thread may touch it);
        Redis is network round trips, run off the loop."""
        if isinstance(self.gateway.guard.addresses, MemoryState):
            return call(*args)
        return await asyncio.to_thread(call, *args)

    def sessions(self, listener: str | None = None) -> list[dict[str, Any]]:
        out = []
        for session in list(self.gateway.live_sessions):
            describe = getattr(session, "describe", None)
            if describe is None:
                continue
            info = describe()
            if listener is None or info["listener"] == listener:
                out.append(info)
        return sorted(out, key=lambda s: (s["listener"], s["since"]))

    async def status(self) -> dict[str, Any]:
        gateway = self.gateway
        per_listener: dict[str, int] = {}
        for info in self.sessions():
            per_listener[info["listener"]] = per_listener.get(info["listener"], 0) + 1
        bound = gateway.all_addresses()
        listeners = [
            {
                "name": rt.listener.name,
                "protocol": rt.listener.protocol.value,
                "tls": rt.listener.tls.value,
                "addresses": [_fmt(a) for a in bound.get(rt.listener.name, [])],
                "backend": str(rt.listener.backend.address),
                "sessions": per_listener.get(rt.listener.name, 0),
            }
            for rt in gateway.runtimes
        ]
        probe = BackendProbe(gateway)
        await probe.probe_once()
        backends = [
            {"backend": str(a), "reachable": str(a) in probe.last_ok,
             "error": probe.last_error.get(str(a))}
            for a in probe.addresses()
        ]
        blocks = await self._guard(gateway.guard.blocks)
        return {
            "version": importlib.metadata.version("authgate"),
            "pid": os.getpid(),
            "uptime": int(time.time() - self.started),
            "listeners": listeners,
            "sessions": gateway.session_count,
            "blocks": [{"network": n, "seconds_left": int(left)} for n, left in blocks],
            "backends": backends,
        }


def _fmt(address: tuple[str, int]) -> str:
    host, port = address[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
