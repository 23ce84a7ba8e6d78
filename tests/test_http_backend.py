"""The http backend in-process against a server that misbehaves on purpose: retries, timeouts,
dropped connections, ignored ranges, changed images, shared fetches, readahead and the cache."""

import errno
import gc
import logging
import os
import random
import signal

import pytest
import trio
from http_servers import faulty_server  # noqa: F401 (a fixture)

from backends.http import HttpDriver
from nbdserve.backend import OpenOptions
from nbdserve.registry import ParseContext
from nbdserve.settings import Section

IMAGE_SIZE = 4 * 1024 * 1024
BLOCK = 4096  # the http source's unit of caching and fetching
PROBES = 3  # range GETs made at open: one for the size, two ranges to test multipart replies


@pytest.fixture(scope="module")
def image() -> bytes:
    return random.Random(4).randbytes(IMAGE_SIZE)


async def open_backend(tmp_path, url: str, **settings):
    section = Section({"url": url, **settings}, "exports.disk.source")
    config = HttpDriver().parse(section, ParseContext(base_dir=tmp_path))
    section.done()
    return await HttpDriver().open(config, OpenOptions(read_only=True))


async def read(backend, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    await backend.pread(memoryview(buf), offset)
    return bytes(buf)


async def test_reads_match_the_image(tmp_path, faulty_server, image):
    server = faulty_server(image)
    backend = await open_backend(tmp_path, server.url())
    assert backend.get_size() == IMAGE_SIZE
    assert backend.capabilities.can_write is False
    assert backend.capabilities.can_multi_conn is True
    rng = random.Random(1)
    requests = [(rng.randrange(IMAGE_SIZE - 300_000), rng.choice([1, 512, 4096, 200_000])) for _ in range(40)]
    results = {}

    async def one(offset, length):
        results[offset, length] = await read(backend, offset, length)

    async with trio.open_nursery() as nursery:
        for offset, length in requests:
            nursery.start_soon(one, offset, length)
    for (offset, length), data in results.items():
        assert data == image[offset : offset + length], (offset, length)
    assert await read(backend, IMAGE_SIZE - 10, 10) == image[-10:]  # the short last block
    await backend.close()


async def test_concurrent_reads_of_the_same_blocks_share_one_fetch(tmp_path, faulty_server, image):
    server = faulty_server(image)
    backend = await open_backend(tmp_path, server.url())
    before = len(server.range_gets())
    results = []

    async def one(offset):
        results.append(await read(backend, offset, 4096) == image[offset : offset + 4096])

    base = 80 * BLOCK
    async with trio.open_nursery() as nursery:
        # 16 reads, each overlapping the next, over 5 blocks: not a stream, so no readahead.
        for offset in [base + 1000 * i for i in range(16)]:
            nursery.start_soon(one, offset)
    assert results == [True] * 16
    assert server.range_gets()[before:] == [f"bytes={base}-{base + 5 * BLOCK - 1}"]
    # Now cached: served inline, without a request or an await.
    buf = bytearray(4096)
    assert backend.try_pread(memoryview(buf), base + 100)
    assert bytes(buf) == image[base + 100 : base + 100 + 4096]
    assert not backend.try_pread(memoryview(buf), base + 5 * BLOCK)
    assert len(server.range_gets()) == before + 1
    await backend.close()


async def test_random_reads_waiting_together_go_out_in_one_request(tmp_path, faulty_server, image):
    server = faulty_server(image)
    backend = await open_backend(tmp_path, server.url(), **{"pool-size": 1, "cache-size": 0})
    rng = random.Random(3)
    blocks = list(range(IMAGE_SIZE // BLOCK))

    async def reader():
        for _ in range(8):
            offset = rng.choice(blocks) * BLOCK + 100
            assert await read(backend, offset, 512) == image[offset : offset + 512]

    before = len(server.range_gets())
    async with trio.open_nursery() as nursery:
        for _ in range(16):
            nursery.start_soon(reader)
    # 128 reads by 16 readers, one request at a time: those that wait meanwhile are batched.
    assert len(server.range_gets()) - before <= 32
    await backend.close()


async def start_reads(backend, offsets: list[int], length: int) -> list[bytes]:
    """Start reads the way a connection does (no task each, views of the cache lent), all in one
    burst; their data."""
    data: dict[int, bytes] = {}
    outcomes = []
    all_done = trio.Event()

    def done_for(offset):
        def done(error, views):
            outcomes.append(error)
            if error is None:
                data[offset] = b"".join(views)
            if len(outcomes) == len(offsets):
                all_done.set()

        return done

    for offset in offsets:
        assert not backend.try_pread(memoryview(bytearray(length)), offset)
        assert backend.start_pread_views(offset, length, done_for(offset))
    await all_done.wait()
    assert outcomes == [None] * len(offsets)
    return [data[offset] for offset in offsets]


async def test_reads_started_in_one_burst_go_out_in_one_request(tmp_path, faulty_server, image):
    server = faulty_server(image)
    backend = await open_backend(tmp_path, server.url(), **{"cache-size": 0})
    starts = [n * 16 * BLOCK for n in range(1, 64, 4)]  # 16 reads, none adjacent
    offsets = [start + 100 for start in starts]  # 4 KiB from there: two blocks each
    before = len(server.range_gets())
    data = await start_reads(backend, offsets, 4096)
    assert data == [image[offset : offset + 4096] for offset in offsets]
    # The fetch takes its batch when its task begins: by then the whole burst has queued.
    assert server.range_gets()[before:] == [
        "bytes=" + ",".join(f"{start}-{start + 2 * BLOCK - 1}" for start in starts)
    ]
    await backend.close()


async def test_finished_reads_leave_no_reference_cycles(tmp_path, faulty_server, image):
    # A cycle would keep fetched data alive until the garbage collector happens to run: on a
    # whole-image copy that held hundreds of MiB.
    server = faulty_server(image)
    backend = await open_backend(tmp_path, server.url(), **{"cache-size": 0})
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        await start_reads(backend, [BLOCK * 3, BLOCK * 3 + 10, BLOCK * 7], 100)
        await read(backend, BLOCK * 9, 100)
        gc.collect()
        cyclic = [type(item).__name__ for item in gc.garbage if type(item).__module__ == "backends.http.loader"]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert cyclic == []
    await backend.close()


async def test_sequential_reads_are_read_ahead(tmp_path, faulty_server, image):
    server = faulty_server(image)
    backend = await open_backend(tmp_path, server.url(), readahead="1M")
    before = len(server.range_gets())
    for offset in range(0, 2 * 1024 * 1024, 32 * 1024):
        assert await read(backend, offset, 32 * 1024) == image[offset : offset + 32 * 1024]
        await trio.sleep(0.005)  # a guest between reads: time for readahead to land
    # The third read makes a stream: 1 MiB windows come after it in one request each, half a
    # window before they are needed.
    read_size, window = 32 * 1024, 1024 * 1024
    ahead = 3 * read_size
    assert sorted(server.range_gets()[before:], key=lambda value: int(value[6:].split("-")[0])) == [
        f"bytes={start}-{start + read_size - 1}" for start in (0, read_size, 2 * read_size)
    ] + [f"bytes={ahead + n * window}-{ahead + (n + 1) * window - 1}" for n in range(3)]
    await backend.close()


async def test_the_cache_stays_within_its_size(tmp_path, faulty_server, image):
    server = faulty_server(image)
    backend = await open_backend(tmp_path, server.url(), **{"cache-size": "128K", "readahead": 0})
    last = IMAGE_SIZE - 16 * BLOCK
    for offset in range(0, IMAGE_SIZE, 16 * BLOCK):  # 64 blocks fetched, room for 32
        assert await read(backend, offset, 100) == image[offset : offset + 100]
    assert 0 < backend.cache.used <= 128 * 1024
    before = len(server.range_gets())
    assert await read(backend, last, 100) == image[last : last + 100]
    assert await read(backend, 0, 100) == image[:100]  # dropped long ago: fetched again
    assert len(server.range_gets()) == before + 1
    await backend.close()


async def test_5xx_is_retried(tmp_path, faulty_server, image):
    server = faulty_server(image)
    backend = await open_backend(tmp_path, server.url())
    server.faults.fail_next = 2
    assert await read(backend, BLOCK, 4096) == image[BLOCK : BLOCK + 4096]
    assert server.range_gets()[-3:] == [f"bytes={BLOCK}-{2 * BLOCK - 1}"] * 3
    await backend.close()


async def test_errors_beyond_the_retries_are_eio_and_reads_recover(tmp_path, faulty_server, image, caplog):
    server = faulty_server(image)
    backend = await open_backend(tmp_path, server.url(), retries=2)
    server.faults.fail_next = 3
    with pytest.raises(OSError) as failure:
        await read(backend, 0, 4096)
    assert failure.value.errno == errno.EIO
    assert "failed after 3 attempts: HTTP 503" in str(failure.value)
    assert "retry 2 of 2" in caplog.text
    assert await read(backend, 0, 4096) == image[:4096]  # the failure was not cached
    await backend.close()


async def test_slow_replies_time_out_and_are_retried(tmp_path, faulty_server, image, caplog):
    server = faulty_server(image)
    backend = await open_backend(tmp_path, server.url(), **{"read-timeout": 0.3})
    server.faults.delay, server.faults.slow_next = 1.0, 1
    start = trio.current_time()
    assert await read(backend, 2 * BLOCK, 4096) == image[2 * BLOCK : 2 * BLOCK + 4096]
    assert trio.current_time() - start < 0.9
    assert "read timed out" in caplog.text
    await backend.close()


async def test_a_connection_dropped_mid_body_is_retried(tmp_path, faulty_server, image, caplog):
    server = faulty_server(image)
    backend = await open_backend(tmp_path, server.url())
    server.faults.drop_next = 1
    assert await read(backend, 3 * BLOCK, BLOCK) == image[3 * BLOCK : 4 * BLOCK]
    assert "the connection broke in the middle of the reply" in caplog.text
    await backend.close()


async def test_a_server_ignoring_ranges_is_refused_at_open(tmp_path, faulty_server, image):
    server = faulty_server(image)
    server.faults.ignore_range = True
    with pytest.raises(OSError, match="ignores byte ranges") as failure:
        await open_backend(tmp_path, server.url())
    assert failure.value.errno == errno.EIO


async def test_a_200_reply_to_a_range_is_not_served(tmp_path, faulty_server, image):
    server = faulty_server(image)
    backend = await open_backend(tmp_path, server.url())
    server.faults.ignore_range = True
    with pytest.raises(OSError, match=r"ignored the Range header \(200 OK\)"):
        await read(backend, 5 * BLOCK, 4096)
    await backend.close()


async def test_a_416_reply_is_eio(tmp_path, faulty_server, image):
    server = faulty_server(image)
    backend = await open_backend(tmp_path, server.url())
    server.image = image[: IMAGE_SIZE // 2]  # the object shrank behind our back
    with pytest.raises(OSError, match="range not satisfiable") as failure:
        await read(backend, IMAGE_SIZE - 4096, 4096)
    assert failure.value.errno == errno.EIO
    await backend.close()


async def test_a_changed_etag_fails_every_read(tmp_path, faulty_server, image, caplog):
    server = faulty_server(image)
    backend = await open_backend(tmp_path, server.url())
    assert await read(backend, 0, 4096) == image[:4096]
    server.faults.etag = '"v2"'
    with pytest.raises(OSError, match='ETag changed from "v1" to "v2"') as failure:
        await read(backend, 6 * BLOCK, 4096)
    assert failure.value.errno == errno.EIO
    assert "the remote image changed" in caplog.text
    with pytest.raises(OSError, match="changed"):
        await read(backend, 0, 4096)  # cached, but from the old image: not mixed with the new
    await backend.close()


async def test_refused_head_falls_back_to_a_range_get(tmp_path, faulty_server, image):
    server = faulty_server(image)
    server.faults.refuse_head = True
    backend = await open_backend(tmp_path, server.url())
    assert backend.get_size() == IMAGE_SIZE
    assert await read(backend, 1000, 10) == image[1000:1010]
    await backend.close()


async def test_redirects_are_followed(tmp_path, faulty_server, image):
    server = faulty_server(image)
    backend = await open_backend(tmp_path, server.url("redirect"))
    assert await read(backend, 7 * BLOCK, 100) == image[7 * BLOCK : 7 * BLOCK + 100]
    await backend.close()


async def test_servers_without_multipart_replies_get_one_range_per_request(tmp_path, faulty_server, image):
    server = faulty_server(image)
    server.faults.multirange = "ignore"
    backend = await open_backend(tmp_path, server.url(), **{"pool-size": 1})
    offsets = [BLOCK * 10, BLOCK * 30, BLOCK * 50, BLOCK * 11]
    results = {}

    async def one(offset):
        results[offset] = await read(backend, offset, 4096)

    async with trio.open_nursery() as nursery:
        for offset in offsets:
            nursery.start_soon(one, offset)
    assert all(results[offset] == image[offset : offset + 4096] for offset in offsets)
    assert all("," not in value for value in server.range_gets()[PROBES:])
    await backend.close()


async def test_auth_headers_and_cookies_are_sent_and_secrets_never_logged(tmp_path, faulty_server, image, caplog):
    caplog.set_level(logging.DEBUG)
    server = faulty_server(image)
    (tmp_path / "password").write_text("s3cret-pass\n")
    server.faults.authorization = "Basic YWxpY2U6czNjcmV0LXBhc3M="  # alice:s3cret-pass
    backend = await open_backend(
        tmp_path, server.url() + "?X-Signature=sig123",
        user="alice", **{"password-file": "password"},
        headers={"X-Tenant": "blue"}, cookies={"session": "c00kie"},
    )
    assert await read(backend, 0, 10) == image[:10]
    headers = server.requests[-1][2]
    assert headers["X-Tenant"] == "blue"
    assert headers["Cookie"] == "session=c00kie"
    await backend.close()

    (tmp_path / "token").write_text("tok-789")
    server.faults.authorization = "Bearer tok-789"
    backend = await open_backend(tmp_path, server.url(), **{"token-file": str(tmp_path / "token")})
    assert await read(backend, 0, 10) == image[:10]
    await backend.close()
    server.faults.fail_next = 1  # a retry logs a warning: it must not show secrets either
    backend = await open_backend(tmp_path, server.url() + "?X-Signature=sig123", **{"token-file": "token"})
    assert await read(backend, BLOCK, 10) == image[BLOCK : BLOCK + 10]
    await backend.close()
    assert "retry 1 of" in caplog.text
    for secret in ("s3cret-pass", "tok-789", "sig123", "YWxpY2U6"):
        assert secret not in caplog.text


async def test_requests_go_through_the_configured_proxy(tmp_path, faulty_server, image):
    proxy = faulty_server(image)  # answers for any URL, as a forward proxy would
    backend = await open_backend(tmp_path, "http://images.invalid/disk.img", proxy=proxy.url(""))
    assert await read(backend, 5, 10) == image[5:15]
    assert set(proxy.paths) == {"http://images.invalid/disk.img"}  # absolute URLs: proxy requests
    await backend.close()


async def test_unreachable_server_is_a_clear_error(tmp_path):
    from conftest import free_port

    with pytest.raises(OSError, match="HEAD failed after 1 attempts: Connection refused"):
        await open_backend(tmp_path, f"http://127.0.0.1:{free_port()}/x", retries=0)


def test_no_secret_in_repr(tmp_path):
    (tmp_path / "password").write_text("hunter2")
    section = Section({"url": "http://h/x?sig=abc", "user": "u", "password-file": "password"}, "s")
    config = HttpDriver().parse(section, ParseContext(base_dir=tmp_path))
    assert "hunter2" not in repr(config) and "abc" not in repr(config)
    assert config.display_url == "http://h/x?…"
    assert os.fspath(tmp_path) not in config.display_url


def fetcher_pids(backend) -> list[int]:
    return [fetcher._process.pid for fetcher in backend.remote._processes]


async def test_a_fetcher_process_that_dies_fails_its_fetch_and_is_replaced(tmp_path, faulty_server, image, caplog):
    server = faulty_server(image)
    backend = await open_backend(tmp_path, server.url(), **{"pool-size": 1, "read-timeout": 5})
    [old] = fetcher_pids(backend)
    server.faults.delay, server.faults.slow_next = 2.0, 1
    failures = []

    async def failing_read():
        with pytest.raises(OSError, match="the fetcher process stopped") as failure:
            await read(backend, 9 * BLOCK, 100)
        failures.append(failure.value.errno)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(failing_read)
        await trio.sleep(0.3)  # the read is with the fetcher, which waits for the reply
        os.kill(old, signal.SIGKILL)
    assert failures == [errno.EIO]
    assert "a fetcher process stopped" in caplog.text
    with trio.fail_after(10):
        while fetcher_pids(backend) == [old]:
            await trio.sleep(0.01)
    assert await read(backend, 9 * BLOCK, 100) == image[9 * BLOCK : 9 * BLOCK + 100]
    await backend.close()


async def test_fetcher_processes_end_with_the_backend(tmp_path, faulty_server, image):
    backend = await open_backend(tmp_path, faulty_server(image).url(), **{"pool-size": 2})
    processes = [fetcher._process for fetcher in backend.remote._processes]
    assert len(processes) == 2 and all(process.returncode is None for process in processes)
    await backend.close()
    assert [process.returncode for process in processes] == [0, 0]
