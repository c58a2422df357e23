"""Connections, their pools, and the event-loop thread the TLS relays run in."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

import ldap  # type: ignore[import-untyped,unused-ignore]

from authgate.credentials.directory.errors import DirectoryUnavailable
from authgate.credentials.directory.transport import _Relay

T = TypeVar("T")


class _LoopThread:
    """A private event loop in a daemon thread, for the TLS relays."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                self._thread = threading.Thread(target=run, name="authgate-ldap-tls", daemon=True)
                self._thread.start()
                ready.wait()
                self._loop = loop
            return self._loop

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop())
        try:
            return future.result(timeout)
        except FutureTimeout:
            future.cancel()
            raise TimeoutError from None

    def call_soon(self, callback: Callable[[], object]) -> None:
        """Run `callback` in the loop's thread (now, if there is no loop)."""
        with self._lock:
            loop = self._loop
        if loop is None:
            callback()
            return
        try:
            loop.call_soon_threadsafe(callback)
        except RuntimeError:  # closed meanwhile: nobody else uses the sockets
            callback()

    def close(self) -> None:
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return

        async def shutdown() -> None:
            # Relays of just-unbound connections are still forwarding the
            # UnbindRequest: give them a moment, then cut the rest.
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            if tasks:
                _, pending = await asyncio.wait(tasks, timeout=1.0)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
            loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), loop)
        thread.join(5)
        if not thread.is_alive():
            loop.close()


class _Connection:
    """One libldap connection (and its TLS relay, when there is one)."""

    def __init__(self, conn: Any, relay: _Relay | None) -> None:
        self.ldap = conn
        self.relay = relay
        self.reused = False

    def alive(self) -> bool:
        return self.relay is None or not self.relay.closed.is_set()

    def close(self) -> None:
        # Unbinding closes libldap's end of the socketpair; the relay then
        # forwards the UnbindRequest and closes the TLS connection itself.
        with contextlib.suppress(ldap.LDAPError):
            self.ldap.unbind_s()


class _Pool:
    """At most `size` connections of one kind, busy or idle; idle ones are
    reused. Callers wait up to `wait` seconds for a free slot."""

    def __init__(self, name: str, opener: Callable[[], _Connection], size: int, wait: float):
        self._name = name
        self._open = opener
        self._size = size
        self._wait = wait
        self._slots = threading.BoundedSemaphore(size)
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    def acquire(self) -> _Connection:
        if not self._slots.acquire(timeout=self._wait):
            raise DirectoryUnavailable(f"all {self._size} {self._name} connections are busy")
        try:
            while True:
                with self._lock:
                    conn = self._idle.pop() if self._idle else None
                if conn is None:
                    return self._open()
                if conn.alive():
                    conn.reused = True
                    return conn
                conn.close()
        except BaseException:
            self._slots.release()
            raise

    def release(self, conn: _Connection) -> None:
        with self._lock:
            keep = not self._closed and conn.alive()
            if keep:
                self._idle.append(conn)
        if not keep:
            conn.close()
        self._slots.release()

    def discard(self, conn: _Connection, *, lost: bool = False) -> None:
        """Close a connection that failed. `lost`: the server dropped it, so
        the idle ones (as old or older) are most likely gone too."""
        conn.close()
        if lost:
            with self._lock:
                idle, self._idle = self._idle, []
            for other in idle:
                other.close()
        self._slots.release()

    def idle(self) -> int:
        with self._lock:
            return len(self._idle)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
