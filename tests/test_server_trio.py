"""The trio server in-process, over memory streams: deterministic where real sockets are not
(a client that reads nothing until told to, timeouts on a virtual clock)."""

import struct

import trio
import trio.testing

from nbd_wire import client_flags, go, request
from nbdserve.catalog import Catalog
from nbdserve.config import parse_config
from nbdserve.protocol.constants import IHAVEOPT, NBDMAGIC, SIMPLE_REPLY_MAGIC, Command, Reply
from nbdserve.server.connection import Connection

MiB = 1024 * 1024
PATTERN = bytes(range(256)) * (4 * MiB // 256)


class StreamClient:
    """Reads exact byte counts from the client end of a trio stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buffer = bytearray()

    async def receive_exact(self, count: int) -> bytes:
        while len(self._buffer) < count:
            data = await self.stream.receive_some()
            if not data:
                raise EOFError(f"EOF with {len(self._buffer)} of {count} bytes")
            self._buffer += data
        chunk = bytes(self._buffer[:count])
        del self._buffer[:count]
        return chunk

    async def at_eof(self) -> bool:
        return not self._buffer and not await self.stream.receive_some()

    async def negotiate(self, export: str) -> None:
        assert struct.unpack(">QQH", await self.receive_exact(18))[:2] == (NBDMAGIC, IHAVEOPT)
        await self.stream.send_all(client_flags() + go(export))
        while True:
            _, _, reply, length = struct.unpack(">QIII", await self.receive_exact(20))
            await self.receive_exact(length)
            if reply == Reply.ACK:
                return
            assert reply == Reply.INFO, hex(reply)

    async def simple_reply(self) -> tuple[int, int]:
        magic, error, cookie = struct.unpack(">IIQ", await self.receive_exact(16))
        assert magic == SIMPLE_REPLY_MAGIC
        return error, cookie


def serving(tmp_path, **limits):
    image = tmp_path / "disk.img"
    image.write_bytes(PATTERN)
    config = parse_config({"exports": {"disk": {"source": str(image)}}, "state-dir": str(tmp_path),
                           "limits": limits})
    return Catalog(config.exports), config.limits


async def test_stop_reading_lets_blocked_replies_go_out_whole(tmp_path):
    catalog, limits = serving(tmp_path)
    # Lockstep: every send waits for the client to read, as with a client that reads slowly.
    client_end, server_end = trio.testing.lockstep_stream_pair()
    connection = Connection(server_end, "memory", catalog, limits)
    client = StreamClient(client_end)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(connection.run)
        await client.negotiate("disk")
        await client_end.send_all(b"".join(request(Command.READ, i * MiB, MiB, cookie=i) for i in range(4)))
        await trio.testing.wait_all_tasks_blocked()
        connection.stop_reading()  # what shutdown does, while replies wait for the client
        for _ in range(4):
            error, cookie = await client.simple_reply()
            assert error == 0
            assert await client.receive_exact(MiB) == PATTERN[cookie * MiB : (cookie + 1) * MiB]
        assert await client.at_eof()
    await catalog.flush_and_close()


async def test_handshake_timeout_on_a_virtual_clock(tmp_path, autojump_clock):
    catalog, limits = serving(tmp_path, **{"handshake-timeout": 30})
    client_end, server_end = trio.testing.memory_stream_pair()
    client = StreamClient(client_end)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(Connection(server_end, "memory", catalog, limits).run)
            await client.receive_exact(18)  # the greeting; then the client says nothing
            started = trio.current_time()
            assert await client.at_eof()
            assert 30 <= trio.current_time() - started < 31
    await catalog.flush_and_close()
