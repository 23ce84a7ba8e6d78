"""Real lvm2 on loop devices, on machines without device-mapper.

lvm2 runs with a private LVM_SYSTEM_DIR: activation off, device nodes in a private directory and a
filter that accepts only this sandbox's PVs, so it never sees (or touches) the host's disks. As
the kernel cannot activate LVs, `activate()` does what dm-linear would: a loop device over the PV
at the LV's offset and size, and a link at the path lvm reports for the LV. The server under test
does not know: it asks lvm for the path and opens it.

Every loop device made here is detached at teardown, and only those: before detaching, the
kernel's record of the loop's backing file is checked to be inside this sandbox.
"""

import json
import os
import stat
import subprocess
import uuid
from pathlib import Path

import pytest

LVM_CONF = """\
devices {{
    dir = "{dev}"
    scan = [ "{dev}" ]
    global_filter = [ "a|/pv[0-9]+$|", "r|.*|" ]
    obtain_device_list_from_udev = 0
    use_devicesfile = 0
    external_device_info_source = "none"
}}
global {{ activation = 0 locking_dir = "{lock}" }}
activation {{ udev_sync = 0 udev_rules = 0 monitoring = 0 }}
backup {{ backup = 0 archive = 0 }}
"""


class LvmSandbox:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.dev = root / "dev"
        self.etc = root / "etc"
        for directory in (self.dev, self.etc, root / "lock", root / "images"):
            directory.mkdir(parents=True)
        (self.etc / "lvm.conf").write_text(LVM_CONF.format(dev=self.dev, lock=root / "lock"))
        self.env = {"LVM_SYSTEM_DIR": str(self.etc), "LVM_SUPPRESS_FD_WARNINGS": "1"}
        self._pv_loops: list[str] = []
        self._lv_loops: dict[str, str] = {}  # "VG/LV" -> the loop device standing in for dm-linear
        self._groups: list[str] = []
        self.images: dict[str, Path] = {}  # VG -> the file behind its PV

    def lvm(self, *args: str) -> str:
        result = subprocess.run(
            ["lvm", *args], capture_output=True, text=True, env={**os.environ, **self.env}, timeout=60
        )
        if result.returncode != 0:
            raise AssertionError(f"lvm {' '.join(args)} exited {result.returncode}: {result.stderr}")
        return result.stdout

    def report(self, command: str, fields: str, *args: str) -> list[dict]:
        output = self.lvm(command, "--reportformat", "json", "--units", "b", "--nosuffix", "-o", fields, *args)
        return [row for report in json.loads(output)["report"] for rows in report.values() for row in rows]

    # Volume groups and LVs.

    def create_vg(self, size: int = 64 << 20, name: str | None = None) -> str:
        """A VG on one new PV (a loop device over a sparse file); returns its (unique) name."""
        index = len(self._pv_loops)
        image = self.root / "images" / f"pv{index}.img"
        with open(image, "wb") as f:
            f.truncate(size)
        loop = _losetup("--find", "--show", str(image))
        self._pv_loops.append(loop)
        node = self.dev / f"pv{index}"
        os.mknod(node, stat.S_IFBLK | 0o600, os.stat(loop).st_rdev)
        name = name or f"vg{uuid.uuid4().hex[:8]}"
        self.lvm("pvcreate", "-q", str(node))
        self.lvm("vgcreate", "-q", name, str(node))
        self._groups.append(name)
        self.images[name] = image
        return name

    def create_lv(self, vg: str, name: str, size: int, *, tags=(), activate: bool = True) -> str:
        """A linear LV, "activated" unless told not to; returns the path lvm reports for it."""
        tag_args = [arg for tag in tags for arg in ("--addtag", tag)]
        self.lvm("lvcreate", "-q", "-n", name, "-L", f"{size}b", *tag_args, vg)
        if activate:
            self.activate(vg, name)
        return self.lv_path(vg, name)

    def remove_lv(self, vg: str, name: str) -> None:
        """lvremove, then take the device away as deactivation would."""
        self.lvm("lvremove", "-q", "-f", f"{vg}/{name}")
        self.deactivate(vg, name)

    def lv_path(self, vg: str, name: str) -> str:
        return self.report("lvs", "lv_path", f"{vg}/{name}")[0]["lv_path"]

    # Activation, as dm-linear would do it.

    def activate(self, vg: str, name: str) -> str:
        """A loop device over the PV at the LV's offset and size, linked at the LV's path."""
        segments = [
            row for row in self.report(
                "pvs", "pv_name,vg_name,pe_start,pvseg_start,vg_extent_size,lv_name,segtype,seg_size_pe",
                "--segments",
            )
            if row["vg_name"] == vg and row["lv_name"] == name
        ]
        assert len(segments) == 1 and segments[0]["segtype"] == "linear", f"not one linear segment: {segments}"
        segment = segments[0]
        extent = int(segment["vg_extent_size"])
        offset = int(segment["pe_start"]) + int(segment["pvseg_start"]) * extent
        size = int(segment["seg_size_pe"]) * extent
        loop = _losetup("--find", "--show", "--offset", str(offset), "--sizelimit", str(size), segment["pv_name"])
        self._lv_loops[f"{vg}/{name}"] = loop
        path = Path(self.lv_path(vg, name))
        path.parent.mkdir(exist_ok=True)
        path.symlink_to(loop)
        return loop

    def deactivate(self, vg: str, name: str) -> None:
        loop = self._lv_loops.pop(f"{vg}/{name}")
        link = self.dev / vg / name
        if link.is_symlink():
            link.unlink()
        self._detach(loop)

    def loop_of(self, vg: str, name: str) -> str:
        return self._lv_loops[f"{vg}/{name}"]

    def cleanup(self) -> None:
        """Detach every loop device made here (LVs first, then PVs); report what failed."""
        problems = []
        for key in list(self._lv_loops):
            try:
                self.deactivate(*key.split("/"))
            except Exception as exc:  # keep going: the PVs must be detached too
                problems.append(f"{key}: {exc}")
        for vg in self._groups:
            try:
                self.lvm("vgremove", "-q", "-ff", vg)
            except AssertionError as exc:
                problems.append(str(exc))
        for loop in self._pv_loops:
            try:
                self._detach(loop)
            except Exception as exc:
                problems.append(f"{loop}: {exc}")
        self._pv_loops.clear()
        assert not problems, "LVM sandbox cleanup: " + "; ".join(problems)

    def _detach(self, loop: str) -> None:
        backing = Path(f"/sys/block/{Path(loop).name}/loop/backing_file")
        try:
            ours = backing.read_text().strip().startswith(str(self.root))
        except FileNotFoundError:
            return  # already gone
        if ours:
            # Still open (a server holds the LV): the kernel detaches it at the last close.
            subprocess.run(["losetup", "--detach", loop], capture_output=True, timeout=30)


def _losetup(*args: str) -> str:
    result = subprocess.run(["losetup", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise AssertionError(f"losetup {' '.join(args)} failed: {result.stderr}")
    return result.stdout.strip()


@pytest.fixture
def lvm(tmp_path):
    """An LvmSandbox; request it before start_server, so servers stop before it is torn down."""
    sandbox = LvmSandbox(tmp_path / "lvm")
    try:
        yield sandbox
    finally:
        sandbox.cleanup()
