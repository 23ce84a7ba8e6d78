"""qcow2 exports seen by real clients: qemu-io, qemu-img, nbdinfo, nbdcopy; backing chains,
compressed clusters, cache modes, crash safety, refused images, and `nbdserve create`/`info`."""

import json
import signal
import struct
import subprocess
import time

import nbd
import pytest

from qcow2_helpers import (CREATE, NBDSERVE_BIN, assert_same_contents, check_image, depth_map, file_map,
                           nbd_map, qemu_img_create, qemu_nbd_depth_map, random_bytes, write_raw)
from conftest import run

MIB = 1024 * 1024


def qemu_io(uri: str, *commands: str, read_only: bool = False) -> str:
    args = ["qemu-io", *(["-r"] if read_only else []), "-f", "raw", uri]
    for command in commands:
        args += ["-c", command]
    result = run(args)
    assert "error" not in result.stdout.lower() and "fail" not in result.stdout.lower(), result.stdout
    return result.stdout


def serve(start_server, image, *extra):
    return start_server(args=["-f", "qcow2", *extra, str(image)])


@pytest.mark.parametrize("cache", ["writeback", "writethrough", "none", "directsync", "unsafe"])
def test_qemu_io_in_every_cache_mode(cache, tmp_path, start_server):
    image = qemu_img_create(tmp_path / "disk.qcow2", 16 * MIB)
    server = serve(start_server, image, "--cache", cache)
    uri = server.uri()
    qemu_io(uri, "write -P 0xab 0 1M", "write -P 0xcd 3M 80k", "write -z 64k 64k", "write -z -u 2M 1M",
            "discard 3M 64k", "flush")
    qemu_io(uri, "read -P 0xab 0 64k", "read -P 0 64k 64k", "read -P 0xab 128k 896k", "read -P 0 3M 64k",
            "read -P 0xcd 3136k 16k")
    check_image(image)


def test_map_over_nbd_agrees_with_the_file(tmp_path, start_server):
    image = qemu_img_create(tmp_path / "disk.qcow2", 32 * MIB)
    server = serve(start_server, image)
    qemu_io(server.uri(), "write -P 1 0 1M", "write -P 2 4M 64k", "write -z 256k 128k", "write -z -u 8M 2M",
            "write -P 3 16M 1M", "discard 16M 512k", "flush")
    server.stop()
    # A fresh server: the file's size as it is now (the file backend learns it at open).
    server = serve(start_server, image)
    assert nbd_map(server.uri()) == file_map(image)
    check_image(image)


def test_nbdinfo_and_nbdcopy(tmp_path, start_server):
    data = random_bytes(8 * MIB, 1)
    source = write_raw(tmp_path / "source.raw", data)
    image = qemu_img_create(tmp_path / "disk.qcow2", 8 * MIB)
    server = serve(start_server, image)
    info = json.loads(run(["nbdinfo", "--json", server.uri()]).stdout)
    assert info["exports"][0]["export-size"] == 8 * MIB
    assert info["exports"][0]["can_multi_conn"] is True
    run(["nbdcopy", "--flush", str(source), server.uri()])
    copy = tmp_path / "copy.raw"
    run(["nbdcopy", server.uri(), str(copy)])
    assert copy.read_bytes() == data
    check_image(image)
    assert_same_contents(image, source)
    mapping = run(["nbdinfo", "--map", server.uri()]).stdout
    assert "data" in mapping


def test_reads_of_clusters_that_read_as_zeroes_are_sent_as_holes(tmp_path, start_server):
    """Structured replies carry a known hole (unallocated or zero clusters) as one OFFSET_HOLE
    chunk instead of the zeroes; a range with data in it comes as data."""
    image = qemu_img_create(tmp_path / "disk.qcow2", 8 * MIB)
    server = serve(start_server, image)
    qemu_io(server.uri(), "write -P 7 1M 64k", "write -z 2M 1M")
    handle = nbd.NBD()
    handle.connect_uri(server.uri())

    def chunks_of(offset, length, flags=0):
        seen = []

        def chunk(subbuf, chunk_offset, status, error):
            seen.append((chunk_offset, len(subbuf), status))
            return 0

        buf = handle.pread_structured(length, offset, chunk, flags)
        return seen, buf

    handle.pread(4096, 0)  # reads the L2 table into the cache: holes are known without I/O
    assert chunks_of(0, MIB) == ([(0, MIB, nbd.READ_HOLE)], bytes(MIB))
    assert chunks_of(2 * MIB, MIB, nbd.CMD_FLAG_DF) == ([(2 * MIB, MIB, nbd.READ_HOLE)], bytes(MIB))
    seen, data = chunks_of(MIB - 4096, 8192)
    assert seen == [(MIB - 4096, 8192, nbd.READ_DATA)]
    assert data == bytes(4096) + b"\x07" * 4096
    handle.shutdown()


def test_backing_chain_three_deep(tmp_path, start_server):
    """raw base <- qcow2 (written by qemu-io) <- qcow2 made by nbdserve create; reads fall through,
    partial-cluster writes copy the rest of the cluster from below, and the bases stay unchanged."""
    size = 4 * MIB
    base_data = random_bytes(size, 2)
    base = write_raw(tmp_path / "base.raw", base_data)
    middle = qemu_img_create(tmp_path / "middle.qcow2", size, backing=base, backing_format="raw")
    run(["qemu-io", "-f", "qcow2", str(middle), "-c", "write -P 0x11 1M 64k", "-c", "write -z 2M 64k"])
    run([*CREATE, "-f", "qcow2", "-b", "middle.qcow2", str(tmp_path / "top.qcow2")])
    top = tmp_path / "top.qcow2"
    expected = bytearray(base_data)
    expected[1 * MIB:1 * MIB + 65536] = b"\x11" * 65536
    expected[2 * MIB:2 * MIB + 65536] = bytes(65536)
    middle_before = middle.read_bytes()
    server = serve(start_server, top)
    handle = nbd.NBD()
    handle.connect_uri(server.uri())
    assert handle.pread(size, 0) == expected
    for offset, length, value in ((1 * MIB + 4096, 512, 0x22), (3 * MIB + 100 * 512, 4096, 0x33),
                                  (2 * MIB + 512, 1024, 0x44), (0, 65536, 0x55)):
        handle.pwrite(bytes([value]) * length, offset)
        expected[offset:offset + length] = bytes([value]) * length
    handle.flush()
    assert handle.pread(size, 0) == expected
    handle.shutdown()
    shadow = write_raw(tmp_path / "expected.raw", bytes(expected))
    check_image(top)
    assert_same_contents(top, shadow)
    assert middle.read_bytes() == middle_before
    assert base.read_bytes() == base_data
    chain = json.loads(run([str(NBDSERVE_BIN), "info", "--output=json", str(top)]).stdout)
    assert [chain["format"]] + [b["format"] for b in chain["backing-chain"]] == ["qcow2", "qcow2", "raw"]
    assert chain["backing-filename-format"] == "qcow2"


def test_allocation_depth_of_a_backing_chain_matches_qemu_nbd(tmp_path, start_server):
    """qemu:allocation-depth over raw base (3 MiB) <- qcow2 <- qcow2 (4 MiB): 1 for the top
    image's clusters, 2 and 3 below (past the short base, its layer's zeroes count as its own),
    0 where no layer has anything; qemu-nbd -A is the oracle."""
    base = write_raw(tmp_path / "base.raw", random_bytes(3 * MIB, 3))
    middle = qemu_img_create(tmp_path / "middle.qcow2", 4 * MIB, backing=base, backing_format="raw")
    run(["qemu-io", "-f", "qcow2", str(middle), "-c", "write -P 1 1M 64k", "-c", "write -z 2M 64k"])
    top = qemu_img_create(tmp_path / "top.qcow2", 4 * MIB, backing=middle)
    run(["qemu-io", "-f", "qcow2", str(top), "-c", "write -P 2 0 64k", "-c", "write -P 3 3584k 64k"])
    server = serve(start_server, top)
    ours = depth_map(server.uri())
    assert ours == [(0, 65536, 1), (65536, MIB - 65536, 3), (MIB, 65536, 2), (MIB + 65536, MIB - 65536, 3),
                    (2 * MIB, 65536, 2), (2 * MIB + 65536, 1536 * 1024 - 65536, 3),
                    (3584 * 1024, 65536, 1), (3648 * 1024, 448 * 1024, 3)]
    assert qemu_nbd_depth_map(top, "qcow2", tmp_path) == ours


def test_allocation_depth_without_a_backing_file(tmp_path, start_server):
    image = qemu_img_create(tmp_path / "disk.qcow2", 4 * MIB)
    run(["qemu-io", "-f", "qcow2", str(image), "-c", "write -P 1 1M 64k", "-c", "write -z 2M 64k"])
    server = serve(start_server, image)
    ours = depth_map(server.uri())
    assert ours == [(0, MIB, 0), (MIB, 65536, 1), (MIB + 65536, MIB - 65536, 0), (2 * MIB, 65536, 1),
                    (2 * MIB + 65536, 2 * MIB - 65536, 0)]
    assert qemu_nbd_depth_map(image, "qcow2", tmp_path) == ours


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
def test_compressed_clusters(compression, tmp_path, start_server):
    data = bytearray(random_bytes(2 * MIB, 3))
    data[MIB:] = bytes(range(256)) * (MIB // 256)  # compressible half
    source = write_raw(tmp_path / "source.raw", bytes(data))
    image = tmp_path / "compressed.qcow2"
    run(["qemu-img", "convert", "-c", "-O", "qcow2", "-o", f"compression_type={compression}",
         str(source), str(image)])
    info = json.loads(run(["qemu-img", "info", "--output=json", str(image)]).stdout)
    assert info["format-specific"]["data"]["compression-type"] == compression
    server = serve(start_server, image)
    handle = nbd.NBD()
    handle.connect_uri(server.uri())
    assert handle.pread(len(data), 0) == data
    # A write into a compressed cluster moves it to a new, uncompressed one.
    for offset in (MIB + 1000 * 512, MIB + 300 * 1024, 4096):
        handle.pwrite(b"\xee" * 512, offset)
        data[offset:offset + 512] = b"\xee" * 512
    handle.zero(65536, MIB + 65536 * 4)
    data[MIB + 65536 * 4:MIB + 65536 * 5] = bytes(65536)
    handle.flush()
    assert handle.pread(len(data), 0) == data
    handle.shutdown()
    check_image(image)
    assert_same_contents(image, write_raw(tmp_path / "expected.raw", bytes(data)))


def test_sigkill_during_writes_leaks_at_most(tmp_path, start_server):
    image = qemu_img_create(tmp_path / "disk.qcow2", 64 * MIB, "cluster_size=4k")
    server = serve(start_server, image)
    writer = subprocess.Popen(
        ["/usr/bin/python3", "-c", _RANDOM_WRITER, server.uri()], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(1.5)
    server.send_signal(signal.SIGKILL)
    writer.wait(30)
    assert b"wrote" in writer.stdout.read(), "the writer never got going"
    check_image(image, leaks_allowed=True)
    server = serve(start_server, image)
    handle = nbd.NBD()
    handle.connect_uri(server.uri())
    handle.pwrite(b"\x5a" * 8192, 12 * MIB)
    handle.flush()
    assert handle.pread(8192, 12 * MIB) == b"\x5a" * 8192
    handle.shutdown()
    check_image(image, leaks_allowed=True)


@pytest.mark.parametrize("cache", ["writeback", "none"])
def test_acknowledged_writes_survive_sigkill_without_flush(cache, tmp_path, start_server):
    """A reply means the write outlives the process: allocating writes (new clusters, a new L2
    table, a partial cluster, many in flight at once) and a zero request, none flushed, read back
    after SIGKILL and a restart; the crash leaks at most."""
    image = qemu_img_create(tmp_path / "disk.qcow2", 2048 * MIB)
    server = serve(start_server, image, "--cache", cache)
    handle = nbd.NBD()
    handle.connect_uri(server.uri())
    handle.pwrite(b"\x11" * (4 * MIB), 0)
    handle.flush()
    expected = {0: b"\x11" * MIB, MIB: bytes(64 * 1024)}  # the zeroed part of the flushed data
    handle.zero(64 * 1024, MIB)
    expected[3 * MIB] = b"\x11" * MIB
    for k in range(32):  # concurrent allocating writes, some into the L2 table past 512 MiB
        data = random_bytes(4096, 100 + k)
        offset = (k + 1) * 37 * MIB + 8192
        handle.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), offset)
        expected[offset] = data
    while handle.aio_in_flight():
        handle.poll(-1)
    server.send_signal(signal.SIGKILL)
    server.proc.wait()
    server = serve(start_server, image, "--cache", cache)
    handle = nbd.NBD()
    handle.connect_uri(server.uri())
    for offset, data in expected.items():
        assert handle.pread(len(data), offset) == data, f"lost at {offset}"
    handle.shutdown()
    server.stop()
    check_image(image, leaks_allowed=True)


def test_lazy_refcounts_dirty_image_is_repaired(tmp_path, start_server):
    """With lazy refcounts the image is marked dirty while written; after a crash the next open
    rebuilds the refcounts from the L2 tables, so nothing is even leaked."""
    image = qemu_img_create(tmp_path / "disk.qcow2", 64 * MIB, "cluster_size=4k", "lazy_refcounts=on")
    server = serve(start_server, image)
    writer = subprocess.Popen(["/usr/bin/python3", "-c", _RANDOM_WRITER, server.uri()],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(1.5)
    server.send_signal(signal.SIGKILL)
    writer.wait(30)
    header = image.read_bytes()[:104]
    assert struct.unpack(">Q", header[72:80])[0] & 1, "the dirty bit was not set while writing"
    server = serve(start_server, image)
    handle = nbd.NBD()
    handle.connect_uri(server.uri())
    handle.pwrite(b"\x5a" * 4096, 0)
    handle.flush()
    handle.shutdown()
    server.stop()
    assert "refcounts repaired" in server.log()
    assert not struct.unpack(">Q", image.read_bytes()[72:80])[0] & 1
    check_image(image)


_RANDOM_WRITER = """
import nbd, random, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
rnd = random.Random(5); size = h.get_size(); n = flushed = 0; reported = False
buf = nbd.Buffer.from_bytearray(bytearray(b"\\x77" * 65536))
try:
    while True:
        while h.aio_in_flight() < 16:
            h.aio_pwrite(buf, rnd.randrange(size // 65536) * 65536, completion=lambda *a: 1)
            n += 1
        h.poll(-1)
        if n >= flushed + 50:
            h.aio_flush(completion=lambda *a: 1)
            flushed = n
        if n >= 200 and not reported:
            print("wrote", flush=True)
            reported = True
except nbd.Error:
    pass
"""


@pytest.mark.parametrize("what, offset, value, message", [
    ("unknown incompatible bit", 72, 1 << 40, "unknown incompatible feature"),
    ("corrupt bit", 72, 1 << 1, "corrupt bit"),
])
def test_refused_images(what, offset, value, message, tmp_path, start_server):
    image = qemu_img_create(tmp_path / "disk.qcow2", MIB)
    with open(image, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(">Q", value))
    server = start_server(args=["-f", "qcow2", str(image)], wait=False, allow_traceback=True)
    deadline = time.monotonic() + 20
    while message not in server.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert message in server.log(), server.log()
    if server.proc.poll() is None and server.port:
        refused = run(["nbdinfo", "--size", server.uri()], check=False)
        assert refused.returncode != 0


@pytest.mark.parametrize("options", [
    "cluster_size=64k",
    "cluster_size=512,preallocation=metadata",
    "cluster_size=2M,preallocation=full",
    "compat=0.10",
    "extended_l2=on,cluster_size=64k,preallocation=metadata",
    "compression_type=zstd,refcount_bits=8,lazy_refcounts=on",
])
def test_create_makes_images_qemu_img_accepts(options, tmp_path, start_server):
    image = tmp_path / "new.qcow2"
    run([*CREATE, "-f", "qcow2", "-o", options, str(image), "5M"])
    check_image(image)
    ours = json.loads(run([str(NBDSERVE_BIN), "info", "--output=json", str(image)]).stdout)
    theirs = json.loads(run(["qemu-img", "info", "--output=json", str(image)]).stdout)
    for key in ("format", "virtual-size", "cluster-size"):
        assert ours[key] == theirs[key]
    for key, value in theirs["format-specific"]["data"].items():
        if key in ("compat", "compression-type", "refcount-bits", "lazy-refcounts", "extended-l2", "corrupt"):
            assert ours["format-specific"]["data"][key] == value, key
    server = serve(start_server, image)
    qemu_io(server.uri(), "write -P 0x42 1M 1M", "flush")
    qemu_io(server.uri(), "read -P 0x42 1M 1M", "read -P 0 0 1M")
    check_image(image)


def test_create_raw_and_overlay_size_from_base(tmp_path):
    base = tmp_path / "base.raw"
    run([*CREATE, "-f", "raw", str(base), "3M"])
    assert base.stat().st_size == 3 * MIB
    run([*CREATE, "-b", str(base), "-F", "raw", str(tmp_path / "top.qcow2")])
    info = json.loads(run(["qemu-img", "info", "--output=json", str(tmp_path / "top.qcow2")]).stdout)
    assert info["virtual-size"] == 3 * MIB
    assert info["backing-filename-format"] == "raw"
    bad = run([*CREATE, "-o", "cluster_size=1000", str(tmp_path / "x.qcow2"), "1M"], check=False)
    assert bad.returncode == 2 and "cluster_size" in bad.stderr


def test_refcount_table_grows_with_tiny_caches(tmp_path, start_server):
    """512-byte clusters with 64-bit refcounts: a refcount block covers 8 clusters, so 2 MiB of
    writes outgrow the refcount table several times, while caches of two tables keep evicting."""
    image = qemu_img_create(tmp_path / "disk.qcow2", 4 * MIB, "cluster_size=512", "refcount_bits=64")
    table_before = struct.unpack(">QI", image.read_bytes()[48:60])
    data = random_bytes(2 * MIB, 9)
    server = start_server({"exports": {"disk": {"format": "qcow2", "source": str(image), "format-options": {
        "l2-cache-size": 1024, "refcount-cache-size": 1024}}}})
    handle = nbd.NBD()
    handle.connect_uri(server.uri("disk"))
    for offset in range(0, len(data), 256 * 1024):
        handle.pwrite(data[offset:offset + 256 * 1024], MIB + offset)
    handle.trim(64 * 1024, MIB)
    handle.flush()
    expected = bytearray(4 * MIB)
    expected[MIB:3 * MIB] = data
    expected[MIB:MIB + 64 * 1024] = bytes(64 * 1024)
    assert handle.pread(4 * MIB, 0) == expected
    handle.shutdown()
    table_after = struct.unpack(">QI", image.read_bytes()[48:60])
    assert table_after[1] > table_before[1], "the refcount table did not grow"
    check_image(image)
    assert_same_contents(image, write_raw(tmp_path / "expected.raw", bytes(expected)))


def test_internal_snapshots_are_served_read_only(tmp_path, start_server):
    image = qemu_img_create(tmp_path / "disk.qcow2", 2 * MIB)
    run(["qemu-io", "-f", "qcow2", str(image), "-c", "write -P 0x61 0 64k"])
    run(["qemu-img", "snapshot", "-c", "before", str(image)])
    run(["qemu-io", "-f", "qcow2", str(image), "-c", "write -P 0x62 0 4k"])
    server = serve(start_server, image, "-r")
    qemu_io(server.uri(), "read -P 0x62 0 4k", "read -P 0x61 4k 60k", read_only=True)
    writable = start_server(args=["-f", "qcow2", str(image)], wait=False, allow_traceback=True)
    deadline = time.monotonic() + 20
    while "internal snapshots" not in writable.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "can be served read-only only" in writable.log()
