"""Password policy: strength rules, the [password_policy] table, expiry, and
the `expiry` command."""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from authgate.commands.password_policy import add_commands
from authgate.config import ConfigError
from authgate.errors import UserError
from authgate.password_policy import (
    ExpiryState,
    PasswordPolicy,
    check,
    expiry_status,
    format_violations,
    name_parts,
    parse_policy,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SOURCE = Path("/etc/authgate/authgate.toml")
DEFAULT = PasswordPolicy()
CLASSES_2 = "at least 3 of: lower case, upper case, digits, other characters (has 2)"


# ------------------------------------------------------------------ rules


def test_defaults_are_the_originals() -> None:
    assert DEFAULT.min_length == 8
    assert DEFAULT.min_classes == 3
    assert DEFAULT.forbid_user_name and DEFAULT.forbid_full_name
    assert DEFAULT.banned == frozenset()
    assert DEFAULT.expire_days is None
    assert DEFAULT.warn_days == (21, 14, 7)


def test_a_good_password_passes() -> None:
    assert check(DEFAULT, "Tr0ub4dor&3", "alice", "Alice Liddell") == []


def test_too_short() -> None:
    assert check(DEFAULT, "Ab1!x", "alice") == ["at least 8 characters (has 5)"]
    assert check(DEFAULT, "Ab1!xyzw", "alice") == []  # exactly 8


def test_too_long_for_a_login() -> None:
    # Logins refuse passwords over 1,024 octets unchecked, so none may be set.
    at_cap = "Ab1!" + "é" * 510  # 4 + 1,020 octets
    assert check(DEFAULT, at_cap, "alice") == []
    assert check(DEFAULT, at_cap + "x", "alice") == ["at most 1024 octets in UTF-8 (has 1025)"]


@pytest.mark.parametrize(
    ("password", "classes"),
    [
        ("abcdefghij", 1),
        ("ABCDEFGHIJ", 1),
        ("1234567890", 1),
        ("!@#$%^&*()", 1),
        ("abcdeFGHIJ", 2),
        ("abcde12345", 2),
        ("abcde-_+=!", 2),
        ("12345-_+=!", 2),
        ("ÄÖÜäöüßéÈ", 2),  # non-ASCII letters have case too
        ("passwort 12", 3),  # a space is an "other" character
        ("Abcde12345", 3),
        ("Abcde1234!", 4),
    ],
)
def test_character_classes(password: str, classes: int) -> None:
    problems = check(DEFAULT, password, "zed")
    if classes >= 3:
        assert problems == []
    else:
        expected = "at least 3 of: lower case, upper case, digits, other characters"
        assert problems == [f"{expected} (has {classes})"]


def test_min_classes_zero_disables_the_rule() -> None:
    assert check(PasswordPolicy(min_classes=0), "aaaaaaaaaa", "zed") == []


def test_user_name_case_insensitive() -> None:
    assert check(DEFAULT, "xxALICE99!", "alice") == ["must not contain the user name"]
    assert check(DEFAULT, "xxAlIcE99!", "ALICE") == ["must not contain the user name"]


def test_user_name_local_part_of_an_address() -> None:
    problems = check(DEFAULT, "Bob.Smith#2024", "bob.smith@example.org")
    assert problems == ["must not contain the user name"]


def test_short_user_name_is_not_a_rule() -> None:
    # Two letters turn up by chance; Windows skips them too.
    assert check(DEFAULT, "Al-Pacino1", "al") == []


def test_user_name_rule_can_be_switched_off() -> None:
    assert check(PasswordPolicy(forbid_user_name=False), "xxALICE99!", "alice") == []


def test_full_name_part_case_insensitive() -> None:
    problems = check(DEFAULT, "xSMITHx1!", "jq", "John Q. Smith")
    assert problems == ["must not contain 'Smith' from the full name"]


@pytest.mark.parametrize(
    "full_name", ["Anne-Marie.Dupont", "Dupont,Anne-Marie", "Anne Marie\tDupont"]
)
def test_full_name_split_on_separators(full_name: str) -> None:
    problems = check(DEFAULT, "marie-DUPONT-9", "amd", full_name)
    assert sorted(problems) == [
        "must not contain 'Dupont' from the full name",
        "must not contain 'Marie' from the full name",
    ]


def test_full_name_parts_of_two_characters_are_ignored() -> None:
    assert name_parts("Ed de Vries-Li") == ["Vries"]
    assert check(DEFAULT, "Ed+de+Li+42", "evl", "Ed de Vries-Li") == []
    assert check(DEFAULT, "Eddie+VRIES+42", "evl", "Ed de Vries-Li") == [
        "must not contain 'Vries' from the full name"
    ]


def test_full_name_rule_can_be_switched_off() -> None:
    assert check(PasswordPolicy(forbid_full_name=False), "xSMITHx1!", "jq", "John Smith") == []


def test_full_width_letters_do_not_evade_the_name_rules() -> None:
    assert check(DEFAULT, "ＳＭＩＴＨ-2024", "jq", "John Smith") == [
        "must not contain 'Smith' from the full name"
    ]


def test_every_failure_is_listed_together(tmp_path: Path) -> None:
    banned = tmp_path / "banned.txt"
    banned.write_text("alice\n")
    policy = parse_policy({"banned_passwords_file": str(banned)}, SOURCE)
    problems = check(policy, "alice", "alice", "Alice Liddell")
    # The full name's 'Alice' is the user name: said once, not twice.
    assert problems == [
        "at least 8 characters (has 5)",
        "at least 3 of: lower case, upper case, digits, other characters (has 1)",
        "must not contain the user name",
        "is on the list of banned passwords",
    ]


def test_name_and_length_failures_together() -> None:
    problems = check(DEFAULT, "smith7", "john", "John Smith")
    assert problems == [
        "at least 8 characters (has 6)",
        CLASSES_2,
        "must not contain 'Smith' from the full name",
    ]


def test_banned_file_case_insensitive_and_loaded_once(tmp_path: Path) -> None:
    banned = tmp_path / "banned.txt"
    banned.write_bytes(b"Password1!\n\n  Summer2024!  \r\nlatin1-\xe9t\xe9\n")
    policy = parse_policy({"banned_passwords_file": "banned.txt"}, tmp_path / "authgate.toml")
    assert policy.banned_file == banned
    assert isinstance(policy.banned, frozenset) and len(policy.banned) == 3
    banned.unlink()  # loaded once: the file is not read again
    assert check(policy, "PASSWORD1!", "zed") == ["is on the list of banned passwords"]
    assert check(policy, "summer2024!", "zed") == ["is on the list of banned passwords"]
    assert check(policy, "Password2!", "zed") == []
    # The repr stays short however long the list is.
    assert "Summer" not in repr(policy)


@given(
    password=st.text(min_size=8, max_size=30),
    username=st.text(max_size=12),
    full_name=st.text(max_size=30),
)
def test_messages_never_contain_the_password(password: str, username: str, full_name: str) -> None:
    # A name part is quoted by design; a password that is one is its own case.
    assume(password.casefold() not in full_name.casefold())
    for message in check(DEFAULT, password, username, full_name):
        assert password not in message
    assert password not in format_violations(check(DEFAULT, password, username, full_name))


def test_format_violations_names_every_rule_on_one_line() -> None:
    problems = check(DEFAULT, "smith7", "john", "John Smith")
    text = format_violations(problems)
    assert "\n" not in text
    assert text.startswith("the password does not meet the password policy: ")
    for problem in problems:
        assert problem in text
    assert format_violations([]) == ""


def test_policy_built_in_code_is_checked() -> None:
    with pytest.raises(ValueError, match="min_classes"):
        PasswordPolicy(min_classes=5)
    with pytest.raises(ValueError, match="expire_days"):
        PasswordPolicy(expire_days=0)
    assert PasswordPolicy(warn_days=(7, 21, 14, 7)).warn_days == (21, 14, 7)


# ---------------------------------------------------------------- parsing


def test_parse_empty_table_gives_defaults() -> None:
    assert parse_policy({}, SOURCE) == DEFAULT


def test_parse_all_keys(tmp_path: Path) -> None:
    (tmp_path / "banned.txt").write_text("hunter2\n")
    policy = parse_policy(
        {
            "min_length": 12,
            "min_classes": 4,
            "forbid_user_name": False,
            "forbid_full_name": False,
            "banned_passwords_file": "banned.txt",
            "expire_days": 90,
            "warn_days": [7, 30],
        },
        tmp_path / "authgate.toml",
    )
    assert policy == PasswordPolicy(
        min_length=12,
        min_classes=4,
        forbid_user_name=False,
        forbid_full_name=False,
        banned=frozenset({"hunter2"}),
        banned_file=tmp_path / "banned.txt",
        expire_days=90,
        warn_days=(30, 7),
    )


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"min_lenght": 8}, "password_policy.min_lenght: unknown key (expected "),
        ({"min_length": "8"}, "password_policy.min_length: '8' is not an integer"),
        ({"min_length": True}, "password_policy.min_length: True is not an integer"),
        ({"min_length": 0}, "password_policy.min_length: 0 is not between 1 and 1024"),
        ({"min_classes": 5}, "password_policy.min_classes: 5 is not between 0 and 4"),
        (
            {"forbid_user_name": "yes"},
            "password_policy.forbid_user_name: 'yes' is not true or false",
        ),
        ({"expire_days": 0}, "password_policy.expire_days: 0 is not between 1 and 3650"),
        ({"warn_days": 7}, "password_policy.warn_days: 7 is not a list of integers"),
        ({"warn_days": [14, -1]}, "password_policy.warn_days[1]: -1 is not a positive integer"),
        ({"warn_days": [14, 14]}, "password_policy.warn_days[1]: 14 is listed twice"),
        (
            {"expire_days": 10, "warn_days": [7, 10]},
            "password_policy.warn_days[1]: 10 is not less than expire_days (10)",
        ),
        (
            {"banned_passwords_file": 3},
            "password_policy.banned_passwords_file: 3 is not a file name",
        ),
    ],
)
def test_parse_errors_name_file_key_path_and_value(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_policy(table, SOURCE)
    assert str(info.value).startswith(f"{SOURCE}: {message}")


def test_parse_error_uses_the_given_key_path() -> None:
    with pytest.raises(ConfigError, match=r"authgate.toml: listeners\[0\]\.pw\.min_classes: 9 "):
        parse_policy({"min_classes": 9}, SOURCE, where="listeners[0].pw")


def test_missing_banned_file_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_policy({"banned_passwords_file": "nope.txt"}, tmp_path / "a.toml")
    text = str(info.value)
    assert text.startswith(f"{tmp_path / 'a.toml'}: password_policy.banned_passwords_file: ")
    assert f"cannot read {tmp_path / 'nope.txt'}" in text


def test_default_warnings_shrink_for_a_short_expiry() -> None:
    assert parse_policy({"expire_days": 10}, SOURCE).warn_days == (7,)
    assert parse_policy({"expire_days": 60}, SOURCE).warn_days == (21, 14, 7)


def test_policy_table_in_the_config(tmp_path: Path) -> None:
    from authgate.config import load

    path = tmp_path / "authgate.toml"
    path.write_text('hostname = "x"\n[password_policy]\nmin_length = 10\n')
    assert load(path).password_policy.min_length == 10
    path.write_text('hostname = "x"\n')
    assert load(path).password_policy == PasswordPolicy()  # the original's defaults
    path.write_text('password_policy = "strict"\n')
    with pytest.raises(ConfigError, match="password_policy: 'strict' is not a table"):
        load(path)
    path.write_text("[password_policy]\nmin_length = 10\nmax_length = 3\n")
    with pytest.raises(ConfigError, match=r"password_policy\.max_length: unknown key"):
        load(path)


# ----------------------------------------------------------------- expiry

TODAY = datetime.date(2024, 7, 1)
NINETY = PasswordPolicy(expire_days=90)


def changed_for(days_left: int, policy: PasswordPolicy = NINETY) -> datetime.date:
    assert policy.expire_days is not None
    return TODAY - datetime.timedelta(days=policy.expire_days - days_left)


@pytest.mark.parametrize(
    ("days_left", "state", "threshold"),
    [
        (89, ExpiryState.OK, None),
        (22, ExpiryState.OK, None),
        (21, ExpiryState.WARN, 21),
        (15, ExpiryState.WARN, 21),
        (14, ExpiryState.WARN, 14),
        (8, ExpiryState.WARN, 14),
        (7, ExpiryState.WARN, 7),
        (1, ExpiryState.WARN, 7),
        (0, ExpiryState.EXPIRED, None),
        (-30, ExpiryState.EXPIRED, None),
    ],
)
def test_expiry_thresholds(days_left: int, state: ExpiryState, threshold: int | None) -> None:
    status = expiry_status(NINETY, changed_for(days_left), TODAY)
    assert status.state is state
    assert status.days_left == days_left
    assert status.threshold == threshold
    assert status.expires == TODAY + datetime.timedelta(days=days_left)


def test_expiry_with_own_warning_days() -> None:
    policy = PasswordPolicy(expire_days=30, warn_days=(3,))
    assert expiry_status(policy, changed_for(4, policy), TODAY).state is ExpiryState.OK
    status = expiry_status(policy, changed_for(3, policy), TODAY)
    assert (status.state, status.threshold) == (ExpiryState.WARN, 3)


def test_no_expiry_configured_or_no_date() -> None:
    assert expiry_status(DEFAULT, datetime.date(2000, 1, 1), TODAY).state is ExpiryState.OK
    status = expiry_status(NINETY, None, TODAY)
    assert status.state is ExpiryState.UNKNOWN and status.expires is None


# ---------------------------------------------------------------- command


def run_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="authgate")
    sub = parser.add_subparsers(dest="command", required=True)
    add_commands(sub)
    args = parser.parse_args(argv)
    status: int = args.func(args)
    return status


USERS = """
[users.alice]
full_name = "Alice Liddell"
password_changed = 2024-03-01
secrets = ["{PLAIN}a"]
[users.bob]
password_changed = 2024-06-20
secrets = ["{PLAIN}b"]
[users.carol]
secrets = ["{PLAIN}c"]
[users.dave]
password_changed = 2024-05-01
secrets = ["{PLAIN}d"]
[users.erin]
password_changed = 2024-06-30
secrets = ["{PLAIN}e"]
"""

CONFIG = """
hostname = "mail.example.org"
[users]
file = "users.toml"
{policy}
[[listeners]]
name = "imap"
protocol = "imap"
listen = "127.0.0.1:10143"
[listeners.backend]
address = "127.0.0.1:1143"
master_user = "authgate"
master_password = "secret"
"""


def write_config(tmp_path: Path, policy: str) -> Path:
    (tmp_path / "users.toml").write_text(USERS)
    path = tmp_path / "authgate.toml"
    path.write_text(CONFIG.replace("{policy}", policy))
    return path


def test_expiry_command_lists_expired_and_warned_users(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, "[password_policy]\nexpire_days = 40\n")
    assert run_command(["expiry", "-c", str(config), "--today", "2024-07-15"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "alice: expired on 2024-04-10",
        "bob: expires in 15 days, on 2024-07-30",
        "dave: expired on 2024-06-10",
        "no password_changed date, so no expiry: carol "
        "(add password_changed = YYYY-MM-DD to the users file)",
    ]  # erin (25 days left) is not due yet


def test_expiry_command_errors_are_user_errors(tmp_path: Path) -> None:
    config = write_config(tmp_path, "[password_policy]\nexpire_days = -1\n")
    with pytest.raises(UserError, match=r"password_policy\.expire_days: -1 is not between"):
        run_command(["expiry", "-c", str(config)])
    relay = CONFIG.replace('[users]\nfile = "users.toml"\n', "").replace(
        'master_user = "authgate"\nmaster_password = "secret"', 'mode = "relay"'
    )
    config.write_text(relay.replace("{policy}", "[password_policy]\nexpire_days = 9\n"))
    with pytest.raises(UserError, match=r"authgate\.toml: no \[users\] file is configured"):
        run_command(["expiry", "-c", str(config)])
    (tmp_path / "users.toml").write_text("[users.x]\nsecrets = []\n")
    config.write_text(CONFIG.replace("{policy}", "[password_policy]\nexpire_days = 9\n"))
    with pytest.raises(UserError, match=r"users\.toml: users\.x\.secrets: must list"):
        run_command(["expiry", "-c", str(config)])


def test_expiry_command_on_the_example_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_command(["expiry", "-c", str(EXAMPLES / "authgate.toml")]) == 0
    assert "no password expiry is configured" in capsys.readouterr().out
