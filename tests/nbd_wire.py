"""The client side of the NBD wire, built by hand for tests that feed exact bytes.

Packing helpers for options and requests, the three ways a table's input is fed to a parser, and
`RawClient`: a tiny blocking client on a plain socket for malformed traffic that no real client
would send.
"""

import socket
import struct

from nbdserve.protocol.constants import (
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ClientFlag,
    Option,
)

CLIENT_FLAGS = ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES


def client_flags(flags: int = CLIENT_FLAGS) -> bytes:
    return struct.pack(">I", flags)


def option(number: int, payload: bytes = b"", *, length: int | None = None) -> bytes:
    """An option header and payload; `length` claims a different payload length."""
    claimed = len(payload) if length is None else length
    return struct.pack(">QII", IHAVEOPT, number, claimed) + payload


def info_payload(name: str, requests: tuple[int, ...] = ()) -> bytes:
    encoded = name.encode()
    return (
        struct.pack(">I", len(encoded)) + encoded
        + struct.pack(f">H{len(requests)}H", len(requests), *requests)
    )


def meta_context_payload(name: str, queries: tuple[str, ...]) -> bytes:
    encoded = name.encode()
    payload = struct.pack(">I", len(encoded)) + encoded + struct.pack(">I", len(queries))
    for query in queries:
        payload += struct.pack(">I", len(query)) + query.encode()
    return payload


def go(name: str = "", requests: tuple[int, ...] = ()) -> bytes:
    return option(Option.GO, info_payload(name, requests))


def request(command: int, offset: int = 0, length: int = 0, *, flags: int = 0, cookie: int = 1,
            data: bytes = b"", magic: int = REQUEST_MAGIC) -> bytes:
    return struct.pack(">IHHQQI", magic, flags, command, cookie, offset, length) + data


def feeds(data: bytes, trailing: bytes) -> dict[str, list[bytes]]:
    """The same input as chunks: whole, one byte at a time, and whole with trailing bytes."""
    return {
        "whole": [data],
        "bytewise": [data[i : i + 1] for i in range(len(data))],
        "trailing": [data + trailing],
    }


class RawClient:
    """A blocking NBD client over a plain socket that sends exactly what a test tells it to."""

    def __init__(self, port: int, timeout: float = 10.0, *, source: str | None = None) -> None:
        """`source`: the local address to connect from (any of 127.0.0.0/8 on loopback)."""
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout, source_address=(source, 0) if source else None
        )

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "RawClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def receive_exact(self, count: int) -> bytes:
        chunks = []
        while count:
            chunk = self.sock.recv(min(count, 1 << 20))
            if not chunk:
                raise EOFError("the server closed the connection")
            chunks.append(chunk)
            count -= len(chunk)
        return b"".join(chunks)

    def is_closed_by_server(self) -> bool:
        """True once the server hung up (EOF or reset) without sending anything more."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def greeting(self) -> int:
        """Read the newstyle greeting; return the handshake flags."""
        magic, ihaveopt, flags = struct.unpack(">QQH", self.receive_exact(18))
        assert (magic, ihaveopt) == (NBDMAGIC, IHAVEOPT)
        return flags

    def start(self, flags: int = CLIENT_FLAGS) -> None:
        self.greeting()
        self.send(client_flags(flags))

    def option_reply(self) -> tuple[int, int, bytes]:
        """One option reply: (option, reply type, payload)."""
        magic, number, reply, length = struct.unpack(">QIII", self.receive_exact(20))
        assert magic == OPTION_REPLY_MAGIC
        return number, reply, self.receive_exact(length)

    def option_replies(self) -> list[tuple[int, int, bytes]]:
        """Replies to one option, up to and including its final one (ACK or an error)."""
        replies = []
        while True:
            replies.append(self.option_reply())
            reply = replies[-1][1]
            if reply == 1 or reply & (1 << 31):  # NBD_REP_ACK or NBD_REP_ERR_*
                return replies

    def go(self, name: str = "") -> int:
        """Negotiate to transmission (simple replies) with NBD_OPT_GO; return the transmission flags."""
        self.send(go(name))
        replies = self.option_replies()
        assert replies[-1][1] == 1, replies
        export_info = next(payload for _, reply, payload in replies if payload[:2] == b"\0\0")
        _, _, flags = struct.unpack(">HQH", export_info)
        return flags

    def simple_reply(self) -> tuple[int, int]:
        """(error, cookie) of a simple reply."""
        magic, error, cookie = struct.unpack(">IIQ", self.receive_exact(16))
        assert magic == SIMPLE_REPLY_MAGIC, hex(magic)
        return error, cookie

    def structured_chunk(self) -> tuple[int, int, int, bytes]:
        """(flags, type, cookie, payload) of one structured reply chunk."""
        magic, flags, kind, cookie, length = struct.unpack(">IHHQI", self.receive_exact(20))
        assert magic == STRUCTURED_REPLY_MAGIC, hex(magic)
        return flags, kind, cookie, self.receive_exact(length)
