"""Requests started without a task (Backend.start_*), in-process with a backend whose completions
the test controls: each outcome (done, failed, would block) gets the right reply, replies follow
completion order, and a closing connection waits for what it started. Over a memory stream (the
ReplySender's writer path) and a real socket pair (direct writes)."""

import errno
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from backends.raw import RawFormat
from nbd_wire import request
from nbdserve.backend import Capabilities, WouldBlock
from nbdserve.catalog import Catalog
from nbdserve.config import Limits
from nbdserve.export import ExportConfig
from nbdserve.protocol.constants import Command, CommandFlag, Error
from nbdserve.server.connection import Connection
from test_server_trio import StreamClient

SIZE = 1024 * 1024
PATTERN = bytes(range(256)) * (SIZE // 256)


class ScriptedBackend:
    """In memory; start_* only record the request, and the test completes it with `finish`."""

    capabilities = Capabilities(can_write=True, can_flush=True, can_fua=True, block_size_min=512)

    def __init__(self) -> None:
        self.data = bytearray(PATTERN)
        self.started: list[tuple] = []
        self.async_calls: list[str] = []
        self.flushed = 0

    def get_size(self) -> int:
        return SIZE

    def start_pread(self, buf, offset, done) -> bool:
        self.started.append(("read", buf, offset, done))
        return True

    def start_pwrite(self, buf, offset, fua, done) -> bool:
        self.started.append(("write", bytes(buf), offset, done))
        return True

    def start_flush(self, done) -> bool:
        self.started.append(("flush", None, 0, done))
        return True

    def finish(self, index: int, error: Exception | None = None) -> None:
        kind, buf, offset, done = self.started[index]
        if error is None:
            if kind == "read":
                buf[:] = self.data[offset : offset + len(buf)]
            elif kind == "write":
                self.data[offset : offset + len(buf)] = buf
            else:
                self.flushed += 1
        done(error)

    async def pread(self, buf, offset) -> None:
        self.async_calls.append("pread")
        buf[:] = self.data[offset : offset + len(buf)]

    async def pwrite(self, buf, offset, *, fua=False) -> None:
        self.async_calls.append("pwrite")
        self.data[offset : offset + len(buf)] = buf

    async def flush(self) -> None:
        self.async_calls.append("flush")

    async def close(self) -> None:
        pass


class ScriptedDriver:
    def __init__(self, backend: ScriptedBackend) -> None:
        self.backend = backend

    async def open(self, config, options):
        return self.backend


def socket_pair():
    left, right = trio.socket.socketpair()
    return trio.SocketStream(left), trio.SocketStream(right)


class LendingBackend(ScriptedBackend):
    """Answers reads with views of its own memory, in pieces, as a cache of blocks would."""

    def start_pread_views(self, offset, length, done) -> bool:
        self.started.append(("views", length, offset, done))
        return True

    def finish(self, index: int, error: Exception | None = None) -> None:
        kind, length, offset, done = self.started[index]
        if kind != "views":
            super().finish(index, error)
        elif error is None:
            data = memoryview(bytes(self.data[offset : offset + length]))
            done(None, [data[:1000], data[1000:]])
        else:
            done(error, None)


@pytest.fixture(params=["memory", "socket"])
async def connected(request, nursery):
    """(backend, client) with a negotiated connection to the export `disk`."""
    async with serving(ScriptedBackend(), request.param, nursery) as connection:
        yield connection


@pytest.fixture(params=["memory", "socket"])
async def lending(request, nursery):
    """connected, with a backend that lends its memory for reads."""
    async with serving(LendingBackend(), request.param, nursery) as connection:
        yield connection


@asynccontextmanager
async def serving(backend: ScriptedBackend, stream_kind: str, nursery):
    config = ExportConfig("disk", ScriptedDriver(backend), None, RawFormat(), None)
    catalog = Catalog({"disk": config})
    client_end, server_end = socket_pair() if stream_kind == "socket" else trio.testing.memory_stream_pair()
    connection = Connection(server_end, stream_kind, catalog, Limits())
    nursery.start_soon(connection.run)
    client = StreamClient(client_end)
    await client.negotiate("disk")
    yield backend, client
    await catalog.flush_and_close()


async def started(backend: ScriptedBackend, count: int) -> None:
    with trio.fail_after(5):
        while len(backend.started) < count:
            await trio.sleep(0.001)


async def test_replies_follow_completion_order_and_carry_the_data(connected):
    backend, client = connected
    await client.stream.send_all(
        request(Command.READ, 4096, 8192, cookie=1)
        + request(Command.WRITE, 0, 4096, cookie=2, data=b"w" * 4096)
        + request(Command.FLUSH, cookie=3)
    )
    await started(backend, 3)
    assert [kind for kind, *_ in backend.started] == ["read", "write", "flush"]
    backend.finish(2)
    assert await client.simple_reply() == (0, 3)
    backend.finish(1)
    assert await client.simple_reply() == (0, 2)
    backend.finish(0)
    assert await client.simple_reply() == (0, 1)
    assert await client.receive_exact(8192) == PATTERN[4096 : 4096 + 8192]
    assert backend.data[:4096] == b"w" * 4096 and backend.flushed == 1
    assert backend.async_calls == []


async def test_a_failed_request_gets_its_error_and_the_connection_goes_on(connected):
    backend, client = connected
    await client.stream.send_all(request(Command.WRITE, 0, 512, cookie=7, data=b"x" * 512))
    await started(backend, 1)
    backend.finish(0, OSError(errno.ENOSPC, "no space left"))
    assert await client.simple_reply() == (Error.ENOSPC, 7)
    await client.stream.send_all(request(Command.READ, 0, 512, cookie=8))
    await started(backend, 2)
    backend.finish(1)
    assert await client.simple_reply() == (0, 8)
    assert await client.receive_exact(512) == PATTERN[:512]


async def test_a_request_that_would_block_is_served_by_the_async_method(connected):
    backend, client = connected
    await client.stream.send_all(
        request(Command.READ, 512, 1024, cookie=1)
        + request(Command.WRITE, 0, 512, flags=CommandFlag.FUA, cookie=2, data=b"f" * 512)
    )
    await started(backend, 2)
    backend.finish(0, WouldBlock())
    backend.finish(1, WouldBlock())
    replies = {}
    for _ in range(2):
        error, cookie = await client.simple_reply()
        replies[cookie] = error
        if cookie == 1:
            assert await client.receive_exact(1024) == PATTERN[512:1536]
    assert replies == {1: 0, 2: 0}
    assert sorted(backend.async_calls) == ["pread", "pwrite"]
    assert backend.data[:512] == b"f" * 512


async def test_disconnect_waits_for_started_requests(connected):
    backend, client = connected
    await client.stream.send_all(request(Command.READ, 0, 512, cookie=5) + request(Command.DISC))
    await started(backend, 1)
    await trio.sleep(0.05)  # the reader has seen DISC; the read is still out
    backend.finish(0)
    assert await client.simple_reply() == (0, 5)
    assert await client.receive_exact(512) == PATTERN[:512]
    assert await client.at_eof()


async def test_lent_data_goes_out_as_replies_in_completion_order(lending):
    backend, client = lending
    await client.stream.send_all(request(Command.READ, 0, 4096, cookie=1) + request(Command.READ, 8192, 2048, cookie=2)
                                 + request(Command.READ, 512, 1024, cookie=3))
    await started(backend, 3)
    assert [kind for kind, *_ in backend.started] == ["views"] * 3
    backend.finish(1)
    backend.finish(2, OSError(errno.EIO, "the remote image changed"))
    backend.finish(0)
    assert await client.simple_reply() == (0, 2)
    assert await client.receive_exact(2048) == PATTERN[8192 : 8192 + 2048]
    assert await client.simple_reply() == (Error.EIO, 3)
    assert await client.simple_reply() == (0, 1)
    assert await client.receive_exact(4096) == PATTERN[:4096]
    assert backend.async_calls == []
