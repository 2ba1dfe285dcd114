"""Print pip's package sources as uv options, so that ``uv pip install`` takes what pip would.

uv reads no pip configuration. Where pip is pointed at wheels or an index on the
local disk (as on the machines this project is developed and tested on), uv
without these options would look on PyPI only and download what pip takes from
the disk: for torch, several GB. Read from ``pip config list``, which merges
pip's configuration files and its ``PIP_*`` environment variables; an
environment variable wins, as it does for pip. Prints nothing where pip is
configured with none of them.

Usage (see the Makefile): ``uv pip install $(python .ci/pip_sources.py) ...``
"""

import shlex
import subprocess
import sys

#: pip option -> uv option. Each pip value may list several, separated by whitespace.
OPTIONS = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
           "constraint": "--constraint"}
#: Where pip reads an option from, strongest first: the environment, then the ``install`` and ``global`` sections.
SECTIONS = (":env:", "install", "global")


def pip_config() -> dict[str, str]:
    """``{"global.find-links": "/opt/wheels", ":env:.find-links": ...}``: what ``pip config list`` prints."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                            check=True).stdout
    config = {}
    for line in listed.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            config[key.strip()] = value.strip().strip("'\"")
    return config


def uv_options(config: dict[str, str]) -> list[str]:
    """The uv options for the pip settings in ``config``, each from its strongest section."""
    options = []
    for pip_name, uv_name in OPTIONS.items():
        value = next((config[f"{section}.{pip_name}"] for section in SECTIONS
                      if f"{section}.{pip_name}" in config), "")
        for item in value.split():
            options += [uv_name, item]
    return options


if __name__ == "__main__":
    print(shlex.join(uv_options(pip_config())))
