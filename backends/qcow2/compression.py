"""Decompression of compressed clusters: raw deflate (zlib) or zstd, as the header says."""

import zlib

import zstandard

from .header import COMPRESSION_ZSTD, corrupt


def decompress(kind: int, data: bytes, cluster_size: int) -> bytes:
    """One cluster from its compressed bytes; the stream may be followed by padding."""
    try:
        if kind == COMPRESSION_ZSTD:
            out = zstandard.ZstdDecompressor().decompressobj().decompress(data)
        else:
            out = zlib.decompressobj(-15).decompress(data, cluster_size)
    except (zlib.error, zstandard.ZstdError) as exc:
        raise corrupt(f"compressed cluster does not decompress: {exc}") from exc
    if len(out) < cluster_size:
        raise corrupt(f"compressed cluster holds {len(out)} bytes, not {cluster_size}")
    return out[:cluster_size]
