"""STARTTLS at the protocol level: FORCEDTLS refusals, the upgrade itself, what is forgotten
across it, client certificates and subject allowlists, with libnbd and hand-made traffic."""

import signal
import ssl
import struct
import time
import warnings

import nbd
import pytest
from conftest import NBDSERVE, run
from nbd_wire import RawClient, go, info_payload, meta_context_payload, option, request
from tls_pki import CLIENT_SUBJECT, final_reply, libnbd_connect, make_pki, starttls

from nbdserve.config import parse_config
from nbdserve.protocol.constants import (
    SIMPLE_REPLY_MAGIC,
    Command,
    Error,
    Option,
    Reply,
)
from nbdserve.settings import ConfigError

PATTERN = b"\xa5" * 4096


@pytest.fixture
def pki(tmp_path):
    return make_pki(tmp_path / "pki")


def tls_config(pki, image, mode="required", exports=None, **tls):
    exports = exports or {"disk": {}}
    return {
        "tls": {"mode": mode, "dir": str(pki.server), **tls},
        "exports": {name: {"source": {"driver": "file", "path": str(image)}, **settings}
                    for name, settings in exports.items()},
    }


def list_exports(handle: nbd.NBD) -> list[str]:
    names = []
    handle.opt_list(lambda name, description: names.append(name))
    return names


def assert_only_alice_gets_in(port: int, name: str, pki, refused) -> None:
    for certificates in refused:
        with pytest.raises(nbd.Error):
            libnbd_connect(port, name, certificates)
    handle = libnbd_connect(port, name, pki.alice)
    assert handle.pread(4096, 0) == PATTERN
    handle.shutdown()


def test_required_refuses_everything_before_starttls(start_server, raw_image, pki):
    server = start_server(tls_config(pki, raw_image(data=PATTERN)))
    with RawClient(server.port) as client:
        client.start()
        for number, payload in (
            (Option.LIST, b""), (Option.INFO, info_payload("disk")), (Option.GO, info_payload("disk")),
            (Option.STRUCTURED_REPLY, b""), (Option.LIST_META_CONTEXT, meta_context_payload("disk", ())),
            (Option.SET_META_CONTEXT, meta_context_payload("disk", ("base:allocation",))), (99, b""),
            (Option.INFO, info_payload("no-such-export")),
        ):
            assert final_reply(client, number, payload) == Reply.ERR_TLS_REQD, number
        assert final_reply(client, Option.ABORT) == Reply.ACK
    with RawClient(server.port) as client:
        client.start()
        client.send(option(Option.EXPORT_NAME, b"disk"))  # cannot be refused: hang up
        assert client.is_closed_by_server()
    # A client that says nothing else but STARTTLS gets everything.
    handle = libnbd_connect(server.port, "disk", pki.anonymous)
    assert handle.get_tls_negotiated()
    assert handle.pread(4096, 0) == PATTERN
    handle.pwrite(b"\x5a" * 512, 8192)
    assert handle.pread(512, 8192) == b"\x5a" * 512
    handle.shutdown()
    assert "EXPORT_NAME before STARTTLS, hanging up" in server.log()


def test_failed_tls_handshakes_end_only_that_client(start_server, raw_image, pki):
    server = start_server({**tls_config(pki, raw_image(data=PATTERN)), "limits": {"handshake-timeout": 1}})
    # STARTTLS, then silence instead of a ClientHello: dropped by the handshake timeout.
    with RawClient(server.port) as client:
        client.start()
        client.send(option(Option.STARTTLS))
        assert client.option_reply()[:2] == (Option.STARTTLS, Reply.ACK)
        start = time.monotonic()
        assert client.is_closed_by_server() and time.monotonic() - start < 3
    # Plaintext sent right behind STARTTLS would be taken as TLS-protected: hang up.
    with RawClient(server.port) as client:
        client.start()
        client.send(option(Option.STARTTLS) + option(Option.GO, info_payload("disk")))
        assert client.is_closed_by_server()  # without even an acknowledgement
    # Not TLS at all after the acknowledgement.
    with RawClient(server.port) as client:
        client.start()
        client.send(option(Option.STARTTLS))
        client.option_reply()
        client.send(b"GET / HTTP/1.0\r\n\r\n" * 10)
        assert client.is_closed_by_server()
    # TLS 1.1: older than the spec allows.
    with RawClient(server.port) as client, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old = pki.client_context()
        old.set_ciphers("DEFAULT:@SECLEVEL=0")
        old.minimum_version, old.maximum_version = ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1
        client.start()
        with pytest.raises(ssl.SSLError):
            starttls(client, old)
    # A client that does not trust our certificate gives up.
    with pytest.raises(nbd.Error):
        libnbd_connect(server.port, "disk", pki.untrusting)
    handle = libnbd_connect(server.port, "disk", pki.anonymous)
    assert handle.pread(4096, 0) == PATTERN
    handle.shutdown()
    log = server.log()
    assert "data after STARTTLS before the TLS handshake" in log
    assert "TLS handshake failed" in log
    assert "unsupported protocol" in log


def test_optional_forgets_plaintext_negotiation(start_server, raw_image, pki):
    """Structured replies and metadata contexts negotiated before STARTTLS are gone after it
    (nbdkit's CVE-2021-3716); a second STARTTLS is invalid."""
    server = start_server(tls_config(pki, raw_image(data=PATTERN), mode="optional"))
    handle = nbd.NBD()
    handle.set_tls(nbd.TLS_DISABLE)
    handle.connect_uri(server.uri("disk"))
    assert not handle.get_tls_negotiated() and handle.pread(4096, 0) == PATTERN
    handle.shutdown()
    with RawClient(server.port) as client:
        client.start()
        assert final_reply(client, Option.STRUCTURED_REPLY) == Reply.ACK
        client.send(option(Option.SET_META_CONTEXT, meta_context_payload("disk", ("base:allocation",))))
        assert [reply for _, reply, _ in client.option_replies()] == [Reply.META_CONTEXT, Reply.ACK]
        starttls(client, pki.client_context())
        assert final_reply(client, Option.STARTTLS) == Reply.ERR_INVALID
        client.send(go("disk"))
        assert client.option_replies()[-1][1] == Reply.ACK
        client.send(request(Command.READ, 0, 4096, cookie=7))
        assert struct.unpack(">I", client.receive_exact(4))[0] == SIMPLE_REPLY_MAGIC
        error, cookie = struct.unpack(">IQ", client.receive_exact(12))
        assert (error, cookie) == (0, 7) and client.receive_exact(4096) == PATTERN
        client.send(request(Command.BLOCK_STATUS, 0, 4096, cookie=8))
        assert client.simple_reply() == (Error.EINVAL, 8)


def test_tls_off_refuses_starttls(start_server, raw_image, pki):
    server = start_server(tls_config(pki, raw_image(), mode="off"))
    with RawClient(server.port) as client:
        client.start()
        assert final_reply(client, Option.STARTTLS) == Reply.ERR_UNSUP
        client.go("disk")  # plaintext goes on
    with pytest.raises(nbd.Error):
        libnbd_connect(server.port, "disk", pki.anonymous)


def test_verify_peer_wants_a_certificate_from_the_ca(start_server, raw_image, pki):
    server = start_server(tls_config(pki, raw_image(data=PATTERN), **{"verify-peer": True}))
    assert_only_alice_gets_in(server.port, "disk", pki, refused=(pki.anonymous, pki.stranger))
    assert f"client certificate: {CLIENT_SUBJECT}" in server.log()


def test_subject_allowlist(start_server, raw_image, pki):
    """An export listing certificate subjects needs TLS (SELECTIVETLS) and, over TLS, a listed
    subject; to anyone else it does not exist."""
    exports = {"public": {}, "secret": {"tls-subjects": [" CN = alice, OU=VMs,O=Example"]}}
    server = start_server(tls_config(pki, raw_image(data=PATTERN), mode="optional", exports=exports))
    with RawClient(server.port) as client:
        client.start()
        assert final_reply(client, Option.INFO, info_payload("secret")) == Reply.ERR_TLS_REQD
        assert final_reply(client, Option.INFO, info_payload("public")) == Reply.ACK
        # TLS_REQD is for INFO, GO and EXPORT_NAME only: other options find nothing.
        assert final_reply(client, Option.STRUCTURED_REPLY) == Reply.ACK
        query = meta_context_payload("secret", ("base:allocation",))
        assert final_reply(client, Option.LIST_META_CONTEXT, query) == Reply.ERR_UNKNOWN
        starttls(client, pki.client_context())
        assert final_reply(client, Option.INFO, info_payload("secret")) == Reply.ERR_UNKNOWN
    with RawClient(server.port) as client:
        client.start()
        starttls(client, pki.client_context(pki.alice))
        assert final_reply(client, Option.INFO, info_payload("secret")) == Reply.ACK

    def listing(certificates, tls=nbd.TLS_REQUIRE) -> list[str]:
        handle = nbd.NBD()
        handle.set_opt_mode(True)
        handle.set_tls(tls)
        if certificates:
            handle.set_tls_certificates(str(certificates))
        handle.connect_tcp("127.0.0.1", str(server.port))
        try:
            return sorted(list_exports(handle))
        finally:
            handle.opt_abort()

    assert listing(None, nbd.TLS_DISABLE) == ["public"]
    assert listing(pki.anonymous) == ["public"]
    assert listing(pki.bob) == ["public"]
    assert listing(pki.alice) == ["public", "secret"]
    assert_only_alice_gets_in(server.port, "secret", pki, refused=(pki.anonymous, pki.bob))


def test_sighup_loads_new_certificates(start_server, raw_image, pki, tmp_path):
    """Certificate rotation: after a reload, new connections get the new server certificate."""
    server = start_server(tls_config(pki, raw_image(data=PATTERN)))
    renewed = make_pki(tmp_path / "renewed")  # another CA altogether
    for name in ("ca-cert.pem", "server-cert.pem", "server-key.pem"):
        (pki.server / name).write_bytes((renewed.server / name).read_bytes())
    server.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reloaded" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(nbd.Error):
        libnbd_connect(server.port, "disk", pki.anonymous)  # trusts the old CA only
    handle = libnbd_connect(server.port, "disk", renewed.anonymous)
    assert handle.pread(4096, 0) == PATTERN
    handle.shutdown()


@pytest.mark.parametrize("tls, message", [
    ({"mode": "required"}, "tls.dir: is required"),
    ({"mode": "sometimes", "dir": "SERVER"}, "tls.mode: unknown value 'sometimes'"),
    ({"mode": "required", "dir": "/nonexistent"}, "tls.dir: /nonexistent has no server-cert.pem and no server-key.pem"),
    ({"mode": "required", "dir": "BROKEN"}, "tls.dir: cannot load the certificates"),
    ({"mode": "required", "dir": "SERVER", "ciphers": "x"}, "tls.ciphers: unknown key"),
    ({"mode": "required", "dir": "NO-CA", "verify-peer": True}, "server has no ca-cert.pem"),
    ({"mode": "off"}, "exports list tls-subjects, so TLS must be optional or required"),
])
def test_config_errors(tmp_path, raw_image, pki, tls, message):
    if tls.get("dir") == "NO-CA":
        (pki.server / "ca-cert.pem").unlink()
    if tls.get("dir") == "BROKEN":
        (pki.server / "server-key.pem").write_text("not a key")
    if tls.get("dir") in ("SERVER", "NO-CA", "BROKEN"):
        tls["dir"] = str(pki.server)
    config = {"tls": tls, "exports": {"disk": {"source": {"driver": "file", "path": str(raw_image())}}}}
    if tls["mode"] == "off":
        config["exports"]["disk"]["tls-subjects"] = [CLIENT_SUBJECT]
    with pytest.raises(ConfigError) as error:
        parse_config(config)
    assert message in str(error.value)


def test_yaml_off_is_off(raw_image):
    source = {"source": {"driver": "file", "path": str(raw_image())}}
    for tls in (False, "off", {"mode": False}, None):  # YAML 1.1 reads a bare `off` as false
        assert parse_config({"tls": tls, "exports": {"disk": source}}).tls.mode.value == "off"
    with pytest.raises(ConfigError, match="tls.mode: expected a string, got bool True"):
        parse_config({"tls": {"mode": True}, "exports": {"disk": source}})


def test_cli_flags_name_the_problem(raw_image, pki):
    result = run([*NBDSERVE, "serve", "--tls", "required", str(raw_image())], check=False)
    assert result.returncode == 2
    assert "tls.dir: is required with TLS" in result.stderr
