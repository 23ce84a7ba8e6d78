"""The rbd source's settings, without a cluster: QEMU's `rbd:` syntax, config keys and their
errors, and the message when Ceph's Python bindings are missing."""

import subprocess
import sys
from pathlib import Path

import pytest

from backends.rbd import RbdConfig, RbdDriver
from nbdserve import registry
from nbdserve.commands.serve import export_name_for
from nbdserve.registry import ParseContext
from nbdserve.settings import ConfigError, Section


@pytest.mark.parametrize(
    ("spec", "settings"),
    [
        ("rbd:pool/image", {"pool": "pool", "image": "image"}),
        (
            "rbd:pool/ns/image@snap:conf=/etc/ceph/other.conf:id=nbd",
            {"pool": "pool", "namespace": "ns", "image": "image", "snapshot": "snap",
             "conf": "/etc/ceph/other.conf", "user": "nbd"},
        ),
        # Backslashes escape QEMU's separators, as in monitor addresses.
        (
            r"rbd:pool/odd\:name\@x:mon_host=127.0.0.1\:6789:keyring=/k",
            {"pool": "pool", "image": "odd:name@x", "mon-host": "127.0.0.1:6789", "keyring": "/k"},
        ),
    ],
)
def test_qemu_syntax(spec, settings):
    assert registry.source_settings(spec) == {"driver": "rbd", **settings}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("rbd:pool", "expected rbd:POOL/IMAGE"),
        ("rbd:pool/", "expected rbd:POOL/IMAGE"),
        ("rbd:a/b/c/d", "expected rbd:POOL/IMAGE"),
        ("rbd:pool/image@s1@s2", "expected rbd:POOL/IMAGE"),
        ("rbd:pool/image:cache=none", "unknown option 'cache=none' (expected conf=, id=, mon_host=, keyring=)"),
    ],
)
def test_qemu_syntax_errors(spec, message):
    with pytest.raises(ConfigError) as caught:
        registry.source_settings(spec)
    assert message in str(caught.value)
    assert spec in str(caught.value)


def test_default_export_name_is_the_image():
    assert export_name_for("rbd:pool/ns/vm1@snap:conf=/etc/ceph/ceph.conf:id=nbd") == "vm1@snap"
    assert export_name_for("rbd:pool/vm1") == "vm1"


def test_other_sources_are_not_claimed():
    driver = RbdDriver()
    assert driver.claims("/var/lib/images/rbd:disk.img") is None
    assert driver.claims("lvm:vg/lv") is None


def parse(settings: dict) -> RbdConfig:
    section = Section(settings, "exports.vm.source")
    config = RbdDriver().parse(section, ParseContext(base_dir=Path("/srv/nbd")))
    section.done()
    return config


def test_config_keys():
    config = parse({
        "pool": "p", "namespace": "ns", "image": "i", "snapshot": "s", "user": "nbd",
        "conf": "ceph.conf", "keyring": "/etc/ceph/k", "mon-host": "10.0.0.1", "timeout": 5,
    })
    assert config == RbdConfig(
        pool="p", image="i", namespace="ns", snapshot="s", user="nbd",
        conf=Path("/srv/nbd/ceph.conf"), mon_host="10.0.0.1", keyring=Path("/etc/ceph/k"), timeout=5,
    )
    assert str(config) == "p/ns/i@s"
    assert parse({"pool": "p", "image": "i"}).timeout == 30


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"pool": "p"}, "exports.vm.source.image: is required"),
        ({"pool": "", "image": "i"}, "exports.vm.source.pool: must not be empty"),
        ({"pool": "p", "image": "i", "timeout": 0}, "exports.vm.source.timeout: must be at least 1"),
        ({"pool": "p", "image": "i", "monhost": "x"}, "exports.vm.source.monhost: unknown key"),
    ],
)
def test_config_errors(settings, message):
    with pytest.raises(ConfigError) as caught:
        parse(settings)
    assert str(caught.value).startswith(message)


def test_missing_bindings_is_a_config_error(tmp_path):
    # A None entry in sys.modules makes `import rados` fail as it does without python3-rados.
    script = (
        "import sys; sys.modules['rados'] = None; from nbdserve.cli import main; "
        "sys.exit(main(sys.argv[1:]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, "serve", "-p", "0", "-x", "vm", "rbd:pool/image"],
        capture_output=True, text=True, timeout=30, cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "exports.vm.source.driver: the rbd backend needs Ceph's Python bindings" in result.stderr
    assert "python3-rados python3-rbd" in result.stderr
