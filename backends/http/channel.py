"""The frames between the server and an http fetcher process, as bytes (no I/O here).

A frame is a header (kind, request id, payload length) and a payload. The server sends the
settings and what its probe of the image found once (CONFIG), then FETCH requests, each a list
of (offset, length) ranges. The fetcher answers once with an empty READY, then every FETCH with
DATA (the ranges' bytes, one after the other) or FAILED (a message, and whether the image
changed); it forwards its log records as LOG frames.
"""

import enum
import pickle
import struct

_HEADER = struct.Struct(">BIQ")
HEADER_SIZE = _HEADER.size
_RANGE = struct.Struct(">QQ")
_FAILED = struct.Struct(">B")
_LOG = struct.Struct(">H")


class Kind(enum.IntEnum):
    CONFIG = 1
    FETCH = 2
    READY = 3
    DATA = 4
    FAILED = 5
    LOG = 6


def header(kind: Kind, request: int, length: int) -> bytes:
    return _HEADER.pack(kind, request, length)


def parse_header(data) -> tuple[Kind, int, int]:
    """(kind, request id, payload length); ValueError for an unknown kind."""
    kind, request, length = _HEADER.unpack(data)
    return Kind(kind), request, length


def frame(kind: Kind, request: int, payload: bytes = b"") -> bytes:
    return header(kind, request, len(payload)) + payload


def config_frame(config, log_level: int, probed: tuple) -> bytes:
    return frame(Kind.CONFIG, 0, pickle.dumps((config, log_level, probed)))


def parse_config(payload: bytes) -> tuple:
    """(the HttpConfig, the log level, what the server's probe found: RemoteImage.probed())."""
    return pickle.loads(payload)  # from the server that started this process: trusted


def fetch_frame(request: int, ranges: list[tuple[int, int]]) -> bytes:
    return frame(Kind.FETCH, request, b"".join(_RANGE.pack(*pair) for pair in ranges))


def parse_fetch(payload: bytes) -> list[tuple[int, int]]:
    return list(_RANGE.iter_unpack(payload))


def failed_frame(request: int, message: str, *, changed: bool) -> bytes:
    return frame(Kind.FAILED, request, _FAILED.pack(changed) + message.encode())


def parse_failed(payload: bytes) -> tuple[str, bool]:
    """(message, whether the image changed)."""
    return bytes(payload[1:]).decode(errors="replace"), bool(payload[0])


def log_frame(level: int, logger: str, message: str) -> bytes:
    return frame(Kind.LOG, 0, _LOG.pack(level) + f"{logger}\0{message}".encode(errors="replace"))


def parse_log(payload: bytes) -> tuple[int, str, str]:
    """(level, logger name, message)."""
    (level,) = _LOG.unpack_from(payload)
    logger, _, message = bytes(payload[_LOG.size :]).decode(errors="replace").partition("\0")
    return level, logger, message
