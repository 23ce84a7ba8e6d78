"""The lvm backend: one logical volume as an export, or every LV of a volume group.

The backend asks lvm2 where an LV is (`lvs`) and opens the device path it reports with the file
backend, so I/O, cache modes, TRIM (BLKDISCARD) and WRITE_ZEROES (BLKZEROOUT) are the block-device
path's. A whole volume group is an export provider: the catalog asks it for the current LVs at
NBD_OPT_LIST and GO time, so LVs created or removed while serving come and go without a restart.
"""

import dataclasses
import errno
import re
from dataclasses import dataclass
from pathlib import Path

from backends.file import FileConfig, FileDriver
from nbdserve.backend import Backend, BackendError, OpenOptions
from nbdserve.export import ExportConfig
from nbdserve.registry import ParseContext
from nbdserve.settings import Section

from .report import LogicalVolume, LvmTool, logical_volumes

# lvm2's rule for VG and LV names.
_NAME = re.compile(r"^[A-Za-z0-9+_.][A-Za-z0-9+_.-]*$")
DEFAULT_RESCAN_INTERVAL = 5.0


@dataclass(frozen=True)
class LvmConfig:
    vg: str
    lv: str | None = None  # None: every LV of the group (that carries `tag`)
    tag: str | None = None
    activate: bool = False  # run `lvchange -ay` when the LV's device is absent
    tool: LvmTool = LvmTool()
    rescan_interval: float = DEFAULT_RESCAN_INTERVAL
    # Set on LVs found in a group: an LV removed and created again under the same name is
    # another volume, so its config differs and the catalog reopens it.
    uuid: str | None = None


class LvmDriver:
    name = "lvm"

    def claims(self, spec: str) -> dict | None:
        """`lvm:VG/LV` is one LV, `lvm:VG` every LV of the group."""
        if not spec.startswith("lvm:"):
            return None
        vg, _, lv = spec[len("lvm:") :].partition("/")
        return {"driver": "lvm", "vg": vg, **({"lv": lv} if lv else {})}

    def parse(self, section: Section, context: ParseContext) -> LvmConfig:
        vg = _checked_name(section, "vg", required=True)
        lv = _checked_name(section, "lv")
        if lv and "tag" in section:
            raise section.error("tag", "selects LVs of a whole volume group: drop `lv` or `tag`")
        if lv and "rescan-interval" in section:
            raise section.error("rescan-interval", "applies to a whole volume group, not one LV")
        tool = _parse_tool(section)
        rescan_interval = section.number("rescan-interval", DEFAULT_RESCAN_INTERVAL)
        if not rescan_interval:
            raise section.error("rescan-interval", "must be more than 0 seconds")
        return LvmConfig(vg, lv, section.str("tag"), section.bool("activate"), tool, rescan_interval)

    async def open(self, config: LvmConfig, options: OpenOptions) -> Backend:
        volume = await find_volume(config)
        if not volume.active:
            if not config.activate:
                raise BackendError(
                    errno.ENXIO,
                    f"LV {volume.full_name} is not active: {volume.path} does not exist "
                    f"(activate it with `lvchange -ay {volume.full_name}`, or set activate: true)",
                )
            await config.tool.run("lvchange", "-ay", volume.full_name)
            if not volume.active:
                raise BackendError(
                    errno.ENXIO,
                    f"LV {volume.full_name} is still not active after `lvchange -ay`: "
                    f"{volume.path} does not exist",
                )
        backend = await FileDriver().open(FileConfig(Path(volume.path)), options)
        if not backend.is_device:
            await backend.close()
            raise BackendError(errno.ENOTBLK, f"{volume.path} (LV {volume.full_name}) is not a block device")
        return backend

    def provider(self, template: ExportConfig) -> "VolumeGroupExports | None":
        """A whole volume group is an export provider; one LV is a plain export."""
        return None if template.source_config.lv else VolumeGroupExports(template)

    async def exported_volumes(self, section: Section) -> list[LogicalVolume]:
        """The LVs source settings would export (every VG's when `vg` is left out), for
        `nbdserve lvm list`."""
        if "vg" in section:
            config = self.parse(section, ParseContext(Path.cwd()))
            section.done()
            return [await find_volume(config)] if config.lv else await group_volumes(config)
        tool, tag = _parse_tool(section), section.str("tag")
        section.done()
        return [volume for volume in await logical_volumes(tool) if _exported(volume, tag)]


def _parse_tool(section: Section) -> LvmTool:
    env = section.section("lvm-env")
    return LvmTool(
        command=section.str("lvm-command", "lvm"),
        env=tuple((str(key), env.str(str(key), required=True)) for key, _ in env.items()),
    )


def _checked_name(section: Section, key: str, *, required: bool = False) -> str | None:
    value = section.str(key, required=required)
    if value is not None and not _NAME.match(value):
        raise section.error(key, f"{value!r} is not a valid LVM name")
    return value


async def find_volume(config: LvmConfig) -> LogicalVolume:
    for volume in await logical_volumes(config.tool, config.vg):
        if volume.name == config.lv and config.uuid in (None, volume.uuid):
            return volume
    raise BackendError(errno.ENOENT, f"volume group {config.vg!r} has no LV named {config.lv!r}")


async def group_volumes(config: LvmConfig) -> list[LogicalVolume]:
    """The group's LVs that are meant for users and carry the tag, if one is asked for."""
    return [volume for volume in await logical_volumes(config.tool, config.vg) if _exported(volume, config.tag)]


def _exported(volume: LogicalVolume, tag: str | None) -> bool:
    return volume.public and (tag is None or tag in volume.tags)


@dataclass(frozen=True)
class VolumeGroupExports:
    """Every (tagged) LV of a volume group as an export named after it, settings from `template`.

    Equal templates make equal providers, so a config reload can tell an unchanged group apart.
    """

    template: ExportConfig

    @property
    def interval(self) -> float:
        return self.template.source_config.rescan_interval

    async def configs(self) -> dict[str, ExportConfig]:
        group = self.template.source_config
        return {
            volume.name: dataclasses.replace(
                self.template,
                name=volume.name,
                source_config=dataclasses.replace(group, lv=volume.name, tag=None, uuid=volume.uuid),
                description=self.template.description or f"LVM volume {volume.full_name}",
            )
            for volume in await group_volumes(group)
        }
