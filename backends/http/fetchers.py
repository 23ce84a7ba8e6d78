"""Where an http source's fetches run: small ones in fetcher processes, large ones in threads.

A small fetch (random reads) costs Python far more CPU than its bytes. In a worker thread of the
server, the GIL then passed back and forth between it and the event loop at every syscall of
either, which cost a third of the throughput at 4 KiB random reads. So small fetches go to
fetcher processes (see `fetcher`), each with a GIL of its own; the server only moves frames over
a socket. A large fetch (sequential reads, readahead) spends its time in socket reads that hold no
GIL, and copying its bytes through a socket would cost more than the handoffs: it runs in a
worker thread, as a reply body used where it lies.

`Fetchers.start` probes the image in a thread, then runs `pool_size` fetcher processes that adopt
what the probe found. `fetch` runs a request without waiting; its callback gets the ranges' bytes
or the error, on the event loop: from a system task per fetcher process that reads its frames,
or from the worker thread's delivery. A fetcher process that dies is started again; the fetch it
had fails with EIO.
"""

import itertools
import logging
import socket
import sys
from collections.abc import Callable
from functools import partial

import outcome
import trio

from . import channel
from .config import HttpConfig
from .remote import ImageChanged, RemoteError, RemoteImage

log = logging.getLogger(__name__)

# Called on the event loop with the outcome of a fetch: a view of each range, or the OSError.
Fetched = Callable[[outcome.Outcome], None]

PROCESS_FETCH_LIMIT = 256 * 1024  # bytes: fetches up to this size go to a fetcher process
_STOP_TIMEOUT = 5.0  # seconds a fetcher process gets to exit once its socket is closed
_RECEIVE_SIZE = 64 * 1024


class Fetchers:
    def __init__(self, config: HttpConfig) -> None:
        self.config = config
        self.name = config.display_url
        self.remote = RemoteImage(config)
        self.closing = False
        self._ids = itertools.count(1)
        self._processes: list[_Fetcher] = []

    @property
    def size(self) -> int:
        return self.remote.size

    @property
    def max_ranges(self) -> int:
        return self.remote.max_ranges

    @property
    def changed(self) -> str | None:
        """Why reads now fail, once the image changed."""
        return self.remote.changed

    async def start(self) -> None:
        """Probe the image and run the fetcher processes; RemoteError if the probe fails."""
        try:
            await trio.to_thread.run_sync(self.remote.probe)
            async with trio.open_nursery() as nursery:
                for _ in range(self.config.pool_size):
                    fetcher = _Fetcher(self)
                    self._processes.append(fetcher)
                    nursery.start_soon(fetcher.start)
        except BaseException:
            await self.aclose()
            raise

    def fetch(self, ranges: list[tuple[int, int]], fetched: Fetched) -> None:
        """Ask for the bytes of `ranges`, in one request; `fetched` gets them."""
        if sum(length for _, length in ranges) <= PROCESS_FETCH_LIMIT:
            fetcher = min(self._processes, key=lambda fetcher: len(fetcher.waiting))
            fetcher.fetch(next(self._ids), ranges, fetched)
            return
        token = trio.lowlevel.current_trio_token()

        def deliver(result: outcome.Outcome) -> None:  # in the worker thread
            if isinstance(result, outcome.Error) and not isinstance(result.error, OSError):
                log.error("http source %s: fetch failed", self.name, exc_info=result.error)
                result = outcome.Error(RemoteError(f"{self.name}: internal error in the http source"))
            try:
                token.run_sync_soon(fetched, result)
            except trio.RunFinishedError:
                pass  # the server stopped: nobody waits any more

        trio.lowlevel.start_thread_soon(partial(self.remote.fetch, ranges), deliver)

    def image_changed(self, message: str) -> None:
        """A fetcher process found the image changed: every later read fails."""
        if self.remote.changed is None:
            self.remote.changed = message

    async def aclose(self) -> None:
        self.closing = True
        async with trio.open_nursery() as nursery:
            for fetcher in self._processes:
                nursery.start_soon(fetcher.stop)
        self.remote.close()


class _Fetcher:
    """One fetcher process: its socket, and the requests it has."""

    def __init__(self, fetchers: Fetchers) -> None:
        self.fetchers = fetchers
        self.waiting: dict[int, tuple[list[int], Fetched]] = {}  # id -> range lengths, callback
        self._process: trio.Process | None = None
        self._socket: socket.socket | None = None
        self._buffer = bytearray(_RECEIVE_SIZE)
        self._buffered = memoryview(self._buffer)[:0]  # received, not yet parsed

    async def start(self) -> None:
        fetchers = self.fetchers
        ours, theirs = socket.socketpair()
        with theirs:
            self._process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "backends.http.fetcher", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
            )
        ours.setblocking(False)
        self._socket = ours
        self._buffered = memoryview(self._buffer)[:0]
        level = logging.getLogger("backends.http").getEffectiveLevel()
        try:
            # A few hundred bytes into an empty socket buffer: this never blocks.
            ours.sendall(channel.config_frame(fetchers.config, level, fetchers.remote.probed()))
            while True:
                kind, _, payload = await self._receive_frame()
                if kind is channel.Kind.READY:
                    break
                self._dispatch(kind, 0, payload)
        except BaseException as exc:
            await self.stop()
            if isinstance(exc, (EOFError, OSError, ValueError)):
                raise RemoteError(f"{fetchers.name}: a fetcher process did not start") from exc
            raise
        trio.lowlevel.spawn_system_task(self._receive_replies, name=f"http fetcher {fetchers.name}")

    def fetch(self, request: int, ranges: list[tuple[int, int]], fetched: Fetched) -> None:
        self.waiting[request] = ([length for _, length in ranges], fetched)
        try:
            # Requests are a few hundred bytes and a fetcher has few at once: the socket buffer
            # always has room, so this never blocks.
            self._socket.sendall(channel.fetch_frame(request, ranges))
        except OSError as exc:
            self._fail(request, RemoteError(f"{self.fetchers.name}: the fetcher process is gone ({exc.strerror})"))

    async def stop(self) -> None:
        if self._socket is not None and self._socket.fileno() != -1:
            trio.lowlevel.notify_closing(self._socket)
            self._socket.close()
        process = self._process
        if process is not None:
            with trio.move_on_after(_STOP_TIMEOUT):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()

    # Receiving.

    async def _receive_replies(self) -> None:
        """The system task: frames from the fetcher until it exits (then start another)."""
        while not self.fetchers.closing:
            try:
                kind, request, payload = await self._receive_frame()
            except (EOFError, OSError, ValueError, trio.ClosedResourceError) as exc:
                if not self.fetchers.closing:
                    await self._restart(exc)
                return
            try:
                self._dispatch(kind, request, payload)
            except Exception:  # a bug: must not take the server down from a system task
                log.exception("http source %s: handling a fetcher reply failed", self.fetchers.name)

    def _dispatch(self, kind: channel.Kind, request: int, payload: bytearray) -> None:
        if kind is channel.Kind.LOG:
            level, logger, message = channel.parse_log(payload)
            logging.getLogger(logger).log(level, "%s", message)
        elif kind is channel.Kind.DATA:
            lengths, fetched = self.waiting.pop(request)
            view = memoryview(payload)
            parts, start = [], 0
            for length in lengths:
                parts.append(view[start : start + length])
                start += length
            fetched(outcome.Value(parts))
        elif kind is channel.Kind.FAILED:
            message, changed = channel.parse_failed(payload)
            if changed:
                self.fetchers.image_changed(message)
                self._fail(request, ImageChanged(message))
            else:
                self._fail(request, RemoteError(message))

    async def _receive_frame(self) -> tuple[channel.Kind, int, bytes | bytearray]:
        """The next frame: small ones parsed from a buffer that takes several at once, a large
        payload received straight into its own memory."""
        kind, request, length = channel.parse_header(await self._take(channel.HEADER_SIZE))
        if length <= _RECEIVE_SIZE:
            return kind, request, bytes(await self._take(length))
        payload = bytearray(length)
        view = memoryview(payload)
        have = len(self._buffered)
        view[:have] = self._buffered
        self._buffered = self._buffered[:0]
        while have < length:
            have += await self._receive_into(view[have:])
        return kind, request, payload

    async def _take(self, count: int) -> memoryview:
        """The next `count` bytes (at most the buffer's size), valid until the next call."""
        while len(self._buffered) < count:
            kept = len(self._buffered)
            self._buffer[:kept] = bytes(self._buffered)  # the start of a frame
            got = await self._receive_into(memoryview(self._buffer)[kept:])
            self._buffered = memoryview(self._buffer)[: kept + got]
        data, self._buffered = self._buffered[:count], self._buffered[count:]
        return data

    async def _receive_into(self, view: memoryview) -> int:
        # One syscall when data is there; trio is asked to wait only when it is not.
        while True:
            try:
                got = self._socket.recv_into(view)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._socket)
                continue
            if not got:
                raise EOFError
            return got

    async def _restart(self, cause: Exception) -> None:
        name = self.fetchers.name
        log.error("http source %s: a fetcher process stopped (%s); starting another", name,
                  str(cause) or "it exited")
        for request in list(self.waiting):
            self._fail(request, RemoteError(f"{name}: the fetcher process stopped"))
        await self.stop()
        try:
            await self.start()  # a new receiver task takes over
        except RemoteError as exc:
            log.error("http source %s: %s; its fetches fail until the export is reloaded", name, exc.strerror)

    def _fail(self, request: int, error: OSError) -> None:
        _, fetched = self.waiting.pop(request)
        fetched(outcome.Error(error))
