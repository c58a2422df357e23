"""What authgate counts, in Prometheus's data model (prometheus_client).

The sessions, the listeners and the runner call the recorder (`recorder()`)
at each fact worth counting; until `enable()` is called it is a no-op
recorder (`[metrics]` off: nothing is counted, nothing costs). With
`workers = N` each worker process writes its samples to files in a
directory the supervisor made (prometheus_client's multiprocess mode), and
whichever worker answers a scrape adds up all of them: one scrape sees the
whole instance. Gauges then sum the live workers' values; a dead worker's
are removed by the supervisor (`worker_died`).

Label values are listener names, backend addresses, mechanism names and
fixed reason words: never a user name or a client address (unbounded, and
personal data).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Final

__all__ = ["METRIC_NAMES", "NullRecorder", "Recorder", "enable", "recorder", "worker_died"]

# Login durations: authgate's part (a hash, a backend login) is milliseconds
# to a few seconds; the failure delays of the defence are in the top buckets.
DURATION_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"


class NullRecorder:
    """[metrics] off: every call does nothing."""

    enabled = False

    def connection_accepted(self, listener: str) -> None:
        pass

    def connection_refused(self, listener: str, reason: str) -> None:
        pass

    def session_started(self, listener: str) -> None:
        pass

    def session_ended(self, listener: str) -> None:
        pass

    def preauth_started(self, listener: str) -> None:
        pass

    def preauth_ended(self, listener: str) -> None:
        pass

    def login(
        self, listener: str, mechanism: str, outcome: str, reason: str, seconds: float
    ) -> None:
        pass

    def penalty(self, listener: str, seconds: float) -> None:
        pass

    def blocked(self, listener: str) -> None:
        pass

    def backend_failure(self, backend: str, stage: str) -> None:
        pass

    def warm_claim(self, backend: str, result: str) -> None:
        pass

    def spliced(self, listener: str, up: int, down: int) -> None:
        pass

    def tls_handshake(self, listener: str, ok: bool) -> None:
        pass

    def reload(self, ok: bool) -> None:
        pass


class Recorder(NullRecorder):
    """The metrics themselves (created once per process, in `enable`)."""

    enabled = True

    def __init__(self, multiprocess_dir: Path | None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values

        self.multiprocess_dir = multiprocess_dir
        if multiprocess_dir is not None:
            # prometheus_client picks its value class when imported; it may
            # have been imported before the directory existed.
            os.environ[MULTIPROC_ENV] = str(multiprocess_dir)
            values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._accepted = Counter(
            "authgate_connections_accepted", "Connections accepted", ["listener"], registry=r
        )
        self._refused = Counter(
            "authgate_connections_refused",
            "Connections refused at accept (over a connection cap)",
            ["listener", "reason"],
            registry=r,
        )
        self._logins = Counter(
            "authgate_logins",
            "Login attempts by outcome (ok, failed, refused, blocked, cancelled, error)",
            ["listener", "mechanism", "outcome"],
            registry=r,
        )
        self._refusals = Counter(
            "authgate_policy_refusals",
            "Login attempts refused by policy, by reason",
            ["listener", "reason"],
            registry=r,
        )
        self._penalties = Counter(
            "authgate_defence_penalties",
            "Failed guesses answered after a defence delay",
            ["listener"],
            registry=r,
        )
        self._penalty_seconds = Counter(
            "authgate_defence_penalty_seconds",
            "Seconds of defence delay imposed",
            ["listener"],
            registry=r,
        )
        self._blocks = Counter(
            "authgate_defence_blocks",
            "Connections and attempts refused because the address is blocked",
            ["listener"],
            registry=r,
        )
        self._backend_failures = Counter(
            "authgate_backend_failures",
            "Backend failures by stage (connect, login)",
            ["backend", "stage"],
            registry=r,
        )
        self._warm = Counter(
            "authgate_backend_warm_claims",
            "Logins that asked a backend member's warm connections for one, by "
            "result (hit; miss: none ready; stale: one found closed or too old, dropped)",
            ["backend", "result"],
            registry=r,
        )
        self._sessions = Gauge(
            "authgate_sessions_active",
            "Connections being served (pre-authentication and spliced)",
            ["listener"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self._preauth = Gauge(
            "authgate_sessions_preauth",
            "Connections not yet authenticated",
            ["listener"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self._duration = Histogram(
            "authgate_login_duration_seconds",
            "authgate's part of a login attempt, first lookup to outcome",
            ["listener"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self._spliced = Counter(
            "authgate_spliced_bytes",
            "Bytes spliced after authentication (up: client to backend)",
            ["listener", "direction"],
            registry=r,
        )
        self._tls = Counter(
            "authgate_tls_handshakes",
            "TLS handshakes with clients (implicit TLS and STARTTLS) by result",
            ["listener", "result"],
            registry=r,
        )
        self._reloads = Counter(
            "authgate_reloads", "Configuration reloads (SIGHUP) by result", ["result"], registry=r
        )

    def _c(self, metric: Any, *labels: str) -> Any:
        """The metric's child for these label values, looked up once: the
        library's labels() takes a lock and builds keys on every call, which
        on the login path cost more than the count itself."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def connection_accepted(self, listener: str) -> None:
        self._c(self._accepted, listener).inc()

    def connection_refused(self, listener: str, reason: str) -> None:
        self._c(self._refused, listener, reason).inc()

    def session_started(self, listener: str) -> None:
        self._c(self._sessions, listener).inc()

    def session_ended(self, listener: str) -> None:
        self._c(self._sessions, listener).dec()

    def preauth_started(self, listener: str) -> None:
        self._c(self._preauth, listener).inc()

    def preauth_ended(self, listener: str) -> None:
        self._c(self._preauth, listener).dec()

    def login(
        self, listener: str, mechanism: str, outcome: str, reason: str, seconds: float
    ) -> None:
        self._c(self._logins, listener, mechanism, outcome).inc()
        if outcome == "refused":
            self._c(self._refusals, listener, reason).inc()
        if outcome != "blocked":
            self._c(self._duration, listener).observe(seconds)

    def penalty(self, listener: str, seconds: float) -> None:
        self._c(self._penalties, listener).inc()
        self._c(self._penalty_seconds, listener).inc(seconds)

    def blocked(self, listener: str) -> None:
        self._c(self._blocks, listener).inc()

    def backend_failure(self, backend: str, stage: str) -> None:
        self._c(self._backend_failures, backend, stage).inc()

    def warm_claim(self, backend: str, result: str) -> None:
        self._c(self._warm, backend, result).inc()

    def spliced(self, listener: str, up: int, down: int) -> None:
        self._c(self._spliced, listener, "up").inc(up)
        self._c(self._spliced, listener, "down").inc(down)

    def tls_handshake(self, listener: str, ok: bool) -> None:
        self._c(self._tls, listener, "ok" if ok else "failed").inc()

    def reload(self, ok: bool) -> None:
        self._c(self._reloads, "ok" if ok else "failed").inc()

    def exposition(self) -> tuple[bytes, str]:
        """The text format of every metric (all workers' in multiprocess
        mode) and its content type. Reads files in multiprocess mode: call
        it off the event loop."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        registry: Any = self.registry
        if self.multiprocess_dir is not None:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=str(self.multiprocess_dir))  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST


# The metric names as exposed (counters get _total), for the README and tests.
METRIC_NAMES: Final = (
    "authgate_connections_accepted_total",
    "authgate_connections_refused_total",
    "authgate_logins_total",
    "authgate_policy_refusals_total",
    "authgate_defence_penalties_total",
    "authgate_defence_penalty_seconds_total",
    "authgate_defence_blocks_total",
    "authgate_backend_failures_total",
    "authgate_sessions_active",
    "authgate_sessions_preauth",
    "authgate_login_duration_seconds",
    "authgate_spliced_bytes_total",
    "authgate_tls_handshakes_total",
    "authgate_reloads_total",
)

_RECORDER: NullRecorder = NullRecorder()


def recorder() -> NullRecorder:
    """The process's recorder (a NullRecorder until `enable`)."""
    return _RECORDER


def enable(multiprocess_dir: Path | None = None) -> Recorder:
    """Start counting (once per process; before forking workers, with the
    directory they share)."""
    global _RECORDER
    if isinstance(_RECORDER, Recorder):
        return _RECORDER
    made = Recorder(multiprocess_dir)
    _RECORDER = made
    return made


def worker_died(pid: int) -> None:
    """The supervisor's bookkeeping when a worker exits: its live gauges go."""
    current = _RECORDER
    if isinstance(current, Recorder) and current.multiprocess_dir is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, str(current.multiprocess_dir))  # type: ignore[no-untyped-call]
