"""The README's configuration examples are real: they load."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from authgate.config import load

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
BLOCKS = re.findall(r"```toml\n(.*?)```", README, re.S)
CONFIGS = [b for b in BLOCKS if "[[listeners]]" in b or "[limits]" in b]


def test_the_readme_has_config_examples() -> None:
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("block", CONFIGS, ids=lambda b: b.split("\n", 1)[0][:40])
def test_readme_config_block_loads(block: str, tmp_path: Path) -> None:
    (tmp_path / "master.secret").write_text("example\n")
    text = block
    if "[users]" not in text and "mode = \"relay\"" not in text:
        text = '[users]\nfile = "users.toml"\n' + text
    if "[tls]" not in text and 'tls = "implicit"' in text:
        text = '[tls]\ncert = "c.pem"\nkey = "k.pem"\n' + text
    if "[[listeners]]" in text and "backend" not in text.split("[[listeners]]", 1)[1]:
        text += '[listeners.backend]\naddress = "127.0.0.1:1143"\nmaster_user = "authgate"\nmaster_password = "x"\n'
    path = tmp_path / "authgate.toml"
    path.write_text(text)
    config = load(path)
    if "[limits]" in block:
        assert config.limits.idle_timeout == 60 and config.defence.block_after == 10
        assert config.password_policy.min_length == 8
