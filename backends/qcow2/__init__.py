"""The qcow2 format driver: read-write, with backing chains, over any byte source."""

from dataclasses import dataclass

from nbdserve.backend import Backend, OpenOptions
from nbdserve.registry import ParseContext
from nbdserve.settings import Section

from . import header as hdr
from .backing import open_backing
from .image import Qcow2Image
from .metaio import MetadataIO
from .repair import repair_refcounts
from .tables import Table

MIB = 1024 * 1024


@dataclass(frozen=True)
class Qcow2Config:
    l2_cache_size: int = 32 * MIB  # covers 256 GiB of guest disk with 64 KiB clusters
    refcount_cache_size: int = 4 * MIB


class Qcow2Format:
    name = "qcow2"

    def parse(self, section: Section, context: ParseContext) -> Qcow2Config:
        defaults = Qcow2Config()
        config = Qcow2Config(
            l2_cache_size=section.size("l2-cache-size", defaults.l2_cache_size),
            refcount_cache_size=section.size("refcount-cache-size", defaults.refcount_cache_size),
        )
        section.done()
        return config

    async def open(self, child: Backend, config: Qcow2Config, options: OpenOptions) -> Backend:
        return await open_image(child, config, options)


async def open_image(child: Backend, config: Qcow2Config, options: OpenOptions) -> Qcow2Image:
    io = MetadataIO(child, options.cache)
    start = await io.read(0, max(io.align, 512))
    if start[:4] != hdr.MAGIC or len(start) < 24:
        raise hdr.unsupported_image("not a qcow2 image (bad magic)")
    cluster_bits = int.from_bytes(start[20:24], "big")
    cluster_size = 1 << min(max(cluster_bits, hdr.MIN_CLUSTER_BITS), hdr.MAX_CLUSTER_BITS)
    head = await io.read(0, max(cluster_size, io.align))
    header = hdr.parse_header(head)
    if cluster_size < io.align:
        raise hdr.unsupported_image(
            f"clusters of {cluster_size} bytes are smaller than the storage's block size {io.align} "
            "(cache=none or directsync): use another cache mode")
    writable = not options.read_only and child.capabilities.can_write
    if writable and header.nb_snapshots:
        raise hdr.unsupported_image("images with internal snapshots can be served read-only only")
    l1_bytes = -(-header.l1_size * 8 // cluster_size) * cluster_size
    l1 = Table(header.l1_table_offset, await io.read(header.l1_table_offset, l1_bytes))
    refcount_table = Table(header.refcount_table_offset, await io.read(
        header.refcount_table_offset, header.refcount_table_clusters * cluster_size))
    backing = None
    if header.backing_file:
        backing = await open_backing(header.backing_file, header.backing_format, child, options)
    try:
        image = Qcow2Image(child, io, header, head, l1, backing, options,
                           config.l2_cache_size // cluster_size, config.refcount_cache_size // cluster_size)
        image.refcounts.table = refcount_table
        if writable and header.version == 3:
            if header.autoclear:
                await image.clear_autoclear()
            if header.incompatible & hdr.INCOMPAT_DIRTY:
                await repair_refcounts(image)
                await image.set_incompatible(hdr.INCOMPAT_DIRTY, False)
    except BaseException:
        if backing is not None:
            await backing.close()
        raise
    return image


__all__ = ["Qcow2Config", "Qcow2Format", "open_image"]
