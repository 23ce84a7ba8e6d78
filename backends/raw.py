"""The raw format: the image is the byte source itself."""

from nbdserve.backend import Backend, OpenOptions
from nbdserve.registry import ParseContext
from nbdserve.settings import Section


class RawFormat:
    name = "raw"

    def parse(self, section: Section, context: ParseContext) -> None:
        return None

    async def open(self, child: Backend, config: None, options: OpenOptions) -> Backend:
        return child
