"""Config files: a bad one names the key path and the problem, exits 2, and nothing starts; the
documented example in conf/ stays loadable."""

import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import NBDSERVE
from nbdserve.backend import CacheMode
from nbdserve.cli import main
from nbdserve.config import load_config

EXAMPLE = Path(__file__).parent.parent / "conf" / "example.yaml"
# Had a bad config got through, the server would fail to bind here (exit 1) instead of serving.
UNBINDABLE = [{"unix": "/proc/nbdserve-test/nbd.sock"}]


def export(**settings) -> dict:
    return {"source": "/tmp/disk.img", **settings}


BAD_CONFIGS = [
    ("unknown cache mode", {"exports": {"vm1": export(cache="fast")}},
     "exports.vm1.cache: unknown value 'fast' (expected writeback, writethrough, none, directsync, unsafe)"),
    ("unknown export key", {"exports": {"vm1": export(colour="red")}}, "exports.vm1.colour: unknown key"),
    ("unknown top-level key", {"exprots": {}, "exports": {"vm1": export()}}, "exprots: unknown key"),
    ("missing source", {"exports": {"vm1": {"cache": "none"}}}, "exports.vm1.source: is required"),
    ("unknown driver", {"exports": {"vm1": {"source": {"driver": "floppy", "path": "/a"}}}},
     "exports.vm1.source.driver: unknown backend 'floppy'"),
    ("missing path", {"exports": {"vm1": {"source": {"driver": "file"}}}},
     "exports.vm1.source.path: is required"),
    ("unknown format", {"exports": {"vm1": export(format="vmdk")}}, "exports.vm1.format: unknown format 'vmdk'"),
    ("read-only not a boolean", {"exports": {"vm1": export(**{"read-only": "yes"})}},
     "exports.vm1.read-only: expected true or false, got str 'yes'"),
    ("bad port", {"listen": [{"tcp": "127.0.0.1:99999"}], "exports": {"vm1": export()}},
     "listen[0].tcp: bad port in '127.0.0.1:99999'"),
    ("port not a number", {"listen": ["127.0.0.1:nbd"], "exports": {"vm1": export()}}, "listen[0].tcp: bad port"),
    ("no exports", {"exports": {}}, "exports: no export is configured"),
    ("default export missing", {"default-export": "vm2", "exports": {"vm1": export()}},
     "default-export: names no configured export: 'vm2'"),
    ("payload limit too small", {"limits": {"max-payload": "4K"}, "exports": {"vm1": export()}},
     "limits.max-payload: must be at least 1M"),
    ("bad size", {"exports": {"vm1": {"source": {"driver": "file", "path": "/a", "create-size": "lots"}}}},
     "exports.vm1.source.create-size: not a size: 'lots'"),
]


@pytest.mark.parametrize("config, message", [row[1:] for row in BAD_CONFIGS], ids=[row[0] for row in BAD_CONFIGS])
def test_bad_config_names_the_key_and_exits_2(tmp_path, capsys, config, message):
    config.setdefault("listen", UNBINDABLE)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--config", str(path)])
    assert exit_.value.code == 2
    assert f"nbdserve: error: {message}" in capsys.readouterr().err


def test_bad_config_from_the_command_line_process(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("exports:\n  vm1:\n    source: /tmp/disk.img\n    cache: [writeback\n")
    result = subprocess.run([*NBDSERVE, "serve", "--config", str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert f"nbdserve: error: {path} is not valid YAML" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["serve", "--config", "a.yaml", "disk.img"], "give either SOURCE or --config, not both"),
        (["serve", "--config", "a.yaml", "-p", "10810"], "-b, -p, -k and -x apply to SOURCE"),
        (["serve", "--config", "/nonexistent/a.yaml"], "cannot read /nonexistent/a.yaml"),
        (["serve", "-x", "name"], "-x applies to SOURCE"),
    ],
    ids=["source and config", "listener flags with config", "missing config", "name without source"],
)
def test_conflicting_arguments_exit_2(capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_example_config_loads_with_every_documented_option():
    config = load_config(EXAMPLE)
    assert [str(listener) for listener in config.listeners] == ["127.0.0.1:10809", "unix:/run/nbdserve/nbd.sock"]
    assert config.state_dir == Path("/var/lib/nbdserve")
    assert config.default_export == "vm1"
    assert config.limits.max_payload == 32 * 1024 * 1024
    vm1, scratch, installer = (config.exports[name] for name in ("vm1", "scratch", "installer"))
    assert vm1.source_config.path == Path("/var/lib/nbdserve/vm1.img")
    assert vm1.description == "Debian 12 guest"
    assert (vm1.options.cache, vm1.options.read_only) == (CacheMode.WRITEBACK, False)
    assert scratch.source_config.create_size == 10 * 1024**3
    assert scratch.options.cache is CacheMode.UNSAFE
    assert (installer.options.cache, installer.options.read_only) == (CacheMode.NONE, True)
    # Every cache mode is explained.
    text = EXAMPLE.read_text()
    assert all(f"#   {mode.value}" in text for mode in CacheMode)


def test_default_config_is_the_scratch_disk():
    config = load_config(Path(__file__).parent.parent / "conf" / "default.yaml")
    (name,) = config.exports
    assert name == "scratch"
    assert config.exports[name].source_config.create_size == 10 * 1024**3
    assert [str(listener) for listener in config.listeners] == ["127.0.0.1:10809"]
