"""Keeping freed large buffers for reuse: glibc malloc's thresholds, for the whole process.

By default glibc maps each large allocation (a fetched body of MiBs) afresh, faults its pages in
one by one, and gives freed memory back to the kernel as soon as a little sits free, often from
a thread's arena whose pages are then faulted in again. Copying a whole remote image spent a
fifth of its CPU so. With allocations up to REUSED_UP_TO served from the heap and up to KEPT_FREE
of free memory kept per arena, freed buffers are reused as they are. Backends that allocate such
buffers all the time turn it on (http); for 1 MiB write payloads it measured a little slower
than glibc's own adaptive thresholds, so it is not the default.
"""

import ctypes
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
REUSED_UP_TO = 32 * 1024 * 1024  # glibc's own upper bound for its dynamic threshold
KEPT_FREE = 64 * 1024 * 1024


def keep_freed_buffers() -> bool:
    """Tune malloc as above; False where the C library is not glibc (nothing changes)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        log.debug("no mallopt in this C library: malloc keeps its defaults")
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, REUSED_UP_TO)) and bool(mallopt(_M_TRIM_THRESHOLD, KEPT_FREE))
