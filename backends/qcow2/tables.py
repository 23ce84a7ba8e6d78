"""Metadata tables held in memory: one cluster each (L2 tables, refcount blocks), with the range
that changed since it was last written, and an LRU cache of them.

Tables keep their on-disk bytes, so looking up an entry is one struct call and writing a table back
is a slice: nothing is decoded or encoded on the I/O path.
"""

import struct
from collections import OrderedDict

_U64 = struct.Struct(">Q")


class Table:
    """One cluster of metadata at `offset` in the image file."""

    __slots__ = ("offset", "data", "dirty_start", "dirty_end")

    def __init__(self, offset: int, data: bytearray) -> None:
        self.offset = offset
        self.data = data
        self.dirty_start = len(data)
        self.dirty_end = 0

    @property
    def dirty(self) -> bool:
        return self.dirty_end > self.dirty_start

    def mark(self, start: int, end: int) -> None:
        self.dirty_start = min(self.dirty_start, start)
        self.dirty_end = max(self.dirty_end, end)

    def mark_all(self) -> None:
        self.mark(0, len(self.data))

    def clean(self) -> None:
        self.dirty_start, self.dirty_end = len(self.data), 0

    def u64(self, index: int) -> int:
        return _U64.unpack_from(self.data, index * 8)[0]

    def set_u64(self, index: int, value: int) -> None:
        _U64.pack_into(self.data, index * 8, value)
        self.mark(index * 8, index * 8 + 8)


class TableCache:
    """Least recently used tables by offset; the owner decides how a dirty table leaves."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(capacity, 2)
        self._tables: OrderedDict[int, Table] = OrderedDict()

    def get(self, offset: int) -> Table | None:
        table = self._tables.get(offset)
        if table is not None:
            self._tables.move_to_end(offset)
        return table

    def put(self, table: Table) -> None:
        self._tables[table.offset] = table

    def full(self) -> bool:
        return len(self._tables) >= self.capacity

    def victim(self) -> Table:
        """The least recently used table, clean ones first."""
        for table in self._tables.values():
            if not table.dirty:
                return table
        return next(iter(self._tables.values()))

    def drop(self, offset: int) -> None:
        self._tables.pop(offset, None)

    def dirty(self) -> list[Table]:
        return sorted((t for t in self._tables.values() if t.dirty), key=lambda t: t.offset)


class RefcountCodec:
    """Reads and writes entries of `1 << order` bits in a refcount block."""

    def __init__(self, order: int) -> None:
        self.bits = 1 << order
        self.max = (1 << self.bits) - 1
        if self.bits >= 8:
            self._struct = struct.Struct({8: ">B", 16: ">H", 32: ">I", 64: ">Q"}[self.bits])
            self._width = self.bits // 8

    def get(self, table: Table, index: int) -> int:
        if self.bits >= 8:
            return self._struct.unpack_from(table.data, index * self._width)[0]
        bit = index * self.bits
        return table.data[bit >> 3] >> (bit & 7) & self.max

    def set(self, table: Table, index: int, value: int) -> None:
        if self.bits >= 8:
            self._struct.pack_into(table.data, index * self._width, value)
            table.mark(index * self._width, (index + 1) * self._width)
            return
        bit = index * self.bits
        byte = bit >> 3
        shift = bit & 7
        table.data[byte] = table.data[byte] & ~(self.max << shift) & 0xFF | value << shift
        table.mark(byte, byte + 1)
