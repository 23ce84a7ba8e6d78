"""Request counters: cheap to update per request, summed and summarised only when someone asks.

A request costs tens of microseconds, so the hot path does one thing: `Counters.record`, a few
integer increments into preallocated lists (no allocation, no lock: all connections run in one
thread). Latency goes into a fixed log2 histogram per command, from which request counts by
command and latency percentiles are derived on demand.
"""

from .protocol.constants import Command

# Bucket i counts requests that took [2**(i-1), 2**i) nanoseconds (bucket 0: under 1 ns).
LATENCY_BUCKETS = 64
COMMAND_NAMES = [command.name.lower() for command in Command] + ["other"]
_OTHER = len(Command)  # index for command numbers the export rejects as unknown
PERCENTILES = (0.5, 0.9, 0.99)


class Counters:
    """The counters of one connection, or the totals of an export."""

    __slots__ = ("latency", "latency_sum_ns", "bytes_read", "bytes_written", "errors")

    def __init__(self) -> None:
        self.latency = [[0] * LATENCY_BUCKETS for _ in COMMAND_NAMES]
        self.latency_sum_ns = [0] * len(COMMAND_NAMES)
        self.bytes_read = 0
        self.bytes_written = 0
        self.errors = 0

    def record(self, command: int, elapsed_ns: int) -> None:
        """One request done (replied to, with data or an error), `elapsed_ns` after it arrived."""
        index = command if command < _OTHER else _OTHER
        self.latency[index][elapsed_ns.bit_length()] += 1
        self.latency_sum_ns[index] += elapsed_ns

    @property
    def requests(self) -> int:
        return sum(map(sum, self.latency))

    def add(self, other: "Counters") -> None:
        for mine, theirs in zip(self.latency, other.latency):
            for bucket, count in enumerate(theirs):
                mine[bucket] += count
        for index, total in enumerate(other.latency_sum_ns):
            self.latency_sum_ns[index] += total
        self.bytes_read += other.bytes_read
        self.bytes_written += other.bytes_written
        self.errors += other.errors

    def to_dict(self) -> dict:
        """Plain data for the control socket: histograms by command name, trailing zeros cut."""
        histograms = {}
        for name, buckets, total_ns in zip(COMMAND_NAMES, self.latency, self.latency_sum_ns):
            if any(buckets):
                last = max(i for i, count in enumerate(buckets) if count)
                histograms[name] = {"buckets": buckets[: last + 1], "sum_ns": total_ns}
        return {
            "requests": self.requests,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "errors": self.errors,
            "latency": histograms,
        }


def requests_by_command(counters: dict) -> dict[str, int]:
    """{command name: requests} from `Counters.to_dict()` output."""
    return {name: sum(h["buckets"]) for name, h in counters["latency"].items()}


def merged_histogram(counters: dict) -> list[int]:
    """One latency histogram over every command, from `Counters.to_dict()` output."""
    merged = [0] * LATENCY_BUCKETS
    for histogram in counters["latency"].values():
        for bucket, count in enumerate(histogram["buckets"]):
            merged[bucket] += count
    return merged


def histogram_delta(new: list[int], old: list[int]) -> list[int]:
    return [count - (old[i] if i < len(old) else 0) for i, count in enumerate(new)]


def percentile(histogram: list[int], fraction: float) -> float | None:
    """The latency in seconds under which `fraction` of the requests finished, rounded up to the
    bucket's upper bound (so within a factor of 2), or None without requests."""
    total = sum(histogram)
    if not total:
        return None
    wanted = fraction * total
    seen = 0
    for bucket, count in enumerate(histogram):
        seen += count
        if seen >= wanted:
            return bucket_upper_bound(bucket)
    return bucket_upper_bound(len(histogram) - 1)


def bucket_upper_bound(bucket: int) -> float:
    """Seconds: requests in `bucket` took less than this."""
    return (1 << bucket) / 1e9
