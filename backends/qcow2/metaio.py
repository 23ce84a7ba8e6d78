"""Metadata I/O on the child: reads and writes aligned to the child's minimum block size, and
write barriers that order one group of metadata writes before the next."""

import trio

from nbdserve.backend import Backend, CacheMode

from .header import corrupt
from .tables import Table


class MetadataIO:
    def __init__(self, child: Backend, cache: CacheMode) -> None:
        self.child = child
        self.align = max(child.capabilities.block_size_min, 1)
        # With O_DSYNC every write is durable when it returns, so the order of the writes is the
        # order on disk; with `unsafe` nothing is promised. Only writeback and none need flushes.
        self.barriers = not cache.sync_writes and cache.honours_flush
        # Bytes past the child's end read as zeroes: files grow as clusters are allocated.
        self.host_end = child.get_size()
        # Tables being written, by offset: one write of a table at a time, so an older copy never
        # lands after a newer one.
        self._writing: dict[int, trio.Event] = {}

    async def read(self, offset: int, length: int) -> bytearray:
        data = bytearray(length)
        await self.read_into(memoryview(data), offset)
        return data

    async def read_table(self, offset: int, cluster_size: int, what: str) -> Table:
        """One cluster of metadata, which the image says is at `offset`."""
        if offset & (cluster_size - 1):
            raise corrupt(f"{what} at unaligned offset {offset:#x}")
        return Table(offset, await self.read(offset, cluster_size))

    async def read_into(self, view: memoryview, offset: int) -> None:
        """Fill `view` from `offset`; what lies past the end of the child reads as zeroes."""
        inside = max(0, min(len(view), self.host_end - offset))
        if inside:
            await self.child.pread(view[:inside], offset)
        if inside < len(view):
            view[inside:] = bytes(len(view) - inside)

    async def write(self, data, offset: int) -> None:
        await self.child.pwrite(data, offset)
        self.host_end = max(self.host_end, offset + len(data))

    async def write_table(self, table: Table) -> bool:
        """Write the changed part of `table`, widened to the child's alignment; False if clean.
        Returns once every change made before the call is on the child, even if a write of the
        table already under way (without the caller's lock) carries it."""
        while (busy := self._writing.get(table.offset)) is not None:
            await busy.wait()
        if not table.dirty:
            return False
        start, end = self._dirty_range(table)
        table.clean()
        self._writing[table.offset] = done = trio.Event()
        try:
            await self.write(bytes(table.data[start:end]), table.offset + start)
        except BaseException:
            table.mark(start, end)
            raise
        finally:
            del self._writing[table.offset]
            done.set()
        return True

    def is_writing(self, table: Table) -> bool:
        return table.offset in self._writing

    def try_write_table(self, table: Table, child_try) -> bool:
        """`write_table` on the event loop through the child's `try_pwrite`; False if it cannot."""
        if self.is_writing(table):
            return False
        start, end = self._dirty_range(table)
        if not child_try(bytes(table.data[start:end]), table.offset + start):
            return False
        table.clean()
        self.host_end = max(self.host_end, table.offset + end)
        return True

    def _dirty_range(self, table: Table) -> tuple[int, int]:
        """The changed bytes of `table`, widened to the child's alignment."""
        start = table.dirty_start - table.dirty_start % self.align
        return start, min(len(table.data), -(-table.dirty_end // self.align) * self.align)

    async def barrier(self) -> None:
        if self.barriers:
            await self.child.flush()
