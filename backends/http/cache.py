"""A byte-bounded cache of the image, least recently used dropped first.

It holds runs of consecutive blocks exactly as they were fetched: views of the reply bodies, not
copies. A body holding several runs (a multipart reply) stays in memory while any of them is
cached, so the cache counts each body whole, once, for as long as it holds a run of it. A block is
found through an index of the run holding it, and a read takes one view per run it touches,
however many blocks that run has.
"""

from collections import OrderedDict


class BlockCache:
    def __init__(self, capacity: int, block_size: int) -> None:
        self.capacity = capacity
        self.block_size = block_size
        self.used = 0  # bytes of the bodies runs are views of
        self._runs: OrderedDict[int, memoryview] = OrderedDict()  # first block -> its run's bytes
        self._run_of: dict[int, int] = {}  # block -> first block of the run holding it
        self._runs_in_body: dict[int, int] = {}  # id of a body -> its runs cached

    def cached_among(self, blocks: range) -> set[int]:
        """Which of `blocks` are cached."""
        return self._run_of.keys() & blocks

    def lookup(self, index: int, last: int) -> tuple[memoryview, int] | None:
        """The cached bytes of blocks from `index` on, as far as one run holds them but not
        past `last`, and the block after them; None if block `index` is not cached."""
        first = self._run_of.get(index)
        if first is None:
            return None
        self._runs.move_to_end(first)
        data = self._runs[first]
        size = self.block_size
        end = min(last + 1, first + -(-len(data) // size))
        return data[(index - first) * size : (end - first) * size], end

    def views(self, first: int, last: int) -> list[memoryview] | None:
        """The bytes of blocks first..last, one view per run, if all are cached."""
        views = []
        index = first
        while index <= last:
            hit = self.lookup(index, last)
            if hit is None:
                return None
            view, index = hit
            views.append(view)
        return views

    def put(self, first: int, data: memoryview) -> None:
        """Cache `data` (a view of a reply body), the blocks from `first` on (the last one may
        be short)."""
        body = data.obj
        if len(body) > self.capacity or first in self._runs:
            return
        self._runs[first] = data
        runs = self._runs_in_body.get(id(body), 0)
        if not runs:
            self.used += len(body)
        self._runs_in_body[id(body)] = runs + 1
        self._run_of.update(dict.fromkeys(range(first, first + -(-len(data) // self.block_size)), first))
        while self.used > self.capacity:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        first, data = self._runs.popitem(last=False)
        body = data.obj
        runs = self._runs_in_body.pop(id(body)) - 1
        if runs:
            self._runs_in_body[id(body)] = runs
        else:
            self.used -= len(body)
        run_of = self._run_of
        for index in range(first, first + -(-len(data) // self.block_size)):
            del run_of[index]  # runs never overlap: a block is fetched only when not cached
