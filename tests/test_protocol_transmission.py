"""The sans-IO transmission phase: request bytes -> Request events (fed whole, one byte at a time,
and with trailing bytes), and the exact bytes of every reply encoder."""

import random
import struct
import tracemalloc

import pytest

from nbd_wire import feeds, request
from nbdserve.protocol import NEED_DATA, ProtocolError
from nbdserve.protocol.constants import (
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Command,
    CommandFlag,
    Error,
    ReplyType,
)
from nbdserve.protocol.transmission import (
    Request,
    TransmissionParser,
    block_status_chunk,
    error_chunk,
    none_chunk,
    offset_hole_chunk,
    pack_offset_data_header,
    simple_reply,
)

MAX_PAYLOAD = 64 * 1024
PAYLOAD = bytes(range(256)) * 16  # 4 KiB that is not all one value
# The first bytes of another request header.
PARTIAL_REQUEST = request(Command.READ)[:11]


def parse(chunks: list[bytes], *, max_payload: int = MAX_PAYLOAD, initial_data: bytes = b"") -> list:
    parser = TransmissionParser(max_payload=max_payload, initial_data=initial_data)
    events = []
    for chunk in chunks:
        parser.receive_data(chunk)
        while (event := parser.next_event()) is not NEED_DATA:
            events.append(event)
    return events


TABLE = [
    ("read", request(Command.READ, 4096, 512, cookie=7), [Request(7, Command.READ, 0, 4096, 512)]),
    (
        "read with DF",
        request(Command.READ, 0, 1, flags=CommandFlag.DF, cookie=2**64 - 1),
        [Request(2**64 - 1, Command.READ, CommandFlag.DF, 0, 1)],
    ),
    (
        "write carries its payload",
        request(Command.WRITE, 8192, len(PAYLOAD), flags=CommandFlag.FUA, data=PAYLOAD),
        [Request(1, Command.WRITE, CommandFlag.FUA, 8192, len(PAYLOAD), PAYLOAD)],
    ),
    ("empty write", request(Command.WRITE, 0, 0), [Request(1, Command.WRITE, 0, 0, 0, b"")]),
    (
        "requests back to back",
        request(Command.WRITE, 0, 3, cookie=1, data=b"abc")
        + request(Command.FLUSH, cookie=2)
        + request(Command.TRIM, 512, 1024, cookie=3)
        + request(Command.WRITE_ZEROES, 0, 1 << 20, flags=CommandFlag.NO_HOLE | CommandFlag.FAST_ZERO, cookie=4)
        + request(Command.CACHE, 0, 4096, cookie=5)
        + request(Command.BLOCK_STATUS, 0, 2**32 - 1, flags=CommandFlag.REQ_ONE, cookie=6)
        + request(Command.DISC, cookie=7),
        [
            Request(1, Command.WRITE, 0, 0, 3, b"abc"),
            Request(2, Command.FLUSH, 0, 0, 0),
            Request(3, Command.TRIM, 0, 512, 1024),
            Request(4, Command.WRITE_ZEROES, CommandFlag.NO_HOLE | CommandFlag.FAST_ZERO, 0, 1 << 20),
            Request(5, Command.CACHE, 0, 0, 4096),
            Request(6, Command.BLOCK_STATUS, CommandFlag.REQ_ONE, 0, 2**32 - 1),
            Request(7, Command.DISC, 0, 0, 0),
        ],
    ),
    # The export layer rejects an unknown command; the parser must still stay in sync.
    (
        "unknown command",
        request(99, 0, 10, cookie=1) + request(Command.FLUSH, cookie=2),
        [Request(1, 99, 0, 0, 10), Request(2, Command.FLUSH, 0, 0, 0)],
    ),
    (
        "oversized write is drained and the stream stays in sync",
        request(Command.WRITE, 0, MAX_PAYLOAD + 1, cookie=1, data=b"x" * (MAX_PAYLOAD + 1))
        + request(Command.WRITE, 0, 4, cookie=2, data=b"next"),
        [Request(1, Command.WRITE, 0, 0, MAX_PAYLOAD + 1, None), Request(2, Command.WRITE, 0, 0, 4, b"next")],
    ),
]


@pytest.mark.parametrize("mode", ["whole", "bytewise", "trailing"])
@pytest.mark.parametrize("data, expected", [row[1:] for row in TABLE], ids=[row[0] for row in TABLE])
def test_request_table(data, expected, mode):
    assert parse(feeds(data, PARTIAL_REQUEST)[mode]) == expected


def test_bytes_left_over_from_the_handshake_are_parsed_first():
    first = request(Command.WRITE, 0, 4, cookie=1, data=b"abcd")
    events = parse([first[10:] + request(Command.FLUSH, cookie=2)], initial_data=first[:10])
    assert events == [Request(1, Command.WRITE, 0, 0, 4, b"abcd"), Request(2, Command.FLUSH, 0, 0, 0)]


def test_a_dropped_payload_is_marked():
    (oversized,) = parse([request(Command.WRITE, 0, MAX_PAYLOAD + 1)])
    assert oversized.payload_dropped
    (read,) = parse([request(Command.READ, 0, MAX_PAYLOAD + 1)])
    assert not read.payload_dropped


@pytest.mark.parametrize("seed", range(5))
def test_write_payload_is_reassembled_from_any_chunking(seed):
    rng = random.Random(seed)
    payloads = [rng.randbytes(rng.randrange(0, MAX_PAYLOAD + 1)) for _ in range(4)]
    stream = b"".join(
        request(Command.WRITE, index * MAX_PAYLOAD, len(data), cookie=index, data=data)
        for index, data in enumerate(payloads)
    )
    chunks = []
    while stream:
        size = rng.choice([1, 7, 28, 29, 4096, 70000])
        chunks.append(stream[:size])
        stream = stream[size:]
    events = parse(chunks)
    assert [event.data for event in events] == payloads
    assert [event.cookie for event in events] == list(range(4))


def test_oversized_write_is_refused_at_its_header_and_never_buffered():
    parser = TransmissionParser(max_payload=32 * 1024 * 1024)
    length = 2**32 - 1
    parser.receive_data(request(Command.WRITE, 0, length, cookie=1))
    refused = parser.next_event()
    assert (refused.cookie, refused.payload_dropped) == (1, True)
    chunk = bytes(1 << 20)
    tracemalloc.start()
    try:
        remaining = length
        while remaining > len(chunk):
            parser.receive_data(chunk)
            remaining -= len(chunk)
            if remaining < 64 * len(chunk):
                assert parser.next_event() is NEED_DATA
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * len(chunk)
    parser.receive_data(bytes(remaining) + request(Command.FLUSH, cookie=2))
    assert parser.next_event() == Request(2, Command.FLUSH, 0, 0, 0)


def test_write_payload_memory_follows_the_bytes_that_arrived():
    """A header claiming 32 MiB must not make the parser allocate 32 MiB: a client could hold
    that much per connection by sending headers alone."""
    length = 32 * 1024 * 1024
    parser = TransmissionParser(max_payload=length)
    tracemalloc.start()
    try:
        parser.receive_data(request(Command.WRITE, 0, length))
        assert parser.next_event() is NEED_DATA
        header_only = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert header_only < 2 * 1024 * 1024
    payload = bytes(range(256)) * (length // 256)
    for start in range(0, length, 3 * 1024 * 1024):  # chunks straddle the first megabyte
        parser.receive_data(payload[start : start + 3 * 1024 * 1024])
    event = parser.next_event()
    assert event.length == length and event.data == payload


def test_an_allocated_payload_is_received_in_place():
    """With `allocate`, a large payload lands in the memory it gives, and what arrives after
    the header's first chunk can be received straight into it (payload_space)."""
    given = []

    def allocate(length):
        given.append(memoryview(bytearray(length)))
        return given[-1]

    parser = TransmissionParser(max_payload=MAX_PAYLOAD, allocate=allocate)
    payload = bytes(range(256)) * (MAX_PAYLOAD // 256)
    assert parser.payload_space() is None  # no payload arriving
    parser.receive_data(request(Command.WRITE, 0, len(payload), cookie=1, data=payload[:100]))
    assert parser.next_event() is NEED_DATA
    space = parser.payload_space()
    assert len(space) == len(payload) - 100
    space[:1000] = payload[100:1100]
    parser.payload_received(1000)
    parser.receive_data(payload[1100:] + request(Command.FLUSH, cookie=2)[:5])  # and the usual way
    assert parser.payload_space() is None  # bytes of the next request are buffered
    write = parser.next_event()
    assert write.data is given[0] and bytes(write.data) == payload
    assert parser.next_event() is NEED_DATA


def test_a_payload_of_the_first_megabyte_is_received_in_place_without_allocate():
    parser = TransmissionParser(max_payload=4 * 1024 * 1024)
    parser.receive_data(request(Command.WRITE, 0, 1024 * 1024, cookie=1, data=b"ab"))
    assert parser.next_event() is NEED_DATA
    space = parser.payload_space()
    assert len(space) == 1024 * 1024 - 2
    space[:] = b"c" * len(space)
    parser.payload_received(len(space))
    assert parser.next_event().data == b"ab" + b"c" * (1024 * 1024 - 2)
    # Larger: its memory grows as bytes arrive, so they go through receive_data.
    parser.receive_data(request(Command.WRITE, 0, 2 * 1024 * 1024, cookie=2, data=b"ab"))
    assert parser.next_event() is NEED_DATA
    assert parser.payload_space() is None


def test_a_small_payload_that_arrives_whole_is_bytes_even_with_allocate():
    parser = TransmissionParser(max_payload=MAX_PAYLOAD, allocate=lambda length: 1 / 0)
    parser.receive_data(request(Command.WRITE, 0, 4, cookie=1, data=b"abcd"))
    assert parser.next_event() == Request(1, Command.WRITE, 0, 0, 4, b"abcd")


@pytest.mark.parametrize("mode", ["whole", "bytewise"])
def test_bad_request_magic_is_a_protocol_error(mode):
    data = request(Command.FLUSH, cookie=1) + request(Command.READ, 0, 1, magic=0x12345678)
    with pytest.raises(ProtocolError):
        parse(feeds(data, b"")[mode])


# Replies.


def test_simple_reply():
    assert simple_reply(0x0102030405060708) == struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, 0x0102030405060708)
    assert simple_reply(9, Error.ENOSPC) == struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 28, 9)


def chunk(flags: int, kind: int, cookie: int, payload: bytes) -> bytes:
    return struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, flags, kind, cookie, len(payload)) + payload


def test_structured_chunks():
    assert none_chunk(5) == chunk(1, ReplyType.NONE, 5, b"")
    assert offset_hole_chunk(5, 4096, 512, done=False) == chunk(
        0, ReplyType.OFFSET_HOLE, 5, struct.pack(">QI", 4096, 512)
    )
    assert error_chunk(5, Error.EINVAL, "bad") == chunk(
        1, ReplyType.ERROR, 5, struct.pack(">IH", 22, 3) + b"bad"
    )
    assert block_status_chunk(5, 1, [(4096, 0), (8192, 3)], done=False) == chunk(
        0, ReplyType.BLOCK_STATUS, 5, struct.pack(">IIIII", 1, 4096, 0, 8192, 3)
    )


def test_error_message_is_capped_at_the_string_limit():
    payload = error_chunk(1, Error.EIO, "x" * 10000)[20:]
    assert struct.unpack_from(">IH", payload) == (5, 4096)
    assert len(payload) == 6 + 4096


def test_offset_data_header_is_packed_in_front_of_the_data():
    buffer = bytearray(28 + 4)
    buffer[28:] = b"data"
    pack_offset_data_header(memoryview(buffer), 3, 1024, 4, done=True)
    assert bytes(buffer) == chunk(1, ReplyType.OFFSET_DATA, 3, struct.pack(">Q", 1024) + b"data")
