class ProtocolError(Exception):
    """The peer broke the protocol in a way that ends the connection (bad magic, unknown flags)."""


class _NeedData:
    """Sentinel: the parser needs more bytes before it can produce an event."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()
