"""Who may use an export: client address lists (CIDR allow and deny) and certificate subjects.

Checked when a client names an export, before anything is opened or revealed for it: an export
a client may not use looks to it exactly like one that does not exist (nbdkit's CVE-2019-14850
was a backend opened before the client was vetted).
"""

import ipaddress
import re
from dataclasses import dataclass, field
from enum import Enum, auto

from .settings import Section

# In an address list, this word stands for clients on a unix socket (they have no IP address).
UNIX = "unix"

_SEPARATOR_SPACE = re.compile(r"\s*([=,+])\s*")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Client:
    """What the server knows about the other end: its IP address (None on a unix socket, or
    when it could not be read), and after TLS with a verified client certificate, the
    certificate's subject (RFC 4514)."""

    address: Address | None = None
    unix: bool = False
    tls: bool = False
    subject: str | None = None

    def __str__(self) -> str:
        return "unix client" if self.unix else str(self.address or "unknown client")

    @classmethod
    def from_ip(cls, text: str) -> "Client":
        address = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 scope id
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped  # a dual-stack socket's view of an IPv4 client
        return cls(address)


class Verdict(Enum):
    ALLOWED = auto()
    DENIED = auto()  # answered as if the export did not exist
    NEEDS_TLS = auto()  # allowed only over TLS with a listed client certificate


@dataclass(frozen=True)
class AddressList:
    networks: tuple[Network, ...] = ()
    unix: bool = False

    def __bool__(self) -> bool:
        return bool(self.networks) or self.unix

    def matches(self, client: Client) -> bool:
        if client.unix:
            return self.unix
        address = client.address
        return address is not None and any(address in network for network in self.networks)


@dataclass(frozen=True)
class ExportAccess:
    """An empty `allow` allows every address not denied; `deny` wins over `allow`.
    A non-empty `tls_subjects` admits only TLS clients whose certificate subject is listed."""

    allow: AddressList = field(default_factory=AddressList)
    deny: AddressList = field(default_factory=AddressList)
    tls_subjects: frozenset[str] = frozenset()

    def check(self, client: Client) -> Verdict:
        if self.deny.matches(client):
            return Verdict.DENIED
        if self.allow and not self.allow.matches(client):
            return Verdict.DENIED
        if not self.tls_subjects:
            return Verdict.ALLOWED
        if not client.tls:
            return Verdict.NEEDS_TLS
        return Verdict.ALLOWED if client.subject in self.tls_subjects else Verdict.DENIED


def parse_address_list(section: Section, key: str) -> AddressList:
    networks = []
    unix = False
    for index, item in enumerate(section.list(key)):
        if item == UNIX:
            unix = True
            continue
        try:
            networks.append(ipaddress.ip_network(str(item), strict=False))
        except ValueError:
            raise section.error(
                f"{key}[{index}]", f"not an address or network: {item!r} (expected e.g. "
                f"192.0.2.0/24, 2001:db8::/32, 10.1.2.3 or {UNIX!r})"
            ) from None
    return AddressList(tuple(networks), unix)


def parse_access(section: Section) -> ExportAccess:
    """The `allow`, `deny` and `tls-subjects` keys of an export."""
    subjects = section.list("tls-subjects")
    for index, subject in enumerate(subjects):
        if not isinstance(subject, str) or "=" not in subject:
            raise section.error(
                f"tls-subjects[{index}]", f"expected a subject like 'CN=client,O=Example', got {subject!r}"
            )
    return ExportAccess(
        allow=parse_address_list(section, "allow"),
        deny=parse_address_list(section, "deny"),
        tls_subjects=frozenset(normalize_subject(subject) for subject in subjects),
    )


def normalize_subject(subject: str) -> str:
    """`CN = a, O = b` and `CN=a,O=b` name the same subject."""
    return _SEPARATOR_SPACE.sub(r"\1", subject.strip())
