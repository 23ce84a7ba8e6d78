"""Hostile traffic against a running server while a well-behaved client keeps working.

Hundreds of connections send random bytes, mutated handshakes (plaintext and over TLS) and
random requests to one export; a libnbd client writes and verifies another export all along.
The server must answer it every time, and log no traceback and no internal error.
"""

import os
import random
import socket
import ssl
import struct
import threading
import time

import nbd
from nbd_wire import RawClient, client_flags, go, info_payload, option, request
from tls_pki import make_pki

from nbdserve.protocol.constants import REQUEST_MAGIC, Option

# NBDSERVE_FUZZ_SECONDS=600 for a long run; NBDSERVE_FUZZ_SEED replays a failure.
FUZZ_SECONDS = float(os.environ.get("NBDSERVE_FUZZ_SECONDS", "6"))
SEED = int(os.environ.get("NBDSERVE_FUZZ_SEED", "0")) or random.randrange(1 << 32)
MiB = 1024 * 1024


def random_option(rng: random.Random) -> bytes:
    number = rng.choice([*Option, 0, 12, 99, rng.randrange(1 << 32)])
    payload = rng.choice([
        b"", rng.randbytes(rng.randrange(64)), info_payload(rng.choice(["target", "", "nope", "../target"])),
        struct.pack(">I", rng.randrange(1 << 32)) + rng.randbytes(8),
    ])
    length = rng.choice([len(payload)] * 4 + [rng.randrange(1 << 32), len(payload) + 1, 0])
    return option(number, payload, length=length)


def random_request(rng: random.Random) -> bytes:
    command = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, rng.randrange(1 << 16)])
    offset = rng.choice([0, rng.randrange(8 * MiB), (1 << 64) - 1, 8 * MiB - 1])
    length = rng.choice([0, 1, 4096, rng.randrange(1 << 32), (1 << 32) - 1])
    magic = REQUEST_MAGIC if rng.random() < 0.95 else rng.randrange(1 << 32)
    data = rng.randbytes(min(length, 8192)) if command == 1 else b""
    return request(command, offset, length, flags=rng.randrange(1 << 16) if rng.random() < 0.3 else 0,
                   cookie=rng.randrange(1 << 64), data=data, magic=magic)


def fuzz_connection(port: int, rng: random.Random, tls: ssl.SSLContext) -> None:
    kind = rng.randrange(5)
    with RawClient(port, timeout=2) as client:
        try:
            if kind == 0:
                client.send(rng.randbytes(rng.randrange(1, 2000)))
            else:
                client.greeting()
                client.send(client_flags(rng.choice([3, 1, 0, rng.randrange(1 << 32)])))
                if kind == 1:
                    client.send(b"".join(random_option(rng) for _ in range(rng.randrange(1, 20))))
                elif kind == 2:
                    client.send(option(Option.STARTTLS) + rng.choice([b"", rng.randbytes(300)]))
                elif kind == 3:
                    client.send(option(Option.STARTTLS))
                    client.option_reply()
                    client.sock = tls.wrap_socket(client.sock, server_hostname="127.0.0.1")
                    client.send(b"".join(random_option(rng) for _ in range(rng.randrange(1, 10))))
                else:
                    client.send(go("target"))
                    client.option_replies()
                    client.send(b"".join(random_request(rng) for _ in range(rng.randrange(1, 30))))
            client.sock.settimeout(0.05)
            client.sock.recv(1 << 16)
        except (OSError, EOFError, AssertionError, struct.error):
            pass  # the server may hang up at any point: that is its right
        if rng.random() < 0.5:  # sometimes vanish with a reset instead of a clean close
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def well_behaved(uri: str, stop: threading.Event, done: list, failures: list) -> None:
    rng = random.Random(SEED + 1)
    shadow = bytearray(4 * MiB)
    handle = nbd.NBD()
    handle.connect_uri(uri)
    try:
        while not stop.is_set():
            offset, length = rng.randrange(0, 4 * MiB - 65536, 512), rng.choice([512, 4096, 65536])
            data = rng.randbytes(length)
            handle.pwrite(data, offset)
            shadow[offset : offset + length] = data
            check = rng.randrange(0, 4 * MiB - 65536, 512)
            if handle.pread(65536, check) != shadow[check : check + 65536]:
                failures.append(f"data mismatch at {check}")
            done.append(1)
            if len(done) % 50 == 0:  # a fresh handshake now and then
                fresh = nbd.NBD()
                fresh.connect_uri(uri)
                fresh.pread(512, 0)
                fresh.shutdown()
        handle.flush()
    except nbd.Error as exc:
        failures.append(f"libnbd: {exc}")
    finally:
        handle.shutdown()


def test_server_survives_fuzzing(start_server, raw_image, tmp_path):
    pki = make_pki(tmp_path / "pki")
    disk, target = raw_image(4 * MiB, name="disk.img"), raw_image(8 * MiB, name="target.img")
    server = start_server({
        "tls": {"mode": "optional", "dir": str(pki.server)},
        "limits": {"handshake-timeout": 2, "max-payload": "1M"},
        "exports": {"disk": {"source": {"driver": "file", "path": str(disk)}},
                    "target": {"source": {"driver": "file", "path": str(target)}}},
    })
    stop, done, failures = threading.Event(), [], []
    client = threading.Thread(target=well_behaved, args=(server.uri("disk"), stop, done, failures))
    client.start()
    rng = random.Random(SEED)
    tls = pki.client_context()
    connections = 0
    deadline = time.monotonic() + FUZZ_SECONDS
    try:
        while time.monotonic() < deadline and client.is_alive():
            fuzz_connection(server.port, rng, tls)
            connections += 1
    finally:
        stop.set()
        client.join(30)
    assert not failures, f"seed {SEED}: {failures}"
    assert connections > 100 and len(done) > 100, (connections, len(done))
    assert server.proc.poll() is None, server.log()
    log = server.log()
    assert "internal error" not in log and "Traceback" not in log, f"seed {SEED}"
    assert server.stop() == 0
