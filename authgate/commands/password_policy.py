"""The `expiry` sub-command (authgate.password_policy)."""

from __future__ import annotations

import argparse
import datetime
from collections.abc import Callable
from pathlib import Path
from typing import Any

from authgate.config import load
from authgate.credentials.store import StoreError, UserStore
from authgate.errors import ConfigError, UserError
from authgate.password_policy import TABLE, ExpiryState, ExpiryStatus, expiry_status

__all__ = ["add_commands", "cmd_expiry"]


def _describe(name: str, status: ExpiryStatus) -> str:
    if status.state is ExpiryState.EXPIRED:
        return f"{name}: expired on {status.expires}"
    days = "1 day" if status.days_left == 1 else f"{status.days_left} days"
    return f"{name}: expires in {days}, on {status.expires}"


def _wrap(action: Callable[[], Any]) -> Any:
    try:
        return action()
    except (ConfigError, StoreError) as exc:
        raise UserError(str(exc)) from None


def cmd_expiry(args: argparse.Namespace) -> int:
    config = _wrap(lambda: load(args.config))
    policy = config.password_policy
    if policy.expire_days is None:
        print(f"{config.path}: no password expiry is configured ([{TABLE}] expire_days)")
        return 0
    if config.users_file is None:
        raise UserError(f"{config.path}: no [users] file is configured")
    users_file = config.users_file
    store: UserStore = _wrap(lambda: UserStore.load(users_file))
    today: datetime.date = args.today or datetime.date.today()
    listed = 0
    undated: list[str] = []
    for name in sorted(store.names()):
        user = store.user(name)
        if user is None:  # removed meanwhile; cannot happen in this process
            continue
        status = expiry_status(policy, user.password_changed, today)
        if status.state is ExpiryState.UNKNOWN:
            undated.append(name)
        elif status.state is not ExpiryState.OK:
            print(_describe(name, status))
            listed += 1
    warn = max(policy.warn_days, default=0)
    if not listed:
        print(f"no password expires within {warn} days (expiry after {policy.expire_days} days)")
    if undated:
        print(
            f"no password_changed date, so no expiry: {', '.join(undated)} "
            "(add password_changed = YYYY-MM-DD to the users file)"
        )
    return 0


def _date(text: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD)") from None


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `expiry` on the CLI's subparsers."""
    p = sub.add_parser("expiry", help="list users whose passwords expire soon or have expired")
    p.add_argument("-c", "--config", type=Path, required=True)
    p.add_argument("--today", type=_date, help="pretend today is this date (YYYY-MM-DD)")
    p.set_defaults(func=cmd_expiry)
