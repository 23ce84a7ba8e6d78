"""Random workloads on qcow2 exports: writes, zeroes, trims and flushes from two connections at
once, mirrored on a raw shadow copy; after every workload `qemu-img check` finds no error and no
leak and `qemu-img compare` finds no difference."""

import nbd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qcow2_helpers import (CREATE, assert_same_contents, check_image, qemu_img_create, random_bytes,
                           write_raw)
from conftest import run

SIZE = 6 * 1024 * 1024
SECTOR = 512


def overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[0] + b[1] and b[0] < a[0] + a[1]


class Workload:
    """Commands issued concurrently on several connections; a command that overlaps one still in
    flight waits for all of them, so the result does not depend on the order of replies."""

    def __init__(self, uri: str, connections: int, shadow: bytearray, trim_model) -> None:
        self.handles = []
        for _ in range(connections):
            handle = nbd.NBD()
            handle.connect_uri(uri)
            self.handles.append(handle)
        self.shadow = shadow
        self.trim_model = trim_model
        self.in_flight: list[tuple[nbd.NBD, int, tuple[int, int]]] = []
        self.buffers = []

    def wait_all(self) -> None:
        while self.in_flight:
            for handle in self.handles:
                if handle.aio_in_flight():
                    handle.poll(0)
            for item in list(self.in_flight):
                handle, cookie, _ = item
                try:
                    done = handle.aio_command_completed(cookie)
                except nbd.Error as exc:
                    raise AssertionError(f"command failed: {exc}") from None
                if done:
                    self.in_flight.remove(item)

    def issue(self, index: int, op: tuple) -> None:
        kind, offset, length, value = op
        span = (offset, length)
        if any(overlaps(span, other) for _, _, other in self.in_flight) or kind == "flush":
            self.wait_all()
        handle = self.handles[index % len(self.handles)]
        if kind == "write":
            data = bytes([value]) * length
            buf = nbd.Buffer.from_bytearray(bytearray(data))
            self.buffers.append(buf)
            cookie = handle.aio_pwrite(buf, offset)
            self.shadow[offset:offset + length] = data
        elif kind == "zero":
            cookie = handle.aio_zero(length, offset, flags=0 if value & 1 else nbd.CMD_FLAG_NO_HOLE)
            self.shadow[offset:offset + length] = bytes(length)
        elif kind == "trim":
            cookie = handle.aio_trim(length, offset)
            for start, end in self.trim_model(offset, length):
                self.shadow[start:end] = bytes(end - start)
        else:
            cookie = handle.aio_flush()
        self.in_flight.append((handle, cookie, span))

    def finish(self) -> None:
        self.wait_all()
        for handle in self.handles:
            handle.flush()
            handle.shutdown()


def operations(cluster_size: int):
    offsets = st.one_of(
        st.integers(0, SIZE // SECTOR - 1).map(lambda s: s * SECTOR),
        st.integers(0, SIZE // cluster_size - 1).map(lambda c: c * cluster_size),
    )
    lengths = st.one_of(st.integers(1, 64).map(lambda s: s * SECTOR),
                        st.integers(1, 3).map(lambda c: c * cluster_size))
    op = st.tuples(st.sampled_from(["write", "write", "write", "zero", "trim", "flush"]), offsets, lengths,
                   st.integers(1, 255))
    return st.lists(op.map(lambda o: (o[0], o[1], min(o[2], SIZE - o[1]), o[3])), min_size=1, max_size=25)


# name: (how to make the image, its options, cluster size, with a backing file, format-options)
CONFIGS = {
    "64k": ("qemu", ["cluster_size=64k"], 65536, False, {}),
    "512": ("qemu", ["cluster_size=512"], 512, False, {}),
    "2m": ("qemu", ["cluster_size=2M"], 2 * 1024 * 1024, False, {}),
    "extended-l2-backing": ("qemu", ["cluster_size=32k", "extended_l2=on"], 32768, True, {}),
    "v2-backing": ("qemu", ["compat=0.10", "cluster_size=4k"], 4096, True, {}),
    "nbdserve-prealloc-refbits1": ("nbdserve", ["cluster_size=4k", "preallocation=metadata", "refcount_bits=1"],
                                   4096, False, {}),
    # Caches of two tables: dirty L2 tables and refcount blocks leave the cache all the time, and
    # 512-byte refcount blocks of 64-bit entries make the refcount table grow and move.
    "tiny-caches": ("qemu", ["cluster_size=512", "refcount_bits=64"], 512, True,
                    {"l2-cache-size": 1024, "refcount-cache-size": 1024}),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_random_workload(name, tmp_path, start_server):
    maker, options, cluster_size, with_backing, format_options = CONFIGS[name]
    image = tmp_path / "disk.qcow2"
    shadow_path = tmp_path / "shadow.raw"
    base_data = random_bytes(SIZE - 3 * SECTOR, 7) if with_backing else b""
    backing = write_raw(tmp_path / "base.raw", base_data) if with_backing else None
    if maker == "qemu":
        qemu_img_create(image, SIZE, *options, backing=backing, backing_format="raw")
    else:
        run([*CREATE, "-o", ",".join(options), str(image), str(SIZE)])
    shadow = bytearray(base_data) + bytearray(SIZE - len(base_data))
    v2_with_backing = "compat=0.10" in options and with_backing

    def trim_model(offset: int, length: int):
        """Whole clusters read as zeroes after TRIM (v2 with a backing file cannot do that)."""
        if v2_with_backing:
            return []
        start = -(-offset // cluster_size) * cluster_size
        end = (offset + length) // cluster_size * cluster_size
        return [(start, end)] if end > start else []

    server = start_server({"exports": {"disk": {
        "format": "qcow2", "source": str(image), "format-options": format_options}}})
    uri = server.uri("disk")

    @settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
    @given(operations(cluster_size))
    def workload(ops):
        work = Workload(uri, 2, shadow, trim_model)
        for index, op in enumerate(ops):
            work.issue(index, op)
        work.finish()
        shadow_path.write_bytes(shadow)
        check_image(image)
        assert_same_contents(image, shadow_path)

    workload()
