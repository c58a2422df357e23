"""Directory users verified by LDAP bind, against a real slapd (tests/ldap_server.py).

The unit tests at the top need no server; the rest start OpenLDAP's slapd on
loopback (ldaps:// and ldap:// + StartTLS) and fail, never skip, when it is
not installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import threading
import time
import unicodedata
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ldap
import ldap.dn
import pytest
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st

import tests.ldap_server
from authgate.config import ConfigError
from authgate.credentials.directory import (
    Directory,
    DirectorySettings,
    DirectoryStore,
    DirectoryUnavailable,
    escape_dn_value,
    escape_filter_value,
    parse_directory,
)
from authgate.credentials.directory.names import _username_problem
from authgate.credentials.store import DIRECTORY_REASON
from authgate.sasl import DEFAULT_ORDER, MECHANISMS
from authgate.sasl.base import PasswordCheck, PasswordVerdict, SecretForm, SecretLookup
from tests.ldap_server import (
    PEOPLE,
    SERVICE_DN,
    SERVICE_PASSWORD,
    SPECIAL_UID,
    STAFF,
    SUFFIX,
    SlapdError,
    SlapdInstance,
    start_slapd,
)

TEMPLATE = f"uid={{user}},{PEOPLE}"


@pytest.fixture(scope="module")
def slapd() -> Iterator[SlapdInstance]:
    with start_slapd() as instance:
        yield instance


def wait_until(predicate: Any, timeout: float = 5.0) -> None:
    """slapd writes its log a moment after answering."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def make(
    server: SlapdInstance,
    *,
    transport: str = "ldaps",
    mode: str = "template",
    service: bool = True,
    **extra: Any,
) -> Directory:
    """A Directory for the fixture server: transport ldaps | starttls | plain,
    mode template | search (from the suffix, with or without the service account)."""
    kwargs: dict[str, Any] = {"ca_file": server.ca_file, "timeout": 5.0, "connect_timeout": 5.0}
    if transport == "ldaps":
        kwargs["url"] = server.ldaps_url
    elif transport == "starttls":
        kwargs.update(url=server.ldap_url, starttls=True)
    else:  # plain, loopback only
        kwargs.update(url=server.ldap_url, allow_insecure=True)
    if mode == "template":
        kwargs["bind_dn_template"] = TEMPLATE
    else:
        kwargs["search_base"] = SUFFIX
        if service:
            kwargs.update(bind_dn=SERVICE_DN, bind_password=SERVICE_PASSWORD)
    kwargs.update(extra)
    return Directory(DirectorySettings(**kwargs))


@contextlib.contextmanager
def directory(server: SlapdInstance, **options: Any) -> Iterator[Directory]:
    d = make(server, **options)
    try:
        yield d
    finally:
        d.close()


# ---------------------------------------------------------------- escaping


def test_dn_escaping_rfc4514_specials() -> None:
    assert escape_dn_value("admin,dc=x") == "admin\\,dc\\=x"
    assert escape_dn_value('a"b+c;d<e>f\\g') == 'a\\"b\\+c\\;d\\<e\\>f\\\\g'
    assert escape_dn_value("#lead") == "\\#lead"
    assert escape_dn_value("mid#dle") == "mid#dle"  # only a leading # is special
    assert escape_dn_value(" both ") == "\\ both\\ "
    assert escape_dn_value("nul\x00") == "nul\\00"
    assert escape_dn_value("jörg") == "jörg"


@settings(max_examples=300)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40))
def test_dn_escaping_round_trips_through_libldap(value: str) -> None:
    # Whatever the name, the DN has exactly the template's RDNs and the
    # first one carries the name unchanged: no injected RDN or AVA.
    dn = TEMPLATE.replace("{user}", escape_dn_value(value))
    parsed = ldap.dn.str2dn(dn)
    assert parsed[0] == [("uid", value, parsed[0][0][2])]
    assert len(parsed) == len(ldap.dn.str2dn(PEOPLE)) + 1


def test_filter_escaping_rfc4515() -> None:
    # RFC 4515 section 4 examples: "*" -> \2a, "(" -> \28, ")" -> \29, "\" -> \5c, NUL -> \00
    assert escape_filter_value("*)(uid=*") == "\\2a\\29\\28uid=\\2a"
    assert escape_filter_value("Parens R Us (for all your parenthetical needs)") == (
        "Parens R Us \\28for all your parenthetical needs\\29"
    )
    assert escape_filter_value("C:\\MyFile") == "C:\\5cMyFile"
    assert escape_filter_value("a\x00b") == "a\\00b"
    assert escape_filter_value("Lučić") == "Lučić"


def _unescape_filter(text: str) -> str:
    raw = re.sub(rb"\\([0-9a-f]{2})", lambda m: bytes([int(m[1], 16)]), text.encode("utf-8"))
    return raw.decode("utf-8")


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_filter_escaping_leaves_no_specials_and_round_trips(value: str) -> None:
    escaped = escape_filter_value(value)
    without_escapes = re.sub(r"\\[0-9a-f]{2}", "", escaped)
    assert not set(without_escapes) & set("*()\\\x00")
    assert _unescape_filter(escaped) == value


# ---------------------------------------------------------------- settings


def settings_of(**kwargs: Any) -> DirectorySettings:
    kwargs.setdefault("bind_dn_template", TEMPLATE)
    return DirectorySettings(**kwargs)


def test_plain_ldap_needs_loopback_and_explicit_allow() -> None:
    with pytest.raises(ValueError, match="unencrypted"):
        settings_of(url="ldap://127.0.0.1:389")
    with pytest.raises(ValueError, match="loopback host only"):
        settings_of(url="ldap://ldap.example.org", allow_insecure=True)
    with pytest.raises(ValueError, match="loopback host only"):
        settings_of(url="ldap://10.0.0.5:389", allow_insecure=True)
    for url in ("ldap://127.0.0.1:3389", "ldap://[::1]:389", "ldap://localhost"):
        assert settings_of(url=url, allow_insecure=True).tls is False
    with pytest.raises(ValueError, match="allow_insecure"):
        settings_of(url="ldaps://127.0.0.1", allow_insecure=True)


def test_urls() -> None:
    assert settings_of(url="ldaps://ldap.example.org").endpoint.port == 636
    assert settings_of(url="ldap://ldap.example.org", starttls=True).endpoint.port == 389
    assert settings_of(url="ldaps://[2001:db8::1]:1636").endpoint.netloc == "[2001:db8::1]:1636"
    with pytest.raises(ValueError, match="already TLS"):
        settings_of(url="ldaps://ldap.example.org", starttls=True)
    for bad in (
        "http://ldap.example.org",
        "ldaps://",
        "ldaps://ldap.example.org/dc=example,dc=org",
        "ldaps://ldap.example.org?uid",
        "ldaps://user:pw@ldap.example.org",
        "ldaps://ldap.example.org:99999",
        "ldapi:///var/run/slapd.sock",
    ):
        with pytest.raises(ValueError):
            settings_of(url=bad)


def test_lookup_mode_settings() -> None:
    url = "ldaps://ldap.example.org"
    with pytest.raises(ValueError, match="either"):
        DirectorySettings(url=url)
    with pytest.raises(ValueError, match="either"):
        DirectorySettings(url=url, bind_dn_template=TEMPLATE, search_base=SUFFIX)
    with pytest.raises(ValueError, match="once"):
        DirectorySettings(url=url, bind_dn_template=PEOPLE)
    with pytest.raises(ValueError, match="not a DN"):
        DirectorySettings(url=url, bind_dn_template="{user}")
    with pytest.raises(ValueError, match="only used for a search"):
        DirectorySettings(url=url, bind_dn_template=TEMPLATE, bind_dn=SERVICE_DN)
    with pytest.raises(ValueError, match="not a DN"):
        DirectorySettings(url=url, search_base="not a dn")
    with pytest.raises(ValueError, match="contain"):
        DirectorySettings(url=url, search_base=SUFFIX, search_filter="(uid=alice)")
    with pytest.raises(ValueError, match="unbalanced"):
        DirectorySettings(url=url, search_base=SUFFIX, search_filter="(&(uid={user})")
    # An empty service password would be an unauthenticated bind.
    with pytest.raises(ValueError, match="bind_password"):
        DirectorySettings(url=url, search_base=SUFFIX, bind_dn=SERVICE_DN, bind_password="")
    with pytest.raises(ValueError, match="without bind_dn"):
        DirectorySettings(url=url, search_base=SUFFIX, bind_password="x")
    ok = DirectorySettings(url=url, search_base=SUFFIX, search_filter="(&(uid={user})(x=\\29))")
    assert ok.search_filter.startswith("(&")
    with pytest.raises(ValueError, match="timeout"):
        DirectorySettings(url=url, bind_dn_template=TEMPLATE, timeout=0)
    with pytest.raises(ValueError, match="pool_size"):
        DirectorySettings(url=url, bind_dn_template=TEMPLATE, pool_size=0)


def test_settings_repr_hides_the_service_password() -> None:
    s = DirectorySettings(
        url="ldaps://x.example", search_base=SUFFIX, bind_dn=SERVICE_DN, bind_password="s3cret-pw"
    )
    assert "s3cret-pw" not in repr(s)


def test_parse_directory(tmp_path: Path) -> None:
    source = tmp_path / "authgate.toml"
    (tmp_path / "ca.pem").write_text(trustme.CA().cert_pem.bytes().decode())
    (tmp_path / "search.secret").write_text("from-file-pw\n")
    parsed = parse_directory(
        {
            "url": "ldap://ldap.example.org",
            "starttls": True,
            "ca_file": "ca.pem",
            "search_base": SUFFIX,
            "search_filter": "(mail={user})",
            "bind_dn": SERVICE_DN,
            "bind_password_file": "search.secret",
            "timeout": 3,
            "connect_timeout": 1.5,
            "pool_size": 2,
        },
        source,
    )
    assert parsed.ca_file == tmp_path / "ca.pem"
    assert parsed.bind_password == "from-file-pw"
    assert (parsed.timeout, parsed.connect_timeout, parsed.pool_size) == (3.0, 1.5, 2)
    assert parsed.search_filter == "(mail={user})"


def test_parse_directory_refuses_plaintext_to_a_remote_host_at_config_time(tmp_path: Path) -> None:
    source = tmp_path / "authgate.toml"
    with pytest.raises(ConfigError) as err:
        parse_directory({"url": "ldap://ldap.example.org", "bind_dn_template": TEMPLATE}, source)
    assert str(err.value).startswith(f"{source}: directory.url: ")
    assert "unencrypted" in str(err.value)
    with pytest.raises(ConfigError) as err:
        parse_directory(
            {
                "url": "ldap://ldap.example.org",
                "allow_insecure": True,
                "bind_dn_template": TEMPLATE,
            },
            source,
            where="listeners[0].directory",
        )
    assert str(err.value).startswith(f"{source}: listeners[0].directory.allow_insecure: ")
    assert "'ldap.example.org'" in str(err.value)


@pytest.mark.parametrize(
    ("table", "key", "message"),
    [
        ({"bind_dn_template": TEMPLATE}, "url", "is required"),
        ({"url": 636, "bind_dn_template": TEMPLATE}, "url", "not a string"),
        (
            {"url": "ldaps://x.example", "bind_dn_template": TEMPLATE, "tls": True},
            "tls",
            "unknown key",
        ),
        (
            {"url": "ldaps://x.example", "bind_dn_template": TEMPLATE, "starttls": "yes"},
            "starttls",
            "not a boolean",
        ),
        (
            {"url": "ldaps://x.example", "bind_dn_template": TEMPLATE, "timeout": -1},
            "timeout",
            "seconds",
        ),
        (
            {"url": "ldaps://x.example", "bind_dn_template": TEMPLATE, "ca_file": "missing.pem"},
            "ca_file",
            "cannot load",
        ),
        (
            {"url": "ldaps://x.example", "search_base": SUFFIX, "search_filter": "uid={user}"},
            "search_filter",
            "parenthesised",
        ),
        (
            {"url": "ldaps://x.example", "search_base": SUFFIX, "bind_dn": SERVICE_DN},
            "bind_password",
            "required",
        ),
        (
            {
                "url": "ldaps://x.example",
                "search_base": SUFFIX,
                "bind_dn": SERVICE_DN,
                "bind_password": "a",
                "bind_password_file": "f",
            },
            "bind_password_file",
            "not both",
        ),
    ],
)
def test_parse_directory_errors_name_the_key(
    tmp_path: Path, table: dict[str, Any], key: str, message: str
) -> None:
    source = tmp_path / "authgate.toml"
    with pytest.raises(ConfigError) as err:
        parse_directory(table, source)
    assert str(err.value).startswith(f"{source}: directory.{key}: ")
    assert message in str(err.value)


def test_parse_directory_never_echoes_the_bind_password(tmp_path: Path) -> None:
    table = {"url": "ldaps://x.example", "search_base": SUFFIX, "bind_password": 123456789}
    with pytest.raises(ConfigError) as err:
        parse_directory(table, tmp_path / "a.toml")
    assert "directory.bind_password" in str(err.value)
    assert "123456789" not in str(err.value)


# ------------------------------------------------ refused before any network


def unreachable_directory(**extra: Any) -> Directory:
    """Points at a closed port: any attempt to connect raises DirectoryUnavailable."""
    url = f"ldaps://127.0.0.1:{dead_port()}"
    return Directory(DirectorySettings(url=url, bind_dn_template=TEMPLATE, **extra))


def test_unreachable_directory_raises_unavailable() -> None:
    # The control for the two tests below: this directory does raise when asked.
    with unreachable_directory() as d, pytest.raises(DirectoryUnavailable, match="cannot connect"):
        d.verify("alice", "some password")


def test_empty_password_is_false_without_contacting_the_server() -> None:
    with unreachable_directory() as d:
        assert d.verify("alice", "") is False


@pytest.mark.parametrize(
    "name", ["", "ali\x00ce", "alice\n", "\x1b[31malice", "al\x7fice", "x" * 257, "\ud800"]
)
def test_bad_user_names_are_false_without_contacting_the_server(name: str) -> None:
    with unreachable_directory() as d:
        assert d.verify(name, "a password") is False


@pytest.mark.parametrize(
    "name",
    [
        " alice",
        "alice ",
        "al  ice",
        "ａｌｉｃｅ",
        "alice\u00a0",
        "al\u00adice",
        "al\u200bice",
        "al\ufe00ice",
        "al\u2028ice",
        "al\u3000ice",
        "al\ue000ice",
    ],
)
def test_other_spellings_are_false_without_contacting_the_server(name: str) -> None:
    # slapd's matching (RFC 4518) would bind several of these as alice.
    with unreachable_directory() as d:
        assert d.authenticate(name, "a password") == PasswordVerdict(False)


@given(st.text(max_size=12))
def test_accepted_names_are_the_only_spelling_but_for_case(name: str) -> None:
    if _username_problem(name) is None:
        assert name == name.strip(" ") and "  " not in name
        assert unicodedata.normalize("NFKC", name) == name
        assert all(unicodedata.category(c) not in ("Cc", "Cf", "Cs", "Co", "Cn") for c in name)


def test_identity_attribute_defaults_and_setting() -> None:
    assert settings_of(url="ldaps://ldap.example").identity_attribute == "uid"
    cn = settings_of(url="ldaps://ldap.example", bind_dn_template=f"cn={{user}},{PEOPLE}")
    assert cn.identity_attribute == "cn"
    search = DirectorySettings(url="ldaps://ldap.example", search_base=SUFFIX)
    assert search.identity_attribute == "uid"
    mail = settings_of(url="ldaps://ldap.example", canonical_attribute="mail")
    assert mail.identity_attribute == "mail"
    with pytest.raises(ValueError, match="canonical_attribute: 'u id' is not an attribute"):
        settings_of(url="ldaps://ldap.example", canonical_attribute="u id")


@pytest.mark.parametrize("mode", ["template", "search"])
def test_the_session_is_the_entrys_own_name(slapd: SlapdInstance, mode: str) -> None:
    """ "ALICE" and "ALİCE" bind (slapd folds case, dotted I too) and are
    alice: the entry's uid as the directory returns it."""
    password = slapd.password("alice")
    with directory(slapd, mode=mode) as d:
        for typed in ("alice", "ALICE", "Alice", "ALİCE"):
            assert d.authenticate(typed, password) == PasswordVerdict(True, "alice"), typed
        for typed in (" alice", "alice ", "ａｌｉｃｅ"):
            assert d.authenticate(typed, password) == PasswordVerdict(False), typed
        wrong = d.authenticate("ALICE", "wrong")
        # A search found the entry: even a failure is the entry's user.
        assert wrong == PasswordVerdict(False, "alice" if mode == "search" else None)
        assert d.authenticate(SPECIAL_UID.upper(), slapd.password(SPECIAL_UID)) == (
            PasswordVerdict(True, SPECIAL_UID)
        )


@pytest.mark.parametrize("mode", ["template", "search"])
def test_canonical_attribute_is_configurable(slapd: SlapdInstance, mode: str) -> None:
    with directory(slapd, mode=mode, canonical_attribute="sn") as d:
        assert d.authenticate("alice", slapd.password("alice")) == PasswordVerdict(True, "User")
    with directory(slapd, mode=mode, canonical_attribute="mail") as d:
        with pytest.raises(DirectoryUnavailable, match="no single 'mail' value"):
            d.authenticate("alice", slapd.password("alice"))
        assert d.authenticate("alice", "wrong") == PasswordVerdict(False)


# ------------------------------------------------------------- the store


def test_store_answers_lookups_and_offers_cleartext_only() -> None:
    with unreachable_directory() as d:
        store = DirectoryStore(d)
        assert len(store) == 0
        assert store.realm is None
        for form in SecretForm:
            assert store.resolve(SecretLookup("alice", form)) is None
        assert store.resolve(PasswordCheck("alice", "")) == PasswordVerdict(False)
        with pytest.raises(DirectoryUnavailable):
            store.resolve(PasswordCheck("alice", "a password"))
        with pytest.raises(TypeError):
            store.resolve("alice")  # type: ignore[arg-type]
        offer = store.offerable(DEFAULT_ORDER)
        assert set(offer.mechanisms) == {"PLAIN", "LOGIN"}
        assert offer.mechanisms == tuple(m for m in DEFAULT_ORDER if m in ("PLAIN", "LOGIN"))
        challenge_response = [m for m in DEFAULT_ORDER if not MECHANISMS[m].cleartext]
        assert challenge_response
        for mechanism in challenge_response:
            assert offer.reasons[mechanism] == DIRECTORY_REASON
        assert store.offerable(["CRAM-MD5", "LOGIN"]).mechanisms == ("LOGIN",)


# ----------------------------------------------------------- against slapd


def test_missing_slapd_fails_with_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tests.ldap_server, "SLAPD_PATHS", ("/nonexistent/sbin/slapd",))
    monkeypatch.setattr(tests.ldap_server.shutil, "which", lambda name: None)
    with (
        pytest.raises(SlapdError, match=r"run \./dev test as root to install slapd"),
        start_slapd(),
    ):
        pass


MODES = [
    pytest.param("ldaps", "template", id="ldaps-template"),
    pytest.param("starttls", "template", id="starttls-template"),
    pytest.param("ldaps", "search", id="ldaps-search"),
    pytest.param("starttls", "search", id="starttls-search"),
]


@pytest.mark.parametrize(("transport", "mode"), MODES)
def test_right_and_wrong_passwords(slapd: SlapdInstance, transport: str, mode: str) -> None:
    with directory(slapd, transport=transport, mode=mode) as d:
        assert d.verify("alice", slapd.password("alice")) is True
        assert d.verify("bob", slapd.password("bob")) is True
        assert d.verify("alice", slapd.password("bob")) is False
        assert d.verify("alice", slapd.password("alice") + "x") is False
        assert d.verify("alice", slapd.password("alice").upper()) is False
        assert d.verify("nobody", "whatever-pw") is False
        # RFC 4514 specials in the uid itself: escaping must not break real names.
        assert d.verify(SPECIAL_UID, slapd.password(SPECIAL_UID)) is True
        assert d.verify(SPECIAL_UID, "wrong") is False


def test_tls_really_protects_the_binds(slapd: SlapdInstance) -> None:
    since = slapd.log_size()
    with directory(slapd, transport="ldaps") as d:
        assert d.verify("alice", slapd.password("alice"))
    with directory(slapd, transport="starttls") as d:
        assert d.verify("alice", slapd.password("alice"))
    slapd.wait_for_log(r"STARTTLS", since)
    text = slapd.log_text(since)
    assert len(re.findall(r"TLS established", text)) == 2
    # slapd logs each bind's security strength factor: non-zero means inside TLS.
    ssfs = re.findall(r"mech=SIMPLE bind_ssf=\d+ ssf=(\d+)", text)
    assert len(ssfs) == 2
    assert all(int(ssf) >= 128 for ssf in ssfs)


def test_empty_password_binds_nothing_although_the_server_would_accept_it(
    slapd: SlapdInstance,
) -> None:
    # The hole: this server, like many, treats DN + empty password as an
    # anonymous "unauthenticated bind" and reports success (RFC 4513 5.1.2).
    raw = ldap.initialize(slapd.ldap_url)
    try:
        raw.simple_bind_s(slapd.dn("alice"), "")
        assert raw.whoami_s() == ""  # anonymous, yet "successful"
    finally:
        raw.unbind_s()
    since = slapd.log_size()
    with directory(slapd) as d:
        assert d.verify("alice", "") is False
        # A control bind afterwards, so that "nothing logged" is not a slow log.
        assert d.verify("bob", slapd.password("bob")) is True
    slapd.wait_for_log(r'BIND dn="uid=bob,', since)
    assert slapd.binds(since) == [slapd.dn("bob")]
    assert slapd.connections(since) == 1


@pytest.mark.parametrize(("transport", "mode"), MODES)
@pytest.mark.parametrize(
    "name",
    [
        "*)(uid=*",
        "*",
        "al*",
        "alice)(uid=*",
        "admin,dc=x",
        f"alice,{PEOPLE}",
        "alice+cn=alice",
        "alice\\",
        "#alice",
    ],
)
def test_injection_attempts_are_refused(
    slapd: SlapdInstance, transport: str, mode: str, name: str
) -> None:
    with directory(slapd, transport=transport, mode=mode) as d:
        # alice's own password: an unescaped "al*" or "*" would log in as alice.
        assert d.verify(name, slapd.password("alice")) is False
        assert d.verify(name, slapd.password("bob")) is False


def test_escaped_name_reaches_the_server_as_one_value(slapd: SlapdInstance) -> None:
    since = slapd.log_size()
    with directory(slapd, mode="search") as d:
        assert d.verify("al*", slapd.password("alice")) is False
    with directory(slapd, mode="template") as d:
        assert d.verify("admin,dc=x", "a password") is False
    slapd.wait_for_log(r'BIND dn="uid=admin', since)
    text = slapd.log_text(since)
    assert 'filter="(uid=al\\2A)"' in text
    # One RDN value under ou=people, not an extra RDN.
    assert f'BIND dn="uid=admin\\2Cdc\\3Dx,{PEOPLE}"' in text


def test_search_must_find_exactly_one_entry(slapd: SlapdInstance) -> None:
    since = slapd.log_size()
    with directory(slapd, mode="search") as d:
        # uid=twin exists under ou=people and ou=staff with this password.
        assert d.verify("twin", slapd.password("twin")) is False
    with directory(slapd, mode="search", search_base=PEOPLE) as d:
        assert d.verify("twin", slapd.password("twin")) is True
    slapd.wait_for_log(r'BIND dn="uid=twin,ou=people', since)
    text = slapd.log_text(since)
    assert "nentries=2" in text
    # The ambiguous search bound no twin (only a decoy DN, for equal timing).
    assert slapd.binds(since).count(f"uid=twin,{PEOPLE}") == 1
    assert f"uid=twin,{STAFF}" not in slapd.binds(since)


def test_search_uses_the_service_account(slapd: SlapdInstance) -> None:
    # ou=people is readable by authenticated users only, ou=staff by anyone.
    with directory(slapd, mode="search", service=False) as d:
        assert d.verify("carol", slapd.password("carol")) is True
        assert d.verify("alice", slapd.password("alice")) is False
    with directory(slapd, mode="search", service=True) as d:
        assert d.verify("alice", slapd.password("alice")) is True


def test_wrong_service_password_is_unavailable_not_false(slapd: SlapdInstance) -> None:
    with (
        directory(slapd, mode="search", bind_password="not-the-password") as d,
        pytest.raises(DirectoryUnavailable, match="search account") as err,
    ):
        d.verify("alice", slapd.password("alice"))
    assert "not-the-password" not in str(err.value)
    assert slapd.password("alice") not in str(err.value)


def test_missing_search_base_is_unavailable(slapd: SlapdInstance) -> None:
    with (
        directory(slapd, mode="search", search_base=f"ou=nowhere,{SUFFIX}") as d,
        pytest.raises(DirectoryUnavailable, match="does not exist"),
    ):
        d.verify("alice", slapd.password("alice"))


def test_untrusted_certificate_is_unavailable_and_sends_no_password(
    slapd: SlapdInstance, tmp_path: Path
) -> None:
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    since = slapd.log_size()
    for transport in ("ldaps", "starttls"):
        with (
            directory(slapd, transport=transport, ca_file=other_ca) as d,
            pytest.raises(DirectoryUnavailable, match="certificate"),
        ):
            d.verify("alice", slapd.password("alice"))
    # The control: the right CA works on the same server.
    with directory(slapd) as d:
        assert d.verify("alice", slapd.password("alice"))
    slapd.wait_for_log(r'BIND dn="uid=alice', since)
    assert slapd.binds(since) == [slapd.dn("alice")]


def test_connections_are_pooled_and_search_never_follows_a_user_bind(
    slapd: SlapdInstance,
) -> None:
    since = slapd.log_size()
    with directory(slapd, mode="search") as d:
        for _ in range(3):
            for uid in ("alice", "bob", "carol"):
                assert d.verify(uid, slapd.password(uid)) is True
            assert d.verify("alice", "wrong") is False
        assert d.idle_connections() == {"search": 1, "bind": 1}
    wait_until(lambda: len(slapd.operations(since)) >= 25)  # 1 service bind + 12 SRCH + 12 BIND
    # 12 verifications, one search connection and one bind connection.
    assert slapd.connections(since) == 2
    bound_as: dict[int, str] = {}
    searches = 0
    for conn, op, dn in slapd.operations(since):
        if op == "BIND":
            bound_as[conn] = dn
        else:
            searches += 1
            assert bound_as.get(conn) == SERVICE_DN, (
                f"search on conn={conn} bound as {bound_as.get(conn)!r}"
            )
    assert searches == 12
    user_bind_conns = {
        c for c, op, dn in slapd.operations(since) if op == "BIND" and dn != SERVICE_DN
    }
    search_conns = {c for c, op, _ in slapd.operations(since) if op == "SRCH"}
    assert not user_bind_conns & search_conns


def test_concurrent_verifications(slapd: SlapdInstance) -> None:
    cases = [
        (uid, slapd.password(uid) if good else "wrong-" + uid, good)
        for uid in ("alice", "bob", "carol", SPECIAL_UID)
        for good in (True, False)
    ] * 4
    since = slapd.log_size()
    with directory(slapd, mode="search", pool_size=3) as d, ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda c: d.verify(c[0], c[1]), cases))
    assert results == [good for _, _, good in cases]
    # Never more than pool_size connections per pool.
    assert slapd.connections(since) <= 6


@pytest.mark.parametrize("transport", ["ldaps", "starttls", "plain"])
def test_server_down_is_unavailable_and_recovery_is_automatic(transport: str) -> None:
    with start_slapd() as server:
        d = make(server, transport=transport, mode="search", pool_size=2)
        try:
            assert d.verify("alice", server.password("alice")) is True
            # Pooled connections die with the server; a restart on the same
            # ports must be invisible to the next verification.
            server.restart()
            assert d.verify("alice", server.password("alice")) is True
            assert d.verify("bob", "wrong") is False
            server.stop()
            with pytest.raises(DirectoryUnavailable) as err:
                d.verify("alice", server.password("alice"))
            assert server.password("alice") not in str(err.value)
            server.start()
            assert d.verify("alice", server.password("alice")) is True
        finally:
            d.close()


# ------------------------------------------------ misbehaving servers (fakes)


class FakeServer:
    """Accepts TCP on loopback and runs `behaviour(conn)` for each connection."""

    def __init__(self, behaviour: Any) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port: int = self.sock.getsockname()[1]
        self.behaviour = behaviour
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                self.conns.append(conn)
                with contextlib.suppress(OSError):
                    self.behaviour(conn)

    def close(self) -> None:
        for conn in self.conns:
            conn.close()
        self.sock.close()


@contextlib.contextmanager
def fake_server(behaviour: Any) -> Iterator[FakeServer]:
    server = FakeServer(behaviour)
    try:
        yield server
    finally:
        server.close()


def silent(conn: socket.socket) -> None:
    """Accept, read, never answer (a hung server)."""


# StartTLS response, hand-assembled (RFC 4511 4.14.2): LDAPMessage { messageID 1,
# extendedResp [APPLICATION 24] { resultCode, matchedDN "", diagnosticMessage "" } }
def starttls_response(code: int) -> bytes:
    return bytes(
        [0x30, 0x0C, 0x02, 0x01, 0x01, 0x78, 0x07, 0x0A, 0x01, code, 0x04, 0x00, 0x04, 0x00]
    )


STARTTLS_REQUEST = bytes.fromhex("301d02010177188016") + b"1.3.6.1.4.1.1466.20037"


def starttls_answer(response: bytes) -> Any:
    def behaviour(conn: socket.socket) -> None:
        request = conn.recv(4096)
        assert request == STARTTLS_REQUEST
        conn.sendall(response)

    return behaviour


@pytest.mark.parametrize(
    ("transport", "behaviour"),
    [
        ("ldaps", silent),  # TLS handshake never answered
        ("starttls", silent),  # StartTLS never answered
        ("starttls", starttls_answer(starttls_response(0))),  # then no handshake
        ("plain", silent),  # bind never answered
    ],
    ids=["ldaps-handshake", "starttls-response", "starttls-handshake", "plain-bind"],
)
def test_a_hung_server_times_out(transport: str, behaviour: Any) -> None:
    with fake_server(behaviour) as server:
        url = {"ldaps": "ldaps", "starttls": "ldap", "plain": "ldap"}[transport]
        d = Directory(
            DirectorySettings(
                url=f"{url}://127.0.0.1:{server.port}",
                starttls=transport == "starttls",
                allow_insecure=transport == "plain",
                bind_dn_template=TEMPLATE,
                timeout=0.5,
                connect_timeout=0.5,
            )
        )
        started = time.monotonic()
        try:
            with pytest.raises(DirectoryUnavailable):
                d.verify("alice", "a password")
        finally:
            d.close()
        assert time.monotonic() - started < 3.0


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (starttls_response(2), "refused StartTLS"),  # protocolError
        (starttls_response(0) + b"\x30\x03\x02\x01\x02", "sent data after"),  # injection
        (b"\x30\x80\x00\x00", "bad StartTLS response"),  # indefinite length
        (bytes.fromhex("300c02010278070a0100040004 00".replace(" ", "")), "bad StartTLS"),
    ],
    ids=["refused", "injected-bytes", "indefinite-length", "wrong-message-id"],
)
def test_starttls_misbehaviour_is_unavailable(response: bytes, message: str) -> None:
    with fake_server(starttls_answer(response)) as server:
        d = Directory(
            DirectorySettings(
                url=f"ldap://127.0.0.1:{server.port}",
                starttls=True,
                bind_dn_template=TEMPLATE,
                timeout=2.0,
            )
        )
        try:
            with pytest.raises(DirectoryUnavailable, match=message):
                d.verify("alice", "a password")
        finally:
            d.close()


def test_plaintext_loopback_when_explicitly_allowed(slapd: SlapdInstance) -> None:
    url = slapd.ldap_url
    with Directory(DirectorySettings(url=url, allow_insecure=True, bind_dn_template=TEMPLATE)) as d:
        assert d.verify("alice", slapd.password("alice")) is True
        assert d.verify("alice", "wrong") is False


# ------------------------------------------------------------ the store, live


def test_store_aresolve_runs_off_the_event_loop(slapd: SlapdInstance) -> None:
    seen: list[int] = []

    class Recording(Directory):
        def authenticate(self, username: str, password: str) -> PasswordVerdict:
            seen.append(threading.get_ident())
            return super().authenticate(username, password)

    template = make(slapd)
    template.close()
    d = Recording(template.settings)
    store = DirectoryStore(d)

    async def main() -> tuple[object, object, int]:
        loop_thread = threading.get_ident()
        good = await store.aresolve(PasswordCheck("alice", slapd.password("alice")))
        bad = await store.aresolve(PasswordCheck("alice", "wrong"))
        return good, bad, loop_thread

    try:
        good, bad, loop_thread = asyncio.run(main())
        assert (good, bad) == (PasswordVerdict(True, "alice"), PasswordVerdict(False))
        assert len(seen) == 2
        assert loop_thread not in seen
        with ThreadPoolExecutor(1, thread_name_prefix="ldap-verify") as executor:
            store_with_pool = DirectoryStore(d, executor=executor)
            answer = asyncio.run(
                store_with_pool.aresolve(PasswordCheck("bob", slapd.password("bob")))
            )
            assert answer == PasswordVerdict(True, "bob")
    finally:
        store.close()


def test_store_aresolve_propagates_unavailable() -> None:
    store = DirectoryStore(unreachable_directory())

    async def main() -> object:
        return await store.aresolve(PasswordCheck("alice", "a password"))

    try:
        with pytest.raises(DirectoryUnavailable):
            asyncio.run(main())
    finally:
        store.close()
