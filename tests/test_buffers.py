"""The pool of page-aligned buffers for O_DIRECT: size classes, reuse, bounded idle memory."""

import ctypes
import mmap

from nbdserve.buffers import BufferPool, size_class
from nbdserve.malloc import keep_freed_buffers

PAGE = mmap.PAGESIZE
MiB = 1024 * 1024


def address(buffer) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def test_size_classes_are_whole_pages_four_per_doubling():
    assert [size_class(n) for n in (0, 1, PAGE, PAGE + 1, 3 * PAGE, 9 * PAGE)] == \
        [PAGE, PAGE, PAGE, 2 * PAGE, 3 * PAGE, 10 * PAGE]
    assert size_class(MiB) == MiB
    assert size_class(MiB + PAGE) == MiB + MiB // 4  # a 1 MiB read reply with its header page
    assert size_class(2 * MiB - 1) == 2 * MiB


def test_buffers_are_page_aligned_and_reused():
    pool = BufferPool()
    first = pool.take(5000)
    assert len(first) == 2 * PAGE and address(first) % PAGE == 0
    pool.give(first)
    assert pool.idle_bytes == 2 * PAGE
    assert pool.take(8000) is first  # same size class
    assert pool.take(8000) is not first and pool.idle_bytes == 0
    with pool.borrowed(100) as view:
        assert len(view) == 100 and address(view) % PAGE == 0
    assert pool.idle_bytes == PAGE


def test_idle_memory_is_capped_per_class_and_in_total():
    pool = BufferPool(class_idle_bytes=4 * PAGE, total_idle_bytes=6 * PAGE, largest=4 * PAGE)
    small = [pool.take(PAGE) for _ in range(6)]
    for buffer in small:
        pool.give(buffer)
    assert pool.idle_bytes == 4 * PAGE  # the class keeps four pages' worth
    big = [pool.take(4 * PAGE) for _ in range(2)]
    for buffer in big:
        pool.give(buffer)
    # One 4-page buffer is always allowed in its class, but the total would pass 6 pages.
    assert pool.idle_bytes == 4 * PAGE
    [pool.take(PAGE) for _ in range(4)]
    for buffer in big:
        pool.give(buffer)
    assert pool.idle_bytes == 4 * PAGE  # one kept: a class keeps at least one buffer
    huge = pool.take(8 * PAGE)
    pool.give(huge)  # larger than `largest`: never kept
    assert pool.idle_bytes == 4 * PAGE
    assert pool.take(8 * PAGE) is not huge


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def test_large_buffers_come_from_the_heap_once_malloc_is_tuned():
    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = _Mallinfo2
    assert keep_freed_buffers()
    mapped = mallinfo2().hblks
    buffers = [bytearray(4 << 20) for _ in range(4)]  # fetched bodies, payloads
    assert mallinfo2().hblks == mapped  # none got a mapping of its own
    del buffers
