"""The `route` sub-command, and the routing lines of `check` and
`negotiate`: where a user's session would go, and why (authgate.routing)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from authgate import config as config_mod
from authgate.config import Config, ConfigError, Listener
from authgate.credentials.base import CredentialStore
from authgate.credentials.store import StoreError
from authgate.errors import UserError
from authgate.offers import load_store
from authgate.proxy.routes import check_user_entries, load_table
from authgate.routing import Route, RouteTable, RoutingError, UserHints, choose

__all__ = [
    "add_commands",
    "check_user_entries",
    "cmd_route",
    "explain_route",
    "load_table",
    "route_json",
    "routing_summary",
]


def _hints(store: CredentialStore | None, user: str) -> UserHints:
    record = store.user(user) if store is not None else None
    return UserHints(entry=record.backend if record is not None else None)


def explain_route(
    config: Config,
    listener: Listener,
    store: CredentialStore | None,
    table: RouteTable | None,
    user: str | None,
) -> Route:
    """The route `user` takes on `listener` with every member up (a fresh
    process knows no health; `authgate run` may skip members marked down).
    Raises RoutingError."""
    return choose(
        user,
        listener.protocol.value,
        listener.route_default,
        config.backends,
        hints=_hints(store, user) if user else UserHints(),
        table=table,
        hosts=config.routing.hosts,
    )


def route_json(route: Route) -> dict[str, Any]:
    return {
        "name": route.backend.name,
        "why": route.why,
        "pool": len(route.order) > 1,
        "order": [str(m.address) for m in route.order],
        "address": str(route.candidates[0].address) if route.candidates else None,
    }


def routing_summary(config: Config, listener: Listener, table: RouteTable | None) -> list[str]:
    """`check`'s lines about where this listener's users go."""
    default = listener.route_default
    lines = [f"  routing: default {default.describe(listener.protocol.value)}"]
    if default.pool(listener.protocol.value):
        lines.append("    a pool: users spread by rendezvous hashing, failing over to live members")
    sources = ["users file `backend` entries"] if config.backends else []
    if config.routing.hosts:
        sources.append(f"directory attribute via [routing] hosts ({len(config.routing.hosts)})")
    if table is not None:
        sources.append(
            f"routing table {config.routing.table} ({len(table.users)} user(s), "
            f"{len(table.domains)} domain(s))"
        )
    if sources:
        lines.append("    per-user choices, in order: " + "; ".join(sources))
    for name, backend in config.backends.items():
        if not backend.members_for(listener.protocol.value):
            lines.append(
                f"    note: backends.{name} has no {listener.protocol.value} address: "
                "users routed there get a temporary failure on this listener"
            )
    return lines


def cmd_route(args: argparse.Namespace) -> int:
    try:
        config = config_mod.load(args.config)
        store = load_store(config)
        table = load_table(config)
        check_user_entries(config, store)
    except (ConfigError, StoreError) as exc:
        raise UserError(str(exc)) from None
    listeners = list(config.listeners)
    if args.listener:
        try:
            listeners = [config.listener(args.listener)]
        except ConfigError as exc:
            raise UserError(str(exc)) from None
    status = 0
    for listener in listeners:
        print(f"listener {listener.name} ({listener.protocol.value}): user {args.user!r}")
        try:
            route = explain_route(config, listener, store, table, args.user)
        except RoutingError as exc:
            print(f"  no backend: {exc} (the user gets a temporary failure)")
            status = 1
            continue
        for line in route.explain().splitlines():
            print(f"  {line}")
    return status


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("route", help="say which backend a user's sessions would go to, and why")
    p.add_argument("-c", "--config", type=Path, required=True)
    p.add_argument("user")
    p.add_argument("--listener", help="only this listener (default: every listener)")
    p.set_defaults(func=cmd_route)

