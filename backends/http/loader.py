"""Getting blocks into the cache: shared fetches, batching, and readahead in the background.

A block that is missing gets one `Pending` entry, whoever asks for it, so concurrent reads of the
same block share one fetch, and waiting is only ever on the fetch that brings a needed block. A
read waits through a callback, not a task: `start` calls it on the event loop once the blocks are
in. At most `pool_size` fetches run at once, each in a task of its own and a worker thread. A
fetch takes its batch when its task begins, not when it is spawned, so reads that arrive in the
same burst ride along: adjacent blocks merge into one range, others become extra ranges of the
same request when the server allows it. Python spends far more CPU per request than per range,
so few large requests beat many small ones. With every slot busy, reads just queue: each fetch,
as it ends, starts the next one for what queued meanwhile. Readahead queues behind reads and
uses slots reads leave free.
"""

import logging
from collections.abc import Callable

import outcome
import trio

from .cache import BlockCache
from .readahead import SequentialDetector
from .remote import RemoteImage

log = logging.getLogger(__name__)

MAX_FETCH = 4 * 1024 * 1024  # bytes per request: large enough to amortise its overhead


# Called on the event loop once a read's blocks are in: the blocks, or the error that stopped them.
Arrived = Callable[[list[memoryview] | None, OSError | None], None]


class Pending:
    """A block on its way: the fetch that brings it sets `data` or `error`, then calls `waiters`."""

    __slots__ = ("waiters", "data", "error")

    def __init__(self) -> None:
        self.waiters: list[Callable[[], None]] = []
        self.data: memoryview | None = None
        self.error: OSError | None = None


class _Gather:
    """One read's blocks, some cached, some pending: calls `arrived` once all are in."""

    __slots__ = ("items", "missing", "arrived")

    def __init__(self, items: list, arrived: Arrived) -> None:
        self.items = items  # memoryview or Pending per block
        self.arrived = arrived
        self.missing = 0
        for item in items:
            if isinstance(item, Pending):
                self.missing += 1
                item.waiters.append(self.one_in)

    def one_in(self) -> None:
        self.missing -= 1
        if self.missing:
            return
        blocks = []
        for item in self.items:
            if isinstance(item, Pending):
                if item.error is not None:
                    self.arrived(None, item.error)
                    return
                item = item.data
            blocks.append(item)
        self.arrived(blocks, None)


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
        self._fetching = 0  # fetches in flight, or spawned and about to take their batch
        self._fetch_starting = False  # a fetch is spawned but has not taken its batch yet
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

    def start(self, first: int, last: int, arrived: Arrived) -> None:
        """Get blocks first..last, fetching what is not cached; `arrived` gets them (it may run
        before this returns)."""
        items: list[memoryview | Pending] = []
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
            items.append(data)
        if _Gather(items, arrived).missing:
            self._start_fetches()
        else:
            arrived(items, None)  # all cached

    async def load(self, first: int, last: int) -> list[memoryview]:
        """Blocks first..last, fetching what is not cached."""
        task = trio.lowlevel.current_task()
        waiting = False
        at_once: outcome.Outcome | None = None

        def arrived(blocks: list[memoryview] | None, error: OSError | None) -> None:
            nonlocal at_once
            result = outcome.Value(blocks) if error is None else outcome.Error(error)
            if waiting:
                trio.lowlevel.reschedule(task, result)
            else:
                at_once = result

        def abort(_raise_cancel) -> trio.lowlevel.Abort:
            nonlocal waiting
            waiting = False  # the fetch goes on for the other reads of these blocks
            return trio.lowlevel.Abort.SUCCEEDED

        self.start(first, last, arrived)
        if at_once is None:
            waiting = True
            return await trio.lowlevel.wait_task_rescheduled(abort)
        return at_once.unwrap()

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
        """Start a fetch, in a task of its own, if a slot is free and blocks queue. A fetch that
        has not begun yet takes whatever queues meanwhile, so one such is enough."""
        if (not self._fetch_starting and self._fetching < self.pool_size and (self._queue or self._ahead)
                and not self.closed):
            self._fetching += 1
            self._fetch_starting = True
            trio.lowlevel.spawn_system_task(self._fetch_in_background, name="http fetch")

    async def _fetch_in_background(self) -> None:
        try:
            self._fetch_starting = False
            batch = self._take_batch()
            self._start_fetches()  # for what did not fit in the batch
            await self._fetch(batch)
        except Exception:  # a bug: must not take the server down from a system task
            log.exception("http source %s: fetch failed", self.remote.name)
        finally:
            self._fetching -= 1
            self._start_fetches()

    def _take_batch(self) -> list[int]:
        """Queued blocks for one request, oldest first; readahead (one run) only when no read
        waits."""
        if not self._queue:
            return self._queued_run(self._ahead, next(iter(self._ahead)), self._max_blocks)
        batch: list[int] = []
        runs = 0
        while self._queue and runs < self.remote.max_ranges and len(batch) < self._max_blocks:
            batch.extend(self._queued_run(self._queue, next(iter(self._queue)), self._max_blocks - len(batch)))
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
            runs = await trio.to_thread.run_sync(self._fetch_runs, batch)
        except OSError as exc:
            for index in batch:
                self._settle(index, None, exc)
            return
        for first, data in runs:
            self.cache.put(first, data)
            view = memoryview(data)
            for start in range(0, len(data), self.block_size):
                self._settle(first + start // self.block_size, view[start : start + self.block_size], None)

    def _settle(self, index: int, data: memoryview | None, error: OSError | None) -> None:
        pending = self._pending.pop(index)
        pending.data, pending.error = data, error
        waiters, pending.waiters = pending.waiters, []  # waiters refer back: break the cycle
        for waiter in waiters:
            waiter()

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
