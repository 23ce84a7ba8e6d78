"""The server: accept loops, the set of live connections, and orderly shutdown."""

import errno
import logging
import os
import socket
import time
from collections.abc import Callable

import trio

from ..access import Client
from ..catalog import Catalog, close_export
from ..config import ServerConfig
from ..export import Export
from ..stats import Counters
from .connection import Connection
from .limits import ConnectionLimiter
from .listeners import describe, open_listeners, systemd_sockets, to_trio

log = logging.getLogger(__name__)

# accept() errors that mean "out of resources for now", not "this listener is broken".
_ACCEPT_RETRY = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


class Server:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.catalog = Catalog(config.exports, config.default_export, config.providers)
        self.connections: set[Connection] = set()
        self.limiter = ConnectionLimiter()
        self.addresses: list[str] = []
        self.activated = False  # serving sockets systemd passed, not the configured ones
        self.started_at = time.time()
        self.finished: dict[str, Counters] = {}  # per export: counters of closed connections
        self.on_change: Callable[[], None] = lambda: None  # connections came or went
        self._accept_scope = trio.CancelScope()
        self._unix_paths: list[str] = []
        self._connections: trio.Nursery | None = None

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until `shutdown()`; then finish in-flight requests and flush every export."""
        await self.catalog.open_all()
        sockets = systemd_sockets()
        self.activated = bool(sockets)
        if not self.activated:
            sockets = open_listeners(self.config.listeners)
            # Ours to remove at exit; systemd's socket files belong to systemd.
            self._unix_paths = [sock.getsockname() for sock in sockets if sock.family == socket.AF_UNIX]
        self.addresses = [describe(sock) for sock in sockets]
        listeners = [to_trio(sock) for sock in sockets]
        try:
            async with trio.open_nursery() as connections:
                self._connections = connections
                with self._accept_scope:
                    async with trio.open_nursery() as accepting:
                        for listener in listeners:
                            accepting.start_soon(self._accept, listener, connections)
                        accepting.start_soon(self.catalog.serve_discovery)
                        task_status.started(self.addresses)
                # New clients are refused from now on, not left waiting in the backlog.
                for listener in listeners:
                    await listener.aclose()
                self._drain(connections)
        finally:
            with trio.CancelScope(shield=True):
                for listener in listeners:
                    await listener.aclose()
                self._remove_unix_sockets()
                await self.catalog.flush_and_close()
        log.info("stopped")

    def shutdown(self) -> None:
        """Stop accepting; in-flight requests finish (within the grace period)."""
        log.info("shutting down: %d connections open", len(self.connections))
        self._accept_scope.cancel()

    async def reload(self, config: ServerConfig) -> None:
        """Serve the exports of `config`. Connections to removed or changed exports end once their
        in-flight requests are answered; the others go on untouched. New connections get the new
        limits; listeners stay as they are until a restart."""
        # Under socket activation systemd's sockets are served, whatever `listen:` says.
        listen_changed = not self.activated and config.listeners != self.config.listeners
        if listen_changed or (config.control_socket, config.metrics) != (
            self.config.control_socket, self.config.metrics
        ):
            log.warning("reload: listen, control and metrics changes take effect at restart")
        retired = await self.catalog.update(config.exports, config.default_export)
        await self.catalog.update_providers(config.providers)
        self.config = config
        for connection in self.connections:
            if connection.export in retired:
                log.info("%s: export %r was removed or changed; closing", connection.peer, connection.export_name)
                connection.stop_reading()
        if retired:
            self._connections.start_soon(self._close_when_unused, retired)

    async def _close_when_unused(self, exports: list[Export]) -> None:
        try:
            while any(connection.export in exports for connection in self.connections):
                await trio.sleep(0.05)
        finally:
            with trio.CancelScope(shield=True):
                for export in exports:
                    await close_export(export)
                    log.info("export %r: closed (reloaded)", export.name)

    def _drain(self, connections: trio.Nursery) -> None:
        for connection in self.connections:
            connection.stop_reading()
        connections.cancel_scope.deadline = trio.current_time() + self.config.limits.shutdown_grace

    async def _accept(self, listener: trio.SocketListener, connections: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_RETRY:
                    raise
                log.error("accept failed (%s); retrying in 100 ms", os.strerror(exc.errno))
                await trio.sleep(0.1)
                continue
            connections.start_soon(self._handle, stream)

    async def _handle(self, stream: trio.SocketStream) -> None:
        peer = _peer_name(stream)
        client = _client(stream)
        refusal = self.limiter.admit(client, self.config.limits)
        if refusal:
            log.warning("%s: refused: %s", peer, refusal)
            await trio.aclose_forcefully(stream)
            return
        connection = Connection(
            stream, peer, self.catalog, self.config.limits, tls=self.config.tls, client=client
        )
        self.connections.add(connection)
        self.on_change()
        log.info("%s: connected", peer)
        try:
            await connection.run()
        except Exception:
            # Our bug, not the client's: log it and close only this connection.
            log.exception("%s: internal error", peer)
        finally:
            self.connections.discard(connection)
            if connection.export_name:
                self.finished.setdefault(connection.export_name, Counters()).add(connection.counters)
            self.on_change()
            self.limiter.release(client)
            log.info("%s: disconnected", peer)

    def _remove_unix_sockets(self) -> None:
        for path in self._unix_paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        address = stream.socket.getpeername()
    except OSError:
        return "unknown peer"
    if stream.socket.family == socket.AF_UNIX:
        return "unix client"
    return f"{address[0]}:{address[1]}"


def _client(stream: trio.SocketStream) -> Client:
    """Who connected, as the access lists see it; a unix socket client has no address."""
    if stream.socket.family == socket.AF_UNIX:
        return Client(unix=True)
    try:
        return Client.from_ip(stream.socket.getpeername()[0])
    except OSError:
        return Client()  # gone already; an unknown address matches no allow list
