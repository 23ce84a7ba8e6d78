"""ReplySender: replies whole and in order from callbacks and tasks, over a socket and over a
wrapped stream; backpressure, a peer that goes away, and closing."""

import os
import socket

import pytest
import trio
import trio.testing

from nbdserve.server.sender import ReplySender

MiB = 1024 * 1024
LARGE = bytes(range(256)) * (4 * MiB // 256)  # more than a socket buffer holds


def socket_pair():
    left, right = trio.socket.socketpair()
    return trio.SocketStream(left), trio.SocketStream(right)


def running_sender(stream, nursery) -> ReplySender:
    """A sender on `stream` with its writer running, for tests that do not watch it break."""
    sender = ReplySender(stream, on_broken=lambda cause: None)
    nursery.start_soon(sender.run)
    return sender


async def receive_exact(stream, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = await stream.receive_some(count - len(data))
        assert chunk, f"EOF after {len(data)} of {count} bytes"
        data += chunk
    return bytes(data)


@pytest.mark.parametrize("pair", [socket_pair, trio.testing.memory_stream_pair])
async def test_replies_arrive_whole_in_order_and_report_when_sent(pair, nursery):
    server, client = pair()
    broken = []
    sender = ReplySender(server, on_broken=broken.append)
    nursery.start_soon(sender.run)
    sent = []
    sender.send_nowait(LARGE, lambda ok: sent.append(("large", ok)))
    sender.send_nowait(b"small", lambda ok: sent.append(("small", ok)))
    assert ("small", True) not in sent  # behind the large one, which the socket cannot take whole
    assert await receive_exact(client, len(LARGE)) == LARGE
    assert await receive_exact(client, 5) == b"small"
    with trio.fail_after(5):
        while len(sent) < 2:
            await trio.sleep(0.001)
    assert sent == [("large", True), ("small", True)] and not broken


async def test_send_returns_once_the_client_has_taken_the_bytes(nursery):
    server, client = socket_pair()
    sender = running_sender(server, nursery)
    returned = trio.Event()

    async def send_large():
        await sender.send(LARGE)
        returned.set()

    nursery.start_soon(send_large)
    await trio.testing.wait_all_tasks_blocked()
    assert not returned.is_set()  # the client has read nothing: backpressure
    assert await receive_exact(client, len(LARGE)) == LARGE
    with trio.fail_after(5):
        await returned.wait()


async def test_a_peer_that_goes_away_fails_queued_and_later_replies(nursery):
    server, client = socket_pair()
    client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    broken = []
    sender = ReplySender(server, on_broken=broken.append)
    nursery.start_soon(sender.run)
    outcomes = []
    sender.send_nowait(LARGE, outcomes.append)
    await client.aclose()  # with linger 0: a reset, so writes fail at once
    with trio.fail_after(5):
        while not outcomes:
            await trio.sleep(0.001)
    assert outcomes == [False] and len(broken) == 1 and isinstance(broken[0], OSError)
    sender.send_nowait(b"late", outcomes.append)
    assert outcomes == [False, False]
    with pytest.raises(trio.BrokenResourceError):
        await sender.send(b"later")


async def test_close_sends_what_is_queued_then_ends_the_writer():
    server, client = socket_pair()
    sender = ReplySender(server, on_broken=lambda cause: None)
    outcomes = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender.run)
        sender.send_nowait(LARGE, outcomes.append)
        sender.close()
        assert await receive_exact(client, len(LARGE)) == LARGE
    assert outcomes == [True]  # the writer returned: the nursery closed
    sender.send_nowait(b"after", outcomes.append)
    assert outcomes == [True, False]


@pytest.mark.parametrize("pair", [socket_pair, trio.testing.memory_stream_pair])
async def test_a_reply_of_several_buffers_arrives_whole(pair, nursery):
    server, client = pair()
    sender = running_sender(server, nursery)
    sent = []
    header, data = b"header:", memoryview(LARGE)
    sender.send_nowait([header, data[:MiB], data[MiB:]], sent.append)
    nursery.start_soon(sender.send, (b"tail", b"!"))
    assert await receive_exact(client, len(header) + len(LARGE) + 5) == header + LARGE + b"tail!"
    assert sent == [True]


async def test_a_burst_of_replies_takes_two_writes(nursery, monkeypatch):
    """The first reply of a burst goes out at once; those after it go out together once the
    writer runs."""
    from nbdserve.server import sender as sender_module

    writes = []

    class CountingOs:
        def __getattr__(self, name):
            return getattr(os, name)

        def write(self, fd, data):
            writes.append(1)
            return os.write(fd, data)

        def writev(self, fd, buffers):
            writes.append(len(buffers))
            return os.writev(fd, buffers)

    monkeypatch.setattr(sender_module, "os", CountingOs())
    server, client = socket_pair()
    sender = running_sender(server, nursery)
    sent = []
    for number in range(10):
        sender.send_nowait([b"%d:" % number, b"data;"], sent.append)
    assert writes == [2]  # the first reply alone, at once: no pass through the scheduler
    expected = b"".join(b"%d:data;" % number for number in range(10))
    assert await receive_exact(client, len(expected)) == expected
    assert writes == [2, 18] and sent == [True] * 10


@pytest.mark.parametrize("pair", [socket_pair, trio.testing.memory_stream_pair])
async def test_empty_buffers_count_as_sent(pair, nursery):
    server, client = pair()
    sender = running_sender(server, nursery)
    sent = []
    sender.send_nowait([b"header", b""], sent.append)
    with trio.fail_after(5):
        await sender.send(b"")
        await sender.send((b"", b"tail"))
    assert await receive_exact(client, 10) == b"headertail"
    assert sent == [True]
