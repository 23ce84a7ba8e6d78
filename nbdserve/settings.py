"""Reading config mappings with errors that name the key path and the value."""

import re
from collections.abc import Mapping
from typing import Any


class ConfigError(Exception):
    """A config problem; str() names the key path, e.g. `exports.vm1.cache: unknown mode 'fast'`."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path


_SIZE = re.compile(r"^\s*(\d+)\s*([kmgtpe]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}


def parse_size(text: str | int) -> int:
    """`10G`, `512M`, `4096`, `1GiB` -> bytes (powers of 1024, as qemu-img reads them)."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"negative size {text}")
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"not a size: {text!r} (expected bytes or a number with K, M, G, T)")
    return int(match.group(1)) << (10 * _UNITS[match.group(2).lower()])


class Section:
    """One mapping of a config, read key by key; `done()` rejects keys nobody asked for."""

    def __init__(self, mapping: Any, path: str = "") -> None:
        if mapping is None:
            mapping = {}
        if not isinstance(mapping, Mapping):
            raise ConfigError(path, f"expected a mapping, got {_describe(mapping)}")
        self._mapping = mapping
        self._seen: set[str] = set()
        self.path = path

    def key_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.key_path(key), message)

    def __contains__(self, key: str) -> bool:
        return key in self._mapping

    def raw(self, key: str, default: Any = None) -> Any:
        self._seen.add(key)
        return self._mapping.get(key, default)

    def _typed(self, key: str, kind: type | tuple, what: str, default: Any) -> Any:
        value = self.raw(key, default)
        if value is default:
            return value
        if not isinstance(value, kind) or isinstance(value, bool) and bool not in _tuple(kind):
            raise self.error(key, f"expected {what}, got {_describe(value)}")
        return value

    def str(self, key: str, default: Any = None, *, required: bool = False) -> Any:
        if required and key not in self._mapping:
            raise self.error(key, "is required")
        return self._typed(key, str, "a string", default)

    def bool(self, key: str, default: bool = False) -> bool:
        return self._typed(key, bool, "true or false", default)

    def int(self, key: str, default: Any = None, *, minimum: int | None = None) -> Any:
        value = self._typed(key, int, "a whole number", default)
        if value is not None and minimum is not None and value < minimum:
            raise self.error(key, f"must be at least {minimum}, got {value}")
        return value

    def number(self, key: str, default: Any = None) -> Any:
        value = self._typed(key, (int, float), "a number", default)
        if value is not None and value < 0:
            raise self.error(key, f"must not be negative, got {value}")
        return value

    def size(self, key: str, default: Any = None) -> Any:
        value = self.raw(key, default)
        if value is default:
            return value
        try:
            return parse_size(value)
        except ValueError as exc:
            raise self.error(key, str(exc)) from None

    def choice(self, key: str, choices: list[str], default: Any = None) -> Any:
        value = self.str(key, default)
        if value is not None and value not in choices:
            raise self.error(key, f"unknown value {value!r} (expected {', '.join(choices)})")
        return value

    def list(self, key: str) -> list:
        value = self.raw(key, [])
        if not isinstance(value, list):
            raise self.error(key, f"expected a list, got {_describe(value)}")
        return value

    def section(self, key: str) -> "Section":
        return Section(self.raw(key, {}), self.key_path(key))

    def items(self):
        """All keys with their values, for mappings whose keys are names (exports)."""
        self._seen.update(self._mapping)
        return self._mapping.items()

    def done(self) -> None:
        unknown = [key for key in self._mapping if key not in self._seen]
        if unknown:
            raise self.error(str(unknown[0]), "unknown key")


def _tuple(kind) -> tuple:
    return kind if isinstance(kind, tuple) else (kind,)


def _describe(value: Any) -> str:
    if value is None:
        return "nothing"
    return f"{type(value).__name__} {value!r}"
