"""Helpers for the qcow2 tests: images, qemu-img checks, and a shadow copy that mirrors what an
NBD client did to an export."""

import json
import os
import random
import subprocess
import time
from pathlib import Path

import nbd

from conftest import run

NBDSERVE_BIN = Path(os.environ.get("VIRTUAL_ENV", Path(__file__).parents[1] / ".venv")) / "bin" / "nbdserve"
CREATE = [str(NBDSERVE_BIN), "create"]


def qemu_img_create(path: Path, size: int, *options: str, backing: Path | None = None,
                    backing_format: str = "qcow2") -> Path:
    command = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if options:
        command += ["-o", ",".join(options)]
    if backing is not None:
        command += ["-b", str(backing), "-F", backing_format]
    run([*command, str(path), str(size)])
    return path


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def write_raw(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def check_image(path: Path, *, leaks_allowed: bool = False) -> dict:
    """`qemu-img check`: no corruption, and no leaks unless allowed; returns its JSON report."""
    result = run(["qemu-img", "check", "--output=json", str(path)], check=False)
    report = json.loads(result.stdout) if result.stdout.strip() else {}
    assert result.returncode in ((0, 3) if leaks_allowed else (0,)), (result.stdout, result.stderr)
    assert not report.get("corruptions") and not report.get("check-errors"), report
    if not leaks_allowed:
        assert not report.get("leaks"), report
    return report


def assert_same_contents(image: Path, shadow: Path, fmt: str = "qcow2") -> None:
    run(["qemu-img", "compare", "-f", fmt, "-F", "raw", str(image), str(shadow)])


def file_map(image: Path) -> list[tuple[int, int, bool, bool]]:
    entries = json.loads(run(["qemu-img", "map", "--output=json", "-f", "qcow2", str(image)]).stdout)
    return merge_map(entries)


def nbd_map(uri: str) -> list[tuple[int, int, bool, bool]]:
    entries = json.loads(run(["qemu-img", "map", "--output=json", "-f", "raw", uri]).stdout)
    return merge_map(entries)


def merge_map(entries: list[dict]) -> list[tuple[int, int, bool, bool]]:
    """(start, length, data, zero) with neighbours of equal status merged."""
    merged: list[list] = []
    for entry in entries:
        status = (entry["data"], entry["zero"])
        if merged and tuple(merged[-1][2:]) == status and merged[-1][0] + merged[-1][1] == entry["start"]:
            merged[-1][1] += entry["length"]
        else:
            merged.append([entry["start"], entry["length"], *status])
    return [tuple(item) for item in merged]


def depth_map(uri: str) -> list[tuple[int, int, int]]:
    """(start, length, depth) of qemu:allocation-depth over the whole export, equal neighbours
    merged."""
    handle = nbd.NBD()
    handle.add_meta_context("qemu:allocation-depth")
    handle.connect_uri(uri)
    assert handle.can_meta_context("qemu:allocation-depth")
    size, offset, merged = handle.get_size(), 0, []

    def collect(context, start, entries, error):
        if context == "qemu:allocation-depth":
            got.extend(zip(entries[::2], entries[1::2]))
        return 0

    while offset < size:
        got = []
        handle.block_status(size - offset, offset, collect)
        for length, depth in got:
            if merged and merged[-1][2] == depth:
                merged[-1][1] += length
            else:
                merged.append([offset, length, depth])
            offset += length
    handle.shutdown()
    return [tuple(entry) for entry in merged]


def qemu_nbd_depth_map(image: Path, image_format: str, tmp_path: Path) -> list[tuple[int, int, int]]:
    """depth_map of `image` served by qemu-nbd -A, the oracle."""
    socket = tmp_path / "qemu-nbd.sock"
    qemu_nbd = subprocess.Popen(["qemu-nbd", "-r", "-A", "-f", image_format, "-k", str(socket), str(image)])
    try:
        deadline = time.monotonic() + 10
        while not socket.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return depth_map(f"nbd+unix:///?socket={socket}")
    finally:
        qemu_nbd.terminate()
        qemu_nbd.wait()
