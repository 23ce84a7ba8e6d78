"""Constants of the NBD protocol, named as in doc/proto.md without the NBD_ prefix.

`Option.GO` is NBD_OPT_GO, `Reply.ERR_UNSUP` is NBD_REP_ERR_UNSUP, and so on.
"""

from enum import IntEnum, IntFlag

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC", the INIT_PASSWD
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT", newstyle negotiation
CLISERV_MAGIC = 0x00420281861253  # oldstyle negotiation
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# Strings in the protocol (names, descriptions, messages) are at most 4096 bytes.
MAX_STRING_LENGTH = 4096
# Payloads up to 32 MiB must always be served (section "Size constraints").
MAX_PAYLOAD_DEFAULT = 32 * 1024 * 1024
# A block status reply should not carry more extents than this.
MAX_EXTENTS = 1 << 20


class HandshakeFlag(IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(IntFlag):
    C_FIXED_NEWSTYLE = 1 << 0
    C_NO_ZEROES = 1 << 1


class TransmissionFlag(IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Option(IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_ERR = 1 << 31


class Reply(IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _ERR + 1
    ERR_POLICY = _ERR + 2
    ERR_INVALID = _ERR + 3
    ERR_PLATFORM = _ERR + 4
    ERR_TLS_REQD = _ERR + 5
    ERR_UNKNOWN = _ERR + 6
    ERR_SHUTDOWN = _ERR + 7
    ERR_BLOCK_SIZE_REQD = _ERR + 8
    ERR_TOO_BIG = _ERR + 9


class Info(IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Command(IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CommandFlag(IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class ReplyFlag(IntFlag):
    DONE = 1 << 0


class ReplyType(IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


class Error(IntEnum):
    """Error values of replies (NBD_EPERM ...)."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


class StateFlag(IntFlag):
    """Flags of the base:allocation metadata context."""

    HOLE = 1 << 0
    ZERO = 1 << 1


BASE_ALLOCATION = "base:allocation"
# QEMU's context: in which layer of a backing chain each extent lives (0: none; 1: the image
# itself; 2: its backing file; ...).
ALLOCATION_DEPTH = "qemu:allocation-depth"
