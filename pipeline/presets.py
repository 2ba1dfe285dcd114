"""Params presets: the seeds' set-ups as complete ``params.yaml`` files in ``configs/``.

``layerscope init --preset NAME [-S section.key=value ...]`` copies
``configs/NAME.yaml`` to ``params.yaml``, applies the overrides (values are
YAML, as with ``dvc exp run -S``), validates every section, and writes the
result atomically. The preset's comments are kept (ruamel.yaml round trip,
which DVC itself depends on), so ``params.yaml`` stays readable.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import yaml
from ruamel.yaml import YAML

from pipeline.config import SECTIONS, load_section
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

CONFIGS_DIR = Path("configs")


def list_presets(directory=CONFIGS_DIR) -> dict[str, str]:
    """``name -> one-line description`` (the preset's first comment line), sorted by name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"Presets directory '{directory}' does not exist. Hint: run from the project root, "
                          "or pass --configs.")
    presets = {}
    for path in sorted(directory.glob("*.yaml")):
        first = path.read_text().splitlines()[:1]
        line = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
        presets[path.stem] = line.removeprefix(f"{path.stem}:").strip()
    return presets


def parse_override(text: str) -> tuple[list[str], object]:
    """``"extract.batch_size=64"`` -> ``(["extract", "batch_size"], 64)``; the value is parsed as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise ConfigError(f"Override {text!r} must look like 'section.key=value' (value in YAML), e.g. "
                          "'generate.root=/data'.")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"Override {text!r}: the value {value!r} is not valid YAML. Hint: quote it.") from None
    return key.strip().split("."), parsed


def apply_override(doc, keys: list[str], value):
    """Set ``doc[k1][k2]...[kn] = value``, creating mappings on the way."""
    node = doc
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        elif not hasattr(child, "get"):
            raise ConfigError(f"Override of '{'.'.join(keys)}': '{'.'.join(keys[:depth + 1])}' is "
                              f"{child!r}, not a mapping.")
        node = child
    node[keys[-1]] = value
    return doc


def validate_params(params: dict):
    """Load every section into its dataclass: raises the first :class:`ConfigError`."""
    unknown = sorted(set(params) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"Unknown params section {unknown[0]!r}. Valid sections are {sorted(SECTIONS)}.")
    for section in SECTIONS:
        load_section(section, params)


def _represent_none(representer, _data):
    return representer.represent_scalar("tag:yaml.org,2002:null", "null")


def _round_trip() -> YAML:
    """A comment-keeping YAML that writes ``null`` (not an empty value) and short lists inline."""
    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 120
    rt.default_flow_style = None
    rt.representer.add_representer(type(None), _represent_none)
    return rt


def render_params(preset: str | None, overrides=(), directory=CONFIGS_DIR, current="params.yaml") -> str:
    """The text of a params file: ``preset`` (or the ``current`` file) with ``overrides`` applied.

    Raises
    ------
    ConfigError
        Unknown preset, malformed override, or an invalid resulting value.
    """
    source = Path(current) if preset is None else Path(directory) / f"{preset}.yaml"
    if not source.is_file():
        if preset is None:
            raise ConfigError(f"Params file '{source}' does not exist. Hint: pass --preset NAME.")
        raise ConfigError(f"Unknown preset {preset!r}. Valid presets are {sorted(list_presets(directory))}. "
                          f"Hint: `layerscope init --list` describes them.")
    rt = _round_trip()
    doc = rt.load(source.read_text())
    for text in overrides:
        apply_override(doc, *parse_override(text))
    buffer = io.StringIO()
    rt.dump(doc, buffer)
    text = buffer.getvalue()
    validate_params(yaml.safe_load(text) or {})
    return text


def init_params(preset: str | None, overrides=(), *, directory=CONFIGS_DIR, out="params.yaml") -> Path:
    """Write ``out`` from a preset (and/or overrides), validated, atomically (tmp file, then rename)."""
    out = Path(out)
    text = render_params(preset, overrides, directory, current=out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, out)
    log.info("wrote %s from %s%s", out, f"preset {preset!r}" if preset else out,
             f" with {len(overrides)} override(s)" if overrides else "")
    return out
