"""Turn per-layer scores into the reported metrics, the per-layer table and figures.

Protocol (METHODS.md): every OOD set is scored against the full ID test split;
a group figure (near, far) is the unweighted mean over its sets; aggregations
are standardised on ID-val only. Metric definitions live in :mod:`pipeline.metrics`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

import numpy as np

from pipeline.aggregate import AGGREGATIONS, aggregate, argmax_layer_counts
from pipeline.artifacts import atomic_write
from pipeline.metrics import fpr_key, group_means, ood_metrics
from pipeline.roles import GROUPS, OOD_VAL

log = logging.getLogger(__name__)



def ood_sets(store, part="test") -> dict[str, dict]:
    """OOD sets with a split of the given part: ``set name -> {"split", "role"}``.

    On the val part, when the benchmark has separate OOD val sets (role
    ``"ood_val"``), those are the val sets, and the near/far sets' own val halves
    (if any) are left out: selection then uses what OpenOOD selects on.
    """
    found, separate = {}, {}
    for split in store.splits:
        attrs = store.split_attrs(split)
        if attrs.get("part") != part:
            continue
        if attrs.get("role") in GROUPS:
            found[attrs["set"]] = {"split": split, "role": attrs["role"]}
        elif attrs.get("role") == OOD_VAL and part == "val":
            separate[attrs["set"]] = {"split": split, "role": OOD_VAL}
    return separate or found


def group_sets(sets: dict) -> dict[str, list[str]]:
    """``{"near": [...], "far": [...]}`` from :func:`ood_sets`; a separate OOD val set is in both groups."""
    return {g: [name for name, s in sets.items() if s["role"] in (g, OOD_VAL)] for g in GROUPS}


def with_aggregations(scores: dict, reference: dict, layers, aggregations) -> dict[str, dict[str, np.ndarray]]:
    """Per per-layer method: ``column -> (n,)`` scores for each layer, plus each aggregation.

    Parameters
    ----------
    scores : dict
        ``method -> (n_samples, n_layers)`` for the split being evaluated.
    reference : dict
        ``method -> (n_val, n_layers)`` ID-val scores, for standardisation.
    """
    out = {}
    for method, matrix in scores.items():
        cols = {layer: matrix[:, j] for j, layer in enumerate(layers)}
        if len(layers) > 1:
            cols.update({agg: aggregate(matrix, reference[method], agg) for agg in aggregations})
        out[method] = cols
    return out


def evaluate(id_scores: dict, ood_scores: dict, groups: dict, *, recall=0.95, aupr="average_precision") -> dict:
    """Metrics per method, column (layer or aggregation), OOD set and group.

    Parameters
    ----------
    id_scores : dict
        ``method -> column -> (n_id,)`` on ID-test.
    ood_scores : dict
        ``set name -> method -> column -> (n_ood,)``.
    groups : dict
        ``group -> [set names]``.
    recall, aupr
        See :func:`pipeline.metrics.ood_metrics`.

    Returns
    -------
    dict
        ``method -> column -> {set or group -> {metric -> float}}``.
    """
    results = {}
    for method, columns in id_scores.items():
        results[method] = {}
        for col, s_id in columns.items():
            per_set = {name: ood_metrics(s_id, ood[method][col], recall=recall, aupr=aupr)
                       for name, ood in ood_scores.items()}
            results[method][col] = {**per_set, **group_means(per_set, {g: v for g, v in groups.items() if v})}
    return results


def table_rows(results: dict, layers) -> list[dict]:
    """One row per (method, column) with group metrics, in network order."""
    rows = []
    for method, columns in results.items():
        for position, (col, per) in enumerate(columns.items()):
            kind = "layer" if col in layers else "method score" if col == "score" else "aggregation"
            row = {"key": f"{method}/{col}", "method": method, "layer": col, "kind": kind, "position": position}
            for group in GROUPS:
                row.update({f"{m}_{group}": round(value, 6) for m, value in per.get(group, {}).items()})
            rows.append(row)
    return rows


def write_json(obj, path) -> Path:
    """Write ``obj`` as indented JSON, atomically (a reader never sees half a file)."""
    return atomic_write(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_csv(rows: list[dict], path) -> Path:
    """Write ``rows`` (dicts with the same keys) as CSV, atomically."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write(path, buffer.getvalue())


def headline_column(columns, head=None, layer=None) -> str:
    """The column a method is headlined on.

    A network-level method's is its ``score``. A per-layer method's is ``layer``
    when given, else the penultimate layer: the last one that is not ``head``
    (the classifier's final linear layer, whose outputs are the logits), which
    is where OpenOOD reports Mahalanobis and KNN.

    Parameters
    ----------
    columns : iterable of str
        The method's columns: layers, aggregations, or ``score``.
    """
    names = list(columns)
    if "score" in names:
        return "score"
    layers = [c for c in names if c not in AGGREGATIONS]
    if layer in layers:
        return layer
    return ([c for c in layers if c != head][-1:] or layers[-1:])[0]


def headline_metrics(results: dict, *, id_accuracy: float, recall: float, head=None) -> dict:
    """The compact ``metrics.json`` DVC shows: a few numbers per method, not every set and layer.

    Per method (a top-level key, so that ``dvc exp show`` columns read
    ``msp.auroc_near``), on its :func:`headline_column`: near and far mean AUROC
    and FPR at ``recall`` (keys ``auroc_near``, ``auroc_far``, ``fpr@95_near``,
    ``fpr@95_far``). ``layer`` names the headline layer of the per-layer methods
    (the penultimate one). Every set, layer and aggregation is in the detail
    file (:func:`detail_metrics`), which is not a DVC metric.

    Parameters
    ----------
    results : dict
        ``method -> column -> {set or group -> {metric -> float}}`` (:func:`evaluate`).
    """
    fpr, methods, layers = fpr_key(recall), {}, set()
    for method, columns in results.items():
        column = headline_column(columns, head)
        if column != "score":
            layers.add(column)
        per = columns[column]
        methods[method] = {f"{m}_{g}": round(per[g][m], 6) for m in ("auroc", fpr) for g in GROUPS if g in per}
    return {"id_accuracy": round(id_accuracy, 6), "recall": recall,
            **({"layer": sorted(layers)[0]} if len(layers) == 1 else {}), **methods}


def headline_methods(metrics: dict) -> dict:
    """``method -> {metric -> float}`` of a compact ``metrics.json`` (:func:`headline_metrics`)."""
    return {k: v for k, v in metrics.items() if isinstance(v, dict)}


def detail_metrics(results: dict, *, id_accuracy: float, recall: float, head=None, aupr="average_precision") -> dict:
    """The detail file: every method, column (layer or aggregation), OOD set and group (:func:`evaluate`)."""
    return {"id_accuracy": round(id_accuracy, 6), "recall": recall, "aupr": aupr, "head": head, "methods": results}


def read_detail(path) -> dict:
    """The detail file ``detect`` writes (:func:`detail_metrics`), checked: one-line errors for a missing,
    garbage, compact or foreign file."""
    from pipeline.errors import DataError
    from pipeline.files import load_json, require_keys

    hint = "run `dvc repro` (or `layerscope detect`) to write it, or pass --detail."
    data = load_json(path, "Metrics detail file", hint)
    if isinstance(data, dict) and "methods" not in data and "id_accuracy" in data and headline_methods(data):
        raise DataError(f"Metrics detail file '{path}' holds only the headline numbers (the compact metrics.json "
                        "DVC shows), not every layer and set. Hint: pass the detail file `detect --detail` wrote "
                        "(paths.detail in dvc.yaml, reports/detail.json), or rerun `dvc repro`.")
    data = require_keys(data, ("id_accuracy", "methods"), path, "Metrics detail file", hint)
    methods = data["methods"]
    if not isinstance(methods, dict) or not all(
            isinstance(columns, dict) and all(isinstance(per, dict) for per in columns.values())
            for columns in methods.values()):
        raise DataError(f"Metrics detail file '{path}': 'methods' must map each method to its columns' metrics, "
                        f"as `layerscope detect` writes it. Hint: {hint}")
    recall = data.get("recall", 0.95)
    if isinstance(recall, bool) or not isinstance(recall, (int, float)) or not 0 < recall <= 1:
        raise DataError(f"Metrics detail file '{path}': 'recall' must be a number in (0, 1]; got {recall!r}. "
                        f"Hint: {hint}")
    if not isinstance(data["id_accuracy"], (int, float)):
        raise DataError(f"Metrics detail file '{path}': 'id_accuracy' must be a number; got "
                        f"{data['id_accuracy']!r}. Hint: {hint}")
    return data


def summary_rows(results: dict, *, all_columns=False, head=None, layer=None, groups=GROUPS, recall=0.95) -> list[dict]:
    """Headline rows of the detail file's methods: AUROC and FPR per group (near, far) or per set.

    A method shows its :func:`headline_column`, and a per-layer method also its
    aggregations (every column with ``all_columns``).

    Parameters
    ----------
    results : dict
        The detail file's ``methods``.
    head : str, optional
        The head's layer name (the detail file's ``head``); without it, the last layer.
    layer : str, optional
        The layer column to show for per-layer methods.
    groups : sequence of str
        The row's columns: ``("near", "far")``, or OOD set names.
    recall : float
        The FPR's recall (names its key, :func:`pipeline.metrics.fpr_key`).

    Returns
    -------
    list of dict
        ``{"method", "column", "auroc_<group>", "fpr_<group>", ...}``.
    """
    fpr, rows = fpr_key(recall), []
    for method, columns in results.items():
        names = list(columns)
        if not all_columns:
            shown = headline_column(columns, head, layer)
            names = [shown] + ([c for c in names if c in AGGREGATIONS] if shown != "score" else [])
        for col in names:
            per = columns[col]
            rows.append({"method": method, "column": col,
                         **{f"{short}_{g}": per[g].get(m) for g in groups if isinstance(per.get(g), dict)
                            for short, m in (("auroc", "auroc"), ("fpr", fpr))}})
    return rows


def argmax_counts(scores_by_set: dict, layers) -> dict:
    """Per method and split: how many samples take their max over layers at each layer.

    Parameters
    ----------
    scores_by_set : dict
        ``split or set name -> method -> (n, n_layers)`` raw per-layer scores.
    """
    return {method: {name: dict(zip(layers, argmax_layer_counts(by_method[method]).tolist()))
                     for name, by_method in scores_by_set.items()}
            for method in next(iter(scores_by_set.values()))}


def write_figures(results: dict, layers, sets, directory) -> list[Path]:
    """Seed 000's figure per method and OOD set: AUROC per layer, final layer dotted.

    Methods with fewer than two layer columns get no figure.
    """
    from pipeline.plots import plot_layer_auroc  # matplotlib: only when figures are drawn

    paths = []
    for method, columns in results.items():
        method_layers = [layer for layer in layers if layer in columns]
        if len(method_layers) < 2:
            continue
        for name in sets:
            aurocs = [columns[layer][name]["auroc"] for layer in method_layers]
            title = f"{method}: ID vs {name} (AUROC per layer)"
            paths.append(plot_layer_auroc(method_layers, aurocs, Path(directory) / method / f"{name}.png",
                                          title=title))
    return paths
