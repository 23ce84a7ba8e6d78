"""Backing files: opened read-only through the registry, so a backing file may live on any byte
source and be raw or qcow2 (whose own backing file is opened the same way, to any depth)."""

import logging
from contextvars import ContextVar
from pathlib import Path
from urllib.parse import urljoin

from nbdserve import registry
from nbdserve.backend import Backend, OpenOptions
from nbdserve.registry import FORMATS, ParseContext
from nbdserve.settings import ConfigError, Section

from .header import unsupported_image

log = logging.getLogger(__name__)

MAX_DEPTH = 64  # a chain deeper than this is a loop
_depth: ContextVar[int] = ContextVar("qcow2_backing_depth", default=0)


def resolve(name: str, child: Backend) -> tuple[str, Path]:
    """(source spec, its directory) for a backing name, relative to the image that names it."""
    if "://" in name or name.startswith("/"):
        return name, Path(name).parent
    path = getattr(child, "path", None)
    if path is not None:
        spec = Path(path).parent / name
        return str(spec), spec.parent
    url = getattr(child, "url", None)
    if url is not None:
        return urljoin(str(url), name), Path("/")
    raise unsupported_image(f"backing file {name!r} is relative, and the image's source has no location")


async def open_backing(name: str, fmt: str | None, child: Backend, options: OpenOptions) -> Backend:
    if _depth.get() >= MAX_DEPTH:
        raise unsupported_image(f"the backing chain is deeper than {MAX_DEPTH}: is it a loop?")
    if fmt is None:
        # Probing is how a guest that writes a qcow2 header into a raw base reads host files.
        log.warning("backing file %s has no format in the image: opening it as raw", name)
        fmt = "raw"
    spec, directory = resolve(name, child)
    context = ParseContext(base_dir=directory)
    read_only = OpenOptions(read_only=True, cache=options.cache)
    try:
        format_driver = registry.driver(FORMATS, fmt)
        source_driver, source_config = registry.parse_source(spec, "backing file", context)
        format_config = format_driver.parse(Section({}, "backing file"), context)
    except (KeyError, ConfigError) as exc:
        reason = exc.args[0] if isinstance(exc, KeyError) else exc
        raise unsupported_image(f"backing file {name!r}: {reason}") from None
    token = _depth.set(_depth.get() + 1)
    try:
        source = await source_driver.open(source_config, read_only)
        try:
            return await format_driver.open(source, format_config, read_only)
        except BaseException:
            await source.close()
            raise
    finally:
        _depth.reset(token)
