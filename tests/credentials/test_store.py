"""The users file: loading, lookups, offers, saving."""

from __future__ import annotations

import asyncio
import datetime
import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import argon2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authgate.credentials import (
    DEFAULT_WRITE_SCHEMES,
    DIRECTORY_REASON,
    StoreError,
    StoreOffer,
    UserStore,
    generate_secrets,
    hash_password,
)
from authgate.credentials.schemes import StoredSecret, parse_secret
from authgate.credentials.store import MAX_LISTED_USERS, User
from authgate.sasl import DEFAULT_ORDER, MECHANISMS
from authgate.sasl.base import (
    ClientContext,
    ClientCredentials,
    Failure,
    PasswordCheck,
    ScramVerifier,
    SecretForm,
    SecretLookup,
    ServerContext,
    Success,
    run_exchange,
)
from authgate.sasl.cram_md5 import cram_md5_secret
from authgate.sasl.digest_md5 import digest_ha1
from authgate.sasl.ntlm import nt_hash
from authgate.sasl.scram import make_verifier

REALM = "mail.example.org"
SHA_PASSWORD = "{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g="  # "password"
NTLM_PASSWORD = "{NTLM}8846f7eaee8fb117ad06bdd830b7586c"  # "password"
# What a users file verifies: not bearer tokens (the [oauth] verifier's) nor
# EXTERNAL (a client certificate's).
ALL_MECHS = {m for m, info in MECHANISMS.items() if not (info.bearer or info.external)}
CLEARTEXT = {"PLAIN", "LOGIN"}


def fast_argon2(password: str) -> str:
    hasher = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
    return "{ARGON2ID}" + hasher.hash(password)


def full_secrets(user: str, password: str, realm: str = REALM) -> list[str]:
    """What `authgate passwd` writes, with a cheap argon2 for test speed."""
    rest = generate_secrets(user, password, realm, schemes=DEFAULT_WRITE_SCHEMES[1:])
    return [fast_argon2(password), *rest]


def toml_list(items: list[str]) -> str:
    return "[" + ", ".join(f"'{item}'" for item in items) + "]"


@pytest.fixture(scope="module")
def mixed_text() -> str:
    return f"""
realm = "{REALM}"

[users.alice]      # everything: every mechanism works
secrets = {toml_list(full_secrets("alice", "alice-pw"))}
full_name = "Alice A."

[users.bob]        # one-way hash plus an NT hash
secrets = {toml_list([SHA_PASSWORD, NTLM_PASSWORD])}

[users.carol]      # plaintext
secrets = ["{{PLAIN}}carol-pw"]

[users."dave@example.org"]   # HA1 made for another realm
realm = "other.example.org"
secrets = {
        toml_list(
            [
                hash_password(
                    "dave-pw", "DIGEST-MD5", username="dave@example.org", realm="other.example.org"
                ),
                fast_argon2("dave-pw"),
            ]
        )
    }
"""


@pytest.fixture
def store(mixed_text: str) -> UserStore:
    return UserStore.loads(mixed_text, source="users.toml")


# ------------------------------------------------------------------ loading


def test_load_reads_users_and_keys(store: UserStore, tmp_path: Path, mixed_text: str) -> None:
    assert store.realm == REALM
    assert store.names() == ["alice", "bob", "carol", "dave@example.org"]
    alice = store.user("alice")
    assert alice is not None
    assert alice.full_name == "Alice A."
    assert [s.scheme for s in alice.secrets] == list(DEFAULT_WRITE_SCHEMES)
    dave = store.user("dave@example.org")
    assert dave is not None and dave.realm == "other.example.org"
    # A DIGEST-MD5 HA1 is bound to its user and the user's realm (or the file's).
    assert dave.secrets[0].realm == "other.example.org"
    assert alice.secrets[4].realm == REALM and alice.secrets[4].username == "alice"
    path = tmp_path / "users.toml"
    path.write_text(mixed_text)
    loaded = UserStore.load(path)
    assert loaded.path == path and len(loaded) == 4 and "bob" in loaded


def _load_error(text: str) -> StoreError:
    with pytest.raises(StoreError) as info:
        UserStore.loads(text, source="/etc/authgate/users.toml")
    assert str(info.value).startswith("/etc/authgate/users.toml: ")
    return info.value


SECRET = "c2VjcmV0LXZhbHVlLTEyMzQ1Njc4OQ"  # must never appear in an error


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        (
            f'[users.bob]\nsecrets = ["{{FOO}}{SECRET}"]',
            "users.bob.secrets[0]",
            "unknown scheme {FOO}",
        ),
        (
            f'[users.bob]\nsecrets = ["{{PLAIN}}x", "{{SSHA}}{SECRET}"]',
            "users.bob.secrets[1]",
            "{SSHA}: value is not valid base64",
        ),
        (
            f'[users."bob@example.org"]\nsecrets = ["{{NTLM}}{SECRET}"]',
            'users."bob@example.org".secrets[0]',
            "{NTLM}",
        ),
        (f'[users.bob]\nsecrets = ["{SECRET}"]', "users.bob.secrets[0]", "missing {SCHEME} prefix"),
        ("[users.bob]\nsecrets = [42]", "users.bob.secrets[0]", "must be a string"),
        ("[users.bob]\nsecrets = []", "users.bob.secrets", "at least one"),
        ('[users.bob]\nsecrets = "{PLAIN}x"', "users.bob.secrets", "array"),
        ("[users.bob]\nfull_name = 'Bob'", "users.bob.secrets", "missing"),
        ('[users.""]\nsecrets = ["{PLAIN}x"]', 'users.""', "empty"),
        ('[users."a\\u0001b"]\nsecrets = ["{PLAIN}x"]', 'users."a\\u0001b"', "control character"),
        ("users = 3", "users", "must be a table"),
        ("[users]\nbob = 3", "users.bob", "must be a table"),
        ("realm = 3", "realm", "must be a string"),
        ("relam = 'x'", "relam", "unknown key"),
        ('[users.bob]\nsecret = ["{PLAIN}x"]', "users.bob.secret", "unknown key"),
        ('[users.bob]\nrealm = 1\nsecrets = ["{PLAIN}x"]', "users.bob.realm", "string"),
        ('[users.bob]\nfull_name = 1\nsecrets = ["{PLAIN}x"]', "users.bob.full_name", "string"),
        (
            '[users.bob]\npassword_changed = "May"\nsecrets = ["{PLAIN}x"]',
            "users.bob.password_changed",
            "date",
        ),
        (
            '[users.bob]\npassword_changed = 2024-05-01T10:00:00\nsecrets = ["{PLAIN}x"]',
            "users.bob.password_changed",
            "not a date-time",
        ),
        (
            f'[users.bob]\nsecrets = ["{{DIGEST-MD5}}{"ab" * 16}"]',
            "users.bob.secrets[0]",
            "bound to a realm",
        ),
    ],
)
def test_load_errors_name_the_key_path(text: str, key: str, problem: str) -> None:
    error = _load_error(text)
    assert error.key == key
    assert f": {key}: " in str(error)
    assert problem in str(error)
    assert SECRET not in str(error)


def test_invalid_toml_is_a_store_error() -> None:
    error = _load_error(f'[users.bob]\nsecrets = ["{{PLAIN}}{SECRET}"\n')
    assert "not valid TOML" in str(error)
    assert SECRET not in str(error)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="cannot read"):
        UserStore.load(tmp_path / "missing.toml")


def test_dates_are_read_as_dates() -> None:
    store = UserStore.loads(
        '[users.a]\npassword_changed = 2024-05-01\nsecrets = ["{PLAIN}x"]\n'
        '[users.b]\npassword_changed = "2024-06-02"\nsecrets = ["{PLAIN}x"]\n'
    )
    a, b = store.user("a"), store.user("b")
    assert a is not None and a.password_changed == datetime.date(2024, 5, 1)
    assert b is not None and b.password_changed == datetime.date(2024, 6, 2)


# ------------------------------------------------------------------ resolve


@pytest.mark.parametrize(
    ("user", "password"),
    [
        ("alice", "alice-pw"),
        ("bob", "password"),
        ("carol", "carol-pw"),
        ("dave@example.org", "dave-pw"),
    ],
)
def test_password_check(store: UserStore, user: str, password: str) -> None:
    assert store.resolve(PasswordCheck(user, password)) is True
    assert store.resolve(PasswordCheck(user, password + "!")) is False
    assert store.resolve(PasswordCheck(user, "")) is False


def test_password_check_for_unknown_user_runs_a_look_alike(store: UserStore) -> None:
    assert store.resolve(PasswordCheck("mallory", "alice-pw")) is False
    assert store.resolve(PasswordCheck("Alice", "alice-pw")) is False  # names are exact
    # The dummy imitates the store's most common scheme set (ties: first seen).
    dummy = store._dummy_secrets()
    alice = store.user("alice")
    assert alice is not None
    assert [s.scheme for s in dummy] == [s.scheme for s in alice.secrets]
    assert all(s.encoded == "" for s in dummy)


def test_dummy_follows_the_store_and_defaults_to_argon2id() -> None:
    assert [s.scheme for s in UserStore()._dummy_secrets()] == ["ARGON2ID"]
    sha_store = UserStore.loads(
        "\n".join(f'[users.u{i}]\nsecrets = ["{SHA_PASSWORD}"]' for i in range(3))
    )
    assert [s.scheme for s in sha_store._dummy_secrets()] == ["SHA"]
    assert sha_store.resolve(PasswordCheck("nobody", "password")) is False


def test_secret_lookups_of_stored_forms(store: UserStore) -> None:
    def ask(user: str, form: SecretForm, realm: str = "") -> object:
        return store.resolve(SecretLookup(user, form, realm))

    assert ask("alice", SecretForm.CRAM_MD5) == cram_md5_secret("alice-pw")
    assert ask("alice", SecretForm.NT_HASH) == nt_hash("alice-pw")
    assert ask("alice", SecretForm.DIGEST_MD5, REALM) == digest_ha1("alice", REALM, "alice-pw")
    for form, name in ((SecretForm.SCRAM_SHA_1, "sha1"), (SecretForm.SCRAM_SHA_256, "sha256")):
        verifier = ask("alice", form)
        assert isinstance(verifier, ScramVerifier)
        again = make_verifier("alice-pw", name, verifier.iterations, verifier.salt)
        assert again.stored_key == verifier.stored_key
    assert ask("alice", SecretForm.PLAINTEXT) is None  # hashes only
    assert ask("bob", SecretForm.NT_HASH) == nt_hash("password")
    for form in (SecretForm.CRAM_MD5, SecretForm.SCRAM_SHA_256, SecretForm.DIGEST_MD5):
        assert ask("bob", form, REALM) is None
    assert all(ask("mallory", form, REALM) is None for form in SecretForm)


def test_secret_lookups_derived_from_plaintext(store: UserStore) -> None:
    def ask(form: SecretForm, realm: str = "") -> object:
        return store.resolve(SecretLookup("carol", form, realm))

    assert ask(SecretForm.PLAINTEXT) == "carol-pw"
    assert ask(SecretForm.CRAM_MD5) == cram_md5_secret("carol-pw")
    assert ask(SecretForm.NT_HASH) == nt_hash("carol-pw")
    # From plaintext, DIGEST-MD5 works for whatever realm the server uses.
    assert ask(SecretForm.DIGEST_MD5, "any.realm") == digest_ha1("carol", "any.realm", "carol-pw")
    first = ask(SecretForm.SCRAM_SHA_256)
    assert isinstance(first, ScramVerifier)
    assert ask(SecretForm.SCRAM_SHA_256) is first  # PBKDF2 ran once
    again = make_verifier("carol-pw", "sha256", first.iterations, first.salt)
    assert again.server_key == first.server_key
    assert ask(SecretForm.SCRAM_SHA_1) != first


def test_scram_cache_is_dropped_when_secrets_change(store: UserStore) -> None:
    first = store.resolve(SecretLookup("carol", SecretForm.SCRAM_SHA_256))
    store.set_user_secrets("carol", ["{PLAIN}new-pw"])
    second = store.resolve(SecretLookup("carol", SecretForm.SCRAM_SHA_256))
    assert isinstance(first, ScramVerifier) and isinstance(second, ScramVerifier)
    assert second is not first
    assert make_verifier("new-pw", "sha256", 4096, second.salt).stored_key == second.stored_key


def test_digest_md5_realm_must_match_the_stored_ha1(store: UserStore) -> None:
    assert store.resolve(SecretLookup("alice", SecretForm.DIGEST_MD5, "other.example.org")) is None
    dave_ha1 = digest_ha1("dave@example.org", "other.example.org", "dave-pw")
    assert (
        store.resolve(SecretLookup("dave@example.org", SecretForm.DIGEST_MD5, "other.example.org"))
        == dave_ha1
    )
    assert store.resolve(SecretLookup("dave@example.org", SecretForm.DIGEST_MD5, REALM)) is None
    assert "DIGEST-MD5" in store.mechanisms_for("alice")
    assert "DIGEST-MD5" not in store.mechanisms_for("alice", realm="other.example.org")
    assert "DIGEST-MD5" not in store.mechanisms_for("dave@example.org")
    assert "DIGEST-MD5" in store.mechanisms_for("dave@example.org", realm="other.example.org")


def test_resolve_rejects_other_objects(store: UserStore) -> None:
    with pytest.raises(TypeError):
        store.resolve("alice")  # type: ignore[arg-type]


# ------------------------------------------------------------------ end to end


@pytest.mark.parametrize("mech", sorted(m for m in ALL_MECHS if not m.endswith("-PLUS")))
@pytest.mark.parametrize(("user", "password"), [("alice", "alice-pw"), ("carol", "carol-pw")])
def test_every_mechanism_logs_in_through_the_store(
    store: UserStore, mech: str, user: str, password: str
) -> None:
    info = MECHANISMS[mech]
    server_ctx = ServerContext(hostname=REALM, realm=REALM)
    client_ctx = ClientContext(hostname=REALM)
    good = run_exchange(
        info.client(ClientCredentials(user, password), client_ctx),
        info.server(server_ctx),
        store.resolve,
    )
    assert isinstance(good, Success) and good.authcid == user
    bad = run_exchange(
        info.client(ClientCredentials(user, password + "x"), client_ctx),
        info.server(server_ctx),
        store.resolve,
    )
    assert isinstance(bad, Failure)


# ------------------------------------------------------------------ offers


def test_mechanisms_for_each_user(store: UserStore) -> None:
    assert store.mechanisms_for("alice") == ALL_MECHS
    assert store.mechanisms_for("bob") == CLEARTEXT | {"NTLM"}
    assert store.mechanisms_for("carol") == ALL_MECHS
    assert store.mechanisms_for("dave@example.org") == CLEARTEXT
    assert store.mechanisms_for("mallory") == set()


def test_all_sha_store_offers_only_cleartext() -> None:
    store = UserStore.loads(
        "\n".join(f'[users.u{i}]\nsecrets = ["{SHA_PASSWORD}"]' for i in (3, 1, 2))
    )
    offer = store.offerable(DEFAULT_ORDER)
    assert offer.mechanisms == ("LOGIN", "PLAIN")
    assert set(offer.dropped) == {"CRAM-MD5", "DIGEST-MD5", "NTLM"}
    assert offer.dropped["CRAM-MD5"] == ("u1", "u2", "u3")
    assert offer.dropped_count["NTLM"] == 3
    assert "3 users have neither" in offer.reasons["CRAM-MD5"]
    assert "{CRAM-MD5}" in offer.reasons["CRAM-MD5"]
    assert store.offerable(["PLAIN", "NTLM", "LOGIN"]).mechanisms == ("PLAIN", "LOGIN")


def test_mixed_store_offer_keeps_the_admin_order(store: UserStore) -> None:
    order = ["SCRAM-SHA-256", "CRAM-MD5", "NTLM", "DIGEST-MD5", "LOGIN", "PLAIN"]
    offer = store.offerable(order)
    assert offer.mechanisms == ("LOGIN", "PLAIN")
    assert offer.dropped["NTLM"] == ("dave@example.org",)
    assert offer.dropped["CRAM-MD5"] == ("bob", "dave@example.org")
    assert offer.dropped["DIGEST-MD5"] == ("bob", "dave@example.org")
    assert "1 user has" in offer.reasons["NTLM"]
    assert REALM in offer.reasons["DIGEST-MD5"]

    store.remove_user("dave@example.org")
    offer = store.offerable(order)
    assert offer.mechanisms == ("NTLM", "LOGIN", "PLAIN")
    assert store.offerable(list(reversed(order))).mechanisms == ("PLAIN", "LOGIN", "NTLM")
    store.remove_user("bob")
    assert store.offerable(order).mechanisms == tuple(order)
    assert store.offerable(order).dropped == {}


def test_offer_spelling_duplicates_and_unknown_names() -> None:
    store = UserStore.loads('[users.a]\nsecrets = ["{PLAIN}x"]')
    offer = store.offerable(["plain", "PLAIN", "X-UNHEARD-OF", "cram-md5", "XOAUTH2"])
    assert offer.mechanisms == ("PLAIN", "CRAM-MD5")
    assert offer.reasons == {
        "X-UNHEARD-OF": "unknown mechanism",
        "XOAUTH2": "not verified by the users file (see authgate.offers)",
    }


def test_empty_store_offers_the_whole_order() -> None:
    offer = UserStore().offerable(DEFAULT_ORDER)
    assert offer.mechanisms == DEFAULT_ORDER
    assert offer.dropped == {} and offer.reasons == {}


def test_dropped_user_list_is_capped_but_counted() -> None:
    count = MAX_LISTED_USERS + 7
    store = UserStore.loads(
        "\n".join(f'[users.u{i:03}]\nsecrets = ["{SHA_PASSWORD}"]' for i in range(count))
    )
    offer = store.offerable(["NTLM", "PLAIN"])
    assert offer.mechanisms == ("PLAIN",)
    assert len(offer.dropped["NTLM"]) == MAX_LISTED_USERS
    assert offer.dropped["NTLM"][0] == "u000"
    assert offer.dropped_count["NTLM"] == count


def test_password_only_offer_for_directory_users() -> None:
    offer = StoreOffer.password_only([*DEFAULT_ORDER, "SCRAM-SHA-256"])
    assert offer.mechanisms == ("LOGIN", "PLAIN")
    assert set(offer.reasons) == {"CRAM-MD5", "DIGEST-MD5", "NTLM", "SCRAM-SHA-256"}
    assert set(offer.reasons.values()) == {DIRECTORY_REASON}
    assert offer.dropped["NTLM"] == ()


def test_generated_secrets_make_every_mechanism_work() -> None:
    texts = generate_secrets("erin", "erin-pw", REALM)
    assert [t[1 : t.index("}")] for t in texts] == list(DEFAULT_WRITE_SCHEMES)
    store = UserStore(realm=REALM)
    store.set_user_secrets("erin", texts)
    assert store.mechanisms_for("erin") == ALL_MECHS
    assert store.offerable(DEFAULT_ORDER).mechanisms == DEFAULT_ORDER
    assert store.resolve(PasswordCheck("erin", "erin-pw")) is True
    with pytest.raises(ValueError, match="realm"):
        generate_secrets("erin", "erin-pw", None)
    assert generate_secrets("erin", "pw", None, schemes=["NTLM"]) == [
        "{NTLM}" + nt_hash("pw").hex()
    ]


# ------------------------------------------------------------------ changing and saving


def test_set_user_secrets_validates_and_keeps_other_keys(store: UserStore) -> None:
    store.set_user_secrets("alice", [NTLM_PASSWORD], password_changed=datetime.date(2025, 1, 2))
    alice = store.user("alice")
    assert alice is not None
    assert alice.full_name == "Alice A."
    assert alice.password_changed == datetime.date(2025, 1, 2)
    assert store.resolve(PasswordCheck("alice", "password")) is True
    assert store.resolve(PasswordCheck("alice", "alice-pw")) is False
    with pytest.raises(StoreError, match=r"users\.alice\.secrets\[1\]: unknown scheme") as info:
        store.set_user_secrets("alice", [NTLM_PASSWORD, "{FOO}" + SECRET])
    assert SECRET not in str(info.value)
    with pytest.raises(StoreError, match="control character"):
        store.set_user_secrets("a\nb", [NTLM_PASSWORD])
    with pytest.raises(StoreError, match="surrogate"):
        store.set_user_secrets("zed", ["{PLAIN}\ud800"])
    digest = hash_password("x", "DIGEST-MD5", username="new", realm="r")
    with pytest.raises(StoreError, match="realm"):
        UserStore().set_user_secrets("new", [digest])


def _same(a: UserStore, b: UserStore) -> None:
    assert a.realm == b.realm
    assert a.names() == b.names()
    for name in a.names():
        ua, ub = a.user(name), b.user(name)
        assert ua is not None and ub is not None
        assert [s.encoded for s in ua.secrets] == [s.encoded for s in ub.secrets]
        assert (ua.realm, ua.full_name, ua.password_changed) == (
            ub.realm,
            ub.full_name,
            ub.password_changed,
        )


def test_save_round_trip_and_mode(store: UserStore, tmp_path: Path) -> None:
    store.set_user_secrets(
        'quote"back\\slash',
        ['{PLAIN}pa"ss\\wo\trd\u007f\u00e9\u2603', "{PLAIN}'single' and ''' triple"],
        password_changed=datetime.date(2024, 2, 29),
    )
    store.set_user_secrets("user@example.org", [SHA_PASSWORD])
    target = tmp_path / "users.toml"
    target.write_text("old content")
    target.chmod(0o644)
    store.save(target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["users.toml"]  # no temporary file left behind
    loaded = UserStore.load(target)
    _same(store, loaded)
    assert loaded.dumps() == store.dumps()
    assert loaded.resolve(PasswordCheck('quote"back\\slash', 'pa"ss\\wo\trd\u007f\u00e9\u2603'))
    assert '[users."user@example.org"]' in target.read_text()


def test_save_to_the_loaded_path_keeps_everyone(store: UserStore, tmp_path: Path) -> None:
    path = tmp_path / "users.toml"
    store.save(path)
    first = UserStore.load(path)
    first.set_user_secrets("bob", ["{PLAIN}bob-pw"])
    assert first.save() == path
    second = UserStore.load(path)
    assert second.names() == store.names()
    assert second.resolve(PasswordCheck("bob", "bob-pw")) is True
    assert second.resolve(PasswordCheck("alice", "alice-pw")) is True
    alice = second.user("alice")
    assert alice is not None and alice.full_name == "Alice A."
    with pytest.raises(ValueError):
        UserStore().save()


def test_empty_store_round_trips(tmp_path: Path) -> None:
    path = UserStore().save(tmp_path / "u.toml")
    loaded = UserStore.load(path)
    assert len(loaded) == 0 and loaded.realm is None


_names = st.text(min_size=1, max_size=30).filter(
    lambda s: (
        not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or 0xD800 <= ord(c) < 0xE000 for c in s)
    )
)


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(_names, st.text(min_size=1, max_size=40), max_size=5),
    st.one_of(st.none(), _names),
)
def test_any_names_and_plaintexts_round_trip(users: dict[str, str], realm: str | None) -> None:
    store = UserStore(realm=realm)
    for name, password in users.items():
        store.set_user_secrets(name, ["{PLAIN}" + password])
    _same(store, UserStore.loads(store.dumps()))


# ------------------------------------------------------------------ async


def _thread_spy(store: UserStore) -> list[str]:
    """Make `store.resolve` record the name of the thread it runs in."""
    seen: list[str] = []
    original = store.resolve

    def spy(request: PasswordCheck | SecretLookup) -> object:
        seen.append(threading.current_thread().name)
        return original(request)

    store.resolve = spy  # type: ignore[assignment,method-assign]
    return seen


@pytest.mark.asyncio
async def test_aresolve_runs_slow_hashing_off_the_event_loop(store: UserStore) -> None:
    loop_thread = threading.current_thread().name
    store.set_user_secrets("slow", ["{SHA512-CRYPT}" + hash_password("x", "SHA512-CRYPT")[14:]])
    seen = _thread_spy(store)
    assert await store.aresolve(PasswordCheck("slow", "x")) is True
    assert await store.aresolve(PasswordCheck("slow", "y")) is False
    assert len(seen) == 2 and loop_thread not in seen

    # Deriving a SCRAM verifier from a plaintext password is PBKDF2: a thread
    # (the given pool) the first time, the cache afterwards.
    with ThreadPoolExecutor(1, thread_name_prefix="hashing") as pool:
        seen.clear()
        lookup = SecretLookup("carol", SecretForm.SCRAM_SHA_256)
        first = await store.aresolve(lookup, executor=pool)
        again = await store.aresolve(lookup, executor=pool)
        assert first == again and first is not None
        assert seen[0].startswith("hashing") and seen[1] == loop_thread


@pytest.mark.asyncio
async def test_aresolve_answers_fast_forms_on_the_loop(store: UserStore) -> None:
    # A plaintext, a salted SHA, an NT hash or a CRAM-MD5 state is checked
    # in microseconds, holding the GIL: a thread would only add the hop.
    loop_thread = threading.current_thread().name
    seen = _thread_spy(store)
    assert await store.aresolve(PasswordCheck("alice", "alice-pw")) is True
    assert await store.aresolve(PasswordCheck("bob", "password")) is True
    assert await store.aresolve(PasswordCheck("carol", "wrong")) is False
    assert await store.aresolve(PasswordCheck("nobody", "carol-pw")) is False
    answer = await store.aresolve(SecretLookup("bob", SecretForm.NT_HASH))
    assert answer == nt_hash("password")
    assert seen == [loop_thread] * 5


def test_the_cheapest_form_checks_a_password(
    store: UserStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # alice holds argon2, SCRAM, CRAM-MD5, DIGEST-MD5 and NTLM forms: all
    # describe one password, and the store checks with a fast digest, never argon2.
    used: list[str] = []
    original = StoredSecret.verify_password

    def spy(self: StoredSecret, password: str) -> bool:
        used.append(self.scheme)
        return original(self, password)

    monkeypatch.setattr(StoredSecret, "verify_password", spy)
    assert store.resolve(PasswordCheck("alice", "alice-pw")) is True
    assert store.resolve(PasswordCheck("alice", "wrong")) is False
    assert used == ["DIGEST-MD5", "DIGEST-MD5"]
    alice = store.user("alice")
    assert alice is not None
    assert not next(s for s in alice.secrets if s.scheme.startswith("ARGON2")).quick_to_verify


def _imitation_spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the thread every decoy secret is built in."""
    seen: list[str] = []
    original = StoredSecret.imitation

    def spy(self: StoredSecret) -> StoredSecret:
        seen.append(threading.current_thread().name)
        return original(self)

    monkeypatch.setattr(StoredSecret, "imitation", spy)
    return seen


def _argon2_users() -> list[User]:
    return [User(f"u{i}", (parse_secret(fast_argon2(f"pw{i}")),)) for i in range(3)]


def test_loading_builds_the_decoy(
    mixed_text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Loading happens before the event loop runs, or in a thread on reload:
    # that is where the decoy (one Argon2 hash here) is made.
    seen = _imitation_spy(monkeypatch)
    store = UserStore.loads(mixed_text)
    assert seen and store._dummy is not None
    path = tmp_path / "users.toml"
    path.write_text(mixed_text)
    seen.clear()
    assert UserStore.load(path)._dummy is not None and seen


@pytest.mark.asyncio
async def test_the_decoy_is_never_built_on_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first unknown user after start or reload used to build the decoy
    (an Argon2 hash, ~128 ms with the default cost) on the event loop, stalling
    every session. A store without a decoy yet sends the check to a thread."""
    loop_thread = threading.current_thread().name
    seen = _imitation_spy(monkeypatch)
    store = UserStore(_argon2_users())
    with ThreadPoolExecutor(1, thread_name_prefix="hashing") as pool:
        assert await store.aresolve(PasswordCheck("nobody", "pw0"), executor=pool) is False
        assert seen and loop_thread not in seen
        assert all(name.startswith("hashing") for name in seen)
        # Changing a user drops the decoy; the next one is built off the loop too.
        seen.clear()
        store.set_user_secrets("u3", [fast_argon2("pw3")])
        assert await store.aresolve(PasswordCheck("nobody", "pw3"), executor=pool) is False
        assert seen and loop_thread not in seen


def test_the_decoy_is_built_outside_the_store_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    # The event loop takes the store's lock for every lookup (`user()`): a
    # decoy built while holding it would stall the loop just the same.
    entered, release = threading.Event(), threading.Event()
    original = StoredSecret.imitation

    def slow(self: StoredSecret) -> StoredSecret:
        entered.set()
        release.wait(10)
        return original(self)

    monkeypatch.setattr(StoredSecret, "imitation", slow)
    store = UserStore(_argon2_users())
    builder = threading.Thread(target=store.resolve, args=(PasswordCheck("nobody", "x"),))
    builder.start()
    try:
        assert entered.wait(10)
        looked_up: list[User | None] = []
        reader = threading.Thread(target=lambda: looked_up.append(store.user("u1")))
        reader.start()
        reader.join(5)
        assert looked_up and looked_up[0] is not None, "user() waited for the decoy build"
    finally:
        release.set()
        builder.join(10)


@pytest.mark.asyncio
async def test_aresolve_keeps_the_loop_responsive(store: UserStore) -> None:
    # A slow lookup in a thread leaves the loop free to run other tasks.
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    store.set_user_secrets("slow", ["{SHA512-CRYPT}" + hash_password("x", "SHA512-CRYPT")[14:]])
    assert await store.aresolve(PasswordCheck("slow", "x")) is True
    task.cancel()
    assert ticks > 1
