"""Prometheus metrics over HTTP (`metrics: {listen: 127.0.0.1:PORT}`): a tiny responder that
answers GET /metrics with the text exposition format and hangs up. It has no authentication:
keep it on localhost or behind a firewall."""

import logging

import trio

from ..config import Listener
from ..stats import LATENCY_BUCKETS, bucket_upper_bound
from .control import receive_until, snapshot
from .listeners import bind_tcp, describe, to_trio

log = logging.getLogger(__name__)

REQUEST_LIMIT = 8192
REQUEST_TIMEOUT = 5.0
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Histogram buckets published: from 1 µs (2**10 ns) to 34 s (2**35 ns); the log2 buckets
# below are folded into the first one.
_FIRST_BUCKET, _LAST_BUCKET = 10, 35


async def serve_metrics(server, listener: Listener, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    sockets = bind_tcp(listener)
    log.info("metrics: http://%s/metrics", ", ".join(describe(sock) for sock in sockets))
    await trio.serve_listeners(
        lambda stream: _answer(server, stream), [to_trio(sock) for sock in sockets],
        task_status=task_status,
    )


async def _answer(server, stream: trio.SocketStream) -> None:
    async with stream:
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                head = await receive_until(stream, b"\r\n\r\n", REQUEST_LIMIT)
            # Only the request line matters; headers are read and ignored.
            method, _, target = head.split(b"\n", 1)[0].decode("latin-1").strip().partition(" ")
            path = target.split(" ", 1)[0]
            if method not in ("GET", "HEAD"):
                response = _response("405 Method Not Allowed", "only GET\n")
            elif path.split("?", 1)[0] not in ("/metrics", "/"):
                response = _response("404 Not Found", "metrics are at /metrics\n")
            else:
                response = _response("200 OK", render(snapshot(server)), head=method == "HEAD")
            await stream.send_all(response)
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("metrics client went away: %r", exc)


def _response(status: str, body: str, *, head: bool = False) -> bytes:
    payload = body.encode()
    header = (
        f"HTTP/1.1 {status}\r\nContent-Type: {CONTENT_TYPE}\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    )
    return header.encode() + (b"" if head else payload)


def render(stats: dict) -> str:
    """The Prometheus text format of a control-socket snapshot."""
    lines = [
        "# HELP nbdserve_start_time_seconds When the server started, in seconds since the epoch.",
        "# TYPE nbdserve_start_time_seconds gauge",
        f"nbdserve_start_time_seconds {stats['started_at']:.3f}",
    ]
    exports = stats["exports"]

    def family(name: str, kind: str, help_text: str, key: str) -> None:
        lines.append(f"# HELP nbdserve_{name} {help_text}")
        lines.append(f"# TYPE nbdserve_{name} {kind}")
        for export, values in exports.items():
            lines.append(f"nbdserve_{name}{{export={_quote(export)}}} {values[key]}")

    family("connections", "gauge", "Open connections that chose the export.", "connections")
    family("requests_in_flight", "gauge", "Requests received and not yet answered.", "in_flight")
    family("read_bytes_total", "counter", "Bytes read by clients.", "bytes_read")
    family("written_bytes_total", "counter", "Bytes written by clients.", "bytes_written")
    family("request_errors_total", "counter", "Requests answered with an error.", "errors")
    lines.append("# HELP nbdserve_request_duration_seconds Time from a request to its reply, by command.")
    lines.append("# TYPE nbdserve_request_duration_seconds histogram")
    for export, values in exports.items():
        for command, histogram in values["latency"].items():
            labels = f"export={_quote(export)},command={_quote(command)}"
            buckets = histogram["buckets"] + [0] * (LATENCY_BUCKETS - len(histogram["buckets"]))
            cumulative = sum(buckets[:_FIRST_BUCKET])
            for bucket in range(_FIRST_BUCKET, _LAST_BUCKET + 1):
                cumulative += buckets[bucket]
                le = f"{bucket_upper_bound(bucket):.9g}"
                lines.append(f'nbdserve_request_duration_seconds_bucket{{{labels},le="{le}"}} {cumulative}')
            count = sum(buckets)
            lines.append(f'nbdserve_request_duration_seconds_bucket{{{labels},le="+Inf"}} {count}')
            lines.append(f"nbdserve_request_duration_seconds_sum{{{labels}}} {histogram['sum_ns'] / 1e9:.9f}")
            lines.append(f"nbdserve_request_duration_seconds_count{{{labels}}} {count}")
    return "\n".join(lines) + "\n"


def _quote(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return f'"{escaped}"'
