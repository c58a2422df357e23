"""App passwords in the users file: verification, limits, saving, last use."""

from __future__ import annotations

import asyncio
import datetime
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authgate.cli import main
from authgate.credentials.apps import (
    APP_SCHEME,
    UsageLog,
    generate_app_password,
    label_problem,
    usage_path,
)
from authgate.credentials.schemes import hash_password
from authgate.credentials.store import StoreError, UserStore
from authgate.sasl import mechanism_info
from authgate.sasl.base import (
    ClientContext,
    ClientCredentials,
    Failure,
    PasswordCheck,
    PasswordVerdict,
    SecretForm,
    SecretLookup,
    ServerContext,
    Success,
    run_exchange,
)
from tests.credentials.test_store import full_secrets

MAIN = "main-Passw0rd-1"
SSHA = hash_password("x", "SSHA512")


def make_store(tmp_path: Path | None = None) -> UserStore:
    store = UserStore(realm="localhost")
    store.set_user_secrets("alice", full_secrets("alice", MAIN, "localhost"))
    if tmp_path is not None:
        store.save(tmp_path / "users.toml")
    return store


def login(store: UserStore, mechanism: str, password: str) -> Success | Failure:
    info = mechanism_info(mechanism)
    client = info.client(ClientCredentials("alice", password), ClientContext(hostname="localhost"))
    server = info.server(ServerContext(hostname="localhost", realm="localhost"))
    outcome = run_exchange(client, server, store.resolve)
    assert isinstance(outcome, Success | Failure)
    return outcome


def test_generated_passwords_are_long_random_and_grouped() -> None:
    seen = {generate_app_password() for _ in range(50)}
    assert len(seen) == 50
    for password in seen:
        groups = password.split("-")
        assert [len(g) for g in groups] == [6, 6, 6, 6]
        assert not set("lo01") & set(password)


def test_app_password_logs_in_with_plain_and_login_only() -> None:
    store = make_store()
    password = store.add_app_password("alice", "phone")
    assert isinstance(login(store, "PLAIN", password), Success)
    assert isinstance(login(store, "LOGIN", password), Success)
    # Stored as a one-way hash: challenge-response cannot check it.
    for mech in ("CRAM-MD5", "SCRAM-SHA-256", "DIGEST-MD5", "NTLM"):
        assert isinstance(login(store, mech, password), Failure), mech
    # The main password still works everywhere.
    assert isinstance(login(store, "SCRAM-SHA-256", MAIN), Success)
    user = store.user("alice")
    assert user is not None and user.apps[0].secret.scheme == APP_SCHEME


def test_verdict_names_the_label_and_not_for_the_main_password() -> None:
    store = make_store()
    password = store.add_app_password("alice", "laptop")
    verdict = store.resolve(PasswordCheck("alice", password, protocol="imap"))
    assert verdict == PasswordVerdict(True, "alice", "laptop")
    assert store.resolve(PasswordCheck("alice", MAIN, protocol="imap")) is True
    assert store.resolve(PasswordCheck("alice", password + "x")) is False


def test_protocol_limit() -> None:
    store = make_store()
    password = store.add_app_password("alice", "mailer", ["smtp"])
    assert store.resolve(PasswordCheck("alice", password, protocol="smtp")) == PasswordVerdict(
        True, "alice", "mailer"
    )
    refused = store.resolve(PasswordCheck("alice", password, protocol="imap"))
    assert isinstance(refused, PasswordVerdict) and not refused.valid


def test_password_login_off_refuses_the_main_password_in_every_form() -> None:
    store = make_store()
    password = store.add_app_password("alice", "phone")
    store.set_password_login("alice", False)
    for mech in ("PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256", "DIGEST-MD5", "NTLM"):
        assert isinstance(login(store, mech, MAIN), Failure), mech
    assert store.resolve(SecretLookup("alice", SecretForm.SCRAM_SHA_256)) is None
    assert isinstance(login(store, "PLAIN", password), Success)


def test_revoke() -> None:
    store = make_store()
    password = store.add_app_password("alice", "phone")
    assert store.revoke_app_password("alice", "phone")
    assert not store.revoke_app_password("alice", "phone")
    assert isinstance(login(store, "PLAIN", password), Failure)


def test_bad_labels_and_duplicates_refused() -> None:
    store = make_store()
    store.add_app_password("alice", "phone")
    with pytest.raises(StoreError, match="exists"):
        store.add_app_password("alice", "phone")
    with pytest.raises(StoreError, match="no such user"):
        store.add_app_password("bob", "phone")
    with pytest.raises(StoreError, match="unknown protocol"):
        store.add_app_password("alice", "x", ["ftp"])
    for bad in ("", "a\nb", "x" * 65, " lead", "tab\there"):
        assert label_problem(bad) is not None, bad


@given(st.text(max_size=80))
def test_label_check_never_crashes(label: str) -> None:
    problem = label_problem(label)
    if problem is None:
        assert label and label.isprintable() and len(label) <= 64


def test_saved_and_loaded(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    password = store.add_app_password("alice", "phone", ["imap", "pop3"])
    store.set_password_login("alice", False)
    store.save()
    text = (tmp_path / "users.toml").read_text()
    assert password not in text and "[[users.alice.apps]]" in text
    again = UserStore.load(tmp_path / "users.toml")
    user = again.user("alice")
    assert user is not None and not user.password_login
    assert user.apps[0].protocols == frozenset({"imap", "pop3"})
    assert again.resolve(PasswordCheck("alice", password, protocol="pop3")) == PasswordVerdict(
        True, "alice", "phone"
    )
    assert again.resolve(PasswordCheck("alice", MAIN)) is False
    # Setting a new main password keeps the app passwords and the switch.
    again.set_user_secrets("alice", full_secrets("alice", "other-Passw0rd", "localhost"))
    kept = again.user("alice")
    assert kept is not None and kept.apps == user.apps and not kept.password_login


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        ('label = "p"\nsecret = "{PLAIN}abc"\ncreated = 2026-01-01T00:00:00Z', "one-way"),
        ('label = "p"\nsecret = "{NTLM}8846f7eaee8fb117ad06bdd830b7586c"\n'
         "created = 2026-01-01T00:00:00Z", "one-way"),
        ('label = "p"\nsecret = "{SSHA512}abc"\ncreated = 2026-01-01', "date-time"),
        ('label = "p"\nsecret = "{SSHA512}abc"\ncreated = 2026-01-01T00:00:00Z\n'
         'protocols = ["ftp"]', "unknown protocol"),
        ('label = "p"\nsecret = "{SSHA512}abc"\ncreated = 2026-01-01T00:00:00Z\nx = 1', "unknown key"),
    ],
)
def test_bad_app_tables_refused(table: str, problem: str) -> None:
    good = make_store().dumps()
    table = table.replace("{SSHA512}abc", SSHA)
    with pytest.raises(StoreError, match=problem):
        UserStore.loads(good + "\n[[users.alice.apps]]\n" + table + "\n")


def test_usage_recorded_off_the_loop_and_saved(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    password = store.add_app_password("alice", "phone")
    store.save()
    loaded = UserStore.load(tmp_path / "users.toml")
    request = PasswordCheck("alice", password, protocol="imap", client="127.0.0.9")
    verdict = asyncio.run(loaded.aresolve(request))
    assert verdict == PasswordVerdict(True, "alice", "phone")
    data = json.loads(usage_path(tmp_path / "users.toml").read_text())
    assert data["alice"]["phone"]["from"] == "127.0.0.9"
    usage = UsageLog.load(usage_path(tmp_path / "users.toml")).get("alice", "phone")
    assert usage is not None and usage.client == "127.0.0.9"
    assert usage.at.tzinfo is not None
    assert abs(datetime.datetime.now(datetime.UTC) - usage.at) < datetime.timedelta(minutes=5)
    assert password not in usage_path(tmp_path / "users.toml").read_text()


def test_cli_create_list_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_store(tmp_path)
    users = str(tmp_path / "users.toml")
    assert main(["passwd", "alice", "--users", users, "--app", "phone", "--protocols", "imap,smtp"]) == 0
    out = capsys.readouterr().out
    password = out.splitlines()[1].strip()
    assert len(password) == 27
    assert password not in (tmp_path / "users.toml").read_text()
    store = UserStore.load(tmp_path / "users.toml")
    assert store.resolve(PasswordCheck("alice", password, protocol="imap", client="127.0.0.5"))
    asyncio.run(store.aresolve(PasswordCheck("alice", password, protocol="imap", client="127.0.0.5")))
    assert main(["apps", "alice", "--users", users]) == 0
    listing = capsys.readouterr().out
    assert "phone" in listing and "imap,smtp" in listing and "from 127.0.0.5" in listing
    assert password not in listing
    assert main(["apps", "alice", "--users", users, "--password-login", "no"]) == 0
    assert main(["apps", "alice", "--users", users, "--revoke", "phone"]) == 0
    capsys.readouterr()
    assert main(["apps", "alice", "--users", users]) == 0
    listing = capsys.readouterr().out
    assert "no app passwords" in listing and "main password logs in: no" in listing
    assert main(["apps", "alice", "--users", users, "--revoke", "phone"]) != 0
    assert main(["passwd", "alice", "--users", users, "--protocols", "imap"]) != 0
    assert main(["passwd", "alice", "--users", users, "--app", "x", "--protocols", "ftp"]) != 0
