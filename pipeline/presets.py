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
from collections.abc import Mapping
from pathlib import Path

import yaml
from ruamel.yaml import YAML

from pipeline.config import SECTIONS, load_section
from pipeline.errors import ConfigError, invalid_param

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
    _drop_eol_comment(node, keys[-1])
    return doc


def _drop_eol_comment(node, key):
    """Remove the comment at the end of ``key``'s line: it described the old value (``# all 50,000 images``).

    ruamel keeps the comment lines that follow in the same token, so only the
    first line's text goes; the lines after it stay where they were.
    """
    entry = getattr(node, "ca", None) and node.ca.items.get(key)
    token = entry[2] if entry and len(entry) > 2 else None
    if token is None:
        return
    rest = token.value.partition("\n")[2]
    if rest:  # following comment lines or blank lines: keep them
        token.value = "\n" + rest
    else:
        entry[2] = None


def validate_params(params: dict):
    """Every check a stage makes that needs neither the data nor trained weights: raises the first ConfigError.

    Each section is loaded into its dataclass (names, types, ranges, every
    detector's, method's and search configuration's values), then the sections
    are checked against each other and against the architecture (an untrained
    model of ``train.arch``: its layer names and shapes).
    """
    unknown = sorted(set(params) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"Unknown params section {unknown[0]!r}. Valid sections are {sorted(SECTIONS)}.")
    configs = {section: load_section(section, params) for section in SECTIONS}
    check_consistency(configs)


#: detect.methods that read the head's input and weights (extract.head)
HEAD_METHODS = ("scale", "ash_p", "ash_b", "ash_s", "react", "vim", "residual", "dice", "gradnorm", "fdbd", "nnguide",
                "relation", "she")
# methods that read what an opt-in extraction option stores
EXTRACTED = {"gram": "gram", "odin": "odin", "rankfeat": "rankfeat"}


def check_consistency(configs: dict):
    """Checks across sections, as the stages make them later on their real inputs.

    Parameters
    ----------
    configs : dict
        ``section -> config dataclass`` for every section of :data:`SECTIONS`.
    """
    from pipeline.extract import resolve_plan
    from pipeline.models import untrained_model

    gen, ext, fit, det, cal = (configs[k] for k in ("generate", "extract", "fit", "detect", "calibrate"))
    model, input_shape = untrained_model(gen, configs["train"])
    plan = resolve_plan(model, ext.layers, input_shape, grad_layers=ext.grad_layers, head=ext.head, maps=ext.maps,
                        images=ext.images)
    if cal.detector not in fit.detectors:
        raise invalid_param("calibrate.detector", "calibrate", f"one of fit.detectors {sorted(fit.detectors)}",
                            cal.detector, hint="add it to fit.detectors, or guard with a detector fit fits.")
    stray = [layer for layer in cal.layers if layer not in plan.layers]
    if stray:
        raise invalid_param("calibrate.layers", "calibrate", f"layers among extract.layers {list(plan.layers)}",
                            stray[0], hint="guard layers that extract stores.")
    _check_methods_inputs(det, fit, plan)
    _check_extracted_inputs(det, ext)
    aux_sets = (fit.heatmap or {}).get("aux_sets", ())
    if fit.heatmap is not None:
        _check_aux_sets(aux_sets, gen)
    for name in sorted(set(gen.aux) - set(aux_sets)):  # generate cannot know: it reads only its own section
        log.warning("generate.aux.%s is used by nothing (fit.heatmap.aux_sets does not name it), but generate "
                    "still needs its files: remove it unless you will train the heatmap decoder on it", name)


def _check_methods_inputs(det, fit, plan):
    """Each detect method's inputs are among what extract stores (``plan``) and fit trains."""
    for name in det.methods:
        if name in HEAD_METHODS and plan.head is None:
            raise invalid_param("extract.head", "extract", f"the model's final linear layer: detect.methods.{name} "
                                "reads its input and weights", None, hint="set extract.head (e.g. fc).")
    if "nac_ue" in det.methods:
        params = det.methods["nac_ue"] or {}
        layers = params.get("layers") or list(plan.grad_layers)
        if not plan.grad_layers:
            raise invalid_param("extract.grad_layers", "extract", "a non-empty list: detect.methods.nac_ue reads "
                                "the stored gradients", [], hint="e.g. grad_layers: [layer3, avgpool].")
        for key in ("alpha", "M", "O"):
            value = params.get(key)
            stray = [layer for layer in (value if isinstance(value, Mapping) else {}) if layer not in plan.grad_layers]
            missing = [layer for layer in layers if isinstance(value, Mapping) and layer not in value]
            if stray or missing:
                raise invalid_param(f"detect.methods.nac_ue.{key}", "detect", f"one value per layer of "
                                    f"extract.grad_layers {list(plan.grad_layers)}", value,
                                    hint=f"layer {(stray or missing)[0]!r} is not among them or has no value.")
    if "heatmap" in det.methods and fit.heatmap is None:
        raise invalid_param("fit.heatmap", "fit", "the decoder's parameters: detect.methods.heatmap scores the "
                            "decoder fit trains", None, hint="add a fit.heatmap section (see configs/digits.yaml).")


def _check_extracted_inputs(det, ext):
    """ODIN, RankFeat and Gram read what extraction stored: the option is set, and ODIN's setting is in its grid."""
    for name, option in EXTRACTED.items():
        if name in det.methods and getattr(ext, option) is None:
            raise invalid_param(f"extract.{option}", "extract", f"a grid: detect.methods.{name} reads what "
                                "extraction stores for it", None, hint=f"set extract.{option} (see params.yaml); "
                                "each setting costs a pass through the network at extraction.")
    if "odin" in det.methods:
        params = det.methods["odin"] or {}
        temperature, noise = params.get("temperature", 1000.0), params.get("noise", 0.0014)
        if temperature not in ext.odin.temperatures or noise not in ext.odin.noises:
            raise invalid_param("detect.methods.odin", "detect", f"a setting extract.odin stores (temperatures "
                                f"{list(ext.odin.temperatures)}, noises {list(ext.odin.noises)})",
                                {"temperature": temperature, "noise": noise},
                                hint="add it to extract.odin: each new setting costs a pass through the network.")


def _check_aux_sets(aux_sets, gen):
    """fit.heatmap.aux_sets are sets generate writes a val or aux split of, never a missing one.

    With ``generate.ood_val``, the near/far sets are whole test splits: only the
    OOD val sets and the aux sets can then serve (the decoder never trains on a
    test split, :func:`pipeline.scoring.outlier_splits`).
    """
    from pipeline.datasets import digits_set_names

    if gen.benchmark == "digits":
        known = digits_set_names(gen.holdout_classes)
    else:
        known = sorted([*(gen.ood_val or gen.ood_sets), *gen.aux])
    stray = [name for name in aux_sets if name not in known]
    if stray:
        raise invalid_param("fit.heatmap.aux_sets", "fit", f"sets the benchmark has, among {known}", stray[0],
                            hint="name a generate.ood_val set, a generate.aux set, or (without ood_val) an OOD "
                            "set's val half.")


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
