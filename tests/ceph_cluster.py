"""A throwaway single-node Ceph cluster for the RBD tests: one monitor and one memstore OSD on
127.0.0.1, everything (config, keys, data, logs, pid files) in a private directory, no systemd and
no manager daemon (RBD I/O does not need one). Facts behind each step:
../shared/notes/ceph-single-node.md.
"""

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

from conftest import free_port

READY_TIMEOUT = 60.0
POOL = "rbd"
# A second Ceph user limited to RBD, so tests can connect as someone other than client.admin.
LIMITED_USER = "nbdtest"


class CephCluster:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.conf = directory / "ceph.conf"
        self.admin_keyring = directory / "client.admin.keyring"
        self.user_keyring = directory / f"client.{LIMITED_USER}.keyring"
        self.mon_port = free_port()
        self.mon_host = f"v2:127.0.0.1:{self.mon_port}"
        self._pid_files = [directory / "run" / "mon.a.pid", directory / "run" / "osd.0.pid"]
        self._pids: list[int] = []
        self.env = {**os.environ, "CEPH_CONF": str(self.conf)}

    # Commands.

    def run_bytes(self, *command: str) -> bytes:
        result = subprocess.run(command, capture_output=True, timeout=60, env=self.env)
        if result.returncode != 0:
            raise AssertionError(
                f"{' '.join(command)} exited {result.returncode}:\n"
                f"{result.stdout.decode(errors='replace')}{result.stderr.decode(errors='replace')}"
            )
        return result.stdout

    def run(self, *command: str) -> str:
        return self.run_bytes(*command).decode()

    def ceph(self, *args: str) -> str:
        return self.run("ceph", "--connect-timeout", "20", *args)

    def rbd(self, *args: str) -> str:
        return self.run("rbd", *args)

    # Images.

    def create_image(self, name: str, size: int, *, features: str | None = None) -> None:
        """Create POOL/name; name may be NAMESPACE/IMAGE."""
        args = ["create", "--size", f"{size}B", f"{POOL}/{name}"]
        if features is not None:
            args += ["--image-feature", features]
        self.rbd(*args)

    def spec(self, name: str) -> str:
        """QEMU's name for the image, as qemu-img, qemu-io and nbdserve's SOURCE take it."""
        return f"rbd:{POOL}/{name}:conf={self.conf}"

    def export_bytes(self, name: str) -> bytes:
        """The image's content as librbd reads it, through the rbd CLI."""
        return self.run_bytes("rbd", "export", "--no-progress", f"{POOL}/{name}", "-")

    # Life cycle.

    def start(self) -> None:
        for sub in ("run", "log", "mon/ceph-a", "osd/ceph-0"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self._write_config()
        self._make_keys()
        self._start_monitor()
        self._start_osd()
        self.ceph("osd", "pool", "create", POOL, "8", "8")
        self.rbd("pool", "init", POOL)
        self._add_limited_user()
        self._wait_ready()

    def _write_config(self) -> None:
        d = self.dir
        self.conf.write_text(f"""\
[global]
fsid = {uuid.uuid4()}
mon host = [{self.mon_host}]
public addr = 127.0.0.1
ms bind msgr1 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
run dir = {d}/run
pid file = {d}/run/$name.pid
admin socket = {d}/run/$name.asok
log file = {d}/log/$name.log
crash dir = {d}/crash
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
[mon]
mon data = {d}/mon/$cluster-$id
[osd]
osd data = {d}/osd/$cluster-$id
osd objectstore = memstore
memstore device bytes = {1 << 30}
osd op num shards = 1
osd op num threads per shard = 2
[client]
keyring = {self.admin_keyring}
admin socket = {d}/run/$name.$pid.asok
""")

    def _make_keys(self) -> None:
        mon_keyring = self.dir / "mon.keyring"
        self.run("ceph-authtool", "--create-keyring", str(mon_keyring), "--gen-key", "-n", "mon.",
                 "--cap", "mon", "allow *")
        self.run("ceph-authtool", "--create-keyring", str(self.admin_keyring), "--gen-key",
                 "-n", "client.admin", "--cap", "mon", "allow *", "--cap", "osd", "allow *",
                 "--cap", "mgr", "allow *")
        self.run("ceph-authtool", str(mon_keyring), "--import-keyring", str(self.admin_keyring))

    def _start_monitor(self) -> None:
        monmap = self.dir / "monmap"
        fsid = next(
            line.split("=", 1)[1].strip()
            for line in self.conf.read_text().splitlines() if line.startswith("fsid")
        )
        self.run("monmaptool", "--create", "--fsid", fsid, "--addv", "a", f"[{self.mon_host}]",
                 str(monmap))
        self.run("ceph-mon", "--mkfs", "-i", "a", "--monmap", str(monmap),
                 "--keyring", str(self.dir / "mon.keyring"))
        self.run("ceph-mon", "-i", "a")
        self._remember_pid(self._pid_files[0])

    def _start_osd(self) -> None:
        osd_uuid = str(uuid.uuid4())
        osd_id = self.ceph("osd", "new", osd_uuid).strip()
        assert osd_id == "0", osd_id
        self.run("ceph-osd", "-i", "0", "--mkfs", "--mkkey", "--osd-uuid", osd_uuid,
                 "--no-mon-config")
        self.ceph("auth", "add", "osd.0", "osd", "allow *", "mon", "allow profile osd",
                  "-i", str(self.dir / "osd/ceph-0/keyring"))
        self.run("ceph-osd", "-i", "0")
        self._remember_pid(self._pid_files[1])

    def _add_limited_user(self) -> None:
        keyring = self.ceph("auth", "get-or-create", f"client.{LIMITED_USER}",
                            "mon", "profile rbd", "osd", f"profile rbd pool={POOL}")
        self.user_keyring.write_text(keyring)

    def _remember_pid(self, pid_file: Path) -> None:
        # Daemons delete their pid file on exit, so read it as soon as it appears.
        deadline = time.monotonic() + READY_TIMEOUT
        while not pid_file.exists() or not pid_file.read_text().strip():
            if time.monotonic() > deadline:
                raise AssertionError(f"{pid_file} did not appear")
            time.sleep(0.05)
        self._pids.append(int(pid_file.read_text()))

    def _wait_ready(self) -> None:
        # `ceph pg stat` hangs without a manager; an RBD round trip proves the OSD serves I/O.
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            try:
                self.rbd("create", "--size", "1M", f"{POOL}/ready-probe")
                self.rbd("rm", "--no-progress", f"{POOL}/ready-probe")
                return
            except (AssertionError, subprocess.TimeoutExpired):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def stop(self) -> None:
        # Memstore keeps nothing worth a clean shutdown, and a stopping OSD takes seconds.
        for pid in self._pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._pids.clear()


def running_cluster(tmp_path_factory):
    """Body of conftest's session fixture `ceph`: a cluster with an initialised `rbd` pool."""
    cluster = CephCluster(tmp_path_factory.mktemp("ceph"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
