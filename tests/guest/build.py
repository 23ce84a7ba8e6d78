"""Builds the test guest from Debian packages: the cloud kernel and a busybox initramfs.

The kernel comes from linux-image-cloud-amd64's dependency (downloaded with `apt-get download`,
never installed); virtio, virtio_pci and virtio_blk are modules there, ext4 is built in. The
initramfs holds busybox-static, mke2fs and e2fsck with the libraries `ldd` lists, the virtio
modules and tests/guest/init. The result is cached under /var/cache/nbdserve-tests, keyed by the
package versions and by the bytes of this file and of init, so a change to any of them rebuilds.

Run it directly to build (or find) the guest and print its paths.
"""

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
INIT = HERE / "init"
CACHE_ROOT = Path(os.environ.get("NBDSERVE_TEST_CACHE", "/var/cache/nbdserve-tests"))
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
# Host packages copied into the guest: their versions are part of the cache key.
HOST_PACKAGES = ("busybox-static", "e2fsprogs", "libc6")
BUSYBOX = Path("/bin/busybox")
E2FSPROGS = (Path("/sbin/mke2fs"), Path("/sbin/e2fsck"))
MKE2FS_CONF = Path("/etc/mke2fs.conf")  # the ext4 feature set mke2fs uses on the host too
MODULES = ("virtio_pci", "virtio_blk")  # loaded with their dependencies, in dependency order


@dataclass(frozen=True)
class Guest:
    kernel: Path
    initrd: Path


def command_output(*command: str) -> str:
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def kernel_package() -> str:
    """NAME=VERSION of the kernel package the cloud meta-package depends on."""

    def depends() -> re.Match | None:
        show = subprocess.run(
            ["apt-cache", "show", "--no-all-versions", KERNEL_META_PACKAGE], capture_output=True, text=True
        )
        return re.search(r"^Depends: (linux-image-\S+) \(= (\S+)\)", show.stdout, re.MULTILINE)

    match = depends()
    if not match:  # a fresh machine without package lists
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        match = depends()
    return f"{match.group(1)}={match.group(2)}"


def inputs_digest(kernel: str) -> str:
    digest = hashlib.sha256()
    digest.update(kernel.encode())
    digest.update(command_output("dpkg-query", "-W", "-f=${Package} ${Version}\n", *HOST_PACKAGES).encode())
    for path in (INIT, Path(__file__).resolve()):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def guest() -> Guest:
    """The cached guest, built first when its inputs changed."""
    kernel = kernel_package()
    target = CACHE_ROOT / f"guest-{inputs_digest(kernel)}"
    if not (target / "initrd").exists():
        CACHE_ROOT.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE_ROOT, prefix="building-") as work:
            work = Path(work)
            (work / "out").mkdir()
            build(kernel, work, work / "out")
            try:
                (work / "out").rename(target)
            except OSError:
                if not (target / "initrd").exists():  # else another run finished the same build first
                    raise
        for stale in CACHE_ROOT.glob("guest-*"):  # builds from older inputs
            if stale != target:
                shutil.rmtree(stale, ignore_errors=True)
    return Guest(target / "vmlinuz", target / "initrd")


def build(kernel: str, work: Path, out: Path) -> None:
    subprocess.run(["apt-get", "download", "-q", kernel], cwd=work, check=True, capture_output=True)
    (deb,) = work.glob("linux-image-*.deb")
    unpacked = work / "kernel"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
    (vmlinuz,) = (unpacked / "boot").glob("vmlinuz-*")
    shutil.copyfile(vmlinuz, out / "vmlinuz")

    root = work / "root"
    for directory in ("bin", "sbin", "etc", "proc", "sys", "dev", "mnt", "lib/modules"):
        (root / directory).mkdir(parents=True)
    install_busybox(root)
    for binary in E2FSPROGS:
        install_with_libraries(binary, root)
    shutil.copyfile(MKE2FS_CONF, root / MKE2FS_CONF.relative_to("/"))
    modules = {path.stem.replace("-", "_"): path for path in unpacked.glob("lib/modules/*/kernel/**/*.ko")}
    for index, name in enumerate(load_order(MODULES, modules)):
        shutil.copyfile(modules[name], root / "lib/modules" / f"{index:02d}-{name}.ko")
    shutil.copyfile(INIT, root / "init")
    (root / "init").chmod(0o755)
    write_cpio(root, out / "initrd")


def install_busybox(root: Path) -> None:
    shutil.copyfile(BUSYBOX, root / "bin/busybox")
    (root / "bin/busybox").chmod(0o755)
    for applet in command_output(str(BUSYBOX), "--list").split():
        if applet != "busybox":
            (root / "bin" / applet).symlink_to("busybox")


def install_with_libraries(binary: Path, root: Path) -> None:
    """Copy a dynamically linked binary and every library ldd lists to the same paths."""
    libraries = re.findall(r"(/\S+) \(0x", command_output("ldd", str(binary)))
    for path in (binary, *map(Path, libraries)):
        destination = root / path.relative_to("/")
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, destination)  # follows symlinks: the library under its soname


def load_order(wanted, modules: dict[str, Path]) -> list[str]:
    """The modules and their dependencies (from each .ko's modinfo `depends=`), dependencies first."""
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        depends = re.search(rb"depends=([^\0]*)\0", modules[name].read_bytes()).group(1).decode()
        for dependency in filter(None, depends.split(",")):
            visit(dependency)
        order.append(name)

    for name in wanted:
        visit(name)
    return order


def write_cpio(root: Path, archive: Path) -> None:
    """An uncompressed newc archive: the kernel unpacks it without a decompressor, quicker under TCG."""
    files = sorted(str(path.relative_to(root)) for path in root.rglob("*"))
    with open(archive, "wb") as output:
        subprocess.run(
            ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"],
            input="\n".join(files) + "\n", text=True, cwd=root, stdout=output, check=True,
        )


if __name__ == "__main__":
    built = guest()
    print(built.kernel)
    print(built.initrd)
