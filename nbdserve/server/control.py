"""The control socket: a local unix socket where `nbdserve stats` reads the server's counters.

A client sends one command line (`stats`) and gets one JSON document back, then the server
hangs up. Binding it is best effort: a server without it still serves NBD (a warning says why).
"""

import json
import logging
import os
import time
from pathlib import Path

import trio

from .. import __version__
from ..config import ServerConfig
from ..stats import Counters
from .listeners import bind_unix, to_trio

log = logging.getLogger(__name__)

CONTROL_SOCKET = "control.sock"
REQUEST_LIMIT = 1024
REQUEST_TIMEOUT = 5.0


def control_path(config: ServerConfig) -> Path:
    """`control.socket` from the config (relative to the state directory), else control.sock
    in the state directory."""
    return config.state_dir / (config.control_socket or CONTROL_SOCKET)


def snapshot(server) -> dict:
    """Everything `nbdserve stats` and /metrics show: per export (closed connections included)
    and per open connection."""
    names = server.catalog.names()
    totals = {name: Counters() for name in names}
    for name, counters in server.finished.items():
        totals.setdefault(name, Counters()).add(counters)
    open_connections = {name: 0 for name in totals}
    in_flight = dict(open_connections)
    connections = []
    for connection in server.connections:
        name = connection.export_name
        if not name:
            continue  # still in the handshake
        totals.setdefault(name, Counters()).add(connection.counters)
        open_connections[name] = open_connections.get(name, 0) + 1
        in_flight[name] = in_flight.get(name, 0) + connection.in_flight
        connections.append({
            "peer": connection.peer,
            "export": name,
            "connected_at": connection.connected_at,
            "in_flight": connection.in_flight,
            **connection.counters.to_dict(),
        })
    return {
        "version": __version__,
        "pid": os.getpid(),
        "started_at": server.started_at,
        "time": time.time(),
        "addresses": server.addresses,
        "handshaking": len(server.connections) - len(connections),
        "exports": {
            name: {
                "configured": name in names,
                "connections": open_connections.get(name, 0),
                "in_flight": in_flight.get(name, 0),
                **counters.to_dict(),
            }
            for name, counters in totals.items()
        },
        "connections": connections,
    }


async def serve_control(server, path: Path, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    try:
        sock = bind_unix(str(path))
        os.chmod(path, 0o600)  # peers and export names are for the administrator only
    except OSError as exc:
        log.warning("no control socket, `nbdserve stats` cannot reach this server: %s: %s", path, exc)
        task_status.started(None)
        return
    log.info("control socket: %s", path)
    listener = to_trio(sock)
    try:
        await trio.serve_listeners(
            lambda stream: _answer(server, stream), [listener], task_status=task_status
        )
    finally:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


async def _answer(server, stream: trio.SocketStream) -> None:
    async with stream:
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                request = await receive_until(stream, b"\n", REQUEST_LIMIT)
            request = request.split(b"\n", 1)[0].decode(errors="replace").strip()
            if request == "stats":
                reply = snapshot(server)
            else:
                reply = {"error": f"unknown command {request!r} (expected stats)"}
            await stream.send_all(json.dumps(reply).encode() + b"\n")
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("control client went away: %r", exc)


async def receive_until(stream: trio.abc.ReceiveStream, end: bytes, limit: int) -> bytes:
    """What the client sends up to `end`, EOF or `limit` bytes, whichever comes first."""
    data = b""
    while end not in data and len(data) < limit:
        chunk = await stream.receive_some(limit)
        if not chunk:
            break
        data += chunk
    return data
