"""Parsing what servers send back for Range requests: Content-Range and multipart/byteranges."""

import email.parser
import http.client
import io

import pytest

from backends.http.ranges import (
    RangeReplyError,
    multipart_boundary,
    parse_content_range,
    pick_ranges,
    range_header,
    split_multipart,
    unsatisfied_range_size,
)
from backends.http.replyheaders import install_header_parsing


def test_range_header():
    assert range_header([(0, 1)]) == "bytes=0-0"
    assert range_header([(10, 5), (100, 1)]) == "bytes=10-14,100-100"


@pytest.mark.parametrize("value, expected", [
    ("bytes 0-499/1234", (0, 500, 1234)),
    ("bytes 5-5/*", (5, 1, None)),
    ("BYTES  7-9/10 ", (7, 3, 10)),
])
def test_content_range(value, expected):
    assert parse_content_range(value) == expected


@pytest.mark.parametrize("value", [None, "", "bytes 9-5/10", "items 0-1/2", "bytes */10", "bytes 0-1"])
def test_bad_content_range(value):
    with pytest.raises(RangeReplyError):
        parse_content_range(value)


def test_unsatisfied_range_size():
    assert unsatisfied_range_size("bytes */0") == 0
    assert unsatisfied_range_size("bytes 0-1/2") is None


def test_boundary():
    assert multipart_boundary("multipart/byteranges; boundary=00000000001") == b"00000000001"
    assert multipart_boundary('multipart/byteranges; boundary="a b"') == b"a b"
    assert multipart_boundary("application/octet-stream") is None
    with pytest.raises(RangeReplyError):
        multipart_boundary("multipart/byteranges")


def multipart(boundary: bytes, parts) -> bytes:
    body = b""
    for first, data, total in parts:
        body += (b"\r\n--" + boundary + b"\r\nContent-Type: application/octet-stream\r\n"
                 + f"Content-Range: bytes {first}-{first + len(data) - 1}/{total}\r\n\r\n".encode() + data)
    return body + b"\r\n--" + boundary + b"--\r\n"


def test_multipart_parts_whose_data_holds_the_boundary():
    boundary = b"XYZ"
    tricky = b"\r\n--XYZ\r\nContent-Range: bytes 0-0/9\r\n\r\n!"  # image bytes that look like a part
    body = multipart(boundary, [(100, tricky, 1000), (5, b"hello", 1000)])
    parts = split_multipart(body, boundary)
    assert [(first, bytes(data), total) for first, data, total in parts] == [
        (100, tricky, 1000), (5, b"hello", 1000),
    ]
    # Parts come in any order, and a part may cover several ranges asked for.
    picked = pick_ranges([(first, data) for first, data, _ in parts], [(6, 3), (100, 2)])
    assert [bytes(data) for data in picked] == [b"ell", tricky[:2]]


def test_truncated_multipart_and_missing_ranges():
    body = multipart(b"B", [(0, b"abcdef", 10)])
    with pytest.raises(RangeReplyError, match="cut short"):
        split_multipart(body[:-20], b"B")
    with pytest.raises(RangeReplyError, match="closing delimiter"):
        split_multipart(body[: body.rindex(b"--B--")], b"B")
    with pytest.raises(RangeReplyError, match="lacks bytes 4-7"):
        pick_ranges([(0, memoryview(b"abcdef"))], [(4, 4)])


def test_reply_headers_parse_as_http_client_would():
    """The headers-only parse that the http source installs gives http.client's headers."""
    install_header_parsing()
    block = (b"HTTP/1.1 206 Partial Content\r\nServer: nginx\r\n"
             b"Content-Type: multipart/byteranges; boundary=00000000000000000001\r\n"
             b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\nX-Folded: one\r\n two\r\n\r\n")
    fp = io.BytesIO(block)
    fp.readline()  # the status line, as HTTPResponse.begin reads it first
    parsed = http.client.parse_headers(fp)
    assert http.client.parse_headers.__module__ == "backends.http.replyheaders"
    stock = email.parser.Parser(_class=http.client.HTTPMessage).parsestr(
        block.split(b"\r\n", 1)[1].decode("iso-8859-1"))
    assert parsed.items() == stock.items()
    assert parsed.get_all("Set-Cookie") == ["a=1", "b=2"]
    assert parsed.get_boundary() == "00000000000000000001"
