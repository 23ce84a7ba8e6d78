"""The sans-IO handshake: tables of client bytes -> events and replies, fed whole, one byte at a
time, and followed by the start of the next message."""

import struct
import tracemalloc

import pytest

from nbd_wire import client_flags, feeds, go, info_payload, meta_context_payload, option
from nbdserve.protocol import NEED_DATA, ProtocolError
from nbdserve.protocol.constants import (
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    ClientFlag,
    HandshakeFlag,
    Info,
    Option,
    Reply,
)
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

FIXED = ClientFlag.C_FIXED_NEWSTYLE
FIXED_NO_ZEROES = ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES
EXPORT_SIZE = 1 << 30
EXPORT_FLAGS = 0x1 | 0x4
# The start of another option: must not produce an event or disturb the ones before it.
PARTIAL_OPTION = struct.pack(">Q", IHAVEOPT)[:5]


class _AnyText:
    def __eq__(self, other) -> bool:
        return isinstance(other, str)


ANY_TEXT = _AnyText()


def answer(handshake: ServerHandshake, event) -> bytes:
    """A server that says yes to everything it understands."""
    match event:
        case ExportNameRequest():
            return handshake.send_export_name_reply(EXPORT_SIZE, EXPORT_FLAGS)
        case UnsupportedOption():
            return handshake.send_error(Reply.ERR_UNSUP, "unsupported")
        case InvalidOption():
            return handshake.send_error(Reply.ERR_INVALID, event.message)
        case OversizedOption():
            return handshake.send_error(Reply.ERR_TOO_BIG, "too big")
        case MetaContextRequest():
            return handshake.send_meta_context(7, "base:allocation") + handshake.send_ack()
    return handshake.send_ack()


def negotiate(chunks: list[bytes], **kwargs) -> tuple[list, bytes, ServerHandshake]:
    """Feed `chunks` one by one, answering every event: (events, reply bytes, handshake)."""
    handshake = ServerHandshake(**kwargs)
    events, replies = [], b""
    for chunk in chunks:
        handshake.receive_data(chunk)
        while (event := handshake.next_event()) is not NEED_DATA:
            events.append(event)
            replies += answer(handshake, event)
    return events, replies, handshake


def option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """Parse option replies: [(option, reply type, payload)]."""
    replies = []
    while data:
        magic, number, reply, length = struct.unpack_from(">QIII", data)
        assert magic == OPTION_REPLY_MAGIC
        replies.append((number, reply, data[20 : 20 + length]))
        data = data[20 + length :]
    return replies


def ack(number: int) -> tuple[int, int, bytes]:
    return (number, Reply.ACK, b"")


# (name, client bytes after the flags, expected events, expected final state)
TABLE = [
    (
        "go",
        go("disk", (Info.NAME, Info.BLOCK_SIZE)),
        [InfoRequest("disk", (Info.NAME, Info.BLOCK_SIZE), go=True)],
        State.TRANSMISSION,
    ),
    ("info then go to the default export", option(Option.INFO, info_payload("")) + go(),
     [InfoRequest("", (), go=False), InfoRequest("", (), go=True)], State.TRANSMISSION),
    ("export name", option(Option.EXPORT_NAME, b"vm1"), [ExportNameRequest("vm1")], State.TRANSMISSION),
    ("list", option(Option.LIST), [ListRequest()], State.OPTIONS),
    ("abort ignores its data", option(Option.ABORT, b"bye"), [AbortRequest()], State.CLOSED),
    (
        "structured replies and meta contexts",
        option(Option.STRUCTURED_REPLY)
        + option(Option.LIST_META_CONTEXT, meta_context_payload("disk", ("base:",)))
        + option(Option.SET_META_CONTEXT, meta_context_payload("disk", ("base:allocation",)))
        + go("disk"),
        [
            StructuredReplyRequest(),
            MetaContextRequest("disk", ("base:",), select=False),
            MetaContextRequest("disk", ("base:allocation",), select=True),
            InfoRequest("disk", (), go=True),
        ],
        State.TRANSMISSION,
    ),
    (
        "unknown option: payload consumed, handshake goes on",
        option(99, b"some payload") + option(Option.LIST),
        [UnsupportedOption(99), ListRequest()],
        State.OPTIONS,
    ),
    (
        "malformed options are refused one by one",
        option(Option.LIST, b"x")
        + option(Option.STRUCTURED_REPLY, b"x")
        + option(Option.GO, struct.pack(">I", 10) + b"abc")  # name runs past the payload
        + option(Option.INFO, info_payload("d") + b"extra")
        + option(Option.GO, struct.pack(">I", 2) + b"\xff\xfe" + struct.pack(">H", 0))
        + option(Option.GO, struct.pack(">I", 5000) + b"n" * 5000 + struct.pack(">H", 0))
        + option(Option.SET_META_CONTEXT, meta_context_payload("d", ("a:b",))[:-1])
        + option(Option.EXPORT_NAME, b"\xff"),
        [
            InvalidOption(Option.LIST, ANY_TEXT),
            InvalidOption(Option.STRUCTURED_REPLY, ANY_TEXT),
            InvalidOption(Option.GO, ANY_TEXT),
            InvalidOption(Option.INFO, ANY_TEXT),
            InvalidOption(Option.GO, ANY_TEXT),
            InvalidOption(Option.GO, ANY_TEXT),
            InvalidOption(Option.SET_META_CONTEXT, ANY_TEXT),
            InvalidOption(Option.EXPORT_NAME, ANY_TEXT),
        ],
        State.OPTIONS,
    ),
]


@pytest.mark.parametrize("mode", ["whole", "bytewise", "trailing"])
@pytest.mark.parametrize(
    "data, expected_events, expected_state", [row[1:] for row in TABLE], ids=[row[0] for row in TABLE]
)
def test_handshake_table(data, expected_events, expected_state, mode):
    reference_events, reference_replies, _ = negotiate([client_flags(FIXED_NO_ZEROES) + data])
    events, replies, handshake = negotiate(feeds(client_flags(FIXED_NO_ZEROES) + data, PARTIAL_OPTION)[mode])
    assert events == expected_events
    assert handshake.state is expected_state
    assert replies == reference_replies
    if expected_state is State.TRANSMISSION:
        assert handshake.trailing_data == (PARTIAL_OPTION if mode == "trailing" else b"")


def test_greeting_offers_fixed_newstyle_and_no_zeroes():
    magic, ihaveopt, flags = struct.unpack(">QQH", ServerHandshake().greeting())
    assert (magic, ihaveopt) == (NBDMAGIC, IHAVEOPT)
    assert flags == HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES


def test_replies_carry_the_option_and_the_answer():
    data = client_flags(FIXED) + option(99, b"xyz") + option(Option.STRUCTURED_REPLY) + option(Option.LIST)
    _, replies, _ = negotiate([data])
    assert option_replies(replies) == [
        (99, Reply.ERR_UNSUP, b"unsupported"),
        ack(Option.STRUCTURED_REPLY),
        ack(Option.LIST),
    ]


def test_transmission_start_is_kept_as_trailing_data():
    first_request = b"\x25\x60\x95\x13" + bytes(24)
    _, _, handshake = negotiate([client_flags(FIXED) + go("disk") + first_request])
    assert handshake.state is State.TRANSMISSION
    assert handshake.trailing_data == first_request


@pytest.mark.parametrize(
    "flags, reply_length", [(FIXED, 8 + 2 + 124), (FIXED_NO_ZEROES, 8 + 2)], ids=["zeroes", "no-zeroes"]
)
def test_export_name_reply_honours_no_zeroes(flags, reply_length):
    _, replies, handshake = negotiate([client_flags(flags) + option(Option.EXPORT_NAME, b"vm1")])
    assert len(replies) == reply_length
    assert struct.unpack_from(">QH", replies) == (EXPORT_SIZE, EXPORT_FLAGS)
    assert replies[10:] == bytes(reply_length - 10)
    assert handshake.no_zeroes == bool(flags & ClientFlag.C_NO_ZEROES)


@pytest.mark.parametrize(
    "data",
    [
        client_flags(FIXED | 0x4),
        client_flags(0x80000000),
        client_flags(FIXED) + struct.pack(">QII", NBDMAGIC, Option.LIST, 0),
        client_flags(FIXED) + option(Option.LIST) + bytes(16),
    ],
    ids=["unknown client flag", "high client flag", "bad option magic", "bad magic after a good option"],
)
@pytest.mark.parametrize("mode", ["whole", "bytewise"])
def test_bad_flags_and_bad_magic_are_protocol_errors(data, mode):
    with pytest.raises(ProtocolError):
        negotiate(feeds(data, b"")[mode])


@pytest.mark.parametrize("mode", ["whole", "bytewise"])
def test_oversized_option_is_refused_and_drained(mode):
    payload = b"p" * 5000
    data = client_flags(FIXED) + option(Option.INFO, payload) + option(Option.LIST)
    events, replies, handshake = negotiate(feeds(data, b"")[mode], max_option_length=4096)
    assert events == [OversizedOption(Option.INFO, 5000), ListRequest()]
    assert [reply[:2] for reply in option_replies(replies)] == [
        (Option.INFO, Reply.ERR_TOO_BIG), (Option.LIST, Reply.ACK)
    ]
    assert handshake.state is State.OPTIONS


def test_oversized_option_is_refused_before_its_payload_arrives_and_never_buffered():
    handshake = ServerHandshake()
    length = 256 * 1024 * 1024
    handshake.receive_data(client_flags(FIXED) + option(Option.GO, length=length))
    assert handshake.next_event() == OversizedOption(Option.GO, length)
    handshake.send_error(Reply.ERR_TOO_BIG)
    chunk = bytes(1 << 20)
    tracemalloc.start()
    try:
        for _ in range(length // len(chunk)):
            handshake.receive_data(chunk)
            assert handshake.next_event() is NEED_DATA
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * len(chunk)
    handshake.receive_data(option(Option.LIST))
    assert handshake.next_event() == ListRequest()


def test_starttls_forgets_what_was_negotiated_in_plaintext():
    data = (
        client_flags(FIXED)
        + option(Option.STRUCTURED_REPLY)
        + option(Option.SET_META_CONTEXT, meta_context_payload("disk", ("base:allocation",)))
        + option(Option.STARTTLS)
    )
    events, _, handshake = negotiate([data])
    assert events[-1] == StartTLSRequest()
    assert handshake.state is State.AWAIT_TLS
    assert handshake.structured_replies
    assert handshake.selected_contexts("disk") == {7: "base:allocation"}
    handshake.tls_established()
    assert handshake.state is State.OPTIONS
    assert handshake.tls_active
    assert not handshake.structured_replies
    assert handshake.selected_contexts("disk") == {}
    # The client flags are not sent again; a second STARTTLS is refused.
    handshake.receive_data(option(Option.STARTTLS))
    event = handshake.next_event()
    assert event == InvalidOption(Option.STARTTLS, ANY_TEXT)


def test_plaintext_after_starttls_is_a_protocol_error():
    handshake = ServerHandshake()
    handshake.receive_data(client_flags(FIXED) + option(Option.STARTTLS) + option(Option.LIST))
    assert handshake.next_event() == StartTLSRequest()
    with pytest.raises(ProtocolError):
        handshake.send_ack()


def test_set_meta_context_selection_is_tied_to_the_export_name():
    data = client_flags(FIXED) + option(
        Option.SET_META_CONTEXT, meta_context_payload("disk", ("base:allocation",))
    )
    _, _, handshake = negotiate([data])
    assert handshake.selected_contexts("disk") == {7: "base:allocation"}
    assert handshake.selected_contexts("other") == {}
    # A refused SET_META_CONTEXT clears the selection.
    handshake.receive_data(option(Option.SET_META_CONTEXT, meta_context_payload("disk", ("x:y",))))
    handshake.next_event()
    handshake.send_error(Reply.ERR_INVALID)
    assert handshake.selected_contexts("disk") == {}


def test_replying_without_a_pending_option_is_a_caller_bug():
    handshake = ServerHandshake()
    with pytest.raises(RuntimeError):
        handshake.send_ack()
