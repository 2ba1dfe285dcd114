"""Benchmark against a peer: pytorch-ood 0.4 and layerscope on the same weights, tensors and five detectors.

Run from the repository root (see ``benchmarks/README.md``); pytorch-ood is an
optional benchmark dependency (``pip install -e '.[bench]'``), never a runtime one::

    .venv/bin/python benchmarks/bench_peers.py              # 3 interleaved rounds; writes benchmarks/results/bench_peers.json
    .venv/bin/python benchmarks/bench_peers.py --quick      # one round, the ResNet-18 row at 400 images; prints only (add --out FILE)
    .venv/bin/python benchmarks/bench_peers.py --repeats 5 --rows tiny --no-dvc

Rows (the same checkpoint and the same ``.npz`` tensors for both tools):

* ``tiny``: the default backbone on the default data, the files ``dvc repro``
  writes (``cache/model.pt``, ``data/benchmark``: 17 splits, 3997 images);
* ``resnet18``: a CIFAR ResNet-18 (``resnet18_cifar``, seeded random weights) at
  32 px, 10 classes, 4000 images over 9 splits (ID train/val/test and three OOD
  sets' val/test halves), written with the pipeline's own ``write_benchmark``.

Columns, each a whole process (start-up, imports, loading and shutdown included),
timed start to exit:

* ``pytorch_ood_examples``: as pytorch-ood's ``examples/benchmarks/manual/cifar10_baseline.py``
  does it: each detector's ``fit(train_loader)`` and ``detector(x)`` on each OOD
  test set concatenated with ID test, so the network runs again for every detector;
* ``pytorch_ood_cached``: as its ``cifar10_cached_baseline.py``: train logits and
  features extracted once, each test loader's logits and features cached once,
  then ``fit_logits``/``fit_features`` and ``predict_logits``/``predict_features``;
* ``layerscope_cli``: ``layerscope extract``, ``fit`` and ``detect``, three
  processes, with a params file that configures only the five methods;
* ``dvc_repro``: ``dvc repro -f -s extract fit detect`` in a temporary git + DVC
  clone of this repository (its committed ``dvc.yaml``, with the same params).

The five detectors: MSP, Energy (T = 1), Mahalanobis (class means, shared
covariance), KNN (k = 50, L2-normalised) and ViM (principal dimension D // 2;
``--quick``: at most a quarter of ID-train's rows, so that a residual is left),
the last three on the penultimate features (``avgpool``). Every round runs every
(row, column) once, the columns in a rotated order, so drift hits all of them
alike; the figures are medians with [min, max] over rounds.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "bench_peers.json"
PEER_VERSION = "0.4.0"
MISSING = "bench_peers needs pytorch-ood {}: pip install -e '.[bench]'"
BATCH = 128
METHODS = ("MSP", "Energy", "Mahalanobis", "KNN", "ViM")
# pytorch-ood's detector -> (layerscope method, its column in reports/detail.json)
LAYERSCOPE = {"MSP": ("msp", "score"), "Energy": ("ebo", "score"), "Mahalanobis": ("mahalanobis", "avgpool"),
              "KNN": ("knn_l2", "avgpool"), "ViM": ("vim", "score")}
COLUMNS = ("pytorch_ood_examples", "pytorch_ood_cached", "layerscope_cli", "dvc_repro")
ROWS = ("resnet18", "tiny")
# the resnet18 row: split sizes at scale 1 (--quick: QUICK_SCALE), and its OOD sets
RESNET_ID = {"id_train": 2000, "id_val": 200, "id_test": 600}
RESNET_OOD = {"novel": "near", "uniform": "far", "gaussian": "far"}  # 200 val + 200 test each
RESNET_OOD_HALF = 200
QUICK_SCALE = 0.1  # --quick: 400 images


# ------------------------------------------------------------------ the peer (runs in a child process)

def penultimate(model):
    """``model.features`` of pytorch-ood's examples for a ``CifarResNet``: the pooled input of ``fc``."""
    import torch

    stages = [getattr(model, f"layer{i + 1}") for i in range(model.n_stages)]

    def features(x):
        x = torch.relu(model.bn1(model.conv1(model.normalize(x))))
        for stage in stages:
            x = stage(x)
        return torch.flatten(model.avgpool(x), 1)

    return features


def peer_detectors(model, dim):
    """The five detectors, built as pytorch-ood's examples build them."""
    from pytorch_ood.detector import KNN, EnergyBased, Mahalanobis, MaxSoftmax, ViM

    encoder = penultimate(model)
    return {"MSP": MaxSoftmax(model), "Energy": EnergyBased(model), "Mahalanobis": Mahalanobis(encoder),
            "KNN": KNN(encoder, k=50), "ViM": ViM(encoder, d=dim, w=model.fc.weight, b=model.fc.bias)}


def peer_loaders(data):
    """ID-train's loader, and per OOD set a loader over ID-test followed by its test split (as the examples)."""
    from torch.utils.data import ConcatDataset, DataLoader

    from pipeline.userdata import open_benchmark

    splits = open_benchmark(data)
    tests = {s.attrs["set"]: DataLoader(ConcatDataset([splits["id_test"].dataset, s.dataset]), batch_size=BATCH)
             for s in splits.values() if s.attrs.get("role") in ("near", "far") and s.attrs.get("part") == "test"}
    return DataLoader(splits["id_train"].dataset, batch_size=BATCH), tests


def peer_examples(model, dim, train, tests):
    """``cifar10_baseline.py``: fit each detector on the loader, score each batch through the network."""
    import torch
    from pytorch_ood.metrics import OODMetrics

    detectors = peer_detectors(model, dim)
    for detector in detectors.values():
        detector.fit(train)
    auroc = {name: {} for name in detectors}
    with torch.no_grad():
        for name, detector in detectors.items():
            for set_name, loader in tests.items():
                metrics = OODMetrics()
                for x, y in loader:
                    metrics.update(detector(x), y)
                auroc[name][set_name] = metrics.compute()["AUROC"]
    return auroc


def cache_representations(loader, model, encoder):
    """``cifar10_cached_baseline.py``'s helper: logits, features and labels of every sample, one pass each."""
    import torch
    from pytorch_ood.utils import TensorBuffer

    buffer = TensorBuffer()
    with torch.no_grad():
        for x, y in loader:
            buffer.append("logits", model(x).view(x.shape[0], -1))
            buffer.append("features", encoder(x).view(x.shape[0], -1))
            buffer.append("label", y)
    return {"logits": buffer.get("logits"), "features": buffer.get("features"), "labels": buffer.get("label")}


def peer_cached(model, dim, train, tests):
    """``cifar10_cached_baseline.py``: representations extracted once, detectors fitted and scored on them."""
    from pytorch_ood.api import FeaturesDetector, LogitsDetector
    from pytorch_ood.metrics import OODMetrics
    from pytorch_ood.utils import extract_features

    detectors = peer_detectors(model, dim)
    encoder = penultimate(model)
    logits, labels = extract_features(train, model, "cpu")
    features, _ = extract_features(train, encoder, "cpu")
    for detector in detectors.values():
        if detector.requires_fit and isinstance(detector, LogitsDetector):
            detector.fit_logits(logits, labels)
        elif detector.requires_fit and isinstance(detector, FeaturesDetector):
            detector.fit_features(features, labels)
    auroc = {name: {} for name in detectors}
    for set_name, loader in tests.items():
        cache = cache_representations(loader, model, encoder)
        for name, detector in detectors.items():
            detector.to("cpu")
            predict = detector.predict_logits if isinstance(detector, LogitsDetector) else detector.predict_features
            key = "logits" if isinstance(detector, LogitsDetector) else "features"
            metrics = OODMetrics()
            metrics.update(predict(cache[key]), cache["labels"])
            auroc[name][set_name] = metrics.compute()["AUROC"]
    return auroc


def run_peer(way, data, model_path, dim, out):
    """The child process of a pytorch-ood column: do the work, write the AUROCs and the in-process times."""
    start = time.perf_counter()
    for module in ("pytorch_ood.detector", "pytorch_ood.metrics", "pytorch_ood.utils"):
        importlib.import_module(module)  # here, so that import time is apart from work time
    from pipeline.models import load_checkpoint

    imported = time.perf_counter()
    model, _ = load_checkpoint(model_path, "cpu")
    train, tests = peer_loaders(data)
    auroc = (peer_examples if way == "examples" else peer_cached)(model, dim, train, tests)
    done = time.perf_counter()
    Path(out).write_text(json.dumps({"auroc": auroc, "import_s": imported - start, "work_s": done - imported}))


# ------------------------------------------------------------------ preparing the rows

def write_resnet_row(directory: Path, scale: float, seed: int = 0) -> tuple[Path, Path]:
    """A CIFAR ResNet-18 checkpoint (seeded random weights) and a 32 px, 9-split benchmark; returns (data, model).

    ID images are 10 class patterns (a random 4x4 colour field, upsampled) plus
    noise; the near set uses 3 other patterns, the far sets are uniform and
    Gaussian noise.
    """
    import numpy as np

    from pipeline.datasets import ImageSplit, write_benchmark
    from pipeline.models import init_model, save_checkpoint

    rng = np.random.default_rng(seed)
    protos = rng.uniform(0, 1, (13, 3, 4, 4)).repeat(8, axis=-1).repeat(8, axis=-2)

    def patterned(classes, n):
        labels = rng.integers(len(classes), size=n)
        images = protos[np.asarray(classes)[labels]] + rng.normal(0, 0.15, (n, 3, 32, 32))
        return np.clip(images, 0, 1).astype(np.float32), labels

    def split(name, role, set_name, part, images, labels):
        attrs = {"role": role, "set": set_name, "part": part, "source": f"bench_peers synthetic ({set_name})",
                 "n_samples": len(images), "image_size": 32, "seed": seed}
        return ImageSplit(name, images, labels.astype(np.int64), attrs)

    splits = [split(name, "id", "id", name[3:], *patterned(range(10), int(n * scale)))
              for name, n in RESNET_ID.items()]
    n = int(RESNET_OOD_HALF * scale)
    noise = {"uniform": lambda: rng.uniform(0, 1, (n, 3, 32, 32)),
             "gaussian": lambda: np.clip(rng.normal(0.5, 0.25, (n, 3, 32, 32)), 0, 1)}
    for set_name, role in RESNET_OOD.items():
        for part in ("val", "test"):
            images = patterned(range(10, 13), n)[0] if set_name == "novel" else noise[set_name]()
            splits.append(split(f"{set_name}_{part}", role, set_name, part, images.astype(np.float32),
                                np.full(n, -1)))
    data = write_benchmark(splits, directory / "data")
    spec = {"arch": "resnet18_cifar", "num_classes": 10, "in_channels": 3}
    model = save_checkpoint(init_model(spec, seed), spec, directory / "model.pt")
    return data, model


def layerscope_params(dim: int) -> dict:
    """The params sections that configure only the five methods (plus where to run)."""
    return {
        "extract": {"layers": ["avgpool"], "head": "fc", "batch_size": BATCH, "device": "cpu"},
        "fit": {"detectors": {"mahalanobis": {}, "knn_l2": {"k": 50}}, "standardize": False},
        "detect": {"methods": {"msp": {}, "ebo": {"temperature": 1.0}, "vim": {"dim": dim}},
                   "aggregations": [], "figures": False},
        "compute": {"scheduler": "threads"},
    }


def feature_dim(model_path: Path) -> int:
    from pipeline.models import load_checkpoint

    return load_checkpoint(model_path, "cpu")[0].fc.in_features


def prepare_row(row: str, work: Path, scale: float) -> dict:
    """Files of one row: data, model, params file; and its size."""
    import yaml

    work.mkdir(parents=True)
    if row == "tiny":
        data, model = REPO / "data" / "benchmark", REPO / "cache" / "model.pt"
        if not (data / "manifest.json").is_file() or not model.is_file():
            raise SystemExit(f"bench_peers: the tiny row needs {data} and {model}: run `dvc repro train` first.")
    else:
        data, model = write_resnet_row(work, scale)
    manifest = json.loads((data / "manifest.json").read_text())["splits"]
    dim = min(feature_dim(model) // 2, manifest["id_train"]["n_samples"] // 4)  # --quick: ID-train < D
    params = work / "params.yaml"
    params.write_text(yaml.safe_dump(layerscope_params(dim), sort_keys=False))
    return {"work": work, "data": data, "model": model, "params": params, "dim": dim,
            "splits": len(manifest), "images": sum(s["n_samples"] for s in manifest.values())}


def prepare_dvc(files: dict) -> Path:
    """A git clone of this repository with the row's data, checkpoint and params, ready for ``dvc repro -s``.

    The committed ``dvc.yaml`` is kept, except that ``detect``'s figures
    directory is no longer an output (the params turn figures off, as in the
    CLI column).
    """
    import yaml

    clone = files["work"] / "dvc"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    shutil.copytree(files["data"], clone / "data" / "benchmark")
    (clone / "cache").mkdir(exist_ok=True)
    shutil.copy2(files["model"], clone / "cache" / "model.pt")
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params.update(yaml.safe_load(files["params"].read_text()))
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stages = yaml.safe_load((clone / "dvc.yaml").read_text())
    detect = stages["stages"]["detect"]
    detect["outs"] = [o for o in detect["outs"] if o != "${paths.figures}"]
    stages.pop("plots", None)
    (clone / "dvc.yaml").write_text(yaml.safe_dump(stages, sort_keys=False))
    return clone


# ------------------------------------------------------------------ timed runs

def child_env() -> dict:
    """This repository's code first on the path, and this venv's scripts (layerscope, dvc) first on PATH."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PYTHONPATH": str(REPO), "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}


def timed(argv, cwd) -> float:
    """Wall time of one process, start to exit; a failure stops the benchmark."""
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, env=child_env(), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, argv))} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return seconds


def run_peer_column(way: str, files: dict) -> dict:
    out = files["work"] / f"peer_{way}.json"
    seconds = timed([sys.executable, __file__, "--peer", way, "--data", files["data"], "--model", files["model"],
                     "--dim", str(files["dim"]), "--peer-out", out], REPO)
    return {"seconds": seconds, **json.loads(out.read_text())}


def run_layerscope(files: dict) -> dict:
    """``extract``, ``fit``, ``detect`` as three processes into a fresh directory; per-command seconds."""
    work, params, model = files["work"], files["params"], str(files["model"])
    out = work / "layerscope"
    shutil.rmtree(out, ignore_errors=True)  # a finished store would be reused, not re-extracted
    out.mkdir()
    store, detectors = str(out / "features.zarr"), str(out / "detectors")
    commands = {
        "extract": ["--data", str(files["data"]), "--model", model, "--out", store],
        "fit": ["--features", store, "--model", model, "--out", detectors],
        "detect": ["--features", store, "--detectors", detectors, "--model", model,
                   "--metrics", str(out / "metrics.json"), "--detail", str(out / "detail.json"),
                   "--table", str(out / "per_layer.csv"), "--figures", str(out / "figures"),
                   "--argmax", str(out / "argmax.json")],
    }
    per = {cmd: timed(["layerscope", "-q", cmd, "--params", str(params), *args], work)
           for cmd, args in commands.items()}
    return {"seconds": sum(per.values()), "commands": per, "auroc": layerscope_auroc(out / "detail.json")}


def layerscope_auroc(detail: Path) -> dict:
    """``{pytorch-ood name: {set: AUROC}}`` from layerscope's ``detail.json`` (group means left out)."""
    methods = json.loads(detail.read_text())["methods"]
    return {name: {s: v["auroc"] for s, v in methods[method][column].items() if s not in ("near", "far")}
            for name, (method, column) in LAYERSCOPE.items()}


def run_dvc(files: dict) -> dict:
    seconds = timed(["dvc", "repro", "-q", "-f", "-s", "extract", "fit", "detect"], files["dvc"])
    return {"seconds": seconds, "auroc": layerscope_auroc(files["dvc"] / "reports" / "detail.json")}


RUNNERS = {
    "pytorch_ood_examples": lambda files: run_peer_column("examples", files),
    "pytorch_ood_cached": lambda files: run_peer_column("cached", files),
    "layerscope_cli": run_layerscope,
    "dvc_repro": run_dvc,
}


def measure(rows: dict, columns: list[str], repeats: int) -> dict:
    """Every (row, column) once per round, the columns rotated each round; raw runs by row and column."""
    runs = {row: {col: [] for col in columns} for row in rows}
    for r in range(repeats):
        order = columns[r % len(columns):] + columns[:r % len(columns)]
        for row, files in rows.items():
            for col in order:
                before = os.getloadavg()[0]
                result = RUNNERS[col](files)
                result["load_1min"] = [round(before, 2), round(os.getloadavg()[0], 2)]
                runs[row][col].append(result)
                print(f"round {r + 1}/{repeats} {row:8} {col:22} {result['seconds']:7.2f} s  "
                      f"(load {result['load_1min'][0]} -> {result['load_1min'][1]})", flush=True)
    return runs


# ------------------------------------------------------------------ summary

def spread(values: list[float]) -> dict:
    return {"median_s": round(statistics.median(values), 2), "min_s": round(min(values), 2),
            "max_s": round(max(values), 2), "runs_s": [round(v, 2) for v in values]}


def agreement(aurocs: dict) -> dict:
    """Max |AUROC difference| over the OOD sets, per method, between every pair of columns."""
    names = list(aurocs)
    out = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            out[f"{a} vs {b}"] = {m: round(max(abs(aurocs[a][m][s] - aurocs[b][m][s]) for s in aurocs[a][m]), 6)
                                  for m in METHODS}
    return out


def summarise_row(files: dict, runs: dict) -> dict:
    columns = {col: spread([r["seconds"] for r in results]) for col, results in runs.items()}
    if "layerscope_cli" in runs:
        columns["layerscope_cli"]["commands_median_s"] = {
            cmd: round(statistics.median(r["commands"][cmd] for r in runs["layerscope_cli"]), 2)
            for cmd in ("extract", "fit", "detect")}
    for col in ("pytorch_ood_examples", "pytorch_ood_cached"):
        if col in runs:
            columns[col]["in_process_median_s"] = {
                key: round(statistics.median(r[key] for r in runs[col]), 2) for key in ("import_s", "work_s")}
    base = columns.get("pytorch_ood_examples", {}).get("median_s")
    ratios = {f"{col}/pytorch_ood_examples": round(c["median_s"] / base, 2)
              for col, c in columns.items() if base and col != "pytorch_ood_examples"}
    aurocs = {col: results[-1]["auroc"] for col, results in runs.items()}
    return {"splits": files["splits"], "images": files["images"], "vim_dim": files["dim"],
            "model": str(files["model"]), "data": str(files["data"]), "columns": columns, "ratios": ratios,
            "auroc": {col: {m: {s: round(v, 6) for s, v in a[m].items()} for m in METHODS}
                      for col, a in aurocs.items()},
            "auroc_max_abs_diff": agreement(aurocs),
            "load_1min_per_run": {col: [r["load_1min"] for r in results] for col, results in runs.items()}}


def print_table(result: dict):
    cols = [c for c in COLUMNS if any(c in row["columns"] for row in result["rows"].values())]
    print(f"\nmedian s [min-max] over {result['repeats']} interleaved rounds; ratio against pytorch_ood_examples\n")
    print("| row | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for name, row in result["rows"].items():
        cells = []
        for col in cols:
            c = row["columns"].get(col)
            ratio = row["ratios"].get(f"{col}/pytorch_ood_examples")
            cells.append("" if c is None else f"{c['median_s']:.1f} [{c['min_s']:.1f}-{c['max_s']:.1f}]"
                         + ("" if ratio is None else f" ({ratio:.2f}x)"))
        print(f"| {name} ({row['images']} images, {row['splits']} splits) | " + " | ".join(cells) + " |")
    for name, row in result["rows"].items():
        worst = {m: max(d[m] for d in row["auroc_max_abs_diff"].values()) for m in METHODS}
        print(f"{name}: max |AUROC difference| between the columns, per method: {worst}")
    print(f"load average (1, 5, 15 min): {result['load_average']['before']} before, "
          f"{result['load_average']['after']} after")


# ------------------------------------------------------------------ main

def check_peer():
    """A clear one-line failure when pytorch-ood is not installed (it is an optional benchmark dependency)."""
    if importlib.util.find_spec("pytorch_ood") is None:
        raise SystemExit(MISSING.format(PEER_VERSION))
    from importlib.metadata import version

    found = version("pytorch-ood")
    if found != PEER_VERSION:
        print(f"warning: pytorch-ood {found} is installed; the table is for {PEER_VERSION}", file=sys.stderr)
    return found


def machine() -> dict:
    import numpy
    import sklearn
    import torch

    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "numpy": numpy.__version__,
            "sklearn": sklearn.__version__}


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (the median is reported)")
    parser.add_argument("--quick", action="store_true", help="smoke run: one round, the ResNet-18 row at a tenth "
                        "of its images; prints only unless --out is given")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="rows to run")
    parser.add_argument("--no-dvc", action="store_true", help="leave out the `dvc repro` column")
    parser.add_argument("--keep", type=Path, help="work in this new directory and keep it (default: a temporary one)")
    parser.add_argument("--out", type=Path, help=f"JSON results (default {DEFAULT_OUT.relative_to(REPO)}; "
                        "--quick: none)")
    for hidden in ("--peer", "--data", "--model", "--dim", "--peer-out"):  # the child process of a peer column
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    if args.peer:
        return run_peer(args.peer, args.data, args.model, int(args.dim), args.peer_out)
    peer = check_peer()
    repeats = 1 if args.quick else args.repeats
    columns = [c for c in COLUMNS if not (args.no_dvc and c == "dvc_repro")]
    with tempfile.TemporaryDirectory(prefix="bench_peers_") as tmp:
        work = args.keep.resolve() if args.keep else Path(tmp)
        rows = {row: prepare_row(row, work / row, QUICK_SCALE if args.quick else 1.0) for row in args.rows}
        if "dvc_repro" in columns:
            for files in rows.values():
                files["dvc"] = prepare_dvc(files)
        started, load = dt.datetime.now(), {"before": [round(x, 2) for x in os.getloadavg()]}
        runs = measure(rows, columns, repeats)
        load["after"] = [round(x, 2) for x in os.getloadavg()]
        result = {"date": started.isoformat(timespec="seconds"), "machine": machine(),
                  "pytorch_ood": peer, "repeats": repeats, "quick": args.quick, "load_average": load,
                  "rows": {row: summarise_row(files, runs[row]) for row, files in rows.items()}}
    print_table(result)
    out = args.out or (None if args.quick else DEFAULT_OUT)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
