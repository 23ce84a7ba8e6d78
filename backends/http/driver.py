"""The `http` source driver: URLs on the command line, `driver: http` in the config."""

import logging

from nbdserve.backend import OpenOptions
from nbdserve.malloc import keep_freed_buffers
from nbdserve.registry import ParseContext
from nbdserve.settings import Section

from . import config as http_config
from .backend import HttpBackend
from .config import HttpConfig
from .fetchers import Fetchers

log = logging.getLogger(__name__)


class HttpDriver:
    name = "http"

    def claims(self, spec: str) -> dict | None:
        return http_config.claims(spec)

    def parse(self, section: Section, context: ParseContext) -> HttpConfig:
        return http_config.parse(section, context)

    async def open(self, config: HttpConfig, options: OpenOptions) -> HttpBackend:
        if not config.verify and config.ca_bundle is None:
            log.warning("http source %s: TLS certificates are NOT verified (verify: false)", config.display_url)
        keep_freed_buffers()  # fetched bodies are MiBs each: reused, not mapped anew
        fetchers = Fetchers(config)
        await fetchers.start()
        return HttpBackend(fetchers, config)
