"""The `encrypt`, `decrypt`, `rekey` and `log` sub-commands (authgate.atrest).

The admin password comes from `--password-file PATH` (first line), else the
AUTHGATE_PASSWORD environment variable, else a prompt on the terminal
(asked twice when a new password is set). It is never echoed, printed or
logged; the environment variable is removed from our environment once
read so child processes do not inherit it.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import stat
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from authgate import audit
from authgate.atrest.convert import (
    Action,
    Kind,
    Outcome,
    SecretFile,
    _unique,
    decrypt_files,
    encrypt_files,
)
from authgate.atrest.envelope import (
    TEST_SCRYPT_ENV,
    TEST_SLOW_IO_ENV,
    Keyring,
    keyring_path,
    read_bytes,
    rewrap_keyring,
    scrypt_params_for_new_keyring,
    unlock,
)
from authgate.config import load as load_config
from authgate.errors import UserError

__all__ = [
    "MIN_PASSWORD_LENGTH",
    "NEW_PASSWORD_ENV",
    "PASSWORD_ENV",
    "add_commands",
    "audit_file_from_config",
    "main",
    "read_password",
    "secret_files_from_config",
]

# Names of environment variables, not passwords.
PASSWORD_ENV = "AUTHGATE_PASSWORD"  # noqa: S105
NEW_PASSWORD_ENV = "AUTHGATE_NEW_PASSWORD"  # noqa: S105
# The keyring is only as strong as this password against offline guessing
# (scrypt slows each guess, it cannot make a short password long).
MIN_PASSWORD_LENGTH = 10


def audit_file_from_config(config: Path) -> Path | None:
    """`[audit] file`, resolved against the config's folder."""
    return load_config(config).audit_file


def secret_files_from_config(config: Path) -> list[SecretFile]:
    """The files holding secrets that a config names: `[users] file`, every
    listener's and [backends] entry's `master_password_file`, `[audit] file`. Loading the
    config reads none of them, so this works on files already encrypted."""
    settings = load_config(config)
    found: list[SecretFile] = []
    if settings.users_file is not None:
        found.append(SecretFile(settings.users_file))
    for listener in settings.listeners:
        if listener.backend.master_password_file is not None:
            found.append(SecretFile(listener.backend.master_password_file))
    for backend in settings.backends.values():  # [backends.NAME] master_password_file
        if not backend.all_members():
            continue  # a referral only
        password_file = backend.settings_any().master_password_file
        if password_file is not None:
            found.append(SecretFile(password_file))
    if settings.shared_defence is not None:
        found.append(SecretFile(settings.shared_defence.secret_file))
    if settings.audit_file is not None:
        found.append(SecretFile(settings.audit_file, Kind.AUDIT_LOG))
    return _unique(found)


def read_password(
    password_file: Path | None,
    *,
    env_var: str = PASSWORD_ENV,
    prompt: str = "Admin password: ",
    new: bool = False,
) -> str:
    """The admin password from the file, the environment or the terminal.
    `new`: a password being set: asked twice, and a minimum length."""
    if password_file is not None:
        password = _from_file(password_file)
    elif env_var in os.environ:
        password = os.environ.pop(env_var)
    else:
        if not sys.stdin.isatty():
            raise UserError(
                f"no terminal to ask for the password: use --password-file or {env_var}"
            )
        password = getpass.getpass(prompt)
        if new and getpass.getpass("Repeat it: ") != password:
            raise UserError("the passwords do not match")
    if not password:
        raise UserError("the password is empty")
    if new and len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(
            f"the password is too short: use at least {MIN_PASSWORD_LENGTH} characters "
            "(it is all that protects the keyring from offline guessing)"
        )
    return password


def _from_file(path: Path) -> str:
    try:
        raw = path.read_bytes()
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        print(f"warning: {path} is accessible to other users (chmod 600 it)", file=sys.stderr)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None
    return text.split("\n", 1)[0].rstrip("\r")


def _warn_test_hooks() -> None:
    for name in (TEST_SCRYPT_ENV, TEST_SLOW_IO_ENV):
        if os.environ.get(name):
            print(f"warning: test hook {name} is set: not for real use", file=sys.stderr)


def _config_dir(config: Path) -> Path:
    return config.parent


def _config_files(config: Path) -> list[SecretFile]:
    if not config.is_file():
        raise UserError(f"{config}: no such config file")
    return secret_files_from_config(config)


def _report(outcomes: Sequence[Outcome], done: str, already: str) -> None:
    for outcome in outcomes:
        path = outcome.file.path
        if outcome.action is Action.CONVERTED:
            print(f"{path}: {done}")
        elif outcome.action is Action.ALREADY:
            print(f"{path}: {already}")
        elif outcome.file.kind is Kind.AUDIT_LOG:
            print(f"{path}: does not exist yet (it is created in the current form)")
        else:
            print(f"{path}: does not exist (skipped)")


# --------------------------------------------------------------- commands


def cmd_encrypt(args: argparse.Namespace) -> int:
    config: Path = args.config
    files = _config_files(config)
    _warn_test_hooks()
    ring = keyring_path(_config_dir(config))
    if ring.exists():
        # Resuming (or re-running): the keyring's password, asked once.
        password = read_password(args.password_file)
    else:
        password = read_password(
            args.password_file, prompt="New admin password for encryption: ", new=True
        )
    params, _weak = scrypt_params_for_new_keyring()
    outcomes = encrypt_files(_config_dir(config), files, password, params=params)
    _report(outcomes, "encrypted", "already encrypted")
    print(
        f"keyring: {ring}. Keep it and the password safe: without both, the encrypted "
        "files cannot be read. `authgate rekey` changes the password."
    )
    return 0


def cmd_decrypt(args: argparse.Namespace) -> int:
    config: Path = args.config
    files = _config_files(config)
    _warn_test_hooks()
    ring = keyring_path(_config_dir(config))
    password = read_password(args.password_file) if ring.exists() else None
    outcomes = decrypt_files(_config_dir(config), files, password, keep_keyring=args.keep_keyring)
    _report(outcomes, "decrypted", "not encrypted")
    if password is None:
        print(f"no keyring at {ring}: nothing was encrypted")
    elif args.keep_keyring:
        print(f"keyring kept: {ring}")
    else:
        print(f"keyring removed: {ring}; encryption is off")
    return 0


def cmd_rekey(args: argparse.Namespace) -> int:
    config: Path = args.config
    _warn_test_hooks()
    ring = keyring_path(_config_dir(config))
    if not ring.exists():
        raise UserError(f"no keyring at {ring}: nothing is encrypted")
    old = read_password(args.password_file, prompt="Current admin password: ")
    # Check the old password before asking for a new one twice.
    unlock(_config_dir(config), old)
    new = read_password(
        args.new_password_file,
        env_var=NEW_PASSWORD_ENV,
        prompt="New admin password: ",
        new=True,
    )
    params, _weak = scrypt_params_for_new_keyring()
    rewrap_keyring(_config_dir(config), old, new, params=params)
    print(f"{ring}: password changed; no data file was rewritten")
    return 0


def cmd_log(args: argparse.Namespace) -> int:
    config: Path = args.config
    if not config.is_file():
        raise UserError(f"{config}: no such config file")
    path = audit_file_from_config(config)
    if path is None:
        raise UserError(f"{config}: no [audit] file is configured")
    if not path.exists():
        raise UserError(f"{path} does not exist (nothing has been logged yet)")
    ring = keyring_path(_config_dir(config))
    keyring: Keyring | None = None
    if ring.exists():
        keyring = unlock(_config_dir(config), read_password(args.password_file))
    reader = audit.LogReader(keyring, str(path))
    data = read_bytes(path)
    _show(reader.feed(data), args)
    if args.follow and not args.verify:
        return _follow(path, reader, len(data), args)
    reader.finish()
    for problem in reader.problems:
        print(problem, file=sys.stderr)
    if reader.problems:
        print(f"{path}: verification FAILED ({len(reader.problems)} problem(s))", file=sys.stderr)
        return 1
    if args.verify:
        last = f", #0..#{reader.last_seq}" if reader.last_seq is not None else ""
        kind = (
            "encrypted, keyed chain"
            if reader.form is audit.LogForm.SEALED
            else "plaintext, unkeyed chain: detects damage, not a determined editor"
        )
        print(f"{path}: {reader.count} record(s){last}; chain intact ({kind})")
    return 0


def _show(records: list[dict[str, Any]], args: argparse.Namespace) -> None:
    if args.verify:
        return
    for record in records:
        if args.json:
            print(json.dumps(record, ensure_ascii=True))
        else:
            print(audit.format_record(record))
    sys.stdout.flush()


def _follow(path: Path, reader: audit.LogReader, offset: int, args: argparse.Namespace) -> int:
    """Print records as they are appended, verifying the chain as it goes,
    until interrupted or the file is replaced."""
    reported = 0
    with open(path, "rb") as handle:
        inode = os.fstat(handle.fileno()).st_ino
        handle.seek(offset)
        while True:
            _show(reader.feed(handle.read()), args)
            for problem in reader.problems[reported:]:
                print(problem, file=sys.stderr)
            reported = len(reader.problems)
            try:
                replaced = os.stat(path).st_ino != inode
            except FileNotFoundError:
                replaced = True
            if replaced:
                print(
                    f"{path} was replaced (rotated, encrypted or decrypted): run again",
                    file=sys.stderr,
                )
                return 1 if reader.problems else 0
            time.sleep(args.interval)


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register encrypt, decrypt, rekey and log on the CLI's sub-parsers."""
    pw_help = (
        f"read the admin password from the first line of this file (else ${PASSWORD_ENV}, "
        "else a prompt)"
    )

    p = sub.add_parser(
        "encrypt",
        help="encrypt the users file, master password files and audit log at rest",
        description="Encrypt every secret file the config names, in place. Safe to "
        "interrupt: running it again finishes the job.",
    )
    p.add_argument("-c", "--config", type=Path, required=True)
    p.add_argument("--password-file", type=Path, help=pw_help)
    p.set_defaults(func=cmd_encrypt)

    p = sub.add_parser(
        "decrypt",
        help="decrypt the secret files back to plaintext and turn encryption off",
        description="Decrypt every encrypted file the config names, then remove the "
        "keyring. Safe to interrupt: running it again finishes the job.",
    )
    p.add_argument("-c", "--config", type=Path, required=True)
    p.add_argument("--password-file", type=Path, help=pw_help)
    p.add_argument(
        "--keep-keyring",
        action="store_true",
        help="keep the keyring (backups taken while encrypted need it)",
    )
    p.set_defaults(func=cmd_decrypt)

    p = sub.add_parser(
        "rekey",
        help="change the admin password of the encryption keyring",
        description="Re-wrap the data key under a new password. No data file is rewritten.",
    )
    p.add_argument("-c", "--config", type=Path, required=True)
    p.add_argument("--password-file", type=Path, help="the current password: " + pw_help)
    p.add_argument(
        "--new-password-file",
        type=Path,
        help=f"the new password from this file (else ${NEW_PASSWORD_ENV}, else a prompt)",
    )
    p.set_defaults(func=cmd_rekey)

    p = sub.add_parser(
        "log",
        help="print (and verify) the audit log",
        description="Print the audit log, decrypting it when encryption is on, and check "
        "its hash chain. Exit status 1 when records were deleted, inserted or modified.",
    )
    p.add_argument("-c", "--config", type=Path, required=True)
    p.add_argument("--password-file", type=Path, help=pw_help)
    p.add_argument("--verify", action="store_true", help="only verify the chain and summarise")
    p.add_argument("--json", action="store_true", help="one JSON object per record")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new records")
    p.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_log)


def main(argv: Sequence[str] | None = None) -> int:
    """These commands alone (`python -m authgate.atrest ...`), with the
    error handling of `authgate`."""
    parser = argparse.ArgumentParser(prog="authgate")
    add_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    try:
        status: int = args.func(args)
    except UserError as exc:
        print(f"authgate: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return status
