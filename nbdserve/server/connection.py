"""One client connection: handshake, then requests in flight with out-of-order replies.

One reader task parses requests, at most `max_in_flight` in progress at once (backpressure: the
reader stops reading while all slots are busy). A request is served in one of three ways, the
cheapest that the export allows: inline, when it completes without blocking (a page-cache read,
a buffered write); started without a task, when the kernel completes it on its own and a callback
replies (native AIO); or in a task of its own. Replies go out whole and in order through one
ReplySender. Errors from one request become NBD error replies; errors from the protocol or the
stream end this connection only.
"""

import logging
import mmap
import time

import trio

from ..access import Client
from ..buffers import direct_buffers
from ..catalog import Catalog
from ..config import Limits
from ..backend import WouldBlock
from ..export import Export, RequestError, nbd_error
from ..protocol.constants import Command, CommandFlag, Error
from ..protocol.errors import NEED_DATA, ProtocolError
from ..protocol.handshake import ServerHandshake, State
from ..protocol.transmission import (
    OFFSET_DATA_HEADER_SIZE,
    SIMPLE_REPLY_SIZE,
    Request,
    TransmissionParser,
    block_status_chunk,
    error_chunk,
    none_chunk,
    offset_hole_chunk,
    pack_offset_data_header,
    pack_simple_reply,
    simple_reply,
)
from ..stats import Counters
from .limits import IdleTimeoutStream
from .negotiation import Negotiator
from .sender import ReplySender
from .socketio import SocketIO
from .tls import TLSConfig, peer_subject, start_tls

log = logging.getLogger(__name__)

RECEIVE_SIZE = 256 * 1024
# Replies served inline are sent together, up to this many or once one is this large.
_BATCH_REPLIES = 64
_BATCH_BYTES = 128 * 1024
# Reply buffers this large come from the pool of page-aligned buffers, whatever the export.
_POOLED_REPLY = 64 * 1024
# Plain ints for the per-request fast path: enum arithmetic costs microseconds.
_READ, _WRITE, _FLUSH = int(Command.READ), int(Command.WRITE), int(Command.FLUSH)
_DISC = int(Command.DISC)
_FUA = int(CommandFlag.FUA)
# _serve_inline's answer for a request whose completion callback will reply.
_STARTED = object()


class ConnectionClosed(Exception):
    """The client went away."""


class Connection:
    def __init__(
        self, stream: trio.abc.Stream, peer: str, catalog: Catalog, limits: Limits, *,
        tls: TLSConfig | None = None, client: Client | None = None,
    ) -> None:
        self.stream = stream
        self.peer = peer
        self.tls = tls or TLSConfig()
        self.client = client or Client()
        self.catalog = catalog
        self.limits = limits
        self.counters = Counters()
        self.connected_at = time.time()
        self._slots: trio.Semaphore | None = None
        self.export: Export | None = None
        self.export_name = ""
        self._socket_io: SocketIO | None = None  # the fast path, once transmission starts
        self._sender: ReplySender | None = None  # once transmission starts
        self._requests: trio.Nursery | None = None
        self._batch_buffers: list[mmap.mmap] = []  # pooled buffers of the replies in a batch
        self._stopping = False
        self._reader_scope = trio.CancelScope()

    def stop_reading(self) -> None:
        """At shutdown, or when the client is gone: read no more, let in-flight requests finish."""
        self._stopping = True
        self._reader_scope.cancel()

    @property
    def in_flight(self) -> int:
        return self.limits.max_in_flight - self._slots.value if self._slots else 0

    def _log_end(self, exc: Exception) -> None:
        """The connection ends through the client or the stream: a log line, never a raise."""
        if isinstance(exc, ProtocolError):
            log.warning("%s: protocol error, closing: %s", self.peer, exc)
        elif not isinstance(exc, ConnectionClosed):
            log.info("%s: connection lost: %s", self.peer, exc)

    def _send_failed(self, cause: Exception) -> None:
        """The client is gone: read no more; the other in-flight requests finish quietly."""
        log.info("%s: connection lost: send failed: %s", self.peer, cause)
        self.stop_reading()

    def _reading(self) -> trio.CancelScope:
        self._reader_scope = trio.CancelScope()
        if self._stopping:
            self._reader_scope.cancel()
        return self._reader_scope

    async def run(self) -> None:
        try:
            negotiator = None
            # A client that connects and stalls (in options or in the TLS handshake) is dropped.
            handshake_timeout = self.limits.handshake_timeout or float("inf")
            with self._reading(), trio.move_on_after(handshake_timeout) as timer:
                negotiator = await self._handshake()
            if timer.cancelled_caught:
                log.info("%s: no export chosen within %g s (limits.handshake-timeout), closing",
                         self.peer, self.limits.handshake_timeout)
            if negotiator is None or self._stopping:
                return
            if self.limits.idle_timeout:
                self.stream = IdleTimeoutStream(
                    self.stream, self.limits.idle_timeout, lambda: self.in_flight > 0, self.peer
                )
            await self._transmission(negotiator)
        except (ConnectionClosed, ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._log_end(exc)
        finally:
            with trio.CancelScope(shield=True):
                # Over TLS this sends close_notify first, as the spec asks of the side that
                # hangs up; a peer that does not read cannot hold the close up for long.
                with trio.move_on_after(1):
                    await self.stream.aclose()
                await trio.aclose_forcefully(self.stream)

    async def _receive(self) -> bytes:
        if self._socket_io is not None:
            data = await self._socket_io.receive()
        else:
            data = await self.stream.receive_some(RECEIVE_SIZE)
        if not data:
            raise ConnectionClosed
        return data

    async def _receive_into(self, parser: TransmissionParser) -> None:
        space = parser.payload_space() if self._socket_io is not None else None
        if space is None:
            parser.receive_data(await self._receive())
            return
        count = await self._socket_io.receive_into(space)
        if not count:
            raise ConnectionClosed
        parser.payload_received(count)

    @staticmethod
    def _pooled_payload(length: int) -> memoryview:
        return memoryview(direct_buffers.take(length))[:length]

    def _release_payload(self, request: Request) -> None:
        """Give back a payload from _pooled_payload once nothing uses it any more."""
        if self._direct_buffers and type(request.data) is memoryview:
            direct_buffers.give(request.data.obj)

    async def _handshake(self) -> Negotiator | None:
        handshake = ServerHandshake()
        negotiator = Negotiator(handshake, self.catalog, self.tls, self.client)
        await self.stream.send_all(handshake.greeting())
        while handshake.state not in (State.TRANSMISSION, State.CLOSED):
            event = handshake.next_event()
            if event is NEED_DATA:
                handshake.receive_data(await self._receive())
                continue
            reply = await negotiator.answer(event)
            if reply:
                await self.stream.send_all(reply)
            if handshake.state is State.AWAIT_TLS:
                self.stream = await start_tls(self.stream, self.tls)
                negotiator.tls_started(peer_subject(self.stream))
                log.info("%s: TLS %s, client certificate: %s", self.peer, self.stream.version(),
                         negotiator.client.subject or "none")
        if handshake.state is State.CLOSED:
            return None
        return negotiator

    async def _transmission(self, negotiator: Negotiator) -> None:
        handshake = negotiator.handshake
        self.export = export = negotiator.export
        if not self.catalog.serves(export):
            log.info("%s: export %r was reloaded during the handshake; closing", self.peer, export.name)
            return
        self.export_name = export.name
        self.structured = handshake.structured_replies
        self.contexts = handshake.selected_contexts(negotiator.export_name)  # id -> name
        self.has_contexts = bool(self.contexts)
        self._direct_buffers = export.min_block > 1
        self._read_header = OFFSET_DATA_HEADER_SIZE if self.structured else SIMPLE_REPLY_SIZE
        if type(self.stream) is trio.SocketStream:  # not TLS, not wrapped for idle timeouts
            self._socket_io = SocketIO(self.stream, RECEIVE_SIZE)
        log.info("%s: opened export %r", self.peer, export.name)
        parser = TransmissionParser(
            max_payload=min(self.limits.max_payload, export.max_payload),
            initial_data=handshake.trailing_data,
            # O_DIRECT exports take large payloads in pooled page-aligned memory, as they come.
            allocate=self._pooled_payload if self._direct_buffers else None,
        )
        self._slots = slots = trio.Semaphore(self.limits.max_in_flight)
        self._sender = sender = ReplySender(self.stream, on_broken=self._send_failed)
        try:
            # serving(): when the export goes away (its LV removed), stop_reading() ends us cleanly.
            async with self.catalog.serving(export, self.stop_reading), trio.open_nursery() as writer:
                writer.start_soon(sender.run)
                try:
                    async with trio.open_nursery() as self._requests:
                        await self._read_requests(parser)
                        # Requests started without a task hold a slot until they reply; one
                        # may still need a task, so the nursery stays open until all are done.
                        for _ in range(self.limits.max_in_flight):
                            await slots.acquire()
                finally:
                    sender.close()
        finally:
            c = self.counters
            log.info(
                "%s: closed export %r: %d requests, %d bytes read, %d bytes written, %d errors",
                self.peer, export.name, c.requests, c.bytes_read, c.bytes_written, c.errors,
            )

    async def _read_requests(self, parser: TransmissionParser) -> None:
        """Serve requests until DISC, EOF or a protocol error; never raises for those, so
        in-flight requests finish and get their replies.

        Requests that complete without blocking (reads from the page cache, buffered writes) are
        served right here, and their replies go out together before the reader next waits: no
        task, no thread hop and one send for a whole batch. The rest get a task each."""
        batch: list = []
        try:
            # Shutdown cancels only the waits for more requests: replies cannot be cut short
            # (the sender's waits are not cancellable) and a request that was read is served.
            # One scope for the whole loop: entering one per receive cost a seventh of the CPU.
            with self._reading():
                while True:
                    request = parser.next_event()
                    if request is NEED_DATA:
                        if batch:
                            await self._send_batch(batch)
                        await self._receive_into(parser)
                        continue
                    if request.command == _DISC:
                        return
                    reply = self._serve_inline(request)
                    if reply is _STARTED:
                        continue
                    if reply is not None:
                        batch.append(reply)
                        if len(batch) >= _BATCH_REPLIES or len(reply) >= _BATCH_BYTES:
                            await self._send_batch(batch)  # bounds the memory a batch holds
                        continue
                    if batch:
                        await self._send_batch(batch)
                    with trio.CancelScope(shield=True):
                        await self._slots.acquire()
                    self._requests.start_soon(self._serve_request, request, self._slots)
        except (ConnectionClosed, ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._log_end(exc)
        finally:
            if batch:
                with trio.CancelScope(shield=True):
                    await self._send_batch(batch)

    def _serve_inline(self, request: Request):
        """Serve a request without a task where the export can: the reply if it completed at
        once, _STARTED if a completion callback will reply, None if it needs a task."""
        command = request.command
        if command != _READ and command != _WRITE and command != _FLUSH:
            return None
        start = time.perf_counter_ns()
        export = self.export
        try:
            export.check(request, structured=self.structured, has_contexts=self.has_contexts)
        except RequestError:
            return None  # the task path replies with the error
        if command == _READ:
            reply = self._read_inline(request)
            if reply is None or reply is _STARTED:
                return reply
            self.counters.bytes_read += request.length
        elif command == _WRITE:
            fua = bool(request.flags & _FUA)
            if fua or not export.try_write(request.data, request.offset):
                started = self._start(request, export.start_write, (request.data, request.offset, fua),
                                      self._completion(request))
                return _STARTED if started else None
            self._release_payload(request)
            self.counters.bytes_written += request.length
            reply = simple_reply(request.cookie)
        else:
            return _STARTED if self._start(request, export.start_flush, (), self._completion(request)) else None
        self.counters.record(command, time.perf_counter_ns() - start)
        return reply

    def _read_inline(self, request: Request):
        """_serve_inline for a READ (checked): a hole known without I/O, a page-cache hit, or
        a read started for a completion to reply to."""
        export, offset, length = self.export, request.offset, request.length
        if not length:
            return None
        if self.structured and export.known_zero(offset, length):
            return offset_hole_chunk(request.cookie, offset, length, done=True)
        if export.lends_reads:  # no reply buffer: the data goes out from where it lies
            lent = self._start(request, export.start_read_views, (offset, length), self._completion(request))
            return _STARTED if lent else None
        if not (export.reads_inline or export.starts_reads):
            return None  # spare the reply buffer a backend never fills
        reply, data, pooled = self._reply_buffer(self._read_header, length)
        if export.try_read(data, offset):
            self._pack_read_header(reply, request)
            if pooled is not None:
                self._batch_buffers.append(pooled)  # given back once the batch is sent
            return reply
        if self._start(request, export.start_read, (data, offset), self._completion(request, reply, pooled)):
            return _STARTED
        self._release_reply(pooled)
        return None

    def _start(self, request: Request, start, args: tuple, done) -> bool:
        """Start a request through `start(*args, done)` with a slot held until it replies:
        True if it started."""
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            return False  # all slots busy: the reader waits for one on the task path
        try:
            if start(*args, done):
                return True
        except Exception:
            log.debug("%s: starting %s failed; serving it in a task", self.peer, _name(request),
                      exc_info=True)
        self._slots.release()
        return False

    def _completion(self, request: Request, reply: memoryview | None = None,
                    pooled: mmap.mmap | None = None):
        """The callback that replies to a started request: a READ's reply buffer given, or the
        views of the data the backend lends."""
        start = time.perf_counter_ns()

        def finished(_sent: bool) -> None:
            self._release_reply(pooled)
            self._release_payload(request)
            self._slots.release()
            self.counters.record(request.command, time.perf_counter_ns() - start)

        def done(error: Exception | None, views: list[memoryview] | None = None) -> None:
            if error is None:
                if views is not None:
                    header = bytearray(self._read_header)
                    self._pack_read_header(header, request)
                    self.counters.bytes_read += request.length
                    self._sender.send_nowait([header, *views], finished)
                elif reply is None:
                    if request.command == _WRITE:
                        self.counters.bytes_written += request.length
                    self._sender.send_nowait(simple_reply(request.cookie), finished)
                else:
                    self._pack_read_header(reply, request)
                    self.counters.bytes_read += request.length
                    self._sender.send_nowait(reply, finished)
            elif isinstance(error, WouldBlock):
                # Done the ordinary way, in a task that inherits the slot.
                self._release_reply(pooled)
                self._requests.start_soon(self._serve_request, request, self._slots)
            else:
                self.counters.errors += 1
                message = self._failed(request, error)
                self._sender.send_nowait(self._error_reply(request, nbd_error(error), message), finished)

        return done

    async def _send_batch(self, batch: list) -> None:
        # Small replies are joined into one send; a large one goes out on its own, uncopied.
        small = [reply for reply in batch if len(reply) < _BATCH_BYTES]
        large = [reply for reply in batch if len(reply) >= _BATCH_BYTES]
        batch.clear()
        buffers, self._batch_buffers = self._batch_buffers, []
        if small:
            await self._send(b"".join(small) if len(small) > 1 else small[0])
        for reply in large:
            await self._send(reply)
        for pooled in buffers:  # the kernel has the bytes (or the client is gone)
            self._release_reply(pooled)

    async def _serve_request(self, request: Request, slots: trio.Semaphore) -> None:
        start = time.perf_counter_ns()
        try:
            await self._dispatch(request)
        except RequestError as exc:
            await self._send_error(request, exc.error, str(exc))
        except OSError as exc:
            await self._send_error(request, nbd_error(exc), self._failed(request, exc))
        except Exception:
            log.exception("%s: %s failed unexpectedly", self.peer, _name(request))
            await self._send_error(request, Error.EIO, "internal server error")
        finally:
            self._release_payload(request)
            slots.release()
            self.counters.record(request.command, time.perf_counter_ns() - start)

    async def _dispatch(self, request: Request) -> None:
        export = self.export
        export.check(request, structured=self.structured, has_contexts=self.has_contexts)
        command, offset, length = request.command, request.offset, request.length
        fua = bool(request.flags & CommandFlag.FUA)
        if command == Command.READ:
            await self._read(request)
            return
        if command == Command.WRITE:
            await export.write(request.data, offset, fua=fua)
            self.counters.bytes_written += length
        elif command == Command.FLUSH:
            await export.flush()
        elif command == Command.TRIM:
            await export.trim(offset, length, fua=fua)
        elif command == Command.WRITE_ZEROES:
            await export.zero(
                offset, length, fua=fua,
                may_trim=not request.flags & CommandFlag.NO_HOLE,
                fast=bool(request.flags & CommandFlag.FAST_ZERO),
            )
        elif command == Command.CACHE:
            await export.cache(offset, length)
        elif command == Command.BLOCK_STATUS:
            req_one = bool(request.flags & CommandFlag.REQ_ONE)
            chunks = [
                block_status_chunk(
                    request.cookie, context_id,
                    await export.block_status(offset, length, req_one=req_one, context=name),
                    done=False,
                )
                for context_id, name in self.contexts.items()
            ]
            await self._send(b"".join(chunks) + none_chunk(request.cookie))
            return
        await self._send(simple_reply(request.cookie))

    async def _read(self, request: Request) -> None:
        length = request.length
        if self.structured and not length:
            await self._send(none_chunk(request.cookie))
            return
        reply, data, pooled = self._reply_buffer(self._read_header, length)
        try:
            await self.export.read(data, request.offset)
            self._pack_read_header(reply, request)
            self.counters.bytes_read += length
            await self._send(reply)
        finally:
            self._release_reply(pooled)  # a read returns only once nothing writes to `data`

    def _pack_read_header(self, reply: memoryview, request: Request) -> None:
        if self.structured:
            pack_offset_data_header(reply, request.cookie, request.offset, request.length, done=True)
        else:
            pack_simple_reply(reply, request.cookie)

    def _reply_buffer(self, header: int, length: int) -> tuple[memoryview, memoryview, mmap.mmap | None]:
        """A reply: header then data, the data page-aligned where O_DIRECT needs it; and the
        pooled buffer to give back with _release_reply() once the reply is sent (or None).
        Large replies come from the pool whatever the export: a fresh large buffer is zeroed
        and, past malloc's mmap threshold, faulted in page by page."""
        if not self._direct_buffers and length < _POOLED_REPLY:
            reply = memoryview(bytearray(header + length))
            return reply, reply[header:], None
        page = mmap.PAGESIZE
        pooled = direct_buffers.take(page + length)
        whole = memoryview(pooled)[: page + length]
        return whole[page - header :], whole[page:], pooled

    @staticmethod
    def _release_reply(pooled: mmap.mmap | None) -> None:
        if pooled is not None:
            direct_buffers.give(pooled)

    def _failed(self, request: Request, exc: OSError) -> str:
        """Log a request the backend failed; the message for the client."""
        log.warning("%s: %s on export %r failed: %s", self.peer, _name(request), self.export_name, exc)
        return exc.strerror or str(exc)

    def _error_reply(self, request: Request, error: Error, message: str) -> bytes:
        if self.structured and request.command in (Command.READ, Command.BLOCK_STATUS):
            return error_chunk(request.cookie, error, message)
        return simple_reply(request.cookie, error)

    async def _send_error(self, request: Request, error: Error, message: str) -> None:
        self.counters.errors += 1
        await self._send(self._error_reply(request, error, message))

    async def _send(self, data) -> None:
        try:
            await self._sender.send(data)
        except trio.BrokenResourceError:
            pass  # the client is gone: the sender said so (_send_failed)


def _name(request: Request) -> str:
    try:
        return Command(request.command).name
    except ValueError:
        return f"command {request.command}"
