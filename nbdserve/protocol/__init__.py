"""The NBD protocol as plain code over bytes: no sockets, no trio, no file I/O."""

from .errors import NEED_DATA, ProtocolError

__all__ = ["NEED_DATA", "ProtocolError"]
