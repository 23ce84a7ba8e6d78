"""TLS for NBD_OPT_STARTTLS: the config, the server's SSLContext, and the in-session upgrade.

Certificates come from one directory with QEMU's file names (tls-creds-x509's `dir=`), so an
existing qemu-nbd certificate directory works unchanged. TLS 1.2 is the oldest version accepted,
as the NBD spec asks.
"""

import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import trio

from ..access import normalize_subject
from ..export import ExportConfig
from ..protocol.errors import ProtocolError
from ..settings import ConfigError, Section

CA_CERT = "ca-cert.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"

# RFC 4514's short names for the attributes Python's ssl module names in full.
_SHORT_NAMES = {
    "commonName": "CN",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
}


class TLSMode(Enum):
    OFF = "off"  # STARTTLS is refused (the spec's NOTLS)
    OPTIONAL = "optional"  # clients choose (SELECTIVETLS; exports with tls-subjects need TLS)
    REQUIRED = "required"  # nothing but STARTTLS and ABORT before TLS (FORCEDTLS)


TLS_MODES = [mode.value for mode in TLSMode]


@dataclass(frozen=True)
class TLSConfig:
    mode: TLSMode = TLSMode.OFF
    directory: Path | None = None
    verify_peer: bool = False  # every client must present a certificate signed by ca-cert.pem
    # Built while the config is read, so a missing or broken file is a config error at start.
    context: ssl.SSLContext | None = None

    @property
    def enabled(self) -> bool:
        return self.mode is not TLSMode.OFF


class TLSHandshakeError(ProtocolError):
    """The TLS handshake after STARTTLS failed; the session cannot go on in plaintext."""


def parse_tls(
    value, path: str, *, config_dir: Path | None, exports: Iterable[ExportConfig]
) -> TLSConfig:
    """`tls: off|optional|required`, or a mapping with `mode`, `dir` and `verify-peer`.

    When an export lists certificate subjects, clients are asked for a certificate (verified
    against the CA) even without verify-peer.
    """
    client_certificates = any(export.access.tls_subjects for export in exports)
    if value is None or value is False or isinstance(value, str):
        value = {"mode": value}
    section = Section(value, path)
    if section.raw("mode") in (None, False):  # YAML reads a bare `off` as false
        mode = TLSMode.OFF
    else:
        mode = TLSMode(section.choice("mode", TLS_MODES))
    directory = section.str("dir")
    if directory is not None:
        directory = Path(directory)
        if config_dir and not directory.is_absolute():
            directory = config_dir / directory
    verify_peer = section.bool("verify-peer")
    section.done()
    if mode is TLSMode.OFF:
        if client_certificates:
            raise ConfigError(path, "exports list tls-subjects, so TLS must be optional or required")
        return TLSConfig(directory=directory, verify_peer=verify_peer)  # for --tls to turn on
    if directory is None:
        raise section.error("dir", f"is required with TLS: a directory with {SERVER_CERT} and {SERVER_KEY}")
    ask_for_certificate = verify_peer or client_certificates
    needed = [SERVER_CERT, SERVER_KEY] + [CA_CERT] * ask_for_certificate
    missing = [name for name in needed if not (directory / name).is_file()]
    if missing:
        raise section.error("dir", f"{directory} has no {' and no '.join(missing)}")
    try:
        context = server_context(directory, verify_peer=verify_peer, ask_for_certificate=ask_for_certificate)
    except (OSError, ssl.SSLError) as exc:
        raise section.error("dir", f"cannot load the certificates in {directory}: {exc}") from None
    return TLSConfig(mode, directory, verify_peer, context)


def server_context(directory: Path, *, verify_peer: bool, ask_for_certificate: bool) -> ssl.SSLContext:
    """Client certificates are asked for (and verified) with `ask_for_certificate`, and
    required with `verify_peer`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION
    context.num_tickets = 0  # no session resumption: every connection is a fresh handshake
    context.load_cert_chain(directory / SERVER_CERT, directory / SERVER_KEY)
    if ask_for_certificate:
        context.load_verify_locations(directory / CA_CERT)
        context.verify_mode = ssl.CERT_REQUIRED if verify_peer else ssl.CERT_OPTIONAL
    return context


async def start_tls(stream: trio.abc.Stream, config: TLSConfig) -> trio.SSLStream:
    """Run the server side of the TLS handshake over `stream` (after STARTTLS was acknowledged)."""
    tls_stream = trio.SSLStream(stream, config.context, server_side=True)
    try:
        await tls_stream.do_handshake()
    except trio.BrokenResourceError as exc:
        raise TLSHandshakeError(f"TLS handshake failed: {exc.__cause__ or exc}") from exc
    return tls_stream


def peer_subject(tls_stream: trio.SSLStream) -> str | None:
    """The verified client certificate's subject as RFC 4514 text (`CN=alice,O=Example`), as
    `openssl x509 -noout -subject -nameopt RFC2253` prints it; None without a certificate."""
    certificate = tls_stream.getpeercert()
    if not certificate:
        return None
    # RFC 4514 lists the most specific name first: the reverse of the certificate's order.
    rdns = [
        "+".join(f"{_SHORT_NAMES.get(key, key)}={_escape(value)}" for key, value in rdn)
        for rdn in reversed(certificate.get("subject", ()))
    ]
    return normalize_subject(",".join(rdns))


def _escape(value: str) -> str:
    escaped = "".join(f"\\{char}" if char in ',+"\\<>;' else char for char in value)
    if escaped.startswith(("#", " ")):
        escaped = "\\" + escaped
    if escaped.endswith(" "):
        escaped = escaped[:-1] + "\\ "
    return escaped


def tls_from_flags(
    current: TLSConfig, exports: Iterable[ExportConfig], mode: str | None, directory: str | None
) -> TLSConfig:
    """The command line's --tls and --tls-dir over the config's `tls` section."""
    if mode is None and directory is None:
        return current
    settings = {
        "mode": mode or current.mode.value,
        "dir": directory or (str(current.directory) if current.directory else None),
        "verify-peer": current.verify_peer,
    }
    return parse_tls(settings, "tls", config_dir=Path.cwd(), exports=exports)
