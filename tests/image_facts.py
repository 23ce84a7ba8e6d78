"""What an image file holds on disk, read straight from the file system to check the server."""

import os
import random
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


def fill_ranges(path: Path, ranges: list[tuple[int, int]], seed: int) -> Path:
    """Write random bytes (reproducible from `seed`) at each (start, end); leave the rest alone."""
    rng = random.Random(seed)
    with open(path, "r+b") as f:
        for start, end in ranges:
            f.seek(start)
            f.write(rng.randbytes(end - start))
    return path
