"""`nbdserve serve`: serve one SOURCE with qemu-nbd's flags, or the exports of a config file."""

import logging
from functools import partial
from pathlib import Path, PurePosixPath

import trio

from .. import registry
from ..cli import LOG_LEVELS
from ..logs import LOG_FORMATS
from ..config import (
    CACHE_MODES,
    DEFAULT_HOST,
    DEFAULT_PORT,
    ServerConfig,
    default_config_path,
    load_config,
    parse_config,
    parse_listener,
)
from ..server.tls import TLS_MODES, tls_from_flags
from ..settings import ConfigError

log = logging.getLogger("nbdserve")


def register(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="serve one SOURCE, or the exports of a config file",
        description="Serve one SOURCE (a file or block device path) with qemu-nbd's flag names, "
        "or every export of --config FILE. With neither, serve a sparse scratch disk from the "
        "default config (created on first start in the state directory).",
    )
    serve.add_argument("source", nargs="?", metavar="SOURCE", help="image file or block device")
    serve.add_argument("-c", "--config", metavar="FILE", help="serve the exports and listeners of this YAML file")
    serve.add_argument("-x", "--export-name", metavar="NAME", help="export name (default: the source's base name)")
    serve.add_argument("-D", "--description", metavar="TEXT", default="", help="export description")
    serve.add_argument("-b", "--bind", metavar="ADDR", help=f"address to listen on (default {DEFAULT_HOST})")
    serve.add_argument("-p", "--port", type=int, metavar="PORT", help=f"TCP port (default {DEFAULT_PORT})")
    serve.add_argument("-k", "--socket", metavar="PATH", help="listen on this unix socket instead of TCP")
    serve.add_argument("-f", "--format", default="raw", metavar="FORMAT",
                       help="image format: raw or qcow2 (default raw; never probed)")
    serve.add_argument("--cache", default="writeback", choices=CACHE_MODES,
                       help="cache mode, as QEMU's (default writeback)")
    serve.add_argument("-r", "--read-only", action="store_true", help="refuse writes")
    serve.add_argument("-t", "--persistent", action="store_true",
                       help="accepted for qemu-nbd compatibility: nbdserve always keeps serving")
    serve.add_argument("--tls", choices=TLS_MODES,
                       help="STARTTLS: off, optional, or required before any other option")
    serve.add_argument("--tls-dir", metavar="DIR",
                       help="certificates with QEMU's names: ca-cert.pem, server-cert.pem, server-key.pem")
    serve.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="(default info)")
    serve.add_argument("--log-format", default="text", choices=LOG_FORMATS,
                       help="json: one object per line, for log shippers (default text)")
    serve.add_argument("--pid-file", type=Path, metavar="PATH", help="write the pid here once serving")
    serve.set_defaults(handler=command_serve)


def export_name_for(spec: str) -> str:
    """The default export name: the last path component of the source."""
    tail = spec.split("://", 1)[-1].split("?", 1)[0].rstrip("/")
    # After a scheme, `:key=value` options may follow (rbd:pool/image:conf=FILE): not the name.
    return PurePosixPath(tail.split(":", 1)[-1].split(":", 1)[0]).name or "disk"


def listen_from_args(args) -> list[dict]:
    """The listener -b/-p/-k ask for, or [] when none of them is given."""
    if args.socket:
        return [{"unix": args.socket}]
    if args.bind is None and args.port is None:
        return []
    host = args.bind or DEFAULT_HOST
    address = f"[{host}]" if ":" in host else host
    return [{"tcp": f"{address}:{args.port if args.port is not None else DEFAULT_PORT}"}]


def default_config(args) -> ServerConfig:
    """The shipped scratch-disk config; -b/-p/-k replace its listener."""
    if args.export_name is not None:
        raise ConfigError("", "-x applies to SOURCE; the default config names its own export")
    config = load_config(default_config_path())
    listen = listen_from_args(args)
    if listen:
        config.listeners = [parse_listener(listen[0], "listen[0]")]
    return config


def config_from_args(args) -> ServerConfig:
    if args.config and args.source:
        raise ConfigError("", "give either SOURCE or --config, not both")
    if args.config:
        if any(v is not None for v in (args.bind, args.port, args.socket, args.export_name)):
            raise ConfigError("", "-b, -p, -k and -x apply to SOURCE; with --config, set them in the file")
        return load_config(args.config)
    if not args.source:
        return default_config(args)
    name = args.export_name or export_name_for(args.source)
    listen = listen_from_args(args) or [{"tcp": f"{DEFAULT_HOST}:{DEFAULT_PORT}"}]
    try:
        source = registry.source_settings(args.source)
    except ConfigError as exc:
        raise ConfigError("SOURCE", str(exc)) from None
    export = {
        "source": source,
        "format": args.format,
        "cache": args.cache,
        "read-only": args.read_only,
        "description": args.description,
    }
    # A lone export is the default one; `lvm:VG` (every LV an export) has none. A relative
    # SOURCE path is the user's, from the current directory.
    return parse_config({"listen": listen, "exports": {name: export}}, paths_from=Path.cwd())


def attach_hints(config: ServerConfig, addresses: list[str]) -> list[str]:
    hints = []
    for name, export in config.exports.items():
        for address in addresses:
            if address.startswith("unix:"):
                uri = f"nbd+unix:///{name}?socket={address[5:]}"
                drive = f"file={uri}"
            else:
                host, port = address.rsplit(":", 1)
                uri = f"nbd://{address}/{name}"
                drive = f"file=nbd:{host}:{port}:exportname={name}"
            hints.append(f"export {name!r} ({export.format_driver.name}) at {uri}")
            hints.append(f"  attach a guest: kvm -drive {drive},format=raw,if=virtio")
    for name in config.providers:
        for address in addresses:
            server = f"nbd+unix:///?socket={address[5:]}" if address.startswith("unix:") else f"nbd://{address}"
            hints.append(f"exports of {name!r} are found while serving: nbdinfo --list {server}")
    return hints


def command_serve(args) -> int:
    from ..server.service import run_server

    def load() -> ServerConfig:
        config = config_from_args(args)
        config.tls = tls_from_flags(config.tls, config.exports.values(), args.tls, args.tls_dir)
        return config

    config = load()
    serve = partial(run_server, config, reload_config=load if args.config else None, pid_file=args.pid_file)

    async def main():
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve)
            for line in attach_hints(config, server.addresses):
                log.info("%s", line)

    trio.run(main)
    return 0
