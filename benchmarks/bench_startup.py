"""Benchmark of start-up: what each ``layerscope`` command imports, and how long that takes.

Run from the repository root (see ``benchmarks/README.md``)::

    .venv/bin/python benchmarks/bench_startup.py                 # writes benchmarks/results/bench_startup.json
    .venv/bin/python benchmarks/bench_startup.py --importtime    # plus the top 15 cumulative importers of each
    .venv/bin/python benchmarks/bench_startup.py --baseline /tmp/before   # and another checkout, interleaved

Every figure is the wall time of a fresh interpreter (``python -c ...``), start to
exit, interpreter shutdown included: the median of ``--repeats`` rounds, each
round running every command once (interleaved, so drift hits all of them alike).

* ``import``: ``python -c 'import stages.<x>'``, the import path of the stage the
  command runs (``summary`` and ``inspect`` run no stage: the modules they import;
  ``--help``: ``pipeline.cli``, the entry point), interpreter shutdown included;
* ``start``: the same imports, then the exit the ``layerscope`` command takes
  (:func:`pipeline.cli.run`: flush, then ``os._exit``, no module teardown). This
  is what a command pays besides its work: the start-up the issue's goal is about;
* ``--help``: ``layerscope <x> --help`` (the entry point only: commands import
  their stage when they run);
* ``run``: the real command on the project's outputs, when they exist
  (``layerscope summary`` on ``paths.detail``, ``layerscope inspect`` on the
  default feature store), and ``layerscope inputs`` on the default params (into a
  temporary directory): the stage every ``dvc repro`` runs first;
* ``torch``: whether the import pulled in torch (the contract: only ``extract``
  and ``train`` may); ``heavy``: which of the heavy packages it pulled in.

``import torch`` alone is the reference (and ``python -c pass`` the floor).
"""

from __future__ import annotations

import argparse
import atexit
import datetime as dt
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
DEFAULT_OUT = REPO / "benchmarks" / "results" / "bench_startup.json"
HEAVY = ("torch", "torchvision", "sklearn", "scipy", "skimage", "matplotlib", "pyod", "dask", "distributed",
         "xarray", "pandas", "zarr", "skops", "rich")
# command -> the modules its start imports
IMPORTS = {
    "detect": "stages.detect",
    "fit": "stages.fit",
    "search": "stages.search",
    "summary": "pipeline.cli, pipeline.metrics, pipeline.report",
    "inspect": "pipeline.cli, pipeline.store, pipeline.storeinfo",
    "extract": "stages.extract",
    "train": "stages.train",
    "generate": "stages.generate",
    "inputs": "stages.inputs",
    "--help": "pipeline.cli",
}
REFERENCES = {"python -c pass": "pass", "import torch": "import torch"}
PROBE = "; import sys; sys.stdout.write(' '.join(m for m in {heavy!r} if m in sys.modules))"
QUICK_EXIT = "; import os; sys.stdout.flush(); os._exit(0)"  # as pipeline.cli.run leaves once a command is done


def child_env(code: Path) -> dict:
    """The environment of every child: ``code`` first on the path, nothing else changed."""
    return {**os.environ, "PYTHONPATH": str(code)}


def timed(argv: list[str], env: dict) -> tuple[float, str]:
    """Wall time of one fresh process (start to exit) and its stdout; a failure stops the benchmark."""
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return seconds, done.stdout


def cases(layerscope: str) -> dict[str, list[str]]:
    """Every timed command line, by ``<command>/<what>``."""
    py = [sys.executable, "-P"]  # -P: the cwd (this repository) is not put first on sys.path; --code is
    out = {f"ref/{name}": [*py, "-c", code] for name, code in REFERENCES.items()}
    for cmd, modules in IMPORTS.items():
        out[f"{cmd}/import"] = [*py, "-c", f"import {modules}" + PROBE.format(heavy=HEAVY)]
        out[f"{cmd}/start"] = [*py, "-c", f"import {modules}" + PROBE.format(heavy=HEAVY) + QUICK_EXIT]
        out[f"{cmd}/help"] = [layerscope, "--help"] if cmd == "--help" else [layerscope, cmd, "--help"]
    detail, store = REPO / "reports" / "detail.json", REPO / "cache" / "features.zarr"
    if detail.is_file():
        out["summary/run"] = [layerscope, "summary"]
    if store.is_dir():
        out["inspect/run"] = [layerscope, "inspect", str(store)]
    scratch = Path(tempfile.mkdtemp(prefix="bench_startup-"))
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    out["inputs/run"] = [layerscope, "inputs", "--generate", str(scratch / "generate.json"), "--train",
                         str(scratch / "train.json")]
    return out


def measure(trees: dict[str, Path], repeats: int) -> dict:
    """Every case of every checkout in ``trees`` (``{label: path}``), all interleaved in each round."""
    layerscope = shutil.which("layerscope", path=str(Path(sys.executable).parent)) or "layerscope"
    runs = {(label, key): (argv, child_env(code)) for label, code in trees.items()
            for key, argv in cases(layerscope).items()}
    times: dict[tuple, list[float]] = {run: [] for run in runs}
    probes: dict[tuple, str] = {}
    load = [os.getloadavg()]
    for _ in range(repeats):
        for run, (argv, env) in runs.items():
            seconds, stdout = timed(argv, env)
            times[run].append(seconds)
            if run[1].endswith("/import"):
                probes[run] = stdout.strip()
    load.append(os.getloadavg())
    load = {"before": [round(x, 2) for x in load[0]], "after": [round(x, 2) for x in load[1]]}
    return {label: summarise({key: values for (tree, key), values in times.items() if tree == label},
                             {key: out for (tree, key), out in probes.items() if tree == label}, load)
            for label in trees}


def summarise(times: dict[str, list[float]], probes: dict[str, str], load: dict) -> dict:
    medians = {key: statistics.median(values) for key, values in times.items()}
    commands = {}
    for cmd, modules in IMPORTS.items():
        heavy = probes[f"{cmd}/import"].split()
        commands[cmd] = {"imports": modules, "import_s": round(medians[f"{cmd}/import"], 3),
                         "start_s": round(medians[f"{cmd}/start"], 3),
                         "help_s": round(medians[f"{cmd}/help"], 3),
                         "run_s": round(medians[f"{cmd}/run"], 3) if f"{cmd}/run" in medians else None,
                         "torch": "torch" in heavy, "heavy": heavy}
    return {"commands": commands,
            "references": {name: round(medians[f"ref/{name}"], 3) for name in REFERENCES},
            "runs": {key: [round(v, 3) for v in values] for key, values in times.items()},
            "load_average": load}


def importtime(code: Path, modules: str, top: int = 15) -> list[tuple[int, str]]:
    """The ``top`` cumulative importers (microseconds, module) of ``python -X importtime -c 'import modules'``."""
    done = subprocess.run([sys.executable, "-P", "-X", "importtime", "-c", f"import {modules}"], cwd=REPO,
                          env=child_env(code), capture_output=True, text=True, check=True)
    rows = []
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and "|" in line and "cumulative" not in line:
            _, cumulative, name = line.split("|")
            rows.append((int(cumulative), name.rstrip()))
    return sorted(rows, reverse=True)[:top]


def _commit(tree: Path) -> str:
    done = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=False)
    return done.stdout.strip()


def print_table(result: dict, repeats: int, what: str):
    from rich.console import Console
    from rich.table import Table

    ref = result["references"]
    table = Table("command", "imports", "import s", "start s", "--help s", "run s", "torch", "heavy packages",
                  title=f"{what}: start-up, median of {repeats} interleaved runs (import torch: "
                        f"{ref['import torch']:.2f} s; python -c pass: {ref['python -c pass']:.2f} s)")
    for cmd, row in result["commands"].items():
        table.add_row(cmd, row["imports"], f"{row['import_s']:.2f}", f"{row['start_s']:.2f}", f"{row['help_s']:.2f}",
                      "" if row["run_s"] is None else f"{row['run_s']:.2f}", "yes" if row["torch"] else "no",
                      " ".join(row["heavy"]))
    Console(width=200).print(table)
    print(f"load average (1, 5, 15 min): {result['load_average']['before']} before, "
          f"{result['load_average']['after']} after")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (the median is reported)")
    parser.add_argument("--code", type=Path, default=REPO, help="the checkout whose code is imported "
                        "(PYTHONPATH); the data and outputs are always this repository's")
    parser.add_argument("--baseline", type=Path, help="another checkout (e.g. a `git worktree` of the commit "
                        "before a change), measured in the same interleaved rounds")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results")
    parser.add_argument("--importtime", action="store_true", help="print the top 15 cumulative importers of each")
    args = parser.parse_args(argv)
    code = args.code.resolve()
    trees = {"code": code, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    measured = measure(trees, args.repeats)
    result = {"date": dt.datetime.now().isoformat(timespec="seconds"), "python": platform.python_version(),
              "cpus": os.cpu_count(), "repeats": args.repeats}
    for label, tree in trees.items():
        result[label] = {"path": str(tree), "commit": _commit(tree), **measured[label]}
        print_table(result[label], args.repeats, f"{label} ({result[label]['commit']}, {tree})")
    if args.importtime:
        for cmd, modules in {**IMPORTS, "import torch": "torch"}.items():
            print(f"\n{cmd}: python -X importtime -c 'import {modules}' (cumulative ms)")
            for micros, name in importtime(code, modules):
                print(f"  {micros / 1000:8.1f}  {name}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
