"""The http source: a read-only image behind an http:// or https:// URL.

Modules: config (settings), ranges (Range/Content-Range/multipart parsing), replyheaders (a
cheaper header parse for http.client), remote (the requests session: probing, range reads,
retries), fetchers (where fetches run: fetcher processes or worker threads), fetcher (the
fetcher process's program) and channel (the frames between it and the server), cache (block
cache), readahead (sequential detection), loader (shared fetches and batching), backend (the
backend contract), driver (the entry point).
"""

from .driver import HttpDriver

__all__ = ["HttpDriver"]
