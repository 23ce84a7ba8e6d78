"""`nbdserve check-config FILE`: validate a config without serving it (before a reload, say)."""

import sys

from ..config import load_config
from ..settings import ConfigError


def register(subparsers) -> None:
    check = subparsers.add_parser(
        "check-config",
        help="validate a config file without serving it",
        description="Parse and validate FILE as `nbdserve serve --config FILE` would, without "
        "opening exports or listening. Exit status: 0 when valid, 1 when not (the message names "
        "the key), 2 for usage errors.",
    )
    check.add_argument("file", metavar="FILE", help="the YAML config to check")
    check.set_defaults(handler=command_check_config)


def command_check_config(args) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        print(f"{args.file}: invalid: {exc}", file=sys.stderr)
        return 1
    exports = ", ".join(config.exports)
    listeners = ", ".join(str(listener) for listener in config.listeners)
    # Groups (every LV of a volume group) name their exports only while serving.
    groups = f" plus those {', '.join(config.providers)} will find" if config.providers else ""
    print(f"{args.file}: valid: {len(config.exports)} exports ({exports}){groups} on {listeners}")
    return 0
