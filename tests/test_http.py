"""http sources served by a real nginx (HTTP and HTTPS), seen through nbdserve by real clients."""

import json
import random
import subprocess

import pytest
from conftest import run
from http_servers import faulty_server, nginx  # noqa: F401 (fixtures)

from nbdserve.config import parse_config
from nbdserve.settings import ConfigError

IMAGE_SIZE = 8 * 1024 * 1024


@pytest.fixture(scope="module")
def image(nginx):
    """6 MiB of random data, then 2 MiB of zeroes, in nginx's root."""
    path = nginx.root / "disk.img"
    path.write_bytes(random.Random(7).randbytes(6 * 1024 * 1024) + bytes(2 * 1024 * 1024))
    return path


@pytest.fixture(scope="module")
def server(start_module_server, nginx, image):
    tls_source = {"driver": "http", "url": nginx.url("disk.img", tls=True), "ca-bundle": str(nginx.ca_path)}
    return start_module_server({"exports": {
        "plain": {"source": nginx.url("disk.img")},
        "tls": {"source": tls_source},
    }})


@pytest.mark.parametrize("export", ["plain", "tls"])
def test_qemu_img_sees_the_image(server, image, export):
    info = json.loads(run(["qemu-img", "info", "--output=json", server.uri(export)]).stdout)
    assert info["virtual-size"] == IMAGE_SIZE
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", server.uri(export), str(image)])


def test_nbdinfo_flags(server):
    info = json.loads(run(["nbdinfo", "--json", server.uri("plain")]).stdout)["exports"][0]
    assert info["export-size"] == IMAGE_SIZE
    assert info["is_read_only"] is True
    assert info["can_multi_conn"] is True
    assert info["can_cache"] is True


def test_nbdcopy_over_https(server, image, tmp_path):
    copy = tmp_path / "copy.img"
    run(["nbdcopy", server.uri("tls"), str(copy)])
    assert copy.read_bytes() == image.read_bytes()


WRITE_SCRIPT = """
import sys, nbd
h = nbd.NBD()
h.set_strict_mode(0)  # send the write anyway, so the server has to refuse it
h.connect_uri(sys.argv[1])
try:
    h.pwrite(b"x" * 512, 0)
except nbd.Error as exc:
    print(exc)
"""


def test_writes_get_eperm(server):
    result = run(["/usr/bin/python3", "-c", WRITE_SCRIPT, server.uri("plain")])
    # "command failed": the server's reply, not libnbd refusing before sending.
    assert result.stdout.strip() == "nbd_pwrite: write: command failed: Operation not permitted (EPERM)"


def test_serve_a_url_on_the_command_line(start_server, nginx, image):
    served = start_server(args=[nginx.url("disk.img")])
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", served.uri("disk.img"), str(image)])


def test_an_untrusted_certificate_fails_the_start_clearly(start_server, nginx, image):
    served = start_server({"exports": {"tls": {"source": nginx.url("disk.img", tls=True)}}}, wait=False)
    try:
        served.proc.wait(30)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"nbdserve kept running:\n{served.log()}") from None
    assert served.proc.returncode != 0
    assert "TLS certificate verification failed" in served.log()


@pytest.mark.parametrize("source, message", [
    ({"url": "ftp://example.com/x"}, "exports.d.source.url: expected an http:// or https:// URL"),
    ({"url": "http://h/x", "retries": -1}, "exports.d.source.retries: must be at least 0"),
    ({"url": "http://h/x", "user": "u"}, "exports.d.source.password-file: user and password-file go together"),
    ({"url": "http://h/x", "password-file": "/nonexistent/pw", "user": "u"},
     "exports.d.source.password-file: cannot read /nonexistent/pw"),
    ({"url": "http://h/x", "headers": {"Range": "bytes=0-1"}}, "exports.d.source.headers.Range: is set by nbdserve"),
    ({"url": "http://h/x", "read-timeout": 0}, "exports.d.source.read-timeout: must be more than 0"),
    ({"url": "http://h/x", "cache-size": "lots"}, "exports.d.source.cache-size: not a size"),
    ({"url": "http://h/x", "ca-bundle": "/nonexistent.pem"}, "exports.d.source.ca-bundle: no such file"),
    ({"url": "http://h/x", "pool": 4}, "exports.d.source.pool: unknown key"),
])
def test_config_errors_name_the_key(tmp_path, source, message):
    with pytest.raises(ConfigError) as error:
        parse_config({"state-dir": str(tmp_path), "exports": {"d": {"source": {"driver": "http", **source}}}})
    assert str(error.value).startswith(message)


def test_a_qcow2_image_over_http(start_server, nginx, image):
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(image), str(nginx.root / "disk.qcow2")])
    served = start_server(args=["-f", "qcow2", nginx.url("disk.qcow2")])
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", served.uri("disk.qcow2"), str(image)])


def test_a_writable_overlay_on_an_http_base(start_server, nginx, image, tmp_path):
    overlay = tmp_path / "overlay.qcow2"
    run(["qemu-img", "create", "-f", "qcow2", "-b", nginx.url("disk.img"), "-F", "raw", str(overlay)])
    base = image.read_bytes()
    served = start_server({"exports": {"vm": {"format": "qcow2", "source": str(overlay)}}})
    # Partial clusters: the rest of each cluster is copied from the HTTP base.
    run(["qemu-io", "-f", "raw", "-c", "write -P 0xab 1M 4k", "-c", "write -P 0xcd 7M 512", served.uri("vm")])
    expected = bytearray(base)
    expected[1 << 20 : (1 << 20) + 4096] = b"\xab" * 4096
    expected[7 << 20 : (7 << 20) + 512] = b"\xcd" * 512
    copy = tmp_path / "copy.img"
    run(["nbdcopy", served.uri("vm"), str(copy)])
    assert copy.read_bytes() == expected
    assert served.stop() == 0
    assert image.read_bytes() == base  # the base is never written
    run(["qemu-img", "check", str(overlay)])
    (tmp_path / "expected.img").write_bytes(expected)
    # QEMU reads the same overlay (and the base, with its own curl driver) the same way.
    run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(overlay), str(tmp_path / "expected.img")])


def test_a_failing_server_gives_eio_and_serving_goes_on(start_server, faulty_server, tmp_path):
    image = random.Random(9).randbytes(2 * 1024 * 1024)
    remote = faulty_server(image)
    served = start_server({"exports": {"d": {"source": {"driver": "http", "url": remote.url(), "retries": 1}}}})
    uri = served.uri("d")
    pattern = image[0]
    run(["qemu-io", "-r", "-f", "raw", "-c", f"read -P {pattern} 0 1", uri])
    remote.faults.fail_next = 100
    failed = run(["qemu-io", "-r", "-f", "raw", "-c", "read 1M 4k", uri], check=False)
    assert "Input/output error" in failed.stdout + failed.stderr
    remote.faults.fail_next = 0
    run(["qemu-io", "-r", "-f", "raw", "-c", f"read -P {image[1 << 20]} 1M 1", uri])
    assert "read failed after 2 attempts: HTTP 503" in served.log()
