"""`nbdserve lvm list [VG[/LV]]`: the LVs an lvm source would export, with their sizes."""

import trio

from .. import registry
from ..registry import SOURCES
from ..settings import Section


def register(subparsers) -> None:
    lvm = subparsers.add_parser("lvm", help="LVM volume groups as exports")
    actions = lvm.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser(
        "list",
        help="show what `serve lvm:VG` would export",
        description="Show the LVs that `nbdserve serve lvm:VG` (or lvm:VG/LV) would export, with "
        "their sizes and whether they are active (their device exists). Without VG, every "
        "volume group's. lvm2's environment (LVM_SYSTEM_DIR, ...) is passed on.",
    )
    listing.add_argument("group", nargs="?", metavar="VG[/LV]", help="volume group, or one LV of it")
    listing.add_argument("--tag", help="only LVs with this tag, as the `tag` setting of a source")
    listing.add_argument("--lvm-command", default="lvm", metavar="PATH", help="lvm2's command (default lvm)")
    listing.set_defaults(handler=command_list)


def command_list(args) -> int:
    settings = {"lvm-command": args.lvm_command}
    if args.group:
        settings.update(registry.driver(SOURCES, "lvm").claims(f"lvm:{args.group}"))
        del settings["driver"]
    if args.tag:
        settings["tag"] = args.tag
    try:
        volumes = trio.run(registry.driver(SOURCES, "lvm").exported_volumes, Section(settings))
    except OSError as exc:
        raise SystemExit(f"nbdserve: error: {exc.strerror or exc}") from None
    rows = [("EXPORT", "VG", "SIZE", "ACTIVE", "TAGS", "PATH")]
    for volume in volumes:
        active = "yes" if volume.active else "no"
        rows.append((volume.name, volume.vg, _size(volume.size), active, ",".join(volume.tags), volume.path))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    return 0


def _size(size: int) -> str:
    """Bytes as lvs shows them with --units h, but exact to the byte when small."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} B"
