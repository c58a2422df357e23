"""Config loading: typed settings, and errors that name file, key path and value."""

from __future__ import annotations

import ipaddress
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authgate import config as config_mod
from authgate.config import (
    Address,
    BackendMode,
    ClientAddressForwarding,
    ConfigError,
    EventLoop,
    PasswordStorage,
    TLSMode,
    from_dict,
    load,
    parse_address,
    uvloop_usable,
)
from authgate.policy import Protocol, Security

GOOD = """
hostname = "mail.example.org"
[policy]
security = "require-secure-auth"
mechanisms = ["CRAM-MD5", "DIGEST-MD5", "NTLM", "LOGIN", "PLAIN"]
exempt_networks = ["192.168.0.0/16", "fd00::/8"]
[tls]
cert = "certs/server.pem"
key = "certs/server.key"
[users]
file = "users.toml"

[[listeners]]
name = "imap"
protocol = "imap"
listen = "127.0.0.1:1143"
tls = "starttls"
[listeners.backend]
address = "127.0.0.1:143"
master_user = "proxy"
master_password = "s3cret"

[[listeners]]
name = "smtp"
protocol = "smtp"
listen = "[::1]:1025"
submission = false
backend = "127.0.0.1:25"
[listeners.policy]
security = "require-encrypted"
mechanisms = ["plain"]
exempt_networks = []

[[listeners]]
name = "pop3"
protocol = "pop3"
listen = "127.0.0.1:1110"
[listeners.backend]
address = "localhost:110"
mode = "relay"
password_storage = "one-way"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "authgate.toml"
    path.write_text(text)
    return path


def test_good_config(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, GOOD))
    assert cfg.hostname == "mail.example.org"
    assert cfg.users_file == tmp_path / "users.toml"  # relative to the file
    assert cfg.tls.cert == tmp_path / "certs/server.pem"
    imap, smtp, pop3 = cfg.listeners
    assert imap.protocol is Protocol.IMAP and imap.tls is TLSMode.STARTTLS
    assert imap.policy.security is Security.REQUIRE_SECURE_AUTH
    assert imap.policy.mechanisms == ("CRAM-MD5", "DIGEST-MD5", "NTLM", "LOGIN", "PLAIN")
    assert "192.168.3.4" in imap.policy.exempt
    assert imap.backend.master_password == "s3cret"
    assert "s3cret" not in repr(imap.backend)
    # the per-listener policy table overrides the defaults key by key
    assert smtp.listen == (Address("::1", 1025),)
    assert smtp.policy.security is Security.REQUIRE_ENCRYPTED
    assert smtp.policy.mechanisms == ("PLAIN",)
    assert not smtp.policy.exempt
    assert smtp.policy.server_to_server and not smtp.submission
    assert smtp.backend.mode is BackendMode.TERMINATE
    assert pop3.backend.mode is BackendMode.RELAY
    assert pop3.backend.password_storage is PasswordStorage.ONE_WAY
    assert pop3.policy.exempt == imap.policy.exempt
    assert cfg.listener("smtp") is smtp


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            (
                'exempt_networks = ["192.168.0.0/16", "fd00::/8"]',
                'exempt_networks = ["10.0.0.0/33"]',
            ),
            "policy.exempt_networks[0]: '10.0.0.0/33' is not a network",
        ),
        (
            ('security = "require-secure-auth"', 'security = "paranoid"'),
            "policy.security: 'paranoid' is not one of none | require-secure-auth | require-encrypted",
        ),
        (
            ('"NTLM", "LOGIN"', '"NTLM", "GSSAPI"'),
            "policy.mechanisms[3]: 'GSSAPI' is not a mechanism",
        ),
        (('"NTLM", "LOGIN"', '"NTLM", "ntlm"'), "policy.mechanisms[3]: 'ntlm' is listed twice"),
        (('listen = "127.0.0.1:1143"', 'listen = "127.0.0.1:99999"'), "listeners[0].listen"),
        (('listen = "127.0.0.1:1143"', 'listen = "::1:143"'), "listeners[0].listen"),
        (('protocol = "imap"', 'protocol = "gopher"'), "listeners[0].protocol: 'gopher'"),
        (('name = "smtp"', 'name = "imap"'), "listeners[1].name: 'imap' is already used"),
        (
            ('tls = "starttls"', 'tls = "starttls"\ntimeout = 3'),
            "listeners[0].timeout: unknown key",
        ),
        (('master_user = "proxy"\n', ""), "listeners[0].backend.master_user"),
        (
            (
                'address = "localhost:110"\nmode',
                'address = "localhost:110"\nclient_address = "xclient"\nmode',
            ),
            "listeners[2].backend.client_address: 'xclient' is an SMTP extension",
        ),
        (('[users]\nfile = "users.toml"\n', ""), "listeners[0].backend.mode: terminate mode"),
        (("submission = false", "submission = 1"), "listeners[1].submission: 1 is not a boolean"),
        (
            ('hostname = "mail.example.org"', 'hostname = "mail example"'),
            "hostname: 'mail example' is not a DNS host name",
        ),
        (
            ('hostname = "mail.example.org"', 'hostname = "mäil.example"'),
            "hostname: 'mäil.example' is not a DNS host name",
        ),
        (
            (
                'hostname = "mail.example.org"',
                'hostname = "mail.example.org"\nhostnames = ["imap.example.org", "smtp/x"]',
            ),
            "hostnames[1]: 'smtp/x' is not a DNS host name or an IP address",
        ),
        (
            (
                'hostname = "mail.example.org"',
                'hostname = "mail.example.org"\nhostnames = "imap.example.org"',
            ),
            "hostnames: 'imap.example.org' is not a list",
        ),
        (
            ('name = "smtp"', 'name = "smtp"\nhostnames = ["[192.0.2.1]"]'),
            "listeners[1].hostnames[0]: '[192.0.2.1]' is not a DNS host name or an IP address",
        ),
        (
            ('name = "smtp"', 'name = "smtp"\nhostnames = [25]'),
            "listeners[1].hostnames[0]: 25 is not a string",
        ),
        (
            (
                'security = "require-secure-auth"',
                'security = "require-secure-auth"\nallow_ntlm_legacy = "yes"',
            ),
            "policy.allow_ntlm_legacy: 'yes' is not a boolean",
        ),
        (
            ("exempt_networks = []", "exempt_networks = []\nallow_ntlm_legacy = 1"),
            "listeners[1].policy.allow_ntlm_legacy: 1 is not a boolean",
        ),
        (
            (
                'security = "require-secure-auth"',
                'security = "require-secure-auth"\nallow_ntlm_lgacy = true',
            ),
            "policy.allow_ntlm_lgacy: unknown key",
        ),
    ],
)
def test_errors_name_file_key_path_and_value(
    tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    old, new = change
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError) as err:
        load(path)
    assert str(err.value).startswith(f"{path}: ")
    assert message in str(err.value)


def test_hostnames_at_the_top_and_per_listener(tmp_path: Path) -> None:
    text = GOOD.replace(
        'hostname = "mail.example.org"',
        'hostname = "mail.example.org"\n'
        'hostnames = ["imap.example.org", "Mail.Example.NET.", "192.0.2.25", "2001:db8::25", "[::1]"]',
    ).replace('name = "smtp"', 'name = "smtp"\nhostnames = ["smtp.example.org"]')
    cfg = load(write(tmp_path, text))
    imap, smtp, pop3 = cfg.listeners
    assert cfg.hostnames == (
        "imap.example.org",
        "Mail.Example.NET.",
        "192.0.2.25",
        "2001:db8::25",
        "[::1]",
    )
    assert imap.hostnames == pop3.hostnames == cfg.hostnames
    # A listener's list replaces the top-level one (as its policy keys do).
    assert smtp.hostnames == ("smtp.example.org",)
    assert load(write(tmp_path, GOOD)).listeners[0].hostnames == ()


def test_allow_ntlm_legacy_is_off_by_default_and_per_listener(tmp_path: Path) -> None:
    assert {x.policy.allow_ntlm_legacy for x in load(write(tmp_path, GOOD)).listeners} == {False}
    text = GOOD.replace(
        'security = "require-secure-auth"',
        'security = "require-secure-auth"\nallow_ntlm_legacy = true',
    ).replace("exempt_networks = []", "exempt_networks = []\nallow_ntlm_legacy = false")
    imap, smtp, pop3 = load(write(tmp_path, text)).listeners
    assert imap.policy.allow_ntlm_legacy and pop3.policy.allow_ntlm_legacy
    assert not smtp.policy.allow_ntlm_legacy  # the listener's policy table overrides


def test_secret_not_in_errors(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace('master_password = "s3cret"', "master_password = 42"))
    with pytest.raises(ConfigError) as err:
        load(path)
    assert "listeners[0].backend.master_password: 42 is not a string" in str(err.value)


def test_tls_listener_needs_certificate(tmp_path: Path) -> None:
    path = write(
        tmp_path, GOOD.replace('[tls]\ncert = "certs/server.pem"\nkey = "certs/server.key"\n', "")
    )
    with pytest.raises(
        ConfigError, match=r"listeners\[0\].tls: 'starttls' needs \[tls\] cert and key"
    ):
        load(path)


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(write(tmp_path, "[policy\n"))
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'hostname = "\xe9"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load(bad)


def test_master_password_file(tmp_path: Path) -> None:
    from authgate.proxy.runtime import read_master_password

    (tmp_path / "master.secret").write_text("from-file\n")
    text = GOOD.replace('master_password = "s3cret"', 'master_password_file = "master.secret"')
    cfg = load(write(tmp_path, text))
    backend = cfg.listeners[0].backend
    assert backend.master_password_file == tmp_path / "master.secret"
    assert backend.client_address is ClientAddressForwarding.NONE
    # read when the proxy starts: the file may be encrypted at rest by then
    assert read_master_password(backend, None) == "from-file"
    (tmp_path / "master.secret").unlink()
    with pytest.raises(ConfigError, match=r"master_password_file: .* is not a file"):
        load(write(tmp_path, text))


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:25", "127.0.0.1", 25),
        ("[::1]:143", "::1", 143),
        ("localhost:110", "localhost", 110),
    ],
)
def test_parse_address(text: str, host: str, port: int) -> None:
    addr = parse_address(text)
    assert (addr.host, addr.port) == (host, port)


@pytest.mark.parametrize(
    "text", ["127.0.0.1", "::1:25", "[::1]", "[nope]:25", ":25", "h:65536", "h:x"]
)
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text)


def test_users_file_and_directory_are_exclusive(tmp_path: Path) -> None:
    text = (
        GOOD
        + '[directory]\nurl = "ldaps://ldap.example.org"\nbind_dn_template = "uid={user},dc=example,dc=org"\n'
    )
    with pytest.raises(ConfigError, match=r"directory: give \[users\] or \[directory\], not both"):
        load(write(tmp_path, text))


def test_directory_replaces_the_users_file(tmp_path: Path) -> None:
    text = GOOD.replace('[users]\nfile = "users.toml"\n', "")
    text += '[directory]\nurl = "ldaps://ldap.example.org"\nbind_dn_template = "uid={user},dc=example,dc=org"\n'
    cfg = load(write(tmp_path, text))
    assert cfg.users_file is None and cfg.directory is not None
    assert cfg.directory.url == "ldaps://ldap.example.org"


def test_event_loop_setting(tmp_path: Path) -> None:
    # uvloop is a dependency here, so it is what an unset event_loop means.
    assert load(write(tmp_path, GOOD)).event_loop is EventLoop.UVLOOP
    chosen = load(write(tmp_path, 'event_loop = "asyncio"\n' + GOOD))
    assert chosen.event_loop is EventLoop.ASYNCIO
    with pytest.raises(ConfigError, match=r"event_loop: 'trio' is not one of asyncio \| uvloop"):
        load(write(tmp_path, 'event_loop = "trio"\n' + GOOD))


def test_event_loop_without_uvloop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # uvloop is installed here; make its import fail the way it does on a
    # machine without it (Windows, a build that left it out) or with a
    # wheel built for another interpreter: unset means asyncio's loop,
    # asked for by name it is an error that says how to install it.
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop: ImportError
    uvloop_usable.cache_clear()
    try:
        assert load(write(tmp_path, GOOD)).event_loop is EventLoop.ASYNCIO
        with pytest.raises(ConfigError, match=r"event_loop: 'uvloop' needs .*pip install uvloop"):
            load(write(tmp_path, 'event_loop = "uvloop"\n' + GOOD))
    finally:
        uvloop_usable.cache_clear()  # the next test sees the real uvloop


# ------------------------------------------------------------ listen lists


def listeners_with(*listens: object) -> dict[str, Any]:
    """A config whose listeners listen on `listens` (relay mode: no users needed)."""
    return {
        "listeners": [
            {
                "name": f"l{i}",
                "protocol": "imap",
                "listen": listen,
                "backend": {"address": "127.0.0.1:1143", "mode": "relay"},
            }
            for i, listen in enumerate(listens)
        ]
    }


SOURCE = Path("/etc/authgate.toml")


def test_listen_takes_a_list_for_one_listener_on_both_families() -> None:
    cfg = from_dict(listeners_with(["0.0.0.0:143", "[::]:143"]), SOURCE)
    (listener,) = cfg.listeners
    assert listener.listen == (Address("0.0.0.0", 143), Address("::", 143))
    assert listener.listen_text == "0.0.0.0:143, [::]:143"
    # One string is a list of one.
    (single,) = from_dict(listeners_with("[::]:143"), SOURCE).listeners
    assert single.listen == (Address("::", 143),)
    # Different ports for one listener are fine; so are IPv4 and IPv6 wildcards
    # on one port in two listeners (IPv6 sockets are IPV6_V6ONLY).
    from_dict(listeners_with(["127.0.0.1:143", "[::1]:10143"]), SOURCE)
    from_dict(listeners_with("0.0.0.0:143", "[::]:143"), SOURCE)
    # Port 0 after the first address: the first socket's port, for tests.
    (ephemeral,) = from_dict(listeners_with(["127.0.0.1:0", "[::1]:0"]), SOURCE).listeners
    assert [a.port for a in ephemeral.listen] == [0, 0]


@pytest.mark.parametrize(
    ("listens", "message"),
    [
        ((["0.0.0.0:143", "[::]:143", "0.0.0.0:143"],), "listeners[0].listen[2]: '0.0.0.0:143' is listed twice"),
        ((["[::]:143", "[0::0]:143"],), "listeners[0].listen[1]: '[0::0]:143' is listed twice"),
        ((["Localhost:143", "localhost.:143"],), "listeners[0].listen[1]: 'localhost.:143' is listed twice"),
        ((["127.0.0.1:0", "127.0.0.1:0"],), "listeners[0].listen[1]: '127.0.0.1:0' is listed twice"),
        ((["127.0.0.1:143", "127.0.0.1:0"],), "listeners[0].listen[1]: '127.0.0.1:0' is listed twice"),
        ((["0.0.0.0:143", "127.0.0.1:143"],),
         "listeners[0].listen[1]: '127.0.0.1:143' overlaps '0.0.0.0:143': 0.0.0.0 takes port 143 on every IPv4 address"),
        ((["[::1]:143", "[::]:143"],),
         "listeners[0].listen[1]: '[::]:143' overlaps '[::1]:143': :: takes port 143 on every IPv6 address"),
        (("0.0.0.0:143", ["[::]:143", "0.0.0.0:143"]),
         "listeners[1].listen[1]: '0.0.0.0:143' is already used by listeners[0]"),
        ((["0.0.0.0:143", "[::]:143"], "[::]:143"), "listeners[1].listen: '[::]:143' is already used by listeners[0]"),
        ((["[::]:993", "0.0.0.0:143"], "192.0.2.1:143"),
         "listeners[1].listen: '192.0.2.1:143' overlaps '0.0.0.0:143' (listeners[0].listen[1]): "
         "0.0.0.0 takes port 143 on every IPv4 address"),
        (([],), "listeners[0].listen: is an empty list: give at least one host:port"),
        ((["0.0.0.0:143", 143],), "listeners[0].listen[1]: 143 is not a string"),
        ((["0.0.0.0:143", "[::]:99999"],), "listeners[0].listen[1]: '[::]:99999' has no valid port"),
        ((["0.0.0.0:143", "::143"],), "listeners[0].listen[1]: '::143': write IPv6 addresses as [addr]:port"),
        ((143,), "listeners[0].listen: 143 is not a host:port string or a list of them"),
        (({"host": "::"},), "listeners[0].listen: {'host': '::'} is not a host:port string"),
    ],
)  # fmt: skip
def test_listen_errors_name_the_key_path(listens: tuple[object, ...], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_dict(listeners_with(*listens), SOURCE)
    assert str(err.value).startswith(f"{SOURCE}: {message}")


def test_listen_is_required() -> None:
    data = listeners_with("0.0.0.0:143")
    del data["listeners"][0]["listen"]
    with pytest.raises(ConfigError, match=r"listeners\[0\]\.listen: is required"):
        from_dict(data, SOURCE)


HOSTS = st.sampled_from(
    ["0.0.0.0", "127.0.0.1", "192.0.2.1", "::", "::1", "0::0", "2001:db8::5", "localhost", "mx"]
)
LISTEN_ITEMS = st.one_of(
    st.tuples(HOSTS, st.sampled_from([0, 25, 143, 993])).map(
        lambda hp: f"[{hp[0]}]:{hp[1]}" if ":" in hp[0] else f"{hp[0]}:{hp[1]}"
    ),
    st.text(max_size=12),
    st.integers(),
    st.booleans(),
    st.lists(st.text(max_size=4), max_size=2),
)


def _conflict(a: Address, b: Address) -> bool:
    """The rule the parser must enforce, written independently of it."""
    if a.port != b.port:
        return False
    try:
        x, y = ipaddress.ip_address(a.host), ipaddress.ip_address(b.host)
    except ValueError:
        return a.host.lower() == b.host.lower()
    return x == y or (x.version == y.version and (x.is_unspecified or y.is_unspecified))


@given(
    st.lists(st.one_of(LISTEN_ITEMS, st.lists(LISTEN_ITEMS, max_size=4)), min_size=1, max_size=3)
)
def test_any_listen_values_load_or_fail_with_a_key_path(listens: list[object]) -> None:
    try:
        cfg = from_dict(listeners_with(*listens), SOURCE)
    except ConfigError as exc:
        assert re.match(rf"{re.escape(str(SOURCE))}: listeners\[\d\]\.listen(\[\d\])?: ", str(exc))
        return
    # Loaded: every value was a host:port or a non-empty list of them, and no
    # two sockets anywhere collide (port 0 after the first means the first's).
    sockets: list[tuple[int, Address]] = []
    for i, listener in enumerate(cfg.listeners):
        raw = listens[i]
        assert listener.listen == tuple(
            parse_address(text) for text in (raw if isinstance(raw, list) else [raw])
        )
        first = listener.listen[0].port
        for address in listener.listen:
            effective = address if address.port else Address(address.host, first)
            for j, other in sockets:
                if j == i or (effective.port and other.port):
                    assert not _conflict(effective, other), (effective, other)
            sockets.append((i, effective))


@given(st.ip_addresses(), st.booleans())
def test_hostnames_take_any_ip_address(address: object, bracket: bool) -> None:
    text = str(address)
    v6 = ":" in text
    entry = f"[{text}]" if bracket else text
    accepted = not bracket or v6
    assert config_mod._is_host(entry) is accepted


@given(st.text(max_size=30))
def test_hostnames_refuse_what_no_client_can_send(text: str) -> None:
    # Whatever is accepted is a name or an address a digest-uri can carry:
    # no "/" (digest-uri's separator), no white space or control characters.
    if config_mod._is_host(text):
        assert text and "/" not in text and text.isprintable() and " " not in text


# ------------------------------------------------------------------ LDAP


def _ldap_listener(backend: str) -> str:
    return f"""
[[listeners]]
name = "ldap"
protocol = "ldap"
listen = "127.0.0.1:0"
{backend}
"""


def test_ldap_listener_is_relayed_by_default(tmp_path: Path) -> None:
    for backend in (
        'backend = "127.0.0.1:1389"',
        '[listeners.backend]\naddress = "127.0.0.1:1389"',
    ):
        cfg = load(write(tmp_path, _ldap_listener(backend)))
        (listener,) = cfg.listeners
        assert listener.protocol is Protocol.LDAP
        assert listener.backend.mode is BackendMode.RELAY


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            'mode = "terminate"',
            r"listeners\[0\]\.backend\.mode: terminate mode does not apply to LDAP",
        ),
        ('client_address = "xclient"', "'xclient' is an SMTP extension"),
        ('client_address = "id"', "'id' is an IMAP extension"),
    ],
)
def test_ldap_backend_errors(tmp_path: Path, extra: str, message: str) -> None:
    backend = f'[listeners.backend]\naddress = "127.0.0.1:1389"\n{extra}'
    with pytest.raises(ConfigError, match=message):
        load(write(tmp_path, _ldap_listener(backend)))


def test_ldap_backend_may_take_a_proxy_header(tmp_path: Path) -> None:
    backend = '[listeners.backend]\naddress = "127.0.0.1:1389"\nclient_address = "proxy-v2"'
    (listener,) = load(write(tmp_path, _ldap_listener(backend))).listeners
    assert listener.backend.client_address.value == "proxy-v2"


def _sieve_listener(backend: str) -> str:
    return f"""
[policy]
security = "require-secure-auth"
exempt_networks = ["10.0.0.0/8"]
mechanisms = ["SCRAM-SHA-256", "PLAIN"]
[tls]
cert = "c.pem"
key = "k.pem"
[users]
file = "users.toml"
[[listeners]]
name = "sieve"
protocol = "managesieve"
listen = "127.0.0.1:4190"
tls = "starttls"
proxy_protocol = true
trusted_proxies = ["127.0.0.1"]
[listeners.backend]
address = "127.0.0.1:14191"
{backend}
"""


def test_managesieve_listener_takes_the_shared_settings(tmp_path: Path) -> None:
    backend = 'master_user = "authgate"\nmaster_password = "x"\nclient_address = "proxy-v2"'
    (listener,) = load(write(tmp_path, _sieve_listener(backend))).listeners
    assert listener.protocol is Protocol.MANAGESIEVE
    assert listener.policy.protocol is Protocol.MANAGESIEVE
    assert listener.policy.mechanisms == ("SCRAM-SHA-256", "PLAIN")
    assert [str(n) for n in listener.policy.exempt.networks] == ["10.0.0.0/8"]
    assert listener.proxy_protocol and listener.backend.master_user == "authgate"
    assert listener.backend.client_address.value == "proxy-v2"


@pytest.mark.parametrize(
    ("backend", "message"),
    [
        # Terminate mode logs in as the user with a master user (Dovecot's),
        # as IMAP and POP3 do: there is no XCLIENT LOGIN= outside SMTP.
        ("", r"master_user"),
        ('master_user = "a"\nmaster_password = "x"\nclient_address = "id"', "'id' is an IMAP"),
        ('mode = "relay"\nclient_address = "xclient"', "'xclient' is an SMTP extension"),
    ],
)
def test_managesieve_backend_errors(tmp_path: Path, backend: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(write(tmp_path, _sieve_listener(backend)))
