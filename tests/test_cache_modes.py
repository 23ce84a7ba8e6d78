"""Each cache mode proven at the syscall level: the server runs under strace, and the open flags,
fdatasyncs and RWF_DSYNC writes on the image's descriptor must be what the mode promises.

TRIMs of distinct ranges (fallocate calls with their offsets in the trace) mark the phases of the
client's work, so the test does not depend on how the server issues its writes.
"""

import re
from dataclasses import dataclass

import nbd
import pytest

MiB = 1024 * 1024
SIZE = 8 * MiB
TRACED = "openat,fdatasync,fsync,fallocate,pwritev2,pwritev,pwrite64,io_submit"
_LINE = re.compile(r"^(?:\[pid\s+)?(\d+)\]?\s+(\w+)\((.*)\)\s+=\s+(-?\d+)")
# Linux AIO names the descriptor inside each submitted iocb, not as the first argument.
_AIO_FD = re.compile(r"aio_fildes=(\d+)")
# The phases: a TRIM of 4096 bytes at each offset opens the phase of that name.
MARKS = {"write": 7 * MiB, "flush": 7 * MiB + 4096, "fua write": 7 * MiB + 8192, "shutdown": 7 * MiB + 12288}


@dataclass(frozen=True)
class Call:
    name: str
    args: str

    def descriptors(self) -> set[int]:
        if self.name == "io_submit":
            return {int(fd) for fd in _AIO_FD.findall(self.args)}
        first = self.args.split(",", 1)[0]
        return {int(first)} if first.isdigit() else set()


def image_calls(trace: str, image: str) -> tuple[list[str], list[Call]]:
    """(open flags of every open of `image`, calls on the descriptors it got, in order)."""
    opens, fds, calls = [], set(), []
    for line in trace.splitlines():
        match = _LINE.match(line)
        if not match:
            continue
        _, name, args, result = match.groups()
        call = Call(name, args)
        if name == "openat" and f'"{image}"' in args:
            opens.append(args.rsplit(",", 1)[-1].strip())
            fds.add(int(result))
        elif name != "openat" and call.descriptors() & fds:
            calls.append(call)
    return opens, calls


def phases(calls: list[Call]) -> dict[str, list[Call]]:
    """Calls between the TRIM marks, by the name of the mark that opens the phase."""
    found: dict[str, list[Call]] = {"open": []}
    current = "open"
    offsets = {offset: name for name, offset in MARKS.items()}
    for call in calls:
        if call.name == "fallocate":
            offset = int(call.args.split(",")[2])
            if offset in offsets:
                current = offsets[offset]
                found[current] = []
                continue
        found[current].append(call)
    return found


def syncs(calls: list[Call]) -> int:
    """fdatasync or fsync calls, or the same submitted through AIO (IOCB_CMD_FDSYNC)."""
    return sum(
        call.name in ("fdatasync", "fsync")
        or call.name == "io_submit" and "IOCB_CMD_FDSYNC" in call.args
        for call in calls
    )


def dsync_writes(calls: list[Call]) -> int:
    """Writes made durable one by one: pwritev2(RWF_DSYNC), or an io_submit iocb with it."""
    return sum(call.name in ("pwritev2", "io_submit") and "RWF_DSYNC" in call.args for call in calls)


def trace_cache_mode(start_server, raw_image, tmp_path, mode: str):
    """Serve an image in `mode` under strace, write, flush, FUA-write and read it back."""
    image = raw_image(SIZE)
    trace_path = tmp_path / "strace.log"
    strace = ["strace", "-f", "-qq", "--seccomp-bpf", "-o", str(trace_path), "-e", f"trace={TRACED}"]
    server = start_server({"exports": {"disk": {"source": str(image), "cache": mode}}}, prefix=strace)
    handle = nbd.NBD()
    handle.set_strict_mode(0)  # let unaligned requests through: the server must cope with them
    handle.connect_uri(server.uri("disk"))
    flags = {name: getattr(handle, f"can_{name}")() for name in ("flush", "fua", "trim", "zero", "multi_conn")}
    minimum_block = handle.get_block_size(nbd.SIZE_MINIMUM)

    def mark(name: str) -> None:
        handle.trim(4096, MARKS[name])

    mark("write")
    handle.pwrite(b"a" * 8192, 0)
    mark("flush")
    handle.flush()
    mark("fua write")
    handle.pwrite(b"b" * 8192, 8192, nbd.CMD_FLAG_FUA)
    mark("shutdown")
    # Unaligned requests work in every mode (O_DIRECT ones through aligned bounce buffers).
    handle.pwrite(b"c" * 100, 5000)
    expected = b"a" * 5000 + b"c" * 100 + b"a" * 3092 + b"b" * 8192
    assert handle.pread(16384, 0) == expected
    assert handle.pread(3000, 4097) == expected[4097:7097]
    handle.shutdown()
    assert server.stop() == 0
    assert image.read_bytes()[:16384] == expected
    opens, calls = image_calls(trace_path.read_text(), str(image))
    return flags, minimum_block, opens, phases(calls)


MODES = {
    # mode: (O_DIRECT, O_DSYNC, FLUSH and FUA honoured, advertised minimum block size)
    "writeback": (False, False, True, 1),
    "writethrough": (False, True, True, 1),
    "none": (True, False, True, 4096),
    "directsync": (True, True, True, 4096),
    "unsafe": (False, False, False, 1),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_cache_mode_at_the_syscall_level(start_server, raw_image, tmp_path, mode):
    direct, dsync, honours_flush, minimum_block = MODES[mode]
    flags, advertised_minimum, opens, phase = trace_cache_mode(start_server, raw_image, tmp_path, mode)

    # Every mode advertises FLUSH and FUA, as QEMU does; `unsafe` acknowledges them unsynced.
    assert flags == {"flush": True, "fua": True, "trim": True, "zero": True, "multi_conn": True}
    assert advertised_minimum == minimum_block
    assert opens, "the image was never opened"
    for open_flags in opens:
        assert ("O_DIRECT" in open_flags) == direct, open_flags
        assert ("O_DSYNC" in open_flags) == dsync, open_flags
    assert list(phase) == ["open", *MARKS]

    # A plain write is never synced by itself (O_DSYNC does that, where the mode asks for it).
    assert syncs(phase["write"]) == 0
    if honours_flush:
        assert syncs(phase["flush"]) == 1  # FLUSH -> fdatasync
        fua = phase["fua write"]
        assert dsync_writes(fua) + syncs(fua) >= 1, fua  # FUA -> RWF_DSYNC or fdatasync
        assert syncs(phase["shutdown"]) == 1  # every export is flushed at exit
    else:
        every_call = [call for calls in phase.values() for call in calls]
        assert syncs(every_call) == 0 and dsync_writes(every_call) == 0, every_call


def direct_export(start_server, path, mode: str) -> nbd.NBD:
    server = start_server({"exports": {"disk": {"source": str(path), "cache": mode}}})
    handle = nbd.NBD()
    handle.set_strict_mode(0)  # requests below the advertised 4096-byte minimum, as some clients send
    handle.connect_uri(server.uri("disk"))
    return handle


@pytest.mark.parametrize("mode", ["none", "directsync"])
def test_concurrent_unaligned_writes_to_one_block_are_all_kept(start_server, raw_image, mode):
    image = raw_image(MiB)
    handle = direct_export(start_server, image, mode)
    # Eight 512-byte writes in flight to each 4096-byte block: each one is a read-modify-write.
    expected = b"".join(bytes([index % 251 + 1]) * 512 for index in range(256))
    buffers = [nbd.Buffer.from_bytearray(bytearray(expected[i * 512 : (i + 1) * 512])) for i in range(256)]
    for index, buffer in enumerate(buffers):
        handle.aio_pwrite(buffer, index * 512)
    while handle.aio_in_flight():
        handle.poll(-1)
    assert handle.pread(len(expected), 0) == expected
    handle.shutdown()
    assert image.read_bytes()[: len(expected)] == expected


@pytest.mark.parametrize("mode", ["none", "directsync"])
def test_a_file_size_that_is_not_block_aligned(start_server, raw_image, mode):
    image = raw_image(10000, data=bytes(range(250)) * 40)
    handle = direct_export(start_server, image, mode)
    assert handle.get_size() == 10000
    expected = bytearray(image.read_bytes())
    assert handle.pread(100, 9900) == expected[9900:]
    handle.pwrite(b"\xee" * 50, 9950)
    handle.zero(30, 9000)
    expected[9950:] = b"\xee" * 50
    expected[9000:9030] = bytes(30)
    assert handle.pread(10000, 0) == expected
    handle.shutdown()
    assert image.read_bytes() == expected  # the same size: the tail block was not left extended
