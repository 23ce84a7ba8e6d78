"""Linux syscalls Python's os module lacks: fallocate modes and block-device ioctls."""

import ctypes
import fcntl
import mmap
import os
import stat
import struct

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

BLKSSZGET = 0x1268
BLKDISCARD = 0x1277
BLKROTATIONAL = 0x127E
BLKZEROOUT = 0x127F
BLKPBSZGET = 0x127B
BLKGETSIZE64 = 0x80081272

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    # ctypes drops the GIL around the call, so this is safe to run in a worker thread.
    if _libc.fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _ioctl_int(fd: int, request: int, fmt: str) -> int:
    buf = bytearray(struct.calcsize(fmt))
    fcntl.ioctl(fd, request, buf)
    return struct.unpack(fmt, buf)[0]


def device_size(fd: int) -> int:
    return _ioctl_int(fd, BLKGETSIZE64, "Q")


def logical_block_size(fd: int) -> int:
    return _ioctl_int(fd, BLKSSZGET, "i")


def physical_block_size(fd: int) -> int:
    return _ioctl_int(fd, BLKPBSZGET, "I")


def is_rotational(fd: int) -> bool:
    return bool(_ioctl_int(fd, BLKROTATIONAL, "H"))


def discard(fd: int, offset: int, length: int) -> None:
    fcntl.ioctl(fd, BLKDISCARD, struct.pack("QQ", offset, length))


def zero_out(fd: int, offset: int, length: int) -> None:
    fcntl.ioctl(fd, BLKZEROOUT, struct.pack("QQ", offset, length))


def device_queue_limit(fd: int, name: str) -> int:
    """A value from /sys/dev/block/MAJ:MIN/queue/NAME of a block device, or 0 when it cannot
    be read."""
    return _queue_value(os.fstat(fd).st_rdev, name)


def unsplit_request_limit(fd: int) -> int:
    """The largest O_DIRECT request (in memory of scattered pages) that the device under a block
    device or file takes without splitting it, or 0 when unknown: one segment per page."""
    st = os.fstat(fd)
    device = st.st_rdev if stat.S_ISBLK(st.st_mode) else st.st_dev
    sectors_kb = _queue_value(device, "max_sectors_kb")
    segments = _queue_value(device, "max_segments")
    if not sectors_kb or not segments:
        return 0
    return min(sectors_kb * 1024, segments * mmap.PAGESIZE) // mmap.PAGESIZE * mmap.PAGESIZE


def _queue_value(device: int, name: str) -> int:
    # A partition has no queue of its own: its disk's is one level up.
    base = f"/sys/dev/block/{os.major(device)}:{os.minor(device)}"
    for path in (f"{base}/queue/{name}", f"{base}/../queue/{name}"):
        try:
            with open(path) as f:
                return int(f.read().strip() or 0)
        except (OSError, ValueError):
            continue
    return 0
