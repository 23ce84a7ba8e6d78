"""A real QEMU guest on nbdserve disks: it makes an ext4 filesystem, writes files with known
checksums and reads them back after a reboot; the host then checks the image (e2fsck, qemu-img
check) and every file. The guest also keeps writing through a server crash and restart, and runs
on a qcow2 overlay whose base image nginx serves.

The guest is built from Debian packages by tests/guest/build.py and runs under TCG here (see
tests/guest/vm.py); each boot takes 5-10 s, so the cases are chosen to cover each cache mode, drive
spec and format once rather than every combination.
"""

import os
import signal
from pathlib import Path

import pytest

from conftest import free_port, run
from guest.build import guest as build_guest
from guest.disk import (
    assert_clean, assert_qcow2_consistent, copy_to_raw, create_image, directory_sums, file_sums, raw_view,
    repair, sha256, without_backing,
)
from guest.vm import reconnecting_drive, run_guest, start_guest, uri_drive
from http_servers import nginx  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow

EXPORT = "vm"
DISK_SIZE = 64 * 1024 * 1024
WRITTEN_FILES = 97  # what the guest's mkfs-write program writes: one big file and 96 small ones
FSYNC_FILES = 40  # what its fsync-loop program writes, each fsync'd before the next
RECONNECT_DELAY = 30  # seconds QEMU holds the guest's requests while the server is down


@pytest.fixture(scope="session")
def guest():
    return build_guest()


def export_config(image: Path, image_format: str, cache: str) -> dict:
    return {"exports": {EXPORT: {"format": image_format, "cache": cache, "source": {"driver": "file", "path": str(image)}}}}


def drive_spec(server, form: str) -> str:
    """The disk as QEMU names it: the legacy `nbd:` spec or a URI (nbd:// or nbd+unix://)."""
    if form == "legacy":
        return f"nbd:127.0.0.1:{server.port}:exportname={EXPORT}"
    return server.uri(EXPORT)


def host_file_sums(image: Path, image_format: str, tmp_path: Path, *, crashed: bool = False) -> dict[str, str]:
    """The files in the image as the host reads them, after qemu-img check (qcow2) and e2fsck: a
    crashed guest's filesystem must first repair cleanly, any other must already be clean."""
    raw = raw_view(image, image_format, allow_leaks=crashed)
    if crashed:
        repair(raw)
    else:
        assert_clean(raw)
    return file_sums(raw, tmp_path / "files")


# (format, cache mode, drive spec, verify in a second boot). The server and QEMU use the same
# cache mode, so QEMU's flush path (writeback, none, unsafe) and its FUA path (writethrough,
# directsync) both run. Every case is checked on the host; some also boot again to read back.
@pytest.mark.parametrize(
    "image_format, cache, form, second_boot",
    [
        ("raw", "writeback", "legacy", True),
        ("raw", "writethrough", "uri", False),
        ("raw", "none", "unix", False),
        ("raw", "directsync", "legacy", False),
        ("raw", "unsafe", "uri", False),
        ("qcow2", "writeback", "uri", True),
        ("qcow2", "writethrough", "legacy", False),
        ("qcow2", "directsync", "unix", False),
    ],
)
def test_guest_filesystem_round_trip(guest, start_server, tmp_path, image_format, cache, form, second_boot):
    image = create_image(tmp_path / f"disk.{image_format}", image_format, DISK_SIZE)
    server = start_server(export_config(image, image_format, cache), unix=form == "unix")
    drive = uri_drive(drive_spec(server, form), cache)

    written = run_guest(guest, "mkfs-write", drive, tmp_path).sums()
    assert len(written) == WRITTEN_FILES
    if second_boot:
        assert run_guest(guest, "verify", drive, tmp_path).sums() == written
    server.stop()
    assert host_file_sums(image, image_format, tmp_path) == written


# (format, cache mode, drop the host's page cache while the server is down)
@pytest.mark.parametrize(
    "image_format, cache, drop_caches",
    [
        ("raw", "writeback", False),
        ("raw", "writethrough", True),
        ("raw", "none", True),
        ("qcow2", "writethrough", True),
        ("qcow2", "writeback", False),
    ],
)
def test_guest_survives_server_crash(guest, start_server, tmp_path, image_format, cache, drop_caches):
    image = create_image(tmp_path / f"disk.{image_format}", image_format, DISK_SIZE)
    config = export_config(image, image_format, cache)
    port = free_port()
    server = start_server(config, port=port)
    drive = reconnecting_drive(port, EXPORT, cache, RECONNECT_DELAY)
    run = start_guest(guest, "fsync-loop", drive, tmp_path, files=FSYNC_FILES)
    try:
        run.wait_for("fsynced", 8)
        server.send_signal(signal.SIGKILL)  # while the guest writes and fsyncs
        server.proc.wait()
        fsynced_before_kill = run.fsynced()
        if drop_caches:  # what the server wrote must come back from the disk, not the page cache
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
        restarted = start_server(config, port=port)
        fsynced_before_restart = len(run.fsynced())
        run.wait()
    finally:
        run.stop()

    fsynced = run.fsynced()
    assert len(fsynced_before_kill) >= 8
    assert len(fsynced) == FSYNC_FILES > fsynced_before_restart  # writes went on after the restart
    killed_after = f"the server was killed after fsync/{len(fsynced_before_kill)}"
    # The guest dropped its own cache and read every file back through the restarted server.
    assert damaged(fsynced, run.sums()) == [], killed_after
    restarted.stop()
    # Every file whose fsync returned, before the kill or after, is intact on the disk.
    on_disk = host_file_sums(image, image_format, tmp_path, crashed=True)
    assert damaged(fsynced, on_disk) == [], killed_after
    assert on_disk.keys() == fsynced.keys()


def damaged(fsynced: dict[str, str], found: dict[str, str]) -> list[str]:
    """The fsync'd files that read back with other contents, or not at all."""
    return [path for path, digest in fsynced.items() if found.get(path) != digest]


def test_guest_on_qcow2_overlay_of_http_base(guest, start_server, tmp_path, nginx):
    """The base image lives on a web server (nginx), a local qcow2 overlay takes the guest's writes."""
    base_files = tmp_path / "base-files"
    base_files.mkdir()
    (base_files / "big").write_bytes(os.urandom(1024 * 1024))
    for index in range(16):
        (base_files / f"small{index}").write_bytes(os.urandom(index * 1500 + 1))
    base = nginx.root / "base.img"
    run(["mke2fs", "-q", "-t", "ext4", "-d", str(base_files), str(base), f"{DISK_SIZE // 1024}k"])
    base_digest = sha256(base)
    overlay = tmp_path / "overlay.qcow2"
    # -u: qemu-img need not reach the base; nbdserve opens it from the URL in the overlay.
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", nginx.url("base.img"), "-F", "raw",
         str(overlay), str(DISK_SIZE)])
    server = start_server(export_config(overlay, "qcow2", "writeback"))

    seen = run_guest(guest, "add-files", uri_drive(server.uri(EXPORT), "writeback"), tmp_path).sums()
    flat = copy_to_raw(server.uri(EXPORT), "raw", tmp_path / "flat.raw")
    server.stop()

    added = {path: digest for path, digest in seen.items() if path.startswith("added/")}
    assert len(added) == 16
    assert seen == directory_sums(base_files) | added
    assert sha256(base) == base_digest  # the guest's writes went to the overlay only
    assert_qcow2_consistent(without_backing(overlay))
    assert_clean(flat)
    assert file_sums(flat, tmp_path / "files") == seen
