"""Encryption at rest: keyring, sealed files, encrypt/decrypt/rekey commands,
tamper and wrong-password cases, and interruption by SIGKILL at random moments.

Every keyring made here uses scrypt n = 2**10 (the AUTHGATE_TEST_SCRYPT_LOG2N
test hook, or ScryptParams(log2_n=10)) so the suite stays fast; the default
is 2**17.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import getpass
import hashlib
import io
import json
import os
import pickle
import random
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from authgate import atrest, audit
from authgate.atrest import convert, envelope
from authgate.atrest.convert import Kind, SecretFile
from authgate.atrest.envelope import (
    AtRestError,
    DamagedFile,
    Keyring,
    Locked,
    PlaintextRefused,
    ScryptParams,
    WrongPassword,
)
from authgate.commands import atrest as commands
from authgate.errors import UserError

WEAK = ScryptParams(log2_n=10)  # tests only
PASSWORD = "correct horse battery staple"
NEW_PASSWORD = "tr0ub4dor & 3 more words"
USERS_TOML = b'realm = "example.org"\n\n[users.alice]\nsecrets = ["{SSHA}abcdefghijkl"]\n'
MASTER = b"master-secret-one\n"
MASTER2 = b"another master secret\n"
TMP_SUFFIX = ".authgate-tmp"

CONFIG = """\
hostname = "mail.example.org"

[users]
file = "users.toml"

[audit]
file = "logs/audit.log"

[[listeners]]
name = "imap"
protocol = "imap"
listen = "127.0.0.1:1143"
[listeners.backend]
address = "127.0.0.1:2143"
master_user = "authgate"
master_password_file = "master.secret"

[[listeners]]
name = "pop3"
protocol = "pop3"
listen = "127.0.0.1:1110"
[listeners.backend]
address = "127.0.0.1:2110"
master_user = "authgate"
master_password_file = "secrets/master2.secret"

[[listeners]]
name = "imap2"
protocol = "imap"
listen = "127.0.0.1:1144"
backend = "127.0.0.1:2144"
"""


@dataclass
class Site:
    root: Path
    config: Path
    users: Path
    master: Path
    master2: Path
    log: Path
    pwfile: Path
    originals: dict[Path, bytes]

    @property
    def keyring(self) -> Path:
        return self.root / "authgate.keyring"

    @property
    def secret_files(self) -> list[Path]:
        return [self.users, self.master, self.master2, self.log]


def make_site(root: Path) -> Site:
    root.mkdir(parents=True, exist_ok=True)
    (root / "secrets").mkdir()
    (root / "logs").mkdir()
    config = root / "authgate.toml"
    config.write_text(CONFIG)
    site = Site(
        root=root,
        config=config,
        users=root / "users.toml",
        master=root / "master.secret",
        master2=root / "secrets" / "master2.secret",
        log=root / "logs" / "audit.log",
        pwfile=root / "admin.pw",
        originals={},
    )
    site.users.write_bytes(USERS_TOML)
    site.master.write_bytes(MASTER)
    site.master2.write_bytes(MASTER2)
    with audit.AuditLog.open(site.log, None, clock=lambda: 1_700_000_000.0, sync=False) as log:
        for i in range(5):
            log.record("auth", listener="imap", client=f"192.0.2.{i}", user="alice", outcome="ok")
    site.pwfile.write_text(PASSWORD + "\n")
    site.pwfile.chmod(0o600)
    site.originals = {p: p.read_bytes() for p in site.secret_files}
    return site


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return make_site(tmp_path / "site")


@pytest.fixture(autouse=True)
def weak_scrypt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(envelope.TEST_SCRYPT_ENV, "10")
    monkeypatch.delenv(envelope.TEST_SLOW_IO_ENV, raising=False)
    monkeypatch.delenv(commands.PASSWORD_ENV, raising=False)
    monkeypatch.delenv(commands.NEW_PASSWORD_ENV, raising=False)


def run(*argv: str) -> int:
    """The commands through a tiny local parser, the way cli.py registers them."""
    parser = argparse.ArgumentParser(prog="authgate")
    commands.add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    status: int = args.func(args)
    return status


def snapshot(root: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file under root: contents, mtime and mode."""
    result = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            st = path.stat()
            result[str(path.relative_to(root))] = (path.read_bytes(), st.st_mtime_ns, st.st_mode)
    return result


def records_without_prev(data: bytes, keyring: Keyring | None) -> list[dict[str, Any]]:
    # A log still in plaintext beside a keyring (a conversion cut short) is
    # read as plaintext: with the keyring it fails verification on purpose.
    if audit.log_form(data) is not audit.LogForm.SEALED:
        keyring = None
    contents = audit.read_log(data, keyring, "log")
    assert contents.problems == []
    return [{k: v for k, v in r.items() if k != "prev"} for r in contents.records]


def encrypt_site(site: Site) -> Keyring:
    files = commands.secret_files_from_config(site.config)
    convert.encrypt_files(site.root, files, PASSWORD, params=WEAK)
    return atrest.unlock(site.root, PASSWORD)


# ------------------------------------------------------------ config files


def test_secret_files_from_config_resolves_and_dedupes(site: Site, tmp_path: Path) -> None:
    files = commands.secret_files_from_config(site.config)
    assert files == [
        SecretFile(site.users),
        SecretFile(site.master),
        SecretFile(site.master2),
        SecretFile(site.log, Kind.AUDIT_LOG),
    ]
    shared = tmp_path / "shared.toml"
    (tmp_path / "m").write_text("secret\n")
    listener = (
        '[[listeners]]\nname = "{name}"\nprotocol = "imap"\nlisten = "127.0.0.1:{port}"\n'
        '[listeners.backend]\naddress = "127.0.0.1:3"\nmaster_user = "u"\n'
        'master_password_file = "{path}"\n'
    )
    shared.write_text(
        '[users]\nfile = "users.toml"\n'
        + listener.format(name="a", port=1, path="m")
        + listener.format(name="b", port=2, path="./m")
    )
    assert commands.secret_files_from_config(shared) == [
        SecretFile(tmp_path / "users.toml"),
        SecretFile(tmp_path / "m"),
    ]
    clash = tmp_path / "clash.toml"
    clash.write_text('[users]\nfile = "x"\n[audit]\nfile = "x"\n')
    with pytest.raises(AtRestError, match="both"):
        commands.secret_files_from_config(clash)


# ---------------------------------------------------------------- round trip


def test_encrypt_then_decrypt_round_trip(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("encrypt", "-c", str(site.config), "--password-file", str(site.pwfile)) == 0
    out = capsys.readouterr().out
    assert f"{site.users}: encrypted" in out and f"{site.log}: encrypted" in out

    keyring = atrest.unlock(site.root, PASSWORD)
    for path in (site.users, site.master, site.master2):
        sealed = path.read_bytes()
        assert sealed.startswith(b"AGENC1\x01")
        assert site.originals[path] not in sealed
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert atrest.open_secret_file(path, keyring) == site.originals[path]
    assert audit.log_form(site.log.read_bytes()) is audit.LogForm.SEALED
    assert b"alice" not in site.log.read_bytes()
    assert records_without_prev(site.log.read_bytes(), keyring) == records_without_prev(
        site.originals[site.log], None
    )
    assert stat.S_IMODE(site.keyring.stat().st_mode) == 0o600
    assert stat.S_IMODE(site.log.stat().st_mode) == 0o600

    # A second run has nothing to do and says so.
    assert run("encrypt", "-c", str(site.config), "--password-file", str(site.pwfile)) == 0
    assert f"{site.users}: already encrypted" in capsys.readouterr().out

    assert run("decrypt", "-c", str(site.config), "--password-file", str(site.pwfile)) == 0
    for path in site.secret_files:
        # The log too: same records, and the unkeyed chain recomputes the same.
        assert path.read_bytes() == site.originals[path]
    assert not site.keyring.exists()
    assert "encryption is off" in capsys.readouterr().out


def test_decrypt_keep_keyring(site: Site) -> None:
    encrypt_site(site)
    assert (
        run(
            "decrypt", "-c", str(site.config), "--password-file", str(site.pwfile), "--keep-keyring"
        )
        == 0
    )
    assert site.keyring.exists()
    assert site.users.read_bytes() == USERS_TOML


def test_decrypt_without_keyring_is_a_no_op(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(site.root)
    assert run("decrypt", "-c", str(site.config)) == 0  # no password needed or asked
    assert "nothing was encrypted" in capsys.readouterr().out
    assert snapshot(site.root) == before


def test_missing_files_are_skipped(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    site.log.unlink()  # (a missing master-password file is a config error instead)
    assert run("encrypt", "-c", str(site.config), "--password-file", str(site.pwfile)) == 0
    out = capsys.readouterr().out
    assert f"{site.log}: does not exist yet" in out
    # The audit log a running proxy then creates is sealed from the start.
    keyring = atrest.unlock(site.root, PASSWORD)
    with audit.AuditLog.open(site.log, keyring) as log:
        log.record("auth", user="bob")
    assert audit.log_form(site.log.read_bytes()) is audit.LogForm.SEALED


# ------------------------------------------------------- independent decode


def test_formats_decode_with_an_independent_implementation(site: Site) -> None:
    """The documented formats, decoded with hashlib.scrypt and raw AES-GCM
    instead of our code; and no secret appears in the keyring."""
    encrypt_site(site)
    raw = site.keyring.read_bytes()
    doc = json.loads(raw)
    kdf, wrapped = doc["kdf"], doc["wrapped_key"]
    assert (kdf["name"], kdf["log2_n"], kdf["r"], kdf["p"]) == ("scrypt", 10, 8, 1)
    salt = base64.b64decode(kdf["salt"])
    kek = hashlib.scrypt(
        PASSWORD.encode(), salt=salt, n=2 ** kdf["log2_n"], r=8, p=1, dklen=32, maxmem=2**26
    )
    key_id = bytes.fromhex(doc["key_id"])
    aad = b"authgate keyring v1\0" + key_id + (10).to_bytes(1, "big")
    aad += (8).to_bytes(4, "big") + (1).to_bytes(4, "big") + salt
    data_key = AESGCM(kek).decrypt(
        base64.b64decode(wrapped["nonce"]), base64.b64decode(wrapped["ciphertext"]), aad
    )
    assert len(data_key) == 32

    # Nothing secret in the keyring: not the data key in any encoding, not the password.
    for form in (data_key, data_key.hex().encode(), base64.b64encode(data_key), kek):
        assert form not in raw
    assert PASSWORD.encode() not in raw

    # A sealed file: magic, version, key id, nonce, name, then GCM with the header as AAD.
    file_key = HKDF(hashes.SHA256(), 32, None, b"authgate/atrest/file v1").derive(data_key)
    blob = site.users.read_bytes()
    assert blob[:7] == b"AGENC1\x01" and blob[7:23] == key_id
    nonce = blob[23:35]
    name_len = int.from_bytes(blob[35:37], "big")
    assert blob[37 : 37 + name_len] == b"users.toml"
    header = blob[: 37 + name_len]
    assert AESGCM(file_key).decrypt(nonce, blob[len(header) :], header) == USERS_TOML


def test_keyring_object_does_not_leak_keys(site: Site) -> None:
    keyring = encrypt_site(site)
    assert "key_id" in repr(keyring) and len(repr(keyring)) < 200
    with pytest.raises(TypeError):
        pickle.dumps(keyring)


# ------------------------------------------------------------------ rekey


def test_rekey_changes_only_the_keyring(site: Site) -> None:
    keyring = encrypt_site(site)
    files_before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in site.secret_files}
    ring_before = site.keyring.read_bytes()
    newpw = site.root / "new.pw"
    newpw.write_text(NEW_PASSWORD + "\n")
    newpw.chmod(0o600)

    assert (
        run(
            "rekey",
            "-c",
            str(site.config),
            "--password-file",
            str(site.pwfile),
            "--new-password-file",
            str(newpw),
        )
        == 0
    )

    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in site.secret_files} == files_before
    assert site.keyring.read_bytes() != ring_before
    assert stat.S_IMODE(site.keyring.stat().st_mode) == 0o600
    with pytest.raises(WrongPassword):
        atrest.unlock(site.root, PASSWORD)
    rekeyed = atrest.unlock(site.root, NEW_PASSWORD)
    assert rekeyed.key_id == keyring.key_id
    assert atrest.open_secret_file(site.users, rekeyed) == USERS_TOML
    assert records_without_prev(site.log.read_bytes(), rekeyed) == records_without_prev(
        site.originals[site.log], None
    )


def test_rekey_with_wrong_password_changes_nothing(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    encrypt_site(site)
    before = snapshot(site.root)
    monkeypatch.setenv("AUTHGATE_PASSWORD", "not the password at all")
    monkeypatch.setenv("AUTHGATE_NEW_PASSWORD", NEW_PASSWORD)
    with pytest.raises(WrongPassword, match="wrong password"):
        run("rekey", "-c", str(site.config))
    assert snapshot(site.root) == before


def test_rekey_refuses_a_short_new_password(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    encrypt_site(site)
    before = snapshot(site.root)
    monkeypatch.setenv("AUTHGATE_PASSWORD", PASSWORD)
    monkeypatch.setenv("AUTHGATE_NEW_PASSWORD", "short")
    with pytest.raises(UserError, match="too short"):
        run("rekey", "-c", str(site.config))
    assert snapshot(site.root) == before


# -------------------------------------------------- wrong password, tamper


def test_wrong_password_changes_nothing(site: Site) -> None:
    encrypt_site(site)
    site.pwfile.write_text("a wrong password\n")
    before = snapshot(site.root)
    for command in ("decrypt", "encrypt", "log"):
        with pytest.raises(WrongPassword, match=r"^wrong password for "):
            run(command, "-c", str(site.config), "--password-file", str(site.pwfile))
        assert snapshot(site.root) == before


# The tampered file is the third one converted: a run that changed files
# before noticing would be caught by the snapshot comparison.


def _flip(offset: int) -> Any:
    def tamper(site: Site) -> None:
        data = bytearray(site.master2.read_bytes())
        data[offset % len(data)] ^= 0x01
        site.master2.write_bytes(bytes(data))

    return tamper


def _truncate(site: Site) -> None:
    site.master2.write_bytes(site.master2.read_bytes()[:-5])


def _truncate_header(site: Site) -> None:
    site.master2.write_bytes(site.master2.read_bytes()[:20])


def _swap(site: Site) -> None:
    a, b = site.master.read_bytes(), site.master2.read_bytes()
    site.master.write_bytes(b)
    site.master2.write_bytes(a)


def _other_keyring(site: Site) -> None:
    other = make_site(site.root.parent / "other")
    encrypt_site(other)
    site.master2.write_bytes(other.master2.read_bytes())


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (_flip(8), "is damaged or was modified"),  # key id
        (_flip(30), "is damaged or was modified"),  # nonce
        (_flip(40), "is damaged or was modified"),  # the name
        (_flip(60), "is damaged or was modified"),  # ciphertext
        (_flip(-1), "is damaged or was modified"),  # tag
        (_flip(6), "encryption format"),  # version
        (_truncate, "is damaged or was modified"),
        (_truncate_header, "is damaged or was modified"),
        (_swap, "files swapped or renamed"),
        (_other_keyring, "another keyring"),
    ],
    ids=[
        "key-id",
        "nonce",
        "name",
        "ciphertext",
        "tag",
        "version",
        "truncated",
        "truncated-header",
        "swapped",
        "other-keyring",
    ],
)
def test_tampered_file_is_refused_and_nothing_changes(
    site: Site, tamper: Any, message: str
) -> None:
    keyring = encrypt_site(site)
    tamper(site)
    before = snapshot(site.root)
    for command in ("decrypt", "encrypt"):
        with pytest.raises(AtRestError) as info:
            run(command, "-c", str(site.config), "--password-file", str(site.pwfile))
        assert message in str(info.value)
        assert snapshot(site.root) == before, command
    with pytest.raises(DamagedFile, match=message):
        atrest.open_secret_file(site.master2, keyring)


def test_damage_message_names_the_file(site: Site) -> None:
    encrypt_site(site)
    data = bytearray(site.users.read_bytes())
    data[60] ^= 0x80
    site.users.write_bytes(bytes(data))
    with pytest.raises(DamagedFile) as info:
        run("decrypt", "-c", str(site.config), "--password-file", str(site.pwfile))
    assert str(info.value) == f"{site.users} is damaged or was modified"


def test_tampered_audit_log_blocks_decrypt_and_changes_nothing(site: Site) -> None:
    encrypt_site(site)
    lines = site.log.read_bytes().splitlines(keepends=True)
    del lines[2]
    site.log.write_bytes(b"".join(lines))
    before = snapshot(site.root)
    with pytest.raises(audit.AuditError, match="records were deleted"):
        run("decrypt", "-c", str(site.config), "--password-file", str(site.pwfile))
    assert snapshot(site.root) == before


def test_tampered_plaintext_log_blocks_encrypt_before_any_keyring(site: Site) -> None:
    """Sealing a log whose chain is already broken would launder the edit."""
    lines = site.log.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b"192.0.2.1", b"192.0.2.9")
    site.log.write_bytes(b"".join(lines))
    before = snapshot(site.root)
    with pytest.raises(audit.AuditError, match="chain is broken"):
        run("encrypt", "-c", str(site.config), "--password-file", str(site.pwfile))
    assert snapshot(site.root) == before
    assert not site.keyring.exists()


def test_sealed_file_without_keyring_is_an_error(site: Site) -> None:
    encrypt_site(site)
    site.keyring.unlink()
    before = snapshot(site.root)
    for command in ("decrypt", "encrypt"):
        with pytest.raises(AtRestError, match="no keyring"):
            run(command, "-c", str(site.config), "--password-file", str(site.pwfile))
        assert snapshot(site.root) == before


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d["kdf"].update(salt=base64.b64encode(b"x" * 16).decode()),
        lambda d: d["kdf"].update(log2_n=11),
        lambda d: d.update(key_id="00" * 16),
    ],
    ids=["salt", "cost", "key-id"],
)
def test_edited_keyring_does_not_unlock(site: Site, edit: Any) -> None:
    encrypt_site(site)
    doc = json.loads(site.keyring.read_text())
    edit(doc)
    site.keyring.write_text(json.dumps(doc))
    with pytest.raises(WrongPassword):
        atrest.unlock(site.root, PASSWORD)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{",
        "[]",
        '{"authgate_keyring": 1}',
        '{"authgate_keyring": 1, "key_id": "00", "kdf": {}, "wrapped_key": {}}',
    ],
)
def test_garbled_keyring_is_damaged(site: Site, text: str) -> None:
    site.keyring.write_text(text)
    with pytest.raises(DamagedFile, match="is damaged or was modified"):
        atrest.unlock(site.root, PASSWORD)


def test_keyring_asking_for_absurd_memory_is_refused(site: Site) -> None:
    encrypt_site(site)
    doc = json.loads(site.keyring.read_text())
    doc["kdf"]["log2_n"] = 30
    site.keyring.write_text(json.dumps(doc))
    with pytest.raises(DamagedFile):
        atrest.unlock(site.root, PASSWORD)


def test_future_keyring_version_is_named(site: Site) -> None:
    encrypt_site(site)
    doc = json.loads(site.keyring.read_text())
    doc["authgate_keyring"] = 2
    site.keyring.write_text(json.dumps(doc))
    with pytest.raises(AtRestError, match="format 2 is not supported"):
        atrest.unlock(site.root, PASSWORD)


def test_create_keyring_never_replaces_one(site: Site) -> None:
    encrypt_site(site)
    before = site.keyring.read_bytes()
    with pytest.raises(AtRestError, match="already exists"):
        atrest.create_keyring(site.root, PASSWORD, params=WEAK)
    assert site.keyring.read_bytes() == before


# ----------------------------------------------------- run-time read/write


def test_open_secret_file_cases(site: Site) -> None:
    assert atrest.open_secret_file(site.users, None) == USERS_TOML  # encryption off
    keyring = encrypt_site(site)
    assert atrest.open_secret_file(site.master, keyring) == MASTER
    with pytest.raises(Locked, match="is encrypted"):
        atrest.open_secret_file(site.master, None)
    plain = site.root / "plain.secret"
    plain.write_bytes(b"planted")
    with pytest.raises(PlaintextRefused, match="not encrypted although"):
        atrest.open_secret_file(plain, keyring)
    assert atrest.open_secret_file(plain, keyring, allow_plaintext=True) == b"planted"
    with pytest.raises(AtRestError, match="cannot read"):
        atrest.open_secret_file(site.root / "nope", keyring)


def test_write_secret_file(site: Site) -> None:
    keyring = encrypt_site(site)
    atrest.write_secret_file(site.users, b"[users]\n", keyring)
    assert atrest.is_sealed(site.users.read_bytes())
    assert atrest.open_secret_file(site.users, keyring) == b"[users]\n"
    assert stat.S_IMODE(site.users.stat().st_mode) == 0o600
    fresh = site.root / "fresh.toml"
    atrest.write_secret_file(fresh, b"x", None)
    assert fresh.read_bytes() == b"x"
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o600
    assert not list(site.root.glob(f"*{TMP_SUFFIX}"))


def test_renamed_sealed_file_is_refused(site: Site) -> None:
    keyring = encrypt_site(site)
    moved = site.root / "users-old.toml"
    site.users.rename(moved)
    with pytest.raises(DamagedFile, match=r"holds the encrypted contents of 'users.toml'"):
        atrest.open_secret_file(moved, keyring)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file another owner")
def test_conversion_keeps_the_owner(site: Site) -> None:
    os.chown(site.users, 4321, 4322)
    encrypt_site(site)
    st = site.users.stat()
    assert (st.st_uid, st.st_gid) == (4321, 4322)


# ------------------------------------------------------------- passwords


def test_password_from_env_is_removed_from_the_environment(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTHGATE_PASSWORD", PASSWORD)
    assert run("encrypt", "-c", str(site.config)) == 0
    assert "AUTHGATE_PASSWORD" not in os.environ
    atrest.unlock(site.root, PASSWORD)


def test_password_file_first_line_only(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_bytes(b"first line secret\r\nsecond\n")
    pw.chmod(0o600)
    assert commands.read_password(pw) == "first line secret"


def test_no_terminal_and_no_password_is_a_user_error(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    before = snapshot(site.root)
    with pytest.raises(UserError, match="no terminal"):
        run("encrypt", "-c", str(site.config))
    assert snapshot(site.root) == before


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_prompt_asks_twice_for_a_new_password(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", FakeTTY())
    answers = iter([PASSWORD, PASSWORD + "x"])
    prompts: list[str] = []

    def fake_getpass(prompt: str = "") -> str:
        prompts.append(prompt)
        return next(answers)

    monkeypatch.setattr(getpass, "getpass", fake_getpass)
    with pytest.raises(UserError, match="do not match"):
        run("encrypt", "-c", str(site.config))
    assert len(prompts) == 2
    assert not site.keyring.exists()

    answers = iter([PASSWORD, PASSWORD])
    assert run("encrypt", "-c", str(site.config)) == 0
    # Resuming or re-running asks once: the password already exists.
    answers = iter([PASSWORD])
    prompts.clear()
    assert run("encrypt", "-c", str(site.config)) == 0
    assert len(prompts) == 1


def test_short_first_password_is_refused(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTHGATE_PASSWORD", "short")
    with pytest.raises(UserError, match="too short"):
        run("encrypt", "-c", str(site.config))
    assert not site.keyring.exists()


def test_nfc_normalised_password(site: Site) -> None:
    composed, decomposed = "caf\u00e9 au lait 42", "cafe\u0301 au lait 42"
    convert.encrypt_files(site.root, [SecretFile(site.users)], composed, params=WEAK)
    assert atrest.open_secret_file(site.users, atrest.unlock(site.root, decomposed)) == USERS_TOML


def cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "authgate.atrest", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, envelope.TEST_SCRYPT_ENV: "10", **(env or {})},
    )


def test_command_line_errors_are_one_line_and_never_echo_the_password(site: Site) -> None:
    ok = cli("encrypt", "-c", str(site.config), env={"AUTHGATE_PASSWORD": PASSWORD})
    assert ok.returncode == 0, ok.stderr
    wrong = "Wrong-Horse-Battery-9"
    bad = cli("decrypt", "-c", str(site.config), env={"AUTHGATE_PASSWORD": wrong})
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == f"authgate: wrong password for {site.keyring}"
    assert "Traceback" not in bad.stderr
    for text in (ok.stdout, ok.stderr, bad.stdout, bad.stderr):
        assert PASSWORD not in text and wrong not in text


# ------------------------------------------------- interrupted conversions


def test_stale_temp_files_are_cleaned_on_rerun(site: Site) -> None:
    stale = site.users.parent / f".users.toml.abc123{TMP_SUFFIX}"
    stale.write_bytes(b"half")
    encrypt_site(site)
    assert not stale.exists()


def test_resume_after_a_partial_run(site: Site) -> None:
    """A run stopped after two files (the state a crash leaves) is finished
    by the next one, which leaves the done files alone."""
    convert.encrypt_files(
        site.root, [SecretFile(site.users), SecretFile(site.master)], PASSWORD, params=WEAK
    )
    done = {p: p.read_bytes() for p in (site.users, site.master)}
    outcomes = convert.encrypt_files(
        site.root, commands.secret_files_from_config(site.config), PASSWORD
    )
    actions = {o.file.path: o.action for o in outcomes}
    assert actions[site.users] is convert.Action.ALREADY
    assert actions[site.master2] is convert.Action.CONVERTED
    assert {p: p.read_bytes() for p in done} == done


def _classify(site: Site, direction: str) -> dict[Path, str]:
    """Each secret file as 'old' or 'new'; AssertionError for anything else."""
    keyring = atrest.unlock(site.root, PASSWORD) if site.keyring.exists() else None
    states: dict[Path, str] = {}
    for path in site.secret_files:
        data = path.read_bytes()
        original = site.originals[path]
        if path == site.log:
            expected = records_without_prev(original, None)
            sealed = audit.log_form(data) is audit.LogForm.SEALED
            if sealed:
                assert keyring is not None, "sealed log without keyring"
            assert records_without_prev(data, keyring) == expected, path
            if not sealed:
                # Plaintext, before encrypt or after decrypt: the very bytes.
                assert data == original
            states[path] = "new" if sealed == (direction == "encrypt") else "old"
            continue
        if atrest.is_sealed(data):
            assert keyring is not None, f"{path} sealed without keyring"
            assert keyring.open_file(path.name, data, source=str(path)) == original
            states[path] = "new" if direction == "encrypt" else "old"
        else:
            assert data == original, f"{path} is neither form"
            states[path] = "old" if direction == "encrypt" else "new"
    if direction == "decrypt" and not site.keyring.exists():
        assert set(states.values()) == {"new"}, "keyring removed before the last file"
    return states


def _temps(site: Site) -> list[Path]:
    return list(site.root.rglob(f"*{TMP_SUFFIX}"))


@contextlib.contextmanager
def _child(site: Site, command: str, slow_ms: int) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, envelope.TEST_SLOW_IO_ENV: str(slow_ms), envelope.TEST_SCRYPT_ENV: "10"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "authgate.atrest",
            command,
            "-c",
            str(site.config),
            "--password-file",
            str(site.pwfile),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


@pytest.mark.parametrize("command", ["encrypt", "decrypt"])
def test_sigkill_at_random_moments(tmp_path: Path, command: str) -> None:
    """50 runs killed with SIGKILL at random moments: every file is whole
    in its old or its new form, and a re-run finishes the job."""
    slow_ms = 20
    trials = 50
    rng = random.Random(os.urandom(8))

    def prepare(name: str) -> Site:
        site = make_site(tmp_path / name)
        if command == "decrypt":
            encrypt_site(site)
        return site

    # How long the work of one uninterrupted run takes, to spread the kills
    # over it. The child's warning about the test hooks (printed once its
    # imports are done and before any file is touched) marks the start.
    calib = prepare("calibrate")
    with _child(calib, command, slow_ms) as proc:
        assert proc.stderr is not None
        assert b"test hook" in proc.stderr.readline()
        start = time.monotonic()
        assert proc.wait(timeout=60) == 0
    duration = time.monotonic() - start
    assert set(_classify(calib, command).values()) == {"new"}

    def trial(i: int) -> tuple[str, bool, int]:
        site = prepare(f"t{i}")
        with _child(site, command, slow_ms) as proc:
            assert proc.stderr is not None
            assert b"test hook" in proc.stderr.readline()
            time.sleep(rng.uniform(0, duration))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        states = _classify(site, command)
        temps = bool(_temps(site))
        # Finish the job with the same command.
        assert run(command, "-c", str(site.config), "--password-file", str(site.pwfile)) == 0
        assert set(_classify(site, command).values()) == {"new"}
        assert site.keyring.exists() == (command == "encrypt")
        assert _temps(site) == []
        kinds = set(states.values())
        label = "mixed" if kinds == {"old", "new"} else kinds.pop()
        return label, temps, proc.returncode

    print(f"calibrated run: {duration:.3f}s")

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(trial, range(trials)))
    assert all(code == -signal.SIGKILL or code == 0 for _, _, code in results)
    mixed = sum(1 for label, _, _ in results if label == "mixed")
    with_temps = sum(1 for _, temps, _ in results if temps)
    # Evidence the kills landed inside the conversion, not only before or after it.
    print(f"{command}: {trials} kills:", sorted(collections.Counter(results).items()))
    assert mixed >= 5, results
    assert with_temps >= 1, results
