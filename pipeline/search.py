"""Hyperparameter search over cached neuron states: never a pass through the network.

Protocol (METHODS.md, OpenOOD v1.5):

1. every configuration is scored on ID-val against the OOD **val** sets;
2. the best configuration per method is chosen on val only, by the selection
   metric averaged over the val sets (AUROC by default, or the FPR at
   ``search.recall``: ``metric: fpr``);
3. only the winners are then evaluated on the **test** sets.

No test number can influence a choice: test splits are not even read until the
winners are fixed.

A grid names methods, each with lists of values per hyperparameter. Values are a
list, ``{range: [start, stop, step]}`` (stop inclusive) or ``{logspace: [lo, hi,
num]}`` (lo and hi are the values, not exponents). Per-layer detectors
(``fit.detectors`` names) also take ``columns``: layers and aggregations to
consider (default: every layer and every aggregation). Work shared between
configurations is done once: a per-layer detector is fitted once per layer for
all its columns, and NAC-UE's histograms are built once for every O.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import pipeline._sklearn  # noqa: F401, I001  (before scikit-learn: it then comes without pandas, see there)
from sklearn.base import clone

from pipeline.aggregate import AGGREGATIONS, aggregate
from pipeline.detectors import available_detectors, make_detector
from pipeline.errors import in_context, invalid_param
from pipeline.metrics import fpr_key, group_means, metric_names, ood_metrics
from pipeline.report import group_sets
from pipeline.scorers import SCORERS, available_scorers, make_scorer
from pipeline.scoring import fit_on_train, load_features

log = logging.getLogger(__name__)

METRICS = ("auroc", "fpr")  # what search.metric names; "fpr" is read at search.recall (key fpr@95)


def selection_key(metric: str, recall: float = 0.95) -> str:
    """The metrics key ``metric`` selects on: ``"auroc"``, or ``"fpr@95"`` for ``"fpr"`` at recall 0.95.

    The key itself (``"fpr@95"``) is accepted too when it matches ``recall``.
    """
    if metric == "auroc":
        return metric
    if metric in ("fpr", fpr_key(recall)):
        return fpr_key(recall)
    raise invalid_param("search.metric", "search", f"one of {set(METRICS)}", metric,
                        hint=f"'fpr' selects on the FPR at search.recall ({recall}), key {fpr_key(recall)!r}.")


# --------------------------------------------------------------------------- the grid


def expand_values(name: str, spec) -> list:
    """One hyperparameter's values from a list, a range or a log-spaced range."""
    if isinstance(spec, list):
        if not spec:
            raise invalid_param(name, "search", "a non-empty list", spec)
        return spec
    if isinstance(spec, dict) and set(spec) == {"range"} and _numbers(spec["range"], 3):
        start, stop, step = spec["range"]
        if step <= 0 or stop < start:
            raise invalid_param(name, "search", "{range: [start, stop, step]} with step > 0 and stop >= start", spec)
        return [_tidy(v) for v in np.arange(start, stop + step / 2, step)]
    if isinstance(spec, dict) and set(spec) == {"logspace"} and _numbers(spec["logspace"], 3):
        lo, hi, num = spec["logspace"]
        if lo <= 0 or hi < lo or num < 1 or int(num) != num:
            raise invalid_param(name, "search", "{logspace: [lo > 0, hi >= lo, num >= 1]}", spec)
        return [_tidy(v) for v in np.geomspace(lo, hi, int(num))]
    if isinstance(spec, (str, int, float, bool)) or spec is None:
        return [spec]
    raise invalid_param(name, "search", "a list, {range: [start, stop, step]} or {logspace: [lo, hi, num]}", spec)


def _numbers(values, n):
    return isinstance(values, list) and len(values) == n and all(isinstance(v, (int, float)) for v in values)


def _tidy(value):
    """Plain Python numbers (ints stay ints), rounded so that YAML shows 0.1 and not 0.1000000001."""
    value = float(value)
    return int(value) if value.is_integer() else float(f"{value:.10g}")


@dataclass(frozen=True)
class Config:
    """One point of the grid: a method and its hyperparameters."""

    method: str
    params: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "scorer" if self.method in SCORERS else "detector"


def expand_grid(methods: dict, aggregations=AGGREGATIONS) -> list[Config]:
    """Every configuration of every method, after validating names and values."""
    configs = []
    for method, grid in methods.items():
        grid = dict(grid or {})
        _check_method(method, grid)
        if method not in SCORERS:
            grid.pop("columns", None)
        names = sorted(grid)
        values = [expand_values(f"search.methods.{method}.{n}", grid[n]) for n in names]
        expanded = [Config(method, dict(zip(names, combo))) for combo in itertools.product(*values)]
        for config in expanded:  # every value, not only the first: a bad one would fail in a worker, mid-search
            _check_config(config)
        configs += expanded
    return configs


def _check_method(method: str, grid: dict):
    """Unknown methods fail before any work, in one line."""
    if method not in SCORERS and method not in available_detectors():
        raise invalid_param("search.methods", "search", f"one of {available_scorers() + available_detectors()}",
                            method)


def _check_config(config: Config):
    """One configuration's names and values, checked without data (as fit and detect check theirs)."""
    if config.kind == "scorer":
        make_scorer(config.method, config.params, where="search.methods").check_params(
            prefix=f"search.methods.{config.method}.")
    else:
        make_detector(config.method, config.params, where="search.methods")


def detector_columns(grid: dict, layers, aggregations) -> list[str]:
    """The columns a per-layer detector's search considers (default: all layers and aggregations)."""
    columns = grid.get("columns") or [*layers, *aggregations]
    unknown = [c for c in columns if c not in layers and c not in aggregations]
    if unknown:
        raise invalid_param("search.methods.<detector>.columns", "search",
                            f"layers or aggregations among {[*layers, *aggregations]}", unknown[0])
    return list(columns)


# --------------------------------------------------------------------------- evaluation


class SplitSet:
    """The cached features a search reads.

    ``id_val`` standardises layer scores for aggregations (always ID-val, also
    when testing), ``id_ref`` is the ID side of the metrics (ID-val or ID-test),
    and ``ood`` the OOD sets of the same part, with their groups: those are held
    in memory. ID-train is read from the store only when a fit needs it: a whole
    layer for an in-memory detector, one shard at a time for an out-of-core one
    (``supports_dask``), everything for a scorer that learns (:attr:`train`).
    """

    def __init__(self, store, id_val, id_ref, ood: dict, groups: dict):
        self.store, self.id_val, self.id_ref, self.ood, self.groups = store, id_val, id_ref, ood, groups
        self._lock = threading.Lock()
        self._train_cache = {}

    def fit_scorer(self, scorer):
        """Fit a scorer on what it needs of ID-train (see :func:`pipeline.scoring.fit_on_train`), read once."""
        # what is read is shared between tasks (reading it twice would double the memory)
        return fit_on_train(self.store, scorer, self._train_cache, self._lock)

    @property
    def layers(self) -> list:
        return list(self.store.layers)

    def fit_detector(self, detector, layer):
        """Fit ``detector`` on ID-train's ``layer``: out of core when it can be."""
        labels = self.store.to_numpy("id_train", "label") if detector.requires_labels else None
        if getattr(detector, "supports_dask", False):
            return detector.fit_dask(self.store.sharded("id_train", layer), labels)
        return detector.fit(self.store.to_numpy("id_train", layer).astype(np.float64), labels)


def val_metrics(id_scores, ood_scores: dict, groups: dict, recall=0.95) -> dict:
    """Metrics per OOD set, per group, and ``mean`` over all sets (the selection basis)."""
    per_set = {name: ood_metrics(id_scores, s, recall=recall) for name, s in ood_scores.items()}
    out = {**per_set, **group_means(per_set, {g: v for g, v in groups.items() if v})}
    out["mean"] = {m: float(np.mean([per_set[s][m] for s in per_set])) for m in metric_names(recall)}
    return out


def run_scorer_group(method, fixed: dict, refit_free: list[dict], data: SplitSet, recall=0.95) -> list[dict]:
    """Fit one scorer, then score every refit-free variant of it (e.g. NAC-UE over O)."""
    start = time.perf_counter()
    params = {**fixed, **(refit_free[0] if refit_free else {})}
    scorer = make_scorer(method, params, where="search.methods")
    with in_context(f"search.methods.{method} with {params}"):
        data.fit_scorer(scorer)
    fit_time = time.perf_counter() - start
    rows = []
    for variant in refit_free or [{}]:
        start = time.perf_counter()
        if variant:
            scorer.set_refit_free(**variant)
        with in_context(f"search.methods.{method} with {({**fixed, **variant})}"):
            metrics = val_metrics(scorer.score(data.id_ref), {n: scorer.score(f) for n, f in data.ood.items()},
                                  data.groups, recall)
        seconds = time.perf_counter() - start + fit_time / len(refit_free or [{}])
        rows.append(_row(method, {**fixed, **variant}, "score", metrics, seconds))
    return rows


def run_detector_config(method, params: dict, columns, aggregations, data: SplitSet, recall=0.95) -> list[dict]:
    """Fit a per-layer detector once per layer; every layer and aggregation is one row."""
    start = time.perf_counter()
    layers = data.layers
    proto = make_detector(method, params, where="search.methods")
    splits = {"id_val": data.id_val, "id": data.id_ref, **{f"ood:{n}": f for n, f in data.ood.items()}}
    scores = {name: np.empty((len(f.labels), len(layers))) for name, f in splits.items()}
    for j, layer in enumerate(layers):
        with in_context(f"search.methods.{method} with {params} on layer '{layer}'"):
            det = data.fit_detector(clone(proto), layer)
            for name, feats in splits.items():
                scores[name][:, j] = det.score(feats.layers[layer])
    ood = {name[4:]: s for name, s in scores.items() if name.startswith("ood:")}
    cols = {layer: (scores["id"][:, j], {n: s[:, j] for n, s in ood.items()}) for j, layer in enumerate(layers)}
    std = scores["id_val"]  # z-scores always use ID-val statistics, as in detect
    cols.update({agg: (aggregate(scores["id"], std, agg), {n: aggregate(s, std, agg) for n, s in ood.items()})
                 for agg in aggregations})
    seconds = (time.perf_counter() - start) / len(columns)
    return [_row(method, params, col, val_metrics(*cols[col], data.groups, recall), seconds) for col in columns]


def _row(method, params, column, metrics, seconds) -> dict:
    return {"method": method, "params": params, "column": column, "val": metrics, "seconds": round(seconds, 6)}


# --------------------------------------------------------------------------- the search


@dataclass
class SearchResult:
    """All rows (val metrics per configuration) and the winners with their test metrics."""

    rows: list
    winners: dict
    metric: str

    def best_params(self) -> dict:
        """The winners as ``params.yaml`` sections, ready to paste back."""
        fit, trained, detect = {}, {}, {}
        for method, row in self.winners.items():
            if method not in SCORERS:
                fit[method] = row["params"]
            elif SCORERS[method][0].trained:  # trained by the fit stage: params in fit.<method>
                trained[method], detect[method] = row["params"], {}
            else:
                detect[method] = row["params"]
        out = {}
        if fit or trained:
            out["fit"] = {**({"detectors": fit} if fit else {}), **trained}
        if detect:
            out["detect"] = {"methods": detect}
        return out


def plan_tasks(configs: list[Config], data_layers, aggregations, grids: dict) -> list[tuple]:
    """Group configurations into parallel tasks that share their expensive part."""
    tasks = []
    by_fit = {}
    for cfg in configs:
        if cfg.kind == "detector":
            columns = detector_columns(grids[cfg.method] or {}, data_layers, aggregations)
            tasks.append(("detector", cfg.method, cfg.params, columns))
            continue
        free = set(SCORERS[cfg.method][0].refit_free_params)
        fixed = {k: v for k, v in cfg.params.items() if k not in free}
        key = (cfg.method, json.dumps(fixed, sort_keys=True, default=str))
        by_fit.setdefault(key, (cfg.method, fixed, []))[2].append({k: v for k, v in cfg.params.items() if k in free})
    tasks += [("scorer", method, fixed, variants) for method, fixed, variants in by_fit.values()]
    return tasks


def load_split_set(store, part: str, ood_sets: dict, id_split: str, maps=False) -> SplitSet:
    """Features of ID-val, the ID split of ``part`` and every OOD set of that part (with maps and images if asked)."""
    groups = group_sets(ood_sets)
    ood = {name: load_features(store, s["split"], maps=maps) for name, s in ood_sets.items()}
    id_val = load_features(store, "id_val", maps=maps)
    id_ref = id_val if id_split == "id_val" else load_features(store, id_split, maps=maps)
    return SplitSet(store, id_val, id_ref, ood, groups)


def reads_maps(methods) -> bool:
    """Whether any searched method reads unpooled maps and images (the heatmap decoder)."""
    return any(SCORERS[m][0].reads_maps for m in methods if m in SCORERS)


_SPLIT_SETS: dict = {}


@dataclass(frozen=True)
class SearchJob:
    """Run one search task in whichever process gets it; the val features are read once per process."""

    store: str
    store_key: str  # the store's identity: a different store rewritten at the same path is read again
    ood_val: dict
    aggregations: tuple
    recall: float
    maps: bool = False

    def __call__(self, item):
        from pipeline.store import open_store

        index, task = item
        key = (self.store, self.store_key, json.dumps(self.ood_val, sort_keys=True), self.maps)
        with _LOAD_LOCK:
            if key not in _SPLIT_SETS:
                _SPLIT_SETS.clear()
                _SPLIT_SETS[key] = load_split_set(open_store(self.store), "val", self.ood_val, "id_val", self.maps)
        return _run_task(task, _SPLIT_SETS[key], self.aggregations, self.recall)


_LOAD_LOCK = threading.Lock()


def run_search(store, methods: dict, *, metric="auroc", aggregations=AGGREGATIONS, recall=0.95, n_jobs=-1,
               ood_val=None, ood_test=None, runner=None) -> SearchResult:
    """Score every configuration on val, pick one winner per method, test only the winners.

    Parameters
    ----------
    store : FeatureStore
    methods : dict
        ``method -> {param: values}`` (see the module docstring).
    metric : {"auroc", "fpr"}
        Selection metric, averaged over the OOD val sets; ``"fpr"`` is read at
        ``recall`` (also accepted as its key, ``"fpr@95"``).
    n_jobs : int
        Parallel tasks on local threads; -1 = all local cores. A distributed
        ``runner`` runs as many as its workers have threads.
    ood_val, ood_test : dict
        ``set name -> {"split", "role"}`` (see :func:`pipeline.report.ood_sets`).
    runner : pipeline.compute.Runner, optional
        Where the tasks run (default: local threads).
    """
    from pipeline.compute import Runner

    metric = selection_key(metric, recall)
    configs = expand_grid(methods, aggregations)
    tasks = plan_tasks(configs, list(store.layers), aggregations, methods)
    log.info("search: %d configurations in %d tasks", len(configs), len(tasks))
    runner = runner or Runner(threads=None if n_jobs < 0 else n_jobs)
    maps = reads_maps(methods)
    # absolute: loky's reusable workers keep the working directory they started in
    where = store.path if isinstance(store.path, str) else str(Path(store.path).resolve())
    job = SearchJob(where, store.key, ood_val, tuple(aggregations), recall, maps)
    # local tasks run in processes: NAC-UE's and the detectors' Python loops hold the GIL
    done = {index: rows for (index, _), rows in runner.map_unordered(job, list(enumerate(tasks)), desc="search",
                                                                      unit="task", processes=True)}
    rows = [row for item in sorted(done) for row in done[item]]  # grid order: ties go to the first
    winners = select_winners(rows, metric)
    test = load_split_set(store, "test", ood_test, "id_test", maps)  # read only now: winners are fixed
    for method, row in winners.items():
        row["test"] = _run_task(_winner_task(row, methods), test, aggregations, recall)[0]["val"]
    return SearchResult(rows, winners, metric)


def _run_task(task, data, aggregations, recall):
    kind, method, params, extra = task
    if kind == "detector":
        return run_detector_config(method, params, extra, aggregations, data, recall)
    return run_scorer_group(method, params, extra, data, recall)


def _winner_task(row, methods):
    if row["method"] in SCORERS:
        free = set(SCORERS[row["method"]][0].refit_free_params)
        fixed = {k: v for k, v in row["params"].items() if k not in free}
        return ("scorer", row["method"], fixed, [{k: v for k, v in row["params"].items() if k in free}])
    return ("detector", row["method"], row["params"], [row["column"]])


def select_winners(rows: list[dict], metric: str) -> dict:
    """Best row per method by the val ``mean`` of ``metric``, a metrics key (ties: the first in grid order).

    AUROC is maximised; an FPR (``fpr@95``) is minimised.
    """
    best = {}
    better = max if metric == "auroc" else min
    for row in rows:
        value = row["val"]["mean"][metric]
        current = best.get(row["method"])
        if current is None or (better(value, current["val"]["mean"][metric]) == value
                                and value != current["val"]["mean"][metric]):
            best[row["method"]] = row
    for row in best.values():
        row["selected"] = True
    return best


def leaderboard(result: SearchResult) -> list[dict]:
    """Flat rows for CSV/JSON: params, val metrics, seconds, and test metrics for winners; best first."""
    sign = -1 if result.metric == "auroc" else 1
    rows = sorted(result.rows, key=lambda r: sign * r["val"]["mean"][result.metric])
    return [_flat(r) for r in rows]


def _flat(row) -> dict:
    out = {"method": row["method"], "column": row["column"], "params": json.dumps(row["params"], sort_keys=True),
           "selected": bool(row.get("selected")), "seconds": row["seconds"]}
    for part in ("val", "test"):
        for group in ("mean", "near", "far"):
            for m in row["val"]["mean"]:  # metric_names(recall): every row has its val means
                value = row.get(part, {}).get(group, {}).get(m)
                out[f"{part}_{m}_{group}"] = None if value is None else round(value, 6)
    return out

