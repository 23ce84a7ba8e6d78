"""Linux native AIO (io_submit) for O_DIRECT I/O, completed on the trio event loop.

A worker-thread hop costs 100-250 µs of CPU per request here (two wake-ups and the GIL handed
back and forth), which caps random 4 KiB I/O at a few thousand requests per second. io_submit
hands an O_DIRECT request to the block layer; the kernel signals an eventfd as requests complete
and one system task reaps them all, handing each result to its request: a waiting task, or a
callback for requests started without one (the connection's task-free path). Only for
O_DIRECT: buffered I/O through io_submit blocks in the submitting thread.

Requests go in with RWF_NOWAIT, so a submission that would block the event loop (a file system
allocating blocks, a device queue full) fails with EAGAIN instead: the caller then does that one
request in a worker thread. A request larger than the device takes whole goes in pieces: the
block layer refuses to split a RWF_NOWAIT request. A buffer belongs to the kernel until its
completion is reaped, so waits cannot be cancelled, as a worker thread's cannot.
"""

import ctypes
import errno
import itertools
import logging
import os
from collections.abc import Callable

import outcome
import trio

from nbdserve.backend import WouldBlock

log = logging.getLogger(__name__)

_SYS_IO_SETUP, _SYS_IO_DESTROY, _SYS_IO_GETEVENTS, _SYS_IO_SUBMIT = 206, 207, 208, 209  # x86_64
_IOCB_CMD_PREAD, _IOCB_CMD_PWRITE, _IOCB_CMD_FDSYNC = 0, 1, 3
_IOCB_FLAG_RESFD = 1  # signal aio_resfd (an eventfd) on completion
DEPTH = 128  # requests in flight per context; more wait for room
_NO_ROOM = -1
_REAP_BATCH = 64
# What asks for a blocking retry: would block (EAGAIN), or the device takes no RWF_NOWAIT.
_RETRY_BLOCKING = (errno.EAGAIN, errno.EOPNOTSUPP)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _Iocb(ctypes.Structure):
    # struct iocb of <linux/aio_abi.h>, little-endian layout.
    _fields_ = [
        ("data", ctypes.c_uint64), ("key", ctypes.c_uint32), ("rw_flags", ctypes.c_int32),
        ("opcode", ctypes.c_uint16), ("reqprio", ctypes.c_int16), ("fildes", ctypes.c_uint32),
        ("buf", ctypes.c_uint64), ("nbytes", ctypes.c_uint64), ("offset", ctypes.c_int64),
        ("reserved2", ctypes.c_uint64), ("flags", ctypes.c_uint32), ("resfd", ctypes.c_uint32),
    ]


class _IoEvent(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64), ("res", ctypes.c_int64),
                ("res2", ctypes.c_int64)]


def _syscall(number: int, *args) -> int:
    result = _libc.syscall(number, *args)
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


_NO_BUFFER = memoryview(bytearray())
# Called on the event loop with a request's count, or the exception it failed with.
Completion = Callable[[int | Exception], None]


def _cannot_abort(_raise_cancel) -> trio.lowlevel.Abort:
    # The kernel owns the buffer until the completion is reaped, and I/O cannot be stopped.
    return trio.lowlevel.Abort.FAILED


class _Pieces:
    """One request submitted as several: the device would split a larger one, and a split
    request with RWF_NOWAIT fails with EAGAIN, every time. Completes once all pieces have."""

    def __init__(self, lengths: list[int], done: Completion) -> None:
        self._lengths = lengths
        self._results: list[int | Exception] = [0] * len(lengths)
        self._left = len(lengths)
        self._done = done

    def completion(self, index: int) -> Completion:
        def complete(result: int | Exception) -> None:
            self._results[index] = result
            self._left -= 1
            if not self._left:
                self._done(self._outcome())
        return complete

    def _outcome(self) -> int | Exception:
        """The first failure, else the count of bytes done from the start (short at the end
        of a device)."""
        for result in self._results:
            if isinstance(result, Exception):
                return result
        total = 0
        for length, count in zip(self._lengths, self._results):
            total += count
            if count < length:
                break
        return total


class AioContext:
    """One kernel AIO context with its eventfd; requests from any task, reaped by a system task.

    `max_request`: the largest request submitted whole (0: any); larger ones go in pieces.
    Create it inside the trio run that uses it; close() it in the same run."""

    def __init__(self, max_request: int = 0) -> None:
        context = ctypes.c_ulong(0)
        _syscall(_SYS_IO_SETUP, DEPTH, ctypes.byref(context))
        self._context = context
        self._eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._max_request = max_request
        # key -> (completion, iocb, buffer): the iocb and buffer stay alive until reaped.
        self._pending: dict[int, tuple[Completion, _Iocb, memoryview]] = {}
        self._room = trio.Event()  # set when completions free room for waiting submitters
        self._submission = (ctypes.c_void_p * 1)()  # io_submit's array of one iocb pointer
        self._idle = trio.Event()  # set while nothing is in flight, for close()
        self._idle.set()
        self._keys = itertools.count(1)
        self._events = (_IoEvent * _REAP_BATCH)()
        self._nowait = os.RWF_NOWAIT
        self._closed = False
        self._reaper = trio.CancelScope()
        trio.lowlevel.spawn_system_task(self._reap, self._reaper, name="aio reaper")

    @classmethod
    def create(cls, max_request: int = 0) -> "AioContext | None":
        """A context, or None where the kernel has no AIO or no room (fs.aio-max-nr)."""
        try:
            return cls(max_request)
        except OSError as exc:
            log.info("no Linux AIO (%s): O_DIRECT I/O goes through worker threads", exc.strerror)
            return None

    async def read(self, fd: int, buf: memoryview, offset: int) -> int:
        """Read into `buf`, whose address, length and offset suit O_DIRECT; returns the count.
        Raises WouldBlock when the request should be retried in a worker thread."""
        return await self._submit(_IOCB_CMD_PREAD, fd, buf, offset, 0)

    async def write(self, fd: int, buf: memoryview, offset: int, rw_flags: int = 0) -> int:
        """Write `buf` (as for read); `rw_flags` as pwritev2's (RWF_DSYNC for FUA)."""
        return await self._submit(_IOCB_CMD_PWRITE, fd, buf, offset, rw_flags)

    async def fdatasync(self, fd: int) -> None:
        """fdatasync(2), run by the kernel in its own worker (Linux 4.18+; EINVAL before): no
        thread of ours has to wake up for it. Works for buffered files too."""
        await self._submit(_IOCB_CMD_FDSYNC, fd, _NO_BUFFER, 0, 0, nowait=False)

    # The same requests without a task: `done` gets the count (or an exception: WouldBlock or
    # OSError) from the reaper. False when nothing was submitted (no room, or io_submit refused
    # it): the caller then uses the async method.

    def start_read(self, fd: int, buf: memoryview, offset: int, done: Completion) -> bool:
        return self._start(_IOCB_CMD_PREAD, fd, buf, offset, 0, done) == 0

    def start_write(self, fd: int, buf: memoryview, offset: int, rw_flags: int,
                    done: Completion) -> bool:
        return self._start(_IOCB_CMD_PWRITE, fd, buf, offset, rw_flags, done) == 0

    def start_fdatasync(self, fd: int, done: Completion) -> bool:
        return self._start(_IOCB_CMD_FDSYNC, fd, _NO_BUFFER, 0, 0, done, nowait=False) == 0

    async def _submit(self, opcode: int, fd: int, buf: memoryview, offset: int, rw_flags: int,
                      *, nowait: bool = True) -> int:
        task = trio.lowlevel.current_task()

        def done(result: int | Exception) -> None:
            trio.lowlevel.reschedule(task, outcome.Value(result))

        while True:
            if self._closed:
                raise trio.ClosedResourceError("the AIO context is closed")
            refused = self._start(opcode, fd, buf, offset, rw_flags, done, nowait=nowait)
            if refused != _NO_ROOM:
                break
            if self._room.is_set():
                self._room = trio.Event()
            await self._room.wait()
        if refused:
            result = self._outcome(-refused)
        else:
            result = await trio.lowlevel.wait_task_rescheduled(_cannot_abort)
        if isinstance(result, Exception):
            raise result
        return result

    def _start(self, opcode: int, fd: int, buf: memoryview, offset: int, rw_flags: int,
               done: Completion, *, nowait: bool = True) -> int:
        """0 once submitted (`done` then follows from the reaper); _NO_ROOM while the context
        is full; else the errno that io_submit refused the request with."""
        if self._closed:
            return errno.ESHUTDOWN
        size = self._max_request
        starts = range(0, len(buf), size) if size and len(buf) > size else [0]
        if len(starts) > DEPTH:
            return errno.EAGAIN  # could never fit: a worker thread does it whole
        if len(self._pending) + len(starts) > DEPTH:
            return _NO_ROOM
        flags = rw_flags | (self._nowait if nowait else 0)
        if len(starts) == 1:
            return self._submit_iocb(opcode, fd, buf, offset, flags, done)
        pieces = _Pieces([min(size, len(buf) - start) for start in starts], done)
        for index, start in enumerate(starts):
            refused = self._submit_iocb(opcode, fd, buf[start : start + size], offset + start,
                                        flags, pieces.completion(index))
            if refused and index == 0:
                return refused
            if refused:  # the pieces in flight complete the request, as a failure
                for rest in range(index, len(starts)):
                    pieces.completion(rest)(self._outcome(-refused))
                break
        return 0

    def _submit_iocb(self, opcode: int, fd: int, buf: memoryview, offset: int, rw_flags: int,
                     done: Completion) -> int:
        """0 once submitted, else io_submit's errno."""
        key = next(self._keys)
        address = ctypes.addressof(ctypes.c_char.from_buffer(buf)) if len(buf) else 0
        iocb = _Iocb(data=key, opcode=opcode, fildes=fd, buf=address, nbytes=len(buf), offset=offset,
                     rw_flags=rw_flags, flags=_IOCB_FLAG_RESFD, resfd=self._eventfd)
        self._submission[0] = ctypes.addressof(iocb)
        try:
            _syscall(_SYS_IO_SUBMIT, self._context, 1, self._submission)
        except OSError as exc:
            return exc.errno or errno.EIO
        self._pending[key] = (done, iocb, buf)
        if self._idle.is_set():
            self._idle = trio.Event()
        return 0

    def _outcome(self, result: int) -> int | Exception:
        """The kernel's result (a count or a negative errno) as a count or an exception."""
        if result >= 0:
            return result
        code = -result
        if code in _RETRY_BLOCKING:
            if code == errno.EOPNOTSUPP and self._nowait:
                self._nowait = 0  # the device has no non-blocking submission: block in io_submit
                log.info("RWF_NOWAIT unsupported here: io_submit may block for O_DIRECT requests")
            return WouldBlock()
        return OSError(code, os.strerror(code))

    async def _reap(self, scope: trio.CancelScope) -> None:
        with scope:
            while True:
                await trio.lowlevel.wait_readable(self._eventfd)
                try:
                    os.eventfd_read(self._eventfd)
                except BlockingIOError:
                    continue
                self._complete_ready()

    def _complete_ready(self) -> None:
        while True:
            count = _syscall(_SYS_IO_GETEVENTS, self._context, 0, _REAP_BATCH, self._events, None)
            for event in self._events[:count]:
                done, _, _ = self._pending.pop(event.data)
                try:
                    done(self._outcome(event.res))
                except Exception:  # a failing callback must not take the reaper down
                    log.exception("AIO completion callback failed")
            if count < _REAP_BATCH:
                break
        self._room.set()
        if not self._pending:
            self._idle.set()

    async def close(self) -> None:
        """Wait for requests in flight (their buffers are the kernel's until then), then free."""
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            await self._idle.wait()
        self._reaper.cancel()
        # io_destroy waits for an RCU grace period: milliseconds, so not on the event loop.
        await trio.to_thread.run_sync(_syscall, _SYS_IO_DESTROY, self._context)
        os.close(self._eventfd)


__all__ = ["AioContext", "WouldBlock"]
