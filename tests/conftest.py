"""Shared fixtures: nbdserve as a real process on a free port, and helpers to drive it."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import byte_diff

NBDSERVE = [sys.executable, "-m", "nbdserve"]
START_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RunningServer:
    """An nbdserve process; `uri(name)` addresses one of its exports."""

    def __init__(self, proc: subprocess.Popen, port: int | None, log_path: Path, socket_path: str | None):
        self.proc = proc
        self.port = port
        self.log_path = log_path
        self.socket_path = socket_path

    def uri(self, name: str = "") -> str:
        if self.socket_path:
            return f"nbd+unix:///{name}?socket={self.socket_path}"
        return f"nbd://127.0.0.1:{self.port}/{name}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def send_signal(self, signum: int) -> None:
        # The whole process group: the server, and a tracer (strace) wrapped around it.
        os.killpg(self.proc.pid, signum)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.send_signal(signum)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.send_signal(signal.SIGKILL)
                self.proc.wait()
                raise AssertionError(f"nbdserve did not stop within {timeout} s:\n{self.log()}")
        return self.proc.returncode

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"nbdserve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.socket_path:
                    with socket.socket(socket.AF_UNIX) as sock:
                        sock.connect(self.socket_path)
                else:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"nbdserve did not listen within {START_TIMEOUT} s:\n{self.log()}")


@pytest.fixture
def start_server(tmp_path):
    """start_server(config=None, args=(), env=None, unix=False) -> RunningServer.

    With `config` (a dict), it is written as YAML with a TCP listener on a free port (or a unix
    socket) and state-dir set to tmp_path, unless the dict says otherwise. Without it, `args` are
    passed to `nbdserve serve` after `-p PORT`. `prefix` wraps the command (e.g. in strace);
    `port` picks the TCP port instead of a free one (to restart a server where clients expect it). At
    teardown the server is stopped and its log must hold no traceback: a traceback is a bug even
    when the client got its answer.
    """
    yield from _start_servers(tmp_path)


@pytest.fixture(scope="module")
def start_module_server(tmp_path_factory):
    """start_server for servers a whole module's tests share: one start instead of one per test."""
    yield from _start_servers(tmp_path_factory.mktemp("servers"))


def _start_servers(tmp_path):
    servers: list[RunningServer] = []
    counter = iter(range(1000))

    def start(config: dict | None = None, *, args=(), env=None, unix: bool = False, wait: bool = True,
              allow_traceback: bool = False, prefix=(), port: int | None = None) -> RunningServer:
        index = next(counter)
        log_path = tmp_path / f"nbdserve-{index}.log"
        port = None if unix else port or free_port()
        socket_path = str(tmp_path / f"nbd-{index}.sock") if unix else None
        listener = {"unix": socket_path} if unix else {"tcp": f"127.0.0.1:{port}"}
        if config is not None:
            config = dict(config)
            config.setdefault("listen", [listener])
            config.setdefault("state-dir", str(tmp_path))
            config_path = tmp_path / f"nbdserve-{index}.yaml"
            config_path.write_text(yaml.safe_dump(config))
            command = [*NBDSERVE, "serve", "--config", str(config_path), "--log-level", "debug"]
        else:
            where = ["-k", socket_path] if unix else ["-p", str(port)]
            command = [*NBDSERVE, "serve", *where, "--log-level", "debug", *args]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [*prefix, *command], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})}, start_new_session=True,
            )
        server = RunningServer(proc, port, log_path, socket_path)
        server.allow_traceback = allow_traceback
        servers.append(server)
        if wait:
            server.wait_ready()
        return server

    yield start
    for server in servers:
        if server.proc.poll() is None:
            server.send_signal(signal.SIGKILL)
            server.proc.wait()
    for server in servers:
        if not server.allow_traceback:
            assert "Traceback" not in server.log(), server.log()


def run(command: list[str], *, check: bool = True, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """Run a client tool; on failure the assertion shows its output."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, command))} exited {result.returncode}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result


@pytest.fixture
def raw_image(tmp_path):
    """make(size, name='disk.img', data=None) -> Path of a sparse raw image."""

    def make(size: int = 64 * 1024 * 1024, name: str = "disk.img", data: bytes | None = None) -> Path:
        path = tmp_path / name
        with open(path, "wb") as f:
            f.truncate(size)
            if data:
                f.write(data)
        return path

    return make


@pytest.fixture(scope="session")
def ceph(tmp_path_factory):
    """A single-node Ceph cluster for the whole session, started on first use (ceph_cluster.py)."""
    from ceph_cluster import running_cluster

    yield from running_cluster(tmp_path_factory)


def pytest_assertrepr_compare(op, left, right):
    return byte_diff.explain(left, right) if op == "==" else None
