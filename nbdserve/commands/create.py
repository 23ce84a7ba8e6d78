"""`nbdserve create`: make a new qcow2 or raw image, with qemu-img create's flags and options."""

import os
from pathlib import Path

from ..settings import ConfigError, parse_size
from .info import image_info


def register(subparsers) -> None:
    create = subparsers.add_parser(
        "create",
        help="make a new qcow2 or raw image",
        description="Make a new image, as `qemu-img create` does. With -b, a qcow2 overlay on a "
        "base image; its size defaults to the base's.",
    )
    create.add_argument("-f", "--format", default="qcow2", choices=["qcow2", "raw"], help="(default qcow2)")
    create.add_argument("-o", "--options", action="append", default=[], metavar="OPTIONS",
                        help="cluster_size=, preallocation=off|metadata|falloc|full, "
                        "compression_type=zlib|zstd, extended_l2=on|off, compat=0.10|1.1, "
                        "lazy_refcounts=on|off, refcount_bits=")
    create.add_argument("-b", "--backing", metavar="BACKING", help="backing file (qcow2 only)")
    create.add_argument("-F", "--backing-format", metavar="FMT", choices=["qcow2", "raw"],
                        help="format of the backing file (default: what `nbdserve info` finds)")
    create.add_argument("file", metavar="FILE")
    create.add_argument("size", nargs="?", metavar="SIZE", help="virtual size: bytes, or with K, M, G, T")
    create.set_defaults(handler=command_create)


def parse_options(texts: list[str]) -> dict[str, str]:
    options = {}
    for text in texts:
        for item in filter(None, text.split(",")):
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError("-o", f"expected key=value, got {item!r}")
            options[key.strip()] = value.strip()
    return options


def _flag(key: str, value: str) -> bool:
    if value not in ("on", "off", "true", "false"):
        raise ConfigError(f"-o {key}", f"expected on or off, got {value!r}")
    return value in ("on", "true")


def command_create(args) -> int:
    from backends.qcow2.create import CreateOptions, create_qcow2

    options = parse_options(args.options)
    path = Path(args.file)
    size = None
    if args.size is not None:
        try:
            size = parse_size(args.size)
        except ValueError as exc:
            raise ConfigError("SIZE", str(exc)) from None
    if args.format == "raw":
        if args.backing:
            raise ConfigError("-b", "raw images have no backing file")
        if size is None:
            raise ConfigError("SIZE", "is required")
        unknown = set(options) - {"preallocation"}
        if unknown:
            raise ConfigError("-o", f"unknown option for raw: {sorted(unknown)[0]}")
        create_raw(path, size, options.get("preallocation", "off"))
        print(f"Formatting '{path}', fmt=raw size={size}")
        return 0
    backing_format = args.backing_format
    if args.backing:
        base = Path(args.backing) if Path(args.backing).is_absolute() else path.parent / args.backing
        base_info = image_info(base, backing_format)
        backing_format = base_info["format"]
        if size is None:
            size = base_info["virtual-size"]
    if size is None:
        raise ConfigError("SIZE", "is required without a backing file")
    known = {"cluster_size": ("cluster_size", parse_size), "preallocation": ("preallocation", str),
             "compression_type": ("compression_type", str), "compat": ("compat", str),
             "extended_l2": ("extended_l2", None), "lazy_refcounts": ("lazy_refcounts", None),
             "refcount_bits": ("refcount_bits", int)}
    values = {}
    for key, value in options.items():
        if key not in known:
            raise ConfigError("-o", f"unknown option for qcow2: {key}")
        name, convert = known[key]
        try:
            values[name] = _flag(key, value) if convert is None else convert(value)
        except ValueError as exc:
            raise ConfigError(f"-o {key}", str(exc)) from None
    create_options = CreateOptions(**values, backing_file=args.backing, backing_format=backing_format)
    try:
        create_qcow2(path, size, create_options)
    except ValueError as exc:
        raise ConfigError("-o", str(exc)) from None
    print(f"Formatting '{path}', fmt=qcow2 cluster_size={create_options.cluster_size} size={size}"
          + (f" backing_file={args.backing} backing_fmt={backing_format}" if args.backing else ""))
    return 0


def create_raw(path: Path, size: int, preallocation: str) -> None:
    if preallocation not in ("off", "falloc", "full"):
        raise ConfigError("-o preallocation", f"expected off, falloc or full, got {preallocation!r}")
    with open(path, "wb") as f:
        f.truncate(size)
        if preallocation != "off" and size:
            os.posix_fallocate(f.fileno(), 0, size)
