"""The CLI contract on the files in examples/: check, negotiate, passwd."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from authgate.credentials.store import UserStore
from authgate.sasl.base import PasswordCheck

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """The real command in a subprocess: proves exit codes and that no
    traceback reaches the user."""
    return subprocess.run(
        [sys.executable, "-m", "authgate", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("name", ["authgate", "sha-store", "relay-postfix", "scaleout"])
def test_check_accepts_every_example(name: str) -> None:
    result = run_cli("check", "-c", str(EXAMPLES / f"{name}.toml"))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout
    assert "Traceback" not in result.stderr


def test_check_explains_drops_caused_by_one_way_hashes() -> None:
    result = run_cli("check", "-c", str(EXAMPLES / "sha-store.toml"))
    assert "dropped CRAM-MD5" in result.stdout and "(users: bob)" in result.stdout
    assert "inside TLS:              offers LOGIN, PLAIN" in result.stdout


def example_copy(tmp_path: Path, name: str = "authgate.toml") -> Path:
    """An example config in tmp_path, its relative paths still pointing at examples/."""
    text = (EXAMPLES / name).read_text()
    text = text.replace('"../certs/', f'"{EXAMPLES.parent}/certs/')
    text = text.replace('file = "users.toml"', f'file = "{EXAMPLES / "users.toml"}"')
    text = text.replace('"master.secret"', f'"{EXAMPLES / "master.secret"}"')
    path = tmp_path / name
    path.write_text(text)
    return path


def test_check_names_the_hosts_digest_md5_accepts(tmp_path: Path) -> None:
    config = example_copy(tmp_path)
    text = config.read_text()
    text = text.replace(
        'hostname = "mail.example.org"',
        'hostname = "mail.example.org"\nhostnames = ["imap.example.org", "192.0.2.25"]',
    )
    config.write_text(text.replace('name = "pop3s"', 'name = "pop3s"\nhostnames = []'))
    result = run_cli("check", "-c", str(config))
    assert result.returncode == 0, result.stderr
    listeners = result.stdout.split("\nlistener ")
    imap = next(x for x in listeners if x.startswith("imap:"))
    pop3s = next(x for x in listeners if x.startswith("pop3s:"))
    assert (
        "DIGEST-MD5 digest-uri may name: mail.example.org, imap.example.org, 192.0.2.25, "
        "or the address a client connects to"
    ) in imap
    assert (
        "DIGEST-MD5 digest-uri may name: mail.example.org, or the address a client connects to"
    ) in pop3s


def test_check_shows_the_ntlm_legacy_switch_and_warns_when_on(tmp_path: Path) -> None:
    config = example_copy(tmp_path)
    result = run_cli("check", "-c", str(config))
    assert result.stdout.count("NTLM accepts: NTLMv2 only (allow_ntlm_legacy off") == 5
    assert "allow_ntlm_legacy is on" not in result.stdout
    text = config.read_text().replace(
        'security = "require-secure-auth"', 'security = "require-secure-auth"\nallow_ntlm_legacy = true'
    )
    config.write_text(text.replace('security = "require-encrypted"', 'security = "require-encrypted"\nallow_ntlm_legacy = false'))
    result = run_cli("check", "-c", str(config))
    assert result.returncode == 0, result.stderr
    sections = {x.split(":", 1)[0]: x for x in result.stdout.split("\nlistener ")[1:]}
    for name in ("imap", "imaps", "pop3s", "sieve"):
        assert "NTLM accepts: NTLMv2, NTLMv1 and NTLM2 session responses" in sections[name]
        assert "warning: allow_ntlm_legacy is on: NTLMv1 and NTLM2 session responses" in sections[name]
    # imap offers NTLM before STARTTLS: the warning says so; implicit TLS does not need it.
    assert "accepts NTLM without TLS" in sections["imap"]
    assert "accepts NTLM without TLS" not in sections["imaps"]
    assert "NTLM accepts: NTLMv2 only" in sections["submission"]
    assert "allow_ntlm_legacy is on" not in sections["submission"]


def test_check_says_when_the_ntlm_legacy_switch_does_nothing(tmp_path: Path) -> None:
    relay = example_copy(tmp_path, "relay-postfix.toml")
    relay.write_text(relay.read_text().replace('security = "require-secure-auth"', 'security = "require-secure-auth"\nallow_ntlm_legacy = true'))
    result = run_cli("check", "-c", str(relay))
    assert result.returncode == 0, result.stderr
    assert "warning: allow_ntlm_legacy has no effect in relay mode" in result.stdout
    config = example_copy(tmp_path)
    text = config.read_text().replace('"NTLM", ', "")
    config.write_text(text.replace('security = "require-secure-auth"', 'security = "require-secure-auth"\nallow_ntlm_legacy = true'))
    result = run_cli("check", "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert "warning: allow_ntlm_legacy has no effect: NTLM is not enabled" in result.stdout


def test_negotiate_shows_the_ntlm_legacy_switch(tmp_path: Path) -> None:
    config = example_copy(tmp_path)
    config.write_text(
        config.read_text().replace(
            'security = "require-encrypted"', 'security = "require-encrypted"\nallow_ntlm_legacy = true'
        )
    )

    def ask(listener: str, *extra: str) -> dict[str, object]:
        args = ("negotiate", "-c", str(config), "--listener", listener, "--client-ip", "203.0.113.5")
        result = run_cli(*args, "--json", *extra)
        assert result.returncode == 0, result.stderr
        data: dict[str, object] = json.loads(result.stdout)
        return data

    assert ask("imap")["ntlm_legacy"] is False
    assert ask("submission", "--tls")["ntlm_legacy"] is True
    # Nothing is offered before STARTTLS there: no NTLM, legacy or not.
    assert ask("submission")["ntlm_legacy"] is False
    text = run_cli("negotiate", "-c", str(config), "--listener", "submission", "--client-ip", "203.0.113.5", "--tls")
    assert "NTLMv1 / NTLM2 session responses: accepted" in text.stdout
    text = run_cli("negotiate", "-c", str(config), "--listener", "imap", "--client-ip", "203.0.113.5")
    assert "NTLMv1 / NTLM2 session responses: refused (allow_ntlm_legacy off)" in text.stdout


def test_check_warns_about_smtp_backends_not_told_the_client(tmp_path: Path) -> None:
    # Issue #10: a port-25 pass-through that forwards no address turns a
    # Postfix whose mynetworks holds 127.0.0.1 into an open relay.
    good = run_cli("check", "-c", str(EXAMPLES / "relay-postfix.toml"))
    assert good.returncode == 0 and "client's address" not in good.stdout
    text = (EXAMPLES / "relay-postfix.toml").read_text()
    text = text.replace('client_address = "xclient"     # Postfix smtpd_authorized_xclient_hosts = 127.0.0.1', "")
    bad = tmp_path / "relay.toml"
    bad.write_text(text.replace('"../certs/', f'"{EXAMPLES.parent}/certs/'))
    result = run_cli("check", "-c", str(bad))
    assert result.returncode == 0
    mx = result.stdout.split("listener mx:")[1]
    assert "warning: mail passed through to the backend does not carry the client's address" in mx
    assert "relays for anyone" in mx and 'client_address = "xclient"' in mx
    assert "client's address" not in result.stdout.split("listener mx:")[0]  # submission forwards


def test_check_bad_file_exits_2_with_key_path(tmp_path: Path) -> None:
    text = (EXAMPLES / "authgate.toml").read_text().replace('"fd00::/8"', '"10.0.0.0/33"')
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    result = run_cli("check", "-c", str(bad))
    assert result.returncode == 2
    assert f"{bad}: policy.exempt_networks[1]: '10.0.0.0/33' is not a network" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_shows_every_address_of_a_dual_stack_listener(tmp_path: Path) -> None:
    example = (EXAMPLES / "authgate.toml").read_text()
    assert 'listen = "0.0.0.0:993"' in example
    (tmp_path / "authgate.toml").write_text(
        example.replace('listen = "0.0.0.0:993"', 'listen = ["0.0.0.0:993", "[::]:993"]')
        .replace('"../certs/', f'"{EXAMPLES.parent}/certs/')
        .replace('"users.toml"', f'"{EXAMPLES}/users.toml"')
        .replace('"master.secret"', f'"{EXAMPLES}/master.secret"')
    )
    result = run_cli("check", "-c", str(tmp_path / "authgate.toml"))
    assert result.returncode == 0, result.stderr
    assert "listener imaps: imap on 0.0.0.0:993, [::]:993 (tls implicit)" in result.stdout
    (tmp_path / "bad.toml").write_text(
        (tmp_path / "authgate.toml").read_text().replace('"[::]:993"]', '"[::]:993", "[0::0]:993"]')
    )
    result = run_cli("check", "-c", str(tmp_path / "bad.toml"))
    assert result.returncode == 2
    assert f"{tmp_path / 'bad.toml'}: listeners[1].listen[2]: '[0::0]:993' is listed twice" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr


def negotiate(*args: str) -> dict[str, object]:
    result = run_cli("negotiate", "-c", str(EXAMPLES / "authgate.toml"), "--json", *args)
    assert result.returncode == 0, result.stderr
    data: dict[str, object] = json.loads(result.stdout)
    return data


def test_negotiate_outsider_without_tls() -> None:
    data = negotiate("--listener", "imap", "--client-ip", "203.0.113.5", "--client-mechs", "PLAIN,NTLM")
    assert data["offered"] == ["CRAM-MD5", "DIGEST-MD5", "NTLM"]
    assert data["cleartext_login"] is False
    assert data["tls_required"] is False
    assert data["chosen"] == "NTLM"
    assert data["exempt"] is False


def test_negotiate_outsider_inside_tls_chooses_admins_first() -> None:
    data = negotiate("--listener", "imap", "--client-ip", "203.0.113.5", "--tls", "--client-mechs", "plain,cram-md5")
    assert data["offered"] == ["CRAM-MD5", "DIGEST-MD5", "NTLM", "LOGIN", "PLAIN"]
    assert data["chosen"] == "CRAM-MD5"
    assert data["cleartext_login"] is True


@pytest.mark.parametrize("client", ["192.168.10.20", "fd00::25", "::ffff:192.168.1.1"])
def test_negotiate_exempt_client(client: str) -> None:
    data = negotiate("--listener", "imap", "--client-ip", client, "--client-mechs", "PLAIN")
    assert data["exempt"] is True
    assert data["chosen"] == "PLAIN"
    assert data["cleartext_login"] is True


def test_check_managesieve_listener_has_no_login_command_line() -> None:
    result = run_cli("check", "-c", str(EXAMPLES / "authgate.toml"))
    assert result.returncode == 0, result.stderr
    section = result.stdout.split("\nlistener sieve:", 1)[1].split("\nlistener ", 1)[0]
    assert "without TLS:             offers CRAM-MD5, DIGEST-MD5, NTLM\n" in section
    assert "cleartext login" not in section


def test_negotiate_managesieve_listener() -> None:
    # The sidecar example's sieve listener: require-secure-auth, as IMAP.
    data = negotiate("--listener", "sieve", "--client-ip", "203.0.113.5", "--client-mechs", "PLAIN")
    assert data["protocol"] == "managesieve"
    assert "PLAIN" not in data["offered"] and data["chosen"] is None
    data = negotiate("--listener", "sieve", "--client-ip", "203.0.113.5", "--tls", "--client-mechs", "PLAIN")
    assert data["chosen"] == "PLAIN"


def test_negotiate_require_encrypted_without_tls() -> None:
    data = negotiate("--listener", "submission", "--client-ip", "203.0.113.5", "--client-mechs", "PLAIN")
    assert data["offered"] == []
    assert data["tls_required"] is True
    assert data["chosen"] is None


def test_negotiate_errors() -> None:
    result = run_cli("negotiate", "-c", str(EXAMPLES / "authgate.toml"), "--listener", "nope", "--client-ip", "1.2.3.4")
    assert result.returncode == 2 and "no listener named 'nope'" in result.stderr
    result = run_cli("negotiate", "-c", str(EXAMPLES / "authgate.toml"), "--listener", "imap", "--client-ip", "1.2.3")
    assert result.returncode == 2 and "'1.2.3' is not an IP address" in result.stderr


def test_passwd_writes_every_form_without_echoing(tmp_path: Path) -> None:
    users = tmp_path / "users.toml"
    password = "Correct horse battery staple 9"
    result = run_cli("passwd", "dave", "--users", str(users), "--realm", "mail.example.org", "--password-stdin", stdin=password + "\n")
    assert result.returncode == 0, result.stderr
    assert password not in result.stdout + result.stderr
    assert stat.S_IMODE(os.stat(users).st_mode) == 0o600
    store = UserStore.load(users)
    assert store.resolve(PasswordCheck("dave", password)) is True
    assert store.resolve(PasswordCheck("dave", "wrong")) is False
    offer = store.offerable(["CRAM-MD5", "DIGEST-MD5", "NTLM", "SCRAM-SHA-256", "LOGIN", "PLAIN"], realm="mail.example.org")
    assert offer.mechanisms == ("CRAM-MD5", "DIGEST-MD5", "NTLM", "SCRAM-SHA-256", "LOGIN", "PLAIN")


def test_passwd_keeps_other_users(tmp_path: Path) -> None:
    users = tmp_path / "users.toml"
    users.write_text((EXAMPLES / "users-sha.toml").read_text())
    result = run_cli("passwd", "erin", "--users", str(users), "--password-stdin", stdin="Sunny-Day-42\n")
    assert result.returncode == 0, result.stderr
    assert sorted(UserStore.load(users).names()) == ["alice", "bob", "carol", "erin"]


def test_passwd_refuses_empty_password(tmp_path: Path) -> None:
    result = run_cli("passwd", "erin", "--users", str(tmp_path / "u.toml"), "--password-stdin", stdin="\n")
    assert result.returncode == 2 and "empty" in result.stderr
    assert not (tmp_path / "u.toml").exists()


def test_relay_listener_drops_channel_binding(tmp_path: Path) -> None:
    text = (EXAMPLES / "relay-postfix.toml").read_text()
    text = text.replace('mechanisms = ["CRAM-MD5", "LOGIN", "PLAIN"]', 'mechanisms = ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256", "PLAIN"]')
    text = text.replace('password_storage = "one-way"\nclient_address', 'client_address')
    config = tmp_path / "relay.toml"
    config.write_text(text.replace('"../certs/', f'"{EXAMPLES.parent}/certs/'))
    data = json.loads(run_cli("negotiate", "-c", str(config), "--listener", "submission", "--client-ip", "10.1.1.1", "--tls", "--json").stdout)
    assert data["offered"] == ["SCRAM-SHA-256", "PLAIN"]
    assert data["ntlm_legacy"] is None  # relay mode: the backend verifies NTLM
    assert "channel binding" in data["withheld"]["SCRAM-SHA-256-PLUS"]


def test_passwd_enforces_the_password_policy(tmp_path: Path) -> None:
    users = tmp_path / "users.toml"
    result = run_cli("passwd", "erin", "--users", str(users), "--password-stdin", stdin="erin1\n")
    assert result.returncode == 2
    # every unmet rule in one message, and never the password itself
    assert "at least 8 characters" in result.stderr
    assert "at least 3 of" in result.stderr
    assert "user name" in result.stderr
    assert "erin1" not in result.stderr
    assert not users.exists()


NNTP_CONFIG = """hostname = "news.example.org"
[policy]
security = "require-secure-auth"
mechanisms = ["CRAM-MD5", "PLAIN"]
exempt_networks = ["10.0.0.0/8"]
[users]
file = "users.toml"
[tls]
cert = "server.pem"
key = "server.key"
[[listeners]]
name = "news"
protocol = "nntp"
listen = "0.0.0.0:119"
tls = "starttls"
[listeners.backend]
address = "127.0.0.1:1119"
mode = "relay"
[[listeners]]
name = "newss"
protocol = "nntp"
listen = "0.0.0.0:563"
tls = "implicit"
[listeners.backend]
address = "127.0.0.1:1119"
master_user = "authgate-proxy"
master_password = "x"
"""


def test_check_and_negotiate_an_nntp_listener(tmp_path: Path) -> None:
    (tmp_path / "users.toml").write_text('realm = "news.example.org"\n')
    config = tmp_path / "authgate.toml"
    config.write_text(NNTP_CONFIG)
    checked = run_cli("check", "-c", str(config))
    assert checked.returncode == 0, checked.stderr
    assert "listener news: nntp on 0.0.0.0:119 (tls starttls)" in checked.stdout
    assert "without TLS:             offers CRAM-MD5; cleartext login refused" in checked.stdout
    # Terminate mode toward INN: one proxy account, said once, for that listener.
    assert checked.stdout.count("note: toward a backend that offers AUTHINFO USER") == 1
    assert "account 'authgate-proxy'" in checked.stdout
    args = ("negotiate", "-c", str(config), "--json", "--listener", "news")
    outsider = json.loads(run_cli(*args, "--client-ip", "192.0.2.1").stdout)
    assert outsider["protocol"] == "nntp" and outsider["offered"] == ["CRAM-MD5"]
    assert outsider["cleartext_login"] is False  # AUTHINFO USER gets 483
    exempt = json.loads(run_cli(*args, "--client-ip", "10.1.2.3").stdout)
    assert exempt["offered"] == ["CRAM-MD5", "PLAIN"] and exempt["cleartext_login"] is True


LDAP_CONFIG = """hostname = "localhost"
[policy]
security = "require-secure-auth"
mechanisms = ["CRAM-MD5", "PLAIN"]
exempt_networks = ["192.168.0.0/16"]
[[listeners]]
name = "ldap"
protocol = "ldap"
listen = "127.0.0.1:3389"
backend = "127.0.0.1:1389"
"""


def test_negotiate_and_check_an_ldap_listener(tmp_path: Path) -> None:
    config = tmp_path / "ldap.toml"
    config.write_text(LDAP_CONFIG)

    def ask(client: str, *extra: str) -> dict[str, object]:
        args = ("negotiate", "-c", str(config), "--listener", "ldap", "--client-ip", client)
        result = run_cli(*args, "--json", *extra)
        assert result.returncode == 0, result.stderr
        data: dict[str, object] = json.loads(result.stdout)
        return data

    outsider = ask("203.0.113.5")
    assert outsider["offered"] == ["CRAM-MD5"]
    assert outsider["ldap_simple_bind"] == "refused with confidentialityRequired (13)"
    assert ask("203.0.113.5", "--tls")["ldap_simple_bind"] == "relayed to the directory"
    assert ask("192.168.1.2")["ldap_simple_bind"] == "relayed to the directory"
    checked = run_cli("check", "-c", str(config))
    assert checked.returncode == 0, checked.stderr
    assert "listener ldap: ldap on 127.0.0.1:3389" in checked.stdout and "(relay" in checked.stdout
    assert "offers CRAM-MD5; cleartext login refused (LDAP simple bind)" in checked.stdout
    config.write_text(LDAP_CONFIG.replace('backend = "127.0.0.1:1389"', '[listeners.backend]\naddress = "127.0.0.1:1389"\nmode = "terminate"'))
    refused = run_cli("check", "-c", str(config))
    assert refused.returncode == 2 and "terminate mode does not apply to LDAP" in refused.stderr
    assert "Traceback" not in refused.stderr
