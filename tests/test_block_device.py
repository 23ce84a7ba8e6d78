"""A loop device served raw: size from BLKGETSIZE64, TRIM as BLKDISCARD, WRITE_ZEROES as BLKZEROOUT
(both seen in strace), and cache=none with the device's logical block size advertised while
unaligned requests still come out right."""

import random
import subprocess
from pathlib import Path

import nbd
import pytest

from conftest import run

MiB = 1024 * 1024
SIZE = 16 * MiB
CONTENT = random.Random(6).randbytes(SIZE)


@pytest.fixture
def loop_device(tmp_path):
    """(device path, backing file) of a loop device over a file holding CONTENT."""
    backing = tmp_path / "backing.img"
    backing.write_bytes(CONTENT)
    device = run(["losetup", "-f", "--show", str(backing)]).stdout.strip()
    try:
        yield device, backing
    finally:
        subprocess.run(["losetup", "-d", device], check=True)


def queue_value(device: str, name: str) -> int:
    return int(Path(f"/sys/block/{Path(device).name}/queue/{name}").read_text())


def connect(uri: str) -> nbd.NBD:
    handle = nbd.NBD()
    handle.set_strict_mode(0)  # send unaligned requests too: the server must cope
    handle.connect_uri(uri)
    return handle


def test_loop_device_size_discard_and_zeroout(start_server, loop_device, tmp_path):
    device, backing = loop_device
    trace = tmp_path / "strace.log"
    server = start_server(
        {"exports": {"dev": {"source": device}}},
        prefix=["strace", "-f", "-qq", "--seccomp-bpf", "-o", str(trace), "-e", "trace=ioctl"],
    )
    handle = connect(server.uri("dev"))
    assert handle.get_size() == SIZE
    assert handle.can_trim() and handle.can_zero() and handle.can_multi_conn()
    assert handle.is_rotational() == bool(queue_value(device, "rotational"))

    handle.trim(MiB, MiB)
    handle.zero(MiB + 1000, 4 * MiB + 300)  # unaligned edges are written, the middle zeroed out
    handle.flush()
    expected = bytearray(CONTENT)
    expected[MiB : 2 * MiB] = bytes(MiB)  # a loop device punches discarded ranges out of its file
    expected[4 * MiB + 300 : 4 * MiB + 300 + MiB + 1000] = bytes(MiB + 1000)
    assert handle.pread(SIZE, 0) == bytes(expected)
    handle.shutdown()
    assert server.stop() == 0

    assert backing.read_bytes()[4 * MiB + 300 : 4 * MiB + 300 + MiB + 1000] == bytes(MiB + 1000)
    ioctls = trace.read_text()
    assert f"BLKGETSIZE64, [{SIZE}]" in ioctls
    assert f"BLKDISCARD, [{MiB}, {MiB}]" in ioctls
    # BLKZEROOUT of the whole 512-byte blocks inside the request.
    start = -(-(4 * MiB + 300) // 512) * 512
    end = (4 * MiB + 300 + MiB + 1000) // 512 * 512
    assert f"BLKZEROOUT, [{start}, {end - start}]" in ioctls


def test_loop_device_with_cache_none_and_unaligned_requests(start_server, loop_device):
    device, backing = loop_device
    server = start_server({"exports": {"dev": {"source": device, "cache": "none"}}})
    handle = connect(server.uri("dev"))
    logical = queue_value(device, "logical_block_size")
    assert handle.get_block_size(nbd.SIZE_MINIMUM) == logical == 512

    expected = bytearray(CONTENT)
    assert handle.pread(3000, 777) == expected[777:3777]
    for offset, data in [(1000, b"\x11" * 100), (5 * MiB - 3, b"\x22" * 70000), (8192, b"\x33" * 4096)]:
        handle.pwrite(data, offset)
        expected[offset : offset + len(data)] = data
    handle.zero(5000, 100)
    expected[100:5100] = bytes(5000)
    handle.flush()
    assert handle.pread(SIZE, 0) == bytes(expected)
    handle.shutdown()
    assert server.stop() == 0
    assert backing.read_bytes() == bytes(expected)
