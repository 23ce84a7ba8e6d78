"""Reload on SIGHUP: exports added, removed and changed while a client of an unchanged export
keeps working; a bad config is rejected and the old one keeps serving. And check-config."""

import signal

import nbd
import pytest
from conftest import NBDSERVE, free_port, run
from service_helpers import notify, spawn, wait_for_log, write_config  # noqa: F401 (fixtures)

MiB = 1024 * 1024


@pytest.fixture
def exports(tmp_path, raw_image):
    """Three exports (keep, change, remove) and the config of a server serving them."""
    port = free_port()
    images = {name: raw_image(4 * MiB, name=f"{name}.img", data=name.encode()) for name in
              ("keep", "change", "remove", "new")}
    config = {
        "listen": [{"tcp": f"127.0.0.1:{port}"}],
        "state-dir": str(tmp_path),
        "exports": {name: {"source": {"driver": "file", "path": str(images[name])}}
                    for name in ("keep", "change", "remove")},
    }
    return port, config, tmp_path / "nbdserve.yaml"


def connect(port: int, name: str) -> nbd.NBD:
    handle = nbd.NBD()
    handle.connect_uri(f"nbd://127.0.0.1:{port}/{name}")
    return handle


def start(spawn, notify, path, config) -> tuple:
    systemd = notify()
    server = spawn(["serve", "--config", write_config(path, config)], env=systemd.env)
    systemd.wait_for("READY", "1")
    return server, systemd


def test_reload_adds_removes_and_changes_exports_without_touching_others(spawn, notify, exports):
    port, config, path = exports
    server, systemd = start(spawn, notify, path, config)
    keep, change, remove = (connect(port, name) for name in ("keep", "change", "remove"))
    keep.pwrite(b"written before the reload", MiB)
    assert not change.is_read_only()

    config["exports"]["change"]["read-only"] = True
    del config["exports"]["remove"]
    config["exports"]["new"] = {"source": {"driver": "file", "path": str(path.with_name("new.img"))}}
    write_config(path, config)
    server.send_signal(signal.SIGHUP)
    systemd.wait_for("RELOADING", "1")
    systemd.wait_for("READY", "1")
    assert "reloaded: added new; removed remove; changed change; unchanged keep" in server.log()

    # The unchanged export's connection never noticed.
    assert keep.pread(25, MiB) == b"written before the reload"
    keep.pwrite(b"and after", 2 * MiB)
    keep.flush()
    assert keep.pread(9, 2 * MiB) == b"and after"
    # Connections to the changed and the removed export were closed after their requests.
    wait_for_log(server, "export 'change': closed (reloaded)")
    wait_for_log(server, "export 'remove': closed (reloaded)")
    for handle in (change, remove):
        with pytest.raises(nbd.Error):
            handle.pread(512, 0)
    # New connections see the new config.
    changed = connect(port, "change")
    assert changed.is_read_only() and changed.pread(6, 0) == b"change"
    assert connect(port, "new").pread(3, 0) == b"new"
    with pytest.raises(nbd.Error, match="remove"):
        connect(port, "remove")
    listed = run(["nbdinfo", "--list", "--json", f"nbd://127.0.0.1:{port}"]).stdout
    assert '"keep"' in listed and '"new"' in listed and '"remove"' not in listed
    keep.shutdown()
    assert server.stop() == 0


def test_bad_config_is_rejected_and_the_old_one_keeps_serving(spawn, notify, exports):
    port, config, path = exports
    server, systemd = start(spawn, notify, path, config)
    keep = connect(port, "keep")
    config["exports"]["keep"]["cache"] = "fast"
    del config["exports"]["remove"]
    write_config(path, config)
    server.send_signal(signal.SIGHUP)
    systemd.wait_for("RELOADING", "1")
    status = systemd.wait_for("READY", "1")["STATUS"]
    error = "exports.keep.cache: unknown value 'fast' (expected writeback, writethrough, none, directsync, unsafe)"
    assert f"reload rejected, still serving the previous config: {error}" in server.log()
    # `systemctl status` shows it, as `systemctl reload` itself cannot fail.
    assert status == f"serving 3 exports to 1 connection on 127.0.0.1:{port}; last reload rejected: {error}"
    assert keep.pread(4, 0) == b"keep"
    removed = connect(port, "remove")
    assert removed.pread(6, 0) == b"remove"
    removed.shutdown()
    systemd.wait_for("STATUS", status)  # back to one connection
    # Fixed, it loads, and the status line forgets the rejection.
    del config["exports"]["keep"]["cache"]
    write_config(path, config)
    server.send_signal(signal.SIGHUP)
    systemd.wait_for("RELOADING", "1")
    assert systemd.wait_for("READY", "1")["STATUS"] == f"serving 2 exports to 1 connection on 127.0.0.1:{port}"
    assert keep.pread(4, 0) == b"keep"
    keep.shutdown()
    assert server.stop() == 0


def test_check_config_exit_codes(tmp_path, exports):
    _, config, path = exports
    write_config(path, config)
    valid = run([*NBDSERVE, "check-config", path])
    assert valid.stdout == f"{path}: valid: 3 exports (change, keep, remove) on {config['listen'][0]['tcp']}\n"

    config["exports"]["keep"]["cache"] = "fast"
    write_config(path, config)
    invalid = run([*NBDSERVE, "check-config", path], check=False)
    assert invalid.returncode == 1 and invalid.stdout == ""
    assert invalid.stderr.startswith(f"{path}: invalid: exports.keep.cache: unknown value 'fast'")

    missing = run([*NBDSERVE, "check-config", tmp_path / "missing.yaml"], check=False)
    assert missing.returncode == 1 and "cannot read" in missing.stderr
    usage = run([*NBDSERVE, "check-config"], check=False)
    assert usage.returncode == 2 and "FILE" in usage.stderr


def test_writes_in_flight_on_a_changed_export_are_kept(spawn, notify, exports):
    """The reload lands while writes to an export it changes are in flight: every write the
    server acknowledged is in the image, and the connection then ends."""
    port, config, path = exports
    server, systemd = start(spawn, notify, path, config)
    handle = connect(port, "change")
    chunk = MiB // 2
    cookies = {
        handle.aio_pwrite(nbd.Buffer.from_bytearray(bytearray([index + 1]) * chunk), index * chunk): index
        for index in range(8)
    }
    config["exports"]["change"]["read-only"] = True
    write_config(path, config)
    server.send_signal(signal.SIGHUP)
    acknowledged = []
    while cookies:
        try:
            handle.poll(-1)
        except nbd.Error:
            break  # the server closed the connection
        for cookie, index in list(cookies.items()):
            try:
                if handle.aio_command_completed(cookie):
                    acknowledged.append(index)
                    del cookies[cookie]
            except nbd.Error:
                del cookies[cookie]  # failed, or lost with the connection: not acknowledged
    wait_for_log(server, "export 'change': closed (reloaded)")
    image = path.with_name("change.img").read_bytes()
    for index in acknowledged:
        assert image[index * chunk:(index + 1) * chunk] == bytes([index + 1]) * chunk, index
    assert acknowledged, "no write was acknowledged at all"
    assert server.stop() == 0
