"""The qcow2 header and its extensions (docs/interop/qcow2.txt in QEMU): parse, check, encode."""

import errno
import struct
from dataclasses import dataclass, field

from nbdserve.backend import BackendError

MAGIC = b"QFI\xfb"
V2_HEADER_LENGTH = 72
V3_HEADER_LENGTH = 104
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21  # QEMU's limit, 2 MiB
MAX_BACKING_NAME = 1023

# Incompatible features: an image with an unknown one must not be opened.
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
KNOWN_INCOMPAT = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
# Compatible features.
COMPAT_LAZY_REFCOUNTS = 1 << 0
# Auto-clear features: a writer must clear the bits it does not maintain.
AUTOCLEAR_BITMAPS = 1 << 0

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

# Byte offsets of the fields nbdserve rewrites in place.
OFFSET_REFCOUNT_TABLE = 48
OFFSET_INCOMPAT = 72
OFFSET_AUTOCLEAR = 88

_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
_V3_TAIL = struct.Struct(">QQQII")

# Feature names for messages, as QEMU writes them into the feature name table.
_INCOMPAT_NAMES = {0: "dirty bit", 1: "corrupt bit", 2: "external data file",
                   3: "compression type", 4: "extended L2 entries"}


def corrupt(message: str) -> BackendError:
    return BackendError(errno.EIO, f"qcow2 image is corrupt: {message}")


def unsupported_image(message: str) -> BackendError:
    return BackendError(errno.EOPNOTSUPP, f"qcow2 image cannot be opened: {message}")


@dataclass
class Header:
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible: int = 0
    compatible: int = 0
    autoclear: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LENGTH
    compression_type: int = COMPRESSION_ZLIB
    backing_file: str | None = None
    backing_format: str | None = None
    has_bitmaps: bool = False
    feature_names: dict = field(default_factory=dict)  # (type, bit) -> name

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible & INCOMPAT_EXTL2)

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order


def parse_header(data: bytes) -> Header:
    """The header of an image whose first cluster (or more) is `data`; refuses what we cannot serve."""
    if len(data) < V2_HEADER_LENGTH or data[:4] != MAGIC:
        raise unsupported_image("not a qcow2 image (bad magic)")
    fields = _V2.unpack_from(data)
    header = Header(*fields[1:])
    if header.version not in (2, 3):
        raise unsupported_image(f"version {header.version} (only 2 and 3 are known)")
    if header.version == 3:
        if len(data) < V3_HEADER_LENGTH:
            raise corrupt("truncated version 3 header")
        (header.incompatible, header.compatible, header.autoclear, header.refcount_order,
         header.header_length) = _V3_TAIL.unpack_from(data, V2_HEADER_LENGTH)
        if header.header_length < V3_HEADER_LENGTH or header.header_length % 8:
            raise corrupt(f"header length {header.header_length}")
        if header.header_length > 104:
            header.compression_type = data[104]
    _check_fields(header)
    _parse_extensions(header, data)
    _check_features(header)
    if header.backing_file_offset:
        end = header.backing_file_offset + header.backing_file_size
        if header.backing_file_size > MAX_BACKING_NAME or end > len(data):
            raise corrupt("backing file name is out of the first cluster")
        header.backing_file = data[header.backing_file_offset:end].decode("utf-8", "surrogateescape")
    return header


def _check_fields(header: Header) -> None:
    if not MIN_CLUSTER_BITS <= header.cluster_bits <= MAX_CLUSTER_BITS:
        raise unsupported_image(f"cluster size 2^{header.cluster_bits} (512 B to 2 MiB are supported)")
    if header.refcount_order > 6:
        raise corrupt(f"refcount order {header.refcount_order} (at most 6)")
    if header.crypt_method:
        raise unsupported_image("encrypted images are not supported")
    mask = header.cluster_size - 1
    for name in ("l1_table_offset", "refcount_table_offset"):
        if getattr(header, name) & mask:
            raise corrupt(f"{name.replace('_', ' ')} is not cluster aligned")
    if header.refcount_table_clusters == 0:
        raise corrupt("the refcount table is empty")
    l2_entries = header.cluster_size // (16 if header.extended_l2 else 8)
    needed = -(-header.size // (l2_entries * header.cluster_size))
    if header.l1_size < needed:
        raise corrupt(f"L1 table of {header.l1_size} entries is too small for {header.size} bytes")


def _parse_extensions(header: Header, data: bytes) -> None:
    position = header.header_length
    end = header.backing_file_offset or len(data)
    while position + 8 <= end:
        kind, length = struct.unpack_from(">II", data, position)
        position += 8
        if kind == EXT_END:
            return
        if position + length > len(data):
            raise corrupt("header extension runs past the first cluster")
        payload = data[position:position + length]
        if kind == EXT_BACKING_FORMAT:
            header.backing_format = payload.decode("ascii", "replace")
        elif kind == EXT_FEATURE_TABLE:
            for index in range(0, length - 47, 48):
                name = payload[index + 2:index + 48].split(b"\0", 1)[0].decode("ascii", "replace")
                header.feature_names[(payload[index], payload[index + 1])] = name
        elif kind == EXT_BITMAPS:
            header.has_bitmaps = True
        elif kind == EXT_DATA_FILE:
            raise unsupported_image("external data files are not supported")
        position += -(-length // 8) * 8


def _check_features(header: Header) -> None:
    unknown = header.incompatible & ~KNOWN_INCOMPAT
    if unknown:
        names = [
            header.feature_names.get((0, bit), _INCOMPAT_NAMES.get(bit, f"bit {bit}"))
            for bit in range(64) if unknown >> bit & 1
        ]
        raise unsupported_image(f"unknown incompatible feature(s): {', '.join(names)}")
    if header.incompatible & INCOMPAT_CORRUPT:
        raise unsupported_image("the corrupt bit is set: repair it with `qemu-img check -r all`")
    if header.incompatible & INCOMPAT_COMPRESSION:
        if header.compression_type not in COMPRESSION_NAMES or header.compression_type == COMPRESSION_ZLIB:
            raise unsupported_image(f"compression type {header.compression_type}")
    elif header.compression_type:
        raise corrupt("compression type is set without its incompatible feature bit")
    if header.extended_l2 and header.cluster_bits < 14:
        raise corrupt("extended L2 entries need clusters of at least 16 KiB")


def encode_header(header: Header) -> bytes:
    """The fixed part of a header (72 or 104+ bytes); extensions are the caller's."""
    data = _V2.pack(
        MAGIC, header.version, header.backing_file_offset, header.backing_file_size,
        header.cluster_bits, header.size, header.crypt_method, header.l1_size,
        header.l1_table_offset, header.refcount_table_offset, header.refcount_table_clusters,
        header.nb_snapshots, header.snapshots_offset,
    )
    if header.version == 2:
        return data
    data += _V3_TAIL.pack(header.incompatible, header.compatible, header.autoclear,
                          header.refcount_order, header.header_length)
    tail = bytearray(header.header_length - V3_HEADER_LENGTH)
    if tail:
        tail[0] = header.compression_type
    return data + bytes(tail)


def encode_extension(kind: int, payload: bytes) -> bytes:
    padding = -len(payload) % 8
    return struct.pack(">II", kind, len(payload)) + payload + bytes(padding)
