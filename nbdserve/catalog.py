"""The exports a server offers, opened on first use and shared by every connection.

Sharing one open backend per export is what makes CAN_MULTI_CONN true: every connection sees
the same data, and a flush on one covers the writes of all.
"""

import logging
from contextlib import asynccontextmanager
from typing import Callable, Protocol

import trio

from .access import Client, Verdict
from .export import Export, ExportConfig, open_export

log = logging.getLogger(__name__)

DEFAULT_DISCOVERY_INTERVAL = 5.0  # seconds, while no provider asks for another


class ExportUnavailable(Exception):
    """The export exists but cannot be opened; the message is for the client and the log."""


class ExportProvider(Protocol):
    """Exports found while serving, beside the configured ones (every LV of a volume group).

    The catalog asks at NBD_OPT_LIST and GO time, and every `interval` seconds while one of them
    is open, so exports come and go without a restart. Equal providers offer the same exports,
    so a reload can keep an unchanged one as it keeps an unchanged export.
    """

    interval: float

    async def configs(self) -> dict[str, ExportConfig]:
        """The exports offered now, by name. Raises OSError when it cannot tell."""


class Catalog:
    def __init__(
        self, configs: dict[str, ExportConfig], default_name: str | None = None,
        providers: dict[str, ExportProvider] | None = None,
    ) -> None:
        self._configs = dict(configs)
        self._default = default_name
        self._open: dict[str, Export] = {}
        self._locks: dict[str, trio.Lock] = {}
        self._providers = dict(providers or {})
        self._found: dict[str, tuple[str, ExportConfig]] = {}  # name -> (provider key, config)
        self._open_found: dict[str, ExportConfig] = {}  # the config each open found export has
        self._touched: set[Export] = set()  # found exports handed out since the last rescan
        self._users: dict[Export, list[Callable[[], None]]] = {}
        self._retiring: set[Export] = set()  # out of service, closed when their last user leaves
        self._discovering: trio.Event | None = None  # set when the discovery under way ends
        self._discoveries_started = self._discoveries_done = 0

    def names(self) -> list[str]:
        return [*self._configs, *(name for name in self._found if name not in self._configs)]

    def description(self, name: str) -> str:
        return self._config(name).description

    def _config(self, name: str) -> ExportConfig | None:
        if name in self._configs:
            return self._configs[name]
        found = self._found.get(name)
        return found[1] if found else None

    def resolve(self, name: str) -> str:
        """An empty name asks for the default export: the configured one, or the only one."""
        if name:
            return name
        if self._default:
            return self._default
        only = len(self._configs) == 1 and not self._providers
        return next(iter(self._configs)) if only else ""

    def check(self, name: str, client: Client) -> Verdict:
        """May `client` use export `name`? Unknown names are DENIED: the client cannot tell
        them from exports it may not use. Call before `get`, which may open the export."""
        config = self._config(self.resolve(name))
        return Verdict.DENIED if config is None else config.access.check(client)

    async def get(self, name: str) -> Export | None:
        """The open export, or None if there is no such export. Raises ExportUnavailable."""
        name = self.resolve(name)
        config = self._config(name)
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
                if name not in self._configs:
                    self._open_found[name] = config
            if name in self._open_found:
                self._touched.add(export)
            return export

    def opened(self) -> list[Export]:
        return list(self._open.values())

    def serves(self, export: Export) -> bool:
        """Is `export` still in service (not removed or changed by a reload)?"""
        return self._open.get(export.name) is export

    async def update(self, configs: dict[str, ExportConfig], default_name: str | None = None) -> list[Export]:
        """Serve `configs` from now on (a reload). Unchanged exports stay open; the open exports
        that were removed or changed are returned, for the caller to close once no connection
        uses them. A changed export opens with its new config on next use."""
        stale = [name for name, config in self._configs.items() if configs.get(name) != config]
        self._configs = dict(configs)
        self._default = default_name
        retired = []
        for name in stale:
            # The lock waits out an open under the old config that is still in progress.
            async with self._locks.setdefault(name, trio.Lock()):
                export = self._open.pop(name, None)
            if export is not None:
                retired.append(export)
        return retired

    async def open_all(self) -> None:
        """Open every export now, so a broken one is reported at start."""
        for name in self._configs:
            await self.get(name)
        for key, provider in self._providers.items():
            try:
                await provider.configs()
            except OSError as exc:
                raise ExportUnavailable(f"exports of {key!r}: {exc.strerror or exc}") from exc

    async def flush_and_close(self) -> None:
        for name, export in list(self._open.items()):
            await close_export(export)
            del self._open[name]

    # Exports found by providers.

    async def discover(self, name: str = "") -> None:
        """Ask the providers what they offer now, unless `name` is a configured export. Open
        exports that are gone or changed (an LV removed, or replaced under the same name) retire."""
        if not (self._providers or self._open_found) or self.resolve(name) in self._configs:
            return
        # One look-up at a time, however many clients ask (each runs lvs, say); but only one
        # that starts after the asking counts, or an LV made just before would be missed.
        wanted = self._discoveries_started + 1
        while self._discoveries_done < wanted:
            if self._discovering is not None:
                await self._discovering.wait()
                continue
            self._discoveries_started += 1
            self._discovering = trio.Event()
            try:
                await self._discover()
            finally:
                self._discoveries_done = self._discoveries_started
                self._discovering.set()
                self._discovering = None

    async def _discover(self) -> None:
        found: dict[str, tuple[str, ExportConfig]] = {}
        for key, provider in self._providers.items():
            try:
                configs = await provider.configs()
            except OSError as exc:
                log.error("exports of %r: %s", key, exc.strerror or exc)
                # One failed look-up is no proof of removal: keep what it offered before.
                configs = {n: config for n, (k, config) in self._found.items() if k == key}
            for found_name, config in configs.items():
                found.setdefault(found_name, (key, config))
        self._found = found
        for found_name, config in list(self._open_found.items()):
            export = self._open.get(found_name)
            if export is not None and self._config(found_name) != config:
                log.info("export %r: removed or changed", found_name)
                await self.retire(export)

    async def update_providers(self, providers: dict[str, ExportProvider]) -> None:
        """Offer the exports of `providers` from now on (a reload). Open exports of an unchanged
        provider stay open; those of a removed or changed one retire."""
        self._providers = dict(providers)
        await self.discover()

    async def retire(self, export: Export) -> None:
        """Take `export` out of service: its connections stop reading, finish the requests they
        have in flight and close, and the export closes after the last of them."""
        if self._open.get(export.name) is export:
            del self._open[export.name]
            self._open_found.pop(export.name, None)
        users = self._users.get(export, [])
        if not users:
            await close_export(export)
            return
        log.info("export %r: ending its %d connections", export.name, len(users))
        self._retiring.add(export)
        for stop in users:
            stop()

    @asynccontextmanager
    async def serving(self, export: Export, stop: Callable[[], None]):
        """A connection transmits on `export` inside this; `stop()` asks it to finish when the
        export retires. A found export closes when idle, so lvremove is not refused as "in use"."""
        if not self.serves(export):
            stop()  # retired during the handshake
            yield
            return
        users = self._users.setdefault(export, [])
        users.append(stop)
        try:
            yield
        finally:
            users.remove(stop)
            if not users:
                del self._users[export]
                with trio.CancelScope(shield=True):
                    await self._close_if_unused(export)

    async def _close_if_unused(self, export: Export) -> None:
        if export in self._users:
            return
        if export in self._retiring:
            self._retiring.discard(export)
            await close_export(export)
        elif self.serves(export) and export.name in self._open_found and export not in self._touched:
            log.info("export %r: no longer in use, closing", export.name)
            await self.retire(export)

    async def serve_discovery(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """While found exports are open, check that they still exist, and close idle ones."""
        task_status.started()
        while True:
            intervals = [provider.interval for provider in self._providers.values()]
            await trio.sleep(min(intervals, default=DEFAULT_DISCOVERY_INTERVAL))
            try:
                if self._open_found:
                    await self.discover()
                for export in [self._open[name] for name in self._open_found if name in self._open]:
                    await self._close_if_unused(export)
            except Exception:
                log.exception("checking found exports failed; trying again later")  # our bug
            self._touched.clear()


async def close_export(export: Export) -> None:
    """Flush, then close; a failed flush is logged, as nothing more can be done about it."""
    try:
        await export.flush()
    except OSError as exc:
        log.error("export %r: flush before closing failed: %s", export.name, exc)
    await export.close()
