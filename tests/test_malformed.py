"""Malformed traffic from a hand-made client on a raw socket: each bad input gets an error reply or
closes only its own connection, and the server goes on serving everyone else (conftest checks
that the server never logged a traceback)."""

import struct
import time
from pathlib import Path

import nbd
import pytest

from nbd_wire import RawClient, go, info_payload, option, request
from nbdserve.protocol.constants import ClientFlag, Command, CommandFlag, Error, Option, Reply

MiB = 1024 * 1024
SIZE = 4 * MiB
PATTERN = bytes(range(256)) * (SIZE // 256)
MAX_IN_FLIGHT = 4
HANDSHAKE_TIMEOUT = 2


@pytest.fixture(scope="module")
def server(start_module_server, tmp_path_factory):
    """One server for the whole module: every test also checks it survived the ones before."""
    image = tmp_path_factory.mktemp("malformed") / "disk.img"
    image.write_bytes(PATTERN)
    return start_module_server({
        "exports": {
            "disk": {"source": str(image)},
            "direct": {"source": str(image), "cache": "none", "read-only": True},
        },
        "limits": {"max-in-flight": MAX_IN_FLIGHT, "handshake-timeout": HANDSHAKE_TIMEOUT},
    })


def assert_serves(server) -> None:
    """A well-behaved client still gets its data."""
    handle = nbd.NBD()
    handle.connect_uri(server.uri("disk"))
    assert handle.pread(4096, 8192) == PATTERN[8192 : 8192 + 4096]
    handle.shutdown()


def transmission(server, export: str = "disk") -> RawClient:
    client = RawClient(server.port)
    client.start()
    client.go(export)
    return client


def resident_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_bad_request_magic_closes_only_that_connection(server):
    bystander = nbd.NBD()
    bystander.connect_uri(server.uri("disk"))
    with transmission(server) as client:
        client.send(request(Command.READ, 0, 512, magic=0xDEADBEEF))
        assert client.is_closed_by_server()
    assert bystander.pread(512, 0) == PATTERN[:512]
    bystander.shutdown()
    assert_serves(server)
    assert "bad request magic" in server.log()


@pytest.mark.parametrize(
    "greeting_answer",
    [
        struct.pack(">I", 0x4),  # an unknown client flag
        struct.pack(">I", 1) + struct.pack(">QII", 0x1122334455667788, Option.GO, 0),  # bad option magic
    ],
    ids=["unknown client flag", "bad option magic"],
)
def test_bad_handshake_closes_only_that_connection(server, greeting_answer):
    with RawClient(server.port) as client:
        client.greeting()
        client.send(greeting_answer)
        assert client.is_closed_by_server()
    assert_serves(server)


def test_oldstyle_client_gets_a_newstyle_greeting_and_nothing_breaks(server):
    # An oldstyle client reads the greeting, sees no oldstyle magic (0x00420281861253) and hangs up.
    with RawClient(server.port) as client:
        assert client.receive_exact(8) == b"NBDMAGIC"
        assert client.receive_exact(8) == b"IHAVEOPT"
    # One that sends nothing at all (an oldstyle client waiting for its greeting) is dropped.
    with RawClient(server.port) as client:
        client.greeting()
        started = time.monotonic()
        assert client.is_closed_by_server()
        assert HANDSHAKE_TIMEOUT - 0.5 < time.monotonic() - started < HANDSHAKE_TIMEOUT + 5
    # One that goes away mid-greeting, or mid-option.
    with RawClient(server.port) as client:
        client.start()
        client.send(go("disk")[:10])
    assert_serves(server)


def test_unknown_command_gets_einval_and_the_connection_goes_on(server):
    with transmission(server) as client:
        client.send(request(42, 0, 512, cookie=1))
        assert client.simple_reply() == (Error.EINVAL, 1)
        client.send(request(Command.READ, 0, 512, cookie=2))
        assert client.simple_reply() == (0, 2)
        assert client.receive_exact(512) == PATTERN[:512]


def test_invalid_flags_on_a_write_are_refused_and_its_payload_consumed(server):
    with transmission(server) as client:
        payload = b"\xee" * 4096
        client.send(request(Command.WRITE, 0, 4096, flags=CommandFlag.REQ_ONE, cookie=1, data=payload))
        assert client.simple_reply() == (Error.EINVAL, 1)
        client.send(request(Command.READ, 0, 4096, flags=CommandFlag.DF, cookie=2))  # DF needs structured
        assert client.simple_reply() == (Error.EINVAL, 2)
        client.send(request(Command.READ, 0, 4096, cookie=3))
        assert client.simple_reply() == (0, 3)
        assert client.receive_exact(4096) == PATTERN[:4096]  # the refused write changed nothing


def test_oversized_write_is_refused_and_its_payload_drained(server):
    length = 32 * MiB + 4096
    with transmission(server) as client:
        client.send(request(Command.WRITE, 0, length, cookie=1))
        # Refused at its header, before the payload is sent.
        assert client.simple_reply() == (Error.EINVAL, 1)
        chunk = b"\xff" * MiB
        for _ in range(length // MiB):
            client.send(chunk)
        client.send(chunk[: length % MiB])
        client.send(request(Command.READ, 0, 4096, cookie=2))
        assert client.simple_reply() == (0, 2)
        assert client.receive_exact(4096) == PATTERN[:4096]
    assert_serves(server)


def test_oversized_option_gets_too_big_and_the_handshake_goes_on(server):
    with RawClient(server.port) as client:
        client.start()
        client.send(option(Option.INFO, info_payload("disk") + bytes(MiB)))
        ((number, reply, _),) = client.option_replies()
        assert (number, reply) == (Option.INFO, Reply.ERR_TOO_BIG)
        client.go("disk")
        client.send(request(Command.READ, 0, 16, cookie=7))
        assert client.simple_reply() == (0, 7)
        assert client.receive_exact(16) == PATTERN[:16]


def test_unknown_option_gets_unsup_and_the_handshake_goes_on(server):
    with RawClient(server.port) as client:
        client.start()
        client.send(option(1000, b"payload the server must skip"))
        ((number, reply, _),) = client.option_replies()
        assert (number, reply) == (1000, Reply.ERR_UNSUP)
        client.send(option(Option.LIST))
        replies = client.option_replies()
        assert [reply for _, reply, _ in replies] == [Reply.SERVER, Reply.SERVER, Reply.ACK]
        assert sorted(payload for _, _, payload in replies[:2]) == [
            struct.pack(">I", 4) + b"disk", struct.pack(">I", 6) + b"direct"
        ]
        client.go("disk")


def test_unknown_export_gets_err_unknown_and_the_handshake_goes_on(server):
    with RawClient(server.port) as client:
        client.start()
        client.send(go("nosuchdisk"))
        ((number, reply, message),) = client.option_replies()
        assert (number, reply) == (Option.GO, Reply.ERR_UNKNOWN)
        assert b"nosuchdisk" in message
        client.send(option(Option.INFO, info_payload("nosuchdisk")))
        assert client.option_replies()[-1][1] == Reply.ERR_UNKNOWN
        flags = client.go("disk")
        assert flags & 1  # HAS_FLAGS


def test_export_name_for_a_missing_export_hangs_up(server):
    # NBD_OPT_EXPORT_NAME has no error reply: the server closes the connection.
    with RawClient(server.port) as client:
        client.start()
        client.send(option(Option.EXPORT_NAME, b"nosuchdisk"))
        assert client.is_closed_by_server()
    assert_serves(server)


@pytest.mark.parametrize("no_zeroes", [False, True], ids=["zeroes", "no-zeroes"])
def test_export_name_negotiation_honours_no_zeroes(server, no_zeroes):
    with RawClient(server.port) as client:
        client.start(ClientFlag.C_FIXED_NEWSTYLE | (ClientFlag.C_NO_ZEROES if no_zeroes else 0))
        client.send(option(Option.EXPORT_NAME, b"disk"))
        size, flags = struct.unpack(">QH", client.receive_exact(10))
        assert size == SIZE and flags & 1
        if not no_zeroes:
            assert client.receive_exact(124) == bytes(124)
        client.send(request(Command.READ, 100, 8, cookie=5))
        assert client.simple_reply() == (0, 5)  # a stray zero would break the reply's magic
        assert client.receive_exact(8) == PATTERN[100:108]


@pytest.mark.parametrize("export", ["disk", "direct"], ids=["page cache", "O_DIRECT"])
def test_a_client_that_does_not_read_its_replies_is_held_back(server, export):
    """Requests in flight are bounded per connection: reads nobody collects do not pile up."""
    count = 128  # 128 MiB of replies, far beyond socket buffers and MAX_IN_FLIGHT
    before = resident_bytes(server.proc.pid)
    with transmission(server, export) as client:
        client.send(b"".join(request(Command.READ, (i % 4) * MiB, MiB, cookie=i) for i in range(count)))
        time.sleep(1)
        assert resident_bytes(server.proc.pid) - before < 48 * MiB
        assert_serves(server)  # and everyone else is still served
        for _ in range(count):
            error, cookie = client.simple_reply()
            assert error == 0
            offset = (cookie % 4) * MiB
            assert client.receive_exact(MiB) == PATTERN[offset : offset + MiB]


def test_disconnect_waits_for_the_requests_in_flight(server):
    with transmission(server, "direct") as client:
        offsets = [cookie * 4096 for cookie in range(8)]
        client.send(b"".join(request(Command.READ, offset, MiB, cookie=i) for i, offset in enumerate(offsets)))
        client.send(request(Command.DISC) + request(Command.READ, 0, 512, cookie=99))  # nothing after DISC
        replies = {}
        for _ in offsets:
            error, cookie = client.simple_reply()
            assert error == 0
            replies[cookie] = client.receive_exact(MiB)
        assert replies == {i: PATTERN[offset : offset + MiB] for i, offset in enumerate(offsets)}
        assert client.is_closed_by_server()
