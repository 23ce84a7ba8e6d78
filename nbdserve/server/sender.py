"""Replies to one client, each sent whole and in the order given, from tasks and from callbacks.

Requests started without a task (an AIO completion on the event loop) reply from a plain
callback, which cannot wait for the socket: `send_nowait` writes what the kernel takes at once
and queues the rest. A writer task sends what is queued, waiting for the socket as needed; a
task's `send` waits until its bytes are out, which is the backpressure on a client that stops
reading. On a plain socket a reply usually goes out in one write, with no pass through the
scheduler; wrapped streams (TLS, idle timeouts) always go through the writer.
"""

import os
from collections import deque
from collections.abc import Callable

import outcome
import trio

# Called once a reply is out (True) or can never be sent (False): buffers are free again.
Sent = Callable[[bool], None]


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
        self._queue: deque[tuple[memoryview, Sent]] = deque()
        self._wakeup = trio.Event()
        self._broken = False
        self._closing = False

    def send_nowait(self, data, on_sent: Sent = _ignore) -> None:
        """Send `data` without waiting; `on_sent` says when its memory may be reused."""
        rest = self._write_at_once(data)
        if rest is None:
            on_sent(not self._broken)
        else:
            self._queue.append((rest, on_sent))
            self._wakeup.set()

    async def send(self, data) -> None:
        """Send `data`, returning once it is all with the kernel; BrokenResourceError if it
        never will be."""
        rest = self._write_at_once(data)
        if rest is None:
            if self._broken:
                raise trio.BrokenResourceError("the client is gone")
            return  # no pass through the scheduler
        task = trio.lowlevel.current_task()
        self._queue.append((rest, lambda sent: trio.lowlevel.reschedule(task, outcome.Value(sent))))
        self._wakeup.set()
        if not await trio.lowlevel.wait_task_rescheduled(_cannot_abort):
            raise trio.BrokenResourceError("the client is gone")

    def _write_at_once(self, data) -> memoryview | None:
        """What of `data` must wait for the writer, or None when it is out (or never will be)."""
        if self._broken:
            return None
        view = memoryview(data)
        if self._queue or self._fd is None:
            return view  # behind what is queued, or only the writer can send
        view = self._write_now(view)
        return view if len(view) and not self._broken else None

    def close(self) -> None:
        """The writer sends what is queued, then ends."""
        self._closing = True
        self._wakeup.set()

    async def run(self) -> None:
        """The writer task."""
        try:
            while True:
                if not self._queue:
                    if self._closing or self._broken:
                        return
                    await self._wakeup.wait()
                    self._wakeup = trio.Event()
                    continue
                view, on_sent = self._queue[0]
                try:
                    await self._write(view)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    self._break(exc)
                    return
                self._queue.popleft()
                on_sent(True)
        finally:
            self._fail_queued()

    async def _write(self, view: memoryview) -> None:
        if self._fd is None:
            await self._stream.send_all(view)
            return
        while len(view):
            view = self._write_now(view)
            if self._broken:
                raise trio.BrokenResourceError("send failed")  # _write_now reported why
            if len(view):
                await trio.lowlevel.wait_writable(self._fd)

    def _write_now(self, view: memoryview) -> memoryview:
        """What the socket would not take without blocking."""
        while len(view):
            try:
                view = view[os.write(self._fd, view):]
            except BlockingIOError:
                break
            except OSError as exc:
                self._break(exc)
                break
        return view

    def _break(self, cause: Exception) -> None:
        if not self._broken:
            self._broken = True
            self._on_broken(cause)
            self._wakeup.set()

    def _fail_queued(self) -> None:
        self._broken = True
        while self._queue:
            _, on_sent = self._queue.popleft()
            on_sent(False)
