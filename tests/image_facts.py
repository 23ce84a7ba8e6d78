"""What an image file holds on disk, read straight from the file system to check the server."""

import os
from pathlib import Path


def data_ranges(path: Path) -> list[tuple[int, int]]:
    """(start, end) of every data extent, from SEEK_DATA/SEEK_HOLE."""
    ranges = []
    with open(path, "rb") as f:
        fd, size, position = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while position < size:
            try:
                start = os.lseek(fd, position, os.SEEK_DATA)
            except OSError:  # ENXIO: only hole is left
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            ranges.append((start, end))
            position = end
    return ranges


def allocated_bytes(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
