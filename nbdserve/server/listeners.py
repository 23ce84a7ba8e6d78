"""Listening sockets: TCP, unix, and sockets handed over by systemd (LISTEN_FDS)."""

import errno
import logging
import os
import socket
import stat

import trio

from ..config import Listener

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3
BACKLOG = 128


def systemd_sockets() -> list[socket.socket]:
    """Sockets passed by systemd socket activation, or [] when not socket-activated.

    LISTEN_PID must name this process (the variables may have been inherited by mistake). Each
    fd must be a listening stream socket (ListenStream= with Accept=no), TCP or unix; its
    LISTEN_FDNAMES name (FileDescriptorName=) goes to the log. The variables are removed so
    that child processes do not take the sockets for theirs.
    """
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = os.environ.get("LISTEN_FDS", "0")
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if not count.isdigit():
        raise OSError(errno.EINVAL, f"LISTEN_FDS={count!r} is not a number")
    sockets = []
    for index in range(int(count)):
        fd = SD_LISTEN_FDS_START + index
        name = names[index] if index < len(names) else "unknown"
        sockets.append(_activated_socket(fd, name))
    return sockets


def _activated_socket(fd: int, name: str) -> socket.socket:
    problem = f"systemd passed fd {fd} ({name!r}), which is not a listening stream socket"
    try:
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise OSError(exc.errno, f"{problem}: {exc.strerror}") from None
    if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise OSError(errno.EINVAL, f"{problem}: use ListenStream= with Accept=no")
    log.info("systemd socket %r: %s", name, describe(sock))
    return sock


def bind_tcp(listener: Listener) -> list[socket.socket]:
    """A socket for every address of `listener` (a host name may have IPv4 and IPv6 ones)."""
    sockets = []
    try:
        infos = socket.getaddrinfo(
            listener.host, listener.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
    except BaseException as exc:
        for sock in sockets:
            sock.close()
        raise _naming(listener, exc)
    return sockets


def bind_unix(path: str) -> socket.socket:
    remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        sock.bind(path)
        sock.listen(BACKLOG)
    except BaseException as exc:
        sock.close()
        raise _naming(f"unix:{path}", exc)
    return sock


def _naming(where, exc: BaseException) -> BaseException:
    """An OSError that says which address failed ("Address already in use" alone does not)."""
    if not isinstance(exc, OSError):
        return exc
    error = OSError(exc.errno, f"cannot listen on {where}: {exc.strerror or exc}")
    error.__cause__ = exc
    return error


def remove_stale_socket(path: str) -> None:
    """A socket file left by a crashed server must not block the next start; a live one must."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        log.info("removing stale socket %s", path)
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"another server is listening on {path}")


def open_listeners(listeners: list[Listener]) -> list[socket.socket]:
    """Bind every configured listener."""
    sockets: list[socket.socket] = []
    try:
        for listener in listeners:
            if listener.kind == "unix":
                sockets.append(bind_unix(listener.path))
            else:
                sockets.extend(bind_tcp(listener))
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def describe(sock: socket.socket) -> str:
    address = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{address}"
    if sock.family == socket.AF_INET6:
        return f"[{address[0]}]:{address[1]}"
    return f"{address[0]}:{address[1]}"


def to_trio(sock: socket.socket) -> trio.SocketListener:
    sock.setblocking(False)
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))
