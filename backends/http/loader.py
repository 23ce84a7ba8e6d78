"""Getting blocks into the cache: shared fetches, batching, and readahead in the background.

A block that is missing gets one `Pending` entry, whoever asks for it, so concurrent reads of the
same block share one fetch, and waiting is only ever on the fetch that brings a needed block. At
most `pool_size` fetches run at once, each in a worker thread. A read whose blocks are queued
fetches them itself if a slot is free, together with whatever else is queued: adjacent blocks merge
into one range, others ride along as extra ranges of the same request when the server allows it.
With every slot busy it just waits: each fetch, as it ends, starts the next one for what has
queued meanwhile (in a task of its own, so its reader is not held up). Readahead queues behind
reads and uses slots reads leave free.
"""

import logging
from itertools import chain

import trio

from .cache import BlockCache
from .readahead import SequentialDetector
from .remote import RemoteImage

log = logging.getLogger(__name__)

MAX_FETCH = 4 * 1024 * 1024  # bytes per request: large enough to amortise its overhead


class Pending:
    """A block on its way: the fetch that brings it sets `done`, then `data` or `error`."""

    __slots__ = ("done", "data", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.data: memoryview | None = None
        self.error: OSError | None = None


class BlockLoader:
    def __init__(self, remote: RemoteImage, cache: BlockCache, block_size: int, readahead: int,
                 pool_size: int) -> None:
        self.remote = remote
        self.cache = cache
        self.block_size = block_size
        self.block_count = -(-remote.size // block_size)
        self.pool_size = pool_size
        self._pending: dict[int, Pending] = {}  # blocks being fetched or queued for a fetch
        # Pending blocks no fetch has taken yet, oldest first: for reads, and for readahead.
        self._queue: dict[int, None] = {}
        self._ahead: dict[int, None] = {}
        self._fetching = 0  # fetches in flight
        self._threads = trio.CapacityLimiter(pool_size)
        self._max_blocks = max(1, MAX_FETCH // block_size)
        self._detector = SequentialDetector(readahead // block_size, block_size)
        self.closed = False

    def cached(self, first: int, last: int) -> list[memoryview] | None:
        """The blocks if all are cached (no waiting, no side effects otherwise)."""
        blocks = []
        for index in range(first, last + 1):
            data = self.cache.get(index)
            if data is None:
                return None
            blocks.append(data)
        return blocks

    async def load(self, first: int, last: int) -> list[memoryview]:
        """Blocks first..last, fetching what is not cached."""
        found: list[memoryview | Pending] = []
        wanted = []
        for index in range(first, last + 1):
            data = self.cache.get(index)
            if data is None:
                data = self._pending.get(index)
                if data is None:
                    data = self._pending[index] = Pending()
                    self._queue[index] = None
                elif index in self._ahead:  # readahead not started yet: a read needs it now
                    del self._ahead[index]
                    self._queue[index] = None
                if index in self._queue:
                    wanted.append(index)
            found.append(data)
        if wanted and self._fetching < self.pool_size:
            self._fetching += 1
            try:
                await self._fetch(self._take_batch(wanted))
            finally:
                self._fetching -= 1
                self._start_fetches()
        blocks = []
        for item in found:
            if isinstance(item, Pending):
                await item.done.wait()
                if item.error is not None:
                    raise item.error
                item = item.data
            blocks.append(item)
        return blocks

    def after_read(self, offset: int, length: int) -> None:
        """Queue reading ahead of a sequential stream."""
        window = self._detector.observe(offset, length)
        if window is None:
            return
        start, end = window[0], min(window[1], self.block_count - 1)
        for index in range(start, end + 1):
            if index not in self._pending and index not in self.cache:
                self._pending[index] = Pending()
                self._ahead[index] = None
        self._start_fetches()

    def _start_fetches(self) -> None:
        """Fetch what is queued, in tasks of their own, while slots are free."""
        while self._fetching < self.pool_size and (self._queue or self._ahead) and not self.closed:
            self._fetching += 1
            trio.lowlevel.spawn_system_task(self._fetch_in_background, self._take_batch([]),
                                            name="http fetch")

    async def _fetch_in_background(self, batch: list[int]) -> None:
        try:
            await self._fetch(batch)
        except Exception:  # a bug: must not take the server down from a system task
            log.exception("http source %s: fetch failed", self.remote.name)
        finally:
            self._fetching -= 1
            self._start_fetches()

    def _take_batch(self, wanted: list[int]) -> list[int]:
        """Queued blocks for one request: the caller's first, then the oldest others; readahead
        (one run) only when no read waits."""
        if not self._queue:
            return self._queued_run(self._ahead, next(iter(self._ahead)), self._max_blocks)
        batch: list[int] = []
        runs = 0
        for index in chain(wanted, list(self._queue)):
            if index not in self._queue:
                continue
            if runs == self.remote.max_ranges or len(batch) == self._max_blocks:
                break
            batch.extend(self._queued_run(self._queue, index, self._max_blocks - len(batch)))
            runs += 1
        return batch

    @staticmethod
    def _queued_run(queue: dict[int, None], index: int, limit: int) -> list[int]:
        """Take from `queue` the blocks contiguous with `index`, at most `limit` of them."""
        start = index
        while start - 1 in queue and index - start + 1 < limit:
            start -= 1
        end = index
        while end + 1 in queue and end - start + 1 < limit:
            end += 1
        for member in range(start, end + 1):
            del queue[member]
        return list(range(start, end + 1))

    async def _fetch(self, batch: list[int]) -> None:
        try:
            runs = await trio.to_thread.run_sync(self._fetch_runs, batch, limiter=self._threads)
        except OSError as exc:
            for index in batch:
                self._settle(index, None, exc)
            return
        except BaseException:
            # Cancelled before the request went out: other reads may be waiting for these blocks.
            for index in batch:
                self._queue[index] = None
            raise
        for first, data in runs:
            self.cache.put(first, data)
            view = memoryview(data)
            for start in range(0, len(data), self.block_size):
                self._settle(first + start // self.block_size, view[start : start + self.block_size], None)

    def _settle(self, index: int, data: memoryview | None, error: OSError | None) -> None:
        pending = self._pending.pop(index)
        pending.data, pending.error = data, error
        pending.done.set()

    def _fetch_runs(self, batch: list[int]) -> list[tuple[int, bytes]]:
        """In a worker thread: one request for the batch; (first block, bytes) per run of blocks."""
        runs: list[list[int]] = []
        for index in sorted(batch):
            if runs and runs[-1][1] == index - 1:
                runs[-1][1] = index
            else:
                runs.append([index, index])
        size, block = self.remote.size, self.block_size
        ranges = [(first * block, min((last + 1) * block, size) - first * block) for first, last in runs]
        data = self.remote.fetch(ranges)
        if len(runs) == 1:
            return [(runs[0][0], data[0])]  # the reply body itself, not copied
        # Parts of one body: copies, so a cached run does not keep the whole body alive.
        return [(first, bytes(view)) for (first, _), view in zip(runs, data)]
