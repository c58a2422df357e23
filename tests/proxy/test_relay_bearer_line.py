"""The command-line limit of a listener that offers bearer tokens, in both
modes: OAUTHBEARER / XOAUTH2 messages run to many KiB (RFC 7628 sets no
limit), and a relay listener offers them with no [oauth] verifier (its
backend verifies).  The end-to-end case, with Dovecot: tests/interop/
test_oauth_relay.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from authgate import config as config_mod
from authgate.credentials.store import UserStore
from authgate.offers import load_store
from authgate.proxy.runtime import BEARER_LINE, build_runtime


def runtime_line(tmp_path: Path, mechanisms: str, mode: str) -> int:
    path = tmp_path / "authgate.toml"
    users = ""
    if mode == "terminate":
        (tmp_path / "idp.json").write_text('{"keys": []}')
        UserStore(realm="localhost").save(tmp_path / "users.toml")
        users = (
            '[users]\nfile = "users.toml"\n'
            '[oauth]\njwks = "idp.json"\nissuer = "https://idp.test"\naudience = "mail.test"\n'
        )
    path.write_text(
        f'[policy]\nsecurity = "none"\nmechanisms = [{mechanisms}]\n{users}'
        "[[listeners]]\n"
        'name = "imap"\nprotocol = "imap"\nlisten = "127.0.0.1:0"\ntls = "none"\n'
        "[listeners.backend]\n"
        f'address = "127.0.0.1:1143"\nmode = "{mode}"\n'
        + ('master_user = "authgate"\nmaster_password = "x"\n' if mode == "terminate" else "")
    )
    config = config_mod.load(path)
    (runtime,) = build_runtime(config, load_store(config))
    return runtime.max_line


@pytest.mark.parametrize("mode", ["relay", "terminate"])
def test_a_listener_offering_bearer_tokens_reads_long_lines(tmp_path: Path, mode: str) -> None:
    assert runtime_line(tmp_path, '"OAUTHBEARER", "PLAIN"', mode) == BEARER_LINE


def test_a_relay_listener_without_bearer_tokens_keeps_the_default(tmp_path: Path) -> None:
    assert runtime_line(tmp_path, '"PLAIN", "LOGIN"', "relay") == 8192
