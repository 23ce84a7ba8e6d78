"""A byte-bounded cache of the image, least recently used dropped first.

It holds runs of consecutive blocks exactly as they were fetched, so a fetched buffer is stored
without being copied again and the memory it holds is counted exactly; a block is found through
an index of the run holding it.
"""

from collections import OrderedDict


class BlockCache:
    def __init__(self, capacity: int, block_size: int) -> None:
        self.capacity = capacity
        self.block_size = block_size
        self.used = 0
        self._runs: OrderedDict[int, bytes] = OrderedDict()  # first block -> its run's bytes
        self._run_of: dict[int, int] = {}  # block -> first block of the run holding it

    def __contains__(self, index: int) -> bool:
        return index in self._run_of

    def get(self, index: int) -> memoryview | None:
        first = self._run_of.get(index)
        if first is None:
            return None
        self._runs.move_to_end(first)
        start = (index - first) * self.block_size
        return memoryview(self._runs[first])[start : start + self.block_size]

    def put(self, first: int, data: bytes) -> None:
        """Cache `data`, the blocks from `first` on (the last one may be short)."""
        if len(data) > self.capacity or first in self._runs:
            return
        self._runs[first] = data
        self.used += len(data)
        for index in range(first, first + -(-len(data) // self.block_size)):
            self._run_of[index] = first
        while self.used > self.capacity:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        first, data = self._runs.popitem(last=False)
        self.used -= len(data)
        for index in range(first, first + -(-len(data) // self.block_size)):
            if self._run_of.get(index) == first:
                del self._run_of[index]
