"""App passwords on the command line (authgate.credentials.apps):

    authgate passwd USER --app LABEL [--protocols imap,smtp]   create, shown once
    authgate apps USER                                          list
    authgate apps USER --revoke LABEL                           revoke
    authgate apps USER --password-login no|yes                  main password off/on

The CLI finds the users file (and unlocks it when it is encrypted at rest)
and hands this module the loaded store.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from authgate.credentials.apps import APP_PROTOCOLS, AppPassword
from authgate.credentials.store import StoreError, UserStore
from authgate.errors import UserError

__all__ = ["add_commands", "create_app_password", "parse_protocols"]

# (args) -> (the store, the users file it came from)
OpenStore = Callable[[argparse.Namespace], tuple[UserStore, Path]]


def parse_protocols(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [p.strip().lower() for p in text.split(",") if p.strip()]
    if not names:
        raise UserError("--protocols lists no protocol")
    unknown = sorted(set(names) - APP_PROTOCOLS)
    if unknown:
        raise UserError(
            f"--protocols: unknown protocol {unknown[0]!r} "
            f"(expected {', '.join(sorted(APP_PROTOCOLS))})"
        )
    return names


def create_app_password(
    store: UserStore, users_file: Path, user: str, label: str, protocols: str | None
) -> int:
    """`authgate passwd USER --app LABEL`: generate, store hashed, show once."""
    limit = parse_protocols(protocols)
    try:
        password = store.add_app_password(user, label, limit)
        store.save(users_file)
    except StoreError as exc:
        raise UserError(str(exc)) from None
    where = f" for {', '.join(sorted(limit))}" if limit is not None else ""
    print(f"{users_file}: app password {label!r} created for {user}{where}")
    print(f"  {password}")
    print("  (shown only now: it is stored hashed and cannot be shown again)")
    print("  Send SIGHUP to a running authgate to load it.")
    return 0


def _describe(store: UserStore, user: str, app: AppPassword) -> str:
    created = app.created.strftime("%Y-%m-%d %H:%M:%SZ")
    usage = store.app_usage(user, app.label)
    used = (
        f"last used {usage.at.strftime('%Y-%m-%d %H:%M:%SZ')} from {usage.client}"
        if usage is not None
        else "never used"
    )
    protocols = ",".join(sorted(app.protocols)) if app.protocols is not None else "all"
    return f"  {app.label}\tcreated {created}\tprotocols {protocols}\t{used}"


def cmd_apps(args: argparse.Namespace, open_store: OpenStore) -> int:
    store, users_file = open_store(args)
    record = store.user(args.user)
    if record is None:
        raise UserError(f"{users_file}: no user {args.user!r}")
    if args.revoke is not None:
        if not store.revoke_app_password(args.user, args.revoke):
            raise UserError(f"{args.user} has no app password labelled {args.revoke!r}")
        store.save(users_file)
        store.save_usage()
        print(f"{users_file}: app password {args.revoke!r} of {args.user} revoked")
        print("  Send SIGHUP to a running authgate to stop accepting it.")
        return 0
    if args.password_login is not None:
        allowed = {"yes": True, "no": False}[args.password_login]
        store.set_password_login(args.user, allowed)
        store.save(users_file)
        state = "may" if allowed else "may no longer"
        print(f"{users_file}: {args.user}'s main password {state} log in to mail")
        return 0
    main = "yes" if record.password_login else "no (app passwords, OAuth or EXTERNAL only)"
    print(f"{args.user}: main password logs in: {main}")
    if not record.apps:
        print("  no app passwords")
    for app in record.apps:
        print(_describe(store, args.user, app))
    return 0


def add_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    open_store: OpenStore,
    store_options: Callable[[argparse.ArgumentParser], None],
) -> None:
    """Register `apps`; `store_options` adds the options `open_store` reads."""
    p = sub.add_parser("apps", help="list, revoke a user's app passwords; main password on/off")
    p.add_argument("user")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--revoke", metavar="LABEL", help="revoke the app password LABEL")
    what.add_argument(
        "--password-login",
        choices=("yes", "no"),
        help="whether the main password may log in to mail (no: app passwords only)",
    )
    store_options(p)
    p.set_defaults(func=lambda args: cmd_apps(args, open_store))
