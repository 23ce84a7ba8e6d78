"""Real command-line clients against a real server: qemu-img, qemu-io, nbdinfo, nbdcopy."""

import json
import os
import random

import pytest

from conftest import run
from image_facts import allocated_bytes, data_ranges, fill_ranges

MiB = 1024 * 1024
SIZE = 64 * MiB
# Where the test image has data; the rest is a hole.
DATA_AT = [(0, MiB), (32 * MiB, 33 * MiB)]


@pytest.fixture
def sparse_image(raw_image):
    """A 64 MiB image with random data at DATA_AT and holes elsewhere."""
    path = fill_ranges(raw_image(SIZE), DATA_AT, seed=1)
    assert data_ranges(path) == DATA_AT
    return path


def map_data_ranges(entries: list[dict]) -> list[tuple[int, int]]:
    """Merged (start, end) of the entries of `qemu-img map --output=json` that hold data."""
    ranges: list[tuple[int, int]] = []
    for entry in entries:
        if not entry["data"]:
            assert entry["zero"], entry  # holes must read as zeroes, or copies are not sparse
            continue
        start, end = entry["start"], entry["start"] + entry["length"]
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], end)
        else:
            ranges.append((start, end))
    return ranges


def qemu_io(uri: str, *commands: str) -> str:
    args = ["qemu-io", "-f", "raw"]
    for command in commands:
        args += ["-c", command]
    result = run([*args, uri])
    # qemu-io reports failed commands on stdout and still exits 0.
    assert "failed" not in result.stdout and "error" not in result.stdout.lower(), result.stdout
    return result.stdout


def test_qemu_img_info_map_compare_convert(start_server, sparse_image, tmp_path):
    server = start_server(args=[str(sparse_image)])
    uri = server.uri("disk.img")
    info = json.loads(run(["qemu-img", "info", "--output=json", uri]).stdout)
    assert info["virtual-size"] == SIZE
    entries = json.loads(run(["qemu-img", "map", "--output=json", "-f", "raw", uri]).stdout)
    assert map_data_ranges(entries) == data_ranges(sparse_image)
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(sparse_image), uri])

    # From nbd:// to a file: the same bytes, and the holes stay holes.
    copy = tmp_path / "copy.img"
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(copy)])
    assert copy.read_bytes() == sparse_image.read_bytes()
    assert data_ranges(copy) == DATA_AT

    # From a file to nbd://: the export ends up with the other file's bytes.
    other = tmp_path / "other.img"
    other.write_bytes(random.Random(2).randbytes(SIZE))
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(other), uri])
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(other), uri])
    assert sparse_image.read_bytes() == other.read_bytes()


def test_qemu_io_write_read_discard_zero_flush(start_server, raw_image):
    image = raw_image(SIZE)
    server = start_server(args=[str(image)])
    uri = server.uri()
    qemu_io(
        uri,
        "write -P 0xab 0 4M",
        "write -f -P 0xcd 4M 1M",  # FUA
        "flush",
        "read -P 0xab 0 4M",
        "read -P 0xcd 4M 1M",
        "read -P 0 5M 1M",
    )
    data = image.read_bytes()
    assert data[: 4 * MiB] == b"\xab" * (4 * MiB)
    assert data[4 * MiB : 5 * MiB] == b"\xcd" * MiB

    before = allocated_bytes(image)
    qemu_io(uri, "discard 0 1M", "read -P 0 0 1M")
    assert allocated_bytes(image) == before - MiB  # TRIM punched a hole

    # -z without -u sends NO_HOLE: zeroes, and the blocks stay allocated.
    qemu_io(uri, "write -z 1M 1M", "read -P 0 1M 1M")
    assert allocated_bytes(image) == before - MiB
    # -z -u may punch a hole.
    qemu_io(uri, "write -z -u 2M 1M", "read -P 0 2M 1M", "read -P 0xab 3M 1M")
    assert allocated_bytes(image) == before - 2 * MiB
    # -n asks for FAST_ZERO, which the file system can do.
    qemu_io(uri, "write -z -n 3M 1M", "read -P 0 3M 1M")
    assert image.read_bytes()[: 4 * MiB] == bytes(4 * MiB)


def test_nbdinfo_list_map_json(start_server, sparse_image, raw_image):
    second = raw_image(MiB, name="second.img")
    server = start_server({
        "exports": {
            "sparse": {"source": str(sparse_image), "description": "the sparse one"},
            "small": {"source": str(second), "read-only": True, "description": "a small one"},
        },
    })
    listing = run(["nbdinfo", "--list", server.uri()]).stdout
    for text in ("sparse", "the sparse one", "small", "a small one"):
        assert text in listing

    # nbdinfo --map: "offset length type description" per line.
    mapped = []
    for line in run(["nbdinfo", "--map", server.uri("sparse")]).stdout.splitlines():
        offset, length, state = (int(field) for field in line.split()[:3])
        mapped.append((offset, offset + length, state))
    assert mapped == [
        (0, MiB, 0), (MiB, 32 * MiB, 3), (32 * MiB, 33 * MiB, 0), (33 * MiB, SIZE, 3)
    ]

    info = json.loads(run(["nbdinfo", "--json", server.uri("small")]).stdout)
    (export,) = info["exports"]
    assert export["export-name"] == "small"
    assert export["description"] == "a small one"
    assert export["export-size"] == MiB
    assert export["is_read_only"] is True
    assert export["can_multi_conn"] is True
    assert "base:allocation" in export["contexts"]
    writable = json.loads(run(["nbdinfo", "--json", server.uri("sparse")]).stdout)["exports"][0]
    assert writable["is_read_only"] is False
    assert all(writable[key] for key in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero"))


def test_nbdcopy_both_directions(start_server, sparse_image, raw_image, tmp_path):
    target = raw_image(SIZE, name="target.img")
    server = start_server({"exports": {"target": {"source": str(target)}}})
    uri = server.uri("target")
    run(["nbdcopy", str(sparse_image), uri])
    assert target.read_bytes() == sparse_image.read_bytes()

    back = tmp_path / "back.img"
    run(["nbdcopy", uri, str(back)])
    assert back.read_bytes() == sparse_image.read_bytes()
    # nbdcopy trusts block status: holes reported as HOLE|ZERO are not written.
    assert data_ranges(back) == DATA_AT


def test_unix_socket_listener(start_server, sparse_image):
    server = start_server({"exports": {"disk": {"source": str(sparse_image)}}}, unix=True)
    assert os.path.exists(server.socket_path)
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(sparse_image), server.uri("disk")])
    assert server.stop() == 0
    assert not os.path.exists(server.socket_path)  # removed at shutdown
