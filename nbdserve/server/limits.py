"""Connection limits: how many clients at once (in total and per address), and idle clients."""

import logging
from collections import Counter
from collections.abc import Callable

import trio

from ..access import Client
from ..config import Limits

log = logging.getLogger(__name__)


class ConnectionLimiter:
    """Counts open connections in total and per client IP address. Clients on a unix socket
    count toward the total only: they are local, and one host may run many guests."""

    def __init__(self) -> None:
        self._open: Counter = Counter()
        self._total = 0

    def admit(self, client: Client, limits: Limits) -> str | None:
        """Count the connection in and return None, or return why it is refused."""
        if self._total >= limits.max_connections:
            return f"{limits.max_connections} connections are open (limits.max-connections)"
        if client.address and self._open[client.address] >= limits.max_connections_per_client:
            return (f"{limits.max_connections_per_client} connections from this address are open "
                    "(limits.max-connections-per-client)")
        self._open[client.address] += 1
        self._total += 1
        return None

    def release(self, client: Client) -> None:
        self._total -= 1
        self._open[client.address] -= 1
        if not self._open[client.address]:
            del self._open[client.address]


class IdleTimeoutStream(trio.abc.Stream):
    """A stream whose reads end (as if at EOF) once the client has sent nothing for `timeout`
    seconds while `busy()` is false: an idle client frees its slot, a slow request does not."""

    def __init__(
        self, stream: trio.abc.Stream, timeout: float, busy: Callable[[], bool], peer: str
    ) -> None:
        self.stream = stream
        self.timeout = timeout
        self.busy = busy
        self.peer = peer

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while True:
            with trio.move_on_after(self.timeout):
                return await self.stream.receive_some(max_bytes)
            if not self.busy():
                log.info("%s: idle for %g s, closing (limits.idle-timeout)", self.peer, self.timeout)
                return b""

    async def send_all(self, data) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.stream.aclose()
