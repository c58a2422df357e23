"""The metrics listener ([metrics] listen): a small HTTP/1.0 server for the
tools that watch authgate.

- `GET /metrics`: every metric in the Prometheus text format (all workers'
  with `workers = N`, see authgate.metrics);
- `GET /healthz`: 200 while the event loop answers (alive);
- `GET /readyz`: 200 when every listener is bound, every listener that
  verifies users has its users (file or directory), and every backend
  answered a TCP connect within the last probe rounds; else 503 with the
  reasons, one a line (what a Kubernetes probe or an HAProxy check reads);
- `GET /`: the status page (authgate.proxy.status_page), for loopback
  clients, or with `status_password_file` for whoever gives the password.

Only GET (and HEAD), one request per connection, a request of at most
8 KiB read within 5 seconds: this is not a web server, and the port is
meant for loopback or a monitoring network.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import importlib.metadata
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

from authgate.config import Address, BackendMode
from authgate.defence import MemoryState
from authgate.metrics import Recorder
from authgate.proxy.server import Gateway
from authgate.proxy.status_page import Activity, Snapshot, render

log = logging.getLogger("authgate.admin")

REQUEST_LIMIT: Final = 8192
REQUEST_TIMEOUT: Final = 5.0
PROBE_INTERVAL: Final = 10.0  # seconds between backend probes
PROBE_TIMEOUT: Final = 3.0
# A backend counts as reachable "recently" when its last probe succeeded and
# was no older than this many probe rounds.
PROBE_ROUNDS_FRESH: Final = 3
ACTIVITY_SAMPLE: Final = 5.0  # seconds between the status page's activity samples
# The status page loads nothing: inline style and SVG only.
CSP: Final = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'"


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


_REASONS: Final = {200: "OK", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
                   405: "Method Not Allowed", 400: "Bad Request", 503: "Service Unavailable"}

# A page for a path: (path, peer address) -> response; the status page plugs in here.
Handler = Callable[[str, str], Awaitable[Response]]


class BackendProbe:
    """TCP connects to every listener's backend, every PROBE_INTERVAL."""

    def __init__(self, gateway: Gateway, clock: Callable[[], float] = time.monotonic) -> None:
        self._gateway = gateway
        self._clock = clock
        self.last_ok: dict[str, float] = {}
        self.last_error: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None

    def addresses(self) -> list[Address]:
        seen: dict[str, Address] = {}
        for runtime in self._gateway.runtimes:
            address = runtime.listener.backend.address
            seen.setdefault(str(address), address)
        return list(seen.values())

    async def probe_once(self) -> None:
        await asyncio.gather(*(self._probe(a) for a in self.addresses()))

    async def _probe(self, address: Address) -> None:
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(address.host, address.port), PROBE_TIMEOUT
            )
        except (OSError, TimeoutError) as exc:
            self.last_error[str(address)] = str(exc) or exc.__class__.__name__
            return
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        self.last_ok[str(address)] = self._clock()
        self.last_error.pop(str(address), None)

    def unreachable(self) -> list[str]:
        """Backends not reachable recently, each with why."""
        now = self._clock()
        out = []
        for address in self.addresses():
            key = str(address)
            ok = self.last_ok.get(key)
            if ok is None or now - ok > PROBE_INTERVAL * PROBE_ROUNDS_FRESH:
                why = self.last_error.get(key, "not reached yet")
                out.append(f"backend {key} unreachable: {why}")
        return out

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._forever())

    async def _forever(self) -> None:
        while True:
            await self.probe_once()
            await asyncio.sleep(PROBE_INTERVAL)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def readiness(gateway: Gateway, probe: BackendProbe) -> list[str]:
    """Why authgate is not ready (empty: ready)."""
    problems = []
    bound = gateway.all_addresses()
    for runtime in gateway.runtimes:
        name = runtime.listener.name
        if not bound.get(name):
            problems.append(f"listener {name} is not listening")
        terminate = runtime.listener.backend.mode is BackendMode.TERMINATE
        if terminate and runtime.store is None:
            problems.append(f"listener {name} has no users loaded")
    problems += probe.unreachable()
    return problems


class AdminServer:
    def __init__(
        self,
        gateway: Gateway,
        metrics: Recorder | None,
        listen: Address,
        *,
        reuse_port: bool = False,
        pages: dict[str, Handler] | None = None,
        status_password: str | None = None,
        hostname: str = "localhost",
    ) -> None:
        self.gateway = gateway
        self.metrics = metrics
        self.listen = listen
        self.reuse_port = reuse_port
        self.probe = BackendProbe(gateway)
        self.pages = dict(pages or {})
        self.pages.setdefault("/", self._status_page)
        self.status_password = status_password
        self.hostname = hostname
        self.activity = Activity()
        self._sampler: asyncio.Task[None] | None = None
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve,
            self.listen.host,
            self.listen.port,
            reuse_port=self.reuse_port or None,
            family=socket.AF_UNSPEC,
            limit=REQUEST_LIMIT,
        )
        self.probe.start()
        self._sampler = asyncio.ensure_future(self._sample_forever())
        log.info("metrics: listening on %s", ", ".join(_fmt(s) for s in self._server.sockets))

    def address(self) -> tuple[str, int]:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    def _sample(self) -> None:
        counts = self.gateway.audit.counts
        attempts = counts.get("login", 0) + counts.get("login-failed", 0)
        self.activity.sample(time.time(), self.gateway.session_count, attempts)

    async def _sample_forever(self) -> None:
        while True:
            self._sample()
            await asyncio.sleep(ACTIVITY_SAMPLE)

    async def _status_page(self, path: str, peer: str) -> Response:
        # (The headers are checked in _serve: `authorized`.)
        gateway = self.gateway
        bound = gateway.all_addresses()
        per_listener: dict[str, int] = {}
        for session in list(gateway.live_sessions):
            runtime = getattr(session, "runtime", None)
            if runtime is not None:
                name = runtime.listener.name
                per_listener[name] = per_listener.get(name, 0) + 1
        guard = gateway.guard
        if isinstance(guard.addresses, MemoryState):
            blocks = guard.blocks()
        else:
            blocks = await asyncio.to_thread(guard.blocks)
        self._sample()  # up to this moment
        now = time.time()
        snapshot = Snapshot(
            version=importlib.metadata.version("authgate"),
            hostname=self.hostname,
            now=now,
            listeners=[
                (rt, [_fmt_address(a) for a in bound.get(rt.listener.name, [])],
                 per_listener.get(rt.listener.name, 0))
                for rt in gateway.runtimes
            ],
            activity=self.activity.series(now),
            blocks=blocks,
            events=list(gateway.audit.recent),
        )
        return Response(200, render(snapshot).encode(), "text/html; charset=utf-8",
                        headers={"Content-Security-Policy": CSP})

    def authorized(self, peer: str, headers: dict[str, str]) -> Response | None:
        """None when this client may see the status page; else the refusal."""
        if self.status_password is None:
            try:
                loopback = ipaddress.ip_address(peer.split("%", 1)[0]).is_loopback
            except ValueError:
                loopback = False
            if loopback:
                return None
            return Response(403, b"the status page is for loopback clients "
                                 b"(or set [metrics] status_password_file)\n")
        given = headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() == "basic":
            try:
                _, _, password = base64.b64decode(token, validate=True).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                password = ""
            if hmac.compare_digest(password.encode(), self.status_password.encode()):
                return None
        return Response(401, b"password required\n",
                        headers={"WWW-Authenticate": 'Basic realm="authgate", charset="UTF-8"'})

    async def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
            self._sampler = None
        await self.probe.stop()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        host = str(peer[0]) if isinstance(peer, tuple) else ""
        head = False
        try:
            try:
                request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, TimeoutError):
                return
            if len(request) > REQUEST_LIMIT:
                response = Response(400, b"request too long\n")
            else:
                method, _, rest = request.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
                target = rest.partition(" ")[0]
                head = method == "HEAD"
                path = target.partition("?")[0]
                refusal = self.authorized(host, _headers(request)) if path == "/" else None
                if method not in ("GET", "HEAD"):
                    response = Response(405, b"only GET\n", headers={"Allow": "GET, HEAD"})
                elif refusal is not None:
                    response = refusal
                else:
                    response = await self.handle(path, host)
            writer.write(_encode(response, head=head))
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        except (OSError, TimeoutError):
            pass
        except Exception:  # our bug: logged for us, a 500-less close for them
            log.exception("metrics listener: internal error")
        finally:
            writer.close()

    async def handle(self, path: str, peer: str) -> Response:
        if path == "/healthz":
            return Response(200, b"ok\n")
        if path == "/readyz":
            problems = readiness(self.gateway, self.probe)
            if problems:
                return Response(503, ("\n".join(problems) + "\n").encode())
            return Response(200, b"ready\n")
        if path == "/metrics" and self.metrics is not None:
            body, kind = await asyncio.to_thread(self.metrics.exposition)
            return Response(200, body, kind)
        page = self.pages.get(path)
        if page is not None:
            return await page(path, peer)
        return Response(404, b"not found\n")


def _encode(response: Response, *, head: bool = False) -> bytes:
    headers = {
        "Content-Type": response.content_type,
        "Content-Length": str(len(response.body)),
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
        "Connection": "close",
        **response.headers,
    }
    reason = _REASONS.get(response.status, "")
    lines = [f"HTTP/1.0 {response.status} {reason}"] + [f"{k}: {v}" for k, v in headers.items()]
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + (b"" if head else response.body)


def _headers(request: bytes) -> dict[str, str]:
    out = {}
    for line in request.split(b"\r\n")[1:]:
        name, sep, value = line.decode("latin-1").partition(":")
        if sep:
            out[name.strip().lower()] = value.strip()
    return out


def _fmt_address(address: tuple[str, int]) -> str:
    host, port = address[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _fmt(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
