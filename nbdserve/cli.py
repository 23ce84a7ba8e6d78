"""The `nbdserve` command: one subcommand per module of nbdserve.commands."""

import argparse
import importlib

from . import __version__
from .catalog import ExportUnavailable
from .logs import setup_logging
from .settings import ConfigError

# Each module has register(subparsers), which adds its subcommand with a `handler` default.
COMMANDS = ["serve", "check-config", "stats", "lvm", "create", "info"]
LOG_LEVELS = ["debug", "info", "warning", "error"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nbdserve",
        description="An NBD server for QEMU/KVM hosts: raw and qcow2 images over files, block "
        "devices and more, with QEMU's cache modes.",
    )
    parser.add_argument("--version", action="version", version=f"nbdserve {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"nbdserve.commands.{name.replace('-', '_')}").register(subparsers)
    return parser


def _call(handler, args) -> int:
    """Run `handler`; an error trio wrapped in exception groups (one per nursery it crossed)
    comes out unwrapped, so that a failed start (a port in use) reads as one line."""
    try:
        return handler(args)
    except BaseExceptionGroup as group:
        error: BaseException = group
        while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
            error = error.exceptions[0]
        raise error


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "log_level", "info"), getattr(args, "log_format", "text"))
    try:
        return _call(args.handler, args)
    except ConfigError as exc:
        parser.exit(2, f"nbdserve: error: {exc}\n")
    except (OSError, ExportUnavailable) as exc:
        parser.exit(1, f"nbdserve: error: {exc}\n")
    except KeyboardInterrupt:
        return 130
