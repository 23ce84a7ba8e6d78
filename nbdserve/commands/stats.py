"""`nbdserve stats`: a running server's counters, per export and per connection, read from its
control socket; `--watch` refreshes a view of rates, as dstat and iotop do."""

import json
import socket
import sys
import time

from ..config import default_state_dir, load_config
from ..server.control import CONTROL_SOCKET, control_path
from ..stats import PERCENTILES, histogram_delta, merged_histogram, percentile, requests_by_command

TIMEOUT = 10.0
CLEAR_SCREEN = "\x1b[H\x1b[2J"


def register(subparsers) -> None:
    stats = subparsers.add_parser(
        "stats",
        help="show a running server's counters",
        description="Show the requests, bytes, errors, requests in flight and latency "
        "percentiles of a running server, per export and per connection. The server is found "
        "through its control socket: --socket, or the one --config names, or control.sock in "
        "the default state directory.",
    )
    where = stats.add_mutually_exclusive_group()
    where.add_argument("-s", "--socket", metavar="PATH", help="the server's control socket")
    where.add_argument("-c", "--config", metavar="FILE", help="the config the server runs")
    stats.add_argument("--json", action="store_true", help="print the raw counters as JSON")
    stats.add_argument("-w", "--watch", nargs="?", const=1.0, type=float, metavar="SECONDS",
                       help="refresh every SECONDS (default 1) with rates over that interval")
    stats.add_argument("-n", "--count", type=int, metavar="N", help="with --watch: stop after N views")
    stats.set_defaults(handler=command_stats)


def command_stats(args) -> int:
    if args.socket:
        path = args.socket
    elif args.config:
        path = str(control_path(load_config(args.config)))
    else:
        path = str(default_state_dir() / CONTROL_SOCKET)
    if args.watch is None:
        current = fetch(path)
        print(json.dumps(current, indent=2) if args.json else render(current))
        return 0
    try:
        watch(path, args.watch, args.count, args.json)
    except KeyboardInterrupt:
        pass
    return 0


def watch(path: str, interval: float, count: int | None, as_json: bool) -> None:
    clear = CLEAR_SCREEN if sys.stdout.isatty() else ""
    previous = fetch(path)
    shown = 0
    while count is None or shown < count:
        time.sleep(interval)
        current = fetch(path)
        if current["pid"] != previous["pid"]:
            previous = None  # the server restarted: its counters began again
        text = json.dumps(current) if as_json else render(current, previous)
        print(clear + text, flush=True)
        previous = current
        shown += 1


def fetch(path: str) -> dict:
    """One snapshot from the control socket at `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        try:
            sock.connect(path)
        except OSError as exc:
            raise OSError(exc.errno, f"no server answers at {path} ({exc.strerror}): is nbdserve "
                          "running? Give its control socket with --socket or its --config") from None
        sock.sendall(b"stats\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return json.loads(b"".join(chunks))


def render(current: dict, previous: dict | None = None) -> str:
    """A text view: totals since start, or with `previous`, rates since then."""
    seconds = current["time"] - previous["time"] if previous else None
    up = _duration(current["time"] - current["started_at"])
    lines = [f"nbdserve {current['version']}, pid {current['pid']}, up {up}, on "
             f"{', '.join(current['addresses'])}"]
    if seconds:
        lines[0] += f"; rates over the last {seconds:.1f} s"
    old_exports = previous["exports"] if previous else {}
    rows = [["EXPORT", "CONN", "INFL", *_counter_titles(seconds), "P50", "P90", "P99"]]
    for name, values in current["exports"].items():
        old = old_exports.get(name)
        histogram = merged_histogram(values)
        if old:
            histogram = histogram_delta(histogram, merged_histogram(old))
        rows.append([name, values["connections"], values["in_flight"], *_counters(values, old, seconds),
                     *(_latency(percentile(histogram, q)) for q in PERCENTILES)])
    lines += ["", *_table(rows)]
    if current["connections"]:
        old_connections = {(c["peer"], c["connected_at"]): c for c in (previous or {}).get("connections", [])}
        rows = [["PEER", "EXPORT", "AGE", "INFL", *_counter_titles(seconds)]]
        for conn in current["connections"]:
            old = old_connections.get((conn["peer"], conn["connected_at"]))
            rows.append([conn["peer"], conn["export"], _duration(current["time"] - conn["connected_at"]),
                         conn["in_flight"], *_counters(conn, old, seconds)])
        lines += ["", *_table(rows)]
    return "\n".join(lines)


def _counter_titles(seconds: float | None) -> list[str]:
    titles = ["READS", "WRITES", "OTHER", "READ", "WRITTEN", "ERRORS"]
    return [f"{title}/s" for title in titles] if seconds else titles


def _counters(values: dict, old: dict | None, seconds: float | None) -> list[str]:
    """Reads, writes, other requests, bytes read and written, errors: totals, or rates."""

    def numbers(counters: dict) -> list[int]:
        by_command = requests_by_command(counters)
        reads, writes = by_command.get("read", 0), by_command.get("write", 0)
        return [reads, writes, counters["requests"] - reads - writes,
                counters["bytes_read"], counters["bytes_written"], counters["errors"]]

    new = numbers(values)
    if seconds:
        base = numbers(old) if old else [0] * len(new)
        new = [(value - before) / seconds for value, before in zip(new, base)]
    cells = [_count(value) for value in new]
    cells[3:5] = [_bytes(value) for value in new[3:5]]
    return cells


def _count(value: float) -> str:
    return f"{value:.0f}" if value < 10_000 else f"{value / 1000:.0f}k"


def _bytes(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}TiB"


def _latency(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f}µs"
    if seconds < 1:
        return f"{seconds * 1e3:.0f}ms"
    return f"{seconds:.1f}s"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def _table(rows: list[list]) -> list[str]:
    """Left-aligned first columns of text, right-aligned numbers."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    text_columns = 2
    return [
        "  ".join(
            cell.ljust(width) if i < text_columns else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths))
        ).rstrip()
        for row in cells
    ]
