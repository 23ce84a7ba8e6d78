"""Rebuilding refcounts from the L1 and L2 tables, for an image left with the dirty bit set
(lazy refcounts): the spec asks for this before the image is used."""

import logging
from collections import Counter

from .header import corrupt, unsupported_image
from .refcounts import OFFSET_MASK

log = logging.getLogger(__name__)


async def repair_refcounts(image) -> None:
    """Set every refcount to the number of references the metadata holds (lock not needed: the
    image is not serving yet)."""
    header = image.header
    if header.nb_snapshots or header.has_bitmaps:
        raise unsupported_image("the dirty bit is set on an image with snapshots or bitmaps: "
                                "repair it with `qemu-img check -r all`")
    cb = image.cluster_bits
    counts: Counter[int] = Counter()

    def count(offset: int, length: int) -> None:
        for index in range(offset >> cb, ((offset + length - 1) >> cb) + 1):
            counts[index] += 1

    refcounts = image.refcounts
    count(0, image.cluster_size)
    count(header.l1_table_offset, header.l1_size * 8)
    count(refcounts.table.offset, len(refcounts.table.data))
    for index in range(refcounts.table_entries):
        block = refcounts.table.u64(index) & OFFSET_MASK
        if block:
            count(block, image.cluster_size)
    for l1_index in range(header.l1_size):
        table = await image._l2_table(l1_index)
        if table is None:
            continue
        count(table.offset, image.cluster_size)
        for entry in range(0, image.cluster_size // 8, image.entry_words):
            for first, clusters in image._references(table.u64(entry)):
                counts.update(range(first, first + clusters))
    per_block = refcounts.per_block
    changed = 0
    for table_index in range(refcounts.table_entries):
        block = await refcounts.block(table_index)
        if block is None:
            continue
        for slot in range(per_block):
            wanted = counts.pop(table_index * per_block + slot, 0)
            if refcounts.codec.get(block, slot) != wanted:
                refcounts.codec.set(block, slot, wanted)
                changed += 1
    if counts:
        raise corrupt("clusters in use have no refcount block: repair it with `qemu-img check -r all`")
    await refcounts.write_dirty()
    await image.io.barrier()
    log.info("qcow2: the image was not closed cleanly; %d refcounts repaired", changed)
