"""Settings of an http source, read from the config with errors naming the key path.

Secrets (a password or a bearer token) come from files, so they stay out of the config, the
command line and the logs; they are kept out of repr() too.
"""

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from nbdserve.registry import ParseContext
from nbdserve.settings import Section

BLOCK_SIZE = 4096  # the unit of caching and fetching: a random read fetches little more
# Headers nbdserve sets itself: a configured value would break range reads.
_RESERVED_HEADERS = {"range", "accept-encoding", "host", "content-length"}


@dataclass(frozen=True)
class HttpConfig:
    url: str = field(repr=False)  # may carry a signature in its query string
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    retries: int = 5  # further attempts after a failure, with backoff, before EIO
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    cookies: dict[str, str] = field(default_factory=dict, repr=False)
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    ca_bundle: Path | None = None
    verify: bool = True
    proxy: str | None = field(default=None, repr=False)
    cache_size: int = 64 * 1024 * 1024
    readahead: int = 2 * 1024 * 1024
    pool_size: int = 4

    @property
    def display_url(self) -> str:
        return display_url(self.url)


def display_url(url: str) -> str:
    """The URL for logs and messages: no user:password@, no query (presigned URLs sign there)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "…" if parts.query else "", ""))


def claims(spec: str) -> dict | None:
    if spec.lower().startswith(("http://", "https://")):
        return {"driver": "http", "url": spec}
    return None


def parse(section: Section, context: ParseContext) -> HttpConfig:
    defaults = HttpConfig(url="")
    url = section.str("url", required=True)
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise section.error("url", f"expected an http:// or https:// URL, got {display_url(url)!r}")
    user = section.str("user")
    password = _secret(section, "password-file", context)
    token = _secret(section, "token-file", context)
    if (user is None) != (password is None):
        raise section.error("user" if user is None else "password-file",
                            "user and password-file go together (basic auth)")
    if token is not None and user is not None:
        raise section.error("token-file", "give either token-file (bearer) or user and password-file")
    ca_bundle = section.str("ca-bundle")
    proxy = section.str("proxy")
    if proxy is not None and urlsplit(proxy).scheme.lower() not in ("http", "https", "socks5", "socks5h"):
        raise section.error("proxy", "expected a proxy URL such as http://proxy.example:3128")
    config = HttpConfig(
        url=url,
        connect_timeout=_positive(section, "connect-timeout", defaults.connect_timeout),
        read_timeout=_positive(section, "read-timeout", defaults.read_timeout),
        retries=section.int("retries", defaults.retries, minimum=0),
        headers=_headers(section),
        cookies=_string_map(section, "cookies"),
        user=user,
        password=password,
        token=token,
        ca_bundle=_resolve(Path(ca_bundle), context) if ca_bundle else None,
        verify=section.bool("verify", defaults.verify),
        proxy=proxy,
        cache_size=section.size("cache-size", defaults.cache_size),
        readahead=section.size("readahead", defaults.readahead),
        pool_size=section.int("pool-size", defaults.pool_size, minimum=1),
    )
    if config.ca_bundle is not None and not config.ca_bundle.is_file():
        raise section.error("ca-bundle", f"no such file: {config.ca_bundle}")
    return config


def _resolve(path: Path, context: ParseContext) -> Path:
    return path if path.is_absolute() else context.base_dir / path


def _secret(section: Section, key: str, context: ParseContext) -> str | None:
    name = section.str(key)
    if name is None:
        return None
    path = _resolve(Path(name), context)
    try:
        secret = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise section.error(key, f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not secret or "\n" in secret:
        raise section.error(key, f"{path} must hold the secret on one line")
    return secret


def _positive(section: Section, key: str, default: float) -> float:
    value = section.number(key, default)
    if value <= 0:
        raise section.error(key, f"must be more than 0 seconds, got {value}")
    return float(value)


def _string_map(section: Section, key: str) -> dict[str, str]:
    mapping = section.section(key)
    result = {}
    for name, value in mapping.items():
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise mapping.error(str(name), f"expected a string, got {type(value).__name__}")
        if any(c in f"{name}{value}" for c in "\r\n\0"):
            raise mapping.error(str(name), "must not contain line breaks")
        result[str(name)] = str(value)
    return result


def _headers(section: Section) -> dict[str, str]:
    headers = _string_map(section, "headers")
    for name in headers:
        if name.lower() in _RESERVED_HEADERS:
            raise section.section("headers").error(name, "is set by nbdserve and cannot be configured")
    return headers
