"""The remote image: a pooled `requests` session that probes it and reads byte ranges.

Everything here blocks: it runs in worker threads and in fetcher processes (see `fetchers`).
One HTTP request may carry several ranges (multipart/byteranges) when the server supports that,
so a burst of small random reads costs one round trip instead of one each: Python spends far
more CPU per request than per byte.

Range reads skip the session's per-request work (hooks, cookie extraction, redirect handling, a
Response object): they go straight to the connection pool of the session's adapter, with the
headers the session prepared once. That halves their CPU. A redirect reply, and any read through
a proxy, takes the whole session path, which knows the rules for both.
"""

import errno
import http.client
import logging
import random
import ssl
import time
from collections.abc import Callable
from contextlib import closing

import requests
import urllib3
from requests.adapters import HTTPAdapter
from requests.utils import select_proxy

from nbdserve import __version__
from nbdserve.backend import BackendError

from .config import HttpConfig
from .ranges import (
    RangeReplyError,
    multipart_boundary,
    parse_content_range,
    pick_ranges,
    range_header,
    split_multipart,
    unsatisfied_range_size,
)
from .replyheaders import install_header_parsing

log = logging.getLogger(__name__)
install_header_parsing()
# urllib3 logs every request line at debug level, query string (a signature, maybe) included.
logging.getLogger("urllib3").setLevel(logging.WARNING)

# Statuses worth another try: the server or a proxy is overloaded or restarting.
_RETRY_STATUSES = {408, 429, 500, 502, 503, 504}
_BACKOFF_FIRST = 0.1  # seconds before the first retry; doubles with every further one
_BACKOFF_MAX = 5.0
MAX_RANGES = 32  # ranges per request when the server sends multipart/byteranges


class RemoteError(BackendError):
    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message)


class ImageChanged(RemoteError):
    """The object behind the URL is not the one opened: serving it would mix two images."""


class _Transient(Exception):
    """A failure that another attempt may not meet (5xx, timeouts, broken connections)."""


class RemoteImage:
    def __init__(self, config: HttpConfig) -> None:
        self.config = config
        self.name = config.display_url
        self.size = 0
        self.max_ranges = 1
        self.changed: str | None = None  # why reads now fail, once the image changed
        self._etag: str | None = None
        self._last_modified: str | None = None
        self._timeouts = (config.connect_timeout, config.read_timeout)
        self._session = _session(config)
        # Preparing a request costs more CPU than sending it: prepare once, copy per read.
        self._template = self._session.prepare_request(requests.Request("GET", config.url))
        self._pool = self._direct_pool()
        self._pool_timeout = urllib3.Timeout(connect=config.connect_timeout, read=config.read_timeout)

    def _direct_pool(self) -> urllib3.HTTPConnectionPool | None:
        """The pool range reads use directly, set up as the session's adapter would; None when
        a proxy applies."""
        if select_proxy(self.config.url, self._session.proxies):
            return None
        adapter = self._session.get_adapter(self.config.url)
        return adapter.get_connection_with_tls_context(self._template, self._session.verify)

    def close(self) -> None:
        self._session.close()

    # Opening.

    def probed(self) -> tuple:
        """What probe() learnt, for adopt() in another process reading the same image."""
        return self.size, self.max_ranges, self._etag, self._last_modified

    def adopt(self, probed: tuple) -> None:
        self.size, self.max_ranges, self._etag, self._last_modified = probed

    def probe(self) -> None:
        """Learn size and validators; refuse servers without byte ranges."""
        head = self._retrying("HEAD", self._head)
        size = _content_length(head) if head is not None else None
        if head is not None:
            self._remember_validators(head.headers)
        if size != 0:
            size = self._retrying("range probe", lambda: self._probe_range(size))
        self.size = size
        if size >= 3:
            self.max_ranges = MAX_RANGES if self._serves_multiple_ranges() else 1
        log.info(
            "http source %s: %d bytes, ETag %s, Last-Modified %s, %s",
            self.name, size, self._etag or "none", self._last_modified or "none",
            "several ranges per request" if self.max_ranges > 1 else "one range per request",
        )

    def _head(self) -> requests.Response | None:
        response = self._session.head(self.config.url, timeout=self._timeouts, allow_redirects=True)
        response.close()
        if response.status_code in _RETRY_STATUSES:
            raise _Transient(_status_text(response.raw))
        # Presigned object-store URLs refuse HEAD (the method is signed): fall back to GET.
        return response if response.ok else None

    def _probe_range(self, size: int | None) -> int:
        response = self._send(range_header([(0, 1)]))
        with closing(response):
            status = response.status
            if status == 200:
                raise RemoteError(
                    f"{self.name}: the server ignores byte ranges (it answered a Range request "
                    "with 200 OK); nbdserve needs a server that supports them"
                )
            if status == 416 and unsatisfied_range_size(response.headers.get("Content-Range")) == 0:
                return 0
            self._check_status(response)
            _, _, total = _parse(parse_content_range, response.headers.get("Content-Range"))
            if total is None and size is None:
                raise RemoteError(f"{self.name}: the server does not say how large the image is")
            if self._etag is None and self._last_modified is None:
                self._remember_validators(response.headers)
            response.read()
            return total if total is not None else size

    def _serves_multiple_ranges(self) -> bool:
        try:
            self._fetch_once([(0, 1), (2, 1)])
        except (RemoteError, _Transient) as exc:
            log.info("http source %s: no multipart range replies (%s)", self.name, exc)
            return False
        return True

    # Reading.

    def fetch(self, ranges: list[tuple[int, int]]) -> list[memoryview]:
        """The bytes of each (offset, length) range, in one request, retried with backoff."""
        return self._retrying("read", lambda: self._fetch_once(ranges))

    def _fetch_once(self, ranges: list[tuple[int, int]]) -> list[memoryview]:
        response = self._send(range_header(ranges))
        with closing(response):
            self._check_status(response)
            self._check_validators(response.headers)
            if response.headers.get("Content-Encoding", "identity").lower() != "identity":
                raise RemoteError(f"{self.name}: the server compressed a range reply, which cannot be read")
            body = response.read()
            headers = response.headers
            boundary = _parse(multipart_boundary, headers.get("Content-Type"))
            if boundary is not None:
                parts = _parse(split_multipart, body, boundary)
            else:
                offset, length, total = _parse(parse_content_range, headers.get("Content-Range"))
                if length != len(body):
                    raise _Transient(f"reply holds {len(body)} bytes, its Content-Range says {length}")
                parts = [(offset, memoryview(body), total)]
            for _, _, total in parts:
                if total is not None and total != self.size:
                    self._image_changed(f"its size changed from {self.size} to {total} bytes")
            return _parse(pick_ranges, [(offset, data) for offset, data, _ in parts], ranges)

    def _send(self, range_value: str) -> urllib3.HTTPResponse:
        """GET with this Range header: the reply with its body not yet read."""
        if self._pool is not None:
            headers = self._template.headers.copy()
            headers["Range"] = range_value
            response = self._pool.urlopen(
                "GET", self._template.path_url, headers=headers, timeout=self._pool_timeout,
                retries=False, redirect=False, preload_content=False, decode_content=False,
            )
            if not response.get_redirect_location():
                return response
            response.drain_conn()
            response.release_conn()
        request = self._template.copy()
        request.headers["Range"] = range_value
        return self._session.send(request, stream=True, timeout=self._timeouts).raw

    def _check_status(self, response: urllib3.HTTPResponse) -> None:
        status = response.status
        if status == 206:
            return
        if status in _RETRY_STATUSES:
            raise _Transient(_status_text(response))
        if status == 200:
            raise RemoteError(f"{self.name}: the server ignored the Range header (200 OK): not served as data")
        if status == 416:
            raise RemoteError(f"{self.name}: range not satisfiable (416): is the image smaller now?")
        raise RemoteError(f"{self.name}: {_status_text(response)}")

    # Consistency.

    def _remember_validators(self, headers) -> None:
        self._etag = headers.get("ETag")
        self._last_modified = headers.get("Last-Modified")

    def _check_validators(self, headers) -> None:
        for name, expected in (("ETag", self._etag), ("Last-Modified", self._last_modified)):
            value = headers.get(name)
            if expected and value and value != expected:
                self._image_changed(f"{name} changed from {expected} to {value}")

    def _image_changed(self, why: str) -> None:
        if self.changed is None:
            self.changed = f"{self.name}: the remote image changed ({why}): reads fail from now on"
            log.error("http source %s", self.changed)
        raise ImageChanged(self.changed)

    # Retries.

    def _retrying(self, what: str, attempt: Callable):
        attempts = self.config.retries + 1
        for number in range(1, attempts + 1):
            try:
                return attempt()
            except RemoteError:
                raise
            except (_Transient, requests.RequestException, urllib3.exceptions.HTTPError,
                    http.client.HTTPException, OSError) as exc:
                reason = describe(exc)
                if _is_permanent(exc) or number == attempts:
                    raise RemoteError(f"{self.name}: {what} failed after {number} attempts: {reason}") from exc
                delay = min(_BACKOFF_FIRST * 2 ** (number - 1), _BACKOFF_MAX) * random.uniform(0.5, 1.0)
                log.warning("http source %s: %s failed (%s); retry %d of %d in %.2f s",
                            self.name, what, reason, number, attempts - 1, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")


def _session(config: HttpConfig) -> requests.Session:
    session = requests.Session()
    # Ranges count bytes of the identity encoding; a compressed reply would not match them.
    session.headers.update({"Accept-Encoding": "identity", "User-Agent": f"nbdserve/{__version__}"})
    session.headers.update(config.headers)
    session.cookies.update(config.cookies)
    if config.user is not None:
        session.auth = (config.user, config.password)
    elif config.token is not None:
        session.headers["Authorization"] = f"Bearer {config.token}"  # dropped on cross-host redirects
    # Read proxy and CA settings from the environment once, not on every request.
    environment = session.merge_environment_settings(config.url, {}, None, None, None)
    session.trust_env = False
    if config.proxy:
        session.proxies = {"http": config.proxy, "https": config.proxy}
    else:
        session.proxies = environment["proxies"]
    if config.ca_bundle is not None:
        session.verify = str(config.ca_bundle)
    elif not config.verify:
        session.verify = False
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)  # logged once at open
    else:
        session.verify = environment["verify"]
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=config.pool_size, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _content_length(response: requests.Response) -> int | None:
    value = response.headers.get("Content-Length", "")
    if not value.isdigit() or response.headers.get("Content-Encoding", "identity").lower() != "identity":
        return None
    return int(value)


def _parse(function, *args):
    """Run a reply parser; a malformed reply is worth another attempt."""
    try:
        return function(*args)
    except RangeReplyError as exc:
        raise _Transient(str(exc)) from exc


def _status_text(response: urllib3.HTTPResponse) -> str:
    return f"HTTP {response.status} {response.reason or ''}".rstrip()


def _causes(exc: BaseException):
    """The exception and everything it wraps (requests and urllib3 nest them deeply)."""
    seen = set()
    pending = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        wrapped = [current.__cause__, current.__context__, getattr(current, "reason", None), *current.args]
        pending.extend(item for item in wrapped if isinstance(item, BaseException))


def _is_permanent(exc: BaseException) -> bool:
    """A TLS certificate that fails verification will fail again: do not retry."""
    return any(isinstance(cause, ssl.SSLCertVerificationError) for cause in _causes(exc))


def describe(exc: BaseException) -> str:
    """A short reason for logs and clients, free of URLs (queries may hold signatures)."""
    if isinstance(exc, _Transient):
        return str(exc)
    causes = list(_causes(exc))
    for cause in causes:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"TLS certificate verification failed: {cause.verify_message}"
        if isinstance(cause, ssl.SSLError):
            return f"TLS error: {cause.reason or cause}"
    for cause in causes:
        if isinstance(cause, http.client.IncompleteRead):
            return "the connection broke in the middle of the reply"
        if isinstance(cause, http.client.RemoteDisconnected):
            return "the server closed the connection without a reply"
    for cause in causes:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror  # "Connection refused", "Name or service not known", ...
    # urllib3 counts failed connections as connect timeouts, so those were ruled out first.
    if any(isinstance(cause, (requests.exceptions.ConnectTimeout, urllib3.exceptions.ConnectTimeoutError))
           for cause in causes):
        return "connect timed out"
    if any(isinstance(cause, (TimeoutError, urllib3.exceptions.TimeoutError, requests.Timeout))
           for cause in causes):
        return "read timed out"
    return type(exc).__name__
