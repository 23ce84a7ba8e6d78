"""The rbd source against a real single-node Ceph cluster (the session fixture `ceph`): data
integrity checked against librbd's own view of the image, discard and zeroes, snapshots, block
status from fast-diff, QEMU's cache modes as librbd settings, real clients, and error paths."""

import errno
import json
import random
import time

import nbd
import pytest

from backends.rbd import RbdConfig, RbdDriver
from ceph_cluster import LIMITED_USER, POOL
from conftest import free_port, run
from nbdserve.backend import BackendError, OpenOptions
from test_interop import map_data_ranges, qemu_io
from test_interop_libnbd import HOLE_ZERO, connect, errno_of, extents  # noqa: F401 (fixture)

MiB = 1024 * 1024
OBJECT = 4 * MiB  # RBD's default object size: the granularity of fast-diff
SIZE = 32 * MiB


@pytest.fixture
def make_image(ceph, request):
    """make_image(size=SIZE, features=None, name=None) -> image name, unique to this test."""
    counter = iter(range(100))

    def make(size: int = SIZE, *, features: str | None = None, name: str | None = None) -> str:
        name = name or f"{request.node.name.replace('[', '-').rstrip(']')}-{next(counter)}"
        ceph.create_image(name, size, features=features)
        return name

    return make


@pytest.fixture
def serve_rbd(ceph, start_server):
    """serve_rbd(image, cache=..., read_only=..., **source settings) -> (server, export URI)."""

    def serve(image: str, *, cache: str = "writeback", read_only: bool = False, **source):
        settings = {"driver": "rbd", "pool": POOL, "image": image, "conf": str(ceph.conf),
                    "timeout": 20, **source}
        export = {"source": settings, "cache": cache, "read-only": read_only}
        server = start_server({"exports": {"disk": export}})
        return server, server.uri("disk")

    return serve


def test_data_integrity_against_librbd(ceph, make_image, serve_rbd):
    image = make_image()
    server, uri = serve_rbd(image)
    handle = nbd.NBD()
    handle.connect_uri(uri)
    assert handle.get_size() == SIZE
    rng = random.Random(9)
    shadow = bytearray(SIZE)
    # Unaligned writes, one across an object boundary, many in flight at once.
    writes = [(rng.randrange(SIZE - 2 * MiB), rng.randrange(1, 2 * MiB)) for _ in range(40)]
    writes.append((OBJECT - 1000, 5000))
    in_flight: list[tuple[int, int, int]] = []  # (cookie, offset, end)

    def settle(until) -> None:
        """Retire completed writes, polling while `until()` still holds. A write may complete
        while libnbd sends a later one, so retire before each poll: never wait on nothing."""
        while True:
            for item in [item for item in in_flight if handle.aio_command_completed(item[0])]:
                in_flight.remove(item)
            if not until():
                return
            handle.poll(-1)

    for offset, length in writes:
        # Overlapping writes in flight together may land in either order (NBD promises none).
        settle(lambda: any(start < offset + length and offset < end for _, start, end in in_flight))
        data = rng.randbytes(length)
        shadow[offset : offset + length] = data
        in_flight.append((handle.aio_pwrite(data, offset), offset, offset + length))
        settle(lambda: len(in_flight) > 16)
    settle(lambda: in_flight)
    handle.flush()
    assert handle.pread(SIZE, 0) == shadow
    assert handle.pread(3, OBJECT - 1) == shadow[OBJECT - 1 : OBJECT + 2]
    handle.shutdown()
    assert server.stop() == 0
    # What librbd itself reads after the server closed the image.
    assert ceph.export_bytes(image) == shadow


def test_discard_and_write_zeroes(make_image, serve_rbd, connect):
    image = make_image()
    _, uri = serve_rbd(image)
    handle = connect(uri)
    assert handle.can_trim() and handle.can_zero() and handle.can_fast_zero()
    handle.pwrite(b"\xff" * SIZE, 0)
    # A discarded whole object is gone: a hole that reads as zeroes.
    handle.trim(OBJECT, OBJECT)
    assert extents(handle, 3 * OBJECT, 0) == [(OBJECT, 0), (OBJECT, HOLE_ZERO), (OBJECT, 0)]
    assert handle.pread(OBJECT, OBJECT) == bytes(OBJECT)
    # Zeroes that may punch: exact bytes, whole objects become holes.
    handle.zero(2 * OBJECT - 100, 2 * OBJECT + 100, nbd.CMD_FLAG_FAST_ZERO)
    assert extents(handle, OBJECT, 3 * OBJECT) == [(OBJECT, HOLE_ZERO)]
    # NO_HOLE: zeroes are written, the object stays allocated, and that is not fast.
    handle.zero(MiB, 6 * OBJECT, nbd.CMD_FLAG_NO_HOLE)
    assert extents(handle, OBJECT, 6 * OBJECT) == [(OBJECT, 0)]
    assert errno_of(handle.zero, MiB, 6 * OBJECT, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FAST_ZERO) == 95  # ENOTSUP
    handle.flush()
    expected = bytearray(b"\xff" * SIZE)
    expected[OBJECT : 2 * OBJECT] = bytes(OBJECT)
    expected[2 * OBJECT + 100 : 4 * OBJECT] = bytes(2 * OBJECT - 100)
    expected[6 * OBJECT : 6 * OBJECT + MiB] = bytes(MiB)
    assert handle.pread(SIZE, 0) == expected


def test_block_status_from_fast_diff_or_all_data(make_image, serve_rbd, ceph):
    with_fast_diff = make_image()
    qemu_io(ceph.spec(with_fast_diff), f"write -P 0x5a {OBJECT + 512} 4096")
    _, uri = serve_rbd(with_fast_diff)
    nbdinfo = json.loads(run(["nbdinfo", "--map", "--json", uri]).stdout)
    assert [(e["offset"], e["length"], e["type"]) for e in nbdinfo] == [
        (0, OBJECT, 3), (OBJECT, OBJECT, 0), (2 * OBJECT, SIZE - 2 * OBJECT, 3),
    ]
    # Without fast-diff, diff_iterate would read every object: everything is reported as data.
    plain = make_image(features="layering")
    _, uri = serve_rbd(plain)
    entries = json.loads(run(["qemu-img", "map", "--output=json", "-f", "raw", uri]).stdout)
    assert map_data_ranges(entries) == [(0, SIZE)]


def test_snapshot_is_exported_read_only(ceph, make_image, serve_rbd, start_server, connect):
    image = make_image()
    qemu_io(ceph.spec(image), "write -P 0x11 0 1M")
    ceph.rbd("snap", "create", f"{POOL}/{image}@before")
    qemu_io(ceph.spec(image), "write -P 0x22 0 1M", "write -P 0x22 8M 1M")
    # By config key, with read-only not asked for: a snapshot cannot be written.
    _, uri = serve_rbd(image, snapshot="before")
    handle = connect(uri, strict=False)
    assert handle.is_read_only()
    assert handle.pread(MiB, 0) == b"\x11" * MiB
    assert extents(handle, SIZE, 0) == [(OBJECT, 0), (SIZE - OBJECT, HOLE_ZERO)]
    assert errno_of(handle.pwrite, b"\x33" * 4096, 0) == errno.EPERM
    # By QEMU's syntax on the command line.
    server = start_server(args=["-x", "snap", ceph.spec(f"{image}@before")])
    assert connect(server.uri("snap")).pread(2 * MiB, 0) == b"\x11" * MiB + bytes(MiB)
    # The image itself, read-only: opened without taking its exclusive lock, so QEMU still writes.
    _, uri = serve_rbd(image, read_only=True)
    assert connect(uri).pread(MiB, 8 * MiB) == b"\x22" * MiB
    qemu_io(ceph.spec(image), "write -P 0x44 16M 1M", "read -P 0x22 0 1M")


def test_real_clients_and_qemu_rbd_agree(ceph, make_image, start_server, tmp_path):
    image = make_image()
    # QEMU's syntax on the command line, as `qemu-nbd -f raw rbd:...` takes it.
    server = start_server(args=["-x", "disk", "--cache", "none", ceph.spec(image) + ":id=admin"])
    uri = server.uri("disk")
    info = json.loads(run(["qemu-img", "info", "--output=json", uri]).stdout)
    assert info["virtual-size"] == SIZE
    qemu_io(uri, "write -P 0xab 1M 1M", "read -P 0xab 1M 1M", "write -z 8M 4M", "discard 16M 4M",
            "flush", "read -P 0 16M 4M")
    nbdinfo = json.loads(run(["nbdinfo", "--json", uri]).stdout)["exports"][0]
    assert nbdinfo["can_multi_conn"] is True
    assert nbdinfo["can_flush"] and nbdinfo["can_trim"] and nbdinfo["can_fast_zero"]
    # nbdcopy in (several connections: multi-conn) and back out.
    source = tmp_path / "source.img"
    source.write_bytes(random.Random(4).randbytes(SIZE // 2) + bytes(SIZE // 2))
    run(["nbdcopy", str(source), uri])
    copy = tmp_path / "copy.img"
    run(["nbdcopy", uri, str(copy)])
    assert copy.read_bytes() == source.read_bytes()
    # The export and QEMU's own rbd driver see the same bytes.
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", uri, ceph.spec(image)])
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), ceph.spec(image)])


def test_namespace_with_limited_user_by_monitor_address(ceph, make_image, serve_rbd):
    ceph.rbd("namespace", "create", f"{POOL}/tenant")
    make_image(name="tenant/disk")
    _, uri = serve_rbd(
        "disk", namespace="tenant", user=LIMITED_USER, keyring=str(ceph.user_keyring),
        conf=None, **{"mon-host": ceph.mon_host},
    )
    qemu_io(uri, "write -P 0x7e 0 64k", "flush", "read -P 0x7e 0 64k")
    qemu_io(ceph.spec("tenant/disk"), "read -P 0x7e 0 64k")


@pytest.mark.parametrize(
    ("cache", "rbd_cache", "policy"),
    [("none", "false", None), ("writethrough", "true", "writethrough"), ("writeback", "true", "writearound")],
)
def test_cache_modes_become_librbd_settings(ceph, make_image, serve_rbd, cache, rbd_cache, policy):
    server, uri = serve_rbd(make_image(), cache=cache)
    run(["nbdinfo", "--size", uri])
    # The server's librados client has an admin socket (ceph.conf's [client] section).
    socket = ceph.dir / "run" / f"client.admin.{server.proc.pid}.asok"

    def setting(name: str) -> str:
        return json.loads(ceph.run("ceph", "--admin-daemon", str(socket), "config", "get", name))[name]

    assert setting("rbd_cache") == rbd_cache
    if policy:
        assert setting("rbd_cache_policy") == policy
    assert setting("rados_osd_op_timeout") == "20"
    assert setting("client_mount_timeout") == "20"


def test_qcow2_over_rbd(ceph, make_image, start_server, tmp_path):
    # A qcow2 image whose bytes live in an RBD image, with room for clusters to be allocated.
    local = tmp_path / "disk.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(local), str(SIZE)])
    image = make_image(2 * SIZE)
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(local), ceph.spec(image)])
    server = start_server(args=["-x", "disk", "-f", "qcow2", ceph.spec(image)])
    uri = server.uri("disk")
    qemu_io(uri, "write -P 0x42 1M 3M", "write -P 0x43 20M 64k", "flush")
    entries = json.loads(run(["qemu-img", "map", "--output=json", "-f", "raw", uri]).stdout)
    assert map_data_ranges(entries) == [(MiB, 4 * MiB), (20 * MiB, 20 * MiB + 65536)]
    # QEMU's own qcow2 and rbd drivers, reading the RBD image directly, agree with the export.
    run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", uri, ceph.spec(image)])
    check = run(["qemu-img", "check", "-f", "qcow2", ceph.spec(image)])
    assert "No errors were found" in check.stdout


# Error paths, in-process: the messages a user sees in the log when an export cannot open.


async def open_error(config: RbdConfig) -> BackendError:
    with pytest.raises(BackendError) as caught:
        backend = await RbdDriver().open(config, OpenOptions())
        await backend.close()
    return caught.value


async def test_missing_pool_image_and_snapshot(ceph, make_image):
    image = make_image()

    def config(**settings) -> RbdConfig:
        return RbdConfig(**{"pool": POOL, "image": image, "conf": ceph.conf, "timeout": 10, **settings})

    error = await open_error(config(image="nope"))
    assert (error.errno, error.strerror) == (2, "image 'rbd/nope' does not exist: No such file or directory")
    error = await open_error(config(snapshot="nope"))
    assert error.strerror.startswith(f"image 'rbd/{image}@nope' does not exist")
    error = await open_error(config(pool="nopool"))
    assert error.strerror.startswith("pool 'nopool' does not exist")
    error = await open_error(config(conf=None, mon_host=ceph.mon_host, keyring=ceph.admin_keyring,
                                    user=LIMITED_USER))
    assert error.errno == 13
    assert error.strerror.startswith(f"cannot connect to the Ceph cluster as client.{LIMITED_USER}")
    error = await open_error(config(conf=ceph.dir / "missing.conf"))
    assert error.strerror.startswith(f"cannot read the Ceph config {ceph.dir / 'missing.conf'}")


def test_unreachable_cluster_fails_within_the_timeout(ceph, start_server):
    nobody = f"v2:127.0.0.1:{free_port()}"
    source = {"driver": "rbd", "pool": POOL, "image": "x", "mon-host": nobody,
              "keyring": str(ceph.admin_keyring), "timeout": 2}
    started = time.monotonic()
    server = start_server({"exports": {"disk": {"source": source}}}, wait=False)
    assert server.proc.wait(30) == 1
    assert time.monotonic() - started < 15
    assert (f"nbdserve: error: cannot open export 'disk': cannot reach the Ceph cluster at {nobody} "
            "within 2 s: Connection timed out") in server.log()
