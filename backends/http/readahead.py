"""Spotting sequential reads, so the blocks after them are fetched before they are asked for.

Several streams may run at once (nbdcopy's workers, a guest reading two files), so the detector
remembers where recent reads ended rather than only the last one. Work is a few dict operations
per read: it runs on the event loop for every request, cache hits included.
"""

from collections import OrderedDict

_RECENT_READS = 64  # read ends remembered, to recognise the next read of a stream
_STREAMS = 16  # readahead frontiers remembered
# Reads in a row that make a stream: random reads rarely land right after two others.
_STREAK = 3


class SequentialDetector:
    def __init__(self, window: int, block_size: int) -> None:
        self.window = window  # blocks to keep fetched ahead of a sequential stream
        self.block_size = block_size
        self._streaks: OrderedDict[int, int] = OrderedDict()  # where a read ended -> reads in a row
        self._frontiers: OrderedDict[int, None] = OrderedDict()  # first block not yet read ahead

    def observe(self, offset: int, length: int) -> tuple[int, int] | None:
        """Note a read; the range of blocks to read ahead now, if any."""
        streak = self._streaks.pop(offset, 0) + 1
        self._streaks[offset + length] = streak
        if len(self._streaks) > _RECENT_READS:
            self._streaks.popitem(last=False)
        if streak < _STREAK or self.window <= 0:
            return None
        last = (offset + length - 1) // self.block_size
        frontier = next((f for f in self._frontiers if last < f <= last + self.window), None)
        if frontier is not None:
            if frontier - last > self.window // 2:
                return None  # still well ahead of the reader
            del self._frontiers[frontier]
        start = frontier if frontier is not None else last + 1
        end = start + self.window - 1
        self._frontiers[end + 1] = None
        while len(self._frontiers) > _STREAMS:
            self._frontiers.popitem(last=False)
        return start, end
