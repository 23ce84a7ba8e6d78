"""A real QEMU guest on nbdserve disks: it makes an ext4 filesystem, writes files with known
checksums and reads them back after a reboot; the host then checks the image (e2fsck, qemu-img
check) and every file. The guest also keeps writing through a server crash and restart.

The guest is built from Debian packages by tests/guest/build.py and runs under TCG here (see
tests/guest/vm.py); each boot takes 5-10 s, so the cases are chosen to cover each cache mode, drive
spec and format once rather than every combination.
"""

from importlib.metadata import entry_points
from pathlib import Path

import pytest

from conftest import free_port
from guest.build import guest as build_guest
from guest.disk import assert_clean, create_image, file_sums, raw_view, repair
from guest.vm import reconnecting_drive, run_guest, start_guest, uri_drive

pytestmark = pytest.mark.slow

EXPORT = "vm"
DISK_SIZE = 64 * 1024 * 1024
WRITTEN_FILES = 97  # what the guest's mkfs-write program writes: one big file and 96 small ones
FSYNC_FILES = 40  # what its fsync-loop program writes, each fsync'd before the next
RECONNECT_DELAY = 30  # seconds QEMU holds the guest's requests while the server is down


def qcow2_case(*values):
    """A qcow2 case: runs once the qcow2 format driver is registered."""
    registered = {entry.name for entry in entry_points(group="nbdserve.formats")}
    return pytest.param(
        "qcow2", *values, marks=pytest.mark.skipif("qcow2" not in registered, reason="no qcow2 format driver yet")
    )


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
    raw = raw_view(image, image_format)
    if crashed:
        repair(raw)
    else:
        assert_clean(raw)
    return file_sums(raw, tmp_path / "files")


# (format, cache mode, drive spec, verify in a second boot). The server and QEMU use the same
# cache mode, so QEMU's flush path (writeback, none, unsafe) and its FUA path (writethrough,
# directsync) both run. Every case is checked on the host; two also boot again to read back.
@pytest.mark.parametrize(
    "image_format, cache, form, second_boot",
    [
        ("raw", "writeback", "legacy", True),
        ("raw", "writethrough", "uri", True),
        ("raw", "none", "unix", False),
        ("raw", "directsync", "legacy", False),
        ("raw", "unsafe", "uri", False),
        qcow2_case("writeback", "uri", True),
        qcow2_case("directsync", "unix", False),
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
        qcow2_case("writeback", False),
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
        server.proc.kill()  # SIGKILL while the guest writes and fsyncs
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
    # The guest dropped its own cache and read every file back through the restarted server.
    assert run.sums() == fsynced
    restarted.stop()
    # Every file whose fsync returned, before the kill or after, is intact on the disk.
    assert host_file_sums(image, image_format, tmp_path, crashed=True) == fsynced
