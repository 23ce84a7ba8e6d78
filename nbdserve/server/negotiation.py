"""How the server answers each handshake option: the policy over the sans-IO state machine."""

import dataclasses
import logging
import struct

from ..access import Client, Verdict
from ..catalog import Catalog, ExportUnavailable
from ..export import Export
from ..protocol.constants import ALLOCATION_DEPTH, BASE_ALLOCATION, Info, Option, Reply
from ..protocol.handshake import (
    AbortRequest,
    ExportNameRequest,
    InfoRequest,
    InvalidOption,
    ListRequest,
    MetaContextRequest,
    OversizedOption,
    ServerHandshake,
    StartTLSRequest,
    StructuredReplyRequest,
    UnsupportedOption,
)
from .tls import TLSConfig, TLSMode

log = logging.getLogger(__name__)

# Metadata contexts this server offers, by id.
CONTEXTS = {1: BASE_ALLOCATION, 2: ALLOCATION_DEPTH}


def matching_contexts(queries: tuple[str, ...], *, select: bool) -> list[tuple[int, str]]:
    """Contexts a LIST (wildcards allowed) or SET (exact names only) query names."""
    if not queries:
        return [] if select else list(CONTEXTS.items())
    found = []
    for context_id, name in CONTEXTS.items():
        namespace = name.split(":", 1)[0] + ":"
        if name in queries or (not select and namespace in queries):
            found.append((context_id, name))
    return found


class Negotiator:
    """Answers options until the client picks an export (`self.export`) or hangs up."""

    def __init__(
        self, handshake: ServerHandshake, catalog: Catalog, tls: TLSConfig | None = None,
        client: Client | None = None,
    ) -> None:
        self.handshake = handshake
        self.catalog = catalog
        self.tls = tls or TLSConfig()
        self.client = client or Client()
        self.export: Export | None = None
        self.export_name = ""
        self.block_size_agreed = False

    async def answer(self, event) -> bytes:
        hs = self.handshake
        if isinstance(event, (InvalidOption, OversizedOption)) and event.option == Option.EXPORT_NAME:
            hs.close()  # EXPORT_NAME has no error reply: hang up
            return b""
        if self._tls_required_first(hs.option):
            if hs.option == Option.EXPORT_NAME:
                log.info("%s: EXPORT_NAME before STARTTLS, hanging up", self.client)
                hs.close()
                return b""
            return hs.send_error(Reply.ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS first")
        match event:
            case ExportNameRequest(name=name):
                export = await self._lookup(name)
                if isinstance(export, Export):
                    self._choose(name, export)
                    return hs.send_export_name_reply(
                        export.size, export.transmission_flags(structured=hs.structured_replies)
                    )
                log.info("EXPORT_NAME %r refused: %s", name, export[1])
                hs.close()
                return b""
            case AbortRequest():
                return hs.send_ack()
            case ListRequest():
                await self.catalog.discover()
                entries = b"".join(
                    hs.send_server(name, self.catalog.description(name))
                    for name in self.catalog.names()
                    if self.catalog.check(name, self.client) is Verdict.ALLOWED
                )
                return entries + hs.send_ack()
            case StartTLSRequest():
                if not self.tls.enabled:
                    return hs.send_error(Reply.ERR_UNSUP, "TLS is not configured on this server")
                return hs.send_ack()
            case StructuredReplyRequest():
                return hs.send_ack()
            case InfoRequest():
                return await self._info(event)
            case MetaContextRequest():
                return await self._meta_context(event)
            case UnsupportedOption(option=option):
                return hs.send_error(Reply.ERR_UNSUP, f"option {option} is not supported")
            case InvalidOption(message=message):
                return hs.send_error(Reply.ERR_INVALID, message)
            case OversizedOption(length=length):
                return hs.send_error(Reply.ERR_TOO_BIG, f"option of {length} bytes is too long")
        raise AssertionError(f"unhandled handshake event {event!r}")

    def _tls_required_first(self, option: int) -> bool:
        """FORCEDTLS: before TLS, every option but STARTTLS and ABORT is refused."""
        return (
            self.tls.mode is TLSMode.REQUIRED
            and not self.handshake.tls_active
            and option not in (Option.STARTTLS, Option.ABORT)
        )

    def tls_started(self, subject: str | None) -> None:
        """The stream is now TLS: forget everything negotiated in plaintext (CVE-2021-3716)."""
        self.handshake.tls_established()
        self.block_size_agreed = False
        self.client = dataclasses.replace(self.client, tls=True, subject=subject)

    async def _lookup(
        self, name: str, *, needs_tls: Reply = Reply.ERR_TLS_REQD
    ) -> Export | tuple[Reply, str]:
        """The export, or the error to reply. `needs_tls` answers for a TLS-only export before
        TLS: the spec allows ERR_TLS_REQD only for INFO, GO and EXPORT_NAME."""
        # Vetted before the catalog is touched: a refused client never causes an open, and
        # sees the same answer as for a name that does not exist.
        await self.catalog.discover(name)  # an export found at GO time, an LV made since LIST
        verdict = self.catalog.check(name, self.client)
        if verdict is Verdict.NEEDS_TLS:
            return needs_tls, f"export {name!r} needs TLS with a client certificate"
        if verdict is Verdict.DENIED:
            log.info("%s: export %r refused (unknown or not allowed)", self.client, name)
            return Reply.ERR_UNKNOWN, f"no export named {name!r}"
        try:
            export = await self.catalog.get(name)
        except ExportUnavailable as exc:
            return Reply.ERR_UNKNOWN, str(exc)
        if export is None:
            return Reply.ERR_UNKNOWN, f"no export named {name!r}"
        return export

    def _choose(self, name: str, export: Export) -> None:
        self.export = export
        self.export_name = name

    async def _info(self, event: InfoRequest) -> bytes:
        hs = self.handshake
        export = await self._lookup(event.name)
        if not isinstance(export, Export):
            return hs.send_error(*export)
        flags = export.transmission_flags(structured=hs.structured_replies)
        replies = [
            hs.send_info(Info.EXPORT, struct.pack(">QH", export.size, flags)),
            # Always sent: clients must ignore what they did not ask for, and it lets
            # QEMU pick aligned requests for O_DIRECT exports.
            hs.send_info(
                Info.BLOCK_SIZE,
                struct.pack(">III", export.min_block, export.preferred_block, export.max_payload),
            ),
        ]
        if Info.NAME in event.requests:
            replies.append(hs.send_info(Info.NAME, self.catalog.resolve(event.name).encode()))
        if Info.DESCRIPTION in event.requests and export.description:
            replies.append(hs.send_info(Info.DESCRIPTION, export.description.encode()))
        if event.go:
            self._choose(event.name, export)
            self.block_size_agreed = Info.BLOCK_SIZE in event.requests
        replies.append(hs.send_ack())
        return b"".join(replies)

    async def _meta_context(self, event: MetaContextRequest) -> bytes:
        hs = self.handshake
        if not hs.structured_replies:
            return hs.send_error(Reply.ERR_INVALID, "negotiate structured replies first")
        for query in event.queries:
            if ":" not in query:
                return hs.send_error(Reply.ERR_INVALID, f"query {query!r} has no namespace")
        export = await self._lookup(event.name, needs_tls=Reply.ERR_UNKNOWN)
        if not isinstance(export, Export):
            return hs.send_error(*export)
        hs.begin_meta_context_reply()
        replies = [
            hs.send_meta_context(context_id if event.select else 0, name)
            for context_id, name in matching_contexts(event.queries, select=event.select)
        ]
        replies.append(hs.send_ack())
        return b"".join(replies)
