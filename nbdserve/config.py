"""The server's configuration: listeners, limits and exports, from YAML or the command line."""

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import registry
from .access import parse_access
from .backend import CacheMode, OpenOptions
from .catalog import ExportProvider
from .export import ExportConfig
from .registry import FORMATS, ParseContext
from .server.tls import TLSConfig, parse_tls
from .settings import ConfigError, Section

DEFAULT_PORT = 10809
DEFAULT_HOST = "127.0.0.1"
CACHE_MODES = [mode.value for mode in CacheMode]


@dataclass(frozen=True)
class Listener:
    """`tcp` with host and port, or `unix` with a path."""

    kind: str
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class Limits:
    max_payload: int = 32 * 1024 * 1024  # largest READ or WRITE payload accepted
    max_in_flight: int = 64  # requests of one connection in progress at once
    shutdown_grace: float = 30.0  # seconds in-flight requests get to finish at shutdown
    max_connections: int = 512  # more are accepted and closed at once
    max_connections_per_client: int = 64  # per client IP address (unix clients: no limit but the total)
    handshake_timeout: float = 10.0  # seconds from connect to transmission (TLS included)
    idle_timeout: float = 0.0  # seconds without a request before a client is dropped; 0: never


@dataclass
class ServerConfig:
    listeners: list[Listener]
    exports: dict[str, ExportConfig]
    default_export: str | None = None
    limits: Limits = field(default_factory=Limits)
    state_dir: Path = field(default_factory=lambda: default_state_dir())
    tls: TLSConfig = field(default_factory=TLSConfig)
    control_socket: Path | None = None  # `nbdserve stats` talks here; None: in the state dir
    metrics: Listener | None = None  # where Prometheus scrapes /metrics; None: nowhere
    # Exports found while serving (every LV of a volume group), by their key under `exports`.
    providers: dict[str, ExportProvider] = field(default_factory=dict)


def default_state_dir() -> Path:
    """systemd's StateDirectory= when set, else /var/lib/nbdserve for root, else XDG's."""
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    if os.geteuid() == 0:
        return Path("/var/lib/nbdserve")
    xdg = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(xdg) / "nbdserve"


def parse_listener(value, path: str) -> Listener:
    if isinstance(value, str):
        value = {"unix": value} if value.startswith("/") else {"tcp": value}
    section = Section(value, path)
    if "unix" in section:
        listener = Listener("unix", path=section.str("unix"))
    else:
        address = section.str("tcp", required=True)
        try:
            host, port = split_host_port(address)
        except ValueError as exc:
            raise section.error("tcp", str(exc)) from None
        listener = Listener("tcp", host, port)
    section.done()
    return listener


def split_host_port(address: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """`127.0.0.1:10809`, `[::1]:10809`, `localhost` -> (host, port)."""
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        port_text = rest.removeprefix(":")
    elif address.count(":") == 1:
        host, port_text = address.split(":")
    else:
        host, port_text = address, ""
    if not port_text:
        return host or DEFAULT_HOST, default_port
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"bad port in {address!r}")
    return host or DEFAULT_HOST, int(port_text)


def parse_export(name: str, value, path: str, context: ParseContext) -> ExportConfig:
    section = Section(value, path)
    cache = section.choice("cache", CACHE_MODES, "writeback")
    format_name = section.str("format", "raw")
    try:
        format_driver = registry.driver(FORMATS, format_name)
    except KeyError as exc:
        raise section.error("format", exc.args[0]) from None
    format_config = format_driver.parse(section.section("format-options"), context)
    if "source" not in section:
        raise section.error("source", "is required")
    source_driver, source_config = registry.parse_source(
        section.raw("source"), section.key_path("source"), context
    )
    config = ExportConfig(
        name=name,
        source_driver=source_driver,
        source_config=source_config,
        format_driver=format_driver,
        format_config=format_config,
        options=OpenOptions(read_only=section.bool("read-only"), cache=CacheMode(cache)),
        description=section.str("description", ""),
        access=parse_access(section),
    )
    section.done()
    return config


def parse_metrics(section: Section) -> Listener | None:
    address = section.str("listen")
    section.done()
    if address is None:
        return None
    try:
        host, port = split_host_port(address, default_port=0)
    except ValueError as exc:
        raise section.error("listen", str(exc)) from None
    if not port:
        raise section.error("listen", f"needs a port: {address!r}")
    return Listener("tcp", host, port)


def export_provider(export: ExportConfig) -> ExportProvider | None:
    """The provider of many exports a source names (every LV of a volume group), if it does."""
    make = getattr(export.source_driver, "provider", None)
    return make(export) if make else None


def parse_limits(section: Section) -> Limits:
    defaults = Limits()
    limits = Limits(
        max_payload=section.size("max-payload", defaults.max_payload),
        max_in_flight=section.int("max-in-flight", defaults.max_in_flight, minimum=1),
        shutdown_grace=section.number("shutdown-grace", defaults.shutdown_grace),
        max_connections=section.int("max-connections", defaults.max_connections, minimum=1),
        max_connections_per_client=section.int(
            "max-connections-per-client", defaults.max_connections_per_client, minimum=1
        ),
        handshake_timeout=section.number("handshake-timeout", defaults.handshake_timeout),
        idle_timeout=section.number("idle-timeout", defaults.idle_timeout),
    )
    if limits.max_payload < 1024 * 1024:
        raise section.error("max-payload", "must be at least 1M (the spec's floor for clients)")
    section.done()
    return limits


def parse_config(mapping, *, config_dir: Path | None = None, paths_from: Path | None = None) -> ServerConfig:
    """`paths_from`: where relative source paths start (default: the state directory)."""
    root = Section(mapping)
    state_dir = root.str("state-dir")
    state_dir = Path(state_dir) if state_dir else default_state_dir()
    if config_dir and not state_dir.is_absolute():
        state_dir = config_dir / state_dir
    context = ParseContext(base_dir=paths_from or state_dir)
    listeners = [
        parse_listener(item, f"listen[{index}]") for index, item in enumerate(root.list("listen"))
    ] or [Listener("tcp", DEFAULT_HOST, DEFAULT_PORT)]
    exports_section = root.section("exports")
    exports = {}
    providers = {}
    configured = []  # exports and providers' templates alike: both may list tls-subjects
    for name, value in exports_section.items():
        name = str(name)
        export = parse_export(name, value, exports_section.key_path(name), context)
        configured.append(export)
        provider = export_provider(export)
        if provider is None:
            exports[name] = export
        else:
            providers[name] = provider
    if not exports and not providers:
        raise root.error("exports", "no export is configured")
    default_export = root.str("default-export")
    if default_export is not None and default_export not in exports:
        raise root.error("default-export", f"names no configured export: {default_export!r}")
    limits = parse_limits(root.section("limits"))
    tls = parse_tls(root.raw("tls"), root.key_path("tls"), config_dir=config_dir, exports=configured)
    control = root.section("control")
    control_socket = control.str("socket")
    control.done()
    metrics = parse_metrics(root.section("metrics"))
    root.done()
    return ServerConfig(
        listeners, exports, default_export, limits, state_dir, tls,
        control_socket=Path(control_socket) if control_socket else None, metrics=metrics,
        providers=providers,
    )


def load_config(path: str | Path) -> ServerConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError("", f"cannot read {path}: {exc.strerror}") from None
    try:
        mapping = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{path} is not valid YAML: {exc}") from None
    return parse_config(mapping, config_dir=path.parent.resolve())


def default_config_path() -> Path:
    return Path(__file__).with_name("default.yaml")
