"""Block status replies: right for any extents, request length and block size, and cheap for
the largest requests over sparse and fragmented images (nbdkit's CVE-2025-47711/47712)."""

import os
import time

import nbd
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdserve.backend import Extent
from nbdserve.export import _FLAGS, _Descriptors, allocation_flags
from nbdserve.protocol.constants import StateFlag

GiB = 1024**3
MiB = 1024**2
LARGEST = 2**32 - 1
HOLE_ZERO = StateFlag.HOLE | StateFlag.ZERO


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 20_000), st.booleans(), st.booleans()), min_size=1, max_size=40),
    st.integers(0, 10_000), st.integers(1, LARGEST), st.sampled_from([1, 512, 4096]),
    st.sampled_from([1, 2, 3, 8192]),
)
def test_descriptors_are_aligned_conservative_and_bounded(raw, offset, length, block, limit):
    extents = [Extent(size, hole=hole, zero=zero) for size, hole, zero in raw]
    total = sum(extent.length for extent in extents)
    length = min(length, total)
    export_size = offset + total
    descriptors = _Descriptors(offset, length, limit)
    descriptors.add([(extent.length, allocation_flags(extent)) for extent in extents], length)
    result = descriptors.result(block, export_size, _FLAGS)
    assert result and len(result) <= limit
    assert all(0 < size <= LARGEST for size, _ in result)
    assert sum(size for size, _ in result) <= length
    truth, position = [], offset  # (start, end, flags) of what the backend said
    for extent in extents:
        flags = (StateFlag.HOLE if extent.hole else 0) | (StateFlag.ZERO if extent.zero else 0)
        truth.append((position, position + extent.length, flags))
        position += extent.length
    start = offset
    for index, (size, flags) in enumerate(result):
        end = start + size
        if index < len(result) - 1:
            assert end % block == 0, (result, block)
        elif end % block:
            assert end in (offset + length, export_size) or flags == 0
        # Never claim more than is true for any byte covered (a hole must be all hole).
        for begin, finish, true_flags in truth:
            if begin < end and finish > start:
                assert flags & ~true_flags == 0, (result, truth)
        start = end


def connect(uri: str) -> nbd.NBD:
    handle = nbd.NBD()
    handle.set_strict_mode(0)  # let unaligned and huge requests through to the server
    handle.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    handle.connect_uri(uri)
    return handle


def block_status(handle: nbd.NBD, length: int, offset: int, flags: int = 0) -> list[tuple[int, int]]:
    seen = []

    def collect(context, at, entries, error):
        seen.extend(zip(entries[0::2], entries[1::2]))

    handle.block_status(length, offset, collect, flags)
    return seen


def test_largest_and_unaligned_requests(start_server, tmp_path):
    image = tmp_path / "sparse.img"
    with open(image, "wb") as f:
        f.truncate(8 * GiB + 4096)
        f.seek(6 * GiB)
        f.write(b"\1" * MiB)
    source = {"driver": "file", "path": str(image)}
    server = start_server({"exports": {
        "disk": {"source": source}, "direct": {"source": source, "cache": "none", "read-only": True},
    }})
    for name in ("direct", "disk"):  # 4 KiB minimum block size (O_DIRECT), then 1
        handle = connect(server.uri(name))
        for offset, length in ((0, LARGEST), (1, LARGEST), (511, LARGEST - 1000), (4 * GiB + 4095, 3 * GiB),
                               (6 * GiB - 1, 4097), (8 * GiB - 1, 4097), (4 * GiB + 4097, LARGEST)):
            for flags in (0, nbd.CMD_FLAG_REQ_ONE):
                start = time.monotonic()
                extents = block_status(handle, length, offset, flags)
                assert time.monotonic() - start < 1
                assert extents and sum(size for size, _ in extents) <= length
        handle.shutdown()
    handle = connect(server.uri("disk"))
    # A 4 GiB hole in one descriptor, even with REQ_ONE; then the data, then the hole again.
    assert block_status(handle, LARGEST, 0, nbd.CMD_FLAG_REQ_ONE) == [(LARGEST, HOLE_ZERO)]
    tail = block_status(handle, 2 * GiB + 4096, 6 * GiB - 4096)
    assert tail == [(4096, HOLE_ZERO), (MiB, 0), (2 * GiB - MiB, HOLE_ZERO)]
    handle.shutdown()


def test_fragmented_image_costs_what_the_reply_holds(start_server, tmp_path):
    """16 Ki extents (4 KiB data, 4 KiB hole, ...) asked for in one request: the reply stops
    early instead of walking (and sending) every extent of 4 GiB."""
    image = tmp_path / "fragmented.img"
    fd = os.open(image, os.O_WRONLY | os.O_CREAT)
    os.ftruncate(fd, 5 * GiB)
    for position in range(0, 64 * MiB, 8192):
        os.pwrite(fd, b"\1" * 4096, position)
    os.close(fd)
    server = start_server({"exports": {"disk": {"source": {"driver": "file", "path": str(image)}}}})
    handle = connect(server.uri("disk"))
    start = time.monotonic()
    extents = block_status(handle, LARGEST, 0)
    elapsed = time.monotonic() - start
    assert 1000 <= len(extents) <= 8192 and elapsed < 1, (len(extents), elapsed)
    assert extents[:3] == [(4096, 0), (4096, HOLE_ZERO), (4096, 0)]
    # Every byte is described, window after window, request after request.
    position = 0
    while position < 64 * MiB:
        position += sum(size for size, _ in block_status(handle, LARGEST, position))
    assert block_status(handle, LARGEST, 64 * MiB, nbd.CMD_FLAG_REQ_ONE) == [(LARGEST, HOLE_ZERO)]
    handle.shutdown()
