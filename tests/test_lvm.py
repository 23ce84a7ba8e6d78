"""The lvm backend on real lvm2 (loop devices, no device-mapper: see lvm_fixtures.py)."""

import os
import signal
import time
from pathlib import Path

import nbd
import pytest
import yaml
from conftest import NBDSERVE, free_port, run
from lvm_fixtures import lvm  # noqa: F401 (a fixture)
from service_helpers import wait_for_log

from nbdserve.backend import OpenOptions
from nbdserve.config import parse_config
from nbdserve.registry import SOURCES, ParseContext, driver
from nbdserve.settings import ConfigError, Section

MIB = 1 << 20


def group_export(lvm, vg: str, **settings) -> dict:
    """Config for a server exporting every LV of `vg`, rescanning quickly for the tests."""
    source = {"driver": "lvm", "vg": vg, "lvm-env": lvm.env, "rescan-interval": 0.3, **settings}
    return {"exports": {"vms": {"source": source, "cache": "none"}}}


def connect(server, name: str | None = None) -> nbd.NBD:
    """A handle on export `name`, or in option mode without a name."""
    handle = nbd.NBD()
    handle.set_opt_mode(name is None)
    handle.connect_uri(server.uri(name or ""))
    return handle


def listed(server) -> list[str]:
    handle = connect(server)
    names = []
    handle.opt_list(lambda name, description: names.append(name))
    handle.opt_abort()
    return sorted(names)


def go_error(server, name: str) -> str:
    """The message of a refused NBD_OPT_GO."""
    with pytest.raises(nbd.Error) as refused:
        connect(server, name)
    return str(refused.value)


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_each_lv_keeps_its_own_data(lvm, start_server):
    vg = lvm.create_vg()
    sizes = {"alpha": 8 * MIB, "beta": 12 * MIB, "gamma": 4 * MIB}
    for name, size in sizes.items():
        lvm.create_lv(vg, name, size)
    server = start_server(group_export(lvm, vg))
    assert listed(server) == sorted(sizes)
    handles = {name: connect(server, name) for name in sizes}
    for index, (name, handle) in enumerate(handles.items()):
        assert handle.get_size() == sizes[name]
        # cache=none: O_DIRECT on the device, so its logical block size is the minimum.
        assert handle.get_block_size(nbd.SIZE_MINIMUM) == 512
        handle.pwrite(bytes([0x10 + index]) * sizes[name], 0)
        handle.flush()
    for index, (name, handle) in enumerate(handles.items()):
        assert handle.pread(sizes[name], 0) == bytes([0x10 + index]) * sizes[name], name
        handle.shutdown()
    # And on the PV itself, where lvm placed each LV (the server never saw these offsets).
    for index, name in enumerate(sizes):
        assert Path(lvm.loop_of(vg, name)).read_bytes() == bytes([0x10 + index]) * sizes[name]


def test_serve_one_lv_from_the_command_line(lvm, start_server):
    vg = lvm.create_vg()
    lvm.create_lv(vg, "other", 4 * MIB)
    lvm.create_lv(vg, "disk", 8 * MIB)
    server = start_server(args=[f"lvm:{vg}/disk"], env=lvm.env)
    assert listed(server) == ["disk"]
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 1M", server.uri()])  # the default export
    run(["qemu-io", "-f", "raw", "-c", "read -P 0x5a 1M 1M", "-c", "read -P 0 0 1M", server.uri("disk")])
    assert Path(lvm.loop_of(vg, "other")).read_bytes() == bytes(4 * MIB)


def test_lvs_created_and_removed_while_serving(lvm, start_server):
    vg = lvm.create_vg()
    lvm.create_lv(vg, "first", 4 * MIB)
    server = start_server(group_export(lvm, vg))
    assert listed(server) == ["first"]

    lvm.create_lv(vg, "later", 8 * MIB)
    assert listed(server) == ["first", "later"]
    handle = connect(server, "later")
    assert handle.get_size() == 8 * MIB
    handle.pwrite(b"\xee" * 4096, 0)
    backing = Path("/sys/block") / Path(lvm.loop_of(vg, "later")).name / "loop" / "backing_file"

    lvm.remove_lv(vg, "later")
    assert listed(server) == ["first"]
    assert "later" in go_error(server, "later")
    # The open connection ends (within the rescan interval), and the server lets go of the
    # device: the loop device, detached while held open, disappears once the server closes it.
    with pytest.raises(nbd.Error):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            handle.pread(4096, 0)
            time.sleep(0.05)
    wait_for(lambda: not backing.exists())
    assert "export 'later': removed or changed" in server.log()
    # An LV created again under the same name is a new volume, served afresh.
    lvm.create_lv(vg, "later", 4 * MIB)
    assert connect(server, "later").get_size() == 4 * MIB


def test_idle_lv_is_closed_so_lvremove_can_proceed(lvm, start_server):
    vg = lvm.create_vg()
    lvm.create_lv(vg, "disk", 4 * MIB)
    server = start_server(group_export(lvm, vg))
    run(["qemu-io", "-f", "raw", "-c", "write -P 1 0 64k", server.uri("disk")])
    # No connection uses it any more: the server closes the device (with device-mapper, an LV
    # held open refuses lvremove with "in use").
    wait_for(lambda: "export 'disk': no longer in use, closing" in server.log())
    run(["qemu-io", "-f", "raw", "-c", "read -P 1 0 64k", server.uri("disk")])


def test_tag_selects_lvs(lvm, start_server):
    vg = lvm.create_vg()
    lvm.create_lv(vg, "tagged", 4 * MIB, tags=["nbd"])
    lvm.create_lv(vg, "plain", 4 * MIB)
    server = start_server(group_export(lvm, vg, tag="nbd"))
    assert listed(server) == ["tagged"]
    assert "plain" in go_error(server, "plain")
    lvm.lvm("lvchange", "-q", "--addtag", "nbd", f"{vg}/plain")
    assert listed(server) == ["plain", "tagged"]
    assert connect(server, "plain").get_size() == 4 * MIB


def test_inactive_lv_is_refused_with_a_reason(lvm, start_server):
    vg = lvm.create_vg()
    lvm.create_lv(vg, "up", 4 * MIB)
    lvm.create_lv(vg, "down", 4 * MIB, activate=False)
    server = start_server(args=["--cache", "none", f"lvm:{vg}"], env=lvm.env)  # every LV of the group
    # Logged once the listeners accept, which may be after the test could connect.
    wait_for_log(server, f"exports of {vg!r} are found while serving: nbdinfo --list nbd://127.0.0.1:")
    assert listed(server) == ["down", "up"]
    assert "down" in go_error(server, "down")  # libnbd does not show the server's reason...
    assert f"LV {vg}/down is not active" in server.log()  # ...which the log has
    assert connect(server, "up").get_size() == 4 * MIB


def test_lvm_list_command(lvm):
    vg = lvm.create_vg()
    lvm.create_lv(vg, "web", 8 * MIB, tags=["nbd"])
    lvm.create_lv(vg, "db", 12 * MIB, activate=False)

    def lvm_list(*args, check=True):
        return run([*NBDSERVE, "lvm", "list", *args], env={**os.environ, **lvm.env}, check=check)

    lines = lvm_list(vg).stdout.splitlines()
    assert lines[0].split() == ["EXPORT", "VG", "SIZE", "ACTIVE", "TAGS", "PATH"]
    rows = sorted(line.split() for line in lines[1:])
    assert rows == [
        ["db", vg, "12.00", "MiB", "no", lvm.lv_path(vg, "db")],
        ["web", vg, "8.00", "MiB", "yes", "nbd", lvm.lv_path(vg, "web")],
    ]
    assert [line.split()[0] for line in lvm_list(vg, "--tag", "nbd").stdout.splitlines()[1:]] == ["web"]
    assert [line.split()[0] for line in lvm_list(f"{vg}/db").stdout.splitlines()[1:]] == ["db"]
    missing = lvm_list("novg", check=False)
    assert missing.returncode == 1
    assert 'Volume group "novg" not found' in missing.stderr


def test_serve_refuses_to_start_on_a_missing_group_or_lv(lvm):
    vg = lvm.create_vg()

    def serve(source: str) -> str:
        result = run([*NBDSERVE, "serve", "-p", str(free_port()), source], env={**os.environ, **lvm.env},
                     check=False, timeout=60)
        assert result.returncode == 1, result.stderr
        return result.stderr.splitlines()[-1]

    assert serve("lvm:novg") == (
        "nbdserve: error: exports of 'novg': lvm lvs: Volume group \"novg\" not found; "
        "Cannot process volume group novg"
    )
    assert serve(f"lvm:{vg}/nope") == (
        f"nbdserve: error: cannot open export 'nope': volume group '{vg}' has no LV named 'nope'"
    )


# Errors, straight from the driver.

def lvm_config(lvm, **settings):
    section = Section({"lvm-env": lvm.env, **settings}, "source")
    config = driver(SOURCES, "lvm").parse(section, ParseContext(Path.cwd()))
    section.done()
    return config


async def open_error(config) -> str:
    with pytest.raises(OSError) as failed:
        await driver(SOURCES, "lvm").open(config, OpenOptions())
    return failed.value.strerror


async def test_open_errors_name_the_problem(lvm):
    vg = lvm.create_vg()
    lvm.create_lv(vg, "asleep", 4 * MIB, activate=False)
    assert "lvm2 is not installed" in await open_error(
        lvm_config(lvm, vg=vg, lv="asleep", **{"lvm-command": "/nonexistent/lvm"})
    )
    assert 'Volume group "novg" not found' in await open_error(lvm_config(lvm, vg="novg", lv="x"))
    assert f"volume group {vg!r} has no LV named 'nope'" in await open_error(lvm_config(lvm, vg=vg, lv="nope"))
    assert f"LV {vg}/asleep is not active" in await open_error(lvm_config(lvm, vg=vg, lv="asleep"))
    # Activation is asked for, but lvchange cannot make a device here (no device-mapper).
    assert "still not active after `lvchange -ay`" in await open_error(
        lvm_config(lvm, vg=vg, lv="asleep", activate=True)
    )


def test_config_errors_name_the_key():
    def error(source) -> str:
        with pytest.raises(ConfigError) as failed:
            parse_config({"exports": {"vm": {"source": source}}})
        return str(failed.value)

    assert error("lvm:bad name") == "exports.vm.source.vg: 'bad name' is not a valid LVM name"
    assert error({"driver": "lvm", "vg": "vg", "lv": "x", "tag": "t"}).startswith("exports.vm.source.tag:")
    assert error({"driver": "lvm"}) == "exports.vm.source.vg: is required"
    config = parse_config({"exports": {"vms": {"source": "lvm:vg0"}, "one": {"source": "lvm:vg0/lv1"}}})
    assert list(config.exports) == ["one"] and list(config.providers) == ["vms"]


def test_reload_swaps_the_group_export(lvm, start_server, tmp_path):
    vg = lvm.create_vg()
    lvm.create_lv(vg, "tagged", 4 * MIB, tags=["nbd"])
    lvm.create_lv(vg, "plain", 4 * MIB)
    server = start_server(group_export(lvm, vg))
    handles = {name: connect(server, name) for name in ("tagged", "plain")}
    config_path = tmp_path / "nbdserve-0.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["exports"]["vms"]["source"]["tag"] = "nbd"
    config_path.write_text(yaml.safe_dump(config))
    server.send_signal(signal.SIGHUP)
    wait_for(lambda: listed(server) == ["tagged"])
    # The export the new config drops ends; the one it keeps is untouched.
    wait_for(lambda: "export 'plain': removed or changed" in server.log())
    with pytest.raises(nbd.Error):
        handles["plain"].pread(512, 0)
    handles["tagged"].pwrite(b"\x01" * 512, 0)
    assert handles["tagged"].pread(512, 0) == b"\x01" * 512
