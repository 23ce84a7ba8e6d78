"""A cheaper parse of HTTP reply headers for http.client (under requests and urllib3).

http.client hands each reply's header block to the email package's full MIME parser. For a
multipart/byteranges reply (batched range reads) that parser also prepares to split a body it is
never given: it compiles a regex for the part boundary, which nginx makes anew for every reply.
That was a fifth of the CPU of random reads. Parsing the same block as headers only yields the
same headers without it.
"""

import email.parser
import http.client
import logging

log = logging.getLogger(__name__)


def _parse_headers(fp, _class=http.client.HTTPMessage):
    lines = http.client._read_headers(fp)
    return email.parser.Parser(_class=_class).parsestr(b"".join(lines).decode("iso-8859-1"),
                                                        headersonly=True)


def install_header_parsing() -> None:
    """Make http.client parse reply headers as headers only, for the whole process."""
    if not hasattr(http.client, "_read_headers"):
        log.info("http.client has no _read_headers here: reply headers are parsed as it does")
        return
    http.client.parse_headers = _parse_headers
