"""The Linux AIO engine (backends/aio.py) on O_DIRECT files, in process; then through the server:
FUA writes submitted with RWF_DSYNC (seen in strace) and I/O errors answered as error replies."""

import errno
import os
import re

import nbd
import pytest
import trio
import trio.testing

from backends import aio as aio_module
from backends import linux
from backends.aio import AioContext
from conftest import run
from nbdserve.backend import WouldBlock
from nbdserve.buffers import BufferPool

MiB = 1024 * 1024


PATTERN = bytes(range(256)) * (8 * MiB // 256)


@pytest.fixture
def direct_file(tmp_path):
    """(O_DIRECT descriptor, PATTERN) of an 8 MiB file holding PATTERN."""
    path = tmp_path / "direct.img"
    with open(path, "wb") as f:
        f.write(PATTERN)
        os.fsync(f.fileno())  # else O_DIRECT must first write the page cache back: not AIO's job
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    yield fd, PATTERN
    os.close(fd)


@pytest.fixture
def direct_device(tmp_path):
    """(O_DIRECT descriptor, PATTERN) of a loop device over a file holding PATTERN."""
    backing = tmp_path / "backing.img"
    backing.write_bytes(PATTERN)
    device = run(["losetup", "-f", "--show", str(backing)]).stdout.strip()
    fd = os.open(device, os.O_RDWR | os.O_DIRECT)
    try:
        yield fd, PATTERN
    finally:
        os.close(fd)
        run(["losetup", "-d", device])


def read_direct(fd: int, length: int, offset: int) -> bytes:
    with BufferPool().borrowed(length) as buf:
        assert os.preadv(fd, [buf], offset) == length
        return bytes(buf)


def in_trio(test, max_request: int = 0):
    """Run `test(aio)` with a fresh context, closed afterwards."""

    async def main():
        aio = AioContext(max_request)
        try:
            return await test(aio)
        finally:
            await aio.close()

    return trio.run(main)


def test_reads_and_writes_round_trip(direct_device):
    fd, pattern = direct_device
    pool = BufferPool()

    async def test(aio):
        with pool.borrowed(64 * 1024) as buf:
            assert await aio.read(fd, buf, 4096) == len(buf)
            assert bytes(buf) == pattern[4096 : 4096 + len(buf)]
            buf[:] = b"x" * len(buf)
            assert await aio.write(fd, buf, MiB) == len(buf)
        # Many at once, each into its own buffer, completed out of order by one reaper.
        results = {}

        async def read_one(index):
            with pool.borrowed(4096) as block:
                await aio.read(fd, block, index * 4096)
                results[index] = bytes(block)

        async with trio.open_nursery() as nursery:
            for index in range(200):  # more than the context's depth: the rest wait for a slot
                nursery.start_soon(read_one, index)
        return results

    results = in_trio(test)
    expected = bytearray(pattern)
    expected[MiB : MiB + 64 * 1024] = b"x" * 64 * 1024
    assert results == {i: bytes(expected[i * 4096 : (i + 1) * 4096]) for i in range(200)}
    with pool.borrowed(len(pattern)) as whole:
        assert os.preadv(fd, [whole], 0) == len(pattern)
        assert whole == expected


def test_a_write_that_would_block_asks_for_a_worker_thread(direct_file):
    """Writing a regular file updates its mtime: ext4 will not do that without blocking."""
    fd, _ = direct_file

    async def test(aio):
        with BufferPool().borrowed(4096) as buf:
            with pytest.raises(WouldBlock):
                await aio.write(fd, buf, 0)

    in_trio(test)


def test_a_misaligned_request_fails_with_einval_and_the_context_keeps_working(direct_file):
    fd, pattern = direct_file
    pool = BufferPool()

    async def test(aio):
        with pool.borrowed(8192) as buf:
            with pytest.raises(OSError) as misaligned:
                await aio.read(fd, buf[:4096], 100)  # offset not a multiple of the block size
            with pytest.raises(OSError) as bad_memory:
                await aio.read(fd, buf[1:4097], 0)  # memory not aligned
            assert await aio.read(fd, buf[:4096], 0) == 4096
            return misaligned.value.errno, bad_memory.value.errno, bytes(buf[:4096])

    assert in_trio(test) == (errno.EINVAL, errno.EINVAL, pattern[:4096])


def test_a_read_past_the_end_returns_what_there_is(direct_file):
    fd, pattern = direct_file

    async def test(aio):
        with BufferPool().borrowed(3 * 4096) as buf:
            return await aio.read(fd, buf, len(pattern) - 4096), await aio.read(fd, buf, len(pattern))

    assert in_trio(test) == (4096, 0)


def test_a_cancelled_request_still_completes_before_its_buffer_is_released(direct_file):
    """The kernel writes into the buffer until the completion is reaped: a cancelled waiter must
    not hand the buffer back (to a pool, to another request) before that."""
    fd, pattern = direct_file

    async def test(aio):
        views = [memoryview(BufferPool().take(4 * MiB))[: 4 * MiB] for _ in range(2)]
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                for index, view in enumerate(views):
                    nursery.start_soon(aio.read, fd, view, index * 4 * MiB)
                with trio.fail_after(5):
                    while not aio._pending:  # submitted: cancel while the kernel has them
                        await trio.lowlevel.checkpoint()
                in_flight_at_cancel = len(aio._pending)
                scope.cancel()
        # The readers returned (the nursery closed), so their reads are over: data all there.
        return in_flight_at_cancel, len(aio._pending), [bytes(view) for view in views]

    in_flight_at_cancel, in_flight_after, data = in_trio(test)
    assert in_flight_at_cancel > 0 and in_flight_after == 0
    assert data == [pattern[: 4 * MiB], pattern[4 * MiB :]]


def test_close_waits_for_requests_in_flight(direct_file):
    fd, pattern = direct_file
    done = []

    async def reader(aio, buf, offset):
        await aio.read(fd, buf, offset)
        done.append(bytes(buf[:16]))

    async def main():
        aio = AioContext()
        async with trio.open_nursery() as nursery:
            for index in range(8):
                nursery.start_soon(reader, aio, memoryview(BufferPool().take(MiB)), index * MiB)
            await trio.testing.wait_all_tasks_blocked()
            await aio.close()
            closed_with = len(done)
        with pytest.raises(trio.ClosedResourceError):
            await aio.read(fd, memoryview(BufferPool().take(4096)), 0)
        return closed_with

    assert trio.run(main) == 8
    assert sorted(done) == sorted(pattern[i * MiB : i * MiB + 16] for i in range(8))


def test_large_requests_go_in_pieces_the_device_takes_whole(direct_device):
    """A request the device would split fails with RWF_NOWAIT (EAGAIN): the context submits
    pieces no larger than the device's limit instead, and completes the request once."""
    fd, pattern = direct_device
    limit = linux.unsplit_request_limit(fd)
    assert limit and limit % 4096 == 0 and limit < 4 * MiB

    async def test(aio):
        with BufferPool().borrowed(4 * MiB) as buf:
            results = []
            assert aio.start_read(fd, buf, 0, results.append)
            pieces_in_flight = len(aio._pending)
            with trio.fail_after(5):
                while not results:
                    await trio.sleep(0.001)
            data = bytes(buf)
            buf[:] = b"w" * len(buf)
            written = await aio.write(fd, buf, 2 * MiB)
            return pieces_in_flight, results, data, written

    pieces_in_flight, results, data, written = in_trio(test, max_request=limit)
    assert pieces_in_flight == -(-4 * MiB // limit)
    assert results == [4 * MiB] and data == pattern[: 4 * MiB]
    assert written == 4 * MiB
    assert read_direct(fd, 4 * MiB, 2 * MiB) == b"w" * 4 * MiB


def test_pieces_of_a_read_past_the_end_count_what_there_is(direct_file):
    fd, pattern = direct_file

    async def test(aio):
        with BufferPool().borrowed(4 * 8192) as buf:
            return await aio.read(fd, buf, len(pattern) - 12288), bytes(buf[:12288])

    assert in_trio(test, max_request=8192) == (12288, pattern[-12288:])


def test_a_request_of_more_pieces_than_the_context_holds_asks_for_a_worker_thread(direct_file):
    fd, _ = direct_file

    async def test(aio):
        with BufferPool().borrowed((aio_module.DEPTH + 1) * 4096) as buf:
            with pytest.raises(WouldBlock):
                await aio.read(fd, buf, 0)
            return aio.start_read(fd, buf, 0, lambda result: None)

    assert in_trio(test, max_request=4096) is False


def test_started_requests_report_through_their_callback(direct_device):
    fd, pattern = direct_device

    async def test(aio):
        outcomes = []
        with BufferPool().borrowed(8192) as buf:
            assert aio.start_read(fd, buf[:4096], 4096, outcomes.append)
            buf[4096:] = b"s" * 4096
            assert aio.start_write(fd, buf[4096:], 0, 0, outcomes.append)
            assert aio.start_fdatasync(fd, outcomes.append)
            with trio.fail_after(5):
                while len(outcomes) < 3:
                    await trio.sleep(0.001)
            return sorted(outcomes), bytes(buf[:4096])

    outcomes, data = in_trio(test)
    assert outcomes == [0, 4096, 4096] and data == pattern[4096:8192]
    assert read_direct(fd, 4096, 0) == b"s" * 4096


def test_a_full_context_starts_nothing_more(direct_device):
    fd, _ = direct_device

    async def test(aio):
        buffers = [memoryview(BufferPool().take(4096))[:4096] for _ in range(aio_module.DEPTH + 1)]
        outcomes = []
        started = [aio.start_read(fd, buf, 0, outcomes.append) for buf in buffers]
        with trio.fail_after(5):
            while len(outcomes) < started.count(True):
                await trio.sleep(0.001)
        return started

    started = in_trio(test)
    assert started == [True] * aio_module.DEPTH + [False]


# Through the server.

TRACE_FILTER = "trace=io_submit,pwritev2,pwritev"


def test_fua_writes_are_submitted_with_rwf_dsync(start_server, direct_device, tmp_path):
    fd, _ = direct_device
    trace_path = tmp_path / "strace.log"
    strace = ["strace", "-f", "-qq", "--seccomp-bpf", "-o", str(trace_path), "-e", "trace=io_submit"]
    server = start_server(args=["-x", "disk", "--cache", "none", f"/proc/{os.getpid()}/fd/{fd}"],
                          prefix=strace)
    handle = nbd.NBD()
    handle.connect_uri(server.uri("disk"))
    handle.pwrite(b"f" * 4096, 8192, nbd.CMD_FLAG_FUA)
    handle.pwrite(b"n" * 4096, 16384)
    assert handle.pread(4096, 8192) == b"f" * 4096
    handle.shutdown()
    assert server.stop() == 0
    writes = {int(offset): line for line in trace_path.read_text().splitlines()
              if "IOCB_CMD_PWRITE" in line for offset in re.findall(r"aio_offset=(\d+)", line)}
    assert sorted(writes) == [8192, 16384], writes
    assert "RWF_DSYNC" in writes[8192] and "RWF_DSYNC" not in writes[16384], writes


def test_io_errors_are_error_replies_and_the_server_keeps_serving(start_server, raw_image):
    image = raw_image(8 * MiB, data=b"d" * 8 * MiB)
    server = start_server(args=["-x", "disk", "--cache", "none", str(image)])
    handle = nbd.NBD()
    handle.connect_uri(server.uri("disk"))
    os.truncate(image, 4 * MiB)  # under the server's feet: reads past 4 MiB find nothing
    with pytest.raises(nbd.Error) as error:
        handle.pread(4096, 6 * MiB)
    assert error.value.errnum == errno.EIO
    assert handle.pread(4096, MiB) == b"d" * 4096
    handle.shutdown()
    assert server.stop() == 0
    assert "was it truncated?" in server.log()
