"""Replies to one client, each sent whole and in the order given, from tasks and from callbacks.

Requests started without a task (an AIO completion on the event loop) reply from a plain
callback, which cannot wait for the socket: `send_nowait` writes what the kernel takes at once
and queues the rest. A writer task sends what is queued, waiting for the socket as needed; a
task's `send` waits until its bytes are out, which is the backpressure on a client that stops
reading.

A reply is one buffer or several (a header, then the data where it already lies: no copy into a
reply buffer). On a plain socket the first reply of a burst goes out at once, with no pass
through the scheduler; the replies that follow it before the writer runs (a completion burst:
one fetch or one io_getevents answering many requests) wait for the writer, which sends them all
with one writev. A send costs more than the bytes it carries. Wrapped streams (TLS, idle
timeouts) always go through the writer.
"""

import os
from collections import deque
from collections.abc import Callable
from itertools import islice

import outcome
import trio

# Called once a reply is out (True) or can never be sent (False): buffers are free again.
Sent = Callable[[bool], None]

_IOV_MAX = os.sysconf("SC_IOV_MAX")
_JOINED_BYTES = 256 * 1024  # a wrapped stream gets queued replies joined up to this size


def _cannot_abort(_raise_cancel) -> trio.lowlevel.Abort:
    # The queued bytes may be a view of the waiting task's buffer: it waits until they are out.
    return trio.lowlevel.Abort.FAILED


def _ignore(_sent: bool) -> None:
    pass


class ReplySender:
    def __init__(self, stream: trio.abc.Stream, on_broken: Callable[[Exception], None]) -> None:
        """`on_broken(cause)` is called once, when a send fails: the client is gone."""
        self._stream = stream
        # Plain sockets are written directly; anything else only through stream.send_all.
        self._fd = stream.socket.fileno() if type(stream) is trio.SocketStream else None
        self._on_broken = on_broken
        # Buffers not yet sent, each with the callback due once it is out (the last of a reply)
        # or None.
        self._queue: deque[tuple[memoryview, Sent | None]] = deque()
        self._wakeup = trio.Event()
        self._wrote_at_once = False  # since the writer last ran: later replies wait for it
        self._broken = False
        self._closing = False

    def send_nowait(self, reply, on_sent: Sent = _ignore) -> None:
        """Send `reply` (a buffer, or a list or tuple of them) without waiting; `on_sent` says
        when its memory may be reused."""
        if self._broken:
            on_sent(False)
            return
        if self._enqueue(reply, on_sent) and self._fd is not None and not self._wrote_at_once:
            self._wrote_at_once = True
            self._write_queued()
        self._wakeup.set()  # the writer sends the rest, and what follows this burst

    async def send(self, reply) -> None:
        """Send `reply`, returning once it is all with the kernel; BrokenResourceError if it
        never will be."""
        if self._broken:
            raise trio.BrokenResourceError("the client is gone")
        task = trio.lowlevel.current_task()
        waiting = False
        at_once: list[bool] = []

        def sent(ok: bool) -> None:
            if waiting:
                trio.lowlevel.reschedule(task, outcome.Value(ok))
            else:
                at_once.append(ok)

        if self._enqueue(reply, sent) and self._fd is not None:
            self._write_queued()  # the caller batched already: no need to wait for more
        if not at_once:
            self._wakeup.set()
            waiting = True
            at_once.append(await trio.lowlevel.wait_task_rescheduled(_cannot_abort))
        if not at_once[0]:
            raise trio.BrokenResourceError("the client is gone")

    def _enqueue(self, reply, on_sent: Sent) -> bool:
        """Queue the reply's buffers; whether it is first in the queue."""
        queue = self._queue
        first = not queue
        if isinstance(reply, (list, tuple)):
            for part in reply[:-1]:
                queue.append((memoryview(part), None))
            reply = reply[-1]
        queue.append((memoryview(reply), on_sent))
        return first

    def close(self) -> None:
        """The writer sends what is queued, then ends."""
        self._closing = True
        self._wakeup.set()

    async def run(self) -> None:
        """The writer task."""
        try:
            while True:
                self._wrote_at_once = False
                if not self._queue:
                    if self._closing or self._broken:
                        return
                    await self._wakeup.wait()
                    self._wakeup = trio.Event()
                    continue
                try:
                    await self._write()
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    self._break(exc)
                if self._broken:
                    return
        finally:
            self._fail_queued()

    async def _write(self) -> None:
        if self._fd is None:
            await self._send_joined()
            return
        self._write_queued()
        if self._queue and not self._broken:
            await trio.lowlevel.wait_writable(self._fd)

    async def _send_joined(self) -> None:
        """Send queued buffers through the stream, small ones joined into one send."""
        views: list[memoryview] = []
        size = 0
        for view, _ in self._queue:
            if views and size + len(view) > _JOINED_BYTES:
                break
            views.append(view)
            size += len(view)
        await self._stream.send_all(views[0] if len(views) == 1 else b"".join(views))
        self._sent(size)

    def _write_queued(self) -> None:
        """Write what the socket takes of the queue without blocking."""
        queue = self._queue
        while queue:
            try:
                if len(queue) == 1:
                    written = os.write(self._fd, queue[0][0])
                else:
                    written = os.writev(self._fd, [view for view, _ in islice(queue, _IOV_MAX)])
            except BlockingIOError:
                return
            except OSError as exc:
                self._break(exc)
                return
            self._sent(written)

    def _sent(self, count: int) -> None:
        """Drop `count` bytes from the front of the queue, reporting the replies now out."""
        queue = self._queue
        while queue and count >= len(queue[0][0]):  # empty buffers count as sent too
            view, on_sent = queue.popleft()
            count -= len(view)
            if on_sent is not None:
                on_sent(True)
        if count:
            view, on_sent = queue[0]
            queue[0] = (view[count:], on_sent)

    def _break(self, cause: Exception) -> None:
        if not self._broken:
            self._broken = True
            self._on_broken(cause)
            self._wakeup.set()

    def _fail_queued(self) -> None:
        self._broken = True
        while self._queue:
            _, on_sent = self._queue.popleft()
            if on_sent is not None:
                on_sent(False)
