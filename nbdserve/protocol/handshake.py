"""Server side of the fixed newstyle handshake, sans-IO.

Bytes from the client go in through `receive_data`; `next_event` turns them into option
events; the caller decides how to answer and calls one of the `send_*` methods, which return the
bytes to write and move the state machine. State the negotiation establishes (structured replies,
no-zeroes, selected metadata contexts) lives here, so it is forgotten in one place on STARTTLS.
"""

import struct
from dataclasses import dataclass
from enum import Enum, auto

from .buffer import ReceiveBuffer
from .constants import (
    IHAVEOPT,
    MAX_STRING_LENGTH,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    ClientFlag,
    HandshakeFlag,
    Info,
    Option,
    Reply,
)
from .errors import NEED_DATA, ProtocolError

SERVER_HANDSHAKE_FLAGS = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
# Options carry names and a few queries; anything longer is refused without being buffered.
MAX_OPTION_LENGTH_DEFAULT = 64 * 1024

_OPTION_HEADER = struct.Struct(">QII")
_REPLY_HEADER = struct.Struct(">QIII")


# Events: what the client asked for.


@dataclass(frozen=True)
class ExportNameRequest:
    name: str


@dataclass(frozen=True)
class AbortRequest:
    pass


@dataclass(frozen=True)
class ListRequest:
    pass


@dataclass(frozen=True)
class StartTLSRequest:
    pass


@dataclass(frozen=True)
class StructuredReplyRequest:
    pass


@dataclass(frozen=True)
class InfoRequest:
    """NBD_OPT_INFO, or NBD_OPT_GO when `go` is true."""

    name: str
    requests: tuple[int, ...]
    go: bool


@dataclass(frozen=True)
class MetaContextRequest:
    """NBD_OPT_LIST_META_CONTEXT, or NBD_OPT_SET_META_CONTEXT when `select` is true."""

    name: str
    queries: tuple[str, ...]
    select: bool


@dataclass(frozen=True)
class UnsupportedOption:
    """An option this server does not know; its payload was consumed."""

    option: int


@dataclass(frozen=True)
class InvalidOption:
    """A known option whose payload is malformed or forbidden in this state."""

    option: int
    message: str


@dataclass(frozen=True)
class OversizedOption:
    """An option with a payload over the limit; the payload is drained, never buffered."""

    option: int
    length: int


class State(Enum):
    AWAIT_CLIENT_FLAGS = auto()
    OPTIONS = auto()  # waiting for the next option header
    REPLYING = auto()  # an option event is out; its final reply has not been sent
    AWAIT_TLS = auto()  # STARTTLS acknowledged; the caller must wrap the stream
    TRANSMISSION = auto()
    CLOSED = auto()


class ServerHandshake:
    def __init__(self, *, max_option_length: int = MAX_OPTION_LENGTH_DEFAULT) -> None:
        self._max_option_length = max_option_length
        self._buffer = ReceiveBuffer()
        self._drain = 0  # bytes of an oversized option still to discard
        self.state = State.AWAIT_CLIENT_FLAGS
        self.option: int | None = None  # the option being answered
        self._pending: object | None = None
        self.tls_active = False
        self.no_zeroes = False
        self._reset_negotiation()

    def _reset_negotiation(self) -> None:
        self.structured_replies = False
        # Contexts chosen by the last SET_META_CONTEXT: id -> name, and the export they are for.
        self.meta_contexts: dict[int, str] = {}
        self.meta_contexts_export: str | None = None

    # Input.

    def greeting(self) -> bytes:
        return struct.pack(">QQH", NBDMAGIC, IHAVEOPT, SERVER_HANDSHAKE_FLAGS)

    def receive_data(self, data: bytes) -> None:
        if self._drain:
            dropped = min(self._drain, len(data))
            self._drain -= dropped
            data = data[dropped:]
        self._buffer.append(data)

    def next_event(self):
        if self.state is State.AWAIT_CLIENT_FLAGS:
            raw = self._buffer.take(4)
            if raw is None:
                return NEED_DATA
            (flags,) = struct.unpack(">I", raw)
            if flags & ~int(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES):
                raise ProtocolError(f"unknown client flags {flags:#x}")
            self.no_zeroes = bool(flags & ClientFlag.C_NO_ZEROES)
            self.state = State.OPTIONS
        if self.state is not State.OPTIONS or self._drain:
            return NEED_DATA
        header = self._buffer.peek(_OPTION_HEADER.size)
        if header is None:
            return NEED_DATA
        magic, option, length = _OPTION_HEADER.unpack(header)
        if magic != IHAVEOPT:
            raise ProtocolError(f"bad option magic {magic:#x}")
        if length > self._max_option_length:
            self._buffer.discard(_OPTION_HEADER.size)
            self._drain = length - self._buffer.discard(length)
            return self._emit(option, OversizedOption(option, length))
        if len(self._buffer) < _OPTION_HEADER.size + length:
            return NEED_DATA
        self._buffer.discard(_OPTION_HEADER.size)
        payload = self._buffer.take(length)
        try:
            event = _parse_option(option, payload)
        except _Malformed as exc:
            event = InvalidOption(option, str(exc))
        return self._emit(option, event)

    def _emit(self, option: int, event):
        self.option = option
        self._pending = event
        self.state = State.REPLYING
        if isinstance(event, StartTLSRequest) and self.tls_active:
            event = InvalidOption(option, "TLS is already active")
            self._pending = event
        return event

    @property
    def trailing_data(self) -> bytes:
        """Bytes received after the handshake ended: the start of transmission."""
        return self._buffer.take_all()

    # Output: answers to the pending option.

    def _reply(self, reply: Reply, payload: bytes = b"") -> bytes:
        if self.state is not State.REPLYING:
            raise RuntimeError(f"no option to answer in state {self.state.name}")
        return _REPLY_HEADER.pack(OPTION_REPLY_MAGIC, self.option, reply, len(payload)) + payload

    def _finish(self) -> None:
        self.state = State.OPTIONS
        self._pending = None

    def send_ack(self) -> bytes:
        """The final positive reply; it also enacts what the option asked for."""
        data = self._reply(Reply.ACK)
        event = self._pending
        self._finish()
        if isinstance(event, StructuredReplyRequest):
            self.structured_replies = True
        elif isinstance(event, AbortRequest):
            self.state = State.CLOSED
        elif isinstance(event, StartTLSRequest):
            if len(self._buffer):
                # Bytes sent in plaintext after STARTTLS would be injected into the TLS session.
                raise ProtocolError("data after STARTTLS before the TLS handshake")
            self.state = State.AWAIT_TLS
        elif isinstance(event, InfoRequest) and event.go:
            self.state = State.TRANSMISSION
        return data

    def send_error(self, reply: Reply, message: str = "") -> bytes:
        data = self._reply(reply, message.encode()[:MAX_STRING_LENGTH])
        if isinstance(self._pending, MetaContextRequest) and self._pending.select:
            self.meta_contexts = {}
            self.meta_contexts_export = None
        self._finish()
        return data

    def send_server(self, name: str, description: str = "") -> bytes:
        """One NBD_REP_SERVER entry of a LIST reply."""
        encoded = name.encode()
        return self._reply(
            Reply.SERVER, struct.pack(">I", len(encoded)) + encoded + description.encode()
        )

    def send_info(self, info: Info, payload: bytes) -> bytes:
        return self._reply(Reply.INFO, struct.pack(">H", info) + payload)

    def send_meta_context(self, context_id: int, name: str) -> bytes:
        event = self._pending
        if isinstance(event, MetaContextRequest) and event.select:
            if self.meta_contexts_export != event.name:
                self.meta_contexts = {}
                self.meta_contexts_export = event.name
            self.meta_contexts[context_id] = name
        return self._reply(Reply.META_CONTEXT, struct.pack(">I", context_id) + name.encode())

    def begin_meta_context_reply(self) -> None:
        """SET_META_CONTEXT replaces the selection even when it selects nothing."""
        event = self._pending
        if isinstance(event, MetaContextRequest) and event.select:
            self.meta_contexts = {}
            self.meta_contexts_export = event.name

    def send_export_name_reply(self, size: int, flags: int) -> bytes:
        """Success for NBD_OPT_EXPORT_NAME: export data, then transmission begins."""
        if not isinstance(self._pending, ExportNameRequest):
            raise RuntimeError("no EXPORT_NAME option to answer")
        self._finish()
        self.state = State.TRANSMISSION
        return struct.pack(">QH", size, flags) + (b"" if self.no_zeroes else bytes(124))

    def close(self) -> None:
        """The caller hangs up (an EXPORT_NAME that cannot be served, a bad option)."""
        self.state = State.CLOSED

    def tls_established(self) -> None:
        """The caller wrapped the stream in TLS: negotiate again from scratch."""
        if self.state is not State.AWAIT_TLS:
            raise RuntimeError("no STARTTLS was acknowledged")
        self.tls_active = True
        self._reset_negotiation()
        self.state = State.OPTIONS

    def selected_contexts(self, export_name: str) -> dict[int, str]:
        """Contexts usable in transmission with `export_name` (the spec ties them to the name)."""
        if self.meta_contexts_export == export_name:
            return dict(self.meta_contexts)
        return {}


class _Malformed(Exception):
    pass


class _Reader:
    """Reads the fields of one option payload; any overrun is a malformed option."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def unpack(self, fmt: str) -> tuple:
        size = struct.calcsize(fmt)
        if self._pos + size > len(self._data):
            raise _Malformed("option payload is truncated")
        values = struct.unpack_from(fmt, self._data, self._pos)
        self._pos += size
        return values

    def string(self, length: int) -> str:
        if length > MAX_STRING_LENGTH:
            raise _Malformed(f"string of {length} bytes is over the limit of {MAX_STRING_LENGTH}")
        if self._pos + length > len(self._data):
            raise _Malformed("string runs past the end of the option payload")
        raw = self._data[self._pos : self._pos + length]
        self._pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _Malformed("string is not valid UTF-8") from exc

    def end(self) -> None:
        if self._pos != len(self._data):
            raise _Malformed("option payload has trailing bytes")


def _parse_option(option: int, payload: bytes):
    reader = _Reader(payload)
    if option == Option.EXPORT_NAME:
        return ExportNameRequest(reader.string(len(payload)))
    if option == Option.ABORT:
        return AbortRequest()  # the spec says to ignore any data sent with it
    if option in (Option.LIST, Option.STARTTLS, Option.STRUCTURED_REPLY):
        if payload:
            raise _Malformed(f"{Option(option).name} takes no data")
        return {Option.LIST: ListRequest, Option.STARTTLS: StartTLSRequest}.get(
            option, StructuredReplyRequest
        )()
    if option in (Option.INFO, Option.GO):
        (name_length,) = reader.unpack(">I")
        name = reader.string(name_length)
        (count,) = reader.unpack(">H")
        requests = reader.unpack(f">{count}H")
        reader.end()
        return InfoRequest(name, tuple(requests), go=option == Option.GO)
    if option in (Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT):
        (name_length,) = reader.unpack(">I")
        name = reader.string(name_length)
        (count,) = reader.unpack(">I")
        queries = []
        for _ in range(count):
            (query_length,) = reader.unpack(">I")
            queries.append(reader.string(query_length))
        reader.end()
        return MetaContextRequest(name, tuple(queries), select=option == Option.SET_META_CONTEXT)
    return UnsupportedOption(option)
