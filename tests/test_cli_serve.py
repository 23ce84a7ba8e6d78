"""`nbdserve serve SOURCE` with qemu-nbd's flags, seen by real clients."""

import json

from conftest import run


def test_serve_file_default_export(start_server, raw_image):
    image = raw_image(32 * 1024 * 1024)
    server = start_server(args=[str(image)])
    # A lone export is also the default export: no name needed.
    info = json.loads(run(["qemu-img", "info", "--output=json", server.uri()]).stdout)
    assert info["virtual-size"] == 32 * 1024 * 1024
    info = json.loads(run(["nbdinfo", "--json", server.uri("disk.img")]).stdout)
    assert info["exports"][0]["export-size"] == 32 * 1024 * 1024


def test_export_name_flag_and_unknown_name(start_server, raw_image):
    server = start_server(args=["-x", "vm1", str(raw_image())])
    run(["nbdinfo", "--size", server.uri("vm1")])
    missing = run(["nbdinfo", "--size", server.uri("nope")], check=False)
    assert missing.returncode != 0
    assert "nope" in missing.stderr
