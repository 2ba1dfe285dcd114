"""Deploy what the pipeline selected: calibrate the early-exit guard from the store, evaluate it, load it.

* :func:`calibrate_guard` scores ID-val's cached features with the fitted
  per-layer detectors and calibrates the cascade's thresholds
  (:func:`pipeline.cascade.calibrate`): no re-inference.
* :func:`evaluate_guard` runs the cascade's decisions on the cached **test**
  splits: AUROC and FPR@95 of its continuous score, the achieved ID TPR next
  to the target, where inputs stop, and the FLOPs not spent.
* :func:`load_guard` builds a :class:`~pipeline.guard.Guard` from the
  checkpoint, the fitted detectors and the thresholds file.

The thresholds file (``calibrate``'s output) is JSON: detector, layers,
thresholds, budgets, scales, target and achieved val TPR, and what they were
calibrated with: the detectors' seal digest, the store's key and the
checkpoint's SHA-256. Evaluating or loading a guard refuses thresholds of
other detectors or another model, naming both hashes (:mod:`pipeline.provenance`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline import provenance
from pipeline.artifacts import atomic_write
from pipeline.cascade import Calibration, calibrate, cascade_score, exit_layers
from pipeline.errors import DataError, invalid_param
from pipeline.metrics import metric_names, ood_metrics
from pipeline.report import group_sets, ood_sets

if TYPE_CHECKING:  # torch is imported where it is used: calibration and evaluation run without it
    import torch

log = logging.getLogger(__name__)

FORMAT = 2  # 1: without the detectors' digest (refused: it cannot be checked against the detectors)


def guard_detectors(fitted, detector, layers) -> dict:
    """``layer -> fitted detector`` for the guarded layers; one-line errors naming what is missing."""
    if detector not in fitted.names:
        raise invalid_param("calibrate.detector", "calibrate", f"one of the fitted detectors {fitted.names}",
                            detector, hint="add it to fit.detectors, or pick a fitted one.")
    unknown = [layer for layer in layers if layer not in fitted.layers]
    if unknown:
        raise invalid_param("calibrate.layers", "calibrate", f"layers of the store {fitted.layers}", unknown[0],
                            hint="guard layers that extract.layers lists.")
    ordered = [layer for layer in fitted.layers if layer in layers]  # network order
    return {layer: fitted.detectors[detector, layer] for layer in ordered}


def layer_scores(store, split, detectors: dict) -> np.ndarray:
    """Scores of ``split``'s cached features, one column per guarded layer: shape (n_samples, n_layers)."""
    n = int(store.split_attrs(split)["n_samples"])
    out = np.empty((n, len(detectors)))
    for j, (layer, det) in enumerate(detectors.items()):
        for start, block in store.iter_blocks(split, layer):
            out[start:start + len(block), j] = det.score(block.astype(np.float64))
    return out


def calibrate_guard(store, fitted, cfg) -> dict:
    """Calibrate the cascade on ID-val; returns the thresholds file's content.

    Parameters
    ----------
    store : FeatureStore
    fitted : FittedDetectors
    cfg : CalibrateConfig
    """
    fitted.check_compatible(store)
    detectors = guard_detectors(fitted, cfg.detector, cfg.layers)
    layers = list(detectors)
    weights = None if cfg.weights is None else [cfg.weights[list(cfg.layers).index(layer)] for layer in layers]
    cal = calibrate(layer_scores(store, "id_val", detectors), cfg.target_tpr, weights)
    log.info("guard: %s on %s; ID-val TPR %.4f (target %.2f)", cfg.detector, layers, cal.val_tpr, cfg.target_tpr)
    return {
        "format": FORMAT, "detector": cfg.detector, "layers": layers, "target_tpr": cfg.target_tpr,
        "val_tpr": cal.val_tpr, "thresholds": dict(zip(layers, cal.thresholds.tolist())),
        "budgets": dict(zip(layers, cal.budgets.tolist())), "scales": dict(zip(layers, cal.scales.tolist())),
        "input_shape": store.provenance.get("input_shape"),
        "detectors_digest": fitted.digest, "store_key": store.key,
        "checkpoint_sha256": store.provenance.get("checkpoint_sha256"),
    }


def save_thresholds(content: dict, path) -> Path:
    """Write the thresholds file atomically: the old file or the whole new one, never a ``*.tmp`` left behind."""
    return atomic_write(path, json.dumps(content, indent=2, allow_nan=True) + "\n")


def load_thresholds(path) -> dict:
    """Read the thresholds file; one-line error if it is missing or not one."""
    from pipeline.files import load_json, require_keys

    content = load_json(path, "Guard thresholds file", "run `layerscope calibrate` (or `dvc repro calibrate`).")
    if content.get("format") == 1:
        raise DataError(f"Guard thresholds '{path}' were written by an older layerscope (format 1: without the "
                        "digest of the detectors they were calibrated with). Hint: rerun `layerscope calibrate`.")
    if content.get("format") != FORMAT:
        raise DataError(f"'{path}' is not a layerscope guard thresholds file (format {FORMAT}; got format "
                        f"{content.get('format')!r}). Hint: rerun `layerscope calibrate`.")
    hint = "rerun `layerscope calibrate`: it writes every entry."
    require_keys(content, THRESHOLD_KEYS, path, "Guard thresholds file", hint)
    layers = content["layers"]
    for key in ("thresholds", "budgets", "scales"):
        entry = content[key]
        if not isinstance(layers, list) or not isinstance(entry, dict) or any(
                not isinstance(entry.get(layer), (int, float)) for layer in layers):
            raise DataError(f"Guard thresholds file '{path}': '{key}' must map each of the layers {layers} to a "
                            f"number. Hint: {hint}")
    return content


#: What a thresholds file must hold (written by :func:`calibrate_guard`).
THRESHOLD_KEYS = ("detector", "layers", "target_tpr", "val_tpr", "thresholds", "budgets", "scales", "input_shape",
                  "detectors_digest", "store_key", "checkpoint_sha256")


def calibration_of(content: dict) -> Calibration:
    """The :class:`Calibration` a thresholds file holds."""
    layers = content["layers"]
    return Calibration(np.array([content["thresholds"][k] for k in layers], dtype=np.float64),
                       np.array([content["budgets"][k] for k in layers], dtype=np.float64),
                       np.array([content["scales"][k] for k in layers], dtype=np.float64), content["val_tpr"])


def evaluate_guard(store, fitted, content: dict, cumulative_flops, *, recall=0.95, thresholds_path=None) -> dict:
    """The cascade on the cached test splits: detection metrics, achieved ID TPR and compute saved.

    Parameters
    ----------
    store : FeatureStore
    fitted : FittedDetectors
    content : dict
        The thresholds file (:func:`calibrate_guard`).
    cumulative_flops : array-like of shape (n_layers + 1,)
        FLOPs of one input up to each guarded layer, then the whole network's
        (:meth:`pipeline.guard.Guard.block_flops`).
    recall : float, default=0.95
        OOD recall of the FPR: key ``fpr@95`` (``fpr@90`` at 0.9).
    thresholds_path : path-like, optional
        Where ``content`` came from, for messages.

    Returns
    -------
    dict
        ``id_test`` (TPR, exits, FLOPs saved), ``sets`` (per OOD test set: metrics,
        detection rate, exits, FLOPs saved), ``near``/``far`` means, and the set-up.
    """
    fitted.check_compatible(store)
    provenance.check_thresholds_detectors(content, fitted, thresholds_path)
    provenance.check_thresholds_checkpoint(content, provenance.store_checkpoint(store), thresholds_path)
    detectors = guard_detectors(fitted, content["detector"], content["layers"])
    cal = calibration_of(content)
    flops = np.asarray(cumulative_flops, dtype=np.float64)
    id_scores = layer_scores(store, "id_test", detectors)
    id_result = _decisions(id_scores, cal, flops, list(detectors))
    sets = ood_sets(store, "test")
    per_set = {}
    for name, s in sets.items():
        scores = layer_scores(store, s["split"], detectors)
        metrics = ood_metrics(cascade_score(id_scores, cal), cascade_score(scores, cal), recall=recall)
        per_set[name] = {**{m: round(v, 6) for m, v in metrics.items()}, "role": s["role"],
                         **_decisions(scores, cal, flops, list(detectors))}
    out = {"detector": content["detector"], "layers": content["layers"], "target_tpr": content["target_tpr"],
           "recall": recall,
           "val_tpr": round(content["val_tpr"], 6), "id_test_tpr": round(1.0 - id_result["flagged"], 6),
           "flops_per_input": {"full": float(flops[-1]), **dict(zip(content["layers"], flops[:-1].tolist()))},
           "id_test": id_result, "sets": per_set}
    for group, names in group_sets(sets).items():
        if names:
            keys = [*metric_names(recall), "flagged", "flops_saved"]
            out[group] = {k: round(float(np.mean([per_set[n][k] for n in names])), 6) for k in keys}
    return out


def _decisions(scores, cal, flops, layers) -> dict:
    """Fraction flagged, where inputs stop, and the fraction of FLOPs not spent."""
    exits = exit_layers(scores, cal.thresholds)
    spent = np.where(exits >= 0, flops[np.maximum(exits, 0)], flops[-1])
    counts = {layer: round(float(np.mean(exits == j)), 6) for j, layer in enumerate(layers)}
    return {"flagged": round(float(np.mean(exits >= 0)), 6), "exits": {**counts, "none": round(float(np.mean(
        exits < 0)), 6)}, "flops_saved": round(float(1.0 - spent.mean() / flops[-1]), 6)}


def load_guard(model_path, detectors_dir, thresholds_path, device="cpu"):
    """A :class:`~pipeline.guard.Guard` from the pipeline's files (see :func:`build_guard`)."""
    from pipeline.scoring import load_detectors

    content = load_thresholds(thresholds_path)  # first: the thresholds name the detector to load
    fitted = load_detectors(detectors_dir, only=[content["detector"]])
    return build_guard(model_path, fitted, content, device, thresholds_path=thresholds_path)


def build_guard(model_path, fitted, content: dict, device="cpu", *, thresholds_path=None):
    """A :class:`~pipeline.guard.Guard` of the checkpoint, the fitted detectors and a thresholds file's content.

    Before loading the model, refuses detectors fitted on features of another
    checkpoint, thresholds calibrated for another checkpoint, and thresholds
    calibrated with other detectors (:mod:`pipeline.provenance`; both hashes named).
    """
    from pipeline.guard import Guard
    from pipeline.models import load_checkpoint

    model_sha = provenance.model_sha256(model_path)
    provenance.check_detectors_model(fitted, model_path, model_sha)
    provenance.check_thresholds_checkpoint(content, provenance.model_checkpoint(model_path, model_sha),
                                           thresholds_path)
    provenance.check_thresholds_detectors(content, fitted, thresholds_path)
    model, _ = load_checkpoint(model_path, device)
    detectors = guard_detectors(fitted, content["detector"], content["layers"])
    return Guard(model, detectors, content["thresholds"], content["input_shape"], device=device)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def read_inputs(path, input_shape) -> tuple[list[str], torch.Tensor]:
    """Inputs for ``guard predict``: a folder of images, or a saved tensor/array file.

    Images (any of ``IMAGE_SUFFIXES``, found recursively, sorted) are converted to
    the model's channels, resized to its ``(H, W)`` and scaled to [0, 1], as the
    benchmark's images are. A ``.pt``/``.pth`` tensor or ``.npy`` array must be
    ``(n, C, H, W)`` or ``(C, H, W)`` already; integer pixels (uint8, 0..255)
    are scaled to [0, 1] as images are, floats must already be in [0, 1] (a
    float array of 0..255 values is refused: guessing its scale would silently
    change every score).

    Returns
    -------
    names : list of str
        One per input: the image's path relative to ``path``, or the row index.
    x : Tensor of shape (n, C, H, W), float32
    """
    import torch

    from pipeline.files import load_npy, load_torch

    path, shape = Path(path), tuple(input_shape)
    hint = "pass a folder of images, or a .pt/.npy file of shape (n, C, H, W) with values in [0, 1]."
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"Folder '{path}' holds no images (looked for {', '.join(IMAGE_SUFFIXES)}). Hint: {hint}")
        return [str(p.relative_to(path)) for p in files], torch.stack([_read_image(p, shape) for p in files])
    if not path.exists():
        raise DataError(f"Inputs '{path}' do not exist. Hint: {hint}")
    if path.suffix in (".pt", ".pth"):
        x = load_torch(path, "Inputs file", hint)
        if not isinstance(x, torch.Tensor):
            raise DataError(f"Inputs file '{path}' holds a {type(x).__name__}, not a tensor. Hint: {hint}")
        x = (x.detach().float() if x.dtype in (torch.bfloat16, torch.float16) else x.detach()).numpy()
    elif path.suffix == ".npy":
        x = load_npy(path, "Inputs file", hint)
    else:
        raise DataError(f"Cannot read inputs from '{path}': expected a folder of images, a .pt/.pth tensor or a .npy "
                        "array. Hint: save a tensor with torch.save(x, 'inputs.pt').")
    return [str(i) for i in range(len(x) if x.ndim == 4 else 1)], torch.from_numpy(_as_pixels(x, path, shape, hint))


def _as_pixels(x: np.ndarray, path, shape, hint) -> np.ndarray:
    """An array file's values as the model's inputs: (n, C, H, W) float32 in [0, 1]; one-line errors otherwise."""
    original = x.shape
    x = x[None] if x.ndim == 3 else x
    if x.ndim != 4 or tuple(x.shape[1:]) != shape:
        expected = ", ".join(map(str, shape))
        raise DataError(f"Inputs file '{path}' has shape {original}; the model expects (n, {expected}) or "
                        f"({expected}). Hint: resize them, or pass a folder of images (resized for you).")
    if x.dtype.kind in "biu":
        if x.min(initial=0) < 0 or x.max(initial=0) > 255:
            raise DataError(f"Inputs file '{path}' holds integers outside 0..255 (min {x.min()}, max {x.max()}); "
                            f"expected 8-bit pixels. Hint: {hint}")
        return (x.astype(np.float32) / 255.0)  # 8-bit pixels, scaled as image folders are
    if not np.isfinite(x).all():
        raise DataError(f"Inputs file '{path}' holds {int((~np.isfinite(x)).sum())} NaN or infinite values. "
                        f"Hint: {hint}")
    if x.size and (x.min() < 0.0 or x.max() > 1.0):
        raise DataError(f"Inputs file '{path}' holds floats in [{x.min():.4g}, {x.max():.4g}]; expected pixels in "
                        "[0, 1], as the model was trained on (unnormalised: the model normalises them itself). "
                        "Hint: divide 0..255 values by 255; save 8-bit pixels as uint8 to have them scaled for you.")
    return x.astype(np.float32)


def _read_image(path, shape):
    import torch
    from PIL import Image, UnidentifiedImageError

    channels, height, width = shape
    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB").resize((width, height), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:  # PIL's errors on damaged files
        raise DataError(f"Image '{path}' cannot be read ({type(exc).__name__}: {str(exc)[:120]}). Hint: remove or "
                        "replace it; every file with an image suffix in the folder is read.") from None
    return torch.from_numpy(arr.reshape(height, width, -1).transpose(2, 0, 1).copy())
