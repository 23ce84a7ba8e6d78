"""SIGTERM and SIGINT: stop accepting, finish the requests in flight, flush every export, exit 0;
and a misbehaving client neither stalls the other clients nor the shutdown."""

import signal
import socket
import time

import nbd
import pytest

from nbd_wire import RawClient, go, request
from nbdserve.protocol.constants import Command, CommandFlag

MiB = 1024 * 1024
SIZE = 64 * MiB
PATTERN = bytes(range(256)) * (SIZE // 256)
STRACE_SYNCS = ["strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=fdatasync,fsync,io_submit", "-o"]


def flushed_after_signal(trace: str, signum: int) -> bool:
    """True if the trace has an fdatasync or fsync (called, or submitted through AIO) after the
    server received `signum`."""
    lines = trace.splitlines()
    received = next(i for i, line in enumerate(lines) if f"--- {signal.Signals(signum).name}" in line)
    return any(
        "fdatasync(" in line or "fsync(" in line or "IOCB_CMD_FDSYNC" in line for line in lines[received:]
    )


def refused_soon_after_shutdown_began(server, within: float = 1.0) -> bool:
    """True if new connections are refused within `within` seconds of the server logging that
    it is shutting down (long before a grace period spent waiting for a stuck client ends)."""
    deadline = time.monotonic() + 10
    while "shutting down" not in server.log():
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.02)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
        except ConnectionRefusedError:
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def image(raw_image):
    return raw_image(SIZE, data=PATTERN)


def transmission(port: int) -> RawClient:
    client = RawClient(port)
    client.start()
    client.go("disk")
    return client


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_requests_in_flight_and_flushes(start_server, image, tmp_path, signum):
    trace = tmp_path / "strace.log"
    server = start_server({"exports": {"disk": {"source": str(image)}}}, prefix=[*STRACE_SYNCS, str(trace)])
    client = transmission(server.port)
    writes = {cookie: bytes([cookie]) * MiB for cookie in range(1, 9)}
    # Requests are sent and the replies left unread, so the server holds them in flight.
    stream = b"".join(
        request(Command.WRITE, cookie * MiB, MiB, cookie=cookie, data=data) for cookie, data in writes.items()
    )
    reads = range(100, 124)
    stream += b"".join(request(Command.READ, (cookie - 90) * MiB, MiB, cookie=cookie) for cookie in reads)
    client.send(stream)
    time.sleep(0.5)
    server.send_signal(signum)

    seen = set()
    for _ in range(len(writes) + len(reads)):
        error, cookie = client.simple_reply()
        assert error == 0, (error, cookie)
        if cookie in reads:
            offset = (cookie - 90) * MiB
            assert client.receive_exact(MiB) == PATTERN[offset : offset + MiB], cookie
        seen.add(cookie)
    assert seen == set(writes) | set(reads)
    assert client.is_closed_by_server()
    client.close()
    assert server.proc.wait(20) == 0
    # Stopped accepting.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
    data = image.read_bytes()
    for cookie, written in writes.items():
        assert data[cookie * MiB : (cookie + 1) * MiB] == written
    assert flushed_after_signal(trace.read_text(), signum)


def test_misbehaving_clients_stall_neither_others_nor_shutdown(start_server, image, tmp_path):
    trace = tmp_path / "strace.log"
    server = start_server(
        {"exports": {"disk": {"source": str(image)}}, "limits": {"shutdown-grace": 4}},
        prefix=[*STRACE_SYNCS, str(trace)],
    )
    # One client asks for 48 MiB and never reads a byte of it; another stops mid-handshake.
    greedy = transmission(server.port)
    greedy.send(b"".join(request(Command.READ, i * MiB, MiB, cookie=i) for i in range(48)))
    stalled = RawClient(server.port)
    stalled.start()
    stalled.send(go("disk")[:7])

    handle = nbd.NBD()
    handle.connect_uri(server.uri("disk"))
    handle.pwrite(b"\x5a" * MiB, 0, nbd.CMD_FLAG_FUA)
    assert handle.pread(MiB, 0) == b"\x5a" * MiB
    handle.pwrite(b"\xa5" * 4096, SIZE - 4096)  # left to the flush at shutdown
    handle.shutdown()

    started = time.monotonic()
    server.send_signal(signal.SIGTERM)
    # While the greedy client holds up the drain, new clients are refused, not left hanging.
    assert refused_soon_after_shutdown_began(server)
    assert server.proc.wait(20) == 0
    assert time.monotonic() - started < 15  # the grace period, not forever
    greedy.close()
    stalled.close()
    assert image.read_bytes()[SIZE - 4096 :] == b"\xa5" * 4096
    assert flushed_after_signal(trace.read_text(), signal.SIGTERM)
