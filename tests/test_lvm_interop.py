"""Real clients (qemu-img, qemu-io, nbdinfo, nbdcopy) on an LV export, in every cache mode."""

import json
import os
import random

import pytest
from conftest import run
from lvm_fixtures import lvm  # noqa: F401 (a fixture)

MIB = 1 << 20
DISK = 32 * MIB
NEIGHBOUR = 8 * MIB
CACHE_MODES = ["writeback", "writethrough", "none", "directsync", "unsafe"]
MODE_DISK = 16 * MIB


@pytest.fixture
def volume_group(lvm):
    """A VG with the LV under test, `disk`, between two others that must stay untouched."""
    vg = lvm.create_vg()
    lvm.create_lv(vg, "before", NEIGHBOUR)
    lvm.create_lv(vg, "disk", DISK)
    lvm.create_lv(vg, "after", NEIGHBOUR)
    yield vg
    for name in ("before", "after"):
        with open(lvm.loop_of(vg, name), "rb") as device:
            assert device.read() == bytes(NEIGHBOUR), f"I/O on 'disk' reached LV {name!r}"


def serve_group(lvm, start_server, vg, cache="none"):
    source = {"driver": "lvm", "vg": vg, "lvm-env": lvm.env}
    return start_server({"exports": {"vms": {"source": source, "cache": cache}}})


def qemu_io(uri: str, *commands: str) -> str:
    result = run(["qemu-io", "-f", "raw", *(arg for command in commands for arg in ("-c", command)), uri])
    # qemu-io reports failed commands on stdout and still exits 0.
    assert "failed" not in result.stdout and "error" not in result.stdout.lower(), result.stdout
    return result.stdout


def test_qemu_io_every_request_type_in_every_cache_mode(lvm, start_server):
    """One LV per cache mode, all served at once; every request type on each, then read back."""
    vg = lvm.create_vg(size=len(CACHE_MODES) * MODE_DISK + 8 * MIB)
    exports = {}
    for mode in CACHE_MODES:
        lvm.create_lv(vg, mode, MODE_DISK)
        exports[mode] = {"source": {"driver": "lvm", "vg": vg, "lv": mode, "lvm-env": lvm.env}, "cache": mode}
    server = start_server({"exports": exports})
    for mode in CACHE_MODES:
        qemu_io(
            server.uri(mode),
            "write -P 0xa1 0 4M",
            "write -f -P 0xa2 4M 64k",  # FUA
            "write -P 0xa3 5M 1536",  # not 4 KiB-aligned: read-modify-write under O_DIRECT
            "discard 8M 1M",  # TRIM as BLKDISCARD
            "write -P 0xa4 12M 1M",
            "write -z 12M 1M",  # WRITE_ZEROES as BLKZEROOUT, without unmapping
            "write -P 0xa5 14M 1M",
            "write -z -u 14M 1M",
            "flush",
            f"write -P 0xa6 {MODE_DISK - MIB} 1M",  # the last MiB: the LV ends where lvm says
        )
    for mode in CACHE_MODES:  # after all the writes: none may have reached another LV
        qemu_io(
            server.uri(mode),
            "read -P 0xa1 0 4M",
            "read -P 0xa2 4M 64k",
            "read -P 0xa3 5M 1536",
            "read -P 0 8M 1M",
            "read -P 0 12M 1M",
            "read -P 0 14M 1M",
            f"read -P 0xa6 {MODE_DISK - MIB} 1M",
        )


def test_trim_gives_the_space_back(lvm, volume_group, start_server):
    """TRIM is BLKDISCARD on the LV, which reaches the storage under it (here: the PV's file)."""
    server = serve_group(lvm, start_server, volume_group)
    image = lvm.images[volume_group]

    def allocated() -> int:
        os.sync()
        return os.stat(image).st_blocks * 512

    empty = allocated()
    qemu_io(server.uri("disk"), "write -P 0x3c 0 16M", "flush")
    assert allocated() >= empty + 16 * MIB
    qemu_io(server.uri("disk"), "discard 0 16M", "flush")
    assert allocated() < empty + MIB


def test_nbdinfo_shows_the_device(lvm, volume_group, start_server):
    server = serve_group(lvm, start_server, volume_group)
    info = json.loads(run(["nbdinfo", "--json", server.uri("disk")]).stdout)
    export = info["exports"][0]
    assert export["export-size"] == DISK
    assert export["block_size_minimum"] == 512  # the LV's logical block size, for O_DIRECT
    assert export["can_trim"] and export["can_zero"] and export["can_multi_conn"]
    listing = run(["nbdinfo", "--list", server.uri()]).stdout
    assert all(f'export="{name}"' in listing for name in ("before", "disk", "after"))


def test_nbdcopy_and_qemu_img_round_trip(lvm, volume_group, start_server, tmp_path):
    server = serve_group(lvm, start_server, volume_group)
    uri = server.uri("disk")
    image = tmp_path / "image.raw"
    image.write_bytes(random.Random(5).randbytes(DISK))
    run(["nbdcopy", str(image), uri])
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), uri])
    copy = tmp_path / "copy.raw"
    run(["nbdcopy", uri, str(copy)])
    assert copy.read_bytes() == image.read_bytes()
    info = json.loads(run(["qemu-img", "info", "--output=json", uri]).stdout)
    assert info["virtual-size"] == DISK
    # qemu-img convert onto the LV: zeroes where the source has holes.
    sparse = tmp_path / "sparse.raw"
    with open(sparse, "wb") as f:
        f.truncate(DISK)
        f.seek(3 * MIB)
        f.write(b"\x77" * MIB)
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(sparse), uri])
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(sparse), uri])


@pytest.mark.parametrize("cache", ["none", "writeback"])
def test_qcow2_on_an_lv(lvm, volume_group, start_server, tmp_path, cache):
    """oVirt's layout: a qcow2 image on an LV, served through the format layered on the lvm source."""
    device = lvm.loop_of(volume_group, "disk")
    run(["qemu-img", "create", "-q", "-f", "qcow2", device, str(DISK // 2)])
    source = {"driver": "lvm", "vg": volume_group, "lv": "disk", "lvm-env": lvm.env}
    server = start_server({"exports": {"vm": {"source": source, "format": "qcow2", "cache": cache}}})
    uri = server.uri("vm")
    info = json.loads(run(["qemu-img", "info", "--output=json", uri]).stdout)
    assert info["virtual-size"] == DISK // 2  # the guest's view, not the LV's
    image = tmp_path / "guest.raw"
    image.write_bytes(random.Random(7).randbytes(DISK // 2))
    run(["nbdcopy", str(image), uri])
    qemu_io(uri, "discard 1M 1M", "write -z 3M 64k", "flush")
    with open(image, "r+b") as f:
        for offset, length in ((1 * MIB, MIB), (3 * MIB, 64 << 10)):
            f.seek(offset)
            f.write(bytes(length))
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), uri])
    server.stop()
    # The LV holds a consistent qcow2 image with that content.
    run(["qemu-img", "check", "-q", "-f", "qcow2", device])
    run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", str(image), device])
