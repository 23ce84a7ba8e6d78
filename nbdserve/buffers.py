"""Reusable page-aligned buffers for O_DIRECT I/O.

A fresh anonymous mapping per request faults in every page it touches, and unmapping it costs TLB
shootdowns on every CPU running one of our threads. Buffers here are kept for reuse in size
classes (four per doubling, so a 1 MiB reply with its header page wastes a quarter at most), with
a cap on the idle bytes each class keeps and on the total: memory stays bounded however the
request sizes mix. Worker threads of the fallback path take and give buffers too, hence the lock.
"""

import mmap
import threading
from collections.abc import Iterator
from contextlib import contextmanager

PAGE = mmap.PAGESIZE
LARGEST_POOLED = 4 << 20  # larger buffers are rare and their copies dwarf a fresh mapping
CLASS_IDLE_BYTES = 16 << 20  # idle bytes one size class keeps (at least one buffer)
TOTAL_IDLE_BYTES = 64 << 20


def size_class(length: int) -> int:
    """The buffer size that serves `length` bytes: whole pages, four size steps per doubling."""
    size = max(length, PAGE)
    step = max(PAGE, 1 << (size.bit_length() - 3))
    return -(-size // step) * step


def _new_buffer(size: int) -> mmap.mmap:
    # MAP_PRIVATE: a shared anonymous mapping is a shmem file, costly to make and tear down.
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)


class BufferPool:
    def __init__(self, *, class_idle_bytes: int = CLASS_IDLE_BYTES,
                 total_idle_bytes: int = TOTAL_IDLE_BYTES, largest: int = LARGEST_POOLED) -> None:
        self.class_idle_bytes = class_idle_bytes
        self.total_idle_bytes = total_idle_bytes
        self.largest = largest
        self._idle: dict[int, list[mmap.mmap]] = {}
        self._idle_bytes = 0
        self._lock = threading.Lock()

    @property
    def idle_bytes(self) -> int:
        return self._idle_bytes

    def take(self, length: int) -> mmap.mmap:
        """A page-aligned buffer of at least `length` bytes, its contents undefined."""
        size = size_class(length)
        with self._lock:
            idle = self._idle.get(size)
            if idle:
                self._idle_bytes -= size
                return idle.pop()
        return _new_buffer(size)

    def give(self, buffer: mmap.mmap) -> None:
        """Return a buffer from take() once nothing (kernel included) uses it any more."""
        size = len(buffer)
        if size > self.largest:
            return
        with self._lock:
            idle = self._idle.setdefault(size, [])
            kept = len(idle) * size
            if (kept and kept + size > self.class_idle_bytes) or \
                    self._idle_bytes + size > self.total_idle_bytes:
                return  # dropped: the mapping goes when its last view does
            idle.append(buffer)
            self._idle_bytes += size

    @contextmanager
    def borrowed(self, length: int) -> Iterator[memoryview]:
        """A page-aligned view of exactly `length` bytes, back to the pool when the block ends."""
        buffer = self.take(length)
        try:
            yield memoryview(buffer)[:length]
        finally:
            self.give(buffer)


# Shared by every direct export of the process: one set of idle buffers rather than one each.
direct_buffers = BufferPool()
