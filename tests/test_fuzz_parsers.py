"""Property tests over the sans-IO parsers: any bytes, whole or split anywhere, give events,
NEED_DATA or a ProtocolError (never another exception), and buffers stay within their bounds."""

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nbd_wire import client_flags, option

from nbdserve.protocol.constants import REQUEST_MAGIC, Command, Option, Reply
from nbdserve.protocol.errors import NEED_DATA, ProtocolError
from nbdserve.protocol.handshake import (
    AbortRequest,
    ExportNameRequest,
    InfoRequest,
    InvalidOption,
    ListRequest,
    MetaContextRequest,
    OversizedOption,
    ServerHandshake,
    StartTLSRequest,
    State,
    StructuredReplyRequest,
    UnsupportedOption,
)
from nbdserve.protocol.transmission import Request, TransmissionParser

MAX_OPTION = 1024
MAX_PAYLOAD = 4096
OPTION_HEADER = 16
REQUEST_HEADER = 28
HANDSHAKE_EVENTS = (
    AbortRequest, ExportNameRequest, InfoRequest, InvalidOption, ListRequest, MetaContextRequest,
    OversizedOption, StartTLSRequest, StructuredReplyRequest, UnsupportedOption,
)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def string_field(size: int = 4) -> st.SearchStrategy[bytes]:
    """A length-prefixed string whose length may lie, with bytes that may not be UTF-8."""
    return st.tuples(st.integers(0, 300), st.binary(max_size=40)).map(
        lambda pair: struct.pack(">I" if size == 4 else ">H", pair[0] % (1 << 8 * size)) + pair[1]
    )


payloads = st.one_of(
    st.binary(max_size=64),
    st.lists(string_field(), max_size=3).map(b"".join),
    st.tuples(string_field(), st.integers(0, 5), st.binary(max_size=12)).map(
        lambda t: t[0] + struct.pack(">H", t[1]) + t[2]
    ),
)
options = st.one_of(
    st.tuples(st.integers(0, 12), payloads).map(lambda t: option(t[0], t[1])),
    # A header claiming a length other than the payload's, up to far over the limit.
    st.tuples(st.integers(0, 12), payloads, st.integers(0, 2**32 - 1)).map(
        lambda t: option(t[0], t[1], length=t[2])
    ),
    st.binary(min_size=1, max_size=24),  # garbage where a header should be
)
handshake_input = st.tuples(
    st.one_of(st.just(client_flags()), st.binary(max_size=4).map(lambda b: b.ljust(4, b"\0"))),
    st.lists(options, max_size=8),
).map(lambda t: t[0] + b"".join(t[1]))
transmission_input = st.lists(
    st.one_of(
        st.tuples(
            st.sampled_from([*Command, 9, 0xFFFF]), st.integers(0, 31),
            st.integers(0, 2**64 - 1), st.integers(0, 2 * MAX_PAYLOAD), st.binary(max_size=200),
        ).map(lambda t: struct.pack(">IHHQQI", REQUEST_MAGIC, t[1], t[0], 7, t[2], t[3]) + t[4]),
        st.binary(min_size=1, max_size=40),
    ),
    max_size=8,
).map(b"".join)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:]) if b > a]


def assert_split_makes_no_difference(drive, data: bytes, cuts: list[int]) -> None:
    """The same events (and the same error) whole, cut at `cuts`, and one byte at a time."""
    whole = drive([data])
    assert drive(split(data, cuts)) == whole
    assert drive([data[i : i + 1] for i in range(len(data))]) == whole


def answer(hs: ServerHandshake, event) -> None:
    """A server that refuses TLS and any export, and accepts the rest: enough to keep going."""
    match event:
        case AbortRequest() | StructuredReplyRequest():
            hs.send_ack()
        case MetaContextRequest(select=True):
            hs.begin_meta_context_reply()
            hs.send_meta_context(1, "base:allocation")
            hs.send_ack()
        case ExportNameRequest():
            hs.close()
        case _:
            hs.send_error(Reply.ERR_UNSUP)


def drive_handshake(chunks: list[bytes]) -> tuple[list, bool]:
    """(events, whether a ProtocolError ended it), checking the buffer bound after each step."""
    hs = ServerHandshake(max_option_length=MAX_OPTION)
    events = []
    try:
        for chunk in chunks:
            hs.receive_data(chunk)
            while hs.state in (State.AWAIT_CLIENT_FLAGS, State.OPTIONS):
                event = hs.next_event()
                if event is NEED_DATA:
                    # Never more than one option's worth is held back waiting for the rest.
                    assert len(hs._buffer) < OPTION_HEADER + MAX_OPTION
                    break
                assert isinstance(event, HANDSHAKE_EVENTS), event
                if isinstance(event, OversizedOption):
                    assert event.length > MAX_OPTION
                events.append(event)
                answer(hs, event)
            if hs.state is State.CLOSED:
                break
    except ProtocolError:
        return events, True
    return events, False


@FUZZ
@given(handshake_input, st.lists(st.integers(0, 10_000), max_size=6))
def test_handshake_any_bytes_any_split(data, cuts):
    assert_split_makes_no_difference(drive_handshake, data, cuts)


@FUZZ
@given(st.binary(max_size=600))
def test_handshake_raw_bytes(data):
    drive_handshake([data])
    drive_handshake([client_flags() + data])


@FUZZ
@given(st.lists(options, max_size=6), st.binary(min_size=1, max_size=64))
def test_starttls_forgets_everything_and_refuses_injected_plaintext(before, injected):
    """State negotiated in plaintext is gone after TLS (nbdkit's CVE-2021-3716), and bytes
    that follow STARTTLS in the same segment are never taken as TLS-protected options."""
    hs = ServerHandshake(max_option_length=MAX_OPTION)
    try:
        drive_events(hs, client_flags() + option(Option.STRUCTURED_REPLY) + b"".join(before))
    except ProtocolError:
        return
    if hs.state is not State.OPTIONS or len(hs._buffer) or hs._drain:
        return  # the fuzzed prefix ended the handshake or left a partial option
    hs.receive_data(option(Option.STARTTLS) + injected)
    assert isinstance(hs.next_event(), StartTLSRequest)
    try:
        hs.send_ack()
    except ProtocolError:
        pass
    else:
        raise AssertionError("plaintext after STARTTLS was accepted")
    clean = ServerHandshake()
    drive_events(clean, client_flags() + option(Option.STRUCTURED_REPLY) + b"".join(before))
    clean.receive_data(option(Option.STARTTLS))
    clean.next_event()
    clean.send_ack()
    clean.tls_established()
    assert not clean.structured_replies and clean.meta_contexts == {}
    assert clean.selected_contexts("") == {} and clean.meta_contexts_export is None


def drive_events(hs: ServerHandshake, data: bytes) -> None:
    hs.receive_data(data)
    while hs.state in (State.AWAIT_CLIENT_FLAGS, State.OPTIONS):
        event = hs.next_event()
        if event is NEED_DATA:
            return
        answer(hs, event)


def drive_transmission(chunks: list[bytes]) -> tuple[list, bool]:
    parser = TransmissionParser(max_payload=MAX_PAYLOAD)
    requests = []
    try:
        for chunk in chunks:
            parser.receive_data(chunk)
            while (request := parser.next_event()) is not NEED_DATA:
                assert isinstance(request, Request)
                if request.command == Command.WRITE and request.length > MAX_PAYLOAD:
                    assert request.payload_dropped
                elif request.command == Command.WRITE:
                    assert len(request.data) == request.length
                else:
                    assert request.data is None
                requests.append(request)
            # Waiting: at most a header, or one payload within the limit, is held.
            assert len(parser._buffer) < REQUEST_HEADER or parser._payload is not None
            # A payload holds at most a first megabyte more than what has arrived.
            payload = parser._payload
            assert payload is None or len(payload.data) <= max(payload.PREALLOCATE, payload.filled)
    except ProtocolError:
        return requests, True
    return requests, False


@FUZZ
@given(transmission_input, st.lists(st.integers(0, 10_000), max_size=6))
def test_transmission_any_bytes_any_split(data, cuts):
    assert_split_makes_no_difference(drive_transmission, data, cuts)


def test_floods_stay_bounded():
    """Megabytes of options, of an oversized option and of requests, in 256 KiB reads: the
    buffers never hold much more than one read."""
    read = 256 * 1024
    hs = ServerHandshake(max_option_length=MAX_OPTION)
    flood = client_flags() + option(Option.LIST) * 50_000
    for start in range(0, len(flood), read):
        drive_events(hs, flood[start : start + read])
        assert len(hs._buffer._data) <= 2 * read + 65536
    hs = ServerHandshake(max_option_length=MAX_OPTION)
    drive_events(hs, client_flags() + option(Option.INFO, length=2**32 - 1))
    for _ in range(8):
        drive_events(hs, bytes(read))
        assert len(hs._buffer._data) == 0
    parser = TransmissionParser(max_payload=MAX_PAYLOAD)
    flood = struct.pack(">IHHQQI", REQUEST_MAGIC, 0, Command.FLUSH, 1, 0, 0) * 50_000
    for start in range(0, len(flood), read):
        parser.receive_data(flood[start : start + read])
        while parser.next_event() is not NEED_DATA:
            pass
        assert len(parser._buffer._data) <= 2 * read + 65536
