"""The Makefile's install: uv is handed pip's package sources (``.ci/pip_sources.py``)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "pip_sources.py"


def _module():
    spec = importlib.util.spec_from_file_location("pip_sources", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_pip_source_becomes_its_uv_option_and_the_environment_wins():
    config = {"global.extra-index-url": "file:///opt/a/simple file:///opt/b/simple",
              "global.find-links": "/opt/global-wheels", ":env:.find-links": "/opt/wheels",
              "install.constraint": "/etc/caps.txt", "global.cert": "/etc/ssl/ca.crt", "global.timeout": "60"}
    assert _module().uv_options(config) == [
        "--extra-index-url", "file:///opt/a/simple", "--extra-index-url", "file:///opt/b/simple",
        "--find-links", "/opt/wheels", "--constraint", "/etc/caps.txt"]


def test_no_pip_source_gives_no_option():
    assert _module().uv_options({"global.cert": "/etc/ssl/ca.crt"}) == []


def test_the_script_reads_pips_own_configuration(tmp_path):
    """The environment variables pip reads reach the options, as ``pip config list`` reports them."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PIP_CONFIG_FILE": "/dev/null",
           "PIP_FIND_LINKS": str(tmp_path / "wheels"), "PIP_EXTRA_INDEX_URL": "file:///x/simple"}
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.split() == ["--extra-index-url", "file:///x/simple", "--find-links", str(tmp_path / "wheels")]
