"""Per-export access lists by client address, and export names that are only ever names.

Clients connect from different loopback addresses (127.0.0.1, 127.0.0.2) to one server; an
export a client may not use must look exactly like one that does not exist.
"""

import ipaddress

import nbd
import pytest
from nbd_wire import RawClient, info_payload, option

from nbdserve.access import Client, Verdict, parse_access
from nbdserve.protocol.constants import Option, Reply
from nbdserve.settings import ConfigError, Section

HERE, THERE = "127.0.0.1", "127.0.0.2"


def config_for(image, exports: dict) -> dict:
    return {"exports": {name: {"source": {"driver": "file", "path": str(image)}, **settings}
                        for name, settings in exports.items()}}


def info(client: RawClient, name: str) -> tuple[int, bytes]:
    """The final reply to NBD_OPT_INFO for `name`: (type, payload)."""
    client.send(option(Option.INFO, info_payload(name)))
    _, reply, payload = client.option_replies()[-1]
    return reply, payload


def listing(client: RawClient) -> list[str]:
    client.send(option(Option.LIST))
    return sorted(payload[4:].decode() for _, reply, payload in client.option_replies() if reply == Reply.SERVER)


def test_address_lists(start_server, raw_image):
    server = start_server(config_for(raw_image(), {
        "open": {},
        "there-only": {"allow": [f"{THERE}/32"]},
        "not-here": {"allow": ["127.0.0.0/8"], "deny": [HERE]},
    }))
    with RawClient(server.port, source=HERE) as here, RawClient(server.port, source=THERE) as there:
        here.start()
        there.start()
        assert listing(here) == ["open"]
        assert listing(there) == ["not-here", "open", "there-only"]
        unknown = info(here, "no-such-export")
        for name in ("there-only", "not-here"):
            # The same answer as for a name that does not exist, bar the name itself.
            reply, message = info(here, name)
            assert reply == unknown[0] == Reply.ERR_UNKNOWN
            assert message.replace(name.encode(), b"X") == unknown[1].replace(b"no-such-export", b"X")
            assert info(there, name)[0] == Reply.ACK
        assert info(here, "open")[0] == Reply.ACK
    with RawClient(server.port, source=HERE) as here:
        here.start()
        here.send(option(Option.EXPORT_NAME, b"there-only"))
        assert here.is_closed_by_server()
    handle = nbd.NBD()
    with pytest.raises(nbd.Error):
        handle.connect_uri(server.uri("there-only"))
    assert "export 'there-only' refused (unknown or not allowed)" in server.log()


def test_unix_socket_clients(start_server, raw_image):
    server = start_server(config_for(raw_image(), {
        "local": {"allow": ["unix"]}, "tcp-only": {"allow": ["127.0.0.0/8"]}, "no-unix": {"deny": ["unix"]},
    }), unix=True)
    handle = nbd.NBD()
    handle.set_opt_mode(True)
    handle.connect_uri(server.uri())
    names = []
    handle.opt_list(lambda name, description: names.append(name))
    handle.opt_abort()
    assert names == ["local"]


def test_export_names_are_never_paths(start_server, raw_image):
    image = raw_image(name="disk.img")
    server = start_server(config_for(image, {"disk": {}}))
    with RawClient(server.port) as client:
        client.start()
        for name in (
            "../../etc/passwd", "/etc/passwd", "disk/../disk", "./disk", "disk.img", "..", "/",
            "%2e%2e/etc/passwd", "disk\\..\\disk", str(image), "disk ", "DISK", "disk\0",
        ):
            assert info(client, name)[0] == Reply.ERR_UNKNOWN, name
        assert info(client, "disk")[0] == Reply.ACK


def test_access_rules():
    access = parse_access(Section({
        "allow": ["192.0.2.0/24", "2001:db8::/32", "10.1.2.3", "unix"], "deny": ["192.0.2.7"],
    }, "exports.vm"))
    assert access.check(Client.from_ip("192.0.2.1")) is Verdict.ALLOWED
    assert access.check(Client.from_ip("192.0.2.7")) is Verdict.DENIED
    assert access.check(Client.from_ip("::ffff:192.0.2.1")) is Verdict.ALLOWED  # dual-stack socket
    assert access.check(Client.from_ip("::ffff:192.0.2.7")) is Verdict.DENIED
    assert access.check(Client.from_ip("2001:db8::1")) is Verdict.ALLOWED
    assert access.check(Client.from_ip("fe80::1%eth0")) is Verdict.DENIED
    assert access.check(Client.from_ip("10.1.2.4")) is Verdict.DENIED
    assert access.check(Client(unix=True)) is Verdict.ALLOWED
    assert access.check(Client()) is Verdict.DENIED  # address unknown
    subjects = parse_access(Section({"tls-subjects": ["CN=alice, O=Example"]}, "exports.vm"))
    assert subjects.check(Client(ipaddress.ip_address("10.0.0.1"))) is Verdict.NEEDS_TLS
    assert subjects.check(Client(tls=True, subject="CN=alice,O=Example")) is Verdict.ALLOWED
    assert subjects.check(Client(tls=True, subject="CN=bob,O=Example")) is Verdict.DENIED
    assert subjects.check(Client(tls=True)) is Verdict.DENIED
    with pytest.raises(ConfigError, match=r"exports.vm.allow\[1\]: not an address or network: '10.0.0.300'"):
        parse_access(Section({"allow": ["10.0.0.0/8", "10.0.0.300"]}, "exports.vm"))
    with pytest.raises(ConfigError, match=r"exports.vm.tls-subjects\[0\]: expected a subject"):
        parse_access(Section({"tls-subjects": ["alice"]}, "exports.vm"))
