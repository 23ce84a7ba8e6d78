"""An http fetcher process: `python -m backends.http.fetcher FD`, started by the server.

It does the blocking HTTP work of an http source's small fetches (requests, retries, reply
parsing) with a GIL of its own, one request at a time (see `fetchers` for why); the server only
moves frames over a socket (FD, inherited; see `channel`).

It reads the settings and what the server's probe found, answers READY, then serves FETCH
requests until the server closes the socket. Its log records go to the server.
"""

import logging
import signal
import socket
import sys

from . import channel
from .remote import ImageChanged, RemoteImage

log = logging.getLogger(__name__)


class _Link:
    """The socket to the server."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._reader = sock.makefile("rb")

    def receive(self) -> tuple[channel.Kind, int, bytes]:
        """The next frame; EOFError once the server is gone."""
        head = self._reader.read(channel.HEADER_SIZE)
        if len(head) < channel.HEADER_SIZE:
            raise EOFError
        kind, request, length = channel.parse_header(head)
        payload = self._reader.read(length)
        if len(payload) < length:
            raise EOFError
        return kind, request, payload

    def send(self, *buffers) -> None:
        """Send the buffers as one frame, with as few syscalls as the socket allows."""
        views = [memoryview(buffer).cast("B") for buffer in buffers]
        while views:
            sent = self._sock.sendmsg(views)
            while views and sent >= len(views[0]):
                sent -= len(views.pop(0))
            if sent:
                views[0] = views[0][sent:]


class _ForwardingHandler(logging.Handler):
    """Log records go to the server, which logs them as its own."""

    def __init__(self, link: _Link) -> None:
        super().__init__()
        self.link = link
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.link.send(channel.log_frame(record.levelno, record.name, self.format(record)))
        except OSError:
            pass  # the server is gone: nobody to tell


def _answer(remote: RemoteImage, request: int, ranges: list[tuple[int, int]], link: _Link) -> None:
    try:
        parts = remote.fetch(ranges)
    except ImageChanged as exc:
        link.send(channel.failed_frame(request, exc.strerror, changed=True))
    except OSError as exc:
        link.send(channel.failed_frame(request, exc.strerror or str(exc), changed=False))
    except Exception:
        log.exception("http source %s: fetch failed", remote.name)
        link.send(channel.failed_frame(request, "internal error in the http fetcher", changed=False))
    else:
        link.send(channel.header(channel.Kind.DATA, request, sum(map(len, parts))), *parts)


def main(argv: list[str]) -> int:
    # Signals for the server's process group (Ctrl-C, a service manager's SIGTERM) are the
    # server's to act on: this process ends when the server closes the socket, or exits.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    link = _Link(socket.socket(fileno=int(argv[1])))
    try:
        return _serve(link)
    except (EOFError, OSError):
        return 0  # the server closed the export, or is gone


def _serve(link: _Link) -> int:
    kind, _, payload = link.receive()
    if kind is not channel.Kind.CONFIG:
        return 2
    config, log_level, probed = channel.parse_config(payload)
    logging.basicConfig(level=log_level, handlers=[_ForwardingHandler(link)])
    remote = RemoteImage(config)
    remote.adopt(probed)
    link.send(channel.frame(channel.Kind.READY, 0))
    while True:
        kind, request, payload = link.receive()
        if kind is channel.Kind.FETCH:
            _answer(remote, request, channel.parse_fetch(payload), link)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
