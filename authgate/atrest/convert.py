"""Encrypting and decrypting the secret files in place, resumably.

Every run works in three phases:

1. *Check everything, change nothing*: read every file, open every sealed
   one with the keyring, verify the audit log's chain. A wrong password, a
   damaged, truncated or swapped file stops the run here with the disk
   untouched (encrypt has not even written its keyring yet).
2. `encrypt` only: write the keyring (atomically) if there is none. It
   exists before any file is sealed, so a sealed file always has its key.
3. Convert each file still in the old form: write the new form to a
   temporary file, fsync, rename over the original, fsync the directory.

A file is therefore always whole in its old or its new form, whatever
moment the process dies at, and both forms are recognisable by their first
bytes: running the same command again skips what is done and finishes the
rest. `decrypt` removes the keyring only after the last file is plaintext.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from authgate import audit
from authgate.atrest.envelope import (
    DEFAULT_SCRYPT,
    AtRestError,
    Keyring,
    ScryptParams,
    atomic_write,
    create_keyring,
    fsync_dir,
    is_sealed,
    keyring_path,
    read_bytes,
    remove_stale_temps,
    test_pause,
    unlock,
)

__all__ = [
    "Action",
    "Kind",
    "Outcome",
    "SecretFile",
    "decrypt_files",
    "encrypt_files",
]


class Kind(enum.Enum):
    FILE = "file"  # sealed as a whole
    AUDIT_LOG = "audit log"  # sealed record by record, so appends never rewrite it


@dataclass(frozen=True)
class SecretFile:
    path: Path
    kind: Kind = Kind.FILE


class Action(enum.Enum):
    CONVERTED = "converted"
    ALREADY = "already done"
    MISSING = "does not exist"


@dataclass(frozen=True)
class Outcome:
    file: SecretFile
    action: Action


def _unique(files: Sequence[SecretFile]) -> list[SecretFile]:
    seen: dict[Path, SecretFile] = {}
    for item in files:
        key = Path(os.path.abspath(item.path))
        previous = seen.get(key)
        if previous is not None and previous.kind is not item.kind:
            raise AtRestError(f"{item.path} is configured both as a secret file and the audit log")
        seen.setdefault(key, item)
    return list(seen.values())


# ------------------------------------------------------------------ checks


def _sealed_form(item: SecretFile, data: bytes) -> bool:
    """Whether the file is in its sealed form (by its first bytes)."""
    if item.kind is Kind.AUDIT_LOG:
        return audit.log_form(data) is audit.LogForm.SEALED
    return is_sealed(data)


def _check(item: SecretFile, data: bytes, keyring: Keyring | None) -> bool:
    """Fully validate one file in whichever form it is in; its form.

    Raises AtRestError/AuditError (naming the file) when it cannot be used."""
    sealed = _sealed_form(item, data)
    if item.kind is Kind.AUDIT_LOG:
        if sealed and keyring is None:
            raise AtRestError(f"{item.path} is encrypted but there is no keyring")
        audit.reencode(data, str(item.path), keyring if sealed else None, None)
    elif sealed:
        if keyring is None:
            raise AtRestError(f"{item.path} is encrypted but there is no keyring (was it deleted?)")
        keyring.open_file(item.path.name, data, source=str(item.path))
    return sealed


def _preflight(files: Sequence[SecretFile], keyring: Keyring | None) -> dict[Path, bool]:
    forms: dict[Path, bool] = {}
    for item in files:
        if item.path.exists():
            forms[item.path] = _check(item, read_bytes(item.path), keyring)
    return forms


@contextlib.contextmanager
def _locked(item: SecretFile) -> Iterator[None]:
    """Hold the audit log's writer lock while converting it, so a running
    proxy's append lands before the conversion reads or after the rename
    (where the writer notices the new file)."""
    if item.kind is not Kind.AUDIT_LOG:
        yield
        return
    fd = os.open(item.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _convert(item: SecretFile, keyring: Keyring, *, seal: bool) -> Action:
    if not item.path.exists():
        return Action.MISSING
    with _locked(item):
        data = read_bytes(item.path)
        if _sealed_form(item, data) == seal:
            return Action.ALREADY
        source = str(item.path)
        if item.kind is Kind.AUDIT_LOG:
            new = (
                audit.reencode(data, source, None, keyring)
                if seal
                else audit.reencode(data, source, keyring, None)
            )
        elif seal:
            new = keyring.seal_file(item.path.name, data)
        else:
            new = keyring.open_file(item.path.name, data, source=source)
        test_pause()
        atomic_write(item.path, new, like=os.stat(item.path))
    return Action.CONVERTED


# -------------------------------------------------------------- commands


def encrypt_files(
    config_dir: Path,
    files: Sequence[SecretFile],
    password: str,
    *,
    params: ScryptParams | None = None,
) -> list[Outcome]:
    """Seal every file not yet sealed; make the keyring first if there is
    none (wrapping a new data key with `password`), else unlock it with
    `password`. Resumes an interrupted run. Nothing changes on disk when a
    check fails (see the module docstring)."""
    files = _unique(files)
    path = keyring_path(config_dir)
    keyring = unlock(config_dir, password) if path.exists() else None
    for stale in [path, *(item.path for item in files)]:
        remove_stale_temps(stale)
    _preflight(files, keyring)
    if keyring is None:
        keyring = create_keyring(config_dir, password, params=params or DEFAULT_SCRYPT)
    outcomes = []
    for item in files:
        test_pause()
        outcomes.append(Outcome(item, _convert(item, keyring, seal=True)))
    return outcomes


def decrypt_files(
    config_dir: Path,
    files: Sequence[SecretFile],
    password: str | None,
    *,
    keep_keyring: bool = False,
) -> list[Outcome]:
    """Open every sealed file back to plaintext, then delete the keyring
    (unless `keep_keyring`: backups made while encrypted need it). Resumes
    an interrupted run. `password` may be None only when there is no
    keyring (then nothing is encrypted and the files are just checked)."""
    files = _unique(files)
    path = keyring_path(config_dir)
    if not path.exists():
        _preflight(files, None)  # a sealed file without keyring is an error
        return [Outcome(f, Action.ALREADY if f.path.exists() else Action.MISSING) for f in files]
    if password is None:
        raise AtRestError(f"{path} exists: the admin password is needed to decrypt")
    keyring = unlock(config_dir, password)
    for stale in [path, *(item.path for item in files)]:
        remove_stale_temps(stale)
    _preflight(files, keyring)
    outcomes = []
    for item in files:
        test_pause()
        outcomes.append(Outcome(item, _convert(item, keyring, seal=False)))
    if not keep_keyring:
        test_pause()
        os.unlink(path)
        fsync_dir(path.parent)
    return outcomes
