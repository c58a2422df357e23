"""`authgate run`: the proxy in the foreground until SIGTERM/SIGINT.

SIGTERM/SIGINT: stop accepting, let sessions finish for `drain_timeout`
seconds, then close. SIGHUP: re-read the config, the users file and the
certificates; a bad new config is logged and the running one stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import os
import resource
import shutil
import signal
import tempfile
import time
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from authgate import config as config_mod
from authgate import metrics, privileges, sdnotify
from authgate.atrest.envelope import Keyring, open_secret_file
from authgate.audit import AuditLog
from authgate.config import Config, EventLoop
from authgate.credentials.base import CredentialStore
from authgate.defence import Guard
from authgate.logs import setup_logging as setup_logging  # the CLI's entry
from authgate.offers import load_store
from authgate.proxy.auditing import AuditTrail
from authgate.proxy.runtime import ListenerRuntime, build_runtime
from authgate.proxy.server import Gateway

log = logging.getLogger("authgate")

Notify = sdnotify.Notifier | sdnotify.WorkerReport


def raise_open_files_limit() -> int:
    """Raise the soft open-files limit to the hard one; returns the limit.
    Each proxied session holds two descriptors (client and backend)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return int(soft)


def verification_pool() -> ThreadPoolExecutor:
    """Password hashing runs here, one thread per core: enough to use the
    machine, few enough that a flood of guesses queues instead of starving
    the event loop's own threads."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="verify")
    return _POOL


_POOL: ThreadPoolExecutor | None = None


def load_runtime(path: Path, keyring: Keyring | None) -> tuple[Config, list[ListenerRuntime]]:
    """Config, users and certificates, ready to serve (raises on any problem)."""
    config = config_mod.load(path)
    store = load_store(config, verification_pool(), keyring)
    return config, build_runtime(config, store, keyring)


async def start_gateway(
    config: Config,
    store: CredentialStore | None,
    keyring: Keyring | None = None,
    *,
    reuse_port: bool = False,
) -> Gateway:
    audit_log = None
    if config.audit_file is not None:
        audit_log = await asyncio.to_thread(AuditLog.open, config.audit_file, keyring)
    # Off the loop: the first contact with Redis may take a few attempts.
    guard = await asyncio.to_thread(shared_guard, config, keyring)
    gateway = Gateway(
        build_runtime(config, store, keyring),
        config.defence,
        AuditTrail(audit_log),
        guard=guard,
        reuse_port=reuse_port,
    )
    await gateway.start()
    return gateway


def shared_guard(config: Config, keyring: Keyring | None) -> Guard | None:
    """A Guard whose counters live in Redis ([defence] redis_url), so an
    attacker spreading guesses over instances is still blocked; None keeps
    the in-memory default. Wall-clock time, since instances compare it."""
    shared = config.shared_defence
    if shared is None:
        return None
    from authgate.defence_redis import make_backend, shared_secret

    secret = open_secret_file(shared.secret_file, keyring).strip()
    backend = make_backend(shared.redis_url, max_keys=config.defence.max_tracked)
    return Guard(config.defence, clock=time.time, secret=shared_secret(secret), backend=backend)


async def wait_for_stop_signal(on_reload: asyncio.Event | None = None) -> None:
    """Return on the first SIGTERM or SIGINT; set `on_reload` on SIGHUP."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    handled = [signal.SIGTERM, signal.SIGINT]
    for sig in handled:
        loop.add_signal_handler(sig, stop.set)
    if on_reload is not None:
        loop.add_signal_handler(signal.SIGHUP, on_reload.set)
        handled.append(signal.SIGHUP)
    try:
        await stop.wait()
    finally:
        for sig in handled:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)


async def _reloader(
    gateway: Gateway,
    path: Path,
    keyring: Keyring | None,
    requested: asyncio.Event,
    notify: Notify,
) -> None:
    while True:
        await requested.wait()
        requested.clear()
        notify.reloading()
        log.info("reloading %s", path)
        try:
            # Reading and hashing happen off the loop: sessions keep flowing.
            config, runtimes = await asyncio.to_thread(load_runtime, path, keyring)
            await gateway.reload(runtimes, config.defence)
        except Exception as exc:  # any problem: keep serving the old settings
            log.error("reload failed, keeping the running configuration: %s", exc)
            metrics.recorder().reload(ok=False)
        else:
            log.info("reloaded: %d listener(s)", len(runtimes))
            metrics.recorder().reload(ok=True)
        finally:
            notify.reloaded()  # the old or the new settings: serving either way


def run(config: Config, store: CredentialStore | None, keyring: Keyring | None) -> int:
    """`authgate run`: one event loop, or `workers` processes sharing the
    listening ports (SO_REUSEPORT) under a supervisor that forwards
    SIGTERM/SIGINT/SIGHUP and restarts a worker that dies. Returns the exit
    status."""
    identity = privileges.check_start(config.run_as)
    limit = raise_open_files_limit()
    log.info("open files limit %d: room for about %d proxied sessions", limit, (limit - 64) // 2)
    if config.workers == 1:
        if config.metrics.listen is not None:
            metrics.enable()
        notifier = sdnotify.Notifier()
        run_loop(config, serve(config, store, keyring, identity=identity, notify=notifier))
        return 0
    if config.shared_defence is None:
        log.warning(
            "%d workers keep separate brute-force counters: set [defence] redis_url to "
            "share them",
            config.workers,
        )
    build_runtime(config, store, keyring)  # certificates etc.: fail here, not in every worker
    samples = None
    if config.metrics.listen is not None:
        # The workers' samples, in files one scrape adds up; fresh each start.
        samples = Path(tempfile.mkdtemp(prefix="authgate-metrics-"))
        if identity is not None:  # the workers write their samples as the user
            os.chown(samples, identity.uid, identity.gid)
        metrics.enable(samples)
    try:
        return _supervise(config, store, keyring, identity)
    finally:
        if samples is not None:
            shutil.rmtree(samples, ignore_errors=True)


def run_loop(config: Config, main: Coroutine[Any, Any, None]) -> None:
    """Run `main` on the event loop the config asks for (a change takes a
    restart, not a SIGHUP)."""
    if config.event_loop is EventLoop.UVLOOP:
        import uvloop  # not on every platform; config.load checked it is there

        log.info("event loop: uvloop %s", importlib.metadata.version("uvloop"))
        uvloop.run(main)
    else:
        log.info("event loop: asyncio")
        asyncio.run(main)


WORKER_START_GRACE = 2.0  # seconds: a worker dying sooner failed to start


def _supervise(
    config: Config,
    store: CredentialStore | None,
    keyring: Keyring | None,
    identity: privileges.Identity | None,
) -> int:
    children: dict[int, tuple[int, float]] = {}  # pid -> (worker number, start time)
    stopping = False
    # systemd hears from this process only; the workers report through a pipe.
    notifier = sdnotify.Notifier()
    relay = None
    if notifier.enabled:
        relay = sdnotify.SupervisorRelay(
            notifier, config.workers, sdnotify.watchdog_interval()
        )

    def spawn(number: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker: its own event loop, the parent's settings
            status = 0
            try:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    signal.signal(sig, signal.SIG_DFL)
                notify: Notify = sdnotify.Notifier({})  # off
                if relay is not None:
                    os.close(relay.read_fd)
                    notify = sdnotify.WorkerReport(relay.write_fd, number, relay.interval)
                main = serve(
                    config,
                    store,
                    keyring,
                    reuse_port=True,
                    identity=identity,
                    notify=notify,
                    worker=number,
                )
                run_loop(config, main)
            except BaseException:
                log.exception("worker %d failed", number)
                status = 1
            finally:
                logging.shutdown()
                os._exit(status)
        children[pid] = (number, time.monotonic())

    def forward(sig: int, _frame: object) -> None:
        nonlocal stopping
        if sig != signal.SIGHUP:
            if not stopping:
                notifier.stopping()
            stopping = True
        elif relay is not None:
            relay.reloading()
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    for number in range(config.workers):
        spawn(number)
    log.info("%d workers started", config.workers)
    failed = False
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        if pid not in children:
            continue
        number, started = children.pop(pid)
        metrics.worker_died(pid)
        if stopping:
            continue
        failed = True
        if time.monotonic() - started < WORKER_START_GRACE:
            # Dying at start (a port taken, say) would only repeat: give up.
            log.error("worker %d (pid %d) failed at start: stopping", number, pid)
            forward(signal.SIGTERM, None)
            continue
        log.error("worker %d (pid %d) exited (%#x): starting a new one", number, pid, status)
        spawn(number)
    return 1 if failed else 0


def reload_reads(config: Config) -> list[Path]:
    """The files a reload reads again (they must stay readable after the drop)."""
    files = [config.path]
    for path in (config.users_file, config.tls.cert, config.tls.key):
        if path is not None:
            files.append(path)
    if config.shared_defence is not None:
        files.append(config.shared_defence.secret_file)
    return files


async def serve(
    config: Config,
    store: CredentialStore | None,
    keyring: Keyring | None,
    *,
    reuse_port: bool = False,
    identity: privileges.Identity | None = None,
    notify: Notify | None = None,
    worker: int | None = None,
) -> None:
    """One event loop until SIGTERM/SIGINT. `keyring` unlocks files
    encrypted at rest; it stays in memory for reloads (a rekey changes only
    its wrapping)."""
    gateway = await start_gateway(config, store, keyring, reuse_port=reuse_port)
    admin = None
    if config.metrics.listen is not None:
        from authgate.proxy.admin import AdminServer

        recorder = metrics.recorder()
        password = None
        if config.metrics.status_password_file is not None:
            secret = open_secret_file(config.metrics.status_password_file, keyring)
            password = secret.decode("utf-8").strip()
        admin = AdminServer(
            gateway,
            recorder if isinstance(recorder, metrics.Recorder) else None,
            config.metrics.listen,
            reuse_port=reuse_port,
            status_password=password or None,
            hostname=config.hostname,
        )
        await admin.start()
    control = None
    if config.control.socket is not None:
        from authgate.proxy.control import ControlServer, socket_paths

        paths = socket_paths(config.control.socket, config.workers)
        control = ControlServer(gateway, paths[worker or 0])
        await control.start(None if identity is None else (identity.uid, identity.gid))
    if identity is not None:
        # Every port is bound: serve as the user from here on.
        privileges.drop(identity, reload_reads(config))
        log.info(
            "serving as user %s (uid %d), group %s", identity.name, identity.uid, identity.group
        )
    notify = notify or sdnotify.Notifier({})
    notify.ready(f"serving {len(gateway.runtimes)} listener(s)")
    notify.start_watchdog(sdnotify.watchdog_interval())
    reload_requested = asyncio.Event()
    reloader = asyncio.ensure_future(
        _reloader(gateway, config.path, keyring, reload_requested, notify)
    )
    try:
        await wait_for_stop_signal(reload_requested)
    finally:
        reloader.cancel()
        if admin is not None:
            await admin.stop()
        if control is not None:
            await control.stop()
    notify.stopping()
    await notify.stop_watchdog()
    drain = config.limits.drain_timeout
    log.info("stopping: no new connections; %d session(s) get %gs", gateway.session_count, drain)
    await gateway.stop(drain=drain)
    log.info("stopped")
