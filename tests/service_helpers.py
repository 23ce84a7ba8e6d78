"""Helpers for the service tests: a real NOTIFY_SOCKET, config files, waiting on a server's log."""

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import NBDSERVE, RunningServer

TIMEOUT = 20.0


class NotifySocket:
    """A datagram socket where nbdserve sends its sd_notify messages, as systemd would receive
    them. `env` points NOTIFY_SOCKET at it (an abstract name, or a path)."""

    def __init__(self, path: Path | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if path is None:
            self.sock.bind("")  # autobind: a fresh abstract name
            self.name = "@" + self.sock.getsockname()[1:].decode()
        else:
            self.sock.bind(str(path))
            self.name = str(path)
        self.env = {"NOTIFY_SOCKET": self.name}
        self.messages: list[dict[str, str]] = []

    def wait_for(self, key: str, value: str | None = None, timeout: float = TIMEOUT) -> dict[str, str]:
        """The next message holding `key` (with `value`, if given); earlier ones are kept."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {key}={value or '*'} within {timeout} s; got {self.messages}")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            message = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append(message)
            if key in message and (value is None or message[key] == value):
                return message

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify():
    """notify(path=None) -> NotifySocket, closed at teardown."""
    sockets: list[NotifySocket] = []

    def make(path: Path | None = None) -> NotifySocket:
        sockets.append(NotifySocket(path))
        return sockets[-1]

    yield make
    for sock in sockets:
        sock.close()


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def wait_for_log(server, text: str, count: int = 1, timeout: float = TIMEOUT) -> None:
    """Until `text` is in the server's log `count` times."""
    deadline = time.monotonic() + timeout
    while server.log().count(text) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not logged {count} times within {timeout} s:\n{server.log()}")
        time.sleep(0.02)


@pytest.fixture
def spawn(tmp_path):
    """spawn(args, *, env=None, prefix=(), journal=False) -> RunningServer: `nbdserve ARGS` as a
    real process, its stderr in a log file (which JOURNAL_STREAM names when `journal`), under
    `prefix` (e.g. systemd-socket-activate) when given. Killed at teardown if still running."""
    servers: list[RunningServer] = []

    def start(args, *, env=None, prefix=(), journal: bool = False) -> RunningServer:
        log_path = tmp_path / f"spawned-{len(servers)}.log"
        with open(log_path, "wb") as log:
            extra = dict(env or {})
            if journal:
                stat = os.fstat(log.fileno())
                extra["JOURNAL_STREAM"] = f"{stat.st_dev}:{stat.st_ino}"
            proc = subprocess.Popen(
                [*prefix, *NBDSERVE, *map(str, args)], stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env={**os.environ, **extra}, start_new_session=True,
            )
        server = RunningServer(proc, None, log_path, None)
        servers.append(server)
        return server

    yield start
    for server in servers:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
        assert "Traceback" not in server.log(), server.log()
