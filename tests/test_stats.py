"""Counters after real I/O: `nbdserve stats` through the control socket, and Prometheus text."""

import json
import urllib.error
import urllib.request

import nbd
import pytest
from conftest import NBDSERVE, free_port, run
from nbdserve.config import parse_config
from nbdserve.server.control import control_path
from nbdserve.settings import ConfigError
from service_helpers import notify, spawn, write_config  # noqa: F401 (fixtures)

MiB = 1024 * 1024


@pytest.fixture
def busy_server(tmp_path, raw_image, spawn, notify):
    """A server after known I/O: on `vm1` a finished qemu-io session (1 MiB written in 4 writes,
    2 reads of 64 KiB, one flush) and a libnbd connection still open (3 reads of 4 KiB, one
    read out of range); `vm2` untouched."""
    port, metrics_port = free_port(), free_port()
    control = tmp_path / "control.sock"
    config = write_config(tmp_path / "nbdserve.yaml", {
        "listen": [{"tcp": f"127.0.0.1:{port}"}],
        "state-dir": str(tmp_path),
        "control": {"socket": str(control)},
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
        "exports": {name: {"source": {"driver": "file", "path": str(raw_image(16 * MiB, name=f"{name}.img"))}}
                    for name in ("vm1", "vm2")},
    })
    systemd = notify()
    server = spawn(["serve", "--config", config], env=systemd.env)
    systemd.wait_for("READY", "1")
    run(["qemu-io", "-f", "raw", *(arg for i in range(4) for arg in ("-c", f"write -P 7 {i * 256}k 256k")),
         "-c", "read 0 64k", "-c", "read 64k 64k", "-c", "flush", f"nbd://127.0.0.1:{port}/vm1"])
    handle = nbd.NBD()
    handle.set_strict_mode(0)  # let the out-of-range read reach the server
    handle.connect_uri(f"nbd://127.0.0.1:{port}/vm1")
    for offset in (0, 4096, 8192):
        assert handle.pread(4096, offset) == b"\7" * 4096
    with pytest.raises(nbd.Error):
        handle.pread(4096, 16 * MiB)
    yield control, metrics_port, config
    handle.shutdown()
    assert server.stop() == 0


def stats(*args) -> str:
    return run([*NBDSERVE, "stats", *map(str, args)]).stdout


def test_stats_json_counts_real_io(busy_server):
    _, _, config = busy_server
    snapshot = json.loads(stats("--config", config, "--json"))  # finds control.socket there
    vm1, vm2 = snapshot["exports"]["vm1"], snapshot["exports"]["vm2"]
    assert vm1["connections"] == 1 and vm1["in_flight"] == 0
    assert vm1["bytes_written"] == MiB
    assert vm1["bytes_read"] == 2 * 64 * 1024 + 3 * 4096
    assert vm1["errors"] == 1
    by_command = {name: sum(h["buckets"]) for name, h in vm1["latency"].items()}
    # qemu-io also reads a little while probing; the reads we know of are at least there.
    assert by_command["write"] == 4 and by_command["flush"] >= 1 and by_command["read"] >= 6
    assert vm1["requests"] == sum(by_command.values())
    assert all(h["sum_ns"] > 0 for h in vm1["latency"].values())
    assert vm2 == {"configured": True, "connections": 0, "in_flight": 0, "requests": 0,
                   "bytes_read": 0, "bytes_written": 0, "errors": 0, "latency": {}}
    [connection] = snapshot["connections"]
    assert connection["export"] == "vm1" and connection["peer"].startswith("127.0.0.1:")
    assert connection["bytes_read"] == 3 * 4096 and connection["errors"] == 1
    assert {name: sum(h["buckets"]) for name, h in connection["latency"].items()} == {"read": 4}


def test_stats_text_and_watch(busy_server):
    control, _, _ = busy_server
    text = stats("--socket", control).splitlines()
    header = text[2].split()
    assert header == ["EXPORT", "CONN", "INFL", "READS", "WRITES", "OTHER", "READ", "WRITTEN",
                      "ERRORS", "P50", "P90", "P99"]
    vm1 = dict(zip(header, text[3].split()))
    assert vm1["EXPORT"] == "vm1" and vm1["CONN"] == "1" and vm1["WRITES"] == "4"
    assert vm1["WRITTEN"] == "1.0MiB" and vm1["ERRORS"] == "1" and vm1["P99"].endswith(("µs", "ms"))
    assert text[4].split() == ["vm2", "0", "0", "0", "0", "0", "0B", "0B", "0", "-", "-", "-"]
    assert text[6].split()[:2] == ["PEER", "EXPORT"] and " vm1 " in text[7]

    watched = stats("--socket", control, "--watch", "0.1", "--count", "2")
    assert watched.count("rates over the last") == 2
    assert "READS/s" in watched and "WRITTEN/s" in watched


def test_stats_without_a_server(tmp_path):
    result = run([*NBDSERVE, "stats", "--socket", tmp_path / "none.sock"], check=False)
    assert result.returncode == 1
    assert f"no server answers at {tmp_path / 'none.sock'}" in result.stderr


def test_prometheus_metrics(busy_server):
    _, port, _ = busy_server
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        text = response.read().decode()
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert samples['nbdserve_written_bytes_total{export="vm1"}'] == str(MiB)
    assert samples['nbdserve_read_bytes_total{export="vm1"}'] == str(2 * 64 * 1024 + 3 * 4096)
    assert samples['nbdserve_request_errors_total{export="vm1"}'] == "1"
    assert samples['nbdserve_connections{export="vm1"}'] == "1"
    assert samples['nbdserve_connections{export="vm2"}'] == "0"
    writes = 'export="vm1",command="write"'
    assert samples[f"nbdserve_request_duration_seconds_count{{{writes}}}"] == "4"
    assert samples[f'nbdserve_request_duration_seconds_bucket{{{writes},le="+Inf"}}'] == "4"
    assert float(samples[f"nbdserve_request_duration_seconds_sum{{{writes}}}"]) > 0
    buckets = [int(value) for key, value in samples.items() if key.startswith(
        f"nbdserve_request_duration_seconds_bucket{{{writes},")]
    assert buckets == sorted(buckets) and buckets[-1] == 4  # cumulative
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=10)
    assert missing.value.code == 404
    head = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", method="HEAD")
    with urllib.request.urlopen(head, timeout=10) as response:
        assert int(response.headers["Content-Length"]) == len(text.encode()) and response.read() == b""
    with pytest.raises(urllib.error.HTTPError) as post:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", data=b"x", timeout=10)
    assert post.value.code == 405


def test_control_and_metrics_settings(tmp_path):
    base = {"state-dir": str(tmp_path), "exports": {"vm1": {"source": str(tmp_path / "vm1.img")}}}
    config = parse_config(base)
    assert control_path(config) == tmp_path / "control.sock" and config.metrics is None
    config = parse_config({**base, "control": {"socket": "run/stats.sock"},
                           "metrics": {"listen": "[::1]:9310"}})
    assert control_path(config) == tmp_path / "run" / "stats.sock"
    assert str(config.metrics) == "[::1]:9310"
    with pytest.raises(ConfigError, match=r"^metrics.listen: needs a port: '127.0.0.1'$"):
        parse_config({**base, "metrics": {"listen": "127.0.0.1"}})
    with pytest.raises(ConfigError, match=r"^control.path: unknown key$"):
        parse_config({**base, "control": {"path": "x"}})
