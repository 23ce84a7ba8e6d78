"""The server: accept loops, the set of live connections, and orderly shutdown."""

import errno
import logging
import os
import signal
import socket

import trio

from ..access import Client
from ..catalog import Catalog
from ..config import ServerConfig
from .connection import Connection
from .limits import ConnectionLimiter
from .listeners import describe, open_listeners, to_trio

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
        self._accept_scope = trio.CancelScope()
        self._unix_paths: list[str] = []

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until `shutdown()`; then finish in-flight requests and flush every export."""
        await self.catalog.open_all()
        sockets = open_listeners(self.config.listeners)
        self.addresses = [describe(sock) for sock in sockets]
        self._unix_paths = [
            sock.getsockname() for sock in sockets
            if sock.family == socket.AF_UNIX and "LISTEN_FDS" not in os.environ
        ]
        listeners = [to_trio(sock) for sock in sockets]
        try:
            async with trio.open_nursery() as connections:
                with self._accept_scope:
                    async with trio.open_nursery() as accepting:
                        for listener in listeners:
                            accepting.start_soon(self._accept, listener, connections)
                        accepting.start_soon(self.catalog.serve_discovery)
                        task_status.started(self.addresses)
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
        log.info("%s: connected", peer)
        try:
            await connection.run()
        except Exception:
            # Our bug, not the client's: log it and close only this connection.
            log.exception("%s: internal error", peer)
        finally:
            self.connections.discard(connection)
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


async def run_server(config: ServerConfig, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve `config` until SIGTERM or SIGINT, then shut down in order."""
    server = Server(config)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            task_status.started(server)
            async for signum in signals:
                log.info("received %s", signal.Signals(signum).name)
                server.shutdown()
                break
