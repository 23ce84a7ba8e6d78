"""libnbd's Python module in-process: structured replies, block status, zero flags, CACHE, many
requests in flight, multi-conn, and the server's errors for requests libnbd would normally refuse
to send (strict mode off, so the server is the one saying no)."""

import errno
import os
import random
import re
import time

import nbd
import pytest

from image_facts import allocated_bytes, fill_ranges
from qcow2_helpers import depth_map, qemu_nbd_depth_map

MiB = 1024 * 1024
SIZE = 8 * MiB
DATA_AT = [(0, MiB), (4 * MiB, 5 * MiB)]
HOLE_ZERO = nbd.STATE_HOLE | nbd.STATE_ZERO


@pytest.fixture
def image(raw_image):
    """8 MiB with random data at DATA_AT, holes elsewhere; the file's bytes are the reference."""
    return fill_ranges(raw_image(SIZE), DATA_AT, seed=3)


@pytest.fixture
def serve(start_server, image):
    """serve(*args) -> URI of `image` served with extra CLI flags."""

    def start(*args: str) -> str:
        return start_server(args=[*args, str(image)]).uri()

    return start


@pytest.fixture
def connect():
    """connect(uri, strict=True) -> a libnbd handle that asked for base:allocation."""
    handles = []

    def open_handle(uri: str, *, strict: bool = True) -> nbd.NBD:
        handle = nbd.NBD()
        handle.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        if not strict:
            handle.set_strict_mode(0)  # send what the server advertised against, to see it refused
        handle.connect_uri(uri)
        handles.append(handle)
        return handle

    yield open_handle
    for handle in handles:
        handle.shutdown()


def extents(handle: nbd.NBD, length: int, offset: int, flags: int = 0) -> list[tuple[int, int]]:
    found = []

    def callback(context: str, start: int, entries: list[int], error: int) -> int:
        assert context == nbd.CONTEXT_BASE_ALLOCATION
        assert start == offset
        found.extend(zip(entries[::2], entries[1::2]))
        return 0

    handle.block_status(length, offset, callback, flags)
    return found


def errno_of(call, *args) -> int:
    with pytest.raises(nbd.Error) as failure:
        call(*args)
    return failure.value.errnum


def test_structured_replies_and_df(serve, connect, image):
    handle = connect(serve())
    assert handle.get_structured_replies_negotiated()
    assert handle.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    assert handle.can_df()
    expected = image.read_bytes()
    chunks = []

    def chunk(subbuf, offset: int, status: int, error: int) -> int:
        chunks.append((offset, len(subbuf), status))
        return 0

    assert handle.pread_structured(SIZE, 0, chunk) == expected
    assert sum(length for _, length, _ in chunks) == SIZE
    # A hole may come as an OFFSET_HOLE chunk, data only as OFFSET_DATA.
    assert {status for *_, status in chunks} <= {nbd.READ_DATA, nbd.READ_HOLE}
    chunks.clear()
    assert handle.pread_structured(2 * MiB, 3 * MiB, chunk, nbd.CMD_FLAG_DF) == expected[3 * MiB : 5 * MiB]
    assert chunks == [(3 * MiB, 2 * MiB, nbd.READ_DATA)]  # DF: one chunk


def test_block_status_reports_holes_as_hole_and_zero(serve, connect):
    handle = connect(serve())
    assert extents(handle, SIZE, 0) == [
        (MiB, 0), (3 * MiB, HOLE_ZERO), (MiB, 0), (3 * MiB, HOLE_ZERO),
    ]
    # Clipped to the request, which may start and end inside extents.
    assert extents(handle, 2 * MiB, MiB // 2) == [(MiB // 2, 0), (MiB + MiB // 2, HOLE_ZERO)]
    assert extents(handle, SIZE, 0, nbd.CMD_FLAG_REQ_ONE) == [(MiB, 0)]
    assert extents(handle, 4096, 2 * MiB, nbd.CMD_FLAG_REQ_ONE) == [(4096, HOLE_ZERO)]
    assert extents(handle, SIZE - 6 * MiB, 6 * MiB, nbd.CMD_FLAG_REQ_ONE) == [(2 * MiB, HOLE_ZERO)]


def test_allocation_depth_of_a_raw_file_is_one_everywhere(serve, image, tmp_path):
    """A raw file is a single layer: holes included, all of it is its own (as qemu-nbd -A says)."""
    assert depth_map(serve()) == [(0, SIZE, 1)] == qemu_nbd_depth_map(image, "raw", tmp_path)


def test_write_zeroes_with_no_hole_and_fast_zero(serve, connect, image):
    handle = connect(serve())
    assert handle.can_zero() and handle.can_fast_zero()
    allocated = allocated_bytes(image)
    # NO_HOLE over data: zeroes, still allocated.
    handle.zero(MiB // 2, 0, nbd.CMD_FLAG_NO_HOLE)
    assert allocated_bytes(image) == allocated
    # NO_HOLE over a hole: the server must not leave it a hole.
    handle.zero(MiB, 2 * MiB, nbd.CMD_FLAG_NO_HOLE)
    assert allocated_bytes(image) == allocated + MiB
    # Without NO_HOLE the server may punch: a file system that can, should.
    handle.zero(MiB, 4 * MiB)
    assert allocated_bytes(image) == allocated
    # FAST_ZERO succeeds where zeroing is cheap, as with fallocate here.
    handle.zero(MiB // 2, MiB // 2, nbd.CMD_FLAG_FAST_ZERO)
    handle.flush()
    data = image.read_bytes()
    assert data[: 5 * MiB] == bytes(5 * MiB)
    assert handle.pread(6 * MiB, 0) == bytes(6 * MiB)


def test_trim_punches_holes_and_cache_prefetches(serve, connect, image):
    handle = connect(serve())
    assert handle.can_trim() and handle.can_cache()
    handle.cache(SIZE, 0)
    handle.trim(MiB, 4 * MiB, nbd.CMD_FLAG_FUA)
    assert extents(handle, SIZE, 0) == [(MiB, 0), (SIZE - MiB, HOLE_ZERO)]
    assert handle.pread(MiB, 4 * MiB) == bytes(MiB)


def test_many_requests_in_flight_complete_out_of_order(serve, connect, image):
    handle = connect(serve())
    expected = image.read_bytes()
    # A FLUSH of dirty pages waits for the disk; cached 4 KiB reads do not.
    dirty = random.Random(4).randbytes(2 * MiB)
    handle.pwrite(dirty, 6 * MiB)
    expected = expected[: 6 * MiB] + dirty
    order: list[str] = []

    def completed(name: str):
        def callback(error: int) -> int:
            assert error.value == 0, (name, error.value)
            order.append(name)
            return 1

        return callback

    handle.aio_flush(completed("flush"))
    reads = []
    for index in range(48):
        buffer = nbd.Buffer(4096)
        offset = index * 4096
        handle.aio_pread(buffer, offset, completed(f"read {index}"))
        reads.append((buffer, offset))
    assert handle.aio_in_flight() == 49
    while handle.aio_in_flight():
        handle.poll(-1)
    assert sorted(order) == sorted(["flush", *(f"read {i}" for i in range(48))])
    assert order != ["flush", *(f"read {i}" for i in range(48))]
    assert order.index("flush") > 0, "every read waited for the flush before it"
    for buffer, offset in reads:
        assert buffer.to_bytearray() == expected[offset : offset + 4096]


def test_multi_conn_flush_on_one_connection_covers_another(serve, connect, image):
    uri = serve()
    writer, flusher = connect(uri), connect(uri)
    assert writer.can_multi_conn() and flusher.can_multi_conn()
    data = random.Random(5).randbytes(MiB)
    writer.pwrite(data, 2 * MiB)
    flusher.flush()
    assert flusher.pread(MiB, 2 * MiB) == data
    with open(image, "rb") as f:
        assert os.pread(f.fileno(), MiB, 2 * MiB) == data


def test_read_only_export_refuses_writes_with_eperm(serve, connect, image):
    handle = connect(serve("-r"), strict=False)
    assert handle.is_read_only()
    before = image.read_bytes()
    assert errno_of(handle.pwrite, b"x" * 4096, 0) == errno.EPERM
    assert errno_of(handle.trim, 4096, 0) == errno.EPERM
    assert errno_of(handle.zero, 4096, 0) == errno.EPERM
    assert handle.pread(4096, 0) == before[:4096]
    handle.flush()
    assert image.read_bytes() == before


def test_requests_beyond_the_end(serve, connect, image):
    handle = connect(serve(), strict=False)
    assert errno_of(handle.pread, 4096, SIZE - 1) == errno.EINVAL
    assert errno_of(handle.pwrite, b"x" * 2, SIZE - 1) == errno.ENOSPC
    assert errno_of(handle.zero, 4096, SIZE) == errno.ENOSPC
    assert errno_of(handle.trim, 4096, SIZE - 512) == errno.EINVAL
    assert errno_of(handle.cache, 2, SIZE - 1) == errno.EINVAL
    assert errno_of(handle.block_status, 1, SIZE, lambda *args: 0) == errno.EINVAL
    # The connection goes on, and nothing was written past the end.
    assert handle.pread(1, SIZE - 1) == b"\0"
    assert os.path.getsize(image) == SIZE


def test_oversized_read_is_refused_and_the_connection_goes_on(serve, connect):
    handle = connect(serve(), strict=False)
    minimum, preferred, maximum = (handle.get_block_size(kind) for kind in (
        nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED, nbd.SIZE_MAXIMUM))
    assert (minimum, maximum) == (1, 32 * MiB)
    assert preferred >= 4096
    assert errno_of(handle.pread, 32 * MiB + 4096, 0) == errno.EINVAL
    assert len(handle.pread(MiB, 0)) == MiB


def test_negotiation_options_list_info_and_meta_contexts(start_server, image, raw_image):
    other = raw_image(MiB, name="other.img")
    server = start_server({
        "exports": {
            "disk": {"source": str(image), "description": "the disk"},
            "other": {"source": str(other), "read-only": True},
        },
        "default-export": "disk",
    })
    handle = nbd.NBD()
    handle.set_opt_mode(True)
    handle.set_full_info(True)  # ask for NBD_INFO_NAME and NBD_INFO_DESCRIPTION
    handle.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    handle.connect_uri(server.uri(""))
    listed = []
    assert handle.opt_list(lambda name, description: listed.append((name, description)) or 0) == 2
    assert sorted(listed) == [("disk", "the disk"), ("other", "")]

    contexts = []
    handle.set_export_name("other")
    assert handle.opt_list_meta_context(lambda name: contexts.append(name) or 0) == 1
    assert contexts == [nbd.CONTEXT_BASE_ALLOCATION]
    handle.opt_info()
    assert (handle.get_size(), handle.is_read_only()) == (MiB, True)

    handle.set_export_name("")  # the default export, by its canonical name
    handle.opt_go()
    assert handle.get_canonical_export_name() == "disk"
    assert handle.get_export_description() == "the disk"
    assert handle.get_size() == SIZE
    assert handle.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    assert extents(handle, MiB, 0) == [(MiB, 0)]
    handle.shutdown()


def test_simple_replies_without_structured_negotiation(serve, image):
    handle = nbd.NBD()
    handle.set_request_structured_replies(False)
    handle.connect_uri(serve())
    assert not handle.get_structured_replies_negotiated()
    assert not handle.can_df()
    expected = image.read_bytes()
    assert handle.pread(2 * MiB, 0) == expected[: 2 * MiB]
    handle.pwrite(b"\x01" * 4096, 4096, nbd.CMD_FLAG_FUA)
    assert handle.pread(4096, 4096) == b"\x01" * 4096
    handle.set_strict_mode(0)
    assert errno_of(handle.pread, 4096, SIZE) == errno.EINVAL
    handle.shutdown()


def test_each_connection_logs_its_client_export_and_bytes_moved(start_server, image):
    server = start_server(args=[str(image)])
    handle = nbd.NBD()
    handle.connect_uri(server.uri())
    handle.pwrite(b"w" * 4096, 0)
    handle.pread(8192, 0)
    handle.shutdown()
    closed = re.compile(
        r"127\.0\.0\.1:\d+: closed export 'disk\.img': \d+ requests, 8192 bytes read, 4096 bytes written, 0 errors"
    )
    deadline = time.monotonic() + 10
    while not closed.search(server.log()):
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)
    assert re.search(r"127\.0\.0\.1:\d+: opened export 'disk\.img'", server.log())
