"""What a failed comparison of two long byte strings says: where they differ, by block.

pytest's own explanation is a line diff of both reprs. Where CI is detected (the CI variable) it
is not truncated, and for megabytes that diff takes minutes and buries the one fact that matters:
which bytes are wrong, and whether they read as zeroes.
"""

BLOCK = 4096
SHOWN_RUNS = 8
SHOWN_BYTES = 16
_BINARY = (bytes, bytearray, memoryview)


def explain(left, right) -> list[str] | None:
    """The explanation of `left == right` failing, for long byte strings; None for the rest."""
    if not (isinstance(left, _BINARY) and isinstance(right, _BINARY)):
        return None
    left, right = bytes(left), bytes(right)
    if max(len(left), len(right)) <= SHOWN_BYTES:
        return None
    lines = [f"{len(left)} bytes == {len(right)} bytes"]
    if len(left) != len(right):
        lines.append(f"the lengths differ by {len(left) - len(right)}")
    common = min(len(left), len(right))
    left, right = left[:common], right[:common]
    runs = _differing_runs(left, right)
    lines.append(f"{sum(end - start for start, end in runs)} of {-(-common // BLOCK)} {BLOCK}-byte blocks "
                 f"they share differ:")
    for start, end in runs[:SHOWN_RUNS]:
        span = slice(start * BLOCK, end * BLOCK)
        first = start * BLOCK + _first_difference(left[span], right[span])
        lines.append(f"  blocks {start}-{end - 1} (bytes {span.start}-{min(span.stop, common) - 1}), first at "
                     f"byte {first}: {_describe(left, first, span)} != {_describe(right, first, span)}")
    if len(runs) > SHOWN_RUNS:
        lines.append(f"  and {len(runs) - SHOWN_RUNS} more runs")
    return lines


def _differing_runs(left: bytes, right: bytes) -> list[tuple[int, int]]:
    """(first, end) block numbers of each run of differing blocks (of equally long strings)."""
    runs: list[tuple[int, int]] = []
    for block in range(-(-len(left) // BLOCK)):
        span = slice(block * BLOCK, (block + 1) * BLOCK)
        if left[span] != right[span]:
            if runs and runs[-1][1] == block:
                runs[-1] = (runs[-1][0], block + 1)
            else:
                runs.append((block, block + 1))
    return runs


def _first_difference(left: bytes, right: bytes) -> int:
    return next(index for index, (a, b) in enumerate(zip(left, right)) if a != b)


def _describe(data: bytes, first: int, run: slice) -> str:
    zeroes = " (the run is all zeroes)" if not data[run].strip(b"\0") else ""
    return data[first : first + SHOWN_BYTES].hex(" ") + zeroes
