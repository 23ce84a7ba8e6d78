"""A qcow2 image over a child byte source, as a Backend.

Guest offsets map through the L1 table (in memory) and L2 tables (cached) to host offsets in the
child. Reads and in-place writes of allocated clusters never take a lock and, on a cache hit, never
wait for metadata. Writes that change metadata (allocation, copy-on-write, zero clusters) plan
under `_lock`, write their data outside it, in parallel with others, then record the new L2
entries under the lock again. A cluster being filled is registered in `_filling`, and anyone else
who would change it waits for that.

Nothing a client was told is written may die with the process, so every change of an L2 entry
reaches the child (the page cache, at least) before its reply, in the order that keeps the image
consistent after a host crash at any moment: the new cluster's refcount is durable already (it
comes from a reservation, see refcounts.py), then its data, then the L2 entry. A new L2 table is
written, and a barrier passed, before the L1 entry that points at it. Refcount decrements wait for
`_commit` (on FLUSH; before every reply in writethrough and directsync, and in unsafe, where
barriers cost nothing): barrier, then decrements; a crash before that only leaks clusters.
"""

import errno
from dataclasses import dataclass, field

import trio

from nbdserve.backend import Backend, BackendError, Capabilities, Done, Extent, OpenOptions

from . import header as hdr
from .compression import decompress
from .metaio import MetadataIO
from .refcounts import OFFSET_MASK, Refcounts
from .tables import Table, TableCache

COPIED = 1 << 63
COMPRESSED = 1 << 62
ZERO_FLAG = 1
ALL_ZERO = 0xFFFFFFFF << 32  # extended L2: every subcluster reads as zeroes
SUBCLUSTERS = 32

# What a run of guest bytes maps to.
UNALLOCATED, ZERO, DATA, COMPRESSED_DATA = range(4)

_ZEROES = memoryview(bytes(2 * 1024 * 1024))  # sliced without copying


def _fill_zeroes(view: memoryview) -> None:
    for start in range(0, len(view), len(_ZEROES)):
        part = view[start:start + len(_ZEROES)]
        part[:] = _ZEROES[:len(part)]


@dataclass
class ClusterChange:
    """A cluster whose L2 entry a write changes once its data is on the child."""

    cluster: int
    host: int  # host offset of the cluster
    word: int  # the new L2 entry
    bitmap: int  # the new subcluster bitmap (extended L2)
    release: list = field(default_factory=list)  # (first host cluster, count) no longer referenced
    allocated: bool = False  # `host` was allocated for this write


@dataclass
class Fill:
    """Guest bytes [start, end) written whole at `host`: the request's data plus old contents."""

    start: int
    end: int
    host: int
    fresh: bool  # the host clusters were never written: zero fill need not be written


class Qcow2Image:
    def __init__(self, child: Backend, io: MetadataIO, header: hdr.Header, head: bytearray, l1: Table,
                 backing: Backend | None, options: OpenOptions, l2_tables: int, refcount_tables: int) -> None:
        self.child = child
        self.io = io
        self.header = header
        self._head = head  # the first cluster, for rewriting header fields
        self.l1 = l1
        self.backing = backing
        self.options = options
        self.size = header.size
        self.cluster_bits = cb = header.cluster_bits
        self.cluster_size = 1 << cb
        self.extended = header.extended_l2
        self.entry_words = 2 if self.extended else 1
        self.l2_bits = cb - 3 - (self.entry_words - 1)
        self.l2_mask = (1 << self.l2_bits) - 1
        self.unit_bits = cb - 5 if self.extended else cb  # the unit of allocation state
        compressed_bits = 62 - (cb - 8)
        self._compressed_offset_mask = (1 << compressed_bits) - 1
        self._compressed_shift = compressed_bits
        self._compressed_sectors_mask = (1 << (cb - 8)) - 1
        self.l2_cache = TableCache(l2_tables)
        self.refcounts = Refcounts(io, cb, header.refcount_order,
                                   Table(header.refcount_table_offset, bytearray()), refcount_tables,
                                   self._move_refcount_table, self._refcount_barrier)
        self.writable = not options.read_only and child.capabilities.can_write
        self._sync = options.cache.sync_writes
        self._lazy = bool(header.compatible & hdr.COMPAT_LAZY_REFCOUNTS) and header.version == 3
        self._lock = trio.Lock()
        self._filling: dict[int, trio.Event] = {}
        self._active = 0  # data requests in flight, for the refcount quarantine
        writable = self.writable
        self.capabilities = Capabilities(
            can_write=writable,
            can_flush=writable,
            can_trim=writable,
            can_zero=writable,
            can_fast_zero=writable,
            can_extents=True,
            can_multi_conn=True,  # one image object, caches included, serves every connection
            block_size_min=child.capabilities.block_size_min,
            block_size_preferred=max(4096, child.capabilities.block_size_preferred),
            block_size_max=child.capabilities.block_size_max,
        )

    def get_size(self) -> int:
        return self.size

    @property
    def _refcounts_may_lag(self) -> bool:
        """With lazy refcounts and the dirty bit on disk, a crash is repaired at the next open, so
        refcounts need not reach the disk before the L2 entries that use them."""
        return self._lazy and bool(self.header.incompatible & hdr.INCOMPAT_DIRTY)

    async def _refcount_barrier(self) -> None:
        if not self._refcounts_may_lag:
            await self.io.barrier()

    # The header.

    async def _write_header(self) -> None:
        length = -(-hdr.V3_HEADER_LENGTH // self.io.align) * self.io.align
        await self.io.write(bytes(self._head[:min(length, len(self._head))]), 0)
        await self.io.barrier()

    async def set_incompatible(self, bit: int, on: bool) -> None:
        value = self.header.incompatible | bit if on else self.header.incompatible & ~bit
        if value != self.header.incompatible:
            self.header.incompatible = value
            self._head[hdr.OFFSET_INCOMPAT:hdr.OFFSET_INCOMPAT + 8] = value.to_bytes(8, "big")
            await self._write_header()

    async def clear_autoclear(self) -> None:
        """nbdserve keeps no bitmaps up to date, so the bits saying they are valid must go."""
        self.header.autoclear = 0
        self._head[hdr.OFFSET_AUTOCLEAR:hdr.OFFSET_AUTOCLEAR + 8] = bytes(8)
        await self._write_header()

    async def _move_refcount_table(self, offset: int, clusters: int) -> None:
        at = hdr.OFFSET_REFCOUNT_TABLE
        self._head[at:at + 12] = offset.to_bytes(8, "big") + clusters.to_bytes(4, "big")
        await self._write_header()

    # L2 tables and entries.

    def _cached_entry(self, cluster: int) -> tuple[int, int] | None:
        """The L2 entry and subcluster bitmap of a guest cluster, or None if its table is not cached."""
        l2_offset = self.l1.u64(cluster >> self.l2_bits) & OFFSET_MASK
        if not l2_offset:
            return 0, 0
        table = self.l2_cache.get(l2_offset)
        if table is None:
            return None
        index = (cluster & self.l2_mask) * self.entry_words
        if self.extended:
            return table.u64(index), table.u64(index + 1)
        return table.u64(index), 0

    async def _entry(self, cluster: int) -> tuple[int, int]:
        entry = self._cached_entry(cluster)
        if entry is None:
            async with self._lock:
                await self._l2_table(cluster >> self.l2_bits)
                entry = self._cached_entry(cluster)
        return entry

    async def _l2_table(self, l1_index: int, *, create: bool = False) -> Table | None:
        """The L2 table of `l1_index` (lock held), allocated if `create` and there is none."""
        offset = self.l1.u64(l1_index) & OFFSET_MASK
        if not offset:
            if not create:
                return None
            start, _, _ = await self.refcounts.allocate(1)
            table = Table(start << self.cluster_bits, bytearray(self.cluster_size))
            await self.io.write(bytes(table.data), table.offset)
            await self.io.barrier()  # the empty table before the L1 entry that points at it
            await self._cache_l2(table)
            self.l1.set_u64(l1_index, table.offset | COPIED)
            await self.io.write_table(self.l1)
            return table
        table = self.l2_cache.get(offset)
        if table is None:
            table = await self.io.read_table(offset, self.cluster_size, "L2 table")
            await self._cache_l2(table)
        return table

    async def _cache_l2(self, table: Table) -> None:
        while self.l2_cache.full():
            victim = self.l2_cache.victim()
            if victim.dirty:
                # The refcounts of what the table points at go first.
                if await self.refcounts.write_dirty() and not self._refcounts_may_lag:
                    await self.io.barrier()
                await self.io.write_table(victim)
            self.l2_cache.drop(victim.offset)
        self.l2_cache.put(table)

    async def _set_entry(self, cluster: int, word: int, bitmap: int) -> None:
        table = await self._l2_table(cluster >> self.l2_bits, create=True)
        index = (cluster & self.l2_mask) * self.entry_words
        table.set_u64(index, word)
        if self.extended:
            table.set_u64(index + 1, bitmap)

    def _unit(self, word: int, bitmap: int, unit: int) -> tuple[int, int]:
        """(kind, host offset) of one unit (a cluster, or a subcluster with extended L2)."""
        if word & COMPRESSED:
            return COMPRESSED_DATA, word
        host = word & OFFSET_MASK
        if self.extended:
            sub = unit & (SUBCLUSTERS - 1)
            if bitmap >> sub & 1:
                return DATA, host + (sub << self.unit_bits)
            return (ZERO if bitmap >> (SUBCLUSTERS + sub) & 1 else UNALLOCATED), 0
        if word & ZERO_FLAG:
            return ZERO, 0
        return (DATA, host) if host else (UNALLOCATED, 0)

    async def _map(self, pos: int, end: int) -> tuple[int, int, int]:
        """(kind, host offset or compressed descriptor, length) of the run of guest bytes at `pos`."""
        cluster = pos >> self.cluster_bits
        word, bitmap = self._cached_entry(cluster) or await self._entry(cluster)
        return self._map_cached(pos, end, word, bitmap)

    def _map_cached(self, pos: int, end: int, word: int, bitmap: int) -> tuple[int, int, int]:
        """_map, given the entry of the cluster at `pos` (its L2 table is cached, if it has one)."""
        cb, ub = self.cluster_bits, self.unit_bits
        cluster = pos >> cb
        unit = pos >> ub
        kind, host = self._unit(word, bitmap, unit)
        if kind == COMPRESSED_DATA:
            return kind, host, min(end, (cluster + 1) << cb) - pos
        if kind == DATA:
            if word & OFFSET_MASK & (self.cluster_size - 1):
                raise hdr.corrupt(f"data cluster at unaligned offset {word & OFFSET_MASK:#x}")
            host += pos & ((1 << ub) - 1)
        table_end = min(end, ((cluster >> self.l2_bits) + 1) << (self.l2_bits + cb))
        run_end = min(table_end, (unit + 1) << ub)
        while run_end < table_end:
            if run_end >> cb != cluster:
                cluster = run_end >> cb
                word, bitmap = self._cached_entry(cluster) or (0, 0)
            next_kind, next_host = self._unit(word, bitmap, run_end >> ub)
            if next_kind != kind or kind == DATA and next_host != host + run_end - pos:
                break
            run_end = min(table_end, run_end + (1 << ub))
        return kind, host, run_end - pos

    def _compressed_range(self, word: int) -> tuple[int, int]:
        """Host bytes [start, end) of a compressed cluster, in whole 512-byte sectors."""
        offset = word & self._compressed_offset_mask
        sectors = (word >> self._compressed_shift & self._compressed_sectors_mask) + 1
        start = offset & ~511
        return start, start + sectors * 512

    def _references(self, word: int) -> list[tuple[int, int]]:
        """The host clusters an L2 entry holds a reference to."""
        cb = self.cluster_bits
        if word & COMPRESSED:
            start, end = self._compressed_range(word)
            return [(start >> cb, ((end - 1) >> cb) - (start >> cb) + 1)]
        host = word & OFFSET_MASK
        return [(host >> cb, 1)] if host else []

    # Reads.

    async def pread(self, buf: memoryview, offset: int) -> None:
        self._active += 1
        try:
            await self._read(buf, offset)
        finally:
            self._io_done()

    async def _read(self, buf: memoryview, offset: int) -> None:
        pos, end = offset, offset + len(buf)
        while pos < end:
            kind, host, length = await self._map(pos, end)
            view = buf[pos - offset:pos - offset + length]
            if kind == DATA:
                await self.io.read_into(view, host)
            elif kind == ZERO:
                _fill_zeroes(view)
            elif kind == UNALLOCATED:
                await self._read_backing(view, pos)
            else:
                data = await self._decompress(host)
                start = pos & (self.cluster_size - 1)
                view[:] = data[start:start + length]
            pos += length

    async def _read_backing(self, view: memoryview, pos: int) -> None:
        inside = 0
        if self.backing is not None:
            inside = max(0, min(len(view), self.backing.get_size() - pos))
            if inside:
                await self.backing.pread(view[:inside], pos)
        _fill_zeroes(view[inside:])

    async def _decompress(self, word: int) -> bytes:
        start, end = self._compressed_range(word)
        offset = word & self._compressed_offset_mask
        align = self.io.align
        aligned_start = start - start % align
        aligned_end = -(-end // align) * align
        data = await self.io.read(aligned_start, aligned_end - aligned_start)
        return decompress(self.header.compression_type, data[offset - aligned_start:end - aligned_start],
                          self.cluster_size)

    def try_pread(self, buf: memoryview, offset: int) -> bool:
        """Serve a read on the event loop if its tables are cached and its data is in the page cache."""
        child_try = getattr(self.child, "try_pread", None)
        if child_try is None:
            return False
        for run in self._cached_runs(offset, offset + len(buf)):
            if run is None:
                return False
            pos, kind, host, length = run
            view = buf[pos - offset:pos - offset + length]
            if kind == DATA:
                inside = max(0, min(length, self.io.host_end - host))
                if inside and not child_try(view[:inside], host):
                    return False
                _fill_zeroes(view[inside:])
            elif kind == ZERO or kind == UNALLOCATED and self.backing is None:
                _fill_zeroes(view)
            elif kind == UNALLOCATED and getattr(self.backing, "try_pread", None):
                inside = max(0, min(length, self.backing.get_size() - pos))
                if inside and not self.backing.try_pread(view[:inside], pos):
                    return False
                _fill_zeroes(view[inside:])
            else:
                return False
        return True

    def _cached_runs(self, pos: int, end: int):
        """(pos, kind, host, length) of each run in [pos, end) while the tables are cached; then
        None if one is not, or its entry is corrupt (the async path reports that)."""
        while pos < end:
            entry = self._cached_entry(pos >> self.cluster_bits)
            try:
                run = None if entry is None else self._map_cached(pos, end, *entry)
            except OSError:
                run = None
            if run is None:
                yield None
                return
            yield (pos, *run)
            pos += run[2]

    def try_pwrite(self, buf, offset: int) -> bool:
        """Serve a write on the event loop if it changes no metadata and the child can write inline."""
        child_try = getattr(self.child, "try_pwrite", None)
        if child_try is None:
            return False
        runs = self._in_place_runs(offset, len(buf))
        data = memoryview(buf)
        if runs is None:
            return self._try_allocating_write(data, offset, child_try)
        for host, start, length in runs:
            if not child_try(data[start:start + length], host):
                return False
            self.io.host_end = max(self.io.host_end, host + length)
        return True

    def _try_allocating_write(self, data: memoryview, offset: int, child_try) -> bool:
        """A write into clusters that read as zeroes, on the event loop, when nothing needs waiting
        (the lock is free, the tables and the refcount block are cached) and nothing needs copying
        (the new clusters were never written, or the write covers them whole)."""
        if self.extended or self._sync or self._lock.locked() or self.refcounts.wants_refill():
            return False  # (the async path refills the reservation)
        cb = self.cluster_bits
        end = offset + len(data)
        first, last = offset >> cb, (end - 1) >> cb
        if any(first <= cluster <= last for cluster in self._filling):
            return False
        tables = []
        for cluster in range(first, last + 1):
            table = self.l2_cache.get(self.l1.u64(cluster >> self.l2_bits) & OFFSET_MASK)
            if table is None or table.u64(cluster & self.l2_mask) & ~ZERO_FLAG or self.io.is_writing(table):
                return False
            tables.append(table)
        whole = not (offset | end) & (self.cluster_size - 1)
        if not whole and not (self.known_zero(first << cb, offset - (first << cb))
                              and self.known_zero(end, ((last + 1) << cb) - end)):
            return False
        count = last - first + 1
        allocated = self.refcounts.try_allocate(count)
        if allocated is None:
            return False
        start, fresh = allocated
        host = (start << cb) + (offset & (self.cluster_size - 1))
        if not (whole or fresh) or not child_try(data, host):
            self.refcounts.unallocate(start, count, fresh)
            return False
        self.io.host_end = max(self.io.host_end, host + len(data))
        old_words = [table.u64((first + k) & self.l2_mask) for k, table in enumerate(tables)]
        for k, table in enumerate(tables):
            table.set_u64((first + k) & self.l2_mask, ((start + k) << cb) | COPIED)
        if all(self.io.try_write_table(table, child_try) for table in dict.fromkeys(tables)):
            return True
        # The entries must reach the child before the reply: take them back and let the async path
        # write the request again. An entry may have reached the child already, so the clusters are
        # released like any others whose references an L2 change dropped.
        for k, table in enumerate(tables):
            table.set_u64((first + k) & self.l2_mask, old_words[k])
        self.refcounts.release(start, count)
        return False

    def known_zero(self, offset: int, length: int) -> bool:
        """Whether the range reads as zeroes, known from cached tables alone: zero clusters, and
        unallocated ones with no backing data under them."""
        backing_end = self.backing.get_size() if self.backing is not None else 0
        return all(
            run is not None and (run[1] == ZERO or run[1] == UNALLOCATED and run[0] >= backing_end)
            for run in self._cached_runs(offset, offset + length)
        )

    def _io_done(self) -> None:
        self._active -= 1
        if not self._active and self.refcounts.quarantine:
            self.refcounts.end_quarantine()

    # Writes.

    async def pwrite(self, buf, offset: int, *, fua: bool = False) -> None:
        data = memoryview(buf)
        self._active += 1
        try:
            runs = self._in_place_runs(offset, len(data))
            if runs is None:
                await self._write_allocating(data, offset)
            else:
                for host, start, length in runs:
                    await self.io.write(data[start:start + length], host)
        finally:
            self._io_done()

    def _in_place_runs(self, offset: int, length: int) -> list[tuple[int, int, int]] | None:
        """(host, start in request, length) runs if every unit touched is allocated, owned by this
        image alone and its L2 table is cached; None if the write must change metadata."""
        cb, ub = self.cluster_bits, self.unit_bits
        runs: list[list[int]] = []
        pos, end = offset, offset + length
        while pos < end:
            entry = self._cached_entry(pos >> cb)
            if entry is None or not entry[0] & COPIED:
                return None
            kind, host = self._unit(entry[0], entry[1], pos >> ub)
            if kind != DATA:
                return None
            host += pos & ((1 << ub) - 1)
            count = min(end, ((pos >> ub) + 1) << ub) - pos
            if runs and runs[-1][0] + runs[-1][2] == host:
                runs[-1][2] += count
            else:
                runs.append([host, pos - offset, count])
            pos += count
        return [tuple(run) for run in runs]

    async def _write_allocating(self, data: memoryview, offset: int) -> None:
        table_span = 1 << (self.l2_bits + self.cluster_bits)
        pos, end = offset, offset + len(data)
        while pos < end:
            chunk_end = min(end, (pos // table_span + 1) * table_span)
            await self._write_chunk(data[pos - offset:chunk_end - offset], pos)
            pos = chunk_end
        if self.refcounts.wants_refill():
            await self._refill_reservation()

    async def _refill_reservation(self) -> None:
        """Reserve the next batch of clusters while the current one lasts: its barrier runs without
        the lock, so other writes go on meanwhile."""
        async with self._lock:
            if not self.refcounts.wants_refill():
                return
            runs = await self.refcounts.start_refill()
        if runs is None:
            return
        durable = False
        try:
            with trio.CancelScope(shield=True):  # else the refill would stay under way for ever
                await self._refcount_barrier()
                durable = True
        finally:
            self.refcounts.finish_refill(runs, durable)

    async def _acquire(self) -> None:
        """Take the metadata lock; when it is free, without a trip through the scheduler."""
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()

    async def _wait_idle(self, first: int, last: int) -> None:
        """Return with the lock held and no cluster in [first, last] being filled."""
        while True:
            await self._acquire()
            busy = next((e for c, e in self._filling.items() if first <= c <= last), None)
            if busy is None:
                return
            self._lock.release()
            await busy.wait()

    async def _write_chunk(self, data: memoryview, guest: int) -> None:
        """A write within one L2 table that allocates, fills or copies clusters."""
        cb = self.cluster_bits
        first, last = guest >> cb, (guest + len(data) - 1) >> cb
        await self._wait_idle(first, last)
        try:
            in_place, fills, changes = await self._plan(guest, len(data))
        finally:
            self._lock.release()
        try:
            for host, start, length in in_place:
                await self.io.write(data[start:start + length], host)
            for fill in fills:
                await self._write_fill(fill, data, guest)
        except BaseException:
            with trio.CancelScope(shield=True):
                async with self._lock:
                    await self._abandon(changes)
            raise
        with trio.CancelScope(shield=True):
            await self._acquire()
            try:
                for change in changes:
                    await self._set_entry(change.cluster, change.word, change.bitmap)
                    for index, count in change.release:
                        self.refcounts.release(index, count)
                    self._filling.pop(change.cluster).set()
                tables = await self._persist()
            finally:
                self._lock.release()
            await self._write_tables(tables)

    async def _abandon(self, changes: list[ClusterChange]) -> None:
        for change in changes:
            if change.allocated:
                await self.refcounts.adjust(change.host >> self.cluster_bits, -1)
            self._filling.pop(change.cluster).set()

    async def _plan(self, guest: int, length: int):
        """Decide, under the lock, how a write lands: in-place runs, fills and entry changes."""
        cb, ub = self.cluster_bits, self.unit_bits
        cs = self.cluster_size
        end = guest + length
        in_place: list[tuple[int, int, int]] = []
        windows: list[tuple[ClusterChange, int, int]] = []  # (change, window start, end) in guest bytes
        needs_host: list[ClusterChange] = []
        for cluster in range(guest >> cb, ((end - 1) >> cb) + 1):
            base = cluster << cb
            start, stop = max(guest, base), min(end, base + cs)
            table = await self._l2_table(cluster >> self.l2_bits, create=True)
            index = (cluster & self.l2_mask) * self.entry_words
            word = table.u64(index)
            bitmap = table.u64(index + 1) if self.extended else 0
            host = word & OFFSET_MASK
            owned = word & COPIED and not word & COMPRESSED and host
            change = ClusterChange(cluster, host, host | COPIED, 0)
            if not self.extended:
                if owned and not word & ZERO_FLAG:
                    in_place.append((host + start - base, start - guest, stop - start))
                    continue
                window = (base, base + cs)
                if not owned:
                    change.release = self._references(word)
                    needs_host.append(change)
            elif not owned and host or word & COMPRESSED:
                change.bitmap = 0xFFFFFFFF  # copy the whole cluster; every subcluster is allocated
                change.release = self._references(word)
                needs_host.append(change)
                window = (base, base + cs)
            else:
                first_sub, last_sub = (start - base) >> ub, (stop - 1 - base) >> ub
                if owned:
                    missing = [s for s in range(first_sub, last_sub + 1) if not bitmap >> s & 1]
                    if not missing:
                        in_place.append((host + start - base, start - guest, stop - start))
                        continue
                    # Subclusters from the first to the last missing one are written whole (the
                    # allocated ones between them are covered by the request); those around them
                    # are written in place.
                    for lo, hi in ((start, base + (missing[0] << ub)), (base + ((missing[-1] + 1) << ub), stop)):
                        if hi > lo:
                            in_place.append((host + lo - base, lo - guest, hi - lo))
                    first_sub, last_sub = missing[0], missing[-1]
                else:
                    needs_host.append(change)
                mask = ((1 << (last_sub - first_sub + 1)) - 1) << first_sub
                change.bitmap = (bitmap | mask) & ~(mask << SUBCLUSTERS)
                window = (base + (first_sub << ub), base + ((last_sub + 1) << ub))
            windows.append((change, *window))
        # New host clusters, contiguous where the allocator can.
        fresh_of: dict[int, bool] = {}
        index = 0
        try:
            while index < len(needs_host):
                start, count, fresh = await self.refcounts.allocate(len(needs_host) - index)
                for k in range(count):
                    change = needs_host[index + k]
                    change.host = (start + k) << cb
                    change.word = change.host | COPIED
                    change.allocated = True
                    fresh_of[change.cluster] = fresh
                index += count
        except BaseException:
            for change in needs_host[:index]:
                await self.refcounts.adjust(change.host >> cb, -1)
            raise
        changes = []
        fills: list[Fill] = []
        for change, lo, hi in windows:
            self._filling[change.cluster] = trio.Event()
            changes.append(change)
            host = change.host + (lo & (cs - 1))
            fresh = fresh_of.get(change.cluster, False)
            last = fills[-1] if fills else None
            if last and last.end == lo and last.host + (last.end - last.start) == host and last.fresh == fresh:
                last.end = hi
            else:
                fills.append(Fill(lo, hi, host, fresh))
        return in_place, fills, changes

    async def _write_fill(self, fill: Fill, data: memoryview, guest: int) -> None:
        """Write the window: old contents around the request's bytes."""
        lo, hi = max(fill.start, guest), min(fill.end, guest + len(data))
        middle = data[lo - guest:hi - guest]
        if fill.fresh and await self._reads_zero(fill.start, lo) and await self._reads_zero(hi, fill.end):
            await self.io.write(middle, fill.host + lo - fill.start)  # the rest reads as zeroes already
            return
        head = bytearray(lo - fill.start)
        tail = bytearray(fill.end - hi)
        if head:
            await self._read(memoryview(head), fill.start)
        if tail:
            await self._read(memoryview(tail), hi)
        if not head and not tail:
            await self.io.write(middle, fill.host)
        else:
            await self.io.write(b"".join((head, middle, tail)), fill.host)

    # Zeroes and discards.

    async def zero(self, offset: int, length: int, *, may_trim: bool = False, fast: bool = False,
                   fua: bool = False) -> None:
        await self._discard(offset, length, zero=True, may_trim=may_trim, fast=fast)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self._discard(offset, length, zero=False, may_trim=True, fast=False)

    async def _discard(self, offset: int, length: int, *, zero: bool, may_trim: bool, fast: bool) -> None:
        # Whole units change metadata only; partial units of a zero request are written.
        unit = 1 << (self.unit_bits if zero else self.cluster_bits)
        end = offset + length
        inner_start = min(end, -(-offset // unit) * unit)
        inner_end = max(inner_start, end // unit * unit)
        if zero:
            for lo, hi in ((offset, inner_start), (inner_end, end)):
                if hi > lo:
                    await self._write_zeroes(lo, hi, fast)
        table_span = 1 << (self.l2_bits + self.cluster_bits)
        pos = inner_start
        while pos < inner_end:
            chunk_end = min(inner_end, (pos // table_span + 1) * table_span)
            rewrite = await self._discard_chunk(pos, chunk_end, zero, may_trim)
            for lo, hi in rewrite:
                await self._write_zeroes(lo, hi, fast)
            pos = chunk_end

    async def _write_zeroes(self, lo: int, hi: int, fast: bool) -> None:
        if await self._reads_zero(lo, hi):
            return
        if fast:
            raise BackendError(errno.EOPNOTSUPP, "zeroing this range needs writing data")
        for start in range(lo, hi, len(_ZEROES)):
            await self.pwrite(_ZEROES[:min(len(_ZEROES), hi - start)], start)

    async def _reads_zero(self, lo: int, hi: int) -> bool:
        pos = lo
        while pos < hi:
            kind, _, length = await self._map(pos, hi)
            if kind in (DATA, COMPRESSED_DATA):
                return False
            if kind == UNALLOCATED and self.backing is not None and pos < self.backing.get_size():
                return False
            pos += length
        return True

    async def _discard_chunk(self, start: int, end: int, zero: bool, may_trim: bool) -> list[tuple[int, int]]:
        """Change the entries of whole units in [start, end) (one L2 table); returns the ranges
        that can only be zeroed by writing."""
        cb, ub = self.cluster_bits, self.unit_bits
        rewrite: list[tuple[int, int]] = []
        await self._wait_idle(start >> cb, (end - 1) >> cb)
        try:
            l1_index = start >> (cb + self.l2_bits)
            table = await self._l2_table(l1_index)
            for cluster in range(start >> cb, ((end - 1) >> cb) + 1):
                base = cluster << cb
                lo, hi = max(start, base), min(end, base + self.cluster_size)
                word, bitmap = self._cached_entry(cluster) if table else (0, 0)
                if not zero and self.header.version == 2 and self.backing is not None:
                    continue  # v2 cannot hide the backing file without writing: TRIM is a hint
                whole = hi - lo == self.cluster_size
                if not word and not bitmap and self.backing is None and (zero or whole):
                    continue  # unallocated already reads as zeroes
                if not whole:
                    if word & COMPRESSED:
                        rewrite.append((lo, hi))
                        continue
                    mask = ((1 << ((hi - lo) >> ub)) - 1) << ((lo - base) >> ub)
                    new = word, (bitmap & ~mask) | (mask << SUBCLUSTERS)
                else:
                    new = self._discarded(word, zero, may_trim)
                    if new is None:
                        rewrite.append((lo, hi))
                        continue
                if new == (word, bitmap):
                    continue
                if new[0] & OFFSET_MASK != word & OFFSET_MASK or word & COMPRESSED:
                    for index, count in self._references(word):
                        self.refcounts.release(index, count)
                await self._set_entry(cluster, *new)
            await self._write_tables(await self._persist())
        finally:
            self._lock.release()
        return rewrite

    def _discarded(self, word: int, zero: bool, may_trim: bool) -> tuple[int, int] | None:
        """The entry of a whole cluster after zeroing or trimming; None if it must be written."""
        host = word & OFFSET_MASK
        keep = zero and not may_trim and host and word & COPIED and not word & COMPRESSED
        reads_zero = zero or self.backing is not None  # an unallocated cluster would show the backing
        if self.extended:
            return (host | COPIED if keep else 0), (ALL_ZERO if reads_zero else 0)
        if self.header.version == 2:
            if self.backing is None:
                return 0, 0
            return None
        if not reads_zero:
            return 0, 0
        return (host | COPIED | ZERO_FLAG if keep else ZERO_FLAG), 0

    # Block status.

    async def _table_runs(self, offset: int, length: int) -> list[tuple[int, int, int, int]]:
        """(pos, kind, host, count) of the runs from `offset`, up to the end of its L2 table's
        span: what one block status call looks at."""
        table_span = 1 << (self.l2_bits + self.cluster_bits)
        end = min(offset + length, self.size, (offset // table_span + 1) * table_span)
        runs = []
        pos = offset
        while pos < end:
            kind, host, count = await self._map(pos, end)
            runs.append((pos, kind, host, count))
            pos += count
        return runs

    async def extents(self, offset: int, length: int) -> list[Extent]:
        result = []
        for pos, kind, host, count in await self._table_runs(offset, length):
            if kind == UNALLOCATED:
                result.extend(await self._backing_extents(pos, count))
            elif kind == DATA:
                result.extend(await self._host_extents(host, count))
            else:
                result.append(Extent(count, hole=kind == ZERO, zero=kind == ZERO))
        return result

    async def allocation_depths(self, offset: int, length: int) -> list[tuple[int, int]]:
        """qemu:allocation-depth: 1 where this image has the clusters (data or zero), the
        backing chain's depth plus one where it does not, 0 where no layer has them."""
        result = []
        for pos, kind, _, count in await self._table_runs(offset, length):
            result.extend(await self._backing_depths(pos, count) if kind == UNALLOCATED else [(count, 1)])
        return result

    async def _backing_depths(self, pos: int, count: int) -> list[tuple[int, int]]:
        if self.backing is None:
            return [(count, 0)]
        inside = max(0, min(count, self.backing.get_size() - pos))
        result = [(size, depth + 1 if depth else 0) for size, depth in await _depths_of(self.backing, pos, inside)]
        if count > inside:
            # Past a short backing file, its layer makes up the zeroes: they count as its own,
            # as QEMU reports them.
            result.append((count - inside, 2))
        return result

    async def _host_extents(self, host: int, count: int) -> list[Extent]:
        """Allocated data, which reads as zeroes where the child has a hole (as QEMU reports it)."""
        inside = max(0, min(count, self.io.host_end - host))
        result = [Extent(e.length, zero=e.zero) for e in await _extents_of(self.child, host, inside)]
        if count > inside:
            result.append(Extent(count - inside))  # past the end of the file: QEMU says data
        return result

    async def _backing_extents(self, pos: int, count: int) -> list[Extent]:
        inside = 0 if self.backing is None else max(0, min(count, self.backing.get_size() - pos))
        result = await _extents_of(self.backing, pos, inside) if inside else []
        if count > inside:
            result.append(Extent(count - inside, hole=True, zero=True))
        return result

    # Durability.

    async def _persist(self) -> list[Table]:
        """Make the L2 entries just changed reach the child before the reply (lock held): returns
        the tables for `_write_tables`, which may run without the lock. The refcounts they use are
        durable already; the decrements they cause wait for a commit, unless every reply must be
        durable or barriers cost nothing (`unsafe`, whose FLUSH never reaches the image): then
        everything is committed now."""
        if self._lazy:
            await self.set_incompatible(hdr.INCOMPAT_DIRTY, True)
        if self._sync or not self.io.barriers:
            await self._commit()
            return []
        return self.l2_cache.dirty()

    async def _write_tables(self, tables: list[Table]) -> None:
        for table in tables:
            await self.io.write_table(table)

    async def _commit(self) -> None:
        """Write every changed table, in crash-safe order (lock held)."""
        refcounts = self.refcounts
        l2_dirty = self.l2_cache.dirty()
        if not (refcounts.dirty() or l2_dirty or self.l1.dirty or refcounts.pending):
            return
        if self._lazy:
            await self.set_incompatible(hdr.INCOMPAT_DIRTY, True)
        if await refcounts.write_dirty() and not self._refcounts_may_lag and (l2_dirty or self.l1.dirty):
            await self.io.barrier()
        for table in l2_dirty:
            await self.io.write_table(table)
        if self.l1.dirty:
            # After the new L2 tables, whether written just now or when they left the cache.
            await self.io.barrier()
            await self.io.write_table(self.l1)
        if refcounts.pending:
            await self.io.barrier()
            freed = await refcounts.apply_pending()
            await refcounts.write_dirty()
            await self._discard_host(freed)
        if not self._active:
            refcounts.end_quarantine()

    async def _discard_host(self, freed: list[int]) -> None:
        """Give freed clusters back to the child (a hole in a file, a discard on a device)."""
        if not self.child.capabilities.can_trim:
            return
        cb = self.cluster_bits
        freed.sort()
        start = 0
        for i in range(1, len(freed) + 1):
            if i == len(freed) or freed[i] != freed[i - 1] + 1:
                await self.child.trim(freed[start] << cb, (freed[i - 1] - freed[start] + 1) << cb)
                start = i

    async def flush(self) -> None:
        if not self.writable:
            return
        async with self._lock:
            # Flushed refcounts are exact: an unused reservation would be a leak in a copy or check.
            await self.refcounts.release_reserved()
            await self._commit()
        await self.child.flush()

    def start_flush(self, done: Done) -> bool:
        """With no metadata to commit a FLUSH is the child's: started without a task where the
        child can (writes in place, as in a fully allocated image, change no metadata)."""
        child_start = getattr(self.child, "start_flush", None)
        if child_start is None or not self.writable or self._lock.locked():
            return False
        if not self.refcounts.settled() or self.l1.dirty or self.l2_cache.dirty():
            return False
        return child_start(done)

    async def close(self) -> None:
        try:
            if self.writable:
                await self.flush()
                if self._lazy:
                    await self.set_incompatible(hdr.INCOMPAT_DIRTY, False)
        finally:
            try:
                if self.backing is not None:
                    await self.backing.close()
            finally:
                await self.child.close()

    async def cache(self, offset: int, length: int) -> None:
        raise BackendError(errno.EOPNOTSUPP, "CACHE is emulated by the export")


async def _extents_of(backend: Backend, offset: int, count: int) -> list[Extent]:
    """`backend`'s extents over exactly [offset, offset + count); what it does not report is data
    (a file child knows its size from when it was opened, and reports nothing past it)."""
    async def fetch(at: int, length: int) -> list[tuple[int, tuple[bool, bool]]]:
        extents = await backend.extents(at, length) if backend.capabilities.can_extents else []
        return [(extent.length, (extent.hole, extent.zero)) for extent in extents]

    pieces = await _exactly(fetch, offset, count, unreported=(False, False))
    return [Extent(size, hole=hole, zero=zero) for size, (hole, zero) in pieces]


async def _depths_of(backend: Backend, offset: int, count: int) -> list[tuple[int, int]]:
    """`backend`'s allocation depths over exactly [offset, offset + count): a source without
    layers (a raw file) has all of its bytes, and what a layer does not report is its own."""
    depths = getattr(backend, "allocation_depths", None)

    async def fetch(at: int, length: int) -> list[tuple[int, int]]:
        return await depths(at, length) if depths else []

    return await _exactly(fetch, offset, count, unreported=1)


async def _exactly(fetch, offset: int, count: int, *, unreported) -> list[tuple[int, object]]:
    """(length, value) pieces from `fetch(offset, length)` over exactly [offset, offset + count),
    asking again where a call stopped short (a layer answers for one of its tables at a time);
    `unreported` is the value of what a call reports nothing about."""
    result = []
    covered = 0
    while covered < count:
        before = covered
        for size, value in await fetch(offset + covered, count - covered):
            size = min(size, count - covered)
            if size <= 0:
                break
            result.append((size, value))
            covered += size
        if covered == before:
            result.append((count - covered, unreported))
            break
    return result
