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
    server = Server(config)
    notifier = Notifier()
    with ExitStack() as at_exit, trio.open_signal_receiver(*STOP_SIGNALS, signal.SIGHUP) as signals:
        at_exit.callback(notifier.close)
        async with trio.open_nursery() as helpers:
            # The watchdog and the control socket run until the last connection has drained.
            helpers.start_soon(notifier.serve_watchdog)
            async with trio.open_nursery() as serving:
                await serving.start(server.serve)
                await helpers.start(serve_control, server, control_path(config))
                if config.metrics:
                    await helpers.start(serve_metrics, server, config.metrics)
                at_exit.enter_context(_pid_file(pid_file))  # until the process is about to exit
                server.on_change = lambda: notifier.status(status_line(server))
                notifier.ready(status_line(server))
                task_status.started(server)
                await _wait_for_stop(signals, server, notifier, reload_config)
            helpers.cancel_scope.cancel()


def status_line(server: Server) -> str:
    exports = _count(len(server.catalog.names()), "export")
    connections = _count(len(server.connections), "connection")
    return f"serving {exports} to {connections} on {', '.join(server.addresses)}"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


async def _wait_for_stop(signals, server: Server, notifier: Notifier, reload_config) -> None:
    async for signum in signals:
        if signum == signal.SIGHUP:
            await _reload(server, notifier, reload_config)
            continue
        log.info("received %s", signal.Signals(signum).name)
        notifier.stopping()
        server.shutdown()
        return


async def _reload(server: Server, notifier: Notifier, reload_config) -> None:
    if reload_config is None:
        log.warning("SIGHUP: nothing to reload without --config")
        return
    log.info("SIGHUP: reloading the config")
    notifier.reloading()
    try:
        config = await trio.to_thread.run_sync(reload_config)
        await server.reload(config)
    except ConfigError as exc:
        log.error("reload rejected, still serving the previous config: %s", exc)
    except Exception:
        log.exception("reload failed, still serving the previous config")
    else:
        await _open_exports(server)
        log.info("reloaded: exports %s", ", ".join(server.catalog.names()))
    finally:
        notifier.ready(status_line(server))


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
