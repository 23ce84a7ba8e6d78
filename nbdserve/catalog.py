"""The exports a server offers, opened on first use and shared by every connection.

Sharing one open backend per export is what makes CAN_MULTI_CONN true: every connection sees
the same data, and a flush on one covers the writes of all.
"""

import logging

import trio

from .export import Export, ExportConfig, open_export

log = logging.getLogger(__name__)


class ExportUnavailable(Exception):
    """The export exists but cannot be opened; the message is for the client and the log."""


class Catalog:
    def __init__(self, configs: dict[str, ExportConfig], default_name: str | None = None) -> None:
        self._configs = dict(configs)
        self._default = default_name
        self._open: dict[str, Export] = {}
        self._locks: dict[str, trio.Lock] = {}

    def names(self) -> list[str]:
        return list(self._configs)

    def description(self, name: str) -> str:
        return self._configs[name].description

    def resolve(self, name: str) -> str:
        """An empty name asks for the default export: the configured one, or the only one."""
        if name:
            return name
        if self._default:
            return self._default
        return next(iter(self._configs)) if len(self._configs) == 1 else ""

    async def get(self, name: str) -> Export | None:
        """The open export, or None if there is no such export. Raises ExportUnavailable."""
        name = self.resolve(name)
        config = self._configs.get(name)
        if config is None:
            return None
        lock = self._locks.setdefault(name, trio.Lock())
        async with lock:
            export = self._open.get(name)
            if export is None:
                try:
                    export = await open_export(config)
                except OSError as exc:
                    log.error("export %r: cannot open: %s", name, exc.strerror or exc)
                    raise ExportUnavailable(f"cannot open export {name!r}: {exc.strerror or exc}") from exc
                log.info("export %r: opened, %d bytes", name, export.size)
                self._open[name] = export
            return export

    def opened(self) -> list[Export]:
        return list(self._open.values())

    async def open_all(self) -> None:
        """Open every export now, so a broken one is reported at start."""
        for name in self._configs:
            await self.get(name)

    async def flush_and_close(self) -> None:
        for name, export in list(self._open.items()):
            try:
                await export.flush()
            except OSError as exc:
                log.error("export %r: flush at shutdown failed: %s", name, exc)
            await export.close()
            del self._open[name]
