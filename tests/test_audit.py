"""The audit log: append-only records, the hash chain, sealed records,
concurrent writers, torn writes, and the `log` command."""

from __future__ import annotations

import argparse
import base64
import json
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authgate import atrest, audit
from authgate.atrest import convert
from authgate.atrest.envelope import Keyring, ScryptParams
from authgate.audit import AuditError, AuditLog, LogForm, read_log
from authgate.commands import atrest as atrest_commands
from authgate.errors import UserError

WEAK = ScryptParams(log2_n=10)  # tests only
PASSWORD = "correct horse battery staple"
CLOCK = lambda: 1_700_000_000.25  # noqa: E731


def write(path: Path, keyring: Keyring | None, n: int, *, start: int = 0) -> None:
    with AuditLog.open(path, keyring, clock=CLOCK, sync=False) as log:
        for i in range(start, start + n):
            log.record(
                "auth",
                listener="imap",
                client=f"198.51.100.{i}",
                user=f"user{i}",
                mechanism="SCRAM-SHA-256",
                outcome="ok" if i % 2 else "failed",
            )


@pytest.fixture
def keyring(tmp_path: Path) -> Keyring:
    return atrest.create_keyring(tmp_path, PASSWORD, params=WEAK)


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


# ------------------------------------------------------------------ writing


def test_records_are_json_lines_with_a_chain(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    with AuditLog.open(log, None, clock=CLOCK) as writer:
        writer.record(
            "auth",
            listener="imap",
            client="192.0.2.1",
            user="alice",
            mechanism="PLAIN",
            outcome="ok",
            session=None,
            port=993,
        )
        writer.record("reload")
    first, second = (json.loads(x) for x in lines(log))
    assert first == {
        "seq": 0,
        "time": "2023-11-14T22:13:20.250Z",
        "event": "auth",
        "listener": "imap",
        "client": "192.0.2.1",
        "user": "alice",
        "mechanism": "PLAIN",
        "outcome": "ok",
        "port": 993,
        "prev": "00" * 32,
    }
    assert second["seq"] == 1 and second["event"] == "reload"
    assert second["prev"] != "00" * 32
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    contents = read_log(log.read_bytes(), None, str(log))
    assert contents.problems == [] and len(contents.records) == 2


def test_appends_never_rewrite_earlier_bytes(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    write(log, None, 3)
    before = log.read_bytes()
    inode = log.stat().st_ino
    write(log, None, 3, start=3)  # a second writer, later (a restart)
    after = log.read_bytes()
    assert after.startswith(before)
    assert log.stat().st_ino == inode
    contents = read_log(after, None, "log")
    assert contents.problems == []
    assert [r["seq"] for r in contents.records] == list(range(6))


def test_sealed_appends_never_rewrite_earlier_bytes(tmp_path: Path, keyring: Keyring) -> None:
    log = tmp_path / "audit.log"
    write(log, keyring, 2)
    before = log.read_bytes()
    write(log, keyring, 2, start=2)
    assert log.read_bytes().startswith(before)
    assert read_log(log.read_bytes(), keyring, "log").problems == []


@pytest.mark.parametrize(
    "name",
    [
        "password",
        "client_secret",
        "token",
        "response",
        "nt_hash",
        "api_key",
        "cnonce",
        "seq",
        "prev",
        "Bad-Name",
    ],
)
def test_secret_looking_or_reserved_field_names_are_refused(tmp_path: Path, name: str) -> None:
    with AuditLog.open(tmp_path / "a.log", None) as log, pytest.raises(ValueError):
        log.record("auth", **{name: "x"})
    assert (tmp_path / "a.log").read_bytes() == b""


def test_values_must_be_str_or_int_and_are_cut(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    with AuditLog.open(path, None) as log:
        with pytest.raises(TypeError):
            log.record("auth", user=b"raw bytes")  # type: ignore[arg-type]
        log.record("auth", user="x" * 10_000)
    (record,) = read_log(path.read_bytes(), None, "a").records
    assert len(record["user"]) < 300 and record["user"].endswith("[cut]")


def test_hostile_values_stay_on_one_inert_line(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    evil = 'bob\n{"seq":9}\x1b[2J'
    with AuditLog.open(path, None) as log:
        log.record("auth", user=evil)
        log.record("auth", user="carol")
    assert len(lines(path)) == 2
    (record, _) = read_log(path.read_bytes(), None, "a").records
    assert record["user"] == evil
    shown = audit.format_record(record)
    assert "\n" not in shown and "\x1b" not in shown
    assert 'user="bob\\n{\\"seq\\":9}\\u001b[2J"' in shown


# ------------------------------------------------------------ verification


def _problems(path: Path, keyring: Keyring | None) -> list[str]:
    return read_log(path.read_bytes(), keyring, str(path)).problems


@pytest.mark.parametrize("sealed", [False, True], ids=["plain", "sealed"])
def test_deleted_middle_record_is_detected(tmp_path: Path, keyring: Keyring, sealed: bool) -> None:
    ring = keyring if sealed else None
    path = tmp_path / "audit.log"
    write(path, ring, 6)
    assert _problems(path, ring) == []
    kept = lines(path)
    del kept[3]
    path.write_bytes(b"".join(kept))
    (problem,) = _problems(path, ring)
    assert "line 4: record #4 follows #2: records were deleted" in problem


def test_modified_middle_record_is_detected_plain(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write(path, None, 5)
    edited = lines(path)
    edited[2] = edited[2].replace(b'"outcome":"failed"', b'"outcome":"ok"')
    path.write_bytes(b"".join(edited))
    (problem,) = _problems(path, None)
    assert "line 4: record #3: the chain is broken" in problem


def test_modified_middle_record_is_detected_sealed(tmp_path: Path, keyring: Keyring) -> None:
    path = tmp_path / "audit.log"
    write(path, keyring, 5)
    edited = lines(path)
    raw = bytearray(base64.b64decode(edited[2]))
    raw[60] ^= 1
    edited[2] = base64.b64encode(bytes(raw)) + b"\n"
    path.write_bytes(b"".join(edited))
    problems = _problems(path, keyring)
    assert "line 3: the encrypted record is damaged or was modified" in problems[0]


def test_reordered_and_replayed_records_are_detected(tmp_path: Path, keyring: Keyring) -> None:
    path = tmp_path / "audit.log"
    write(path, keyring, 4)
    original = lines(path)
    path.write_bytes(b"".join([original[0], original[2], original[1], original[3]]))
    assert _problems(path, keyring)
    path.write_bytes(b"".join([*original, original[1]]))  # a replayed record
    assert _problems(path, keyring)


def test_records_deleted_from_the_start_are_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write(path, None, 4)
    path.write_bytes(b"".join(lines(path)[2:]))
    (problem,) = _problems(path, None)
    assert "starts at record #2" in problem


def test_plaintext_line_inserted_into_sealed_log(tmp_path: Path, keyring: Keyring) -> None:
    path = tmp_path / "audit.log"
    write(path, keyring, 3)
    forged = json.dumps({"seq": 3, "time": "x", "event": "auth", "prev": "00" * 32})
    path.write_bytes(path.read_bytes() + forged.encode() + b"\n")
    problems = _problems(path, keyring)
    assert any("line 4: is not encrypted although" in p for p in problems)
    assert any("chain is broken" in p for p in problems)


def test_plaintext_log_beside_a_keyring_fails_verification(
    tmp_path: Path, keyring: Keyring
) -> None:
    """With encryption on the proxy writes only sealed records, so a whole
    plaintext log (planted, with a perfectly consistent unkeyed chain) is
    not "intact": one problem for the run of plaintext lines."""
    path = tmp_path / "audit.log"
    write(path, None, 3)
    assert _problems(path, None) == []
    (problem,) = _problems(path, keyring)
    assert f"line 1: is not encrypted although {keyring.path} exists" in problem


def test_sealed_chain_cannot_be_forged_without_the_key(tmp_path: Path, keyring: Keyring) -> None:
    """Records sealed under another keyring (an attacker's) do not verify."""
    path = tmp_path / "audit.log"
    write(path, keyring, 2)
    (tmp_path / "elsewhere").mkdir()
    other = atrest.create_keyring(tmp_path / "elsewhere", PASSWORD, params=WEAK)
    extra = tmp_path / "extra.log"
    write(extra, other, 3)
    path.write_bytes(path.read_bytes() + lines(extra)[2])
    assert any("damaged or was modified" in p for p in _problems(path, keyring))


def test_sealed_log_hides_its_contents(tmp_path: Path, keyring: Keyring) -> None:
    path = tmp_path / "audit.log"
    write(path, keyring, 3)
    data = path.read_bytes()
    for needle in (b"user1", b"198.51.100", b"SCRAM", b"auth", b"imap"):
        assert needle not in data
    assert audit.log_form(data) is LogForm.SEALED
    with pytest.raises(AuditError, match="is encrypted"):
        read_log(data, None, "audit.log")


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(position=st.integers(min_value=0), bit=st.integers(min_value=0, max_value=7))
def test_any_flipped_bit_is_detected_or_harmless(
    tmp_path: Path, keyring: Keyring, position: int, bit: int
) -> None:
    """Flip any bit of a sealed log: verification reports a problem, or the
    records read back are exactly the original ones (a base64 padding bit)."""
    path = tmp_path / "flip.log"
    if not path.exists():
        write(path, keyring, 4)
    data = path.read_bytes()
    original = read_log(data, keyring, "log").records
    damaged = bytearray(data)
    damaged[position % len(data)] ^= 1 << bit
    contents = read_log(bytes(damaged), keyring, "log")
    assert contents.problems or contents.records == original


# ------------------------------------------------- opening, forms, crashes


def test_form_must_match_the_keyring(tmp_path: Path, keyring: Keyring) -> None:
    plain, sealed = tmp_path / "plain.log", tmp_path / "sealed.log"
    write(plain, None, 1)
    write(sealed, keyring, 1)
    with pytest.raises(AuditError, match="not encrypted although"):
        AuditLog.open(plain, keyring)
    with pytest.raises(AuditError, match="is encrypted"):
        AuditLog.open(sealed, None)


def test_damaged_last_record_refuses_to_append(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write(path, None, 2)
    path.write_bytes(path.read_bytes() + b"{not json}\n")
    with pytest.raises(AuditError, match="damaged or was modified"):
        AuditLog.open(path, None)


def test_torn_last_write_is_cut_on_open(tmp_path: Path, keyring: Keyring) -> None:
    path = tmp_path / "audit.log"
    write(path, keyring, 3)
    whole = path.read_bytes()
    path.write_bytes(whole + b"QUdSRUMxAT0lMh27")  # a crash mid-append
    contents = read_log(path.read_bytes(), keyring, "log")
    assert contents.torn_tail and "incomplete last line" in contents.problems[0]
    write(path, keyring, 1, start=3)
    data = path.read_bytes()
    assert data.startswith(whole)
    contents = read_log(data, keyring, "log")
    assert contents.problems == [] and [r["seq"] for r in contents.records] == [0, 1, 2, 3]


def test_concurrent_writers_keep_one_chain(tmp_path: Path, keyring: Keyring) -> None:
    """Two writers on the same file (as two proxy processes would be): the
    flock keeps records whole and the chain linear."""
    path = tmp_path / "audit.log"
    logs = [AuditLog.open(path, keyring, sync=False) for _ in range(2)]

    def worker(log: AuditLog, tag: str) -> None:
        for i in range(40):
            log.record("auth", user=f"{tag}{i}")

    threads = [
        threading.Thread(target=worker, args=(log, t)) for log, t in zip(logs, "ab", strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for log in logs:
        log.close()
    contents = read_log(path.read_bytes(), keyring, "log")
    assert contents.problems == []
    assert [r["seq"] for r in contents.records] == list(range(80))
    assert sorted(r["user"] for r in contents.records) == sorted(
        f"{t}{i}" for t in "ab" for i in range(40)
    )


def test_writer_follows_a_rotated_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with AuditLog.open(path, None, sync=False) as log:
        log.record("auth", user="before")
        path.rename(tmp_path / "audit.log.1")
        log.record("auth", user="after")
    (record,) = read_log(path.read_bytes(), None, "log").records
    assert record["user"] == "after" and record["seq"] == 0


def test_running_writer_notices_encrypt_and_refuses_to_mix_forms(tmp_path: Path) -> None:
    """A proxy without the password keeps no plaintext records going into a
    log that `authgate encrypt` has just sealed: its next append fails."""
    path = tmp_path / "audit.log"
    log = AuditLog.open(path, None, sync=False)
    log.record("auth", user="one")
    convert.encrypt_files(
        tmp_path, [convert.SecretFile(path, convert.Kind.AUDIT_LOG)], PASSWORD, params=WEAK
    )
    sealed = path.read_bytes()
    with pytest.raises(AuditError, match="is encrypted"):
        log.record("auth", user="two")
    log.close()
    assert path.read_bytes() == sealed
    keyring = atrest.unlock(tmp_path, PASSWORD)
    assert [r["user"] for r in read_log(sealed, keyring, "log").records] == ["one"]


def test_reencode_round_trip_is_byte_identical(tmp_path: Path, keyring: Keyring) -> None:
    path = tmp_path / "audit.log"
    write(path, None, 5)
    plain = path.read_bytes()
    sealed = audit.reencode(plain, "log", None, keyring)
    assert audit.log_form(sealed) is LogForm.SEALED
    assert read_log(sealed, keyring, "log").problems == []
    assert audit.reencode(sealed, "log", keyring, None) == plain


def test_closed_log_refuses_records(tmp_path: Path) -> None:
    log = AuditLog.open(tmp_path / "a.log", None)
    log.close()
    with pytest.raises(AuditError, match="closed"):
        log.record("auth")


# -------------------------------------------------------------- the command


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="authgate")
    atrest_commands.add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    status: int = args.func(args)
    return status


@pytest.fixture
def site(tmp_path: Path) -> Path:
    config = tmp_path / "authgate.toml"
    config.write_text('[audit]\nfile = "audit.log"\n')
    write(tmp_path / "audit.log", None, 4)
    return config


def test_log_prints_and_verifies(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("log", "-c", str(site)) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4
    assert out[1] == (
        "2023-11-14T22:13:20.250Z auth listener=imap client=198.51.100.1 user=user1 "
        "mechanism=SCRAM-SHA-256 outcome=ok"
    )
    assert run("log", "-c", str(site), "--json") == 0
    assert [json.loads(x)["seq"] for x in capsys.readouterr().out.splitlines()] == [0, 1, 2, 3]
    assert run("log", "-c", str(site), "--verify") == 0
    assert "4 record(s), #0..#3; chain intact (plaintext" in capsys.readouterr().out


def test_log_verify_fails_on_a_deleted_record(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = site.parent / "audit.log"
    kept = lines(log)
    del kept[1]
    log.write_bytes(b"".join(kept))
    assert run("log", "-c", str(site), "--verify") == 1
    err = capsys.readouterr().err
    assert "line 2: record #2 follows #0: records were deleted" in err
    assert "verification FAILED" in err


def test_log_of_an_encrypted_site(
    site: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTHGATE_TEST_SCRYPT_LOG2N", "10")
    monkeypatch.setenv("AUTHGATE_PASSWORD", PASSWORD)
    assert run("encrypt", "-c", str(site)) == 0
    capsys.readouterr()
    monkeypatch.setenv("AUTHGATE_PASSWORD", PASSWORD)
    assert run("log", "-c", str(site), "--verify") == 0
    assert "4 record(s), #0..#3; chain intact (encrypted, keyed chain)" in capsys.readouterr().out
    monkeypatch.setenv("AUTHGATE_PASSWORD", "not the password")
    with pytest.raises(atrest.WrongPassword):
        run("log", "-c", str(site))


def test_log_verify_cli_fails_for_a_plaintext_log_beside_a_keyring(site: Path) -> None:
    """The real command in a subprocess: `authgate log --verify` must not
    call a planted plaintext log "chain intact" when encryption is on."""
    env = {**os.environ, "AUTHGATE_TEST_SCRYPT_LOG2N": "10", "AUTHGATE_PASSWORD": PASSWORD}
    log = site.parent / "audit.log"
    planted = log.read_bytes()  # a consistent plaintext chain

    def authgate(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "authgate", *argv],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=env,
        )

    encrypted = authgate("encrypt", "-c", str(site))
    assert encrypted.returncode == 0, encrypted.stderr
    assert authgate("log", "-c", str(site), "--verify").returncode == 0
    log.write_bytes(planted)
    result = authgate("log", "-c", str(site), "--verify")
    assert result.returncode == 1, result.stdout
    assert "chain intact" not in result.stdout
    assert f"{log}: line 1: is not encrypted although " in result.stderr
    assert f"{log}: verification FAILED (1 problem(s))" in result.stderr
    assert "Traceback" not in result.stderr


def test_log_without_audit_config_is_a_user_error(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("")
    with pytest.raises(UserError, match="no \\[audit\\] file"):
        run("log", "-c", str(config))


def test_log_follow_prints_new_records(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = site.parent / "audit.log"
    result: list[int] = []
    follower = threading.Thread(
        target=lambda: result.append(run("log", "-c", str(site), "-f", "--interval", "0.02"))
    )
    follower.start()
    try:
        time.sleep(0.2)
        write(log, None, 2, start=4)
        time.sleep(0.3)  # several polling rounds
    finally:
        replacement = site.parent / "new.log"
        replacement.write_bytes(b"")
        os.replace(replacement, log)  # a rotation ends --follow
        follower.join(timeout=10)
    assert result == [0]
    captured = capsys.readouterr()
    users = [line.split(" user=")[1].split()[0] for line in captured.out.splitlines()]
    assert users == [f"user{i}" for i in range(6)]
    assert "was replaced" in captured.err
