"""Logging to stderr: for a terminal, for journald, or as JSON lines for log shippers.

Under systemd, stderr is a stream to journald ($JOURNAL_STREAM names it): journald stamps each
line itself and reads the level from a `<N>` syslog priority prefix, so we send exactly that.
"""

import json
import logging
import os
import sys
import time

LOG_FORMATS = ["text", "json"]

# logging levels -> syslog priorities, as journald reads them from a `<N>` prefix.
_SYSLOG_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class JournalFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        priority = _SYSLOG_PRIORITY.get(record.levelno, 6)
        # A traceback spans lines; journald would take each for a message of its own.
        return f"<{priority}>" + super().format(record).replace("\n", "\n    ")


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)

    converter = staticmethod(time.gmtime)  # the Z in "time" means UTC


def stderr_is_journal() -> bool:
    """Is stderr connected to journald? $JOURNAL_STREAM is `device:inode` of that stream."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        stat = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return (stat.st_dev, stat.st_ino) == (int(device), int(inode))


def setup_logging(level: str, log_format: str = "text") -> None:
    if log_format == "json":
        formatter: logging.Formatter = JSONFormatter()
    elif stderr_is_journal():
        formatter = JournalFormatter()
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])
