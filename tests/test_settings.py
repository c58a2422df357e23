"""authgate.settings: the one table/validation type every settings parser uses,
and the bounds each settings class declares once."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authgate.config import Config, ConfigError, Limits, from_dict
from authgate.credentials.directory import DirectorySettings
from authgate.defence import DefenceSettings
from authgate.password_policy import PasswordPolicy
from authgate.settings import Range, Table, number

SOURCE = Path("/etc/authgate/authgate.toml")

SETTINGS_CLASSES: list[type[Any]] = [Config, Limits, DefenceSettings, PasswordPolicy, DirectorySettings]

values = st.one_of(
    st.integers(min_value=-(10**9), max_value=10**9),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=5),
    st.none(),
)


@pytest.mark.parametrize("cls", SETTINGS_CLASSES, ids=lambda c: c.__name__)
def test_every_range_names_a_field_and_holds_its_default(cls: type[Any]) -> None:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert cls.RANGES
    for name, bounds in cls.RANGES.items():
        assert name in fields, f"{cls.__name__}.RANGES[{name!r}] is no field"
        default = fields[name].default
        if default is not dataclasses.MISSING and default is not None:
            assert bounds.is_kind(default) and bounds.contains(default), name


@given(
    low=st.integers(-50, 50),
    span=st.integers(0, 100),
    integer=st.booleans(),
    open_low=st.booleans(),
    raw=values,
)
def test_number_takes_exactly_what_the_range_allows(
    low: int, span: int, integer: bool, open_low: bool, raw: object
) -> None:
    bounds = Range(low, low + span, integer=integer, open_low=open_low)
    table = Table({"n": raw}, "limits", SOURCE)
    right_kind = not isinstance(raw, bool) and isinstance(raw, int if integer else int | float)
    allowed = (
        right_kind
        and not (isinstance(raw, float) and math.isnan(raw))
        and (low < raw if open_low else low <= raw)  # type: ignore[operator]
        and raw <= low + span  # type: ignore[operator]
    )
    if allowed:
        assert number(table, "n", bounds) == raw
        assert "n" in table.used
        return
    with pytest.raises(ConfigError) as err:
        number(table, "n", bounds)
    prefix = f"{SOURCE}: limits.n: {raw!r} is "
    assert str(err.value).startswith(prefix)
    if right_kind:
        assert str(err.value) == prefix + f"outside {low:g}..{low + span:g}"
    else:
        assert str(err.value) == prefix + ("not an integer" if integer else "not a number")


def _config(section: str, key: str, value: object) -> dict[str, Any]:
    return {"users": {"file": "users.toml"}, section: {key: value}}


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("defence", "ipv4_prefix", 4, "defence.ipv4_prefix: 4 is outside 8..32"),
        ("defence", "ipv6_prefix", 129, "defence.ipv6_prefix: 129 is outside 16..128"),
        ("defence", "max_tracked", 99, "defence.max_tracked: 99 is outside 100..1e+08"),
        ("defence", "penalties", [1, 3601], "defence.penalties: [1]: 3601 is not a delay in 0..3600 seconds"),
        ("limits", "max_line", 1023, "limits.max_line: 1023 is outside 1024..1.04858e+06"),
        ("limits", "max_errors", 2.5, "limits.max_errors: 2.5 is not an integer"),
        ("limits", "drain_timeout", True, "limits.drain_timeout: True is not a number"),
    ],
)
def test_config_reads_the_bounds_of_the_settings_classes(
    section: str, key: str, value: object, message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        from_dict(_config(section, key, value), SOURCE)
    assert str(err.value) == f"{SOURCE}: {message}"


def test_workers_bound() -> None:
    with pytest.raises(ConfigError) as err:
        from_dict({"users": {"file": "u.toml"}, "workers": 257}, SOURCE)
    assert str(err.value) == f"{SOURCE}: workers: 257 is outside 1..256"


def test_code_built_defence_settings_need_only_be_sound() -> None:
    # Tests and tools use prefixes and caps no configuration may set.
    assert DefenceSettings(ipv4_prefix=0, max_tracked=1).ipv4_prefix == 0
    with pytest.raises(ValueError, match=r"ipv4_prefix must be 0\.\.32, not 33"):
        DefenceSettings(ipv4_prefix=33)
    with pytest.raises(ValueError, match=r"ipv6_prefix must be 0\.\.128, not 129"):
        DefenceSettings(ipv6_prefix=129)
