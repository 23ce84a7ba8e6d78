"""An export: a backend stack plus its policy (cache mode, read-only, limits).

Every request is checked here before any backend call (command, flags, range, read-only), and
what the backend lacks is emulated: zeroing as writes of zeroes, FUA as a flush after the write,
CACHE as a read. Backend errors become NBD errors through one errno table.
"""

import errno
import logging
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from .access import ExportAccess
from .backend import Backend, CacheMode, Done, Extent, OpenOptions, Views
from .protocol.constants import (
    ALLOCATION_DEPTH,
    BASE_ALLOCATION,
    Command,
    CommandFlag,
    Error,
    StateFlag,
    TransmissionFlag,
)
from .protocol.transmission import Request

log = logging.getLogger(__name__)

_ERRNO_TO_NBD = {
    errno.EPERM: Error.EPERM,
    errno.EACCES: Error.EPERM,
    errno.EROFS: Error.EPERM,
    errno.EIO: Error.EIO,
    errno.ENOMEM: Error.ENOMEM,
    errno.EINVAL: Error.EINVAL,
    errno.ENOSPC: Error.ENOSPC,
    errno.EDQUOT: Error.ENOSPC,
    errno.EFBIG: Error.ENOSPC,
    errno.EOVERFLOW: Error.EOVERFLOW,
    errno.EOPNOTSUPP: Error.ENOTSUP,
    errno.ESHUTDOWN: Error.ESHUTDOWN,
}


def nbd_error(exc: OSError) -> Error:
    return _ERRNO_TO_NBD.get(exc.errno, Error.EIO)


class RequestError(Exception):
    """A request refused before reaching the backend, with the NBD error to reply."""

    def __init__(self, error: Error, message: str) -> None:
        super().__init__(message)
        self.error = error


# Flags each command accepts, FUA included (the spec allows it on every command). Plain ints:
# check() runs for every request, and IntFlag arithmetic costs microseconds.
_FUA = int(CommandFlag.FUA)
_DF = int(CommandFlag.DF)
_COMMAND_FLAGS = {
    int(command): int(flags) | _FUA
    for command, flags in {
        Command.READ: CommandFlag.DF,
        Command.WRITE: 0,
        Command.FLUSH: 0,
        Command.TRIM: 0,
        Command.CACHE: 0,
        Command.WRITE_ZEROES: CommandFlag.NO_HOLE | CommandFlag.FAST_ZERO,
        Command.BLOCK_STATUS: CommandFlag.REQ_ONE,
    }.items()
}
_WRITES = frozenset(int(c) for c in (Command.WRITE, Command.TRIM, Command.WRITE_ZEROES))
_READ, _FLUSH, _BLOCK_STATUS = int(Command.READ), int(Command.FLUSH), int(Command.BLOCK_STATUS)
# Zeroing without native support writes this much per call.
_ZERO_CHUNK = 1024 * 1024
_ZEROES = bytes(_ZERO_CHUNK)
# Block status asks the backend about this much at a time, and replies with at most this many
# descriptors (the spec's ceiling is 2^20; 64 KiB of reply is plenty per round trip).
_BLOCK_STATUS_WINDOW = 8 * 1024 * 1024
_MAX_DESCRIPTORS = 8192


@dataclass
class ExportConfig:
    """A configured export, not yet opened."""

    name: str
    source_driver: Any
    source_config: Any
    format_driver: Any
    format_config: Any
    options: OpenOptions = field(default_factory=OpenOptions)
    description: str = ""
    access: ExportAccess = field(default_factory=ExportAccess)  # checked before opening


class Export:
    def __init__(self, name: str, description: str, backend: Backend, options: OpenOptions):
        self.name = name
        self.description = description
        self.backend = backend
        self.options = options
        # Capabilities are read once: backends must not change them while open.
        self.capabilities = caps = backend.capabilities
        self.size = backend.get_size()
        self.read_only = options.read_only or not caps.can_write
        self.min_block = caps.block_size_min
        self.preferred_block = max(caps.block_size_preferred, self.min_block, 512)
        self.max_payload = max(caps.block_size_max, self.preferred_block)
        self._honours_flush = options.cache.honours_flush
        # Optional synchronous fast paths of the backend contract.
        self._try_pread = getattr(backend, "try_pread", None)
        self.reads_inline = self._try_pread is not None  # else a read always needs a task
        self._try_pwrite = getattr(backend, "try_pwrite", None)
        self._known_zero = getattr(backend, "known_zero", None)
        self._allocation_depths = getattr(backend, "allocation_depths", None)
        self._start_pread = getattr(backend, "start_pread", None)
        self._start_pwrite = getattr(backend, "start_pwrite", None)
        self._start_flush = getattr(backend, "start_flush", None)
        # Whether a read may be started without a task (then it needs a reply buffer first).
        self.starts_reads = self._start_pread is not None
        self._start_pread_views = getattr(backend, "start_pread_views", None)
        self.lends_reads = self._start_pread_views is not None  # no reply buffer needed

    def __repr__(self) -> str:
        return f"<Export {self.name!r} size={self.size}>"

    def transmission_flags(self, *, structured: bool) -> TransmissionFlag:
        caps = self.capabilities
        # FLUSH and FUA are advertised in every mode, as QEMU does: `unsafe` acknowledges them
        # without syncing, so a guest behaves the same whatever the host's cache mode.
        flags = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_CACHE | TransmissionFlag.SEND_FLUSH
        if self.read_only:
            flags |= TransmissionFlag.READ_ONLY
        else:
            flags |= (
                TransmissionFlag.SEND_FUA
                | TransmissionFlag.SEND_WRITE_ZEROES
                | TransmissionFlag.SEND_FAST_ZERO
            )
            if caps.can_trim:
                flags |= TransmissionFlag.SEND_TRIM
        if structured:
            flags |= TransmissionFlag.SEND_DF
        if caps.can_multi_conn:
            flags |= TransmissionFlag.CAN_MULTI_CONN
        if caps.is_rotational:
            flags |= TransmissionFlag.ROTATIONAL
        return flags

    # Checks.

    def check(self, request: Request, *, structured: bool, has_contexts: bool) -> None:
        """Raise RequestError unless the backend may be called for this request."""
        command = request.command
        try:
            allowed = _COMMAND_FLAGS[command]
        except KeyError:
            raise RequestError(Error.EINVAL, f"unknown command {command}") from None
        flags = request.flags
        if flags & ~allowed:
            raise RequestError(Error.EINVAL, f"invalid flags {flags:#x} for {Command(command).name}")
        if flags & _DF and not structured:
            raise RequestError(Error.EINVAL, "DF without structured replies")
        if command in _WRITES and self.read_only:
            raise RequestError(Error.EPERM, "the export is read-only")
        if command == _FLUSH:
            return
        if command == _BLOCK_STATUS and not has_contexts:
            raise RequestError(Error.EINVAL, "no metadata context was negotiated")
        if request.payload_dropped:
            raise RequestError(
                Error.EINVAL, f"write of {request.length} bytes is over the limit of {self.max_payload}"
            )
        if command == _READ and request.length > self.max_payload:
            raise RequestError(
                Error.EINVAL, f"read of {request.length} bytes is over the limit of {self.max_payload}"
            )
        if request.offset + request.length > self.size:
            error = Error.ENOSPC if command in (Command.WRITE, Command.WRITE_ZEROES) else Error.EINVAL
            raise RequestError(
                error, f"range {request.offset}+{request.length} is beyond the export size {self.size}"
            )

    # Operations, called after check().

    async def read(self, buf: memoryview, offset: int) -> None:
        await self.backend.pread(buf, offset)

    def try_read(self, buf: memoryview, offset: int) -> bool:
        """Read without blocking if the backend can (page cache hits): True when done."""
        return self._try_pread is not None and self._try_pread(buf, offset)

    def known_zero(self, offset: int, length: int) -> bool:
        """The range reads as zeroes, as the backend knows without I/O."""
        return self._known_zero is not None and self._known_zero(offset, length)

    def try_write(self, data, offset: int) -> bool:
        """Write without blocking if the backend can (buffered writes): True when done."""
        return self._try_pwrite is not None and self._try_pwrite(data, offset)

    # Started without a task, where the backend can: see Backend.start_pread. False: use the
    # async method.

    def start_read(self, buf: memoryview, offset: int, done: Done) -> bool:
        return self._start_pread is not None and self._start_pread(buf, offset, done)

    def start_read_views(self, offset: int, length: int, done: Views) -> bool:
        return self._start_pread_views is not None and self._start_pread_views(offset, length, done)

    def start_write(self, data, offset: int, fua: bool, done: Done) -> bool:
        fua = fua and self._honours_flush
        if self._start_pwrite is None or (fua and not self.capabilities.can_fua):
            return False
        return self._start_pwrite(data, offset, fua, done)

    def start_flush(self, done: Done) -> bool:
        if not (self._honours_flush and self.capabilities.can_flush):
            done(None)
            return True
        return self._start_flush is not None and self._start_flush(done)

    async def write(self, data, offset: int, *, fua: bool) -> None:
        fua = fua and self._honours_flush
        if fua and not self.capabilities.can_fua:
            await self.backend.pwrite(data, offset)
            await self.backend.flush()
        else:
            await self.backend.pwrite(data, offset, fua=fua)

    async def flush(self) -> None:
        if self._honours_flush and self.capabilities.can_flush:
            await self.backend.flush()

    async def trim(self, offset: int, length: int, *, fua: bool) -> None:
        if not self.capabilities.can_trim or not length:
            return  # TRIM is a hint; without support it does nothing
        await self._with_fua(self.backend.trim, offset, length, fua=fua)

    async def zero(self, offset: int, length: int, *, may_trim: bool, fast: bool, fua: bool) -> None:
        caps = self.capabilities
        if fast and not caps.can_fast_zero:
            raise RequestError(Error.ENOTSUP, "zeroing is not faster than writing here")
        if not length:
            return
        if caps.can_zero:
            await self._with_fua(self.backend.zero, offset, length, may_trim=may_trim, fast=fast, fua=fua)
            return
        end = offset + length
        while offset < end:
            count = min(_ZERO_CHUNK, end - offset)
            await self.backend.pwrite(memoryview(_ZEROES)[:count], offset)
            offset += count
        if fua and self._honours_flush:
            await self.backend.flush()

    async def _with_fua(self, operation, *args, fua: bool, **kwargs) -> None:
        fua = fua and self._honours_flush
        if fua and not self.capabilities.can_fua:
            await operation(*args, **kwargs)
            await self.backend.flush()
        else:
            await operation(*args, fua=fua, **kwargs)

    async def cache(self, offset: int, length: int) -> None:
        if self.capabilities.can_cache:
            await self.backend.cache(offset, length)
            return
        end = offset + length
        scratch = memoryview(bytearray(min(length, _ZERO_CHUNK)))
        while offset < end:
            count = min(len(scratch), end - offset)
            await self.backend.pread(scratch[:count], offset)
            offset += count

    async def block_status(self, offset: int, length: int, *, req_one: bool,
                           context: str = BASE_ALLOCATION) -> list[tuple[int, int]]:
        """Descriptors of a metadata context: consecutive (length, value) from `offset`; the
        value is base:allocation's flags, or qemu:allocation-depth's layer."""
        if not length:
            length = 1 if offset < self.size else 0
        if not length:
            raise RequestError(Error.EINVAL, "block status at the end of the export")
        source, values = (self._depths, _DEPTHS) if context == ALLOCATION_DEPTH else (self._allocation, _FLAGS)
        descriptors = _Descriptors(offset, length, limit=1 if req_one else _MAX_DESCRIPTORS)
        # Window by window, with a checkpoint between: a request costs what its reply holds,
        # not what its length spans (4 GiB of a fragmented image is a million extents).
        while descriptors.covered < length and not descriptors.full:
            start = descriptors.covered
            window = min(_BLOCK_STATUS_WINDOW, length - start)
            descriptors.add(await source(offset + start, window), start + window)
            if descriptors.covered == start:
                break  # the backend reported nothing more
            await trio.lowlevel.checkpoint()
        return descriptors.result(self.min_block, self.size, values)

    async def _allocation(self, offset: int, length: int) -> list[tuple[int, int]]:
        if not self.capabilities.can_extents:
            return [(length, 0)]
        return [(extent.length, allocation_flags(extent)) for extent in await self.backend.extents(offset, length)]

    async def _depths(self, offset: int, length: int) -> list[tuple[int, int]]:
        if self._allocation_depths is None:
            return [(length, 1)]  # a backend without layers: all of it is its own
        return await self._allocation_depths(offset, length)

    async def close(self) -> None:
        await self.backend.close()


def allocation_flags(extent: Extent) -> int:
    """An extent's base:allocation flags."""
    return (StateFlag.HOLE if extent.hole else 0) | (StateFlag.ZERO if extent.zero else 0)


@dataclass(frozen=True)
class _Values:
    """How a context's values merge where block alignment joins them."""

    combine: Callable[[int, int], int]  # the value of a block that straddles two
    unknown: int  # the value that claims nothing: for a block nothing was reported about


def _shallower(depth: int, other: int) -> int:
    # The shallower layer that has data, so a client copying what a layer holds skips nothing.
    return min(depth, other) if depth and other else depth or other


# base:allocation: what both sides share (a hole only if all of it is a hole); else data.
_FLAGS = _Values(operator.and_, 0)
# qemu:allocation-depth: else this image, where reading gets the right bytes whatever the layer.
_DEPTHS = _Values(_shallower, 1)


class _Descriptors:
    """(length, value) pairs of a metadata context for a request, fed window by window:
    clipped to the request, equal values merged, at most `limit` pairs."""

    def __init__(self, offset: int, length: int, limit: int) -> None:
        self.offset = offset
        self.length = length
        self.limit = limit
        self.pairs: list[list[int]] = []
        self.covered = 0  # bytes from `offset` described so far
        self.full = False

    def add(self, pieces: list[tuple[int, int]], until: int) -> None:
        for length, value in pieces:
            if self.covered >= until or length <= 0:
                return
            size = min(length, until - self.covered)
            if self.pairs and self.pairs[-1][1] == value:
                self.pairs[-1][0] += size
            elif len(self.pairs) == self.limit:
                self.full = True
                return
            else:
                self.pairs.append([size, int(value)])
            self.covered += size

    def result(self, min_block: int, export_size: int, values: "_Values") -> list[tuple[int, int]]:
        if not self.pairs:
            raise RequestError(Error.EIO, "the backend reported no extents")
        pairs = self.pairs
        if min_block > 1:
            pairs = _align(pairs, self.offset, self.offset + self.length, min_block, export_size, values)
        # A descriptor is 32 bits long: round down (never up, nbdkit's CVE-2025-47712), and
        # the client asks again for the rest.
        cap = 0xFFFFFFFF // min_block * min_block
        result = []
        for size, value in pairs:
            result.append((min(size, cap), value))
            if size > cap:
                break
        return result


def _align(pairs: list[list[int]], offset: int, request_end: int, block: int, export_size: int,
           values: _Values) -> list[list[int]]:
    """Move descriptor boundaries inside the request down to block boundaries; a block that
    straddles one gets both values combined."""
    aligned: list[list[int]] = []  # [start, end, value], absolute
    start = offset
    for size, value in pairs:
        end = start + size
        if aligned and aligned[-1][1] % block:
            previous = aligned[-1]
            cut = previous[1] - previous[1] % block
            value = values.combine(value, previous[2])
            previous[1] = start = max(cut, previous[0])
            if previous[1] == previous[0]:
                aligned.pop()
        if aligned and aligned[-1][2] == value:
            aligned[-1][1] = end
        else:
            aligned.append([start, end, value])
        start = end
    last = aligned[-1]
    if last[1] % block and last[1] not in (request_end, export_size):
        last[1] -= last[1] % block  # cut short: an unaligned tail is the next request's start
    if last[1] <= last[0] and len(aligned) > 1:
        aligned.pop()
    return [[end - begin, value] for begin, end, value in aligned if end > begin] or [
        [sum(size for size, _ in pairs), values.unknown]
    ]


async def open_export(config: ExportConfig) -> Export:
    source = await config.source_driver.open(config.source_config, config.options)
    try:
        backend = await config.format_driver.open(source, config.format_config, config.options)
    except BaseException:
        await source.close()
        raise
    return Export(config.name, config.description, backend, config.options)


__all__ = ["CacheMode", "Export", "ExportConfig", "RequestError", "nbd_error", "open_export"]
