"""Benchmark of the early-exit guard (``layerscope guard``): wall time per image and FLOPs saved.

Run from the repository root (see ``benchmarks/README.md``)::

    .venv/bin/python benchmarks/bench_guard.py            # full run, writes benchmarks/results/bench_guard.json
    .venv/bin/python benchmarks/bench_guard.py --quick    # smoke run, a few seconds, writes nothing unless --out

Inputs: the default DVC outputs (the ``paths`` of ``dvc.yaml``, read with
``pipeline.config.project_paths()``): the checkpoint ``cache/model.pt``, the
fitted detectors ``cache/detectors``, the thresholds ``cache/guard.json`` (the
``calibrate`` stage) and the data ``data/benchmark``; ``cache/features.zarr``
only for a cross-check. ``--model``, ``--detectors``, ``--guard``, ``--data``
and ``--features`` point elsewhere. The guard is built with
``pipeline.deploy.load_guard`` on the CPU, as a deployment would build it.

For every test split (``id_test`` and the ``<set>_test`` split of each OOD set),
its images stacked into one tensor:

1. Wall time per image of the plain model (``guard.model(x)`` under
   ``torch.inference_mode()``) and of the guarded model (``guard(x)``), at batch
   ``--batch-size`` (256) and at batch 1 (latency of one image, where the early
   exit matters most). Two reference paths say where the guard's own time
   goes: ``guard_no_exit``, the same guard with every threshold at +inf, so
   that no input stops (segmented executor, pooling and detectors, no
   saving), and ``executor``, the same with detectors that cost nothing (the
   executor and pooling alone). The paths take turns batch by batch, in an
   order that rotates, each entering inference mode per call; a timed pass
   loops over the split for about ``--min-seconds`` (all paths together) and
   is repeated ``--repeats`` times after two untimed warm-up passes; the
   figure is the median pass.
   ``torch.set_num_threads(--threads)`` is fixed and recorded, and so are the
   BLAS thread pools (capped with ``--blas-threads``). Each path's minor page
   faults per image are recorded too (``minor_faults_per_image``): whether the
   allocator hands a batch's activations back to the OS and pages them in
   again changes a pass's time by a tenth or more, for every path alike but
   not always at the same moments.
2. The guard's own decisions on the whole split: fraction flagged, exits per
   guarded layer, and the FLOP fraction saved, ``1 - mean(spent) / full``, where
   ``spent`` is ``Guard.block_flops()`` up to the exit layer (the full network for
   inputs that pass). FLOPs are the network's (``torch.utils.flop_counter``);
   the detectors' own arithmetic on pooled vectors is not counted.
3. Honesty: every input the guard lets through gets the plain model's argmax
   (asserted, at both batch sizes), and the decisions at batch 1 equal those at
   the large batch. With ``cache/features.zarr`` of the same checkpoint, the live
   decisions are also compared with the cascade run on the cached features (what
   the ``guard`` stage reports).
4. Where a guarded batch's time goes (:func:`work_breakdown`): on the first
   ``--batch-size`` ID inputs, the plain model and a copy of the guard whose
   pieces are timed in place take turns ``--breakdown-calls`` times. The guard's
   time splits into the network (its segments), pooling, scoring, drops and the
   rest (Python between them); its own work (all but the network) is set against
   the most its exits could save, the plain time times the FLOP fraction they
   save. The guard can beat the plain model only where that saving exceeds its
   own work.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime as dt
import json
import logging
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from threadpoolctl import threadpool_info, threadpool_limits

import pipeline.guard as guard_module

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_extract import CLEAN_SHARE, machine_info, other_cpu_share  # noqa: E402

from pipeline.cascade import exit_layers  # noqa: E402
from pipeline.config import project_paths  # noqa: E402
from pipeline.deploy import layer_scores, load_guard, load_thresholds  # noqa: E402
from pipeline.errors import LayerscopeError  # noqa: E402
from pipeline.guard import Guard, GuardResult  # noqa: E402
from pipeline.store import open_store  # noqa: E402
from pipeline.userdata import open_benchmark  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "bench_guard.json"
PATHS = ("plain", "guard", "guard_no_exit", "executor")
ROLE_ORDER = {"id": 0, "near": 1, "far": 2}
QUICK_LATENCY_N = 16  # images per split timed at batch 1 in a --quick run
QUICK_BREAKDOWN_CALLS = 10  # calls of each path in a --quick run's breakdown

log = logging.getLogger("bench_guard")


def dvc_paths() -> dict:
    """``vars.paths`` of ``dvc.yaml`` (``project_paths``), as absolute paths."""
    return {k: REPO / v for k, v in project_paths(REPO / "dvc.yaml").items()}


# --------------------------------------------------------------------------- inputs


def test_splits(data_dir) -> dict:
    """``split -> {"x": (n, C, H, W) float32, "role", "set"}`` for ID-test and every OOD test split.

    Ordered ID first, then near, then far sets, by name within a role.
    """
    bench = open_benchmark(data_dir)
    tests = {name: s for name, s in bench.items() if s.attrs.get("part") == "test"}
    out = {}
    for name in sorted(tests, key=lambda n: (ROLE_ORDER.get(tests[n].attrs.get("role"), 9), n)):
        ds = tests[name].dataset
        x = torch.stack([torch.as_tensor(ds[i][0]) for i in range(len(ds))]).float().contiguous()
        out[name] = {"x": x, "role": tests[name].attrs.get("role"), "set": tests[name].attrs.get("set")}
    return out


def no_exit_guard(guard, detectors=None) -> Guard:
    """The same model and detectors with every threshold at +inf: nothing stops, everything is scored.

    With ``detectors`` (layer -> detector), those replace the guard's own.
    """
    detectors = detectors or dict(zip(guard.layers, guard.detectors))
    return Guard(guard.model, detectors, {layer: float("inf") for layer in guard.layers}, guard.input_shape)


class ZeroDetector:
    """A stand-in detector that scores every row 0 at no cost: isolates the executor from the detectors."""

    def score(self, X):
        return np.zeros(len(X))


def executor_only(guard) -> Guard:
    """The guard's segmented executor and pooling, with free detectors and nothing stopping."""
    return no_exit_guard(guard, {layer: ZeroDetector() for layer in guard.layers})


# --------------------------------------------------------------------------- the timed paths


def plain_call(model):
    """The plain classifier on one batch: a bare forward in ``torch.inference_mode()``, entered per call as
    ``Guard.__call__`` enters it (a deployed model serves one request at a time)."""

    def run(xb):
        with torch.inference_mode():
            return model(xb)

    return run


def interleaved_pass(runners, batches, loops, shift=0, faults=None) -> dict:
    """Seconds of each path over ``batches`` run ``loops`` times, the paths taking turns batch by batch.

    The order of the paths rotates from one batch to the next (and with
    ``shift``), so none always runs first on a cold cache or last after the
    others; a load that comes and goes is shared by every path alike. With
    ``faults`` (a dict), each path's minor page faults are added to it, read
    outside the timed calls.
    """
    pc, names = time.perf_counter, list(runners)
    seconds = dict.fromkeys(names, 0.0)
    i = shift
    for _ in range(loops):
        for xb in batches:
            for j in range(len(names)):
                name = names[(i + j) % len(names)]
                before = minor_faults() if faults is not None else 0
                start = pc()
                runners[name](xb)
                seconds[name] += pc() - start
                if faults is not None:
                    faults[name] = faults.get(name, 0) + minor_faults() - before
            i += 1
    return seconds


def minor_faults() -> int:
    """This process's minor page faults so far: memory the allocator handed back to the OS and touches again.

    On a CPU the allocator's trimming decides whether a pass pages in its activations afresh (several MB per
    batch of 256, a tenth or more of the time), and that depends on the order of earlier allocations: a path
    with more faults than another is slower for a reason that is not its own arithmetic.
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure_times(guard, reference, executor, splits, batch_size, latency_n, repeats, min_seconds) -> dict:
    """Seconds of every (split, batch, path): ``repeats`` rounds of interleaved passes after two warm-up passes.

    The four paths (``PATHS``) take turns batch by batch (:func:`interleaved_pass`)
    at the same thread count, each in inference mode entered per call. A split
    is small (100 to 289 images), so one timed pass runs its batches ``loops``
    times, enough for about ``min_seconds`` of all paths together (from the
    second warm-up pass): long enough for the ``/proc/stat`` contention gauge,
    whose ticks are 10 ms, and which is shared by the paths of a pass.

    Returns
    -------
    dict
        ``split -> batch -> path -> summary`` (see :func:`summarise`), plus the
        speed-up of the guard (plain / guard, medians) per split and batch.
    """
    runners = {"plain": plain_call(guard.model), "guard": guard, "guard_no_exit": reference, "executor": executor}
    log.info("warm-up: two untimed interleaved passes on every split and batch size")
    plans = {}
    for name, s in splits.items():
        for bs, batches in ((batch_size, list(s["x"].split(batch_size))), (1, list(s["x"][:latency_n].split(1)))):
            interleaved_pass(runners, batches, 1)
            seconds, _ = other_cpu_share(lambda b=batches: interleaved_pass(runners, b, 1))
            loops = max(1, math.ceil(min_seconds / seconds)) if min_seconds > 0 else 1
            plans[name, bs] = (batches, loops, sum(len(b) for b in batches))
    runs = {key: {path: [] for path in PATHS} for key in plans}
    for r in range(repeats):
        log.info("round %d/%d", r + 1, repeats)
        for key, (batches, loops, _n) in plans.items():
            got, faults = {}, {}
            _, other = other_cpu_share(lambda b=batches, lp=loops, g=got, s=r, f=faults:
                                       g.update(interleaved_pass(runners, b, lp, s, f)))
            for path, seconds in got.items():
                runs[key][path].append((seconds, other, faults[path]))
    out = {}
    for (name, bs), (_batches, loops, n) in plans.items():
        timing = {path: summarise(runs[name, bs][path], n, loops) for path in PATHS}
        timing["speedup"] = round(timing["plain"]["median_ms"] / timing["guard"]["median_ms"], 3)
        timing["speedup_no_exit"] = round(timing["plain"]["median_ms"] / timing["guard_no_exit"]["median_ms"], 3)
        out.setdefault(name, {})[str(bs)] = timing
    return out


def summarise(passes, n, loops=1) -> dict:
    """``passes``: ``(seconds, other_cpu_share, minor_faults)``, each over ``n`` images ``loops`` times; in ms/image."""
    seconds = [s / loops for s, _, _ in passes]
    clean = [s for s, other, _ in passes if other < CLEAN_SHARE]
    return {"images": n, "loops": loops, "seconds": [round(s, 5) for s in seconds],
            "other_cpu_share": [round(o, 3) for _, o, _ in passes],
            "median_ms": round(1e3 * statistics.median(seconds) / n, 4), "best_ms": round(1e3 * min(seconds) / n, 4),
            "clean_median_ms": round(1e3 * statistics.median(clean) / n, 4) if clean else None,
            "clean_passes": len(clean),
            "minor_faults_per_image": round(statistics.median(f / loops for _, _, f in passes) / n, 1)}


# --------------------------------------------------------------------------- where a guarded batch's time goes


WARM_UP = 5  # untimed calls of each path before a breakdown


class _Clock:
    """Seconds per labelled piece of work, summed over one call of the guard (from ``start``), timed in place."""

    def __init__(self):
        self.start()

    def start(self):
        self.current, self.pools = collections.Counter(), 0  # pools: guarded layers pooled so far in this call

    def timed(self, label, fn):
        """``fn`` with its wall time added to ``label`` of the current call."""
        pc = time.perf_counter

        def run(*args, **kwargs):
            t = pc()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[label] += pc() - t

        return run


class _TimedModule:
    """A segment's module whose ``forward`` is timed (``Segment.forward`` reads ``module.forward``)."""

    def __init__(self, forward):
        self.forward = forward


def instrumented(guard, clock) -> Guard:
    """A guard of the same model, detectors and thresholds whose pieces of work ``clock`` times.

    network: the segments (the model's own modules), and the pooling of a guarded layer whose pooled rows
    stand in for the network's own global pooling; pooling: :func:`pipeline.extract.pool` of every other
    guarded layer; scoring: the compiled scorers and the threshold test; drops: the checks of what may
    move in place and the row moves (:func:`pipeline.guard._compact`). The timers add a few microseconds
    per piece, counted with the piece or with the rest.
    """
    timed = Guard(guard.model, dict(zip(guard.layers, guard.detectors)),
                  dict(zip(guard.layers, guard.thresholds.tolist())), guard.input_shape, guard.device)
    timed._segments = [dataclasses.replace(seg, module=_TimedModule(clock.timed("network", seg.module.forward)))
                       for seg in timed._segments]
    timed._score = clock.timed("scoring", timed._score)
    timed._owned = clock.timed("drops", timed._owned)
    return timed


def _timed_pool(clock, feeds_pooled):
    """:func:`pipeline.extract.pool`, timed as pooling, or as network where the pooled rows stand in for the
    network's own global pooling (``feeds_pooled``, per guarded layer in order: the guard pools each once a call)."""
    timers = [clock.timed("network" if feeds else "pooling", guard_module.pool) for feeds in feeds_pooled]

    def pool(activation):
        clock.pools += 1
        return timers[clock.pools - 1](activation)

    return pool


def work_breakdown(guard, x, batch_size, calls) -> dict | None:
    """Milliseconds per batch of ``batch_size`` of ``x``'s first rows: the plain model, and the guard by piece.

    The plain model and the instrumented guard (:func:`instrumented`) take turns ``calls`` times after a
    warm-up; medians per piece. ``saving_at_most_ms`` is what the guard's exits on this batch would save if
    the network's time were proportional to its FLOPs: the plain time times the FLOP fraction the exits save.
    The guard is no slower than the plain model only if its own work (pooling, scoring, drops and the rest)
    costs less than that. None when ``x`` has fewer than ``batch_size`` rows.
    """
    if len(x) < batch_size:
        return None
    xb, clock, flops = x[:batch_size].contiguous(), _Clock(), guard.block_flops()
    timed, plain = instrumented(guard, clock), plain_call(guard.model)
    timed.block_flops()  # counted now, by a pass of its own: not inside a timed call, nor with the patches below
    patches = {"pool": _timed_pool(clock, [seg.feeds_pooled for seg in timed._segments]),
               "_compact": clock.timed("drops", guard_module._compact)}
    saved = {name: getattr(guard_module, name) for name in patches}
    for name, fn in patches.items():  # module globals that Guard._run calls
        setattr(guard_module, name, fn)
    try:  # the patched module globals serve every guard: only the instrumented one runs meanwhile
        exits = timed(xb).exit_layer
        spent = np.where(exits >= 0, flops[np.maximum(exits, 0)], flops[-1])
        plain_s, guarded = [], []  # seconds; (seconds, pieces) of the guard
        for i in range(WARM_UP + calls):
            for who in ((plain, timed) if i % 2 else (timed, plain)):
                clock.start()
                t = time.perf_counter()
                who(xb)
                seconds = time.perf_counter() - t
                if i < WARM_UP:
                    continue
                if who is plain:
                    plain_s.append(seconds)
                else:
                    guarded.append((seconds, clock.current))
    finally:
        for name, fn in saved.items():
            setattr(guard_module, name, fn)
    ms = lambda values: round(1e3 * statistics.median(values), 3)  # noqa: E731
    out = {"batch": batch_size, "calls": calls, "plain_ms": ms(plain_s), "guard_ms": ms([t for t, _ in guarded])}
    for label in ("network", "pooling", "scoring", "drops"):
        out[f"{label}_ms"] = ms([c[label] for _, c in guarded])
    out["rest_ms"] = ms([t - sum(c.values()) for t, c in guarded])
    out["own_work_ms"] = round(out["pooling_ms"] + out["scoring_ms"] + out["drops_ms"] + out["rest_ms"], 3)
    out["flops_saved"] = round(float(1.0 - spent.mean() / flops[-1]), 6)
    out["saving_at_most_ms"] = round(out["plain_ms"] * out["flops_saved"], 3)
    return out


# --------------------------------------------------------------------------- decisions, FLOPs, honesty


def guard_over(guard, x, batch_size) -> GuardResult:
    """The guard's result on all of ``x``, run in batches of ``batch_size`` and put back together."""
    parts = [guard(xb) for xb in x.split(batch_size)]
    return GuardResult(*(np.concatenate([getattr(p, k) for p in parts]) for k in ("pred", "exit_layer", "scores")),
                       list(guard.layers), np.concatenate([p.logits for p in parts]))


def plain_logits(model, x, batch_size) -> np.ndarray:
    with torch.inference_mode():
        return torch.cat([model(xb).float() for xb in x.split(batch_size)]).numpy()


def decisions(guard, x, batch_size, flops, latency_n=None) -> dict:
    """Flagged, exits per layer and FLOPs saved on all of ``x``, with the honesty checks.

    The batch-1 checks run on the images the batch-1 timing runs (the first
    ``latency_n``, or all of them).

    Raises
    ------
    AssertionError
        When an input the guard let through gets another class than the plain model's argmax.
    """
    res = guard_over(guard, x, batch_size)
    res1 = guard_over(guard, x[:latency_n], 1)
    logits = plain_logits(guard.model, x, batch_size)
    plain_pred = logits.argmax(axis=1)
    passed = ~res.ood
    for r, bs in ((res, batch_size), (res1, 1)):
        bad = np.flatnonzero(~r.ood & (r.pred != plain_pred[:len(r.pred)]))
        assert not len(bad), f"guard pred != plain argmax at batch {bs} for inputs {bad[:10].tolist()}"
    spent = np.where(res.ood, flops[np.maximum(res.exit_layer, 0)], flops[-1])
    exits = {layer: round(float(np.mean(res.exit_layer == k)), 6) for k, layer in enumerate(guard.layers)}
    exits["none"] = round(float(np.mean(~res.ood)), 6)
    diff = np.abs(res.logits[passed] - logits[passed])
    return {"n": len(x), "flagged": round(float(res.ood.mean()), 6), "exits": exits,
            "flops_saved": round(float(1.0 - spent.mean() / flops[-1]), 6),
            "mean_flops_spent": round(float(spent.mean()), 1),
            "honesty": {"passed": int(passed.sum()), "pred_equals_plain_argmax": True,
                        "max_abs_logit_diff": round(float(diff.max()), 8) if diff.size else 0.0},
            "batch1_decisions_differ": int((res1.exit_layer != res.exit_layer[:len(res1.exit_layer)]).sum()),
            "exit_layer": res.exit_layer}


def cached_agreement(guard, store_path, thresholds_content, splits, live) -> dict:
    """Inputs whose live exit layer differs from the cascade run on the cached features, per split.

    Skipped (``{"skipped": reason}``) when the store is missing or holds features of another checkpoint.
    """
    if store_path is None or not Path(store_path).exists():
        return {"skipped": f"no store at {store_path}"}
    store = open_store(store_path)
    if store.provenance.get("checkpoint_sha256") != thresholds_content.get("checkpoint_sha256"):
        return {"skipped": f"store {store_path} holds features of another checkpoint"}
    detectors = dict(zip(guard.layers, guard.detectors))
    out = {}
    for name in splits:
        if name not in store.splits:
            out[name] = None
            continue
        cached = exit_layers(layer_scores(store, name, detectors), guard.thresholds)
        out[name] = int((cached != live[name]).sum())
    return {"store": str(store_path), "differ": out}


# --------------------------------------------------------------------------- run


def run_benchmark(args) -> dict:
    """Decisions, FLOPs and timings of every test split, with the configuration and machine they ran on.

    ``--blas-threads`` caps the BLAS thread pools (numpy's and scipy's OpenBLAS,
    which the detectors use) for the whole run; the pools in effect are recorded.
    """
    torch.set_num_threads(args.threads)
    with threadpool_limits(limits=args.blas_threads, user_api="blas"):
        return _run(args)


def _run(args) -> dict:
    machine = machine_info()
    machine["threadpools"] = [{k: pool.get(k) for k in ("user_api", "internal_api", "prefix", "num_threads")}
                              for pool in threadpool_info()]
    content = load_thresholds(args.guard)
    log.info("loading the guard: %s, %s, %s", args.model, args.detectors, args.guard)
    guard = load_guard(args.model, args.detectors, args.guard, device="cpu")
    reference = no_exit_guard(guard)
    flops = guard.block_flops()
    splits = test_splits(args.data)
    if args.quick:
        splits = dict(list(splits.items())[:2]) | dict(list(splits.items())[-1:])
    log.info("test splits: %s", ", ".join(f"{k} ({len(s['x'])})" for k, s in splits.items()))
    per_split = {}
    for name, s in splits.items():
        d = decisions(guard, s["x"], args.batch_size, flops, args.latency_n)
        per_split[name] = {"role": s["role"], "set": s["set"], **d}
        log.info("%s: flagged %.3f, FLOPs saved %.3f", name, d["flagged"], d["flops_saved"])
    live = {name: p.pop("exit_layer") for name, p in per_split.items()}
    agreement = cached_agreement(guard, args.features, content, splits, live)
    timing = measure_times(guard, reference, executor_only(guard), splits, args.batch_size, args.latency_n,
                           args.repeats, args.min_seconds)
    for name, entry in per_split.items():
        entry["timing"] = timing[name]
    id_split = next((name for name, s in splits.items() if s["role"] == "id"), None)
    breakdown = None if id_split is None else work_breakdown(guard, splits[id_split]["x"], args.batch_size,
                                                                 args.breakdown_calls)
    machine["loadavg_end"] = os.getloadavg()
    config = {"paths": {k: _rel(getattr(args, k)) for k in ("model", "detectors", "guard", "data", "features")},
              "batch_size": args.batch_size, "latency_n": args.latency_n, "repeats": args.repeats,
              "min_seconds": args.min_seconds, "threads": args.threads, "blas_threads": args.blas_threads,
              "quick": args.quick, "device": "cpu", "detector": content["detector"], "layers": list(guard.layers),
              "thresholds": dict(zip(guard.layers, guard.thresholds.tolist())),
              "target_tpr": content["target_tpr"], "val_tpr": content["val_tpr"],
              "input_shape": list(guard.input_shape)}
    flops_per_input = {"full": float(flops[-1]), **dict(zip(guard.layers, flops[:-1].tolist()))}
    return {"date": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine, "config": config,
            "flops_per_input": flops_per_input, "splits": per_split, "cached_agreement": agreement,
            "ood_mean": _ood_mean(per_split), "work_breakdown": breakdown and {"split": id_split, **breakdown}}


def _ood_mean(per_split) -> dict:
    """Means over the OOD test sets of flagged, FLOPs saved and the speed-ups."""
    ood = [p for p in per_split.values() if p["role"] != "id"]
    if not ood:
        return {}
    out = {k: round(float(np.mean([p[k] for p in ood])), 6) for k in ("flagged", "flops_saved")}
    for bs in ood[0]["timing"]:
        out[f"speedup_batch_{bs}"] = round(float(np.mean([p["timing"][bs]["speedup"] for p in ood])), 3)
    return out


def _rel(path):
    if path is None:
        return None
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


# --------------------------------------------------------------------------- report


def print_report(res, console):
    """One rich table: per split, decisions, FLOPs saved and ms per image of each path at both batch sizes."""
    m, c = res["machine"], res["config"]
    blas = sorted({p["num_threads"] for p in m["threadpools"] if p["user_api"] == "blas"})
    console.print(f"[bold]guard benchmark[/] {res['date']}  cpus={m['cpu_count']} torch threads={m['torch_threads']}"
                  f"  BLAS threads={'/'.join(map(str, blas))}  torch {m['torch']}  load avg {m['loadavg_start'][0]:.2f}"
                  f" -> {m['loadavg_end'][0]:.2f}")
    big = str(c["batch_size"])
    table = Table(title=f"Guard ({c['detector']} on {', '.join(c['layers'])}) vs plain model: ms per image, "
                        f"median of {c['repeats']} interleaved rounds")
    cols = ("split", "role", "n", "flagged", "exits", "FLOPs saved",
            f"plain@{big}", f"guard@{big}", "x", "plain@1", "guard@1", "x", "no-exit@1", "executor@1",
            f"faults@{big}", "other CPU")
    for col in cols:
        table.add_column(col, justify="left" if col == "split" else "right")
    for name, p in res["splits"].items():
        t_big, t_one = p["timing"][big], p["timing"]["1"]
        faults = "/".join(f"{t_big[who].get('minor_faults_per_image', math.nan):.0f}" for who in ("plain", "guard"))
        other = max(max(t[path]["other_cpu_share"]) for t in (t_big, t_one) for path in PATHS)
        table.add_row(name, p["role"], str(p["n"]), f"{p['flagged']:.1%}",
                      "/".join(f"{v:.0%}" for v in p["exits"].values()), f"{p['flops_saved']:.1%}",
                      f"{t_big['plain']['median_ms']:.3f}", f"{t_big['guard']['median_ms']:.3f}",
                      f"{t_big['speedup']:.2f}", f"{t_one['plain']['median_ms']:.3f}",
                      f"{t_one['guard']['median_ms']:.3f}", f"{t_one['speedup']:.2f}",
                      f"{t_one['guard_no_exit']['median_ms']:.3f}", f"{t_one['executor']['median_ms']:.3f}",
                      faults, f"{other:.0%}")
    agree = res["cached_agreement"]
    agree_text = (agree["skipped"] if "skipped" in agree else
                  "live exits vs cached-feature cascade, inputs that differ: "
                  + ", ".join(f"{k} {v}" for k, v in agree["differ"].items()))
    fl = res["flops_per_input"]
    images = f"the first {c['latency_n']}" if c["latency_n"] else "all"
    lines = [f"exits: share of inputs stopped at {', '.join(c['layers'])}, and passed. x = speed-up (plain / guard). "
             f"Batch 1 over {images} images of a split.",
             "no-exit = the guard with every threshold at +inf (executor + detectors, nothing stops); "
             "executor = the same with free detectors (segmented run + pooling only). "
             f"faults@{big} = minor page faults per image, plain/guard.",
             "FLOPs per input: " + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in fl.items())
             + f". Honesty: every passed input's guard pred == plain argmax (batch {big} and 1): ok.",
             agree_text]
    if res.get("work_breakdown"):
        w = res["work_breakdown"]
        lines.append(f"Where a batch of {w['batch']} {w['split']} inputs goes (ms, median of {w['calls']} calls, "
                     f"timed in place): plain {w['plain_ms']:.2f}; guard {w['guard_ms']:.2f} = network "
                     f"{w['network_ms']:.2f} + pooling {w['pooling_ms']:.2f} + scoring {w['scoring_ms']:.2f} + "
                     f"drops {w['drops_ms']:.2f} + rest {w['rest_ms']:.2f}. The guard's own work, "
                     f"{w['own_work_ms']:.2f}, against the {w['saving_at_most_ms']:.2f} its exits could save "
                     f"({w['flops_saved']:.1%} of the FLOPs).")
    table.caption = "\n".join(lines)
    console.print(table)


# --------------------------------------------------------------------------- entry point


def _positive_int(text) -> int:
    """An argparse type: an int >= 1 (argparse prints the error as its one-line usage error)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def parse_args(argv=None):
    """CLI flags; ``--quick``: 3 splits, 16 images at batch 1, one round, no loops; JSON only with ``--out``."""
    paths = dvc_paths()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=paths["model"], help="checkpoint (default: dvc.yaml's)")
    parser.add_argument("--detectors", type=Path, default=paths["detectors"],
                        help="fitted detectors (default: dvc.yaml's)")
    parser.add_argument("--guard", type=Path, default=paths["guard"], help="thresholds file (default: dvc.yaml's)")
    parser.add_argument("--data", type=Path, default=paths["data"], help="benchmark data (default: dvc.yaml's)")
    parser.add_argument("--features", type=Path, default=paths["features"],
                        help="feature store for the cross-check, skipped if absent (default: dvc.yaml's)")
    parser.add_argument("--batch-size", type=int, default=256, help="the large batch (default 256)")
    parser.add_argument("--latency-n", type=int, default=None,
                        help="images per split timed at batch 1 (default: all of them)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds (default 5)")
    parser.add_argument("--min-seconds", type=float, default=0.5,
                        help="run a split's batches in a loop for about this long per timed pass (default 0.5)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help=f"torch.set_num_threads (default {torch.get_num_threads()}, torch's default here)")
    parser.add_argument("--blas-threads", type=int, default=None,
                        help="cap the BLAS thread pools the detectors use (default: leave them as they are)")
    parser.add_argument("--breakdown-calls", type=_positive_int, default=200,
                        help="calls of the plain model and of the instrumented guard on one full batch of ID "
                             "inputs, for the breakdown of the guard's time (default 200)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 3 splits, 16 images at batch 1, one round, no JSON unless --out")
    parser.add_argument("--out", type=Path, default=None, help=f"JSON output (default {DEFAULT_OUT.relative_to(REPO)})")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.latency_n, args.min_seconds = 1, args.latency_n or QUICK_LATENCY_N, 0.0
        args.breakdown_calls = min(args.breakdown_calls, QUICK_BREAKDOWN_CALLS)
    if args.out is None and not args.quick:
        args.out = DEFAULT_OUT
    return args


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    args = parse_args(argv)
    missing = [str(getattr(args, k)) for k in ("model", "detectors", "guard", "data") if not getattr(args, k).exists()]
    if missing:
        sys.exit(f"missing {', '.join(missing)}: run `dvc repro` first (or pass --model/--detectors/--guard/--data)")
    try:
        result = run_benchmark(args)
    except LayerscopeError as err:  # e.g. thresholds of another checkpoint: the pipeline's one-line message and hint
        sys.exit(str(err))
    print_report(result, Console(width=180))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
