"""Benchmark of ``layerscope search``: what the feature store saves per configuration.

Run from the repository root (see ``benchmarks/README.md``)::

    .venv/bin/python benchmarks/bench_search.py            # full run, writes benchmarks/results/bench_search.json
    .venv/bin/python benchmarks/bench_search.py --quick    # smoke run, one round, writes nothing unless --out

Inputs: the default DVC outputs (``dvc.yaml`` paths): the store ``cache/features.zarr``,
the data ``data/benchmark`` and the checkpoint ``cache/model.pt``; settings from the
``search`` and ``extract`` sections of ``params.yaml``, read at run time.

1. Cached cost per configuration: wall time of ``run_search`` over the whole
   ``search.methods`` grid on the default store (``search.n_jobs``), divided by
   the number of leaderboard rows; per method, the rows' own ``seconds``.
2. Uncached cost of one configuration, what a tool without a feature store pays
   per setting: one extraction (the ``extract`` plan of ``params.yaml``, with
   ``grad_layers``) of every split a search reads into a temporary store, then
   one NAC-UE configuration (``detect.methods.nac_ue``) fitted on ID-train and
   scored on ID-val and the OOD val sets from that store.
   Reference: the same forward + backward passes and hooks without any store
   (what a tool holding features in memory pays), plus the same scoring.
3. Ratio (2) / (1); the goal is >= 100.
4. Wall time of the ``search.methods.nac_ue`` grid alone, n_jobs=-1 and n_jobs=1.
6. ``--methods-cost``: what each ``detect`` method adds to the ``detect`` stage on
   the default store. For each network-level method of ``detect.methods``: its
   fit on ID-train plus its scores of every split ``detect`` scores (ID-val,
   ID-test, the OOD test sets), as ``detect`` runs them (``fit_scorers``,
   ``score_methods``). For each per-layer detector of ``fit.detectors``: its
   scores of the same splits on every layer (``score_split``; its fit is the
   ``fit`` stage's, reported apart). Medians over ``--repeats`` interleaved
   rounds; the sum over the methods issue 17 added is the figure (goal < 30 s).
5. Read cost of the store's integrity checks on the default store: open, and
   open + read every array, through ``open_store`` (manifest check, Zstd
   checksums) against the format-1 path (zarr alone, a copy without checksums);
   see ``bench_extract.measure_read_cost``. ``--read-cost`` runs only this.

Measurements run in interleaved rounds (1, 2, reference, 4 per round) so that drift hits all
of them alike; the median over rounds is the figure. The very first search runs
before the rounds, cold (it starts joblib's worker processes), and is reported
apart.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
import sklearn
import torch
import yaml
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_extract import _machine_busy_seconds, _read_cost_table, machine_info, measure_read_cost  # noqa: E402

from pipeline.config import load_section  # noqa: E402
from pipeline.datasets import load_split, read_manifest  # noqa: E402
from pipeline.extract import LayerRecorder, extract_batch, extract_to_store, resolve_plan  # noqa: E402
from pipeline.models import load_checkpoint, resolve_device  # noqa: E402
from pipeline.report import ood_sets  # noqa: E402
from pipeline.scorers import SCORERS  # noqa: E402
from pipeline.scoring import fit_detectors, fit_scorers, score_methods, score_split  # noqa: E402
from pipeline.search import leaderboard, load_split_set, run_scorer_group, run_search  # noqa: E402
from pipeline.store import StoreWriter, open_store  # noqa: E402
from pipeline.userdata import SplitDataset  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PARAMS = REPO / "params.yaml"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "bench_search.json"
METHODS_OUT = REPO / "benchmarks" / "results" / "bench_methods.json"
RATIO_GOAL = 100
CLEAN_SHARE = 0.10  # a pass is "clean" when other processes used < 10% of the cores meanwhile
UNCACHED_METHOD = "nac_ue"
# what issue 17 added: its network-level scorers (ODIN, RankFeat and Gram score what extraction stored) and detectors
ISSUE17_SCORERS = ("tempscale", "entropy", "gen", "klm", "dice", "gradnorm", "residual", "fdbd", "nnguide",
                   "relation", "she", "openmax", "gram", "odin", "rankfeat")
ISSUE17_DETECTORS = ("rmds", "mahalanobis_pp", "rmds_pp", "gmm", "ssd")


def dvc_paths() -> dict:
    """``vars.paths`` of ``dvc.yaml``, as absolute paths."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    paths = next(v["paths"] for v in spec["vars"] if "paths" in v)
    return {k: REPO / v for k, v in paths.items()}


# --------------------------------------------------------------------------- timing


def tree_cpu_seconds() -> float:
    """CPU seconds of this process and all its live descendants (joblib workers included)."""
    me = psutil.Process()
    total = 0.0
    for proc in (me, *me.children(recursive=True)):
        try:
            t = proc.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            continue
    return total


def timed_pass(fn) -> tuple[float, float, object]:
    """Seconds of ``fn()``, the share of all cores that *other* processes used meanwhile, and its result.

    Unlike ``bench_extract.other_cpu_share``, the process's own joblib workers
    count as its own: they are live children, not reaped ones.
    """
    busy0, own0 = _machine_busy_seconds(), tree_cpu_seconds()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    other = (_machine_busy_seconds() - busy0) - (tree_cpu_seconds() - own0)
    return seconds, max(0.0, other) / (seconds * (os.cpu_count() or 1)), result


# --------------------------------------------------------------------------- 1 and 4: cached search


def search_once(store, methods, cfg, n_jobs) -> list[dict]:
    """One ``run_search`` over ``methods`` with the ``search`` section's settings; the leaderboard rows."""
    result = run_search(store, methods, metric=cfg.metric, aggregations=cfg.aggregations, recall=cfg.recall,
                        n_jobs=n_jobs, ood_val=ood_sets(store, "val"), ood_test=ood_sets(store, "test"))
    return leaderboard(result)


def per_method(rows) -> dict:
    """``method -> {"rows", "seconds_sum", "seconds_per_row"}`` from the rows' own ``seconds``."""
    out = {}
    for row in rows:
        entry = out.setdefault(row["method"], {"rows": 0, "seconds_sum": 0.0})
        entry["rows"] += 1
        entry["seconds_sum"] += row["seconds"]
    for entry in out.values():
        entry["seconds_sum"] = round(entry["seconds_sum"], 4)
        entry["seconds_per_row"] = round(entry["seconds_sum"] / entry["rows"], 6)
    return out


def summarise(passes) -> dict:
    """``passes`` is a list of ``(seconds, other_share)``: all of them, median, best, clean count."""
    seconds = [s for s, _ in passes]
    return {"seconds": [round(s, 4) for s in seconds], "other_cpu_share": [round(o, 3) for _, o in passes],
            "median": round(statistics.median(seconds), 4), "best": round(min(seconds), 4),
            "clean_passes": sum(o < CLEAN_SHARE for _, o in passes)}


# --------------------------------------------------------------------------- 2: one configuration without a cache


def search_splits(store) -> list[str]:
    """Every split a search reads: ID train/val/test and each OOD set's val and test split."""
    ood = [s["split"] for part in ("val", "test") for s in ood_sets(store, part).values()]
    return ["id_train", "id_val", "id_test", *ood]


def load_inputs(paths, splits) -> dict:
    """The model and the datasets of ``splits``, loaded once: extraction is timed, not file reading."""
    cfg = load_section("extract", PARAMS)
    device = resolve_device(cfg.device)
    model, _spec = load_checkpoint(paths["model"], device)
    manifest = read_manifest(paths["data"])
    loaded = {name: load_split(paths["data"] / manifest["splits"][name]["file"]) for name in splits}
    datasets = {name: (SplitDataset(s), dict(s.attrs)) for name, s in loaded.items()}
    shape = loaded["id_train"].images.shape[1:]
    return {"cfg": cfg, "device": device, "model": model, "datasets": datasets, "input_shape": shape}


def stage_plan(inputs):
    """The ``extract`` plan of ``params.yaml`` (with ``grad_layers``), resolved as the stage does."""
    cfg = inputs["cfg"]
    return resolve_plan(inputs["model"], cfg.layers, inputs["input_shape"], grad_layers=cfg.grad_layers,
                        head=cfg.head, device=inputs["device"])


def extract_once(inputs, out) -> None:
    """The ``extract`` stage's work on in-memory inputs: plan, ``StoreWriter``, ``extract_to_store``, finalize."""
    cfg, model, device = inputs["cfg"], inputs["model"], inputs["device"]
    plan = stage_plan(inputs)
    with StoreWriter(out, "bench-search", chunk_rows=cfg.chunk_rows, shard_rows=cfg.shard_rows,
                     compression_level=cfg.compression_level) as writer:
        extract_to_store(model, inputs["datasets"], plan, writer, batch_size=cfg.batch_size, device=device,
                         dtype=cfg.dtype)
        writer.finalize({"benchmark": True, "grad_layers": list(plan.grad_layers)}, plan.layers)


def passes_no_store(inputs) -> None:
    """Reference: the same forward + backward passes and hooks over the same splits, nothing stored.

    What a tool that keeps features in memory would pay per configuration.
    """
    cfg, model = inputs["cfg"], inputs["model"]
    with LayerRecorder(model, stage_plan(inputs)) as recorder:
        for dataset, _attrs in inputs["datasets"].values():
            for x, _ in torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False):
                extract_batch(model, x.to(inputs["device"]), recorder)


def score_one(store_path, method, params, recall) -> dict:
    """Fit one configuration on ID-train of a fresh store and score it on ID-val and the OOD val sets."""
    store = open_store(store_path)
    data = load_split_set(store, "val", ood_sets(store, "val"), "id_val")
    free = set(SCORERS[method][0].refit_free_params)
    fixed = {k: v for k, v in params.items() if k not in free}
    variant = {k: v for k, v in params.items() if k in free}
    return run_scorer_group(method, fixed, [variant] if variant else [], data, recall)[0]


def uncached_once(inputs, params, recall, workdir) -> dict:
    """One uncached evaluation: extraction into a new temporary store, then one scored configuration."""
    out = Path(tempfile.mkdtemp(dir=workdir)) / "features.zarr"
    extract_s, extract_other, _ = timed_pass(lambda: extract_once(inputs, out))
    score_s, score_other, row = timed_pass(lambda: score_one(out, UNCACHED_METHOD, params, recall))
    return {"extract": (extract_s, extract_other), "score": (score_s, score_other),
            "total": (extract_s + score_s, max(extract_other, score_other)), "val_auroc": row["val"]["mean"]["auroc"]}


# --------------------------------------------------------------------------- the rounds


def run_rounds(store, cfg, inputs, nac_params, repeats, workdir) -> dict:
    """Cold search, warm-up extraction, then ``repeats`` interleaved rounds of the four timed paths."""
    cold = timed_pass(lambda: search_once(store, cfg.methods, cfg, cfg.n_jobs))
    uncached_once(inputs, nac_params, cfg.recall, workdir)  # warm-up: torch's first passes are slow
    nac_grid = {UNCACHED_METHOD: cfg.methods[UNCACHED_METHOD]}
    passes = {"search": [], "extract": [], "score": [], "uncached": [], "no_store": [], "nac_jobs_-1": [],
              "nac_jobs_1": []}
    rows, nac_rows, val_auroc = cold[2], None, None
    for _ in range(repeats):
        seconds, other, rows = timed_pass(lambda: search_once(store, cfg.methods, cfg, cfg.n_jobs))
        passes["search"].append((seconds, other))
        one = uncached_once(inputs, nac_params, cfg.recall, workdir)
        for key, name in (("extract", "extract"), ("score", "score"), ("total", "uncached")):
            passes[name].append(one[key])
        val_auroc = one["val_auroc"]
        passes["no_store"].append(timed_pass(lambda: passes_no_store(inputs))[:2])
        for n_jobs in (-1, 1):
            seconds, other, nac_rows = timed_pass(lambda: search_once(store, nac_grid, cfg, n_jobs))
            passes[f"nac_jobs_{n_jobs}"].append((seconds, other))
    return {"cold": cold[:2], "passes": passes, "rows": rows, "nac_rows": nac_rows, "val_auroc": val_auroc}


def build_result(runs, cfg, nac_params, splits, n_samples) -> dict:
    """Figures, ratio and configuration from the raw passes of :func:`run_rounds`."""
    t = {name: summarise(p) for name, p in runs["passes"].items()}
    n_rows = len(runs["rows"])
    cold_s = runs["cold"][0]
    per_config = t["search"]["median"] / n_rows
    methods = per_method(runs["rows"])
    cached = {"rows": n_rows, "wall": t["search"], "per_config_seconds": round(per_config, 6),
              "cold_wall_seconds": round(cold_s, 4), "cold_other_cpu_share": round(runs["cold"][1], 3),
              "cold_per_config_seconds": round(cold_s / n_rows, 6), "per_method": methods}
    uncached = {"method": UNCACHED_METHOD, "params": nac_params, "splits": splits, "n_samples": n_samples,
                "extract": t["extract"], "score": t["score"], "total": t["uncached"], "no_store": t["no_store"],
                "val_auroc_mean": round(runs["val_auroc"], 6)}
    n_nac = len(runs["nac_rows"])
    ratio = {"median": round(t["uncached"]["median"] / per_config, 1),
             "cold_search": round(t["uncached"]["median"] / (cold_s / n_rows), 1),
             "no_store": round((t["no_store"]["median"] + t["score"]["median"]) / per_config, 1),
             "nac_grid": round(t["uncached"]["median"] / (t["nac_jobs_-1"]["median"] / n_nac), 1),
             "goal": RATIO_GOAL}
    nac = {"combinations": n_nac, "n_jobs_-1": t["nac_jobs_-1"], "n_jobs_1": t["nac_jobs_1"],
           "per_combination_seconds": {"n_jobs_-1": round(t["nac_jobs_-1"]["median"] / n_nac, 6),
                                       "n_jobs_1": round(t["nac_jobs_1"]["median"] / n_nac, 6)}}
    return {"cached": cached, "uncached": uncached, "ratio": ratio, "nac_grid": nac}


def run_benchmark(args) -> dict:
    """All four measurements, with the configuration and machine they ran on."""
    machine = machine_info()
    machine.update({"joblib_cpus": psutil.cpu_count(logical=True), "sklearn": sklearn.__version__})
    paths = dvc_paths()
    cfg = load_section("search", PARAMS)
    nac_params = dict(load_section("detect", PARAMS).methods[UNCACHED_METHOD])
    store = open_store(paths["features"])
    splits = search_splits(store)
    inputs = load_inputs(paths, splits)
    n_samples = sum(len(d) for d, _ in inputs["datasets"].values())
    with tempfile.TemporaryDirectory() as workdir:
        runs = run_rounds(store, cfg, inputs, nac_params, args.repeats, workdir)
        read_cost = measure_read_cost(paths["features"], workdir, args.repeats)
    result = {**build_result(runs, cfg, nac_params, splits, n_samples), "read_cost": read_cost}
    machine["loadavg_end"] = os.getloadavg()
    config = {"repeats": args.repeats, "store": str(paths["features"].relative_to(REPO)), "n_jobs": cfg.n_jobs,
              "metric": cfg.metric, "aggregations": list(cfg.aggregations), "methods": cfg.methods,
              "extract": {k: getattr(inputs["cfg"], k) for k in ("layers", "grad_layers", "head", "batch_size",
                                                                 "dtype", "chunk_rows", "shard_rows",
                                                                 "compression_level")},
              "device": str(inputs["device"])}
    return {"date": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine,
            "config": json.loads(json.dumps(config, default=list)), **result}


def detect_splits(store) -> list[str]:
    """The splits ``detect`` scores: ID-val (standardisation), ID-test and every OOD test set."""
    return ["id_val", "id_test", *(s["split"] for s in ood_sets(store, "test").values())]


def methods_cost(store, repeats) -> dict:
    """Seconds each detect method costs on ``store`` (median over interleaved rounds); see the module docstring."""
    detect, fit = load_section("detect", PARAMS), load_section("fit", PARAMS)
    splits = detect_splits(store)
    scorers = {m: p for m, p in detect.methods.items() if m != "heatmap"}  # the decoder is trained by fit
    seconds = {name: [] for name in [*scorers, *fit.detectors]}
    fit_seconds = {name: [] for name in fit.detectors}
    for _ in range(repeats):
        for name, params in scorers.items():
            start = time.perf_counter()
            fitted = fit_scorers(store, {name: params})
            for split in splits:
                score_methods(store, split, fitted)
            seconds[name].append(time.perf_counter() - start)
        for name, params in fit.detectors.items():
            start = time.perf_counter()
            fitted = fit_detectors(store, {name: params}, standardize=fit.standardize, seed=fit.seed)
            fit_seconds[name].append(time.perf_counter() - start)
            start = time.perf_counter()
            for split in splits:
                score_split(store, split, fitted)
            seconds[name].append(time.perf_counter() - start)
    median = {name: round(statistics.median(v), 3) for name, v in seconds.items()}
    added = [n for n in median if n in ISSUE17_SCORERS or n in ISSUE17_DETECTORS]
    return {"splits": splits, "repeats": repeats, "detect_seconds": median,
            "fit_seconds": {n: round(statistics.median(v), 3) for n, v in fit_seconds.items()},
            "issue17_added_detect_seconds": round(sum(median[n] for n in added), 3), "issue17_methods": added,
            "goal_seconds": 30}


def _methods_cost_table(res) -> Table:
    table = Table("method", "detect s (fit + score)", "fit stage s",
                  title=f"detect cost per method over {len(res['splits'])} splits (median of {res['repeats']}); "
                        f"issue 17's {len(res['issue17_methods'])} methods add {res['issue17_added_detect_seconds']} s "
                        f"(goal < {res['goal_seconds']} s)")
    for name, sec in sorted(res["detect_seconds"].items(), key=lambda kv: -kv[1]):
        table.add_row(name + (" *" if name in res["issue17_methods"] else ""), f"{sec:.3f}",
                      f"{res['fit_seconds'][name]:.3f}" if name in res["fit_seconds"] else "")
    return table


# --------------------------------------------------------------------------- report


def print_report(res, console):
    """Two rich tables: cached vs uncached cost, and seconds per row of each method."""
    m = res["machine"]
    console.print(f"[bold]search benchmark[/] {res['date']}  cpus={m['cpu_count']} torch threads={m['torch_threads']}"
                  f"  torch {m['torch']}  sklearn {m['sklearn']}  load avg {m['loadavg_start'][0]:.2f} -> "
                  f"{m['loadavg_end'][0]:.2f}")
    console.print(_cost_table(res))
    console.print(_method_table(res["cached"]))
    console.print(_read_cost_table(res["read_cost"], f"the default store ({res['config']['store']})"))


def _cost_table(res):
    c, u, r, nac = res["cached"], res["uncached"], res["ratio"], res["nac_grid"]
    table = Table(title=f"Cached search vs one uncached configuration, median of {res['config']['repeats']} rounds")
    for col in ("measurement", "median s", "best s", "passes s", "other CPU (max)"):
        table.add_column(col, justify="left" if col == "measurement" else "right")
    rows = [(f"full search, {c['rows']} configs, n_jobs {res['config']['n_jobs']}", c["wall"]),
            (f"uncached: extract {len(u['splits'])} splits ({u['n_samples']} images)", u["extract"]),
            (f"uncached: fit + score one {u['method']} config on val", u["score"]),
            ("uncached: total per configuration", u["total"]),
            ("reference: the same passes and hooks, no store", u["no_store"]),
            (f"{u['method']} grid, {nac['combinations']} combos, n_jobs -1", nac["n_jobs_-1"]),
            (f"{u['method']} grid, {nac['combinations']} combos, n_jobs 1", nac["n_jobs_1"])]
    for label, t in rows:
        table.add_row(label, f"{t['median']:.3f}", f"{t['best']:.3f}", " ".join(f"{s:.2f}" for s in t["seconds"]),
                      f"{max(t['other_cpu_share']):.0%}")
    verdict = "ok" if r["median"] >= r["goal"] else "BELOW GOAL"
    table.caption = (f"cached per config: {c['per_config_seconds'] * 1e3:.1f} ms (cold first search "
                     f"{c['cold_wall_seconds']:.2f} s = {c['cold_per_config_seconds'] * 1e3:.1f} ms/config); "
                     f"uncached: {u['total']['median']:.3f} s\nratio uncached / cached = {r['median']:.1f}x "
                     f"(cold search {r['cold_search']:.1f}x; vs the {u['method']} grid's wall per combo "
                     f"{r['nac_grid']:.1f}x); goal >= {r['goal']}x: {verdict}\nwithout the store write "
                     f"(reference passes + scoring): {r['no_store']:.1f}x")
    return table


def _method_table(cached):
    title = ("Per method: sum of the rows' own seconds / rows (timed inside the workers, so they overlap "
             "under n_jobs -1; a fit shared by several rows is split among them)")
    table = Table(title=title)
    for col in ("method", "rows", "seconds (sum)", "ms per row"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for name, e in sorted(cached["per_method"].items(), key=lambda kv: -kv[1]["seconds_per_row"]):
        table.add_row(name, str(e["rows"]), f"{e['seconds_sum']:.2f}", f"{e['seconds_per_row'] * 1e3:.1f}")
    return table


# --------------------------------------------------------------------------- entry point


def parse_args(argv=None):
    """CLI flags; ``--quick`` runs one round, and a quick run writes JSON only with ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds (default 3)")
    parser.add_argument("--quick", action="store_true", help="smoke run: one round, no JSON unless --out")
    parser.add_argument("--out", type=Path, default=None, help=f"JSON output (default {DEFAULT_OUT.relative_to(REPO)})")
    parser.add_argument("--read-cost", action="store_true", help="only the read cost of the integrity checks, printed")
    parser.add_argument("--methods-cost", action="store_true", help="only what each detect method costs; writes "
                        "benchmarks/results/bench_methods.json unless --quick")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 1
    if args.out is None and not (args.quick or args.read_cost):
        args.out = METHODS_OUT if args.methods_cost else DEFAULT_OUT
    return args


def main(argv=None):
    args = parse_args(argv)
    missing = [str(p) for k, p in dvc_paths().items() if k in ("data", "model", "features") and not p.exists()]
    if missing:
        sys.exit(f"missing {', '.join(missing)}: run `dvc repro extract` first")
    if args.read_cost:
        with tempfile.TemporaryDirectory() as workdir:
            result = measure_read_cost(dvc_paths()["features"], workdir, args.repeats)
        Console(width=140).print(_read_cost_table(result, "the default store"))
        print(json.dumps(result))
        return
    if args.methods_cost:
        machine = machine_info()
        result = {"date": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine,
                  **methods_cost(open_store(dvc_paths()["features"]), args.repeats)}
        machine["loadavg_end"] = os.getloadavg()
        Console(width=140).print(_methods_cost_table(result))
    else:
        result = run_benchmark(args)
        print_report(result, Console(width=140))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
