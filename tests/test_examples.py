"""examples/authgate.toml and examples/dovecot-sidecar.conf are one pair:
the real Dovecot accepts the sidecar file (`doveconf -n`), and every
authgate backend address is one of its listeners, a `haproxy = yes` one
exactly when authgate sends a PROXY v2 header there."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from authgate import config as config_mod
from authgate.config import ClientAddressForwarding

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
_LISTENER = re.compile(r"inet_listener (\S+) \{\n(.*?)\n\s*\}", re.S)


def dovecot_listeners() -> dict[int, bool]:
    """Port -> whether it expects a PROXY header, as Dovecot reads the file."""
    doveconf = shutil.which("doveconf")
    assert doveconf, "doveconf is missing: run ./dev test as root (it installs dovecot-core)"
    done = subprocess.run(
        [doveconf, "-n", "-c", str(EXAMPLES / "dovecot-sidecar.conf")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    listeners = {}
    for _name, body in _LISTENER.findall(done.stdout):
        port = re.search(r"port = (\d+)", body)
        assert port is not None, body
        listeners[int(port.group(1))] = "haproxy = yes" in body
    return listeners


def test_the_sidecar_file_is_valid_dovecot_configuration() -> None:
    assert dovecot_listeners()  # parsed, with listeners


def test_every_backend_address_is_a_dovecot_listener_of_the_right_kind() -> None:
    listeners = dovecot_listeners()
    config = config_mod.load(EXAMPLES / "authgate.toml")
    for listener in config.listeners:
        backend = listener.backend
        assert backend.address.host == "127.0.0.1", listener.name
        port = backend.address.port
        assert port in listeners, f"{listener.name}: nothing in dovecot-sidecar.conf on {port}"
        proxied = backend.client_address is ClientAddressForwarding.PROXY_V2
        assert listeners[port] is proxied, (listener.name, port)
