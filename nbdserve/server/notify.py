"""systemd's notification protocol (sd_notify), without libsystemd.

A notification is one datagram of `KEY=VALUE` lines to the unix socket named by $NOTIFY_SOCKET
(a path, or an abstract socket when it starts with `@`). Sending never blocks: when systemd's
queue is full the message is dropped, as sd_notify does. Outside systemd every call is a no-op.
"""

import logging
import os
import socket
import time

import trio

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ=os.environ) -> None:
        self.address = _socket_address(environ.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval = _watchdog_interval(environ)
        self._socket: socket.socket | None = None
        self._status = ""
        self._failed = False  # said once in the log; not again for every status change
        if self.address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def send(self, **fields) -> None:
        """notify(READY=1, STATUS="...") sends `READY=1\\nSTATUS=...`."""
        if self._socket is None:
            return
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            self._socket.sendto(message, socket.MSG_DONTWAIT, self.address)
        except OSError as exc:
            if not self._failed:
                log.warning("cannot notify systemd at %s: %s", os.environ.get("NOTIFY_SOCKET"), exc)
            self._failed = True

    def ready(self, status: str) -> None:
        self._status = status
        self.send(READY=1, STATUS=status)

    def status(self, status: str) -> None:
        """Send STATUS= when it changed."""
        if status != self._status:
            self._status = status
            self.send(STATUS=status)

    def reloading(self) -> None:
        self.send(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self) -> None:
        self.send(STOPPING=1, STATUS="shutting down")

    async def serve_watchdog(self) -> None:
        """Ping the watchdog at half its interval, as systemd recommends; runs in the event loop,
        so a stalled loop stops the pings and systemd restarts the service."""
        if self._socket is None or self.watchdog_interval is None:
            return
        while True:
            self.send(WATCHDOG=1)
            await trio.sleep(self.watchdog_interval / 2)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _socket_address(name: str) -> str | bytes | None:
    if name.startswith("@"):
        return b"\0" + name[1:].encode()  # abstract namespace
    if name.startswith("/"):
        return name
    return None


def _watchdog_interval(environ) -> float | None:
    """Seconds between deadlines when systemd watches this process (WatchdogSec=)."""
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1_000_000
