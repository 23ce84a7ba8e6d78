"""Host-side checks of the images guests leave: `qemu-img check` for qcow2, and the ext4 filesystem
inside, read by e2fsprogs without mounting it (debugfs dumps the files)."""

import hashlib
import json
import re
import subprocess
from pathlib import Path

from conftest import run


def create_image(path: Path, image_format: str, size: int) -> Path:
    run(["qemu-img", "create", "-q", "-f", image_format, str(path), str(size)])
    return path


def raw_view(image: Path, image_format: str, *, allow_leaks: bool = False) -> Path:
    """The image itself when raw; for qcow2, `qemu-img check` must pass, then a raw copy."""
    if image_format == "raw":
        return image
    assert_qcow2_consistent(str(image), allow_leaks=allow_leaks)
    return copy_to_raw(str(image), image_format, image.with_name(image.name + ".raw"))


def without_backing(qcow2: Path) -> str:
    """A qemu-img filename for a qcow2 overlay alone, its backing file not opened."""
    return "json:" + json.dumps({"driver": "qcow2", "backing": None, "file": {"driver": "file", "filename": str(qcow2)}})


def assert_qcow2_consistent(spec: str, *, allow_leaks: bool = False) -> None:
    """No corruption; with `allow_leaks`, clusters allocated but unused (exit status 3) pass, as
    they may after a crash: a write that was never acknowledged, written again elsewhere."""
    check = run(["qemu-img", "check", "--output=json", spec], check=False)
    assert check.returncode in ((0, 3) if allow_leaks else (0,)), f"qemu-img check: {check.stdout}{check.stderr}"
    report = json.loads(check.stdout)
    assert report["check-errors"] == 0 and not report.get("corruptions"), report
    assert allow_leaks or not report.get("leaks"), report


def copy_to_raw(spec: str, image_format: str, raw: Path) -> Path:
    run(["qemu-img", "convert", "-f", image_format, "-O", "raw", spec, str(raw)], timeout=60)
    return raw


def e2fsck(image: Path, *flags: str) -> subprocess.CompletedProcess:
    return run(["e2fsck", *flags, str(image)], check=False)


def assert_clean(image: Path) -> None:
    check = e2fsck(image, "-fn")
    assert check.returncode == 0, f"e2fsck -fn exited {check.returncode}:\n{check.stdout}{check.stderr}"


def repair(image: Path) -> None:
    """Recover a filesystem a guest left mounted: the journal replayed, the only fixes allowed are
    the free block and inode counts (ext4 updates them lazily); it must then be clean."""
    fix = e2fsck(image, "-fy")
    # 0: nothing to do; 1: errors corrected. Anything else means e2fsck could not repair it.
    assert fix.returncode in (0, 1), f"e2fsck -fy exited {fix.returncode}:\n{fix.stdout}{fix.stderr}"
    fixes = re.findall(r"^(.*)\n(?:Fix|Clear|Salvage|Relocate)\? yes", fix.stdout, re.MULTILINE)
    unexpected = [problem for problem in fixes if not problem.startswith(("Free blocks count wrong", "Free inodes count wrong"))]
    assert not unexpected, fix.stdout
    assert_clean(image)


def file_sums(image: Path, dump_dir: Path) -> dict[str, str]:
    """path -> sha256 of every regular file in the image's filesystem."""
    dump_dir.mkdir()
    run(["debugfs", "-R", f"rdump / {dump_dir}", str(image)])
    return directory_sums(dump_dir)


def directory_sums(directory: Path) -> dict[str, str]:
    """path (relative to `directory`) -> sha256 of every regular file under it."""
    return {
        str(path.relative_to(directory)): sha256(path) for path in sorted(directory.rglob("*")) if path.is_file()
    }


def sha256(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()
