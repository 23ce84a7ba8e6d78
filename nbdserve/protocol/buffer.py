"""A receive buffer for the sans-IO parsers: append bytes, take exact counts, drain."""


class ReceiveBuffer:
    def __init__(self) -> None:
        self._data = bytearray()
        self._pos = 0

    def __len__(self) -> int:
        return len(self._data) - self._pos

    def append(self, data: bytes) -> None:
        if self._pos and self._pos == len(self._data):
            # Everything was consumed: restart instead of growing forever.
            self._data.clear()
            self._pos = 0
        self._data += data

    def peek(self, count: int) -> bytes | None:
        """The next `count` bytes, without consuming them, or None if not there yet. A copy: a
        view would pin the bytearray, and compaction of a pinned bytearray raises BufferError."""
        if len(self) < count:
            return None
        return bytes(self._data[self._pos : self._pos + count])

    def take(self, count: int) -> bytes | None:
        """Consume and return exactly `count` bytes, or None if not there yet."""
        if len(self) < count:
            return None
        chunk = bytes(self._data[self._pos : self._pos + count])
        self._advance(count)
        return chunk

    def take_into(self, target: memoryview) -> int:
        """Move as many bytes as fit into `target`; return how many."""
        count = min(len(self), len(target))
        target[:count] = self._data[self._pos : self._pos + count]
        self._advance(count)
        return count

    def discard(self, count: int) -> int:
        """Drop up to `count` bytes; return how many were dropped."""
        count = min(len(self), count)
        self._advance(count)
        return count

    def take_all(self) -> bytes:
        return self.take(len(self)) or b""

    def _advance(self, count: int) -> None:
        self._pos += count
        # Compact once the consumed prefix dominates, so memory stays bounded
        # without a memmove per message.
        if self._pos > 65536 and self._pos * 2 > len(self._data):
            del self._data[: self._pos]
            self._pos = 0
