"""Scale-out benchmark: peak memory of ``fit`` and ``detect`` at N and 10N rows, and wall time on 1 and 2 workers.

A synthetic feature store is written with the real :class:`pipeline.store.StoreWriter`
(shard by shard, so writing it needs little memory): four 256-wide layers of
float32 Gaussian features (class-dependent means) plus logits, labels and the
per-layer energy. Every split scales with N: ``id_train`` has N rows and
``id_val``, ``id_test`` and an OOD test set N/8 each. At the default N = 80,000
the 10N store holds 800,000 training rows: about 4.2 GB on disk.

``fit`` fits a standardised Mahalanobis detector (out of core, from the dask
array); ``detect`` scores every split block by block with it, plus MSP and
energy. Each stage runs as ``python -m pipeline ...`` in a fresh process; its
peak RSS is the largest ``ru_maxrss`` among it and its children (LocalCluster
workers included).

Usage::

    python benchmarks/bench_scale.py [--n 80000] [--out benchmarks/results/scale.json] [--keep DIR]

Goal: peak RSS of fit and detect rises less than 1.3x from N to 10N.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.store import ArraySpec, StoreWriter  # noqa: E402

WIDTH, LAYERS, CLASSES, SHARD, CHUNK = 256, ("feat0", "feat1", "feat2", "feat3"), 10, 4096, 1024
FIT = {"detectors": {"mahalanobis": {}}, "standardize": True}
DETECT = {"methods": {"msp": {}, "ebo": {}}, "figures": False, "aggregations": ["max_z"]}


def write_store(path: Path, n: int, seed: int = 0) -> float:
    """Write the synthetic store for ``n`` training rows; returns its size in GB."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (len(LAYERS), CLASSES, WIDTH)).astype(np.float32)
    sizes = {"id_train": n, "id_val": n // 8, "id_test": n // 8, "shift_test": n // 8}
    specs = [*(ArraySpec(layer, WIDTH, "float32") for layer in LAYERS),
             ArraySpec("energy", len(LAYERS), "float32", dim="layer"),
             ArraySpec("logits", CLASSES, "float32", dim="class"), ArraySpec("pred", None, "int64"),
             ArraySpec("label", None, "int64")]
    with StoreWriter(path, key=f"bench-{n}-{seed}", chunk_rows=CHUNK, shard_rows=SHARD) as writer:
        for split, rows in sizes.items():
            role, part = ("far", "test") if split == "shift_test" else ("id", split.removeprefix("id_"))
            attrs = {"role": role, "set": split.split("_")[0], "part": part, "source": "synthetic", "n_samples": rows}
            writer.create_split(split, rows, specs, attrs)
            for index in writer.pending_shards(split, rows):
                start, stop = writer.shard_range(index, rows)
                writer.write_shard(split, index, _shard(rng, centres, stop - start, shifted=role == "far"))
        writer.finalize({"checkpoint_sha256": "synthetic", "layers": list(LAYERS)}, list(LAYERS))
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9


def _shard(rng, centres, rows, shifted):
    labels = rng.integers(0, CLASSES, rows)
    out = {layer: centres[j][labels] + rng.normal(0, 1, (rows, WIDTH)).astype(np.float32) + (0.5 if shifted else 0.0)
           for j, layer in enumerate(LAYERS)}
    logits = rng.normal(0, 1, (rows, CLASSES)).astype(np.float32)
    logits[np.arange(rows), labels] += 0.0 if shifted else 3.0
    energy = -np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return {**out, "energy": np.repeat(energy, len(LAYERS), axis=1), "logits": logits, "pred": logits.argmax(1),
            "label": np.where(shifted, -1, labels)}


def run_stage(args: list[str]) -> tuple[float, float]:
    """Run ``python -m pipeline ARGS`` in a fresh process: (wall seconds, peak RSS MiB of it and its children)."""
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "pipeline", "-q", *args],
                          capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"stage {args[0]} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - start, int(done.stdout.strip().splitlines()[-1]) / 1024


def fit_and_detect(work: Path, store: Path, compute: dict, tag: str) -> dict:
    params = work / f"params-{tag}.yaml"
    params.write_text(yaml.safe_dump({"fit": FIT, "detect": DETECT, "compute": compute}))
    det = work / f"detectors-{tag}"
    fit_s, fit_mib = run_stage(["fit", "--params", str(params), "--features", str(store), "--out", str(det)])
    detect_s, detect_mib = run_stage([
        "detect", "--params", str(params), "--features", str(store), "--detectors", str(det),
        "--metrics", str(work / f"metrics-{tag}.json"), "--detail", str(work / f"detail-{tag}.json"),
        "--table", str(work / f"table-{tag}.csv"),
        "--figures", str(work / f"fig-{tag}"), "--argmax", str(work / f"argmax-{tag}.json")])
    auroc = json.loads((work / f"detail-{tag}.json").read_text())["methods"]["mahalanobis"]["max_z"]["far"]["auroc"]
    return {"fit_s": round(fit_s, 2), "fit_peak_mib": round(fit_mib, 1), "detect_s": round(detect_s, 2),
            "detect_peak_mib": round(detect_mib, 1), "mahalanobis_auroc": round(auroc, 4)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=80_000, help="ID-train rows of the small store (10N for the large)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scale.json")
    parser.add_argument("--keep", type=Path, default=None, help="Work directory to keep (default: a temp dir)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    results = {"n": args.n, "width": WIDTH, "shard_rows": SHARD, "runs": {}}
    for scale in (1, 10):
        n = args.n * scale
        store = work / f"store-{scale}n.zarr"
        start = time.perf_counter()
        size = write_store(store, n) if not store.exists() else None
        results[f"store_{scale}n"] = {"rows_train": n, "gb": size and round(size, 2),
                                      "write_s": round(time.perf_counter() - start, 1)}
        print(f"store {scale}N: {n} train rows, {size} GB", flush=True)
        modes = {"threads": {"scheduler": "threads"}}
        if scale == 10:
            modes.update({f"local-{w}": {"scheduler": "local", "n_workers": w, "dashboard": False} for w in (1, 2)})
        for tag, compute in modes.items():
            results["runs"][f"{scale}n-{tag}"] = run = fit_and_detect(work, store, compute, f"{scale}n-{tag}")
            print(f"{scale}N {tag}: {run}", flush=True)
    small, large = results["runs"]["1n-threads"], results["runs"]["10n-threads"]
    results["rss_ratio_10n_over_n"] = {"fit": round(large["fit_peak_mib"] / small["fit_peak_mib"], 3),
                                       "detect": round(large["detect_peak_mib"] / small["detect_peak_mib"], 3)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["rss_ratio_10n_over_n"]))


if __name__ == "__main__":
    main()
