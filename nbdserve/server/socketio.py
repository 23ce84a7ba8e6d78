"""Byte I/O on a connection's plain socket with one syscall where the kernel is ready.

trio's Stream methods checkpoint on every call: a pass through the scheduler each, and a request
made three of them (receive, lock, send). Here a receive or send that the kernel can do at once
costs one syscall, and trio is asked to wait only when the socket is not ready. Fairness is kept
by an explicit checkpoint every few receives, so a client that always has data queued cannot hold
the event loop, and cancellation (shutdown) is still noticed.
"""

import os

import trio

_RECEIVES_PER_CHECKPOINT = 8


class SocketIO:
    def __init__(self, stream: trio.SocketStream, receive_size: int) -> None:
        self._fd = stream.socket.fileno()
        self._buffer = memoryview(bytearray(receive_size))
        self._receives = 0

    async def receive(self) -> memoryview:
        """The next bytes from the client (empty at EOF), valid until the next call."""
        self._receives += 1
        if self._receives % _RECEIVES_PER_CHECKPOINT == 0:
            await trio.lowlevel.checkpoint()
        while True:
            try:
                count = os.readv(self._fd, [self._buffer])
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._fd)
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(f"receive failed: {exc.strerror}") from exc
            return self._buffer[:count]

    async def send_all(self, data) -> None:
        view = memoryview(data)
        while len(view):
            try:
                sent = os.write(self._fd, view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self._fd)
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(f"send failed: {exc.strerror}") from exc
            view = view[sent:]
