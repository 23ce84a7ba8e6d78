"""Getting blocks into the cache: shared fetches, batching, and readahead in the background.

Blocks are small (a page), so a random read fetches little more than it asks for. Missing
blocks are fetched in stretches: a read's missing blocks, or a readahead window, get one
`Pending` entry, whoever asks for them, so concurrent reads of the same blocks share one fetch,
and waiting is only ever on fetches that bring needed blocks. A read waits through a callback,
not a task: `start` calls it on the event loop once its blocks are in.

At most `pool_size` fetches run at once (see `fetchers` for where). A fetch takes its batch once
the event loop is done with the burst of requests that asked for it, so the reads of that burst
ride along: adjacent stretches merge into one range, others become extra ranges of the
same request when the server allows it. Python spends far more CPU per request than per range,
so few large requests beat many small ones: while a fetch is in flight, another starts only once
several reads queue, and each fetch, as it ends, starts the next for whatever queued meanwhile.
Readahead queues behind reads and uses slots reads leave free.
"""

import logging
from collections.abc import Callable
from functools import partial

import outcome
import trio

from .cache import BlockCache
from .fetchers import Fetchers
from .readahead import SequentialDetector

log = logging.getLogger(__name__)

MAX_FETCH = 4 * 1024 * 1024  # bytes per request: large enough to amortise its overhead
# Reads that make another request worth its CPU while a fetch is in flight.
READS_PER_EXTRA_FETCH = 8


# Called on the event loop once a read's blocks are in: views of their bytes, or the error that
# stopped them.
Arrived = Callable[[list[memoryview] | None, OSError | None], None]


class Pending:
    """Blocks first..last on their way: the fetch that brings them sets `data` or `error`, then
    calls `waiters`."""

    __slots__ = ("first", "last", "waiters", "data", "error")

    def __init__(self, first: int, last: int) -> None:
        self.first = first
        self.last = last
        self.waiters: list[Callable[[], None]] = []
        self.data: memoryview | None = None
        self.error: OSError | None = None


class _Gather:
    """One read's bytes, some cached, some pending: calls `arrived` once all are in."""

    __slots__ = ("items", "missing", "arrived", "block_size")

    def __init__(self, items: list, arrived: Arrived, block_size: int) -> None:
        self.items = items  # a view, or (Pending, first block wanted, last block wanted)
        self.arrived = arrived
        self.block_size = block_size
        self.missing = 0
        for item in items:
            if type(item) is tuple:
                self.missing += 1
                item[0].waiters.append(self.one_in)

    def one_in(self) -> None:
        self.missing -= 1
        if self.missing:
            return
        views = []
        size = self.block_size
        for item in self.items:
            if type(item) is tuple:
                pending, first, last = item
                if pending.error is not None:
                    self.arrived(None, pending.error)
                    return
                item = pending.data[(first - pending.first) * size : (last + 1 - pending.first) * size]
            views.append(item)
        self.arrived(views, None)


class BlockLoader:
    def __init__(self, remote: Fetchers, cache: BlockCache, block_size: int, readahead: int,
                 pool_size: int) -> None:
        self.remote = remote
        self.cache = cache
        self.block_size = block_size
        self.block_count = -(-remote.size // block_size)
        self.pool_size = pool_size
        self._pending: dict[int, Pending] = {}  # block -> the Pending bringing it
        # Pendings no fetch has taken yet, oldest first: for reads, and for readahead.
        self._queue: dict[Pending, None] = {}
        self._ahead: dict[Pending, None] = {}
        self._fetching = 0  # fetches in flight, or asked for and about to take their batch
        self._fetch_starting = False  # a fetch is asked for but has not taken its batch yet
        self._max_blocks = max(1, MAX_FETCH // block_size)
        self._detector = SequentialDetector(readahead // block_size, block_size)
        self.closed = False

    def cached(self, first: int, last: int) -> list[memoryview] | None:
        """The bytes of blocks first..last if all are cached (no side effects otherwise)."""
        return self.cache.views(first, last)

    def start(self, first: int, last: int, arrived: Arrived) -> None:
        """Get blocks first..last, fetching what is not cached; `arrived` gets their bytes (it
        may run before this returns)."""
        items: list = []
        index = first
        while index <= last:
            hit = self.cache.lookup(index, last)
            if hit is not None:
                view, index = hit
                items.append(view)
                continue
            pending = self._pending.get(index)
            if pending is None:
                pending = self._new_pending(index, last)
                self._queue[pending] = None
            elif pending in self._ahead:  # readahead not started yet: a read needs it now
                del self._ahead[pending]
                self._queue[pending] = None
            end = min(last, pending.last)
            items.append((pending, index, end))
            index = end + 1
        if _Gather(items, arrived, self.block_size).missing:
            self._start_fetches()
        else:
            arrived(items, None)  # all cached

    async def load(self, first: int, last: int) -> list[memoryview]:
        """The bytes of blocks first..last, fetching what is not cached."""
        task = trio.lowlevel.current_task()
        waiting = False
        at_once: outcome.Outcome | None = None

        def arrived(views: list[memoryview] | None, error: OSError | None) -> None:
            nonlocal at_once
            result = outcome.Value(views) if error is None else outcome.Error(error)
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
        index, end = window[0], min(window[1], self.block_count - 1)
        while index <= end:  # over what is on its way or cached a stretch at a time
            pending = self._pending.get(index)
            if pending is not None:
                index = pending.last + 1
                continue
            hit = self.cache.lookup(index, end)
            if hit is not None:
                index = hit[1]
                continue
            pending = self._new_pending(index, min(end, index + self._max_blocks - 1))
            self._ahead[pending] = None
            index = pending.last + 1
        self._start_fetches()

    def _new_pending(self, first: int, limit: int) -> Pending:
        """A Pending for the missing blocks from `first` on, up to `limit`."""
        later = range(first + 1, limit + 1)
        # Set operations scan in C: a readahead window is hundreds of blocks.
        taken = (self._pending.keys() & later) | self.cache.cached_among(later)
        last = min(taken) - 1 if taken else limit
        pending = Pending(first, last)
        self._pending.update(dict.fromkeys(range(first, last + 1), pending))
        return pending

    def _start_fetches(self) -> None:
        """Ask for a fetch if a slot is free and enough waits for it. A fetch that has not begun
        yet takes whatever queues meanwhile, so one such is enough."""
        if self._fetch_starting or self._fetching >= self.pool_size or self.closed:
            return
        if self._queue:
            if self._fetching and len(self._queue) < READS_PER_EXTRA_FETCH:
                return  # the fetch in flight starts the next as it ends
        elif not self._ahead:
            return
        self._fetching += 1
        self._fetch_starting = True
        trio.lowlevel.current_trio_token().run_sync_soon(self._begin_fetch)

    def _begin_fetch(self) -> None:
        """On the event loop, once the burst that asked for a fetch is served: take its batch
        and hand it to the fetchers."""
        self._fetch_starting = False
        runs = _contiguous(self._take_batch())
        self._start_fetches()  # for what did not fit in the batch
        size, block = self.remote.size, self.block_size
        ranges = [(run[0].first * block, min((run[-1].last + 1) * block, size) - run[0].first * block)
                  for run in runs]
        self.remote.fetch(ranges, partial(self._fetched, runs))

    def _fetched(self, runs: list[list[Pending]], result: outcome.Outcome) -> None:
        """On the event loop: hand a fetch's bytes (or its error) to the reads waiting for them,
        then start the next fetch. Raises nothing: that would crash the event loop."""
        self._fetching -= 1
        try:
            self._settle_runs(runs, result)
        except Exception:
            log.exception("http source %s: settling a fetch failed", self.remote.name)
        self._start_fetches()

    def _take_batch(self) -> list[Pending]:
        """Queued Pendings for one request, oldest first; readahead (one window) only when no
        read waits."""
        if not self._queue:
            pending = next(iter(self._ahead))
            del self._ahead[pending]
            return [pending]
        batch: list[Pending] = []
        ranges = blocks = 0
        while self._queue and ranges < self.remote.max_ranges and blocks < self._max_blocks:
            run = self._queued_run(next(iter(self._queue)))
            batch.extend(run)
            ranges += 1
            blocks += run[-1].last + 1 - run[0].first
        return batch

    def _queued_run(self, pending: Pending) -> list[Pending]:
        """Take from the read queue `pending` and the queued Pendings adjacent to it: one range."""
        run = [pending]
        while (before := self._pending.get(run[0].first - 1)) in self._queue:
            run.insert(0, before)
        while (after := self._pending.get(run[-1].last + 1)) in self._queue:
            run.append(after)
        for member in run:
            del self._queue[member]
        return run

    def _settle_runs(self, runs: list[list[Pending]], result: outcome.Outcome) -> None:
        try:
            bodies = result.unwrap()
        except OSError as exc:
            for run in runs:
                for pending in run:
                    self._settle(pending, None, exc)
            return
        size = self.block_size
        for run, data in zip(runs, bodies):
            self.cache.put(run[0].first, data)
            for pending in run:
                start = (pending.first - run[0].first) * size
                self._settle(pending, data[start : start + (pending.last + 1 - pending.first) * size], None)

    def _settle(self, pending: Pending, data: memoryview | None, error: OSError | None) -> None:
        for index in range(pending.first, pending.last + 1):
            del self._pending[index]
        pending.data, pending.error = data, error
        waiters, pending.waiters = pending.waiters, []  # waiters refer back: break the cycle
        for waiter in waiters:
            waiter()


def _contiguous(batch: list[Pending]) -> list[list[Pending]]:
    """The batch's Pendings in order, grouped into runs of adjacent ones."""
    runs: list[list[Pending]] = []
    for pending in sorted(batch, key=lambda pending: pending.first):
        if runs and runs[-1][-1].last + 1 == pending.first:
            runs[-1].append(pending)
        else:
            runs.append([pending])
    return runs
