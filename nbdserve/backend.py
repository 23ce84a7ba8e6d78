"""The backend contract: what every storage backend and format driver implements.

The callbacks are nbdkit's (get_size, pread, pwrite, flush, trim, zero, extents, cache, close),
async so that each backend decides how to avoid blocking the event loop. Offsets and lengths are
bytes. A backend implements what it supports natively and says so in its `Capabilities`; the
export layer checks every request before it gets here and emulates the rest (zero as writes of
zeroes, FUA as a flush after the write).

Errors: raise OSError (or `BackendError`) with an errno; the export maps it to an NBD error.
"""

import errno
from dataclasses import dataclass
from enum import Enum
from collections.abc import Callable
from typing import Protocol

from .protocol.constants import MAX_PAYLOAD_DEFAULT


class BackendError(OSError):
    """A failure with an errno and a message meant for the log and the client."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)


class WouldBlock(Exception):
    """The request was not done because doing it would block the event loop: redo it through the
    async method (which may use a worker thread)."""


# A started request's outcome, on the event loop: None when done, else an OSError or WouldBlock.
Done = Callable[[Exception | None], None]
# A started read's outcome when the backend lends its own memory: None or the OSError, then the
# bytes as consecutive views (None on error).
Views = Callable[[Exception | None, list[memoryview] | None], None]


def unsupported(what: str) -> BackendError:
    return BackendError(errno.EOPNOTSUPP, f"{what} is not supported by this backend")


class CacheMode(Enum):
    """QEMU's cache modes, with what each means for the host page cache and durability."""

    WRITEBACK = "writeback"
    WRITETHROUGH = "writethrough"
    NONE = "none"
    DIRECTSYNC = "directsync"
    UNSAFE = "unsafe"

    @property
    def direct(self) -> bool:
        """Bypass the host page cache (O_DIRECT)."""
        return self in (CacheMode.NONE, CacheMode.DIRECTSYNC)

    @property
    def sync_writes(self) -> bool:
        """Every write is on stable storage before its reply (O_DSYNC)."""
        return self in (CacheMode.WRITETHROUGH, CacheMode.DIRECTSYNC)

    @property
    def honours_flush(self) -> bool:
        """FLUSH and FUA reach stable storage; `unsafe` acknowledges them without syncing."""
        return self is not CacheMode.UNSAFE


@dataclass(frozen=True)
class OpenOptions:
    read_only: bool = False
    cache: CacheMode = CacheMode.WRITEBACK


@dataclass(frozen=True)
class Capabilities:
    can_write: bool = False
    can_flush: bool = False
    can_fua: bool = False  # native FUA; without it the export flushes after the write
    can_trim: bool = False
    can_zero: bool = False  # native zeroing; without it the export writes zeroes
    can_fast_zero: bool = False  # zeroing is faster than writing, so FAST_ZERO can succeed
    can_extents: bool = False
    can_cache: bool = False  # native prefetch; without it CACHE reads and drops the data
    # Flush on one connection covers writes made on all others, and all connections
    # see the same data: true of a shared file descriptor, false of a per-connection cache.
    can_multi_conn: bool = False
    is_rotational: bool = False
    block_size_min: int = 1
    block_size_preferred: int = 4096
    block_size_max: int = MAX_PAYLOAD_DEFAULT


@dataclass(frozen=True, slots=True)
class Extent:
    length: int
    hole: bool = False  # not allocated in the backing storage
    zero: bool = False  # reads as zeroes


class Backend(Protocol):
    """What a backend provides. Methods a backend's capabilities rule out are never called."""

    capabilities: Capabilities

    def get_size(self) -> int: ...

    async def pread(self, buf: memoryview, offset: int) -> None:
        """Fill all of `buf` with the bytes at `offset`."""

    async def pwrite(self, buf: memoryview | bytes, offset: int, *, fua: bool = False) -> None: ...

    async def flush(self) -> None: ...

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None: ...

    async def zero(
        self, offset: int, length: int, *, may_trim: bool = False, fast: bool = False,
        fua: bool = False,
    ) -> None:
        """Make the range read as zeroes. With `fast`, raise ENOTSUP unless it is quick."""

    async def extents(self, offset: int, length: int) -> list[Extent]:
        """Extents from `offset`, covering at least one byte and at most what is cheap to learn."""

    async def cache(self, offset: int, length: int) -> None: ...

    async def allocation_depths(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Optional, for layered formats (qemu:allocation-depth): consecutive (length, depth)
        from `offset`, depth 0 where no layer has data, 1 for this image, 2 for its backing
        file, and so on. Without it, everything is at depth 1."""

    # Optional fast paths, plain functions called on the event loop: do the whole request
    # without blocking and return True, or return False having changed nothing the async
    # method would not redo. A backend without them always gets the async methods.

    def try_pread(self, buf: memoryview, offset: int) -> bool: ...

    def try_pwrite(self, buf: memoryview | bytes, offset: int) -> bool: ...

    def known_zero(self, offset: int, length: int) -> bool:
        """Whether the range is known, without I/O, to read as zeroes (a structured reply
        then sends a hole instead of the bytes)."""

    # Optional completion-style paths, for I/O the kernel finishes on its own (native AIO):
    # start the request without blocking and return True, then call `done` from the event loop
    # (`done` may run before the call returns); or return False having started nothing. `buf`
    # stays untouched by the caller until `done`. A WouldBlock outcome sends the request to the
    # async method.

    def start_pread(self, buf: memoryview, offset: int, done: Done) -> bool: ...

    def start_pwrite(self, buf: memoryview | bytes, offset: int, fua: bool, done: Done) -> bool: ...

    def start_flush(self, done: Done) -> bool: ...

    def start_pread_views(self, offset: int, length: int, done: Views) -> bool:
        """Like start_pread, for a backend whose data already lies in memory that never changes
        (a cache of a read-only image): `done` gets views of it, sent as they are."""

    async def close(self) -> None: ...
