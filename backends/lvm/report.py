"""lvm2's command-line tools, run without blocking the event loop, and their JSON reports."""

import errno
import json
import os
import shutil
from dataclasses import dataclass

import trio

from nbdserve.backend import BackendError

# Where lvm2 installs its tools; a service's PATH or a user's may lack the sbin directories.
_SBIN = "/usr/sbin:/sbin"
_LV_FIELDS = "lv_name,vg_name,lv_path,lv_size,lv_tags,lv_uuid,lv_role"
# lvm waits for its locks without a limit; a client's handshake should not wait that long.
LVM_TIMEOUT = 30.0


@dataclass(frozen=True)
class LvmTool:
    """How to run lvm2: its `lvm` command and extra environment (LVM_SYSTEM_DIR, ...)."""

    command: str = "lvm"
    env: tuple[tuple[str, str], ...] = ()

    async def run(self, *args: str) -> str:
        """Run `lvm ARGS...` and return its standard output; a failure raises BackendError."""
        path = os.environ.get("PATH", "")
        executable = shutil.which(self.command, path=f"{path}:{_SBIN}" if path else _SBIN)
        if executable is None:
            raise BackendError(
                errno.ENOENT, f"lvm2 is not installed: no {self.command!r} command (set lvm-command)"
            )
        # lvm warns on stderr about every inherited descriptor; the ones it gets here are ours.
        env = {**os.environ, "LVM_SUPPRESS_FD_WARNINGS": "1", **dict(self.env)}
        with trio.move_on_after(LVM_TIMEOUT) as waiting:
            result = await trio.run_process(
                [executable, *args], capture_stdout=True, capture_stderr=True, check=False, env=env,
                stdin=b"",
            )
        if waiting.cancelled_caught:
            raise BackendError(errno.ETIMEDOUT, f"lvm {args[0]} did not finish within {LVM_TIMEOUT:g} s")
        if result.returncode != 0:
            raise BackendError(_errno_for(result.stderr), f"lvm {args[0]}: {_problem(result.stderr)}")
        return result.stdout.decode()


def _problem(stderr: bytes) -> str:
    """lvm's error lines without its warnings (activation disabled, metadata not backed up)."""
    lines = [line.strip() for line in stderr.decode(errors="replace").splitlines()]
    errors = [line for line in lines if line and not line.startswith("WARNING:")]
    return "; ".join(errors or lines) or "failed without a message"


def _errno_for(stderr: bytes) -> int:
    return errno.ENOENT if b"not found" in stderr or b"Failed to find" in stderr else errno.EIO


@dataclass(frozen=True)
class LogicalVolume:
    vg: str
    name: str
    path: str  # the device node lvm reports, present while the LV is active
    size: int
    tags: tuple[str, ...]
    uuid: str
    public: bool  # an LV users made, not a thin pool's or a RAID's internal part

    @property
    def full_name(self) -> str:
        return f"{self.vg}/{self.name}"

    @property
    def active(self) -> bool:
        """lvm reports the path of inactive LVs too; only an active one's device exists."""
        return os.path.exists(self.path)


async def logical_volumes(tool: LvmTool, vg: str | None = None) -> list[LogicalVolume]:
    """Every LV of `vg` (of every VG when None), from `lvs --reportformat json`."""
    args = ["lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", _LV_FIELDS]
    output = await tool.run(*args, *([vg] if vg else []))
    try:
        rows = [row for report in json.loads(output)["report"] for row in report["lv"]]
        return [
            LogicalVolume(
                vg=row["vg_name"],
                name=row["lv_name"],
                path=row["lv_path"],
                size=int(row["lv_size"]),
                tags=tuple(tag for tag in row["lv_tags"].split(",") if tag),
                uuid=row["lv_uuid"],
                public="public" in row["lv_role"].split(","),
            )
            for row in rows
        ]
    except (ValueError, KeyError, TypeError) as exc:
        raise BackendError(errno.EIO, f"lvm lvs: unexpected report ({exc!r})") from exc
