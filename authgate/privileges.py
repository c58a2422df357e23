"""Privilege drop: bind the ports as root, then serve as `user` (and `group`).

`authgate run` started as root with no `user` refuses to start unless told
(`run_as_root = true`, or AUTHGATE_RUN_AS_ROOT=1 in the environment, which
the test suite sets): a proxy facing the Internet should not hold root
while it parses what strangers send.

The drop happens in each serving process after its listeners (and the
metrics listener) are bound. With `workers = N` the supervisor stays root,
serving nothing: it only forwards signals and starts a new worker when one
dies, which must bind the ports again (as nginx's and Dovecot's master
processes do). A reload (SIGHUP) runs as the user: the config, the users
file and the certificates must stay readable by it, which is checked right
after the drop (and the run refused otherwise); a reload cannot bind a new
port below 1024.
"""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from authgate.errors import UserError

__all__ = ["ROOT_ENV", "RunAs", "check_start", "drop", "resolve"]

ROOT_ENV: Final = "AUTHGATE_RUN_AS_ROOT"


@dataclass(frozen=True)
class RunAs:
    """`user`, `group` and `run_as_root` from the top of the config."""

    user: str | None = None
    group: str | None = None  # default: the user's primary group
    run_as_root: bool = False


@dataclass(frozen=True)
class Identity:
    name: str
    uid: int
    gid: int
    group: str


def resolve(run_as: RunAs) -> Identity | None:
    """The account to switch to (None: stay as we are); UserError when it
    does not exist or is root."""
    if run_as.user is None:
        return None
    try:
        entry = pwd.getpwnam(run_as.user)
    except KeyError:
        raise UserError(f"user = {run_as.user!r}: no such user") from None
    if entry.pw_uid == 0:
        raise UserError(f"user = {run_as.user!r} is root: name an unprivileged account")
    gid = entry.pw_gid
    if run_as.group is not None:
        try:
            gid = grp.getgrnam(run_as.group).gr_gid
        except KeyError:
            raise UserError(f"group = {run_as.group!r}: no such group") from None
    if gid == 0:
        raise UserError(f"group {run_as.group or gid!r} is root's: name an unprivileged group")
    return Identity(run_as.user, entry.pw_uid, gid, grp.getgrgid(gid).gr_name)


def check_start(run_as: RunAs, *, environ: dict[str, str] | None = None) -> Identity | None:
    """Before binding: may this process run as it is? Returns the identity
    to switch to after binding (None: none)."""
    env = os.environ if environ is None else environ
    identity = resolve(run_as)
    euid = os.geteuid()
    if identity is None:
        if euid == 0 and not (run_as.run_as_root or env.get(ROOT_ENV) == "1"):
            raise UserError(
                "refusing to run as root: set user = \"authgate\" (an unprivileged account; "
                "the ports are bound first), or run_as_root = true to stay root"
            )
        return None
    if euid != 0 and euid != identity.uid:
        raise UserError(
            f"user = {identity.name!r}: switching users needs root (running as uid {euid})"
        )
    return identity if euid == 0 else None


def drop(identity: Identity, keep_readable: Iterable[Path]) -> None:
    """Become `identity` for good (groups, gid, uid: in that order, since
    each needs the privilege the next removes), then check that the files a
    reload reads are still readable. UserError when they are not."""
    os.setgroups([identity.gid])
    os.setgid(identity.gid)
    os.setuid(identity.uid)
    if os.getuid() == 0 or os.geteuid() == 0:  # pragma: no cover - a kernel that ignored us
        raise UserError("the privilege drop did not take effect")
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:  # pragma: no cover
        raise UserError("the privilege drop can be undone: refusing to serve")
    unreadable = [str(p) for p in keep_readable if not os.access(p, os.R_OK)]
    if unreadable:
        raise UserError(
            f"user {identity.name!r} cannot read {', '.join(unreadable)}: a reload (SIGHUP) "
            "would fail; make them readable to it (or its group)"
        )
