"""CPU time of one routing decision (authgate.routing.choose), per case.

    python -m bench.routing_micro

Process CPU time (not wall time), best of five runs of 100,000 calls, so a
busy shared machine slows it less than it slows bench.compare's figures.
"""

from __future__ import annotations

import time
import timeit
from collections.abc import Callable

from authgate.config import Address, BackendSettings
from authgate.routing import Backend, Health, RouteTable, UserHints, choose

one = Backend("store", (BackendSettings(Address("127.0.0.1", 143)),))
pool = Backend("pool", tuple(BackendSettings(Address("127.0.0.1", p)) for p in (1, 2, 3, 4)))
table = RouteTable(
    users={f"user{i}@example.org": "store" for i in range(10000)} | {"bench": "store"}
)
backends = {"store": one, "pool": pool}
h = Health()
cases: dict[str, Callable[[], object]] = {
    "single backend, no per-user source": lambda: choose(
        "bench", "imap", one, {}, health=h, now=1.0
    ),
    "routing table hit (10,000 users)": lambda: choose(
        "bench", "imap", one, backends, table=table, health=h, now=1.0
    ),
    "users file entry": lambda: choose(
        "bench",
        "imap",
        one,
        backends,
        hints=UserHints(entry="store"),
        table=table,
        health=h,
        now=1.0,
    ),
    "pool of 4 (rendezvous, 4 BLAKE2b)": lambda: choose(
        "bench", "imap", pool, backends, table=RouteTable(), health=h, now=1.0
    ),
}


def main() -> None:
    print("| routing decision | CPU µs |")
    print("|---|---:|")
    for name, fn in cases.items():
        n = 100000
        timer = timeit.Timer(fn, timer=time.process_time)
        best = min(timer.repeat(number=n, repeat=5)) / n * 1e6
        print(f"| {name} | {best:.1f} |")


if __name__ == "__main__":
    main()
