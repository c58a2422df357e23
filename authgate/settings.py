"""The validation type every settings parser uses: a TOML table with its key
path, so that each error names the file, the key and the bad value
(``authgate.toml: listeners[1].tls: 'tsl' is not one of none | starttls |
implicit``), and every key read is marked, so a key nobody read is an
error ("unknown key": a typo must not silently weaken a setting).

A leaf: it imports nothing of authgate but the error type, so the settings
of any module (config, directory, defence, password policy) can use it
without importing each other.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from authgate.errors import ConfigError

__all__ = ["Problem", "Range", "Table", "number"]

E = TypeVar("E", bound=enum.Enum)
T = TypeVar("T")


class Table:
    """A TOML table with its key path, for precise error messages."""

    def __init__(self, data: Mapping[str, Any], path: str, source: Path) -> None:
        self.data = data
        self.path = path
        self.source = source
        self.used: set[str] = set()

    def where(self, key: str | int) -> str:
        if isinstance(key, int):
            return f"{self.path}[{key}]"
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str | int, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {self.where(key)}: {message}")

    def has(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str, kind: type[T], default: T) -> T:
        self.used.add(key)
        if key not in self.data:
            return default
        value = self.data[key]
        # bool is an int subclass; a port of `true` is a mistake.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.error(key, f"{value!r} is not a {_kind_name(kind)}")
        return value

    def require(self, key: str, kind: type[T]) -> T:
        if key not in self.data:
            raise self.error(key, "is required")
        value = self.get(key, kind, None)
        assert value is not None
        return value

    def choice(self, key: str, enum_type: type[E], default: E) -> E:
        raw = self.get(key, str, default.value)
        try:
            return enum_type(raw)
        except ValueError:
            allowed = " | ".join(str(m.value) for m in enum_type)
            raise self.error(key, f"{raw!r} is not one of {allowed}") from None

    def strings(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        values = self.get(key, list, list(default))
        for i, item in enumerate(values):
            if not isinstance(item, str):
                where = f"{self.where(key)}[{i}]"
                raise ConfigError(f"{self.source}: {where}: {item!r} is not a string")
        return tuple(values)

    def table(self, key: str) -> Table | None:
        value = self.get(key, dict, None)
        return None if value is None else Table(value, self.where(key), self.source)

    def path_value(self, key: str) -> Path | None:
        raw = self.get(key, str, "")
        if not raw:
            return None
        p = Path(raw).expanduser()
        return p if p.is_absolute() else (self.source.parent / p)

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise self.error(unknown[0], "unknown key")


def _kind_name(kind: type) -> str:
    return {str: "string", int: "integer", bool: "boolean", list: "list", dict: "table"}.get(
        kind, kind.__name__
    )


def number(table: Table, name: str, bounds: Range) -> float | int:
    """The number at `name`, within `bounds`; an int where they want one."""
    raw = table.data[name]
    table.used.add(name)
    if not bounds.is_kind(raw):
        raise table.error(name, f"{raw!r} is not {'an integer' if bounds.integer else 'a number'}")
    if not bounds.contains(raw):
        raise table.error(name, f"{raw!r} is outside {bounds.low:g}..{bounds.high:g}")
    value: float | int = int(raw) if bounds.integer else float(raw)
    return value


@dataclass(frozen=True)
class Range:
    """The values a number setting may take, declared once, in its settings
    class (`Limits.RANGES`, `DefenceSettings.RANGES`, ...), and read by the
    parser that checks the TOML value."""

    low: float
    high: float
    integer: bool = False
    open_low: bool = False  # `low` itself is not allowed (0 < s)

    def contains(self, value: float) -> bool:
        above = self.low < value if self.open_low else self.low <= value
        return above and value <= self.high

    def is_kind(self, value: object) -> bool:
        """A number of the right kind (bool is an int, but never a number here)."""
        if isinstance(value, bool):
            return False
        return isinstance(value, int) if self.integer else isinstance(value, int | float)


class Problem(ValueError):
    """A settings class refusing its values, with the key it is about, so that
    a parser can name the key path (`table.error(problem.key, problem.message)`)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message
