"""The http backend: a read-only image behind a URL, served from a block cache.

Reads whose blocks are all cached are served inline on the event loop (a thread hop costs more
than copying a few blocks); the rest wait for the fetches that bring their blocks, without a task
of their own (`start_pread_views`): the fetch's completion replies to them. Cached bytes never
change, so the connection sends them as they lie, with no copy into a reply.
"""

from nbdserve.backend import Capabilities, Views

from .cache import BlockCache
from .config import BLOCK_SIZE, HttpConfig
from .loader import BlockLoader
from .fetchers import Fetchers
from .remote import ImageChanged


class HttpBackend:
    capabilities = Capabilities(
        can_cache=True,  # CACHE prefetches into the block cache
        can_multi_conn=True,  # one cache per export, shared by every connection
    )

    def __init__(self, remote: Fetchers, config: HttpConfig) -> None:
        self.remote = remote
        self.url = config.url  # where relative names (a qcow2 image's backing file) resolve from
        self.cache = BlockCache(config.cache_size, BLOCK_SIZE)
        self.loader = BlockLoader(remote, self.cache, BLOCK_SIZE, config.readahead, config.pool_size)

    def get_size(self) -> int:
        return self.remote.size

    def _blocks_of(self, offset: int, length: int) -> tuple[int, int]:
        if self.remote.changed:
            raise ImageChanged(self.remote.changed)
        return offset // BLOCK_SIZE, (offset + max(length, 1) - 1) // BLOCK_SIZE

    def try_pread(self, buf: memoryview, offset: int) -> bool:
        if self.remote.changed or not len(buf):
            return False  # pread reports it
        first, last = self._blocks_of(offset, len(buf))
        views = self.loader.cached(first, last)
        if views is None:
            return False
        self.loader.after_read(offset, len(buf))
        _copy(views, offset - first * BLOCK_SIZE, buf)
        return True

    def start_pread_views(self, offset: int, length: int, done: Views) -> bool:
        if self.remote.changed or not length:
            return False  # pread reports it
        first, last = self._blocks_of(offset, length)
        self.loader.after_read(offset, length)
        skip = offset - first * BLOCK_SIZE

        def arrived(views: list[memoryview] | None, error: OSError | None) -> None:
            done(error, None if error else _trimmed(views, skip, length))

        self.loader.start(first, last, arrived)
        return True

    async def pread(self, buf: memoryview, offset: int) -> None:
        if self.try_pread(buf, offset) or not len(buf):
            return
        first, last = self._blocks_of(offset, len(buf))
        self.loader.after_read(offset, len(buf))
        _copy(await self.loader.load(first, last), offset - first * BLOCK_SIZE, buf)

    async def cache(self, offset: int, length: int) -> None:
        if length:
            await self.loader.load(*self._blocks_of(offset, length))

    async def flush(self) -> None:
        pass  # nothing is ever written

    async def close(self) -> None:
        self.loader.closed = True
        await self.remote.aclose()


def _trimmed(views: list[memoryview], skip: int, length: int) -> list[memoryview]:
    """The `length` bytes from `skip` on of the consecutive `views`."""
    trimmed = []
    for view in views:
        piece = view[skip : skip + length]
        skip = 0
        trimmed.append(piece)
        length -= len(piece)
    return trimmed


def _copy(views: list[memoryview], skip: int, buf: memoryview) -> None:
    """Fill `buf` from the bytes from `skip` on of the consecutive `views`."""
    position = 0
    for piece in _trimmed(views, skip, len(buf)):
        buf[position : position + len(piece)] = piece
        position += len(piece)
