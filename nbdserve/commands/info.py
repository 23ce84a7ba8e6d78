"""`nbdserve info`: what an image file is, as `qemu-img info` shows it, with its backing chain."""

import json
import os
from pathlib import Path

from ..settings import ConfigError

QCOW2_MAGIC = b"QFI\xfb"


def register(subparsers) -> None:
    info = subparsers.add_parser(
        "info",
        help="show an image's format, sizes and backing chain",
        description="Show an image file's format, virtual size, disk size, cluster size and "
        "backing chain. The format is read from the file for display only; `serve` never probes.",
    )
    info.add_argument("-f", "--format", choices=["qcow2", "raw"], help="the image's format (default: detect)")
    info.add_argument("--output", choices=["human", "json"], default="human")
    info.add_argument("file", metavar="FILE")
    info.set_defaults(handler=command_info)


def image_info(path: Path, fmt: str | None = None) -> dict:
    """qemu-img info's fields for one image, with `backing-chain`: the infos of its backing files."""
    from backends.qcow2 import header as hdr

    try:
        with open(path, "rb") as f:
            first = f.read(2 * 1024 * 1024)
            stat = os.fstat(f.fileno())
    except OSError as exc:
        raise ConfigError("FILE", f"cannot read {path}: {exc.strerror}") from None
    fmt = fmt or ("qcow2" if first[:4] == QCOW2_MAGIC else "raw")
    info = {"filename": str(path), "format": fmt, "virtual-size": stat.st_size,
            "actual-size": stat.st_blocks * 512}
    if fmt == "raw":
        return info
    try:
        header = hdr.parse_header(first)
    except OSError as exc:
        raise ConfigError("FILE", f"{path}: {exc.strerror}") from None
    info["virtual-size"] = header.size
    info["cluster-size"] = header.cluster_size
    info["dirty-flag"] = bool(header.incompatible & hdr.INCOMPAT_DIRTY)
    info["format-specific"] = {"type": "qcow2", "data": {
        "compat": "1.1" if header.version == 3 else "0.10",
        "compression-type": hdr.COMPRESSION_NAMES.get(header.compression_type, "unknown"),
        "lazy-refcounts": bool(header.compatible & hdr.COMPAT_LAZY_REFCOUNTS),
        "refcount-bits": header.refcount_bits,
        "corrupt": bool(header.incompatible & hdr.INCOMPAT_CORRUPT),
        "extended-l2": header.extended_l2,
    }}
    if header.backing_file:
        name = header.backing_file
        full = name if "://" in name or name.startswith("/") else str(path.parent / name)
        info["backing-filename"] = name
        info["full-backing-filename"] = full
        if header.backing_format:
            info["backing-filename-format"] = header.backing_format
        if "://" not in full:
            base = image_info(Path(full), header.backing_format or "raw")
            info["backing-chain"] = [base, *base.pop("backing-chain", [])]
    return info


def _human_size(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if size < 1024 or unit == "PiB":
            return f"{size:g} {unit}" if unit == "B" else f"{size:.3g} {unit}"
        size /= 1024
    return ""


def _human(info: dict) -> list[str]:
    lines = [
        f"image: {info['filename']}",
        f"file format: {info['format']}",
        f"virtual size: {_human_size(info['virtual-size'])} ({info['virtual-size']} bytes)",
        f"disk size: {_human_size(info['actual-size'])}",
    ]
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if "backing-filename" in info:
        lines.append(f"backing file: {info['backing-filename']} (actual path: {info['full-backing-filename']})")
        if "backing-filename-format" in info:
            lines.append(f"backing file format: {info['backing-filename-format']}")
    specific = info.get("format-specific", {}).get("data")
    if specific:
        lines.append("Format specific information:")
        lines.extend(f"    {key}: {str(value).lower()}" for key, value in specific.items())
    return lines


def command_info(args) -> int:
    info = image_info(Path(args.file), args.format)
    if args.output == "json":
        print(json.dumps(info, indent=4))
        return 0
    chain = info.pop("backing-chain", [])
    print("\n".join(_human(info)))
    for base in chain:
        print()
        print("\n".join(_human(base)))
    return 0
