"""HTTP servers for the http backend's tests: a real nginx, and a small server that misbehaves.

`nginx` serves a directory over HTTP and HTTPS (certificates from trustme) with a private prefix
and config in a temporary directory, never the system's. `FaultyServer` serves one in-memory image
and injects the failures a test asks for: 5xx replies, slow replies, connections dropped in the
middle of a body, ignored Range headers, a changed ETag, a refused HEAD.
"""

import re
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import trustme
from conftest import free_port

NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
error_log stderr warn;
pid {prefix}/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 100000;
    client_body_temp_path {prefix}/tmp;
    proxy_temp_path {prefix}/tmp;
    fastcgi_temp_path {prefix}/tmp;
    uwsgi_temp_path {prefix}/tmp;
    scgi_temp_path {prefix}/tmp;
    server {{
        listen 127.0.0.1:{http_port};
        listen 127.0.0.1:{https_port} ssl;
        ssl_certificate {prefix}/server.pem;
        ssl_certificate_key {prefix}/server.key;
        root {root};
    }}
}}
"""


class Nginx:
    """nginx serving `root` on a free HTTP port and a free HTTPS port of 127.0.0.1."""

    def __init__(self, root: Path, prefix: Path) -> None:
        self.root = root
        self.http_port = free_port()
        self.https_port = free_port()
        (prefix / "tmp").mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(prefix / "ca.pem"))
        server_cert = ca.issue_cert("127.0.0.1", "localhost")
        server_cert.private_key_pem.write_to_path(str(prefix / "server.key"))
        server_cert.cert_chain_pems[0].write_to_path(str(prefix / "server.pem"))
        for pem in server_cert.cert_chain_pems[1:]:
            pem.write_to_path(str(prefix / "server.pem"), append=True)
        self.ca_path = prefix / "ca.pem"
        config = prefix / "nginx.conf"
        config.write_text(NGINX_CONF.format(
            prefix=prefix, root=root, http_port=self.http_port, https_port=self.https_port,
        ))
        self.log_path = prefix / "nginx.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                ["nginx", "-p", str(prefix), "-c", str(config), "-e", "stderr"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        _wait_listening(self.http_port, self.proc, self.log_path)

    def url(self, name: str, *, tls: bool = False) -> str:
        if tls:
            return f"https://127.0.0.1:{self.https_port}/{name}"
        return f"http://127.0.0.1:{self.http_port}/{name}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _wait_listening(port: int, proc: subprocess.Popen, log_path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"nginx exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.02)
    raise AssertionError(f"nginx did not listen within {timeout} s:\n{log_path.read_text()}")


@pytest.fixture(scope="module")
def nginx(tmp_path_factory):
    """A running Nginx serving the empty directory `nginx.root`; tests put images there."""
    base = tmp_path_factory.mktemp("nginx")
    (base / "www").mkdir()
    server = Nginx(base / "www", base / "prefix")
    yield server
    server.stop()


# The failure-injecting server.

_RANGE = re.compile(r"^bytes=(\d+)-(\d+)$")


@dataclass
class Faults:
    """What the server does wrong; tests change these while it runs."""

    fail_next: int = 0  # range GETs answered with `fail_status` before serving again
    fail_status: int = 503
    slow_next: int = 0  # range GETs answered only after `delay` seconds
    delay: float = 0.0
    drop_next: int = 0  # range GETs whose connection is cut halfway through the body
    ignore_range: bool = False  # answer every GET with 200 and the whole image
    multirange: str = "coalesce"  # several ranges: "coalesce" into one part, or "ignore" (200)
    refuse_head: bool = False
    etag: str = '"v1"'
    authorization: str | None = None  # the Authorization header required, if any


class FaultyServer:
    """Serves `image` at every path (and a 302 at /redirect) on a free port of 127.0.0.1."""

    def __init__(self, image: bytes) -> None:
        self.image = image
        self.faults = Faults()
        self.requests: list[tuple[str, str | None, dict]] = []  # (method, Range, headers)
        self.paths: list[str] = []  # as in the request line: absolute URLs when used as a proxy
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.owner = self
        self._httpd.handle_error = lambda request, address: None  # clients hang up on purpose
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def url(self, path: str = "image") -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def range_gets(self) -> list[str]:
        with self._lock:
            return [value for method, value, _ in self.requests if method == "GET" and value]

    def record(self, method: str, path: str, headers: dict) -> None:
        with self._lock:
            self.requests.append((method, headers.get("Range"), headers))
            self.paths.append(path)

    def take(self, name: str) -> bool:
        """Use up one of a counted fault."""
        with self._lock:
            count = getattr(self.faults, name)
            if count > 0:
                setattr(self.faults, name, count - 1)
            return count > 0

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers do

    def log_message(self, format, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        server: FaultyServer = self.server.owner
        faults = server.faults
        server.record(self.command, self.path, dict(self.headers))
        if self.path == "/redirect":
            return self._reply(302, {"Location": "/image"}, b"")
        if faults.authorization and self.headers.get("Authorization") != faults.authorization:
            return self._reply(401, {}, b"")
        if head and faults.refuse_head:
            return self._reply(405, {}, b"")
        wanted = self.headers.get("Range")
        if wanted and not head:
            if server.take("slow_next"):
                time.sleep(faults.delay)
            if server.take("fail_next"):
                return self._reply(faults.fail_status, {}, b"")
        image = server.image
        validators = {"ETag": faults.etag, "Last-Modified": "Tue, 01 Sep 2026 00:00:00 GMT"}
        ranges = _parse_ranges(wanted) if wanted else None
        if ranges is None or faults.ignore_range or (len(ranges) > 1 and faults.multirange == "ignore"):
            return self._reply(200, validators, b"" if head else image, length=len(image))
        if any(first >= len(image) for first, _ in ranges):
            return self._reply(416, {"Content-Range": f"bytes */{len(image)}"}, b"")
        # Several ranges become one part spanning them all, which RFC 9110 allows.
        first = min(first for first, _ in ranges)
        last = min(max(last for _, last in ranges), len(image) - 1)
        body = image[first : last + 1]
        headers = {**validators, "Content-Range": f"bytes {first}-{last}/{len(image)}"}
        if server.take("drop_next"):
            self._reply(206, headers, body[: len(body) // 2], length=len(body))
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self._reply(206, headers, body)

    def _reply(self, status: int, headers: dict, body: bytes, length: int | None = None) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()


def _parse_ranges(value: str) -> list[tuple[int, int]] | None:
    ranges = []
    for item in value.removeprefix("bytes=").split(","):
        match = _RANGE.match("bytes=" + item.strip())
        if not match:
            return None
        ranges.append((int(match.group(1)), int(match.group(2))))
    return ranges


@pytest.fixture
def faulty_server():
    """faulty_server(image) -> a running FaultyServer, stopped at teardown."""
    servers = []

    def start(image: bytes) -> FaultyServer:
        server = FaultyServer(image)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
