"""A cheaper parse of HTTP reply headers for http.client (under requests and urllib3).

http.client hands each reply's header block to the email package's feed parser, which costs
more than the rest of a small range request; for a multipart/byteranges reply it even compiles a
regex for the part boundary, which nginx makes anew for every reply. Reply headers need none of
that: each line is a name, a colon and a value, maybe folded onto further lines. This parse
gives the same HTTPMessage, built the way the feed parser builds it.
"""

import http.client
import logging

log = logging.getLogger(__name__)


def _parse_headers(fp, _class=http.client.HTTPMessage):
    message = _class()
    header: list[str] = []  # one header's lines: the first, then folded ones
    for line in http.client._read_headers(fp):
        line = line.decode("iso-8859-1")
        if header and line[:1] in (" ", "\t"):
            header.append(line)
            continue
        if header:
            message.set_raw(*message.policy.header_source_parse(header))
        header = [line] if ":" in line else []  # no colon: not a header, dropped
    if header:
        message.set_raw(*message.policy.header_source_parse(header))
    return message


def install_header_parsing() -> None:
    """Make http.client parse reply headers this way, for the whole process."""
    if not hasattr(http.client, "_read_headers"):
        log.info("http.client has no _read_headers here: reply headers are parsed as it does")
        return
    http.client.parse_headers = _parse_headers
