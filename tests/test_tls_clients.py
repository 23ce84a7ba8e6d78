"""Real clients over TLS against `nbdserve serve --tls required --tls-dir DIR`: qemu-img,
qemu-io and qemu-system with a tls-creds-x509 object, nbdinfo, nbdcopy and nbdsh with nbds://."""

import json
import subprocess

import pytest
from conftest import run
from tls_pki import make_pki, nbds_uri

MiB = 1024 * 1024


@pytest.fixture
def tls_server(start_server, raw_image, tmp_path):
    pki = make_pki(tmp_path / "pki")
    image = raw_image(16 * MiB, data=b"\x11" * MiB)
    server = start_server(args=["--tls", "required", "--tls-dir", str(pki.server), "-x", "disk", str(image)])
    return server, pki, image


def qemu_tls(pki_dir, port: int) -> list[str]:
    """qemu's way: a tls-creds-x509 object and an nbd node that names it."""
    return [
        "--object", f"tls-creds-x509,id=tls0,dir={pki_dir},endpoint=client",
        "--image-opts", f"driver=nbd,host=127.0.0.1,port={port},export=disk,tls-creds=tls0",
    ]


def test_qemu_img_and_qemu_io(tls_server):
    server, pki, _ = tls_server
    info = json.loads(run(["qemu-img", "info", "--output=json", *qemu_tls(pki.anonymous, server.port)]).stdout)
    assert info["virtual-size"] == 16 * MiB
    # qemu-io prints failures on stdout and exits 0: check what it says.
    io = run(["qemu-io", *qemu_tls(pki.alice, server.port),
              "-c", "read -P 0x11 0 1M", "-c", "write -P 0x22 4M 1M", "-c", "read -P 0x22 4M 1M",
              "-c", "flush"]).stdout
    assert io.count("read 1048576/1048576 bytes") == 2 and "wrote 1048576/1048576" in io, io
    assert "Pattern verification failed" not in io
    # Without credentials qemu is told that TLS is required.
    plain = run(["qemu-img", "info", server.uri("disk")], check=False)
    assert plain.returncode != 0 and "TLS" in plain.stderr
    assert "TLS is required" in plain.stderr


def test_nbdinfo_and_nbdcopy(tls_server, tmp_path):
    server, pki, image = tls_server
    uri = nbds_uri(server.port, "disk", pki.anonymous)
    info = run(["nbdinfo", uri]).stdout
    assert "with TLS" in info and "export-size: 16777216" in info
    assert "disk" in run(["nbdinfo", "--list", nbds_uri(server.port, "", pki.anonymous)]).stdout
    copy = tmp_path / "copy.img"
    run(["nbdcopy", uri, str(copy)])
    assert copy.read_bytes() == image.read_bytes()
    source = tmp_path / "source.img"
    source.write_bytes(b"\x33" * (16 * MiB))
    run(["nbdcopy", str(source), uri])
    assert image.read_bytes() == source.read_bytes()
    # nbdsh (run as /usr/bin/python3 -m nbd: plain `nbdsh` finds the wrong python3 here).
    nbdsh = run(["/usr/bin/python3", "-m", "nbd", "-c", "h.set_uri_allow_local_file(True)",
                 "-c", f"h.connect_uri({uri!r})", "-c", "print(h.get_size(), h.get_tls_negotiated())"])
    assert nbdsh.stdout.split() == ["16777216", "True"]
    # Plaintext nbd:// cannot get in.
    assert run(["nbdinfo", server.uri("disk")], check=False).returncode != 0


def test_qemu_system(tls_server):
    """A QEMU machine with an NBD node over TLS, driven through QMP: the path a guest's disk takes."""
    server, pki, _ = tls_server
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none", "-qmp", "stdio",
         "-object", f"tls-creds-x509,id=tls0,dir={pki.alice},endpoint=client",
         "-blockdev", f"driver=nbd,node-name=disk0,server.type=inet,server.host=127.0.0.1,"
                      f"server.port={server.port},export=disk,tls-creds=tls0"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )

    def qmp(command: str, **arguments) -> str:
        """Run a QMP command; return what it printed (qemu-io writes to stdout, not to QMP)."""
        qemu.stdin.write(json.dumps({"execute": command, "arguments": arguments}) + "\n")
        qemu.stdin.flush()
        printed = []
        while line := qemu.stdout.readline():
            if not line.startswith("{"):
                printed.append(line)
            elif "return" in (message := json.loads(line)):
                return "".join(printed)
            else:
                assert "error" not in message, message
        raise AssertionError(f"QEMU exited during {command}: {''.join(printed)}")

    try:
        assert "QMP" in json.loads(qemu.stdout.readline())  # the greeting
        qmp("qmp_capabilities")
        for io in ("write -P 0x44 1M 64k", "read -P 0x44 1M 64k", "read -P 0x11 0 64k"):
            output = qmp("human-monitor-command", **{"command-line": f'qemu-io disk0 "{io}"'})
            assert "65536/65536 bytes" in output and "Pattern verification failed" not in output, output
        qmp("quit")
        assert qemu.wait(10) == 0
    finally:
        if qemu.poll() is None:
            qemu.kill()
            qemu.wait()
    assert "client certificate: none" in server.log()
