"""Host-side checks of the ext4 filesystem a guest left in an image: no mount needed, e2fsprogs
read the image directly (debugfs dumps the files)."""

import hashlib
import json
import subprocess
from pathlib import Path


def create_image(path: Path, image_format: str, size: int) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", image_format, str(path), str(size)], check=True)
    return path


def raw_view(image: Path, image_format: str) -> Path:
    """The image itself when raw; for qcow2, `qemu-img check` must pass, then a raw copy."""
    if image_format == "raw":
        return image
    check = subprocess.run(["qemu-img", "check", "--output=json", str(image)], capture_output=True, text=True)
    assert check.returncode == 0, f"qemu-img check: {check.stdout}{check.stderr}"
    report = json.loads(check.stdout)
    assert report["check-errors"] == 0 and not report.get("corruptions") and not report.get("leaks"), report
    raw = image.with_name(image.name + ".raw")
    subprocess.run(["qemu-img", "convert", "-f", image_format, "-O", "raw", str(image), str(raw)], check=True)
    return raw


def e2fsck(image: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(["e2fsck", *flags, str(image)], capture_output=True, text=True)


def assert_clean(image: Path) -> None:
    check = e2fsck(image, "-fn")
    assert check.returncode == 0, f"e2fsck -fn exited {check.returncode}:\n{check.stdout}{check.stderr}"


def repair(image: Path) -> str:
    """Recover a filesystem a guest left mounted (journal replay); it must then be clean."""
    fix = e2fsck(image, "-fy")
    # 0: nothing to do; 1: errors corrected. Anything else means e2fsck could not repair it.
    assert fix.returncode in (0, 1), f"e2fsck -fy exited {fix.returncode}:\n{fix.stdout}{fix.stderr}"
    assert_clean(image)
    return fix.stdout


def file_sums(image: Path, dump_dir: Path) -> dict[str, str]:
    """path -> sha256 of every regular file in the image's filesystem."""
    dump_dir.mkdir()
    subprocess.run(["debugfs", "-R", f"rdump / {dump_dir}", str(image)], check=True, capture_output=True)
    return {
        str(path.relative_to(dump_dir)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(dump_dir.rglob("*"))
        if path.is_file()
    }
