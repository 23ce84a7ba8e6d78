"""Linux native AIO (io_submit) for O_DIRECT I/O, completed on the trio event loop.

A worker-thread hop costs 100-250 µs of CPU per request here (two wake-ups and the GIL handed
back and forth), which caps random 4 KiB I/O at a few thousand requests per second. io_submit
hands an O_DIRECT request to the block layer; the kernel signals an eventfd as requests complete
and one system task reaps them all, rescheduling each waiting task with its result. Only for
O_DIRECT: buffered I/O through io_submit blocks in the submitting thread.

Requests go in with RWF_NOWAIT, so a submission that would block the event loop (a file system
allocating blocks, a device queue full) fails with EAGAIN instead: the caller then does that one
request in a worker thread. A buffer belongs to the kernel until its completion is reaped, so
waits cannot be cancelled, as a worker thread's cannot.
"""

import ctypes
import errno
import itertools
import logging
import os

import outcome
import trio

log = logging.getLogger(__name__)

_SYS_IO_SETUP, _SYS_IO_DESTROY, _SYS_IO_GETEVENTS, _SYS_IO_SUBMIT = 206, 207, 208, 209  # x86_64
_IOCB_CMD_PREAD, _IOCB_CMD_PWRITE, _IOCB_CMD_FDSYNC = 0, 1, 3
_IOCB_FLAG_RESFD = 1  # signal aio_resfd (an eventfd) on completion
DEPTH = 128  # requests in flight per context; more wait for a free slot
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


class WouldBlock(Exception):
    """The request was not done: it would have blocked the event loop. Retry it in a thread."""


def _cannot_abort(_raise_cancel) -> trio.lowlevel.Abort:
    # The kernel owns the buffer until the completion is reaped, and I/O cannot be stopped.
    return trio.lowlevel.Abort.FAILED


class AioContext:
    """One kernel AIO context with its eventfd; requests from any task, reaped by a system task.

    Create it inside the trio run that uses it; close() it in the same run."""

    def __init__(self) -> None:
        context = ctypes.c_ulong(0)
        _syscall(_SYS_IO_SETUP, DEPTH, ctypes.byref(context))
        self._context = context
        self._eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._slots = trio.Semaphore(DEPTH)
        # key -> (waiting task, iocb, buffer): the iocb and buffer stay alive until reaped.
        self._pending: dict[int, tuple[trio.lowlevel.Task, _Iocb, memoryview]] = {}
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
    def create(cls) -> "AioContext | None":
        """A context, or None where the kernel has no AIO or no room (fs.aio-max-nr)."""
        try:
            return cls()
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

    async def _submit(self, opcode: int, fd: int, buf: memoryview, offset: int, rw_flags: int,
                      *, nowait: bool = True) -> int:
        try:
            self._slots.acquire_nowait()  # no pass through the scheduler while slots are free
        except trio.WouldBlock:
            await self._slots.acquire()
        try:
            if self._closed:  # checked with a slot held: close() may have begun while we waited
                raise trio.ClosedResourceError("the AIO context is closed")
            flags = rw_flags | (self._nowait if nowait else 0)
            result = await self._submit_and_wait(opcode, fd, buf, offset, flags)
        finally:
            self._slots.release()
        if result >= 0:
            return result
        if -result in _RETRY_BLOCKING:
            if -result == errno.EOPNOTSUPP and self._nowait:
                self._nowait = 0  # the device has no non-blocking submission: block in io_submit
                log.info("RWF_NOWAIT unsupported here: io_submit may block for O_DIRECT requests")
                return await self._submit(opcode, fd, buf, offset, rw_flags)
            raise WouldBlock
        raise OSError(-result, os.strerror(-result))

    async def _submit_and_wait(self, opcode: int, fd: int, buf: memoryview, offset: int,
                               rw_flags: int) -> int:
        """The kernel's result: a count, or a negative errno."""
        key = next(self._keys)
        address = ctypes.addressof(ctypes.c_char.from_buffer(buf)) if len(buf) else 0
        iocb = _Iocb(data=key, opcode=opcode, fildes=fd, buf=address, nbytes=len(buf), offset=offset,
                     rw_flags=rw_flags, flags=_IOCB_FLAG_RESFD, resfd=self._eventfd)
        self._submission[0] = ctypes.addressof(iocb)
        try:
            _syscall(_SYS_IO_SUBMIT, self._context, 1, self._submission)
        except OSError as exc:
            return -(exc.errno or errno.EIO)
        self._pending[key] = (trio.lowlevel.current_task(), iocb, buf)
        if self._idle.is_set():
            self._idle = trio.Event()
        return await trio.lowlevel.wait_task_rescheduled(_cannot_abort)

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
                task, _, _ = self._pending.pop(event.data)
                trio.lowlevel.reschedule(task, outcome.Value(event.res))
            if count < _REAP_BATCH:
                break
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
