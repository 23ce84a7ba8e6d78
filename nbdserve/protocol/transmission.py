"""Transmission phase, sans-IO: requests parsed from bytes, replies encoded to bytes."""

import struct
from collections.abc import Callable
from dataclasses import dataclass

from .buffer import ReceiveBuffer
from .constants import (
    MAX_STRING_LENGTH,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Command,
    ReplyFlag,
    ReplyType,
)
from .errors import NEED_DATA, ProtocolError

_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_CHUNK_HEADER = struct.Struct(">IHHQI")
_OFFSET_DATA_HEADER = struct.Struct(">IHHQIQ")

# Gives writable memory of exactly the length asked for.
Allocate = Callable[[int], memoryview]

SIMPLE_REPLY_SIZE = _SIMPLE_REPLY.size
OFFSET_DATA_HEADER_SIZE = _OFFSET_DATA_HEADER.size


@dataclass(frozen=True, slots=True)
class Request:
    cookie: int
    command: int  # a Command value, or an unknown number the export rejects
    flags: int
    offset: int
    length: int
    # The payload of a WRITE; None for other commands and for a WRITE whose
    # payload was over the limit and so was drained instead of buffered.
    data: bytes | bytearray | memoryview | None = None

    @property
    def payload_dropped(self) -> bool:
        return self.command == Command.WRITE and self.data is None


class _Payload:
    """A WRITE payload being received: into a buffer from the parser's `allocate`, or else into a
    bytearray whose memory follows the bytes that arrived beyond a first megabyte (a header alone
    must not make the server allocate 32 MiB per connection)."""

    PREALLOCATE = 1024 * 1024

    def __init__(self, header: tuple, length: int, allocate: Allocate | None) -> None:
        self.header = header
        self.length = length
        self.data = allocate(length) if allocate else bytearray(min(length, self.PREALLOCATE))
        self.filled = 0

    @property
    def missing(self) -> int:
        return self.length - self.filled

    def feed(self, chunk) -> int:
        """Take what belongs to this payload from `chunk`; return how many bytes."""
        count = min(len(chunk), self.missing)
        fits = min(count, len(self.data) - self.filled)
        self.data[self.filled : self.filled + fits] = chunk[:fits]
        if fits < count:
            self.data += chunk[fits:count]
        self.filled += count
        return count


class TransmissionParser:
    """Turns the client's byte stream into `Request` events."""

    def __init__(self, *, max_payload: int, initial_data: bytes = b"",
                 allocate: Allocate | None = None) -> None:
        """`allocate(length)` gives the writable memory a large payload is received into
        (page-aligned memory for O_DIRECT, say); small payloads that arrive whole are bytes."""
        self._max_payload = max_payload
        self._allocate = allocate
        self._buffer = ReceiveBuffer()
        self._payload: _Payload | None = None  # a WRITE whose payload is arriving
        self._drain = 0
        if initial_data:
            self._buffer.append(initial_data)

    def receive_data(self, data: bytes) -> None:
        if self._drain:
            dropped = min(self._drain, len(data))
            self._drain -= dropped
            data = data[dropped:]
        if self._payload is not None and not len(self._buffer):
            # Straight into the payload: one copy instead of two.
            data = data[self._payload.feed(data) :]
        if data:
            self._buffer.append(data)

    def payload_space(self) -> memoryview | None:
        """Where the next bytes from the client may be received in place, skipping a copy: the
        rest of a payload that is arriving into memory of its full length, or None (use
        receive_data)."""
        payload = self._payload
        if payload is None or len(self._buffer) or self._drain or len(payload.data) < payload.length:
            return None
        return memoryview(payload.data)[payload.filled :]

    def payload_received(self, count: int) -> None:
        """`count` bytes were written at the start of payload_space()."""
        self._payload.filled += count

    def next_event(self):
        if self._drain:
            return NEED_DATA
        if self._payload is not None:
            payload = self._payload
            if len(self._buffer):
                payload.feed(self._buffer.take(min(len(self._buffer), payload.missing)))
            if payload.missing:
                return NEED_DATA
            self._payload = None
            return self._request(payload.header, payload.data)
        raw = self._buffer.take(_REQUEST.size)
        if raw is None:
            return NEED_DATA
        header = _REQUEST.unpack(raw)
        magic, flags, command, cookie, offset, length = header
        if magic != REQUEST_MAGIC:
            raise ProtocolError(f"bad request magic {magic:#x}")
        if command != Command.WRITE:
            return Request(cookie, command, flags, offset, length)
        if length > self._max_payload:
            self._drain = length - self._buffer.discard(length)
            return self._request(header, None)
        payload = self._buffer.take(length)
        if payload is not None:
            return self._request(header, payload)
        self._payload = _Payload(header, length, self._allocate)
        self._payload.feed(self._buffer.take_all())
        return NEED_DATA

    @staticmethod
    def _request(header: tuple, payload) -> Request:
        _, flags, command, cookie, offset, length = header
        return Request(cookie, command, flags, offset, length, payload)


# Replies.


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def chunk_header(cookie: int, reply_type: ReplyType, length: int, *, done: bool) -> bytes:
    flags = ReplyFlag.DONE if done else 0
    return _CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, flags, reply_type, cookie, length)


def pack_offset_data_header(
    target: memoryview, cookie: int, offset: int, data_length: int, *, done: bool
) -> None:
    """Write an OFFSET_DATA chunk header in front of data read in place after it."""
    flags = ReplyFlag.DONE if done else 0
    _OFFSET_DATA_HEADER.pack_into(
        target, 0, STRUCTURED_REPLY_MAGIC, flags, ReplyType.OFFSET_DATA, cookie,
        8 + data_length, offset,
    )


def pack_simple_reply(target: memoryview, cookie: int) -> None:
    _SIMPLE_REPLY.pack_into(target, 0, SIMPLE_REPLY_MAGIC, 0, cookie)


def offset_hole_chunk(cookie: int, offset: int, length: int, *, done: bool) -> bytes:
    return chunk_header(cookie, ReplyType.OFFSET_HOLE, 12, done=done) + struct.pack(
        ">QI", offset, length
    )


def none_chunk(cookie: int) -> bytes:
    return chunk_header(cookie, ReplyType.NONE, 0, done=True)


def error_chunk(cookie: int, error: int, message: str = "") -> bytes:
    text = message.encode()[:MAX_STRING_LENGTH]
    payload = struct.pack(">IH", error, len(text)) + text
    return chunk_header(cookie, ReplyType.ERROR, len(payload), done=True) + payload


def block_status_chunk(
    cookie: int, context_id: int, extents: list[tuple[int, int]], *, done: bool
) -> bytes:
    """`extents` are (length, flags) pairs, consecutive from the request's offset."""
    payload = struct.pack(f">I{2 * len(extents)}I", context_id, *_flatten(extents))
    return chunk_header(cookie, ReplyType.BLOCK_STATUS, len(payload), done=done) + payload


def _flatten(pairs):
    for length, flags in pairs:
        yield length
        yield flags
