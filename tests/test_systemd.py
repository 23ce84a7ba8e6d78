"""nbdserve under systemd: unit files, socket activation, sd_notify, sockets and pid files, logs.

Real processes throughout: systemd-socket-activate passes the sockets as systemd does, and the
notifications arrive on a real datagram socket, as at systemd's NOTIFY_SOCKET."""

import json
import re
import signal
import socket
import sys
import time
from pathlib import Path

import nbd
import pytest
from conftest import NBDSERVE, free_port, run
from service_helpers import notify, spawn, write_config  # noqa: F401 (fixtures)

UNITS = Path(__file__).parent.parent / "systemd"
NBDSERVE_BIN = Path(sys.executable).with_name("nbdserve")
MiB = 1024 * 1024


def file_export(path: Path) -> dict:
    return {"source": {"driver": "file", "path": str(path)}}


def test_units_pass_systemd_analyze_verify(tmp_path):
    """Every unit verifies cleanly (no warning either) with the binary where install.sh puts it."""
    units = sorted(UNITS.glob("nbdserve*"))
    assert [unit.name for unit in units] == [
        "nbdserve.service", "nbdserve.socket", "nbdserve@.service", "nbdserve@.socket"
    ]
    for unit in units:
        text = unit.read_text()
        assert "/usr/local/bin/nbdserve" in text or unit.suffix == ".socket"
        # install.sh links /usr/local/bin/nbdserve; here the venv's entry point stands in for it.
        (tmp_path / unit.name).write_text(text.replace("/usr/local/bin/nbdserve", str(NBDSERVE_BIN)))
    installed = sorted(map(str, tmp_path.glob("nbdserve*")))
    result = run(["systemd-analyze", "verify", *installed])
    assert result.stderr == "" and result.stdout == ""
    # systemd's own review of the sandboxing: exposure at most 2.5 of 10 ("OK") for both services.
    services = [unit for unit in installed if unit.endswith(".service")]
    review = run(["systemd-analyze", "security", "--offline=yes", "--threshold=25", *services], check=False)
    assert review.returncode == 0, review.stdout
    for unit in ("nbdserve.service", "nbdserve@i.service"):
        assert re.search(rf"Overall exposure level for {re.escape(unit)}: [0-2]\.\d OK", review.stdout), unit
    service = (UNITS / "nbdserve.service").read_text()
    for setting in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "StateDirectory=nbdserve",
                    "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
                    "DeviceAllow=block-* rw", "CapabilityBoundingSet=CAP_DAC_OVERRIDE",
                    "ExecStart=/usr/local/bin/nbdserve serve --config /etc/nbdserve/nbdserve.yaml"):
        assert setting in service.splitlines(), setting
    sockets = (UNITS / "nbdserve.socket").read_text().splitlines()
    assert "ListenStream=127.0.0.1:10809" in sockets and "ListenStream=/run/nbdserve/nbd.sock" in sockets


def test_socket_activation_serves_exactly_the_passed_sockets(tmp_path, raw_image, spawn, notify):
    image = raw_image(16 * MiB, data=b"activated")
    tcp_port, configured_port = free_port(), free_port()
    unix_path = tmp_path / "activated.sock"
    config = write_config(tmp_path / "nbdserve.yaml", {
        "listen": [{"tcp": f"127.0.0.1:{configured_port}"}],  # must not be bound
        "state-dir": str(tmp_path),
        "exports": {"disk": file_export(image)},
    })
    systemd = notify()  # an abstract NOTIFY_SOCKET, as systemd uses
    activate = ["systemd-socket-activate", "-l", f"127.0.0.1:{tcp_port}", "-l", str(unix_path),
                "--fdname=nbd-tcp:nbd-unix", "-E", f"NOTIFY_SOCKET={systemd.name}"]
    server = spawn(["serve", "--config", config], prefix=activate)
    deadline = time.monotonic() + 10
    while not unix_path.exists():
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.02)
    # The first connection makes systemd-socket-activate exec nbdserve, which then answers it.
    info = json.loads(run(["nbdinfo", "--json", f"nbd://127.0.0.1:{tcp_port}/disk"]).stdout)
    assert info["exports"][0]["export-size"] == 16 * MiB
    status = systemd.wait_for("READY", "1")["STATUS"]
    # nbdinfo's connection may or may not have been accepted yet.
    assert status.startswith("serving 1 export to ")
    assert status.endswith(f" on 127.0.0.1:{tcp_port}, unix:{unix_path}")
    handle = nbd.NBD()
    handle.connect_uri(f"nbd+unix:///disk?socket={unix_path}")
    assert handle.pread(9, 0) == b"activated"
    handle.shutdown()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", configured_port), timeout=2)
    log = server.log()
    assert f"systemd socket 'nbd-tcp': 127.0.0.1:{tcp_port}" in log
    assert f"systemd socket 'nbd-unix': unix:{unix_path}" in log
    assert server.stop() == 0
    systemd.wait_for("STOPPING", "1")
    assert unix_path.exists(), "the socket file is systemd's, not ours to remove"


def test_listen_fds_for_another_process_are_ignored(tmp_path, raw_image, spawn, notify):
    """LISTEN_* inherited from a parent that was socket-activated are not ours: the configured
    listener is bound."""
    port = free_port()
    systemd = notify()
    server = spawn(["serve", "-p", port, raw_image()],
                   env={**systemd.env, "LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "nbd"})
    assert systemd.wait_for("READY", "1")["STATUS"].endswith(f"on 127.0.0.1:{port}")
    run(["nbdinfo", "--size", f"nbd://127.0.0.1:{port}"])
    assert "systemd socket" not in server.log()
    assert server.stop() == 0


def test_notifications_ready_status_watchdog_reload_stopping(tmp_path, raw_image, spawn, notify):
    port = free_port()
    config = write_config(tmp_path / "nbdserve.yaml", {
        "listen": [{"tcp": f"127.0.0.1:{port}"}],
        "state-dir": str(tmp_path),
        "exports": {"a": file_export(raw_image(name="a.img")), "b": file_export(raw_image(name="b.img"))},
    })
    systemd = notify(tmp_path / "notify")  # a path NOTIFY_SOCKET this time
    server = spawn(["serve", "--config", config],
                   env={**systemd.env, "WATCHDOG_USEC": "200000"})
    ready = systemd.wait_for("READY", "1")
    assert ready["STATUS"] == f"serving 2 exports to 0 connections on 127.0.0.1:{port}"
    # READY=1 means accepting: a client connects at once, no retry.
    handle = nbd.NBD()
    handle.connect_uri(f"nbd://127.0.0.1:{port}/a")
    assert systemd.wait_for("STATUS")["STATUS"] == f"serving 2 exports to 1 connection on 127.0.0.1:{port}"
    # WatchdogSec=0.2s: pings every 0.1 s.
    start = time.monotonic()
    for _ in range(3):
        systemd.wait_for("WATCHDOG", "1", timeout=1)
    assert time.monotonic() - start < 0.6

    server.send_signal(signal.SIGHUP)
    reloading = systemd.wait_for("RELOADING", "1")
    assert abs(int(reloading["MONOTONIC_USEC"]) / 1e6 - time.monotonic()) < 10
    assert systemd.wait_for("READY", "1")["STATUS"].endswith("1 connection on 127.0.0.1:%d" % port)
    handle.shutdown()
    assert systemd.wait_for("STATUS")["STATUS"] == f"serving 2 exports to 0 connections on 127.0.0.1:{port}"

    assert server.stop() == 0
    assert systemd.wait_for("STOPPING", "1")["STATUS"] == "shutting down"


def test_stale_unix_socket_after_a_crash_and_clean_exit(tmp_path, raw_image, spawn, notify):
    """After SIGKILL the socket files (NBD, control) and the pid file stay behind; the next start
    replaces them. A clean exit removes all three."""
    image = raw_image()
    sock, pid_file = tmp_path / "nbd.sock", tmp_path / "nbdserve.pid"
    args = ["serve", "-k", sock, "--pid-file", pid_file, image]
    env = {"STATE_DIRECTORY": str(tmp_path)}
    systemd = notify()
    crashed = spawn(args, env={**env, **systemd.env})
    systemd.wait_for("READY", "1")
    assert pid_file.read_text() == f"{crashed.proc.pid}\n"
    crashed.proc.kill()
    crashed.proc.wait()
    assert sock.is_socket() and (tmp_path / "control.sock").is_socket() and pid_file.exists()

    server = spawn(args, env={**env, **systemd.env})
    systemd.wait_for("READY", "1")
    assert f"removing stale socket {sock}" in server.log()
    assert pid_file.read_text() == f"{server.proc.pid}\n"
    run(["nbdinfo", "--size", f"nbd+unix:///disk.img?socket={sock}"])
    run([NBDSERVE_BIN, "stats", "--socket", tmp_path / "control.sock"])
    assert server.stop() == 0
    assert not sock.exists() and not (tmp_path / "control.sock").exists() and not pid_file.exists()


def test_json_logs(tmp_path, raw_image, spawn, notify):
    systemd = notify()
    server = spawn(["serve", "-p", free_port(), "--log-format", "json", raw_image()], env=systemd.env)
    systemd.wait_for("READY", "1")
    assert server.stop() == 0
    entries = [json.loads(line) for line in server.log().splitlines()]
    assert {"time", "level", "logger", "message", "pid"} <= set(entries[0])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entries[0]["time"])
    assert {"level": "info", "logger": "nbdserve.server.service", "message": "received SIGTERM"} in [
        {key: entry[key] for key in ("level", "logger", "message")} for entry in entries
    ]
    assert entries[-1]["message"] == "stopped" and entries[-1]["level"] == "info"


def test_journal_logs_carry_priorities_and_no_timestamps(tmp_path, raw_image, spawn, notify):
    """With stderr going to journald ($JOURNAL_STREAM names it), lines start with a syslog
    priority and leave the timestamp to journald."""
    systemd = notify()
    config = write_config(tmp_path / "nbdserve.yaml", {
        "listen": [{"tcp": f"127.0.0.1:{free_port()}"}],
        "state-dir": str(tmp_path),
        "control": {"socket": "/proc/no/such/dir/control.sock"},
        "exports": {"disk": file_export(raw_image())},
    })
    server = spawn(["serve", "--config", config], env=systemd.env, journal=True)
    systemd.wait_for("READY", "1")
    assert server.stop() == 0
    lines = server.log().splitlines()
    assert "<6>nbdserve.server.service: received SIGTERM" in lines
    assert any(line.startswith("<4>nbdserve.server.control: no control socket") for line in lines)
    assert not any(re.search(r"\d\d:\d\d:\d\d", line) for line in lines)


def test_a_failed_start_is_one_clear_line(tmp_path, raw_image):
    """What systemd shows in `systemctl status` when the server cannot start: no traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run([*NBDSERVE, "serve", "-p", str(port), raw_image()], check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"nbdserve: error: [Errno 98] cannot listen on 127.0.0.1:{port}: Address already in use"
    )
    missing = run([*NBDSERVE, "serve", "-k", tmp_path / "s.sock", tmp_path / "missing.img"], check=False)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert missing.stderr.splitlines()[-1] == (
        f"nbdserve: error: cannot open export 'missing.img': cannot open {tmp_path / 'missing.img'}: "
        "No such file or directory"
    )
