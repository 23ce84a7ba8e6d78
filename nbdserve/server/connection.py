"""One client connection: handshake, then requests in flight with out-of-order replies.

One reader task parses requests and starts a task per request, at most `max_in_flight` at once
(backpressure: the reader stops reading while all slots are busy). Replies go out under one send
lock, each as a single send. Errors from one request become NBD error replies; errors from the
protocol or the stream end this connection only.
"""

import logging
import mmap
from dataclasses import dataclass

import trio

from ..catalog import Catalog
from ..config import Limits
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
    pack_offset_data_header,
    pack_simple_reply,
    simple_reply,
)
from .negotiation import Negotiator

log = logging.getLogger(__name__)

RECEIVE_SIZE = 256 * 1024


@dataclass
class Counters:
    bytes_read: int = 0
    bytes_written: int = 0
    requests: int = 0
    errors: int = 0


class ConnectionClosed(Exception):
    """The client went away."""


class Connection:
    def __init__(self, stream: trio.abc.Stream, peer: str, catalog: Catalog, limits: Limits) -> None:
        self.stream = stream
        self.peer = peer
        self.catalog = catalog
        self.limits = limits
        self.counters = Counters()
        self.export: Export | None = None
        self.export_name = ""
        self._send_lock = trio.Lock()
        self._stopping = False
        self._reader_scope = trio.CancelScope()

    def stop_reading(self) -> None:
        """At shutdown, or when the client is gone: read no more, let in-flight requests finish."""
        self._stopping = True
        self._reader_scope.cancel()

    def _reading(self) -> trio.CancelScope:
        self._reader_scope = trio.CancelScope()
        if self._stopping:
            self._reader_scope.cancel()
        return self._reader_scope

    async def run(self) -> None:
        try:
            with self._reading():
                negotiator = await self._handshake()
            if negotiator is None or self._stopping:
                return
            await self._transmission(negotiator)
        except ConnectionClosed:
            pass
        except ProtocolError as exc:
            log.warning("%s: protocol error, closing: %s", self.peer, exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("%s: connection lost: %s", self.peer, exc)
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self.stream)

    async def _receive(self) -> bytes:
        data = await self.stream.receive_some(RECEIVE_SIZE)
        if not data:
            raise ConnectionClosed
        return data

    async def _handshake(self) -> Negotiator | None:
        handshake = ServerHandshake()
        negotiator = Negotiator(handshake, self.catalog)
        await self.stream.send_all(handshake.greeting())
        while handshake.state not in (State.TRANSMISSION, State.CLOSED):
            event = handshake.next_event()
            if event is NEED_DATA:
                handshake.receive_data(await self._receive())
                continue
            reply = await negotiator.answer(event)
            if reply:
                await self.stream.send_all(reply)
        if handshake.state is State.CLOSED:
            return None
        return negotiator

    async def _transmission(self, negotiator: Negotiator) -> None:
        handshake = negotiator.handshake
        self.export = export = negotiator.export
        self.export_name = export.name
        self.structured = handshake.structured_replies
        self.has_contexts = bool(handshake.selected_contexts(negotiator.export_name))
        self.context_ids = list(handshake.selected_contexts(negotiator.export_name))
        self._direct_buffers = export.min_block > 1
        log.info("%s: opened export %r", self.peer, export.name)
        parser = TransmissionParser(
            max_payload=min(self.limits.max_payload, export.max_payload),
            initial_data=handshake.trailing_data,
        )
        slots = trio.Semaphore(self.limits.max_in_flight)
        try:
            async with trio.open_nursery() as requests:
                with self._reading():
                    await self._read_requests(parser, slots, requests)
        finally:
            c = self.counters
            log.info(
                "%s: closed export %r: %d requests, %d bytes read, %d bytes written, %d errors",
                self.peer, export.name, c.requests, c.bytes_read, c.bytes_written, c.errors,
            )

    async def _read_requests(self, parser: TransmissionParser, slots, requests) -> None:
        """Start a task per request until DISC, EOF or a protocol error; never raises for those,
        so in-flight requests finish and get their replies."""
        try:
            while True:
                request = parser.next_event()
                if request is NEED_DATA:
                    parser.receive_data(await self._receive())
                    continue
                if request.command == Command.DISC:
                    return
                await slots.acquire()
                requests.start_soon(self._serve_request, request, slots)
        except ConnectionClosed:
            pass
        except ProtocolError as exc:
            log.warning("%s: protocol error, closing: %s", self.peer, exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("%s: connection lost: %s", self.peer, exc)

    async def _serve_request(self, request: Request, slots: trio.Semaphore) -> None:
        try:
            self.counters.requests += 1
            await self._dispatch(request)
        except RequestError as exc:
            await self._send_error(request, exc.error, str(exc))
        except OSError as exc:
            log.warning("%s: %s on export %r failed: %s", self.peer, _name(request), self.export_name, exc)
            await self._send_error(request, nbd_error(exc), exc.strerror or str(exc))
        except Exception:
            log.exception("%s: %s failed unexpectedly", self.peer, _name(request))
            await self._send_error(request, Error.EIO, "internal server error")
        finally:
            slots.release()

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
            descriptors = await export.block_status(
                offset, length, req_one=bool(request.flags & CommandFlag.REQ_ONE)
            )
            chunks = [
                block_status_chunk(request.cookie, context_id, descriptors, done=False)
                for context_id in self.context_ids
            ]
            await self._send(b"".join(chunks) + none_chunk(request.cookie))
            return
        await self._send(simple_reply(request.cookie))

    async def _read(self, request: Request) -> None:
        header = OFFSET_DATA_HEADER_SIZE if self.structured else SIMPLE_REPLY_SIZE
        length = request.length
        if self.structured and not length:
            await self._send(none_chunk(request.cookie))
            return
        reply, data = self._reply_buffer(header, length)
        await self.export.read(data, request.offset)
        if self.structured:
            pack_offset_data_header(reply, request.cookie, request.offset, length, done=True)
        else:
            pack_simple_reply(reply, request.cookie)
        self.counters.bytes_read += length
        await self._send(reply)

    def _reply_buffer(self, header: int, length: int) -> tuple[memoryview, memoryview]:
        """A reply: header then data, the data page-aligned where O_DIRECT needs it."""
        if not self._direct_buffers:
            reply = memoryview(bytearray(header + length))
            return reply, reply[header:]
        page = mmap.PAGESIZE
        whole = memoryview(mmap.mmap(-1, page + length))
        return whole[page - header :], whole[page:]

    async def _send_error(self, request: Request, error: Error, message: str) -> None:
        self.counters.errors += 1
        if self.structured and request.command in (Command.READ, Command.BLOCK_STATUS):
            await self._send(error_chunk(request.cookie, error, message))
        else:
            await self._send(simple_reply(request.cookie, error))

    async def _send(self, data) -> None:
        try:
            async with self._send_lock:
                await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # The client is gone: stop reading; the other in-flight requests finish quietly.
            self.stop_reading()


def _name(request: Request) -> str:
    try:
        return Command(request.command).name
    except ValueError:
        return f"command {request.command}"
