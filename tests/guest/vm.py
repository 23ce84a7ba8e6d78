"""Boots the test guest under QEMU with one NBD disk and reads what it reports on its serial console.

The guest's init (tests/guest/init) runs the program named on the kernel command line and writes
lines `nbdtest: KIND ...` to the console, which QEMU writes to a log file as they come.
"""

import functools
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .build import Guest

KERNEL_PARAMS = "console=ttyS0 panic=-1 loglevel=4"  # a panic powers off (with -no-reboot)
BOOT_TIMEOUT = 180.0  # a TCG guest on a loaded 2-core machine


def uri_drive(spec: str, cache: str) -> str:
    """A -drive for an NBD URI or QEMU's legacy `nbd:HOST:PORT:exportname=NAME` spec."""
    return f"file={spec},format=raw,if=virtio,cache={cache}"


def reconnecting_drive(port: int, name: str, cache: str, reconnect_delay: int) -> str:
    """A -drive in the option form, the one that takes reconnect-delay: QEMU then holds requests
    while it reconnects to a restarted server, for up to reconnect_delay seconds."""
    return (
        f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export={name},"
        f"reconnect-delay={reconnect_delay},if=virtio,cache={cache}"
    )


@dataclass
class GuestRun:
    """One boot of the guest: the QEMU process and its serial console log."""

    process: subprocess.Popen
    console_path: Path
    stderr_path: Path

    def console(self) -> str:
        return self.console_path.read_text(errors="replace") if self.console_path.exists() else ""

    def reports(self, kind: str) -> list[str]:
        """Whole lines only: the guest may be writing the last one as it is read."""
        return re.findall(rf"^nbdtest: {kind} (.*?)\r?\n", self.console(), re.MULTILINE)

    def sums(self) -> dict[str, str]:
        """path -> sha256 of the files the guest checksummed."""
        return parse_sums(self.reports("sum"))

    def fsynced(self) -> dict[str, str]:
        """path -> sha256 of the files whose fsync returned, in order."""
        return parse_sums(self.reports("fsynced"))

    def describe(self) -> str:
        return f"console:\n{self.console()}\nqemu stderr:\n{self.stderr_path.read_text(errors='replace')}"

    def wait_for(self, kind: str, count: int, timeout: float = BOOT_TIMEOUT) -> None:
        """Wait until the guest reported `count` lines of `kind`."""
        deadline = time.monotonic() + timeout
        while len(self.reports(kind)) < count:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"guest reported fewer than {count} {kind!r} lines\n{self.describe()}")
            time.sleep(0.05)

    def wait(self, timeout: float = BOOT_TIMEOUT) -> "GuestRun":
        """Wait for the guest to power off; its program must have succeeded."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"guest still running after {timeout} s\n{self.describe()}") from None
        assert self.reports("result") == ["ok"], self.describe()
        assert self.process.returncode == 0, self.describe()
        return self

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def parse_sums(lines: list[str]) -> dict[str, str]:
    return {path.removeprefix("./"): digest for digest, path in (line.split() for line in lines)}


def start_guest(guest: Guest, program: str, drive: str | None, log_dir: Path, **params) -> GuestRun:
    """Boot the guest running `program` (see tests/guest/init) on `drive`; `params` go to the
    kernel command line for the program."""
    index = len(list(log_dir.glob("guest-*.console")))
    console_path = log_dir / f"guest-{index}-{program}.console"
    stderr_path = console_path.with_suffix(".stderr")
    command_line = " ".join([KERNEL_PARAMS, f"nbdtest={program}", *(f"nbd{key}={value}" for key, value in params.items())])
    command = [
        "qemu-system-x86_64", *accelerator(guest), "-m", "128", "-nodefaults", "-display", "none",
        "-no-reboot", "-serial", f"file:{console_path}",
        "-kernel", str(guest.kernel), "-initrd", str(guest.initrd), "-append", command_line,
    ]
    if drive:
        command += ["-drive", drive]
    with open(stderr_path, "wb") as stderr:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr)
    return GuestRun(process, console_path, stderr_path)


def run_guest(guest: Guest, program: str, drive: str | None, log_dir: Path, **params) -> GuestRun:
    return start_guest(guest, program, drive, log_dir, **params).wait()


@functools.cache
def accelerator(guest: Guest) -> tuple[str, ...]:
    """KVM where a guest really boots under it, else TCG. /dev/kvm can exist and still fail: nested
    without vmx/svm, QEMU aborts at once setting an MSR."""
    tcg = ("-accel", "tcg", "-cpu", "max")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return tcg
    command = [
        "qemu-system-x86_64", "-accel", "kvm", "-cpu", "host", "-m", "128", "-nodefaults", "-display",
        "none", "-no-reboot", "-serial", "stdio", "-kernel", str(guest.kernel), "-initrd", str(guest.initrd),
        "-append", f"{KERNEL_PARAMS} nbdtest=probe",
    ]
    try:
        probe = subprocess.run(command, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return tcg
    return ("-accel", "kvm", "-cpu", "host") if "nbdtest: result ok" in probe.stdout else tcg
