"""Certificates for TLS tests, made with trustme and laid out in QEMU's file names, and
helpers to drive STARTTLS by hand and to connect with libnbd."""

import ssl
import struct
from dataclasses import dataclass
from pathlib import Path

import nbd
import trustme
from nbd_wire import RawClient, option

from nbdserve.protocol.constants import Option, Reply

CLIENT_SUBJECT = "CN=alice,OU=VMs,O=Example"


@dataclass
class PKI:
    ca: trustme.CA
    server: Path  # --tls-dir: ca-cert.pem, server-cert.pem, server-key.pem
    anonymous: Path  # a client trusting the CA, without a certificate of its own
    alice: Path  # a client with a certificate from the CA (CLIENT_SUBJECT)
    bob: Path  # another client certificate from the CA, not on any allowlist
    stranger: Path  # a client certificate from some other CA
    untrusting: Path  # a client that trusts another CA only, so rejects the server

    def client_context(self, certificate_dir: Path | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.server / "ca-cert.pem"))
        if certificate_dir:
            context.load_cert_chain(certificate_dir / "client-cert.pem", certificate_dir / "client-key.pem")
        return context


def make_pki(root: Path) -> PKI:
    ca, other_ca = trustme.CA(), trustme.CA()
    dirs = {name: root / name for name in ("server", "anonymous", "alice", "bob", "stranger", "untrusting")}
    for path in dirs.values():
        path.mkdir(parents=True)
    server = ca.issue_cert("127.0.0.1", "localhost")
    server.cert_chain_pems[0].write_to_path(dirs["server"] / "server-cert.pem")
    server.private_key_pem.write_to_path(dirs["server"] / "server-key.pem")
    for name in ("server", "anonymous", "alice", "bob", "stranger"):
        ca.cert_pem.write_to_path(dirs[name] / "ca-cert.pem")
    other_ca.cert_pem.write_to_path(dirs["untrusting"] / "ca-cert.pem")
    for name, issuer, subject in (
        ("alice", ca, ("alice", "VMs")), ("bob", ca, ("bob", "VMs")), ("stranger", other_ca, ("alice", "VMs"))
    ):
        cert = issuer.issue_cert(f"{name}.example", common_name=subject[0], organization_name="Example",
                                 organization_unit_name=subject[1])
        cert.cert_chain_pems[0].write_to_path(dirs[name] / "client-cert.pem")
        cert.private_key_pem.write_to_path(dirs[name] / "client-key.pem")
    return PKI(ca, **dirs)


def nbds_uri(port: int, name: str, certificates: Path) -> str:
    return f"nbds://127.0.0.1:{port}/{name}?tls-certificates={certificates}"


def libnbd_connect(port: int, name: str, certificates: Path, **settings) -> nbd.NBD:
    """A libnbd handle in transmission over TLS (TLS_REQUIRE: no plaintext fallback)."""
    handle = nbd.NBD()
    handle.set_tls(nbd.TLS_REQUIRE)
    handle.set_tls_certificates(str(certificates))
    for key, value in settings.items():
        getattr(handle, f"set_{key}")(value)
    handle.set_export_name(name)
    handle.connect_tcp("127.0.0.1", str(port))
    return handle


def starttls(client: RawClient, context: ssl.SSLContext) -> None:
    """Ask for TLS on a raw client past the greeting, then speak TLS on its socket."""
    client.send(option(Option.STARTTLS))
    number, reply, _ = client.option_reply()
    assert (number, reply) == (Option.STARTTLS, Reply.ACK)
    client.sock = context.wrap_socket(client.sock, server_hostname="127.0.0.1")


def final_reply(client: RawClient, number: int, payload: bytes = b"") -> int:
    """Send one option; return the type of its final reply."""
    client.send(option(number, payload))
    return client.option_replies()[-1][1]
