"""Host cluster allocation: the refcount table, refcount blocks (cached) and the free cluster search.

Every method runs with the image's metadata lock held. The on-disk order that keeps the image
consistent after a crash is kept by the caller's commit; this module keeps four rules:
- clusters are handed out from a reservation: batches whose increments were written and made
  durable (one barrier per batch), so an L2 entry written right after its data never points at a
  cluster whose refcount is 0 on disk; after a crash an unused reservation is only a leak, and
  `release_reserved` gives it back at FLUSH and close. The next batch is claimed while the current
  one lasts (`start_refill`), and its barrier runs without the lock (`finish_refill` after it);
- increments may reach the disk at any time (at worst a crash leaks clusters), so a dirty block can
  be written whenever it leaves the cache;
- decrements wait in `pending` until the L2 entries that dropped the references are written;
- a freed cluster stays in quarantine until no data I/O that began before the free is in flight,
  so a slow request never reads or writes a cluster that already belongs to someone else.
"""

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .header import corrupt
from .metaio import MetadataIO
from .tables import RefcountCodec, Table, TableCache

OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
MAX_HOST_CLUSTERS_BITS = 56  # L2 entries address at most 64 PiB
FIRST_BATCH = 16  # clusters; each batch doubles the last, up to BATCH_BYTES and BATCH_CLUSTERS
# A barrier writes back every dirty page of the file: at 10k allocating writes a second, a batch
# must last a while. A crash leaks the batch; a FLUSH releases it (and starts small again).
BATCH_BYTES = 512 * 1024 * 1024
BATCH_CLUSTERS = 8192


@dataclass
class Run:
    """Reserved clusters [start, start + count): referenced once on disk, used by nothing yet."""

    start: int
    count: int
    fresh: bool  # never written: the child reads zeroes there


class Refcounts:
    def __init__(self, io: MetadataIO, cluster_bits: int, order: int, table: Table, cache_tables: int,
                 move_table: Callable[[int, int], Awaitable[None]], barrier: Callable[[], Awaitable[None]]) -> None:
        self.io = io
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.codec = RefcountCodec(order)
        self.per_block = self.cluster_size * 8 // self.codec.bits
        self.table = table
        self.cache = TableCache(cache_tables)
        self._move_table = move_table  # rewrites the header when the table moves
        self._barrier = barrier  # orders reserved increments before the L2 entries that use them
        self.reserved: list[Run] = []  # durable, ready to hand out
        self._incoming: list[Run] | None = None  # claimed, waiting for their barrier
        self._batch = FIRST_BATCH
        self.pending: list[int] = []  # cluster indices waiting for a decrement
        self.quarantine: set[int] = set()
        self.next_free = 0  # no free cluster below this index (a search hint)
        # Clusters from here on were never written: the child reads zeroes there.
        self.fresh_from = -(-io.host_end // self.cluster_size)

    @property
    def table_entries(self) -> int:
        return len(self.table.data) // 8

    # Reading and changing refcounts.

    async def block(self, table_index: int) -> Table | None:
        if table_index >= self.table_entries:
            return None
        offset = self.table.u64(table_index) & OFFSET_MASK
        if not offset:
            return None
        block = self.cache.get(offset)
        if block is None:
            block = await self.io.read_table(offset, self.cluster_size, "refcount block")
            await self._insert(block)
        return block

    async def _insert(self, block: Table) -> None:
        while self.cache.full():
            victim = self.cache.victim()
            await self.io.write_table(victim)
            self.cache.drop(victim.offset)
        self.cache.put(block)

    async def get(self, index: int) -> int:
        block = await self.block(index // self.per_block)
        return 0 if block is None else self.codec.get(block, index % self.per_block)

    async def adjust(self, index: int, delta: int) -> int:
        block = await self.block(index // self.per_block)
        if block is None:
            raise corrupt(f"cluster {index:#x} has no refcount block")
        slot = index % self.per_block
        value = self.codec.get(block, slot) + delta
        if not 0 <= value <= self.codec.max:
            raise corrupt(f"refcount of cluster {index:#x} would become {value}")
        self.codec.set(block, slot, value)
        return value

    def release(self, index: int, count: int = 1) -> None:
        """Drop one reference to each of `count` clusters, once the caller's L2 change is written."""
        self.pending.extend(range(index, index + count))

    async def apply_pending(self) -> list[int]:
        """Apply the waiting decrements; the clusters now free go to quarantine."""
        pending, self.pending = self.pending, []
        freed = []
        for index in pending:
            if await self.adjust(index, -1) == 0:
                freed.append(index)
        self.quarantine.update(freed)
        return freed

    def end_quarantine(self) -> None:
        if self.quarantine:
            self.next_free = min(self.next_free, min(self.quarantine))
            self.quarantine.clear()

    def dirty(self) -> bool:
        return bool(self.cache.dirty())

    def settled(self) -> bool:
        """Nothing reserved, nothing to write and no decrement waiting: a FLUSH finds nothing."""
        return not (self.reserved or self._incoming or self.pending or self.dirty())

    async def write_dirty(self) -> bool:
        wrote = False
        for block in self.cache.dirty():
            wrote |= await self.io.write_table(block)
        return wrote

    # Allocation.

    async def allocate(self, wanted: int) -> tuple[int, int, bool]:
        """Up to `wanted` contiguous clusters from the reservation, referenced once on disk already:
        (first index, count, fresh: never written, so they read as zeroes)."""
        if self._available() < wanted:
            await self._reserve(wanted)
        run = self.reserved[0]
        count = min(wanted, run.count)
        return self._take(count), count, run.fresh

    def try_allocate(self, wanted: int) -> tuple[int, bool] | None:
        """`allocate`, on the event loop: exactly `wanted` contiguous reserved clusters, or None if
        the reservation has no such run at its head."""
        if not self.reserved or self.reserved[0].count < wanted:
            return None
        fresh = self.reserved[0].fresh
        return self._take(wanted), fresh

    def unallocate(self, index: int, count: int, fresh: bool) -> None:
        """Give back clusters from `try_allocate` that were never used: they stay reserved."""
        head = self.reserved[0] if self.reserved else None
        if head is not None and head.fresh == fresh and index + count == head.start:
            head.start, head.count = index, head.count + count
        else:
            self.reserved.insert(0, Run(index, count, fresh))

    def _take(self, count: int) -> int:
        run = self.reserved[0]
        start = run.start
        run.start += count
        run.count -= count
        if not run.count:
            del self.reserved[0]
        return start

    def _available(self) -> int:
        return sum(run.count for run in self.reserved)

    def wants_refill(self) -> bool:
        """The reservation runs low and no refill is under way."""
        return self._incoming is None and self._available() < self._batch // 2

    async def start_refill(self) -> list[Run] | None:
        """Claim the next batch; it is handed out after `finish_refill`, once a barrier has passed.
        None if the refcount blocks there are have no free cluster left (the next allocation
        creates one)."""
        runs = await self._claim_runs(0, self._batch)
        if runs:
            self._incoming = runs
        return runs or None

    def finish_refill(self, runs: list[Run], durable: bool) -> None:
        """After the barrier; if it failed, the batch stays claimed and unused (a leak)."""
        if self._incoming is runs:  # else a FLUSH released them meanwhile
            self._incoming = None
            if durable:
                self._add_ready(runs)

    async def _reserve(self, wanted: int) -> None:
        """Claim `wanted` more clusters (and the rest of a batch) and make their increments durable, now."""
        runs = await self._claim_runs(wanted, max(0, self._batch - wanted))
        await self._barrier()
        self._add_ready(runs)

    async def _claim_runs(self, needed: int, extra: int) -> list[Run]:
        """`needed` clusters and up to `extra` more, now referenced once, their refcount blocks
        written (not yet durable). Only the needed ones may create refcount blocks or grow the
        table: those are written where they are, and a block device ends somewhere."""
        runs: list[Run] = []
        claimed = 0
        while claimed < needed + extra:
            claim = await self._claim(needed + extra - claimed, grow=claimed < needed)
            if claim is None:
                break
            start, count, fresh = claim
            _append_run(runs, Run(start, count, fresh))
            claimed += count
        await self.write_dirty()
        self._batch = min(2 * self._batch, BATCH_CLUSTERS, max(FIRST_BATCH, BATCH_BYTES // self.cluster_size))
        return runs

    def _add_ready(self, runs: list[Run]) -> None:
        for run in runs:
            _append_run(self.reserved, run)

    async def release_reserved(self) -> None:
        """Drop the unused reservation, ready or incoming (a clean close leaves no leaked cluster).
        Nothing refers to these clusters, so the decrements may reach the disk at any time."""
        reserved = self.reserved + (self._incoming or [])
        self.reserved, self._incoming = [], None
        for run in reserved:
            for index in range(run.start, run.start + run.count):
                await self.adjust(index, -1)
            self.next_free = min(self.next_free, run.start)
        self._batch = FIRST_BATCH

    async def _claim(self, wanted: int, grow: bool = True) -> tuple[int, int, bool] | None:
        """Up to `wanted` contiguous free clusters, now referenced once (in memory):
        (first index, count, fresh); None if there are none without `grow`ing the refcounts."""
        index = self.next_free
        per_block = self.per_block
        while True:
            table_index = index // per_block
            if table_index >= self.table_entries:
                if not grow:
                    return None
                await self._grow_table(table_index)
                continue
            block = await self.block(table_index)
            if block is None:
                if not grow:
                    return None
                await self._create_block(table_index, index)
                index += 1
                continue
            slot = index % per_block
            while slot < per_block and not self._is_free(block, slot, table_index):
                slot += 1
            if slot == per_block:
                index = (table_index + 1) * per_block
                continue
            count = 1
            while count < wanted and slot + count < per_block and self._is_free(block, slot + count, table_index):
                count += 1
            for k in range(count):
                self.codec.set(block, slot + k, 1)
            start = table_index * per_block + slot
            if (start + count) >> (MAX_HOST_CLUSTERS_BITS - self.cluster_bits):
                raise corrupt("the image file would grow past 64 PiB")
            self.next_free = start + count
            fresh = start >= self.fresh_from
            self.fresh_from = max(self.fresh_from, start + count)
            return start, count, fresh

    def _is_free(self, block: Table, slot: int, table_index: int) -> bool:
        return not self.codec.get(block, slot) and table_index * self.per_block + slot not in self.quarantine

    async def _create_block(self, table_index: int, index: int) -> None:
        """A refcount block for `table_index`, stored in cluster `index`, which it covers itself."""
        block = Table(index << self.cluster_bits, bytearray(self.cluster_size))
        self.codec.set(block, index % self.per_block, 1)
        block.mark_all()
        await self.io.write_table(block)
        await self.io.barrier()  # the block before the table entry that points at it
        self.table.set_u64(table_index, block.offset)
        await self.io.write_table(self.table)
        self.fresh_from = max(self.fresh_from, index + 1)
        await self._insert(block)

    async def _grow_table(self, needed_index: int) -> None:
        """Move the refcount table to a bigger place past everything it covers now.

        The clusters from `start` on are all free (no block covers them). There go the new blocks
        that cover the new table and themselves, then the table, then the header points at it.
        """
        old = self.table
        entries = max(2 * self.table_entries, needed_index + 1)
        table_clusters = -(-entries * 8 // self.cluster_size)
        entries = table_clusters * self.cluster_size // 8
        start = self.table_entries * self.per_block
        blocks = 1
        while blocks * self.per_block < blocks + table_clusters:
            blocks += 1
        data = bytearray(table_clusters * self.cluster_size)
        data[:len(old.data)] = old.data
        table = Table((start + blocks) << self.cluster_bits, data)
        used = blocks + table_clusters
        for k in range(blocks):
            block = Table((start + k) << self.cluster_bits, bytearray(self.cluster_size))
            for slot in range(min(self.per_block, used - k * self.per_block)):
                self.codec.set(block, slot, 1)
            block.mark_all()
            await self.io.write_table(block)
            table.set_u64(self.table_entries + k, block.offset)
        table.mark_all()
        await self.io.write_table(table)
        await self.io.barrier()
        await self._move_table(table.offset, table_clusters)
        self.table = table
        self.fresh_from = max(self.fresh_from, start + used)
        old_first = old.offset >> self.cluster_bits
        self.release(old_first, len(old.data) >> self.cluster_bits)


def _append_run(runs: list[Run], run: Run) -> None:
    """Add `run` at the end of `runs`, merged with the last one if it continues it."""
    last = runs[-1] if runs else None
    if last is not None and last.fresh == run.fresh and last.start + last.count == run.start:
        last.count += run.count
    else:
        runs.append(run)
