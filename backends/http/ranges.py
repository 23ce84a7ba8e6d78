"""HTTP byte ranges (RFC 9110 section 14): Range headers out, Content-Range and multipart/byteranges in.

Pure functions over bytes and strings, so every odd server reply can be tested without a server.
Ranges are (offset, length) in bytes, as everywhere else in nbdserve.
"""

import re

_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
_UNSATISFIED_RANGE = re.compile(r"^\s*bytes\s+\*/(\d+)\s*$", re.IGNORECASE)
_BOUNDARY = re.compile(r'boundary=(?:"([^"]+)"|([^\s;]+))', re.IGNORECASE)


class RangeReplyError(ValueError):
    """The server's reply does not hold the bytes that were asked for."""


def range_header(ranges: list[tuple[int, int]]) -> str:
    return "bytes=" + ",".join(f"{offset}-{offset + length - 1}" for offset, length in ranges)


def parse_content_range(value: str | None) -> tuple[int, int, int | None]:
    """`bytes 0-499/1234` -> (0, 500, 1234): offset, length and total size (None for `*`)."""
    match = _CONTENT_RANGE.match(value or "")
    if not match:
        raise RangeReplyError(f"bad Content-Range {value!r}")
    first, last, total = int(match.group(1)), int(match.group(2)), match.group(3)
    if last < first:
        raise RangeReplyError(f"bad Content-Range {value!r}")
    return first, last - first + 1, None if total == "*" else int(total)


def unsatisfied_range_size(value: str | None) -> int | None:
    """The size a 416 reply states (`bytes */1234`), if it states one."""
    match = _UNSATISFIED_RANGE.match(value or "")
    return int(match.group(1)) if match else None


def multipart_boundary(content_type: str | None) -> bytes | None:
    """The boundary of a multipart/byteranges Content-Type, or None for a single-part reply."""
    if not content_type or not content_type.lower().lstrip().startswith("multipart/byteranges"):
        return None
    match = _BOUNDARY.search(content_type)
    if not match:
        raise RangeReplyError(f"multipart reply without a boundary: {content_type!r}")
    return (match.group(1) or match.group(2)).encode("latin-1")


def split_multipart(body: bytes, boundary: bytes) -> list[tuple[int, memoryview, int | None]]:
    """The parts of a multipart/byteranges body: (offset, data, total size) each.

    Each part's length comes from its Content-Range, so image bytes that happen to contain the
    boundary cannot confuse the parser.
    """
    delimiter = b"--" + boundary
    view = memoryview(body)
    parts = []
    position = body.find(delimiter)
    if position < 0:
        raise RangeReplyError("multipart reply without any part")
    while True:
        position += len(delimiter)
        if body.startswith(b"--", position):
            return parts  # the closing delimiter
        headers_end = body.find(b"\r\n\r\n", position)
        if headers_end < 0:
            raise RangeReplyError("multipart part headers are cut short")
        content_range = _part_content_range(body[position:headers_end])
        offset, length, total = parse_content_range(content_range)
        start = headers_end + 4
        if start + length > len(body):
            raise RangeReplyError(f"multipart part at {offset} is cut short")
        parts.append((offset, view[start : start + length], total))
        position = body.find(delimiter, start + length)
        if position < 0:
            raise RangeReplyError("multipart reply without a closing delimiter")


def _part_content_range(headers: bytes) -> str | None:
    for line in headers.decode("latin-1").split("\r\n"):
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-range":
            return value.strip()
    return None


def pick_ranges(
    parts: list[tuple[int, memoryview]], wanted: list[tuple[int, int]]
) -> list[memoryview]:
    """The bytes of each wanted range, cut from the parts that cover it.

    Servers may merge adjacent or overlapping ranges into one part (RFC 9110 allows it) and send
    parts in any order, so each range is looked up rather than matched by position.
    """
    result = []
    for offset, length in wanted:
        for start, data in parts:
            if start <= offset and offset + length <= start + len(data):
                result.append(data[offset - start : offset - start + length])
                break
        else:
            raise RangeReplyError(f"the reply lacks bytes {offset}-{offset + length - 1}")
    return result
