"""`nbdserve serve SOURCE` with qemu-nbd's flags, seen by real clients."""

import os
import json

import pytest

from conftest import run
from nbdserve import __version__
from nbdserve.cli import main


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


def test_no_source_serves_the_default_scratch_disk(start_server, tmp_path):
    state = tmp_path / "state"
    # No SOURCE, no --config: the shipped default config, with -p (from start_server) for its port.
    server = start_server(args=[], env={"STATE_DIRECTORY": str(state)})
    scratch = state / "scratch.img"
    assert scratch.stat().st_size == 10 * 1024**3
    assert scratch.stat().st_blocks == 0  # sparse
    info = json.loads(run(["qemu-img", "info", "--output=json", f"nbd://127.0.0.1:{server.port}"]).stdout)
    assert info["virtual-size"] == 10 * 1024**3
    mapped = run(["nbdinfo", "--map", "--totals", f"nbd://127.0.0.1:{server.port}"]).stdout.split()
    assert mapped == [str(10 * 1024**3), "100.0%", "3", "hole,zero"]
    hint = f"kvm -drive file=nbd:127.0.0.1:{server.port}:exportname=scratch,format=raw"
    assert hint in server.log()
    assert server.stop() == 0
    # A second start keeps the disk and what was written to it.
    with open(scratch, "r+b") as f:
        f.write(b"kept")
    server = start_server(args=[], env={"STATE_DIRECTORY": str(state)})
    run(["qemu-io", "-f", "raw", "-c", "read -P 0 4 4092", f"nbd://127.0.0.1:{server.port}/scratch"])
    with open(scratch, "rb") as f:
        assert f.read(4) == b"kept"


def test_no_source_with_a_unix_socket(start_server, tmp_path):
    server = start_server(args=[], env={"STATE_DIRECTORY": str(tmp_path)}, unix=True)
    info = json.loads(run(["nbdinfo", "--json", server.uri("scratch")]).stdout)
    assert info["exports"][0]["export-size"] == 10 * 1024**3
    # -k replaced the default listener: nothing was bound on the default TCP port.
    assert "127.0.0.1:10809" not in server.log()


def test_read_only_cache_and_description_flags(start_server, raw_image):
    image = raw_image(1024 * 1024)
    server = start_server(args=["-r", "--cache", "none", "-D", "from the CLI", str(image)])
    info = json.loads(run(["nbdinfo", "--json", server.uri()]).stdout)["exports"][0]
    assert info["is_read_only"] is True
    assert info["description"] == "from the CLI"
    assert info["block_size_minimum"] == 4096  # O_DIRECT alignment


def test_version_and_help(capsys):
    for args in (["--version"], ["serve", "--help"]):
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"nbdserve {__version__}\n")
    for flag in ("--export-name", "--bind", "--port", "--socket", "--format", "--cache", "--read-only"):
        assert flag in out


def test_relative_source_is_read_from_the_current_directory(start_server, raw_image):
    image = raw_image(3 * 1024 * 1024)
    server = start_server(args=[os.path.relpath(image)])  # the server runs in our directory
    assert run(["nbdinfo", "--size", server.uri()]).stdout.strip() == str(3 * 1024 * 1024)
