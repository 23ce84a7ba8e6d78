"""Backends and formats are found through entry points, so a new one plugs in without touching
the server: `nbdserve.backends` names byte sources (file, http, lvm, ...), `nbdserve.formats`
names image formats layered over a source (raw, qcow2).

A source driver provides:
    name: str
    claims(spec: str) -> dict | None      the settings a command-line SOURCE means, if it is ours
    parse(section: Section, context: ParseContext) -> config
    async open(config, options: OpenOptions) -> Backend
  and, if one config can name many exports (lvm: every LV of a volume group):
    provider(template: ExportConfig) -> catalog.ExportProvider | None   None: just one export
A format driver provides:
    name: str
    parse(section: Section, context: ParseContext) -> config
    async open(child: Backend, config, options: OpenOptions, opener: SourceOpener) -> Backend
"""

from dataclasses import dataclass
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from .settings import ConfigError, Section

SOURCES = "nbdserve.backends"
FORMATS = "nbdserve.formats"


@dataclass(frozen=True)
class ParseContext:
    """What drivers need to resolve relative settings."""

    base_dir: Path  # relative paths in the config are resolved against this


@cache
def _entry_points(group: str) -> dict:
    return {ep.name: ep for ep in entry_points(group=group)}


def names(group: str) -> list[str]:
    return sorted(_entry_points(group))


@cache
def driver(group: str, name: str) -> Any:
    found = _entry_points(group).get(name)
    if found is None:
        kind = "backend" if group == SOURCES else "format"
        raise KeyError(f"unknown {kind} {name!r} (available: {', '.join(names(group))})")
    return found.load()()


def source_settings(spec: str) -> dict:
    """Settings for a source given as one string (`/dev/vg/lv`, `https://...`, `lvm:vg/lv`)."""
    fallback = None
    for name in names(SOURCES):
        settings = driver(SOURCES, name).claims(spec)
        if settings is not None:
            if name == "file":
                fallback = settings  # a path: only if no scheme-based driver claims it
            else:
                return settings
    if fallback is None:
        raise ConfigError("", f"no backend understands the source {spec!r}")
    return fallback


def parse_source(value: Any, path: str, context: ParseContext) -> tuple[Any, Any]:
    """A `source:` value (a string or a mapping with `driver:`) -> (driver, parsed config)."""
    if isinstance(value, str):
        try:
            value = source_settings(value)
        except ConfigError as exc:
            raise ConfigError(path, str(exc)) from None
    section = Section(value, path)
    name = section.str("driver", required=True)
    try:
        source_driver = driver(SOURCES, name)
    except KeyError as exc:
        raise section.error("driver", exc.args[0]) from None
    config = source_driver.parse(section, context)
    section.done()
    return source_driver, config
