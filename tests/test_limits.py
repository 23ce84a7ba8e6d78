"""Connection limits, handshake and idle timeouts, and a shutdown that never waits forever on
idle or stuck clients (QEMU's CVE-2024-7409)."""

import socket
import time

import nbd
from nbd_wire import RawClient, client_flags, request

from nbdserve.protocol.constants import Command

HERE, THERE, ELSEWHERE = "127.0.0.1", "127.0.0.2", "127.0.0.3"
MiB = 1024 * 1024


def config_for(image, **limits) -> dict:
    return {"limits": limits, "exports": {"disk": {"source": {"driver": "file", "path": str(image)}}}}


def greeted(port: int, source: str) -> RawClient | None:
    """A connected client past the greeting, or None if the server hung up at once."""
    client = RawClient(port, source=source)
    try:
        client.greeting()
    except (EOFError, ConnectionResetError):
        client.close()
        return None
    return client


def wait_closed(client: RawClient, within: float) -> float:
    """Seconds until the server hangs up on an otherwise silent client."""
    start = time.monotonic()
    client.sock.settimeout(within)
    assert client.is_closed_by_server()
    return time.monotonic() - start


def test_connection_limits(start_server, raw_image):
    server = start_server(config_for(raw_image(), **{"max-connections": 3, "max-connections-per-client": 2}))
    while "disconnected" not in server.log():  # start_server's probe must not count
        time.sleep(0.05)
    first, second = greeted(server.port, HERE), greeted(server.port, HERE)
    assert first and second
    assert greeted(server.port, HERE) is None  # a third from the same address
    there = greeted(server.port, THERE)
    assert there
    assert greeted(server.port, ELSEWHERE) is None  # a fourth in all
    first.close()
    deadline = time.monotonic() + 5
    while (again := greeted(server.port, HERE)) is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the server notices the hang-up a moment later
    assert again, "a freed slot was not given back"
    for client in (second, there, again):
        client.close()
    log = server.log()
    assert "refused: 2 connections from this address are open (limits.max-connections-per-client)" in log
    assert "refused: 3 connections are open (limits.max-connections)" in log


def test_unix_clients_count_toward_the_total_only(start_server, raw_image):
    server = start_server(config_for(raw_image(), **{"max-connections": 3, "max-connections-per-client": 1}),
                          unix=True)
    while "disconnected" not in server.log():  # start_server's probe must not count
        time.sleep(0.05)
    clients = [socket.socket(socket.AF_UNIX) for _ in range(4)]
    greetings = []
    for client in clients:
        client.settimeout(5)
        client.connect(server.socket_path)
        greetings.append(client.recv(18))
    assert [len(greeting) for greeting in greetings] == [18, 18, 18, 0]
    for client in clients:
        client.close()


def test_handshake_and_idle_timeouts(start_server, raw_image):
    server = start_server(config_for(raw_image(), **{"handshake-timeout": 1, "idle-timeout": 1}))
    silent = greeted(server.port, HERE)
    stalled = greeted(server.port, HERE)
    stalled.send(client_flags() + b"IHAVEOPT")  # half an option header, then nothing
    assert wait_closed(silent, 5) < 3
    assert wait_closed(stalled, 5) < 3
    busy, idle = nbd.NBD(), nbd.NBD()
    busy.connect_uri(server.uri("disk"))
    idle.connect_uri(server.uri("disk"))
    for _ in range(6):  # 3 s of requests every half second: never idle for a whole second
        busy.pread(4096, 0)
        time.sleep(0.5)
    busy.shutdown()
    try:
        idle.pread(4096, 0)
    except nbd.Error:
        pass
    else:
        raise AssertionError("a client idle for 3 s was not dropped")
    log = server.log()
    assert log.count("no export chosen within 1 s (limits.handshake-timeout)") == 2
    assert log.count("idle for 1 s, closing (limits.idle-timeout)") == 1


def test_shutdown_does_not_wait_for_idle_or_stuck_clients(start_server, raw_image):
    """SIGTERM with clients idle in every phase, and one that never reads its replies: the
    server is gone within the grace period (QEMU's CVE-2024-7409 was a wait without end)."""
    server = start_server(config_for(raw_image(64 * MiB), **{"shutdown-grace": 2, "handshake-timeout": 600}))
    silent = greeted(server.port, HERE)
    in_options = greeted(server.port, HERE)
    in_options.send(client_flags())
    idle = nbd.NBD()
    idle.connect_uri(server.uri("disk"))
    stuck = RawClient(server.port)
    stuck.start()
    stuck.go("disk")
    stuck.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    for cookie in range(8):  # 256 MiB of replies that are never read
        stuck.send(request(Command.READ, 0, 32 * MiB, cookie=cookie))
    time.sleep(0.5)
    start = time.monotonic()
    assert server.stop(timeout=15) == 0
    elapsed = time.monotonic() - start
    # The stuck reads hold it for the 2 s grace period, and not a moment longer.
    assert 1.5 < elapsed < 2 + 2, f"shutdown took {elapsed:.1f} s"
    for client in (silent, in_options, stuck):
        client.close()
    assert "stopped" in server.log()
