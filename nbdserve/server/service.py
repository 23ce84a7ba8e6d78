"""The server as a system service: signals, systemd notifications, reload, pid file, and the
control socket and metrics endpoint beside the NBD listeners."""

import logging
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import trio

from ..catalog import ExportUnavailable
from ..config import ServerConfig
from ..settings import ConfigError
from .control import control_path, serve_control
from .metrics import serve_metrics
from .notify import Notifier
from .server import Server

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


async def run_server(
    config: ServerConfig,
    *,
    reload_config: Callable[[], ServerConfig] | None = None,
    pid_file: Path | None = None,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `config` until SIGTERM or SIGINT, then shut down in order. SIGHUP reloads the
    exports from `reload_config()`. systemd hears READY=1 once every listener accepts."""
    service = Service(Server(config), reload_config)
    with ExitStack() as at_exit, trio.open_signal_receiver(*STOP_SIGNALS, signal.SIGHUP) as signals:
        at_exit.callback(service.notifier.close)
        async with trio.open_nursery() as helpers:
            # The watchdog and the control socket run until the last connection has drained.
            helpers.start_soon(service.notifier.serve_watchdog)
            async with trio.open_nursery() as serving:
                await serving.start(service.server.serve)
                await helpers.start(serve_control, service.server, control_path(config))
                if config.metrics:
                    await helpers.start(serve_metrics, service.server, config.metrics)
                at_exit.enter_context(_pid_file(pid_file))  # until the process is about to exit
                service.server.on_change = service.update_status
                service.notifier.ready(service.status())
                task_status.started(service.server)
                await service.wait_for_stop(signals)
            helpers.cancel_scope.cancel()


class Service:
    """What the signals do, and what systemd is told."""

    def __init__(self, server: Server, reload_config: Callable[[], ServerConfig] | None) -> None:
        self.server = server
        self.reload_config = reload_config
        self.notifier = Notifier()
        # `systemctl reload` cannot fail (it only sends SIGHUP): the status line says it did.
        self.reload_error = ""

    def status(self) -> str:
        exports = _count(len(self.server.catalog.names()), "export")
        connections = _count(len(self.server.connections), "connection")
        line = f"serving {exports} to {connections} on {', '.join(self.server.addresses)}"
        return f"{line}; last reload rejected: {self.reload_error}" if self.reload_error else line

    def update_status(self) -> None:
        self.notifier.status(self.status())

    async def wait_for_stop(self, signals) -> None:
        async for signum in signals:
            if signum == signal.SIGHUP:
                await self.reload()
                continue
            log.info("received %s", signal.Signals(signum).name)
            self.notifier.stopping()
            self.server.shutdown()
            return

    async def reload(self) -> None:
        if self.reload_config is None:
            log.warning("SIGHUP: nothing to reload without --config")
            return
        log.info("SIGHUP: reloading the config")
        self.notifier.reloading()
        try:
            config = await trio.to_thread.run_sync(self.reload_config)
            changes = _changes(self.server.config.exports, config.exports)
            await self.server.reload(config)
        except ConfigError as exc:
            log.error("reload rejected, still serving the previous config: %s", exc)
            self.reload_error = str(exc)
        except Exception as exc:
            log.exception("reload failed, still serving the previous config")
            self.reload_error = f"internal error: {exc!r}"
        else:
            self.reload_error = ""
            await _open_exports(self.server)
            log.info("reloaded: %s", changes)
        finally:
            self.notifier.ready(self.status())


def _changes(old: dict, new: dict) -> str:
    """What a reload does to the exports, for the log: `added a; removed b; unchanged c`."""
    kinds = {
        "added": [name for name in new if name not in old],
        "removed": [name for name in old if name not in new],
        "changed": [name for name in new if name in old and new[name] != old[name]],
        "unchanged": [name for name in new if name in old and new[name] == old[name]],
    }
    return "; ".join(f"{kind} {', '.join(names)}" for kind, names in kinds.items() if names) or "no exports"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


async def _open_exports(server: Server) -> None:
    """Open the new and changed exports now, so that a broken one shows in the log at once."""
    for name in server.catalog.names():
        try:
            await server.catalog.get(name)
        except ExportUnavailable:
            pass  # logged by the catalog; clients asking for it are told why


@contextmanager
def _pid_file(path: Path | None) -> Iterator[None]:
    if path is None:
        yield
        return
    pid = f"{os.getpid()}\n"
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(pid)
    partial.replace(path)  # never a half-written pid file for a reader
    try:
        yield
    finally:
        try:
            if path.read_text() == pid:  # not one a newer server wrote over ours
                path.unlink()
        except FileNotFoundError:
            pass
