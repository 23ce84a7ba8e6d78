"""The http source's pieces without I/O: the frames to and from fetcher processes, and how the
block cache counts the reply bodies it keeps views of."""

import logging

from backends.http import channel
from backends.http.cache import BlockCache
from backends.http.config import HttpConfig

BLOCK = 4096


def parsed(frame: bytes) -> tuple:
    kind, request, length = channel.parse_header(frame[: channel.HEADER_SIZE])
    payload = frame[channel.HEADER_SIZE :]
    assert len(payload) == length
    return kind, request, payload


def test_frames_round_trip():
    kind, request, payload = parsed(channel.fetch_frame(7, [(0, 4096), (1 << 40, 12)]))
    assert (kind, request) == (channel.Kind.FETCH, 7)
    assert channel.parse_fetch(payload) == [(0, 4096), (1 << 40, 12)]

    kind, request, payload = parsed(channel.failed_frame(9, "ETag changed: ünïcode", changed=True))
    assert (kind, request, channel.parse_failed(payload)) == (channel.Kind.FAILED, 9, ("ETag changed: ünïcode", True))

    kind, _, payload = parsed(channel.log_frame(logging.WARNING, "backends.http.remote", "retry 1 of 5"))
    assert channel.parse_log(payload) == (logging.WARNING, "backends.http.remote", "retry 1 of 5")

    config = HttpConfig(url="https://example.invalid/disk.img?sig=s3cret", token="tok", pool_size=2)
    kind, _, payload = parsed(channel.config_frame(config, logging.INFO, (100, 32, '"e"', None)))
    assert channel.parse_config(payload) == (config, logging.INFO, (100, 32, '"e"', None))


def test_a_body_is_counted_once_while_any_of_its_runs_is_cached():
    cache = BlockCache(capacity=64 * 1024, block_size=BLOCK)
    body = bytes(range(256)) * 40  # 10240 bytes: two runs and what lies between them
    view = memoryview(body)
    cache.put(10, view[:BLOCK])
    cache.put(20, view[5000 : 5000 + 2 * BLOCK])
    assert cache.used == len(body)
    assert bytes(cache.views(20, 21)[0]) == body[5000 : 5000 + 2 * BLOCK]
    assert cache.views(10, 11) is None  # block 11 was never put

    other = memoryview(bytes(56 * 1024))
    cache.put(100, other)  # over capacity: dropping the oldest run frees nothing, so the next
    assert cache.views(10, 10) is None and cache.views(20, 20) is None  # goes too
    assert cache.used == len(other)
    assert bytes(cache.views(100, 113)[0]) == bytes(other)
