"""Making new qcow2 images: the header, one refcount table and its blocks, the L1 table, and with
preallocation the L2 tables and data clusters too, laid out the way qemu-img does."""

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from . import header as hdr
from .image import COPIED
from .tables import RefcountCodec, Table

PREALLOCATION = ("off", "metadata", "falloc", "full")
COMPAT = {"0.10": 2, "1.1": 3}


@dataclass(frozen=True)
class CreateOptions:
    cluster_size: int = 65536
    preallocation: str = "off"
    compression_type: str = "zlib"
    extended_l2: bool = False
    compat: str = "1.1"
    lazy_refcounts: bool = False
    refcount_bits: int = 16
    backing_file: str | None = None
    backing_format: str | None = None


def check_options(options: CreateOptions) -> None:
    """Raise ValueError naming the option that is wrong."""
    cluster_bits = options.cluster_size.bit_length() - 1
    if 1 << cluster_bits != options.cluster_size or not hdr.MIN_CLUSTER_BITS <= cluster_bits <= hdr.MAX_CLUSTER_BITS:
        raise ValueError(f"cluster_size {options.cluster_size}: a power of two from 512 to 2M")
    if options.preallocation not in PREALLOCATION:
        raise ValueError(f"preallocation {options.preallocation!r}: one of {', '.join(PREALLOCATION)}")
    if options.compression_type not in hdr.COMPRESSION_NAMES.values():
        raise ValueError(f"compression_type {options.compression_type!r}: zlib or zstd")
    if options.compat not in COMPAT:
        raise ValueError(f"compat {options.compat!r}: 0.10 or 1.1")
    if options.refcount_bits not in (1, 2, 4, 8, 16, 32, 64):
        raise ValueError(f"refcount_bits {options.refcount_bits}: a power of two up to 64")
    if options.compat == "0.10" and (options.extended_l2 or options.lazy_refcounts or options.refcount_bits != 16
                                      or options.compression_type != "zlib"):
        raise ValueError("compat=0.10 allows none of extended_l2, lazy_refcounts, refcount_bits, zstd")
    if options.extended_l2 and options.cluster_size < 16384:
        raise ValueError("extended_l2 needs a cluster_size of at least 16K")
    if options.backing_file and options.preallocation != "off":
        raise ValueError("preallocation is for images without a backing file")


def create_qcow2(path: Path, size: int, options: CreateOptions) -> None:
    check_options(options)
    cs = options.cluster_size
    cb = cs.bit_length() - 1
    extended = options.extended_l2
    l2_entries = cs // (16 if extended else 8)
    l1_size = -(-size // (l2_entries * cs))
    l1_clusters = max(1, -(-l1_size * 8 // cs))
    preallocate = options.preallocation != "off"
    l2_tables = l1_size if preallocate else 0
    data_clusters = -(-size // cs) if preallocate else 0
    per_block = cs * 8 // options.refcount_bits
    table_clusters = blocks = 1
    while True:
        total = 1 + table_clusters + blocks + l1_clusters + l2_tables + data_clusters
        needed_blocks = -(-total // per_block)
        needed_table = -(-needed_blocks * 8 // cs)
        if needed_blocks <= blocks and needed_table <= table_clusters:
            break
        blocks, table_clusters = max(blocks, needed_blocks), max(table_clusters, needed_table)
    table_at = 1
    blocks_at = table_at + table_clusters
    l1_at = blocks_at + blocks
    l2_at = l1_at + l1_clusters
    data_at = l2_at + l2_tables
    end = data_at + data_clusters if preallocate else l1_at + l1_clusters

    first = _first_cluster(size, cb, l1_size, l1_at << cb, table_at << cb, table_clusters, options)
    refcount_table = bytearray(table_clusters * cs)
    codec = RefcountCodec(options.refcount_bits.bit_length() - 1)
    block_data = bytearray(blocks * cs)
    for k in range(blocks):
        block = Table(0, memoryview(block_data)[k * cs:(k + 1) * cs])
        for slot in range(min(per_block, end - k * per_block)):
            codec.set(block, slot, 1)
    for k in range(blocks):
        struct.pack_into(">Q", refcount_table, k * 8, (blocks_at + k) << cb)
    l1 = bytearray(l1_clusters * cs)
    l2 = bytearray(l2_tables * cs)
    for k in range(l2_tables):
        struct.pack_into(">Q", l1, k * 8, ((l2_at + k) << cb) | COPIED)
    step = 2 if extended else 1
    for k in range(data_clusters):
        struct.pack_into(">Q", l2, k * 8 * step, ((data_at + k) << cb) | COPIED)
        if extended:
            struct.pack_into(">Q", l2, k * 16 + 8, 0xFFFFFFFF)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        for offset, data in ((0, first), (table_at << cb, refcount_table), (blocks_at << cb, block_data),
                             (l1_at << cb, l1), (l2_at << cb, l2)):
            os.pwrite(fd, data, offset)
        os.ftruncate(fd, end << cb)
        if options.preallocation in ("falloc", "full") and data_clusters:
            os.posix_fallocate(fd, data_at << cb, data_clusters << cb)
        os.fsync(fd)
    finally:
        os.close(fd)


def _first_cluster(size: int, cb: int, l1_size: int, l1_offset: int, table_offset: int, table_clusters: int,
                   options: CreateOptions) -> bytes:
    version = COMPAT[options.compat]
    zstd = options.compression_type == "zstd"
    header = hdr.Header(
        version=version, backing_file_offset=0, backing_file_size=0, cluster_bits=cb, size=size,
        crypt_method=0, l1_size=l1_size, l1_table_offset=l1_offset, refcount_table_offset=table_offset,
        refcount_table_clusters=table_clusters, nb_snapshots=0, snapshots_offset=0,
        incompatible=(hdr.INCOMPAT_COMPRESSION if zstd else 0) | (hdr.INCOMPAT_EXTL2 if options.extended_l2 else 0),
        compatible=hdr.COMPAT_LAZY_REFCOUNTS if options.lazy_refcounts else 0,
        refcount_order=options.refcount_bits.bit_length() - 1,
        header_length=112 if version == 3 else hdr.V2_HEADER_LENGTH,
        compression_type=hdr.COMPRESSION_ZSTD if zstd else hdr.COMPRESSION_ZLIB,
    )
    extensions = b""
    if options.backing_format:
        extensions += hdr.encode_extension(hdr.EXT_BACKING_FORMAT, options.backing_format.encode())
    extensions += hdr.encode_extension(hdr.EXT_END, b"")
    name = (options.backing_file or "").encode()
    if len(name) > hdr.MAX_BACKING_NAME:
        raise ValueError(f"backing file name is longer than {hdr.MAX_BACKING_NAME} bytes")
    if name:
        header.backing_file_offset = len(hdr.encode_header(header)) + len(extensions)
        header.backing_file_size = len(name)
    data = hdr.encode_header(header) + extensions + name
    if len(data) > 1 << cb:
        raise ValueError("the header does not fit in one cluster")
    return data
