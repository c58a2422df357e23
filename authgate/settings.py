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
from pathlib import Path
from typing import Any, TypeVar

from authgate.errors import ConfigError

__all__ = ["Table", "number"]

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


def number(table: Table, name: str, kind: type, low: float, high: float) -> float | int:
    """A number in [low, high]; an int where `kind` is int."""
    raw = table.data[name]
    table.used.add(name)
    if (
        isinstance(raw, bool)
        or not isinstance(raw, int | float)
        or (kind is int and not isinstance(raw, int))
    ):
        raise table.error(name, f"{raw!r} is not {'an integer' if kind is int else 'a number'}")
    if not low <= raw <= high:
        raise table.error(name, f"{raw!r} is outside {low:g}..{high:g}")
    value: float | int = kind(raw)
    return value
