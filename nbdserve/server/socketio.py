"""Receiving on a connection's plain socket with one syscall where the kernel is ready.

trio's Stream methods checkpoint on every call: a pass through the scheduler each. Here a receive
that the kernel can do at once costs one syscall, and trio is asked to wait only when the socket
is not ready (sending is ReplySender's). Fairness is kept
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
        return self._buffer[: await self.receive_into(self._buffer)]

    async def receive_into(self, target: memoryview) -> int:
        """Receive into `target`; how many bytes came (0 at EOF)."""
        self._receives += 1
        if self._receives % _RECEIVES_PER_CHECKPOINT == 0:
            await trio.lowlevel.checkpoint()
        while True:
            try:
                return os.readv(self._fd, [target])
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._fd)
            except OSError as exc:
                raise trio.BrokenResourceError(f"receive failed: {exc.strerror}") from exc
