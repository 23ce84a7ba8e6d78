"""The `http` source driver: URLs on the command line, `driver: http` in the config."""

import logging

import trio

from nbdserve.backend import OpenOptions
from nbdserve.registry import ParseContext
from nbdserve.settings import Section

from . import config as http_config
from .backend import HttpBackend
from .config import HttpConfig
from .remote import RemoteImage

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
        remote = RemoteImage(config)
        try:
            await trio.to_thread.run_sync(remote.probe)
        except BaseException:
            remote.close()
            raise
        return HttpBackend(remote, config)
